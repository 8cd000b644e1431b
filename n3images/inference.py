"""Full-image inference with tiles: any image size in bounded memory, the same result as untiled.

:func:`tiled_apply` cuts the image into core tiles, runs the model on each core plus a halo of
``model.halo`` pixels of context (its receptive-field radius: the N3 blocks' search windows
included) and keeps the core of each output. Tiles start at multiples of ``model.grid_stride``
(the patch stride of the N3 blocks), so every tile sees the same patch grid as the whole image;
in eval mode (batch norms use running statistics) the tiled output then equals the untiled one
up to floating-point summation order.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

__all__ = ["tiled_apply", "denoise_image", "DEFAULT_TILE"]

DEFAULT_TILE = 1024  # core tile side in pixels (memory grows with (tile + 2 * halo)^2; 1024x768 runs untiled)


def _tiles(n: int, tile: int, align: int) -> list[tuple[int, int]]:
    step = max(align, (tile // align) * align)
    return [(s, min(s + step, n)) for s in range(0, n, step)]


@torch.no_grad()
def tiled_apply(model: torch.nn.Module, x: torch.Tensor, tile: int | None = DEFAULT_TILE,
                progress: Callable[[int, int], object] | None = None, **model_kwargs: object) -> torch.Tensor:
    """``model`` applied to ``x (B, C, H, W)`` tile by tile; ``(B, C', H, W)``.

    Args:
        model: a module with ``halo`` and ``grid_stride`` attributes (the image models here),
            in eval mode.
        x: input batch.
        tile: core tile side (rounded down to a multiple of ``grid_stride``); None or a tile at
            least the image size: one pass.
        progress: optional callable ``progress(done, total)`` called after every tile.
        model_kwargs: passed to every ``model(tile, **model_kwargs)`` call (e.g. ``scale=`` of
            the SR models).
    """
    if x.dim() != 4:
        raise ValueError(f"tiled_apply: x must have shape (B, C, H, W), got {tuple(x.shape)}")
    H, W = x.shape[-2:]
    halo, align = int(getattr(model, "halo", 0)), int(getattr(model, "grid_stride", 1))
    if tile is None or (tile >= H and tile >= W):
        out = model(x, **model_kwargs)
        if progress:
            progress(1, 1)
        return out
    if tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    # the halo is a whole number of grid steps, so that a tile's origin stays on the patch grid
    halo = int(math.ceil(halo / align) * align)
    rows, cols = _tiles(H, tile, align), _tiles(W, tile, align)
    out, total, done = None, len(rows) * len(cols), 0
    for r0, r1 in rows:
        for c0, c1 in cols:
            a0, a1 = max(0, r0 - halo), min(H, r1 + halo)
            b0, b1 = max(0, c0 - halo), min(W, c1 + halo)
            y = model(x[..., a0:a1, b0:b1], **model_kwargs)
            if out is None:
                out = y.new_empty(x.shape[0], y.shape[1], H, W)
            out[..., r0:r1, c0:c1] = y[..., r0 - a0:r1 - a0, c0 - b0:c1 - b0]
            done += 1
            if progress:
                progress(done, total)
    return out


def denoise_image(model: torch.nn.Module, noisy: np.ndarray | torch.Tensor, tile: int | None = DEFAULT_TILE,
                  device: str | torch.device | None = None,
                  progress: Callable[[int, int], object] | None = None, **model_kwargs: object) -> np.ndarray:
    """Denoise one image: ``(H, W)`` grey or ``(H, W, C)`` numpy array in [0, 1] -> float32 array, same shape.

    A grey model (``conf["channels"] == 1``) denoises a colour image channel by channel. The
    output is not clipped (the evaluation protocol clips before PSNR). ``model_kwargs`` go to
    every model call (``noise_level=(a, b)`` of a non-blind model,
    :func:`n3images.models.noise_level_kwargs`).
    """
    arr = np.asarray(noisy, dtype=np.float32)
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ValueError(f"denoise_image: image must be (H, W) or (H, W, C) and non-empty, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("denoise_image: image holds NaN or infinite values")
    channels = model.conf.get("channels", 1)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    chw = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if channels == 1:
        batch = torch.from_numpy(np.ascontiguousarray(chw)).unsqueeze(1)  # (C, 1, H, W): channels as a batch
    elif chw.shape[0] == channels:
        batch = torch.from_numpy(np.ascontiguousarray(chw)).unsqueeze(0)
    else:
        raise ValueError(f"denoise_image: the model takes {channels}-channel images, got {chw.shape[0]} channels")
    parts = []
    for i in range(batch.shape[0]):  # one channel / image at a time keeps the memory of one
        sub = None if progress is None else (lambda d, t, i=i: progress(i * t + d, batch.shape[0] * t))
        parts.append(tiled_apply(model, batch[i:i + 1].to(device), tile, sub, **model_kwargs).cpu())
    out = torch.cat(parts).numpy()
    out = out[:, 0] if channels == 1 else out[0]
    return out[0] if arr.ndim == 2 else out.transpose(1, 2, 0)
