"""Bicubic resizing as MATLAB's ``imresize(img, scale, 'bicubic')`` (antialiasing on), in float64.

Every published super-resolution number makes its low-resolution inputs this way, so the
degradation must match it, not OpenCV's or PIL's bicubic (different kernel parameter, no
antialiasing, other edge handling). The conventions, per dimension of input length ``n`` and
output length ``m``:

* kernel: Keys' cubic convolution with ``a = -0.5``::

      cubic(x) = 1.5|x|^3 - 2.5|x|^2 + 1              for |x| <= 1
                 -0.5|x|^3 + 2.5|x|^2 - 4|x| + 2      for 1 < |x| <= 2,   0 beyond

* antialiasing: when shrinking (``scale < 1``) the kernel is stretched,
  ``h(x) = scale * cubic(scale * x)``, and its support grows to ``4 / scale`` input pixels;
* output pixel ``x = 1..m`` (1-based) sits at input coordinate ``u = x / scale + 0.5 (1 - 1 / scale)``;
  its taps are the ``ceil(width) + 2`` input indices from ``floor(u - width / 2)`` on, weighted
  ``h(u - index)`` and normalised to sum 1;
* edges: indices outside ``1..n`` are mirrored with the edge pixel repeated
  (``0 -> 1, -1 -> 2, n + 1 -> n``, i.e. symmetric padding);
* output size ``ceil(n * scale)`` unless given;
* separable, one dimension after the other, the dimension with the smaller scale first (as
  MATLAB orders them; ties: rows -- the height -- first). In float64 the order changes results by
  rounding only.

Each dimension is a dense ``(m, n)`` weight matrix (:func:`resize_matrix`, cached), so resizing
is two matrix products; :func:`imresize` takes numpy ``(H, W[, C])`` images,
:func:`resize_batch` torch ``(..., H, W)`` tensors, with identical results.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

__all__ = ["cubic", "resize_matrix", "output_size", "imresize", "resize_batch"]


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with ``a = -0.5`` (MATLAB's ``bicubic``), float64."""
    ax = np.abs(np.asarray(x, dtype=np.float64))
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def _check_scale(scale, what: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} must be a positive number, got {scale!r}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{what} must be a positive finite number, got {scale!r}")
    return scale


def output_size(n: int, scale: float) -> int:
    """``ceil(n * scale)``, MATLAB's output length, robust to ``1/3``-style rounding (``48 * (1/3)`` is 16)."""
    return max(1, int(math.ceil(n * scale - 1e-9)))


@lru_cache(maxsize=256)
def _matrix(n: int, m: int, scale: float) -> np.ndarray:
    kernel_width = 4.0 / scale if scale < 1 else 4.0
    x = np.arange(1, m + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - kernel_width / 2.0)
    taps = int(math.ceil(kernel_width)) + 2
    idx = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]  # (m, taps), 1-based
    if scale < 1:
        w = scale * cubic(scale * (u[:, None] - idx))
    else:
        w = cubic(u[:, None] - idx)
    w = w / w.sum(axis=1, keepdims=True)
    # symmetric padding: 1-based index i maps into [1, n, n, ..., 1] of period 2n
    period = np.concatenate([np.arange(n), np.arange(n - 1, -1, -1)])
    src = period[np.mod(idx.astype(np.int64) - 1, 2 * n)]
    mat = np.zeros((m, n), dtype=np.float64)
    np.add.at(mat, (np.repeat(np.arange(m), taps), src.ravel()), w.ravel())
    mat.flags.writeable = False
    return mat


