"""Continuous (differentiable) and hard k-nearest-neighbour selection (Ploetz & Roth 2018, Sec. 3).

Both functions take a distance matrix ``dist`` of shape ``(..., M, O)`` (M queries, O candidates,
larger = farther) and return weights ``W`` of shape ``(..., k, M, O)`` whose row ``W[..., j, m, :]``
selects the (j+1)-th neighbour of query ``m``. A neighbour volume is then ``W @ features``.
"""
from __future__ import annotations

import math

import torch

__all__ = ["continuous_knn", "hard_knn", "log1mexp"]

_LN2 = math.log(2.0)


class _Log1mexp(torch.autograd.Function):
    """log(1 - exp(x)) for x <= 0, stable in the forward and NaN-free in the backward."""

    @staticmethod
    def forward(ctx, x):
        # Maechler (2012): expm1 is accurate near 0, log1p(-exp) far from it.
        y = torch.where(x > -_LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        # d/dx log(1 - e^x) = -1 / expm1(-x): 0 at x = -inf, unbounded at x = 0. x == 0 means the
        # softmax weight is exactly 1 in floating point, i.e. the item was selected with certainty
        # and is removed (logit -inf); like hard KNN, no gradient flows through that removal.
        saturated = x >= 0
        d = -1.0 / torch.expm1(-torch.where(saturated, torch.full_like(x, -1.0), x))
        return grad * torch.where(saturated, torch.zeros_like(d), d)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0`` (elementwise); ``-inf`` at 0 with a zero gradient there."""
    return _Log1mexp.apply(x)


def _check_inputs(dist, k, mask, name):
    if not isinstance(dist, torch.Tensor) or dist.dim() < 2:
        raise ValueError(
            f"{name}: dist must be a tensor of shape (..., M, O), got "
            f"{type(dist).__name__ if not isinstance(dist, torch.Tensor) else tuple(dist.shape)}"
        )
    if not dist.is_floating_point():
        raise ValueError(f"{name}: dist of shape (..., M, O) must be floating point, got {dist.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{name}: k must be a positive int, got {k!r}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"{name}: mask must be a bool tensor of shape (..., M, O) = {tuple(dist.shape)}")
        if mask.shape != dist.shape:
            try:
                torch.broadcast_shapes(mask.shape, dist.shape)
                ok = torch.broadcast_shapes(mask.shape, dist.shape) == dist.shape
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(
                    f"{name}: mask must have shape (..., M, O) = {tuple(dist.shape)} (or broadcast to it), "
                    f"got {tuple(mask.shape)}"
                )
            mask = mask.expand(dist.shape)
    return mask


def _temperature_tensor(temperature, dist):
    """Temperature as a tensor broadcastable to (..., M, 1)."""
    if not isinstance(temperature, torch.Tensor):
        return torch.tensor(float(temperature), dtype=dist.dtype, device=dist.device)
    if not temperature.is_floating_point():
        raise ValueError(f"continuous_knn: temperature must be floating point, got {temperature.dtype}")
    target = dist.shape[:-1] + (1,)
    try:
        ok = torch.broadcast_shapes(temperature.shape, target) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            "continuous_knn: temperature must be a float or a tensor broadcastable to "
            f"(..., M, 1) = {tuple(target)}, got {tuple(temperature.shape)}"
        )
    return temperature.to(dist.dtype)


def continuous_knn(dist: torch.Tensor, k: int, temperature: float | torch.Tensor = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Continuous deterministic relaxation of KNN selection (paper Eqs. 8-10).

    ``alpha^1 = -dist / t``, ``w^j = softmax(alpha^j)``, ``alpha^{j+1} = alpha^j + log(1 - w^j)``;
    the update is done on ``log w^j`` with a stable ``log1mexp``.

    Args:
        dist: ``(..., M, O)`` distances, larger = farther.
        k: number of neighbours.
        temperature: positive float, or tensor broadcastable to ``(..., M, 1)`` (per-query).
        mask: optional bool ``(..., M, O)``; True = allowed candidate.

    Returns:
        ``W`` of shape ``(..., k, M, O)``; each row sums to 1, except that masked candidates get
        weight exactly 0 and query ``m`` gets an all-zero row ``j`` when it has fewer than ``j + 1``
        allowed candidates. As ``t -> 0`` the rows become the one-hot vectors of hard KNN (in
        floating point the top weight rounds to exactly 1, and that item is then removed for the
        following rows, like the hard update of the paper's Eq. 5).

    Differentiable w.r.t. ``dist`` and ``temperature`` (first order; the backward is analytic and
    keeps only ``dist`` and the k weight matrices).

    Note: Eq. 9 means ``w^{j+1} = w^j (1 - w^j) / sum(w^j (1 - w^j))``. When one weight of row j
    dominates, row j + 1 therefore splits its mass about evenly between that item and the
    runner-up; the rows become the hard neighbours only once the dominant weight rounds to
    exactly 1, i.e. when the distance gaps exceed about 17 t (float32) or 37 t (float64).
    """
    mask = _check_inputs(dist, k, mask, "continuous_knn")
    t = _temperature_tensor(temperature, dist)
    return _ContinuousKNN.apply(dist, t, mask, k)


def _forward_weights(dist, t, mask, k):
    """Forward of :func:`continuous_knn` without autograd: (W (..., k, M, O), shifted distances, alive rows)."""
    zero = torch.zeros((), dtype=dist.dtype, device=dist.device)
    if mask is not None:
        count = mask.sum(-1, keepdim=True)  # (..., M, 1) allowed candidates per query
        big = torch.full((), torch.finfo(dist.dtype).max, dtype=dist.dtype, device=dist.device)
        shift = torch.where(mask, dist, big).amin(-1, keepdim=True)
        shift = torch.where(count > 0, shift, zero)
    else:
        # all O candidates allowed; rows j >= O still need the dead-row guard below
        count = None if k <= dist.shape[-1] else torch.full(dist.shape[:-1] + (1,), dist.shape[-1], device=dist.device)
        shift = dist.amin(-1, keepdim=True)
    # Softmax is invariant to a per-query shift: subtracting the nearest allowed distance changes
    # nothing mathematically but keeps -d/t and the temperature gradient d/t^2 small for the
    # entries that matter (distances up to 1e6 with t = 1e-6).
    d0 = dist - shift
    if mask is not None:
        masked_out = ~mask
        d0.masked_fill_(masked_out, 0.0)  # garbage (inf/NaN) at disallowed entries must not leak
    logits = d0 / (-t)
    if mask is not None:
        logits.masked_fill_(masked_out, float("-inf"))
    W = dist.new_empty(dist.shape[:-2] + (k,) + dist.shape[-2:])
    alive_rows = []
    # read once (one device synchronisation instead of one per step): below it every row is alive
    fewest = None if count is None or count.numel() == 0 else int(count.amin())
    for j in range(k):
        alive = None
        if fewest is not None and j >= fewest:
            # Only a query with <= j allowed candidates can have an all -inf row (a step removes at
            # most the single item of weight 1); give it a harmless row so nothing turns NaN.
            alive = count > j
            logits = torch.where(alive, logits, zero)
        alive_rows.append(alive)
        top = logits.amax(-1, keepdim=True)
        e = logits - top
        # the row maximum (all of them when tied); every other w is < 1/2
        is_top = e == 0 if j + 1 < k else None
        e.exp_()
        s = e.sum(-1, keepdim=True)
        w = W.select(-3, j)
        torch.div(e, s, out=w)
        if j + 1 < k:
            # log(1 - w) = log1mexp(log w). Off the row maximum w < 1/2 and log1p(-w) is accurate;
            # at the maximum log w = -log(s) and log(-expm1(.)) is used (Maechler 2012). A weight
            # that rounds to exactly 1 gives -inf: the item is removed, as in the hard update.
            upd = torch.log1p(torch.neg(w, out=e), out=e)
            torch.where(is_top, log1mexp(-torch.log(s)), upd, out=upd)
            logits.add_(upd)  # logits is always a fresh buffer here
        if alive is not None:
            w.masked_fill_(~alive, 0.0)
    return W, d0, alive_rows


class _ContinuousKNN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dist, t, mask, k):
        with torch.no_grad():
            W, d0, alive_rows = _forward_weights(dist, t, mask, k)
        ctx.save_for_backward(W, d0, t)
        ctx.alive_rows = alive_rows
        ctx.t_shape = t.shape
        return W

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gW):
        W, d0, t = ctx.saved_tensors
        k = W.shape[-3]
        # Reverse the recursion l^j = a^j - LSE(a^j), w^j = exp(l^j), a^{j+1} = a^j + log1mexp(l^j):
        #   g_l^j = gW^j w^j + g_a^{j+1} * d log1mexp(l^j) / dl,  d log1mexp / dl = -w / (1 - w)
        #   g_a^j = g_a^{j+1} + g_l^j - w^j sum(g_l^j)
        # A weight of exactly 1 was removed with certainty (logit -inf): no gradient through it.
        g_a = None
        for j in range(k - 1, -1, -1):
            w = W.select(-3, j)
            g_l = gW.select(-3, j) * w
            if g_a is not None:
                r = torch.sub(1.0, w)  # r = w / (1 - w), and 0 where w == 1 (removed item)
                r.masked_fill_(r <= 0, float("inf"))
                torch.div(w, r, out=r)
                g_l.addcmul_(g_a, r, value=-1.0)
                sl = g_l.sum(-1, keepdim=True)
                g_a.add_(g_l).addcmul_(w, sl, value=-1.0)
            else:
                sl = g_l.sum(-1, keepdim=True)
                g_a = g_l.addcmul_(w, sl, value=-1.0)
            alive = ctx.alive_rows[j]
            if alive is not None:
                # rows replaced by zeros in the forward pass no gradient to the real logits
                g_a.masked_fill_(~alive, 0.0)
        g_dist = g_t = None
        if ctx.needs_input_grad[1]:
            # logits = -d0 / t  ->  d logits / dt = d0 / t^2
            g_t = (torch.einsum("...o,...o->...", g_a, d0).unsqueeze(-1) / (t * t)).sum_to_size(ctx.t_shape)
        if ctx.needs_input_grad[0]:
            g_dist = g_a.div_(-t)
        return g_dist, g_t, None, None


