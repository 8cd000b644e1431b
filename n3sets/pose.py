"""Relative pose from an essential matrix, and pose errors (batched, torch).

Convention (docs/architecture.md, Conventions): points are normalized image coordinates, the
pose maps camera 1 to camera 2 as ``X2 = R X1 + t`` and ``E = [t]_x R``, so ``x2^T E x1 = 0``.
"""
from __future__ import annotations


import torch

__all__ = [
    "decompose_essential",
    "recover_pose",
    "angle_between_rotations",
    "translation_angle",
    "pose_error",
    "FAILED_POSE_ERROR",
]

#: Error in degrees given to a pair whose estimation failed (docs/architecture.md, Conventions:
#: failures count as 180).
FAILED_POSE_ERROR = 180.0


def _check_matrices(E: torch.Tensor, name: str = "E") -> None:
    if not isinstance(E, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(E).__name__}")
    if E.dim() < 2 or E.shape[-2:] != (3, 3):
        raise ValueError(f"{name} must have shape (..., 3, 3), got {tuple(E.shape)}")


def _check_points(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != 2:
        raise ValueError(f"{name} must have shape (B, N, 2), got {tuple(x.shape)}")


def decompose_essential(E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The four (R, t) candidates of an essential matrix.

    Args:
        E: essential matrices ``(..., 3, 3)``; they need not be exactly rank 2.

    Returns:
        R ``(..., 4, 3, 3)`` and t ``(..., 4, 3)`` (unit norm), ordered
        ``(R1, t), (R1, -t), (R2, t), (R2, -t)``. Exactly one has both cameras looking at the
        scene; pick it with :func:`recover_pose`.
    """
    _check_matrices(E)
    U, _, Vh = torch.linalg.svd(E)
    # E is only defined up to sign, so flipping U or V keeps it valid; doing so makes the
    # products below proper rotations (det +1) rather than reflections.
    U = U * torch.where(torch.det(U) < 0, -1.0, 1.0).to(U.dtype)[..., None, None]
    Vh = Vh * torch.where(torch.det(Vh) < 0, -1.0, 1.0).to(Vh.dtype)[..., None, None]
    W = E.new_tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    R1 = U @ W @ Vh
    R2 = U @ W.transpose(-1, -2) @ Vh
    t = U[..., :, 2]
    R = torch.stack([R1, R1, R2, R2], dim=-3)
    t = torch.stack([t, -t, t, -t], dim=-2)
    return R, t


def _triangulated_depths(R, t, f1, f2, eps):
    """Depths (z1, z2) of each match in both cameras for candidate poses.

    R ``(B, K, 3, 3)``, t ``(B, K, 3)``, f1/f2 ``(B, N, 3)`` homogeneous normalized points;
    returns ``(B, K, N)`` each. Solves ``z2 f2 = z1 R f1 + t`` in closed form via cross products
    (the least-squares midpoint would give the same signs for consistent matches).
    """
    Rf1 = torch.einsum("bkij,bnj->bkni", R, f1)  # (B, K, N, 3)
    f2 = f2[:, None].expand_as(Rf1)
    tt = t[:, :, None, :].expand_as(Rf1)
    c = torch.cross(f2, Rf1, dim=-1)  # z1 (f2 x R f1) = -(f2 x t)
    denom = (c * c).sum(-1).clamp_min(eps)
    z1 = -(torch.cross(f2, tt, dim=-1) * c).sum(-1) / denom
    c2 = torch.cross(Rf1, f2, dim=-1)  # z2 (R f1 x f2) = (R f1 x t)
    z2 = (torch.cross(Rf1, tt, dim=-1) * c2).sum(-1) / denom
    return z1, z2


def recover_pose(
    E: torch.Tensor,
    x1: torch.Tensor,
    x2: torch.Tensor,
    mask: torch.Tensor | None = None,
    max_depth: float = 50.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Relative pose from an essential matrix by the cheirality test.

    Of the four decompositions, the one with the most matches triangulated in front of both
    cameras wins. Points farther than ``max_depth`` baselines are ignored, as in OpenCV's
    ``recoverPose`` (``distanceThresh=50``): they are nearly at infinity and vote for any
    candidate almost at random.

    Args:
        E: essential matrices ``(B, 3, 3)``.
        x1: normalized points in image 1 ``(B, N, 2)``.
        x2: normalized points in image 2 ``(B, N, 2)``.
        mask: ``(B, N)`` bool (which points vote) or float weights (how much each votes);
            ``None`` lets all vote.
        max_depth: depth limit in units of the baseline.

    Returns:
        R ``(B, 3, 3)``, t ``(B, 3)`` (unit norm), and ok ``(B,)`` bool: False where E is
        non-finite or degenerate (second singular value near zero) or no voting point lies in
        front of both cameras. R and t are still finite where ok is False.
    """
    _check_matrices(E)
    if E.dim() != 3:
        raise ValueError(f"E must have shape (B, 3, 3), got {tuple(E.shape)}")
    _check_points(x1, "x1")
    _check_points(x2, "x2")
    B, N = x1.shape[:2]
    if x2.shape != x1.shape or E.shape[0] != B:
        raise ValueError(
            f"expected E (B, 3, 3), x1 and x2 (B, N, 2) with equal B and N, got "
            f"{tuple(E.shape)}, {tuple(x1.shape)}, {tuple(x2.shape)}"
        )
    if mask is None:
        weight = x1.new_ones(B, N)
    else:
        if mask.shape != (B, N):
            raise ValueError(f"mask must have shape (B, N) = {(B, N)}, got {tuple(mask.shape)}")
        weight = mask.to(x1.dtype)

    dtype = torch.promote_types(E.dtype, x1.dtype)
    # float64 for the SVD and the triangulation: the depth signs decide the pose and single
    # precision loses them for near-parallel rays.
    work = torch.float64
    E = E.to(work)
    finite = torch.isfinite(E).flatten(1).all(1)
    E = torch.where(finite[:, None, None], E, torch.zeros_like(E))
    # Scale-free: E is defined up to scale, and normalising keeps the rank test meaningful.
    scale = torch.linalg.matrix_norm(E).clamp_min(1e-300)
    E = E / scale[:, None, None]
    s = torch.linalg.svdvals(E)
    nondegenerate = finite & (s[:, 0] > 1e-12) & (s[:, 1] > 1e-6 * s[:, 0])

    Rs, ts = decompose_essential(E)  # (B, 4, 3, 3), (B, 4, 3)
    ones = torch.ones(B, N, 1, dtype=work, device=x1.device)
    f1 = torch.cat([x1.to(work), ones], -1)
    f2 = torch.cat([x2.to(work), ones], -1)
    z1, z2 = _triangulated_depths(Rs, ts, f1, f2, eps=1e-300)
    front = (z1 > 0) & (z2 > 0) & (z1 < max_depth) & (z2 < max_depth)
    w = torch.nan_to_num(weight.to(work), nan=0.0).clamp_min(0)
    votes = (front.to(work) * w[:, None, :]).sum(-1)  # (B, 4)
    best = votes.argmax(-1)
    idx = torch.arange(B, device=E.device)
    R = Rs[idx, best]
    t = ts[idx, best]
    ok = nondegenerate & (votes[idx, best] > 0)
    eye = torch.eye(3, dtype=work, device=E.device).expand(B, 3, 3)
    R = torch.where(ok[:, None, None], R, eye)
    t = torch.where(ok[:, None], t, torch.tensor([0.0, 0.0, 1.0], dtype=work, device=E.device))
    return R.to(dtype), t.to(dtype), ok


def angle_between_rotations(R1: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    """Geodesic angle between rotations, in degrees.

    Args:
        R1, R2: rotations ``(..., 3, 3)`` (broadcastable).

    Returns:
        ``(...)`` angles in ``[0, 180]``.
    """
    _check_matrices(R1, "R1")
    _check_matrices(R2, "R2")
    dtype = torch.promote_types(R1.dtype, R2.dtype)
    D = R1.to(dtype).transpose(-1, -2) @ R2.to(dtype)
    # atan2(sin, cos) instead of arccos((tr - 1) / 2): arccos has an infinite slope at 0 and
    # 180 degrees and returns NaN when rounding pushes its argument past +-1.
    cos = (D.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0
    axis = torch.stack(
        [D[..., 2, 1] - D[..., 1, 2], D[..., 0, 2] - D[..., 2, 0], D[..., 1, 0] - D[..., 0, 1]], -1
    )
    sin = torch.linalg.vector_norm(axis, dim=-1) / 2.0
    return torch.rad2deg(torch.atan2(sin, cos))


def translation_angle(t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """Angle between translation directions, ignoring sign and scale, in degrees.

    An essential matrix fixes t only up to scale (and, before the cheirality test, sign),
    so ``t`` and ``-t`` count as the same direction.

    Args:
        t1, t2: translations ``(..., 3)`` (broadcastable).

    Returns:
        ``(...)`` angles in ``[0, 90]``; a zero-length translation gives 90 (no direction).
    """
    for name, t in (("t1", t1), ("t2", t2)):
        if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[-1] != 3:
            raise ValueError(f"{name} must be a tensor of shape (..., 3), got {getattr(t, 'shape', t)}")
    dtype = torch.promote_types(t1.dtype, t2.dtype)
    t1, t2 = t1.to(dtype), t2.to(dtype)
    cross = torch.linalg.vector_norm(torch.cross(*torch.broadcast_tensors(t1, t2), dim=-1), dim=-1)
    dot = (t1 * t2).sum(-1).abs()
    angle = torch.rad2deg(torch.atan2(cross, dot))
    degenerate = (cross == 0) & (dot == 0)
    return torch.where(degenerate, torch.full_like(angle, 90.0), angle)


def pose_error(
    R_est: torch.Tensor,
    t_est: torch.Tensor,
    R_gt: torch.Tensor,
    t_gt: torch.Tensor,
    ok: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pose error of Yi et al. (2018): ``max(rotation angle, translation angle)`` in degrees.

    Args:
        R_est, R_gt: ``(..., 3, 3)``; t_est, t_gt: ``(..., 3)``.
        ok: optional ``(...)`` bool; where False the estimate failed.

    Returns:
        ``(...)`` errors; failed or non-finite estimates get :data:`FAILED_POSE_ERROR` (180).
    """
    rot = angle_between_rotations(R_est, R_gt)
    err = torch.maximum(rot, translation_angle(t_est, t_gt).to(rot.dtype))
    bad = ~torch.isfinite(err)
    if ok is not None:
        bad = bad | ~ok.to(torch.bool)
    return torch.where(bad, torch.full_like(err, FAILED_POSE_ERROR), err)
