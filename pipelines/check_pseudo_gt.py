#!/usr/bin/env python
"""Check SfM pseudo ground truth against real ground truth on a scene with true cameras.

    python pipelines/check_pseudo_gt.py --scene ../shared/data/strecha/entry-P10 \\
        --sfm-dir data_out/pgt/entry-P10 [--run-sfm] --labels data_out/scenes/entry-P10.h5 \\
        --json results/pseudo_gt/entry-P10.json

``--scene`` is a Strecha-layout folder (``images/``, ``cameras/``). ``--sfm-dir`` is a folder made
by the ``--format photos`` path (:func:`data_prep.sfm.reconstruct_photos`) from ``SCENE/images``
alone, i.e. without the true poses or intrinsics; ``--run-sfm`` makes it first when it does not
exist (seeded, one thread, ``--max-features``). ``--labels`` is the dataset built from the true
cameras (``--format strecha``); its matches are relabelled with the SfM cameras. What is measured:
:mod:`data_prep.pseudo_gt`. Bad input: one ``check_pseudo_gt.py: error: ...`` line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from n3sets.cli import UsageError, check_writable_folder, one_line

PROGRAM = "check_pseudo_gt.py"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scene", required=True, help="Strecha-layout scene folder (images/, cameras/): the true cameras")
    p.add_argument("--sfm-dir", required=True, help="SfM folder of SCENE/images (made by --format photos or --run-sfm)")
    p.add_argument("--run-sfm", action="store_true", help="run the SfM into --sfm-dir first when it does not exist")
    p.add_argument("--max-features", type=int, default=8192, help="--run-sfm: COLMAP SIFT features per image")
    p.add_argument("--seed", type=int, default=0, help="--run-sfm: seed of COLMAP's RANSAC and mapper")
    p.add_argument("--labels", help="h5 dataset of the scene built with the true cameras (its matches are relabelled)")
    p.add_argument("--threshold", type=float, default=None, help="label threshold (default: the dataset's own)")
    p.add_argument("--json", required=True, help="output JSON (per-pair errors and the summary)")
    p.add_argument("--overwrite", action="store_true", help="replace --json when it exists")
    return p.parse_args(argv)


def run(args) -> dict:
    from data_prep.h5io import read_settings
    from data_prep.labels import DEFAULT_THRESHOLD
    from data_prep.pseudo_gt import check_pseudo_gt
    from data_prep.scenes import read_strecha_scene
    from data_prep.sfm import format_sfm_stats, reconstruct_photos

    out = Path(args.json)
    if out.exists() and not args.overwrite:
        raise UsageError(f"--json {out}: exists (use --overwrite to replace it)")
    check_writable_folder(out.parent, f"--json {out}")
    scene_dir, sfm_dir = Path(args.scene), Path(args.sfm_dir)
    if not (scene_dir / "cameras").is_dir():
        raise UsageError(f"--scene {scene_dir}: not a Strecha-layout scene (no cameras/ folder)")
    scene = read_strecha_scene(scene_dir)
    threshold = args.threshold
    if args.labels:
        if not Path(args.labels).is_file():
            raise UsageError(f"--labels {args.labels}: no such file")
        if threshold is None:
            threshold = float(read_settings(args.labels).get("threshold", DEFAULT_THRESHOLD))
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    model = sfm_dir / "model"
    if not model.is_dir():
        if not args.run_sfm:
            raise UsageError(f"--sfm-dir {sfm_dir}: no SfM model ({model} missing); pass --run-sfm to make it")
        stats = reconstruct_photos(scene_dir / "images", sfm_dir, seed=args.seed, max_num_features=args.max_features)
        print(format_sfm_stats(scene.name, stats), flush=True)
    sfm_stats_file = sfm_dir / "stats.json"
    result = check_pseudo_gt(scene, model, args.labels, threshold)
    result["sfm"] = json.loads(sfm_stats_file.read_text()) if sfm_stats_file.is_file() else None
    result["command"] = " ".join([PROGRAM] + (sys.argv[1:] if sys.argv[0].endswith(PROGRAM) else []))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    return result


def format_summary(result: dict) -> str:
    s = result["summary"]
    lines = [f"{result['scene']}: SfM registered {result['registered']}/{result['views']} views; "
             f"{s['pose_pairs']} view pairs scored, {s['pose_pairs_missing']} missing"]
    for key, label in (("rotation_deg", "rotation error"), ("translation_deg", "translation-direction error")):
        st = s[key]
        if st["n"]:
            lines.append(f"  {label} (deg): median {st['median']:.3f}  p90 {st['p90']:.3f}  max {st['max']:.3f}")
    if "label_pairs" in s:
        def pct(x):
            return "n/a" if x is None else f"{100 * x:.2f} %"

        lines.append(f"  labels of {s['matches']} matches in {s['label_pairs']} pairs ({s['label_pairs_missing']} missing): "
                     f"agreement {pct(s['agreement_all'])}, pseudo-label precision {pct(s['precision_all'])}, "
                     f"recall {pct(s['recall_all'])}; true inliers {s['true_inliers']}, pseudo inliers {s['pseudo_inliers']}")
        if s["agreement"]["n"]:
            lines.append(f"  per-pair agreement: median {pct(s['agreement']['median'])}, min {pct(s['agreement']['min'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError, OSError) as exc:
        print(f"{PROGRAM}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(format_summary(result))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
