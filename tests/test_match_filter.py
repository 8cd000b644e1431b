"""MatchFilter: result contents, geometry conventions, degenerate inputs, batching, side information."""
import numpy as np
import pytest
import torch

from data_prep.synthetic import synthetic_pair
from n3sets.geometry import relative_pose
from n3sets.match_filter import FilterResult, MatchFilter
from n3sets.models import CNNet, N3Net
from n3sets.pose import pose_error
from n3sets.pretrained import available_models, save_model


class ConstantLogits(torch.nn.Module):
    """Stand-in classifier with a fixed logit for every match: isolates the geometry from training."""

    def __init__(self, logit: float, side_info: bool = False):
        super().__init__()
        self.logit = logit
        self.conf = {"side_info": side_info}

    def forward(self, x, mask=None):
        return torch.full(x.shape[::2], self.logit)


def _pose_err(res, R_gt, t_gt):
    return float(pose_error(torch.from_numpy(res.R), torch.from_numpy(res.t),
                            torch.as_tensor(R_gt, dtype=torch.float64), torch.as_tensor(t_gt, dtype=torch.float64)))


@pytest.fixture(scope="module")
def pair():
    return synthetic_pair(np.random.default_rng(3), num_matches=400, outlier_ratio=0.4, noise_px=0.3)


@pytest.fixture(scope="module")
def clean_pair():
    return synthetic_pair(np.random.default_rng(4), num_matches=60, outlier_ratio=0.0, noise_px=0.0)


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "small-n3net.pt"
    save_model(path, N3Net(channels=32, num_blocks=4, k=4, n3_after=2, embed_channels=8))
    return path


def test_from_pretrained_path(random_weights):
    mf = MatchFilter.from_pretrained(random_weights)
    assert isinstance(mf.model, N3Net) and not mf.model.training
    assert "small-n3net" in repr(mf) and mf.device == torch.device("cpu")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        MatchFilter.from_pretrained("no-such-model")
    with pytest.raises(ValueError, match="unknown MatchFilter option"):
        MatchFilter(mf.model, thresold=0.3)


def test_keep_all_gives_ground_truth_pose(pair):
    # With every match kept the pose comes from RANSAC alone: checks normalization and the
    # x2 = R x1 + t convention end to end on a known synthetic pose.
    mf = MatchFilter(ConstantLogits(5.0))
    res = mf.filter(pair["kpts1"], pair["kpts2"], pair["K1"], pair["K2"])
    assert isinstance(res, FilterResult) and res.ok and res.reason == ""
    assert res.prob.shape == (400,) and res.prob.dtype == np.float32 and res.inliers.dtype == bool
    assert np.allclose(res.R @ res.R.T, np.eye(3), atol=1e-6) and np.isclose(np.linalg.det(res.R), 1.0)
    assert np.isclose(np.linalg.norm(res.t), 1.0)
    assert _pose_err(res, pair["R"], pair["t"]) < 2.0
    # RANSAC inliers are the generated inliers, up to a few outliers lying near their epipolar line
    true = ~pair["is_outlier"].astype(bool)
    assert (res.inliers & true).sum() >= 0.8 * true.sum()  # OpenCV RANSAC does no final refit
    assert (res.inliers & ~true).sum() <= 0.1 * (~true).sum()
    d = res.to_dict()
    assert d["ok"] and d["num_matches"] == 400 and len(d["R"]) == 3


def test_weighted_eight_point_without_ransac(clean_pair):
    p = clean_pair
    res = MatchFilter(ConstantLogits(5.0)).filter(p["kpts1"], p["kpts2"], p["K1"], p["K2"], refine=None)
    assert res.ok and res.refine is None and res.inliers.all()
    assert _pose_err(res, p["R"], p["t"]) < 0.5


def test_threshold_selects_matches(pair):
    mf = MatchFilter(ConstantLogits(-5.0))
    res = mf.filter(pair["kpts1"], pair["kpts2"], pair["K1"], pair["K2"])
    assert not res.ok and res.num_inliers == 0 and res.E is None and res.R is None
    assert "0 distinct matches" in res.reason
    # prob = sigmoid(-5) ~ 0.0067: a threshold below keeps everything again
    res = mf.filter(pair["kpts1"], pair["kpts2"], pair["K1"], pair["K2"], threshold=0.005)
    assert res.ok and res.num_kept == 400


