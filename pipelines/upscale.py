#!/usr/bin/env python
"""Upscale one image file with a trained super-resolution model.

    python pipelines/upscale.py photo.png photo_x3.png --scale 3 --weights n3net-sr-x234-ft2
    python pipelines/upscale.py scan.tif scan_x2.tif --scale 2 --weights runs/vdsr/vdsr.pt --tile 256

Any size, grey or colour, 8/16-bit PNG or TIFF, JPEG, BMP (``read_image(IN, "auto")``; an alpha
channel is dropped). The image is converted to YCbCr (BT.601, MATLAB's ``rgb2ycbcr``); every
channel is upscaled by MATLAB's bicubic ``imresize``; Y then goes through the model, in tiles of
``--tile`` pixels (same result as one pass, bounded memory); back to RGB
(:func:`n3images.sr.upscale_image`). ``--weights bicubic`` gives plain bicubic upscaling.

The output (``write_image``, atomic) has the bit depth of the input for PNG / TIFF output (16 for
a float TIFF input) and 8 bits for JPEG, unless ``--bit-depth`` says otherwise. The input is never
overwritten, and an existing OUT only with ``--overwrite``. Bad input: one line on stderr naming
it, exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


from n3images import programs
from n3images.programs import pick_device, read_input_image
from n3images.sr import upscale_image
from n3sets.cli import UsageError, errors_exit
from n3sets.training import set_threads
from n3sets.pretrained import weights_name

PROGRAM = "upscale.py"
MAX_OUTPUT_PIXELS = 400_000_000  # beyond this the float64 YCbCr planes alone need > 10 GB


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN", help="image to upscale (PNG, JPEG, TIFF, BMP; 8 or 16 bit; grey or colour)")
    p.add_argument("output", metavar="OUT", help="upscaled image to write (.png, .tif, .tiff, .jpg, .jpeg)")
    p.add_argument("--scale", type=int, required=True, help="upscaling factor (an integer >= 2)")
    p.add_argument("--weights", required=True, metavar="NAME_OR_PATH",
                   help="super-resolution model: a shipped name (n3images.available_models()), a weight file, or 'bicubic'")
    programs.add_image_output_arguments(p, "tile side in output pixels")
    args = p.parse_args(argv)
    if args.scale < 2:
        p.error(f"--scale {args.scale}: must be an integer >= 2")
    if args.tile < 1:
        p.error("--tile must be >= 1")
    return args


def scale_note(name: str, meta: dict, scale: int) -> str | None:
    """A warning when the model was not trained for ``scale`` (None when it was, or does not say)."""
    trained = meta.get("scales")
    if isinstance(trained, list) and trained and scale not in trained:
        return (f"warning: model {name} was trained for x{', x'.join(map(str, trained))}, not x{scale}; "
                "the result may be poor")
    return None


def run(args) -> dict:
    set_threads(args.threads)
    inp, out = Path(args.input), Path(args.output)
    image, in_depth = read_input_image(inp, out, args.overwrite, args.bit_depth)
    h, w = image.shape[:2]
    if h * w * args.scale ** 2 > MAX_OUTPUT_PIXELS:
        raise UsageError(f"IN {inp}: {w}x{h} upscaled x{args.scale} is {w * args.scale}x{h * args.scale}, more than "
                         f"{MAX_OUTPUT_PIXELS // 1_000_000} megapixels; crop it first")
    device = pick_device(args.device)
    message = None
    if args.weights == "bicubic":
        model, name = None, "bicubic"
    else:
        model = programs.load_image_model(args.weights, task="super-resolution")[0].to(device).eval()
        name = weights_name(args.weights)
        message = scale_note(name, getattr(model, "meta", {}) or {}, args.scale)
        if message:
            print(f"{PROGRAM}: {message}", file=sys.stderr)

    bit_depth = programs.output_bit_depth(out, args.bit_depth, in_depth)
    progress = programs.TileProgress(not args.quiet and model is not None, "upscaling")
    t0 = time.perf_counter()
    result = upscale_image(model, image, args.scale, tile=args.tile, device=device, progress=progress)
    elapsed = time.perf_counter() - t0
    written = programs.write_output(out, result, bit_depth, inp)

    kind = "grey" if image.ndim == 2 else "RGB"
    H, W = result.shape[:2]
    print(f"{inp} ({w}x{h} {kind}, {in_depth}-bit) upscaled x{args.scale} with {name} on {device} in {elapsed:.2f} s "
          f"-> {written} ({W}x{H}, {bit_depth}-bit)")
    return {"input": str(inp), "output": str(written), "width": w, "height": h, "out_width": W, "out_height": H,
            "scale": args.scale, "channels": 1 if image.ndim == 2 else 3, "input_bit_depth": in_depth,
            "bit_depth": bit_depth, "seconds": elapsed, "weights": name, "device": str(device), "warning": message}


def main(argv=None) -> dict:
    args = parse_args(argv)
    with errors_exit(PROGRAM):
        return run(args)


if __name__ == "__main__":
    main()
