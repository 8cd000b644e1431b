"""Differentiable weighted eight-point algorithm (Yi et al. 2018, Sec. 3.3).

The network's per-match weights enter a weighted least-squares problem ``min_e e^T X^T W X e``
with ``||e|| = 1``; its solution is the eigenvector of ``X^T W X`` with the smallest
eigenvalue. The essential matrix obtained that way is differentiable w.r.t. the weights, which
is what lets the essential-matrix loss train the classifier end to end.
"""
from __future__ import annotations

import torch

__all__ = ["weighted_eight_point", "logits_to_weights", "eight_point_design_matrix"]


def logits_to_weights(logits: torch.Tensor) -> torch.Tensor:
    """Per-match weights ``relu(tanh(logits))`` in ``[0, 1)`` as in Yi et al. (2018)."""
    return torch.relu(torch.tanh(logits))


def eight_point_design_matrix(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Rows of the epipolar constraint ``x2^T E x1 = 0`` for ``E`` flattened row-major.

    Args:
        x1: ``(..., N, 2)`` normalized coordinates in image 1.
        x2: ``(..., N, 2)`` normalized coordinates in image 2.

    Returns:
        ``(..., N, 9)`` with rows ``[u2 u1, u2 v1, u2, v2 u1, v2 v1, v2, u1, v1, 1]``.
    """
    u1, v1 = x1[..., 0], x1[..., 1]
    u2, v2 = x2[..., 0], x2[..., 1]
    ones = torch.ones_like(u1)
    return torch.stack([u2 * u1, u2 * v1, u2, v2 * u1, v2 * v1, v2, u1, v1, ones], dim=-1)


class _SmallestEigenvector(torch.autograd.Function):
    """Eigenvector of the smallest eigenvalue of a batch of symmetric matrices.

    ``torch.linalg.eigh`` back-propagates through all eigenvectors with factors
    ``1 / (lambda_i - lambda_j)``; with (near) repeated eigenvalues -- fewer than eight matches
    with non-zero weight, or several exact solutions -- this gives inf/NaN gradients. Only the
    smallest eigenvector is needed, so its gradient is written out directly,
    ``dv0 = sum_{j>0} v_j (v_j^T dA v0) / (lambda_0 - lambda_j)``, with the gap clamped from
    below. For well separated eigenvalues it equals eigh's own gradient.
    """

    @staticmethod
    def forward(ctx, A: torch.Tensor, min_gap: float):
        evals, evecs = torch.linalg.eigh(A)
        ctx.save_for_backward(evals, evecs)
        ctx.min_gap = min_gap
        return evecs[..., :, 0]

    @staticmethod
    def backward(ctx, grad_v):
        evals, evecs = ctx.saved_tensors
        v0 = evecs[..., :, :1]                                   # (..., 9, 1)
        others = evecs[..., :, 1:]                               # (..., 9, 8)
        gap = (evals[..., 1:] - evals[..., :1]).clamp_min(ctx.min_gap)  # >= 0 since eigh sorts ascending
        coeff = -(others.transpose(-1, -2) @ grad_v.unsqueeze(-1)) / gap.unsqueeze(-1)  # (..., 8, 1)
        grad_A = (others @ coeff) @ v0.transpose(-1, -2)         # (..., 9, 9)
        # A is symmetric; return the symmetric part so both triangles get the same gradient.
        grad_A = 0.5 * (grad_A + grad_A.transpose(-1, -2))
        return grad_A, None


def _hartley_transform(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Similarity ``T (..., 3, 3)`` moving the weighted centroid to 0 and the mean distance to sqrt(2)."""
    wsum = w.sum(-1, keepdim=True).clamp_min(1e-12)
    centroid = (w.unsqueeze(-1) * x).sum(-2) / wsum                       # (..., 2)
    dist = (x - centroid.unsqueeze(-2)).norm(dim=-1)                      # (..., N)
    mean_dist = (w * dist).sum(-1, keepdim=True) / wsum                   # (..., 1)
    scale = (2.0 ** 0.5) / mean_dist.clamp_min(1e-8)
    T = torch.zeros(x.shape[:-2] + (3, 3), dtype=x.dtype, device=x.device)
    T[..., 0, 0] = scale[..., 0]
    T[..., 1, 1] = scale[..., 0]
    T[..., :2, 2] = -scale * centroid
    T[..., 2, 2] = 1.0
    return T


def _apply_transform(T: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x @ T[..., :2, :2].transpose(-1, -2) + T[..., None, :2, 2]


def weighted_eight_point(x1: torch.Tensor, x2: torch.Tensor, weights: torch.Tensor,
                         mask: torch.Tensor | None = None, normalize: bool = False,
                         min_gap: float = 1e-9) -> torch.Tensor:
    """Essential matrix from weighted correspondences (weighted eight-point, no rank constraint).

    Args:
        x1: ``(B, N, 2)`` normalized coordinates (``K^-1`` applied) in image 1.
        x2: ``(B, N, 2)`` normalized coordinates in image 2.
        weights: ``(B, N)`` non-negative weights, e.g. :func:`logits_to_weights` of the logits.
        mask: optional ``(B, N)`` bool, False for padded items (their weight is forced to 0).
        normalize: apply a weighted Hartley normalisation before solving. Off by default:
            normalized camera coordinates are already O(1) (|x| ~ 0.5 for usual focal lengths),
            so the columns of ``X`` are of similar magnitude, and the solve is done in float64
            anyway. Useful when the inputs are far from that range.
        min_gap: lower bound on eigenvalue gaps in the backward pass (see _SmallestEigenvector).

    Returns:
        ``(B, 3, 3)`` E with unit Frobenius norm and ``x2^T E x1 ~ 0``; the sign is arbitrary.
        Like Yi et al. the rank-2 constraint is not enforced here; pose recovery projects E
        onto the essential manifold through its SVD.
    """
    if x1.dim() != 3 or x1.shape[-1] != 2:
        raise ValueError(f"x1 must have shape (B, N, 2), got {tuple(x1.shape)}")
    if x2.shape != x1.shape:
        raise ValueError(f"x2 must have shape {tuple(x1.shape)} (B, N, 2) like x1, got {tuple(x2.shape)}")
    if weights.shape != x1.shape[:2]:
        raise ValueError(f"weights must have shape (B, N) = {tuple(x1.shape[:2])}, got {tuple(weights.shape)}")
    if mask is not None:
        if mask.shape != x1.shape[:2]:
            raise ValueError(f"mask must have shape (B, N) = {tuple(x1.shape[:2])}, got {tuple(mask.shape)}")
        weights = weights * mask.to(weights.dtype)
        # padded coordinates may hold anything (even NaN); keep them out of the products
        x1 = x1.masked_fill(~mask.unsqueeze(-1), 0.0)
        x2 = x2.masked_fill(~mask.unsqueeze(-1), 0.0)

    out_dtype = x1.dtype
    # The 9x9 normal matrix is tiny; solving it in float64 keeps the smallest eigenvector
    # accurate even when float32 inputs make X^T W X badly scaled (entries ~1 vs. ~1e-8).
    x1, x2, w = x1.double(), x2.double(), weights.double()
    # The eigenvector does not depend on the scale of W; dividing by the total weight keeps
    # the eigenvalues (and so the clamped gaps in backward) on a fixed scale.
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)

    if normalize:
        T1, T2 = _hartley_transform(x1, w), _hartley_transform(x2, w)
        x1, x2 = _apply_transform(T1, x1), _apply_transform(T2, x2)

    X = eight_point_design_matrix(x1, x2)                   # (B, N, 9)
    XwX = X.transpose(-1, -2) @ (w.unsqueeze(-1) * X)       # (B, 9, 9)
    e = _SmallestEigenvector.apply(XwX, min_gap)
    E = e.reshape(e.shape[:-1] + (3, 3))
    if normalize:
        E = T2.transpose(-1, -2) @ E @ T1
    E = E / E.flatten(-2).norm(dim=-1).clamp_min(1e-12)[..., None, None]
    return E.to(out_dtype)
