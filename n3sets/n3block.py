"""The N3 block for point sets (Ploetz & Roth 2018, Sec. 4): global continuous KNN over each set.

An embedding network and a temperature network (1x1 convolutions) map the input ``x (B, C, N)``
to an embedding ``(B, E, N)`` and one temperature per item ``(B, N)``. For every item the other
valid items of the same set are the candidates; the squared Euclidean distances in the embedding
go through :func:`n3sets.knn.continuous_knn` and the k weight rows aggregate the block *input*
into k neighbour volumes, which are concatenated to the input: ``(B, (k + 1) * C, N)``.

Two execution paths give the same result:

* ``impl="dense"``: the whole ``(B, N, N)`` distance matrix and the k weight matrices are built
  and kept for the backward by ordinary autograd (peak memory ~ (3k + 8) * B * N^2 floats).
* ``impl="chunked"``: queries in chunks of ``chunk_size``; a custom autograd function saves only
  its inputs (embedding, temperatures, x, mask) and recomputes each chunk's weights in the
  backward (memory ~ B * N * chunk_size).

Both call the same per-chunk code, so they differ only in what is kept for the backward.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .knn import continuous_knn, hard_knn

__all__ = ["N3Block", "HardKNNBlock", "pairwise_sq_dist", "n3_aggregate"]

# impl="auto" uses the dense path while B * N * N is at most this many entries: the dense path
# peaks at ~20 float buffers of that size (k=4; ~80 MiB at 2^20 entries). Measured on CPU, dense is
# faster up to about N = 1000 per set; beyond, its N x N buffers leave the caches and chunked wins.
AUTO_DENSE_MAX_ENTRIES = 1 << 20

# Chunked path: queries per chunk chosen so that one chunk's matrices hold about this many entries
# (small enough to stay cache-friendly, large enough to amortise per-chunk overhead).
AUTO_CHUNK_ENTRIES = 1 << 20


def pairwise_sq_dist(query: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between ``query (B, E, Q)`` and ``cand (B, E, N)`` -> ``(B, Q, N)``."""
    # |q|^2 + |c|^2 - 2 q.c in one batched GEMM; clamp the small negatives that cancellation yields.
    qq = (query * query).sum(1).unsqueeze(-1)  # (B, Q, 1)
    cc = (cand * cand).sum(1).unsqueeze(-2)  # (B, 1, N)
    return torch.baddbmm(qq + cc, query.transpose(1, 2), cand, alpha=-2.0).clamp_min_(0.0)


def _candidate_mask(valid: torch.Tensor | None, start: int, stop: int, n: int, batch: int, device) -> torch.Tensor:
    """(B, Q, N) bool: valid candidates of the same set, the query item itself excluded."""
    q = torch.arange(start, stop, device=device).unsqueeze(-1)
    not_self = q != torch.arange(n, device=device).unsqueeze(0)  # (Q, N)
    if valid is None:
        return not_self.unsqueeze(0).expand(batch, -1, -1)
    return not_self.unsqueeze(0) & valid.unsqueeze(1)


def _chunk_weights(emb, temp, valid, start, stop, k, relaxation):
    """KNN weights ``(B, k, Q, N)`` of the queries ``start:stop`` over all items of their set."""
    B, _, N = emb.shape
    dist = pairwise_sq_dist(emb[:, :, start:stop], emb)  # (B, Q, N)
    cmask = _candidate_mask(valid, start, stop, N, B, emb.device)
    if relaxation == "hard":
        return hard_knn(dist, k, cmask)
    return continuous_knn(dist, k, temp[:, start:stop].unsqueeze(-1), cmask)


def _aggregate(W, x):
    """``vol[b, j, c, q] = sum_o W[b, j, q, o] x[b, c, o]``: ``(B, k, Q, N), (B, C, N) -> (B, k, C, Q)``."""
    # one GEMM on the contiguous W: no copy of the k weight matrices, forward or backward
    B, k, Q, N = W.shape
    vol = torch.bmm(W.reshape(B, k * Q, N), x.transpose(1, 2))  # (B, k*Q, C)
    return vol.view(B, k, Q, -1).transpose(-1, -2)


def _chunk_volumes(emb, temp, x, valid, start, stop, k, relaxation):
    """Neighbour volumes ``(B, k, C, Q)`` of the queries ``start:stop``."""
    return _aggregate(_chunk_weights(emb, temp, valid, start, stop, k, relaxation), x)


