"""Weighted eight-point algorithm and the training losses."""
import math

import pytest
import torch

from n3sets.essential import logits_to_weights, weighted_eight_point
from n3sets.geometry import essential_from_pose, normalize_keypoints, symmetric_epipolar_distance
from n3sets.losses import CorrespondenceLoss, balanced_bce, essential_loss
from n3sets.pose import pose_error, recover_pose


def _rotation(axis, angle_deg, dtype=torch.float64):
    axis = torch.as_tensor(axis, dtype=dtype)
    axis = axis / axis.norm()
    K = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], dtype=dtype)
    a = math.radians(angle_deg)
    return torch.eye(3, dtype=dtype) + math.sin(a) * K + (1 - math.cos(a)) * K @ K


def _scene(B=3, N=40, dtype=torch.float64, seed=0):
    """Noise-free normalized matches of B random two-view scenes and their unit-norm E."""
    g = torch.Generator().manual_seed(seed)
    Rs, ts = [], []
    for b in range(B):
        axis = torch.randn(3, generator=g, dtype=torch.float64)
        Rs.append(_rotation(axis, 5 + 20 * b))
        t = torch.randn(3, generator=g, dtype=torch.float64)
        ts.append(t / t.norm())
    R, t = torch.stack(Rs), torch.stack(ts)
    X = torch.randn(B, N, 3, generator=g, dtype=torch.float64)
    X[..., 2] = X[..., 2].abs() * 2 + 5  # in front of camera 1
    x1 = X[..., :2] / X[..., 2:]
    X2 = X @ R.transpose(-1, -2) + t[:, None]
    x2 = X2[..., :2] / X2[..., 2:]
    E = essential_from_pose(R, t)
    E = E / E.flatten(1).norm(dim=-1)[:, None, None]
    return x1.to(dtype), x2.to(dtype), E.to(dtype)


def _sign_invariant_error(E, E_gt):
    d1 = (E - E_gt).flatten(1).norm(dim=-1)
    d2 = (E + E_gt).flatten(1).norm(dim=-1)
    return torch.minimum(d1, d2)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_recovers_essential_from_noise_free_matches(normalize, dtype, tol):
    x1, x2, E_gt = _scene(dtype=dtype)
    w = torch.rand(x1.shape[:2], dtype=dtype) + 0.1
    E = weighted_eight_point(x1, x2, w, normalize=normalize)
    assert E.shape == (3, 3, 3) and E.dtype == dtype
    assert torch.allclose(E.flatten(1).norm(dim=-1), torch.ones(3, dtype=dtype), atol=1e-5)
    assert _sign_invariant_error(E.double(), E_gt.double()).max() < tol


# realistic, different intrinsics of two cameras (pixels; images about 1000 x 750)
_K1 = torch.tensor([[1100.0, 0, 500], [0, 1100, 375], [0, 0, 1]], dtype=torch.float64)
_K2 = torch.tensor([[800.0, 0, 520], [0, 820, 360], [0, 0, 1]], dtype=torch.float64)


def _pixel_scene(B=16, N=100, noise_px=1.0, num_outliers=20, seed=0):
    """Pixel-scale matches (images ~1000 x 750, different K per view) with Gaussian noise.

    Returns noise-free and noisy pixel points, weights (0 for gross outliers) and the true
    fundamental matrices ``F = K2^-T E K1^-1`` (pixel coordinates, unit Frobenius norm).
    """
    g = torch.Generator().manual_seed(seed)
    K1, K2 = _K1, _K2
    size = torch.tensor([1000.0, 750.0], dtype=torch.float64)
    P1, P2, Fs = [], [], []
    for b in range(B):
        R = _rotation(torch.randn(3, generator=g, dtype=torch.float64), 5 + b)
        t = torch.randn(3, generator=g, dtype=torch.float64)
        t = t / t.norm()
        # pixels of image 1 back-projected to depths 6-10, seen by camera 2
        p1 = torch.rand(N, 2, generator=g, dtype=torch.float64) * size
        rays = torch.cat([p1, torch.ones(N, 1, dtype=torch.float64)], 1) @ torch.linalg.inv(K1).T
        X = rays * (6 + 4 * torch.rand(N, 1, generator=g, dtype=torch.float64))
        X2 = X @ R.T + t
        assert (X2[:, 2] > 0).all()
        p2 = (X2 / X2[:, 2:]) @ K2.T
        F = torch.linalg.inv(K2).T @ essential_from_pose(R, t) @ torch.linalg.inv(K1)
        P1.append(p1)
        P2.append(p2[:, :2])
        Fs.append(F / F.norm())
    p1, p2 = torch.stack(P1), torch.stack(P2)
    n1 = p1 + noise_px * torch.randn(p1.shape, generator=g, dtype=torch.float64)
    n2 = p2 + noise_px * torch.randn(p2.shape, generator=g, dtype=torch.float64)
    w = 0.5 + torch.rand(B, N, generator=g, dtype=torch.float64)
    # gross outliers far from the inliers' centroid, with zero weight: the normalisation must
    # be weighted too, or they would drag its centroid and scale
    n2[:, :num_outliers] = torch.rand(B, num_outliers, 2, generator=g, dtype=torch.float64) * 5000 - 2000
    w[:, :num_outliers] = 0
    return p1, p2, n1, n2, w, torch.stack(Fs)


