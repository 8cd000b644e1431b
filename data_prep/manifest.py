"""Dataset manifests: the h5 files of each split, one entry per scene, and scene-balanced sampling.

A manifest is one JSON file::

    {
      "train": [{"scene": "castle-P30", "path": "strecha_castle.h5"},
                {"scene": "yfcc-train", "path": "/data/yfcc_train.h5", "weight": 0.5}],
      "val":   [{"scene": "Herz-Jesus-P25", "path": "herzjesus.h5"}],
      "test":  [{"scene": "entry-P10", "path": "strecha_test.h5"}],
      "sampling": "sqrt"
    }

* ``train`` and ``val`` are required, ``test`` is optional; each is a non-empty list of entries
  with ``scene`` (a name, unique within the manifest's split), ``path`` (an h5 file of the
  ``data_prep`` schema; relative paths are relative to the manifest's folder) and an optional
  ``weight`` (a positive number, default 1).
* Validation and test are whole scenes that are not trained on: a scene name or file that appears
  in ``train`` and in ``val`` or ``test`` is refused.
* ``sampling`` (optional): how training pairs are drawn per epoch, see :class:`SceneBalancedSampler`;
  ``"sqrt"`` (default), ``"equal"`` or ``"proportional"``.

Everything wrong with a manifest is a ``ValueError`` naming the manifest file and the entry
(``FileNotFoundError`` when the manifest itself is missing). The h5 files are checked against the
schema when they are opened (:class:`data_prep.corr_dataset.CorrespondenceDataset`).

Sampling (:class:`SceneBalancedSampler`): an epoch draws ``num_samples`` pairs (default: the total
number of training pairs, so an epoch has as many steps as the plain concatenation). Scene ``s``
with ``n_s`` pairs and weight ``w_s`` gets the quota ``num_samples * w_s g(n_s) / sum_r w_r g(n_r)``
with ``g(n) = sqrt(n)`` (``"sqrt"``), ``1`` (``"equal"``) or ``n`` (``"proportional"``), rounded by
largest remainders (ties to the earlier scene). A scene's quota is filled from a permutation of
its pairs, drawn again each time it runs out (a scene smaller than its quota repeats pairs, one
larger sees a different subset every epoch). The permutations come from
``numpy.random.default_rng([seed, epoch, scene_index, round])`` and the epoch's order from
``default_rng([seed, epoch])``, so an epoch depends on ``(seed, epoch)`` only (exact ``--resume``).
With several processes the epoch's list is padded by wrapping to a multiple of the number of
processes and process ``r`` takes items ``r, r + world, ...`` (as ``DistributedSampler``).
With sqrt weights a scene 100 times larger gets 10 times the pairs, not 100.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Sampler

__all__ = ["ManifestEntry", "Manifest", "read_manifest", "SceneBalancedSampler", "ScenesDataset", "scene_quotas",
           "SAMPLING_MODES", "SPLITS"]

SPLITS = ("train", "val", "test")
REQUIRED_SPLITS = ("train", "val")
SAMPLING_MODES = ("sqrt", "equal", "proportional")
ENTRY_KEYS = {"scene", "path", "weight"}


@dataclass(frozen=True)
class ManifestEntry:
    scene: str
    path: Path
    weight: float = 1.0


@dataclass
class Manifest:
    path: Path
    splits: dict = field(default_factory=dict)  # split -> list[ManifestEntry]
    sampling: str = "sqrt"

    def __getitem__(self, split: str) -> list[ManifestEntry]:
        return self.splits.get(split, [])


def _entry(raw, manifest: Path, split: str, i: int) -> ManifestEntry:
    where = f"{manifest}: {split}[{i}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be an object with 'scene' and 'path' (and optional 'weight'), got {type(raw).__name__}")
    unknown = sorted(set(raw) - ENTRY_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} (allowed: scene, path, weight)")
    for key in ("scene", "path"):
        if key not in raw:
            raise ValueError(f"{where} misses {key!r}")
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise ValueError(f"{where}: {key!r} must be a non-empty string, got {raw[key]!r}")
    weight = raw.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"{where} ({raw['scene']}): 'weight' must be a positive number, got {weight!r}")
    path = Path(raw["path"]).expanduser()
    if not path.is_absolute():
        path = manifest.parent / path
    if not path.exists():
        raise ValueError(f"{where} ({raw['scene']}): h5 file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{where} ({raw['scene']}): {path} is not a file")
    return ManifestEntry(raw["scene"].strip(), path, float(weight))


def read_manifest(path) -> Manifest:
    """Read and check a manifest (module docstring); ``ValueError`` naming the file and entry."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest not found: {path}")
    if not path.is_file():
        raise ValueError(f"manifest {path} is not a file")
    try:
        raw = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a JSON manifest (not text)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a manifest is a JSON object with 'train' and 'val' lists, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SPLITS) - {"sampling"})
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))} (allowed: train, val, test, sampling)")
    sampling = raw.get("sampling", "sqrt")
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"{path}: 'sampling' must be one of {', '.join(SAMPLING_MODES)}, got {sampling!r}")
    manifest = Manifest(path=path, sampling=sampling)
    for split in SPLITS:
        if split not in raw:
            if split in REQUIRED_SPLITS:
                raise ValueError(f"{path}: misses the {split!r} list")
            continue
        entries = raw[split]
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{path}: {split!r} must be a non-empty list of entries, got {entries!r:.60}")
        parsed = [_entry(e, path, split, i) for i, e in enumerate(entries)]
        seen = {}
        for e in parsed:
            if e.scene in seen:
                raise ValueError(f"{path}: scene {e.scene!r} appears twice in {split!r}")
            seen[e.scene] = e
        manifest.splits[split] = parsed
    train_scenes = {e.scene for e in manifest["train"]}
    train_files = {e.path.resolve(): e.scene for e in manifest["train"]}
    for split in ("val", "test"):
        for e in manifest[split]:
            if e.scene in train_scenes:
                raise ValueError(f"{path}: scene {e.scene!r} is in 'train' and in {split!r}; "
                                 f"{split} must be whole scenes not trained on")
            if e.path.resolve() in train_files:
                raise ValueError(f"{path}: {split} scene {e.scene!r} uses {e.path}, the file of train scene "
                                 f"{train_files[e.path.resolve()]!r}; {split} must be whole scenes not trained on")
    return manifest


