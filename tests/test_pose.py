import pytest
import torch

from n3sets.pose import (
    angle_between_rotations,
    decompose_essential,
    pose_error,
    recover_pose,
    translation_angle,
)


def _skew(v):
    z = torch.zeros_like(v[..., 0])
    return torch.stack(
        [z, -v[..., 2], v[..., 1], v[..., 2], z, -v[..., 0], -v[..., 1], v[..., 0], z], -1
    ).view(*v.shape[:-1], 3, 3)


def _rotation(axis_angle):
    A = _skew(axis_angle)
    return torch.linalg.matrix_exp(A)


def _scene(B=6, N=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = _rotation(0.3 * torch.randn(B, 3, generator=g, dtype=torch.float64))
    t = torch.randn(B, 3, generator=g, dtype=torch.float64)
    t = t / t.norm(dim=-1, keepdim=True)
    X = torch.randn(B, N, 3, generator=g, dtype=torch.float64)
    X[..., 2] = 4 + 2 * X[..., 2].abs()
    X2 = X @ R.transpose(1, 2) + t[:, None]
    assert (X2[..., 2] > 0).all()
    return R, t, X[..., :2] / X[..., 2:], X2[..., :2] / X2[..., 2:]


def test_decompose_essential_contains_true_pose():
    R, t, _, _ = _scene()
    Rs, ts = decompose_essential(_skew(t) @ R)
    assert Rs.shape == (6, 4, 3, 3) and ts.shape == (6, 4, 3)
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(Rs @ Rs.transpose(-1, -2), eye.expand_as(Rs), atol=1e-10)
    assert torch.allclose(torch.det(Rs), torch.ones(6, 4, dtype=torch.float64), atol=1e-10)
    match = (angle_between_rotations(Rs, R[:, None]) < 1e-6) & (
        (ts - t[:, None]).norm(dim=-1) < 1e-8
    )
    assert (match.sum(1) == 1).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_recover_pose_noise_free_is_exact(dtype):
    R, t, x1, x2 = _scene()
    # E is only defined up to scale and sign
    E = -2.5 * (_skew(t) @ R)
    R_est, t_est, ok = recover_pose(E.to(dtype), x1.to(dtype), x2.to(dtype))
    assert ok.all()
    tol = 1e-6 if dtype == torch.float64 else 1e-3
    assert angle_between_rotations(R_est.double(), R).max() < tol
    assert (t_est.double() - t).norm(dim=-1).max() < tol  # sign resolved, unit norm
    assert pose_error(R_est.double(), t_est.double(), R, t).max() < tol


def test_recover_pose_mask_decides_votes():
    R, t, x1, x2 = _scene(B=1, N=30)
    # Points mirrored behind the cameras favour a wrong candidate; masked out, the true pose wins.
    E = _skew(t) @ R
    Rs, ts = decompose_essential(E)
    # the candidate farthest from the truth (the other rotation)
    wrong = int(pose_error(Rs[0], ts[0], R[0], t[0]).argmax())
    Rw, tw = Rs[:, wrong], ts[:, wrong]
    X = torch.randn(1, 60, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    X[..., 2] = 4 + X[..., 2].abs()
    # points in front of both cameras for the wrong candidate are behind for the true one
    X2 = X @ Rw.transpose(1, 2) + tw[:, None]
    keep = X2[0, :, 2] > 0
    X, X2 = X[:, keep], X2[:, keep]
    y1 = torch.cat([x1, X[..., :2] / X[..., 2:]], 1)
    y2 = torch.cat([x2, X2[..., :2] / X2[..., 2:]], 1)
    assert X.shape[1] > x1.shape[1]
    R_all, t_all, _ = recover_pose(E, y1, y2)
    assert pose_error(R_all, t_all, R, t).item() > 1.0
    mask = torch.zeros(1, y1.shape[1], dtype=torch.bool)
    mask[:, : x1.shape[1]] = True
    R_m, t_m, ok = recover_pose(E, y1, y2, mask=mask)
    assert ok.all() and pose_error(R_m, t_m, R, t).item() < 1e-6


def test_recover_pose_degenerate_fails():
    R, t, x1, x2 = _scene(B=3)
    E = _skew(t) @ R
    E[0] = 0
    E[1, 0, 0] = float("nan")
    mask = torch.ones(3, x1.shape[1], dtype=torch.bool)
    mask[2] = False
    R_est, t_est, ok = recover_pose(E, x1, x2, mask=mask)
    assert ok.tolist() == [False, False, False]
    assert torch.isfinite(R_est).all() and torch.isfinite(t_est).all()
    assert (pose_error(R_est, t_est, R, t, ok) == 180).all()


def test_recover_pose_shape_errors():
    E = torch.eye(3).expand(2, 3, 3)
    with pytest.raises(ValueError, match=r"\(B, N, 2\)"):
        recover_pose(E, torch.zeros(2, 5, 3), torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="mask"):
        recover_pose(E, torch.zeros(2, 5, 2), torch.zeros(2, 5, 2), mask=torch.ones(2, 4))


def test_angles():
    axis = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    for deg in (0.0, 1e-4, 30.0, 90.0, 179.9, 180.0):
        Rz = _rotation(axis * torch.deg2rad(torch.tensor(deg, dtype=torch.float64)))
        assert angle_between_rotations(torch.eye(3, dtype=torch.float64), Rz).item() == pytest.approx(deg, abs=1e-6)
    t = torch.tensor([1.0, 0.0, 0.0])
    assert translation_angle(t, -3 * t).item() == pytest.approx(0.0, abs=1e-5)
    assert translation_angle(t, torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx(45.0)
    assert translation_angle(t, torch.tensor([-1.0, 1.0, 0.0])).item() == pytest.approx(45.0)
    assert translation_angle(t, torch.tensor([0.0, 0.0, 2.0])).item() == pytest.approx(90.0)
    # pose error is the max of both; NaN counts as failure
    Rz = _rotation(axis * torch.deg2rad(torch.tensor(10.0)))
    err = pose_error(Rz, torch.tensor([1.0, 1.0, 0.0]), torch.eye(3), t)
    assert err.item() == pytest.approx(45.0, abs=1e-4)
    err = pose_error(Rz, torch.tensor([float("nan"), 0, 0]), torch.eye(3), t)
    assert err.item() == 180.0


def _left_null_vector(E):
    # E^T t = 0 for E = [t]_x R: t spans the left null space; SVD fixes it only up to sign
    U, _, _ = torch.linalg.svd(E)
    return U[..., :, 2]


def test_translation_from_the_epipole_and_a_view_swap():
    # End to end on the sign convention: t read off E (sign arbitrary, as before any cheirality
    # test) and the pose of the swapped views (x1 <-> x2, E -> E^T, pose inverted) must score a
    # zero pose error whatever the sign of either translation.
    R, t, x1, x2 = _scene(B=8, N=40, seed=3)
    E = _skew(t) @ R
    signs = torch.tensor([1.0, -1.0] * 4, dtype=torch.float64)[:, None]
    t_epi = signs * _left_null_vector(E)
    assert ((t_epi * t).sum(-1) < 0).any() and ((t_epi * t).sum(-1) > 0).any()  # both signs occur
    assert translation_angle(t_epi, t).max() < 1e-6
    assert pose_error(R, t_epi, R, t).max() < 1e-6
    assert pose_error(R, -t, R, t).max() < 1e-6

    # the swapped pair: x1 = R^T x2 - R^T t, essential matrix E^T
    R_sw, t_sw = R.transpose(-1, -2), -(R.transpose(-1, -2) @ t[..., None])[..., 0]
    assert torch.allclose(_skew(t_sw) @ R_sw, E.transpose(-1, -2), atol=1e-12)
    t_epi_sw = signs.flip(0) * _left_null_vector(E.transpose(-1, -2))
    assert translation_angle(t_epi_sw, t_sw).max() < 1e-6
    assert pose_error(R_sw, t_epi_sw, R_sw, t_sw).max() < 1e-6
    R_est, t_est, ok = recover_pose(-3.0 * E.transpose(-1, -2), x2, x1)
    assert ok.all()
    assert pose_error(R_est, t_est, R_sw, t_sw).max() < 1e-6
    assert pose_error(R_est, -t_est, R_sw, -t_sw).max() < 1e-6
    assert pose_error(R_est, -t_est, R_sw, t_sw).max() < 1e-6


def test_translation_angle_is_symmetric_sign_and_scale_invariant():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 3, generator=g, dtype=torch.float64)
    b = torch.randn(200, 3, generator=g, dtype=torch.float64)
    ang = translation_angle(a, b)
    assert (ang >= 0).all() and (ang <= 90).all()
    assert (ang > 45).any()
    for other in (translation_angle(b, a), translation_angle(-a, b), translation_angle(a, -2.5 * b),
                  translation_angle(-0.1 * a, -b)):
        assert torch.allclose(other, ang, atol=1e-9)


# --- robust estimation (n3sets.robust, OpenCV) ---------------------------------------------


def _noisy_matches(N=200, outlier_ratio=0.4, noise=2e-4, seed=0):
    R, t, x1, x2 = _scene(B=1, N=N, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    x1, x2 = x1[0].clone(), x2[0] + noise * torch.randn(N, 2, generator=g, dtype=torch.float64)
    n_out = int(outlier_ratio * N)
    x2[:n_out] = x2[torch.randperm(N, generator=g)[:n_out]]  # wrong partners, realistic range
    label = torch.ones(N, dtype=torch.bool)
    label[:n_out] = False
    return R[0], t[0], x1, x2, label


@pytest.mark.parametrize("method", ["ransac", "magsac"])
def test_robust_recovers_pose_with_outliers(method):
    from n3sets.robust import estimate_essential

    for seed in range(3):
        R, t, x1, x2, label = _noisy_matches(seed=seed)
        # threshold 5x the noise, so that recall is a property of the estimator, not the cut
        out = estimate_essential(x1, x2, method=method, threshold=1e-3, seed=0)
        assert out["ok"]
        assert pose_error(out["R"], out["t"], R, t).item() < 2.0
        inl = out["inliers"]
        assert inl.shape == label.shape and inl.dtype == torch.bool
        # nearly all true matches kept, few wrong partners accepted
        assert (inl & label).sum() >= 0.9 * label.sum()
        assert (inl & ~label).sum() <= 0.1 * (~label).sum()
        # E is consistent with the returned pose up to scale
        E_pose = _skew(out["t"]) @ out["R"]
        E = out["E"] / out["E"].norm()
        E_pose = E_pose / E_pose.norm()
        assert min((E - E_pose).norm(), (E + E_pose).norm()) < 1e-6


def test_robust_is_seeded_and_fails_cleanly():
    from n3sets.robust import estimate_essential

    R, t, x1, x2, _ = _noisy_matches(outlier_ratio=0.6, seed=1)
    for method in ("ransac", "magsac"):
        a = estimate_essential(x1, x2, method, seed=5)
        b = estimate_essential(x1, x2, method, seed=5)
        assert torch.equal(a["E"], b["E"]) and torch.equal(a["inliers"], b["inliers"])
        # another seed draws other samples: the refined E differs in its last digits at least
        others = [estimate_essential(x1, x2, method, seed=s)["E"] for s in range(3)]
        assert any(not torch.allclose(a["E"].abs(), E.abs(), rtol=0, atol=1e-12) for E in others)
    few = estimate_essential(x1[:4], x2[:4], "magsac")
    assert few["ok"] is False and few["inliers"].shape == (4,) and not few["inliers"].any()
    with pytest.raises(ValueError, match="method"):
        estimate_essential(x1, x2, "lmeds")
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        estimate_essential(x1[:, :1], x2, "ransac")
