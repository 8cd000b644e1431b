"""End to end on Strecha entry-P10: COLMAP database export, pycolmap's incremental mapper, and
rotation errors against the ground-truth cameras -- with the learned filter and without.

    python docs/examples/colmap_entry_p10.py [--data ../shared/data] [--weights n3net-strecha]
        [--num-kp 2000] [--images 10] [--out out/colmap_entry_p10]

Two databases are exported from the same SIFT keypoints (known intrinsics from the Strecha
camera files, one shared camera, exhaustive pairs):

- ``filtered``: every keypoint's nearest neighbour, classified by the network, RANSAC on the kept
  matches (``data_prep.colmap_export`` default);
- ``unfiltered``: Lowe-ratio (0.8) mutual matches verified by COLMAP's own two-view geometry
  estimator -- what a plain COLMAP run would do (``--no-filter``);
- ``ransac-only`` (with ``--ablation``): the filtered pipeline with the network replaced by one
  that keeps every match, i.e. OpenCV RANSAC alone on all nearest-neighbour matches. It isolates
  what the network adds.

The mapper runs on each with the intrinsics held fixed. Reported per run: how many images
register, and rotation errors against the ground truth (relative rotations of all registered
pairs, and absolute rotations after one global alignment rotation). ``OUT/results.json`` holds
everything. entry-P10 is the development test scene: the shipped models never saw it.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from data_prep.colmap_export import export_database, rotation_errors, run_mapper
from data_prep.scenes import read_strecha_scene

ROOT = Path(__file__).resolve().parents[2]


class KeepAll(torch.nn.Module):
    """Stand-in 'network' for the ransac-only ablation: every match gets a large logit."""

    conf = {"side_info": False}

    def forward(self, x, mask=None):
        return torch.full(x.shape[::2], 10.0)


def compare(scene_dir, out_dir, weights="n3net-strecha", num_kp=2000, num_images=None, device="cpu",
            runs=("filtered", "unfiltered"), seed=0) -> dict:
    """Export, map and evaluate entry-P10 (or any Strecha-layout scene); returns the results dict."""
    unknown = set(runs) - {"filtered", "unfiltered", "ransac-only"}
    if unknown:
        raise ValueError(f"unknown runs {sorted(unknown)}; choose from filtered, unfiltered, ransac-only")
    scene = read_strecha_scene(scene_dir)
    names = scene.image_names[: num_images or len(scene)]
    R_gt = {n: scene.R[i] for i, n in enumerate(scene.image_names) if n in names}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_dir = Path(scene.image_paths[0]).parent
    results = {"scene": scene.name, "images": names, "weights": weights, "num_kp": num_kp, "runs": {}}
    for run in runs:
        t0 = time.time()
        db = out_dir / f"{run}.db"
        match_filter = None
        if run == "ransac-only":
            from n3sets.match_filter import MatchFilter

            match_filter = MatchFilter(KeepAll())
        summary = export_database(image_dir, db, pairs="exhaustive", weights=weights, num_kp=num_kp,
                                  camera_model="PINHOLE", K=scene.K[0], use_filter=(run != "unfiltered"),
                                  device=device, image_names=names, overwrite=True, match_filter=match_filter)
        t_export = time.time() - t0
        rec = run_mapper(db, image_dir, out_dir / f"sparse_{run}", fixed_intrinsics=True, seed=seed)
        errors = rotation_errors(rec, R_gt)
        results["runs"][run] = {
            **errors,
            "verified_pairs": summary["verified_pairs"],
            "num_pairs": len(summary["pairs"]),
            "inlier_matches": int(sum(p["inliers"] for p in summary["pairs"])),
            "num_points3D": 0 if rec is None else rec.num_points3D(),
            "mean_reprojection_error_px": None if rec is None else rec.compute_mean_reprojection_error(),
            "export_seconds": round(t_export, 1),
            "total_seconds": round(time.time() - t0, 1),
        }
    return results


def format_table(results: dict) -> str:
    lines = [f"{results['scene']} ({len(results['images'])} images, {results['num_kp']} SIFT keypoints, "
             f"weights {results['weights']})",
             f"{'run':<12} {'registered':>10} {'verified pairs':>14} {'rel. rot. err. med/max (deg)':>29} "
             f"{'abs. rot. err. med/max (deg)':>29} {'points':>7}"]
    for run, r in results["runs"].items():
        rel = r.get("relative_deg")
        ab = r.get("absolute_deg")
        fmt = lambda s: f"{s['median']:.3f} / {s['max']:.3f}" if s else "-"  # noqa: E731
        lines.append(f"{run:<12} {r['num_registered']:>5} / {r['num_images']:<2} "
                     f"{r['verified_pairs']:>7} / {r['num_pairs']:<4} {fmt(rel):>29} {fmt(ab):>29} {r['num_points3D']:>7}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="data root (../shared/data)")
    parser.add_argument("--scene", default="entry-P10")
    parser.add_argument("--weights", default="n3net-strecha")
    parser.add_argument("--num-kp", type=int, default=2000)
    parser.add_argument("--images", type=int, default=None, help="use only the first N images")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "out" / "colmap_entry_p10"))
    parser.add_argument("--ablation", action="store_true", help="also run ransac-only (no network)")
    parser.add_argument("--runs", help="comma-separated subset of filtered,unfiltered,ransac-only (overrides --ablation)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    scene_dir = Path(args.data) / "strecha" / args.scene
    if not scene_dir.is_dir():
        print(f"error: scene folder {scene_dir} not found (--data)", file=sys.stderr)
        return 2
    results = compare(scene_dir, args.out, weights=args.weights, num_kp=args.num_kp,
                      num_images=args.images, device=args.device,
                      runs=tuple(args.runs.split(",")) if args.runs else
                      ("filtered", "unfiltered") + (("ransac-only",) if args.ablation else ()))
    Path(args.out, "results.json").write_text(json.dumps(results, indent=2))
    print(format_table(results))
    print(f"details: {Path(args.out, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
