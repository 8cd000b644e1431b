#!/usr/bin/env python
"""How often MatchFilter's two-view verification accepts real pairs and rejects impossible ones.

    python pipelines/eval_verification.py --positives data_out/strecha_val.h5 \\
        --negatives ../shared/data/strecha/castle-P30 ../shared/data/middlebury/templeSparseRing \\
        --max-negatives 500 --identical 10 --weights n3net-strecha --json results/verification/choose.json

Three kinds of pairs:

- positives: the pairs of a correspondence h5 (real overlapping views with ground-truth pose);
- negatives: two images of *different* scene folders (``--negatives``, at least two), sampled
  uniformly without repetition (seeded): no pose exists, every accepted pair is a false accept;
- identical: an image matched with itself (``--identical N`` images of the negative folders):
  no baseline, so no relative translation exists either.

Every pair goes through :class:`n3sets.MatchFilter` with verification off, and the JSON keeps, per
pair, the verified quantities (:func:`n3sets.twoview.verification_stats`) and for positives the
pose error; the summary applies :data:`n3sets.twoview.VERIFY_DEFAULTS` (or ``--verify-conf``)
to them. So thresholds can be chosen from one run (``--choose``: the smallest ``min_inliers``
and ``min_inlier_ratio`` on a grid that reject every negative pair, with a margin).

Scene folders: images in ``DIR/images`` or ``DIR``; intrinsics from Strecha-layout cameras
(``DIR/cameras/NAME.camera``), from ``DIR/K.txt``, or guessed from EXIF / the image size.
Bad input: one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from n3sets.cli import UsageError, check_writable_folder, one_line

PROGRAM = "eval_verification.py"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positives", nargs="+", action="extend", default=[], metavar="H5",
                   help="correspondence h5 files (pairs with ground-truth pose)")
    p.add_argument("--negatives", nargs="+", action="extend", default=[], metavar="DIR",
                   help="scene folders; pairs of images from two different folders are negatives")
    p.add_argument("--max-negatives", type=int, default=500, help="number of negative pairs (default %(default)s)")
    p.add_argument("--identical", type=int, default=0, metavar="N", help="also match N images with themselves")
    p.add_argument("--weights", default="n3net-strecha", help="shipped model name or weight file")
    p.add_argument("--refine", default="ransac", choices=["ransac", "magsac", "none"])
    p.add_argument("--num-kp", type=int, default=2000, help="SIFT keypoints per image for negatives (default %(default)s)")
    p.add_argument("--cache-dir", default="out/feature_cache", help="SIFT feature cache (default %(default)s)")
    p.add_argument("--verify-conf", default="{}", help="JSON overrides of n3sets.twoview.VERIFY_DEFAULTS for the summary")
    p.add_argument("--choose", action="store_true", help="also search min_inliers / min_inlier_ratio (see above)")
    p.add_argument("--rescore", metavar="JSON", nargs="+", help="re-apply --verify-conf to the pairs of earlier "
                   "outputs (several: the shards of one run, merged) instead of matching again")
    p.add_argument("--shard", default="0/1", metavar="K/N", help="run only every N-th pair starting at K (default 0/1); "
                   "merge the shards' outputs with --rescore")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default %(default)s)")
    p.add_argument("--json", required=True, help="output file (refuses to overwrite unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if not args.positives and not args.negatives and not args.rescore:
        p.error("give --positives and/or --negatives (or --rescore)")
    if args.negatives and len(args.negatives) < 2:
        p.error("--negatives needs at least two scene folders (a negative pair takes one image from each of two)")
    if args.max_negatives < 0 or args.identical < 0 or args.threads < 1 or args.num_kp < 8:
        p.error("--max-negatives and --identical must be >= 0, --threads >= 1, --num-kp >= 8")
    try:
        k, n = (int(v) for v in args.shard.split("/"))
        if not 0 <= k < n:
            raise ValueError
        args.shard = (k, n)
    except ValueError:
        p.error(f"--shard must be K/N with 0 <= K < N, got {args.shard!r}")
    try:
        args.verify_conf = json.loads(args.verify_conf)
        if not isinstance(args.verify_conf, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        p.error(f"--verify-conf: {exc}")
    return args


# ---------------------------------------------------------------------------- scenes


def scene_images(folder: Path) -> tuple[list[Path], callable]:
    """Images of a scene folder and a function image path -> K (3, 3)."""
    from data_prep.colmap_export import guess_intrinsics, list_images, parse_intrinsics
    from data_prep.scenes import read_strecha_camera

    if not folder.is_dir():
        raise UsageError(f"--negatives {folder}: not a folder")
    image_dir = folder / "images" if (folder / "images").is_dir() else folder
    try:
        paths = [image_dir / n for n in list_images(image_dir)]
    except FileNotFoundError as exc:
        raise UsageError(f"--negatives {folder}: {exc}") from None
    k_file = folder / "K.txt"
    fixed = parse_intrinsics(str(k_file)) if k_file.is_file() else None

    def intrinsics(path: Path, size: tuple[int, int]) -> np.ndarray:
        camera = folder / "cameras" / f"{path.name}.camera"
        if camera.is_file():
            return read_strecha_camera(camera)["K"]
        if fixed is not None:
            return fixed
        return guess_intrinsics(path, *size)[0]

    return paths, intrinsics


def negative_pairs(folders: list[Path], count: int, seed: int) -> list[tuple[int, Path, int, Path]]:
    per_scene = [scene_images(f)[0] for f in folders]
    every = [(a, pa, b, pb) for a, b in itertools.combinations(range(len(folders)), 2)
             for pa in per_scene[a] for pb in per_scene[b]]
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(every))[:count]
    return [every[i] for i in sorted(pick)]


# ---------------------------------------------------------------------------- evaluation


def _record(kind: str, name: str, res, x1n, x2n, conf: dict, extra: dict | None = None) -> dict:
    from n3sets.twoview import check_stats, degenerate, rotation_inliers

    extra = dict(extra or {})
    if res.verification is None:  # no essential matrix: is it because there is no baseline?
        rot = rotation_inliers(x1n, x2n)
        reason = degenerate({"rotation_inliers": rot, "num_inliers": 0}, conf) or res.reason
        extra.update(rotation_inliers=rot, estimator_reason=res.reason)
    else:
        reason = check_stats(res.verification, conf)
    rec = {"kind": kind, "name": name, "num_matches": res.num_matches, "num_kept": res.num_kept,
           "estimated": res.verification is not None, "accepted": res.verification is not None and not reason,
           "reason": reason, "stats": res.verification}
    rec.update(extra)
    return rec


def run_positives(mf, h5_paths: list[str], refine, conf: dict, shard=(0, 1)) -> list[dict]:
    from data_prep.corr_dataset import CorrespondenceDataset
    from n3sets.pose import pose_error

    rows = []
    eye = np.eye(3)
    for h5 in h5_paths:
        ds = CorrespondenceDataset(h5, side_info=mf.side_info)
        for i in range(shard[0], len(ds), shard[1]):
            pair = ds[i]
            xs = np.asarray(pair["xs"], dtype=np.float64)
            side = {}
            if mf.side_info:
                side = {"ratio": np.asarray(pair["ratio"]), "mutual": np.asarray(pair["mutual"]).astype(bool)}
            res = mf.filter(xs[:, :2], xs[:, 2:4], eye, eye, refine=refine, **side)
            err = None
            if res.E is not None:
                err = float(pose_error(torch.as_tensor(res.R), torch.as_tensor(res.t),
                                       torch.as_tensor(pair["R"]).double(), torch.as_tensor(pair["t"]).double().reshape(3)))
            rows.append(_record("positive", f"{Path(h5).name}:{pair.get('name', i)}", res, xs[:, :2], xs[:, 2:4],
                                conf, {"pose_error": err}))
    return rows


def run_images(mf, pairs, folders: list[Path], cache, refine, kind: str, conf: dict) -> list[dict]:
    from data_prep.features import match_both_ways
    from n3sets.geometry import normalize_keypoints

    intrinsics = {i: scene_images(f)[1] for i, f in enumerate(folders)}
    rows = []
    for a, pa, b, pb in pairs:
        k1, d1, s1 = cache.compute(pa)
        k2, d2, s2 = cache.compute(pb)
        m = match_both_ways(d1, d2)[0]
        side = {"ratio": m["ratio"], "mutual": m["mutual"]} if mf.side_info else {}
        x1, x2 = k1[m["idx1"]], k2[m["idx2"]]
        K1, K2 = intrinsics[a](pa, s1), intrinsics[b](pb, s2)
        res = mf.filter(x1, x2, K1, K2, refine=refine, **side)
        n1, n2 = (normalize_keypoints(torch.from_numpy(np.asarray(x, np.float64)), torch.from_numpy(np.asarray(K, np.float64))).numpy()
                  for x, K in ((x1, K1), (x2, K2)))
        rows.append(_record(kind, f"{folders[a].name}/{pa.name}|{folders[b].name}/{pb.name}", res, n1, n2, conf))
    return rows


def accepted(rec: dict, conf: dict) -> bool:
    from n3sets.twoview import check_stats

    return bool(rec["estimated"] and not check_stats(rec["stats"], conf))


def summarize(rows: list[dict], conf: dict) -> dict:
    out = {}
    for kind in ("positive", "negative", "identical"):
        sel = [r for r in rows if r["kind"] == kind]
        if not sel:
            continue
        acc = [accepted(r, conf) for r in sel]
        entry = {"pairs": len(sel), "accepted": int(sum(acc)), "accept_rate": float(np.mean(acc)),
                 "estimated": int(sum(r["estimated"] for r in sel))}
        if kind == "positive":
            good = [r["pose_error"] is not None and r["pose_error"] < 10 for r in sel]
            entry["pose_below_10deg"] = int(sum(good))
            entry["accepted_and_below_10deg"] = int(sum(a and g for a, g in zip(acc, good)))
            entry["rejected_but_below_10deg"] = int(sum((not a) and g for a, g in zip(acc, good)))
            entry["accepted_but_above_10deg"] = int(sum(a and not g for a, g in zip(acc, good)))
        stats = [r["stats"] for r in sel if r["estimated"]]
        if stats:
            entry["stats_quantiles"] = {
                key: {q: float(np.quantile([s[key] for s in stats], float(q))) for q in ("0", "0.05", "0.5", "0.95", "1")}
                for key in stats[0]}
        out[kind] = entry
    return out


def choose(rows: list[dict], base: dict, margin: float = 1.5) -> dict:
    """Smallest (min_inliers, min_inlier_ratio) on a grid that rejects every negative and identical
    pair with ``margin`` (both thresholds divided by it still reject them), maximising positive accepts."""
    best = None
    for mi in (8, 10, 12, 15, 20, 25, 30, 40, 50):
        for mr in (0.0, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05):
            loose = {**base, "min_inliers": mi / margin, "min_inlier_ratio": mr / margin}
            if any(accepted(r, loose) for r in rows if r["kind"] != "positive"):
                continue
            conf = {**base, "min_inliers": mi, "min_inlier_ratio": mr}
            pos = sum(accepted(r, conf) for r in rows if r["kind"] == "positive")
            if best is None or pos > best[0]:
                best = (pos, conf)
    return {"margin": margin, "conf": None if best is None else best[1],
            "positives_accepted": None if best is None else int(best[0])}


def main(argv=None) -> int:
    args = parse_args(argv)
    from data_prep.features import FeatureCache
    from n3sets.match_filter import MatchFilter
    from n3sets.twoview import VERIFY_DEFAULTS

    torch.set_num_threads(args.threads)
    out = Path(args.json)
    if out.exists() and not args.overwrite:
        raise UsageError(f"--json {out}: exists (use --overwrite to replace it)")
    check_writable_folder(out.parent, "--json")
    for h5 in args.positives:
        if not Path(h5).is_file():
            raise UsageError(f"--positives {h5}: no such file")
    unknown = set(args.verify_conf) - set(VERIFY_DEFAULTS)
    if unknown:
        raise UsageError(f"--verify-conf: unknown option(s) {sorted(unknown)}; known: {sorted(VERIFY_DEFAULTS)}")
    conf = {**VERIFY_DEFAULTS, **args.verify_conf}
    if args.rescore:
        rows = []
        for path in args.rescore:
            try:
                old = json.loads(Path(path).read_text())
                rows += old["pairs"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UsageError(f"--rescore {path}: not an output of {PROGRAM} ({one_line(exc)})") from None
        from n3sets.twoview import check_stats, degenerate

        for rec in rows:  # the reason under the new thresholds
            if rec["estimated"]:
                rec["reason"] = check_stats(rec["stats"], conf)
                rec["accepted"] = not rec["reason"]
            elif "rotation_inliers" in rec:
                rec["reason"] = degenerate({"rotation_inliers": rec["rotation_inliers"], "num_inliers": 0}, conf) \
                    or rec.get("estimator_reason", rec["reason"])
        result = {"settings": {**old["settings"], "verify_conf": conf, "rescored_from": args.rescore, "shard": "0/1",
                               "command": " ".join(sys.argv)},
                  "summary": summarize(rows, conf), "seconds": old.get("seconds"), "pairs": rows}
        if args.choose:
            result["choose"] = choose(rows, conf)
        return _write(out, result)
    try:
        mf = MatchFilter.from_pretrained(args.weights, verify=False)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise UsageError(f"--weights {args.weights}: {exc}") from None
    refine = None if args.refine == "none" else args.refine
    folders = [Path(f) for f in args.negatives]
    start = time.perf_counter()
    k, n = args.shard
    rows = run_positives(mf, args.positives, refine, conf, args.shard)
    if folders:
        cache = FeatureCache(args.cache_dir, num_kp=args.num_kp)
        rows += run_images(mf, negative_pairs(folders, args.max_negatives, args.seed)[k::n], folders, cache, refine,
                           "negative", conf)
        if args.identical:
            images = [(i, p) for i, f in enumerate(folders) for p in scene_images(f)[0]]
            pick = np.random.default_rng(args.seed + 1).permutation(len(images))[: args.identical]
            same = [(images[j][0], images[j][1], images[j][0], images[j][1]) for j in sorted(pick)]
            rows += run_images(mf, same[k::n], folders, cache, refine, "identical", conf)
    result = {
        "settings": {"weights": args.weights, "refine": args.refine, "positives": args.positives,
                     "negatives": args.negatives, "max_negatives": args.max_negatives, "identical": args.identical,
                     "num_kp": args.num_kp, "seed": args.seed, "verify_conf": conf, "shard": f"{k}/{n}",
                     "command": " ".join(sys.argv)},
        "summary": summarize(rows, conf),
        "seconds": time.perf_counter() - start,
        "pairs": rows,
    }
    if args.choose:
        result["choose"] = choose(rows, conf)
    return _write(out, result)


def _write(out: Path, result: dict) -> int:
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(json.dumps({"summary": result["summary"], "choose": result.get("choose")}, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as exc:
        print(f"{PROGRAM}: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
