"""Ground-truth labels of putative matches (Yi et al., CVPR 2018).

Each match is scored by the squared symmetric epipolar distance under the ground-truth essential
matrix in normalized coordinates (:func:`n3sets.geometry.symmetric_epipolar_distance`) and called
an inlier when the distance is below ``threshold`` (Yi et al.: ``1e-4``). Real scenes and the
synthetic generator use this one function so that their labels mean the same thing.
"""
from __future__ import annotations

import numpy as np
import torch

from n3sets.geometry import (
    essential_from_pose,
    normalize_keypoints,
    relative_pose,
    symmetric_epipolar_distance,
)

DEFAULT_THRESHOLD = 1e-4


def pair_relative_pose(R1, t1, R2, t2) -> tuple[np.ndarray, np.ndarray]:
    """Relative pose ``x2 = R x1 + t`` (numpy, float64) from world-to-camera poses; ``t`` unit norm.

    Raises ``ValueError`` when the two camera centres coincide (no epipolar geometry).
    """
    R, t = relative_pose(*(torch.as_tensor(np.asarray(a, dtype=np.float64)) for a in (R1, t1, R2, t2)))
    R, t = R.numpy(), t.numpy()
    norm = np.linalg.norm(t)
    # Below this the baseline is numerically zero: a pure rotation has no essential matrix.
    if not np.isfinite(norm) or norm < 1e-12:
        raise ValueError("the two cameras have the same centre (zero baseline): no essential matrix")
    return R, t / norm


def label_matches(kpts1, kpts2, K1, K2, R, t, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Normalized coordinates, epipolar distances and labels of matches.

    Args:
        kpts1, kpts2: matched pixel keypoints ``(N, 2)``.
        K1, K2: intrinsics ``(3, 3)``.
        R, t: relative pose ``x2 = R x1 + t`` (``(3, 3)``, ``(3,)``; the scale of ``t`` does not
            matter: the distance is invariant to the scale of ``E``).
        threshold: inlier threshold on the squared symmetric epipolar distance.

    Returns:
        dict with ``xs`` ``(N, 4)`` float32 ``[x1, y1, x2, y2]`` normalized, ``epi_dist`` ``(N,)``
        float64 and ``label`` ``(N,)`` uint8 (1 = inlier).
    """
    k1 = torch.as_tensor(np.asarray(kpts1, dtype=np.float64))
    k2 = torch.as_tensor(np.asarray(kpts2, dtype=np.float64))
    if k1.dim() != 2 or k1.shape[-1] != 2 or k1.shape != k2.shape:
        raise ValueError(f"kpts1 and kpts2 must both have shape (N, 2), got {tuple(k1.shape)} and {tuple(k2.shape)}")
    x1 = normalize_keypoints(k1, torch.as_tensor(np.asarray(K1, dtype=np.float64)))
    x2 = normalize_keypoints(k2, torch.as_tensor(np.asarray(K2, dtype=np.float64)))
    E = essential_from_pose(torch.as_tensor(np.asarray(R, dtype=np.float64)), torch.as_tensor(np.asarray(t, dtype=np.float64)))
    if len(k1):
        d = symmetric_epipolar_distance(x1, x2, E).numpy()
    else:
        d = np.zeros(0)
    return {
        "xs": torch.cat([x1, x2], dim=-1).numpy().astype(np.float32),
        "epi_dist": d.astype(np.float64),
        "label": (d < threshold).astype(np.uint8),
    }
