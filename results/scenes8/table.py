#!/usr/bin/env python
"""Mean (and spread) over estimator seeds of eval_corr.py JSON files of the same data.

    python results/scenes8/table.py results/scenes8/entry_p10_seed0.json results/scenes8/entry_p10_seed1.json ...

Prints one Markdown row per method: mAP@5 / 10 / 20 averaged over the files, the min-max of
mAP@20 across them, and F1 (which does not depend on the estimator seed for the model rows).
"""
import json
import sys

import numpy as np


def main(paths):
    runs = [json.load(open(p)) for p in paths]
    data = {r["data"] for r in runs}
    if len(data) != 1:
        sys.exit(f"table.py: the files evaluate different data: {sorted(data)}")
    methods = []
    for r in runs:
        methods += [m for m in r["methods"] if m not in methods]
    seeds = [r["seed"] for r in runs]
    print(f"data {data.pop()}, estimator seeds {seeds}")
    print("| method | mAP@5 | mAP@10 | mAP@20 | mAP@20 min-max | F1 |")
    print("|---|---:|---:|---:|---:|---:|")
    for m in methods:
        rows = [r["methods"][m] for r in runs if m in r["methods"]]
        if len(rows) != len(runs):
            continue
        mean = {k: float(np.mean([x[k] for x in rows])) for k in ("mAP5", "mAP10", "mAP20", "f1")}
        lo, hi = min(x["mAP20"] for x in rows), max(x["mAP20"] for x in rows)
        print(f"| {m} | {mean['mAP5']:.3f} | {mean['mAP10']:.3f} | {mean['mAP20']:.3f} | {lo:.3f}-{hi:.3f} | {mean['f1']:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
