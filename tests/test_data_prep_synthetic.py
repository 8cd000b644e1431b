import h5py
import numpy as np
import pytest
import torch

from data_prep.corr_dataset import CorrespondenceDataset, collate_sets
from data_prep.h5io import PAIR_FIELDS, pair_keys, read_pair, read_settings
from data_prep.labels import label_matches
from data_prep.synthetic import synthetic_pair, write_synthetic_dataset


def test_synthetic_pair_labels_follow_generation():
    rng = np.random.default_rng(0)
    p = synthetic_pair(rng, num_matches=400, outlier_ratio=0.5, noise_px=0.5)
    n = len(p["label"])
    assert n == 400
    for field, (dtype, shape) in PAIR_FIELDS.items():
        assert p[field].dtype == dtype, field
        assert all(s is None or s == d for s, d in zip(shape, p[field].shape)), field
    inl = ~p["is_outlier"]
    assert inl.sum() == 200
    # generated inliers are labelled inliers; generated outliers almost never
    assert p["label"][inl].all()
    assert p["label"][~inl].mean() < 0.1
    # relabelling with the shared labelling function gives the same result
    again = label_matches(p["kpts1"], p["kpts2"], p["K1"], p["K2"], p["R"], p["t"])
    np.testing.assert_array_equal(again["label"], p["label"])
    np.testing.assert_allclose(np.linalg.norm(p["t"]), 1.0)
    # side information correlates with inlierness
    assert p["ratio"][inl].mean() < p["ratio"][~inl].mean() - 0.2
    assert p["mutual"][inl].mean() > p["mutual"][~inl].mean() + 0.3
    # normalized coordinates agree with the pixel keypoints
    K1 = p["K1"]
    np.testing.assert_allclose(p["xs"][:, 0] * K1[0, 0] + p["xs"][:, 1] * K1[0, 1] + K1[0, 2], p["kpts1"][:, 0], atol=1e-2)


def test_synthetic_pair_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="outlier_ratio"):
        synthetic_pair(rng, outlier_ratio=1.5)
    with pytest.raises(ValueError, match="num_matches"):
        synthetic_pair(rng, num_matches=0)


def test_write_synthetic_dataset_is_deterministic(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a.h5", 3, seed=5, num_matches=(50, 120))
    b = write_synthetic_dataset(tmp_path / "b.h5", 3, seed=5, num_matches=(50, 120))
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))
    with h5py.File(a, "r") as h5:
        keys = pair_keys(h5)
        assert keys == ["pair_000000", "pair_000001", "pair_000002"]
        rec = read_pair(h5[keys[1]])
        assert rec["name"] == "synthetic/000001"
    settings = read_settings(b)
    assert settings["seed"] == 5 and settings["format"] == "synthetic" and settings["threshold"] == 1e-4


def test_dataset_and_collate(tmp_path):
    path = write_synthetic_dataset(tmp_path / "s.h5", 4, seed=1, num_matches=(60, 200))
    ds = CorrespondenceDataset(path)
    assert len(ds) == 4
    item = ds[0]
    n = item["x"].shape[1]
    assert item["x"].shape == (4, n) and item["xs"].shape == (n, 4)
    torch.testing.assert_close(item["x"], item["xs"].T)
    assert item["label"].dtype == torch.float32 and item["R"].shape == (3, 3)

    ds6 = CorrespondenceDataset(path, side_info=True)
    item6 = ds6[0]
    assert item6["x"].shape == (6, n)
    torch.testing.assert_close(item6["x"][4], item6["ratio"])

    batch = collate_sets([ds6[i] for i in range(4)])
    sizes = [ds6[i]["x"].shape[1] for i in range(4)]
    assert batch["x"].shape == (4, 6, max(sizes))
    assert batch["mask"].sum(1).tolist() == sizes
    assert batch["xs"].shape == (4, max(sizes), 4) and batch["R"].shape == (4, 3, 3) and batch["t"].shape == (4, 3)
    for b, s in enumerate(sizes):
        assert (batch["x"][b, :, s:] == 0).all() and (batch["label"][b, s:] == 0).all()
        torch.testing.assert_close(batch["label"][b, :s], ds6[b]["label"])
    assert batch["names"] == [f"synthetic/{i:06d}" for i in range(4)]


