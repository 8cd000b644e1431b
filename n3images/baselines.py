"""Classical Gaussian denoisers as reference points: BM3D and non-local means.

Both take a noisy float image in ``[0, 1]`` (``(H, W)`` grey or ``(H, W, 3)`` RGB, numpy or torch)
and the noise level ``sigma`` on the 0-255 scale, and return a numpy array of the same shape in
the input's float dtype (float64 for torch input or integer dtypes), not clipped.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["bm3d_denoise", "nlm_denoise", "BASELINES"]

# Non-local means settings, chosen by PSNR on set12 images 01, 02, 05, 07 with the benchmark's
# Gaussian noise at sigma 25 (mean PSNR over the four, dB): 5x5 patches searched in a 13x13
# window (patch_distance 6) with h = 0.7 sigma gave 29.01; the 7x7 / 11 / 0.8 sigma variant
# 28.44, h = 0.6 or 0.8 sigma with 5x5 / 6 about 28.9-29.0, fast_mode=False 27.0-28.2 (and 5-10x
# slower). `sigma` is passed too, so that skimage subtracts the expected noise part of the
# patch distances (Buades et al.).
_NLM_PATCH_SIZE = 5
_NLM_PATCH_DISTANCE = 6
_NLM_H_FACTOR = 0.7


def _prepare(noisy, sigma, func: str) -> tuple[np.ndarray, float, np.dtype]:
    if hasattr(noisy, "detach"):  # torch tensor, without importing torch here
        noisy = noisy.detach().cpu().double().numpy()
    if not isinstance(noisy, np.ndarray):
        raise ValueError(f"{func}: noisy must be a numpy array or torch tensor of shape (H, W) or (H, W, 3), got {type(noisy).__name__}")
    if not (noisy.ndim == 2 or (noisy.ndim == 3 and noisy.shape[2] == 3)) or min(noisy.shape[:2], default=0) == 0:
        raise ValueError(f"{func}: noisy must have shape (H, W) or (H, W, 3) and be non-empty, got {noisy.shape}")
    if not np.issubdtype(noisy.dtype, np.number):
        raise ValueError(f"{func}: noisy of shape {noisy.shape} must be numeric, got {noisy.dtype}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.integer, np.floating)):
        raise ValueError(f"{func}: sigma must be a positive number (0-255 scale), got {sigma!r}")
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"{func}: sigma must be a positive finite number (0-255 scale), got {sigma!r}")
    out_dtype = noisy.dtype if np.issubdtype(noisy.dtype, np.floating) else np.dtype(np.float64)
    noisy = noisy.astype(np.float64)
    if not np.isfinite(noisy).all():
        raise ValueError(f"{func}: noisy of shape {noisy.shape} contains NaN or inf")
    return noisy, sigma, out_dtype


def bm3d_denoise(noisy, sigma: float) -> np.ndarray:
    """BM3D (Dabov et al. 2007) with the `bm3d` package's default profile.

    Grey images use ``bm3d.bm3d(noisy, sigma_psd=sigma / 255)``; colour images CBM3D,
    ``bm3d.bm3d_rgb`` (grouping on the luminance of the opponent colour space).

    Args:
        noisy: ``(H, W)`` or ``(H, W, 3)`` float image in ``[0, 1]`` (plus noise).
        sigma: noise standard deviation on the 0-255 scale, > 0.
    """
    noisy, sigma, out_dtype = _prepare(noisy, sigma, "bm3d_denoise")
    try:
        import bm3d
    except ImportError as e:
        raise ImportError("bm3d_denoise needs the 'bm3d' package: pip install bm3d (a dependency of n3)") from e
    if noisy.ndim == 2:
        out = bm3d.bm3d(noisy, sigma_psd=sigma / 255)
    else:
        out = bm3d.bm3d_rgb(noisy, sigma_psd=sigma / 255)
    return np.asarray(out, dtype=out_dtype).reshape(noisy.shape)


def nlm_denoise(noisy, sigma: float) -> np.ndarray:
    """Non-local means (``skimage.restoration.denoise_nl_means``) tuned for Gaussian noise.

    5x5 patches, 13x13 search window, ``h = 0.7 sigma``, ``sigma`` given, fast mode (see the module
    comment for how these were chosen). Colour images are denoised jointly: patch distances are
    taken over all three channels.

    Args:
        noisy: ``(H, W)`` or ``(H, W, 3)`` float image in ``[0, 1]`` (plus noise).
        sigma: noise standard deviation on the 0-255 scale, > 0.
    """
    noisy, sigma, out_dtype = _prepare(noisy, sigma, "nlm_denoise")
    try:
        from skimage.restoration import denoise_nl_means
    except ImportError as e:
        raise ImportError("nlm_denoise needs scikit-image: pip install scikit-image (a dependency of n3)") from e
    s = sigma / 255
    out = denoise_nl_means(
        noisy,
        patch_size=_NLM_PATCH_SIZE,
        patch_distance=_NLM_PATCH_DISTANCE,
        h=_NLM_H_FACTOR * s,
        sigma=s,
        fast_mode=True,
        channel_axis=-1 if noisy.ndim == 3 else None,
    )
    return np.asarray(out, dtype=out_dtype)


BASELINES = {"bm3d": bm3d_denoise, "nlm": nlm_denoise}
