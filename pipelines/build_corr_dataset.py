#!/usr/bin/env python
"""Build an h5 dataset of labelled SIFT correspondences from calibrated scenes.

Examples::

    python pipelines/build_corr_dataset.py --format strecha \\
        --scene ../shared/data/strecha/castle-P30 --scene ../shared/data/strecha/Herz-Jesus-P25 \\
        --out data_out/strecha_train.h5 --val-out data_out/strecha_val.h5 --val-fraction 0.15 --workers 2
    python pipelines/build_corr_dataset.py --format strecha --scene ../shared/data/strecha/entry-P10 \\
        --out data_out/strecha_test.h5
    python pipelines/build_corr_dataset.py --format yi --scene raw_data/st_peters_square/train --out sp.h5
    python pipelines/build_corr_dataset.py --format colmap --scene project/sparse/0 --images project/images --out c.h5
    python pipelines/build_corr_dataset.py --format synthetic --num-pairs 200 --out synthetic.h5
    python pipelines/build_corr_dataset.py --format oanet-dump --scene data_dump/yfcc-sift-2000-train.hdf5 --out yfcc_train.h5
    python pipelines/build_corr_dataset.py --format cne-dump --scene dump/st_peters/numkp-2000/nn-1/nocrop/tr-10000 --out sp.h5
    python pipelines/build_corr_dataset.py --format photos --scene ../shared/data/photos/sceaux-castle --out data_out/sceaux.h5
    python pipelines/build_corr_dataset.py --merge a.h5 b.h5 --out all.h5      # combine --shard outputs

Pair selection, labels and the file layout are described in ``data_prep/build.py`` and
``data_prep/h5io.py`` (and ``data_prep/README.md``); this program only parses arguments, checks
the outputs and calls them. ``python data_prep/build_corr_dataset.py`` is an alias of it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.build import BuildConfig, build_dataset, format_summary, merge_h5, summary_json
from data_prep.features import DEFAULT_CONTRAST_THRESHOLD, DEFAULT_NUM_KP
from data_prep.labels import DEFAULT_THRESHOLD
from n3sets.cli import UsageError, check_writable_folder, one_line

PROGRAM = "build_corr_dataset.py"
FORMATS = ["strecha", "yi", "colmap", "synthetic", "oanet-dump", "cne-dump", "photos"]
DUMP_FORMATS = ("oanet-dump", "cne-dump")


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like i/n (e.g. 0/4), got {text!r}")
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=FORMATS, help="scene layout")
    p.add_argument("--scene", action="append", default=[],
                   help="scene folder (repeatable); colmap: the model folder; oanet-dump: an .hdf5 dump file; "
                        "cne-dump: a split folder (<tr|va|te>-N); photos: a folder of photos (optional K.txt)")
    p.add_argument("--images", action="append", default=[], help="colmap only: image folder per --scene (default: ../../images)")
    p.add_argument("--out", required=True, help="output h5 (training pairs when --val-out is given)")
    p.add_argument("--overwrite", action="store_true", help="replace --out / --val-out when they exist (refused otherwise)")
    p.add_argument("--val-out", help="output h5 for the validation pairs")
    p.add_argument("--val-fraction", type=float, default=0.0, help="fraction of (unordered) pairs for validation")
    p.add_argument("--num-kp", type=int, default=DEFAULT_NUM_KP, help="max SIFT keypoints per image (default %(default)s)")
    p.add_argument("--contrast-threshold", type=float, default=DEFAULT_CONTRAST_THRESHOLD, help="SIFT contrast threshold")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="inlier threshold on the squared symmetric epipolar distance")
    p.add_argument("--max-pairs", type=int, default=None, help="max ordered pairs per scene")
    p.add_argument("--max-angle", type=float, default=90.0, help="scenes without covisibility: max angle between optical axes (deg)")
    p.add_argument("--min-verified", type=int, default=20, help="scenes without covisibility: min GT inliers that pass ratio+mutual")
    p.add_argument("--vis-threshold", type=float, default=100.0, help="scenes with covisibility: keep (i,j) if covis > this (Yi: 100 St. Peter's/Reichstag, 0.5 Brown)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes (default %(default)s)")
    p.add_argument("--shard", type=_shard, default=(0, 1), help="i/n: build only every n-th selected pair starting at i")
    p.add_argument("--cache-dir", help="feature cache (default: OUT_DIR/feature_cache)")
    p.add_argument("--summary-json", help="also write the summary as JSON here")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--merge", nargs="+", help="merge these shard files into --out and exit")
    p.add_argument("--sfm-dir", help="photos only: folder for the COLMAP reconstructions, one subfolder per scene "
                                     "(default: OUT_DIR/OUT_STEM_sfm)")
    p.add_argument("--max-features", type=int, default=8192, help="photos only: COLMAP SIFT features per image for SfM")
    p.add_argument("--num-pairs", type=int, default=100, help="synthetic only: number of pairs")
    p.add_argument("--outlier-ratio", type=float, default=0.6, help="synthetic only")
    args = p.parse_args(argv)
    if args.merge is None:
        if args.format is None:
            p.error("--format is required (or --merge)")
        if args.format != "synthetic" and not args.scene:
            p.error("at least one --scene is required")
        if args.val_fraction and not args.val_out:
            p.error("--val-fraction needs --val-out")
        if args.val_out and not args.val_fraction:
            p.error("--val-out needs --val-fraction > 0")
        if args.format in DUMP_FORMATS and args.val_out:
            p.error(f"--format {args.format}: the dumps come split already (one file or folder per split); "
                    "convert each split into its own --out")
    return args


def check_outputs(args) -> None:
    """UsageError, before any work, for an output that exists (without --overwrite), is a folder or
    cannot be written, so that a long build never fails at its end."""
    outputs = [("--out", args.out)] + ([("--val-out", args.val_out)] if args.val_out else [])
    if args.val_out and Path(args.val_out).resolve() == Path(args.out).resolve():
        raise UsageError(f"--val-out {args.val_out} is the same file as --out")
    for option, value in outputs:
        path = Path(value)
        if path.is_dir():
            raise UsageError(f"{option} {path} is a folder; give an .h5 file name")
        if path.exists() and not args.overwrite:
            raise UsageError(f"{option} {path} exists; pass --overwrite to replace it")
        if args.merge and any(Path(m).resolve() == path.resolve() for m in args.merge if Path(m).exists()):
            raise UsageError(f"{option} {path} is one of the --merge inputs")
        check_writable_folder(path.parent, f"{option} {path}")
    if args.summary_json:
        path = Path(args.summary_json)
        if path.is_dir():
            raise UsageError(f"--summary-json {path} is a folder; give a file name")
        check_writable_folder(path.parent, f"--summary-json {path}")
    if args.format == "photos" and not args.merge:
        names = [photo_scene_name(s) for s in args.scene]
        if len(set(names)) != len(names):
            raise UsageError(f"--format photos: two --scene folders share a name ({', '.join(names)}); "
                             "their reconstructions would collide in --sfm-dir")
        for name in names:
            target = sfm_root(args) / name
            if target.exists() and not args.overwrite:
                raise UsageError(f"SfM folder {target} exists; pass --overwrite to replace it (or choose --sfm-dir)")
        check_writable_folder(sfm_root(args).parent, f"--sfm-dir {sfm_root(args)}")
    if args.images and len(args.images) != len(args.scene):
        raise UsageError(f"--images must be given once per --scene ({len(args.images)} --images, {len(args.scene)} --scene)")


def photo_scene_name(folder) -> str:
    return Path(folder).resolve().name


def sfm_root(args) -> Path:
    """Where --format photos keeps its reconstructions (one subfolder per scene)."""
    return Path(args.sfm_dir) if args.sfm_dir else Path(args.out).parent / f"{Path(args.out).stem}_sfm"


def photo_scenes(args) -> tuple[list, dict]:
    """SfM on every --scene photo folder (data_prep.sfm), then the undistorted models as scenes."""
    from data_prep.scenes import read_colmap_scene
    from data_prep.sfm import format_sfm_stats, reconstruct_photos, undistorted_model

    scenes, stats = [], {}
    for folder in args.scene:
        name = photo_scene_name(folder)
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"photo folder not found: {folder}")
        st = reconstruct_photos(folder, sfm_root(args) / name, seed=args.seed, max_num_features=args.max_features,
                                overwrite=args.overwrite)
        print(format_sfm_stats(name, st), flush=True)
        model, images = undistorted_model(st["sfm_dir"])
        scenes.append(read_colmap_scene(model, images, name=name))
        stats[name] = {k: v for k, v in st.items() if k not in ("registered", "unregistered")}
    return scenes, stats


def run(args) -> int:
    check_outputs(args)
    if args.merge is not None:
        print(f"merged {len(args.merge)} files into {merge_h5(args.merge, args.out)}")
        return 0
    if args.format == "synthetic":
        from data_prep.synthetic import write_synthetic_dataset

        write_synthetic_dataset(args.out, args.num_pairs, seed=args.seed, num_matches=args.num_kp, outlier_ratio=args.outlier_ratio, threshold=args.threshold)
        if args.val_out:
            n_val = max(1, int(round(args.num_pairs * args.val_fraction)))
            write_synthetic_dataset(args.val_out, n_val, seed=args.seed + 1, num_matches=args.num_kp, outlier_ratio=args.outlier_ratio, threshold=args.threshold)
        print(f"wrote synthetic pairs to {args.out}" + (f" and {args.val_out}" if args.val_out else ""))
        return 0

    if args.format in DUMP_FORMATS:
        from data_prep.dumps import convert_dumps, format_dump_summary

        summary = convert_dumps(args.format, args.scene, args.out, threshold=args.threshold, max_pairs=args.max_pairs)
        print(format_dump_summary(summary))
        if args.summary_json:
            Path(args.summary_json).write_text(summary_json(summary))
        return 0

    from data_prep.scenes import read_scene

    extra_settings = None
    if args.format == "photos":
        scenes, sfm_stats = photo_scenes(args)
        extra_settings = {"format": "photos", "sfm": sfm_stats, "sfm_dir": str(sfm_root(args))}
    else:
        images = args.images or [None] * len(args.scene)
        scenes = [read_scene(args.format, s, image_dir=img) for s, img in zip(args.scene, images)]
    cfg = BuildConfig(
        num_kp=args.num_kp,
        contrast_threshold=args.contrast_threshold,
        threshold=args.threshold,
        max_angle_deg=args.max_angle,
        vis_threshold=args.vis_threshold,
        min_verified=args.min_verified,
        max_pairs=args.max_pairs,
        seed=args.seed,
        val_fraction=args.val_fraction,
        workers=args.workers,
        shard=args.shard,
        cache_dir=args.cache_dir,
    )
    summary = build_dataset(scenes, args.out, cfg, val_out=args.val_out, progress=not args.no_progress,
                            extra_settings=extra_settings)
    if extra_settings:
        summary["sfm"] = extra_settings["sfm"]
    print(format_summary(summary))
    if args.summary_json:
        Path(args.summary_json).write_text(summary_json(summary))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (UsageError, ValueError, FileNotFoundError, OSError) as err:
        # Bad input (missing file, wrong layout, bad camera): one clear line instead of a traceback.
        print(f"{PROGRAM}: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
