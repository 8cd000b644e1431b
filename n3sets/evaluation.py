"""Relative-pose evaluation of correspondence filters (Yi et al. 2018 protocol).

:func:`evaluate_correspondences` runs every method on every pair and returns the metrics that
``pipelines/eval_corr.py`` prints and writes as JSON. Methods (names as in docs/architecture.md, Conventions):

- ``ransac``, ``magsac``: OpenCV RANSAC / MAGSAC++ on all putative matches.
- ``ratio+ransac``, ``ratio+magsac``: Lowe's ratio test, then the estimator on the survivors.
- ``<model>``: the network's weighted eight-point essential matrix (weights relu(tanh(logit))),
  pose by the cheirality test over the predicted inliers (logit > 0); no RANSAC.
- ``<model>+ransac``: OpenCV RANSAC on the predicted inliers only.

Pose error per pair is ``max(rotation angle, translation angle)``; a pair where a method fails
(too few matches, degenerate E, estimator gives up) gets 180 degrees and stays in the average.

Classification metrics (precision / recall / F1 of an inlier set against the labels, averaged
over pairs) describe the set that decides which matches are trusted: the estimator's inlier
mask for ``ransac`` / ``magsac``, the ratio-test mask for ``ratio+*``, the logit > 0 mask for
``<model>`` and ``<model>+ransac``. Composite methods also report ``final_precision`` /
``final_recall`` / ``final_f1`` of the estimator's inliers inside that set.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Mapping, Sequence

import torch

from .metrics import accuracy_curve, classification_metrics, mean_average_precision
from .models import model_inputs
from .pose import FAILED_POSE_ERROR, pose_error
from .robust import DEFAULT_MAX_ITERS, DEFAULT_THRESHOLDS, estimate_essential
from .twoview import MIN_MATCHES, pose_from_logits, pose_from_weights

__all__ = ["evaluate_correspondences", "eight_point_pose", "model_logits", "BASELINES",
           "PAIR_KEYS"]

#: Baselines that need no model, in table order.
BASELINES = ("ransac", "magsac", "ratio+ransac", "ratio+magsac")

#: The eight-point system is underdetermined with fewer predicted inliers: the pair fails.

#: Fields each pair dict must have (``CorrespondenceDataset`` items have them).
PAIR_KEYS = ("xs", "label", "ratio", "R", "t")


class _Method:
    """Per-pair results of one method."""

    def __init__(self):
        self.errors: list[float] = []
        self.cls: dict[str, list[float]] = {}
        self.seconds = 0.0
        self.failures = 0

    def add(self, err: float, ok: bool, filt=None, final=None):
        self.errors.append(float(err) if ok else FAILED_POSE_ERROR)
        self.failures += int(not ok)
        for prefix, stats in (("", filt), ("final_", final)):
            if stats is None:
                continue
            for key, value in stats.items():
                self.cls.setdefault(prefix + key, []).append(float(value))

    def summary(self, max_thresholds) -> dict:
        out = dict(mean_average_precision(self.errors, max_thresholds))
        for key, values in self.cls.items():
            out[key] = sum(values) / len(values)
        out["median_error_deg"] = float(torch.tensor(self.errors, dtype=torch.float64).median())
        out["failures"] = self.failures
        out["seconds_per_pair"] = self.seconds / max(len(self.errors), 1)
        return out


def _check_pair(pair: Mapping, index: int) -> None:
    missing = [k for k in PAIR_KEYS if k not in pair]
    if missing:
        raise ValueError(f"pair {index} lacks fields {missing}; expected {PAIR_KEYS}")
    xs = torch.as_tensor(pair["xs"])
    if xs.dim() != 2 or xs.shape[-1] != 4:
        raise ValueError(f"pair {index}: xs must have shape (N, 4), got {tuple(xs.shape)}")


def _robust(x1, x2, keep, method, threshold, seed, max_iters):
    """Estimator on the matches selected by ``keep`` (N,) bool; inliers mapped back to (N,)."""
    idx = torch.nonzero(keep, as_tuple=False).flatten()
    out = estimate_essential(
        x1[idx], x2[idx], method=method, threshold=threshold, seed=seed, max_iters=max_iters
    )
    inliers = torch.zeros_like(keep)
    inliers[idx] = out["inliers"]
    return out, inliers


def _cls(pred, label) -> dict:
    return {k: float(v) for k, v in classification_metrics(pred, label).items()}


@torch.no_grad()
def model_logits(model: torch.nn.Module, pair: Mapping) -> torch.Tensor:
    """Logits ``(N,)`` of ``model`` on one pair dict; side-information models get ratio/mutual."""
    side_info = bool(getattr(model, "conf", {}).get("side_info", False))
    xs = pair["xs"].float()[None]
    ratio = pair.get("ratio")
    mutual = pair.get("mutual")
    x = model_inputs(
        xs,
        ratio=None if ratio is None else ratio.float()[None],
        mutual=None if mutual is None else mutual.float()[None],
        side_info=side_info,
    )
    return model(x)[0]


def eight_point_pose(x1: torch.Tensor, x2: torch.Tensor, weights: torch.Tensor, inliers: torch.Tensor,
                     normalize: bool = False):
    """Pose of one pair from weighted matches (:func:`n3sets.twoview.pose_from_weights` on ``(N, 2)`` inputs).

    Returns ``(R (3, 3), t (3,), ok)``.
    """
    _, R, t, ok = pose_from_weights(x1[None], x2[None], weights[None], inliers=inliers[None], normalize=normalize)
    return R[0], t[0], bool(ok[0])


def evaluate_correspondences(
    pairs: Iterable[Mapping],
    models: Mapping[str, torch.nn.Module] | None = None,
    baselines: Sequence[str] = BASELINES,
    ratio_threshold: float = 0.8,
    thresholds: Mapping[str, float] | None = None,
    model_refine: bool = True,
    seed: int = 0,
    max_iters: int = DEFAULT_MAX_ITERS,
    max_thresholds: Sequence[int] = (5, 10, 20),
    curve_thresholds: Sequence[float] = tuple(0.5 * i for i in range(61)),
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict:
    """Evaluate baselines and models on image pairs.

    Args:
        pairs: iterable of dicts with ``xs`` ``(N, 4)`` normalized ``[x1, y1, x2, y2]``,
            ``label`` ``(N,)`` (> 0.5 = inlier), ``ratio`` ``(N,)`` Lowe ratios, ``R`` ``(3, 3)``
            and ``t`` ``(3,)`` ground truth (``x2 = R x1 + t``), optionally ``mutual`` ``(N,)``
            (for models with side information) and ``name``. ``CorrespondenceDataset`` items fit.
        models: name -> model (``forward(x (B, C_in, N)) -> logits (B, N)``; ``model.conf``
            says whether it takes side information). Evaluated in eval mode without gradients.
        baselines: subset of :data:`BASELINES` to run.
        ratio_threshold: Lowe's ratio test keeps matches with ratio strictly below this.
        thresholds: estimator -> inlier threshold in normalized units (defaults:
            :data:`n3sets.robust.DEFAULT_THRESHOLDS`).
        model_refine: also run ``<model>+ransac``.
        seed: OpenCV RNG seed of the estimators.
        max_iters: iteration cap of the estimators (default :data:`n3sets.robust.DEFAULT_MAX_ITERS`;
            the Yi et al. and OANet evaluations used OpenCV's default, 1000).
        max_thresholds: the T of the reported mAP@T.
        curve_thresholds: thresholds (degrees) of the accuracy curves.
        progress: optional wrapper of the pair iterator (e.g. ``tqdm``).

    Returns:
        ``{"methods": {name: {"mAP5", "mAP10", "mAP20", "precision", "recall", "f1", ...}},
        "num_pairs", "pair_names", "errors": {name: [deg per pair]}, "curves": {"thresholds",
        name: [accuracy]}, "settings": {...}}``.
    """
    models = dict(models or {})
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; choose from {BASELINES}")
    for name in models:
        if name in BASELINES:
            raise ValueError(f"model name {name!r} clashes with a baseline name")
    thr = dict(DEFAULT_THRESHOLDS)
    thr.update(thresholds or {})
    for m in models.values():
        m.eval()

    order = list(baselines)
    for name in models:
        order += [name] + ([f"{name}+ransac"] if model_refine else [])
    results = {name: _Method() for name in order}
    names: list[str] = []

    iterator = progress(pairs) if progress is not None else pairs
    for index, pair in enumerate(iterator):
        _check_pair(pair, index)
        names.append(str(pair.get("name", f"pair_{index}")))
        pair = {k: torch.as_tensor(v) if k in PAIR_KEYS + ("mutual",) else v for k, v in pair.items()}
        xs = pair["xs"].double()
        x1, x2 = xs[:, :2], xs[:, 2:]
        label = torch.as_tensor(pair["label"]) > 0.5
        R_gt, t_gt = pair["R"].double(), pair["t"].double()
        everything = torch.ones(xs.shape[0], dtype=torch.bool)
        ratio_keep = torch.as_tensor(pair["ratio"]) < ratio_threshold

        def err(R, t):
            return pose_error(torch.as_tensor(R).double(), torch.as_tensor(t).double(), R_gt, t_gt).item()

        for name in baselines:
            start = time.perf_counter()
            estimator = name.split("+")[-1]
            keep = ratio_keep if name.startswith("ratio+") else everything
            out, inliers = _robust(x1, x2, keep, estimator, thr[estimator], seed, max_iters)
            rec = results[name]
            rec.seconds += time.perf_counter() - start
            if name.startswith("ratio+"):
                rec.add(err(out["R"], out["t"]), out["ok"], _cls(keep, label), _cls(inliers, label))
            else:
                rec.add(err(out["R"], out["t"]), out["ok"], _cls(inliers, label))

        for name, model in models.items():
            start = time.perf_counter()
            logits = model_logits(model, pair).double()
            pred = logits > 0
            _, R, t, ok = pose_from_logits(x1[None], x2[None], logits[None])
            R, t, ok = R[0], t[0], bool(ok[0])
            seconds_model = time.perf_counter() - start
            results[name].seconds += seconds_model
            pred_stats = _cls(pred, label)
            results[name].add(err(R, t), ok, pred_stats)
            if model_refine:
                start = time.perf_counter()
                out, inliers = _robust(x1, x2, pred, "ransac", thr["ransac"], seed, max_iters)
                rec = results[f"{name}+ransac"]
                # the network's time counts too: it is part of the method
                rec.seconds += seconds_model + time.perf_counter() - start
                rec.add(err(out["R"], out["t"]), out["ok"], pred_stats, _cls(inliers, label))

    if not names:
        raise ValueError("no pairs to evaluate")
    curve_thresholds = [float(c) for c in curve_thresholds]
    return {
        "methods": {name: results[name].summary(max_thresholds) for name in order},
        "num_pairs": len(names),
        "pair_names": names,
        "errors": {name: results[name].errors for name in order},
        "curves": {
            "thresholds": curve_thresholds,
            **{name: accuracy_curve(results[name].errors, curve_thresholds).tolist() for name in order},
        },
        "settings": {
            "ratio_threshold": ratio_threshold,
            "thresholds": thr,
            "seed": seed,
            "max_iters": max_iters,
            "max_thresholds": list(max_thresholds),
            "min_matches": MIN_MATCHES,
            "classification_average": "mean over pairs",
        },
    }
