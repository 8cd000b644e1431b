"""Readers for the public correspondence dumps people train on, converted to this project's h5 schema.

Two layouts, both made from the same raw scenes as ``--format yi`` (St. Peter's, Reichstag, Brown,
YFCC100M, SUN3D), checked against the public code that writes and reads them:

``oanet-dump``: one HDF5 file per split, written by zjhthu/OANet ``dump_match`` (``yfcc.py`` /
    ``sun3d.py`` -> ``Dataset.collect``) and read by OANet ``core/data.py``
    (``CorrespondencesDataset``), e.g. ``data_dump/yfcc-sift-2000-train.hdf5``,
    ``yfcc-sift-2000-val.hdf5``, ``yfcc-sift-2000-test.hdf5``, ``sun3d-sift-2000-{train,val,test}.hdf5``.
    Top-level groups ``xs ys Rs ts ratios mutuals cx1s cy1s cx2s cy2s f1s f2s``; each holds one
    float32 dataset per pair under the keys ``"0", "1", ...`` (the same keys in every group):

    =========  ==================  ==========================================================
    ``xs``     ``(1, N, 4)``       normalized ``[x1, y1, x2, y2]``, ``x = (kp - c) / f``; all keypoints
                                    of image 1 and the nearest neighbour of each in image 2
    ``ys``     ``(N, 1)``          ``get_episym``: squared symmetric epipolar distance under GT
    ``Rs``     ``(3, 3)``          ``dR = R_j R_i^T``  (world-to-camera ``R``)
    ``ts``     ``(3, 1)``          ``dt = t_j - dR t_i``, unit norm
    ``ratios`` ``(N,)`` / (N, 1)   Lowe's ratio d1/d2
    ``mutuals````(N,)`` / (N, 1)   1 = mutual nearest neighbours
    ``cx1s`` … ``(1,)``            principal point of image 1/2 in pixels
    ``f1s``    ``(1,)`` or (1, 2)  focal length(s) ``fx[, fy]`` in pixels
    =========  ==================  ==========================================================

``cne-dump``: the split folders written by ``dump_data.py`` of vcg-uvic/learned-correspondence-release
    (Yi et al., "Learning to Find Good Correspondences", CVPR 2018; read there by ``data.py``
    ``load_data``): ``<dump_prefix>/<data_name>/numkp-<K>/nn-<n>/[nocrop/]<tr|va|te>-<num>/``
    holding a ``ready`` marker and one pickle per variable, ``<var>_<tr|va|te>.pkl``, each a list
    with one entry per pair:

    ======================  =========  ======================================================
    ``xs``                  (1, N, 4)  normalized ``[x1, y1, x2, y2]`` (``nn-1``: N = keypoints)
    ``ys``                  (N, 2)     ``[geod_d, reproj_d]``; ``geod_d`` is ``get_episym`` (the
                                        default ``obj_geod_type``), ``reproj_d`` unused here
    ``Rs`` / ``ts``         (3, 3)/(3,)  as above, ``ts`` unit norm
    ``cx1s cy1s cx2s cy2s``  scalar     principal points (pixels of the possibly resized image)
    ``f1s f2s``             scalar or (fx, fy)
    ``img1s img2s``         images     not read (large, not needed)
    ======================  =========  ======================================================

    There is no ratio or mutual flag in this dump (``ratio`` is stored as 1.0 and ``mutual`` as
    0 here; the settings say ``side_info: "none"``, so do not train ``--side-info`` on it).

Conversion (both): this project's conventions are the dumps' conventions (``x2 = R x1 + t``,
``E = [t]_x R``, normalized coordinates), so ``xs``, ``R``, ``t`` are copied (``t`` renormalized).
``K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]``; pixel keypoints ``kp = x f + c``. ``epi_dist`` is
the dump's distance (``ys[:, 0]``) and ``label = epi_dist < threshold`` (1e-4 as OANet's and Yi's
``obj_geod_th``), the same rule as :func:`data_prep.labels.label_matches`. As a layout check the
distance is recomputed from ``xs``, ``R`` and ``t``; a pair whose labels would disagree on more than
1 % of its matches (``ys`` is then something else, e.g. Sampson distances) is an error. The dumps
store no image sizes: ``size = (round(2 cx + 1), round(2 cy + 1))`` (exact when the principal
point is the image centre, as in the YFCC/SUN3D calibrations; ``settings["size_source"]`` says
so). Pairs with fewer than 8 matches or a zero translation are skipped and counted.

Pickles are loaded with a restricted unpickler that builds numpy arrays, numbers, tuples and
lists only, so a dump cannot run code.
"""
from __future__ import annotations

