#!/usr/bin/env python
"""Markdown table of PSNR / SSIM per dataset from one or more ``eval_denoise.py`` JSON files.

    python results/denoise/table.py results/denoise/gaussian_s25_*.json --sigma 25 \
        --methods noisy nlm bm3d dncnn-s25 n3net-s25

Rows are methods, columns ``dataset PSNR / SSIM`` in the order the datasets first appear; a
method missing for a dataset is left blank. Every number is read from the JSON files as written.
"""
import argparse
import json
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--sigma", default="25", help="noise level key (Gaussian sigma, or 'a=..,b=..' for hetero)")
    p.add_argument("--methods", nargs="+", help="row order (default: every method found)")
    args = p.parse_args(argv)
    scores, datasets, methods = {}, [], []
    for f in args.files:
        d = json.loads(f.read_text())
        for ds, entry in d["datasets"].items():
            levels = entry.get("sigma") or entry.get("noise_level") or {}
            if args.sigma not in levels:
                continue
            if ds not in datasets:
                datasets.append(ds)
            for m, v in levels[args.sigma]["methods"].items():
                scores[(m, ds)] = v
                if m not in methods:
                    methods.append(m)
    rows = args.methods or methods
    print("| method | " + " | ".join(f"{ds} PSNR / SSIM" for ds in datasets) + " |")
    print("|---|" + "---:|" * len(datasets))
    for m in rows:
        cells = [f"{scores[(m, ds)]['psnr']:.2f} / {scores[(m, ds)]['ssim']:.4f}" if (m, ds) in scores else ""
                 for ds in datasets]
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
