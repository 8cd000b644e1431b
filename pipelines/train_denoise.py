#!/usr/bin/env python
"""Train an image denoiser (DnCNN or the denoising N3Net) and report validation PSNR.

    python pipelines/train_denoise.py --model n3net --sigma 25 --data ../shared/data/images/train400 \
        --out runs/n3net_s25 --epochs 30 --export n3net-s25

Training pairs: random ``--crop`` x ``--crop`` crops of the ``--data`` images (flips and
rotations), noise added on the fly -- white Gaussian of ``--sigma`` (0-255 scale), or with
``--noise hetero`` the heteroscedastic raw-domain model of :mod:`n3images.noise` (clean images
mapped towards raw intensities, variance ``a * x + b`` with random noise-level parameters; the
model is blind: it sees the noisy image only). The last ``--val-count`` images of ``--data``
(sorted file order) are held out for validation (or ``--val DIR``): PSNR every epoch under the
evaluation protocol of ``eval_denoise.py`` (noise of the i-th image seeded with i; for
``hetero``, the mean over the fixed (a, b) pairs of :data:`n3images.noise.HETERO_EVAL_PAIRS`).

Adam, MSE loss, step learning-rate decay (``--lr-decay-epochs``). Every epoch: ``last.pt`` and,
when the validation PSNR improves, ``best.pt`` (written atomically), ``log.csv``, ``log.json``,
``curves.png``. ``--resume`` continues exactly (model, optimizer, epoch, RNG; crops and noise
depend on (seed, epoch, index) only); an ``--out`` holding a run is refused without ``--resume``
or ``--overwrite``. ``--export NAME`` writes the best checkpoint as a shippable weight file
(``n3images/weights/NAME.pt``, or NAME itself when it is a path). Runs under
``torchrun --nproc_per_node=N`` (DistributedDataParallel, gloo on CPU, nccl on CUDA) and on a
CUDA GPU when there is one (``--device``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from n3images import WEIGHTS_DIR
from n3images.data import CropDataset, load_images, split_train_val
from n3images.io import list_images
from n3images.metrics import psnr
from n3images.models import IMAGE_MODELS
from n3images.noise import (HETERO_EVAL_PAIRS, add_gaussian_noise, hetero_eval_noise, hetero_eval_target,
                            heteroscedastic_noise, sample_raw_params, to_raw, training_gaussian_noise)
from n3sets.pretrained import save_model
from n3sets.training import (all_reduce_sums, resolve_device, atomic_torch_save, barrier, check_out_dir, command_line, dist_setup,
                             dist_teardown, export_target, gather_lists, load_checkpoint, progress_bar, rng_state,
                             save_figure_atomic, scheduled_lr, seed_all, set_rng_state, write_logs)

CSV_FIELDS = ["epoch", "step", "lr", "train_loss", "train_psnr", "val_psnr", "val_ssim", "epoch_time_s", "train_time_s"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=sorted(IMAGE_MODELS), default="n3net")
    p.add_argument("--data", type=Path, required=True, help="folder of clean training images")
    p.add_argument("--val", type=Path, help="folder of clean validation images (default: the last --val-count of --data)")
    p.add_argument("--val-count", type=int, default=8, help="images of --data held out for validation (without --val)")
    p.add_argument("--out", type=Path, required=True, help="output folder (checkpoints and logs)")
    p.add_argument("--noise", choices=["gaussian", "hetero"], default="gaussian")
    p.add_argument("--sigma", type=float, default=25.0, help="Gaussian noise level on the 0-255 scale")
    p.add_argument("--color", action="store_true", help="train on RGB images (default: grey)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--samples-per-epoch", type=int, default=3200, help="random crops per epoch (all processes together)")
    p.add_argument("--crop", type=int, default=80, help="crop side in pixels")
    p.add_argument("--batch-size", type=int, default=16, help="crops per step (all processes together)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-decay-epochs", type=int, nargs="+", default=[], metavar="EPOCH",
                   help="multiply --lr by --lr-decay from each of these (1-based, absolute) epochs on")
    p.add_argument("--lr-decay", type=float, default=0.1)
    p.add_argument("--clip-grad-norm", type=float, default=0.0, help="clip the total gradient norm (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if OUT already holds a run")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (default: cores / processes)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--depth", type=int, help="layers per DnCNN stage (default: dncnn 17, n3net 6)")
    p.add_argument("--features", type=int, help="feature channels (64)")
    p.add_argument("--k", type=int, help="n3net: neighbours per block (7)")
    p.add_argument("--stages", type=int, help="n3net: DnCNN stages (3; 2 = the light variant)")
    p.add_argument("--model-conf", type=json.loads, default={}, help="JSON dict of further model configuration")
    p.add_argument("--export", help="write the best checkpoint as weight file NAME (n3images/weights/NAME.pt) or PATH")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("epochs", "samples_per_epoch", "crop", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not (0 <= args.sigma <= 255):
        p.error(f"--sigma is on the 0-255 scale, got {args.sigma}")
    if not args.data.is_dir():
        p.error(f"--data {args.data}: not a folder")
    if args.val is not None and not args.val.is_dir():
        p.error(f"--val {args.val}: not a folder")
    if not 0 < args.lr_decay <= 1:
        p.error(f"--lr-decay must be in (0, 1], got {args.lr_decay}")
    return args


def model_conf_from_args(args) -> dict:
    conf = {"channels": 3 if args.color else 1}
    for key in ("depth", "features", "k", "stages"):
        value = getattr(args, key)
        if value is not None:
            if key not in IMAGE_MODELS[args.model].default_conf:
                raise SystemExit(f"--{key} does not apply to --model {args.model}")
            conf[key] = value
    conf.update(args.model_conf)
    return conf


def noisy_batch(clean: torch.Tensor, args, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy input, clean target) of a training batch; noise from ``gen`` (CPU generator)."""
    if args.noise == "gaussian":
        return clean + training_gaussian_noise(clean, args.sigma, gen), clean
    prm = sample_raw_params(gen, batch_size=clean.shape[0])
    target = to_raw(clean, prm["gamma"], prm["scale"])
    return heteroscedastic_noise(target, prm["a"], prm["b"], gen), target