class _ChunkedVolumes(torch.autograd.Function):
    """Neighbour volumes computed chunk by chunk; the backward recomputes each chunk's weights."""

    @staticmethod
    def forward(ctx, emb, temp, x, valid, k, chunk, relaxation):
        B, C, N = x.shape
        out = x.new_empty(B, k, C, N)
        with torch.no_grad():
            for s in range(0, N, chunk):
                e = min(s + chunk, N)
                out[..., s:e] = _chunk_volumes(emb, temp, x, valid, s, e, k, relaxation)
        ctx.save_for_backward(emb, temp, x, valid)
        ctx.k, ctx.chunk, ctx.relaxation = k, chunk, relaxation
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        emb, temp, x, valid = ctx.saved_tensors
        k, chunk, relaxation = ctx.k, ctx.chunk, ctx.relaxation
        need_emb, need_temp, need_x = ctx.needs_input_grad[:3]
        if relaxation == "hard":
            need_emb = need_temp = False  # the selection is piecewise constant
        B, C, N = x.shape
        g_emb = torch.zeros_like(emb) if need_emb else None
        g_temp = torch.zeros_like(temp) if need_temp else None
        g_x = torch.zeros_like(x) if need_x else None
        emb_ = emb.detach().requires_grad_(need_emb)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            Q = e - s
            g_vol = grad_out[..., s:e]  # (B, k, C, Q)
            with torch.enable_grad():
                temp_ = temp
                if need_temp:
                    # only this chunk's temperatures enter its rows: give them their own leaf
                    t_chunk = temp[:, s:e].detach().requires_grad_(True)
                    temp_ = torch.cat([temp[:, :s].detach(), t_chunk, temp[:, e:].detach()], dim=1)
                W = _chunk_weights(emb_, temp_, valid, s, e, k, relaxation)  # (B, k, Q, N)
            # The aggregation is bilinear, so its gradients are two GEMMs and the volumes
            # themselves need not be recomputed.
            if need_x:
                g_x += torch.bmm(g_vol.permute(0, 2, 1, 3).reshape(B, C, k * Q), W.detach().reshape(B, k * Q, N))
            leaves = ([emb_] if need_emb else []) + ([t_chunk] if need_temp else [])
            if leaves:
                g_W = torch.bmm(g_vol.transpose(-1, -2).reshape(B, k * Q, C), x).view(B, k, Q, N)
                grads = list(torch.autograd.grad(W, leaves, g_W, allow_unused=True))
                if need_emb:
                    gi = grads.pop(0)
                    if gi is not None:
                        g_emb += gi
                if need_temp:
                    gi = grads.pop(0)
                    if gi is not None:
                        g_temp[:, s:e] = gi
        return g_emb, g_temp, g_x, None, None, None, None


