#!/usr/bin/env python
"""Mean (and spread) over estimator seeds of eval_corr.py JSON files of the same data.

    python results/scenes8/table.py results/scenes8/entry_p10_seed0.json results/scenes8/entry_p10_seed1.json ...

Prints one Markdown row per method: mAP@5 / 10 / 20 averaged over the files that hold it (one
file per estimator seed and model is fine: baselines reused with ``--reuse-baselines`` appear in
each), the min-max of mAP@20 across them, the seeds, and F1 (which does not depend on the
estimator seed for the model rows). A method evaluated twice with the same seed is an error.
"""
import json
import sys

import numpy as np


def main(paths):
    runs = [json.load(open(p)) for p in paths]
    data = {r["data"] for r in runs}
    if len(data) != 1:
        sys.exit(f"table.py: the files evaluate different data: {sorted(data)}")
    methods: dict = {}
    for r in runs:
        for m, res in r["methods"].items():
            per_seed = methods.setdefault(m, {})
            if r["seed"] in per_seed:
                if per_seed[r["seed"]] != res:
                    sys.exit(f"table.py: {m} appears twice with seed {r['seed']} and different results")
                continue
            per_seed[r["seed"]] = res
    print(f"data {data.pop()}")
    print("| method | mAP@5 | mAP@10 | mAP@20 | mAP@20 min-max | seeds | F1 |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for m, per_seed in methods.items():
        rows = list(per_seed.values())
        mean = {k: float(np.mean([x[k] for x in rows])) for k in ("mAP5", "mAP10", "mAP20", "f1")}
        lo, hi = min(x["mAP20"] for x in rows), max(x["mAP20"] for x in rows)
        seeds = ",".join(str(s) for s in sorted(per_seed))
        print(f"| {m} | {mean['mAP5']:.3f} | {mean['mAP10']:.3f} | {mean['mAP20']:.3f} | {lo:.3f}-{hi:.3f} | {seeds} | {mean['f1']:.3f} |")

if __name__ == "__main__":
    main(sys.argv[1:])
