"""n3sets.twoview: one network-pose definition everywhere, one minimum, two-view verification."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_prep.corr_dataset import CorrespondenceDataset, collate_sets
from data_prep.synthetic import synthetic_pair, write_synthetic_dataset
from n3sets.evaluation import evaluate_correspondences
from n3sets.geometry import normalize_keypoints
from n3sets.match_filter import MatchFilter
from n3sets.models import N3Net
from n3sets.pose import pose_error
from n3sets.twoview import (MIN_MATCHES, VERIFY_DEFAULTS, check_stats, pose_from_logits, pose_from_weights,
                            rotation_inliers, triangulation_angles, verification_stats, verify_two_view)

ROOT = Path(__file__).resolve().parents[1]


def _load_train_corr():
    spec = importlib.util.spec_from_file_location("train_corr_for_test", ROOT / "pipelines" / "train_corr.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class ConstantLogits(torch.nn.Module):
    def __init__(self, logit: float = 5.0):
        super().__init__()
        self.logit = logit
        self.conf = {"side_info": False}

    def forward(self, x, mask=None):
        return torch.full(x.shape[::2], self.logit)


@pytest.fixture(scope="module")
def small_h5(tmp_path_factory):
    path = tmp_path_factory.mktemp("twoview") / "pairs.h5"
    write_synthetic_dataset(path, num_pairs=6, seed=5, num_matches=(150, 250), outlier_ratio=0.5, noise_px=0.5)
    return path


def test_training_validation_evaluation_and_filter_report_the_same_pose(small_h5):
    """The val_mAP that selects a model is the mAP eval_corr reports, and MatchFilter(refine=None)
    returns the same pose: all three call n3sets.twoview.pose_from_logits."""
    torch.manual_seed(0)
    model = N3Net(channels=16, num_blocks=2, k=2, n3_after=1, embed_channels=4).eval()
    ds = CorrespondenceDataset(small_h5)
    ev = evaluate_correspondences([ds[i] for i in range(len(ds))], models={"m": model}, baselines=(),
                                  model_refine=False)
    train_corr = _load_train_corr()
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_sets)  # padded batches of unequal sets
    val = train_corr.validate(model, loader, rank=0, world=1, progress=False)
    for key in ("mAP5", "mAP10", "mAP20"):
        assert val[key] == pytest.approx(ev["methods"]["m"][key], abs=1e-12), key
    mf = MatchFilter(model, verify=False)
    eye = np.eye(3)
    for i in range(len(ds)):
        pair = ds[i]
        xs = pair["xs"].double().numpy()
        res = mf.filter(xs[:, :2], xs[:, 2:], eye, eye, refine=None)
        if res.ok:
            err = float(pose_error(torch.from_numpy(res.R), torch.from_numpy(res.t), pair["R"].double(),
                                   pair["t"].double()))
        else:
            err = 180.0
        assert err == pytest.approx(ev["errors"]["m"][i], abs=1e-6)


def test_min_matches_counts_distinct_supported_matches():
    p = synthetic_pair(np.random.default_rng(1), num_matches=40, outlier_ratio=0.0, noise_px=0.0)
    x = torch.as_tensor(p["xs"], dtype=torch.float64)
    x1, x2 = x[None, :, :2], x[None, :, 2:]
    logits = torch.full((1, 40), -3.0, dtype=torch.float64)
    logits[0, :MIN_MATCHES] = 3.0
    assert bool(pose_from_logits(x1, x2, logits)[3][0])
    logits[0, MIN_MATCHES - 1] = -3.0  # seven supported matches
    assert not bool(pose_from_logits(x1, x2, logits)[3][0])
    # eight supported matches, but only seven distinct: a duplicate adds no constraint
    x1d, x2d = x1.clone(), x2.clone()
    x1d[0, MIN_MATCHES - 1], x2d[0, MIN_MATCHES - 1] = x1d[0, 0], x2d[0, 0]
    logits[0, MIN_MATCHES - 1] = 3.0
    assert not bool(pose_from_logits(x1d, x2d, logits)[3][0])
    # the same rule in the weights form (labels as weights)
    w = (logits > 0).double()
    assert bool(pose_from_weights(x1, x2, w)[3][0]) and not bool(pose_from_weights(x1d, x2d, w)[3][0])


def test_robust_estimator_uses_the_same_minimum():
    from n3sets.robust import MIN_MATCHES as ROBUST_MIN
    from n3sets.match_filter import MIN_MATCHES as FILTER_MIN

    assert ROBUST_MIN == FILTER_MIN == MIN_MATCHES


def _normalized(p):
    n1 = normalize_keypoints(torch.as_tensor(p["kpts1"], dtype=torch.float64), torch.as_tensor(p["K1"], dtype=torch.float64))
    n2 = normalize_keypoints(torch.as_tensor(p["kpts2"], dtype=torch.float64), torch.as_tensor(p["K2"], dtype=torch.float64))
    return n1.numpy(), n2.numpy()


def test_triangulation_angle_and_cheirality_from_definitions():
    rng = np.random.default_rng(0)
    X = rng.uniform([-1, -1, 4], [1, 1, 6], size=(50, 3))  # points in front of camera 1
    ang = np.radians(10.0)
    R = np.array([[np.cos(ang), 0, np.sin(ang)], [0, 1, 0], [-np.sin(ang), 0, np.cos(ang)]])
    t = np.array([-1.0, 0.0, 0.2])
    X2 = X @ R.T + t
    x1, x2 = X[:, :2] / X[:, 2:], X2[:, :2] / X2[:, 2:]
    angles, front = triangulation_angles(x1, x2, R, t)
    # the angle at X between the rays to camera 1 (the origin) and camera 2 (centre -R^T t)
    c2 = -R.T @ t
    to1, to2 = -X, c2 - X
    ref = np.degrees(np.arccos((to1 * to2).sum(1) / np.linalg.norm(to1, axis=1) / np.linalg.norm(to2, axis=1)))
    assert np.allclose(angles, ref, atol=1e-6) and front.all()
    # the wrong direction of t puts every point behind the cameras
    assert not triangulation_angles(x1, x2, R, -t)[1].any()
    # zero baseline: the same image twice has zero triangulation angles
    assert np.allclose(triangulation_angles(x1, x1, np.eye(3), np.array([1.0, 0, 0]))[0], 0.0, atol=1e-6)


def test_real_pair_is_verified_and_random_matches_are_not():
    p = synthetic_pair(np.random.default_rng(2), num_matches=500, outlier_ratio=0.5, noise_px=0.5)
    mf = MatchFilter(ConstantLogits())
    res = mf.filter(p["kpts1"], p["kpts2"], p["K1"], p["K2"])
    assert res.ok and res.reason == "" and res.verification["num_inliers"] >= 200
    # uniformly random matches: RANSAC returns *some* E; verification refuses it and says why
    rng = np.random.default_rng(0)
    for n in (200, 2000):
        k1 = rng.uniform([0, 0], [1024, 683], size=(n, 2))
        k2 = rng.uniform([0, 0], [1024, 683], size=(n, 2))
        res = mf.filter(k1, k2, p["K1"], p["K2"])
        assert not res.ok and res.E is None and res.num_inliers == 0
        assert res.reason.startswith("verification failed:") and res.verification is not None
        d = res.to_dict()
        assert d["ok"] is False and d["num_inliers"] == 0 and d["verification"]["num_inliers"] > 0
        # without verification the estimator alone does report a pose: the reason verification exists
        assert MatchFilter(ConstantLogits(), verify=False).filter(k1, k2, p["K1"], p["K2"]).ok


@pytest.mark.parametrize("refine", ["ransac", None])
def test_same_image_twice_says_no_baseline(refine):
    p = synthetic_pair(np.random.default_rng(3), num_matches=300, outlier_ratio=0.0, noise_px=0.0)
    res = MatchFilter(ConstantLogits()).filter(p["kpts1"], p["kpts1"], p["K1"], p["K1"], refine=refine)
    assert not res.ok and "no baseline" in res.reason and res.num_inliers == 0


def test_pure_rotation_says_no_baseline():
    rng = np.random.default_rng(4)
    X = rng.uniform([-2, -2, 4], [2, 2, 8], size=(300, 3))
    ang = np.radians(8.0)
    R = np.array([[np.cos(ang), -np.sin(ang), 0], [np.sin(ang), np.cos(ang), 0], [0, 0, 1]]) @ \
        np.array([[np.cos(ang), 0, np.sin(ang)], [0, 1, 0], [-np.sin(ang), 0, np.cos(ang)]])
    K = np.array([[900.0, 0, 512], [0, 900, 340], [0, 0, 1]])
    X2 = X @ R.T  # t = 0
    k1 = (X / X[:, 2:]) @ K.T
    k2 = (X2 / X2[:, 2:]) @ K.T
    k2[:, :2] += rng.normal(0, 0.3, size=(300, 2))
    res = MatchFilter(ConstantLogits()).filter(k1[:, :2], k2[:, :2], K, K)
    assert not res.ok and "no baseline" in res.reason
    assert rotation_inliers(*(normalize_keypoints(torch.as_tensor(k, dtype=torch.float64), torch.as_tensor(K)).numpy()
                              for k in (k1[:, :2], k2[:, :2]))) >= 250


def test_each_test_is_named_in_the_reason():
    base = {"num_inliers": 100, "inlier_ratio": 0.2, "triangulation_angle": 10.0, "cheirality": 1.0,
            "rotation_inliers": 0}
    assert check_stats(base) == ""
    cases = {
        "min_inliers": {"num_inliers": VERIFY_DEFAULTS["min_inliers"] - 1},
        "min_inlier_ratio": {"inlier_ratio": VERIFY_DEFAULTS["min_inlier_ratio"] / 2},
        "min_triangulation_angle": {"triangulation_angle": VERIFY_DEFAULTS["min_triangulation_angle"] / 2},
        "min_cheirality": {"cheirality": VERIFY_DEFAULTS["min_cheirality"] / 2},
        "no baseline": {"rotation_inliers": 100},
    }
    for name, change in cases.items():
        assert name in check_stats({**base, **change}), name
    with pytest.raises(ValueError, match="unknown verification option"):
        check_stats(base, {"min_inlier": 3})


def test_verification_stats_input_checks():
    x = np.zeros((5, 2))
    with pytest.raises(ValueError, match="x1"):
        verification_stats(np.zeros((5, 3)), x, np.ones(5, bool), np.eye(3), np.ones(3))
    with pytest.raises(ValueError, match="same N"):
        verification_stats(x, x, np.ones(4, bool), np.eye(3), np.ones(3))
    ok, reason, stats = verify_two_view(x, x, np.zeros(5, bool), np.eye(3), np.ones(3))
    assert not ok and stats["num_inliers"] == 0


def test_inliers_count_distinct_points_on_each_side():
    # 40 keypoints of image 1 matched to 4 keypoints of image 2 ("hub" keypoints): whatever E
    # RANSAC fits through them, they constrain it like 4 matches, and count as 4
    rng = np.random.default_rng(0)
    x1 = rng.uniform(-0.5, 0.5, size=(40, 2))
    x2 = np.repeat(rng.uniform(-0.5, 0.5, size=(4, 2)), 10, axis=0)
    stats = verification_stats(x1, x2, np.ones(40, bool), np.eye(3), np.array([1.0, 0, 0]), num_matches=2000)
    assert stats["num_inliers"] == 4 and stats["inlier_ratio"] == 4 / 2000
    assert "min_inliers" in check_stats(stats)
