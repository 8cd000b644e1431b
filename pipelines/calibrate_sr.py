#!/usr/bin/env python
"""Calibrate the N3-block temperatures of an N3Net-SR per upscaling factor on validation images.

    python pipelines/calibrate_sr.py --weights n3net-sr-x234 --data ../shared/data/images/train400 --val-count 8 \\
        --export n3net-sr-x234-cal --json results/sr/calibration.json

One N3Net-SR serves every scale, but its temperature CNNs see only the bicubic image, not the
scale, so they cannot make the neighbour weights softer at one scale and sharper at another. For
every ``--scales`` factor this program multiplies the temperatures of all N3 blocks by each of
``--factors`` (1, the temperature CNNs' own output, and the model's current factor for that scale
are always tried), scores the validation images exactly as ``train_sr.py`` validates (luma,
MATLAB bicubic degradation, PSNR on Y with ``scale`` pixels shaved), and keeps the factor with
the best mean PSNR (a tie keeps the current factor, and so does a gain below ``--min-gain`` dB).
The validation images are the last ``--val-count`` images of ``--data`` in sorted order (the
trainer's held-out split), or those of ``--val``: folders (every image in them) and image files,
for example scenes that resemble the images the model will be used on; ``--crop N`` takes the
central N x N pixels of each. ``--export`` writes a weight file with the same weights and
``conf["scale_temperature"] = {"2": f2, ...}``; ``eval_sr.py`` and ``upscale.py`` pass the scale to
the model, which then uses its factor. Choose the factors on validation images only, never on
a test set.

Bad input: one ``calibrate_sr.py: error: ...`` line, exit 2.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from n3images import WEIGHTS_DIR, programs
from n3images.data import split_train_val
from n3images.io import list_images, read_image
from n3images.models import N3NetSR
from n3images.programs import UsageError, check_writable, pick_device, write_json
from n3images.sr import DEFAULT_FACTORS, SCALES, calibrate_temperature, to_luma
from n3sets.cli import add_threads_argument, errors_exit, one_line
from n3sets.pretrained import save_model
from n3sets.training import export_target, set_threads

PROGRAM = "calibrate_sr.py"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, metavar="NAME_OR_PATH", help="an N3Net-SR: shipped name or weight file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="the training folder; its last --val-count images are used")
    src.add_argument("--val", nargs="+", metavar="PATH",
                     help="validation images: folders (every image in them) and image files")
    p.add_argument("--val-count", type=int, default=8, help="held-out images of --data (default 8, as train_sr.py)")
    p.add_argument("--crop", type=int, metavar="N",
                   help="use the central N x N pixels of each validation image (default: whole images)")
    p.add_argument("--scales", type=int, nargs="+", default=list(SCALES), metavar="S", help="scales to calibrate")
    p.add_argument("--factors", type=float, nargs="+", default=list(DEFAULT_FACTORS), metavar="F",
                   help="temperature factors tried (1 is always added; default %(default)s)")
    p.add_argument("--min-gain", type=float, default=0.0, metavar="DB",
                   help="keep the current factor unless another is at least DB better on validation (default 0)")
    p.add_argument("--export", metavar="NAME_OR_PATH",
                   help="write the calibrated model: a name (n3images/weights/NAME.pt) or a .pt path")
    p.add_argument("--overwrite", action="store_true", help="let --export replace an existing file")
    p.add_argument("--json", metavar="OUT.json", help="write every factor's validation PSNR here")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    add_threads_argument(p)
    args = p.parse_args(argv)
    if any(s < 2 for s in args.scales):
        p.error(f"--scales must be integers >= 2, got {' '.join(map(str, args.scales))}")
    args.scales = sorted(set(args.scales))
    if any(not (np.isfinite(f) and f > 0) for f in args.factors):
        p.error(f"--factors must be positive numbers, got {' '.join(map(str, args.factors))}")
    if args.val_count < 1:
        p.error("--val-count must be >= 1")
    return args


def validation_images(args) -> tuple[list[Path], list[np.ndarray]]:
    """The validation lumas (float32, 8-bit quantised, as train_sr.py prepares them), centre-cropped
    to ``--crop``."""
    if args.val:
        paths, images = [], []
        for spec in args.val:
            try:
                found = list_images(spec) if Path(spec).is_dir() else [Path(spec)]
            except (ValueError, FileNotFoundError) as exc:
                raise UsageError(f"--val {spec}: {one_line(exc)}") from None
            paths += found
            images += read_images(found, f"--val {spec}")
    else:
        try:
            _, paths = split_train_val(args.data, args.val_count)
        except (ValueError, FileNotFoundError) as exc:
            raise UsageError(f"--data {args.data}: {one_line(exc)}") from None
        images = read_images(paths, f"--data {args.data}")
    if args.crop:
        images = [centre_crop(img, args.crop) for img in images]
    return paths, [to_luma(img, quantize=True).astype(np.float32) for img in images]


def read_images(paths: list[Path], option: str) -> list[np.ndarray]:
    """Every image of ``paths`` (``read_image(path, "auto")``); an unreadable one is a UsageError
    naming ``option``."""
    try:
        return [read_image(path, "auto") for path in paths]
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"{option}: {one_line(exc)}") from None


def centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` pixels of ``img`` (the whole side where it is shorter)."""
    h, w = img.shape[:2]
    r, c = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return img[r:r + size, c:c + size]


