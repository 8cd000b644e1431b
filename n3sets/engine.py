"""The N3 engine: k continuous nearest-neighbour volumes for any candidate layout (Ploetz & Roth 2018).

Given query embeddings ``(B, E, Q)``, candidate embeddings ``(B, E, N)``, candidate features
``(B, F, N)``, per-query temperatures ``(B, Q)`` and ``k``, :func:`neighbour_volumes` measures the
squared Euclidean distance from each query to its candidates, turns each row into k relaxed
one-hot weight vectors with :func:`n3sets.knn.continuous_knn` (or :func:`n3sets.knn.hard_knn`)
and returns the k weighted sums of candidate features, ``(B, k, F, Q)``.

Which items are a query's candidates is the *layout*:

* :class:`GlobalCandidates` -- every valid item of the set, the query itself excluded (the queries
  are the items; the set block, :class:`n3sets.N3Block`);
* :class:`IndexedCandidates` -- an index tensor ``(Q, O)`` of candidate items per query with a
  validity mask, e.g. the patches of a search window around each patch. Only the ``Q x O``
  distances are formed, never ``Q x N``;
* :class:`BlockedCandidates` -- the same per-query candidates given per block of queries as the
  union of their candidates plus a mask, so that a block is dense GEMMs (the image block,
  :class:`n3images.N3Block2d`: neighbouring patches share most of their search window).

Two execution paths give the same values and gradients:

* ``impl="dense"``: all queries at once, kept for the backward by ordinary autograd;
* ``impl="chunked"``: queries in chunks; a custom autograd function saves only its inputs and
  recomputes each chunk's weights in the backward, so memory grows with the chunk, not with Q.

Both call the same per-chunk code of the layout, so they differ only in what is kept.
"""
from __future__ import annotations

import torch

from .knn import continuous_knn, hard_knn

__all__ = ["neighbour_volumes", "GlobalCandidates", "IndexedCandidates", "BlockedCandidates", "pairwise_sq_dist",
           "AUTO_DENSE_MAX_ENTRIES", "AUTO_CHUNK_ENTRIES", "AUTO_GATHER_ENTRIES"]

# GlobalCandidates, impl="auto": dense while B * N * N is at most this many entries. The dense path
# peaks at ~20 float buffers of that size (k=4; ~80 MiB at 2^20 entries). Measured on CPU, dense is
# faster up to about N = 1000 per set; beyond, its N x N buffers leave the caches and chunked wins.
AUTO_DENSE_MAX_ENTRIES = 1 << 20

# GlobalCandidates, chunked: queries per chunk chosen so that one chunk's matrices hold about this
# many entries (small enough to stay cache-friendly, large enough to amortise per-chunk overhead).
AUTO_CHUNK_ENTRIES = 1 << 20

# IndexedCandidates: one chunk gathers (B, Q_chunk, O, max(E, F)) floats; about this many (16 MiB).
# Measured on CPU: gathers much beyond this get slower per byte (fresh pages for every chunk).
AUTO_GATHER_ENTRIES = 1 << 22


