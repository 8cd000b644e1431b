"""Saving and loading models (correspondence and, once registered, image models) with their configuration.

A weight file is a ``torch.save`` dict::

    {"format": "n3sets-model", "version": 1, "class": "N3Net", "module": "n3sets.models", "conf": {...},
     "state_dict": {...}, "meta": {"command": ..., "data": ..., "epochs": ..., "val_mAP20": ...}}

so ``load_model`` needs no flags. Shipped files live in ``n3sets/weights/NAME.pt`` (and in the
folders other packages register, e.g. ``n3images/weights``) and are loaded by name
(``load_model("n3net-strecha")``); any path works too. Model classes outside this package are
registered with :func:`register_model_class`; ``module`` says where to import them from.

:func:`load_model` (and so every program's ``--weights``, ``MatchFilter.from_pretrained``,
``n3images.load_model`` and ``hubconf``) also reads the checkpoints the trainers write
(``OUT/last.pt``, ``OUT/best.pt`` of ``pipelines/train_corr.py``, ``train_denoise.py``,
``train_sr.py``): it takes the model's ``--model`` name, conf and weights from them and ignores the
optimiser state. Both kinds of file are read with ``torch.load(weights_only=True)``; for a
checkpoint, whose RNG state holds numpy's Mersenne-Twister array, numpy's array reconstruction is
allowed as well (:func:`read_checkpoint`) and nothing else.

This module holds the one registry of model classes: class name -> class for the weight files,
and per task (``correspondence``, ``denoising``, ``super-resolution``) the names the trainers'
``--model`` takes (:func:`model_classes`), which is how a checkpoint names its model.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .cli import atomic_write

__all__ = ["save_model", "load_model", "read_weight_file", "read_checkpoint", "check_weight_payload",
           "checkpoint_payload", "build_model", "resolve_weights", "weights_name", "available_models",
           "register_model_class", "register_weights_dir", "model_class", "model_classes", "TASKS", "WEIGHTS_DIR",
           "WEIGHTS_DIRS", "MODEL_CLASSES"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# folders searched for shipped names, in order; n3images adds its own on import
WEIGHTS_DIRS = [WEIGHTS_DIR]
FORMAT = "n3sets-model"
VERSION = 1

#: the tasks a model class can be registered for (a trainer checkpoint records its task)
TASKS = ("correspondence", "denoising", "super-resolution")

# class name -> class; the correspondence models are registered on first use, other packages
# (n3images) register theirs with register_model_class when imported
_REGISTRY: dict[str, type] = {}
# task -> {name the trainer's --model takes -> class name}
_TASK_NAMES: dict[str, dict[str, str]] = {}
# the module whose import registers the classes of a task
_TASK_MODULES = {"correspondence": "n3sets.models", "denoising": "n3images.models",
                 "super-resolution": "n3images.models"}
# n3images.models registers its classes without a task; until it passes task=, its --model
# dicts of that module name them (bridge read by _ensure_task)
MODEL_CLASSES = ("CNNet", "N3Net")  # the classes of this package (kept for older callers)


def register_model_class(cls: type, name: str | None = None, *, task: str | None = None,
                         program_name: str | None = None) -> type:
    """Make ``cls`` savable and loadable by :func:`save_model` / :func:`load_model` (usable as a decorator).

    Args:
        name: the class name recorded in weight files (default ``cls.__name__``).
        task: one of :data:`TASKS`; with it ``cls`` is also known under ``program_name`` (default
            ``name.lower()``), the name its trainer's ``--model`` takes and its checkpoints record.
    """
    name = name or cls.__name__
    other = _REGISTRY.get(name)
    if other is not None and other is not cls:
        raise ValueError(f"model class name {name!r} is already registered for {other.__module__}.{other.__qualname__}")
    if task is not None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        program_name = program_name or name.lower()
        taken = _TASK_NAMES.get(task, {}).get(program_name)
        if taken is not None and taken != name:
            raise ValueError(f"{task} model name {program_name!r} is already registered for class {taken!r}")
    _REGISTRY[name] = cls
    if task is not None:
        _TASK_NAMES.setdefault(task, {})[program_name] = name
    return cls


def register_weights_dir(path: str | os.PathLike) -> None:
    """Add a folder of shipped weight files (``NAME.pt``) to the names :func:`resolve_weights` knows."""
    path = Path(path).resolve()
    if path not in WEIGHTS_DIRS:
        WEIGHTS_DIRS.append(path)


def _model_classes() -> dict:
    from .models import CNNet, N3Net

    for cls in (CNNet, N3Net):
        if _TASK_NAMES.get("correspondence", {}).get(cls.__name__.lower()) != cls.__name__:
            register_model_class(cls, task="correspondence")
    return _REGISTRY


def _ensure_task(task: str) -> dict[str, str]:
    """``--model`` name -> class name of ``task``, importing the module that registers its classes."""
    import importlib

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    _model_classes()
    if not _TASK_NAMES.get(task):
        importlib.import_module(_TASK_MODULES[task])  # its classes register themselves on import
    return _TASK_NAMES.get(task, {})


def model_classes(task: str) -> dict[str, type]:
    """The model classes of ``task`` by the name the trainer's ``--model`` takes
    (``model_classes("correspondence") == {"cnnet": CNNet, "n3net": N3Net}``)."""
    return {program_name: _REGISTRY[name] for program_name, name in sorted(_ensure_task(task).items())}


def model_class(name: str, task: str | None = None) -> type:
    """A registered class by class name (``"N3Net"``) or, with ``task``, by ``--model`` name (``"n3net"``).

    Raises:
        ValueError: no such class; the message lists the known names.
    """
    if task is None:
        classes = _model_classes()
        if name not in classes:
            raise ValueError(f"unknown model class {name!r} (known: {', '.join(sorted(classes))})")
        return classes[name]
    names = _ensure_task(task)
    if name not in names:
        raise ValueError(f"unknown {task} model {name!r} (known: {', '.join(sorted(names))})")
    return _REGISTRY[names[name]]


def _class_for(payload: dict, path):
    """The registered class of a weight file, importing the module that defines it when needed."""
    name, module = payload.get("class"), payload.get("module")
    classes = _model_classes()
    if name not in classes and isinstance(module, str) and module.split(".")[0] in ("n3sets", "n3images"):
        import importlib

        importlib.import_module(module)  # registers its classes
    if name not in classes:
        raise ValueError(f"{path}: unknown model class {name!r} (known: {', '.join(sorted(classes))})")
    return classes[name]


def available_models() -> list[str]:
    """Names of the shipped weight files (``NAME.pt`` in every registered weights folder)."""
    return sorted({p.stem for d in WEIGHTS_DIRS if d.is_dir() for p in d.glob("*.pt")})


def weights_name(name_or_path: str) -> str:
    """Display name of a weights argument: the shipped name, or the file stem of a path."""
    return Path(name_or_path).stem if name_or_path.endswith(".pt") or os.sep in name_or_path else name_or_path


def resolve_weights(name_or_path: str | os.PathLike) -> Path:
    """Path of a weight file given a shipped name (``"n3net-strecha"``) or a file path.

    Raises:
        FileNotFoundError: neither an existing file nor a shipped name; the message lists
            the available names.
    """
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_file():
        return path
    if len(path.parts) == 1:
        for folder in WEIGHTS_DIRS:
            shipped = folder / (path.name if path.suffix == ".pt" else f"{path.name}.pt")
            if shipped.is_file():
                return shipped
    names = available_models()
    raise FileNotFoundError(
        f"no weight file {str(name_or_path)!r}: not an existing path and not a shipped model name "
        f"(available: {', '.join(names) if names else 'none'}; shipped files live in "
        f"{', '.join(str(d) for d in WEIGHTS_DIRS)})")


def _plain(value, where: str):
    """Check that meta/conf hold only plain Python values (loadable with weights_only=True)."""
    if value is None:
        return value
    # exact builtin types only: subclasses (torch's TorchVersion is a str, numpy's float64 a
    # float) would need their class at load time, which weights_only=True refuses
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, where) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    raise ValueError(f"{where} must hold plain values (str, int, float, bool, list, dict), got {type(value).__name__}")


def atomic_torch_save(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the target folder, then ``os.replace`` it into place."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def save_model(path: str | os.PathLike, model: torch.nn.Module, **meta: object) -> Path:
    """Write ``model`` (class name + conf + weights) and ``meta`` to ``path`` atomically.

    Args:
        path: target file (``.pt``); parent folders are created.
        model: a :class:`~n3sets.models.CNNet` or :class:`~n3sets.models.N3Net` (a DDP wrapper is unwrapped).
        **meta: plain values describing how the weights were made (command, data, epochs, val mAP...).
    """
    model = getattr(model, "module", model)
    name = type(model).__name__
    if _model_classes().get(name) is not type(model):
        raise ValueError(f"model must be one of the registered classes {sorted(_model_classes())}, got {name}")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "class": name,
        "module": type(model).__module__,
        "conf": _plain(dict(model.conf), "conf"),
        "state_dict": state,
        "meta": _plain(dict(meta), "meta"),
    }
    return atomic_torch_save(payload, path)


def _numpy_array_globals() -> list:
    """What unpickling a numpy array needs (numpy's RNG state in a checkpoint is one): the array
    reconstructor, ndarray, dtype and the dtype classes of the arrays such states hold."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype,
            *{type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.uint64, np.bool_)}]


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """A trainer checkpoint (or weight file) loaded with ``torch.load(weights_only=True)``, numpy's
    array reconstruction allowed (the checkpoints' RNG state holds numpy's MT19937 state array).

    Raises:
        ValueError: unreadable (truncated, corrupt, or holding other objects); the message names ``path``.
    """
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt or foreign file: say which one
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ValueError(f"cannot read weight file {path}: {lines[0] if lines else type(exc).__name__}") from exc


