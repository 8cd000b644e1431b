"""Saving and loading models (correspondence and, once registered, image models) with their configuration.

A weight file is a ``torch.save`` dict::

    {"format": "n3sets-model", "version": 1, "class": "N3Net", "module": "n3sets.models", "conf": {...},
     "state_dict": {...}, "meta": {"command": ..., "data": ..., "epochs": ..., "val_mAP20": ...}}

so ``load_model`` needs no flags. Shipped files live in ``n3sets/weights/NAME.pt`` (and in the
folders other packages register, e.g. ``n3images/weights``) and are loaded by name
(``load_model("n3net-strecha")``); any path works too. Model classes outside this package are
registered with :func:`register_model_class`; ``module`` says where to import them from.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

__all__ = ["save_model", "load_model", "read_weight_file", "check_weight_payload", "resolve_weights", "weights_name",
           "available_models", "register_model_class", "register_weights_dir", "WEIGHTS_DIR", "WEIGHTS_DIRS",
           "MODEL_CLASSES"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# folders searched for shipped names, in order; n3images adds its own on import
WEIGHTS_DIRS = [WEIGHTS_DIR]
FORMAT = "n3sets-model"
VERSION = 1

# class name -> class; the correspondence models are registered on first use, other packages
# (n3images) register theirs with register_model_class when imported
_REGISTRY: dict = {}
MODEL_CLASSES = ("CNNet", "N3Net")  # the classes of this package (kept for older callers)


def register_model_class(cls: type, name: str | None = None) -> type:
    """Make ``cls`` savable and loadable by :func:`save_model` / :func:`load_model` (usable as a decorator)."""
    name = name or cls.__name__
    other = _REGISTRY.get(name)
    if other is not None and other is not cls:
        raise ValueError(f"model class name {name!r} is already registered for {other.__module__}.{other.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def register_weights_dir(path: str | os.PathLike) -> None:
    """Add a folder of shipped weight files (``NAME.pt``) to the names :func:`resolve_weights` knows."""
    path = Path(path).resolve()
    if path not in WEIGHTS_DIRS:
        WEIGHTS_DIRS.append(path)


def _model_classes() -> dict:
    from .models import CNNet, N3Net

    for cls in (CNNet, N3Net):
        _REGISTRY.setdefault(cls.__name__, cls)
    return _REGISTRY


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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


def read_weight_file(name_or_path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The raw dict of a weight file (see module docstring), validated."""
    path = resolve_weights(name_or_path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt or foreign file: say which one
        raise ValueError(f"cannot read weight file {path}: {exc}") from exc
    return check_weight_payload(payload, path)


def check_weight_payload(payload: object, path: str | os.PathLike) -> dict:
    """Validate a loaded weight-file dict (see module docstring); returns it with ``path`` added."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an n3sets model file (missing format={FORMAT!r}); "
                         "training checkpoints are exported with pipelines/train_corr.py --export")
    _class_for(payload, path)
    payload["path"] = str(path)
    return payload


def load_model(name_or_path: str | os.PathLike, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Model from a shipped name or a weight file, in eval mode; ``model.meta`` holds the meta dict."""
    payload = read_weight_file(name_or_path, map_location)
    model = _class_for(payload, payload["path"])(payload["conf"])
    model.load_state_dict(payload["state_dict"])
    model.meta = payload.get("meta", {})
    return model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()
