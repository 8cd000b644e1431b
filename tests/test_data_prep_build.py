import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import data_prep.build as build_mod
from data_prep.build import BuildConfig, build_dataset, format_summary, merge_h5, select_pairs
from data_prep.corr_dataset import CorrespondenceDataset, collate_sets
from data_prep.features import detect_sift, load_gray, match_descriptors
from data_prep.h5io import PAIR_FIELDS, pair_keys, read_pair, read_settings
from data_prep.labels import label_matches, pair_relative_pose
from data_prep.scenes import read_strecha_scene, read_yi_scene, write_yi_layout
from n3sets.geometry import normalize_keypoints

ROOT = Path(__file__).resolve().parents[1]
NUM_KP = 400


@pytest.fixture(scope="module")
def small_scene_dir(strecha_root, tmp_path_factory):
    """entry-P10 views 0-3 in the Strecha layout (images symlinked)."""
    dst = tmp_path_factory.mktemp("strecha") / "entry4"
    (dst / "images").mkdir(parents=True)
    (dst / "cameras").mkdir()
    for k in range(4):
        name = f"{k:04d}.jpg"
        (dst / "images" / name).symlink_to(strecha_root / "entry-P10" / "images" / name)
        shutil.copyfile(strecha_root / "entry-P10" / "cameras" / f"{name}.camera", dst / "cameras" / f"{name}.camera")
    return dst


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _cfg(cache_dir, **kw):
    kw.setdefault("num_kp", NUM_KP)
    return BuildConfig(cache_dir=str(cache_dir), **kw)


def _contents(path):
    with h5py.File(path, "r") as h5:
        return {k: read_pair(h5[k]) for k in pair_keys(h5)}


def test_labels_on_real_pair_agree_with_ransac(strecha_root):
    """GT labels of SIFT matches on entry-P10 0000-0001 vs. an OpenCV RANSAC essential matrix."""
    import cv2

    scene = read_strecha_scene(strecha_root / "entry-P10")
    (k1, d1), (k2, d2) = (detect_sift(load_gray(scene.image_paths[i]), 1000) for i in (0, 1))
    m = match_descriptors(d1, d2)
    R, t = pair_relative_pose(scene.R[0], scene.t[0], scene.R[1], scene.t[1])
    kp1, kp2 = k1[m["idx1"]], k2[m["idx2"]]
    lab = label_matches(kp1, kp2, scene.K[0], scene.K[1], R, t)
    gt = lab["label"].astype(bool)
    assert 0.2 < gt.mean() < 0.9
    # median symmetric epipolar error of the GT inliers, in pixels (sqrt(d) * focal length)
    f = 0.5 * (scene.K[0][0, 0] + scene.K[1][0, 0])
    assert np.median(np.sqrt(lab["epi_dist"][gt])) * f < 1.0

    good = m["ratio"] < 0.8  # RANSAC on ratio-test survivors, as one would in practice
    x1 = lab["xs"][good, :2].astype(np.float64)
    x2 = lab["xs"][good, 2:].astype(np.float64)
    thr = 1.0 / f  # 1 px in normalized units
    E, mask = cv2.findEssentialMat(x1, x2, np.eye(3), method=cv2.RANSAC, prob=0.9999, threshold=thr)
    _, R_est, t_est, mask = cv2.recoverPose(E[:3], x1, x2, np.eye(3), mask=mask.copy())
    rot_err = np.degrees(np.arccos(np.clip((np.trace(R_est.T @ R) - 1) / 2, -1, 1)))
    t_err = np.degrees(np.arccos(min(1.0, abs(float(t_est.ravel() @ t)) / np.linalg.norm(t_est))))
    assert rot_err < 2.0 and t_err < 10.0
    ransac = np.zeros(len(gt), bool)
    ransac[np.flatnonzero(good)] = mask.ravel() > 0
    gt_good = gt & good
    overlap = (ransac & gt_good).sum() / (ransac | gt_good).sum()
    assert overlap > 0.8, overlap


