"""Export SIFT matches of an image folder, filtered by a learned model, to a COLMAP database.

    python pipelines/colmap_export.py --images DIR --database OUT.db \
        [--pairs exhaustive|sequential:N] [--weights n3net-strecha] [--num-kp 2000] \
        [--camera-model SIMPLE_RADIAL|PINHOLE] [--K fx,fy,cx,cy] [--no-filter]

(the program is ``pipelines/colmap_export.py``; ``python data_prep/colmap_export.py`` is an alias
of it; this module is the library it calls)

What is written (through pycolmap, so the schema is always the one of the installed COLMAP):

- cameras: one shared camera when ``--K`` is given (all images must then have the same size),
  otherwise one per image with a guessed focal length (:func:`guess_intrinsics`);
- a trivial rig per camera and a frame per image (COLMAP >= 3.12 organises images that way);
- images and SIFT keypoints (``data_prep.features.detect_sift``, the code the training data was
  built with); descriptors are not stored, the mapper does not need them;
- matches: the putative matches of each pair;
- two-view geometries: with filtering (default), the matches that
  :class:`n3sets.MatchFilter` keeps (network + RANSAC), with their E and relative pose, config
  CALIBRATED, for the pairs that pass MatchFilter's two-view verification
  (:func:`n3sets.twoview.verify_two_view`: enough inliers, a baseline, a well-conditioned
  pose); an unverified pair gets no geometry and its reason is in the summary; with ``--no-filter``, Lowe-ratio (0.8) mutual matches verified by COLMAP's own
  estimator (``pycolmap.estimate_two_view_geometry``), i.e. the standard COLMAP pipeline.
  Pairs with fewer than ``--min-inliers`` verified matches get no inlier matches.

Coordinates: OpenCV puts the centre of the top-left pixel at (0, 0), COLMAP at (0.5, 0.5).
Keypoints and principal points (``--K`` is read in the OpenCV convention, the one the keypoints
and the Strecha cameras use) are shifted by +0.5 when written, so the database is consistent in
COLMAP's convention.

The database is built in a temporary file next to OUT.db and renamed into place at the end, so
an interrupted export never leaves a half-written database behind.

Then, for example::

    import pycolmap
    recs = pycolmap.incremental_mapping("OUT.db", "DIR", "sparse/")
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "COLMAP_PIXEL_OFFSET",
    "list_images",
    "image_pairs",
    "parse_intrinsics",
    "guess_intrinsics",
    "export_database",
    "run_mapper",
    "rotation_errors",
]

log = logging.getLogger("colmap_export")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".webp")
#: Added to OpenCV pixel coordinates to get COLMAP's (pixel centres at +0.5).
COLMAP_PIXEL_OFFSET = 0.5
#: Focal length guess without EXIF, in units of the larger image side (COLMAP's own default).
DEFAULT_FOCAL_FACTOR = 1.2


# ----------------------------------------------------------------------------- inputs


def list_images(image_dir) -> list[str]:
    """Sorted file names of the images in a folder (not recursive).

    Raises:
        FileNotFoundError: the folder does not exist or holds no image.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} does not exist")
    names = sorted(p.name for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not names:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}")
    return names


def image_pairs(num_images: int, spec: str = "exhaustive") -> list[tuple[int, int]]:
    """Index pairs ``(i, j)``, ``i < j``, to match.

    Args:
        num_images: number of images.
        spec: ``"exhaustive"`` (all pairs) or ``"sequential:N"`` (each image with the next N,
            for videos and ordered captures).
    """
    if spec == "exhaustive":
        return [(i, j) for i in range(num_images) for j in range(i + 1, num_images)]
    if spec.startswith("sequential:"):
        try:
            overlap = int(spec.split(":", 1)[1])
        except ValueError:
            overlap = 0
        if overlap < 1:
            raise ValueError(f"pairs {spec!r}: expected sequential:N with an integer N >= 1")
        return [(i, j) for i in range(num_images) for j in range(i + 1, min(i + 1 + overlap, num_images))]
    raise ValueError(f"pairs must be 'exhaustive' or 'sequential:N', got {spec!r}")


