"""Training data for image restoration: random crops of clean images with flips and rotations.

Every crop is a deterministic function of ``(seed, epoch, index)``, so a resumed or distributed
run sees exactly the crops an uninterrupted single-process run would (the noise is drawn by the
trainer from a generator seeded the same way).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .io import list_images, read_image

__all__ = ["CropDataset", "load_images", "split_train_val", "dihedral"]


def load_images(paths, mode: str = "gray") -> list[np.ndarray]:
    """Images as float32 arrays in [0, 1], ``(H, W)`` grey or ``(H, W, 3)``."""
    return [read_image(p, mode) for p in paths]


def split_train_val(folder, val_count: int) -> tuple[list[Path], list[Path]]:
    """Sorted images of ``folder``: all but the last ``val_count`` for training, those for validation."""
    paths = list_images(folder)
    if not 0 <= val_count < len(paths):
        raise ValueError(f"--val-count {val_count}: {folder} holds {len(paths)} images; keep at least one for training")
    return (paths[:-val_count], paths[-val_count:]) if val_count else (paths, [])


def dihedral(x: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/rotations of an ``(H, W[, C])`` array (``k`` in 0..7)."""
    x = np.rot90(x, k % 4, axes=(0, 1))
    return x[:, ::-1] if k >= 4 else x


class CropDataset(Dataset):
    """``samples_per_epoch`` random ``crop x crop`` patches with random flips/rotations.

    Returns ``(C, crop, crop)`` float32 tensors. Images smaller than the crop are refused.
    """

    def __init__(self, images: list[np.ndarray], crop: int, samples_per_epoch: int, seed: int = 0, augment: bool = True):
        if not images:
            raise ValueError("CropDataset: no training images")
        small = [i for i, im in enumerate(images) if min(im.shape[:2]) < crop]
        if small:
            raise ValueError(f"CropDataset: {len(small)} images are smaller than the crop size {crop} "
                             f"(first: index {small[0]}, shape {images[small[0]].shape})")
        self.images, self.crop, self.n, self.seed, self.augment = images, crop, samples_per_epoch, seed, augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        img = self.images[int(rng.integers(len(self.images)))]
        h, w = img.shape[:2]
        r, c = int(rng.integers(h - self.crop + 1)), int(rng.integers(w - self.crop + 1))
        patch = img[r:r + self.crop, c:c + self.crop]
        if self.augment:
            patch = dihedral(patch, int(rng.integers(8)))
        patch = np.ascontiguousarray(patch)
        t = torch.from_numpy(patch)
        return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()
