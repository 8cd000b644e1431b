"""The N3 block for point sets (Ploetz & Roth 2018, Sec. 4): global continuous KNN over each set.

An embedding network and a temperature network (1x1 convolutions) map the input ``x (B, C, N)``
to an embedding ``(B, E, N)`` and one temperature per item ``(B, N)``. For every item the other
valid items of the same set are the candidates; the squared Euclidean distances in the embedding
go through :func:`n3sets.knn.continuous_knn` and the k weight rows aggregate the block *input*
into k neighbour volumes, which are concatenated to the input: ``(B, (k + 1) * C, N)``.

The distances, the relaxation and the aggregation are :func:`n3sets.engine.neighbour_volumes`
with :class:`n3sets.engine.GlobalCandidates`; this module only adds the embedding and temperature
networks. Execution paths (``impl``): ``"dense"`` builds the whole ``(B, N, N)`` distance matrix
and the k weight matrices (peak memory ~ (3k + 8) * B * N^2 floats); ``"chunked"`` recomputes
chunks of queries in the backward (memory ~ B * N * chunk_size); same values and gradients.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .engine import AUTO_CHUNK_ENTRIES, AUTO_DENSE_MAX_ENTRIES, GlobalCandidates, neighbour_volumes, pairwise_sq_dist
from .layers import mlp, positive_temperature, run_mlp

__all__ = ["N3Block", "HardKNNBlock", "pairwise_sq_dist", "n3_aggregate", "AUTO_CHUNK_ENTRIES", "AUTO_DENSE_MAX_ENTRIES"]


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
    """k neighbour volumes of every item of every set (global candidates, the item itself excluded).

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
        ``(B, k, C, N)`` neighbour volumes (:func:`n3sets.engine.neighbour_volumes`).
    """
    if mask is not None:
        # Padded features never reach a volume (0 * NaN would still be NaN).
        x = torch.where(mask.unsqueeze(1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return neighbour_volumes(emb, emb, x, temperature, k, GlobalCandidates(mask), impl=impl,
                             chunk_size=chunk_size, relaxation=relaxation)


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

    def __init__(self, in_channels: int, **kwargs: object):
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
            self.embed = mlp(in_channels, conf["embed_hidden"], conf["embed_channels"], conf["embed_depth"], conf["norm"])
        else:
            self.embed = nn.ModuleList()  # identity: KNN in the input feature space
        if conf["relaxation"] == "continuous":
            self.temperature = mlp(in_channels, conf["temp_hidden"], 1, conf["temp_depth"], conf["norm"])
        else:
            self.temperature = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
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
        return run_mlp(self.embed, x, mask)

    def temperatures(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, N)`` positive temperature per item."""
        c = self.conf
        return positive_temperature(run_mlp(self.temperature, x, mask).squeeze(1), c["init_temperature"],
                                    c["min_temperature"], c["max_temperature"])

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
