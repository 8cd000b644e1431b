"""Training losses for correspondence classification (Yi et al. 2018, Sec. 3.3).

``loss = classification_weight * balanced_bce + essential_weight * essential_loss``, where the
essential-matrix term is switched on only after a warm-up: a random network gives near-uniform
weights, and regressing E from them early on only adds noise to the classification signal.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .essential import logits_to_weights, weighted_eight_point

__all__ = ["balanced_bce", "essential_loss", "CorrespondenceLoss"]


def _check_set_tensors(logits, labels, mask):
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (B, N), got {tuple(logits.shape)}")
    if labels.shape != logits.shape:
        raise ValueError(f"labels must have shape (B, N) = {tuple(logits.shape)}, got {tuple(labels.shape)}")
    if mask is not None and mask.shape != logits.shape:
        raise ValueError(f"mask must have shape (B, N) = {tuple(logits.shape)}, got {tuple(mask.shape)}")


def balanced_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Class-balanced binary cross-entropy over the valid items of each set.

    Inliers are rare (often < 20 %), so the positive and negative terms are averaged
    separately per set and then combined 50/50, as in Yi et al.

    Args:
        logits: ``(B, N)`` raw scores.
        labels: ``(B, N)`` 1 for inliers, 0 for outliers (float or bool).
        mask: optional ``(B, N)`` bool, False for padded items.

    Returns:
        scalar loss (mean over the batch).
    """
    _check_set_tensors(logits, labels, mask)
    labels = labels.to(logits.dtype)
    valid = torch.ones_like(labels) if mask is None else mask.to(logits.dtype)
    pos = labels * valid
    neg = (1.0 - labels) * valid
    per_item = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    # clamp_min(1): a set without any inlier (or outlier) contributes 0 for that class
    loss_pos = (per_item * pos).sum(-1) / pos.sum(-1).clamp_min(1.0)
    loss_neg = (per_item * neg).sum(-1) / neg.sum(-1).clamp_min(1.0)
    return (0.5 * (loss_pos + loss_neg)).mean()


def essential_loss(E_pred: torch.Tensor, E_gt: torch.Tensor, squared: bool = True) -> torch.Tensor:
    """Sign- and scale-invariant distance between essential matrices.

    Both are scaled to unit Frobenius norm; the loss is ``min(||E - E_gt||, ||E + E_gt||)``
    averaged over the batch. ``squared=True`` (default, Yi et al.'s form) uses squared norms,
    which equal ``2 - 2 |<E, E_gt>|`` and so are smooth where the two matrices coincide; the
    plain norm has an unbounded gradient there.

    Args:
        E_pred: ``(B, 3, 3)`` predicted essential matrices (any scale and sign).
        E_gt: ``(B, 3, 3)`` ground-truth essential matrices.

    Returns:
        scalar loss.
    """
    if E_pred.dim() != 3 or E_pred.shape[-2:] != (3, 3):
        raise ValueError(f"E_pred must have shape (B, 3, 3), got {tuple(E_pred.shape)}")
    if E_gt.shape != E_pred.shape:
        raise ValueError(f"E_gt must have shape {tuple(E_pred.shape)} like E_pred, got {tuple(E_gt.shape)}")
    e = E_pred.flatten(1)
    g = E_gt.to(e.dtype).flatten(1)
    e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    d_minus = ((e - g) ** 2).sum(-1)
    d_plus = ((e + g) ** 2).sum(-1)
    d = torch.minimum(d_minus, d_plus)
    if not squared:
        d = d.clamp_min(1e-12).sqrt()
    return d.mean()


class CorrespondenceLoss(torch.nn.Module):
    """Balanced BCE plus the essential-matrix loss after ``essential_after`` training steps.

    Args:
        classification_weight: weight of :func:`balanced_bce`.
        essential_weight: weight of :func:`essential_loss` once it is on (Yi et al.: 0.1).
        essential_after: number of steps before the essential term is switched on
            (Yi et al.: 20k; a negative value never switches it on).

    ``forward(logits, labels, mask, x1, x2, E_gt, step)`` returns ``(loss, parts)`` where
    ``parts`` holds the detached float values ``{"cls": ..., "ess": ...}`` (``ess`` is always
    computed under no_grad for logging when it is not yet part of the loss). ``logits`` may be a
    list of every stage's logits of a model with a refinement stage (``return_stages=True``):
    the loss is then the sum over stages (as in OANet) and ``parts`` are those of the last stage.
    """

    def __init__(self, classification_weight: float = 1.0, essential_weight: float = 0.1,
                 essential_after: int = 20000):
        super().__init__()
        self.classification_weight = float(classification_weight)
        self.essential_weight = float(essential_weight)
        self.essential_after = int(essential_after)

    def essential_active(self, step: int) -> bool:
        return self.essential_after >= 0 and step >= self.essential_after and self.essential_weight > 0

    def forward(self, logits, labels, mask, x1, x2, E_gt, step: int):
        if isinstance(logits, (list, tuple)):
            if not logits:
                raise ValueError("logits is an empty list of stages")
            total = 0.0
            for stage in logits:
                loss, parts = self._single(stage, labels, mask, x1, x2, E_gt, step)
                total = total + loss
            return total, parts
        return self._single(logits, labels, mask, x1, x2, E_gt, step)

    def _single(self, logits, labels, mask, x1, x2, E_gt, step: int):
        cls = balanced_bce(logits, labels, mask)
        loss = self.classification_weight * cls
        active = self.essential_active(step)
        with torch.set_grad_enabled(active and torch.is_grad_enabled()):
            E = weighted_eight_point(x1, x2, logits_to_weights(logits), mask)
            ess = essential_loss(E, E_gt)
        if active:
            loss = loss + self.essential_weight * ess
        return loss, {"cls": float(cls.detach()), "ess": float(ess.detach())}

    def extra_repr(self) -> str:
        return (f"classification_weight={self.classification_weight}, essential_weight={self.essential_weight}, "
                f"essential_after={self.essential_after}")
