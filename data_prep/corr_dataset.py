"""A torch ``Dataset`` over correspondence h5 files and a collate function for padded sets.

Each item is one image pair with a variable number of matches ``N``; :func:`collate_sets` pads a
batch to the largest set and returns a boolean ``mask`` (True = real match), the format that
``n3sets`` models take.
"""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from .h5io import open_pairs, pair_keys, read_pair

__all__ = ["CorrespondenceDataset", "collate_sets", "augment_pair"]


def _bounded_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A rotation about a uniformly random axis by an angle uniform in ``[0, max_deg]`` degrees (Rodrigues)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis) + 1e-12
    angle = np.deg2rad(rng.uniform(0.0, max_deg))
    S = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * S + (1 - np.cos(angle)) * S @ S


def _rotate_view(Q: np.ndarray, x: np.ndarray, K) -> tuple[np.ndarray, np.ndarray] | None:
    """Normalized points ``(N, 2)`` and pixel keypoints seen by the camera rotated by ``Q``.

    None if a point would end up more than ~84 deg off the axis (or behind): that draw is skipped.
    """
    h = np.concatenate([x, np.ones((len(x), 1))], 1) @ Q.T
    if len(h) and h[:, 2].min() < 0.1:
        return None
    h = h / h[:, 2:]
    return h[:, :2], (h @ np.asarray(K, np.float64).T)[:, :2]


def augment_pair(rec: dict, rng: np.random.Generator, swap: float = 0.0, rotation_deg: float = 0.0) -> dict:
    """Geometrically exact augmentation of one pair record (``read_pair`` fields), returned as a copy.

    * **swap** (probability): exchange the two views -- ``xs`` halves, keypoints and intrinsics
      swap and ``(R, t) -> (R^T, -R^T t)``. Labels, ratio and mutual flag stay (the ratio keeps
      its first-image direction).
    * **rotation_deg**: rotate each camera about its centre by its own random rotation ``Q1``,
      ``Q2`` of up to this angle: a normalized point ``x`` becomes ``Q x`` (dehomogenized) and
      the relative pose ``(Q2 R Q1^T, Q2 t)``, so the ground-truth E, the labels (the same physical
      matches) and the scene stay consistent. Pixel keypoints are reprojected with the unchanged
      intrinsics; ``epi_dist`` keeps the value of the original views. A draw that would put a
      point within ~6 deg of the image plane is skipped (that view keeps its orientation).
    """
    rec = dict(rec)
    xs = np.asarray(rec["xs"], dtype=np.float64)
    x1, x2 = xs[:, :2], xs[:, 2:]
    R, t = np.asarray(rec["R"], np.float64), np.asarray(rec["t"], np.float64).reshape(3)
    k1, k2, K1, K2 = rec["kpts1"], rec["kpts2"], rec["K1"], rec["K2"]
    if swap > 0 and rng.random() < swap:
        x1, x2, k1, k2, K1, K2 = x2, x1, k2, k1, K2, K1
        R, t = R.T, -R.T @ t
    if rotation_deg > 0:
        Q1, Q2 = _bounded_rotation(rng, rotation_deg), _bounded_rotation(rng, rotation_deg)
        view1, view2 = _rotate_view(Q1, x1, K1), _rotate_view(Q2, x2, K2)
        if view1 is not None:  # x1' = Q1 x1: X2 = R Q1^T X1'
            (x1, k1), R = view1, R @ Q1.T
        if view2 is not None:  # x2' = Q2 x2: X2' = Q2 R X1 + Q2 t
            (x2, k2), R, t = view2, Q2 @ R, Q2 @ t
    rec.update(xs=np.concatenate([x1, x2], 1), R=R, t=t, kpts1=k1, kpts2=k2, K1=K1, K2=K2)
    return rec