import importlib
import io
import pickle
import time
from pathlib import Path

import numpy as np

from .h5io import atomic_h5, pair_key, write_pair, write_settings
from .labels import DEFAULT_THRESHOLD

__all__ = ["DUMP_FORMATS", "read_oanet_dump", "read_cne_dump", "convert_dumps", "format_dump_summary",
           "OANET_GROUPS", "CNE_VARIABLES"]

MIN_MATCHES = 8  # as data_prep.build: the eight-point algorithm needs eight correspondences
#: groups an OANet dump must have (cx/cy/f are needed for the pixel keypoints and K)
OANET_GROUPS = ("xs", "ys", "Rs", "ts", "ratios", "mutuals", "cx1s", "cy1s", "cx2s", "cy2s", "f1s", "f2s")
#: pickles a CNe dump split folder must have (``img1s``/``img2s`` are not read)
CNE_VARIABLES = ("xs", "ys", "Rs", "ts", "cx1s", "cy1s", "f1s", "cx2s", "cy2s", "f2s")
CNE_SPLITS = ("tr", "va", "te")
#: max fraction of matches whose label may change when the distance is recomputed from xs, R, t
LABEL_AGREEMENT_TOLERANCE = 0.01


# ------------------------------------------------------------------------------------ records
def _intrinsics(cx, cy, f, where: str) -> np.ndarray:
    cx, cy = (float(np.asarray(v, np.float64).reshape(-1)[0]) if np.size(v) >= 1 else np.nan for v in (cx, cy))
    f = np.asarray(f, np.float64).reshape(-1)
    if f.size not in (1, 2):
        raise ValueError(f"{where}: focal length must be one number or (fx, fy), got {f.size} numbers")
    fx, fy = (f[0], f[0]) if f.size == 1 else (f[0], f[1])
    K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    if not np.isfinite(K).all() or fx <= 0 or fy <= 0:
        raise ValueError(f"{where}: intrinsics must be finite with positive focal lengths, got "
                         f"fx={fx}, fy={fy}, cx={cx}, cy={cy}")
    return K