def validation_pairs(images: list[np.ndarray], args) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed (noisy, clean) validation pairs under the evaluation protocol."""
    pairs = []
    for i, img in enumerate(images):
        t = torch.from_numpy(img)
        t = t[None, None] if t.dim() == 2 else t.permute(2, 0, 1)[None]
        if args.noise == "gaussian":
            pairs.append((add_gaussian_noise(t, args.sigma, i), t))
        else:
            raw = hetero_eval_target(t, i)
            pairs += [(hetero_eval_noise(raw, a, b, i), raw) for a, b in HETERO_EVAL_PAIRS]
    return pairs


@torch.no_grad()
def validate(model, pairs, device, rank: int, world: int) -> dict:
    from n3images.metrics import ssim

    model.eval()
    rows = []
    for j in range(rank, len(pairs), world):
        noisy, clean = pairs[j]
        out = model(noisy.to(device)).clamp(0, 1).cpu()[0]
        a = out.numpy().transpose(1, 2, 0).squeeze(-1) if out.shape[0] == 1 else out.numpy().transpose(1, 2, 0)
        b = clean[0].numpy().transpose(1, 2, 0)
        b = b.squeeze(-1) if b.shape[-1] == 1 else b
        rows.append((psnr(a, b), ssim(a, b)))
    rows = gather_lists(rows, world)
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 2)
    return {"val_psnr": float(arr[:, 0].mean()), "val_ssim": float(arr[:, 1].mean()), "val_images": len(arr)}


def plot_curves(path: Path, history: list):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_psnr"] for h in history], "o-", label="train (noisy crops)")
    a.set_xlabel("epoch")
    a.set_title("training PSNR (dB)")
    b.plot(ep, [h["val_psnr"] for h in history], "o-", label="validation")
    b.set_xlabel("epoch")
    b.set_title("validation PSNR (dB)")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def export_best(args, out: Path, command: str) -> Path:
    ckpt = load_checkpoint(out / "best.pt")
    model = IMAGE_MODELS[ckpt["model_name"]](ckpt["model_conf"])
    model.load_state_dict(ckpt["model"])
    last = out / "last.pt"
    hist = load_checkpoint(last)["history"] if last.is_file() else ckpt["history"]
    meta = {
        "command": " && ".join(ckpt["commands"]),
        "export_command": command,
        "task": "denoising",
        "noise": ckpt["args"]["noise"],
        "sigma": ckpt["args"]["sigma"] if ckpt["args"]["noise"] == "gaussian" else None,
        "train_data": ckpt["data"]["train"],
        "train_images": ckpt["data"]["train_images"],
        "val_images": ckpt["data"]["val_images"],
        "crop": ckpt["args"]["crop"],
        "batch_size": ckpt["args"]["batch_size"],
        "epochs": int(ckpt["epoch"]),
        "epochs_trained_total": int(hist[-1]["epoch"]) if hist else 0,
        "steps": int(ckpt["step"]),
        "patches_seen": int(ckpt["step"]) * int(ckpt["args"]["batch_size"]),
        "world_size": int(ckpt.get("world_size", 1)),
        "device": ckpt.get("device", "cpu"),
        "val_psnr": ckpt["best"]["val_psnr"],
        "train_time_s": float(hist[-1]["train_time_s"]) if hist else 0.0,
        "train_time_to_best_s": float(ckpt["train_time_s"]),
        "selection": "best validation PSNR",
        "val_history": [{k: h[k] for k in ("epoch", "val_psnr")} for h in hist],
        "torch": str(torch.__version__),
        "exported_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    target = export_target(args.export, WEIGHTS_DIR)
    save_model(target, model, **meta)
    return target


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world = dist_setup(args.threads)
    try:
        device = resolve_device(args.device, rank)
    except ValueError as exc:
        raise SystemExit(f"--device: {exc}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    command = command_line("pipelines/train_denoise.py", argv, world)
    out: Path = args.out
    check_out_dir(out, args.resume, args.overwrite)
    if args.batch_size % world or args.samples_per_epoch % world:
        raise SystemExit(f"--batch-size {args.batch_size} and --samples-per-epoch {args.samples_per_epoch} must be "
                         f"divisible by the number of processes ({world})")
    seed_all(args.seed)
    mode = "rgb" if args.color else "gray"
    if args.val is not None:
        train_paths, val_paths = list_images(args.data), list_images(args.val)
    else:
        try:
            train_paths, val_paths = split_train_val(args.data, args.val_count)
        except ValueError as exc:
            raise SystemExit(str(exc))
    try:
        train_images, val_images = load_images(train_paths, mode), load_images(val_paths, mode)
        train_set = CropDataset(train_images, args.crop, args.samples_per_epoch, seed=args.seed)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"--data {args.data}: {exc}")
    val_pairs = validation_pairs(val_images, args)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(train_set, batch_size=args.batch_size // world, sampler=sampler, num_workers=args.num_workers,
                        drop_last=True)

    model = IMAGE_MODELS[args.model](model_conf_from_args(args)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    start_epoch, step, history, best, best_train_time = 0, 0, [], None, 0.0
    commands = [command]
    last_path, best_path = out / "last.pt", out / "best.pt"
    if args.resume and last_path.is_file():
        ckpt = load_checkpoint(last_path)
        if ckpt["model_name"] != args.model or ckpt["model_conf"] != model.conf:
            raise SystemExit(f"--resume: {last_path} holds {ckpt['model_name']} {ckpt['model_conf']}, "
                             f"not {args.model} {model.conf}; use the same model options")
        for key in ("noise", "sigma", "crop", "batch_size", "samples_per_epoch", "seed"):
            if ckpt["args"][key] != getattr(args, key):
                raise SystemExit(f"--resume: {last_path} was trained with --{key.replace('_', '-')} "
                                 f"{ckpt['args'][key]}, not {getattr(args, key)}; an exact resume needs the same")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, step, history, best = ckpt["epoch"], ckpt["step"], ckpt["history"], ckpt["best"]
        best_train_time = ckpt.get("best_train_time_s", 0.0)
        commands = ckpt["commands"] + ([command] if start_epoch < args.epochs else [])
        set_rng_state(ckpt["rng"])
        if rank == 0:
            print(f"resumed from {last_path}: epoch {start_epoch}, step {step}")
    elif args.resume and rank == 0:
        print(f"--resume: no {last_path} yet, starting from scratch")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    n_params = sum(p.numel() for p in model.parameters())
    progress = rank == 0 and not args.no_progress
    if rank == 0:
        print(f"{type(model).__name__} ({n_params / 1e6:.3f} M parameters) {model.conf}")
        print(f"train: {args.data} ({len(train_images)} images, {args.samples_per_epoch} crops of {args.crop} per epoch), "
              f"val: {len(val_images)} images, noise: {args.noise}"
              f"{f' sigma {args.sigma:g}' if args.noise == 'gaussian' else ''}, device: {device}, processes: {world}, "
              f"threads/process: {torch.get_num_threads()}", flush=True)
    run_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    data_info = {"train": str(args.data), "val": str(args.val or args.data), "train_images": len(train_images),
                 "val_images": [p.name for p in val_paths]}
    info = {"command": command, "commands": commands, "args": run_args, "model": args.model, "model_conf": model.conf,
            "parameters": n_params, "world_size": world, "device": str(device)}
    train_time = history[-1]["train_time_s"] if history else 0.0

    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        lr = scheduled_lr(args.lr, args.lr_decay, args.lr_decay_epochs, epoch + 1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_set.set_epoch(epoch)
        net.train()
        sums = {"loss": 0.0, "psnr": 0.0, "n": 0.0}
        it = progress_bar(loader, f"epoch {epoch + 1}/{args.epochs}") if progress else loader
        for i, clean in enumerate(it):
            # noise of this step and process: a function of (seed, epoch, step, rank) only
            gen = torch.Generator().manual_seed(((args.seed * 100_003 + epoch) * 1_000_003 + i) * 64 + rank)
            noisy, target = noisy_batch(clean, args, gen)
            noisy, target = noisy.to(device, non_blocking=True), target.to(device, non_blocking=True)
            loss = F.mse_loss(net(noisy), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
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
        metrics = validate(model, val_pairs, device, rank, world)
        n = max(sums["n"], 1)
        row = {"epoch": epoch + 1, "step": step, "lr": lr, "train_loss": sums["loss"] / n, "train_psnr": sums["psnr"] / n,
               **{k: metrics[k] for k in ("val_psnr", "val_ssim")}, "epoch_time_s": time.time() - t0,
               "train_time_s": train_time}
        history.append(row)
        is_best = best is None or metrics["val_psnr"] > best["val_psnr"]
        if is_best:
            best, best_train_time = {**metrics, "epoch": epoch + 1}, train_time
        if rank == 0:
            ckpt = {"model_name": args.model, "model_conf": model.conf, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "step": step, "history": history,
                    "best": best, "best_train_time_s": best_train_time, "train_time_s": train_time,
                    "command": command, "commands": commands, "data": data_info, "world_size": world,
                    "device": str(device), "args": run_args, "rng": rng_state()}
            atomic_torch_save(ckpt, last_path)
            if is_best:
                atomic_torch_save(ckpt, best_path)
            write_logs(out, history, {**info, "data": data_info, "best": best}, CSV_FIELDS, plot_curves)
            print(f"epoch {epoch + 1}/{args.epochs}: train loss {row['train_loss']:.3e}  val PSNR {row['val_psnr']:.3f} dB  "
                  f"SSIM {row['val_ssim']:.4f}  ({row['epoch_time_s']:.0f} s){'  *best*' if is_best else ''}", flush=True)
        barrier(world)

    summary = {"out": str(out), "best": best, "epochs": len(history)}
    if rank == 0:
        if best is not None:
            print(f"best epoch {best['epoch']}: val PSNR {best['val_psnr']:.3f} dB; checkpoints in {out}")
        if args.export:
            target = export_best(args, out, command)
            summary["export"] = str(target)
            print(f"exported {best_path} -> {target} ({target.stat().st_size / 1e6:.2f} MB)")
    barrier(world)
    dist_teardown()
    return summary


if __name__ == "__main__":
    main()
