#!/usr/bin/env python
"""Train a super-resolution model (VDSR or N3Net-SR) for several scales at once and report validation PSNR.

    python pipelines/train_sr.py --model n3net --data ../shared/data/images/train400 --out runs/n3net_sr \
        --scales 2 3 4 --export n3net-sr-x234

One model for every ``--scales`` factor, as VDSR: each training step draws one scale (a function
of (seed, epoch, step), the same in every process) for its whole batch. Training pairs: random
``--crop`` x ``--crop`` crops of the luma of the ``--data`` images (flips and rotations; grey
images are taken as ``R = G = B``, :func:`n3images.sr.to_luma`), cut to a multiple of the scale;
the input is the crop downscaled and upscaled back by MATLAB's bicubic ``imresize``
(:func:`n3images.sr.degrade_batch`), the target the crop. The last ``--val-count`` images of
``--data`` (sorted order) are held out (or ``--val DIR``): every epoch, PSNR / SSIM on Y with
``scale`` pixels shaved, the protocol of ``eval_sr.py``, at every scale (``val_psnr_x2``, ...;
``val_psnr`` is their mean, which selects ``best.pt``).

Optimiser: Adam at 1e-4 by default (a short probe on train400: after 30 steps of 16 crops VDSR
was 0.04 dB above bicubic at 1e-4 and 0.01 dB at 1e-3; VDSR's SGD at 0.1 needs its 80 epochs), or
VDSR's ``--optimizer sgd --lr 0.1 --momentum 0.9 --weight-decay 1e-4 --clip-grad-theta 0.01``
(adjustable gradient clipping: values to ``theta / lr``). MSE loss, step learning-rate decay.
Checkpoints, logs, ``--resume``, ``--export NAME`` (``n3images/weights/NAME.pt``), torchrun / DDP
and ``--device`` as ``train_denoise.py``: both are :mod:`n3images.training`. Every training and
validation call tells the model its scale (``model(x, scale=s)``);
``--model-conf '{"scale_aware": true}'`` gives N3Net-SR temperature CNNs that use it.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from n3images import WEIGHTS_DIR
from n3images.models import SR_MODELS
from n3images.sr import degrade_batch, sr_scores, to_luma
from n3images.sr import validation_pairs as sr_validation_pairs
from n3images.training import BASE_CSV_FIELDS, ImageTask, add_common_arguments, check_common_arguments, run_training

DEFAULT_SCALES = (2, 3, 4)
DEGRADATION = ("MATLAB bicubic imresize (a=-0.5, antialiased) down by 1/scale and up by scale, float64, not quantised; "
               "luma Y (BT.601, rgb2ycbcr; grey images as R=G=B) rounded to 8-bit levels")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_arguments(p, SR_MODELS, default_model="n3net", epochs=10, samples_per_epoch=1600, crop=48, batch_size=16,
                         lr=1e-4)
    p.add_argument("--scales", type=int, nargs="+", default=list(DEFAULT_SCALES), metavar="S",
                   help="upscaling factors trained together (one drawn per step)")
    args = p.parse_args(argv)
    check_common_arguments(p, args)
    if any(s < 2 for s in args.scales):
        p.error(f"--scales must be integers >= 2, got {' '.join(map(str, args.scales))}")
    args.scales = sorted(set(args.scales))
    if args.crop < 2 * max(args.scales):
        p.error(f"--crop {args.crop} is too small for scale {max(args.scales)}: at least {2 * max(args.scales)} pixels")
    return args


def step_scale(args, epoch: int, step: int) -> int:
    """The scale of a training step: a function of (seed, epoch, step), the same in every process."""
    rng = np.random.default_rng([args.seed, epoch, step, 7])
    return int(args.scales[int(rng.integers(len(args.scales)))])


def sr_batch(clean: torch.Tensor, args, gen: torch.Generator, epoch: int, step: int):
    """(bicubic input, target, {"scale": s}) of a batch of luma crops at this step's scale."""
    s = step_scale(args, epoch, step)
    side = clean.shape[-1] - clean.shape[-1] % s
    hr = clean[..., :side, :side]
    return degrade_batch(hr, s), hr, {"scale": s}


def prepare_images(images: list[np.ndarray], args) -> list[np.ndarray]:
    return [to_luma(img, quantize=True).astype(np.float32) for img in images]


def validation_pairs(images: list[np.ndarray], args) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    """(bicubic input, ground truth, "x<scale>") for every validation image and scale."""
    return [(torch.from_numpy(inp)[None, None], torch.from_numpy(hr.astype(np.float32))[None, None], f"x{s}")
            for inp, hr, s in sr_validation_pairs(images, args.scales)]


def score(out: torch.Tensor, target: torch.Tensor, tag: str) -> tuple[float, float]:
    return sr_scores(out[0].numpy(), target[0].numpy(), int(tag[1:]))


def export_meta(ckpt: dict) -> dict:
    return {"scales": list(ckpt["args"]["scales"]), "degradation": DEGRADATION, "input": "bicubic-upscaled luma Y"}


def make_task(args) -> ImageTask:
    return ImageTask(
        name="super-resolution",
        program="pipelines/train_sr.py",
        models=SR_MODELS,
        base_conf=lambda a: {"channels": 1},
        read_mode=lambda a: "auto",
        make_batch=sr_batch,
        validation_pairs=validation_pairs,
        score=score,
        resume_keys=("scales",),
        describe=lambda a: f"scales: {' '.join(f'x{s}' for s in a.scales)}",
        export_meta=export_meta,
        prepare_images=prepare_images,
        csv_fields=BASE_CSV_FIELDS[:7] + [f"val_psnr_x{s}" for s in args.scales] + BASE_CSV_FIELDS[7:],
        train_label="train (bicubic crops, all scales)",
        model_kwargs=lambda tag: {"scale": int(tag[1:])},
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    return run_training(make_task(args), args, argv, WEIGHTS_DIR)


if __name__ == "__main__":
    main()
