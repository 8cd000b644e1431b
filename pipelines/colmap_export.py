#!/usr/bin/env python
"""Export SIFT matches of an image folder, filtered by a learned model, to a COLMAP database.

    python pipelines/colmap_export.py --images DIR --database OUT.db \
        [--pairs exhaustive|sequential:N] [--weights n3net-strecha] [--num-kp 2000] \
        [--camera-model SIMPLE_RADIAL|PINHOLE] [--K fx,fy,cx,cy] [--no-filter]

What is written, coordinates and the mapper that reads it: :mod:`data_prep.colmap_export` (the
library this program calls; ``python data_prep/colmap_export.py`` is an alias of this program).
Exit codes: 0 done, 2 bad input (one ``colmap_export.py: error: ...`` line on stderr).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from data_prep.colmap_export import CAMERA_MODELS, export_database, parse_intrinsics
from n3sets.cli import one_line

PROGRAM = "colmap_export.py"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Extract SIFT for a folder of images, match pairs, filter the matches with a "
                    "learned model and write everything into a COLMAP database for pycolmap's mapper.")
    parser.add_argument("--images", required=True, help="folder of images")
    parser.add_argument("--database", required=True, help="COLMAP database to create (.db)")
    parser.add_argument("--pairs", default="exhaustive", help="exhaustive (default) or sequential:N")
    parser.add_argument("--weights", default="n3net-strecha", help="pretrained model name or weight file")
    parser.add_argument("--num-kp", type=int, default=2000, help="SIFT keypoints per image (default 2000)")
    parser.add_argument("--camera-model", default="SIMPLE_RADIAL", choices=CAMERA_MODELS)
    parser.add_argument("--K", help="shared intrinsics 'fx,fy,cx,cy' or a 3x3 text file (default: guess per image)")
    parser.add_argument("--no-filter", action="store_true",
                        help="no network: ratio-test mutual matches verified by COLMAP (baseline)")
    parser.add_argument("--threshold", type=float, default=0.5, help="inlier probability threshold")
    parser.add_argument("--no-refine", action="store_true", help="no RANSAC after the network (weighted 8-point)")
    parser.add_argument("--min-inliers", type=int, default=15, help="minimum verified matches for a pair to be used")
    parser.add_argument("--ratio", type=float, default=0.8, help="Lowe ratio of the --no-filter baseline")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing database")
    parser.add_argument("--summary", help="also write the summary JSON to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    try:
        K = parse_intrinsics(args.K) if args.K else None
        summary = export_database(
            args.images, args.database, pairs=args.pairs, weights=args.weights, num_kp=args.num_kp,
            camera_model=args.camera_model, K=K, use_filter=not args.no_filter, threshold=args.threshold,
            refine=None if args.no_refine else "ransac", min_inliers=args.min_inliers, ratio=args.ratio,
            device=args.device, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"{PROGRAM}: error: {one_line(err)}", file=sys.stderr)
        return 2
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2))
    print(f"wrote {summary['database']}: {summary['images']} images, {len(summary['pairs'])} pairs "
          f"({summary['verified_pairs']} verified) in {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