class CorrespondenceDataset(Dataset):
    """Pairs of an h5 file written by ``data_prep`` (schema in :mod:`data_prep.h5io`).

    Args:
        h5_path: the h5 file.
        side_info: append Lowe's ratio and the mutual flag to the network input
            (``x`` gets 6 channels instead of 4).
        max_matches: if set, a pair with more matches is randomly subsampled to this many
            (training); ``None`` keeps every match.
        pairs: optional subset of pairs, as group names (``"pair_000012"``), pair names
            (``"scene/img1-img2"``) or integer positions.
        seed: seed of the subsampling and augmentation. With a seed the subset (and the
            augmentation) of item ``i`` depends on ``(seed, i, epoch)`` only (see
            :meth:`set_epoch`), so it is reproducible across runs and DataLoader workers; with
            ``None`` it uses torch's global generator.
        augment_swap: probability of exchanging the two views (training; see :func:`augment_pair`).
        augment_rotation: max angle in degrees of a random rotation of each camera about its
            centre (training; see :func:`augment_pair`). 0 = off.

    The whole file is checked against the schema when the dataset is created
    (:func:`data_prep.h5io.open_pairs`): ``FileNotFoundError`` for a missing file, ``ValueError``
    naming the file and the pair for anything else that is wrong with it.

    An item is a dict: ``x`` ``(C_in, N)`` float32 ``[x1, y1, x2, y2(, ratio, mutual)]``,
    ``xs`` ``(N, 4)``, ``label`` ``(N,)`` float32, ``epi_dist`` ``(N,)``, ``ratio``, ``mutual``
    ``(N,)`` float32, ``R`` ``(3, 3)``, ``t`` ``(3,)``, ``K1``, ``K2`` ``(3, 3)``, ``kpts1``,
    ``kpts2`` ``(N, 2)`` (float32 tensors) and ``name`` (str).
    """

    def __init__(self, h5_path, side_info: bool = False, max_matches: int | None = None, pairs=None, seed: int | None = None,
                 augment_swap: float = 0.0, augment_rotation: float = 0.0):
        self.h5_path = Path(h5_path)
        if max_matches is not None and max_matches < 1:
            raise ValueError(f"max_matches must be >= 1 or None, got {max_matches}")
        if not 0.0 <= augment_swap <= 1.0:
            raise ValueError(f"augment_swap is a probability in [0, 1], got {augment_swap}")
        if not 0.0 <= augment_rotation <= 60.0:
            raise ValueError(f"augment_rotation must be in [0, 60] degrees, got {augment_rotation}")
        self.augment_swap = float(augment_swap)
        self.augment_rotation = float(augment_rotation)
        self.side_info = bool(side_info)
        self.max_matches = max_matches
        self.seed = seed
        self.epoch = 0
        # FileNotFoundError, or ValueError naming the file (and pair) for anything off-schema:
        # the whole file is checked here, so that a bad pair does not stop a run half-way
        with open_pairs(self.h5_path) as h5:
            keys = pair_keys(h5)
            names = [str(h5[k].attrs.get("name", k)) for k in keys]
        if pairs is not None:
            by_name = {n: k for n, k in zip(names, keys)}
            selected = []
            for p in pairs:
                if isinstance(p, (int, np.integer)):
                    if not -len(keys) <= int(p) < len(keys):
                        raise ValueError(f"pair index {int(p)} out of range: {self.h5_path} holds {len(keys)} pairs")
                    selected.append(keys[int(p)])
                elif p in by_name:
                    selected.append(by_name[p])
                elif p in keys:
                    selected.append(p)
                else:
                    raise ValueError(f"pair {p!r} not found in {self.h5_path}")
            keys = selected
        self.keys = keys
        self._h5 = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.keys)

    def set_epoch(self, epoch: int) -> None:
        """Change the random subsets drawn with a fixed ``seed`` (call once per training epoch)."""
        self.epoch = int(epoch)

    def _file(self) -> h5py.File:
        # One handle per process: h5py handles must not be shared across forked DataLoader workers.
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = h5py.File(self.h5_path, "r")
            self._pid = os.getpid()
        return self._h5

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_pid"] = None
        return state

    def __getitem__(self, index: int) -> dict:
        rec = read_pair(self._file()[self.keys[index]])
        n = len(rec["label"])
        if self.max_matches is not None and n > self.max_matches:
            if self.seed is None:
                sel = torch.randperm(n)[: self.max_matches].numpy()
            else:
                sel = np.random.default_rng([self.seed, index, self.epoch]).permutation(n)[: self.max_matches]
            sel = np.sort(sel)
            for field in ("xs", "kpts1", "kpts2", "ratio", "mutual", "epi_dist", "label"):
                rec[field] = rec[field][sel]
        if self.augment_swap > 0 or self.augment_rotation > 0:
            if self.seed is None:
                rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
            else:
                rng = np.random.default_rng([self.seed, index, self.epoch, 1])
            rec = augment_pair(rec, rng, swap=self.augment_swap, rotation_deg=self.augment_rotation)
        f32 = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
        xs = f32(rec["xs"])
        ratio, mutual = f32(rec["ratio"]), f32(rec["mutual"])
        channels = [xs.T]
        if self.side_info:
            channels += [ratio[None], mutual[None]]
        return {
            "x": torch.cat(channels, 0).contiguous(),
            "xs": xs,
            "label": f32(rec["label"]),
            "epi_dist": f32(rec["epi_dist"]),
            "ratio": ratio,
            "mutual": mutual,
            "R": f32(rec["R"]),
            "t": f32(rec["t"]),
            "K1": f32(rec["K1"]),
            "K2": f32(rec["K2"]),
            "kpts1": f32(rec["kpts1"]),
            "kpts2": f32(rec["kpts2"]),
            "name": rec["name"],
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.h5_path)!r}, pairs={len(self)}, side_info={self.side_info}, "
            f"max_matches={self.max_matches}, seed={self.seed}, augment_swap={self.augment_swap}, "
            f"augment_rotation={self.augment_rotation})"
        )


