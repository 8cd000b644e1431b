"""The README's super-resolution table from eval_sr.py JSON files.

    python results/sr/table.py results/sr/sr_x*.json
"""
import json
import sys

rows: dict = {}  # (dataset, scale) -> method -> (psnr, ssim)
for path in sys.argv[1:]:
    d = json.load(open(path))
    for ds, entry in d["datasets"].items():
        for scale, res in entry["scale"].items():
            for method, m in res["methods"].items():
                rows.setdefault((ds, int(scale)), {})[method.split("@")[0]] = (m["psnr"], m["ssim"])
methods = []
for r in rows.values():
    methods += [m for m in r if m not in methods]
print("| set | scale | " + " | ".join(methods) + " |")
print("|---|---:|" + "---:|" * len(methods))
for (ds, scale), r in sorted(rows.items()):
    cells = [f"{r[m][0]:.2f} / {r[m][1]:.4f}" if m in r else "" for m in methods]
    print(f"| {ds} | x{scale} | " + " | ".join(cells) + " |")
