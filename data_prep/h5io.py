"""The correspondence h5 schema: one group per image pair, settings as file attributes.

File layout (``SCHEMA_VERSION`` 1)::

    /                       attrs: schema_version, settings (JSON string), num_pairs, plus each
                            scalar setting as its own attribute (threshold, num_kp, ...)
    /pair_000000/           one group per pair, names sorted in build order
        xs        (N, 4) float32   normalized [x1, y1, x2, y2]  (K^-1 applied)
        kpts1     (N, 2) float32   pixel keypoints in image 1 (matched)
        kpts2     (N, 2) float32   pixel keypoints in image 2 (matched)
        ratio     (N,)   float32   Lowe's ratio d1/d2 of the match (side information)
        mutual    (N,)   uint8     1 if the match is a mutual nearest neighbour
        epi_dist  (N,)   float64   squared symmetric epipolar distance under the GT essential
        label     (N,)   uint8     1 = inlier (epi_dist < threshold)
        R         (3, 3) float64   relative rotation, x2 = R x1 + t (camera 1 -> camera 2)
        t         (3,)   float64   relative translation, unit norm
        K1, K2    (3, 3) float64   intrinsics
        size1, size2 (2,) int64    image size (width, height)
        attrs: name ("scene/image1-image2"), scene, image1, image2 (image names)

Writers go through :func:`atomic_h5` (temporary file renamed at the end) and store datasets
without timestamps so that the same inputs give a byte-identical file.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import h5py
import numpy as np

SCHEMA_VERSION = 1

#: field -> (dtype, shape with None for the number of matches)
PAIR_FIELDS = {
    "xs": (np.float32, (None, 4)),
    "kpts1": (np.float32, (None, 2)),
    "kpts2": (np.float32, (None, 2)),
    "ratio": (np.float32, (None,)),
    "mutual": (np.uint8, (None,)),
    "epi_dist": (np.float64, (None,)),
    "label": (np.uint8, (None,)),
    "R": (np.float64, (3, 3)),
    "t": (np.float64, (3,)),
    "K1": (np.float64, (3, 3)),
    "K2": (np.float64, (3, 3)),
    "size1": (np.int64, (2,)),
    "size2": (np.int64, (2,)),
}
PAIR_ATTRS = ("name", "scene", "image1", "image2")


def pair_key(index: int) -> str:
    """Group name of the ``index``-th pair of a file."""
    return f"pair_{index:06d}"


def check_pair(record: dict) -> None:
    """Raise ``ValueError`` naming the field when ``record`` does not follow the schema."""
    n = None
    for field, (_, shape) in PAIR_FIELDS.items():
        if field not in record:
            raise ValueError(f"pair record misses field {field!r}")
        value = np.asarray(record[field])
        if value.ndim != len(shape):
            raise ValueError(f"field {field!r} must have shape {shape} (None = matches), got {value.shape}")
        for dim, want in zip(value.shape, shape):
            if want is None:
                if n is None:
                    n = dim
                elif dim != n:
                    raise ValueError(f"field {field!r} has {dim} matches, other fields {n}")
            elif dim != want:
                raise ValueError(f"field {field!r} must have shape {shape} (None = matches), got {value.shape}")
    for attr in PAIR_ATTRS:
        if attr not in record:
            raise ValueError(f"pair record misses attribute {attr!r}")


def write_pair(h5: h5py.File, key: str, record: dict) -> None:
    """Write one pair ``record`` (dict with :data:`PAIR_FIELDS` and :data:`PAIR_ATTRS`) as group ``key``."""
    check_pair(record)
    group = h5.create_group(key)
    for field, (dtype, _) in PAIR_FIELDS.items():
        # track_times=False keeps the file byte-identical across rebuilds.
        group.create_dataset(field, data=np.asarray(record[field], dtype=dtype), track_times=False)
    for attr in PAIR_ATTRS:
        group.attrs[attr] = str(record[attr])


def read_pair(group: h5py.Group) -> dict:
    """Read one pair group back into a dict of numpy arrays and string attributes."""
    out = {field: group[field][()] for field in PAIR_FIELDS}
    for attr in PAIR_ATTRS:
        value = group.attrs.get(attr, "")
        out[attr] = value.decode() if isinstance(value, bytes) else str(value)
    return out


def pair_keys(h5: h5py.File) -> list[str]:
    """Sorted pair group names of an open file."""
    return sorted(k for k in h5.keys() if k.startswith("pair_"))


def write_settings(h5: h5py.File, settings: dict) -> None:
    """Store ``settings`` as a JSON attribute and each scalar entry as its own attribute."""
    h5.attrs["schema_version"] = SCHEMA_VERSION
    h5.attrs["settings"] = json.dumps(settings, sort_keys=True)
    for key, value in settings.items():
        if isinstance(value, (bool, int, float, str)) and key not in ("settings", "schema_version"):
            h5.attrs[key] = value


def read_settings(path_or_h5) -> dict:
    """The settings dict stored by :func:`write_settings`."""
    if isinstance(path_or_h5, (str, os.PathLike)):
        with h5py.File(path_or_h5, "r") as h5:
            return read_settings(h5)
    raw = path_or_h5.attrs.get("settings", "{}")
    return json.loads(raw.decode() if isinstance(raw, bytes) else raw)


@contextlib.contextmanager
def atomic_h5(path):
    """Open ``path + '.tmp'`` for writing and rename it to ``path`` only if the block succeeds.

    On an exception the temporary file is removed, so nothing half-written is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as h5:
            yield h5
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
