"""How good is structure-from-motion pseudo ground truth? Compare it with real ground truth.

The photo scenes get their poses from COLMAP (:mod:`data_prep.sfm`), as St. Peter's and
Reichstag did for Yi et al. This module measures what that costs on scenes whose true cameras
are known: run the same SfM on the images alone (poses and intrinsics ignored), then compare

* **relative poses**: for every pair of views registered by SfM, the angle of
  ``R_sfm R_true^T`` (rotation error) and the angle between the two unit translation directions
  (translation-direction error), in degrees. Relative poses do not depend on the gauge (global
  rotation, translation and scale) of the reconstruction, so no alignment is needed;
* **labels**: the matches of a dataset built with the true cameras (same h5 schema) are labelled
  again with the SfM cameras (refined intrinsics and lens distortion through
  ``pycolmap.Camera.cam_from_img``, the SfM relative pose, the same threshold), and the two label
  sets are compared: agreement (fraction of matches with the same label), and precision / recall
  of the pseudo labels taken as predictions of the true ones.

Pairs whose images SfM did not register count as missing (reported, not scored).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .colmap_export import COLMAP_PIXEL_OFFSET
from .labels import DEFAULT_THRESHOLD, pair_relative_pose

__all__ = ["read_sfm_views", "rotation_angle_deg", "direction_angle_deg", "compare_relative_poses",
           "compare_labels", "summarize_check", "check_pseudo_gt"]


def read_sfm_views(model_dir) -> dict:
    """``{image name: {"camera": pycolmap.Camera, "R": (3, 3), "t": (3,)}}`` of the registered images
    of a COLMAP model (world-to-camera ``x_cam = R X + t``)."""
    import pycolmap

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"COLMAP model folder not found: {model_dir}")
    try:
        rec = pycolmap.Reconstruction(str(model_dir))
    except Exception as err:  # pycolmap raises plain RuntimeError/ValueError
        raise ValueError(f"cannot read COLMAP model {model_dir}: {err}") from err
    views = {}
    for img in rec.images.values():
        if not img.has_pose:
            continue
        pose = img.cam_from_world()
        views[img.name] = {"camera": rec.cameras[img.camera_id],
                           "R": np.asarray(pose.rotation.matrix(), dtype=np.float64),
                           "t": np.asarray(pose.translation, dtype=np.float64)}
    return views


def rotation_angle_deg(R) -> float:
    """Angle of a rotation matrix in degrees (clipped trace formula)."""
    c = (np.trace(np.asarray(R, dtype=np.float64)) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def direction_angle_deg(a, b) -> float:
    """Angle between two (non-zero) vectors in degrees."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    c = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def compare_relative_poses(scene, views: dict) -> dict:
    """Relative-pose errors of the SfM ``views`` against the true cameras of ``scene`` (a
    :class:`data_prep.scenes.Scene`), over the unordered pairs of its views.

    Returns ``{"pairs": [{"image1", "image2", "rotation_deg", "translation_deg"}], "missing": [...]}``;
    a pair is missing when SfM did not register one of its images.
    """
    pairs, missing = [], []
    names = list(scene.image_names)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            a, b = names[i], names[j]
            if a not in views or b not in views:
                missing.append([a, b])
                continue
            R_true, t_true = pair_relative_pose(scene.R[i], scene.t[i], scene.R[j], scene.t[j])
            R_sfm, t_sfm = pair_relative_pose(views[a]["R"], views[a]["t"], views[b]["R"], views[b]["t"])
            pairs.append({"image1": a, "image2": b,
                          "rotation_deg": rotation_angle_deg(R_sfm @ R_true.T),
                          "translation_deg": direction_angle_deg(t_sfm, t_true)})
    return {"pairs": pairs, "missing": missing}


def _normalized(camera, kpts: np.ndarray) -> np.ndarray:
    """OpenCV pixel keypoints (pixel centres at integers) -> normalized, undistorted coordinates of
    a COLMAP camera (pixel centres at +0.5)."""
    pts = np.asarray(kpts, dtype=np.float64) + COLMAP_PIXEL_OFFSET
    return np.asarray(camera.cam_from_img(pts), dtype=np.float64)


