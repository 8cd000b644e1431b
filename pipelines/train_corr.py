#!/usr/bin/env python
"""Train a correspondence classifier (CNNet or N3Net) and report validation mAP.

With no arguments it runs the embedded default: a small synthetic dataset is written to
``runs/train_corr_default/data`` (once), a small N3Net is trained on it for a few epochs and the
validation mAP is printed -- the whole loop in a few minutes on a CPU.

Real data::

    python pipelines/train_corr.py --train data_out/strecha_train.h5 --val data_out/strecha_val.h5 \
        --model n3net --out runs/n3net --epochs 20 --max-matches 1000 --export n3net-strecha

Every epoch: training with a progress bar, validation (the network's pose as ``eval_corr.py``
computes it, ``n3sets.twoview.pose_from_logits``, ``mAP5/10/20``; precision,
recall, F1 at logit 0), ``last.pt`` and (when val mAP20 improves, ties broken by mAP10 then
mAP5 and by the lower validation loss) ``best.pt`` written atomically, ``log.csv``, ``log.json``
and ``curves.png`` in ``--out``. ``--resume`` continues from ``last.pt`` exactly (model,
optimizer, epoch, step, RNG state; data order and subsampling depend on (seed, epoch) only).
``--export NAME`` writes the best checkpoint as a shippable weight file (model conf + weights +
meta) to ``n3sets/weights/NAME.pt``, or to NAME itself when it is a path.

Runs unchanged under ``torchrun --nproc_per_node=2`` (DistributedDataParallel, gloo on CPU,
DistributedSampler; validation is split across ranks and gathered; only rank 0 writes). Under
``torchrun --max-restarts=K`` with ``--resume``, a crashed process restarts the group from the
last epoch's checkpoint and the run ends as if uninterrupted.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from data_prep.corr_dataset import CorrespondenceDataset, collate_sets  # noqa: E402
from n3sets.geometry import essential_from_pose  # noqa: E402
from n3sets.losses import CorrespondenceLoss, balanced_bce, essential_loss  # noqa: E402
from n3sets.metrics import classification_metrics, mean_average_precision  # noqa: E402
from n3sets.models import CNNet  # noqa: E402
from n3sets.pose import pose_error  # noqa: E402
from n3sets.twoview import pose_from_logits  # noqa: E402
from n3sets.pretrained import WEIGHTS_DIR, model_classes, save_model  # noqa: E402
from n3sets.training import (all_reduce_sums, atomic_torch_save, barrier, check_out_dir,  # noqa: E402
                             command_line, dist_setup, dist_teardown, export_target, gather_lists,
                             load_checkpoint, progress_bar, rng_state, save_figure_atomic, scheduled_lr,
                             seed_all, set_rng_state, torch_threads, write_logs)
from n3sets.cli import UsageError, add_threads_argument, check_writable_folder, one_line  # noqa: E402

PROGRAM = "train_corr.py"

MODELS = model_classes("correspondence")  # {"cnnet": CNNet, "n3net": N3Net}, from the one registry

# The embedded default (no --train): small synthetic data and a small N3Net, a few minutes on CPU.
DEFAULT_RUN = {
    "out": "runs/train_corr_default",
    "train_pairs": 160,
    "val_pairs": 48,
    "num_matches": (150, 300),
    "outlier_ratio": 0.5,
    "epochs": 12,
    "batch_size": 8,
    "essential_after": 120,  # steps: the essential loss is what makes the eight-point pose good
    "model_conf": {"channels": 32, "num_blocks": 4, "n3_after": 2, "k": 3, "embed_channels": 16},
}
CSV_FIELDS = ["epoch", "step", "lr", "train_loss", "train_cls", "train_ess", "val_loss", "val_cls", "val_ess",
              "mAP5", "mAP10", "mAP20", "precision", "recall", "f1", "epoch_time_s", "train_time_s"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train", type=Path, help="training h5 (data_prep schema); omit for the synthetic default")
    p.add_argument("--val", type=Path, help="validation h5")
    p.add_argument("--manifest", type=Path,
                   help="instead of --train/--val: a JSON manifest of per-scene h5 files (data_prep/manifest.py); "
                        "training draws pairs balanced over scenes, validation is its 'val' scenes")
    p.add_argument("--model", choices=sorted(MODELS), default="n3net")
    p.add_argument("--out", type=Path, help="output folder (default runs/train_corr_default without --train)")
    p.add_argument("--side-info", action="store_true", help="add Lowe ratio and mutual flag as input channels")
    p.add_argument("--epochs", type=int, help="epochs (default 20, or 12 for the synthetic default)")
    p.add_argument("--batch-size", type=int, help="pairs per step (per process under torchrun); default 16 (8 for the synthetic default)")
    p.add_argument("--val-batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-decay-epochs", type=int, nargs="+", default=[], metavar="EPOCH",
                   help="step schedule: multiply --lr by --lr-decay from each of these (1-based, absolute) epochs on; "
                        "absolute epochs, so a --resume continues the same schedule")
    p.add_argument("--lr-decay", type=float, default=0.3, help="factor per --lr-decay-epochs milestone")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip-grad-norm", type=float, default=0.0,
                   help="clip the total gradient norm to this (0: off); the essential loss gives rare large gradients")
    p.add_argument("--max-matches", type=int, default=1000,
                   help="random subset of matches per training pair (0 = all); validation uses all matches")
    p.add_argument("--augment-swap", type=float, default=0.0, metavar="P",
                   help="training augmentation: exchange the two views with probability P")
    p.add_argument("--augment-rotation", type=float, default=0.0, metavar="DEG",
                   help="training augmentation: rotate each camera about its centre by up to DEG degrees "
                        "(points, R and t transformed exactly; 0 = off)")
    p.add_argument("--init", metavar="WEIGHTS",
                   help="start from these weights (shipped name, weight file or train_corr checkpoint); "
                        "the model options must match; ignored when --resume finds OUT/last.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh even if OUT already holds a run (its checkpoints are replaced); without "
                        "it (and without --resume) such an OUT is refused, so that no run is lost")
    p.add_argument("--essential-after", type=int,
                   help="step after which the essential-matrix loss is added (-1 = never; Yi et al. 20000); "
                        "default -1 (120 for the synthetic default)")
    p.add_argument("--essential-weight", type=float, default=0.1)
    p.add_argument("--num-workers", type=int, default=0)
    add_threads_argument(p, per_process=True)
    p.add_argument("--thread-independent", action="store_true",
                   help="oneDNN off and MKL strict mode: the same numbers for --threads 1 and 2, at about 3x the time "
                        "of a training step of the default N3Net on a CPU (oneDNN's convolution backward is the "
                        "fast one); the embedded synthetic default always runs this way")
    # architecture (defaults are the paper's: 12 blocks, 128 channels, N3 block after the sixth)
    p.add_argument("--channels", type=int)
    p.add_argument("--blocks", type=int)
    p.add_argument("--k", type=int, help="N3Net: neighbours")
    p.add_argument("--n3-after", type=int, help="N3Net: residual blocks before the N3 block")
    p.add_argument("--embed-channels", type=int, help="N3Net: embedding width")
    p.add_argument("--refine-stage", action="store_true",
                   help="end in a residual refinement stage: a second network of the same kind fed the first "
                        "stage's weights and epipolar residuals (overrides for it: --model-conf "
                        "'{\"refine_stage\": {...}}'); with --init a one-stage model becomes the first stage")
    p.add_argument("--model-conf", type=json.loads, default={}, help="JSON dict of further model conf overrides")
    p.add_argument("--max-train-pairs", type=int, help="use only the first N training pairs (debugging)")
    p.add_argument("--max-val-pairs", type=int, help="use only the first N validation pairs (debugging)")
    p.add_argument("--export", help="write the best checkpoint as weight file NAME (n3sets/weights/NAME.pt) or PATH")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = p.parse_args(argv)
    if (args.train is None) != (args.val is None):
        p.error("--train and --val go together (or neither, for the synthetic default)")
    if args.manifest is not None and args.train is not None:
        p.error("--manifest replaces --train/--val; give one or the other")
    args.synthetic_default = args.train is None and args.manifest is None
    if args.synthetic_default:
        args.out = args.out or Path(DEFAULT_RUN["out"])
        args.epochs = args.epochs or DEFAULT_RUN["epochs"]
        args.batch_size = args.batch_size or DEFAULT_RUN["batch_size"]
        args.essential_after = DEFAULT_RUN["essential_after"] if args.essential_after is None else args.essential_after
    elif args.out is None:
        p.error("--out is required with --train or --manifest")
    args.epochs = 20 if args.epochs is None else args.epochs
    args.batch_size = 16 if args.batch_size is None else args.batch_size
    args.essential_after = -1 if args.essential_after is None else args.essential_after
    for name in ("batch_size", "val_batch_size", "epochs"):
        if getattr(args, name) < (0 if name == "epochs" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive")
    if any(m < 1 for m in args.lr_decay_epochs):
        p.error(f"--lr-decay-epochs takes 1-based epochs, got {args.lr_decay_epochs}")
    if args.clip_grad_norm < 0:
        p.error(f"--clip-grad-norm must be >= 0, got {args.clip_grad_norm}")
    if not 0 <= args.augment_swap <= 1:
        p.error(f"--augment-swap is a probability in [0, 1], got {args.augment_swap}")
    if not 0 <= args.augment_rotation <= 60:
        p.error(f"--augment-rotation must be in [0, 60] degrees, got {args.augment_rotation}")
    if not 0 < args.lr_decay <= 1:
        p.error(f"--lr-decay must be in (0, 1], got {args.lr_decay}")
    return args


# ----------------------------------------------------------------------------------------------
def model_conf_from_args(args) -> dict:
    conf = {"side_info": bool(args.side_info)}
    if args.synthetic_default:
        conf.update(DEFAULT_RUN["model_conf"])
        if args.model == "cnnet":
            conf = {k: v for k, v in conf.items() if k in CNNet.default_conf}
    for key, value in (("channels", args.channels), ("num_blocks", args.blocks), ("k", args.k),
                       ("n3_after", args.n3_after), ("embed_channels", args.embed_channels)):
        if value is not None:
            if key not in MODELS[args.model].default_conf:
                raise UsageError(f"--{key.replace('_', '-')} does not apply to --model {args.model}")
            conf[key] = value
    if args.refine_stage:
        conf["refine_stage"] = {}
    conf.update(args.model_conf)
    return conf


def prepare_default_data(out: Path, rank: int, world: int, seed: int) -> tuple[Path, Path]:
    """Write the synthetic train/val files of the embedded default once (rank 0)."""
    from data_prep.h5io import read_settings
    from data_prep.synthetic import write_synthetic_dataset

    data = out / "data"
    train, val = data / "synthetic_train.h5", data / "synthetic_val.h5"
    if rank == 0:
        data.mkdir(parents=True, exist_ok=True)
        kw = {"num_matches": DEFAULT_RUN["num_matches"], "outlier_ratio": DEFAULT_RUN["outlier_ratio"]}
        for path, num, s in ((train, DEFAULT_RUN["train_pairs"], seed), (val, DEFAULT_RUN["val_pairs"], seed + 10_000)):
            wanted = {"seed": s, "num_pairs": num, "num_matches": list(kw["num_matches"]),
                      "outlier_ratio": kw["outlier_ratio"]}
            # reuse a file from an earlier run only if it was made with the same settings
            if path.is_file():
                have = read_settings(path)
                if all(have.get(k) == v for k, v in wanted.items()):
                    continue
            write_synthetic_dataset(path, num, seed=s, **kw)
    barrier(world)
    return train, val


def split_batch(batch: dict):
    xs = batch["xs"]
    E_gt = essential_from_pose(batch["R"], batch["t"])
    return batch["x"], batch["mask"], batch["label"], xs[..., :2], xs[..., 2:], E_gt


@torch.no_grad()
def validate(model, loader, rank: int, world: int, progress: bool) -> dict:
    """Pose errors of the network's pose (n3sets.twoview.pose_from_logits), gathered over ranks."""
    model.eval()
    rows = []  # per pair: (error_deg, cls_loss, ess_loss, precision, recall, f1)
    it = progress_bar(loader, "val", leave=False, tty_interval=2, log_interval=30) if progress else loader
    for batch in it:
        x, mask, label, x1, x2, E_gt = split_batch(batch)
        logits = model(x, mask)
        # the same pose as eval_corr.py and MatchFilter (n3sets.twoview.pose_from_logits)
        E, R, t, ok = pose_from_logits(x1, x2, logits, mask)
        err = pose_error(R, t, batch["R"], batch["t"], ok)
        cls = classification_metrics(logits > 0, label, mask)
        for b in range(x.shape[0]):
            sl = slice(b, b + 1)
            rows.append((float(err[b]), float(balanced_bce(logits[sl], label[sl], mask[sl])),
                         float(essential_loss(E[sl], E_gt[sl])), float(cls["precision"][b]),
                         float(cls["recall"][b]), float(cls["f1"][b])))
    rows = gather_lists(rows, world)
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 6)
    out = mean_average_precision(torch.as_tensor(arr[:, 0]))
    out.update(val_cls=float(arr[:, 1].mean()), val_ess=float(arr[:, 2].mean()),
               precision=float(arr[:, 3].mean()), recall=float(arr[:, 4].mean()), f1=float(arr[:, 5].mean()),
               num_pairs=int(len(arr)))
    out["val_loss"] = out["val_cls"]
    return out


