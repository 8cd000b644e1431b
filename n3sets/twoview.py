"""Two-view decisions made once: the network's pose, the minimum match count, verification.

Every place that turns a correspondence network's output into a relative pose (training
validation in ``train_corr.py``, :func:`n3sets.evaluation.evaluate_correspondences`,
:class:`n3sets.MatchFilter`, ``diagnose_corr.py``) calls :func:`pose_from_logits`, so the
``val_mAP20`` that selects a model is the mAP that ``eval_corr.py`` reports. Every estimator
refuses fewer than :data:`MIN_MATCHES` distinct matches.

:func:`verify_two_view` decides whether an estimated pose can be trusted (COLMAP's two-view
verification, adapted to calibrated pairs): enough inliers, in count and as a fraction of the
putative matches; a real baseline (not the same image twice, not a pure rotation); a
well-conditioned solution (the inliers triangulate in front of both cameras). Without it a
robust estimator returns *some* essential matrix for any set of matches, including random ones.
The default thresholds (:data:`VERIFY_DEFAULTS`) were chosen on validation pairs of the training
scenes and on negative pairs (images of different scenes); see ``results/verification/``.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from .essential import logits_to_weights, weighted_eight_point
from .pose import recover_pose

__all__ = ["MIN_MATCHES", "distinct_matches", "sampson_distance", "pose_from_weights", "pose_from_logits", "VERIFY_DEFAULTS", "verify_two_view",
           "verification_stats", "triangulation_angles", "rotation_inliers", "degenerate", "check_stats"]

#: The one minimum: no essential matrix is estimated from fewer distinct matches. The eight-point
#: algorithm needs eight; OpenCV's five-point RANSAC runs with five but is unstable below eight,
#: and every estimator of the project uses the same rule so that their failures are comparable.
MIN_MATCHES = 8


def distinct_matches(x1, x2) -> int:
    """Number of distinct ``(x1, x2)`` rows (a duplicated match adds no constraint on E).

    SIFT returns the same location twice when a keypoint has two orientations, so a count of
    matches can overstate the constraints.
    """
    a = torch.as_tensor(x1)
    b = torch.as_tensor(x2)
    if a.shape[0] == 0:
        return 0
    return int(torch.unique(torch.cat([a.reshape(-1, 2), b.reshape(-1, 2)], 1), dim=0).shape[0])


def sampson_distance(x1: torch.Tensor, x2: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """Squared Sampson distance ``(x2^T E x1)^2 / ((E x1)_1^2 + (E x1)_2^2 + (E^T x2)_1^2 + (E^T x2)_2^2)``.

    The error OpenCV's essential-matrix RANSAC compares with the squared threshold. ``x1, x2``
    ``(..., N, 2)`` normalized, ``E`` ``(..., 3, 3)``; returns ``(..., N)``.
    """
    E = E.to(x1.dtype)
    h1 = torch.cat([x1, torch.ones_like(x1[..., :1])], -1)
    h2 = torch.cat([x2, torch.ones_like(x2[..., :1])], -1)
    Ex1 = h1 @ E.transpose(-1, -2)
    Etx2 = h2 @ E
    num = (h2 * Ex1).sum(-1) ** 2
    den = Ex1[..., 0] ** 2 + Ex1[..., 1] ** 2 + Etx2[..., 0] ** 2 + Etx2[..., 1] ** 2
    return num / den.clamp_min(1e-300)


def pose_from_weights(
    x1: torch.Tensor,
    x2: torch.Tensor,
    weights: torch.Tensor,
    inliers: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Relative pose from weighted matches, without RANSAC (batched): the one definition.

    ``E`` by the weighted eight-point algorithm; the pose of ``E`` by the cheirality test over
    ``inliers``.

    Args:
        x1, x2: ``(B, N, 2)`` normalized coordinates.
        weights: ``(B, N)`` non-negative weights.
        inliers: ``(B, N)`` bool, the matches that vote in the cheirality test (default:
            ``weights > 0``).
        mask: ``(B, N)`` bool, False for padding (default: all valid).
        normalize: weighted Hartley normalisation in the eight-point solve. Off in the one
            definition: on validation it helped weak classifiers and hurt strong ones
            (``results/scenes8/README.md``, "What limits the pose without RANSAC");
            ``diagnose_corr.py`` reports both.

    Returns:
        ``E (B, 3, 3)``, ``R (B, 3, 3)``, ``t (B, 3)``, ``ok (B,)``: ``ok`` is False where fewer
        than :data:`MIN_MATCHES` distinct matches have a positive weight, or no valid pose passes
        the cheirality test. R and t are finite everywhere.
    """
    if weights.dim() != 2 or x1.shape[:2] != weights.shape or x2.shape != x1.shape:
        raise ValueError(f"expected x1, x2 (B, N, 2) and weights (B, N), got {tuple(x1.shape)}, "
                         f"{tuple(x2.shape)}, {tuple(weights.shape)}")
    if mask is None:
        mask = torch.ones_like(weights, dtype=torch.bool)
    weights = weights * mask.to(weights.dtype)
    support = (weights > 0) & mask
    inliers = (support if inliers is None else inliers) & mask
    E = weighted_eight_point(x1, x2, weights, mask, normalize=normalize)
    R, t, ok = recover_pose(E, x1, x2, mask=inliers)
    enough = torch.tensor([distinct_matches(x1[b][support[b]], x2[b][support[b]]) >= MIN_MATCHES
                           for b in range(x1.shape[0])], dtype=torch.bool, device=ok.device)
    return E, R, t, ok & enough