def n3_aggregate(
    x: torch.Tensor,
    emb: torch.Tensor,
    temperature: torch.Tensor | None,
    k: int,
    mask: torch.Tensor | None = None,
    impl: str = "dense",
    chunk_size: int | None = None,
    relaxation: str = "continuous",
) -> torch.Tensor:
    """k neighbour volumes of every item of every set.

    Args:
        x: ``(B, C, N)`` features to aggregate.
        emb: ``(B, E, N)`` embedding in which distances (squared Euclidean) are measured.
        temperature: ``(B, N)`` positive per-item temperatures (ignored for ``relaxation="hard"``).
        k: number of neighbours.
        mask: optional ``(B, N)`` bool, True = valid item; padded items are never candidates.
        impl: ``"dense"`` or ``"chunked"`` (same values and gradients).
        chunk_size: queries per chunk for ``"chunked"`` (None: AUTO_CHUNK_ENTRIES // (B * N)).
        relaxation: ``"continuous"`` (paper Eqs. 8-10) or ``"hard"`` (KNN, no gradient through selection).

    Returns:
        ``(B, k, C, N)`` neighbour volumes.
    """
    B, C, N = x.shape
    if mask is not None:
        # Padded features never reach a volume (0 * NaN would still be NaN).
        x = torch.where(mask.unsqueeze(1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    if relaxation == "hard":
        temperature = None
    if impl == "dense":
        return _chunk_volumes(emb, temperature, x, mask, 0, N, k, relaxation)
    if impl != "chunked":
        raise ValueError(f"impl must be 'dense' or 'chunked', got {impl!r}")
    chunk = chunk_size or max(1, min(N, AUTO_CHUNK_ENTRIES // max(1, B * N)))
    if temperature is None:
        temperature = emb.new_ones(B, N)  # unused by the hard path, keeps the saved tensors uniform
    return _ChunkedVolumes.apply(emb, temperature, x, mask, k, int(chunk), relaxation)


def _mlp(in_channels: int, hidden: int, out_channels: int, depth: int, norm: str) -> nn.ModuleList:
    """1x1-conv MLP of ``depth`` layers; hidden layers followed by (masked) batch norm and ReLU."""
    layers = nn.ModuleList()
    c = in_channels
    for i in range(depth):
        last = i == depth - 1
        layers.append(nn.Conv1d(c, out_channels if last else hidden, 1))
        if not last:
            if norm == "batch":
                from .models import MaskedBatchNorm1d  # owned by the models module; imported lazily

                layers.append(MaskedBatchNorm1d(hidden))
            layers.append(nn.ReLU())
        c = hidden
    return layers


def _run_mlp(layers: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    for layer in layers:
        if isinstance(layer, nn.BatchNorm1d):
            x = layer(x, mask)
        else:
            x = layer(x)
    return x


class N3Block(nn.Module):
    """Neural nearest neighbours block for sets: ``(B, C, N) -> (B, (k + 1) * C, N)``.

    Configuration (``default_conf`` merged with keyword arguments):

    * ``k``: neighbours per item.
    * ``embed_channels``, ``embed_hidden``, ``embed_depth``: embedding MLP (1x1 convs);
      ``embed_depth=0`` measures distances in the input features (identity embedding).
    * ``temp_hidden``, ``temp_depth``: temperature MLP; its output is a log-temperature,
      ``t = exp(clamp(out + log(init_temperature), log(min_temperature), log(max_temperature)))``.
      The last layer starts at zero, so every item starts at ``init_temperature``.
    * ``norm``: ``"batch"`` (masked batch norm between hidden layers) or ``"none"``.
    * ``impl``: ``"dense"``, ``"chunked"`` or ``"auto"`` (dense while ``B * N * N`` is at most
      ``auto_dense_max`` entries, default 2^20).
    * ``chunk_size``: queries per chunk of the chunked path (None: 2^20 // (B * N), at least 1).
    * ``relaxation``: ``"continuous"`` (paper) or ``"hard"`` (hard KNN ablation: no gradient
      through the selection, but the volumes still pass gradient to ``x``).

    Distances are *squared* Euclidean in the embedding: the same neighbour ranking as Euclidean,
    one GEMM, and no infinite sqrt gradient at duplicate points; the learned temperature absorbs
    the scale.
    """

    default_conf = {
        "k": 4,
        "embed_channels": 32,
        "embed_hidden": 64,
        "embed_depth": 3,
        "temp_hidden": 64,
        "temp_depth": 3,
        "norm": "batch",
        "init_temperature": 1.0,
        "min_temperature": 1e-4,
        "max_temperature": 1e4,
        "impl": "auto",
        "chunk_size": None,
        "auto_dense_max": AUTO_DENSE_MAX_ENTRIES,
        "relaxation": "continuous",
    }

    def __init__(self, in_channels: int, **kwargs):
        super().__init__()
        unknown = set(kwargs) - set(self.default_conf)
        if unknown:
            raise ValueError(f"N3Block: unknown options {sorted(unknown)}; known: {sorted(self.default_conf)}")
        conf = {**self.default_conf, **kwargs}
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if isinstance(conf["k"], bool) or not isinstance(conf["k"], int) or conf["k"] < 1:
            raise ValueError(f"k must be a positive int, got {conf['k']!r}")
        if conf["impl"] not in ("auto", "dense", "chunked"):
            raise ValueError(f"impl must be 'auto', 'dense' or 'chunked', got {conf['impl']!r}")
        if conf["relaxation"] not in ("continuous", "hard"):
            raise ValueError(f"relaxation must be 'continuous' or 'hard', got {conf['relaxation']!r}")
        if conf["norm"] not in ("batch", "none"):
            raise ValueError(f"norm must be 'batch' or 'none', got {conf['norm']!r}")
        if conf["embed_depth"] < 0 or conf["temp_depth"] < 1:
            raise ValueError("embed_depth must be >= 0 and temp_depth >= 1")
        if conf["chunk_size"] is not None and conf["chunk_size"] < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {conf['chunk_size']!r}")
        self.in_channels = in_channels
        self.conf = conf
        self.k = conf["k"]
        self.out_channels = (self.k + 1) * in_channels
        if conf["embed_depth"] > 0:
            self.embed = _mlp(in_channels, conf["embed_hidden"], conf["embed_channels"], conf["embed_depth"], conf["norm"])
        else:
            self.embed = nn.ModuleList()  # identity: KNN in the input feature space
        if conf["relaxation"] == "continuous":
            self.temperature = _mlp(in_channels, conf["temp_hidden"], 1, conf["temp_depth"], conf["norm"])
        else:
            self.temperature = None
        self.reset_parameters()

    def reset_parameters(self):
        """Default init for every layer; the temperature head starts at ``init_temperature``."""
        for layer in list(self.embed) + (list(self.temperature) if self.temperature is not None else []):
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
        if self.temperature is not None:
            last = self.temperature[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def extra_repr(self) -> str:
        c = self.conf
        return (
            f"in_channels={self.in_channels}, k={c['k']}, embed_channels={c['embed_channels']}, "
            f"embed_depth={c['embed_depth']}, temp_depth={c['temp_depth']}, norm={c['norm']!r}, "
            f"impl={c['impl']!r}, chunk_size={c['chunk_size']}, relaxation={c['relaxation']!r}"
        )

    def _check(self, x, mask):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != self.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"N3Block: x must have shape (B, {self.in_channels}, N), got {got}")
        if not x.is_floating_point():
            raise ValueError(f"N3Block: x of shape (B, C, N) must be floating point, got {x.dtype}")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.shape != (x.shape[0], x.shape[2]):
                got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"N3Block: mask must have shape (B, N) = {(x.shape[0], x.shape[2])}, got {got}")
            if mask.dtype != torch.bool:
                raise ValueError(f"N3Block: mask of shape (B, N) must be bool, got {mask.dtype}")

    def resolve_impl(self, batch: int, n: int) -> str:
        """The execution path ``impl="auto"`` picks for ``batch`` sets of ``n`` items."""
        if self.conf["impl"] != "auto":
            return self.conf["impl"]
        return "dense" if batch * n * n <= self.conf["auto_dense_max"] else "chunked"

    def embedding(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, E, N)`` embedding in which the distances are measured."""
        return _run_mlp(self.embed, x, mask)

    def temperatures(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, N)`` positive temperature per item."""
        c = self.conf
        log_t = _run_mlp(self.temperature, x, mask).squeeze(1) + math.log(c["init_temperature"])
        return torch.exp(log_t.clamp(math.log(c["min_temperature"]), math.log(c["max_temperature"])))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, C, N)``, ``mask (B, N)`` bool (True = valid) -> ``(B, (k + 1) * C, N)``.

        Output channels are ``[x, vol_1, ..., vol_k]``. Padded items are no candidates; their own
        output rows are finite but meaningless.
        """
        self._check(x, mask)
        B, C, N = x.shape
        if mask is not None:
            x = torch.where(mask.unsqueeze(1), x, torch.zeros((), dtype=x.dtype, device=x.device))
        emb = self.embedding(x, mask)
        temp = self.temperatures(x, mask) if self.temperature is not None else None
        vol = n3_aggregate(
            x, emb, temp, self.k, mask,
            impl=self.resolve_impl(B, N), chunk_size=self.conf["chunk_size"], relaxation=self.conf["relaxation"],
        )
        return torch.cat([x, vol.reshape(B, self.k * C, N)], dim=1)

    def forward_flat(self, x: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """torch-geometric style input: ``x (sumN, C)``, ``batch (sumN,)`` -> ``(sumN, (k + 1) * C)``."""
        from .batching import to_dense_sets, to_flat_sets

        dense, mask = to_dense_sets(x, batch)
        return to_flat_sets(self(dense, mask), mask)


class HardKNNBlock(N3Block):
    """The paper's KNN ablation: :class:`N3Block` with ``relaxation="hard"`` (no temperature network)."""

    default_conf = {**N3Block.default_conf, "relaxation": "hard"}