def better(metrics: dict, best: dict | None) -> bool:
    """Model selection: val mAP20, then mAP10, mAP5, then the lower classification loss."""
    if best is None:
        return True
    key = lambda m: (round(m["mAP20"], 9), round(m["mAP10"], 9), round(m["mAP5"], 9), -m["val_cls"])  # noqa: E731
    return key(metrics) > key(best)


def plot_curves(path: Path, history: list):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_cls"] for h in history], "o-", label="train BCE")
    a.plot(ep, [h["val_cls"] for h in history], "o-", label="val BCE")
    if any(h["train_ess"] for h in history):
        a.plot(ep, [h["val_ess"] for h in history], "o--", label="val essential loss")
    a.set_xlabel("epoch")
    a.set_title("losses")
    a.legend()
    for key in ("mAP5", "mAP10", "mAP20"):
        b.plot(ep, [h[key] for h in history], "o-", label=key)
    b.set_xlabel("epoch")
    b.set_ylim(0, 1)
    b.set_title("validation mAP")
    b.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=100)


def export_best(args, out: Path, command: str) -> Path:
    ckpt_path = out / "best.pt"
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"--export: no best checkpoint at {ckpt_path}")
    ckpt = load_checkpoint(ckpt_path)
    model = MODELS[ckpt["model_name"]](ckpt["model_conf"])
    model.load_state_dict(ckpt["model"])
    best = ckpt["best"]
    last_path = out / "last.pt"
    # totals of the whole run (the best checkpoint only knows the epochs up to itself)
    hist = load_checkpoint(last_path)["history"] if last_path.is_file() else ckpt["history"]
    meta = {
        "command": " && ".join(ckpt.get("commands", [ckpt.get("command", command)])),
        "export_command": command,
        "train_data": ckpt["data"]["train"],
        "val_data": ckpt["data"]["val"],
        "train_pairs": ckpt["data"]["train_pairs"],
        "val_pairs": ckpt["data"]["val_pairs"],
        "epochs": int(ckpt["epoch"]),
        "epochs_trained_total": int(hist[-1]["epoch"]) if hist else 0,
        "steps": int(ckpt["step"]),
        "world_size": int(ckpt.get("world_size", 1)),
        "val_mAP5": best["mAP5"], "val_mAP10": best["mAP10"], "val_mAP20": best["mAP20"],
        "val_f1": best["f1"],
        "train_time_s": float(hist[-1]["train_time_s"]) if hist else 0.0,  # training loops only
        "wall_time_s": float(sum(h["epoch_time_s"] for h in hist)),
        "train_time_to_best_s": float(ckpt["train_time_s"]),
        "selection": "best validation mAP20 (ties: mAP10, mAP5, lower val BCE)",
        "init": ckpt.get("init"),  # None, or the weights this run started from (--init) and how they were made
        "val_history": [{k: h[k] for k in ("epoch", "mAP5", "mAP10", "mAP20", "f1")} for h in hist],
        "torch": str(torch.__version__),
        "exported_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    target = export_target(args.export, WEIGHTS_DIR)
    save_model(target, model, **meta)
    return target


def init_weights(model, model_name: str, source: str) -> dict:
    """Load ``source`` (shipped name, weight file, or a checkpoint of this program) into ``model``.

    Returns what is known of how the source was trained (``source``, ``path``, ``command``,
    ``epochs``), kept in the checkpoints and the exported meta so a continued model says where it
    started.
    """
    from n3sets.pretrained import check_weight_payload, read_checkpoint, resolve_weights

    try:
        path = resolve_weights(source)
    except FileNotFoundError as exc:
        raise UsageError(f"--init {source}: {one_line(exc)}") from None
    try:
        raw = read_checkpoint(path)  # weights_only, numpy's RNG state arrays allowed
    except ValueError as exc:  # truncated, corrupt or another kind of file
        raise UsageError(f"--init {source}: cannot read {path} (truncated, corrupt, or neither a weight file nor "
                         f"a checkpoint: {one_line(exc.__cause__ or exc)})") from None
    if isinstance(raw, dict) and "model_name" in raw and "model" in raw:  # a train_corr checkpoint
        name, conf, state = raw["model_name"], raw["model_conf"], raw["model"]
        origin = {"command": " && ".join(raw.get("commands", [raw.get("command", "")])), "epochs": int(raw["epoch"])}
    else:
        try:
            w = check_weight_payload(raw, path)
        except ValueError as exc:
            raise UsageError(f"--init {source}: {one_line(exc)}") from None
        name, conf, state = w["class"].lower(), w["conf"], w["state_dict"]
        meta = w.get("meta", {})
        origin = {"command": meta.get("command", ""), "epochs": meta.get("epochs")}
    if name != model_name:
        raise UsageError(f"--init: {path} holds a {name}, not a {model_name}; use the same --model")
    conf = MODELS[name].resolve_conf(conf)  # a file from an older version lacks newer keys
    target = model.conf
    first_stage_only = conf["refine_stage"] is None and target["refine_stage"] is not None
    if first_stage_only:  # a one-stage model becomes the first stage; the refinement stage starts fresh
        target = {**target, "refine_stage": None}
    if conf != target:
        raise UsageError(f"--init: {path} holds {name} {conf}, not {model_name} {model.conf}; use the same model options")
    if first_stage_only:
        missing, unexpected = model.load_state_dict(state, strict=False)
        stray = [k for k in missing if not k.startswith("refine_stage.")] + list(unexpected)
        if stray:
            raise UsageError(f"--init: {path} does not fit the first stage of {model_name}: {stray[:5]}")
    else:
        model.load_state_dict(state)
    return {"source": str(source), "path": str(path), "first_stage_only": first_stage_only, **origin}


# ----------------------------------------------------------------------------------------------
def lr_at(args, epoch: int) -> float:
    """Learning rate of 1-based ``epoch``: --lr times --lr-decay per milestone in --lr-decay-epochs reached."""
    return scheduled_lr(args.lr, args.lr_decay, args.lr_decay_epochs, epoch)


def check_outputs(args) -> None:
    """UsageError, before anything is written, for an --out or --export that cannot be written."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    check_writable_folder(out, f"--out {out}")
    if args.export:
        target = export_target(args.export, WEIGHTS_DIR)
        if target.is_dir():
            raise UsageError(f"--export {args.export}: {target} is a folder; give a weight-file name")
        check_writable_folder(target.parent, f"--export {args.export}")


def open_sets(args) -> tuple[CorrespondenceDataset, CorrespondenceDataset]:
    """The training and validation sets, each file checked whole (UsageError naming the file and pair)."""
    max_matches = args.max_matches if args.max_matches and args.max_matches > 0 else None
    train_kw = {"max_matches": max_matches, "seed": args.seed, "augment_swap": args.augment_swap,
                "augment_rotation": args.augment_rotation}
    if args.manifest is not None:
        return open_manifest_sets_args(args, train_kw)
    sets = []
    for option, path, kw, limit, use in (("--train", args.train, train_kw, args.max_train_pairs, "train on"),
                                          ("--val", args.val, {}, args.max_val_pairs, "validate on")):
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"{option} {path}: no such file" if not path.exists() else f"{option} {path}: not a file")
        try:
            ds = CorrespondenceDataset(path, side_info=args.side_info, **kw)
        except ValueError as exc:  # truncated, not h5, another schema, NaN, ...: the message names file and pair
            raise UsageError(f"{option} {one_line(exc)}") from None
        if limit:
            ds.keys = ds.keys[:limit]
        if len(ds) == 0:
            raise UsageError(f"{option} {path}: holds no pairs to {use}")
        sets.append(ds)
    return sets[0], sets[1]


def open_manifest_sets_args(args, train_kw: dict):
    """--manifest: one CorrespondenceDataset per scene (seed offset per scene, so scenes subsample
    independently), concatenated; UsageError naming the manifest, the scene and the file."""
    from data_prep.manifest import open_manifest_sets, read_manifest

    try:
        manifest = read_manifest(args.manifest)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"--manifest {one_line(exc)}") from None
    sets = []
    for split, kw, limit in (("train", train_kw, args.max_train_pairs), ("val", {}, args.max_val_pairs)):
        def factory(entry, i, kw=kw, limit=limit):
            extra = dict(kw, seed=kw["seed"] + 100_003 * i) if "seed" in kw else kw
            ds = CorrespondenceDataset(entry.path, side_info=args.side_info, **extra)
            if limit:
                ds.keys = ds.keys[:limit]
            return ds
        try:
            sets.append(open_manifest_sets(manifest, split, factory))
        except (ValueError, FileNotFoundError) as exc:
            raise UsageError(f"--manifest {one_line(exc)}") from None
    args.manifest_sampling = manifest.sampling
    return sets[0], sets[1]


def thread_independent(args) -> bool:
    """oneDNN off (numbers independent of --threads) for the demo and when asked; real runs keep
    oneDNN, whose convolution backward is about 3x faster on one CPU thread."""
    return bool(args.thread_independent or args.synthetic_default)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        # threads (and oneDNN off when asked) for this run only: main() is also called in-process (tests, notebooks)
        with torch_threads(args.threads, thread_independent=thread_independent(args)):
            return run(args, argv)
    except SystemExit as exc:  # n3sets.training's checks (existing run, unreadable checkpoint) exit with a message
        if not isinstance(exc.code, str):
            raise
        print(f"{PROGRAM}: error: {one_line(exc.code)}", file=sys.stderr)
        raise SystemExit(2) from None
    except (UsageError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"{PROGRAM}: error: {one_line(exc)}", file=sys.stderr)
        raise SystemExit(2) from None


def run(args, argv=None) -> dict:
    rank, world = dist_setup(args.threads, thread_independent=thread_independent(args))
    command = command_line("pipelines/train_corr.py", argv, world)
    out: Path = args.out
    # the embedded default is a demo that may be rerun freely; a real run is never replaced silently
    check_out_dir(out, args.resume, args.overwrite, exempt=args.synthetic_default)
    check_outputs(args)
    if args.synthetic_default:
        args.train, args.val = prepare_default_data(out, rank, world, args.seed)
        if rank == 0:
            print(f"synthetic default: data in {args.train.parent}, output in {out}")

    seed_all(args.seed)

    # every input is checked before OUT is created: a bad input leaves no empty run folder behind
    train_set, val_set = open_sets(args)
    # one sampler in both modes: the order depends on (seed, epoch) only, so --resume is exact
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    if args.manifest is not None:  # pairs balanced over scenes, also a function of (seed, epoch) only
        from data_prep.manifest import SceneBalancedSampler, describe

        sampler = SceneBalancedSampler(train_set, mode=args.manifest_sampling, seed=args.seed, num_replicas=world, rank=rank)
        if rank == 0:
            print(f"--manifest {args.manifest} ({args.manifest_sampling} sampling): train scenes {describe(train_set, sampler)}; "
                  f"val scenes {describe(val_set)}")
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, collate_fn=collate_sets,
                              num_workers=args.num_workers, persistent_workers=False)
    val_loader = DataLoader(Subset(val_set, list(range(rank, len(val_set), world))), batch_size=args.val_batch_size,
                            shuffle=False, collate_fn=collate_sets, num_workers=args.num_workers)

    model_conf = model_conf_from_args(args)
    model = MODELS[args.model](model_conf)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    criterion = CorrespondenceLoss(essential_weight=args.essential_weight, essential_after=args.essential_after)

    start_epoch, step, history, best, best_train_time, init = 0, 0, [], None, 0.0, None
    commands = [command]  # every invocation that trained this run (a resume may change e.g. --essential-after)
    last_path, best_path = out / "last.pt", out / "best.pt"
    if args.resume and last_path.is_file():
        ckpt = load_checkpoint(last_path)  # written by this program
        if ckpt["model_name"] != args.model or MODELS[args.model].resolve_conf(ckpt["model_conf"]) != model.conf:
            raise UsageError(f"--resume: {last_path} holds {ckpt['model_name']} {ckpt['model_conf']}, "
                             f"not {args.model} {model.conf}; use the same model options")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        # the optimizer state carries the old learning rate; each epoch sets the scheduled one
        # from --lr and --lr-decay-epochs, so a resume may change it (e.g. once the essential loss is on)
        old_lr, new_lr = optimizer.param_groups[0]["lr"], lr_at(args, ckpt["epoch"] + 1)
        if old_lr != new_lr and rank == 0:
            print(f"--resume: learning rate {old_lr:g} -> {new_lr:g}")
        start_epoch, step, history, best = ckpt["epoch"], ckpt["step"], ckpt["history"], ckpt["best"]
        best_train_time = ckpt.get("best_train_time_s", 0.0)
        init = ckpt.get("init")
        commands = ckpt.get("commands", [ckpt["command"]])
        if start_epoch < args.epochs:
            commands = commands + [command]
        set_rng_state(ckpt["rng"])
        if rank == 0:
            print(f"resumed from {last_path}: epoch {start_epoch}, step {step}")
    else:
        if args.resume and rank == 0:
            print(f"--resume: no {last_path} yet, starting from scratch")
        if args.init:
            init = init_weights(model, args.model, args.init)
            if rank == 0:
                print(f"initialised from {args.init}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    progress = rank == 0 and not args.no_progress
    n_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"{type(model).__name__} ({n_params / 1e6:.3f} M parameters) {model.conf}")
        print(f"train: {args.train or args.manifest} ({len(train_set)} pairs), val: {args.val or args.manifest} ({len(val_set)} pairs), "
              f"processes: {world}, threads/process: {torch.get_num_threads()}")

    info = {"command": command, "commands": commands, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "model": args.model, "model_conf": model.conf, "parameters": n_params, "world_size": world}
    data_info = {"train": str(args.train), "val": str(args.val), "train_pairs": len(train_set), "val_pairs": len(val_set)}
    if args.manifest is not None:
        data_info.update(manifest=str(args.manifest), sampling=args.manifest_sampling, train_scenes=dict(zip(train_set.scenes, train_set.sizes)),
                         val_scenes=dict(zip(val_set.scenes, val_set.sizes)), pairs_per_epoch=int(sampler.quotas.sum()))
    train_time = history[-1]["train_time_s"] if history else 0.0

    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(args, epoch + 1)
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        net.train()
        sums = {"loss": 0.0, "cls": 0.0, "ess": 0.0, "n": 0}
        it = progress_bar(train_loader, f"epoch {epoch + 1}/{args.epochs}", tty_interval=1, log_interval=60) \
            if progress else train_loader
        for batch in it:
            x, mask, label, x1, x2, E_gt = split_batch(batch)
            logits = net(x, mask, return_stages=True)  # a list: a loss on every stage
            loss, parts = criterion(logits, label, mask, x1, x2, E_gt, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
            optimizer.step()
            step += 1
            sums["loss"] += float(loss.detach())
            sums["cls"] += parts["cls"]
            sums["ess"] += parts["ess"]
            sums["n"] += 1
            if progress:
                it.set_postfix(loss=f"{sums['loss'] / sums['n']:.4f}", ess="on" if criterion.essential_active(step) else "off",
                                refresh=False)
        train_time += time.time() - t0
        sums = all_reduce_sums(sums, world)  # average the logged training losses over processes
        metrics = validate(model, val_loader, rank, world, progress)
        n = max(sums["n"], 1)
        row = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": sums["loss"] / n, "train_cls": sums["cls"] / n,
               "train_ess": sums["ess"] / n if criterion.essential_active(step) else 0.0,
               **{k: metrics[k] for k in ("val_loss", "val_cls", "val_ess", "mAP5", "mAP10", "mAP20",
                                          "precision", "recall", "f1")},
               "epoch_time_s": time.time() - t0, "train_time_s": train_time}
        history.append(row)
        is_best = better(metrics, best)
        if is_best:
            best, best_train_time = {**metrics, "epoch": epoch + 1}, train_time
        if rank == 0:
            ckpt = {"model_name": args.model, "model_conf": model.conf, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "step": step, "history": history,
                    "best": best, "best_train_time_s": best_train_time, "train_time_s": train_time,
                    "command": command, "commands": commands, "data": data_info, "world_size": world, "args": info["args"],
                    "init": init,
                    "rng": rng_state()}
            atomic_torch_save(ckpt, last_path)
            if is_best:
                atomic_torch_save(ckpt, best_path)
            write_logs(out, history, {**info, "data": data_info, "best": best}, CSV_FIELDS, plot_curves)
            print(f"epoch {epoch + 1}/{args.epochs}: train loss {row['train_loss']:.4f}  val BCE {row['val_cls']:.4f}  "
                  f"mAP5 {row['mAP5']:.3f}  mAP10 {row['mAP10']:.3f}  mAP20 {row['mAP20']:.3f}  F1 {row['f1']:.3f}  "
                  f"({row['epoch_time_s']:.0f} s){'  *best*' if is_best else ''}", flush=True)
        barrier(world)

    summary = {"out": str(out), "best": best, "epochs": len(history)}
    if rank == 0:
        if best is not None:
            print(f"best epoch {best['epoch']}: val mAP5 {best['mAP5']:.3f}  mAP10 {best['mAP10']:.3f}  "
                  f"mAP20 {best['mAP20']:.3f}  ({best['num_pairs']} pairs); checkpoints in {out}")
        if args.export:
            target = export_best(args, out, command)
            summary["export"] = str(target)
            print(f"exported {best_path} -> {target} ({target.stat().st_size / 1e6:.2f} MB)")
    barrier(world)
    dist_teardown()
    return summary


if __name__ == "__main__":
    main()
