import numpy as np
import pytest
import torch

from n3sets.geometry import (
    essential_from_pose,
    normalize_keypoints,
    relative_pose,
    skew,
    symmetric_epipolar_distance,
)


def _rotation(gen, B, dtype=torch.float64):
    q, r = torch.linalg.qr(torch.randn(B, 3, 3, generator=gen, dtype=dtype))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    det = torch.linalg.det(q)
    q[det < 0, :, 0] *= -1
    return q


def _scene(gen, B=4, N=50, dtype=torch.float64):
    """World points in front of two random world-to-camera poses."""
    R1, R2 = _rotation(gen, B, dtype), _rotation(gen, B, dtype)
    t1 = torch.randn(B, 3, generator=gen, dtype=dtype)
    t2 = torch.randn(B, 3, generator=gen, dtype=dtype)
    # points expressed in camera 1 with positive depth, mapped to the world
    p1 = torch.randn(B, N, 3, generator=gen, dtype=dtype)
    p1[..., 2] = p1[..., 2].abs() + 3.0
    X = (p1 - t1[:, None]) @ R1  # R1^T (p1 - t1), row-vector form
    return R1, t1, R2, t2, X


def test_skew_is_cross_product():
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    S = skew(v)
    assert S.shape == (5, 3, 3)
    torch.testing.assert_close((S @ w[..., None])[..., 0], torch.linalg.cross(v, w))
    torch.testing.assert_close(S, -S.transpose(-1, -2))


def test_relative_pose_maps_camera1_to_camera2():
    gen = torch.Generator().manual_seed(2)
    R1, t1, R2, t2, X = _scene(gen)
    x1 = X @ R1.transpose(-1, -2) + t1[:, None]
    x2 = X @ R2.transpose(-1, -2) + t2[:, None]
    R, t = relative_pose(R1, t1, R2, t2)
    torch.testing.assert_close(x1 @ R.transpose(-1, -2) + t[:, None], x2)
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3, dtype=R.dtype).expand(4, 3, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_essential_satisfies_epipolar_constraint(dtype):
    gen = torch.Generator().manual_seed(3)
    R1, t1, R2, t2, X = _scene(gen)
    R, t = relative_pose(R1, t1, R2, t2)
    E = essential_from_pose(R, t / t.norm(dim=-1, keepdim=True))
    c1 = X @ R1.transpose(-1, -2) + t1[:, None]
    c2 = X @ R2.transpose(-1, -2) + t2[:, None]
    x1 = (c1[..., :2] / c1[..., 2:]).to(dtype)
    x2 = (c2[..., :2] / c2[..., 2:]).to(dtype)
    h1 = torch.cat([x1, torch.ones_like(x1[..., :1])], -1)
    h2 = torch.cat([x2, torch.ones_like(x2[..., :1])], -1)
    algebraic = torch.einsum("bni,bij,bnj->bn", h2, E.to(dtype), h1)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert algebraic.abs().max() < tol * 10
    d = symmetric_epipolar_distance(x1, x2, E.to(dtype))
    assert d.shape == (4, 50) and d.dtype == dtype
    assert d.max() < (1e-8 if dtype == torch.float32 else 1e-20)
    # a wrong pose gives large distances
    d_wrong = symmetric_epipolar_distance(x1, x2.flip(-2), E.to(dtype))
    assert d_wrong.median() > 1e-4


def test_symmetric_distance_matches_point_line_distances():
    """d equals the sum of the two squared point-to-epipolar-line distances."""
    gen = torch.Generator().manual_seed(4)
    R1, t1, R2, t2, _ = _scene(gen, B=1)
    R, t = relative_pose(R1, t1, R2, t2)
    E = essential_from_pose(R, t)[0]
    x1 = torch.randn(30, 2, generator=gen, dtype=torch.float64) * 0.3
    x2 = torch.randn(30, 2, generator=gen, dtype=torch.float64) * 0.3
    h1 = torch.cat([x1, torch.ones(30, 1, dtype=x1.dtype)], -1)
    h2 = torch.cat([x2, torch.ones(30, 1, dtype=x2.dtype)], -1)
    l2 = h1 @ E.T  # epipolar lines in image 2
    l1 = h2 @ E  # epipolar lines in image 1
    dist2 = (h2 * l2).sum(-1) / l2[:, :2].norm(dim=-1)
    dist1 = (h1 * l1).sum(-1) / l1[:, :2].norm(dim=-1)
    torch.testing.assert_close(symmetric_epipolar_distance(x1, x2, E), dist1**2 + dist2**2)
    # invariant to the scale of E
    torch.testing.assert_close(symmetric_epipolar_distance(x1, x2, 7.0 * E), dist1**2 + dist2**2)


def test_normalize_keypoints_inverts_projection():
    K = torch.tensor([[900.0, 2.0, 512.0], [0.0, 910.0, 340.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    xn = torch.randn(2, 10, 2, generator=gen, dtype=torch.float64) * 0.4
    h = torch.cat([xn, torch.ones(2, 10, 1, dtype=xn.dtype)], -1)
    px = (h @ K.T)[..., :2]
    torch.testing.assert_close(normalize_keypoints(px, K), xn)
    # batched K broadcasts over the batch dimension
    torch.testing.assert_close(normalize_keypoints(px, K.expand(2, 3, 3)), xn)


def test_no_nan_for_degenerate_essential():
    x = torch.zeros(3, 2)
    d = symmetric_epipolar_distance(x, x, torch.zeros(3, 3))
    assert torch.isfinite(d).all()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: skew(torch.zeros(4)), r"\(\.\.\., 3\)"),
        (lambda: essential_from_pose(torch.eye(3), torch.zeros(2)), r"t must have shape"),
        (lambda: relative_pose(torch.eye(2), torch.zeros(3), torch.eye(3), torch.zeros(3)), r"R1 must have shape"),
        (lambda: normalize_keypoints(torch.zeros(5, 3), torch.eye(3)), r"kpts must have shape \(\.\.\., N, 2\)"),
        (lambda: normalize_keypoints(torch.zeros(5, 2), torch.eye(2)), r"K must have shape"),
        (lambda: symmetric_epipolar_distance(torch.zeros(5, 2), torch.zeros(4, 2), torch.eye(3)), r"same N"),
        (lambda: symmetric_epipolar_distance(torch.zeros(5, 2), torch.zeros(5, 2), torch.eye(4)), r"E must have shape"),
    ],
)
def test_bad_shapes_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()

