"""Structure-from-motion pseudo ground truth for a folder of photos (COLMAP through pycolmap).

The way Yi et al. got poses for St. Peter's and Reichstag: reconstruct the photo collection, then
label putative matches with the reconstructed cameras. :func:`reconstruct_photos` runs

1. COLMAP SIFT extraction (CPU, one thread) into a new database. Intrinsics: ``K.txt`` in the
   folder (a 3x3 matrix in the OpenCV pixel convention, as ``colmap_export.parse_intrinsics``
   reads it) gives one shared SIMPLE_RADIAL camera with that focal length and principal point,
   marked as a prior; without it COLMAP groups the images by EXIF camera and size and takes the
   focal length from EXIF (``1.2 * max(w, h)`` when EXIF has none). Either way bundle adjustment
   refines the focal length and the radial distortion (the principal point stays fixed, COLMAP's default).
2. exhaustive matching with COLMAP's geometric verification (RANSAC seeded with ``seed``);
3. incremental mapping with global bundle adjustment (:func:`data_prep.colmap_export.run_mapper`:
   seeded, one thread, so reruns give the same model where COLMAP allows);
4. undistortion of the registered images to a PINHOLE model (``pycolmap.undistort_images``),
   because the labels assume a pinhole camera.

Everything is written to a temporary folder next to ``sfm_dir`` that is renamed to ``sfm_dir``
only when all steps succeeded, so no half-written model is ever left behind::

    sfm_dir/database.db             features, matches, two-view geometries
    sfm_dir/model/                  the largest reconstruction (binary COLMAP model, refined intrinsics)
    sfm_dir/undistorted/images/     the registered images, undistorted
    sfm_dir/undistorted/sparse/     the same reconstruction with PINHOLE cameras (what the labels use)
    sfm_dir/stats.json              the statistics below

Statistics (per scene, printed and stored): images registered / given, 3D points, mean
reprojection error (px), mean track length, mean observations per registered image, the
intrinsics' source and the refined cameras. A scene with fewer than :data:`MIN_REGISTERED`
registered images is refused (``ValueError`` saying how many were registered and why that is
not enough).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path


from .colmap_export import COLMAP_PIXEL_OFFSET, list_images, parse_intrinsics, run_mapper

__all__ = ["MIN_REGISTERED", "reconstruct_photos", "format_sfm_stats", "undistorted_model"]

#: fewer registered images give at most one pair per direction: no dataset worth the name
MIN_REGISTERED = 3
K_FILE = "K.txt"


def undistorted_model(sfm_dir) -> tuple[Path, Path]:
    """``(model folder, image folder)`` of the undistorted (PINHOLE) reconstruction in ``sfm_dir``."""
    sfm_dir = Path(sfm_dir)
    return sfm_dir / "undistorted" / "sparse", sfm_dir / "undistorted" / "images"


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def _camera_options(image_dir: Path, names: list[str]):
    """(camera_mode, ImageReaderOptions, intrinsics source) for the folder."""
    import pycolmap

    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = "SIMPLE_RADIAL"
    k_file = image_dir / K_FILE
    if not k_file.is_file():
        return pycolmap.CameraMode.AUTO, reader, "exif"
    K = parse_intrinsics(str(k_file))  # ValueError naming the file for a bad matrix
    sizes = {name: _image_size(image_dir / name) for name in names}
    if len(set(sizes.values())) != 1:
        first = names[0]
        other = next(n for n in names if sizes[n] != sizes[first])
        raise ValueError(f"{k_file} is one camera's calibration, but {first} is {sizes[first][0]}x{sizes[first][1]} "
                         f"and {other} {sizes[other][0]}x{sizes[other][1]}")
    w, h = sizes[names[0]]
    if not (0 < K[0, 2] < w and 0 < K[1, 2] < h):
        raise ValueError(f"{k_file}: principal point ({K[0, 2]}, {K[1, 2]}) lies outside the {w}x{h} images")
    f = 0.5 * (K[0, 0] + K[1, 1])
    reader.camera_params = f"{f},{K[0, 2] + COLMAP_PIXEL_OFFSET},{K[1, 2] + COLMAP_PIXEL_OFFSET},0"
    return pycolmap.CameraMode.SINGLE, reader, "K.txt"


def _stats(rec, names: list[str], source: str, num_models: int) -> dict:
    registered = sorted(img.name for img in rec.images.values() if img.has_pose)
    cams = {}
    for cam_id, cam in rec.cameras.items():
        cams[str(cam_id)] = {"model": cam.model_name, "width": int(cam.width), "height": int(cam.height),
                             "params": [round(float(p), 6) for p in cam.params]}
    return {
        "images_given": len(names),
        "images_registered": len(registered),
        "registered": registered,
        "unregistered": sorted(set(names) - set(registered)),
        "points3D": int(rec.num_points3D()),
        "mean_reprojection_error_px": float(rec.compute_mean_reprojection_error()),
        "mean_track_length": float(rec.compute_mean_track_length()),
        "mean_observations_per_image": float(rec.compute_mean_observations_per_reg_image()),
        "intrinsics_source": source,
        "cameras": cams,
        "reconstructions": num_models,
    }


def reconstruct_photos(image_dir, sfm_dir, seed: int = 0, max_num_features: int = 8192, overwrite: bool = False,
                       min_registered: int = MIN_REGISTERED) -> dict:
    """Run SfM on the photos of ``image_dir`` into ``sfm_dir`` (module docstring); returns the statistics.

    ``FileExistsError`` when ``sfm_dir`` exists and not ``overwrite``; ``FileNotFoundError`` for a
    missing folder or one without images; ``ValueError`` for a bad ``K.txt`` or a reconstruction
    with fewer than ``min_registered`` images. Nothing is left in ``sfm_dir`` on failure.
    """
    import pycolmap

    t0 = time.time()
    image_dir, sfm_dir = Path(image_dir), Path(sfm_dir)
    names = list_images(image_dir)
    if len(names) < min_registered:
        raise ValueError(f"{image_dir}: {len(names)} photos; structure from motion needs at least {min_registered}")
    if sfm_dir.exists() and not overwrite:
        raise FileExistsError(f"SfM folder {sfm_dir} exists; pass --overwrite (overwrite=True) to replace it")
    camera_mode, reader, source = _camera_options(image_dir, names)
    created_parent = not sfm_dir.parent.exists()
    sfm_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = sfm_dir.with_name(f".{sfm_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        database = tmp / "database.db"
        extraction = pycolmap.FeatureExtractionOptions()
        extraction.num_threads = 1
        extraction.use_gpu = False
        extraction.sift.max_num_features = int(max_num_features)
        pycolmap.extract_features(database, image_dir, image_names=names, camera_mode=camera_mode,
                                  reader_options=reader, extraction_options=extraction, device=pycolmap.Device.cpu)
        matching = pycolmap.FeatureMatchingOptions()
        matching.num_threads = 1
        matching.use_gpu = False
        verification = pycolmap.TwoViewGeometryOptions()
        verification.ransac.random_seed = int(seed)  # COLMAP's default (-1) reseeds from the clock
        pycolmap.match_exhaustive(database, matching_options=matching, verification_options=verification,
                                  device=pycolmap.Device.cpu)
        rec = run_mapper(database, image_dir, tmp / "sparse", fixed_intrinsics=False, seed=seed, num_threads=1)
        num_models = sum(1 for p in (tmp / "sparse").iterdir() if p.is_dir()) if (tmp / "sparse").is_dir() else 0
        registered = 0 if rec is None else rec.num_reg_images()
        if registered < min_registered:
            raise ValueError(
                f"{image_dir}: structure from motion registered {registered} of {len(names)} images; a dataset needs "
                f"at least {min_registered} registered images (too little overlap or texture between the photos, "
                f"or wrong intrinsics in {K_FILE if source == 'K.txt' else 'the EXIF data'})")
        (tmp / "model").mkdir()
        rec.write(tmp / "model")
        shutil.rmtree(tmp / "sparse")  # the largest model is kept in model/; smaller partial models are dropped
        stats = _stats(rec, names, source, num_models)
        pycolmap.undistort_images(tmp / "undistorted", tmp / "model", image_dir, output_type="COLMAP", num_threads=1)
        model_dir, und_images = undistorted_model(tmp)
        und = pycolmap.Reconstruction(model_dir)
        models = {cam.model_name for cam in und.cameras.values()}
        if models != {"PINHOLE"}:
            raise RuntimeError(f"undistortion gave cameras {sorted(models)}, expected PINHOLE")
        stats.update(seed=int(seed), max_num_features=int(max_num_features), image_dir=str(image_dir),
                     seconds=round(time.time() - t0, 1))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True))
        if sfm_dir.exists():  # overwrite: swap, then remove the old folder
            old = sfm_dir.with_name(f".{sfm_dir.name}.old-{os.getpid()}")
            os.replace(sfm_dir, old)
            os.replace(tmp, sfm_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, sfm_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if created_parent and not sfm_dir.exists() and not any(sfm_dir.parent.iterdir()):
            sfm_dir.parent.rmdir()  # a failed first scene leaves no empty --sfm-dir behind
    stats["sfm_dir"] = str(sfm_dir)
    return stats


def format_sfm_stats(name: str, stats: dict) -> str:
    cams = "; ".join(f"{c['model']} {c['width']}x{c['height']} f={c['params'][0]:.1f}"
                     + (f" k={c['params'][3]:.4f}" if c["model"] == "SIMPLE_RADIAL" else "")
                     for c in stats["cameras"].values())
    return (f"{name}: SfM registered {stats['images_registered']}/{stats['images_given']} images, "
            f"{stats['points3D']} 3D points, mean reprojection error {stats['mean_reprojection_error_px']:.3f} px, "
            f"mean track length {stats['mean_track_length']:.2f}, intrinsics from {stats['intrinsics_source']} "
            f"(refined: {cams}); {stats['seconds']:.0f} s")
