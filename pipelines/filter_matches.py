"""Filter the SIFT matches of two images with a pretrained network and estimate their relative pose.

    python pipelines/filter_matches.py IMG1 IMG2 [--K1 fx,fy,cx,cy|FILE --K2 ...] [--focal F]
        [--weights n3net-strecha] [--out DIR] [--num-kp 2000] [--no-refine] [--threshold 0.5]

Writes ``OUT/matches.json`` (kept matches with their inlier probabilities, E, R, t, counts and
settings) and ``OUT/matches.png`` (both images side by side, kept matches in green, rejected
ones in red, a caption with the counts and the pose).

Intrinsics: ``--K1``/``--K2`` as ``fx,fy,cx,cy`` (pixels) or the path of a text file with a 3x3
matrix (``--K1`` alone is used for both images); ``--focal F`` sets the focal length of both
images with the principal point at the centre. Without either, the focal length is guessed as
``f35 / 36 * max(w, h)`` from the EXIF 35 mm-equivalent focal length, or ``1.2 * max(w, h)``
without EXIF (principal point at the centre), and a warning says so: the pose is then only as
good as the guess.

SIFT detection and matching are those of ``data_prep.features`` (what the models were trained
on): the nearest neighbour in image 2 of every keypoint of image 1, with the Lowe ratio and the
mutual-nearest-neighbour flag as side information.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from n3sets.cli import UsageError, add_threads_argument, check_writable_folder, load_weights_arg, one_line

PROGRAM = "filter_matches.py"
log = logging.getLogger("filter_matches")

#: At most this many match lines of each colour are drawn (a random subset beyond), so that
#: thousands of rejected matches do not hide the picture.
MAX_LINES = 400


def rotation_to_euler_deg(R: np.ndarray) -> tuple[float, float, float]:
    """Angles (x, y, z) in degrees of ``R = Rz @ Ry @ Rx`` (for the caption; x = tilt, y = pan)."""
    sy = math.hypot(R[0, 0], R[1, 0])
    if sy > 1e-9:
        x, y, z = math.atan2(R[2, 1], R[2, 2]), math.atan2(-R[2, 0], sy), math.atan2(R[1, 0], R[0, 0])
    else:  # gimbal lock: z is not determined, put everything into x
        x, y, z = math.atan2(-R[1, 2], R[1, 1]), math.atan2(-R[2, 0], sy), 0.0
    return tuple(math.degrees(v) for v in (x, y, z))


def rotation_angle_deg(R: np.ndarray) -> float:
    """Angle of the rotation R in degrees (its geodesic distance to the identity)."""
    import torch

    from n3sets.pose import angle_between_rotations

    R = torch.as_tensor(np.asarray(R, dtype=np.float64))
    return float(angle_between_rotations(R, torch.eye(3, dtype=R.dtype)))


def _parse_K(option: str, value: str) -> np.ndarray:
    from data_prep.colmap_export import parse_intrinsics

    try:
        return parse_intrinsics(value)
    except (ValueError, OSError) as exc:
        raise UsageError(f"{option}: {one_line(exc)}") from None


def _intrinsics(args, which: int, path: Path, width: int, height: int) -> tuple[np.ndarray, str]:
    from data_prep.colmap_export import guess_intrinsics

    given = args.K1 if which == 1 else (args.K2 or args.K1)
    if given:
        return _parse_K("--K1" if which == 1 or not args.K2 else "--K2", given), "given"
    if args.focal is not None:  # checked > 0 in check_args
        f = float(args.focal)
        return np.array([[f, 0, (width - 1) / 2], [0, f, (height - 1) / 2], [0, 0, 1.0]]), "focal"
    K, source = guess_intrinsics(path, width, height)
    log.warning(
        "%s: no intrinsics given (--K1/--K2 or --focal); guessed focal length %.1f px from %s, "
        "principal point at the image centre. The pose is only as good as this guess.",
        path, K[0, 0], "the EXIF 35 mm focal length" if source == "exif" else "1.2 * max(width, height)")
    return K, f"guess-{source}"


#: Width of a monospace character as a fraction of the font size (DejaVu Sans Mono: 0.602).
CHAR_WIDTH = 0.61


def caption_layout(text: str, width_px: float, max_size: float = 11.0, min_size: float = 6.0,
                   min_chars: int = 60) -> tuple[float, list[str]]:
    """Font size (points) and lines of a monospace caption that fit ``width_px`` pixels at 100 dpi.

    The font shrinks from ``max_size`` until ``min_chars`` characters (or the whole text) fit on
    a line, but not below ``min_size``; what is still too long is wrapped at word boundaries.
    """
    px_per_char = CHAR_WIDTH * 100.0 / 72.0  # per point of font size
    usable = max(width_px - 12.0, 1.0)  # a small margin on both sides
    size = max(min_size, min(max_size, usable / (max(min(len(text), min_chars), 1) * px_per_char)))
    chars = max(1, int(usable / (size * px_per_char)))
    lines = textwrap.wrap(text, width=chars, break_long_words=True, break_on_hyphens=False) or [""]
    return size, lines


def draw_matches(img1: np.ndarray, img2: np.ndarray, kpts1: np.ndarray, kpts2: np.ndarray,
                 inliers: np.ndarray, caption: str, path, max_lines: int = MAX_LINES, seed: int = 0) -> Path:
    """Both images side by side, kept matches in green and rejected ones in red, with a caption.

    Args:
        img1, img2: grey ``(H, W)`` or colour ``(H, W, 3)`` RGB images.
        kpts1, kpts2: ``(N, 2)`` matched pixel keypoints.
        inliers: ``(N,)`` bool, True = kept.
        caption: text under the images.
        path: PNG to write.
        max_lines: most lines drawn per colour (random subset beyond, noted in the legend).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    def rgb(img):
        return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img

    a, b = rgb(img1), rgb(img2)
    h = max(a.shape[0], b.shape[0])
    gap = 10
    canvas = np.full((h, a.shape[1] + gap + b.shape[1], 3), 255, np.uint8)
    canvas[: a.shape[0], : a.shape[1]] = a
    canvas[: b.shape[0], a.shape[1] + gap:] = b
    offset = a.shape[1] + gap

    rng = np.random.default_rng(seed)
    legend, drawn = [], []
    for mask, colour, width, alpha, label in ((~inliers, "red", 0.6, 0.45, "rejected"),
                                              (inliers, "lime", 1.0, 0.9, "kept")):
        idx = np.flatnonzero(mask)
        shown = idx if idx.size <= max_lines else np.sort(rng.choice(idx, max_lines, replace=False))
        drawn.append((shown, colour, width, alpha))
        legend.append(f"{label}: {idx.size}" + (f" ({shown.size} drawn)" if shown.size < idx.size else ""))

    width_in = min(canvas.shape[1] / 100.0, 24.0)
    # the caption is shrunk and wrapped to the picture's width (a narrow pair would cut it off)
    size, lines = caption_layout(caption + "   [" + ", ".join(legend) + "]", width_in * 100.0)
    caption_in = (len(lines) * size * 1.3 + 12.0) / 72.0
    height_in = width_in * canvas.shape[0] / canvas.shape[1] + caption_in
    fig = plt.figure(figsize=(width_in, height_in), dpi=100)
    ax = fig.add_axes([0, caption_in / height_in, 1, 1 - caption_in / height_in])
    # Darken the photographs a little so that the coloured lines stand out.
    ax.imshow((canvas * 0.75 + 32).astype(np.uint8), interpolation="bilinear")
    ax.set_xlim(0, canvas.shape[1])
    ax.set_ylim(canvas.shape[0], 0)
    ax.axis("off")

    for shown, colour, width, alpha in drawn:
        if shown.size:
            segments = np.stack([kpts1[shown], kpts2[shown] + [offset, 0]], axis=1)
            ax.add_collection(LineCollection(segments, colors=colour, linewidths=width, alpha=alpha))
            ax.scatter(segments[:, :, 0].ravel(), segments[:, :, 1].ravel(), s=3, c=colour, alpha=alpha, linewidths=0)
    fig.text(6.0 / (width_in * 100.0), 0.5 * caption_in / height_in, "\n".join(lines), fontsize=size,
             va="center", ha="left", family="monospace", linespacing=1.2)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def check_args(args) -> None:
    """UsageError naming the argument, before any work (the model, SIFT) is done."""
    if args.focal is not None and not (math.isfinite(args.focal) and args.focal > 0):
        raise UsageError(f"--focal {args.focal:g}: the focal length must be > 0 (pixels)")
    if args.num_kp < 1:
        raise UsageError(f"--num-kp {args.num_kp}: must be >= 1")
    if not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold {args.threshold:g}: an inlier probability in [0, 1]")
    if args.max_lines < 0:
        raise UsageError(f"--max-lines {args.max_lines}: must be >= 0")
    for option in ("K1", "K2"):
        if getattr(args, option):
            _parse_K(f"--{option}", getattr(args, option))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder (matches.json and matches.png are written into it)")
    check_writable_folder(out, f"--out {out}")


