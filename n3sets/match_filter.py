"""Learned outlier filtering of putative matches: the user-facing MatchFilter API.

A :class:`MatchFilter` wraps a pretrained correspondence classifier (CNNet or N3Net). Given the
pixel keypoints of putative matches between two images and the two intrinsic matrices it
returns, per match, the inlier probability and an inlier mask, and for the pair an essential
matrix with the relative pose (``x2 = R x1 + t``, ``E = [t]_x R``; docs/architecture.md, Conventions).

    >>> mf = MatchFilter.from_pretrained("n3net-strecha")
    >>> res = mf.filter(kpts1, kpts2, K1, K2)          # (N, 2) pixels, (3, 3) intrinsics
    >>> res.inliers.sum(), res.R, res.t, res.reason

Pose estimation (``refine``):

- ``"ransac"`` (default) / ``"magsac"``: OpenCV's robust essential-matrix estimator
  (:func:`n3sets.robust.estimate_essential`) on the matches the network keeps; the final inliers
  are the kept matches that are also consistent with that E.
- ``None``: the paper's estimator, the weighted eight-point algorithm on all matches with the
  weights ``relu(tanh(logit))`` (:func:`n3sets.essential.weighted_eight_point`), then the
  cheirality test (:func:`n3sets.pose.recover_pose`) on the kept matches.

Inputs are checked at the boundary: wrong shapes and NaN/inf values raise ``ValueError`` naming
the argument. Too few matches never raise: the result has no pose and ``reason`` says why.
Outputs are NumPy arrays whatever the input type, since SfM tools consume NumPy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .robust import ArrayLike
from .training import resolve_device, resolve_threads, torch_threads

from .twoview import (MIN_MATCHES, VERIFY_DEFAULTS, degenerate, distinct_matches, pose_from_logits,
                      rotation_inliers, sampson_distance, verify_two_view)

__all__ = ["MatchFilter", "FilterResult", "MIN_MATCHES"]

_REFINE_METHODS = (None, "ransac", "magsac")


@dataclass
class FilterResult:
    """Result of :meth:`MatchFilter.filter` for one image pair.

    Attributes:
        prob: ``(N,)`` float32 inlier probability of every putative match (sigmoid of the logit).
        inliers: ``(N,)`` bool final inlier mask: ``prob > threshold``, and with RANSAC
            refinement also consistent with the estimated E; all False when there is no
            (verified) pose. ``num_kept`` counts ``prob > threshold``.
        E: ``(3, 3)`` essential matrix (``x2^T E x1 = 0`` for normalized points), or None.
        R: ``(3, 3)`` rotation of the relative pose ``x2 = R x1 + t``, or None.
        t: ``(3,)`` unit translation direction, or None.
        reason: empty when a verified pose was found, otherwise why not (too few matches, no
            estimate, or the two-view verification test that failed).
        verification: the verified quantities (``num_inliers``, ``inlier_ratio``,
            ``triangulation_angle``, ``cheirality``; :func:`n3sets.twoview.verify_two_view`), or
            None when no pose was estimated.
        threshold: the probability threshold used.
        refine: the refinement used (``"ransac"``, ``"magsac"`` or None).
    """

    prob: np.ndarray
    inliers: np.ndarray
    E: np.ndarray | None = None
    R: np.ndarray | None = None
    t: np.ndarray | None = None
    reason: str = ""
    threshold: float = 0.5
    refine: str | None = "ransac"
    num_kept: int = field(default=0)
    verification: dict | None = None

    @property
    def ok(self) -> bool:
        """True when a pose (E, R, t) was estimated and passed the two-view verification."""
        return self.E is not None

    @property
    def num_matches(self) -> int:
        return int(self.prob.shape[0])

    @property
    def num_inliers(self) -> int:
        return int(self.inliers.sum())

    def to_dict(self) -> dict:
        """JSON-ready summary (lists instead of arrays)."""
        as_list = lambda a: None if a is None else np.asarray(a).tolist()  # noqa: E731
        return {
            "ok": self.ok,
            "reason": self.reason,
            "num_matches": self.num_matches,
            "num_kept": self.num_kept,
            "num_inliers": self.num_inliers,
            "threshold": self.threshold,
            "refine": self.refine,
            "E": as_list(self.E),
            "R": as_list(self.R),
            "t": as_list(self.t),
            "verification": self.verification,
        }

    def __repr__(self) -> str:
        pose = "pose found" if self.ok else f"no pose: {self.reason}"
        return (
            f"FilterResult(num_matches={self.num_matches}, num_inliers={self.num_inliers}, "
            f"threshold={self.threshold}, refine={self.refine!r}, {pose})"
        )


def _to_numpy(x, name: str) -> np.ndarray:
    """float64 NumPy copy of an array-like or tensor (detached, on the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric array, got {type(x).__name__}: {err}") from None


def _check_keypoints(kpts, name: str) -> np.ndarray:
    arr = _to_numpy(kpts, name)
    # An empty list has shape (0,); accept it as "no matches" rather than a shape error.
    if arr.size == 0 and arr.ndim <= 2:
        return arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) (pixel x, y per match), got {arr.shape}")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite (NaN or inf) coordinates, first at row "
            f"{int(np.flatnonzero(bad)[0])}; remove those matches first"
        )
    return arr


