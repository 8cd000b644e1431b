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

from .h5io import pair_keys, read_pair

__all__ = ["CorrespondenceDataset", "collate_sets"]


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
        seed: seed of the subsampling. With a seed the subset of item ``i`` depends on
            ``(seed, i, epoch)`` only (see :meth:`set_epoch`), so it is reproducible across runs
            and DataLoader workers; with ``None`` it uses torch's global generator.

    An item is a dict: ``x`` ``(C_in, N)`` float32 ``[x1, y1, x2, y2(, ratio, mutual)]``,
    ``xs`` ``(N, 4)``, ``label`` ``(N,)`` float32, ``epi_dist`` ``(N,)``, ``ratio``, ``mutual``
    ``(N,)`` float32, ``R`` ``(3, 3)``, ``t`` ``(3,)``, ``K1``, ``K2`` ``(3, 3)``, ``kpts1``,
    ``kpts2`` ``(N, 2)`` (float32 tensors) and ``name`` (str).
    """

    def __init__(self, h5_path, side_info: bool = False, max_matches: int | None = None, pairs=None, seed: int | None = None):
        self.h5_path = Path(h5_path)
        if not self.h5_path.is_file():
            raise FileNotFoundError(f"correspondence dataset not found: {self.h5_path}")
        if max_matches is not None and max_matches < 1:
            raise ValueError(f"max_matches must be >= 1 or None, got {max_matches}")
        self.side_info = bool(side_info)
        self.max_matches = max_matches
        self.seed = seed
        self.epoch = 0
        try:
            with h5py.File(self.h5_path, "r") as h5:
                keys = pair_keys(h5)
                names = [str(h5[k].attrs.get("name", k)) for k in keys]
        except OSError as err:
            raise OSError(f"cannot read correspondence dataset {self.h5_path}: {err}") from err
        if pairs is not None:
            by_name = {n: k for n, k in zip(names, keys)}
            selected = []
            for p in pairs:
                if isinstance(p, (int, np.integer)):
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
            f"max_matches={self.max_matches}, seed={self.seed})"
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