def pose_from_logits(
    x1: torch.Tensor,
    x2: torch.Tensor,
    logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    inliers: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The relative pose a correspondence network predicts, without RANSAC (batched).

    :func:`pose_from_weights` with the weights ``relu(tanh(logits))`` and, by default, the
    predicted inliers ``logits > 0`` (the trained decision) voting in the cheirality test
    (:class:`n3sets.MatchFilter` passes its probability-threshold mask as ``inliers``).
    Arguments and returns as there, with ``logits (B, N)``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (B, N), got {tuple(logits.shape)}")
    if inliers is None:
        inliers = logits > 0
    return pose_from_weights(x1, x2, logits_to_weights(logits), inliers=inliers, mask=mask)


# --------------------------------------------------------------------------- verification

#: Default thresholds of :func:`verify_two_view`, chosen on 115 validation pairs of castle-P30 and
#: Herz-Jesus-P25 and 150 negative pairs (images of two different scenes among castle-P30,
#: Herz-Jesus-P25, templeSparseRing, sceaux-castle, sacre-coeur), never the test scene
#: (``results/verification/README.md``). With 2000 putative matches (``n3net-strecha`` + RANSAC):
#: negatives reached at most 31 distinct inliers, a ratio of 0.0155; positives at least 38 and
#: 0.019, a cheirality of 0.87 and a triangulation angle of 2.4 degrees; a rotation explained at
#: most 0.81 of a real pair's inliers.
VERIFY_DEFAULTS = {
    # a camera rotation alone (a homography with equal singular values) explaining this fraction
    # of the essential matrix's inliers, and min_inliers matches, means no baseline
    "max_rotation_ratio": 0.95,
    "min_inliers": 15,  # distinct points on each side; COLMAP's min_num_inliers (a floor for few matches)
    "min_inlier_ratio": 0.02,  # inliers / putative matches: 40 of 2000 (negatives: at most 0.0155)
    "min_triangulation_angle": 1.0,  # degrees, median over the inliers (baseline test)
    "min_cheirality": 0.8,  # fraction of inliers in front of both cameras (conditioning test)
}


def _points(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"{name} has shape {x.shape}, expected (N, 2)")
    return x


def triangulation_angles(x1: np.ndarray, x2: np.ndarray, R: np.ndarray, t: np.ndarray):
    """Triangulation angle (degrees) and depth signs of each match under ``X2 = R X1 + t``.

    The angle at the triangulated point between the two viewing rays; it is 0 for a zero
    baseline or a pure rotation, whatever the scene. Returns ``(angles (N,), in_front (N,) bool)``.
    """
    t = t / max(np.linalg.norm(t), 1e-300)
    f1 = np.concatenate([x1, np.ones((len(x1), 1))], 1)
    f2 = np.concatenate([x2, np.ones((len(x2), 1))], 1)
    Rf1 = f1 @ R.T  # ray 1 in camera-2 coordinates
    # z1 R f1 + t = z2 f2, least squares in (z1, z2)
    a11 = (Rf1 * Rf1).sum(1)
    a12 = -(Rf1 * f2).sum(1)
    a22 = (f2 * f2).sum(1)
    b1 = -(Rf1 @ t)
    b2 = f2 @ t
    det = a11 * a22 - a12 * a12
    safe = np.abs(det) > 1e-15
    det = np.where(safe, det, 1.0)
    z1 = np.where(safe, (a22 * b1 - a12 * b2) / det, 0.0)
    z2 = np.where(safe, (a11 * b2 - a12 * b1) / det, 0.0)
    # atan2 of |cross| and dot: accurate near 0, where arccos of the dot product is not
    angles = np.degrees(np.arctan2(np.linalg.norm(np.cross(Rf1, f2), axis=1), (Rf1 * f2).sum(1)))
    return angles, (z1 > 0) & (z2 > 0) & safe


#: A homography is a pure rotation (calibrated coordinates) when its smallest singular value is at
#: least this fraction of its largest; a plane seen from two positions gives unequal ones.
ROTATION_ISOTROPY = 0.95


def rotation_inliers(x1, x2, threshold: float = 1e-3) -> int:
    """Matches explained by a camera rotation alone (zero baseline), 0 when none is.

    A RANSAC homography (OpenCV) on the matches; it is a rotation when its singular values are
    nearly equal (:data:`ROTATION_ISOTROPY`); its inliers (within ``threshold`` in normalized
    units) are counted then. The same image twice gives the identity and all its matches.
    """
    import cv2

    x1 = _points(x1, "x1")
    x2 = _points(x2, "x2")
    keep = np.isfinite(x1).all(1) & np.isfinite(x2).all(1)
    x1, x2 = x1[keep], x2[keep]
    if len(x1) < 4:
        return 0
    try:
        H, mask = cv2.findHomography(x1, x2, cv2.RANSAC, threshold, maxIters=2000, confidence=0.999)
    except cv2.error:
        return 0
    if H is None or mask is None or not np.isfinite(H).all():
        return 0
    s = np.linalg.svd(H, compute_uv=False)
    if not s[0] > 0 or s[2] / s[0] < ROTATION_ISOTROPY:
        return 0
    return int(mask.sum())


def _distinct_points(x: np.ndarray) -> int:
    return int(np.unique(x, axis=0).shape[0]) if len(x) else 0


def verification_stats(x1, x2, inliers, R, t, num_matches: int | None = None) -> dict:
    """The quantities :func:`verify_two_view` tests, for one pair (normalized coordinates).

    Args:
        x1, x2: ``(N, 2)`` normalized coordinates of the putative matches.
        inliers: ``(N,)`` bool, the matches consistent with the pose.
        R, t: the estimated pose (``X2 = R X1 + t``).
        num_matches: the number of putative matches the inlier ratio is taken over (default N).
    """
    x1 = _points(x1, "x1")
    x2 = _points(x2, "x2")
    inl = np.asarray(torch.as_tensor(inliers).cpu().numpy() if isinstance(inliers, torch.Tensor) else inliers,
                     dtype=bool).reshape(-1)
    if x1.shape != x2.shape or inl.shape[0] != x1.shape[0]:
        raise ValueError(f"x1 {x1.shape}, x2 {x2.shape} and inliers {inl.shape} must describe the same N matches")
    R = np.asarray(R, dtype=np.float64).reshape(3, 3)
    t = np.asarray(t, dtype=np.float64).reshape(3)
    n = x1.shape[0] if num_matches is None else int(num_matches)
    sel = inl & np.isfinite(x1).all(1) & np.isfinite(x2).all(1)
    # distinct points on *each* side: many keypoints of one image matched to a few of the other
    # (a "hub" keypoint) put all their partners on a few epipolar lines, which RANSAC then fits
    # with a spurious E; such inliers are as good as one each
    count = min(_distinct_points(x1[sel]), _distinct_points(x2[sel]))
    stats = {"num_inliers": count, "inlier_ratio": count / max(n, 1),
             "triangulation_angle": 0.0, "cheirality": 0.0,
             "rotation_inliers": rotation_inliers(x1, x2)}
    if count and np.isfinite(R).all() and np.isfinite(t).all() and np.linalg.norm(t) > 0:
        angles, front = triangulation_angles(x1[sel], x2[sel], R, t)
        stats["triangulation_angle"] = float(np.median(angles))
        stats["cheirality"] = float(front.mean())
    return stats


NO_BASELINE = "degenerate configuration, no baseline (the same view twice, or a camera that only rotated)"


def degenerate(stats: Mapping, conf: Mapping) -> str:
    """The no-baseline test on its own (also for pairs where no essential matrix was found)."""
    rot = stats.get("rotation_inliers", 0)
    if rot >= conf["min_inliers"] and rot >= conf["max_rotation_ratio"] * stats.get("num_inliers", 0):
        return (f"verification failed: {NO_BASELINE}; a rotation alone explains {rot} matches, "
                f"the essential matrix {stats.get('num_inliers', 0)}")
    return ""


def verify_two_view(x1, x2, inliers, R, t, num_matches: int | None = None,
                    conf: Mapping | None = None) -> tuple[bool, str, dict]:
    """Whether an estimated two-view pose can be trusted.

    Tests, in order (the first that fails is named in the reason): no baseline (a rotation alone
    explains ``>= max_rotation_ratio`` as many matches as E, and at least ``min_inliers``);
    ``min_inliers`` distinct inliers; inlier ratio ``>= min_inlier_ratio`` of the putative matches; median triangulation
    angle ``>= min_triangulation_angle`` degrees (zero baseline / pure rotation: the same image
    twice, or a camera that only turned, has no relative translation to report);
    ``>= min_cheirality`` of the inliers in front of both cameras (a solution that random
    matches happen to support puts about half of them behind a camera).

    Args: as :func:`verification_stats`; ``conf`` overrides :data:`VERIFY_DEFAULTS`.

    Returns:
        ``(ok, reason, stats)``: reason is ``""`` when ok.
    """
    s = verification_stats(x1, x2, inliers, R, t, num_matches)
    reason = check_stats(s, conf)
    return not reason, reason, s


def check_stats(s: Mapping, conf: Mapping | None = None) -> str:
    """The tests of :func:`verify_two_view` on precomputed :func:`verification_stats`: the reason
    of the first that fails, ``""`` when all pass."""
    c = dict(VERIFY_DEFAULTS)
    unknown = set(conf or {}) - set(c)
    if unknown:
        raise ValueError(f"unknown verification option(s) {sorted(unknown)}; known: {sorted(c)}")
    c.update(conf or {})
    failed = degenerate(s, c)
    if failed:
        return failed
    if s["num_inliers"] < c["min_inliers"]:
        return f"verification failed: {s['num_inliers']} inliers, fewer than min_inliers = {c['min_inliers']}"
    if s["inlier_ratio"] < c["min_inlier_ratio"]:
        return (f"verification failed: inlier ratio {s['inlier_ratio']:.3f} below "
                f"min_inlier_ratio = {c['min_inlier_ratio']}")
    if not s["triangulation_angle"] >= c["min_triangulation_angle"]:
        return (f"verification failed: {NO_BASELINE}; median triangulation angle "
                f"{s['triangulation_angle']:.2f} deg below min_triangulation_angle = {c['min_triangulation_angle']}")
    if not s["cheirality"] >= c["min_cheirality"]:
        return (f"verification failed: ill-conditioned solution; only {s['cheirality']:.0%} of the inliers "
                f"lie in front of both cameras (min_cheirality = {c['min_cheirality']})")
    if not all(math.isfinite(v) for v in s.values()):
        return "verification failed: non-finite statistics"
    return ""
