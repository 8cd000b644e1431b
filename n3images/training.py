"""The training program of every image-restoration model (denoising and super-resolution), minus the task.

``pipelines/train_denoise.py`` and ``pipelines/train_sr.py`` describe their task with an
:class:`ImageTask` (how a training batch and the validation pairs are made from clean crops and
images, how an output is scored, what the exported weight file records) and call
:func:`run_training`, which does the rest once for both: arguments shared by the trainers,
torchrun / DDP and device set-up, the training/validation split, random crops
(:class:`n3images.data.CropDataset`), the optimiser (Adam, or SGD with momentum as VDSR) and
gradient clipping, the step learning-rate schedule, per-epoch validation, ``last.pt`` /
``best.pt`` checkpoints (atomic), ``log.csv`` / ``log.json`` / ``curves.png``, exact ``--resume``,
and ``--export`` of the best checkpoint as a weight file of :mod:`n3sets.pretrained`.

Every random choice is a function of ``(seed, epoch, index)``: crops in the dataset, the noise
or scale of a step from :func:`step_generator` / ``(seed, epoch, step)``; a resumed or
distributed run sees what an uninterrupted single-process run sees.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from n3sets.cli import add_threads_argument
from n3sets.models import merge_conf
from n3sets.pretrained import save_model
from n3sets.training import (all_reduce_sums, atomic_torch_save, barrier, check_out_dir, command_line, dist_setup,
                             dist_teardown, export_target, gather_lists, load_checkpoint, progress_bar, resolve_device,
                             rng_state, save_figure_atomic, scheduled_lr, seed_all, set_rng_state, write_logs)

from .data import CropDataset, load_images, split_train_val
from .io import list_images

__all__ = ["ImageTask", "add_common_arguments", "check_common_arguments", "model_conf_from_args", "step_generator",
           "read_init", "load_widened_state", "make_optimizer", "clip_gradients", "validate", "plot_curves",
           "export_best", "run_training", "BASE_CSV_FIELDS"]

BASE_CSV_FIELDS = ["epoch", "step", "lr", "train_loss", "train_psnr", "val_psnr", "val_ssim", "epoch_time_s",
                   "train_time_s"]
# run arguments an exact resume needs unchanged, on top of the task's (value of older runs: the default)
_RESUME_KEYS = {"crop": None, "batch_size": None, "samples_per_epoch": None, "seed": None, "optimizer": "adam",
                "init": None}


@dataclass
class ImageTask:
    """What makes a trainer a denoiser or a super-resolution trainer.

    Attributes:
        name: ``"denoising"`` / ``"super-resolution"`` (exported as ``meta["task"]``).
        program: ``pipelines/<name>.py``, for the recorded command lines.
        models: ``--model`` name -> model class.
        base_conf: ``args -> dict``: configuration every model gets (e.g. ``channels``).
        read_mode: ``args -> "gray" | "rgb"``: how training images are read.
        make_batch: ``(clean crops (B, C, h, w), args, gen, epoch, step) -> (input, target)`` or
            ``(input, target, model keyword arguments)`` (e.g. ``{"scale": 3}``);
            ``gen`` is this step's and process's CPU generator (:func:`step_generator`).
        validation_pairs: ``(images, args) -> [(input (1, C, H, W), target (1, C, H, W), tag)]``
            (fixed, a function of the images only); ``tag`` None or a group name for
            per-group validation PSNR (``val_psnr_<tag>``).
        score: ``(output (C, H, W), target (C, H, W), tag) -> (psnr, ssim)``.
        resume_keys: further arguments an exact ``--resume`` needs unchanged.
        describe: ``args -> str`` for the start-up line (noise level, scales, ...).
        export_meta: ``checkpoint -> dict`` of task-specific weight-file meta.
        prepare_images: ``(images, args) -> images`` applied after reading (default: as read).
        csv_fields: columns of ``log.csv``.
        train_label: legend of the training curve.
        model_kwargs: ``tag -> dict``: keyword arguments of the model call on a validation pair
            with this tag (default: none).
        call_kwargs: ``(model, kwargs) -> dict``: the keyword arguments of a model call from what
            ``make_batch`` / ``model_kwargs`` give, for tasks where they depend on the model
            (e.g. a blind denoiser is not told the noise level; default: as given).
    """

    name: str
    program: str
    models: dict
    base_conf: Callable
    read_mode: Callable
    make_batch: Callable
    validation_pairs: Callable
    score: Callable
    resume_keys: Sequence[str]
    describe: Callable
    export_meta: Callable
    prepare_images: Callable | None = None
    csv_fields: Sequence[str] = tuple(BASE_CSV_FIELDS)
    train_label: str = "train (crops)"
    model_kwargs: Callable | None = None
    call_kwargs: Callable | None = None


# ---------------------------------------------------------------------------------- arguments


def add_common_arguments(p: argparse.ArgumentParser, models: dict, *, default_model: str, epochs: int = 30,
                         samples_per_epoch: int = 3200, crop: int = 80, batch_size: int = 16, lr: float = 1e-3) -> None:
    """The arguments every image trainer takes (data, schedule, optimiser, run folder, processes, model size)."""
    p.add_argument("--model", choices=sorted(models), default=default_model)
    p.add_argument("--data", type=Path, required=True, help="folder of clean training images")
    p.add_argument("--val", type=Path, help="folder of clean validation images (default: the last --val-count of --data)")
    p.add_argument("--val-count", type=int, default=8, help="images of --data held out for validation (without --val)")
    p.add_argument("--out", type=Path, required=True, help="output folder (checkpoints and logs)")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--samples-per-epoch", type=int, default=samples_per_epoch,
                   help="random crops per epoch (all processes together)")
    p.add_argument("--crop", type=int, default=crop, help="crop side in pixels")
    p.add_argument("--batch-size", type=int, default=batch_size, help="crops per step (all processes together)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="adam, or sgd with --momentum and --weight-decay (VDSR's)")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--momentum", type=float, default=0.9, help="sgd momentum")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay (VDSR: 1e-4)")
    p.add_argument("--lr-decay-epochs", type=int, nargs="+", default=[], metavar="EPOCH",
                   help="multiply --lr by --lr-decay from each of these (1-based, absolute) epochs on")
    p.add_argument("--lr-decay", type=float, default=0.1)
    p.add_argument("--clip-grad-norm", type=float, default=0.0, help="clip the total gradient norm (0: off)")
    p.add_argument("--clip-grad-theta", type=float, default=0.0,
                   help="VDSR's adjustable clipping: clip every gradient value to [-theta/lr, theta/lr] (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if OUT already holds a run")
    add_threads_argument(p, per_process=True)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--depth", type=int, help="layers per stage (default: the model's)")
    p.add_argument("--features", type=int, help="feature channels (64)")
    p.add_argument("--k", type=int, help="n3net: neighbours per block (7)")
    p.add_argument("--stages", type=int, help="n3net: stages (3; 2 = the light variant)")
    p.add_argument("--model-conf", type=json.loads, default={}, help="JSON dict of further model configuration")
    p.add_argument("--export", help="write the best checkpoint as weight file NAME (n3images/weights/NAME.pt) or PATH")
    p.add_argument("--init", metavar="NAME_OR_PATH",
                   help="fine-tune: start from the weights of this model (shipped name, weight file or a run's "
                        "best.pt) instead of a random initialisation. Its configuration is the base of the new "
                        "model's (--depth ... and --model-conf change it); input channels the new configuration "
                        "adds (e.g. --model-conf '{\"scale_aware\": true}') start with zero weights, so training "
                        "starts from the same function")
    p.add_argument("--time-budget", type=float, default=0.0, metavar="SECONDS",
                   help="stop cleanly (checkpoint, logs, --export) after the first epoch whose end leaves less "
                        "than one more epoch (the slowest so far) inside SECONDS of this invocation; "
                        "--resume continues the schedule later (0: no limit)")
    p.add_argument("--no-progress", action="store_true")


def check_common_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``p.error`` (one line, exit 2) for values of the common arguments that cannot work."""
    for name in ("epochs", "samples_per_epoch", "crop", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not args.data.is_dir():
        p.error(f"--data {args.data}: not a folder")
    if args.val is not None and not args.val.is_dir():
        p.error(f"--val {args.val}: not a folder")
    if not (np.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be positive, got {args.lr}")
    if not 0 < args.lr_decay <= 1:
        p.error(f"--lr-decay must be in (0, 1], got {args.lr_decay}")
    for name in ("momentum", "weight_decay", "clip_grad_norm", "clip_grad_theta", "time_budget"):
        if not (np.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not isinstance(args.model_conf, dict):
        p.error(f"--model-conf must be a JSON object, got {args.model_conf!r}")


def model_conf_from_args(args, models: dict, base: dict) -> dict:
    """``base`` + the model-size arguments given + ``--model-conf``; SystemExit for one the model lacks."""
    conf = dict(base)
    for key in ("depth", "features", "k", "stages"):
        value = getattr(args, key)
        if value is not None:
            if key not in models[args.model].default_conf:
                raise SystemExit(f"--{key} does not apply to --model {args.model}")
            conf[key] = value
    conf.update(args.model_conf)
    return conf


def read_init(spec: str, models: dict, model_name: str) -> dict:
    """The weight-file dict of ``--init spec`` (:func:`n3sets.pretrained.read_weight_file`) plus
    ``sha256``; SystemExit naming the file when it cannot be read or holds another kind of model."""
    from n3sets.pretrained import read_weight_file

    from .programs import sha256

    try:
        payload = read_weight_file(spec)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"--init {spec}: {exc}")
    want = models[model_name].__name__
    if payload["class"] != want:
        raise SystemExit(f"--init {spec}: {payload['path']} holds a {payload['class']}, not the {want} of "
                         f"--model {model_name}")
    return {**payload, "sha256": sha256(Path(payload["path"]))}


def load_widened_state(model: torch.nn.Module, state: dict, where: str) -> list[str]:
    """Copy ``state`` into ``model``; a tensor the model has wider along dim 1 (the input channels of
    a convolution whose input gained channels) is copied into the first channels, the rest set to
    zero, so that the model computes what the stored one did. Returns the widened keys.

    Raises:
        ValueError: missing or unexpected keys, or any other shape difference; names ``where``.
    """
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{where} does not fit the model: missing {missing[:5] or 'none'}, "
                         f"unexpected {unexpected[:5] or 'none'}")
    widened, merged = [], {}
    for key, new in own.items():
        old = state[key]
        if tuple(old.shape) == tuple(new.shape):
            merged[key] = old
        elif (old.dim() == new.dim() >= 2 and old.shape[0] == new.shape[0] and old.shape[2:] == new.shape[2:]
              and old.shape[1] < new.shape[1]):
            value = torch.zeros_like(new)
            value[:, :old.shape[1]] = old
            merged[key] = value
            widened.append(key)
        else:
            raise ValueError(f"{where}: {key} has shape {tuple(old.shape)}, the model needs {tuple(new.shape)}")
    model.load_state_dict(merged)
    return widened


# ------------------------------------------------------------------------------ optimisation


def step_generator(seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
    """The CPU generator of one training step of one process: a function of (seed, epoch, step, rank) only."""
    return torch.Generator().manual_seed(((seed * 100_003 + epoch) * 1_000_003 + step) * 64 + rank)


def make_optimizer(params, args) -> torch.optim.Optimizer:
    """Adam (``--lr``, ``--weight-decay``) or SGD with ``--momentum`` and ``--weight-decay``."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)


def clip_gradients(params, args, lr: float) -> None:
    """``--clip-grad-theta`` (values to ``theta / lr``, VDSR) then ``--clip-grad-norm``; nothing when both are 0."""
    params = [p for p in params if p.grad is not None]
    if args.clip_grad_theta > 0:
        torch.nn.utils.clip_grad_value_(params, args.clip_grad_theta / lr)
    if args.clip_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, args.clip_grad_norm)


# -------------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(model, pairs, score: Callable, device, rank: int, world: int,
             model_kwargs: Callable | None = None, call_kwargs: Callable | None = None) -> dict:
    """Mean PSNR / SSIM over ``pairs`` (split over processes); ``val_psnr_<tag>`` per tag when tagged.
    ``model_kwargs(tag)``: keyword arguments of the model call (e.g. the SR scale), passed
    through ``call_kwargs(model, kwargs)`` when given (:class:`ImageTask`)."""
    model.eval()
    rows = []
    for j in range(rank, len(pairs), world):
        inp, target, tag = pairs[j]
        kwargs = model_kwargs(tag) if model_kwargs else {}
        if call_kwargs is not None:
            kwargs = call_kwargs(model, kwargs)
        out = model(inp.to(device), **kwargs).cpu()[0]
        finite = bool(torch.isfinite(out).all())  # a diverged model: NaN rows, reported by the caller on every rank
        rows.append((*(score(out, target[0], tag) if finite else (math.nan, math.nan)), tag))
    rows = gather_lists(rows, world)
    arr = np.asarray([r[:2] for r in rows], dtype=np.float64).reshape(-1, 2)
    result = {"val_psnr": float(arr[:, 0].mean()), "val_ssim": float(arr[:, 1].mean()), "val_images": len(arr)}
    tags = list(dict.fromkeys(r[2] for r in rows if r[2] is not None))
    for tag in tags:
        result[f"val_psnr_{tag}"] = float(np.mean([r[0] for r in rows if r[2] == tag]))
    return result


def plot_curves(path: Path, history: list, train_label: str = "train (crops)"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_psnr"] for h in history], "o-", label=train_label)
    a.set_xlabel("epoch")
    a.set_title("training PSNR (dB)")
    b.plot(ep, [h["val_psnr"] for h in history], "o-", label="validation")
    for key in sorted({k for h in history for k in h if k.startswith("val_psnr_")}):
        b.plot(ep, [h.get(key, np.nan) for h in history], ".--", label=key[len("val_psnr_"):])
    b.set_xlabel("epoch")
    b.set_title("validation PSNR (dB)")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path)


# ------------------------------------------------------------------------------------ export


def export_best(task: ImageTask, args, out: Path, command: str, weights_dir: Path) -> Path:
    """Write ``out/best.pt`` as a weight file (``--export``) with the meta of the run."""
    ckpt = load_checkpoint(out / "best.pt")
    model = task.models[ckpt["model_name"]](ckpt["model_conf"])
    model.load_state_dict(ckpt["model"])
    last = out / "last.pt"
    hist = load_checkpoint(last)["history"] if last.is_file() else ckpt["history"]
    run = ckpt["args"]
    meta = {
        "command": " && ".join(ckpt["commands"]),
        "export_command": command,
        "task": task.name,
        **task.export_meta(ckpt),
        "train_data": ckpt["data"]["train"],
        "train_images": ckpt["data"]["train_images"],
        "val_images": ckpt["data"]["val_images"],
        "crop": run["crop"],
        "batch_size": run["batch_size"],
        "optimizer": run.get("optimizer", "adam"),
        "lr": run["lr"],
        "epochs": int(ckpt["epoch"]),
        "epochs_trained_total": int(hist[-1]["epoch"]) if hist else 0,
        "steps": int(ckpt["step"]),
        "patches_seen": int(ckpt["step"]) * int(run["batch_size"]),
        "world_size": int(ckpt.get("world_size", 1)),
        "device": ckpt.get("device", "cpu"),
        "val_psnr": ckpt["best"]["val_psnr"],
        "train_time_s": float(hist[-1]["train_time_s"]) if hist else 0.0,
        "train_time_to_best_s": float(ckpt["train_time_s"]),
        "selection": "best validation PSNR",
        "val_history": [{k: v for k, v in h.items() if k == "epoch" or k.startswith("val_psnr")} for h in hist],
        "init": ckpt.get("init"),
        "torch": str(torch.__version__),
        "exported_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    target = export_target(args.export, weights_dir)
    save_model(target, model, **meta)
    return target


# ---------------------------------------------------------------------------------- training


def _load_data(task: ImageTask, args):
    mode = task.read_mode(args)
    if args.val is not None:
        try:
            train_paths, val_paths = list_images(args.data), list_images(args.val)
        except ValueError as exc:
            raise SystemExit(str(exc))
    else:
        try:
            train_paths, val_paths = split_train_val(args.data, args.val_count)
        except ValueError as exc:
            raise SystemExit(str(exc))
    try:
        train_images, val_images = load_images(train_paths, mode), load_images(val_paths, mode)
        if task.prepare_images is not None:
            train_images, val_images = task.prepare_images(train_images, args), task.prepare_images(val_images, args)
        train_set = CropDataset(train_images, args.crop, args.samples_per_epoch, seed=args.seed)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"--data {args.data}: {exc}")
    return train_paths, val_paths, train_images, val_images, train_set


def _check_resume(task: ImageTask, ckpt: dict, args, model, path: Path) -> None:
    keys = {**_RESUME_KEYS, **{k: None for k in task.resume_keys}}
    for key, default in keys.items():
        before = ckpt["args"].get(key, default)
        if before != getattr(args, key):
            raise SystemExit(f"--resume: {path} was trained with --{key.replace('_', '-')} {before}, "
                             f"not {getattr(args, key)}; an exact resume needs the same")
    stored = ckpt["model_name"]
    same_model = stored == args.model
    if same_model:
        try:  # a conf saved before a model gained a key is the same model with that key's default
            same_model = merge_conf(task.models[stored].default_conf, ckpt["model_conf"], {}) == model.conf
        except ValueError:
            same_model = False
    if not same_model:
        raise SystemExit(f"--resume: {path} holds {stored} {ckpt['model_conf']}, not {args.model} {model.conf}; "
                         "use the same model options")


def _to_device(value, device):
    """A model keyword argument on ``device`` (tensors, also inside tuples / lists; others as they are)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def run_training(task: ImageTask, args, argv, weights_dir: Path) -> dict:
    """Train ``task`` with the parsed ``args``; returns ``{"out", "best", "epochs"[, "export"]}``."""
    rank, world = dist_setup(args.threads)
    try:
        device = resolve_device(args.device, rank)
    except ValueError as exc:
        raise SystemExit(f"--device: {exc}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    command = command_line(task.program, argv, world)
    out: Path = args.out
    check_out_dir(out, args.resume, args.overwrite)
    if args.batch_size % world or args.samples_per_epoch % world:
        raise SystemExit(f"--batch-size {args.batch_size} and --samples-per-epoch {args.samples_per_epoch} must be "
                         f"divisible by the number of processes ({world})")
    seed_all(args.seed)
    train_paths, val_paths, train_images, val_images, train_set = _load_data(task, args)
    val_pairs = task.validation_pairs(val_images, args)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(train_set, batch_size=args.batch_size // world, sampler=sampler, num_workers=args.num_workers,
                        drop_last=True)

    init = read_init(args.init, task.models, args.model) if args.init else None
    base = {**(init["conf"] if init else {}), **task.base_conf(args)}
    try:
        model = task.models[args.model](model_conf_from_args(args, task.models, base))
    except ValueError as exc:  # e.g. an unknown --model-conf key
        raise SystemExit(f"--model {args.model}: {exc}")
    init_info = None
    if init is not None:
        try:
            widened = load_widened_state(model, init["state_dict"], f"--init {args.init} ({init['path']})")
        except ValueError as exc:
            raise SystemExit(str(exc))
        meta = init.get("meta") or {}
        init_info = {"weights": args.init, "path": init["path"], "sha256": init["sha256"], "conf": init["conf"],
                     "widened": widened, "steps": meta.get("steps"), "patches_seen": meta.get("patches_seen"),
                     "device": meta.get("device")}
    model = model.to(device)
    optimizer = make_optimizer(model.parameters(), args)
    start_epoch, step, history, best, best_train_time = 0, 0, [], None, 0.0
    commands = [command]
    last_path, best_path = out / "last.pt", out / "best.pt"
    if args.resume and last_path.is_file():
        ckpt = load_checkpoint(last_path)
        _check_resume(task, ckpt, args, model, last_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, step, history, best = ckpt["epoch"], ckpt["step"], ckpt["history"], ckpt["best"]
        best_train_time = ckpt.get("best_train_time_s", 0.0)
        commands = ckpt["commands"] + ([command] if start_epoch < args.epochs else [])
        set_rng_state(ckpt["rng"])
        init_info = ckpt.get("init")
        if rank == 0:
            print(f"resumed from {last_path}: epoch {start_epoch}, step {step}")
    elif args.resume and rank == 0:
        print(f"--resume: no {last_path} yet, starting from scratch")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    net = model
    if world > 1:
        # the N3 blocks' DistanceNorm shift cancels in the softmax and never gets a gradient, which
        # DDP refuses unless told to look for unused parameters
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                        find_unused_parameters=True)
    n_params = sum(p.numel() for p in model.parameters())
    progress = rank == 0 and not args.no_progress
    if rank == 0:
        print(f"{type(model).__name__} ({n_params / 1e6:.3f} M parameters) {model.conf}")
        if init_info is not None:
            grown = f"; zero-initialised new inputs of {', '.join(init_info['widened'])}" if init_info["widened"] else ""
            print(f"initialised from --init {args.init} ({init_info['path']}){grown}")
        print(f"train: {args.data} ({len(train_images)} images, {args.samples_per_epoch} crops of {args.crop} per epoch), "
              f"val: {len(val_images)} images, {task.describe(args)}, optimizer: {args.optimizer}, device: {device}, "
              f"processes: {world}, threads/process: {torch.get_num_threads()}", flush=True)
    run_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    data_info = {"train": str(args.data), "val": str(args.val or args.data), "train_images": len(train_images),
                 "val_images": [p.name for p in val_paths]}
    info = {"command": command, "commands": commands, "args": run_args, "model": args.model, "model_conf": model.conf,
            "parameters": n_params, "world_size": world, "device": str(device), "task": task.name, "init": init_info}
    train_time = history[-1]["train_time_s"] if history else 0.0

    def plot(path, hist):
        plot_curves(path, hist, task.train_label)

    started, slowest_epoch, stopped_early = time.time(), 0.0, False
    for epoch in range(start_epoch, args.epochs):
        if args.time_budget and epoch > start_epoch:
            # every process takes rank 0's decision, so that none starts an epoch the others skip
            over = rank == 0 and time.time() - started + slowest_epoch > args.time_budget
            if all_reduce_sums({"stop": float(over)}, world)["stop"]:
                stopped_early = True
                break
        t0 = time.time()
        lr = scheduled_lr(args.lr, args.lr_decay, args.lr_decay_epochs, epoch + 1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_set.set_epoch(epoch)
        net.train()
        sums = {"loss": 0.0, "psnr": 0.0, "n": 0.0}
        it = progress_bar(loader, f"epoch {epoch + 1}/{args.epochs}") if progress else loader
        for i, clean in enumerate(it):
            gen = step_generator(args.seed, epoch, i, rank)
            batch = task.make_batch(clean, args, gen, epoch, i)
            inp, target, kwargs = batch if len(batch) == 3 else (*batch, {})
            if task.call_kwargs is not None:
                kwargs = task.call_kwargs(model, kwargs)
            kwargs = {k: _to_device(v, device) for k, v in kwargs.items()}
            inp, target = inp.to(device, non_blocking=True), target.to(device, non_blocking=True)
            loss = F.mse_loss(net(inp, **kwargs), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(model.parameters(), args, lr)
            optimizer.step()
            step += 1
            lv = float(loss.detach())
            sums["loss"] += lv
            sums["psnr"] += 10 * np.log10(1.0 / max(lv, 1e-12))
            sums["n"] += 1
            if progress:
                it.set_postfix(loss=f"{sums['loss'] / sums['n']:.2e}", refresh=False)
        train_time += time.time() - t0
        sums = all_reduce_sums(sums, world)
        metrics = validate(model, val_pairs, task.score, device, rank, world, task.model_kwargs, task.call_kwargs)
        if not (math.isfinite(sums["loss"]) and math.isfinite(metrics["val_psnr"])):
            what = "training loss" if not math.isfinite(sums["loss"]) else "validation output"
            kept = f"{last_path} keeps epoch {epoch}" if epoch > 0 else "no checkpoint was written"
            raise SystemExit(f"training diverged in epoch {epoch + 1} (step {step}): the {what} holds NaN or inf; "
                             f"{kept}. Train again with a smaller --lr or with --clip-grad-norm.")
        n = max(sums["n"], 1)
        row = {"epoch": epoch + 1, "step": step, "lr": lr, "train_loss": sums["loss"] / n, "train_psnr": sums["psnr"] / n,
               **{k: v for k, v in metrics.items() if k != "val_images"}, "epoch_time_s": time.time() - t0,
               "train_time_s": train_time}
        history.append(row)
        slowest_epoch = max(slowest_epoch, row["epoch_time_s"])
        is_best = best is None or metrics["val_psnr"] > best["val_psnr"]
        if is_best:
            best, best_train_time = {**metrics, "epoch": epoch + 1}, train_time
        if rank == 0:
            ckpt = {"model_name": args.model, "model_conf": model.conf, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "step": step, "history": history,
                    "best": best, "best_train_time_s": best_train_time, "train_time_s": train_time,
                    "command": command, "commands": commands, "data": data_info, "world_size": world,
                    "device": str(device), "args": run_args, "task": task.name, "init": init_info, "rng": rng_state()}
            atomic_torch_save(ckpt, last_path)
            if is_best:
                atomic_torch_save(ckpt, best_path)
            write_logs(out, history, {**info, "data": data_info, "best": best}, task.csv_fields, plot)
            print(f"epoch {epoch + 1}/{args.epochs}: train loss {row['train_loss']:.3e}  val PSNR {row['val_psnr']:.3f} dB  "
                  f"SSIM {row['val_ssim']:.4f}  ({row['epoch_time_s']:.0f} s){'  *best*' if is_best else ''}", flush=True)
        barrier(world)

    summary = {"out": str(out), "best": best, "epochs": len(history), "stopped_early": stopped_early}
    if rank == 0:
        if stopped_early:
            write_logs(out, history, {**info, "data": data_info, "best": best,
                                      "stopped_early": f"--time-budget {args.time_budget:g} s"}, task.csv_fields, plot)
            print(f"--time-budget {args.time_budget:g} s: stopped after epoch {len(history)} of {args.epochs}; "
                  f"--resume continues from {last_path}", flush=True)
        if best is not None:
            print(f"best epoch {best['epoch']}: val PSNR {best['val_psnr']:.3f} dB; checkpoints in {out}")
        if args.export:
            target = export_best(task, args, out, command, weights_dir)
            summary["export"] = str(target)
            print(f"exported {best_path} -> {target} ({target.stat().st_size / 1e6:.2f} MB)")
    barrier(world)
    dist_teardown()
    return summary