_PER_MATCH = ("xs", "label", "epi_dist", "ratio", "mutual", "kpts1", "kpts2")
_PER_PAIR = ("R", "t", "K1", "K2")


def collate_sets(items: list[dict]) -> dict:
    """Pad a list of dataset items to the largest set.

    Returns a dict with ``x`` ``(B, C_in, Nmax)``, ``mask`` ``(B, Nmax)`` bool (True = real
    match), the per-match fields ``xs`` ``(B, Nmax, 4)``, ``label``, ``epi_dist``, ``ratio``,
    ``mutual`` ``(B, Nmax)``, ``kpts1``, ``kpts2`` ``(B, Nmax, 2)`` (zeros where padded), the
    per-pair fields ``R`` ``(B, 3, 3)``, ``t`` ``(B, 3)``, ``K1``, ``K2`` ``(B, 3, 3)``,
    ``num_matches`` ``(B,)`` and ``names`` (list of str).
    """
    if not items:
        raise ValueError("collate_sets needs at least one item")
    sizes = [it["x"].shape[-1] for it in items]
    channels = {it["x"].shape[0] for it in items}
    if len(channels) != 1:
        raise ValueError(f"items have different numbers of input channels: {sorted(channels)}")
    B, nmax, c = len(items), max(sizes), channels.pop()
    out = {"x": items[0]["x"].new_zeros(B, c, nmax), "mask": torch.zeros(B, nmax, dtype=torch.bool)}
    for field in _PER_MATCH:
        ref = items[0][field]
        out[field] = ref.new_zeros((B, nmax) + tuple(ref.shape[1:]))
    for b, (it, n) in enumerate(zip(items, sizes)):
        out["x"][b, :, :n] = it["x"]
        out["mask"][b, :n] = True
        for field in _PER_MATCH:
            out[field][b, :n] = it[field]
    for field in _PER_PAIR:
        out[field] = torch.stack([it[field] for it in items])
    out["num_matches"] = torch.tensor(sizes, dtype=torch.long)
    out["names"] = [it["name"] for it in items]
    return out