def test_normalisation_makes_noisy_pixel_scale_matches_accurate():
    # Hartley (1997): on pixel coordinates (~1000) the columns of the design matrix differ by
    # ~1e6 in scale and the unnormalised least-squares solution is dominated by the large ones;
    # with 1 px noise its pose is several times worse. The noise-free tests above cannot see
    # whether normalize=True normalises at all; this one can.
    p1, p2, n1, n2, w, F_gt = _pixel_scene(B=32, N=100, num_outliers=20, seed=0)
    assert symmetric_epipolar_distance(p1, p2, F_gt).max() < 1e-16
    inl = slice(20, None)
    x1, x2 = normalize_keypoints(p1[:, inl], _K1), normalize_keypoints(p2[:, inl], _K2)
    R_gt, t_gt, ok = recover_pose(_K2.T @ F_gt @ _K1, x1, x2)
    assert ok.all()
    pose_err, epi_px = {}, {}
    for normalize in (True, False):
        F = weighted_eight_point(n1, n2, w, normalize=normalize)
        # the symmetric epipolar distance of pixels under F: sqrt(d) is in pixels
        epi_px[normalize] = symmetric_epipolar_distance(p1[:, inl], p2[:, inl], F).sqrt().median(dim=1).values
        R, t, ok = recover_pose(_K2.T @ F @ _K1, x1, x2)
        pose_err[normalize] = pose_error(R, t, R_gt, t_gt, ok)
    assert epi_px[True].max() < 1.5  # px; noise is 1 px per coordinate
    assert pose_err[True].mean() < 3.5  # degrees (measured 2.4; unnormalised 6.7)
    assert pose_err[False].mean() > 2 * pose_err[True].mean()


def test_zero_weight_outliers_and_padding_are_ignored():
    x1, x2, E_gt = _scene(B=2, N=30)
    # append outliers (random matches) with zero weight and padded garbage excluded by the mask
    g = torch.Generator().manual_seed(1)
    o1 = torch.rand(2, 20, 2, generator=g, dtype=torch.float64) - 0.5
    o2 = torch.rand(2, 20, 2, generator=g, dtype=torch.float64) - 0.5
    pad = torch.full((2, 5, 2), float("nan"), dtype=torch.float64)
    X1, X2 = torch.cat([x1, o1, pad], 1), torch.cat([x2, o2, pad], 1)
    w = torch.cat([torch.ones(2, 30), torch.zeros(2, 20), torch.ones(2, 5)], 1).double()
    mask = torch.ones(2, 55, dtype=torch.bool)
    mask[:, 50:] = False
    E = weighted_eight_point(X1, X2, w, mask)
    assert _sign_invariant_error(E, E_gt).max() < 1e-9
    # with uniform weights the outliers do change the estimate: the weights matter
    E_all = weighted_eight_point(X1, X2, mask.double(), mask)
    assert _sign_invariant_error(E_all, E_gt).min() > 1e-3


def test_gradcheck_float64():
    x1, x2, _ = _scene(B=2, N=12)
    x1 = x1 + 1e-2 * torch.randn_like(x1)  # noisy: a unique, non-degenerate least-squares solution
    w = (torch.rand(2, 12, dtype=torch.float64) + 0.2).requires_grad_()
    assert torch.autograd.gradcheck(lambda w: weighted_eight_point(x1, x2, w), (w,))
    assert torch.autograd.gradcheck(lambda w: weighted_eight_point(x1, x2, w, normalize=True), (w,))


