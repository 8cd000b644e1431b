#!/usr/bin/env python
"""Train an image denoiser (DnCNN or the denoising N3Net) and report validation PSNR.

    python pipelines/train_denoise.py --model n3net --sigma 25 --data ../shared/data/images/train400 \
        --out runs/n3net_s25 --epochs 30 --export n3net-s25

Training pairs: random ``--crop`` x ``--crop`` crops of the ``--data`` images (flips and
rotations), noise added on the fly -- white Gaussian of ``--sigma`` (0-255 scale), or with
``--noise hetero`` the heteroscedastic raw-domain model of :mod:`n3images.noise` (clean images
mapped towards raw intensities, variance ``a * x + b`` with random noise-level parameters). A
model is blind (it sees the noisy image only) unless ``--model-conf '{"noise_input": "level"}'``:
then every call, in training and validation, also gives it the noise level -- ``(a, b)`` of the
batch image, ``(0, (sigma / 255) ** 2)`` for Gaussian noise -- from which it computes a per-pixel
noise standard deviation map as a further input (:class:`n3images.models.N3NetDenoiser`). The last ``--val-count`` images of ``--data``
(sorted file order) are held out for validation (or ``--val DIR``): PSNR every epoch under the
evaluation protocol of ``eval_denoise.py`` (noise of the i-th image seeded with i; for
``hetero``, the mean over the fixed (a, b) pairs of :data:`n3images.noise.HETERO_EVAL_PAIRS`).

Adam (or ``--optimizer sgd``), MSE loss, step learning-rate decay (``--lr-decay-epochs``). Every epoch: ``last.pt`` and,
when the validation PSNR improves, ``best.pt`` (written atomically), ``log.csv``, ``log.json``,
``curves.png``. ``--resume`` continues exactly (model, optimizer, epoch, RNG; crops and noise
depend on (seed, epoch, index) only); an ``--out`` holding a run is refused without ``--resume``
or ``--overwrite``. ``--export NAME`` writes the best checkpoint as a shippable weight file
(``n3images/weights/NAME.pt``, or NAME itself when it is a path). Runs under
``torchrun --nproc_per_node=N`` (DistributedDataParallel over gloo) and on a CUDA GPU when there
is one (``--device``); under ``torchrun --max-restarts=K`` with ``--resume``, a crashed process
restarts the group from the last epoch's checkpoint and the run ends as if uninterrupted. The
machinery is :mod:`n3images.training`, shared with ``train_sr.py``; this file only says how noisy
training pairs and validation pairs are made.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from n3images import WEIGHTS_DIR
from n3images.metrics import psnr, ssim
from n3images.models import DENOISERS, noise_level_kwargs
from n3images.noise import (HETERO_EVAL_PAIRS, add_gaussian_noise, hetero_eval_noise, hetero_eval_target,
                            heteroscedastic_noise, sample_raw_params, to_raw, training_gaussian_noise)
from n3images.training import BASE_CSV_FIELDS, ImageTask, add_common_arguments, check_common_arguments, run_training

CSV_FIELDS = BASE_CSV_FIELDS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_arguments(p, DENOISERS, default_model="n3net", epochs=30, samples_per_epoch=3200, crop=80, batch_size=16,
                         lr=1e-3)
    p.add_argument("--noise", choices=["gaussian", "hetero"], default="gaussian")
    p.add_argument("--sigma", type=float, default=25.0, help="Gaussian noise level on the 0-255 scale")
    p.add_argument("--color", action="store_true", help="train on RGB images (default: grey)")
    args = p.parse_args(argv)
    check_common_arguments(p, args)
    if not (0 <= args.sigma <= 255):
        p.error(f"--sigma is on the 0-255 scale, got {args.sigma}")
    return args


def noisy_batch(clean: torch.Tensor, args, gen: torch.Generator, epoch: int = 0, step: int = 0):
    """(noisy input, clean target, noise level) of a training batch; noise from ``gen`` (CPU
    generator). The level (``{"sigma": s}`` or ``{"a": (B,), "b": (B,)}``) reaches only
    non-blind models (:func:`n3images.models.noise_level_kwargs`)."""
    if args.noise == "gaussian":
        return clean + training_gaussian_noise(clean, args.sigma, gen), clean, {"sigma": args.sigma}
    prm = sample_raw_params(gen, batch_size=clean.shape[0])
    target = to_raw(clean, prm["gamma"], prm["scale"])
    return heteroscedastic_noise(target, prm["a"], prm["b"], gen), target, {"a": prm["a"], "b": prm["b"]}


def hetero_tag(a: float, b: float) -> str:
    """Validation group of one fixed (a, b) pair (``val_psnr_<tag>`` in the logs)."""
    return f"a{a:g}_b{b:g}"


def validation_pairs(images: list[np.ndarray], args) -> list[tuple[torch.Tensor, torch.Tensor, str | None]]:
    """Fixed (noisy, clean, tag) validation pairs under the evaluation protocol (tag: None for
    Gaussian noise, :func:`hetero_tag` of the pair for heteroscedastic noise)."""
    pairs = []
    for i, img in enumerate(images):
        t = torch.from_numpy(img)
        t = t[None, None] if t.dim() == 2 else t.permute(2, 0, 1)[None]
        if args.noise == "gaussian":
            pairs.append((add_gaussian_noise(t, args.sigma, i), t, None))
        else:
            raw = hetero_eval_target(t, i)
            pairs += [(hetero_eval_noise(raw, a, b, i), raw, hetero_tag(a, b)) for a, b in HETERO_EVAL_PAIRS]
    return pairs


def validation_level(args):
    """``tag -> noise level`` of the validation pairs (what a non-blind model is told)."""
    levels = {hetero_tag(a, b): {"a": a, "b": b} for a, b in HETERO_EVAL_PAIRS}
    return lambda tag: {"sigma": args.sigma} if tag is None else levels[tag]


def score(out: torch.Tensor, clean: torch.Tensor, tag=None) -> tuple[float, float]:
    """PSNR / SSIM of a ``(C, H, W)`` output clipped to [0, 1] against the clean image."""
    a = out.clamp(0, 1).numpy().transpose(1, 2, 0)
    b = clean.numpy().transpose(1, 2, 0)
    a, b = (a[..., 0], b[..., 0]) if a.shape[-1] == 1 else (a, b)
    return psnr(a, b), ssim(a, b)


def export_meta(ckpt: dict) -> dict:
    noise = ckpt["args"]["noise"]
    return {"noise": noise, "sigma": ckpt["args"]["sigma"] if noise == "gaussian" else None}


def make_task(args) -> ImageTask:
    hetero = [f"val_psnr_{hetero_tag(a, b)}" for a, b in HETERO_EVAL_PAIRS] if args.noise == "hetero" else []
    return ImageTask(
        name="denoising",
        program="pipelines/train_denoise.py",
        models=DENOISERS,
        base_conf=lambda a: {"channels": 3 if a.color else 1},
        read_mode=lambda a: "rgb" if a.color else "gray",
        make_batch=noisy_batch,
        validation_pairs=validation_pairs,
        score=score,
        resume_keys=("noise", "sigma"),
        describe=lambda a: f"noise: {a.noise}" + (f" sigma {a.sigma:g}" if a.noise == "gaussian" else ""),
        export_meta=export_meta,
        csv_fields=CSV_FIELDS[:7] + hetero + CSV_FIELDS[7:],
        train_label="train (noisy crops)",
        model_kwargs=validation_level(args),
        call_kwargs=noise_level_kwargs,
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    return run_training(make_task(args), args, argv, WEIGHTS_DIR)


if __name__ == "__main__":
    main()
