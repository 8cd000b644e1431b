"""OpenCV SIFT keypoints, nearest-neighbour matching with side information, and a per-image cache.

Every keypoint of image 1 is matched to its nearest neighbour in image 2 (Yi et al. 2018 keep all
of them and let the network decide); Lowe's ratio ``d1 / d2`` and a mutual-nearest-neighbour flag
are kept as side information.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import zipfile
from pathlib import Path

import numpy as np

__all__ = [
    "detect_sift",
    "match_descriptors",
    "match_both_ways",
    "load_gray",
    "FeatureCache",
    "DEFAULT_NUM_KP",
    "DEFAULT_CONTRAST_THRESHOLD",
]

log = logging.getLogger(__name__)

DEFAULT_NUM_KP = 2000
#: Yi et al. lower SIFT's contrast threshold (1e-5) so that nearly every image yields num_kp points
DEFAULT_CONTRAST_THRESHOLD = 1e-5


def load_gray(path) -> np.ndarray:
    """Read an image as uint8 greyscale ``(H, W)``; raises naming the file when it is missing/unreadable.

    The stored pixel grid is returned: an EXIF orientation tag is ignored (OpenCV would otherwise
    rotate the image), because camera models refer to the stored grid (COLMAP reads images that
    way, and so do the Strecha / Yi calibrations). A phone photo tagged "rotate 90" therefore
    keeps its sensor width and height, as in the SfM model made from it.
    """
    import cv2

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise ValueError(f"cannot read image {path} (not an image OpenCV can decode)")
    return image


def detect_sift(
    image_gray: np.ndarray, num_kp: int = DEFAULT_NUM_KP, contrast_threshold: float = DEFAULT_CONTRAST_THRESHOLD
) -> tuple[np.ndarray, np.ndarray]:
    """SIFT keypoints and descriptors of a greyscale image.

    Args:
        image_gray: uint8 image ``(H, W)``.
        num_kp: keep at most this many keypoints (strongest response first).
        contrast_threshold: SIFT's contrast threshold (OpenCV's default is 0.04).

    Returns:
        ``kpts`` ``(N, 2)`` float32 pixel coordinates ``(x, y)`` and ``desc`` ``(N, 128)`` float32,
        ``N <= num_kp`` (``N = 0`` for a blank image).
    """
    import cv2

    image_gray = np.asarray(image_gray)
    if image_gray.ndim != 2 or image_gray.dtype != np.uint8:
        raise ValueError(f"image_gray must be a uint8 array (H, W), got {image_gray.dtype} {image_gray.shape}")
    if num_kp < 1:
        raise ValueError(f"num_kp must be >= 1, got {num_kp}")
    sift = cv2.SIFT_create(nfeatures=int(num_kp), contrastThreshold=float(contrast_threshold))
    keypoints, desc = sift.detectAndCompute(image_gray, None)
    if not keypoints or desc is None:
        return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32)
    kpts = np.array([kp.pt for kp in keypoints], dtype=np.float32)
    response = np.array([kp.response for kp in keypoints], dtype=np.float32)
    # OpenCV keeps ties at the cut and adds extra orientations, so it may return a few more
    # than nfeatures; a stable sort by response keeps the result deterministic.
    order = np.argsort(-response, kind="stable")[:num_kp]
    return kpts[order], np.asarray(desc, dtype=np.float32)[order]


def _nearest_two(matcher, query: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest ``train`` descriptor of every ``query`` one and Lowe's ratio d1/d2."""
    k = 2 if len(train) >= 2 else 1
    knn = matcher.knnMatch(query, train, k=k)
    idx = np.array([m[0].trainIdx for m in knn], dtype=np.int64)
    d1 = np.array([m[0].distance for m in knn], dtype=np.float64)
    if k == 1:
        return idx, np.ones(len(query), np.float32)
    d2 = np.array([m[1].distance for m in knn], dtype=np.float64)
    # 0/0 for duplicated descriptors: call them ambiguous (ratio 1), which they are.
    ratio = np.where(d2 > 0, d1 / np.maximum(d2, 1e-12), 1.0)
    return idx, ratio.astype(np.float32)


def _check_desc(d: np.ndarray, name: str) -> np.ndarray:
    d = np.ascontiguousarray(d, dtype=np.float32)
    if d.ndim != 2 or d.shape[1] != 128:
        raise ValueError(f"{name} must have shape (N, 128), got {d.shape}")
    return d