def parse_intrinsics(value: str) -> np.ndarray:
    """``(3, 3)`` K from ``"fx,fy,cx,cy"`` or from a text file holding a 3x3 matrix.

    Raises:
        ValueError: neither four numbers nor a readable 3x3 matrix file.
    """
    path = Path(value)
    if path.is_file():
        try:
            K = np.loadtxt(path, dtype=np.float64)
        except ValueError as err:
            raise ValueError(f"cannot read a 3x3 intrinsic matrix from {path}: {err}") from None
        if K.shape != (3, 3):
            raise ValueError(f"{path} must hold a 3x3 intrinsic matrix, got shape {K.shape}")
    else:
        try:
            fx, fy, cx, cy = (float(v) for v in value.split(","))
        except ValueError:
            raise ValueError(
                f"intrinsics {value!r}: expected 'fx,fy,cx,cy' (pixels) or the path of a file with a 3x3 matrix"
            ) from None
        K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    if not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f"intrinsics {value!r}: focal lengths must be positive and finite, got K={K.tolist()}")
    return K


def _exif_focal_35mm(path) -> float | None:
    """35 mm-equivalent focal length from EXIF (tag FocalLengthIn35mmFilm), or None."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            exif = im.getexif()
            # 0x8769 is the Exif sub-IFD that holds the photographic tags; 0xA405 is
            # FocalLengthIn35mmFilm. The plain FocalLength (0x920A) needs the sensor size,
            # which EXIF rarely carries, so it is not used.
            value = exif.get_ifd(0x8769).get(0xA405) or exif.get(0xA405)
    except Exception:  # noqa: BLE001 - no PIL, no EXIF, odd file: fall back to the size guess
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def guess_intrinsics(path, width: int, height: int) -> tuple[np.ndarray, str]:
    """A pinhole K for an image of unknown calibration, and how it was obtained.

    The focal length is ``f35 / 36 * max(w, h)`` when EXIF has a 35 mm-equivalent focal length
    ``f35`` (36 mm is the long side of a full frame), otherwise ``1.2 * max(w, h)`` (COLMAP's
    default guess, a field of view of about 45 degrees). The principal point is the image centre
    (OpenCV convention: ``((w - 1) / 2, (h - 1) / 2)``).

    Returns:
        ``(K (3, 3), source)`` with source ``"exif"`` or ``"size"``.
    """
    f35 = _exif_focal_35mm(path) if path is not None else None
    side = float(max(width, height))
    if f35 is not None:
        f, source = f35 / 36.0 * side, "exif"
    else:
        f, source = DEFAULT_FOCAL_FACTOR * side, "size"
    K = np.array([[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]])
    return K, source


# ----------------------------------------------------------------------------- COLMAP objects


def _colmap_camera(K: np.ndarray, width: int, height: int, model: str, prior: bool):
    import pycolmap

    fx, fy = K[0, 0], K[1, 1]
    cx, cy = K[0, 2] + COLMAP_PIXEL_OFFSET, K[1, 2] + COLMAP_PIXEL_OFFSET
    if model == "PINHOLE":
        params = [fx, fy, cx, cy]
    elif model == "SIMPLE_RADIAL":
        params = [(fx + fy) / 2.0, cx, cy, 0.0]
    elif model == "SIMPLE_PINHOLE":
        params = [(fx + fy) / 2.0, cx, cy]
    elif model == "RADIAL":
        params = [(fx + fy) / 2.0, cx, cy, 0.0, 0.0]
    else:
        raise ValueError(f"camera model must be one of {CAMERA_MODELS}, got {model!r}")
    cam = pycolmap.Camera(model=model, width=int(width), height=int(height), params=params)
    cam.has_prior_focal_length = bool(prior)
    return cam


CAMERA_MODELS = ("SIMPLE_RADIAL", "PINHOLE", "SIMPLE_PINHOLE", "RADIAL")


def _rigid(R: np.ndarray, t: np.ndarray):
    import pycolmap

    return pycolmap.Rigid3d(rotation=pycolmap.Rotation3d(np.asarray(R, np.float64)),
                            translation=np.asarray(t, np.float64).reshape(3))


def _unique_second(matches: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Keep, for every keypoint of image 2, only its best-scoring match (one-to-one tracks)."""
    if len(matches) == 0:
        return matches
    order = np.argsort(-score, kind="stable")
    _, first = np.unique(matches[order, 1], return_index=True)
    return matches[np.sort(order[first])]


@dataclass
class _ImageInfo:
    name: str
    kpts: np.ndarray  # (N, 2) OpenCV pixels
    desc: np.ndarray
    K: np.ndarray
    width: int
    height: int
    camera_index: int


# ----------------------------------------------------------------------------- export


