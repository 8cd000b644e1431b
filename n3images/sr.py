"""Single-image super-resolution: the degradation, the luma convention, scores and upscaling a photo.

Conventions (those of VDSR and of every published SR table):

* the ground truth is cropped to a multiple of the scale (:func:`n3images.metrics.modcrop`);
* the low-resolution image is the ground truth downscaled by MATLAB's bicubic ``imresize``
  (antialiased, :mod:`n3images.resize`), in float64, not quantised; the network input is that
  image upscaled back to the ground-truth size with the same kernel (:func:`degrade`);
* models work on the luma Y of ITU-R BT.601 (MATLAB's ``rgb2ycbcr``, values in
  ``[16, 235] / 255``); a grey image ``g`` is taken as the RGB image ``(g, g, g)``, i.e.
  ``Y = (16 + 219 g) / 255`` (:func:`to_luma`), so grey training images and colour test images
  share one intensity range;
* the ground-truth luma is quantised to 8 bits (``round(255 Y) / 255``: MATLAB's ``rgb2ycbcr`` on
  a uint8 image) and so is every output before scoring (clipped to ``[0, 1]``, rounded as when
  written to an 8-bit file); scores are PSNR and SSIM on Y with a border of ``scale`` pixels
  shaved (:func:`sr_scores`). With these conventions bicubic upscaling scores 33.66 / 30.39 /
  28.42 dB on Set5 at x2 / x3 / x4, the published values (without the two roundings: 33.69 /
  30.41 / 28.43);
* a colour photo is upscaled in YCbCr: Y through the network, Cb and Cr bicubic
  (:func:`upscale_image`).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .inference import DEFAULT_TILE, tiled_apply
from .metrics import modcrop, psnr, rgb_to_y, rgb_to_ycbcr, shave, ssim, ycbcr_to_rgb
from .resize import imresize, resize_batch

__all__ = ["SCALES", "check_scale", "to_luma", "from_luma", "downscale", "bicubic_up", "degrade", "degrade_batch",
           "quantize8", "sr_scores", "super_resolve", "upscale_image", "prepare_ground_truth", "validation_pairs",
           "calibrate_temperature", "DEFAULT_FACTORS"]

SCALES = (2, 3, 4)
_Y_LO, _Y_SPAN = 16.0 / 255.0, 219.0 / 255.0  # Y of black, and of white minus black


def check_scale(scale) -> int:
    """The scale as an int >= 2 (ValueError otherwise)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 2:
        raise ValueError(f"scale must be an integer >= 2, got {scale!r}")
    return int(scale)


def quantize8(x: np.ndarray) -> np.ndarray:
    """``round(255 x) / 255`` of ``x`` clipped to ``[0, 1]`` (8-bit levels), float64."""
    return np.rint(np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0) * 255.0) / 255.0


def to_luma(img: np.ndarray, quantize: bool = False) -> np.ndarray:
    """Y (BT.601, MATLAB) of an ``(H, W)`` grey or ``(H, W, 3)`` RGB image in ``[0, 1]``; float64 ``(H, W)``.

    ``quantize``: rounded to 8-bit levels, as MATLAB's ``rgb2ycbcr`` returns for a uint8 image.
    """
    img = np.asarray(img)
    if img.ndim == 2:
        y = _Y_LO + _Y_SPAN * img.astype(np.float64)
    elif img.ndim == 3 and img.shape[2] == 3:
        y = rgb_to_y(img.astype(np.float64))
    else:
        raise ValueError(f"to_luma: image must be (H, W) grey or (H, W, 3) RGB, got shape {img.shape}")
    return quantize8(y) if quantize else y


def from_luma(y: np.ndarray) -> np.ndarray:
    """The grey image whose :func:`to_luma` is ``y`` (``(255 y - 16) / 219``); not clipped."""
    return (np.asarray(y, dtype=np.float64) - _Y_LO) / _Y_SPAN