def _check_intrinsics(K, name: str) -> np.ndarray:
    arr = _to_numpy(K, name)
    if arr.shape != (3, 3):
        raise ValueError(f"{name} must be a (3, 3) intrinsic matrix, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf values")
    # A singular K cannot map pixels to rays; the focal lengths are on its diagonal.
    if abs(np.linalg.det(arr)) < 1e-12 or arr[0, 0] == 0 or arr[1, 1] == 0:
        raise ValueError(f"{name} is singular (focal lengths fx={arr[0, 0]}, fy={arr[1, 1]}); expected [[fx,0,cx],[0,fy,cy],[0,0,1]]")
    return arr


def _check_side(x, name: str, n: int) -> np.ndarray:
    arr = _to_numpy(x, name).reshape(-1) if x is not None else None
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape (N,) = ({n},) like the keypoints, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return arr


class MatchFilter:
    """Inlier classification and relative pose for putative matches of an image pair.

    Args:
        model: a correspondence classifier (``forward(x (B, C_in, N), mask) -> logits (B, N)``)
            with a ``conf`` dict; ``conf["side_info"]`` tells whether it also needs the ratio
            and mutual side information.
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:1"``, ... or ``"auto"`` (CUDA when
            available). Requesting CUDA without it raises ``ValueError``.
        threads: torch CPU threads while :meth:`filter` / :meth:`filter_batch` run (None: 1,
            :func:`n3sets.cli.resolve_threads`); the caller's setting is restored after each call.
            Not torch's default of one per core: on shared cores multi-threaded steps wait for
            the busiest core (20000 matches: 11 s with 1 thread, 132 s with 2 on 2 cores with
            one busy process). Results are identical for 1 and 2 threads (oneDNN off during the
            calls, MKL's strict mode: :func:`n3sets.training.set_threads`) when the filter is the
            first user of torch's matrix products in the process, or Python was started with
            ``MKL_CBWR=AUTO,STRICT``; otherwise they may differ in the last bits.
        **conf: overrides of :attr:`default_conf`.
    """

    default_conf = {
        "threshold": 0.5,  # inlier probability threshold (0.5 is logit > 0, the trained decision)
        # RANSAC/MAGSAC inlier threshold in normalized units (K^-1 applied); None takes
        # n3sets.robust.DEFAULT_THRESHOLDS, the values the evaluation uses (1e-3 for RANSAC,
        # about 1 px at a focal length of 1000 px).
        "ransac_threshold": None,
        "ransac_confidence": 0.999,
        # Iteration cap of RANSAC/MAGSAC; None takes n3sets.robust.DEFAULT_MAX_ITERS (10,000, the
        # evaluation's setting; OpenCV's own default of 1000 starves RANSAC at 20 % inliers).
        "ransac_max_iters": None,
        "seed": 0,
        # Cap on B * Nmax per network call in filter_batch: N3Net's KNN holds (k, N, N) weights per
        # pair, so 8 pairs of 2000 matches (about 1 GB) is a safe CPU default.
        "max_batch_matches": 16_000,
        # Two-view verification (n3sets.twoview.verify_two_view): a pose that fails it is not
        # reported (ok False, no inliers, reason names the test). False turns it off.
        "verify": True,
        **VERIFY_DEFAULTS,
    }

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu", threads: int | None = None,
                 **conf: object):
        unknown = set(conf) - set(self.default_conf)
        if unknown:
            raise ValueError(f"unknown MatchFilter option(s) {sorted(unknown)}; known: {sorted(self.default_conf)}")
        self.conf = {**self.default_conf, **conf}
        self.device = resolve_device(device)
        self.threads = resolve_threads(threads)
        self.model = model.to(self.device).eval()
        self.name = getattr(model, "name", type(model).__name__)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "n3net-strecha", device: str | torch.device = "cpu",
                        threads: int | None = None, **conf: object) -> "MatchFilter":
        """Load a shipped model by name (``"n3net-strecha"``, ``"cnnet-strecha"``), a weight file or a
        trainer checkpoint (``OUT/best.pt`` of ``pipelines/train_corr.py``), see :func:`n3sets.pretrained.load_model`."""
        from .pretrained import load_model

        model = load_model(name_or_path, map_location="cpu")
        mf = cls(model, device=device, threads=threads, **conf)
        mf.name = Path(str(name_or_path)).stem if str(name_or_path).endswith(".pt") else str(name_or_path)
        return mf

    @property
    def side_info(self) -> bool:
        """Whether the model needs the ratio and mutual side information."""
        return bool(getattr(self.model, "conf", {}).get("side_info", False))

    def __repr__(self) -> str:
        return f"MatchFilter(model={self.name!r}, side_info={self.side_info}, device={str(self.device)!r}, threads={self.threads}, conf={self.conf})"

    # ------------------------------------------------------------------ public API

    def filter(self, kpts1: ArrayLike, kpts2: ArrayLike, K1: ArrayLike, K2: ArrayLike, threshold: float | None = None,
               refine: str | None = "ransac", ratio: ArrayLike | None = None,
               mutual: ArrayLike | None = None) -> FilterResult:
        """Classify the putative matches of one pair and estimate its relative pose.

        Args:
            kpts1: ``(N, 2)`` pixel keypoints in image 1 (NumPy or torch); row i matches row i of kpts2.
            kpts2: ``(N, 2)`` pixel keypoints in image 2.
            K1, K2: ``(3, 3)`` intrinsics of the two images (pixels).
            threshold: inlier probability threshold in ``[0, 1]`` (default ``conf["threshold"]``).
            refine: ``"ransac"`` (default), ``"magsac"`` or None (weighted eight-point, no RANSAC).
            ratio: ``(N,)`` Lowe ratios of the matches; required when the model uses side information.
            mutual: ``(N,)`` bool, whether each match is a mutual nearest neighbour; same.

        Returns:
            :class:`FilterResult`. Any N >= 0 is accepted; with fewer than 8 usable matches the
            result has ``E = R = t = None`` and ``reason`` explains.
        """
        return self.filter_batch([kpts1], [kpts2], [K1], [K2], threshold=threshold, refine=refine,
                                 ratio=None if ratio is None else [ratio],
                                 mutual=None if mutual is None else [mutual])[0]

    def filter_batch(self, kpts1: Sequence, kpts2: Sequence, K1: Sequence, K2: Sequence,
                     threshold: float | None = None, refine: str | None = "ransac",
                     ratio: Sequence | None = None, mutual: Sequence | None = None) -> list[FilterResult]:
        """:meth:`filter` for many pairs: the network runs on padded batches (sets of different sizes).

        Args:
            kpts1, kpts2: sequences of ``(N_i, 2)`` pixel keypoints, one entry per pair.
            K1, K2: sequences of ``(3, 3)`` intrinsics, one per pair.
            threshold, refine: as in :meth:`filter`, shared by all pairs.
            ratio, mutual: sequences of ``(N_i,)`` arrays, or None.

        Returns:
            one :class:`FilterResult` per pair, in order.
        """
        threshold = self.conf["threshold"] if threshold is None else float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be an inlier probability in [0, 1], got {threshold}")
        if refine not in _REFINE_METHODS:
            raise ValueError(f"refine must be one of {_REFINE_METHODS}, got {refine!r}")
        B = len(kpts1)
        for name, seq in (("kpts2", kpts2), ("K1", K1), ("K2", K2)) + (
                (("ratio", ratio),) if ratio is not None else ()) + (
                (("mutual", mutual),) if mutual is not None else ()):
            if len(seq) != B:
                raise ValueError(f"{name} has {len(seq)} entries but kpts1 has {B}; give one per pair")
        if self.side_info and (ratio is None or mutual is None):
            raise ValueError(
                f"model {self.name!r} was trained with side information: pass ratio= and mutual= "
                "(the Lowe ratio and mutual-nearest-neighbour flag of every match, shape (N,))"
            )

        pairs = []
        for i in range(B):
            tag = f"[pair {i}]" if B > 1 else ""
            x1 = _check_keypoints(kpts1[i], f"kpts1{tag}")
            x2 = _check_keypoints(kpts2[i], f"kpts2{tag}")
            if x1.shape != x2.shape:
                raise ValueError(f"kpts1{tag} and kpts2{tag} must both be (N, 2) with the same N, got {x1.shape} and {x2.shape}")
            k1 = _check_intrinsics(K1[i], f"K1{tag}")
            k2 = _check_intrinsics(K2[i], f"K2{tag}")
            n = x1.shape[0]
            r = m = None
            if self.side_info:
                r = _check_side(ratio[i], f"ratio{tag}", n)
                m = _check_side(mutual[i], f"mutual{tag}", n)
            pairs.append((x1, x2, k1, k2, r, m))

        with torch_threads(self.threads, thread_independent=True):
            logits = self._logits(pairs)
            return [self._estimate(p, lg, threshold, refine) for p, lg in zip(pairs, logits)]

    # ------------------------------------------------------------------ internals

    def _normalize(self, x1, x2, k1, k2) -> tuple[torch.Tensor, torch.Tensor]:
        from .geometry import normalize_keypoints

        n1 = normalize_keypoints(torch.from_numpy(x1), torch.from_numpy(k1))
        n2 = normalize_keypoints(torch.from_numpy(x2), torch.from_numpy(k2))
        return n1, n2

    @torch.no_grad()
    def _logits(self, pairs) -> list[np.ndarray]:
        """Network logits for every pair; pairs are padded into batches of bounded size."""
        from .batching import to_dense_sets
        from .models import model_inputs

        out: list[np.ndarray] = [np.zeros(0, np.float32) for _ in pairs]
        items = []  # (pair index, (C_in, N) input) for pairs with at least one match
        for i, (x1, x2, k1, k2, r, m) in enumerate(pairs):
            if x1.shape[0] == 0:
                continue  # nothing to classify; the network would see an empty set
            n1, n2 = self._normalize(x1, x2, k1, k2)
            xs = torch.cat([n1, n2], dim=-1).float()[None]  # (1, N, 4)
            side = {}
            if self.side_info:
                side = dict(ratio=torch.from_numpy(r).float()[None], mutual=torch.from_numpy(m).float()[None])
            items.append((i, model_inputs(xs, side_info=self.side_info, **side)[0]))

        # Greedy chunks so that one call never holds more than max_batch_matches padded items.
        cap = self.conf["max_batch_matches"]
        start = 0
        while start < len(items):
            stop, longest = start + 1, items[start][1].shape[1]
            while stop < len(items) and (stop + 1 - start) * max(longest, items[stop][1].shape[1]) <= cap:
                longest = max(longest, items[stop][1].shape[1])
                stop += 1
            chunk = items[start:stop]
            feats = torch.cat([x.t() for _, x in chunk], dim=0)  # (sum N, C_in)
            batch = torch.cat([torch.full((x.shape[1],), b, dtype=torch.long) for b, (_, x) in enumerate(chunk)])
            x, mask = to_dense_sets(feats, batch)  # (B, C_in, Nmax), (B, Nmax)
            lg = self.model(x.to(self.device), mask.to(self.device)).float().cpu()
            for b, (i, xi) in enumerate(chunk):
                out[i] = lg[b, : xi.shape[1]].numpy()
            start = stop
        return out

    def _estimate(self, pair, logits: np.ndarray, threshold: float, refine) -> FilterResult:
        x1, x2, k1, k2, _, _ = pair
        n = x1.shape[0]
        prob = (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
        kept = prob > threshold
        res = FilterResult(prob=prob, inliers=np.zeros(n, dtype=bool), threshold=threshold, refine=refine,
                           num_kept=int(kept.sum()))
        if n < MIN_MATCHES:
            res.reason = f"only {n} putative matches; at least {MIN_MATCHES} are needed to estimate an essential matrix"
            return res
        n1, n2 = (t.double() for t in self._normalize(x1, x2, k1, k2))
        from .robust import DEFAULT_MAX_ITERS, DEFAULT_THRESHOLDS, estimate_essential

        ransac_threshold = self.conf["ransac_threshold"]
        if refine is None:
            lg = torch.from_numpy(logits).double()
            support = (lg > 0).numpy()
            distinct = distinct_matches(x1[support], x2[support])
            if distinct < MIN_MATCHES:
                res.reason = (f"only {distinct} distinct matches have a positive weight; the weighted "
                              f"eight-point algorithm needs at least {MIN_MATCHES}")
                return self._no_pose(res, n1, n2)
            E, R, t, ok = pose_from_logits(n1[None], n2[None], lg[None], inliers=torch.from_numpy(kept)[None])
            if not bool(ok[0]):
                res.reason = "the weighted eight-point estimate is degenerate (no valid pose passed the cheirality test)"
                return self._no_pose(res, n1, n2)
            E, R, t = E[0].numpy(), R[0].numpy(), t[0].numpy()
            # the matches consistent with E, as RANSAC would count them (Sampson distance)
            thr = DEFAULT_THRESHOLDS["ransac"] if ransac_threshold is None else float(ransac_threshold)
            consistent = kept & (sampson_distance(n1, n2, torch.from_numpy(E)).numpy() < thr ** 2)
            res.inliers = kept.copy()
            return self._verified(res, n1, n2, consistent, E, R, t, n)

        distinct = distinct_matches(x1[kept], x2[kept])
        if distinct < MIN_MATCHES:
            res.reason = (f"only {distinct} distinct matches have inlier probability > {threshold}; "
                          f"at least {MIN_MATCHES} are needed to estimate an essential matrix")
            return self._no_pose(res, n1, n2)
        idx = np.flatnonzero(kept)
        max_iters = self.conf["ransac_max_iters"]
        est = estimate_essential(
            n1[idx], n2[idx], method=refine, threshold=ransac_threshold,
            confidence=self.conf["ransac_confidence"], seed=self.conf["seed"],
            max_iters=DEFAULT_MAX_ITERS if max_iters is None else int(max_iters),
        )
        E, R, t, inl, ok = (est[k] for k in ("E", "R", "t", "inliers", "ok"))
        if not bool(ok) or E is None:
            res.reason = f"{refine.upper()} found no essential matrix consistent with the {idx.size} kept matches"
            return self._no_pose(res, n1, n2)
        inl = _to_numpy(inl, "inliers").astype(bool).reshape(-1)
        final = np.zeros(n, dtype=bool)
        final[idx[inl]] = True
        res.inliers = final
        E, R = _to_numpy(E, "E").reshape(3, 3), _to_numpy(R, "R").reshape(3, 3)
        return self._verified(res, n1, n2, final, E, R, _to_numpy(t, "t").reshape(3), n)

    def _no_pose(self, res: FilterResult, n1, n2) -> FilterResult:
        """No essential matrix: say so, or that there is no baseline when a rotation explains the matches."""
        res.inliers = np.zeros(res.num_matches, dtype=bool)  # no pose, so no match is an inlier of it
        if self.conf["verify"]:
            conf = {k: self.conf[k] for k in VERIFY_DEFAULTS}
            rot = rotation_inliers(n1.numpy(), n2.numpy())
            failed = degenerate({"rotation_inliers": rot, "num_inliers": 0}, conf)
            if failed:
                res.reason = failed
        return res

    def _verified(self, res: FilterResult, n1, n2, inliers: np.ndarray, E, R, t, n: int) -> FilterResult:
        """Attach the pose when it passes the two-view verification; otherwise say which test failed."""
        conf = {k: self.conf[k] for k in VERIFY_DEFAULTS}
        ok, reason, stats = verify_two_view(n1.numpy(), n2.numpy(), inliers, R, t, num_matches=n, conf=conf)
        res.verification = stats
        if self.conf["verify"] and not ok:
            res.reason = reason
            res.inliers = np.zeros(n, dtype=bool)  # no pose, so no match is an inlier of it
            return res
        res.E, res.R, res.t = E, R, t
        return res
