"""The README's super-resolution table from eval_sr.py JSON files.

    python results/sr/table.py results/sr/sr_x*.json
    python results/sr/table.py results/sr/sr_x*.json --wins vdsr-x234 n3net-sr-x234   # per-image comparison

``--wins A B``: for every set and scale where both methods were evaluated (their files may
differ), the mean PSNR difference B - A and on how many images B is above A.
"""
import argparse
import json

import numpy as np

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("json", nargs="+")
p.add_argument("--wins", nargs=2, metavar=("A", "B"), help="compare method B with method A image by image")
args = p.parse_args()

rows: dict = {}  # (dataset, scale) -> method -> (psnr, ssim)
per_image: dict = {}  # (dataset, scale) -> method -> [psnr per image]
for path in args.json:
    d = json.load(open(path))
    for ds, entry in d["datasets"].items():
        for scale, res in entry["scale"].items():
            for method, m in res["methods"].items():
                rows.setdefault((ds, int(scale)), {})[method.split("@")[0]] = (m["psnr"], m["ssim"])
                per_image.setdefault((ds, int(scale)), {})[method.split("@")[0]] = res["per_image"][method]
methods = []
for r in rows.values():
    methods += [m for m in r if m not in methods]
print("| set | scale | " + " | ".join(methods) + " |")
print("|---|---:|" + "---:|" * len(methods))
for (ds, scale), r in sorted(rows.items()):
    cells = [f"{r[m][0]:.2f} / {r[m][1]:.4f}" if m in r else "" for m in methods]
    print(f"| {ds} | x{scale} | " + " | ".join(cells) + " |")
if args.wins:
    a, b = args.wins
    print(f"\n| set | scale | {b} - {a} (dB) | images where {b} is above |")
    print("|---|---:|---:|---:|")
    for (ds, scale), r in sorted(per_image.items()):
        if a in r and b in r:
            pa, pb = np.asarray(r[a], dtype=float), np.asarray(r[b], dtype=float)
            print(f"| {ds} | x{scale} | {np.mean(pb) - np.mean(pa):+.2f} | {int((pb > pa).sum())} of {len(pa)} |")
