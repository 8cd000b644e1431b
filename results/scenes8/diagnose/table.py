"""The "what limits the pose without RANSAC" table of results/scenes8/README.md from diagnose_corr.py JSONs.

    python results/scenes8/diagnose/table.py results/scenes8/diagnose/val_herz.json results/scenes8/diagnose/loso_*.json
"""
import json
import sys
from pathlib import Path

COLS = [("", "weights"), ("|hartley", "Hartley"), ("|inliers", "outliers zeroed")]
print("| scene | model | outlier weight (median) | mAP@20: weights | Hartley | outliers zeroed | labels | labels, Hartley |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for path in sys.argv[1:]:
    d = json.load(open(path))
    m = d["methods"]
    scene = Path(path).stem.replace("loso_", "").replace("val_herz", "Herz-Jesus-P25 (val)")
    models = [k for k in m if "|" not in k and k != "labels"]
    for name in models:
        cells = [f"{m[name]['outlier_weight_share_median']:.2f}"] + [f"{m[name + s]['mAP20']:.3f}" for s, _ in COLS]
        cells += [f"{m['labels']['mAP20']:.3f}", f"{m['labels|hartley']['mAP20']:.3f}"]
        print(f"| {scene} | {name} | " + " | ".join(cells) + " |")