def test_select_pairs_is_deterministic_and_split_by_unordered_pair(small_scene_dir):
    scene = read_strecha_scene(small_scene_dir)
    cfg = BuildConfig(val_fraction=0.34, seed=3, max_angle_deg=180)
    a, b = select_pairs([scene], cfg), select_pairs([scene], cfg)
    assert a == b
    assert len(a) == 12  # 6 unordered pairs, both directions
    split = {}
    for t in a:
        split.setdefault(t["unit"], set()).add(t["split"])
    assert all(len(s) == 1 for s in split.values())
    assert sum(s == {"val"} for s in split.values()) == 2
    capped = select_pairs([scene], BuildConfig(max_pairs=5, max_angle_deg=180))
    assert len(capped) == 5
    narrow = select_pairs([scene], BuildConfig(max_angle_deg=1e-3))
    assert narrow == []


def test_build_writes_schema(small_scene_dir, cache_dir, tmp_path):
    scene = read_strecha_scene(small_scene_dir)
    out, val = tmp_path / "train.h5", tmp_path / "val.h5"
    summary = build_dataset([scene], out, _cfg(cache_dir, val_fraction=0.3, min_verified=10), val_out=val, progress=False)
    assert "entry4" in format_summary(summary)
    train, valid = _contents(out), _contents(val)
    assert len(train) + len(valid) + summary["skipped"] == 12
    assert len(valid) >= 2 and len(train) >= 6
    units = lambda recs: {frozenset((r["image1"], r["image2"])) for r in recs.values()}  # noqa: E731
    assert not units(train) & units(valid)
    settings = read_settings(out)
    assert settings["num_kp"] == NUM_KP and settings["threshold"] == 1e-4 and settings["split"] == "train"
    for rec in train.values():
        n = len(rec["label"])
        assert n == NUM_KP
        for field, (dtype, shape) in PAIR_FIELDS.items():
            assert rec[field].dtype == dtype
        np.testing.assert_allclose(np.linalg.norm(rec["t"]), 1.0)
        np.testing.assert_array_equal(rec["label"], rec["epi_dist"] < 1e-4)
        xn = normalize_keypoints(torch.as_tensor(rec["kpts2"], dtype=torch.float64), torch.as_tensor(rec["K2"]))
        np.testing.assert_allclose(rec["xs"][:, 2:], xn.numpy(), atol=1e-5)
        assert rec["name"] == f"entry4/{Path(rec['image1']).stem}-{Path(rec['image2']).stem}"
        assert 0.05 < rec["label"].mean() < 0.95
    # the training dataset reads it
    ds = CorrespondenceDataset(out, side_info=True)
    batch = collate_sets([ds[0], ds[1]])
    assert batch["x"].shape == (2, 6, NUM_KP)


