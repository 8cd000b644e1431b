"""What the image programs of ``pipelines/`` share: model and data loading with one-line errors, JSON, progress.

``eval_denoise.py`` and ``eval_sr.py`` load their test folders, weights and output paths with
these functions (every input checked before the first slow step, :class:`n3sets.cli.UsageError`
naming the argument otherwise); ``denoise.py`` and ``upscale.py`` check their output file and
report tile progress with them.
"""
from __future__ import annotations

import hashlib
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from n3sets.cli import UsageError, add_threads_argument, check_writable_folder, cpu_info, write_json
from n3sets.pretrained import resolve_weights, weights_name
from n3sets.training import resolve_device

from .inference import DEFAULT_TILE
from .io import image_bit_depth, list_images, read_image, same_file, write_image

__all__ = ["WRITE_SUFFIXES", "pick_device", "load_image_model", "sha256", "load_models", "load_dataset", "dataset_names",
           "check_writable", "check_output", "write_json", "image_file_names", "format_table", "TileProgress",
           "command_line", "progress", "Scores", "eval_settings", "finish_eval", "add_eval_arguments",
           "check_eval_arguments", "add_image_output_arguments",
           "output_bit_depth", "write_output"]

WRITE_SUFFIXES = {".png": (8, 16), ".tif": (8, 16), ".tiff": (8, 16), ".jpg": (8,), ".jpeg": (8,)}


def pick_device(name: str) -> torch.device:
    """``--device`` as a torch device; UsageError naming it when it is malformed or absent.

    On CUDA the evaluation and inference programs compute in full float32: TF32 convolutions and
    matrix products (cuDNN's default for convolutions) are turned off, so that PSNR figures made on
    a GPU agree with the CPU's instead of losing about three decimal digits in every layer.
    """
    try:
        device = resolve_device(name)
    except ValueError as exc:
        raise UsageError(f"--device {name}: {exc}") from None
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return device


def load_image_model(spec: str, task: str | None = None, option: str = "--weights"):
    """``(model, path)`` of an image model (of ``task``, when given); UsageError naming ``spec`` otherwise."""
    from . import load_model

    try:
        model = load_model(spec, task=task)  # its errors name the file and list the shipped image models
        path = resolve_weights(spec)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"{option} {spec}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 -- a weight file that does not fit its class, etc.
        raise UsageError(f"{option} {spec}: cannot load the model from {spec}: {type(exc).__name__}: {exc}") from None
    return model, path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_models(specs: list[str], device: torch.device, *, program: str, reserved: tuple[str, ...],
                task: str | None = None, check: Callable | None = None) -> tuple[dict, dict, dict]:
    """``(models, weights_info, duplicates)`` of ``--weights`` specs, named by :func:`weights_name`.

    The same weight content given twice is loaded once (a note on stderr); a name in ``reserved``
    (the baselines') or two different files with one name are UsageErrors. ``check(spec, model)``
    may raise a UsageError for a model the program cannot use.
    """
    models, info, duplicates, by_hash, paths = {}, {}, {}, {}, {}
    for spec in specs:
        model, path = load_image_model(spec, task)
        if check is not None:
            check(spec, model)
        digest = sha256(path)
        name = weights_name(spec)
        if digest in by_hash:
            first = by_hash[digest]
            duplicates[spec] = first
            print(f"{program}: note: --weights {spec} is the same weight file as {first!r} "
                  f"(identical content); evaluated once, as {first!r}", file=sys.stderr)
            continue
        if name in reserved:
            raise UsageError(f"--weights {spec}: the method name {name!r} is reserved ({', '.join(reserved)}); "
                             "rename the weight file")
        if name in models:
            raise UsageError(f"--weights: two different weight files are both named {name!r} ({paths[name]} and "
                             f"{path}); methods are named by file stem, so rename or copy one of them")
        by_hash[digest], paths[name] = name, path
        models[name] = model.to(device).eval()
        info[name] = {
            "spec": spec,
            "path": str(path),
            "sha256": digest,
            "class": type(model).__name__,
            "conf": model.conf,
            "parameters": sum(p.numel() for p in model.parameters()),
            "meta": getattr(model, "meta", {}) or {},
        }
    return models, info, duplicates


