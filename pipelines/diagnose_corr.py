"""Where does the weighted eight-point pose of a correspondence model lose accuracy?

    python pipelines/diagnose_corr.py --data data_out/strecha_val.h5 --weights n3net-strecha cnnet-strecha \
        --json results/diagnose_val.json

For every pair it estimates E with the weighted eight-point algorithm (no RANSAC) from several
weightings, recovers the pose by the cheirality test and reports mAP5/10/20 (errors as in
``eval_corr.py``; a failed pair counts as 180 degrees):

- ``labels``: the ground-truth labels as 0/1 weights. The ceiling of any classifier with this
  estimator and these labels. ``labels|hartley``: the same with the Hartley-normalised solve.
- ``<model>``: the model's weights relu(tanh(logit)), exactly as ``eval_corr.py`` uses them.
- ``<model>|inliers``: the model's weights with every ground-truth outlier set to 0. The gap
  to ``<model>`` is what the weight the model leaves on outliers costs.
- ``<model>|binary``: the model's inlier mask (logit > 0) as 0/1 weights: what the graded weights
  add over the hard decision.
- ``<model>|hartley``: the model's weights with a weighted Hartley normalisation of the
  coordinates before the solve: how much of the error is the conditioning of the linear system
  rather than the weights.

Plus, per model, the share of the total weight that falls on ground-truth outliers (median and
mean over pairs). This is a diagnostic for the validation split: do not use it to choose settings
on a test scene.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from n3sets.cli import (UsageError, add_threads_argument, check_writable_folder, errors_exit, load_weights_arg, one_line,
                        write_json)
from n3sets.essential import logits_to_weights
from n3sets.evaluation import eight_point_pose, model_logits
from n3sets.metrics import mean_average_precision
from n3sets.pose import FAILED_POSE_ERROR, pose_error
from n3sets.pretrained import weights_name
from n3sets.training import torch_threads

PROGRAM = "diagnose_corr.py"


def eight_point_error(x1, x2, weights, mask, R_gt, t_gt, normalize: bool = False) -> float:
    """Pose error (degrees) of the weighted eight-point E as eval_corr.py computes it; 180 on failure."""
    R, t, ok = eight_point_pose(x1, x2, weights, mask, normalize=normalize)
    return float(pose_error(R, t, R_gt, t_gt)) if ok else FAILED_POSE_ERROR


def diagnose(dataset, models: dict, max_pairs: int | None = None) -> dict:
    errors: dict[str, list[float]] = {"labels": [], "labels|hartley": []}
    shares: dict[str, list[float]] = {name: [] for name in models}
    for name in models:
        for suffix in ("", "|inliers", "|binary", "|hartley"):
            errors[name + suffix] = []
    n = len(dataset) if max_pairs is None else min(max_pairs, len(dataset))
    for i in range(n):
        pair = dataset[i]
        xs = torch.as_tensor(pair["xs"]).double()
        x1, x2 = xs[:, :2], xs[:, 2:4]
        label = torch.as_tensor(pair["label"]).bool()
        R_gt, t_gt = torch.as_tensor(pair["R"]).double(), torch.as_tensor(pair["t"]).double().reshape(3)
        errors["labels"].append(eight_point_error(x1, x2, label.double(), label, R_gt, t_gt))
        errors["labels|hartley"].append(eight_point_error(x1, x2, label.double(), label, R_gt, t_gt, normalize=True))
        for name, model in models.items():
            logits = model_logits(model, pair).double()
            w, pred = logits_to_weights(logits), logits > 0
            errors[name].append(eight_point_error(x1, x2, w, pred, R_gt, t_gt))
            errors[name + "|inliers"].append(eight_point_error(x1, x2, w * label, pred & label, R_gt, t_gt))
            errors[name + "|binary"].append(eight_point_error(x1, x2, pred.double(), pred, R_gt, t_gt))
            errors[name + "|hartley"].append(eight_point_error(x1, x2, w, pred, R_gt, t_gt, normalize=True))
            total = float(w.sum())
            shares[name].append(float(w[~label].sum()) / total if total > 0 else float("nan"))
    methods = {}
    for name, errs in errors.items():
        e = torch.tensor(errs)
        methods[name] = {k: float(v) for k, v in mean_average_precision(e, (5, 10, 20)).items()}
        methods[name]["median_error_deg"] = float(e.median())
    for name, s in shares.items():
        s = torch.tensor(s)
        methods[name]["outlier_weight_share_median"] = float(s.nanmedian())
        methods[name]["outlier_weight_share_mean"] = float(s.nanmean())
    return {"methods": methods, "num_pairs": n}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="h5 dataset (data_prep schema)")
    p.add_argument("--weights", action="extend", nargs="+", required=True,
                   help="shipped model names or weight-file paths (--weights a b = --weights a --weights b)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--max-pairs", type=int, help="only the first N pairs")
    add_threads_argument(p, thread_independent=True)
    args = p.parse_args(argv)
    if args.max_pairs is not None and args.max_pairs < 1:
        p.error("--max-pairs must be >= 1")
    return args


def run(args, argv=None) -> dict:
    from data_prep.corr_dataset import CorrespondenceDataset

    if args.json:
        if args.json.is_dir():
            raise UsageError(f"--json {args.json} is a folder; give a file name")
        check_writable_folder(args.json.parent, f"--json {args.json}")
    if not args.data.is_file():
        raise UsageError(f"--data {args.data}: no such file" if not args.data.exists() else f"--data {args.data}: not a file")
    try:
        dataset = CorrespondenceDataset(args.data)
    except ValueError as exc:  # names the file (and pair)
        raise UsageError(f"--data {one_line(exc)}") from None
    if len(dataset) == 0:
        raise UsageError(f"--data {args.data}: holds no pairs to diagnose")
    models = {}
    for spec in args.weights:
        name = weights_name(spec)
        if name in models or name == "labels":
            raise UsageError(f"--weights: two models named {name!r} ({spec})" if name in models
                             else f"--weights {spec}: the name 'labels' is taken by the ground-truth weighting")
        models[name] = load_weights_arg(spec)[0].eval()
    # the pair dicts carry ratio/mutual: each model builds its own inputs (as in eval_corr.py)
    results = {"data": str(args.data), "weights": args.weights,
               "command": "python pipelines/diagnose_corr.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
               **diagnose(dataset, models, args.max_pairs)}
    print(f"{'weighting':38s} {'mAP5':>6s} {'mAP10':>6s} {'mAP20':>6s} {'median':>7s} {'outlier weight':>14s}")
    for name, m in results["methods"].items():
        share = m.get("outlier_weight_share_median")
        print(f"{name:38s} {m['mAP5']:6.3f} {m['mAP10']:6.3f} {m['mAP20']:6.3f} {m['median_error_deg']:7.2f} "
              f"{'' if share is None else f'{share:14.3f}'}")
    if args.json:
        write_json(args.json, results)
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    with errors_exit(PROGRAM):
        # threads and oneDNN off for this run only: main() is also called in-process (tests, notebooks)
        with torch_threads(args.threads, thread_independent=True):
            return run(args, argv)


if __name__ == "__main__":
    main()
