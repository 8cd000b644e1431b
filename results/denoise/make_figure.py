#!/usr/bin/env python
"""Side-by-side crops of one image from ``eval_denoise.py`` / ``eval_sr.py --save-images`` output.

    python results/denoise/make_figure.py --images out/denoise_images --dataset urban10 --sigma 25 \
        --image img_021.png --box 300 200 256 --methods noisy bm3d dncnn-s25 n3net-s25 clean \
        --out results/denoise/urban10_crop.png
    python results/denoise/make_figure.py --images out/sr_images --dataset urban10 --scale 4 \
        --image img_001.png --box 200 300 160 --methods bicubic vdsr-x234 n3net-sr-x234 hr \
        --out results/sr/urban10_crop.png

``--box ROW COL SIZE`` is the crop. Each panel's title gives the method and the PSNR of the
whole image against the reference panel (``clean`` for denoising, ``hr`` for super-resolution),
computed from the saved 8-bit outputs: denoising on the image, super-resolution on the Y channel
with ``scale`` pixels shaved (as ``eval_sr.py``); within about 0.01 dB of the JSON.
"""
import argparse
from pathlib import Path

import numpy as np

from n3images.io import read_image
from n3images.metrics import psnr, shave
from n3images.sr import to_luma

REFERENCES = ("clean", "hr")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--dataset", required=True)
    level = p.add_mutually_exclusive_group()
    level.add_argument("--sigma", help="denoising: the noise level folder s<SIGMA> (default 25)")
    level.add_argument("--scale", type=int, help="super-resolution: the scale folder x<SCALE>")
    p.add_argument("--image", required=True, help="file name as saved (NAME.png)")
    p.add_argument("--box", type=int, nargs=3, metavar=("ROW", "COL", "SIZE"), required=True)
    p.add_argument("--methods", nargs="+", required=True, help="method folders, the reference (clean / hr) among them")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sr = args.scale is not None
    root = args.images / args.dataset / (f"x{args.scale}" if sr else f"s{args.sigma or 25}")
    ref_name = "hr" if sr else "clean"
    mode = "auto" if sr else "gray"
    ref = read_image(root / ref_name / args.image, mode)

    def score(img):
        if not sr:
            return psnr(img, ref)
        return psnr(shave(to_luma(img, quantize=True), args.scale), shave(to_luma(ref, quantize=True), args.scale))

    r, c, s = args.box
    fig, axes = plt.subplots(1, len(args.methods), figsize=(3 * len(args.methods), 3.3))
    for ax, method in zip(np.atleast_1d(axes), args.methods):
        img = read_image(root / method / args.image, mode)
        crop = img[r:r + s, c:c + s]
        ax.imshow(crop, cmap="gray" if crop.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(method if method in REFERENCES else f"{method}\n{score(img):.2f} dB", fontsize=10)
        ax.axis("off")
    level_text = f"x{args.scale}" if sr else f"sigma {args.sigma or 25}"
    fig.suptitle(f"{args.dataset}/{args.image}, {level_text}, crop {s}x{s} at ({r}, {c})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