@pytest.mark.parametrize("n", [0, 1, 5, 7])
def test_too_few_matches_no_pose(n, clean_pair, random_weights):
    p = clean_pair
    for mf in (MatchFilter(ConstantLogits(5.0)), MatchFilter.from_pretrained(random_weights)):
        for refine in ("ransac", None):
            res = mf.filter(p["kpts1"][:n], p["kpts2"][:n], p["K1"], p["K2"], refine=refine)
            assert res.prob.shape == (n,) and res.inliers.shape == (n,)
            assert np.isfinite(res.prob).all()
            assert not res.ok and res.E is None and res.t is None
            assert f"only {n} putative" in res.reason and "8" in res.reason


def test_empty_list_input():
    res = MatchFilter(ConstantLogits(5.0)).filter([], [], np.eye(3), np.eye(3))
    assert res.num_matches == 0 and not res.ok


def test_eight_matches_exact_pose(clean_pair):
    p = clean_pair
    # the estimator itself, below the verification's min_inliers (15): verification off
    mf = MatchFilter(ConstantLogits(5.0), verify=False)
    res = mf.filter(p["kpts1"][:8], p["kpts2"][:8], p["K1"], p["K2"], refine=None)
    assert res.ok, res.reason
    assert _pose_err(res, p["R"], p["t"]) < 0.5
    # RANSAC on exactly 8 matches: a pose or a reason, never an exception
    res = mf.filter(p["kpts1"][:8], p["kpts2"][:8], p["K1"], p["K2"], refine="ransac")
    assert res.ok or res.reason
    # with verification (the default) eight matches are too few to trust, and the reason says so
    res = MatchFilter(ConstantLogits(5.0)).filter(p["kpts1"][:8], p["kpts2"][:8], p["K1"], p["K2"], refine=None)
    assert not res.ok and "min_inliers" in res.reason and res.num_inliers == 0
    assert res.verification["num_inliers"] == 8


def test_identical_points(clean_pair, random_weights):
    p = clean_pair
    k1 = np.repeat(p["kpts1"][:1], 50, axis=0)
    k2 = np.repeat(p["kpts2"][:1], 50, axis=0)
    for mf in (MatchFilter(ConstantLogits(5.0)), MatchFilter.from_pretrained(random_weights)):
        for refine in ("ransac", None):
            res = mf.filter(k1, k2, p["K1"], p["K2"], refine=refine, threshold=0.0)
            assert np.isfinite(res.prob).all() and res.prob.shape == (50,)
            assert not res.ok and "distinct" in res.reason
    # seven distinct matches, each repeated: still not enough
    res = MatchFilter(ConstantLogits(5.0)).filter(np.tile(p["kpts1"][:7], (5, 1)), np.tile(p["kpts2"][:7], (5, 1)),
                                                  p["K1"], p["K2"])
    assert not res.ok and "only 7 distinct" in res.reason


def test_invalid_inputs_name_the_problem(pair):
    mf = MatchFilter(ConstantLogits(5.0))
    k1, k2, K1, K2 = pair["kpts1"].copy(), pair["kpts2"].copy(), pair["K1"], pair["K2"]
    bad = k1.copy()
    bad[7, 1] = np.nan
    with pytest.raises(ValueError, match=r"kpts1 contains 1 non-finite \(NaN or inf\).*row 7"):
        mf.filter(bad, k2, K1, K2)
    bad = k2.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="kpts2 contains 1 non-finite"):
        mf.filter(k1, bad, K1, K2)
    with pytest.raises(ValueError, match=r"kpts1 must have shape \(N, 2\)"):
        mf.filter(np.zeros((10, 3)), np.zeros((10, 3)), K1, K2)
    with pytest.raises(ValueError, match="same N"):
        mf.filter(k1, k2[:-1], K1, K2)
    with pytest.raises(ValueError, match=r"K2 must be a \(3, 3\)"):
        mf.filter(k1, k2, K1, np.eye(4))
    K_nan = K1.copy()
    K_nan[0, 2] = np.nan
    with pytest.raises(ValueError, match="K1 contains NaN"):
        mf.filter(k1, k2, K_nan, K2)
    with pytest.raises(ValueError, match="K1 is singular"):
        mf.filter(k1, k2, np.zeros((3, 3)), K2)
    with pytest.raises(ValueError, match="threshold"):
        mf.filter(k1, k2, K1, K2, threshold=1.5)
    with pytest.raises(ValueError, match="refine"):
        mf.filter(k1, k2, K1, K2, refine="lmeds")


