"""Training-seed spread of the side-information scenes8 models: the shipped seed-0 runs against seed 1.

    python results/scenes8/seed1/table.py

entry-P10 mAP@20 is the mean over estimator seeds 0-2 (min-max in brackets); Herz-Jesus-P25 is the
validation scene (estimator seed 0). Files: ``results/scenes8/`` (seed 0, shipped) and
``results/scenes8/seed1/`` (seed 1, not shipped).
"""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
print("| model | training seed | entry-P10 alone | entry-P10 + RANSAC | Herz-Jesus-P25 alone | Herz-Jesus-P25 + RANSAC |")
print("|---|---:|---:|---:|---:|---:|")
for model in ("n3net", "cnnet"):
    for seed, folder, name in ((0, HERE.parent, f"{model}-scenes8-side"), (1, HERE, f"{model}-scenes8-side-seed1")):
        files = [folder / f"entry_p10_{name}_seed{s}.json" for s in range(3)]
        val = folder / f"val_herz_{name}.json"
        if not all(f.is_file() for f in files + [val]):
            continue
        cells = []
        for key in (name, f"{name}+ransac"):
            v = [json.loads(f.read_text())["methods"][key]["mAP20"] for f in files]
            cells.append(f"{sum(v) / 3:.3f} ({min(v):.3f}-{max(v):.3f})")
        vm = json.loads(val.read_text())["methods"]
        cells += [f"{vm[name]['mAP20']:.3f}", f"{vm[name + '+ransac']['mAP20']:.3f}"]
        print(f"| {model} | {seed} | " + " | ".join(cells) + " |")
