"""n3images: image restoration with N3 blocks (Ploetz & Roth, 2018): denoising and super-resolution.

Built on :mod:`n3sets`' N3 engine (:func:`n3sets.engine.neighbour_volumes`); depends on n3sets,
never the other way round. Public names are resolved lazily from their modules. Shipped image
models live in ``n3images/weights/NAME.pt`` and load by name with :func:`load_model`.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing n3images stays cheap (torch loads on first use)
    import torch

_EXPORTS = {
    "N3Block2d": "n3images.n3block2d",
    "DnCNN": "n3images.models",
    "N3NetDenoiser": "n3images.models",
    "IMAGE_MODELS": "n3images.models",
    "VDSR": "n3images.models",
    "N3NetSR": "n3images.models",
    "SR_MODELS": "n3images.models",
    "imresize": "n3images.resize",
    "upscale_image": "n3images.sr",
    "denoise_image": "n3images.inference",
    "tiled_apply": "n3images.inference",
    "psnr": "n3images.metrics",
    "ssim": "n3images.metrics",
    "read_image": "n3images.io",
    "write_image": "n3images.io",
    "list_images": "n3images.io",
    "gaussian_noise": "n3images.noise",
    "add_gaussian_noise": "n3images.noise",
}

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

__all__ = sorted(_EXPORTS) + ["load_model", "available_models", "WEIGHTS_DIR"]


def _register_weights() -> None:
    from n3sets.pretrained import register_weights_dir

    register_weights_dir(WEIGHTS_DIR)


def load_model(name_or_path: str | os.PathLike, map_location: str | torch.device = "cpu",
               task: str | None = None) -> torch.nn.Module:
    """An image model from a shipped name (``"n3net-s25"``, ``"vdsr-x234"``) or a weight file, in eval mode.

    Args:
        task: None (any image model), ``"denoising"`` or ``"super-resolution"``: the model must
            be one for that task.

    Raises:
        FileNotFoundError: neither a file nor a shipped name (the message lists the image models).
        ValueError: an unreadable file, a model that is not an image model (e.g. a correspondence
            model such as ``n3net-strecha``), or one for another ``task``.
    """
    models = importlib.import_module("n3images.models")  # registers the image model classes
    from n3sets.pretrained import load_model as _load
    from n3sets.pretrained import resolve_weights

    try:
        path = resolve_weights(name_or_path)
    except FileNotFoundError:
        names = available_models()
        raise FileNotFoundError(
            f"no weight file {str(name_or_path)!r}: not an existing path and not a shipped image model "
            f"(available: {', '.join(names) if names else 'none'}; shipped files live in {WEIGHTS_DIR})") from None
    if task not in (None, "denoising", "super-resolution"):
        raise ValueError(f"task must be None, 'denoising' or 'super-resolution', got {task!r}")
    model = _load(path, map_location)
    kind = models.model_task(model)
    if kind is None:
        raise ValueError(f"{path} holds a {type(model).__name__} ({type(model).__module__}), which is not a denoiser "
                         f"or super-resolution model; image models are "
                         f"{', '.join(c.__name__ for c in models.IMAGE_MODEL_CLASSES)}")
    if task is not None and kind != task:
        other = ", ".join(c.__name__ for c in (models.SR_MODELS if task == "super-resolution" else models.DENOISERS).values())
        raise ValueError(f"{path} holds a {kind} model ({type(model).__name__}), not a {task} model ({other})")
    return model


_register_weights()


def available_models() -> list[str]:
    """Names of the shipped image models (``n3images/weights/*.pt``)."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.pt")) if WEIGHTS_DIR.is_dir() else []


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'n3images' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
