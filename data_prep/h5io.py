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
without timestamps so that the same inputs give a byte-identical file. Readers go through
:func:`open_pairs` (one schema check for every reader: :func:`check_file`) and :func:`read_pair`;
a file or pair that does not follow the schema raises ``ValueError`` naming the file and the pair.
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


def _check_shapes(shapes: dict, where: str) -> int:
    """Check field shapes against :data:`PAIR_FIELDS`; returns the number of matches N.

    ``shapes`` maps each field to its shape (missing fields are reported); ``where`` starts the
    ``ValueError`` message (e.g. ``"pair record"`` or ``"file.h5: pair pair_000003"``).
    """
    n = None
    for field, (_, shape) in PAIR_FIELDS.items():
        if field not in shapes:
            raise ValueError(f"{where} misses field {field!r}")
        have = tuple(shapes[field])
        if len(have) != len(shape):
            raise ValueError(f"{where}: field {field!r} must have shape {shape} (None = matches), got {have}")
        for dim, want in zip(have, shape):
            if want is None:
                if n is None:
                    n = dim
                elif dim != n:
                    raise ValueError(f"{where}: field {field!r} has {dim} matches, other fields {n}")
            elif dim != want:
                raise ValueError(f"{where}: field {field!r} must have shape {shape} (None = matches), got {have}")
    if not n:  # an empty set breaks the networks; the builder drops pairs with fewer than 8 matches
        raise ValueError(f"{where}: has no matches (a pair needs at least one)")
    return int(n)


def check_pair(record: dict, where: str = "pair record") -> None:
    """Raise ``ValueError`` naming the field when ``record`` does not follow the schema.

    Checks the fields and attributes, the shapes, that the matches agree in number (at least one), and the
    values: coordinates, ratios and the geometry (``R``, ``t``, ``K1``, ``K2``) must be finite, labels and
    mutual flags 0 or 1.
    """
    _check_shapes({f: np.shape(record[f]) for f in PAIR_FIELDS if f in record}, where)
    for attr in PAIR_ATTRS:
        if attr not in record:
            raise ValueError(f"{where} misses attribute {attr!r}")
    _check_values(record, where)


#: fields that must hold finite numbers (epi_dist may be inf for a degenerate epipolar line)
FINITE_FIELDS = ("xs", "kpts1", "kpts2", "ratio", "R", "t", "K1", "K2")
#: fields that hold 0/1 flags
FLAG_FIELDS = ("label", "mutual")


def _check_values(record: dict, where: str) -> None:
    for field in PAIR_FIELDS:
        value = np.asarray(record[field])
        if value.dtype.kind not in "biuf":
            raise ValueError(f"{where}: field {field!r} must hold numbers, got dtype {value.dtype}")
    for field in FINITE_FIELDS:
        value = np.asarray(record[field], dtype=np.float64)
        bad = ~np.isfinite(value)
        if bad.any():
            first = np.argwhere(bad)[0].tolist()
            raise ValueError(f"{where}: field {field!r} holds {int(bad.sum())} NaN or infinite value(s), "
                             f"first at index {first}")
    for field in FLAG_FIELDS:
        value = np.asarray(record[field])
        if value.size and not np.isin(value, (0, 1)).all():
            raise ValueError(f"{where}: field {field!r} must hold 0 or 1, got {np.unique(value)[:5].tolist()}")


def write_pair(h5: h5py.File, key: str, record: dict) -> None:
    """Write one pair ``record`` (dict with :data:`PAIR_FIELDS` and :data:`PAIR_ATTRS`) as group ``key``."""
    check_pair(record)
    group = h5.create_group(key)
    for field, (dtype, _) in PAIR_FIELDS.items():
        # track_times=False keeps the file byte-identical across rebuilds.
        group.create_dataset(field, data=np.asarray(record[field], dtype=dtype), track_times=False)
    for attr in PAIR_ATTRS:
        group.attrs[attr] = str(record[attr])


class _Where:
    """``FILE: pair KEY (NAME)``, how errors name a pair; formatted only when an error is raised."""

    def __init__(self, group: h5py.Group):
        self.group = group

    def __str__(self) -> str:
        name = self.group.attrs.get("name", "")
        name = name.decode() if isinstance(name, bytes) else str(name)
        return f"{self.group.file.filename}: pair {self.group.name.lstrip('/')}" + (f" ({name})" if name else "")