def pairwise_sq_dist(query: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between ``query (B, E, Q)`` and ``cand (B, E, N)`` -> ``(B, Q, N)``."""
    # |q|^2 + |c|^2 - 2 q.c in one batched GEMM; clamp the small negatives that cancellation yields.
    qq = (query * query).sum(1).unsqueeze(-1)  # (B, Q, 1)
    cc = (cand * cand).sum(1).unsqueeze(-2)  # (B, 1, N)
    return torch.baddbmm(qq + cc, query.transpose(1, 2), cand, alpha=-2.0).clamp_min_(0.0)


def _ranges(Q, chunk):
    if chunk is None:
        return [(0, Q)]
    return [(s, min(s + chunk, Q)) for s in range(0, Q, chunk)]


def _select(dist, temp, mask, k, relaxation):
    """KNN weights ``(B, k, Q, O)`` of distances ``(B, Q, O)``; ``temp (B, Q)``."""
    if relaxation == "hard":
        return hard_knn(dist, k, mask)
    return continuous_knn(dist, k, temp.unsqueeze(-1), mask)


class GlobalCandidates:
    """Every valid item of the same set is a candidate; the query item itself is excluded.

    The queries are the items (``Q == N``, query and candidate embeddings the same tensor).

    Args:
        valid: optional ``(B, N)`` bool, True = real item; padded items are never candidates.
    """

    def __init__(self, valid: torch.Tensor | None = None):
        self.valid = valid

    def check(self, query: torch.Tensor, cand: torch.Tensor, feat: torch.Tensor) -> None:
        if query.shape[-1] != cand.shape[-1]:
            raise ValueError(f"GlobalCandidates: queries are the items, got Q={query.shape[-1]} and N={cand.shape[-1]}")
        if self.valid is not None and self.valid.shape != (cand.shape[0], cand.shape[-1]):
            raise ValueError(f"GlobalCandidates: valid must have shape (B, N) = {(cand.shape[0], cand.shape[-1])}, "
                             f"got {tuple(self.valid.shape)}")

    def auto_chunk(self, B: int, Q: int, N: int, E: int, F: int) -> int | None:
        return max(1, min(Q, AUTO_CHUNK_ENTRIES // max(1, B * N)))

    def chunks(self, Q: int, chunk: int | None) -> list[tuple[int, int]]:
        """Query ranges ``(start, stop)`` of the chunked path (``chunk=None``: one range, the dense path)."""
        return _ranges(Q, chunk)

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """Tensors stay ``(B, X, N)``."""
        return x

    @staticmethod
    def unprepare(g: torch.Tensor) -> torch.Tensor:
        return g

    def mask(self, start: int, stop: int, n: int, batch: int, device: torch.device) -> torch.Tensor:
        """(B, Q, N) bool: valid candidates of the same set, the query item itself excluded."""
        q = torch.arange(start, stop, device=device).unsqueeze(-1)
        not_self = q != torch.arange(n, device=device).unsqueeze(0)  # (Q, N)
        if self.valid is None:
            return not_self.unsqueeze(0).expand(batch, -1, -1)
        return not_self.unsqueeze(0) & self.valid.unsqueeze(1)

    def distances(self, query: torch.Tensor, cand: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, Q_chunk, N)`` squared distances of the queries ``start:stop`` and their candidate mask."""
        dist = pairwise_sq_dist(query[:, :, start:stop], cand)  # (B, Q, N)
        return dist, self.mask(start, stop, cand.shape[-1], cand.shape[0], cand.device)

    def weights(self, query: torch.Tensor, cand: torch.Tensor, temp: torch.Tensor | None, start: int, stop: int, k: int,
                relaxation: str) -> torch.Tensor:
        """KNN weights ``(B, k, Q_chunk, N)`` of the queries ``start:stop`` over all items of their set."""
        dist, mask = self.distances(query, cand, start, stop)
        return _select(dist, None if temp is None else temp[:, start:stop], mask, k, relaxation)

    def aggregate(self, W: torch.Tensor, feat: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``vol[b, j, f, q] = sum_o W[b, j, q, o] feat[b, f, o]``: ``(B, k, Q, N), (B, F, N) -> (B, k, F, Q)``."""
        # one GEMM on the contiguous W: no copy of the k weight matrices, forward or backward
        B, k, Q, N = W.shape
        vol = torch.bmm(W.reshape(B, k * Q, N), feat.transpose(1, 2))  # (B, k*Q, F)
        return vol.view(B, k, Q, -1).transpose(-1, -2)

    def add_feat_grad(self, g_feat: torch.Tensor, W: torch.Tensor, g_vol: torch.Tensor, start: int, stop: int) -> None:
        B, k, Q, N = W.shape
        g_feat += torch.bmm(g_vol.permute(0, 2, 1, 3).reshape(B, -1, k * Q), W.reshape(B, k * Q, N))

    def weight_grad(self, g_vol: torch.Tensor, feat: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        B, k, F, Q = g_vol.shape
        return torch.bmm(g_vol.transpose(-1, -2).reshape(B, k * Q, F), feat).view(B, k, Q, -1)


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x (B, N, D)``, ``idx (Q, O)`` -> ``(B, Q, O, D)`` rows ``x[b, idx[q, o]]`` (one index_select)."""
    B, N, D = x.shape
    flat = (torch.arange(B, device=idx.device).view(B, 1) * N + idx.reshape(1, -1)).reshape(-1)
    return x.reshape(B * N, D).index_select(0, flat).view(B, idx.shape[0], idx.shape[1], D)


class IndexedCandidates:
    """Query ``q``'s candidates are the items ``index[q, :]`` where ``valid[q, :]`` is True.

    Args:
        index: ``(Q, O)`` long, candidate item of each of the O slots of each query (any index in
            ``[0, N)`` where the slot is invalid).
        valid: ``(Q, O)`` bool, True = a real candidate (the same for every batch element).

    Internally embeddings and features are kept item-major, ``(B, N, E)``, so that gathering a
    query's candidates copies contiguous rows and the per-query products are batched GEMMs.
    """

    def __init__(self, index: torch.Tensor, valid: torch.Tensor):
        if index.dim() != 2 or index.dtype != torch.long:
            raise ValueError(f"IndexedCandidates: index must be a long tensor (Q, O), got {index.dtype} {tuple(index.shape)}")
        if valid.shape != index.shape or valid.dtype != torch.bool:
            raise ValueError(f"IndexedCandidates: valid must be bool of shape {tuple(index.shape)}, "
                             f"got {valid.dtype} {tuple(valid.shape)}")
        self.index, self.valid = index, valid

    def check(self, query: torch.Tensor, cand: torch.Tensor, feat: torch.Tensor) -> None:
        if self.index.shape[0] != query.shape[-1]:
            raise ValueError(f"IndexedCandidates: index has {self.index.shape[0]} rows for Q={query.shape[-1]} queries")
        if self.index.numel() and (int(self.index.min()) < 0 or int(self.index.max()) >= cand.shape[-1]):
            raise ValueError(f"IndexedCandidates: index values must lie in [0, N={cand.shape[-1]})")

    def auto_chunk(self, B: int, Q: int, N: int, E: int, F: int) -> int | None:
        return max(1, min(Q, AUTO_GATHER_ENTRIES // max(1, B * self.index.shape[1] * max(E, F))))

    def chunks(self, Q: int, chunk: int | None) -> list[tuple[int, int]]:
        return _ranges(Q, chunk)

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """``(B, X, N)`` -> the item-major ``(B, N, X)`` the per-chunk methods take."""
        return x.transpose(1, 2).contiguous()

    @staticmethod
    def unprepare(g: torch.Tensor) -> torch.Tensor:
        return g.transpose(1, 2)

    def distances(self, query: torch.Tensor, cand: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, Q_chunk, O)`` squared distances of the queries ``start:stop`` to their slots, and the slot mask.

        ``query (B, Q, E)``, ``cand (B, N, E)`` (prepared).
        """
        idx = self.index[start:stop]  # (Qc, O)
        q = query[:, start:stop]  # (B, Qc, E)
        c = _gather_rows(cand, idx)  # (B, Qc, O, E)
        # |q|^2 + |c|^2 - 2 q.c as for the global layout; the gathered candidates are read once
        dot = torch.matmul(c, q.unsqueeze(-1)).squeeze(-1)  # (B, Qc, O)
        cc = (cand * cand).sum(-1)[:, idx]  # (B, Qc, O): norms of the N items, cheaper than of the gather
        qq = (q * q).sum(-1).unsqueeze(-1)  # (B, Qc, 1)
        dist = (qq + cc).sub_(dot, alpha=2.0).clamp_min_(0.0)
        return dist, self.valid[start:stop].unsqueeze(0).expand_as(dist)

    def weights(self, query: torch.Tensor, cand: torch.Tensor, temp: torch.Tensor | None, start: int, stop: int, k: int,
                relaxation: str) -> torch.Tensor:
        """KNN weights ``(B, k, Q_chunk, O)`` of the queries ``start:stop`` over their candidate slots."""
        dist, mask = self.distances(query, cand, start, stop)
        return _select(dist, None if temp is None else temp[:, start:stop], mask, k, relaxation)

    def aggregate(self, W: torch.Tensor, feat: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``vol[b, j, f, q] = sum_o W[b, j, q, o] feat[b, index[q, o], f]`` -> ``(B, k, F, Q_chunk)``."""
        f = _gather_rows(feat, self.index[start:stop])  # (B, Qc, O, F)
        return torch.matmul(W.transpose(1, 2), f).permute(0, 2, 3, 1)  # (B, Qc, k, F) -> (B, k, F, Qc)

    def add_feat_grad(self, g_feat: torch.Tensor, W: torch.Tensor, g_vol: torch.Tensor, start: int, stop: int) -> None:
        idx = self.index[start:stop]
        g = torch.matmul(W.permute(0, 2, 3, 1), g_vol.permute(0, 3, 1, 2))  # (B, Qc, O, F)
        g_feat.index_add_(1, idx.reshape(-1), g.reshape(g.shape[0], -1, g.shape[-1]))

    def weight_grad(self, g_vol: torch.Tensor, feat: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        f = _gather_rows(feat, self.index[start:stop])  # (B, Qc, O, F)
        return torch.matmul(g_vol.permute(0, 3, 1, 2), f.transpose(-1, -2)).transpose(1, 2)  # (B, k, Qc, O)


class BlockedCandidates:
    """Candidates given per block of consecutive queries: the union of their candidates and a mask.

    Block ``i`` covers queries ``starts[i]:starts[i+1]``; its candidates are the items
    ``members[i]`` ``(U_i,)`` and ``masks[i]`` ``(Q_i, U_i)`` says which of them each query may
    take. This is the same relaxation as :class:`IndexedCandidates` over the allowed candidates, but
    a block's distances and aggregation are dense GEMMs against the union instead of per-query
    gathers: the fast layout for overlapping windows (neighbouring image patches share most of
    their search window). The blocks are the chunks of the chunked path.

    Args:
        starts: block boundaries ``[0, ..., Q]`` (list of ints).
        members: list of ``(U_i,)`` long tensors, candidate items of each block.
        masks: list of ``(Q_i, U_i)`` bool tensors.
    """

    def __init__(self, starts: list[int], members: list[torch.Tensor], masks: list[torch.Tensor]):
        if len(starts) != len(members) + 1 or len(members) != len(masks) or starts[0] != 0:
            raise ValueError("BlockedCandidates: need starts [0, ..., Q] and one members/mask per block")
        for i, (m, mk) in enumerate(zip(members, masks)):
            if m.dim() != 1 or m.dtype != torch.long:
                raise ValueError(f"BlockedCandidates: members[{i}] must be a 1-D long tensor, got {m.dtype} {tuple(m.shape)}")
            if mk.dtype != torch.bool or mk.shape != (starts[i + 1] - starts[i], m.numel()):
                raise ValueError(f"BlockedCandidates: masks[{i}] must be bool of shape "
                                 f"{(starts[i + 1] - starts[i], m.numel())}, got {mk.dtype} {tuple(mk.shape)}")
        self.starts, self.members, self.masks = list(starts), members, masks
        self._block = {s: i for i, s in enumerate(self.starts[:-1])}
        # the members' range, read once here: check() runs on every forward, and a per-block
        # min / max there is two device synchronisations per block on a GPU
        nonempty = [m for m in members if m.numel()]
        both = torch.cat(nonempty) if nonempty else None
        self._range = (int(both.min()), int(both.max())) if both is not None else None
        self._group_cache: dict = {}  # chunk -> groups (see _groups)
        self._by_range: dict = {}  # (start, stop) -> (members, mask) of every group built so far

    def check(self, query: torch.Tensor, cand: torch.Tensor, feat: torch.Tensor) -> None:
        if self.starts[-1] != query.shape[-1]:
            raise ValueError(f"BlockedCandidates: blocks cover {self.starts[-1]} queries, got Q={query.shape[-1]}")
        n = cand.shape[-1]
        if self._range is not None and (self._range[0] < 0 or self._range[1] >= n):
            raise ValueError(f"BlockedCandidates: members must lie in [0, N={n})")

    # consecutive blocks of one shape (the interior tiles of an image) are processed together, as
    # one batched GEMM per step instead of one small GEMM per block: on a GPU the per-block path is
    # bound by kernel launches. A group holds at most GROUP_ENTRIES distance entries per set of the
    # batch on the dense path, and at most the ``chunk`` queries the chunked path asks for.
    GROUP_ENTRIES = 1 << 21

    def auto_chunk(self, B: int, Q: int, N: int, E: int, F: int) -> int | None:
        """Queries per chunk of the chunked path: groups of blocks up to ~2^22 distance entries in all."""
        widest = max((m.numel() for m in self.members), default=1)
        return max(1, (1 << 22) // (max(B, 1) * max(widest, 1)))

    def _groups(self, chunk: int | None) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """``(start, stop, members (G, U), mask (G * Qb, U))`` of each group of equal-shape blocks."""
        key = -1 if chunk is None else int(chunk)
        if key in self._group_cache:
            return self._group_cache[key]
        groups, i, n = [], 0, len(self.members)
        while i < n:
            qb, u = self.starts[i + 1] - self.starts[i], self.members[i].numel()
            j = i + 1
            while (j < n and self.starts[j + 1] - self.starts[j] == qb and self.members[j].numel() == u
                   and (j + 1 - i) * qb * max(u, 1) <= self.GROUP_ENTRIES and (chunk is None or (j + 1 - i) * qb <= chunk)):
                j += 1
            members = torch.stack(self.members[i:j]) if j > i + 1 else self.members[i].unsqueeze(0)
            mask = torch.cat(self.masks[i:j]) if j > i + 1 else self.masks[i]
            groups.append((self.starts[i], self.starts[j], members, mask))
            i = j
        self._group_cache[key] = groups
        self._by_range.update({(g[0], g[1]): (g[2], g[3]) for g in groups})
        return groups

    def chunks(self, Q: int, chunk: int | None) -> list[tuple[int, int]]:
        return [(g[0], g[1]) for g in self._groups(chunk)]

    # item-major (B, N, X), as IndexedCandidates: a block's union is a gather of contiguous rows
    prepare = staticmethod(IndexedCandidates.prepare)
    unprepare = staticmethod(IndexedCandidates.unprepare)

    def _group(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(members (G, U), mask (G * Qb, U))`` of the group of blocks ``start:stop``."""
        found = self._by_range.get((start, stop))
        if found is not None:
            return found
        i = self._block[start]  # a single block asked for directly
        return self.members[i].unsqueeze(0), self.masks[i]

    def _union(self, x: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """``(B * G, U, X)``: each block's candidates (``x`` item-major ``(B, N, X)``)."""
        B, X = x.shape[0], x.shape[-1]
        G, U = members.shape
        return x.index_select(1, members.reshape(-1)).view(B * G, U, X)

    def distances(self, query: torch.Tensor, cand: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, Q_chunk, U)`` squared distances of a group's queries to their block's candidates, and the mask.

        ``query (B, Q, E)``, ``cand (B, N, E)`` (prepared).
        """
        members, mask = self._group(start, stop)
        B, G, U = query.shape[0], members.shape[0], members.shape[1]
        q = query[:, start:stop].reshape(B * G, (stop - start) // G, -1)
        c = self._union(cand, members)
        # |q|^2 + |c|^2 - 2 q.c in one batched GEMM, as pairwise_sq_dist
        qq = (q * q).sum(-1).unsqueeze(-1)
        cc = (c * c).sum(-1).unsqueeze(-2)
        dist = torch.baddbmm(qq + cc, q, c.transpose(1, 2), alpha=-2.0).clamp_min_(0.0)
        dist = dist.view(B, stop - start, U)
        return dist, mask.unsqueeze(0).expand_as(dist)

    def weights(self, query: torch.Tensor, cand: torch.Tensor, temp: torch.Tensor | None, start: int, stop: int, k: int,
                relaxation: str) -> torch.Tensor:
        dist, mask = self.distances(query, cand, start, stop)
        return _select(dist, None if temp is None else temp[:, start:stop], mask, k, relaxation)

    @staticmethod
    def _per_block(W: torch.Tensor, G: int) -> torch.Tensor:
        """``(B, k, G * Qb, U)`` -> ``(B * G, k * Qb, U)``."""
        B, k, Q, U = W.shape
        if G == 1:
            return W.reshape(B, k * Q, U)
        return W.view(B, k, G, Q // G, U).transpose(1, 2).reshape(B * G, k * (Q // G), U)

    @staticmethod
    def _grad_per_block(g_vol: torch.Tensor, G: int) -> torch.Tensor:
        """``(B, k, F, G * Qb)`` -> ``(B * G, k * Qb, F)``."""
        B, k, F, Q = g_vol.shape
        if G == 1:
            return g_vol.transpose(-1, -2).reshape(B, k * Q, F)
        return g_vol.view(B, k, F, G, Q // G).permute(0, 3, 1, 4, 2).reshape(B * G, k * (Q // G), F)

    def aggregate(self, W: torch.Tensor, feat: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        members, _ = self._group(start, stop)
        B, k, Q, U = W.shape
        G = members.shape[0]
        vol = torch.bmm(self._per_block(W, G), self._union(feat, members))  # (B * G, k * Qb, F)
        if G == 1:
            return vol.view(B, k, Q, -1).transpose(-1, -2)
        return vol.view(B, G, k, Q // G, -1).permute(0, 2, 4, 1, 3).reshape(B, k, -1, Q)

    def add_feat_grad(self, g_feat: torch.Tensor, W: torch.Tensor, g_vol: torch.Tensor, start: int, stop: int) -> None:
        members, _ = self._group(start, stop)
        B, G, U = W.shape[0], members.shape[0], members.shape[1]
        g = torch.bmm(self._per_block(W, G).transpose(1, 2), self._grad_per_block(g_vol, G))  # (B * G, U, F)
        g_feat.index_add_(1, members.reshape(-1), g.view(B, G * U, -1))

    def weight_grad(self, g_vol: torch.Tensor, feat: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        members, _ = self._group(start, stop)
        B, k, F, Q = g_vol.shape
        G, U = members.shape
        gw = torch.bmm(self._grad_per_block(g_vol, G), self._union(feat, members).transpose(1, 2))  # (B * G, k * Qb, U)
        if G == 1:
            return gw.view(B, k, Q, U)
        return gw.view(B, G, k, Q // G, U).transpose(1, 2).reshape(B, k, Q, U)


def _chunk_volumes(layout, query, cand, temp, feat, start, stop, k, relaxation):
    """Neighbour volumes ``(B, k, F, Q_chunk)`` of the queries ``start:stop``."""
    return layout.aggregate(layout.weights(query, cand, temp, start, stop, k, relaxation), feat, start, stop)


class _ChunkedVolumes(torch.autograd.Function):
    """Neighbour volumes computed chunk by chunk; the backward recomputes each chunk's weights."""

    @staticmethod
    def forward(ctx, query, cand, temp, feat, layout, k, chunk, relaxation):
        B, F = feat.shape[:2]
        Q = query.shape[-1]
        # (B, k, Q, F) memory, returned as the (B, k, F, Q) view: each chunk writes whole rows
        out = feat.new_empty(B, k, Q, F).transpose(-1, -2)
        ctx.same = cand is query
        with torch.no_grad():
            q, f = layout.prepare(query), layout.prepare(feat)
            c = q if ctx.same else layout.prepare(cand)
            for s, e in layout.chunks(Q, chunk):
                out[..., s:e] = _chunk_volumes(layout, q, c, temp, f, s, e, k, relaxation)
            del q, c, f
        ctx.save_for_backward(query, cand, temp, feat)
        ctx.layout, ctx.k, ctx.chunk, ctx.relaxation = layout, k, chunk, relaxation
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, cand, temp, feat = ctx.saved_tensors
        layout, k, chunk, relaxation = ctx.layout, ctx.k, ctx.chunk, ctx.relaxation
        need_q, need_c, need_temp, need_feat = ctx.needs_input_grad[:4]
        if relaxation == "hard":
            need_q = need_c = need_temp = False  # the selection is piecewise constant
        Q = query.shape[-1]
        feat = layout.prepare(feat)
        g_feat = torch.zeros_like(feat) if need_feat else None
        g_temp = torch.zeros_like(temp) if need_temp else None
        # one leaf when queries and candidates are the same tensor (the set block's embedding);
        # the leaves are in the layout's prepared form, their gradients are mapped back at the end
        q_ = layout.prepare(query.detach()).requires_grad_(need_q or (ctx.same and need_c))
        c_ = q_ if ctx.same else layout.prepare(cand.detach()).requires_grad_(need_c)
        emb_leaves = [q_] if ctx.same else [t for t, need in ((q_, need_q), (c_, need_c)) if need]
        emb_leaves = [t for t in emb_leaves if t.requires_grad]
        g_emb = [torch.zeros_like(t) for t in emb_leaves]
        for s, e in layout.chunks(Q, chunk):
            g_vol = grad_out[..., s:e]  # (B, k, F, Qc)
            with torch.enable_grad():
                temp_ = temp
                if need_temp:
                    # only this chunk's temperatures enter its rows: give them their own leaf
                    t_chunk = temp[:, s:e].detach().requires_grad_(True)
                    temp_ = torch.cat([temp[:, :s].detach(), t_chunk, temp[:, e:].detach()], dim=1)
                W = layout.weights(q_, c_, temp_, s, e, k, relaxation)  # (B, k, Qc, O)
            # The aggregation is bilinear, so its gradients are two products and the volumes
            # themselves need not be recomputed.
            if need_feat:
                layout.add_feat_grad(g_feat, W.detach(), g_vol, s, e)
            leaves = emb_leaves + ([t_chunk] if need_temp else [])
            if leaves:
                g_W = layout.weight_grad(g_vol, feat, s, e)
                grads = list(torch.autograd.grad(W, leaves, g_W, allow_unused=True))
                for i in range(len(emb_leaves)):
                    gi = grads.pop(0)
                    if gi is not None:
                        g_emb[i] += gi
                if need_temp:
                    gi = grads.pop(0)
                    if gi is not None:
                        g_temp[:, s:e] = gi
        g_q = g_c = None
        if ctx.same:
            if emb_leaves:
                g_q = g_emb[0]  # autograd adds nothing for the second slot: it is the same tensor
        else:
            it = iter(g_emb)
            g_q = next(it) if q_.requires_grad else None
            g_c = next(it) if c_.requires_grad else None
        g_q, g_c, g_feat = (None if g is None else layout.unprepare(g) for g in (g_q, g_c, g_feat))
        return g_q, g_c, g_temp, g_feat, None, None, None, None


def neighbour_volumes(
    query: torch.Tensor,
    cand: torch.Tensor,
    feat: torch.Tensor,
    temperature: torch.Tensor | None,
    k: int,
    layout: GlobalCandidates | IndexedCandidates,
    impl: str = "dense",
    chunk_size: int | None = None,
    relaxation: str = "continuous",
) -> torch.Tensor:
    """k neighbour volumes of every query: ``(B, k, F, Q)``.

    Args:
        query: ``(B, E, Q)`` query embeddings.
        cand: ``(B, E, N)`` candidate embeddings (pass the same tensor as ``query`` when the
            queries are the candidates, as for :class:`GlobalCandidates`).
        feat: ``(B, F, N)`` candidate features that the volumes aggregate.
        temperature: ``(B, Q)`` positive per-query temperatures (ignored for ``relaxation="hard"``).
        k: number of neighbours.
        layout: :class:`GlobalCandidates` or :class:`IndexedCandidates`.
        impl: ``"dense"`` or ``"chunked"`` (same values and gradients).
        chunk_size: queries per chunk for ``"chunked"`` (None: chosen from the layout's budget).
        relaxation: ``"continuous"`` (paper Eqs. 8-10) or ``"hard"`` (KNN, no gradient through selection).

    Returns:
        ``(B, k, F, Q)``: ``out[:, j, :, q]`` is the (j+1)-th relaxed neighbour of query ``q``
        (all zero when the query has fewer than j + 1 candidates).
    """
    if query.dim() != 3 or cand.dim() != 3 or feat.dim() != 3:
        raise ValueError(f"neighbour_volumes: query (B, E, Q), cand (B, E, N) and feat (B, F, N) must be 3-D, "
                         f"got {tuple(query.shape)}, {tuple(cand.shape)}, {tuple(feat.shape)}")
    if cand.shape[:2] != query.shape[:2] or feat.shape[0] != cand.shape[0] or feat.shape[-1] != cand.shape[-1]:
        raise ValueError(f"neighbour_volumes: shapes do not fit: query {tuple(query.shape)} (B, E, Q), "
                         f"cand {tuple(cand.shape)} (B, E, N), feat {tuple(feat.shape)} (B, F, N)")
    if relaxation not in ("continuous", "hard"):
        raise ValueError(f"relaxation must be 'continuous' or 'hard', got {relaxation!r}")
    layout.check(query, cand, feat)
    B, Q = query.shape[0], query.shape[-1]
    if relaxation == "hard":
        temperature = None
    elif temperature is None or temperature.shape != (B, Q):
        got = None if temperature is None else tuple(temperature.shape)
        raise ValueError(f"neighbour_volumes: temperature must have shape (B, Q) = {(B, Q)}, got {got}")
    if impl == "dense":
        q, f = layout.prepare(query), layout.prepare(feat)
        c = q if cand is query else layout.prepare(cand)
        parts = [_chunk_volumes(layout, q, c, temperature, f, s, e, k, relaxation) for s, e in layout.chunks(Q, None)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    if impl != "chunked":
        raise ValueError(f"impl must be 'dense' or 'chunked', got {impl!r}")
    chunk = chunk_size or layout.auto_chunk(B, Q, cand.shape[-1], query.shape[1], feat.shape[1])
    if temperature is None:
        temperature = query.new_ones(B, Q)  # unused by the hard path, keeps the saved tensors uniform
    return _ChunkedVolumes.apply(query, cand, temperature, feat, layout, k, chunk if chunk is None else int(chunk),
                                 relaxation)
