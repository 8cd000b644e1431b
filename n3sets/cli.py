"""What every command-line program of this project shares: one error class and one-line reports.

A program raises :class:`UsageError` (or lets a library ``ValueError`` / ``FileNotFoundError``
/ ``OSError`` through) for bad input; its ``main`` prints :func:`one_line` of it on stderr as
``PROGRAM: error: ...`` and exits with status 2 (:func:`errors_exit`).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

__all__ = ["UsageError", "one_line", "errors_exit", "check_writable_folder", "load_weights_arg", "DEFAULT_THREADS",
           "resolve_threads", "add_threads_argument", "atomic_write", "write_json", "cpu_info"]

#: what a program reports as bad input (one line, exit 2) rather than as a crash
INPUT_ERRORS = (ValueError, FileNotFoundError, OSError)


class UsageError(ValueError):
    """A bad argument or input: reported on one line, exit code 2."""


def one_line(exc: BaseException) -> str:
    """The first line of an error message (torch's unpickling errors run over many lines)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] + (" [...]" if len(lines) > 1 else "")


@contextmanager
def errors_exit(program: str):
    """Around a program's work: a :class:`UsageError` or a library ``ValueError`` /
    ``FileNotFoundError`` / ``OSError`` becomes ``PROGRAM: error: <one line>`` on stderr and
    ``SystemExit(2)``."""
    try:
        yield
    except INPUT_ERRORS as exc:
        print(f"{program}: error: {one_line(exc)}", file=sys.stderr)
        raise SystemExit(2) from None


@contextmanager
def atomic_write(path, mode: str = "w"):
    """Open a temporary file beside ``path`` for writing; when the block ends normally it is flushed to
    disk, given the permissions a plain ``open`` would and moved onto ``path`` with ``os.replace``;
    when it raises, it is removed. An interrupted write leaves the old file or none, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)  # mkstemp makes the file private (0600)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, obj, indent: int = 1) -> Path:
    """``obj`` as indented JSON at ``path``, atomically (:func:`atomic_write`)."""
    text = json.dumps(obj, indent=indent) + "\n"  # fails before anything is written
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def cpu_info() -> dict:
    """The processor, for reports of timings and of results that depend on it: ``{"cpu": model
    name, "cpu_capability": the vector instruction set torch's kernels use ("AVX2", "AVX512", ...)}``.

    Timings, and the last bits of float results (hence a training run's numbers), depend on it:
    MKL and torch pick their kernels per processor.
    """
    import platform

    import torch

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return {"cpu": name, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


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


#: torch CPU threads when none are asked for. Not torch's default (one per core): on a machine
#: whose cores are shared, every OpenMP parallel region waits for its slowest thread, and a thread
#: whose core another process holds is the slowest by a scheduler time slice. Measured on 2 cores
#: with one busy process: N3Net forward 4.7 s with 2 threads, 0.19 s with 1 (README, "CPU threads").
DEFAULT_THREADS = 1


def resolve_threads(threads: int | None = None) -> int:
    """The torch CPU thread count to use: ``threads`` itself (>= 1), or :data:`DEFAULT_THREADS` for None.

    Per process: under ``torchrun`` every process gets this many. ValueError for ``threads`` < 1.
    """
    if threads is None:
        return DEFAULT_THREADS
    if isinstance(threads, bool) or int(threads) != threads or threads < 1:
        raise ValueError(f"threads must be an integer >= 1 (or None for {DEFAULT_THREADS}), got {threads!r}")
    return int(threads)


def _thread_count(text: str) -> int:
    import argparse

    try:
        return resolve_threads(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None


def add_threads_argument(parser, *, per_process: bool = False, thread_independent: bool = False):
    """``--threads N`` with the same default and help in every program.

    The rule itself is :func:`resolve_threads` (default :data:`DEFAULT_THREADS`, 1); a program
    passes ``args.threads`` to :func:`n3sets.training.set_threads` (or ``dist_setup``). ``per_process``: a trainer that runs
    under torchrun; ``thread_independent``: the program calls ``set_threads(...,
    thread_independent=True)`` (oneDNN off), so its numbers do not depend on the thread count.
    """
    where = " per process (torchrun starts several)" if per_process else ""
    same = ("results are identical for N=1 and N=2 (oneDNN off, MKL strict mode); with N>2 they may differ in "
            "the last bits, which training amplifies"
            if thread_independent else "results may differ in the last digits between thread counts")
    return parser.add_argument(
        "--threads", type=_thread_count, default=DEFAULT_THREADS, metavar="N",
        help=f"torch CPU threads{where} (default %(default)s). More are faster only on cores that no other "
             "process uses: each multi-threaded step waits for its slowest thread, so one busy core makes "
             "N=2 up to 25x slower than N=1 (N3Net forward on 2 cores: 4.7 s vs 0.19 s); " + same)
