#!/usr/bin/env python
"""Relative-pose evaluation of correspondence filters on an h5 dataset.

    python pipelines/eval_corr.py --data data_out/strecha_test.h5 \\
        --weights cnnet-strecha n3net-strecha --json results/strecha_test.json \\
        --png results/strecha_test.png

Methods: ``ransac``, ``magsac`` (all matches), ``ratio+ransac``, ``ratio+magsac`` (Lowe's ratio
test first) and, per model, ``<model>`` (weighted eight-point, no RANSAC) and
``<model>+ransac``. Metrics: mAP at 5/10/20 degrees (failures count as 180) and
precision / recall / F1 of the trusted matches. The evaluation itself is
:func:`n3sets.evaluation.evaluate_correspondences`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from n3sets.cli import (UsageError, add_threads_argument, check_writable_folder, errors_exit, load_weights_arg, one_line,
                        write_json)
from n3sets.evaluation import BASELINES, evaluate_correspondences
from n3sets.robust import DEFAULT_MAX_ITERS, DEFAULT_THRESHOLDS
from n3sets.training import torch_threads

PROGRAM = "eval_corr.py"

TABLE_COLUMNS = ("mAP5", "mAP10", "mAP20", "precision", "recall", "f1", "failures", "seconds_per_pair")
HEADERS = {"seconds_per_pair": "s/pair"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="correspondence h5 file (data_prep schema)")
    p.add_argument("--weights", action="extend", nargs="+", default=[], metavar="NAME_OR_PATH",
                   help="shipped model names (see n3sets.pretrained.available_models) or weight files; "
                        "--weights a b and --weights a --weights b are the same")
    p.add_argument("--json", help="write the results here (docs/architecture.md, Contracts)")
    p.add_argument("--png", help="write the accuracy-vs-threshold plot here")
    p.add_argument("--ratio", type=float, default=0.8, help="Lowe's ratio threshold (default 0.8)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLDS["ransac"],
                   help="RANSAC inlier threshold in normalized units (default %(default)g)")
    p.add_argument("--magsac-threshold", type=float, default=DEFAULT_THRESHOLDS["magsac"],
                   help="MAGSAC++ threshold (max noise scale) in normalized units (default %(default)g)")
    p.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=BASELINES,
                   help="baselines to run (default: all)")
    p.add_argument("--no-model-ransac", action="store_true", help="skip <model>+ransac")
    p.add_argument("--reuse-baselines", metavar="JSON",
                   help="take the baselines from an earlier --json of the same data and settings "
                        "instead of running them again (they do not depend on the weights)")
    p.add_argument("--max-pairs", type=int, default=None, help="evaluate only the first N pairs")
    p.add_argument("--seed", type=int, default=0, help="OpenCV RNG seed (default 0)")
    p.add_argument("--max-iters", type=int, default=DEFAULT_MAX_ITERS,
                   help="RANSAC / MAGSAC++ iteration cap (default %(default)s; Yi et al. / OANet used 1000)")
    add_threads_argument(p, thread_independent=True)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.max_pairs is not None and args.max_pairs < 1:
        p.error("--max-pairs must be >= 1")
    if args.max_iters < 1:
        p.error("--max-iters must be >= 1")
    if not 0 < args.ratio <= 1:
        p.error("--ratio must be in (0, 1]")
    for option in ("threshold", "magsac_threshold"):
        if not getattr(args, option) > 0:
            p.error(f"--{option.replace('_', '-')} must be > 0")
    return args


def format_table(methods: dict, columns=TABLE_COLUMNS) -> str:
    """Markdown table of the method metrics (missing values as '-')."""
    head = "| method | " + " | ".join(HEADERS.get(c, c) for c in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    rows = [head, rule]
    for name, metrics in methods.items():
        cells = [
            "-" if c not in metrics
            else str(metrics[c]) if isinstance(metrics[c], int)
            else f"{metrics[c]:.2f}" if c == "seconds_per_pair"
            else f"{metrics[c]:.3f}"
            for c in columns
        ]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def load_baselines(path, data: Path, args, num_pairs: int) -> dict:
    """Baseline results of an earlier run, checked to match this run's data and settings."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--reuse-baselines {path}: no such file")
    try:
        old = json.loads(path.read_text())
        if not isinstance(old, dict) or not isinstance(old.get("methods"), dict):
            raise ValueError("no 'methods' object in it")
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"--reuse-baselines {path}: not a result file of {PROGRAM} ({one_line(exc)})") from None
    expected = {
        "num_pairs": num_pairs,
        "ratio_threshold": args.ratio,
        "thresholds": {"ransac": args.threshold, "magsac": args.magsac_threshold},
        "seed": args.seed,
        "max_iters": args.max_iters,
    }
    for key, value in expected.items():
        if old.get(key) != value:
            raise UsageError(f"--reuse-baselines {path}: {key} is {old.get(key)!r}, this run uses {value!r}")
    if Path(str(old.get("data", ""))).resolve() != data.resolve():
        raise UsageError(f"--reuse-baselines {path}: made from {old.get('data')}, not {data}")
    names = [n for n in BASELINES if n in old["methods"]]
    if not names:
        raise UsageError(f"--reuse-baselines {path}: no baseline results in it")
    try:
        per_pair = sum(old["methods"][n]["seconds_per_pair"] for n in names)
        return {
            "methods": {n: old["methods"][n] for n in names},
            "errors": {n: old["errors"][n] for n in names},
            "curves": {"thresholds": old["curves"]["thresholds"], **{n: old["curves"][n] for n in names}},
            "pair_names": old["pair_names"],
            "seconds": per_pair * num_pairs,
        }
    except (KeyError, TypeError) as exc:
        raise UsageError(f"--reuse-baselines {path}: not a complete result file of {PROGRAM} "
                         f"(missing or malformed entry {exc})") from None