def test_dataset_subsampling_and_pair_selection(tmp_path):
    path = write_synthetic_dataset(tmp_path / "s.h5", 3, seed=2, num_matches=300)
    ds = CorrespondenceDataset(path, max_matches=100, seed=7)
    a, b = ds[1], ds[1]
    assert a["x"].shape == (4, 100)
    torch.testing.assert_close(a["xs"], b["xs"])  # same seed, same epoch -> same subset
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["xs"], a["xs"])
    full = CorrespondenceDataset(path)[1]
    # the subset is made of rows of the full pair
    rows = {tuple(r) for r in full["xs"].tolist()}
    assert all(tuple(r) in rows for r in a["xs"].tolist())

    sub = CorrespondenceDataset(path, pairs=["synthetic/000002", 0])
    assert [sub[i]["name"] for i in range(2)] == ["synthetic/000002", "synthetic/000000"]
    with pytest.raises(ValueError, match="not found"):
        CorrespondenceDataset(path, pairs=["nope"])
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        CorrespondenceDataset(tmp_path / "missing.h5")


def test_dataset_works_with_dataloader_workers(tmp_path):
    path = write_synthetic_dataset(tmp_path / "s.h5", 4, seed=3, num_matches=(40, 90))
    ds = CorrespondenceDataset(path, side_info=True)
    ds[0]  # opens a handle in the parent; workers must open their own
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_sets)
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["x"].shape[:2] == (2, 6)


def _epipolar_residuals(item):
    from n3sets.geometry import essential_from_pose

    E = essential_from_pose(item["R"][None].double(), item["t"][None].double())[0]
    ones = torch.ones(len(item["xs"]), 1, dtype=torch.float64)
    x1 = torch.cat([item["xs"][:, :2].double(), ones], 1)
    x2 = torch.cat([item["xs"][:, 2:].double(), ones], 1)
    return ((x2 @ E) * x1).sum(1).abs()


def test_augmentation_keeps_the_geometry_exact(tmp_path):
    from data_prep.corr_dataset import augment_pair

    path = write_synthetic_dataset(tmp_path / "s.h5", 3, seed=4, num_matches=200, outlier_ratio=0.5)
    plain = CorrespondenceDataset(path, seed=0)
    aug = CorrespondenceDataset(path, seed=0, augment_swap=0.5, augment_rotation=20)
    moved = 0
    for epoch in range(4):
        aug.set_epoch(epoch)
        for i in range(len(aug)):
            a, b = plain[i], aug[i]
            lab = a["label"] > 0.5
            torch.testing.assert_close(a["label"], b["label"])  # same matches, same order
            # inliers stay on the epipolar lines of the transformed pose, as much as before
            assert _epipolar_residuals(b)[lab].max() < 10 * _epipolar_residuals(a)[lab].max() + 1e-5
            # outliers stay off them
            assert _epipolar_residuals(b)[~lab].median() > 1e-3
            torch.testing.assert_close(torch.linalg.det(b["R"]), torch.tensor(1.0))
            torch.testing.assert_close(b["t"].norm(), a["t"].norm())
            # pixel keypoints follow the normalized points through the (unchanged) intrinsics
            for k, xs, K in (("kpts1", b["xs"][:, :2], b["K1"]), ("kpts2", b["xs"][:, 2:], b["K2"])):
                torch.testing.assert_close(xs * K.diagonal()[:2] + K[:2, 2], b[k], atol=0.05, rtol=0)
            moved += not torch.allclose(a["xs"], b["xs"])
    assert moved == 12  # every draw rotates
    # deterministic per (seed, index, epoch)
    aug.set_epoch(1)
    torch.testing.assert_close(aug[2]["xs"], aug[2]["xs"])

    # a swap alone exchanges the views exactly: (R, t) -> (R^T, -R^T t)
    rec = read_pair(h5py.File(path, "r")["pair_000001"])
    rng = np.random.default_rng(0)
    s = augment_pair(rec, rng, swap=1.0)
    np.testing.assert_array_equal(s["xs"], np.concatenate([rec["xs"][:, 2:], rec["xs"][:, :2]], 1))
    np.testing.assert_allclose(s["R"], rec["R"].T, atol=1e-7)
    np.testing.assert_allclose(s["t"], -rec["R"].T @ rec["t"].reshape(3), atol=1e-6)
    np.testing.assert_array_equal(s["kpts1"], rec["kpts2"])
    back = augment_pair(s, rng, swap=1.0)
    np.testing.assert_allclose(back["R"], rec["R"], atol=1e-7)
    np.testing.assert_allclose(back["t"], rec["t"].reshape(3), atol=1e-6)
    with pytest.raises(ValueError, match="augment_swap"):
        CorrespondenceDataset(path, augment_swap=2.0)
    with pytest.raises(ValueError, match="augment_rotation"):
        CorrespondenceDataset(path, augment_rotation=-1)
