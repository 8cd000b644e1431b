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

Adam (or ``--optimizer sgd``), MSE loss, step learning-rate decay (``--lr-decay-epochs``). Every epoch: ``last.pt`` and,
when the validation PSNR improves, ``best.pt`` (written atomically), ``log.csv``, ``log.json``,
``curves.png``. ``--resume`` continues exactly (model, optimizer, epoch, RNG; crops and noise
depend on (seed, epoch, index) only); an ``--out`` holding a run is refused without ``--resume``
or ``--overwrite``. ``--export NAME`` writes the best checkpoint as a shippable weight file
(``n3images/weights/NAME.pt``, or NAME itself when it is a path). Runs under
``torchrun --nproc_per_node=N`` (DistributedDataParallel, gloo on CPU, nccl on CUDA) and on a
CUDA GPU when there is one (``--device``). The machinery is :mod:`n3images.training`, shared with
``train_sr.py``; this file only says how noisy training pairs and validation pairs are made.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from n3images import WEIGHTS_DIR
from n3images.metrics import psnr, ssim
from n3images.models import DENOISERS
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
    """(noisy input, clean target) of a training batch; noise from ``gen`` (CPU generator)."""
    if args.noise == "gaussian":
        return clean + training_gaussian_noise(clean, args.sigma, gen), clean
    prm = sample_raw_params(gen, batch_size=clean.shape[0])
    target = to_raw(clean, prm["gamma"], prm["scale"])
    return heteroscedastic_noise(target, prm["a"], prm["b"], gen), target


def validation_pairs(images: list[np.ndarray], args) -> list[tuple[torch.Tensor, torch.Tensor, None]]:
    """Fixed (noisy, clean, None) validation pairs under the evaluation protocol."""
    pairs = []
    for i, img in enumerate(images):
        t = torch.from_numpy(img)
        t = t[None, None] if t.dim() == 2 else t.permute(2, 0, 1)[None]
        if args.noise == "gaussian":
            pairs.append((add_gaussian_noise(t, args.sigma, i), t, None))
        else:
            raw = hetero_eval_target(t, i)
            pairs += [(hetero_eval_noise(raw, a, b, i), raw, None) for a, b in HETERO_EVAL_PAIRS]
    return pairs


def score(out: torch.Tensor, clean: torch.Tensor, tag=None) -> tuple[float, float]:
    """PSNR / SSIM of a ``(C, H, W)`` output clipped to [0, 1] against the clean image."""
    a = out.clamp(0, 1).numpy().transpose(1, 2, 0)
    b = clean.numpy().transpose(1, 2, 0)
    a, b = (a[..., 0], b[..., 0]) if a.shape[-1] == 1 else (a, b)
    return psnr(a, b), ssim(a, b)


def export_meta(ckpt: dict) -> dict:
    noise = ckpt["args"]["noise"]
    return {"noise": noise, "sigma": ckpt["args"]["sigma"] if noise == "gaussian" else None}


TASK = ImageTask(
    name="denoising",
    program="pipelines/train_denoise.py",
    models=DENOISERS,
    base_conf=lambda args: {"channels": 3 if args.color else 1},
    read_mode=lambda args: "rgb" if args.color else "gray",
    make_batch=noisy_batch,
    validation_pairs=validation_pairs,
    score=score,
    resume_keys=("noise", "sigma"),
    describe=lambda args: f"noise: {args.noise}" + (f" sigma {args.sigma:g}" if args.noise == "gaussian" else ""),
    export_meta=export_meta,
    csv_fields=CSV_FIELDS,
    train_label="train (noisy crops)",
)


def main(argv=None) -> dict:
    return run_training(TASK, parse_args(argv), argv, WEIGHTS_DIR)


if __name__ == "__main__":
    main()