def _epipolar_distance(x1: np.ndarray, x2: np.ndarray, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Squared symmetric epipolar distance of normalized matches under ``E = [t]_x R`` (as labels.py)."""
    import torch

    from n3sets.geometry import essential_from_pose, symmetric_epipolar_distance

    E = essential_from_pose(torch.as_tensor(R), torch.as_tensor(t))
    return symmetric_epipolar_distance(torch.as_tensor(x1), torch.as_tensor(x2), E).numpy()


def compare_labels(h5_path, views: dict, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Relabel the matches of the true-pose dataset ``h5_path`` with the SfM ``views``.

    Returns ``{"pairs": [{"name", "matches", "true_inliers", "pseudo_inliers", "both_inliers",
    "agreement", "precision", "recall"}], "missing": [names]}``. Precision / recall are of the pseudo labels
    against the stored (true-pose) labels; ``None`` where undefined (no pseudo / no true inliers).
    """
    from .h5io import open_pairs, pair_keys

    pairs, missing = [], []
    with open_pairs(h5_path) as f:
        for key in pair_keys(f):
            g = f[key]
            name = g.attrs["name"]
            name = name.decode() if isinstance(name, bytes) else str(name)
            a, b = (str(g.attrs[k].decode() if isinstance(g.attrs[k], bytes) else g.attrs[k]) for k in ("image1", "image2"))
            if a not in views or b not in views:
                missing.append(name)
                continue
            true = np.asarray(g["label"][()]).astype(bool)
            x1 = _normalized(views[a]["camera"], g["kpts1"][()])
            x2 = _normalized(views[b]["camera"], g["kpts2"][()])
            R, t = pair_relative_pose(views[a]["R"], views[a]["t"], views[b]["R"], views[b]["t"])
            pseudo = _epipolar_distance(x1, x2, R, t) < threshold
            tp = int((pseudo & true).sum())
            pairs.append({"name": name, "matches": int(true.size), "true_inliers": int(true.sum()),
                          "pseudo_inliers": int(pseudo.sum()), "both_inliers": tp,
                          "agreement": float((pseudo == true).mean()),
                          "precision": tp / int(pseudo.sum()) if pseudo.any() else None,
                          "recall": tp / int(true.sum()) if true.any() else None})
    return {"pairs": pairs, "missing": missing}


def _stats(values) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if not v.size:
        return {"n": 0}
    return {"n": int(v.size), "median": float(np.median(v)), "mean": float(v.mean()),
            "p90": float(np.percentile(v, 90)), "max": float(v.max()), "min": float(v.min())}


def summarize_check(poses: dict, labels: dict | None) -> dict:
    """Medians, maxima etc. of :func:`compare_relative_poses` / :func:`compare_labels` results."""
    out = {"pose_pairs": len(poses["pairs"]), "pose_pairs_missing": len(poses["missing"]),
           "rotation_deg": _stats(p["rotation_deg"] for p in poses["pairs"]),
           "translation_deg": _stats(p["translation_deg"] for p in poses["pairs"])}
    if labels is not None:
        lp = labels["pairs"]
        tp = sum(p["both_inliers"] for p in lp)
        pseudo = sum(p["pseudo_inliers"] for p in lp)
        true = sum(p["true_inliers"] for p in lp)
        matches = sum(p["matches"] for p in lp)
        agree = sum(p["agreement"] * p["matches"] for p in lp)
        out.update({
            "label_pairs": len(lp), "label_pairs_missing": len(labels["missing"]),
            "matches": matches, "true_inliers": true, "pseudo_inliers": pseudo,
            "agreement_all": agree / matches if matches else None,
            "precision_all": tp / pseudo if pseudo else None,
            "recall_all": tp / true if true else None,
            "agreement": _stats(p["agreement"] for p in lp),
            "precision": _stats(p["precision"] for p in lp),
            "recall": _stats(p["recall"] for p in lp),
        })
    return out


def check_pseudo_gt(scene, model_dir, h5_path=None, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """The whole check for one scene: ``{"summary", "poses", "labels"}`` (see the module docstring)."""
    views = read_sfm_views(model_dir)
    poses = compare_relative_poses(scene, views)
    labels = None if h5_path is None else compare_labels(h5_path, views, threshold)
    return {"scene": scene.name, "model": str(model_dir), "labels_h5": None if h5_path is None else str(h5_path),
            "threshold": threshold, "registered": len(views), "views": len(scene),
            "summary": summarize_check(poses, labels), "poses": poses, "labels": labels}
