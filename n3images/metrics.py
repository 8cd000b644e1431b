"""Image quality metrics: PSNR, SSIM, and the Y-channel helpers of super-resolution evaluation.

Images are numpy arrays or torch tensors (converted to numpy float64) of shape ``(H, W)`` (grey)
or channel-last ``(H, W, C)`` with C = 1 or 3. Channel-first ``(C, H, W)`` tensors must be
permuted first (``x.permute(1, 2, 0)``); they are rejected rather than misread.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

__all__ = ["psnr", "ssim", "rgb_to_y", "rgb_to_ycbcr", "ycbcr_to_rgb", "shave", "modcrop"]

# Wang et al. 2004: 11x11 Gaussian window of std 1.5 (radius int(3.5 * 1.5 + 0.5) = 5), K1, K2.
_SSIM_SIGMA = 1.5
_SSIM_TRUNCATE = 3.5
_SSIM_RADIUS = int(_SSIM_TRUNCATE * _SSIM_SIGMA + 0.5)
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


def _as_array(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    elif not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array or torch tensor of shape (H, W) or (H, W, C), got {type(x).__name__}")
    return x


def _check_pair(x, y, func: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_array(x, "x"), _as_array(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"{func}: x and y must have the same shape, got {x.shape} and {y.shape}")
    if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[2] not in (1, 3)):
        raise ValueError(
            f"{func}: images must have shape (H, W) or channel-last (H, W, C) with C in {{1, 3}}, got {x.shape}"
        )
    if x.size == 0:
        raise ValueError(f"{func}: images are empty, shape {x.shape}")
    for name, a in (("x", x), ("y", y)):
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise ValueError(f"{func}: {name} of shape {a.shape} must be numeric, got {a.dtype}")
    x, y = x.astype(np.float64, copy=False), y.astype(np.float64, copy=False)
    for name, a in (("x", x), ("y", y)):
        if not np.isfinite(a).all():
            raise ValueError(f"{func}: {name} of shape {a.shape} contains NaN or inf")
    return x, y


def _check_range(data_range, func: str) -> float:
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float, np.integer, np.floating)):
        raise ValueError(f"{func}: data_range must be a positive number, got {data_range!r}")
    data_range = float(data_range)
    if not (math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"{func}: data_range must be a positive finite number, got {data_range!r}")
    return data_range


def psnr(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / mse)`` in dB, over all pixels and channels.

    Args:
        x, y: images ``(H, W)`` or ``(H, W, C)``, numpy or torch (any numeric dtype; pass
            ``data_range=255`` for 0-255 data).
        data_range: the value range of the images (1 for ``[0, 1]`` floats).

    Returns:
        PSNR in dB; ``inf`` for identical images.
    """
    data_range = _check_range(data_range, "psnr")
    x, y = _check_pair(x, y, "psnr")
    mse = float(np.mean((x - y) ** 2))
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def _ssim_channel(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    def filt(img):
        return gaussian_filter(img, sigma=_SSIM_SIGMA, truncate=_SSIM_TRUNCATE, mode="reflect")

    ux, uy = filt(x), filt(y)
    # population (not sample) covariances, as in Wang et al. 2004
    vx = filt(x * x) - ux * ux
    vy = filt(y * y) - uy * uy
    vxy = filt(x * y) - ux * uy
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    # the border, where the window leaves the image, is left out of the mean
    r = _SSIM_RADIUS
    return float(s[r:-r, r:-r].mean(dtype=np.float64))


def ssim(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, data_range: float = 1.0) -> float:
    """Structural similarity (Wang et al. 2004) with an 11x11 Gaussian window of std 1.5.

    Equal to ``skimage.metrics.structural_similarity(x, y, data_range=data_range,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` on float64 input (with
    ``channel_axis=-1`` for colour): K1 = 0.01, K2 = 0.03, population covariances, reflect
    padding, mean over the SSIM map without a 5-pixel border. Colour: the mean of the
    per-channel SSIMs (for the Y-channel convention, pass ``rgb_to_y(x)``).

    Args:
        x, y: images ``(H, W)`` or ``(H, W, C)``, numpy or torch, H and W >= 11.
        data_range: the value range of the images (1 for ``[0, 1]`` floats).

    Returns:
        mean SSIM, at most 1.
    """
    data_range = _check_range(data_range, "ssim")
    x, y = _check_pair(x, y, "ssim")
    if min(x.shape[:2]) < 2 * _SSIM_RADIUS + 1:
        raise ValueError(f"ssim: images must be at least {2 * _SSIM_RADIUS + 1}x{2 * _SSIM_RADIUS + 1}, got {x.shape}")
    if x.ndim == 2:
        return _ssim_channel(x, y, data_range)
    return float(np.mean([_ssim_channel(x[..., c], y[..., c], data_range) for c in range(x.shape[2])]))


# ITU-R BT.601 for [0, 1] RGB as MATLAB's rgb2ycbcr: YCbCr = (offset + M @ RGB) / 255, Y in
# [16, 235] / 255 and Cb, Cr in [16, 240] / 255.
_YCBCR_MATRIX = np.array([[65.481, 128.553, 24.966],
                          [-37.797, -74.203, 112.0],
                          [112.0, -93.786, -18.214]])
_YCBCR_OFFSET = np.array([16.0, 128.0, 128.0])


def _check_rgb(img, name: str = "img"):
    if not isinstance(img, (np.ndarray, torch.Tensor)):
        raise ValueError(f"{name} must be a numpy array or torch tensor of shape (..., 3), got {type(img).__name__}")
    if img.ndim < 1 or img.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (..., 3) (channel-last), got {tuple(img.shape)}")
    if isinstance(img, torch.Tensor):
        if not img.is_floating_point():
            raise ValueError(f"{name} must be a float tensor in [0, 1], got {img.dtype}")
    elif not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"{name} must be a float array in [0, 1], got {img.dtype} (divide 8-bit data by 255 first)")