# ------------------------------------------------------------------------------------ datasets
class ScenesDataset(Dataset):
    """Several per-scene datasets as one (index = position in the concatenation), with ``set_epoch``."""

    def __init__(self, datasets: list, scenes: list[str], weights: list[float] | None = None):
        if not datasets or len(datasets) != len(scenes):
            raise ValueError("ScenesDataset needs one scene name per dataset (and at least one)")
        self.datasets, self.scenes = list(datasets), list(scenes)
        self.weights = list(weights) if weights is not None else [1.0] * len(datasets)
        self.offsets = np.concatenate([[0], np.cumsum([len(d) for d in self.datasets])]).astype(np.int64)

    @property
    def sizes(self) -> list[int]:
        return [len(d) for d in self.datasets]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def set_epoch(self, epoch: int) -> None:
        for d in self.datasets:
            if hasattr(d, "set_epoch"):
                d.set_epoch(epoch)

    def locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        s = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return s, int(index - self.offsets[s])

    def __getitem__(self, index: int):
        s, i = self.locate(int(index))
        return self.datasets[s][i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}: {len(d)}' for n, d in zip(self.scenes, self.datasets))})"


def scene_quotas(sizes, weights=None, num_samples: int | None = None, mode: str = "sqrt") -> np.ndarray:
    """Pairs per scene for one epoch (module docstring); sums to ``num_samples`` (default ``sum(sizes)``)."""
    sizes = np.asarray(sizes, np.float64)
    if mode not in SAMPLING_MODES:
        raise ValueError(f"sampling mode must be one of {SAMPLING_MODES}, got {mode!r}")
    if sizes.ndim != 1 or not len(sizes) or (sizes < 1).any():
        raise ValueError(f"every scene needs at least one pair, got sizes {sizes.astype(int).tolist()}")
    weights = np.ones_like(sizes) if weights is None else np.asarray(weights, np.float64)
    if weights.shape != sizes.shape or not (np.isfinite(weights) & (weights > 0)).all():
        raise ValueError(f"weights must be positive, one per scene, got {np.asarray(weights).tolist()}")
    num_samples = int(sizes.sum()) if num_samples is None else int(num_samples)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    g = {"sqrt": np.sqrt(sizes), "equal": np.ones_like(sizes), "proportional": sizes}[mode]
    share = weights * g / np.sum(weights * g) * num_samples
    quota = np.floor(share).astype(np.int64)
    rest = num_samples - int(quota.sum())
    order = np.argsort(-(share - quota), kind="stable")  # largest remainders; ties to the earlier scene
    quota[order[:rest]] += 1
    return quota