def test_gradient_matches_eigh_autograd():
    """The hand-written backward equals eigh's own gradient where eigenvalues are distinct."""
    x1, x2, _ = _scene(B=1, N=15)
    x1 = x1 + 1e-2 * torch.randn_like(x1)
    w = (torch.rand(1, 15, dtype=torch.float64) + 0.2).requires_grad_()
    target = torch.randn(3, 3, dtype=torch.float64)
    E = weighted_eight_point(x1, x2, w)
    (g_ours,) = torch.autograd.grad((E * target).sum(), w)

    w2 = w.detach().clone().requires_grad_()
    from n3sets.essential import eight_point_design_matrix

    X = eight_point_design_matrix(x1, x2)
    wn = w2 / w2.sum(-1, keepdim=True)
    _, V = torch.linalg.eigh(X.transpose(-1, -2) @ (wn.unsqueeze(-1) * X))
    e = V[..., 0]
    E2 = e.reshape(1, 3, 3)
    E2 = E2 / E2.flatten(1).norm(dim=-1)[:, None, None]
    # same sign convention as the forward output so that the linear target matches
    sign = torch.sign((E2 * E.detach()).sum())
    (g_ref,) = torch.autograd.grad((sign * E2 * target).sum(), w2)
    assert torch.allclose(g_ours, g_ref, atol=1e-8, rtol=1e-6)


def test_degenerate_inputs_give_finite_gradients():
    x1, x2, _ = _scene(B=2, N=12)
    w = torch.zeros(2, 12, dtype=torch.float64)
    w[:, :5] = 1.0  # fewer than 8 matches: a repeated zero eigenvalue
    w[1] = 0.0  # no weight at all
    w.requires_grad_()
    E = weighted_eight_point(x1, x2, w)
    (E * torch.randn(3, 3, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(E).all() and torch.isfinite(w.grad).all()


def test_input_shapes_are_checked():
    x1, x2, _ = _scene(B=1, N=10)
    with pytest.raises(ValueError, match=r"\(B, N, 2\)"):
        weighted_eight_point(x1[0], x2[0], torch.ones(10))
    with pytest.raises(ValueError, match="weights"):
        weighted_eight_point(x1, x2, torch.ones(1, 9))
    with pytest.raises(ValueError, match="mask"):
        weighted_eight_point(x1, x2, torch.ones(1, 10), mask=torch.ones(1, 9, dtype=torch.bool))


def test_logits_to_weights():
    w = logits_to_weights(torch.tensor([-3.0, 0.0, 0.5, 20.0]))
    assert torch.allclose(w, torch.tensor([0.0, 0.0, math.tanh(0.5), 1.0]))


def test_balanced_bce_matches_manual_and_ignores_padding():
    logits = torch.tensor([[2.0, -1.0, 0.5, 9.0], [0.3, -0.2, 7.0, -7.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    bce = lambda z, y: -(y * torch.log(torch.sigmoid(z)) + (1 - y) * torch.log(1 - torch.sigmoid(z)))  # noqa: E731
    set0 = 0.5 * (bce(logits[0, 0], 1.0) + 0.5 * (bce(logits[0, 1], 0.0) + bce(logits[0, 2], 0.0)))
    set1 = 0.5 * (0.5 * (bce(logits[1, 0], 1.0) + bce(logits[1, 1], 1.0))
                  + 0.5 * (bce(logits[1, 2], 0.0) + bce(logits[1, 3], 0.0)))
    assert torch.allclose(balanced_bce(logits, labels, mask), 0.5 * (set0 + set1))
    # padded entries may hold anything
    logits2 = logits.clone()
    logits2[0, 3] = -1e4
    assert torch.allclose(balanced_bce(logits2, labels, mask), balanced_bce(logits, labels, mask))
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        balanced_bce(logits, labels[:, :3])


def test_essential_loss_is_scale_and_sign_invariant():
    _, _, E = _scene(B=2)
    assert essential_loss(E, E) < 1e-12
    assert essential_loss(-3.0 * E, E) < 1e-12
    assert essential_loss(E, 0.1 * E, squared=False) < 1e-5
    other = torch.roll(E, 1, dims=0)
    loss = essential_loss(other, E)
    e, g = other.flatten(1), E.flatten(1)
    expected = (2 - 2 * (e * g).sum(-1).abs()).mean()  # unit norms: ||e -+ g||^2 = 2 -+ 2<e, g>
    assert torch.allclose(loss, expected)


def test_correspondence_loss_switches_on_essential_term():
    x1, x2, E_gt = _scene(B=2, N=20)
    logits = torch.randn(2, 20, dtype=torch.float64, requires_grad=True)
    labels = (torch.rand(2, 20) > 0.5).double()
    crit = CorrespondenceLoss(essential_weight=0.5, essential_after=10)
    before, parts = crit(logits, labels, None, x1, x2, E_gt, step=9)
    after, parts_after = crit(logits, labels, None, x1, x2, E_gt, step=10)
    assert torch.allclose(before, balanced_bce(logits, labels))
    assert abs(float(after.detach()) - (parts_after["cls"] + 0.5 * parts_after["ess"])) < 1e-9
    assert parts["ess"] > 0
