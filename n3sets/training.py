"""Generic training machinery shared by the trainers in ``pipelines/`` (``train_corr.py``, ...).

Nothing here knows about a model, a loss or a data set: process groups (``torchrun``), RNG
state for exact resumes, learning-rate schedule, output-folder safety, checkpoint loading and the
``log.csv`` / ``log.json`` / curve-plot files written every epoch. matplotlib and tqdm are
imported only when a plot or a progress bar is made.
"""
from __future__ import annotations

import csv
import os
import random
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .cli import DEFAULT_THREADS, resolve_threads, write_json
from .pretrained import atomic_torch_save

__all__ = ["resolve_device", "DEFAULT_THREADS", "resolve_threads", "set_threads", "torch_threads",
           "dist_setup", "dist_teardown", "barrier", "gather_lists", "all_reduce_sums", "seed_all", "rng_state",
           "set_rng_state", "progress_bar", "write_logs", "save_figure_atomic", "check_out_dir", "scheduled_lr",
           "export_target", "command_line", "load_checkpoint", "atomic_torch_save"]


def resolve_device(device=None, rank: int = 0) -> torch.device:
    """``None``/``"cpu"``: the CPU; ``"auto"``: CUDA when available, else the CPU; or any torch device string.

    A CUDA device without an index is GPU ``rank % device_count`` (one GPU per process under
    torchrun). Raises ValueError naming the request when it is malformed or CUDA is missing.
    """
    if device is None:
        return torch.device("cpu")
    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was requested but CUDA is not available on this machine; "
                             "use 'cpu' or 'auto'")
        if dev.index is None:
            dev = torch.device("cuda", rank % torch.cuda.device_count())
    return dev


# ----------------------------------------------------------------------------------------------
# CPU threads: one rule for every program (``--threads``) and for MatchFilter. The rule
# (DEFAULT_THREADS, resolve_threads) is in n3sets.cli, so that programs parse --threads without torch.
def set_threads(threads: int | None = None, *, thread_independent: bool = False) -> int:
    """``torch.set_num_threads(resolve_threads(threads))`` for the whole process; returns the count.

    ``thread_independent``: results that do not depend on the thread count. Two libraries order
    their sums by thread: oneDNN, which torch uses for 1x1 ``conv1d`` (the correspondence
    networks) with more than one thread, and MKL's GEMM on a single set (batch of one) with an
    output width that is not a multiple of its blocks (e.g. N3Net's 5-channel N3 input). Training
    amplifies the last-bit differences (the demo's best mAP20 was 0.104 with 1 thread, 0.224 with
    2). So oneDNN is turned off (no cost with one thread, where torch does not use it for these
    networks) and MKL's strict reproducible mode is asked for (``MKL_CBWR=AUTO,STRICT`` unless
    set; MKL reads it at its first call, so it works only before torch's first matrix product in
    the process, which is the case in this project's programs). Then the set networks' forward
    and backward are bit-identical for 1 and 2 threads (tests/test_threads.py), and so is the
    demo's training run. Not for more threads: MKL's weight-gradient products still differ in the
    last bits with 3 or 4 (measured; strict mode does not cover them), which is one reason the
    default is a fixed 1 and not the number of cores. Not for the image networks either: their
    3x3 ``conv2d`` is 3x faster with oneDNN even on one thread.
    """
    n = resolve_threads(threads)
    torch.set_num_threads(n)
    if thread_independent:
        os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
        torch.backends.mkldnn.enabled = False
    return n


@contextmanager
def torch_threads(threads: int | None = None, *, thread_independent: bool = False):
    """:func:`set_threads` for the body of a ``with`` only: the caller's settings are restored after.

    For library code (``MatchFilter``) that must not change a user's process-wide settings (they
    are process-wide while the body runs: not for code that runs torch in several Python threads).
    """
    n = resolve_threads(threads)
    old, old_mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    try:
        torch.set_num_threads(n)
        if thread_independent:  # as in set_threads (MKL_CBWR stays: MKL reads it once)
            os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
            torch.backends.mkldnn.enabled = False
        yield n
    finally:
        torch.set_num_threads(old)
        torch.backends.mkldnn.enabled = old_mkldnn


# ----------------------------------------------------------------------------------------------
# processes (plain ``python`` = one process; ``torchrun --nproc_per_node=N`` = N, gloo backend)
def dist_setup(threads: int | None, *, thread_independent: bool = False) -> tuple[int, int]:
    """Join the ``torchrun`` process group (gloo) if ``WORLD_SIZE`` > 1 and set torch's CPU threads.

    ``threads`` per process, resolved by :func:`resolve_threads` (None: :data:`DEFAULT_THREADS`);
    ``thread_independent`` as in :func:`set_threads`. Returns ``(rank, world)``; ``(0, 1)``
    without torchrun.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        _init_gloo_group(world)
    rank = dist.get_rank() if dist.is_initialized() else 0
    set_threads(threads, thread_independent=thread_independent)
    return rank, world


def _init_gloo_group(world: int) -> None:
    """``init_process_group("gloo")`` from torchrun's environment, safe across ``--max-restarts``.

    torchrun keeps one key-value store for all attempts of a worker group, and torch's ``env://``
    rendezvous does not separate the attempts: the gloo addresses that the crashed attempt
    registered are still there, and a restarted process may connect to a dead peer and time out.
    Restarted attempts (``TORCHELASTIC_RESTART_COUNT`` > 0) therefore use the store under a prefix
    of their own.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt == 0:
        dist.init_process_group("gloo")
        return
    rank = int(os.environ["RANK"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # hosted by torchrun itself
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"n3/attempt_{attempt}", store), rank=rank,
                            world_size=world)