def hard_knn(dist: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One-hot weights of the k nearest allowed candidates; ties are broken by the lower index.

    Args:
        dist: ``(..., M, O)`` distances, larger = farther.
        k: number of neighbours.
        mask: optional bool ``(..., M, O)``; True = allowed candidate.

    Returns:
        ``W`` of shape ``(..., k, M, O)`` (no gradient: selection is piecewise constant); row ``j``
        is all-zero when the query has fewer than ``j + 1`` allowed candidates.
    """
    mask = _check_inputs(dist, k, mask, "hard_knn")
    with torch.no_grad():
        key = dist.detach()
        # Disallowed entries sort after every allowed one, including allowed +inf distances.
        key = torch.nan_to_num(key, nan=torch.finfo(key.dtype).max, posinf=torch.finfo(key.dtype).max)
        if mask is not None:
            key = key.masked_fill(~mask, float("inf"))
        kk = min(k, dist.shape[-1])
        idx = torch.sort(key, dim=-1, stable=True).indices[..., :kk]  # (..., M, kk)
        W = torch.zeros(dist.shape[:-2] + (k,) + dist.shape[-2:], dtype=dist.dtype, device=dist.device)
        Wk = W.narrow(-3, 0, kk)
        Wk.scatter_(-1, idx.movedim(-1, -2).unsqueeze(-1), 1.0)
        if mask is not None:
            count = mask.sum(-1)  # (..., M)
            j = torch.arange(k, device=dist.device).view((k, 1))
            W.mul_((j < count.unsqueeze(-2)).unsqueeze(-1).to(W.dtype))
    return W
