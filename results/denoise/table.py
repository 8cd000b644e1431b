#!/usr/bin/env python
"""Markdown table of PSNR / SSIM per dataset from one or more ``eval_denoise.py`` JSON files.

    python results/denoise/table.py results/denoise/gaussian_s25_*.json --sigma 25 \
        --methods noisy nlm bm3d dncnn-s25 n3net-s25

Rows are methods, columns ``dataset PSNR / SSIM`` (``dataset level`` with several levels) in the
order they first appear; a method missing for a column is left blank. Every number is read from the JSON files as written.
"""
import argparse
import json
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--sigma", nargs="+", default=["25"],
                   help="noise level keys (Gaussian sigma, or 'a=..,b=..' for hetero); several: one column each")
    p.add_argument("--methods", nargs="+", help="row order (default: every method found)")
    args = p.parse_args(argv)
    scores, columns, methods = {}, [], []
    for f in args.files:
        d = json.loads(f.read_text())
        for ds, entry in d["datasets"].items():
            levels = entry.get("sigma") or entry.get("noise_level") or {}
            for level in args.sigma:
                if level not in levels:
                    continue
                col = ds if len(args.sigma) == 1 else f"{ds} {level}"
                if col not in columns:
                    columns.append(col)
                for m, v in levels[level]["methods"].items():
                    scores[(m, col)] = v
                    if m not in methods:
                        methods.append(m)
    rows = args.methods or methods
    print("| method | " + " | ".join(f"{c} PSNR / SSIM" for c in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for m in rows:
        cells = [f"{scores[(m, c)]['psnr']:.2f} / {scores[(m, c)]['ssim']:.4f}" if (m, c) in scores else ""
                 for c in columns]
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