def _datasets(group, key=None, path=None) -> tuple[dict, _Where]:
    """The schema's datasets of a pair group (missing ones left out, for :func:`_check_shapes` to name)."""
    if not isinstance(group, h5py.Group):
        raise ValueError(f"{path or group.file.filename}: {key or group.name.lstrip('/')} is not a pair group "
                         "(an h5 dataset instead)")
    where = _Where(group)
    out = {}
    for field in PAIR_FIELDS:
        item = group.get(field)
        if item is None:
            continue
        if not isinstance(item, h5py.Dataset):
            raise ValueError(f"{where}: {field!r} is not a dataset")
        if item.dtype.kind not in "biuf":
            raise ValueError(f"{where}: field {field!r} must hold numbers, got dtype {item.dtype}")
        out[field] = item
    return out, where


def check_pair_group(group, key: str | None = None, path=None) -> int:
    """Check the structure of one pair group without reading its arrays; returns its number of matches.

    ``ValueError`` naming the file and the pair: not a group, a missing dataset, a wrong shape,
    matches that disagree in number, a dataset that does not hold numbers.
    """
    datasets, where = _datasets(group, key, path)
    return _check_shapes({f: d.shape for f, d in datasets.items()}, where)


def read_pair(group: h5py.Group) -> dict:
    """Read one pair group back into a dict of numpy arrays and string attributes.

    Raises ``ValueError`` naming the file and the pair when the group does not follow the schema
    (:func:`check_pair`: missing fields, shapes, NaN or infinite values, ...) or cannot be read.
    """
    datasets, where = _datasets(group)
    try:
        out = {field: d[()] for field, d in datasets.items()}
    except (OSError, RuntimeError) as err:  # a truncated or damaged file fails only here
        raise ValueError(f"{where}: cannot read its data (truncated or corrupt file?): {err}") from None
    _check_shapes({f: np.shape(v) for f, v in out.items()}, where)
    _check_values(out, where)
    for attr in PAIR_ATTRS:
        value = group.attrs.get(attr, "")
        out[attr] = value.decode() if isinstance(value, bytes) else str(value)
    return out


def check_file(h5: h5py.File, path=None, values: bool = True) -> list[str]:
    """Check an open correspondence file against the schema; returns its sorted pair keys.

    The one check behind every reader (:func:`open_pairs`). ``ValueError`` naming the file (and
    the pair) when the file lacks ``schema_version`` (not written by this project), has another
    version, or a pair group does not follow :data:`PAIR_FIELDS`. With ``values`` every pair is
    also read and its values checked (NaN, infinite, labels not 0/1), so a bad pair is reported
    before a long training or evaluation starts, not in the middle of it.
    """
    path = h5.filename if path is None else path
    version = h5.attrs.get("schema_version")
    if version is None:
        raise ValueError(f"{path}: not a correspondence dataset of this project (no 'schema_version' attribute; "
                         "such files are written by pipelines/build_corr_dataset.py)")
    try:
        version = int(version)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: schema_version {version!r} is not an integer") from None
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema version {version}, this code reads version {SCHEMA_VERSION}")
    keys = pair_keys(h5)
    for key in keys:
        group = h5[key]
        if values:
            read_pair(group)  # structure and values
        else:
            check_pair_group(group, key, path)
    return keys


def open_pairs(path, values: bool = True) -> h5py.File:
    """Open a correspondence h5 file for reading, checked with :func:`check_file`.

    ``FileNotFoundError`` for a missing file; ``ValueError`` naming the file for anything that is
    not a readable file of this schema (truncated, random bytes, another h5 layout, NaN values,
    ...). Use it as a context manager: ``with open_pairs(path) as h5: ...``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"correspondence dataset not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        reason = str(err).split("(", 1)[-1].rstrip(")") if "(" in str(err) else str(err)
        raise ValueError(f"{path}: not a readable HDF5 file (truncated, corrupt or another kind of file: {reason})") from None
    try:
        check_file(h5, path, values=values)
    except BaseException:
        h5.close()
        raise
    return h5


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
        with open_pairs(path_or_h5, values=False) as h5:
            return read_settings(h5)
    raw = path_or_h5.attrs.get("settings", "{}")
    try:
        settings = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except (TypeError, ValueError):
        settings = None
    if not isinstance(settings, dict):
        raise ValueError(f"{path_or_h5.filename}: the 'settings' attribute is not a JSON object")
    return settings


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
