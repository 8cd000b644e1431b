"""Every noise model of the image experiments, in one place.

Images are floats in ``[0, 1]``; Gaussian noise levels ``sigma`` are on the 0-255 scale (as in
the papers: sigma 25 means a standard deviation of 25/255).

Gaussian benchmark protocol
---------------------------
For the ``i``-th test image in sorted file order (:func:`n3images.io.list_images`) the noise is
``torch.randn(shape, generator=torch.Generator().manual_seed(i)) * sigma / 255``, drawn on the CPU
in float32 and added without clipping (:func:`gaussian_noise`, :func:`add_gaussian_noise`). The
values depend only on the seed and the number of elements, not on the shape, dtype or device of
the image, so every method is evaluated on exactly the same noisy images.

Realistic (heteroscedastic) noise, paper Sec. 5.3
-------------------------------------------------
Clean sRGB/grey images are mapped towards raw intensities (grey, inverse tone curve ``x ** gamma``,
inverse exposure/white balance ``x * scale``; :func:`to_raw`) and corrupted with Gaussian noise of
variance ``a * x + b`` (shot + read noise, the noise level function of the Darmstadt Noise Dataset
and of Brooks et al., "Unprocessing images for learned raw denoising", CVPR 2019;
:func:`heteroscedastic_noise`). The sampling ranges are those of the authors' public
Poisson-Gaussian training code for N3Net (module constants below).
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "gaussian_noise",
    "add_gaussian_noise",
    "training_gaussian_noise",
    "GAMMA_RANGE",
    "SCALE_RANGE",
    "LOG10_A_RANGE",
    "LOG10_B_OFFSET",
    "LOG10_B_SPREAD",
    "GRAY_WEIGHTS",
    "sample_raw_params",
    "to_raw",
    "heteroscedastic_noise",
    "noise_std_map",
    "HETERO_EVAL_PAIRS",
    "HETERO_EVAL_GAMMA",
    "HETERO_EVAL_SCALES",
    "hetero_eval_target",
    "hetero_eval_noise",
]

# ---------------------------------------------------------------------------------------------
# Sampling ranges of the heteroscedastic model. They follow the N3Net authors' training code for
# the Poisson-Gaussian / Darmstadt experiment (grey images): a wide gamma range so that the network
# sees raw-like images from almost linear to very dark, exposure scales up to 4x darker, and shot
# noise levels over three decades with read noise tied to them.
# ---------------------------------------------------------------------------------------------

#: inverse tone curve ``x ** gamma``, gamma ~ U(GAMMA_RANGE); 2.2-2.5 is a typical sRGB curve,
#: larger values mimic dark raw captures.
GAMMA_RANGE = (1.25, 10.0)
#: inverse exposure / white-balance gain ``x * scale``, scale ~ U(SCALE_RANGE): raw images rarely
#: use the full range.
SCALE_RANGE = (0.25, 1.0)
#: shot-noise parameter a: log10(a) ~ U(LOG10_A_RANGE), i.e. a in [1e-4, 1e-1] (a = 1e-2 gives a
#: std of 0.05 at x = 0.25).
LOG10_A_RANGE = (-4.0, -1.0)
#: read-noise parameter b: log10(b) = log10(a) + LOG10_B_OFFSET + U(-LOG10_B_SPREAD, LOG10_B_SPREAD).
#: Real sensors have read noise correlated with shot noise (both grow with ISO); b ~ a / 200
#: up to a factor of 20 either way, as in the authors' code (Brooks et al. fit the same kind of
#: log-linear relation on real cameras).
LOG10_B_OFFSET = -2.3
LOG10_B_SPREAD = 1.3
#: luminance of sRGB input (ITU-R BT.601, as cv2.COLOR_RGB2GRAY and PIL's convert("L")).
GRAY_WEIGHTS = (0.299, 0.587, 0.114)

#: fixed (a, b) noise level functions for evaluation: low, medium (the authors' test setting),
#: high. Noise std at x = 0.25: about 0.016, 0.051, 0.11.
HETERO_EVAL_PAIRS = [(1e-3, 1e-5), (1e-2, 1e-4), (5e-2, 5e-4)]
#: evaluation raw mapping: a fixed sRGB-like gamma, and scale alternating with the image index
#: (the authors drew it from {0.5, 1}; alternating makes it deterministic).
HETERO_EVAL_GAMMA = 2.5
HETERO_EVAL_SCALES = (0.5, 1.0)


# ------------------------------------------------------------------------------- validation


def _check_float(value, name: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return value


def _check_index(index) -> int:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int (the image's position in sorted file order), got {index!r}")
    return int(index)


def _check_image(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor of shape (B, C, H, W) or (C, H, W), got {type(x).__name__}")
    if x.dim() not in (3, 4) or x.numel() == 0:
        raise ValueError(f"{name} must have shape (B, C, H, W) or (C, H, W) and be non-empty, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} of shape {tuple(x.shape)} must be floating point, got {x.dtype}")


def _per_sample(value, x: torch.Tensor, name: str, *, positive: bool = False) -> torch.Tensor:
    """A float or a ``(B,)`` tensor as a tensor broadcastable to ``x`` (``(B, 1, 1, 1)``)."""
    if not isinstance(value, torch.Tensor):
        return torch.tensor(_check_float(value, name, positive=positive), dtype=x.dtype, device=x.device)
    batch = x.shape[0] if x.dim() == 4 else None
    if value.dim() == 0 or (value.dim() == 1 and value.shape[0] == 1):
        v = value.reshape(())
    elif value.dim() == 1 and batch is not None and value.shape[0] == batch:
        v = value.reshape(batch, 1, 1, 1)
    else:
        expected = f"a float, a 0-d tensor or shape (B,) = ({batch},)" if batch is not None else "a float or a 0-d tensor"
        raise ValueError(f"{name} must be {expected} for an image of shape {tuple(x.shape)}, got {tuple(value.shape)}")
    if not v.is_floating_point() and v.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be real, got {v.dtype}")
    v = v.to(dtype=x.dtype, device=x.device)
    bad = ~torch.isfinite(v) | (v <= 0 if positive else v < 0)
    if bool(bad.any()):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value.tolist()}")
    return v


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(x)
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
    z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return z.to(x.device)


# --------------------------------------------------------------------------------- Gaussian


def gaussian_noise(shape: tuple[int, ...] | torch.Size, sigma: float, index: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The benchmark's Gaussian noise for the ``index``-th image (sorted file order).

    Exactly ``torch.randn(shape, generator=torch.Generator().manual_seed(index)) * sigma / 255``,
    computed in float32 on the CPU and then cast to ``dtype`` (so float64 gives the same values).

    Args:
        shape: any shape, e.g. ``(H, W)`` or ``(1, 1, H, W)``; the values depend only on the
            number of elements.
        sigma: standard deviation on the 0-255 scale, finite and ``>= 0``.
        index: non-negative int, the seed.
        dtype: floating dtype of the result.

    Returns:
        a CPU tensor of ``shape``.
    """
    sigma = _check_float(sigma, "sigma")
    index = _check_index(index)
    try:
        shape = torch.Size(shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of non-negative ints, got {shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must be a sequence of non-negative ints, got {tuple(shape)}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be floating point, got {dtype}")
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(index)) * sigma / 255
    return noise.to(dtype)


def add_gaussian_noise(img: np.ndarray | torch.Tensor, sigma: float, index: int) -> np.ndarray | torch.Tensor:
    """``img + gaussian_noise(img.shape, sigma, index)``, without clipping.

    Args:
        img: float image in ``[0, 1]``, a torch tensor (any device) or a numpy array, any shape
            (``(H, W)``, ``(H, W, C)``, ``(1, C, H, W)``, ...).
        sigma: standard deviation on the 0-255 scale.
        index: the image's position in sorted file order.

    Returns:
        the noisy image, same type, shape, dtype (and device) as ``img``.
    """
    if isinstance(img, np.ndarray):
        if not np.issubdtype(img.dtype, np.floating):
            raise ValueError(f"img of shape {img.shape} must be a float array in [0, 1], got {img.dtype}")
        noise = gaussian_noise(img.shape, sigma, index).numpy()
        return (img + noise).astype(img.dtype, copy=False)
    if not isinstance(img, torch.Tensor):
        raise ValueError(f"img must be a torch tensor or numpy array, got {type(img).__name__}")
    if not img.is_floating_point():
        raise ValueError(f"img of shape {tuple(img.shape)} must be a float tensor in [0, 1], got {img.dtype}")
    noise = gaussian_noise(img.shape, sigma, index)
    return img + noise.to(device=img.device, dtype=img.dtype)


def training_gaussian_noise(x: torch.Tensor, sigma, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fresh Gaussian noise for training: ``randn_like(x) * sigma / 255``.

    Args:
        x: images ``(B, C, H, W)`` or ``(C, H, W)`` (only shape, dtype and device are used).
        sigma: float, or a ``(B,)`` tensor of per-sample levels (0-255 scale).
        generator: optional generator (CPU or on ``x``'s device); the global RNG when None.

    Returns:
        noise of ``x``'s shape, dtype and device (add it yourself: ``x + noise``).
    """
    _check_image(x, "x")
    s = _per_sample(sigma, x, "sigma")
    return _randn_like(x, generator) * (s / 255)


# ------------------------------------------------------------------------- heteroscedastic


def sample_raw_params(generator: torch.Generator | None = None, batch_size: int | None = None) -> dict:
    """Draw the raw-mapping and noise-level-function parameters (ranges: module constants).

    Args:
        generator: optional CPU generator; the global RNG when None.
        batch_size: None for one set of floats, or B for ``(B,)`` float32 tensors (per sample).

    Returns:
        ``{"gamma", "scale", "a", "b"}``: gamma ~ U(GAMMA_RANGE), scale ~ U(SCALE_RANGE),
        log10 a ~ U(LOG10_A_RANGE), log10 b = log10 a + LOG10_B_OFFSET + U(+-LOG10_B_SPREAD).
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or a positive int, got {batch_size!r}")
    n = 1 if batch_size is None else batch_size
    u = torch.rand((4, n), generator=generator, dtype=torch.float64)

    def lerp(t, lo, hi):
        return lo + (hi - lo) * t

    log_a = lerp(u[2], *LOG10_A_RANGE)
    params = {
        "gamma": lerp(u[0], *GAMMA_RANGE),
        "scale": lerp(u[1], *SCALE_RANGE),
        "a": 10.0**log_a,
        "b": 10.0 ** (log_a + LOG10_B_OFFSET + lerp(u[3], -LOG10_B_SPREAD, LOG10_B_SPREAD)),
    }
    if batch_size is None:
        return {k: float(v[0]) for k, v in params.items()}
    return {k: v.float() for k, v in params.items()}


def to_raw(img: torch.Tensor, gamma, scale) -> torch.Tensor:
    """Map clean sRGB/grey images towards raw intensities: the clean target of the raw experiment.

    ``luminance(img) ** gamma * scale``: (a) colour is converted to grey with
    :data:`GRAY_WEIGHTS` (grey input stays), (b) the tone curve is undone by ``** gamma``, (c)
    exposure / white balance by ``* scale``.

    Args:
        img: ``(B, C, H, W)`` or ``(C, H, W)`` with C = 1 (grey) or 3 (RGB), values in ``[0, 1]``
            (negative values are clamped to 0 before the power).
        gamma: float or ``(B,)`` tensor, > 0.
        scale: float or ``(B,)`` tensor, > 0.

    Returns:
        ``(B, 1, H, W)`` or ``(1, H, W)``, same dtype and device.
    """
    _check_image(img, "img")
    channels = img.shape[-3]
    if channels not in (1, 3):
        raise ValueError(f"img must have 1 (grey) or 3 (RGB) channels in (B, C, H, W) / (C, H, W), got {tuple(img.shape)}")
    g = _per_sample(gamma, img, "gamma", positive=True)
    s = _per_sample(scale, img, "scale", positive=True)
    if channels == 3:
        w = torch.tensor(GRAY_WEIGHTS, dtype=img.dtype, device=img.device).view(3, 1, 1)
        img = (img * w).sum(-3, keepdim=True)
    # clamp: a fractional power of a negative number is NaN
    return img.clamp_min(0) ** g * s


def noise_std_map(x_raw: torch.Tensor, a, b) -> torch.Tensor:
    """Per-pixel noise standard deviation ``sqrt(a * max(x, 0) + b)`` (e.g. as a model input).

    Args:
        x_raw: ``(B, C, H, W)`` or ``(C, H, W)`` raw intensities.
        a, b: floats or ``(B,)`` tensors, >= 0 (shot and read noise variance parameters).

    Returns:
        tensor of ``x_raw``'s shape, dtype and device.
    """
    _check_image(x_raw, "x_raw")
    a = _per_sample(a, x_raw, "a")
    b = _per_sample(b, x_raw, "b")
    # the clean signal is never negative; clamping keeps the variance valid if x came noisy
    return (a * x_raw.clamp_min(0) + b).sqrt().expand_as(x_raw)


def heteroscedastic_noise(x_raw: torch.Tensor, a, b, generator: torch.Generator | None = None, clip: bool = False) -> torch.Tensor:
    """Noisy raw image ``x + sqrt(a * max(x, 0) + b) * n``, ``n ~ N(0, 1)`` i.i.d.

    Args:
        x_raw: clean raw intensities ``(B, C, H, W)`` or ``(C, H, W)`` (:func:`to_raw`).
        a, b: floats or ``(B,)`` tensors, >= 0.
        generator: optional generator (CPU or on ``x_raw``'s device); the global RNG when None.
        clip: clip the result to ``[0, 1]`` like a sensor does (the authors' training code
            clipped); off by default, which keeps the variance exactly ``a x + b``.

    Returns:
        the noisy image, ``x_raw``'s shape, dtype and device.
    """
    std = noise_std_map(x_raw, a, b)
    noisy = x_raw + std * _randn_like(x_raw, generator)
    return noisy.clamp(0, 1) if clip else noisy


def hetero_eval_target(img: torch.Tensor, index: int) -> torch.Tensor:
    """Deterministic evaluation raw target of the ``index``-th image: :func:`to_raw` with
    ``gamma = HETERO_EVAL_GAMMA`` and ``scale = HETERO_EVAL_SCALES[index % 2]``."""
    index = _check_index(index)
    return to_raw(img, HETERO_EVAL_GAMMA, HETERO_EVAL_SCALES[index % len(HETERO_EVAL_SCALES)])


def hetero_eval_noise(img_raw: torch.Tensor, a: float, b: float, index: int) -> torch.Tensor:
    """Deterministic noisy evaluation image: like :func:`heteroscedastic_noise` (no clipping), with
    the unit normal drawn as in the Gaussian protocol, ``torch.randn(shape,
    generator=torch.Generator().manual_seed(index))`` (CPU, float32), then moved to ``img_raw``.

    Args:
        img_raw: clean raw image ``(B, C, H, W)`` or ``(C, H, W)``.
        a, b: floats (one of :data:`HETERO_EVAL_PAIRS`), >= 0.
        index: the image's position in sorted file order.
    """
    _check_image(img_raw, "img_raw")
    a = _check_float(a, "a")
    b = _check_float(b, "b")
    index = _check_index(index)
    n = torch.randn(img_raw.shape, generator=torch.Generator().manual_seed(index))
    return img_raw + noise_std_map(img_raw, a, b) * n.to(device=img_raw.device, dtype=img_raw.dtype)
