"""What every command-line program of this project shares: one error class and one-line reports.

A program raises :class:`UsageError` (or lets a library ``ValueError`` / ``FileNotFoundError``
/ ``OSError`` through) for bad input; its ``main`` prints :func:`one_line` of it on stderr as
``PROGRAM: error: ...`` and exits with status 2.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["UsageError", "one_line", "check_writable_folder", "load_weights_arg"]


class UsageError(ValueError):
    """A bad argument or input: reported on one line, exit code 2."""


def one_line(exc: BaseException) -> str:
    """The first line of an error message (torch's unpickling errors run over many lines)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] + (" [...]" if len(lines) > 1 else "")


def check_writable_folder(folder, label: str) -> None:
    """UsageError unless files can be created in ``folder`` (or its nearest existing ancestor).

    ``label`` starts the message (e.g. ``"--json out/r.json"``). Nothing is left behind.
    """
    probe = Path(folder)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{label}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{label}: folder {probe} is not writable")
    try:  # os.access says yes to root everywhere: try it (the probe file is removed at once)
        with tempfile.TemporaryFile(dir=probe, prefix=".n3-write-probe-"):
            pass
    except OSError as exc:
        raise UsageError(f"{label}: cannot write to folder {probe} ({exc.strerror or exc})") from None


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def load_weights_arg(spec, option: str = "--weights", map_location="cpu"):
    """``(model, path)`` of a weights argument (shipped name or file), UsageError naming it otherwise.

    A file that torch cannot read (truncated, random bytes, an h5 dataset given by mistake) is
    reported as such, not with torch's advice to load it with ``weights_only=False`` (which would
    run code from an untrusted file).
    """
    from .pretrained import load_model, resolve_weights

    try:
        path = resolve_weights(spec)
    except FileNotFoundError as exc:
        raise UsageError(f"{option} {spec}: {one_line(exc)}") from None
    try:
        return load_model(path, map_location=map_location), path
    except ValueError as exc:
        if exc.__cause__ is None:  # our own check of a readable file: its message is informative
            raise UsageError(f"{option} {spec}: {one_line(exc)}") from None
        try:
            with open(path, "rb") as f:
                head = f.read(8)
        except OSError:
            head = b""
        kind = ("it is an HDF5 file (a dataset?), not a weight file" if head == _HDF5_SIGNATURE
                else "truncated, corrupt or not a weight file")
        raise UsageError(f"{option} {spec}: cannot read {path}: {kind}; weight files are written by "
                         "n3sets.pretrained.save_model (train_corr.py --export)") from None
    except Exception as exc:  # noqa: BLE001 -- e.g. weights that do not fit the model class of the file
        raise UsageError(f"{option} {spec}: cannot load the model from {path}: {type(exc).__name__}: {one_line(exc)}") from None