class SceneBalancedSampler(Sampler):
    """Indices of a :class:`ScenesDataset` for one epoch, balanced over scenes (module docstring)."""

    def __init__(self, dataset: ScenesDataset, mode: str = "sqrt", num_samples: int | None = None, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.sizes = dataset.sizes
        self.offsets = dataset.offsets
        self.quotas = scene_quotas(self.sizes, dataset.weights, num_samples, mode)
        self.mode, self.seed, self.epoch = mode, int(seed), 0
        self.num_replicas, self.rank = int(num_replicas), int(rank)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_indices(self) -> np.ndarray:
        """All processes' indices of this epoch, in order (before the split over processes)."""
        chosen = []
        for s, (size, quota) in enumerate(zip(self.sizes, self.quotas)):
            picks, rnd = [], 0
            while sum(len(p) for p in picks) < quota:
                picks.append(np.random.default_rng([self.seed, self.epoch, s, rnd]).permutation(size))
                rnd += 1
            chosen.append(np.concatenate(picks)[:quota] + self.offsets[s] if picks else np.zeros(0, np.int64))
        indices = np.concatenate(chosen).astype(np.int64)
        return indices[np.random.default_rng([self.seed, self.epoch]).permutation(len(indices))]

    def __iter__(self):
        indices = self.epoch_indices()
        total = self.num_replicas * math.ceil(len(indices) / self.num_replicas)
        if total > len(indices):
            indices = np.concatenate([indices, indices[: total - len(indices)]])
        return iter(indices[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return math.ceil(int(self.quotas.sum()) / self.num_replicas)


def open_manifest_sets(manifest: Manifest, split: str, dataset_factory) -> ScenesDataset:
    """A :class:`ScenesDataset` of a manifest split; ``dataset_factory(entry, index)`` opens one file
    (a ``ValueError`` it raises is prefixed with the manifest and the scene)."""
    entries = manifest[split]
    if not entries:
        raise ValueError(f"{manifest.path}: no {split!r} scenes")
    sets = []
    for i, e in enumerate(entries):
        try:
            ds = dataset_factory(e, i)
        except ValueError as err:
            raise ValueError(f"{manifest.path}: {split} scene {e.scene!r}: {err}") from None
        if len(ds) == 0:
            raise ValueError(f"{manifest.path}: {split} scene {e.scene!r}: {e.path} holds no pairs")
        sets.append(ds)
    return ScenesDataset(sets, [e.scene for e in entries], [e.weight for e in entries])


def describe(sets: ScenesDataset, sampler: SceneBalancedSampler | None = None) -> str:
    """One line per scene: pairs (and pairs drawn per epoch)."""
    parts = []
    for k, (name, size) in enumerate(zip(sets.scenes, sets.sizes)):
        parts.append(f"{name} {size}" + (f" (draws {int(sampler.quotas[k])}/epoch)" if sampler is not None else ""))
    return ", ".join(parts)


if __name__ == "__main__":  # pragma: no cover - convenience: python -m data_prep.manifest FILE
    import sys

    m = read_manifest(sys.argv[1])
    for split in SPLITS:
        for e in m[split]:
            print(split, e.scene, e.path, e.weight)
