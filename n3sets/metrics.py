"""Evaluation metrics for correspondence classification.

Pose accuracy follows Yi et al. (2018), also used by OANet (docs/architecture.md, Conventions):
per pair the error is ``max(rotation angle, translation angle)`` in degrees; the accuracy at a threshold is the
fraction of pairs whose error is below it; mAP@T is the mean of the accuracies at
5, 10, ..., T degrees. Failed pairs (and NaN / inf errors) count as 180 degrees.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from n3sets.pose import FAILED_POSE_ERROR

__all__ = ["mean_average_precision", "accuracy_curve", "classification_metrics", "MAP_STEP"]

#: Spacing of the thresholds averaged by mAP, in degrees.
MAP_STEP = 5


def _errors_tensor(errors_deg) -> torch.Tensor:
    """Errors as a flat float64 tensor; non-finite entries become 180 (failed pairs)."""
    err = torch.as_tensor(errors_deg, dtype=torch.float64).detach().cpu().reshape(-1)
    if err.numel() == 0:
        raise ValueError("errors_deg is empty: need at least one pair")
    return torch.where(torch.isfinite(err), err, torch.full_like(err, FAILED_POSE_ERROR))


def accuracy_curve(errors_deg, thresholds: Iterable[float]) -> torch.Tensor:
    """Fraction of pairs with error strictly below each threshold.

    Args:
        errors_deg: pose errors in degrees, any shape (flattened); NaN / inf count as 180.
        thresholds: thresholds in degrees ``(T,)``.

    Returns:
        ``(T,)`` float64 accuracies in ``[0, 1]``.
    """
    err = _errors_tensor(errors_deg)
    th = torch.as_tensor(list(thresholds), dtype=torch.float64).reshape(-1)
    if th.numel() == 0:
        raise ValueError("thresholds is empty")
    return (err[None, :] < th[:, None]).double().mean(1)


def mean_average_precision(
    errors_deg: torch.Tensor | Iterable[float], max_thresholds: Sequence[int] = (5, 10, 20)
) -> dict[str, float]:
    """mAP at the given maximum thresholds (Yi et al. 2018).

    Args:
        errors_deg: pose errors in degrees ``(P,)``, one per pair; NaN / inf count as 180.
        max_thresholds: the T of each mAP@T, positive multiples of 5 degrees.

    Returns:
        ``{"mAP5": ..., "mAP10": ..., "mAP20": ...}`` (keys follow ``max_thresholds``), floats in
        ``[0, 1]``. For example errors ``[3, 7, 12, 30]`` give accuracies 0.25, 0.5, 0.75, 0.75 at
        5, 10, 15, 20 degrees, so mAP5 = 0.25, mAP10 = 0.375, mAP20 = 0.5625.
    """
    out = {}
    for T in max_thresholds:
        if int(T) != T or T <= 0 or int(T) % MAP_STEP:
            raise ValueError(f"max_thresholds must be positive multiples of {MAP_STEP}, got {T}")
        T = int(T)
        acc = accuracy_curve(errors_deg, range(MAP_STEP, T + 1, MAP_STEP))
        out[f"mAP{T}"] = float(acc.mean())
    return out


def classification_metrics(
    pred_inlier: torch.Tensor, label: torch.Tensor, mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Precision, recall and F1 of predicted inliers against ground-truth labels, per set.

    Args:
        pred_inlier: ``(..., N)`` bool, or numbers where > 0.5 means inlier.
        label: ``(..., N)`` ground-truth labels, bool or numbers where > 0.5 means inlier.
        mask: optional ``(..., N)`` bool, True for valid (non-padding) entries.

    Returns:
        dict with ``precision``, ``recall`` and ``f1``, each ``(...)`` float64. A set with no
        predicted inliers has precision 0, a set with no true inliers has recall 0, and F1 is 0
        when precision + recall is 0 (scikit-learn's ``zero_division=0``): predicting nothing
        is never rewarded.
    """
    pred = torch.as_tensor(pred_inlier)
    lab = torch.as_tensor(label)
    if pred.shape != lab.shape or pred.dim() < 1:
        raise ValueError(
            f"pred_inlier and label must have the same shape (..., N), got {tuple(pred.shape)} "
            f"and {tuple(lab.shape)}"
        )
    pred = pred if pred.dtype == torch.bool else pred > 0.5
    lab = lab if lab.dtype == torch.bool else lab > 0.5
    if mask is not None:
        mask = torch.as_tensor(mask)
        if mask.shape != pred.shape:
            raise ValueError(f"mask must have shape {tuple(pred.shape)}, got {tuple(mask.shape)}")
        mask = mask.to(torch.bool)
        pred = pred & mask
        lab = lab & mask
    tp = (pred & lab).sum(-1).double()
    n_pred = pred.sum(-1).double()
    n_true = lab.sum(-1).double()
    precision = torch.where(n_pred > 0, tp / n_pred.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(n_true > 0, tp / n_true.clamp_min(1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-300), torch.zeros_like(tp))
    return {"precision": precision, "recall": recall, "f1": f1}