def run(args) -> dict:
    import cv2

    from data_prep.features import detect_sift, load_gray, match_descriptors
    from n3sets.match_filter import MatchFilter

    t0 = time.time()
    check_args(args)
    # The model first: a wrong --weights fails before any image work.
    model, _ = load_weights_arg(args.weights)
    try:
        mf = MatchFilter(model, device=args.device, threads=args.threads)
    except ValueError as exc:
        raise UsageError(f"--device {args.device}: {one_line(exc)}") from None
    paths = [Path(args.image1), Path(args.image2)]
    grays = [load_gray(p) for p in paths]  # FileNotFoundError / ValueError naming the path
    Ks, sources = [], []
    for which, (p, g) in enumerate(zip(paths, grays), start=1):
        K, source = _intrinsics(args, which, p, g.shape[1], g.shape[0])
        Ks.append(K)
        sources.append(source)

    feats = [detect_sift(g, num_kp=args.num_kp) for g in grays]
    (k1, d1), (k2, d2) = feats
    m = match_descriptors(d1, d2)
    idx1, idx2 = np.asarray(m["idx1"], np.int64), np.asarray(m["idx2"], np.int64)
    x1, x2 = np.asarray(k1, np.float64)[idx1], np.asarray(k2, np.float64)[idx2]

    refine = None if args.no_refine else "ransac"
    res = mf.filter(x1, x2, Ks[0], Ks[1], threshold=args.threshold, refine=refine,
                    ratio=m.get("ratio"), mutual=m.get("mutual"))

    pose = {"ok": res.ok, "reason": res.reason}
    if res.ok:
        pose.update(
            E=res.E.tolist(), R=res.R.tolist(), t=res.t.tolist(),
            rotation_angle_deg=rotation_angle_deg(res.R),
            euler_xyz_deg=list(rotation_to_euler_deg(res.R)),
        )
    keep = np.flatnonzero(res.inliers)
    out = {
        "image1": str(paths[0]), "image2": str(paths[1]),
        "size1": [int(grays[0].shape[1]), int(grays[0].shape[0])],
        "size2": [int(grays[1].shape[1]), int(grays[1].shape[0])],
        "K1": Ks[0].tolist(), "K2": Ks[1].tolist(), "intrinsics_source": sources,
        "counts": {"keypoints1": int(len(k1)), "keypoints2": int(len(k2)), "putative": int(len(idx1)),
                   "kept_by_network": res.num_kept, "inliers": res.num_inliers},
        "pose": pose,
        "matches": {"idx1": idx1[keep].tolist(), "idx2": idx2[keep].tolist(),
                    "kpts1": x1[keep].round(3).tolist(), "kpts2": x2[keep].round(3).tolist(),
                    "prob": res.prob[keep].round(5).tolist()},
        "settings": {"weights": str(args.weights), "num_kp": args.num_kp, "threshold": res.threshold,
                     "refine": refine, "device": str(mf.device), "side_info": mf.side_info},
        "convention": "pixels with the centre of the top-left pixel at (0, 0); pose x2 = R x1 + t, E = [t]x R "
                      "on normalized coordinates, t unit length",
    }

    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    caption = f"{Path(args.weights).stem}{'' if refine is None else '+' + refine}: {len(idx1)} putative, " \
              f"{res.num_inliers} kept ({100.0 * res.num_inliers / max(len(idx1), 1):.0f}%)"
    if res.ok:
        ex, ey, ez = pose["euler_xyz_deg"]
        caption += (f" | rotation {pose['rotation_angle_deg']:.1f} deg (x {ex:.1f}, y {ey:.1f}, z {ez:.1f})"
                    f" | t ({res.t[0]:+.2f}, {res.t[1]:+.2f}, {res.t[2]:+.2f})")
    else:
        caption += f" | no pose: {res.reason}"
    if any(s.startswith("guess") for s in sources):
        caption += " | focal guessed"
    colour = []
    for p in paths:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)  # the grid the keypoints are in
        colour.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    draw_matches(colour[0], colour[1], x1, x2, res.inliers, caption, outdir / "matches.png", max_lines=args.max_lines)
    out["seconds"] = round(time.time() - t0, 2)
    # One key per line, values compact: the file stays readable with thousands of matches.
    (outdir / "matches.json").write_text(
        "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in out.items()) + "\n}\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image1")
    parser.add_argument("image2")
    parser.add_argument("--K1", help="intrinsics of image 1: 'fx,fy,cx,cy' or a file with a 3x3 matrix")
    parser.add_argument("--K2", help="intrinsics of image 2 (default: those of --K1)")
    parser.add_argument("--focal", type=float, help="focal length in pixels for both images, principal point at the centre")
    parser.add_argument("--weights", default="n3net-strecha", help="pretrained model name or weight file")
    parser.add_argument("--out", default="out/filter_matches", help="output folder (default out/filter_matches)")
    parser.add_argument("--num-kp", type=int, default=2000, help="SIFT keypoints per image (default 2000)")
    parser.add_argument("--no-refine", action="store_true", help="weighted eight-point on the network weights, no RANSAC")
    parser.add_argument("--threshold", type=float, default=0.5, help="inlier probability threshold (default 0.5)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    add_threads_argument(parser, thread_independent=True)
    parser.add_argument("--max-lines", type=int, default=MAX_LINES, help="most match lines drawn per colour")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.focal is not None and (args.K1 or args.K2):
        parser.error("give either --K1/--K2 or --focal, not both")
    if args.K2 and not args.K1:
        parser.error("--K2 needs --K1")
    try:
        out = run(args)
    except (UsageError, FileNotFoundError, ValueError, OSError) as err:
        print(f"{PROGRAM}: error: {one_line(err)}", file=sys.stderr)
        return 2
    c = out["counts"]
    print(f"{c['putative']} putative matches, {c['inliers']} kept; "
          + (f"rotation {out['pose']['rotation_angle_deg']:.2f} deg" if out["pose"]["ok"] else f"no pose: {out['pose']['reason']}")
          + f"; wrote {Path(args.out) / 'matches.json'} and {Path(args.out) / 'matches.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
