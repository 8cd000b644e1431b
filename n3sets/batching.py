"""Between torch-geometric style flat batches and padded set batches."""
from __future__ import annotations

import torch

__all__ = ["to_dense_sets", "to_flat_sets"]


def to_dense_sets(
    x: torch.Tensor, batch: torch.Tensor, batch_size: int | None = None, max_num_nodes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a flat batch of sets.

    Args:
        x: ``(sumN, C)`` item features of all sets, concatenated.
        batch: ``(sumN,)`` int64 set index of every item, sorted (torch-geometric convention).
        batch_size, max_num_nodes: passed to ``torch_geometric.utils.to_dense_batch``.

    Returns:
        ``x (B, C, N)`` with zeros at padded positions and ``mask (B, N)`` bool (True = real item).
    """
    from torch_geometric.utils import to_dense_batch

    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"to_dense_sets: x must have shape (sumN, C), got {got}")
    if not isinstance(batch, torch.Tensor) or batch.shape != (x.shape[0],):
        got = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ValueError(f"to_dense_sets: batch must have shape (sumN,) = ({x.shape[0]},), got {got}")
    if batch.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"to_dense_sets: batch of shape (sumN,) must be an integer tensor, got {batch.dtype}")
    if batch.numel() > 1 and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError("to_dense_sets: batch of shape (sumN,) must be sorted (items of a set contiguous)")
    dense, mask = to_dense_batch(x, batch.long(), batch_size=batch_size, max_num_nodes=max_num_nodes)
    return dense.transpose(1, 2), mask


def to_flat_sets(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_dense_sets`: ``x (B, C, N)``, ``mask (B, N)`` -> ``(sumN, C)``."""
    if x.dim() != 3 or mask.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"to_flat_sets: expected x (B, C, N) and mask (B, N), got {tuple(x.shape)} and {tuple(mask.shape)}")
    return x.transpose(1, 2)[mask]