def _epi_dist(xs: np.ndarray, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    import torch

    from n3sets.geometry import essential_from_pose, symmetric_epipolar_distance

    x = torch.as_tensor(xs, dtype=torch.float64)
    E = essential_from_pose(torch.as_tensor(R), torch.as_tensor(t))
    return symmetric_epipolar_distance(x[:, :2], x[:, 2:], E).numpy()


def make_record(where: str, xs, ys, R, t, cx1, cy1, f1, cx2, cy2, f2, ratio=None, mutual=None,
                threshold: float = DEFAULT_THRESHOLD, scene: str = "", name: str = "", image1: str = "",
                image2: str = "") -> dict:
    """One pair of a dump as a record of this project's schema, or ``{"skip": reason}``.

    ``ValueError`` naming ``where`` (file and pair) for shapes or values that are not the dump layout.
    """
    xs = np.asarray(xs, np.float64)
    if xs.ndim == 3 and xs.shape[0] == 1:
        xs = xs[0]
    if xs.ndim != 2 or xs.shape[1] != 4:
        raise ValueError(f"{where}: xs must have shape (1, N, 4) or (N, 4), got {np.shape(xs)}")
    n = len(xs)
    ys = np.asarray(ys, np.float64)
    if ys.ndim == 1:
        ys = ys[:, None]
    if ys.ndim != 2 or ys.shape[0] != n or ys.shape[1] < 1:
        raise ValueError(f"{where}: ys must have shape (N,), (N, 1) or (N, 2) with N = {n} matches, got {np.shape(ys)}")
    R = np.asarray(R, np.float64)
    t = np.asarray(t, np.float64)
    if R.shape != (3, 3):
        raise ValueError(f"{where}: R must be 3x3, got shape {R.shape}")
    if t.size != 3:
        raise ValueError(f"{where}: t must hold 3 numbers, got shape {t.shape}")
    t = t.reshape(3)
    for field, value in (("xs", xs), ("R", R), ("t", t)):
        if not np.isfinite(value).all():
            raise ValueError(f"{where}: {field} holds NaN or infinite values")
    if np.abs(R @ R.T - np.eye(3)).max() > 1e-3 or np.linalg.det(R) < 0:
        raise ValueError(f"{where}: R is not a rotation matrix (R R^T != I or det < 0)")
    extra = {}
    for field, value, dtype in (("ratio", ratio, np.float32), ("mutual", mutual, np.float64)):
        if value is None:
            continue
        value = np.asarray(value, np.float64).reshape(-1)
        if value.size != n:
            raise ValueError(f"{where}: {field}s hold {value.size} values for {n} matches")
        if not np.isfinite(value).all():
            raise ValueError(f"{where}: {field}s hold NaN or infinite values")
        extra[field] = value
    if "mutual" in extra and not np.isin(extra["mutual"], (0, 1)).all():
        raise ValueError(f"{where}: mutuals must hold 0 or 1")
    if n < MIN_MATCHES:
        return {"skip": f"fewer than {MIN_MATCHES} matches ({n})"}
    norm = np.linalg.norm(t)
    if norm < 1e-12:
        return {"skip": "zero translation (no epipolar geometry)"}
    t = t / norm
    K1 = _intrinsics(cx1, cy1, f1, f"{where} (image 1)")
    K2 = _intrinsics(cx2, cy2, f2, f"{where} (image 2)")
    epi = ys[:, 0]
    if np.isnan(epi).any() or (epi < 0).any():
        raise ValueError(f"{where}: ys[:, 0] must hold non-negative distances (NaN or negative found)")
    label = (epi < threshold).astype(np.uint8)
    recomputed = (_epi_dist(xs, R, t) < threshold).astype(np.uint8)
    disagree = float(np.mean(recomputed != label))
    if disagree > LABEL_AGREEMENT_TOLERANCE:
        raise ValueError(
            f"{where}: ys[:, 0] is not the squared symmetric epipolar distance of xs under (R, t): the labels of "
            f"{disagree:.1%} of the matches change when it is recomputed (dumped with another obj_geod_type, "
            f"or xs/R/t of another convention?)")
    kpts1 = xs[:, :2] * np.diag(K1)[:2] + K1[:2, 2]
    kpts2 = xs[:, 2:] * np.diag(K2)[:2] + K2[:2, 2]
    size = lambda K: np.array([round(2 * K[0, 2] + 1), round(2 * K[1, 2] + 1)], dtype=np.int64)  # noqa: E731
    return {
        "xs": xs.astype(np.float32),
        "kpts1": kpts1.astype(np.float32),
        "kpts2": kpts2.astype(np.float32),
        "ratio": extra.get("ratio", np.ones(n)).astype(np.float32),
        "mutual": extra.get("mutual", np.zeros(n)).astype(np.uint8),
        "epi_dist": epi.astype(np.float64),
        "label": label,
        "R": R,
        "t": t,
        "K1": K1,
        "K2": K2,
        "size1": size(K1),
        "size2": size(K2),
        "scene": scene,
        "name": name,
        "image1": image1,
        "image2": image2,
        "label_disagreement": disagree,
    }


# ------------------------------------------------------------------------------------ OANet
def _numbered_keys(group, path, name) -> list[str]:
    keys = list(group.keys())
    if not all(k.isdigit() for k in keys):
        bad = next(k for k in keys if not k.isdigit())
        raise ValueError(f"{path}: group {name!r} holds key {bad!r}; an OANet dump numbers its pairs '0', '1', ...")
    return sorted(keys, key=int)


def read_oanet_dump(path, threshold: float = DEFAULT_THRESHOLD, max_pairs: int | None = None):
    """Yield ``(index, record)`` for the pairs of an OANet hdf5 dump (see the module docstring).

    ``FileNotFoundError`` for a missing file; ``ValueError`` naming the file (and pair) for a file
    that is not an OANet dump: not HDF5, a missing group, unnumbered keys, groups with different
    pairs, wrong shapes or values. ``record`` may be ``{"skip": reason}``.
    """
    import h5py

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"OANet dump not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path}: not a file (an OANet dump is one .hdf5 file per split)")
    try:
        h5 = h5py.File(path, "r")
    except OSError:
        raise ValueError(f"{path}: not a readable HDF5 file (an OANet dump is HDF5)") from None
    with h5:
        if "schema_version" in h5.attrs:
            raise ValueError(f"{path}: already a correspondence dataset of this project (schema_version "
                             f"{h5.attrs['schema_version']}), not an OANet dump")
        missing = [g for g in OANET_GROUPS if g not in h5 or not isinstance(h5[g], h5py.Group)]
        if missing:
            raise ValueError(f"{path}: not an OANet dump: missing group(s) {', '.join(missing)} "
                             f"(expected top-level groups {' '.join(OANET_GROUPS)})")
        keys = _numbered_keys(h5["xs"], path, "xs")
        if not keys:
            raise ValueError(f"{path}: the OANet dump holds no pairs (group 'xs' is empty)")
        for g in OANET_GROUPS[1:]:
            other = _numbered_keys(h5[g], path, g)
            if other != keys:
                raise ValueError(f"{path}: group {g!r} holds {len(other)} pairs, group 'xs' {len(keys)} "
                                 "(every group must hold the same numbered pairs)")
        scene = path.stem
        for k in keys[:max_pairs] if max_pairs else keys:
            where = f"{path}: pair {k}"
            try:
                v = {g: h5[g][k][()] for g in OANET_GROUPS}
            except (OSError, RuntimeError, TypeError) as err:
                raise ValueError(f"{where}: cannot read its data (truncated or corrupt file?): {err}") from None
            rec = make_record(where, v["xs"], v["ys"], v["Rs"], v["ts"], v["cx1s"], v["cy1s"], v["f1s"],
                              v["cx2s"], v["cy2s"], v["f2s"], ratio=v["ratios"], mutual=v["mutuals"],
                              threshold=threshold, scene=scene, name=f"{scene}/{int(k):06d}",
                              image1=f"pair{int(k)}_view1", image2=f"pair{int(k)}_view2")
            yield int(k), rec


