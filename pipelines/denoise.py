#!/usr/bin/env python
"""Denoise one image file with a trained image model.

    python pipelines/denoise.py photo.png photo_denoised.png --weights n3net-s25
    python pipelines/denoise.py scan.tif scan_clean.tif --weights runs/n3net_s50/n3net.pt --sigma 50 --tile 512

Any size, grey or colour, 8/16-bit PNG or TIFF, JPEG, BMP (read with
``n3images.io.read_image(IN, "auto")``; an alpha channel is dropped). A grey model denoises a
colour image channel by channel; a colour model given a grey image denoises it as three equal
channels and returns their mean. The image is processed in tiles of ``--tile`` pixels (same
result as one pass, bounded memory). A blind model assumes the noise it was trained for
(``--sigma`` is only checked against the model's); a non-blind model (``noise_input="level"``)
is told the level: ``--sigma S`` for white Gaussian noise or ``--noise-level A B`` for the
variance ``a * x + b`` of a raw-like image (a camera's noise-level function).

The output (``write_image``, atomic) has the bit depth of the input for PNG / TIFF output
(16 for a float TIFF input) and 8 bits for JPEG, unless ``--bit-depth`` says otherwise. The input
is never overwritten, and an existing OUT only with ``--overwrite``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np


from n3images import programs
from n3images.inference import denoise_image
from n3images.models import is_nonblind, noise_level_kwargs
from n3images.programs import pick_device, read_input_image
from n3sets.cli import UsageError, errors_exit
from n3sets.pretrained import weights_name
from n3sets.training import set_threads

PROGRAM = "denoise.py"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN", help="noisy image (PNG, JPEG, TIFF, BMP; 8 or 16 bit; grey or colour)")
    p.add_argument("output", metavar="OUT", help="denoised image to write (.png, .tif, .tiff, .jpg, .jpeg)")
    p.add_argument("--weights", required=True, metavar="NAME_OR_PATH",
                   help="image model: a shipped name (n3images.available_models()) or a weight file")
    p.add_argument("--sigma", type=float,
                   help="Gaussian noise level of the image (0-255 scale): told to a non-blind model (noise_input "
                        "'level'), only checked against a blind model's")
    p.add_argument("--noise-level", type=float, nargs=2, metavar=("A", "B"),
                   help="noise variance a * x + b of a raw-like image (x in [0, 1]; a: shot noise, b: read noise), "
                        "told to a non-blind model")
    programs.add_image_output_arguments(p)
    args = p.parse_args(argv)
    if args.tile < 1:
        p.error("--tile must be >= 1")
    if args.sigma is not None and not (math.isfinite(args.sigma) and 0 <= args.sigma <= 255):
        p.error(f"--sigma {args.sigma:g}: must be in [0, 255] (0-255 scale)")
    if args.noise_level is not None:
        if args.sigma is not None:
            p.error("give --sigma or --noise-level, not both")
        if not all(math.isfinite(v) and v >= 0 for v in args.noise_level) or not any(args.noise_level):
            p.error(f"--noise-level {' '.join(f'{v:g}' for v in args.noise_level)}: a and b must be finite, "
                    ">= 0 and not both 0")
    return args


def noise_kwargs(name: str, model, args) -> tuple[dict, str | None]:
    """``(model call keyword arguments, message)``: the noise level a non-blind model is told
    (UsageError when neither ``--sigma`` nor ``--noise-level`` gives it); a note when a blind
    model is given ``--noise-level``."""
    if not is_nonblind(model):
        note = (f"note: model {name} is blind (it estimates the noise itself); --noise-level not used"
                if args.noise_level is not None else None)
        return {}, note
    if args.noise_level is not None:
        return noise_level_kwargs(model, {"a": args.noise_level[0], "b": args.noise_level[1]}), None
    if args.sigma is not None:
        return noise_level_kwargs(model, {"sigma": args.sigma}), None
    raise UsageError(f"--weights {name}: a non-blind model (told the noise level): give --sigma S (Gaussian, "
                     "0-255 scale) or --noise-level A B (variance a * x + b)")


def sigma_warning(name: str, meta: dict, sigma: float | None) -> str | None:
    """A warning when ``--sigma`` does not match what the model was trained for, else None."""
    if sigma is None:
        return None
    noise, trained = meta.get("noise"), meta.get("sigma")
    if noise == "hetero":
        return (f"warning: model {name} is for heteroscedastic (raw-like) noise, not Gaussian noise of sigma {sigma:g}; "
                "the output may be poor")
    if isinstance(trained, (int, float)) and not isinstance(trained, bool) and trained != sigma:
        how = "over-smoothed" if trained > sigma else "still noisy"
        return (f"warning: model {name} is for sigma {trained:g}, but --sigma is {sigma:g}; "
                f"the result may be {how} (use a model trained for sigma {sigma:g} if there is one)")
    if trained is None:
        return f"note: model {name} does not record the noise level it was trained for; --sigma {sigma:g} not checked"
    return None


def TileProgress(enabled: bool) -> programs.TileProgress:
    """``progress(done, total)`` for denoise_image: tile counter on stderr."""
    return programs.TileProgress(enabled, "denoising")


def load_image_model(spec: str):
    """The denoiser of ``spec`` (UsageError naming it otherwise)."""
    return programs.load_image_model(spec, task="denoising")[0]


def run(args) -> dict:
    set_threads(args.threads)
    inp, out = Path(args.input), Path(args.output)
    image, in_depth = read_input_image(inp, out, args.overwrite, args.bit_depth)
    device = pick_device(args.device)
    model = load_image_model(args.weights)
    model = model.to(device).eval()
    name = weights_name(args.weights)
    kwargs, message = noise_kwargs(name, model, args)
    if not kwargs:  # a blind model: --sigma is only checked
        message = sigma_warning(name, getattr(model, "meta", {}) or {}, args.sigma) or message
    if message:
        print(f"{PROGRAM}: {message}", file=sys.stderr)

    bit_depth = programs.output_bit_depth(out, args.bit_depth, in_depth)
    grey_in = image.ndim == 2
    model_channels = model.conf.get("channels", 1)
    x = np.repeat(image[..., None], 3, axis=2) if (grey_in and model_channels == 3) else image

    progress = TileProgress(not args.quiet)
    t0 = time.perf_counter()
    result = denoise_image(model, x, tile=args.tile, device=device, progress=progress, **kwargs)
    elapsed = time.perf_counter() - t0
    if grey_in and result.ndim == 3:
        result = result.mean(axis=2)
    result = np.clip(result, 0.0, 1.0)
    written = programs.write_output(out, result, bit_depth, inp)

    h, w = image.shape[:2]
    kind = "grey" if grey_in else "RGB"
    print(f"{inp} ({w}x{h} {kind}, {in_depth}-bit) denoised with {name} on {device} in {elapsed:.2f} s "
          f"-> {written} ({bit_depth}-bit)")
    return {"input": str(inp), "output": str(written), "width": w, "height": h, "channels": 1 if grey_in else 3,
            "input_bit_depth": in_depth, "bit_depth": bit_depth, "seconds": elapsed, "weights": name,
            "device": str(device), "warning": message}


def main(argv=None) -> dict:
    args = parse_args(argv)
    with errors_exit(PROGRAM):
        return run(args)


if __name__ == "__main__":
    main()