def match_both_ways(desc1: np.ndarray, desc2: np.ndarray) -> tuple[dict, dict]:
    """:func:`match_descriptors` for ``(desc1, desc2)`` and ``(desc2, desc1)`` at the cost of one."""
    import cv2

    desc1, desc2 = _check_desc(desc1, "desc1"), _check_desc(desc2, "desc2")
    n1, n2 = len(desc1), len(desc2)
    if n1 == 0 or n2 == 0:
        empty = {
            "idx1": np.zeros(0, np.int64),
            "idx2": np.zeros(0, np.int64),
            "ratio": np.zeros(0, np.float32),
            "mutual": np.zeros(0, bool),
        }
        return empty, {k: v.copy() for k, v in empty.items()}
    matcher = cv2.BFMatcher(cv2.NORM_L2, crossCheck=False)
    nn12, ratio12 = _nearest_two(matcher, desc1, desc2)
    nn21, ratio21 = _nearest_two(matcher, desc2, desc1)
    forward = {
        "idx1": np.arange(n1, dtype=np.int64),
        "idx2": nn12,
        "ratio": ratio12,
        "mutual": nn21[nn12] == np.arange(n1),
    }
    backward = {
        "idx1": np.arange(n2, dtype=np.int64),
        "idx2": nn21,
        "ratio": ratio21,
        "mutual": nn12[nn21] == np.arange(n2),
    }
    return forward, backward


def match_descriptors(desc1: np.ndarray, desc2: np.ndarray) -> dict:
    """Nearest neighbour in ``desc2`` of every descriptor of ``desc1`` (exact, L2, OpenCV BFMatcher).

    Returns:
        dict with ``idx1`` ``(M,)`` (``= arange(N1)``), ``idx2`` ``(M,)`` int64, ``ratio`` ``(M,)``
        float32 (``d1 / d2`` of Lowe's test; 1.0 when image 2 has a single keypoint, i.e. no
        evidence of distinctiveness) and ``mutual`` ``(M,)`` bool (image 2's keypoint has the
        image 1 keypoint as its own nearest neighbour). Empty arrays when either side is empty.
    """
    return match_both_ways(desc1, desc2)[0]


class FeatureCache:
    """Per-image cache of SIFT keypoints and descriptors as ``.npz`` files in ``cache_dir``.

    The file name hashes the image's absolute path, size and modification time and the SIFT
    settings, so a changed image or setting is recomputed; files are written to a temporary name
    and renamed, so an interrupted run never leaves a truncated cache entry. An entry that cannot be
    read anyway (damaged on disk, edited) is reported with a warning naming it, deleted and recomputed.
    """

    def __init__(self, cache_dir, num_kp: int = DEFAULT_NUM_KP, contrast_threshold: float = DEFAULT_CONTRAST_THRESHOLD):
        self.cache_dir = Path(cache_dir)
        self.num_kp = int(num_kp)
        self.contrast_threshold = float(contrast_threshold)

    def path_for(self, image_path) -> Path:
        image_path = Path(image_path).resolve()
        if not image_path.is_file():
            raise FileNotFoundError(f"image not found: {image_path}")
        st = image_path.stat()
        key = f"{image_path}|{st.st_size}|{st.st_mtime_ns}|stored-grid|sift|{self.num_kp}|{self.contrast_threshold!r}"
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        return self.cache_dir / f"{image_path.stem}-{digest}.npz"

    @staticmethod
    def _load(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """One cache entry, checked (``ValueError`` when it is not what :meth:`compute` writes)."""
        with np.load(path, allow_pickle=False) as data:
            kpts, desc, size = data["kpts"], data["desc"], data["size"]
        if kpts.ndim != 2 or kpts.shape[1] != 2 or desc.shape != (len(kpts), 128) or size.shape != (2,):
            raise ValueError(f"unexpected shapes kpts {kpts.shape}, desc {desc.shape}, size {size.shape}")
        if not (np.isfinite(kpts).all() and np.isfinite(desc).all()):
            raise ValueError("NaN or infinite values")
        return kpts, desc, (int(size[0]), int(size[1]))

    def has(self, image_path) -> bool:
        return self.path_for(image_path).is_file()

    def compute(self, image_path) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """Keypoints, descriptors and ``(width, height)`` of an image, from the cache when present."""
        path = self.path_for(image_path)
        if path.is_file():
            try:
                return self._load(path)
            except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as err:
                # A damaged entry (disk full, copied half-way, edited) would fail every rerun: rebuild it.
                log.warning("feature cache file %s is unreadable (%s: %s); deleting it and recomputing the "
                            "features of %s", path, type(err).__name__, str(err).splitlines()[0] if str(err) else "",
                            image_path)
                path.unlink(missing_ok=True)
        image = load_gray(image_path)
        kpts, desc = detect_sift(image, self.num_kp, self.contrast_threshold)
        size = (image.shape[1], image.shape[0])
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, kpts=kpts, desc=desc, size=np.array(size, dtype=np.int64))
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
        return kpts, desc, size
