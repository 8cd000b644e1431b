#!/usr/bin/env python
"""Evaluate super-resolution models (PSNR / SSIM on Y) against bicubic upscaling.

    python pipelines/eval_sr.py --data ../shared/data/images/set5 ../shared/data/images/set14 --scale 2 3 4 \\
        --weights vdsr-x234 n3net-sr-x234 --json results/sr/set5_set14.json [--save-images out/sr_images]

Protocol (:mod:`n3images.sr`): every image of a ``--data`` folder (sorted file order, grey or
colour) is cropped to a multiple of the scale; the ground truth is its luma Y (BT.601 as MATLAB's
``rgb2ycbcr`` on uint8 images: rounded to 8-bit levels; grey images as R = G = B); the
low-resolution image is Y downscaled by MATLAB's bicubic ``imresize`` (antialiased, float64, not
quantised); ``bicubic`` is that image upscaled back with the same kernel, and every model gets it
as input. PSNR and SSIM on Y, outputs clipped to ``[0, 1]`` and rounded to 8-bit levels,
``scale`` pixels shaved from every border. Bicubic scores 33.66 / 30.39 / 28.42 dB on Set5 at
x2 / x3 / x4, the published values.

Methods: ``bicubic@x<S>`` always, and ``<model>@x<S>`` for every ``--weights`` model (named by its
shipped name or file stem; the same weight file given twice is evaluated once). ``time_s`` is the
upscaling time from the low-resolution image (bicubic included for the models).

JSON (``--json``, written atomically)::

    {"methods": {"bicubic@x2": {"psnr", "ssim", "time_s"}, "vdsr-x234@x2": {...}, ..., "bicubic@x3": ...},
                                                         # first dataset, every scale (the contract)
     "datasets": {DATASET: {"folder", "num_images", "scale": {"2": {
         "methods": {NAME@x2: {"psnr": mean dB, "ssim": mean, "time_s": mean seconds per image}},
         "per_image": {NAME@x2: [psnr of image 0, 1, ...]},
         "per_image_ssim": {NAME@x2: [...]}}}}},
     "settings": {...}}                                  # command, data, images, scales, weights + meta, ...

``--save-images DIR``: ``DIR/<dataset>/x<S>/<method>/<image>.png`` for ``hr`` (the cropped ground
truth), ``bicubic`` and every model, in colour for colour images (the method's Y with bicubic Cb
and Cr), 8-bit.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from n3images import programs
from n3images.io import write_image
from n3images.metrics import modcrop, rgb_to_ycbcr, ycbcr_to_rgb
from n3images.sr import bicubic_up, degrade, downscale, from_luma, sr_scores, super_resolve, to_luma
from n3images.programs import check_writable, dataset_names, format_table, pick_device
from n3sets.cli import UsageError, errors_exit
from n3sets.training import set_threads

PROGRAM = "eval_sr.py"
RESERVED = ("bicubic", "hr", "clean")
SSIM_SIDE = 11  # SSIM's 11x11 window, after the shave
PROTOCOL = ("modcrop to a multiple of the scale; Y = BT.601 luma (rgb2ycbcr; grey as R=G=B) rounded to 8-bit levels; "
            "LR = MATLAB bicubic imresize(Y, 1/scale) (antialiased, float64, not quantised); input = imresize(LR, scale); "
            "PSNR/SSIM on Y, outputs clipped to [0, 1] and rounded to 8-bit levels, scale pixels shaved")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, metavar="DIR", help="folders of high-resolution test images")
    p.add_argument("--scale", type=int, nargs="+", default=[2, 3, 4], metavar="S",
                   help="upscaling factors (default: 2 3 4)")
    p.add_argument("--weights", action="extend", nargs="+", default=[], metavar="NAME_OR_PATH",
                   help="super-resolution models: shipped names (n3images.available_models()) or weight files")
    programs.add_eval_arguments(p, "<dataset>/x<S>/<method>/<image>.png")
    args = p.parse_args(argv)
    bad = [s for s in args.scale if s < 2]
    if bad:
        p.error(f"--scale {bad[0]}: scales are integers >= 2")
    args.scale = list(dict.fromkeys(args.scale))
    programs.check_eval_arguments(p, args)
    return args


def load_models(specs: list[str], device: torch.device) -> tuple[dict, dict, dict]:
    def check(spec, model):
        if model.conf.get("channels", 1) != 1:
            raise UsageError(f"--weights {spec}: the model takes {model.conf['channels']}-channel images; "
                             "super-resolution models here work on the luma (1 channel)")

    return programs.load_models(specs, device, program=PROGRAM, reserved=RESERVED, task="super-resolution", check=check)


def _model_notes(weights_info: dict, scales: list[int]) -> None:
    for name, info in weights_info.items():
        trained = info["meta"].get("scales")
        if isinstance(trained, list):
            other = [s for s in scales if s not in trained]
            if other:
                print(f"{PROGRAM}: note: {name} was trained for scales {' '.join(map(str, trained))}; also evaluated "
                      f"at x{', x'.join(map(str, other))}", file=sys.stderr)


def evaluate_scale(images, scale: int, models: dict, save_dir: Path | None, file_names, desc: str, quiet: bool,
                   tile: int, device) -> dict:
    """Scores of bicubic and every model on every image at one scale."""
    scores = programs.Scores([f"bicubic@x{scale}"] + [f"{n}@x{scale}" for n in models])
    for i in programs.progress(len(images), desc, quiet):
        img = modcrop(images[i], scale)
        hr = to_luma(img, quantize=True)
        lr = downscale(hr, scale)
        t0 = time.perf_counter()
        bicubic = bicubic_up(lr, scale)
        t_bicubic = time.perf_counter() - t0
        outputs = {"bicubic": (bicubic, t_bicubic)}
        for name, model in models.items():
            t0 = time.perf_counter()
            y = super_resolve(model, bicubic, tile=tile, device=device, scale=scale)
            outputs[name] = (y, t_bicubic + time.perf_counter() - t0)
        for name, (y, seconds) in outputs.items():
            scores.add(f"{name}@x{scale}", *sr_scores(y, hr, scale), seconds)
        if save_dir is not None:
            _save(save_dir, file_names[i], img, scale, outputs)
    return scores.result()


def _save(save_dir: Path, file_name: str, img: np.ndarray, scale: int, outputs: dict) -> None:
    write_image(save_dir / "hr" / file_name, np.clip(img, 0, 1))
    chroma = None
    if img.ndim == 3:  # Cb, Cr through the same degradation: bicubic
        chroma = degrade(rgb_to_ycbcr(img.astype(np.float64))[..., 1:], scale)[1]
    for name, (y, _) in outputs.items():
        y = np.clip(y, 0, 1)
        out = from_luma(y) if chroma is None else ycbcr_to_rgb(np.concatenate([y[..., None], chroma], axis=2))
        write_image(save_dir / name / file_name, np.clip(out, 0, 1))


def run(args, argv) -> dict:
    set_threads(args.threads)
    device = pick_device(args.device)
    names = dataset_names(args.data)
    if args.json:
        check_writable(Path(args.json), "--json")
    if args.save_images:
        check_writable(Path(args.save_images), "--save-images")
    min_side = SSIM_SIDE + 3 * max(args.scale)  # up to scale - 1 lost to the crop, 2 * scale to the shave
    datasets = {name: programs.load_dataset(folder, args.max_images, "auto", min_side)
                for name, folder in zip(names, args.data)}
    models, weights_info, duplicates = load_models(args.weights, device)
    _model_notes(weights_info, args.scale)

    start = time.perf_counter()
    results = {}
    for (dname, (paths, images)), folder in zip(datasets.items(), args.data):
        file_names = programs.image_file_names(paths)
        results[dname] = {"folder": str(folder), "num_images": len(images), "scale": {}}
        for s in args.scale:
            save_dir = Path(args.save_images) / dname / f"x{s}" if args.save_images else None
            res = evaluate_scale(images, s, models, save_dir, file_names, f"{dname} x{s}", args.quiet, args.tile, device)
            results[dname]["scale"][str(s)] = res
            print(f"\n{dname} ({len(images)} images), x{s}:")
            print(format_table(res["methods"]), flush=True)
    elapsed = time.perf_counter() - start

    first = next(iter(results.values()))
    methods = {n: m for s in args.scale for n, m in first["scale"][str(s)]["methods"].items()}
    settings = programs.eval_settings(
        PROGRAM, argv, args, names, datasets, weights_info, duplicates, device, elapsed, read_mode="auto",
        first={"dataset": next(iter(results))}, task="super-resolution", protocol=PROTOCOL,
        scale=[int(s) for s in args.scale])
    return programs.finish_eval(args, {"methods": methods, "datasets": results, "settings": settings})


def main(argv=None) -> dict:
    args = parse_args(argv)
    with errors_exit(PROGRAM):
        return run(args, argv)


if __name__ == "__main__":
    main()