def run(args, argv=None) -> dict:
    if not (np.isfinite(args.min_gain) and args.min_gain >= 0):
        raise UsageError(f"--min-gain must be a number >= 0 (dB), got {args.min_gain}")
    if args.crop is not None and args.crop < 16:
        raise UsageError(f"--crop must be at least 16 pixels, got {args.crop}")
    device = pick_device(args.device)
    model, path = programs.load_image_model(args.weights, task="super-resolution")
    if not isinstance(model, N3NetSR):
        raise UsageError(f"--weights {args.weights}: a {type(model).__name__} has no N3 blocks to calibrate; "
                         "give an N3Net-SR")
    target = None
    if args.export:
        target = export_target(args.export, WEIGHTS_DIR)
        if target.exists() and not args.overwrite:
            raise UsageError(f"--export {args.export}: {target} exists; pass --overwrite to replace it")
        if target.resolve() == Path(path).resolve():
            raise UsageError(f"--export {args.export}: that is the input weight file {path}; export to a new name")
        check_writable(target, "--export")
    if args.json:
        check_writable(Path(args.json), "--json")
    paths, lumas = validation_images(args)
    model = model.to(device).eval()
    start = time.perf_counter()
    res = calibrate_temperature(model, lumas, args.scales, args.factors, device=device,
                                progress=lambda line: print(line, flush=True), min_gain=args.min_gain)
    elapsed = time.perf_counter() - start
    chosen = {k: v["best"] for k, v in res["scales"].items()}
    for k, v in res["scales"].items():
        best_db = v["psnr"][f"{v['best']:g}"]
        print(f"x{k}: factor {v['best']:g} ({best_db:.3f} dB, "
              f"{v['gain_db']:+.3f} dB over the current factor {v['current']:g})")
    out = {"weights": args.weights, "weights_path": str(path), "scale_temperature": chosen, **res,
           "images": [str(p) for p in paths] if args.val else [p.name for p in paths], "crop": args.crop,
           "device": str(device), "seconds": elapsed,
           "command": programs.command_line(PROGRAM, argv)}
    if target is not None:
        model.conf["scale_temperature"] = {**model.conf["scale_temperature"], **chosen}
        meta = dict(getattr(model, "meta", {}))
        keys = ("command", "scale_temperature", "factors", "scales", "crop", "min_gain", "images", "weights")
        meta["temperature_calibration"] = {k: out[k] for k in keys}
        save_model(target, model.cpu(), **meta)
        out["export"] = str(target)
        print(f"wrote {target}")
    if args.json:
        write_json(Path(args.json), out)
        print(f"wrote {args.json}")
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    with errors_exit(PROGRAM):
        return run(args, argv)


if __name__ == "__main__":
    main()
