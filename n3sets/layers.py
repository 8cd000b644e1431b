"""Layers shared by the set models and the N3 blocks: masked batch norm, context norm, 1x1-conv
MLPs and the positive temperature head.

They live apart from :mod:`n3sets.models` and :mod:`n3sets.n3block` so that the blocks, the
correspondence models and the image models (:mod:`n3images`) import them without importing
each other.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["context_norm", "MaskedBatchNorm1d", "mlp", "run_mlp", "positive_temperature"]


def context_norm(x: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-3) -> torch.Tensor:
    """Context normalization: per-set, per-channel normalization over the valid items.

    Args:
        x: ``(B, C, N)`` features.
        mask: optional ``(B, N)`` bool, True for valid items.
        eps: added to the variance (Yi et al. use 1e-3; it also keeps sets of one item finite).

    Returns:
        ``(B, C, N)``; padded positions are set to 0.
    """
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, C, N), got {tuple(x.shape)}")
    if mask is None:
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + eps)
    if mask.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"mask must have shape (B, N) = {(x.shape[0], x.shape[2])}, got {tuple(mask.shape)}")
    valid = mask.unsqueeze(1)                                            # (B, 1, N)
    count = valid.sum(-1, keepdim=True).clamp_min(1).to(x.dtype)
    # padded items may hold anything (even inf/NaN, and 0 * inf = NaN): select, never multiply
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    xm = torch.where(valid, x, zero)
    mean = xm.sum(-1, keepdim=True) / count
    centered = torch.where(valid, x - mean, zero)
    var = (centered ** 2).sum(-1, keepdim=True) / count
    return centered * torch.rsqrt(var + eps)


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over ``(B, C, N)`` whose training statistics use the valid items only.

    In eval mode the running statistics are applied per item, so padding cannot matter; in
    training mode the batch mean/variance are taken over all valid items of all sets (padded
    items would otherwise pull them towards whatever the padding holds). State-dict compatible
    with :class:`torch.nn.BatchNorm1d`.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None or not self.training or not self.track_running_stats:
            out = super().forward(x)
            return out if mask is None else out * mask.unsqueeze(1).to(out.dtype)
        m = mask.unsqueeze(1).to(x.dtype)
        count = m.sum().clamp_min(1.0)
        mean = (x * m).sum((0, 2)) / count
        var = (((x - mean[None, :, None]) * m) ** 2).sum((0, 2)) / count
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            unbiased = var * (count / (count - 1.0).clamp_min(1.0))
            self.running_mean.mul_(1 - momentum).add_(momentum * mean)
            self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
        out = (x - mean[None, :, None]) * torch.rsqrt(var[None, :, None] + self.eps)
        if self.affine:
            out = out * self.weight[None, :, None] + self.bias[None, :, None]
        return out * m


def mlp(in_channels: int, hidden: int, out_channels: int, depth: int, norm: str) -> nn.ModuleList:
    """1x1-conv MLP of ``depth`` layers; hidden layers followed by (masked) batch norm and ReLU."""
    layers = nn.ModuleList()
    c = in_channels
    for i in range(depth):
        last = i == depth - 1
        layers.append(nn.Conv1d(c, out_channels if last else hidden, 1))
        if not last:
            if norm == "batch":
                layers.append(MaskedBatchNorm1d(hidden))
            layers.append(nn.ReLU())
        c = hidden
    return layers


def run_mlp(layers: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Apply :func:`mlp` layers to ``x (B, C, N)``; batch norms see the valid items only."""
    for layer in layers:
        if isinstance(layer, nn.BatchNorm1d):
            x = layer(x, mask)
        else:
            x = layer(x)
    return x


def positive_temperature(raw: torch.Tensor, init_temperature: float = 1.0, min_temperature: float = 0.0,
                         max_temperature: float = math.inf) -> torch.Tensor:
    """Temperature head: ``exp(raw + log(init_temperature))``, clamped to ``[min, max]`` in log space.

    A temperature network whose last layer outputs 0 thus starts at ``init_temperature``; the
    paper's image block is ``init_temperature=0.1`` without bounds (``exp(raw) * 0.1``).
    """
    log_t = raw + math.log(init_temperature)
    if min_temperature > 0 or math.isfinite(max_temperature):
        lo = math.log(min_temperature) if min_temperature > 0 else None
        hi = math.log(max_temperature) if math.isfinite(max_temperature) else None
        log_t = log_t.clamp(lo, hi)
    return torch.exp(log_t)
