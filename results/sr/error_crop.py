#!/usr/bin/env python
"""Crop of one image's super-resolution by two models with their absolute errors (x5) below.

    python results/sr/error_crop.py --image ../shared/data/images/urban10/img_081.png --scale 2 \
        --box 832 256 128 --out results/sr/x2_ghost_edges_img081.png

Top row: ground truth, ``--weights`` outputs (whole-image Y PSNR in the titles, the protocol of
``eval_sr.py``; untiled, CPU); bottom row: bicubic input, then each output's absolute error
times 5 on the same crop.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

import n3images
from n3images.io import read_image
from n3images.sr import degrade, prepare_ground_truth, sr_scores, super_resolve


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", required=True)
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--weights", nargs="+", default=["vdsr-x234", "n3net-sr-x234"])
    p.add_argument("--box", type=int, nargs=3, metavar=("ROW", "COL", "SIZE"), required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    hr = prepare_ground_truth(read_image(a.image, "rgb"), a.scale)
    _, bic = degrade(hr, a.scale)
    outs = {"bicubic": bic}
    with torch.no_grad():
        for name in a.weights:
            outs[name] = super_resolve(n3images.load_model(name), bic, tile=None, scale=a.scale)
    psnrs = {k: sr_scores(v, hr, a.scale)[0] for k, v in outs.items()}
    r, c, s = a.box

    def crop(x):
        return np.clip(x, 0, 1)[r:r + s, c:c + s]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(a.weights) + 1
    fig, ax = plt.subplots(2, n, figsize=(3 * n, 6.4))
    ax[0, 0].imshow(crop(hr), cmap="gray", vmin=0, vmax=1)
    ax[0, 0].set_title("ground truth")
    ax[1, 0].imshow(crop(bic), cmap="gray", vmin=0, vmax=1)
    ax[1, 0].set_title(f"bicubic\n{psnrs['bicubic']:.2f} dB")
    for i, name in enumerate(a.weights, 1):
        ax[0, i].imshow(crop(outs[name]), cmap="gray", vmin=0, vmax=1)
        ax[0, i].set_title(f"{name}\n{psnrs[name]:.2f} dB")
        ax[1, i].imshow(np.clip(5 * np.abs(crop(outs[name]) - crop(hr)), 0, 1), cmap="gray", vmin=0, vmax=1)
        ax[1, i].set_title(f"|{name} - truth| x 5")
    for x in ax.ravel():
        x.axis("off")
    fig.suptitle(f"{a.image.split('/')[-1]}, x{a.scale}, crop {s}x{s} at ({r}, {c})")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}; whole-image Y PSNR: " + ", ".join(f"{k} {v:.2f} dB" for k, v in psnrs.items()))


if __name__ == "__main__":
    main()
