#!/usr/bin/env python
"""Evaluate grey-image denoisers (PSNR / SSIM) under the benchmark noise protocol.

    python pipelines/eval_denoise.py --data ../shared/data/images/set12 ../shared/data/images/bsd68 \\
        --sigma 25 50 --weights n3net-s25 dncnn-s25 --baselines bm3d,nlm --json results/denoise.json

Protocol (:mod:`n3images.noise`): every image of a ``--data`` folder is read grey in ``[0, 1]``
(``read_image(path, "gray")``) in sorted file order (``list_images``); the noisy input of the
``i``-th image is ``add_gaussian_noise(img, sigma, i)`` (seeded with ``i``, not clipped). Every
method's output -- and the ``noisy`` method, the noisy input itself -- is clipped to ``[0, 1]``
before PSNR and SSIM (:mod:`n3images.metrics`) against the clean image.

Methods: ``noisy``, the classical ``--baselines`` (``bm3d``, ``nlm``; they are told the true
noise level) and one per ``--weights`` model, named by :func:`n3sets.pretrained.weights_name`
(the shipped name or the file stem). The same weight file given twice is evaluated once. A
non-blind model (``noise_input="level"``) is told the noise level as the baselines are: ``(0,
(sigma / 255) ** 2)`` for Gaussian noise, ``(a, b)`` for ``--noise hetero``.

``--noise hetero``: the realistic raw-noise protocol instead. For each ``(a, b)`` of
:data:`n3images.noise.HETERO_EVAL_PAIRS` the clean target is ``hetero_eval_target(img, i)`` (the
image mapped towards raw intensities) and the input ``hetero_eval_noise(raw, a, b, i)`` (variance
``a * x + b``); results are keyed ``"a=0.01,b=0.0001"`` instead of the sigma. The Gaussian
baselines are given, per image, the root-mean-square noise level ``sigma = sqrt(mean(a * x + b))
* 255`` over the clean raw image ``x`` (an oracle: the true noise-level function and the clean
image; it is the sigma of white noise with the same total noise power).

JSON (``--json``, written atomically)::

    {"methods": {NAME: {"psnr", "ssim", "time_s"}},      # first dataset, first sigma (the contract)
     "datasets": {DATASET: {"num_images": N, "sigma": {"25": {
         "methods": {NAME: {"psnr": mean dB, "ssim": mean, "time_s": mean seconds per image}},
         "per_image": {NAME: [psnr of image 0, 1, ...]},
         "per_image_ssim": {NAME: [...]}}}}},
     "settings": {...}}                                    # command, data, images, weights + meta, ...

The level key is ``"sigma"`` for Gaussian noise and ``"noise_level"`` for ``--noise hetero``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch


from n3images import programs
from n3images.baselines import BASELINES
from n3images.inference import denoise_image
from n3images.io import write_image
from n3images.metrics import psnr, ssim
from n3images.models import noise_level_kwargs
from n3images.noise import HETERO_EVAL_PAIRS, add_gaussian_noise, hetero_eval_noise, hetero_eval_target
from n3images.programs import check_writable, dataset_names, format_table, pick_device
from n3sets.cli import UsageError, errors_exit
from n3sets.training import set_threads

PROGRAM = "eval_denoise.py"
RESERVED = ("noisy", "clean", *BASELINES)
MIN_SIDE = 11  # SSIM's 11x11 window


def _baseline_list(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown baseline(s) {', '.join(unknown)}; known: {', '.join(BASELINES)}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, metavar="DIR", help="folders of clean test images")
    p.add_argument("--sigma", type=float, nargs="+", metavar="S",
                   help="Gaussian noise levels on the 0-255 scale (default 25; not with --noise hetero)")
    p.add_argument("--noise", choices=["gaussian", "hetero"], default="gaussian")
    p.add_argument("--weights", action="extend", nargs="+", default=[], metavar="NAME_OR_PATH",
                   help="image models: shipped names (n3images.available_models()) or weight files; repeatable")
    p.add_argument("--baselines", type=_baseline_list, action="extend", nargs="+", default=[], metavar="LIST",
                   help=f"classical baselines from {{{','.join(BASELINES)}}}, comma- or space-separated (default: none)")
    programs.add_eval_arguments(p, "<dataset>/s<sigma>/<method>/<image>.png")
    args = p.parse_args(argv)
    if args.noise == "hetero" and args.sigma is not None:
        p.error("--sigma does not apply to --noise hetero (the noise levels are HETERO_EVAL_PAIRS)")
    if args.sigma is None:
        args.sigma = [25.0]
    for s in args.sigma:
        if not (math.isfinite(s) and 0 < s <= 255):
            p.error(f"--sigma {s:g}: must be in (0, 255] (0-255 scale)")
    programs.check_eval_arguments(p, args)
    args.baselines = list(dict.fromkeys(n for group in args.baselines for n in group))
    return args


# ------------------------------------------------------------------------------------ set-up


def load_image_model(spec: str, channels: int | None = 1):
    """``(model, path)`` of an image denoiser; UsageError naming ``spec`` otherwise.

    ``channels``: the image channels the data has (1 here); None accepts any model.
    """
    model, path = programs.load_image_model(spec, task="denoising")
    _check_channels(spec, model, channels)
    return model, path


def _check_channels(spec: str, model, channels: int | None = 1) -> None:
    model_channels = model.conf.get("channels", 1)
    if channels is not None and model_channels != channels:
        raise UsageError(
            f"--weights {spec}: the model takes {model_channels}-channel (colour) images, but this evaluation "
            f"uses {channels}-channel grey images; evaluate grey models only")


def load_models(specs: list[str], device: torch.device) -> tuple[dict, dict, dict]:
    """``(models, weights_info, duplicates)``; the same weight content given twice is loaded once."""
    return programs.load_models(specs, device, program=PROGRAM, reserved=RESERVED, task="denoising",
                                check=_check_channels)


def load_dataset(folder: str, max_images: int | None) -> tuple[list[Path], list[np.ndarray]]:
    """Sorted image paths of ``folder`` and the grey images, all checked before any work."""
    return programs.load_dataset(folder, max_images, "gray", MIN_SIDE)


def noise_levels(args) -> list[tuple[str, str, dict]]:
    """``(json key, folder name for --save-images, parameters)`` of every noise level."""
    if args.noise == "gaussian":
        return [(f"{s:g}", f"s{s:g}", {"sigma": float(s)}) for s in dict.fromkeys(args.sigma)]
    return [(f"a={a:g},b={b:g}", f"a{a:g}_b{b:g}", {"a": float(a), "b": float(b)}) for a, b in HETERO_EVAL_PAIRS]


# ---------------------------------------------------------------------------------- evaluation


def make_pair(img: np.ndarray, index: int, level: dict) -> tuple[np.ndarray, np.ndarray, float]:
    """``(clean target, noisy input, sigma for the Gaussian baselines)`` of the ``index``-th image."""
    if "sigma" in level:
        return img, add_gaussian_noise(img, level["sigma"], index), level["sigma"]
    a, b = level["a"], level["b"]
    raw = hetero_eval_target(torch.from_numpy(img)[None, None], index)
    noisy = hetero_eval_noise(raw, a, b, index)
    raw_np = raw[0, 0].numpy()
    sigma = math.sqrt(float(np.mean(a * np.maximum(raw_np.astype(np.float64), 0) + b))) * 255
    return raw_np, noisy[0, 0].numpy(), sigma


def evaluate_level(images, level, methods, save_dir: Path | None, file_names, progress_desc, quiet, tile, device):
    """Scores of every method on every image at one noise level."""
    scores = programs.Scores(methods)
    sigmas = []
    for i in programs.progress(len(images), progress_desc, quiet):
        clean, noisy, sigma = make_pair(images[i], i, level)
        sigmas.append(sigma)
        if save_dir is not None:
            write_image(save_dir / "clean" / file_names[i], np.clip(clean, 0, 1))
        for name, (kind, obj) in methods.items():
            t0 = time.perf_counter()
            if kind == "noisy":
                out = noisy
            elif kind == "baseline":
                out = obj(noisy, sigma)
            else:
                out = denoise_image(obj, noisy, tile=tile, device=device, **noise_level_kwargs(obj, level))
            elapsed = time.perf_counter() - t0 if kind != "noisy" else 0.0
            out = np.clip(np.asarray(out, dtype=np.float64), 0.0, 1.0)
            scores.add(name, psnr(out, clean), ssim(out, clean), elapsed)
            if save_dir is not None:
                write_image(save_dir / name / file_names[i], out)
    out = scores.result()
    if "sigma" not in level:
        out["baseline_sigma"] = sigmas  # the per-image sigma the Gaussian baselines were given
    return out


def _model_notes(models_info: dict, args) -> None:
    for name, info in models_info.items():
        meta = info["meta"]
        trained_noise, trained_sigma = meta.get("noise"), meta.get("sigma")
        if args.noise == "gaussian" and trained_noise == "hetero":
            print(f"{PROGRAM}: note: {name} was trained for heteroscedastic noise, evaluated on Gaussian noise",
                  file=sys.stderr)
        elif args.noise == "hetero" and trained_noise not in (None, "hetero"):
            print(f"{PROGRAM}: note: {name} was trained for {trained_noise} noise"
                  f"{f' (sigma {trained_sigma:g})' if isinstance(trained_sigma, (int, float)) else ''}, "
                  "evaluated on heteroscedastic noise", file=sys.stderr)
        elif args.noise == "gaussian" and isinstance(trained_sigma, (int, float)):
            other = [s for s in args.sigma if s != trained_sigma]
            if other:
                print(f"{PROGRAM}: note: {name} was trained for sigma {trained_sigma:g}; also evaluated at sigma "
                      f"{', '.join(f'{s:g}' for s in other)}", file=sys.stderr)


def run(args, argv) -> dict:
    set_threads(args.threads)
    device = pick_device(args.device)
    names = dataset_names(args.data)
    if args.json:
        check_writable(Path(args.json), "--json")
    if args.save_images:
        check_writable(Path(args.save_images), "--save-images")
    # everything is loaded and checked before the first (slow) evaluation
    datasets = {name: load_dataset(folder, args.max_images) for name, folder in zip(names, args.data)}
    models, weights_info, duplicates = load_models(args.weights, device)
    _model_notes(weights_info, args)
    methods = {"noisy": ("noisy", None)}
    methods.update({b: ("baseline", BASELINES[b]) for b in args.baselines})
    methods.update({n: ("model", m) for n, m in models.items()})
    levels = noise_levels(args)
    level_key = "sigma" if args.noise == "gaussian" else "noise_level"

    start = time.perf_counter()
    results = {}
    for (dname, (paths, images)), folder in zip(datasets.items(), args.data):
        file_names = programs.image_file_names(paths)
        results[dname] = {"folder": str(folder), "num_images": len(images), level_key: {}}
        for key, sub, level in levels:
            save_dir = Path(args.save_images) / dname / sub if args.save_images else None
            res = evaluate_level(images, level, methods, save_dir, file_names, f"{dname} {key}", args.quiet,
                                 args.tile, device)
            results[dname][level_key][key] = res
            label = f"sigma {key}" if args.noise == "gaussian" else f"hetero {key}"
            print(f"\n{dname} ({len(images)} images), {label}:")
            print(format_table(res["methods"]), flush=True)
    elapsed = time.perf_counter() - start

    first_ds = next(iter(results.values()))
    first = first_ds[level_key][levels[0][0]]["methods"]
    protocol = ("gaussian: add_gaussian_noise(img, sigma, i), outputs clipped to [0, 1]" if args.noise == "gaussian" else
                "hetero: target hetero_eval_target(img, i), input hetero_eval_noise(target, a, b, i), outputs clipped "
                "to [0, 1]; Gaussian baselines given sigma = sqrt(mean(a * target + b)) * 255 per image")
    levels_json = ([float(s) for s in dict.fromkeys(args.sigma)] if args.noise == "gaussian"
                   else [{"key": k, **lv} for k, _, lv in levels])
    settings = programs.eval_settings(
        PROGRAM, argv, args, names, datasets, weights_info, duplicates, device, elapsed, read_mode="gray",
        first={"dataset": next(iter(results)), level_key: levels[0][0]}, noise=args.noise, protocol=protocol,
        **{level_key: levels_json}, baselines=args.baselines)
    return programs.finish_eval(args, {"methods": first, "datasets": results, "settings": settings})


def main(argv=None) -> dict:
    args = parse_args(argv)
    with errors_exit(PROGRAM):
        return run(args, argv)


if __name__ == "__main__":
    main()
