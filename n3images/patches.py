"""Patch grids on images: strided im2col / col2im and the search-window candidate layout.

A patch grid of patch size ``p`` and stride ``s`` starts at the top-left pixel; the image is
padded at the bottom and right so that the last patches reach the last pixel (``grid_shape``).
Patch ``(i, j)`` of the grid covers rows ``i*s .. i*s+p-1`` and columns ``j*s .. j*s+p-1`` and is
item ``i * gw + j`` in the flattened ``(B, C*p*p, L)`` layout of :func:`im2col`.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from n3sets.engine import BlockedCandidates, IndexedCandidates

__all__ = ["grid_shape", "pad_to_grid", "im2col", "col2im", "patch_centres", "window_candidates", "window_blocks"]


def _check_ps(patch_size: int, stride: int) -> None:
    if patch_size < 1 or stride < 1:
        raise ValueError(f"patch_size and stride must be >= 1, got {patch_size} and {stride}")


def grid_shape(height: int, width: int, patch_size: int, stride: int) -> tuple[int, int, int, int]:
    """``(gh, gw, pad_bottom, pad_right)`` of the patch grid covering a ``height x width`` image."""
    _check_ps(patch_size, stride)
    if height < 1 or width < 1:
        raise ValueError(f"image must be at least 1x1, got {height}x{width}")
    gh = math.ceil(max(height - patch_size, 0) / stride) + 1
    gw = math.ceil(max(width - patch_size, 0) / stride) + 1
    return gh, gw, (gh - 1) * stride + patch_size - height, (gw - 1) * stride + patch_size - width


def pad_to_grid(x: torch.Tensor, patch_size: int, stride: int, mode: str = "reflect") -> torch.Tensor:
    """``(B, C, H, W)`` padded at the bottom/right to the grid's extent (reflection where it fits)."""
    gh, gw, ph, pw = grid_shape(x.shape[-2], x.shape[-1], patch_size, stride)
    if ph == 0 and pw == 0:
        return x
    if mode == "reflect" and (ph >= x.shape[-2] or pw >= x.shape[-1]):
        mode = "replicate"  # reflection needs a pad smaller than the image
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def im2col(x: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """Patches of a grid-padded ``(B, C, H, W)`` image: ``(B, C*p*p, L)``, ``L = gh * gw``."""
    return F.unfold(x, patch_size, stride=stride)


def col2im(cols: torch.Tensor, size: tuple[int, int], patch_size: int, stride: int) -> torch.Tensor:
    """Inverse of :func:`im2col`: ``(B, C*p*p, L)`` -> ``(B, C, H, W)``, overlapping patches averaged.

    ``size`` is the grid-padded image size. Every pixel of a padded grid is covered by at least
    one patch; pixels beyond the stride's reach (stride > patch size) stay 0.
    """
    out = F.fold(cols, size, patch_size, stride=stride)
    ones = torch.ones((1, 1) + tuple(size), dtype=cols.dtype, device=cols.device)
    count = F.fold(F.unfold(ones, patch_size, stride=stride), size, patch_size, stride=stride)
    return out / count.clamp_min(1.0)


def patch_centres(t: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """Values of a grid-padded map ``(B, 1, H, W)`` at the patch centres: ``(B, L)``."""
    c = patch_size // 2
    gh = (t.shape[-2] - patch_size) // stride + 1
    gw = (t.shape[-1] - patch_size) // stride + 1
    return t[:, 0, c::stride, c::stride][:, :gh, :gw].reshape(t.shape[0], -1)


def window_candidates(gh: int, gw: int, window: int, device=None) -> IndexedCandidates:
    """Candidates of every patch: the patches of the ``window x window`` grid window around it.

    The window is centred on the patch and shifted inwards at the grid borders, so every patch
    has ``min(window, gh) * min(window, gw) - 1`` candidates; the patch itself is excluded.
    Slots: ``window * window`` per patch (``O``), invalid ones where the grid is smaller than the
    window and at the patch's own position.

    Returns:
        :class:`n3sets.engine.IndexedCandidates` with ``index`` and ``valid`` of shape ``(gh*gw, O)``.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    wh, ww = min(window, gh), min(window, gw)
    half = window // 2
    i = torch.arange(gh, device=device)
    j = torch.arange(gw, device=device)
    r0 = (i - half).clamp(0, gh - wh)  # (gh,) first row of each query row's window
    c0 = (j - half).clamp(0, gw - ww)
    d = torch.arange(window, device=device)
    rows = r0[:, None] + d[None, :]  # (gh, window)
    cols = c0[:, None] + d[None, :]  # (gw, window)
    row_ok = d[None, :] < wh
    col_ok = d[None, :] < ww
    # (gh, gw, window, window) candidate grid positions
    R = rows[:, None, :, None].expand(gh, gw, window, window)
    C = cols[None, :, None, :].expand(gh, gw, window, window)
    valid = (row_ok[:, None, :, None] & col_ok[None, :, None, :]).expand(gh, gw, window, window)
    self_pos = (R == i[:, None, None, None]) & (C == j[None, :, None, None])
    valid = valid & ~self_pos
    index = torch.where(valid, R * gw + C, torch.zeros((), dtype=torch.long, device=device))
    L, O = gh * gw, window * window
    return IndexedCandidates(index.reshape(L, O).contiguous(), valid.reshape(L, O).contiguous())


def _window_starts(n: int, window: int) -> tuple[torch.Tensor, int]:
    """First grid position of each position's window (shifted inwards at the borders) and its size."""
    w = min(window, n)
    return (torch.arange(n) - window // 2).clamp(0, n - w), w


def window_blocks(gh: int, gw: int, window: int, tile: int = 8, device=None) -> tuple[torch.Tensor, BlockedCandidates]:
    """The candidates of :func:`window_candidates` as blocks of ``tile x tile`` neighbouring patches.

    Cached per (grid, window, tile, device): a block calls it on every forward.

    Returns ``(order, layout)``: ``order (L,)`` lists the grid items tile by tile (queries of a
    tile are consecutive), and ``layout`` is a :class:`n3sets.engine.BlockedCandidates` over the
    items *in that order*; a tile's candidates are the union of its patches' windows (at most
    ``(tile + window - 1)^2`` patches) with each patch's own window as its mask.
    """
    return _window_blocks(int(gh), int(gw), int(window), int(tile), str(torch.device(device or "cpu")))


@functools.lru_cache(maxsize=32)
def _window_blocks(gh: int, gw: int, window: int, tile: int, device: str):
    if window < 1 or tile < 1:
        raise ValueError(f"window and tile must be >= 1, got {window} and {tile}")
    r0, wh = _window_starts(gh, window)
    c0, ww = _window_starts(gw, window)
    grid = torch.arange(gh * gw).view(gh, gw)
    order, starts, members, masks = [], [0], [], []
    for ti in range(0, gh, tile):
        for tj in range(0, gw, tile):
            qi = torch.arange(ti, min(ti + tile, gh))
            qj = torch.arange(tj, min(tj + tile, gw))
            order.append(grid[ti:ti + tile, tj:tj + tile].reshape(-1))
            starts.append(starts[-1] + qi.numel() * qj.numel())
            ur = torch.arange(int(r0[qi].min()), int(r0[qi].max()) + wh)  # union rows / cols
            uc = torch.arange(int(c0[qj].min()), int(c0[qj].max()) + ww)
            members.append(grid[ur[:, None], uc[None, :]].reshape(-1))
            # (Qi, Qj, Ur, Uc): candidate inside the query's window and not the query itself
            in_r = (ur[None, :] >= r0[qi][:, None]) & (ur[None, :] < r0[qi][:, None] + wh)  # (Qi, Ur)
            in_c = (uc[None, :] >= c0[qj][:, None]) & (uc[None, :] < c0[qj][:, None] + ww)  # (Qj, Uc)
            m = in_r[:, None, :, None] & in_c[None, :, None, :]
            self_pos = (qi[:, None, None, None] == ur[None, None, :, None]) & (qj[None, :, None, None] == uc[None, None, None, :])
            masks.append((m & ~self_pos).reshape(qi.numel() * qj.numel(), -1))
    order = torch.cat(order)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())  # grid item -> position in the tile order
    members = [rank[m].to(device) for m in members]
    return order.to(device), BlockedCandidates(starts, members, [m.to(device) for m in masks])