# ------------------------------------------------------------------------------------ CNe / Yi
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, numpy scalars and Python containers only (no code execution)."""

    _NUMPY = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}
    _BUILTINS = {"tuple", "list", "dict", "float", "int", "complex", "bytes", "bytearray", "set", "frozenset"}

    def find_class(self, module, name):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy") and name in self._NUMPY:
            if module == "numpy.core.multiarray":  # numpy >= 2 moved it
                module = "numpy._core.multiarray" if hasattr(np, "_core") else module
            return getattr(importlib.import_module(module), name)
        if module in ("numpy._core.numeric", "numpy.core.numeric") and name == "_frombuffer":
            return getattr(importlib.import_module("numpy._core.numeric" if hasattr(np, "_core") else module), name)
        if module in ("builtins", "__builtin__") and name in self._BUILTINS:
            return getattr(importlib.import_module("builtins"), name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays and numbers are read)")


def _load_pickle(path: Path):
    try:
        with open(path, "rb") as f:
            data = _ArrayUnpickler(io.BufferedReader(f)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as err:
        raise ValueError(f"{path}: not a readable pickle of numpy arrays ({type(err).__name__}: {err})") from None
    if not isinstance(data, (list, tuple)):
        raise ValueError(f"{path}: must hold a list with one entry per pair, got {type(data).__name__}")
    return data


def cne_split(folder) -> str:
    """The split suffix (``tr``, ``va`` or ``te``) of a CNe dump folder; ``ValueError`` when it is not one."""
    folder = Path(folder)
    found = sorted({s for s in CNE_SPLITS if (folder / f"xs_{s}.pkl").is_file()})
    if not found:
        raise ValueError(f"{folder}: not a CNe dump split folder (no xs_tr.pkl, xs_va.pkl or xs_te.pkl; expected "
                         "<dump_prefix>/<data_name>/numkp-K/nn-1/[nocrop/]<tr|va|te>-N/ written by dump_data.py)")
    if len(found) > 1:
        raise ValueError(f"{folder}: holds pickles of several splits ({', '.join(found)}); one split per folder")
    return found[0]


def cne_scene_name(folder: Path) -> str:
    """``<data_name>-<split folder>`` from ``.../<data_name>/numkp-K/...``, else the folder name."""
    parts = folder.resolve().parts
    for i, part in enumerate(parts):
        if part.startswith("numkp-") and i > 0:
            return f"{parts[i - 1]}-{parts[-1]}"
    return folder.name


def read_cne_dump(folder, threshold: float = DEFAULT_THRESHOLD, max_pairs: int | None = None):
    """Yield ``(index, record)`` for the pairs of a CNe dump split folder (see the module docstring)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"CNe dump folder not found: {folder}")
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder (a CNe dump is a split folder of <var>_<tr|va|te>.pkl files)")
    split = cne_split(folder)
    missing = [v for v in CNE_VARIABLES if not (folder / f"{v}_{split}.pkl").is_file()]
    if missing:
        raise ValueError(f"{folder}: CNe dump misses {', '.join(f'{v}_{split}.pkl' for v in missing)}")
    data = {v: _load_pickle(folder / f"{v}_{split}.pkl") for v in CNE_VARIABLES}
    n = len(data["xs"])
    for v in CNE_VARIABLES:
        if len(data[v]) != n:
            raise ValueError(f"{folder / f'{v}_{split}.pkl'}: holds {len(data[v])} pairs, xs_{split}.pkl {n}")
    if n == 0:
        raise ValueError(f"{folder}: the CNe dump holds no pairs")
    scene = cne_scene_name(folder)
    for k in range(min(n, max_pairs) if max_pairs else n):
        where = f"{folder}: pair {k}"
        d = {v: data[v][k] for v in CNE_VARIABLES}
        rec = make_record(where, d["xs"], d["ys"], d["Rs"], d["ts"], d["cx1s"], d["cy1s"], d["f1s"],
                          d["cx2s"], d["cy2s"], d["f2s"], threshold=threshold, scene=scene,
                          name=f"{scene}/{k:06d}", image1=f"pair{k}_view1", image2=f"pair{k}_view2")
        yield k, rec


