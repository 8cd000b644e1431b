"""Building correspondence datasets: pair selection, SIFT matching, labels, h5 writing.

The command-line front end is ``pipelines/build_corr_dataset.py`` (``data_prep/build_corr_dataset.py``
is an alias of it); everything it does is here so tests can call it.

Pair selection (per scene, deterministic for a given ``seed``)
---------------------------------------------------------------
1. Candidates. A scene with covisibility data (``yi`` visibility files, COLMAP shared 3D points)
   uses it like Yi et al.: ordered pair ``(i, j)`` is a candidate when ``covis[i, j] > vis_threshold``.
   A scene without it (Strecha) uses the ground-truth geometry: the two optical axes must be at
   most ``max_angle_deg`` apart (default 90 degrees) -- a pair looking at different walls of a
   courtyard shares no surface.
2. Both directions ``(i, j)`` and ``(j, i)`` are kept (Yi et al. do the same; the matches differ
   because every keypoint of the first image is matched into the second). A pair and its reverse
   always end up in the same split.
3. At most ``max_pairs`` ordered pairs per scene: unordered pairs are shuffled with ``seed`` and
   taken in that order.
4. Validation split by unordered pairs: a seeded ``val_fraction`` of them goes to the validation
   file.
5. After matching, a pair is dropped when it has fewer than 8 matches (no essential matrix can be
   fitted; e.g. an image without keypoints), when the baseline is zero, or -- for scenes without
   covisibility data -- when fewer than ``min_verified`` matches are ground-truth inliers that
   also pass the ratio test (< 0.8) and the mutual check (default 20). Random matches land within
   Yi et al.'s threshold of their epipolar line a few percent of the time, so the raw inlier count
   of a non-overlapping pair is not zero; verified inliers are.

Files
-----
Each output file is written to ``FILE.tmp`` and renamed when complete. Keypoints are cached per
image (``FeatureCache``), so an interrupted build resumes where extraction stopped and gives a
byte-identical file. ``shard=(i, n)`` keeps the selected pairs whose index is ``i`` modulo ``n``;
shards are combined with :func:`merge_h5`.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .features import DEFAULT_CONTRAST_THRESHOLD, DEFAULT_NUM_KP, FeatureCache, match_both_ways
from .h5io import atomic_h5, open_pairs, pair_key, pair_keys, read_pair, read_settings, write_pair, write_settings
from .labels import DEFAULT_THRESHOLD, label_matches, pair_relative_pose
from .scenes import Scene

from n3sets.twoview import MIN_MATCHES  # noqa: E402  (the one minimum of every estimator: 8 matches)


@dataclass
class BuildConfig:
    num_kp: int = DEFAULT_NUM_KP
    contrast_threshold: float = DEFAULT_CONTRAST_THRESHOLD
    threshold: float = DEFAULT_THRESHOLD
    max_angle_deg: float = 90.0
    vis_threshold: float = 100.0
    min_verified: int = 20
    verify_ratio: float = 0.8
    max_pairs: int | None = None
    seed: int = 0
    val_fraction: float = 0.0
    workers: int = 1
    shard: tuple[int, int] = (0, 1)
    cache_dir: str | None = None

    def settings(self) -> dict:
        # Explicit casts: 45 and 45.0 must give the same file whether they come from Python or argparse.
        return {
            "num_kp": int(self.num_kp),
            "contrast_threshold": float(self.contrast_threshold),
            "threshold": float(self.threshold),
            "max_angle_deg": float(self.max_angle_deg),
            "vis_threshold": float(self.vis_threshold),
            "min_verified": int(self.min_verified),
            "verify_ratio": float(self.verify_ratio),
            "max_pairs": -1 if self.max_pairs is None else int(self.max_pairs),
            "seed": int(self.seed),
            "val_fraction": float(self.val_fraction),
            "shard": f"{self.shard[0]}/{self.shard[1]}",
            "min_matches": MIN_MATCHES,
            "descriptor": "opencv-sift",
            "matching": "nearest neighbour of every keypoint of image 1 in image 2 (L2, exact)",
        }


# ------------------------------------------------------------------------------ pair selection
def viewing_angles(scene: Scene) -> np.ndarray:
    """Angles in degrees between the optical axes of all pairs of views ``(V, V)``."""
    d = scene.viewing_directions
    return np.degrees(np.arccos(np.clip(d @ d.T, -1.0, 1.0)))


def candidate_units(scene: Scene, cfg: BuildConfig) -> list[tuple[int, int, tuple]]:
    """Unordered pairs ``(i, j, directions)`` with ``i < j`` and the ordered directions that qualify."""
    v = len(scene)
    units = []
    if scene.covisibility is not None:
        cov = np.asarray(scene.covisibility)
        for i in range(v):
            for j in range(i + 1, v):
                dirs = tuple(d for d in ((i, j), (j, i)) if cov[d] > cfg.vis_threshold)
                if dirs:
                    units.append((i, j, dirs))
    else:
        ang = viewing_angles(scene)
        for i in range(v):
            for j in range(i + 1, v):
                if ang[i, j] <= cfg.max_angle_deg:
                    units.append((i, j, ((i, j), (j, i))))
    return units


def select_pairs(scenes: list[Scene], cfg: BuildConfig) -> list[dict]:
    """Deterministic list of ordered pair tasks over all scenes (before sharding and matching).

    Each task: ``index`` (global, stable), ``scene`` (index into ``scenes``), ``i``, ``j``, ``split``
    (``"train"`` or ``"val"``) and ``unit`` (the unordered pair).
    """
    tasks = []
    for s, scene in enumerate(scenes):
        units = candidate_units(scene, cfg)
        rng = np.random.default_rng([cfg.seed, s])
        order = rng.permutation(len(units))
        chosen, count = [], 0
        for u in order:
            if cfg.max_pairs is not None and count >= cfg.max_pairs:
                break
            dirs = units[u][2]
            if cfg.max_pairs is not None:
                dirs = dirs[: cfg.max_pairs - count]
            chosen.append((units[u][0], units[u][1], dirs))
            count += len(dirs)
        chosen.sort()
        n_val = int(round(cfg.val_fraction * len(chosen)))
        val_units = set(np.random.default_rng([cfg.seed, s, 1]).permutation(len(chosen))[:n_val].tolist())
        for k, (i, j, dirs) in enumerate(chosen):
            for a, b in dirs:
                tasks.append({"scene": s, "i": a, "j": b, "unit": (i, j), "split": "val" if k in val_units else "train"})
    for index, task in enumerate(tasks):
        task["index"] = index
    return tasks


# ------------------------------------------------------------------------------------ workers
_WORKER = {}


def _init_worker(cache_kwargs: dict) -> None:
    import cv2
    import torch

    # Parallelism comes from the process pool; nested threads only oversubscribe the cores.
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    _WORKER["cache"] = FeatureCache(**cache_kwargs)


def _extract(image_path: str) -> tuple[str, tuple[int, int], int]:
    kpts, _, size = _WORKER["cache"].compute(image_path)
    return image_path, size, len(kpts)


def _make_unit(job: dict) -> list[dict]:
    """Match one unordered pair once and label each requested direction."""
    cache: FeatureCache = _WORKER["cache"]
    p1, p2 = job["paths"]
    k1, d1, _ = cache.compute(p1)
    k2, d2, _ = cache.compute(p2)
    forward, backward = match_both_ways(d1, d2)
    out = []
    for direction in job["directions"]:
        rec = {"index": direction["index"], "split": direction["split"], "name": direction["name"]}
        a, b = (0, 1) if direction["forward"] else (1, 0)
        kp_a, kp_b = (k1, k2) if direction["forward"] else (k2, k1)
        m = forward if direction["forward"] else backward
        cams = job["cams"]
        if len(m["idx1"]) < MIN_MATCHES:
            rec["skip"] = f"fewer than {MIN_MATCHES} matches ({len(m['idx1'])})"
            out.append(rec)
            continue
        try:
            R, t = pair_relative_pose(cams["R"][a], cams["t"][a], cams["R"][b], cams["t"][b])
        except ValueError as err:
            rec["skip"] = str(err)
            out.append(rec)
            continue
        kpts1, kpts2 = kp_a[m["idx1"]], kp_b[m["idx2"]]
        lab = label_matches(kpts1, kpts2, cams["K"][a], cams["K"][b], R, t, threshold=job["threshold"])
        verified = int(np.sum(lab["label"].astype(bool) & m["mutual"] & (m["ratio"] < job["verify_ratio"])))
        if job["min_verified"] and verified < job["min_verified"]:
            rec["skip"] = f"not covisible: {verified} verified inliers < {job['min_verified']}"
            out.append(rec)
            continue
        rec.update(
            xs=lab["xs"],
            kpts1=kpts1.astype(np.float32),
            kpts2=kpts2.astype(np.float32),
            ratio=m["ratio"].astype(np.float32),
            mutual=m["mutual"].astype(np.uint8),
            epi_dist=lab["epi_dist"],
            label=lab["label"],
            R=R,
            t=t,
            K1=cams["K"][a],
            K2=cams["K"][b],
            size1=np.asarray(cams["size"][a], dtype=np.int64),
            size2=np.asarray(cams["size"][b], dtype=np.int64),
            scene=direction["scene"],
            image1=direction["image1"],
            image2=direction["image2"],
        )
        out.append(rec)
    return out


def _pool(cfg: BuildConfig, cache_kwargs: dict):
    if cfg.workers <= 1:
        _init_worker(cache_kwargs)
        return None
    return mp.get_context("fork").Pool(cfg.workers, initializer=_init_worker, initargs=(cache_kwargs,))


def _imap(pool, fn, items, chunksize=1):
    if pool is None:
        return map(fn, items)
    return pool.imap(fn, items, chunksize=chunksize)


# --------------------------------------------------------------------------------------- build
def build_dataset(
    scenes: list[Scene],
    out,
    cfg: BuildConfig | None = None,
    val_out=None,
    progress: bool = True,
    extra_settings: dict | None = None,
) -> dict:
    """Build the h5 file(s) for ``scenes``; returns a summary dict (see :func:`format_summary`).

    ``out`` receives the training pairs (all pairs when ``val_fraction`` is 0); ``val_out`` the
    validation pairs (required when ``val_fraction > 0``).
    """
    from tqdm import tqdm

    cfg = cfg or BuildConfig()
    if not scenes:
        raise ValueError("no scenes given")
    if cfg.val_fraction and val_out is None:
        raise ValueError("val_fraction > 0 needs val_out (the validation file)")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    shard_i, shard_n = cfg.shard
    if not (shard_n >= 1 and 0 <= shard_i < shard_n):
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {shard_i}/{shard_n}")
    start = time.time()
    out = Path(out)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out.parent / "feature_cache"
    cache_kwargs = {"cache_dir": str(cache_dir), "num_kp": cfg.num_kp, "contrast_threshold": cfg.contrast_threshold}

    tasks = [t for t in select_pairs(scenes, cfg) if t["index"] % shard_n == shard_i]
    # group ordered pairs by unordered pair so that each pair of images is matched once
    jobs: dict[tuple, dict] = {}
    for t in tasks:
        scene = scenes[t["scene"]]
        lo, hi = t["unit"]
        key = (t["scene"], lo, hi)
        if key not in jobs:
            jobs[key] = {
                "paths": (scene.image_paths[lo], scene.image_paths[hi]),
                "cams": {
                    "K": [scene.K[lo], scene.K[hi]],
                    "R": [scene.R[lo], scene.R[hi]],
                    "t": [scene.t[lo], scene.t[hi]],
                    "size": [scene.sizes[lo], scene.sizes[hi]],
                },
                "directions": [],
                "threshold": cfg.threshold,
                "verify_ratio": cfg.verify_ratio,
                "min_verified": cfg.min_verified if scene.covisibility is None else 0,
            }
        jobs[key]["directions"].append(
            {
                "index": t["index"],
                "split": t["split"],
                "forward": t["i"] == lo,
                "scene": scene.name,
                "image1": scene.image_names[t["i"]],
                "image2": scene.image_names[t["j"]],
                "name": f"{scene.name}/{Path(scene.image_names[t['i']]).stem}-{Path(scene.image_names[t['j']]).stem}",
            }
        )
    needed = sorted({p for job in jobs.values() for p in job["paths"]})
    expected_size = {}
    for scene in scenes:
        for p, s in zip(scene.image_paths, scene.sizes):
            expected_size[p] = tuple(int(v) for v in s)

    pool = _pool(cfg, cache_kwargs)
    try:
        num_kp = {}
        for path, size, n in tqdm(
            _imap(pool, _extract, needed), total=len(needed), desc="features", disable=not progress, file=sys.stderr
        ):
            if size != expected_size[path]:
                raise ValueError(f"image {path} is {size[0]}x{size[1]} but its camera says {expected_size[path][0]}x{expected_size[path][1]}")
            num_kp[path] = n

        settings = dict(cfg.settings(), **(extra_settings or {}))
        settings["scenes"] = [s.name for s in scenes]
        settings.setdefault("format", ",".join(sorted({str(s.meta.get("format", "unknown")) for s in scenes})))
        outputs = {"train": out}
        if cfg.val_fraction:
            outputs["val"] = Path(val_out)
        records = {"train": [], "val": []}
        skipped = []
        ordered_jobs = sorted(jobs.items(), key=lambda kv: min(d["index"] for d in kv[1]["directions"]))
        # Records are gathered in memory (a Strecha build is a few hundred MB at most) so that
        # the files are written in index order regardless of worker timing.
        for recs in tqdm(
            _imap(pool, _make_unit, [job for _, job in ordered_jobs], chunksize=2),
            total=len(ordered_jobs),
            desc="pairs",
            disable=not progress,
            file=sys.stderr,
        ):
            for rec in recs:
                if "skip" in rec:
                    skipped.append((rec["name"], rec["skip"]))
                else:
                    records[rec["split"]].append(rec)
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    for split, path in outputs.items():
        recs = sorted(records[split], key=lambda r: r["index"])
        with atomic_h5(path) as h5:
            write_settings(h5, dict(settings, split=split if cfg.val_fraction else "all", num_pairs=len(recs)))
            for rec in recs:
                write_pair(h5, pair_key(rec["index"]), rec)
    summary = summarize(records, scenes, skipped, time.time() - start, outputs)
    summary["num_images"] = len(needed)
    summary["median_keypoints"] = float(np.median(list(num_kp.values()))) if num_kp else 0.0
    return summary


def summarize(records: dict, scenes: list[Scene], skipped: list, seconds: float, outputs: dict) -> dict:
    """Per-scene and per-split figures: pairs, matches per pair, inlier ratio distribution."""

    def stats(recs):
        if not recs:
            return {"pairs": 0}
        n = np.array([len(r["label"]) for r in recs])
        ratio = np.array([float(np.mean(r["label"])) for r in recs])
        q = np.percentile(ratio, [10, 25, 50, 75, 90])
        return {
            "pairs": len(recs),
            "median_matches": float(np.median(n)),
            "mean_matches": float(np.mean(n)),
            "median_inlier_ratio": float(q[2]),
            "inlier_ratio_percentiles": dict(zip(("p10", "p25", "p50", "p75", "p90"), q.round(4).tolist())),
            "inlier_ratio_histogram": np.histogram(ratio, bins=10, range=(0, 1))[0].tolist(),
        }

    all_recs = records["train"] + records["val"]
    per_scene = {}
    for scene in scenes:
        per_scene[scene.name] = {split: stats([r for r in records[split] if r["scene"] == scene.name]) for split in records}
        per_scene[scene.name]["all"] = stats([r for r in all_recs if r["scene"] == scene.name])
        per_scene[scene.name]["skipped"] = sum(1 for name, _ in skipped if name.startswith(scene.name + "/"))
    return {
        "outputs": {k: str(v) for k, v in outputs.items()},
        "splits": {split: stats(recs) for split, recs in records.items()},
        "scenes": per_scene,
        "skipped": len(skipped),
        "skip_reasons": sorted({reason.split(":")[0].split(" (")[0] for _, reason in skipped}),
        "seconds": round(seconds, 1),
    }


def format_summary(summary: dict) -> str:
    """Human-readable table of a :func:`build_dataset` summary."""
    lines = [f"{'scene':<20} {'split':<6} {'pairs':>6} {'med.matches':>11} {'med.inlier':>10}  inlier ratio p10/p25/p50/p75/p90"]
    for scene, splits in summary["scenes"].items():
        for split in ("train", "val", "all"):
            s = splits[split]
            if not s["pairs"] or (split == "train" and not splits["val"]["pairs"]):
                continue
            p = s["inlier_ratio_percentiles"]
            lines.append(
                f"{scene:<20} {split:<6} {s['pairs']:>6} {s['median_matches']:>11.0f} {s['median_inlier_ratio']:>10.3f}  "
                + "/".join(f"{p[k]:.2f}" for k in ("p10", "p25", "p50", "p75", "p90"))
            )
    lines.append(
        f"skipped pairs: {summary['skipped']} ({', '.join(summary['skip_reasons']) or '-'}); "
        f"images: {summary.get('num_images', '?')}, median keypoints {summary.get('median_keypoints', 0):.0f}; "
        f"build time {summary['seconds']:.1f} s"
    )
    for split, path in summary["outputs"].items():
        lines.append(f"{split}: {path} ({summary['splits'][split]['pairs']} pairs)")
    return "\n".join(lines)


def merge_h5(inputs, out) -> Path:
    """Combine shard files (same settings but the shard) into ``out``; groups keep their names."""
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise ValueError("no input files to merge")
    settings = None
    for p in inputs:
        if not p.is_file():
            raise FileNotFoundError(f"shard file not found: {p}")
        s = read_settings(p)
        s.pop("shard", None)
        s.pop("num_pairs", None)
        if settings is None:
            settings = s
        elif s != settings:
            raise ValueError(f"{p} was built with different settings than {inputs[0]}")
    entries = []
    for p in inputs:
        with open_pairs(p, values=False) as h5:  # ValueError naming a file that is not of this schema
            entries += [(k, p) for k in pair_keys(h5)]
    entries.sort()
    if len({k for k, _ in entries}) != len(entries):
        raise ValueError("the shard files share pair names (same shard given twice?)")
    sources = {}
    try:
        with atomic_h5(out) as dst:
            write_settings(dst, dict(settings, shard="merged", num_pairs=len(entries)))
            for key, p in entries:
                if p not in sources:
                    sources[p] = open_pairs(p, values=False)
                write_pair(dst, key, read_pair(sources[p][key]))
    finally:
        for src in sources.values():
            src.close()
    return Path(out)


def summary_json(summary: dict) -> str:
    return json.dumps(summary, indent=2, sort_keys=True)