def _affine(img, matrix: np.ndarray, offset: np.ndarray):
    """``img @ matrix.T + offset`` in the input's array type, dtype and device."""
    if isinstance(img, torch.Tensor):
        m = torch.as_tensor(matrix.T, dtype=img.dtype, device=img.device)
        return img @ m + torch.as_tensor(offset, dtype=img.dtype, device=img.device)
    return img @ matrix.T.astype(img.dtype) + offset.astype(img.dtype)


def rgb_to_y(img):
    """Luma Y of ITU-R BT.601 as MATLAB's ``rgb2ycbcr`` for ``[0, 1]`` RGB input.

    ``Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255``, in ``[16/255, 235/255]``; the channel on
    which super-resolution results are usually reported.

    Args:
        img: ``(..., 3)`` RGB in ``[0, 1]``, numpy (float result) or torch (same dtype/device).

    Returns:
        ``(...)``: the input without its channel axis.
    """
    _check_rgb(img)
    return _affine(img, _YCBCR_MATRIX[:1] / 255.0, _YCBCR_OFFSET[:1] / 255.0)[..., 0]


def rgb_to_ycbcr(img):
    """``(..., 3)`` RGB in ``[0, 1]`` -> YCbCr in ``[0, 1]`` units, as MATLAB's ``rgb2ycbcr`` on double input.

    ``Y`` is :func:`rgb_to_y`; ``Cb = (128 - 37.797 R - 74.203 G + 112 B) / 255``,
    ``Cr = (128 + 112 R - 93.786 G - 18.214 B) / 255``. Numpy or torch, same type out.
    """
    _check_rgb(img)
    return _affine(img, _YCBCR_MATRIX / 255.0, _YCBCR_OFFSET / 255.0)


def ycbcr_to_rgb(img):
    """Inverse of :func:`rgb_to_ycbcr` (MATLAB's ``ycbcr2rgb``); not clipped."""
    _check_rgb(img)
    inv = np.linalg.inv(_YCBCR_MATRIX / 255.0)
    return _affine(img, inv, -inv @ (_YCBCR_OFFSET / 255.0))


def shave(img, border: int):
    """Crop ``border`` pixels from each side of an ``(H, W)`` or ``(H, W, C)`` image (numpy or torch).

    Super-resolution evaluation leaves out a border of ``scale`` pixels, where the upsampling
    has no neighbours on one side. ``border = 0`` returns the image unchanged.
    """
    if not isinstance(img, (np.ndarray, torch.Tensor)):
        raise ValueError(f"img must be a numpy array or torch tensor of shape (H, W) or (H, W, C), got {type(img).__name__}")
    if img.ndim not in (2, 3):
        raise ValueError(f"img must have shape (H, W) or (H, W, C), got {tuple(img.shape)}")
    if isinstance(border, bool) or not isinstance(border, (int, np.integer)) or border < 0:
        raise ValueError(f"border must be a non-negative int, got {border!r}")
    if 2 * border >= min(img.shape[0], img.shape[1]):
        raise ValueError(f"border {border} leaves nothing of an image of shape {tuple(img.shape)}")
    if border == 0:
        return img
    return img[border:-border, border:-border]


def modcrop(img, scale: int):
    """The top-left ``(H - H % scale, W - W % scale)`` part of an ``(H, W)`` or ``(H, W, C)`` image.

    Super-resolution evaluation crops every ground-truth image to a multiple of the scale first
    (MATLAB's ``modcrop``), so that downscaling and upscaling back give the same size.
    """
    if not isinstance(img, (np.ndarray, torch.Tensor)):
        raise ValueError(f"img must be a numpy array or torch tensor of shape (H, W) or (H, W, C), got {type(img).__name__}")
    if img.ndim not in (2, 3):
        raise ValueError(f"img must have shape (H, W) or (H, W, C), got {tuple(img.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    h, w = img.shape[0] - img.shape[0] % scale, img.shape[1] - img.shape[1] % scale
    if h == 0 or w == 0:
        raise ValueError(f"an image of shape {tuple(img.shape)} is smaller than the scale {scale}")
    return img[:h, :w]