def test_torch_and_numpy_inputs_agree(pair, random_weights):
    mf = MatchFilter.from_pretrained(random_weights)
    a = mf.filter(pair["kpts1"], pair["kpts2"], pair["K1"], pair["K2"], threshold=0.0)
    b = mf.filter(torch.from_numpy(pair["kpts1"]).float(), torch.from_numpy(pair["kpts2"]),
                  torch.from_numpy(pair["K1"]), torch.from_numpy(pair["K2"]).float(), threshold=0.0)
    assert np.allclose(a.prob, b.prob, atol=1e-5)
    assert isinstance(b.prob, np.ndarray) and b.ok


def test_batch_matches_single_calls(random_weights):
    rng = np.random.default_rng(7)
    pairs = [synthetic_pair(rng, num_matches=n) for n in (300, 120, 9)]
    mf = MatchFilter.from_pretrained(random_weights)
    args = [[p[k] for p in pairs] for k in ("kpts1", "kpts2", "K1", "K2")]
    # an empty pair in the middle of the batch must not disturb the others
    for a in args:
        a.insert(1, np.zeros((0, 2)) if a[0].shape[-1] == 2 else np.eye(3))
    batch = mf.filter_batch(*args, threshold=0.0)
    assert len(batch) == 4 and batch[1].num_matches == 0 and not batch[1].ok
    for res, p in zip([batch[0], batch[2], batch[3]], pairs):
        single = mf.filter(p["kpts1"], p["kpts2"], p["K1"], p["K2"], threshold=0.0)
        assert np.allclose(res.prob, single.prob, atol=1e-5)
        assert (res.inliers == single.inliers).all() and res.ok == single.ok
    # small chunks (several network calls) give the same answer
    mf.conf["max_batch_matches"] = 300
    chunked = mf.filter_batch(*args, threshold=0.0)
    assert all(np.allclose(c.prob, r.prob, atol=1e-5) for c, r in zip(chunked, batch))
    with pytest.raises(ValueError, match="K2 has 1 entries"):
        mf.filter_batch(args[0], args[1], args[2], args[3][:1])


def test_side_information_required(tmp_path, pair):
    path = save_model(tmp_path / "side.pt", CNNet(side_info=True, channels=16, num_blocks=2))
    mf = MatchFilter.from_pretrained(path)
    assert mf.side_info
    with pytest.raises(ValueError, match="side information: pass ratio= and mutual="):
        mf.filter(pair["kpts1"], pair["kpts2"], pair["K1"], pair["K2"])
    with pytest.raises(ValueError, match=r"ratio must have shape \(N,\) = \(400,\)"):
        mf.filter(pair["kpts1"], pair["kpts2"], pair["K1"], pair["K2"], ratio=pair["ratio"][:10], mutual=pair["mutual"])
    res = mf.filter(pair["kpts1"], pair["kpts2"], pair["K1"], pair["K2"], ratio=pair["ratio"], mutual=pair["mutual"])
    assert res.prob.shape == (400,)
    # the side information reaches the network: changing it changes the probabilities
    res2 = mf.filter(pair["kpts1"], pair["kpts2"], pair["K1"], pair["K2"], ratio=np.ones(400), mutual=np.zeros(400))
    assert not np.allclose(res.prob, res2.prob)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_request_without_cuda():
    with pytest.raises(ValueError, match="CUDA is not available"):
        MatchFilter(ConstantLogits(1.0), device="cuda")
    assert MatchFilter(ConstantLogits(1.0), device="auto").device == torch.device("cpu")


