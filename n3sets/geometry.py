"""Two-view geometry in torch: skew matrices, essential matrices, relative poses, normalized
coordinates and the symmetric epipolar distance used for ground-truth labels (Yi et al., 2018).

Conventions
-----------
Poses are world-to-camera: a world point ``X`` is seen by a camera ``(R, t)`` at
``x_cam = R @ X + t``. A relative pose ``(R, t)`` maps camera 1 to camera 2, ``x2 = R x1 + t``,
and the essential matrix ``E = [t]_x R`` satisfies ``x2^T E x1 = 0`` for normalized
(``K^-1``-applied, homogeneous) points. Every function is batched over leading dimensions and
works in float32 and float64.
"""
from __future__ import annotations

import torch

__all__ = [
    "skew",
    "essential_from_pose",
    "relative_pose",
    "normalize_keypoints",
    "symmetric_epipolar_distance",
]


def _check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _check_last(x: torch.Tensor, name: str, shape: tuple[int, ...], expected: str) -> None:
    _check_tensor(x, name)
    if x.dim() < len(shape) or tuple(x.shape[-len(shape):]) != shape:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")


def skew(v: torch.Tensor) -> torch.Tensor:
    """Cross-product matrix ``[v]_x`` so that ``skew(v) @ w == cross(v, w)``.

    Args:
        v: vectors of shape ``(..., 3)``.

    Returns:
        matrices of shape ``(..., 3, 3)``.
    """
    _check_last(v, "v", (3,), "(..., 3)")
    zero = torch.zeros_like(v[..., 0])
    x, y, z = v.unbind(-1)
    rows = [
        torch.stack([zero, -z, y], dim=-1),
        torch.stack([z, zero, -x], dim=-1),
        torch.stack([-y, x, zero], dim=-1),
    ]
    return torch.stack(rows, dim=-2)


def essential_from_pose(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Essential matrix ``E = [t]_x R`` of the relative pose ``x2 = R x1 + t``.

    Args:
        R: rotations of shape ``(..., 3, 3)``.
        t: translations of shape ``(..., 3)``.

    Returns:
        essential matrices of shape ``(..., 3, 3)``; ``x2^T E x1 = 0`` for normalized points.
    """
    _check_last(R, "R", (3, 3), "(..., 3, 3)")
    _check_last(t, "t", (3,), "(..., 3)")
    return skew(t) @ R


def relative_pose(
    R1: torch.Tensor, t1: torch.Tensor, R2: torch.Tensor, t2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative pose from camera 1 to camera 2 given their world-to-camera poses.

    With ``x1 = R1 X + t1`` and ``x2 = R2 X + t2``: ``x2 = R x1 + t`` where ``R = R2 R1^T`` and
    ``t = t2 - R t1``.

    Args:
        R1, R2: world-to-camera rotations of shape ``(..., 3, 3)``.
        t1, t2: world-to-camera translations of shape ``(..., 3)``.

    Returns:
        ``(R (..., 3, 3), t (..., 3))``; ``t`` keeps the metric scale (not normalized).
    """
    for name, value in (("R1", R1), ("R2", R2)):
        _check_last(value, name, (3, 3), "(..., 3, 3)")
    for name, value in (("t1", t1), ("t2", t2)):
        _check_last(value, name, (3,), "(..., 3)")
    R = R2 @ R1.transpose(-1, -2)
    t = t2 - (R @ t1.unsqueeze(-1)).squeeze(-1)
    return R, t


def normalize_keypoints(kpts: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Pixel keypoints to normalized camera coordinates, ``K^-1 [u, v, 1]^T``.

    Args:
        kpts: pixel coordinates of shape ``(..., N, 2)``.
        K: intrinsics of shape ``(..., 3, 3)`` (broadcast against the batch dims of ``kpts``).

    Returns:
        normalized coordinates of shape ``(..., N, 2)``.
    """
    _check_last(kpts, "kpts", (2,), "(..., N, 2)")
    if kpts.dim() < 2:
        raise ValueError(f"kpts must have shape (..., N, 2), got {tuple(kpts.shape)}")
    _check_last(K, "K", (3, 3), "(..., 3, 3)")
    K = K.to(kpts.dtype)
    # Solve instead of dividing by the focal lengths so that a skew term in K is honoured.
    ones = torch.ones_like(kpts[..., :1])
    homog = torch.cat([kpts, ones], dim=-1)  # (..., N, 3)
    Kinv = torch.linalg.inv(K)
    out = homog @ Kinv.transpose(-1, -2)
    return out[..., :2] / out[..., 2:3]


def symmetric_epipolar_distance(
    x1: torch.Tensor, x2: torch.Tensor, E: torch.Tensor, eps: float = 1e-15
) -> torch.Tensor:
    """Squared symmetric epipolar distance of matches under an essential matrix (Yi et al. 2018).

    ``d = (x2^T E x1)^2 * (1 / ((E x1)_1^2 + (E x1)_2^2) + 1 / ((E^T x2)_1^2 + (E^T x2)_2^2))``
    with homogeneous normalized points. ``d`` is the sum of the squared distances of each point to
    the epipolar line of the other, in normalized units (multiply ``sqrt(d)`` by a focal length for
    an approximate pixel value). Yi et al. call a match an inlier when ``d < 1e-4``.

    Args:
        x1: normalized points of image 1, shape ``(..., N, 2)``.
        x2: normalized points of image 2, shape ``(..., N, 2)``.
        E: essential matrices of shape ``(..., 3, 3)`` with ``x2^T E x1 = 0``.
        eps: guards the division for degenerate epipolar lines (e.g. ``E = 0``).

    Returns:
        distances of shape ``(..., N)``.
    """
    _check_last(x1, "x1", (2,), "(..., N, 2)")
    _check_last(x2, "x2", (2,), "(..., N, 2)")
    if x1.dim() < 2 or x1.shape[-2] != x2.shape[-2]:
        raise ValueError(
            f"x1 and x2 must have shape (..., N, 2) with the same N, got {tuple(x1.shape)} and {tuple(x2.shape)}"
        )
    _check_last(E, "E", (3, 3), "(..., 3, 3)")
    E = E.to(x1.dtype)
    h1 = torch.cat([x1, torch.ones_like(x1[..., :1])], dim=-1)  # (..., N, 3)
    h2 = torch.cat([x2, torch.ones_like(x2[..., :1])], dim=-1)
    Ex1 = h1 @ E.transpose(-1, -2)  # rows are (E x1)^T, (..., N, 3)
    Etx2 = h2 @ E  # rows are (E^T x2)^T
    num = (h2 * Ex1).sum(-1) ** 2
    d1 = Ex1[..., 0] ** 2 + Ex1[..., 1] ** 2
    d2 = Etx2[..., 0] ** 2 + Etx2[..., 1] ** 2
    return num * (1.0 / d1.clamp_min(eps) + 1.0 / d2.clamp_min(eps))