DUMP_FORMATS = {"oanet-dump": read_oanet_dump, "cne-dump": read_cne_dump}


# ------------------------------------------------------------------------------------ conversion
def convert_dumps(fmt: str, sources, out, threshold: float = DEFAULT_THRESHOLD, max_pairs: int | None = None,
                  progress: bool = False) -> dict:
    """Convert dump files/folders ``sources`` (all of format ``fmt``) into one h5 file ``out``.

    Every source is read and checked before ``out`` is renamed into place (written to ``out.tmp``),
    so a bad pair leaves nothing behind. ``max_pairs`` caps the pairs read per source (first ones).
    Returns a summary (pairs, skips, median matches and inlier ratio per source).
    """
    if fmt not in DUMP_FORMATS:
        raise ValueError(f"dump format must be one of {sorted(DUMP_FORMATS)}, got {fmt!r}")
    sources = [Path(s) for s in sources]
    if not sources:
        raise ValueError("no dump given")
    reader = DUMP_FORMATS[fmt]
    start = time.time()
    index, per_source, names = 0, [], set()
    settings = {"format": fmt, "threshold": float(threshold), "sources": [str(s) for s in sources],
                "max_pairs": -1 if max_pairs is None else int(max_pairs), "split": "all",
                "side_info": "ratio,mutual" if fmt == "oanet-dump" else "none",
                "size_source": "estimated from the principal point: (2 cx + 1, 2 cy + 1)",
                "label_rule": "epi_dist = dump ys[:, 0] (squared symmetric epipolar distance); label = epi_dist < threshold"}
    with atomic_h5(out) as h5:
        for source in sources:
            stats = {"source": str(source), "pairs": 0, "skipped": 0, "skip_reasons": {}, "matches": [], "inlier_ratio": [],
                     "max_label_disagreement": 0.0}
            for k, rec in reader(source, threshold=threshold, max_pairs=max_pairs):
                if "skip" in rec:
                    stats["skipped"] += 1
                    stats["skip_reasons"][rec["skip"]] = stats["skip_reasons"].get(rec["skip"], 0) + 1
                    continue
                if rec["name"] in names:
                    raise ValueError(f"{source}: pair name {rec['name']} also comes from an earlier source (same dump given twice?)")
                names.add(rec["name"])
                stats["max_label_disagreement"] = max(stats["max_label_disagreement"], rec.pop("label_disagreement"))
                write_pair(h5, pair_key(index), rec)
                index += 1
                stats["pairs"] += 1
                stats["matches"].append(len(rec["label"]))
                stats["inlier_ratio"].append(float(rec["label"].mean()))
            if stats["pairs"] == 0:
                raise ValueError(f"{source}: no usable pair ({stats['skipped']} skipped: {stats['skip_reasons']})")
            m, r = np.asarray(stats.pop("matches")), np.asarray(stats.pop("inlier_ratio"))
            stats.update(median_matches=float(np.median(m)), median_inlier_ratio=float(np.median(r)),
                         inlier_ratio_p10=float(np.percentile(r, 10)), inlier_ratio_p90=float(np.percentile(r, 90)))
            per_source.append(stats)
        settings["num_pairs"] = index
        write_settings(h5, settings)
    return {"format": fmt, "out": str(out), "pairs": index, "sources": per_source, "seconds": round(time.time() - start, 2)}


def format_dump_summary(summary: dict) -> str:
    lines = [f"{summary['format']}: {summary['pairs']} pairs -> {summary['out']} ({summary['seconds']:.1f} s)"]
    for s in summary["sources"]:
        skips = ", ".join(f"{n} x {r}" for r, n in s["skip_reasons"].items()) or "-"
        lines.append(f"  {s['source']}: {s['pairs']} pairs, skipped {s['skipped']} ({skips}); median matches "
                     f"{s['median_matches']:.0f}, median inlier ratio {s['median_inlier_ratio']:.3f} "
                     f"(p10 {s['inlier_ratio_p10']:.3f}, p90 {s['inlier_ratio_p90']:.3f}); "
                     f"labels changed by recomputing: at most {s['max_label_disagreement']:.2%} of a pair")
    return "\n".join(lines)
