"""Reading, writing and listing images for the restoration experiments.

Images in memory are float32 numpy arrays in ``[0, 1]``: ``(H, W)`` grey or ``(H, W, 3)`` RGB.
On disk: 8- or 16-bit PNG / TIFF, 8-bit JPEG (read also: BMP, and float32 TIFF as stored).
"""
from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Iterable
from pathlib import Path

import cv2
import numpy as np

if TYPE_CHECKING:  # only named in annotations; importing torch here would slow image I/O
    import torch

__all__ = ["IMAGE_SUFFIXES", "read_image", "image_bit_depth", "write_image", "list_images"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_WRITE_DEPTHS = {".png": (8, 16), ".tif": (8, 16), ".tiff": (8, 16), ".jpg": (8,), ".jpeg": (8,)}
_MODES = ("auto", "gray", "rgb")


def _load_raw(path) -> tuple[Path, np.ndarray]:
    """The image as stored (cv2 channel order), after the checks that name the path."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    if not path.is_file():
        raise ValueError(f"not a file: {path}")
    # IMREAD_UNCHANGED keeps 16-bit depth and the alpha channel (dropped below, not composited)
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"cannot read {path} as an image (unsupported or corrupt file)")
    if img.size == 0:
        raise ValueError(f"image {path} is empty, shape {img.shape}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (3, 4))):
        raise ValueError(f"image {path} has an unsupported shape {img.shape} (expected grey, BGR or BGRA)")
    return path, img


def _bit_depth(img: np.ndarray, path: Path) -> int:
    if img.dtype == np.uint8:
        return 8
    if img.dtype == np.uint16:
        return 16
    if img.dtype == np.float32:
        return 32
    raise ValueError(f"image {path} has an unsupported sample type {img.dtype} (expected 8/16-bit or float32)")


def image_bit_depth(path) -> int:
    """Bits per sample of the stored image: 8, 16, or 32 (float TIFF)."""
    path, img = _load_raw(path)
    return _bit_depth(img, path)


def read_image(path: str | os.PathLike, mode: str = "auto") -> np.ndarray:
    """Read an image as float32 in ``[0, 1]``.

    Args:
        path: PNG, JPEG, TIFF or BMP file, 8 or 16 bit (float32 TIFFs are returned as stored).
        mode: ``"auto"`` keeps grey files ``(H, W)`` and colour files ``(H, W, 3)`` RGB;
            ``"gray"`` converts colour with BT.601 luminance (``cv2.COLOR_RGB2GRAY``:
            0.299 R + 0.587 G + 0.114 B, computed in float, no rounding to 8 bit);
            ``"rgb"`` repeats grey into three channels. An alpha channel is dropped.

    Returns:
        ``(H, W)`` or ``(H, W, 3)`` float32 array.

    Raises:
        FileNotFoundError: no such file. ValueError: not a readable image, empty, or a bad mode.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    path, img = _load_raw(path)
    depth = _bit_depth(img, path)
    if depth == 32:
        img = img.astype(np.float32, copy=True)
    else:
        img = img.astype(np.float32) / np.float32(2**depth - 1)
    if img.ndim == 3:
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2RGB)
        if mode == "gray":
            img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    elif mode == "rgb":
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img)


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (also through links or another spelling)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def write_image(path: str | os.PathLike, img: np.ndarray | torch.Tensor, bit_depth: int = 8,
                protect: str | os.PathLike | Iterable[str | os.PathLike] | None = None) -> Path:
    """Write a ``[0, 1]`` float image (values outside are clipped) atomically.

    The file is encoded in memory, written to a hidden temporary file in the target folder and
    moved into place with ``os.replace``, so a reader never sees a half-written image.

    Args:
        path: target file; the suffix picks the format: ``.png``, ``.tif``/``.tiff`` (8 or 16
            bit) or ``.jpg``/``.jpeg`` (8 bit, quality 95). Parent folders are created.
        img: ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` RGB, numpy or torch, finite values.
        bit_depth: 8 or 16.
        protect: a path or an iterable of paths (e.g. the input image) that must not be
            overwritten; ValueError if ``path`` is one of them.

    Returns:
        the written path.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _WRITE_DEPTHS:
        raise ValueError(f"cannot write {path}: suffix must be one of {sorted(_WRITE_DEPTHS)}")
    if bit_depth not in _WRITE_DEPTHS[suffix]:
        raise ValueError(f"cannot write {path}: bit_depth must be one of {_WRITE_DEPTHS[suffix]} for {suffix}, got {bit_depth!r}")
    if protect is not None:
        protected = [protect] if isinstance(protect, (str, os.PathLike)) else list(protect)
        for p in protected:
            if same_file(path, Path(p)):
                raise ValueError(f"refusing to overwrite protected file {p} (writing {path})")

    if hasattr(img, "detach"):  # torch tensor, without importing torch here
        img = img.detach().cpu().numpy()
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)) or img.size == 0:
        raise ValueError(f"cannot write {path}: img must have shape (H, W) or (H, W, 3), got {img.shape}")
    if not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"cannot write {path}: img must be float in [0, 1], got {img.dtype}")
    if not np.isfinite(img).all():
        raise ValueError(f"cannot write {path}: img of shape {img.shape} contains NaN or inf")
    maxval = 2**bit_depth - 1
    data = np.rint(np.clip(img.astype(np.float64), 0.0, 1.0) * maxval).astype(np.uint8 if bit_depth == 8 else np.uint16)
    if data.ndim == 3:
        data = cv2.cvtColor(data, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if suffix in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(suffix, data, params)
    if not ok:
        raise ValueError(f"cannot encode an image of shape {img.shape} as {suffix} for {path}")

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.tobytes())
        # mkstemp creates the file readable by its owner only; give it ordinary file permissions
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder``, sorted by file name (this order defines the benchmark
    image index ``i`` of :mod:`n3images.noise`).

    Suffixes :data:`IMAGE_SUFFIXES`, case-insensitive; hidden files (``.*``, e.g. unfinished
    writes of :func:`write_image`) are skipped. Not recursive.

    Raises:
        ValueError: the folder does not exist, is not a folder, or holds no images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} does not exist or is not a folder")
    files = [
        p for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    ]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {folder}")
    return sorted(files, key=lambda p: p.name)
