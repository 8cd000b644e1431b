"""Validation mAP20 (weighted eight-point, no RANSAC) per epoch of the Strecha training runs.

    python results/training/plot_curves.py   # reads results/training/*.csv, writes val_map20.png

The CSVs are the runs' log.csv files (pipelines/train_corr.py); the dashed line is RANSAC on all
matches on the same validation pairs (results/strecha_val.json). The side-information runs are
two pieces: ``*_side_first20.csv`` (epochs 1-20, from the val_history of the 20-epoch weight
files) and ``*_side_long.csv`` (the ``--init`` continuation, logged from 1, plotted from 21).
The refinement-stage runs ``*_refine.csv`` continue the 100-epoch coordinate models with
``--init --refine-stage`` and are plotted from epoch 101.
"""
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS = {"n3net_a_long": "N3Net, essential weight 0.1", "cnnet_a_long": "CNNet, essential weight 0.1",
        "n3net_a_ess1": "N3Net, essential weight 1.0", "cnnet_a_ess1": "CNNet, essential weight 1.0",
        "n3net_side": "N3Net + ratio/mutual", "cnnet_side": "CNNet + ratio/mutual",
        "n3net_refine": "N3Net + refinement stage (from epoch 100)",
        "cnnet_refine": "CNNet + refinement stage (from epoch 100)"}


def read_run(run: str) -> list[tuple[int, float]]:
    """(epoch, mAP20) of a run; the side runs join their first 20 epochs and the continuation."""
    if run.endswith("_side"):
        parts = [(f"{run}_first20", 0), (f"{run}_long", 20)]
    else:
        parts = [(run, 100 if run.endswith("_refine") else 0)]
    points = []
    for name, offset in parts:
        path = HERE / f"{name}.csv"
        if path.is_file():
            with open(path) as f:
                points += [(int(r["epoch"]) + offset, float(r["mAP20"])) for r in csv.DictReader(f)]
    return points


def main():
    fig, ax = plt.subplots(figsize=(7, 4))
    for run, label in RUNS.items():
        points = read_run(run)
        if not points:
            continue
        style = {"long": "-", "side": "--", "refine": "-"}.get(run.rpartition("_")[2], ":")
        ax.plot([e for e, _ in points], [m for _, m in points], label=label,
                color="C0" if run.startswith("n3net") else "C1", ls=style, lw=1.0 if run.endswith("side") else (2.5 if run.endswith("refine") else 1.5))
    val = json.loads((HERE.parent / "strecha_val.json").read_text())["methods"]
    for name, ls in (("ransac", (0, (1, 3))), ("ratio+magsac", "-.")):
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