def test_interrupted_build_resumes_to_identical_file(small_scene_dir, cache_dir, tmp_path, monkeypatch):
    scene = read_strecha_scene(small_scene_dir)
    reference = tmp_path / "ref.h5"
    build_dataset([scene], reference, _cfg(cache_dir, max_angle_deg=45), progress=False)

    fresh_cache = tmp_path / "fresh_cache"
    out = tmp_path / "out.h5"
    real = build_mod._make_unit
    calls = {"n": 0}

    def crash_after_two(job):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(job)

    monkeypatch.setattr(build_mod, "_make_unit", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_dataset([scene], out, _cfg(fresh_cache, max_angle_deg=45), progress=False)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    assert len(list(fresh_cache.glob("*.npz"))) == 4  # features survived the interruption
    monkeypatch.setattr(build_mod, "_make_unit", real)
    build_dataset([scene], out, _cfg(fresh_cache, max_angle_deg=45), progress=False)
    assert out.read_bytes() == reference.read_bytes()


def test_cli_script_with_workers_and_shards(small_scene_dir, cache_dir, tmp_path):
    scene = read_strecha_scene(small_scene_dir)
    reference = tmp_path / "ref.h5"
    build_dataset([scene], reference, _cfg(cache_dir, max_angle_deg=45), progress=False)
    common = [sys.executable, str(ROOT / "pipelines" / "build_corr_dataset.py"), "--format", "strecha",
              "--scene", str(small_scene_dir), "--num-kp", str(NUM_KP), "--max-angle", "45",
              "--cache-dir", str(cache_dir), "--no-progress"]
    res = subprocess.run(common + ["--out", str(tmp_path / "cli.h5"), "--workers", "2"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "median keypoints" in res.stdout and "build time" in res.stdout
    assert (tmp_path / "cli.h5").read_bytes() == reference.read_bytes()
    bad = subprocess.run(common[:4] + ["--scene", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.h5")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "nowhere" in bad.stderr and "Traceback" not in bad.stderr
    # an existing --out is refused up front (one line) unless --overwrite
    before = (tmp_path / "cli.h5").stat().st_mtime_ns
    again = subprocess.run(common + ["--out", str(tmp_path / "cli.h5")], capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [again.stderr.strip()]
    assert "cli.h5 exists; pass --overwrite" in again.stderr
    assert (tmp_path / "cli.h5").stat().st_mtime_ns == before
    again = subprocess.run(common + ["--out", str(tmp_path / "cli.h5"), "--overwrite"], capture_output=True, text=True,
                           cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "cli.h5").read_bytes() == reference.read_bytes()
    shards = []
    for i in range(2):
        path = tmp_path / f"shard{i}.h5"
        build_dataset([scene], path, _cfg(cache_dir, max_angle_deg=45, shard=(i, 2)), progress=False)
        shards.append(path)
    merged = merge_h5(shards, tmp_path / "merged.h5")
    a, b = _contents(reference), _contents(merged)
    assert sorted(a) == sorted(b) and len(_contents(shards[0])) < len(a)
    for key in a:
        for field in PAIR_FIELDS:
            np.testing.assert_array_equal(a[key][field], b[key][field])


def test_bad_inputs(small_scene_dir, cache_dir, tmp_path):
    import cv2

    # an image without keypoints: its pairs are skipped (fewer than 8 matches), the rest is built
    blank_dir = tmp_path / "blank"
    shutil.copytree(small_scene_dir, blank_dir, symlinks=True)
    (blank_dir / "images" / "0002.jpg").unlink()
    cv2.imwrite(str(blank_dir / "images" / "0002.jpg"), np.full((683, 1024), 127, np.uint8))
    scene = read_strecha_scene(blank_dir)
    out = tmp_path / "blank.h5"
    summary = build_dataset([scene], out, _cfg(tmp_path / "c1", max_angle_deg=180, min_verified=0), progress=False)
    recs = _contents(out)
    assert summary["skipped"] == 6 and len(recs) == 6
    assert all("0002.jpg" not in (r["image1"], r["image2"]) for r in recs.values())
    assert "fewer than 8 matches" in summary["skip_reasons"]

    # fewer than 8 matches everywhere: an empty (but valid) file
    out5 = tmp_path / "five.h5"
    summary = build_dataset([read_strecha_scene(small_scene_dir)], out5, _cfg(tmp_path / "c2", num_kp=5, max_angle_deg=180), progress=False)
    assert summary["skipped"] == 12 and _contents(out5) == {}

    # image size that contradicts the camera file: error naming the image
    wrong = tmp_path / "wrong"
    shutil.copytree(small_scene_dir, wrong, symlinks=True)
    (wrong / "images" / "0001.jpg").unlink()
    cv2.imwrite(str(wrong / "images" / "0001.jpg"), np.full((100, 100), 127, np.uint8))
    with pytest.raises(ValueError, match="0001.jpg is 100x100"):
        build_dataset([read_strecha_scene(wrong)], tmp_path / "w.h5", _cfg(tmp_path / "c3"), progress=False)
    assert not (tmp_path / "w.h5").exists()

    # missing image file
    missing = tmp_path / "missing"
    shutil.copytree(small_scene_dir, missing, symlinks=True)
    scene = read_strecha_scene(missing)
    (missing / "images" / "0003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="0003.jpg"):
        build_dataset([scene], tmp_path / "m.h5", _cfg(tmp_path / "c4"), progress=False)

    with pytest.raises(ValueError, match="val_out"):
        build_dataset([scene], tmp_path / "x.h5", _cfg(cache_dir, val_fraction=0.2), progress=False)


def test_cli_bad_camera_and_corrupt_cache(small_scene_dir, cache_dir, tmp_path):
    scene = tmp_path / "scene"
    shutil.copytree(small_scene_dir, scene, symlinks=True)
    camera = scene / "cameras" / "0002.jpg.camera"
    numbers = camera.read_text().split()
    camera.write_text(" ".join(["nan"] + numbers[1:]) + "\n")
    cmd = [sys.executable, str(ROOT / "pipelines" / "build_corr_dataset.py"), "--format", "strecha", "--scene",
           str(scene), "--num-kp", str(NUM_KP), "--max-angle", "45", "--no-progress"]
    res = subprocess.run(cmd + ["--out", str(tmp_path / "nan.h5"), "--cache-dir", str(cache_dir)],
                         capture_output=True, text=True)
    # not "no covisible pairs": an error naming the camera file, and no output file
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert "0002.jpg.camera" in res.stderr and "NaN" in res.stderr
    assert not (tmp_path / "nan.h5").exists()
    # a damaged feature-cache entry: a warning naming it, then rebuilt (the same file as from a good cache)
    camera.write_text(" ".join(numbers) + "\n")
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir, cache)
    reference = tmp_path / "ref.h5"
    build_dataset([read_strecha_scene(scene)], reference, _cfg(cache, max_angle_deg=45), progress=False)
    from data_prep.features import FeatureCache

    entry = FeatureCache(cache, num_kp=NUM_KP).path_for(scene / "images" / "0001.jpg")
    entry.write_bytes(entry.read_bytes()[:200])
    res = subprocess.run(cmd + ["--out", str(tmp_path / "rebuilt.h5"), "--cache-dir", str(cache)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert str(entry) in res.stderr and "recomputing" in res.stderr
    assert (tmp_path / "rebuilt.h5").read_bytes() == reference.read_bytes()


def test_yi_fixture_builds_same_pairs_as_strecha(small_scene_dir, cache_dir, tmp_path):
    """The yi-layout copy of a Strecha scene gives the same labelled pairs (covisibility-driven)."""
    scene = read_strecha_scene(small_scene_dir)
    covis = np.full((4, 4), 500.0)
    covis[0, 3] = covis[3, 0] = 5.0  # below Yi's threshold of 100: pair (0, 3) is not used
    split = write_yi_layout(scene, tmp_path / "entry4" / "train", covisibility=covis)
    yi = read_yi_scene(split)
    out_yi, out_st = tmp_path / "yi.h5", tmp_path / "st.h5"
    build_dataset([yi], out_yi, _cfg(cache_dir), progress=False)
    build_dataset([scene], out_st, _cfg(cache_dir, max_angle_deg=180, min_verified=0), progress=False)
    a, b = _contents(out_yi), _contents(out_st)
    by_name = {r["image1"] + r["image2"]: r for r in b.values()}
    assert len(a) == 10 and len(b) == 12
    for rec in a.values():
        assert {rec["image1"], rec["image2"]} != {"0000.jpg", "0003.jpg"}
        ref = by_name[rec["image1"] + rec["image2"]]
        for field in ("xs", "label", "R", "t", "kpts2"):
            np.testing.assert_allclose(rec[field], ref[field], atol=1e-6)


def test_colmap_model_builds(small_scene_dir, cache_dir, tmp_path):
    """A COLMAP model of the same views builds the same labelled pairs; covisibility drives selection."""
    from test_data_prep_scenes import _colmap_model

    from data_prep.scenes import read_scene

    scene = read_strecha_scene(small_scene_dir)
    model = _colmap_model(scene, tmp_path / "project" / "sparse" / "0", n=3)
    (tmp_path / "project" / "images").symlink_to(small_scene_dir / "images")
    colmap = read_scene("colmap", model)  # images found at MODEL/../../images
    out = tmp_path / "colmap.h5"
    summary = build_dataset([colmap], out, _cfg(cache_dir, vis_threshold=0.5), progress=False)
    recs = _contents(out)
    assert len(recs) == 6 and summary["skipped"] == 0
    ref = tmp_path / "st.h5"
    build_dataset([scene], ref, _cfg(cache_dir, max_angle_deg=180, min_verified=0), progress=False)
    by_name = {r["image1"] + r["image2"]: r for r in _contents(ref).values()}
    for rec in recs.values():
        other = by_name[rec["image1"] + rec["image2"]]
        np.testing.assert_array_equal(rec["label"], other["label"])
        np.testing.assert_allclose(rec["R"], other["R"], atol=1e-5)
    assert colmap.name == "project"
    # pairs (1, 3) and (2, 3) share one point: a threshold of 1 (strict) keeps only (1, 2), both ways
    assert [(t["i"], t["j"]) for t in select_pairs([colmap], BuildConfig(vis_threshold=1.0))] == [(0, 1), (1, 0)]