def resize_matrix(n: int, m: int | None = None, scale: float | None = None) -> np.ndarray:
    """The ``(m, n)`` float64 matrix that resizes a length-``n`` signal to length ``m``.

    Args:
        n: input length.
        m: output length (default ``ceil(n * scale)``).
        scale: the kernel's scale (default ``m / n``). MATLAB uses the scale given by the caller
            when there is one, else ``m / n``; give both to reproduce ``imresize(img, 1/3)``.

    The result is read-only (it is cached); rows sum to 1.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"resize_matrix: input length must be a positive int, got {n!r}")
    if m is None and scale is None:
        raise ValueError("resize_matrix: give the output length m, the scale, or both")
    if scale is not None:
        scale = _check_scale(scale, "scale")
    if m is None:
        m = output_size(int(n), scale)
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(f"resize_matrix: output length must be a positive int, got {m!r}")
    if scale is None:
        scale = m / n
    return _matrix(int(n), int(m), float(scale))


def _plan(shape_hw: tuple[int, int], scale, output_shape) -> list[tuple[int, np.ndarray]]:
    """``[(axis 0 = rows / 1 = columns, matrix)]`` in MATLAB's order (smaller scale first)."""
    h, w = shape_hw
    if h < 1 or w < 1:
        raise ValueError(f"cannot resize an empty image of size {h}x{w}")
    if scale is None and output_shape is None:
        raise ValueError("give a scale, an output_shape (H, W), or both")
    if scale is not None:
        if isinstance(scale, (tuple, list)):
            if len(scale) != 2:
                raise ValueError(f"scale must be a number or a pair (rows, columns), got {scale!r}")
            scales = (_check_scale(scale[0], "scale"), _check_scale(scale[1], "scale"))
        else:
            scales = (_check_scale(scale, "scale"),) * 2
    if output_shape is not None:
        if (not isinstance(output_shape, (tuple, list)) or len(output_shape) != 2
                or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in output_shape)):
            raise ValueError(f"output_shape must be a pair of positive ints (H, W), got {output_shape!r}")
        sizes = (int(output_shape[0]), int(output_shape[1]))
        if scale is None:
            scales = (sizes[0] / h, sizes[1] / w)
    else:
        sizes = (output_size(h, scales[0]), output_size(w, scales[1]))
    order = sorted(range(2), key=lambda d: scales[d])  # stable: rows first on a tie
    return [(d, resize_matrix((h, w)[d], sizes[d], scales[d])) for d in order]


def imresize(img: np.ndarray, scale: float | tuple[float, float] | None = None,
             output_shape: tuple[int, int] | None = None) -> np.ndarray:
    """MATLAB's ``imresize(img, scale)`` / ``imresize(img, [H W])`` with the bicubic kernel.

    Args:
        img: ``(H, W)`` or ``(H, W, C)`` numpy array (any real dtype; computed in float64).
        scale: a factor (or ``(rows, columns)`` factors); the output is ``ceil(size * scale)``.
        output_shape: ``(H, W)`` of the output; with ``scale`` too, the kernel uses ``scale``.

    Returns:
        float64 array ``(H', W'[, C])``; not clipped (bicubic overshoots at edges).
    """
    if not isinstance(img, np.ndarray):
        raise ValueError(f"imresize: img must be a numpy array (H, W) or (H, W, C), got {type(img).__name__}")
    if img.ndim not in (2, 3):
        raise ValueError(f"imresize: img must have shape (H, W) or (H, W, C), got {img.shape}")
    if not (np.issubdtype(img.dtype, np.number) or img.dtype == np.bool_) or np.iscomplexobj(img):
        raise ValueError(f"imresize: img must be real-valued, got {img.dtype}")
    out = img.astype(np.float64)
    for axis, mat in _plan(img.shape[:2], scale, output_shape):
        out = np.tensordot(mat, out, axes=([1], [axis]))  # the resized axis comes first
        if axis == 1:
            out = np.moveaxis(out, 0, 1)
    return out


def resize_batch(x: torch.Tensor, scale: float | tuple[float, float] | None = None,
                 output_shape: tuple[int, int] | None = None) -> torch.Tensor:
    """:func:`imresize` of every ``(H, W)`` plane of a tensor ``(..., H, W)``; same dtype and device.

    Computed in float64 (the weights are float64) and cast back, so float32 tensors match
    :func:`imresize` to float32 precision.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"resize_batch: x must be a floating-point tensor (..., H, W), got {got}")
    out = x.to(torch.float64)
    for axis, mat in _plan(tuple(x.shape[-2:]), scale, output_shape):
        m = torch.from_numpy(np.array(mat)).to(out.device)
        out = m @ out if axis == 0 else out @ m.T
    return out.to(x.dtype)
