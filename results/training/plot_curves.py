"""Validation mAP20 (weighted eight-point, no RANSAC) per epoch of the Strecha training runs.

    python results/training/plot_curves.py   # reads results/training/*.csv, writes val_map20.png

The CSVs are the runs' log.csv files (pipelines/train_corr.py); the dashed line is RANSAC on all
matches on the same validation pairs (results/strecha_val.json).
"""
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS = {"n3net_a_long": "N3Net, essential weight 0.1", "cnnet_a_long": "CNNet, essential weight 0.1",
        "n3net_a_ess1": "N3Net, essential weight 1.0", "cnnet_a_ess1": "CNNet, essential weight 1.0"}


def main():
    fig, ax = plt.subplots(figsize=(7, 4))
    for run, label in RUNS.items():
        path = HERE / f"{run}.csv"
        if not path.is_file():
            continue
        with open(path) as f:
            rows = list(csv.DictReader(f))
        ax.plot([int(r["epoch"]) for r in rows], [float(r["mAP20"]) for r in rows], label=label,
                color="C0" if run.startswith("n3net") else "C1", ls="-" if run.endswith("long") else ":")
    val = json.loads((HERE.parent / "strecha_val.json").read_text())["methods"]
    for name, ls in (("ransac", "--"), ("ratio+magsac", "-.")):
        ax.axhline(val[name]["mAP20"], color="gray", ls=ls, label=f"{name} (all matches)" if name == "ransac" else name)
    ax.set_xlabel("epoch (45 steps of 16 pairs)")
    ax.set_ylabel("validation mAP@20")
    ax.set_title("Strecha validation pairs (115), pose without RANSAC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "val_map20.png", dpi=110)
    print(f"wrote {HERE / 'val_map20.png'}")


if __name__ == "__main__":
    main()