def export_database(
    image_dir,
    database_path,
    pairs: str = "exhaustive",
    weights: str = "n3net-strecha",
    num_kp: int = 2000,
    camera_model: str = "SIMPLE_RADIAL",
    K: np.ndarray | None = None,
    use_filter: bool = True,
    threshold: float = 0.5,
    refine: str | None = "ransac",
    min_inliers: int = 15,
    ratio: float = 0.8,
    device: str = "cpu",
    image_names: list[str] | None = None,
    overwrite: bool = False,
    match_filter=None,
) -> dict:
    """Build a COLMAP database of (filtered) SIFT matches for the images of a folder.

    Args:
        image_dir: folder of images.
        database_path: the ``.db`` file to create.
        pairs: ``"exhaustive"`` or ``"sequential:N"`` (see :func:`image_pairs`).
        weights: pretrained model name or weight file for :class:`n3sets.MatchFilter`.
        num_kp: SIFT keypoints per image.
        camera_model: COLMAP camera model (SIMPLE_RADIAL, PINHOLE, SIMPLE_PINHOLE, RADIAL).
        K: ``(3, 3)`` intrinsics shared by all images (OpenCV pixel convention), or None to guess
            per image (:func:`guess_intrinsics`).
        use_filter: False: no network; ratio-test mutual matches verified by COLMAP.
        threshold, refine: passed to :meth:`n3sets.MatchFilter.filter`.
        min_inliers: pairs with fewer verified matches are not used by the mapper.
        ratio: Lowe ratio threshold of the unfiltered baseline (``use_filter=False``).
        device: torch device of the network.
        image_names: use only these files of ``image_dir`` (default: all images, sorted).
        overwrite: replace an existing database (otherwise ``FileExistsError``).
        match_filter: an already constructed MatchFilter (overrides ``weights``/``device``).

    Returns:
        summary dict (counts per image and pair, settings, seconds).
    """
    import pycolmap

    from data_prep.features import detect_sift, load_gray, match_descriptors

    t0 = time.time()
    image_dir = Path(image_dir)
    database_path = Path(database_path)
    if database_path.exists() and not overwrite:
        raise FileExistsError(f"database {database_path} exists; pass overwrite=True (--overwrite) to replace it")
    if camera_model not in CAMERA_MODELS:
        raise ValueError(f"camera_model must be one of {CAMERA_MODELS}, got {camera_model!r}")
    if min_inliers < 0:
        raise ValueError(f"min_inliers must be >= 0, got {min_inliers}")
    names = list_images(image_dir) if image_names is None else list(image_names)
    if len(names) < 2:
        raise ValueError(f"need at least 2 images to match, got {len(names)} in {image_dir}")
    pair_idx = image_pairs(len(names), pairs)
    if K is not None:
        K = np.asarray(K, np.float64)
        if K.shape != (3, 3):
            raise ValueError(f"K must be a (3, 3) intrinsic matrix, got shape {K.shape}")

    mf = None
    if use_filter:
        if match_filter is not None:
            mf = match_filter
        else:
            from n3sets.match_filter import MatchFilter

            mf = MatchFilter.from_pretrained(weights, device=device)

    # --- features and cameras
    infos: list[_ImageInfo] = []
    cameras: list[tuple[np.ndarray, int, int, bool]] = []  # (K, w, h, prior)
    for name in names:
        img = load_gray(image_dir / name)
        h, w = img.shape
        kpts, desc = detect_sift(img, num_kp=num_kp)
        if K is not None:
            if cameras and (cameras[0][1], cameras[0][2]) != (w, h):
                raise ValueError(
                    f"K is shared by all images, but {name} is {w}x{h} and the first image "
                    f"{cameras[0][1]}x{cameras[0][2]}; give images of one camera or drop K"
                )
            if not cameras:
                cameras.append((K, w, h, True))
            cam_index, Ki = 0, K
        else:
            Ki, source = guess_intrinsics(image_dir / name, w, h)
            log.warning("%s: no intrinsics given, focal length guessed from %s: %.1f px", name,
                        "EXIF" if source == "exif" else f"the image size ({DEFAULT_FOCAL_FACTOR} * max(w, h))",
                        Ki[0, 0])
            cameras.append((Ki, w, h, source == "exif"))
            cam_index = len(cameras) - 1
        infos.append(_ImageInfo(name, np.asarray(kpts, np.float64), desc, Ki, w, h, cam_index))
        log.info("%s: %d keypoints", name, len(kpts))

    # --- matching and verification, per pair
    pair_records = []
    for i, j in pair_idx:
        a, b = infos[i], infos[j]
        m = match_descriptors(a.desc, b.desc)
        idx1, idx2 = np.asarray(m["idx1"], np.int64), np.asarray(m["idx2"], np.int64)
        rec = {"image1": a.name, "image2": b.name}
        if use_filter:
            res = mf.filter(a.kpts[idx1], b.kpts[idx2], a.K, b.K, threshold=threshold, refine=refine,
                            ratio=m.get("ratio"), mutual=m.get("mutual"))
            matches = np.stack([idx1, idx2], 1)
            verified = _unique_second(matches[res.inliers], res.prob[res.inliers])
            rec.update(putative=len(matches), kept=res.num_kept, inliers=len(verified), reason=res.reason)
            geometry = (res.E, res.R, res.t) if res.ok else None
        else:
            keep = (np.asarray(m["ratio"]) < ratio) & np.asarray(m["mutual"], bool)
            matches = np.stack([idx1[keep], idx2[keep]], 1)
            rec.update(putative=len(matches))
            verified, geometry = None, None  # COLMAP verifies below, once the cameras exist
        pair_records.append((i, j, matches, verified, geometry, rec))
        log.info("%s - %s: %s", a.name, b.name, {k: v for k, v in rec.items() if k not in ("image1", "image2")})

    # --- the database, written to a temporary file and renamed into place
    database_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{database_path.name}.", suffix=".tmp", dir=database_path.parent)
    os.close(fd)
    os.unlink(tmp)  # COLMAP creates the file (and its schema) itself
    try:
        with pycolmap.Database.open(tmp) as db:
            colmap_cams = []
            for Ki, w, h, prior in cameras:
                cam = _colmap_camera(Ki, w, h, camera_model, prior)
                cam.camera_id = db.write_camera(cam)
                rig = pycolmap.Rig()
                rig.add_ref_sensor(cam.sensor_id)
                rig_id = db.write_rig(rig)
                colmap_cams.append((cam, rig_id))
            image_ids = []
            for info in infos:
                cam, rig_id = colmap_cams[info.camera_index]
                image = pycolmap.Image(name=info.name, camera_id=cam.camera_id)
                image.image_id = db.write_image(image)
                frame = pycolmap.Frame()
                frame.rig_id = rig_id
                frame.add_data_id(image.data_id)
                db.write_frame(frame)
                db.write_keypoints(image.image_id, (info.kpts + COLMAP_PIXEL_OFFSET).astype(np.float32))
                image_ids.append(image.image_id)

            options = pycolmap.TwoViewGeometryOptions()
            options.min_num_inliers = int(min_inliers)
            options.ransac.random_seed = 0  # COLMAP's default (-1) reseeds randomly: runs would differ
            for i, j, matches, verified, geometry, rec in pair_records:
                id1, id2 = image_ids[i], image_ids[j]
                db.write_matches(id1, id2, matches.astype(np.uint32))
                if use_filter:
                    if geometry is None or len(verified) < min_inliers:
                        # not verified (MatchFilter's reason is in the summary): no geometry, as
                        # COLMAP writes none for a pair that fails its own verification
                        continue
                    tvg = pycolmap.TwoViewGeometry()
                    E, R, t = geometry
                    tvg.config = pycolmap.TwoViewGeometryConfiguration.CALIBRATED
                    tvg.E = np.asarray(E, np.float64)
                    tvg.cam2_from_cam1 = _rigid(R, t)
                    tvg.inlier_matches = verified.astype(np.uint32)
                else:
                    cam1 = colmap_cams[infos[i].camera_index][0]
                    cam2 = colmap_cams[infos[j].camera_index][0]
                    tvg = pycolmap.estimate_two_view_geometry(
                        cam1, infos[i].kpts + COLMAP_PIXEL_OFFSET, cam2, infos[j].kpts + COLMAP_PIXEL_OFFSET,
                        matches.astype(np.uint32), options)
                    if len(tvg.inlier_matches) < min_inliers:
                        tvg = pycolmap.TwoViewGeometry()
                    rec.update(inliers=int(len(tvg.inlier_matches)), config=pycolmap.TwoViewGeometryConfiguration(tvg.config).name)
                db.write_two_view_geometry(id1, id2, tvg)
        os.replace(tmp, database_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

    records = [r for *_, r in pair_records]
    return {
        "database": str(database_path),
        "images": len(infos),
        "keypoints": {info.name: int(len(info.kpts)) for info in infos},
        "pairs": records,
        "verified_pairs": int(sum(r["inliers"] >= max(min_inliers, 1) for r in records)),
        "settings": {
            "image_dir": str(image_dir), "pairs": pairs, "weights": weights if use_filter else None,
            "filter": use_filter, "num_kp": num_kp, "camera_model": camera_model,
            "K": None if K is None else K.tolist(), "threshold": threshold, "refine": refine,
            "min_inliers": min_inliers, "ratio": None if use_filter else ratio,
        },
        "seconds": round(time.time() - t0, 2),
    }


# ----------------------------------------------------------------------------- mapping and evaluation


def run_mapper(database_path, image_dir, output_dir, fixed_intrinsics: bool = False, seed: int = 0,
               num_threads: int = 1):
    """pycolmap's incremental mapper on an exported database; returns the largest reconstruction or None.

    Args:
        fixed_intrinsics: keep focal length and distortion fixed in bundle adjustment (use it when
            the database holds calibrated cameras, e.g. ``--K`` from a calibration).
        seed: random seed of the mapper (RANSAC, initial pair trials), for repeatable runs.
        num_threads: mapper threads (1 keeps runs repeatable; -1 = all cores).
    """
    import pycolmap

    options = pycolmap.IncrementalPipelineOptions()
    options.random_seed = int(seed)
    options.num_threads = int(num_threads)
    if fixed_intrinsics:
        options.ba_refine_focal_length = False
        options.ba_refine_extra_params = False
        options.ba_refine_principal_point = False
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    recs = pycolmap.incremental_mapping(str(database_path), str(image_dir), str(output_dir), options)
    if not recs:
        return None
    return max(recs.values(), key=lambda r: r.num_reg_images())


def rotation_errors(reconstruction, R_gt: dict) -> dict:
    """Rotation errors of a reconstruction against ground-truth world-to-camera rotations.

    A reconstruction is defined up to a similarity, so two gauge-free measures are given:

    - relative: for every pair of registered images, the angle between the estimated and the
      true relative rotation ``R_j R_i^T``;
    - absolute: each estimated rotation after the single global rotation that best aligns the
      estimate with the ground truth (chordal L2 mean of ``R_i^T R_i_gt``, projected on SO(3)).

    Args:
        reconstruction: a ``pycolmap.Reconstruction`` (or None: nothing registered).
        R_gt: image name -> ``(3, 3)`` world-to-camera rotation.

    Returns:
        dict with ``registered`` (names), ``num_registered``, ``num_images``, per-image
        ``absolute_deg`` and summary statistics (median / mean / max) of both measures in degrees.
    """
    import torch

    from n3sets.pose import angle_between_rotations

    est = {}
    if reconstruction is not None:
        for image in reconstruction.images.values():
            if image.has_pose and image.name in R_gt:
                est[image.name] = np.asarray(image.cam_from_world().rotation.matrix(), np.float64)
    names = sorted(est)
    out = {"num_images": len(R_gt), "num_registered": len(names), "registered": names}
    if len(names) < 2:
        return out
    Re = torch.from_numpy(np.stack([est[n] for n in names]))
    Rg = torch.from_numpy(np.stack([np.asarray(R_gt[n], np.float64) for n in names]))
    i, j = torch.triu_indices(len(names), len(names), offset=1)
    rel_est = Re[j] @ Re[i].transpose(-1, -2)
    rel_gt = Rg[j] @ Rg[i].transpose(-1, -2)
    rel = angle_between_rotations(rel_est, rel_gt)
    # R_gt ~ R_est Q for a world rotation Q; the SVD projection of the summed estimates of Q is
    # the chordal L2 mean.
    U, _, Vh = torch.linalg.svd((Re.transpose(-1, -2) @ Rg).sum(0))
    Q = U @ torch.diag(torch.tensor([1.0, 1.0, float(torch.det(U @ Vh).sign())], dtype=U.dtype)) @ Vh
    absolute = angle_between_rotations(Re @ Q, Rg)
    stats = lambda a: {"median": float(a.median()), "mean": float(a.mean()), "max": float(a.max())}  # noqa: E731
    out.update(
        relative_deg=stats(rel), absolute_deg=stats(absolute),
        absolute_per_image={n: round(float(a), 4) for n, a in zip(names, absolute)},
    )
    return out


def main(argv=None) -> int:
    """``main`` of ``pipelines/colmap_export.py`` (the command-line program; kept for older callers)."""
    from data_prep._programs import run_program

    return run_program("colmap_export", argv)


if __name__ == "__main__":  # python data_prep/colmap_export.py: an alias of pipelines/colmap_export.py
    sys.exit(main())