def plot_curves(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = dict(result["curves"])
    th = curves.pop("thresholds")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, acc in curves.items():
        style = "--" if name in BASELINES else "-"
        ax.plot(th, acc, style, label=f"{name} (mAP20 {result['methods'][name]['mAP20']:.3f})")
    ax.set_xlabel("pose error threshold (degrees)")
    ax.set_ylabel("fraction of pairs below threshold")
    ax.set_xlim(0, max(th))
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_output(option: str, value) -> Path:
    """An output file argument, checked before any work (UsageError naming it)."""
    path = Path(value)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name")
    check_writable_folder(path.parent, f"{option} {path}")
    return path


def open_data(data: Path):
    """The dataset of ``--data`` (UsageError naming the file, and the pair, when it is not usable)."""
    from data_prep.corr_dataset import CorrespondenceDataset

    if not data.is_file():
        raise UsageError(f"--data {data}: no such file" if not data.exists() else f"--data {data}: not a file")
    try:
        return CorrespondenceDataset(data, side_info=False)
    except ValueError as exc:  # names the file (and pair): truncated, not h5, another schema, NaN, ...
        raise UsageError(f"--data {one_line(exc)}") from None


def run(args, argv=None) -> dict:
    import torch

    from n3sets.pretrained import weights_name

    data = Path(args.data)
    for option in ("json", "png"):
        if getattr(args, option):
            check_output(f"--{option}", getattr(args, option))
    dataset = open_data(data)
    if len(dataset) == 0:
        raise UsageError(f"--data {data}: holds no pairs to evaluate")
    models, weight_files = {}, {}
    for spec in args.weights:
        name = weights_name(spec)
        if name in models:
            raise UsageError(f"--weights: two models named {name!r} ({spec})")
        if name in BASELINES:
            raise UsageError(f"--weights {spec}: the name {name!r} is a baseline's; rename the file")
        models[name], path = load_weights_arg(spec)
        weight_files[name] = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}

    if args.max_pairs is not None:
        dataset.keys = dataset.keys[: args.max_pairs]  # the file was checked whole: no second pass

    progress = None
    if not args.quiet:
        try:
            from tqdm import tqdm

            progress = lambda it: tqdm(it, total=len(dataset), desc="pairs", file=sys.stderr)  # noqa: E731
        except ImportError:
            pass

    reused = None
    if args.reuse_baselines:
        reused = load_baselines(args.reuse_baselines, data, args, len(dataset))
        args.baselines = []

    start = time.perf_counter()
    result = evaluate_correspondences(
        (dataset[i] for i in range(len(dataset))),
        models=models,
        baselines=args.baselines,
        ratio_threshold=args.ratio,
        thresholds={"ransac": args.threshold, "magsac": args.magsac_threshold},
        model_refine=not args.no_model_ransac,
        seed=args.seed,
        max_iters=args.max_iters,
        progress=progress,
    )
    elapsed = time.perf_counter() - start
    if reused is not None:
        if reused["pair_names"] != result["pair_names"]:
            raise UsageError(f"--reuse-baselines {args.reuse_baselines}: pairs differ from {data}")
        for key in ("methods", "errors", "curves"):
            result[key] = {**reused[key], **result[key]}
        elapsed += reused["seconds"]

    settings = result.pop("settings")
    out = {
        "methods": result["methods"],
        "data": str(data),
        "num_pairs": result["num_pairs"],
        "weights": weight_files,
        **settings,
        "seconds": elapsed,
        "baselines_from": args.reuse_baselines,
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
        "torch_threads": torch.get_num_threads(),
        "pair_names": result["pair_names"],
        "errors": result["errors"],
        "curves": result["curves"],
    }
    print(f"{data}: {result['num_pairs']} pairs, {elapsed:.1f} s "
          f"(RANSAC thr {args.threshold:g}, MAGSAC++ thr {args.magsac_threshold:g}, ratio {args.ratio:g}, "
          f"max iters {args.max_iters})")
    print(format_table(result["methods"]))
    if args.json:
        print(f"wrote {write_json(args.json, out)}")
    if args.png:
        plot_curves(result, Path(args.png), f"{data.name}: {result['num_pairs']} pairs")
        print(f"wrote {args.png}")
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    with errors_exit(PROGRAM):
        # threads and oneDNN off for this run only: main() is also called in-process (tests, notebooks)
        with torch_threads(args.threads, thread_independent=True):
            return run(args, argv)


if __name__ == "__main__":
    main()