# ------------------------------------------------------------------ real pairs (entry-P10)


@pytest.fixture(scope="module")
def entry_pair(strecha_root):
    from data_prep.features import detect_sift, load_gray, match_descriptors
    from data_prep.labels import label_matches
    from data_prep.scenes import read_strecha_scene

    scene = read_strecha_scene(strecha_root / "entry-P10")
    i, j = 3, 4
    (k1, d1), (k2, d2) = (detect_sift(load_gray(scene.image_paths[v]), num_kp=2000) for v in (i, j))
    m = match_descriptors(d1, d2)
    R, t = relative_pose(*(torch.from_numpy(a) for a in (scene.R[i], scene.t[i], scene.R[j], scene.t[j])))
    kpts1, kpts2 = k1[m["idx1"]], k2[m["idx2"]]
    # ground-truth labels of the putative matches (the training labels: epipolar distance < 1e-4)
    label = label_matches(kpts1, kpts2, scene.K[i], scene.K[j], R.numpy(), t.numpy())["label"].astype(bool)
    return dict(kpts1=kpts1, kpts2=kpts2, ratio=m["ratio"], mutual=m["mutual"],
                K1=scene.K[i], K2=scene.K[j], R=R.numpy(), t=t.numpy(), label=label)


def test_real_pair_conventions_with_ransac_only(entry_pair):
    # Keep-all + RANSAC on real SIFT matches: pixel/normalization/pose conventions agree with
    # the Strecha ground truth independently of any trained weights.
    p = entry_pair
    res = MatchFilter(ConstantLogits(5.0)).filter(p["kpts1"], p["kpts2"], p["K1"], p["K2"])
    assert res.ok and _pose_err(res, p["R"], p["t"]) < 5.0


@pytest.mark.parametrize("name", ["n3net-strecha", "cnnet-strecha", "n3net-strecha-refine", "cnnet-strecha-refine"])
def test_real_pair_shipped_model(entry_pair, name, missing_data):
    if name not in available_models():
        missing_data(f"shipped weights {name}.pt not present")
    p = entry_pair
    mf = MatchFilter.from_pretrained(name)
    side = dict(ratio=p["ratio"], mutual=p["mutual"]) if mf.side_info else {}
    res = mf.filter(p["kpts1"], p["kpts2"], p["K1"], p["K2"], **side)
    assert res.ok, res.reason
    assert _pose_err(res, p["R"], p["t"]) < 5.0
    label = p["label"]  # about a third of the 2000 nearest-neighbour matches are inliers
    kept = res.prob > 0.5
    # the network alone separates inliers from outliers on a scene it never saw
    assert label[kept].mean() > max(0.7, 2 * label.mean()), "precision of the kept matches"
    assert kept[label].mean() > 0.6, "recall of the inliers"
    assert label[res.inliers].mean() > 0.9, "precision after RANSAC"
    # without RANSAC (weighted eight-point on the network weights) a pose is still returned
    res = mf.filter(p["kpts1"], p["kpts2"], p["K1"], p["K2"], refine=None, **side)
    assert res.ok and np.allclose(res.R @ res.R.T, np.eye(3), atol=1e-6), res.reason


def test_ransac_max_iters_reaches_the_estimator(pair, monkeypatch):
    import n3sets.robust as robust

    seen = []
    real = robust.estimate_essential

    def spy(*args, **kw):
        seen.append(kw.get("max_iters", robust.DEFAULT_MAX_ITERS))
        return real(*args, **kw)

    monkeypatch.setattr(robust, "estimate_essential", spy)
    args = (pair["kpts1"], pair["kpts2"], pair["K1"], pair["K2"])
    assert MatchFilter(ConstantLogits(5.0)).filter(*args).ok
    assert MatchFilter(ConstantLogits(5.0), ransac_max_iters=500).filter(*args, refine="magsac").ok
    assert seen == [robust.DEFAULT_MAX_ITERS, 500]