def load_dataset(folder: str, max_images: int | None, mode: str = "gray",
                 min_side: int = 11) -> tuple[list[Path], list[np.ndarray]]:
    """Sorted image paths of ``folder`` and the images (read with ``mode``), all checked before any work."""
    try:
        paths = list_images(folder)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"--data {folder}: {exc}") from None
    if max_images is not None:
        paths = paths[:max_images]
    images = []
    for p in paths:
        try:
            img = read_image(p, mode)
        except (ValueError, FileNotFoundError) as exc:
            raise UsageError(f"--data {folder}: {exc}") from None
        if min(img.shape[:2]) < min_side:
            raise UsageError(f"--data {folder}: image {p} is {img.shape[1]}x{img.shape[0]}; "
                             f"SSIM needs at least {min_side}x{min_side}")
        if not np.isfinite(img).all():
            raise UsageError(f"--data {folder}: image {p} holds NaN or infinite values")
        images.append(img)
    return paths, images


def dataset_names(folders: list[str]) -> list[str]:
    """The results key of every ``--data`` folder (its name); UsageError for two with one name."""
    names = []
    for folder in folders:
        name = Path(folder).resolve().name or str(folder)
        if name in names:
            raise UsageError(f"--data: two folders are both named {name!r} ({folders[names.index(name)]} and {folder}); "
                             "results are keyed by folder name")
        names.append(name)
    return names


def check_writable(path: Path, what: str) -> None:
    """Fail now, not after the evaluation, when ``path`` (a file or folder to be) cannot be written."""
    parent = path if what == "--save-images" else path.parent
    check_writable_folder(parent, f"{what} {path}")
    if what == "--json" and path.is_dir():
        raise UsageError(f"--json {path}: is a folder")


def check_output(inp: Path, out: Path, overwrite: bool, bit_depth: int | None) -> None:
    """Everything about an output image OUT that can be checked before the (slow) processing."""
    suffix = out.suffix.lower()
    if suffix not in WRITE_SUFFIXES:
        raise UsageError(f"OUT {out}: unsupported suffix {out.suffix or '(none)'}; use one of {', '.join(WRITE_SUFFIXES)}")
    if bit_depth is not None and bit_depth not in WRITE_SUFFIXES[suffix]:
        raise UsageError(f"--bit-depth {bit_depth}: {suffix} files are {'/'.join(map(str, WRITE_SUFFIXES[suffix]))}-bit")
    if same_file(inp, out):
        raise UsageError(f"OUT {out} is the input file; write the result to another file")
    if out.is_dir():
        raise UsageError(f"OUT {out} is a folder; give a file name")
    if out.exists() and not overwrite:
        raise UsageError(f"OUT {out} exists; pass --overwrite to replace it")
    check_writable_folder(out.parent, f"OUT {out}")



def read_input_image(inp: Path, out: Path, overwrite: bool, bit_depth: int | None) -> tuple[np.ndarray, int]:
    """A user's input image and its bit depth, after the output check (UsageError naming IN otherwise)."""
    if not inp.exists():
        raise UsageError(f"IN {inp}: no such file")
    check_output(inp, out, overwrite, bit_depth)
    try:
        image = read_image(inp, "auto")
        in_depth = image_bit_depth(inp)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"IN {inp}: {exc}") from None
    if not np.isfinite(image).all():
        raise UsageError(f"IN {inp}: the image holds NaN or infinite values")
    return image, in_depth

def image_file_names(paths: list[Path]) -> list[str]:
    """PNG file names for saved outputs: the stems, or the full names when two stems collide."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return [f"{s}.png" for s in stems]
    return [f"{p.name}.png" for p in paths]  # a.png and a.jpg in one folder: keep the suffix


def output_bit_depth(out: Path, requested: int | None, in_depth: int) -> int:
    """Bits per sample of OUT: ``--bit-depth``, else the input's (at most 16) where the format holds it, else 8."""
    return requested or (8 if WRITE_SUFFIXES[out.suffix.lower()] == (8,) else min(in_depth, 16))


def write_output(out: Path, image: np.ndarray, bit_depth: int, inp: Path) -> Path:
    """Write a program's result (never over ``inp``); UsageError naming OUT when it cannot be written."""
    try:
        return write_image(out, image, bit_depth=bit_depth, protect=inp)
    except OSError as exc:
        raise UsageError(f"OUT {out}: cannot write: {exc}") from None


def command_line(program: str, argv=None) -> str:
    """The command as typed: ``python pipelines/PROGRAM ARGS`` (``argv`` when the program runs in-process)."""
    return " ".join(["python", f"pipelines/{program}"] + (sys.argv[1:] if argv is None else list(argv)))


