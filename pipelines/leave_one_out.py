#!/usr/bin/env python
"""Leave-one-scene-out evaluation of a correspondence model over the training scenes of a manifest.

    python pipelines/leave_one_out.py --manifest data_prep/manifests/scenes8.json --out runs/loso_n3net \\
        [--fold dinoRing --fold cyprus] [--eval-max-pairs 100] -- --model n3net --k 3 --epochs 6 ...
    python pipelines/leave_one_out.py --table runs/loso_n3net runs/loso_cnnet --json results/scenes8/loso.json

For every training scene ``S`` of the manifest (a *fold*; ``--fold`` picks some, so folds can run in
separate processes): write ``OUT/S/manifest.json`` with the other training scenes as ``train``,
the manifest's ``val`` scenes unchanged (model selection never sees ``S``) and ``S`` as ``test``;
train with ``pipelines/train_corr.py --manifest OUT/S/manifest.json --out OUT/S/run`` plus the
arguments after ``--``; then evaluate the selected checkpoint on ``S`` with
``pipelines/eval_corr.py`` (``<model>`` without RANSAC, ``<model>+ransac`` and the ``ransac``
baseline on all matches; ``--eval-max-pairs`` evaluates a seeded random subset of ``S``'s pairs,
the same subset for every model). A fold whose ``eval.json`` exists is skipped (rerun to resume;
``train_corr --resume`` continues an interrupted training).

``--table DIR [DIR ...]`` collects the folds of one or more runs into a per-scene table (mAP@20
without / with RANSAC) and writes it as JSON (``--json``) and Markdown (printed).
Bad input: one ``leave_one_out.py: error: ...`` line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from n3sets.cli import UsageError, check_writable_folder, one_line

PROGRAM = "leave_one_out.py"
HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", help="manifest whose training scenes are the folds (data_prep/manifest.py)")
    p.add_argument("--out", help="folder for the folds (one subfolder per held-out scene)")
    p.add_argument("--fold", action="append", default=[], help="run only this held-out scene (repeatable)")
    p.add_argument("--eval-max-pairs", type=int, default=None,
                   help="evaluate a seeded random subset of this many pairs of the held-out scene")
    p.add_argument("--eval-seed", type=int, default=0, help="estimator seed of eval_corr and subset seed (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the evaluation (default 1)")
    p.add_argument("--table", nargs="+", metavar="DIR", help="collect finished folds of these runs into a table")
    p.add_argument("--json", help="--table: write the table here")
    args = p.parse_args(argv)
    args.train_args = train_args
    if args.table is None and (args.manifest is None or args.out is None):
        p.error("--manifest and --out are required (or --table DIR ...)")
    for forbidden in ("--manifest", "--train", "--val", "--out", "--export"):
        if forbidden in train_args:
            raise UsageError(f"{forbidden} after '--' is set by {PROGRAM} per fold; remove it")
    return args


def fold_manifest(manifest, held_out: str) -> dict:
    """The manifest of one fold: the other training scenes, the same validation, ``held_out`` as test."""
    entries = {e.scene: e for e in manifest["train"]}
    def raw(e):
        return {"scene": e.scene, "path": str(e.path.resolve()), "weight": e.weight}

    return {"train": [raw(e) for s, e in entries.items() if s != held_out],
            "val": [raw(e) for e in manifest["val"]],
            "test": [raw(entries[held_out])],
            "sampling": manifest.sampling}


def _subset_file(h5: Path, n: int, seed: int, out: Path) -> Path:
    """A copy of ``n`` seeded random pairs of ``h5`` (all pairs when it has fewer)."""
    import h5py

    from data_prep.h5io import open_pairs, pair_keys

    with open_pairs(h5) as src:
        keys = pair_keys(src)
        if len(keys) <= n:
            return h5
        pick = sorted(np.random.default_rng(seed).choice(len(keys), size=n, replace=False))
        tmp = out.with_name(out.name + ".tmp")
        with h5py.File(tmp, "w") as dst:
            for k, v in src.attrs.items():
                dst.attrs[k] = v
            dst.attrs["num_pairs"] = n
            for i in pick:
                src.copy(src[keys[i]], dst, name=keys[i])
    tmp.replace(out)
    return out


def run_fold(args, manifest, scene: str) -> Path:
    fold = Path(args.out) / scene
    result = fold / "eval.json"
    if result.is_file():
        print(f"{scene}: done already ({result})", flush=True)
        return result
    fold.mkdir(parents=True, exist_ok=True)
    (fold / "manifest.json").write_text(json.dumps(fold_manifest(manifest, scene), indent=1))
    run = fold / "run"
    cmd = [sys.executable, str(HERE / "train_corr.py"), "--manifest", str(fold / "manifest.json"), "--out", str(run),
           *args.train_args]
    if (run / "last.pt").is_file() and "--resume" not in cmd:
        cmd.append("--resume")
    print(f"{scene}: training: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True)
    test = Path(fold_manifest(manifest, scene)["test"][0]["path"])
    if args.eval_max_pairs:
        test = _subset_file(test, args.eval_max_pairs, args.eval_seed, fold / f"test_subset{args.eval_max_pairs}.h5")
    cmd = [sys.executable, str(HERE / "eval_corr.py"), "--data", str(test), "--weights", str(run / "best.pt"),
           "--baselines", "ransac", "--seed", str(args.eval_seed), "--threads", str(args.threads), "--quiet",
           "--json", str(result)]
    print(f"{scene}: evaluating: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True)
    return result


def collect(dirs) -> dict:
    """``{"rows": [{"scene", "pairs", "ransac", "<run>", "<run>+ransac", ...}], "runs": [...]}`` (mAP@20)."""
    rows, runs = {}, []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise UsageError(f"--table {d}: not a folder")
        name = d.name
        runs.append(name)
        found = 0
        for ev in sorted(d.glob("*/eval.json")):
            res = json.loads(ev.read_text())
            scene = ev.parent.name
            methods = res["methods"]
            model = next(m for m in methods if m not in ("ransac", "magsac", "ratio+ransac", "ratio+magsac")
                         and not m.endswith("+ransac"))
            row = rows.setdefault(scene, {"scene": scene, "pairs": res["num_pairs"]})
            row["ransac"] = methods["ransac"]["mAP20"]
            row[name] = methods[model]["mAP20"]
            row[f"{name}+ransac"] = methods[f"{model}+ransac"]["mAP20"]
            found += 1
        if not found:
            raise UsageError(f"--table {d}: no finished fold (no */eval.json)")
    table = [rows[s] for s in sorted(rows)]
    mean = {"scene": "mean", "pairs": sum(r["pairs"] for r in table)}
    for key in ["ransac"] + [k for n in runs for k in (n, f"{n}+ransac")]:
        vals = [r[key] for r in table if key in r]
        if len(vals) == len(table):
            mean[key] = float(np.mean(vals))
    return {"runs": runs, "metric": "mAP20", "rows": table + [mean]}


def markdown(table: dict) -> str:
    cols = ["ransac"] + [k for n in table["runs"] for k in (n, f"{n}+ransac")]
    lines = ["| held-out scene | pairs | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for r in table["rows"]:
        lines.append(f"| {r['scene']} | {r['pairs']} | " + " | ".join(
            f"{r[c]:.3f}" if c in r else "" for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        if args.table:
            table = collect(args.table)
            if args.json:
                check_writable_folder(Path(args.json).parent, f"--json {args.json}")
                Path(args.json).write_text(json.dumps(table, indent=1))
            print(markdown(table))
            return 0
        from data_prep.manifest import read_manifest

        manifest = read_manifest(args.manifest)
        scenes = [e.scene for e in manifest["train"]]
        if len(scenes) < 2:
            raise UsageError(f"--manifest {args.manifest}: leave-one-out needs at least two training scenes, got {len(scenes)}")
        unknown = [s for s in args.fold if s not in scenes]
        if unknown:
            raise UsageError(f"--fold {unknown[0]}: not a training scene of {args.manifest} ({', '.join(scenes)})")
        check_writable_folder(Path(args.out), f"--out {args.out}")
        for scene in args.fold or scenes:
            run_fold(args, manifest, scene)
    except subprocess.CalledProcessError as exc:
        print(f"{PROGRAM}: error: {Path(exc.cmd[1]).name} failed with exit code {exc.returncode}", file=sys.stderr)
        return 2
    except (UsageError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"{PROGRAM}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
