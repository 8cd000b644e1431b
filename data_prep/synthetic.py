"""Synthetic two-view correspondence data in the same h5 schema as real builds.

Random scene points are seen by two random cameras looking at the scene with realistic
intrinsics (1024x683 pixels, focal length about 900 px, like the downscaled Strecha images).
Inlier matches are the noisy projections of the same point; outliers pair a projected point of
image 1 with a random pixel of image 2. Labels come from :func:`data_prep.labels.label_matches`,
the function used for real data, so an outlier that happens to fall on its epipolar line is
labelled an inlier exactly as it would be in a real scene. Ratio and mutual side information is
drawn so that it correlates with inlierness the way SIFT's does (inliers: lower ratio, mostly
mutual).
"""
from __future__ import annotations

import numpy as np

from .h5io import atomic_h5, pair_key, write_pair, write_settings
from .labels import DEFAULT_THRESHOLD, label_matches, pair_relative_pose

__all__ = ["synthetic_pair", "write_synthetic_dataset", "random_rotation", "look_at"]


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation matrix (3, 3) (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def look_at(center: np.ndarray, target: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera pose (R, t) of a camera at ``center`` looking at ``target`` (z forward, y down)."""
    z = target - center
    z = z / np.linalg.norm(z)
    x = np.cross(z, up)
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])  # rows are the camera axes in world coordinates
    return R, -R @ center


def _intrinsics(rng, width, height, focal):
    f = focal * rng.uniform(0.9, 1.1)
    return np.array(
        [
            [f, 0.0, width / 2 + rng.uniform(-10, 10)],
            [0.0, f * rng.uniform(0.995, 1.005), height / 2 + rng.uniform(-10, 10)],
            [0.0, 0.0, 1.0],
        ]
    )


def _project(X, R, t, K):
    cam = X @ R.T + t
    uv = cam @ K.T
    return uv[:, :2] / uv[:, 2:3], cam[:, 2]


def synthetic_pair(
    rng: np.random.Generator,
    num_matches: int | tuple[int, int] = 500,
    outlier_ratio: float = 0.5,
    noise_px: float = 0.5,
    image_size: tuple[int, int] = (1024, 683),
    focal: float = 900.0,
    max_angle_deg: float = 30.0,
    threshold: float = DEFAULT_THRESHOLD,
    name: str = "synthetic/000000",
) -> dict:
    """One synthetic pair as a record of the h5 schema (see :mod:`data_prep.h5io`).

    Args:
        rng: numpy random generator (the only source of randomness).
        num_matches: number of matches, or an inclusive ``(min, max)`` range to draw from.
        outlier_ratio: fraction of matches that are generated as outliers, in ``[0, 1]``.
        noise_px: standard deviation of the Gaussian pixel noise added to inlier keypoints.
        image_size: ``(width, height)`` of both images.
        focal: mean focal length in pixels (each camera varies by +-10 %).
        max_angle_deg: largest angle between the two viewing directions.
        threshold: inlier threshold on the squared symmetric epipolar distance.
        name: ``scene/pair`` name stored in the record.

    Returns:
        dict with every field of :data:`data_prep.h5io.PAIR_FIELDS`, the pair attributes and
        ``is_outlier`` ``(N,)`` bool (how each match was generated; labels may differ for
        outliers that fall on their epipolar line).
    """
    if not 0.0 <= outlier_ratio <= 1.0:
        raise ValueError(f"outlier_ratio must be in [0, 1], got {outlier_ratio}")
    if noise_px < 0:
        raise ValueError(f"noise_px must be >= 0, got {noise_px}")
    if isinstance(num_matches, (tuple, list)):
        lo, hi = int(num_matches[0]), int(num_matches[1])
        num_matches = int(rng.integers(lo, hi + 1))
    num_matches = int(num_matches)
    if num_matches < 1:
        raise ValueError(f"num_matches must be >= 1, got {num_matches}")
    width, height = image_size

    # Scene: a blob of points around the origin; cameras on a sphere looking at it.
    K1 = _intrinsics(rng, width, height, focal)
    K2 = _intrinsics(rng, width, height, focal)
    d1 = rng.standard_normal(3)
    d1 /= np.linalg.norm(d1)
    # Second viewing direction within max_angle_deg of the first (at least 2 degrees: a baseline).
    angle = np.deg2rad(rng.uniform(2.0, max_angle_deg))
    axis = np.cross(d1, rng.standard_normal(3))
    axis /= np.linalg.norm(axis)
    d2 = d1 * np.cos(angle) + np.cross(axis, d1) * np.sin(angle)
    up = rng.standard_normal(3)
    R1, t1 = look_at(d1 * rng.uniform(6, 10), np.zeros(3), up)
    R2, t2 = look_at(d2 * rng.uniform(6, 10), rng.normal(0, 0.3, 3), up + rng.normal(0, 0.2, 3))

    num_out = int(round(num_matches * outlier_ratio))
    num_in = num_matches - num_out
    kp1_list, kp2_list = [], []
    need = num_matches  # every match needs a point visible in image 1; inliers also in image 2
    got_in, got_out = 0, 0
    for _ in range(100):
        X = rng.uniform(-2.5, 2.5, size=(4 * need + 64, 3))
        uv1, z1 = _project(X, R1, t1, K1)
        uv2, z2 = _project(X, R2, t2, K2)
        in1 = (z1 > 0.1) & (uv1[:, 0] >= 0) & (uv1[:, 0] < width) & (uv1[:, 1] >= 0) & (uv1[:, 1] < height)
        in2 = (z2 > 0.1) & (uv2[:, 0] >= 0) & (uv2[:, 0] < width) & (uv2[:, 1] >= 0) & (uv2[:, 1] < height)
        both = np.flatnonzero(in1 & in2)[: num_in - got_in]
        kp1_list.append(uv1[both])
        kp2_list.append(uv2[both])
        got_in += len(both)
        only1 = np.flatnonzero(in1)[: num_out - got_out]
        kp1_list.append(uv1[only1])
        kp2_list.append(np.stack([rng.uniform(0, width, len(only1)), rng.uniform(0, height, len(only1))], axis=1))
        got_out += len(only1)
        if got_in == num_in and got_out == num_out:
            break
    else:  # pragma: no cover - only for absurd image sizes / angles
        raise RuntimeError("could not generate enough visible points; check image_size and max_angle_deg")
    # Lists alternate inlier and outlier batches; shuffled below so position carries no information.
    is_out = np.concatenate([np.full(len(a), k % 2 == 1) for k, a in enumerate(kp1_list)])
    kpts1 = np.concatenate(kp1_list)
    kpts2 = np.concatenate(kp2_list)
    noise = rng.normal(0.0, noise_px, size=(2, num_matches, 2)) if noise_px > 0 else np.zeros((2, num_matches, 2))
    kpts1 = kpts1 + noise[0]
    kpts2 = kpts2 + noise[1] * (~is_out)[:, None]
    kpts1 = np.clip(kpts1, 0, [width - 1e-3, height - 1e-3])
    kpts2 = np.clip(kpts2, 0, [width - 1e-3, height - 1e-3])
    perm = rng.permutation(num_matches)
    kpts1, kpts2, is_out = kpts1[perm], kpts2[perm], is_out[perm]

    # Side information shaped like SIFT's: inliers pass the ratio test more often and are more
    # often mutual nearest neighbours.
    ratio = np.where(is_out, rng.beta(6.0, 1.5, num_matches), rng.beta(2.0, 3.0, num_matches))
    mutual = np.where(is_out, rng.random(num_matches) < 0.3, rng.random(num_matches) < 0.85)

    R, t = pair_relative_pose(R1, t1, R2, t2)
    lab = label_matches(kpts1, kpts2, K1, K2, R, t, threshold=threshold)
    scene, _, pair = name.rpartition("/")
    return {
        "xs": lab["xs"],
        "kpts1": kpts1.astype(np.float32),
        "kpts2": kpts2.astype(np.float32),
        "ratio": ratio.astype(np.float32),
        "mutual": mutual.astype(np.uint8),
        "epi_dist": lab["epi_dist"],
        "label": lab["label"],
        "R": R,
        "t": t,
        "K1": K1,
        "K2": K2,
        "size1": np.array([width, height], dtype=np.int64),
        "size2": np.array([width, height], dtype=np.int64),
        "name": name,
        "scene": scene or "synthetic",
        "image1": f"{pair}_1",
        "image2": f"{pair}_2",
        "is_outlier": is_out,
    }


def write_synthetic_dataset(path, num_pairs: int, seed: int = 0, **kw) -> "str":
    """Write ``num_pairs`` synthetic pairs to the h5 file ``path`` (atomic) and return ``path``.

    Keyword arguments go to :func:`synthetic_pair`. The same ``seed`` gives the same file.
    """
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    rng = np.random.default_rng(seed)
    settings = {"format": "synthetic", "seed": int(seed), "num_pairs": int(num_pairs)}
    settings.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()})
    settings.setdefault("threshold", DEFAULT_THRESHOLD)
    with atomic_h5(path) as h5:
        write_settings(h5, settings)
        for i in range(num_pairs):
            write_pair(h5, pair_key(i), synthetic_pair(rng, name=f"synthetic/{i:06d}", **kw))
    return path