def downscale(hr: np.ndarray, scale: int) -> np.ndarray:
    """The low-resolution image ``imresize(hr, 1/scale)``, ``(H/scale, W/scale[, C])``, of an image
    ``(H, W[, C])`` whose sides are multiples of ``scale``; float64."""
    scale = check_scale(scale)
    h, w = hr.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f"image of size {w}x{h} is not a multiple of the scale {scale}; modcrop it first")
    if h < scale or w < scale:
        raise ValueError(f"image of size {w}x{h} is smaller than the scale {scale}")
    return imresize(hr, 1.0 / scale, output_shape=(h // scale, w // scale))


def bicubic_up(lr: np.ndarray, scale: int) -> np.ndarray:
    """``imresize(lr, scale)``: the bicubic upscaling (and the network input), float64."""
    scale = check_scale(scale)
    return imresize(lr, float(scale), output_shape=(lr.shape[0] * scale, lr.shape[1] * scale))


def degrade(hr: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """``(low-resolution image, network input)`` of a ground truth ``(H, W[, C])`` whose sides are multiples of ``scale``.

    The low-resolution image is :func:`downscale` (``(H/scale, W/scale)``); the input is
    :func:`bicubic_up` of it, the size of ``hr``. float64, not clipped.
    """
    lr = downscale(hr, scale)
    return lr, bicubic_up(lr, scale)


def degrade_batch(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """The network input (:func:`degrade`) of a batch ``(B, C, H, W)`` with sides multiples of ``scale``; same dtype."""
    scale = check_scale(scale)
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"degrade_batch: crops of size {w}x{h} are not a multiple of the scale {scale}")
    lr = resize_batch(hr, 1.0 / scale, output_shape=(h // scale, w // scale))
    return resize_batch(lr, float(scale), output_shape=(h, w))


def sr_scores(out_y, hr_y, scale: int, quantize: bool = True) -> tuple[float, float]:
    """``(PSNR dB, SSIM)`` of an output luma against the ground-truth luma: output clipped to
    ``[0, 1]`` and (``quantize``) rounded to 8-bit levels, ``scale`` pixels shaved from every side,
    data range 1."""
    scale = check_scale(scale)
    out = np.clip(np.asarray(out_y, dtype=np.float64), 0.0, 1.0)
    out = quantize8(out) if quantize else out
    ref = np.asarray(hr_y, dtype=np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"sr_scores: output {out.shape} and ground truth {ref.shape} differ in shape")
    out, ref = shave(out, scale), shave(ref, scale)
    return psnr(out, ref), ssim(out, ref)


def super_resolve(model: torch.nn.Module, bicubic_y: np.ndarray, tile: int | None = DEFAULT_TILE,
                  device: str | torch.device | None = None,
                  progress: Callable[[int, int], object] | None = None, scale: int | None = None) -> np.ndarray:
    """The model's high-resolution luma from the bicubic luma ``(H, W)``; float32 ``(H, W)``, not clipped.

    ``scale``: the upscaling factor of ``bicubic_y``, passed to the model (N3Net-SR uses its
    calibrated temperature at that scale, :class:`n3images.models.N3NetSR`); None: as trained.
    """
    arr = np.asarray(bicubic_y, dtype=np.float32)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"super_resolve: the luma must be a non-empty (H, W) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("super_resolve: the image holds NaN or infinite values")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(arr))[None, None].to(device)
    kwargs = {} if scale is None else {"scale": check_scale(scale)}
    return tiled_apply(model, x, tile, progress, **kwargs)[0, 0].cpu().numpy()


def upscale_image(model: torch.nn.Module | None, img: np.ndarray, scale: int, tile: int | None = DEFAULT_TILE,
                  device: str | torch.device | None = None,
                  progress: Callable[[int, int], object] | None = None) -> np.ndarray:
    """Upscale a user's image by ``scale``: ``(H, W)`` grey or ``(H, W, 3)`` RGB in ``[0, 1]`` ->
    ``(scale H, scale W[, 3])`` float64 in ``[0, 1]``.

    Y goes through ``model`` after bicubic upscaling; Cb and Cr are upscaled bicubically.
    ``model`` None: plain bicubic (the baseline).
    """
    scale = check_scale(scale)
    img = np.asarray(img)
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)) or img.size == 0:
        raise ValueError(f"upscale_image: image must be (H, W) grey or (H, W, 3) RGB, got shape {img.shape}")
    if not np.isfinite(img).all():
        raise ValueError("upscale_image: the image holds NaN or infinite values")
    ycc = rgb_to_ycbcr(img.astype(np.float64)) if img.ndim == 3 else to_luma(img)[..., None]
    up = bicubic_up(ycc, scale)  # every channel bicubic
    if model is not None:
        up[..., 0] = super_resolve(model, up[..., 0], tile, device, progress, scale=scale)
    out = ycbcr_to_rgb(up) if img.ndim == 3 else from_luma(up[..., 0])
    return np.clip(out, 0.0, 1.0)


def prepare_ground_truth(img: np.ndarray, scale: int) -> np.ndarray:
    """The evaluation ground truth of an image: its 8-bit luma, cropped to a multiple of ``scale``."""
    return to_luma(modcrop(np.asarray(img), check_scale(scale)), quantize=True)


def validation_pairs(luma_images, scales) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """``(network input float32, ground truth float64, scale)`` for every luma image and scale:
    the validation of ``train_sr.py`` (the ground truth cropped to a multiple of the scale)."""
    pairs = []
    for img in luma_images:
        for s in scales:
            hr = modcrop(np.asarray(img, dtype=np.float64), check_scale(s))
            pairs.append((degrade(hr, s)[1].astype(np.float32), hr, s))
    return pairs


#: temperature factors tried by :func:`calibrate_temperature` (1.0, the trained network, always is)
DEFAULT_FACTORS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0)


@torch.no_grad()
def calibrate_temperature(model: torch.nn.Module, luma_images, scales=SCALES, factors=DEFAULT_FACTORS,
                          device: str | torch.device | None = None,
                          progress: Callable[[str], object] | None = None, min_gain: float = 0.0) -> dict:
    """Choose, per scale, the factor on the N3 blocks' temperatures that maximises the mean
    validation PSNR (:func:`validation_pairs`, :func:`sr_scores`) of an N3Net-SR.

    Factors are absolute (they replace, not multiply, ``conf["scale_temperature"]``). Besides
    ``factors``, every scale tries 1 (the temperature CNNs' own output) and the model's current
    factor for that scale, so a model calibrated before, or trained with factors in its
    configuration, is measured as it is. A tie keeps the factor nearest to the current one (in
    ratio), and the current factor stays unless another beats it by at least ``min_gain`` dB (a
    few validation images do not resolve differences of a few hundredths of a dB). The model is
    left unchanged: the caller stores the result in ``conf["scale_temperature"]``.

    Returns ``{"factors": [...], "num_images": n, "min_gain": dB, "scales": {"2": {"psnr":
    {factor: dB}, "current": factor, "best": factor, "gain_db": best - current}, ...}}``.
    """
    table = getattr(model, "conf", {}).get("scale_temperature")
    if not isinstance(table, dict):
        raise ValueError(f"calibrate_temperature: {type(model).__name__} has no N3 block temperatures to calibrate "
                         "(an N3Net-SR model is needed)")
    factors = sorted({float(f) for f in factors} | {1.0})
    if any(not (np.isfinite(f) and f > 0) for f in factors):
        raise ValueError(f"calibrate_temperature: factors must be positive numbers, got {factors}")
    if not (np.isfinite(min_gain) and min_gain >= 0):
        raise ValueError(f"calibrate_temperature: min_gain must be a number >= 0, got {min_gain}")
    pairs = validation_pairs(luma_images, scales)
    if not pairs:
        raise ValueError("calibrate_temperature: no validation images")
    saved = dict(table)
    result = {"factors": factors, "num_images": len(pairs) // len(scales), "min_gain": min_gain, "scales": {}}
    try:
        for s in scales:
            key = str(check_scale(s))
            current = float(saved.get(key, 1.0))
            mean = {}
            for f in sorted(set(factors) | {current}):
                table[key] = f
                scores = [sr_scores(super_resolve(model, inp, tile=None, device=device, scale=s), hr, s)[0]
                          for inp, hr, sc in pairs if sc == s]
                mean[f] = float(np.mean(scores))
                if progress:
                    progress(f"x{s} factor {f:g}{' (current)' if f == current else ''}: {mean[f]:.3f} dB")
            best = max(mean, key=lambda f: (round(mean[f], 6), -abs(np.log(f / current))))
            if mean[best] - mean[current] < min_gain:
                best = current
            result["scales"][key] = {"psnr": {f"{f:g}": mean[f] for f in mean}, "current": current, "best": best,
                                     "gain_db": mean[best] - mean[current]}
    finally:
        table.clear()
        table.update(saved)
    return result