def dist_teardown() -> None:
    """Leave the process group if one was joined (a no-op otherwise)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: int) -> None:
    """Wait for all ``world`` processes (a no-op for ``world == 1``)."""
    if world > 1:
        dist.barrier()


def gather_lists(obj: list, world: int) -> list:
    """Concatenate every process's list, in rank order (the list itself for ``world == 1``)."""
    if world == 1:
        return obj
    out = [None] * world
    dist.all_gather_object(out, obj)
    return [x for part in out for x in part]


def all_reduce_sums(sums: dict[str, float], world: int) -> dict[str, float]:
    """``{key: value}`` summed over all processes, as floats (same keys and order; a copy for ``world == 1``).

    For averaging logged losses: each process sums its per-step values and its step count, the
    caller divides the totals.
    """
    if world == 1:
        return {k: float(v) for k, v in sums.items()}
    keys = list(sums)
    t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


# ----------------------------------------------------------------------------------------------
# randomness
def seed_all(seed: int) -> None:
    """Seed torch, numpy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict:
    """The torch, numpy and Python RNG states (``{"torch", "numpy", "python"}``), for a checkpoint."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


# ----------------------------------------------------------------------------------------------
# progress and logs
def progress_bar(iterable: Iterable, desc: str, *, leave: bool = True, tty_interval: float = 1.0,
                 log_interval: float = 60.0):
    """A tqdm bar over ``iterable``: refreshed every ``tty_interval`` s on a terminal, every
    ``log_interval`` s when stderr goes to a file (so logs stay short)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=leave, dynamic_ncols=True,
                mininterval=tty_interval if sys.stderr.isatty() else log_interval)


def write_logs(out: Path, history: list[dict], info: dict, csv_fields: Sequence[str],
               plot_fn: Callable[[Path, list[dict]], None] | None = None, plot_name: str = "curves.png") -> None:
    """Write ``out/log.csv`` (columns ``csv_fields``, one row per ``history`` entry, missing keys
    empty), ``out/log.json`` (``{**info, "history": history}``), both atomically, then
    ``plot_fn(out / plot_name, history)``.

    A plot that raises prints a warning to stderr and is otherwise ignored: it never stops training.
    """
    out = Path(out)
    fields = list(csv_fields)
    tmp = out / "log.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: row.get(k, "") for k in fields})
    os.replace(tmp, out / "log.csv")
    write_json(out / "log.json", {**info, "history": history}, indent=2)
    if plot_fn is None:
        return
    try:
        plot_fn(out / plot_name, history)
    except Exception as exc:  # a plot must never stop a training run
        print(f"warning: could not write {plot_name}: {exc}", file=sys.stderr)


def save_figure_atomic(fig, path: Path, dpi: int = 100) -> Path:
    """Save the matplotlib figure ``fig`` to ``path`` (format from its suffix) via a temporary file
    and ``os.replace``, so a reader never sees half a file; then close ``fig``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# run folder, schedule, names
def check_out_dir(out: Path, resume: bool, overwrite: bool, exempt: bool = False) -> None:
    """Refuse (``SystemExit``) to start in a folder that already holds a run (``last.pt`` or
    ``best.pt``) unless ``resume`` or ``overwrite``; ``exempt`` (e.g. a demo default that may be
    rerun freely) skips that check. ``resume`` with ``overwrite`` is always refused."""
    out = Path(out)
    if resume and overwrite:
        raise SystemExit("--resume and --overwrite contradict each other: choose one")
    existing = [f.name for f in (out / "last.pt", out / "best.pt") if f.is_file()]
    if existing and not exempt and not (resume or overwrite):
        raise SystemExit(f"--out {out} already holds a training run ({', '.join(existing)}): pass --resume to "
                         "continue it, --overwrite to replace it, or choose another --out")


def scheduled_lr(base_lr: float, decay: float, milestones: Iterable[int], epoch: int) -> float:
    """Step schedule: learning rate of 1-based ``epoch`` = ``base_lr * decay**(number of milestones
    <= epoch)``. Milestones are absolute 1-based epochs, so a resumed run continues the schedule."""
    return base_lr * decay ** sum(1 for m in milestones if epoch >= m)


def export_target(name: str, weights_dir: Path) -> Path:
    """Where ``--export NAME`` writes: a bare name -> ``weights_dir/NAME.pt``; anything with a
    ``.pt`` suffix or a folder part is a path and stays as given."""
    path = Path(name)
    if path.suffix == ".pt" or len(path.parts) > 1:
        return path
    return Path(weights_dir) / f"{name}.pt"


def command_line(program: str, argv: Sequence[str] | None, world: int) -> str:
    """The command that reproduces this run: ``python PROGRAM ARGS`` or, for ``world`` > 1,
    ``torchrun --nproc_per_node=WORLD PROGRAM ARGS`` (shell-quoted; ``argv`` None: ``sys.argv[1:]``)."""
    args = shlex.join(sys.argv[1:] if argv is None else list(argv))
    launcher = f"torchrun --nproc_per_node={world}" if world > 1 else "python"
    return f"{launcher} {program} {args}"


# ----------------------------------------------------------------------------------------------
# checkpoints
def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint written by this project's trainers (``torch.load(weights_only=False)``: it
    holds RNG state and history, so only load files you trust).

    A missing, truncated or corrupt file raises ``SystemExit`` with a one-line message naming
    ``path`` (and, for a ``last.pt`` next to a ``best.pt``, pointing at the latter).
    """
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        msg = f"cannot read checkpoint {path} (truncated or corrupt?) -- {reason}"
        best = path.with_name("best.pt")
        if path.name == "last.pt" and best.is_file():
            msg += f"; {best} may be intact: copy it to {path} to continue from the best epoch"
        raise SystemExit(msg) from exc
