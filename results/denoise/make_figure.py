#!/usr/bin/env python
"""Side-by-side crops of one image from ``eval_denoise.py --save-images`` output.

    python results/denoise/make_figure.py --images out/denoise_images --dataset urban10 --sigma 25 \
        --image img_021.png --box 300 200 256 --methods noisy bm3d dncnn-s25 n3net-s25 clean \
        --out results/denoise/urban10_crop.png

``--box ROW COL SIZE`` is the crop; each panel's title gives the method and the PSNR of the
whole image (from the saved 8-bit outputs, so within about 0.01 dB of the JSON).
"""
import argparse
from pathlib import Path

import numpy as np

from n3images.io import read_image
from n3images.metrics import psnr


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--sigma", default="25")
    p.add_argument("--image", required=True, help="file name as saved (NAME.png)")
    p.add_argument("--box", type=int, nargs=3, metavar=("ROW", "COL", "SIZE"), required=True)
    p.add_argument("--methods", nargs="+", required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = args.images / args.dataset / f"s{args.sigma}"
    clean = read_image(root / "clean" / args.image, "gray")
    r, c, s = args.box
    fig, axes = plt.subplots(1, len(args.methods), figsize=(3 * len(args.methods), 3.3))
    for ax, method in zip(np.atleast_1d(axes), args.methods):
        img = read_image(root / method / args.image, "gray")
        ax.imshow(img[r:r + s, c:c + s], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        title = method if method == "clean" else f"{method}\n{psnr(img, clean):.2f} dB"
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle(f"{args.dataset}/{args.image}, sigma {args.sigma}, crop {s}x{s} at ({r}, {c})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
