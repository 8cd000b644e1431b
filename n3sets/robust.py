"""Robust essential-matrix estimation with OpenCV (RANSAC and MAGSAC++ baselines).

OpenCV is imported lazily: the rest of n3sets needs only torch.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

__all__ = ["estimate_essential", "ROBUST_METHODS", "DEFAULT_THRESHOLDS", "DEFAULT_MAX_ITERS", "MIN_MATCHES",
           "ArrayLike"]

#: What the public two-view functions accept for points, keypoints and matrices: a NumPy array,
#: a torch tensor (detached, moved to the CPU) or nested sequences of numbers; converted to float64.
ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]

#: Estimators accepted by :func:`estimate_essential`.
ROBUST_METHODS = ("ransac", "magsac")

#: Default inlier thresholds in normalized image units (distance to the epipolar line, with
#: K^-1 applied). 1e-3 is the RANSAC threshold of the Yi et al. (2018) and OANet evaluations;
#: at the Strecha focal length (about 920 px after the 1/3 downscaling) it is about 1 px.
#: MAGSAC++ marginalizes over noise scales up to its threshold and was best with a tighter one
#: on the validation pairs (castle-P30 + Herz-Jesus-P25, never the test scene): ratio+magsac
#: mAP20 0.889 / 0.907 / 0.874 / 0.846 / 0.783 at 1.25e-4 / 2.5e-4 / 5e-4 / 1e-3 / 2e-3
#: (1000 iterations); RANSAC's 1e-3 was also its best of 5e-4 / 1e-3 / 2e-3 / 4e-3 there.
DEFAULT_THRESHOLDS = {"ransac": 1e-3, "magsac": 2.5e-4}

#: Iteration cap. OpenCV's default (1000, used by the Yi et al. and OANet evaluations) is too
#: low for SIFT matches with about 20 % inliers: a five-point sample is all-inlier with
#: probability 0.2^5, so 99.9 % confidence needs about 21,000 draws. With 10,000 the all-matches
#: baselines gain a lot on the validation pairs (mAP20 RANSAC 0.47 -> 0.68, MAGSAC++ 0.52 -> 0.75);
#: on filtered matches the adaptive stopping ends far earlier, so the cap costs nothing there.
DEFAULT_MAX_ITERS = 10000

#: The project's one minimum match count (n3sets.twoview.MIN_MATCHES): the five-point solver
#: runs with five but is unstable below eight.
from .twoview import MIN_MATCHES  # noqa: E402


def _as_points(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2), got {x.shape}")
    return np.ascontiguousarray(x)


def _failure(n: int) -> dict:
    return {
        "E": torch.zeros(3, 3, dtype=torch.float64),
        "R": torch.eye(3, dtype=torch.float64),
        "t": torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64),
        "inliers": torch.zeros(n, dtype=torch.bool),
        "ok": False,
    }


def estimate_essential(
    x1n: ArrayLike,
    x2n: ArrayLike,
    method: str = "ransac",
    threshold: float | None = None,
    confidence: float = 0.999,
    seed: int = 0,
    max_iters: int = DEFAULT_MAX_ITERS,
) -> dict:
    """Essential matrix and relative pose from putative matches with a robust estimator.

    Runs ``cv2.findEssentialMat`` (five-point solver; identity camera matrix because the
    points are already normalized) and then ``cv2.recoverPose`` on its inliers.

    Args:
        x1n: normalized points in image 1 ``(N, 2)`` (tensor or array).
        x2n: normalized points in image 2 ``(N, 2)``.
        method: ``"ransac"`` (``cv2.RANSAC``) or ``"magsac"`` (``cv2.USAC_MAGSAC``, MAGSAC++).
        threshold: inlier threshold in normalized units; ``None`` takes
            :data:`DEFAULT_THRESHOLDS` for the method.
        confidence: RANSAC confidence.
        seed: seed of the random sampling; the same seed gives the same result.
        max_iters: iteration cap (see :data:`DEFAULT_MAX_ITERS`; OpenCV's default is 1000).

    Returns:
        dict with ``E`` ``(3, 3)``, ``R`` ``(3, 3)``, ``t`` ``(3,)`` (float64 tensors, pose
        ``x2 = R x1 + t``), ``inliers`` ``(N,)`` bool (the estimator's inlier mask) and ``ok``
        (bool). With fewer than :data:`MIN_MATCHES` matches, or when OpenCV finds no model, ``ok``
        is False, ``inliers`` is all False and the pose is the identity.
    """
    if method not in ROBUST_METHODS:
        raise ValueError(f"method must be one of {ROBUST_METHODS}, got {method!r}")
    p1 = _as_points(x1n, "x1n")
    p2 = _as_points(x2n, "x2n")
    if p1.shape != p2.shape:
        raise ValueError(f"x1n and x2n must have the same shape (N, 2), got {p1.shape} and {p2.shape}")
    n = p1.shape[0]
    threshold = DEFAULT_THRESHOLDS[method] if threshold is None else float(threshold)
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    finite = np.isfinite(p1).all(1) & np.isfinite(p2).all(1)
    if finite.sum() < MIN_MATCHES:
        return _failure(n)

    import cv2  # lazy: only the robust baselines need OpenCV

    flag = cv2.RANSAC if method == "ransac" else cv2.USAC_MAGSAC
    # OpenCV 5's findEssentialMat draws its samples from an internal generator with a fixed
    # state (cv2.setRNGSeed has no effect on it, checked with 5.0), so it is deterministic but
    # cannot be reseeded. Shuffling the matches with the seed changes which matches the samples
    # pick, which is what a seed should do; the inlier mask is un-shuffled below.
    # setRNGSeed is kept for OpenCV builds whose RANSAC does use the global generator.
    cv2.setRNGSeed(int(seed))
    order = np.flatnonzero(finite)
    order = order[np.random.default_rng(int(seed)).permutation(len(order))]
    q1, q2 = np.ascontiguousarray(p1[order]), np.ascontiguousarray(p2[order])
    K = np.eye(3)
    try:
        E, mask = cv2.findEssentialMat(
            q1, q2, K, method=flag, prob=confidence, threshold=threshold, maxIters=int(max_iters)
        )
    except cv2.error:
        return _failure(n)
    if E is None or mask is None or E.shape[0] < 3 or E.shape[0] % 3:
        return _failure(n)
    mask = mask.reshape(-1).astype(bool)
    if mask.sum() < MIN_MATCHES:
        return _failure(n)

    # The five-point solver may return several solutions stacked as (3k, 3); keep the one whose
    # cheirality check passes for the most inliers, as recoverPose would for a single E.
    best = None
    for Ei in np.split(E, E.shape[0] // 3):
        if not np.isfinite(Ei).all():
            continue
        count, R, t, _ = cv2.recoverPose(Ei, q1, q2, K, mask=mask.astype(np.uint8).copy())
        if best is None or count > best[0]:
            best = (count, Ei, R, t)
    if best is None or best[0] == 0:
        return _failure(n)
    _, Ei, R, t = best
    inliers = np.zeros(n, dtype=bool)
    inliers[order] = mask
    t = t.reshape(3)
    return {
        "E": torch.from_numpy(Ei.copy()),
        "R": torch.from_numpy(R.copy()),
        "t": torch.from_numpy(t / max(np.linalg.norm(t), 1e-300)),
        "inliers": torch.from_numpy(inliers),
        "ok": True,
    }