#: the keys that make a dict a trainer checkpoint (``--model`` name, model conf, state dict)
CHECKPOINT_KEYS = ("model_name", "model_conf", "model")


def checkpoint_task(ckpt: dict) -> str:
    """The task of a trainer checkpoint: its ``task`` entry (image trainers), else from what its
    ``data`` entry describes (``train_pairs``: train_corr.py; ``train_images``: an image trainer
    from before checkpoints recorded the task, which only trained denoisers)."""
    task = ckpt.get("task")
    if task is not None:
        return task
    data = ckpt.get("data") if isinstance(ckpt.get("data"), dict) else {}
    if "train_images" in data or "device" in ckpt:
        return "denoising"
    return "correspondence"


def checkpoint_payload(ckpt: dict, path: str | os.PathLike) -> dict:
    """The weight-file dict (see module docstring) of a trainer checkpoint: class, conf and state
    dict of its model; ``meta`` says where it came from (``checkpoint``, ``task``, ``epochs``,
    ``step``, ``command``, ``best``, ``args``, and what the image programs check: ``noise`` /
    ``sigma`` of a denoiser, ``scales`` of an SR model). Optimiser and RNG state are left out."""
    task = checkpoint_task(ckpt)
    try:
        cls = model_class(ckpt["model_name"], task)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    commands = ckpt.get("commands") or ([ckpt["command"]] if ckpt.get("command") else [])
    meta = {"checkpoint": str(path), "task": task, "epochs": ckpt.get("epoch"), "step": ckpt.get("step"),
            "command": " && ".join(commands), "best": ckpt.get("best"), "args": args}
    if task == "denoising" and "noise" in args:  # as train_denoise.py --export records them
        meta["noise"] = args["noise"]
        meta["sigma"] = args.get("sigma") if args["noise"] == "gaussian" else None
    if task == "super-resolution" and "scales" in args:
        meta["scales"] = list(args["scales"])
    try:
        meta = _plain(meta, "meta")
    except ValueError:  # a value torch stored that is not plain: keep what says where the model came from
        meta = {k: meta[k] for k in ("checkpoint", "task", "epochs", "step", "command")}
    return {"format": FORMAT, "version": VERSION, "class": cls.__name__, "module": cls.__module__,
            "conf": dict(ckpt["model_conf"]), "state_dict": ckpt["model"], "meta": meta, "path": str(path)}