def progress(n: int, desc: str, quiet: bool):
    """``range(n)``, with a tqdm bar on stderr unless ``quiet``."""
    if quiet:
        return range(n)
    from tqdm import tqdm

    return tqdm(range(n), desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


class Scores:
    """Per-image PSNR, SSIM and seconds of several methods, and their means: the evaluation JSON's
    ``{"methods": {NAME: {"psnr", "ssim", "time_s"}}, "per_image": {NAME: [...]}, "per_image_ssim": ...}``."""

    def __init__(self, names):
        self.names = list(names)
        self.psnr = {n: [] for n in self.names}
        self.ssim = {n: [] for n in self.names}
        self.time = {n: [] for n in self.names}

    def add(self, name: str, psnr: float, ssim: float, seconds: float) -> None:
        self.psnr[name].append(psnr)
        self.ssim[name].append(ssim)
        self.time[name].append(seconds)

    def result(self) -> dict:
        summary = {n: {"psnr": float(np.mean(self.psnr[n])), "ssim": float(np.mean(self.ssim[n])),
                       "time_s": float(np.mean(self.time[n]))} for n in self.names}
        return {"methods": summary, "per_image": self.psnr, "per_image_ssim": self.ssim}


def eval_settings(program: str, argv, args, names: list[str], datasets: dict, weights_info: dict, duplicates: dict,
                  device: torch.device, seconds: float, *, read_mode: str, first: dict, **specific) -> dict:
    """The ``settings`` of an evaluation JSON: the command, what the program adds (``specific``), the
    data, weights and machine."""
    return {
        "command": command_line(program, argv),
        **specific,
        "data": {name: str(folder) for name, folder in zip(names, args.data)},
        "images": {name: [p.name for p in paths] for name, (paths, _) in datasets.items()},
        "max_images": args.max_images,
        "read_mode": read_mode,
        "weights": weights_info,
        "weights_duplicates": duplicates,
        "tile": args.tile,
        "device": str(device),
        **(cpu_info() if device.type == "cpu" else {}),
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "seconds": seconds,
        "first": first,
    }


def finish_eval(args, out: dict) -> dict:
    """Write ``out`` to ``--json`` (atomically) and say where the outputs are."""
    if args.json:
        write_json(Path(args.json), out)
        print(f"wrote {args.json}")
    if args.save_images:
        print(f"images in {args.save_images}")
    return out


def add_eval_arguments(p, save_layout: str) -> None:
    """The options ``eval_denoise.py`` and ``eval_sr.py`` share (``save_layout``: where ``--save-images``
    puts an output); check them with :func:`check_eval_arguments`."""
    p.add_argument("--json", metavar="OUT.json", help="write the results here")
    p.add_argument("--save-images", metavar="DIR", help=f"write every output as 8-bit PNG: DIR/{save_layout}")
    p.add_argument("--max-images", type=int, metavar="N", help="only the first N images (sorted order) of each folder")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE, help="inference tile side in pixels (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    add_threads_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def check_eval_arguments(p, args) -> None:
    """``p.error`` for a ``--max-images`` or ``--tile`` below 1."""
    if args.max_images is not None and args.max_images < 1:
        p.error("--max-images must be >= 1")
    if args.tile < 1:
        p.error("--tile must be >= 1")


def add_image_output_arguments(p, tile_help: str = "tile side in pixels") -> None:
    """The options ``denoise.py`` and ``upscale.py`` share: ``--bit-depth``, ``--tile``, ``--device``,
    ``--threads``, ``--overwrite``, ``--quiet``."""
    p.add_argument("--bit-depth", type=int, choices=(8, 16),
                   help="bits per sample of OUT (default: the input's for PNG/TIFF, 8 for JPEG)")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE, help=f"{tile_help} (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    add_threads_argument(p)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never IN)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def format_table(methods: dict) -> str:
    rows = ["| method | PSNR | SSIM | s/image |", "|---|---:|---:|---:|"]
    for name, m in methods.items():
        rows.append(f"| {name} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['time_s']:.3f} |")
    return "\n".join(rows)


class TileProgress:
    """``progress(done, total)`` for tiled inference: a tile counter on stderr (``label: tile 3/8``)."""

    def __init__(self, enabled: bool, label: str = "denoising"):
        self.enabled, self.label, self.tty, self.last = enabled, label, sys.stderr.isatty(), 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            print(f"\r{self.label}: tile {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
        elif done == total or now - self.last >= 5.0 or done == 1:
            print(f"{self.label}: tile {done}/{total}", file=sys.stderr, flush=True)
            self.last = now