def read_weight_file(name_or_path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The dict of a weight file (see module docstring), validated; a trainer checkpoint is read
    as the weight file of its model (:func:`checkpoint_payload`)."""
    path = resolve_weights(name_or_path)
    payload = read_checkpoint(path, map_location)
    if isinstance(payload, dict) and payload.get("format") != FORMAT and all(k in payload for k in CHECKPOINT_KEYS):
        return checkpoint_payload(payload, path)
    return check_weight_payload(payload, path)


def check_weight_payload(payload: object, path: str | os.PathLike) -> dict:
    """Validate a loaded weight-file dict (see module docstring); returns it with ``path`` added."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an n3sets model file (format={FORMAT!r}) or a checkpoint of this "
                         "project's trainers (last.pt / best.pt)")
    _class_for(payload, path)
    payload["path"] = str(path)
    return payload


def build_model(payload: dict, pretrained: bool = True) -> torch.nn.Module:
    """The model a :func:`read_weight_file` dict describes: its class with its conf, with its
    weights and ``meta`` (``pretrained=False``: freshly initialised, empty ``meta``), train mode."""
    model = _class_for(payload, payload.get("path", "weight file"))(payload["conf"])
    if pretrained:
        model.load_state_dict(payload["state_dict"])
    model.meta = payload.get("meta", {}) if pretrained else {}
    return model


def load_model(name_or_path: str | os.PathLike, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Model from a shipped name, a weight file or a trainer checkpoint (``OUT/best.pt``), in eval
    mode; ``model.meta`` holds the meta dict (for a checkpoint: see :func:`checkpoint_payload`)."""
    model = build_model(read_weight_file(name_or_path, map_location))
    return model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()
