"""The N3 block for images (Ploetz & Roth 2018, Sec. 4, "N3 block for image data").

``(B, C, H, W) -> (B, (k + 1) * C, H, W)``: an embedding CNN and a temperature CNN run on the
block input; both maps and the input are cut into patches of size ``p`` with stride ``s``
(:mod:`n3images.patches`); every patch is matched against the patches of the ``w x w`` grid window
around it (itself excluded; the paper's p=10, s=5, w=15 gives 224 candidates) by the N3 engine
(:func:`n3sets.engine.neighbour_volumes` with :class:`n3sets.engine.IndexedCandidates`), and each of
the k neighbour volumes of input patches is turned back into an image by col2im, averaging the
overlapping contributions. Only the ``L x w^2`` distances are formed, never ``L x L``; the chunked
engine path keeps memory linear in the image size.

Architecture facts of the published denoising network that this block follows: embedding CNN of
three 3x3 convolutions ``C -> 64 -> 64 -> 8`` with batch norm + ReLU between, temperature CNN the
same ending in one channel, temperature ``exp(temperature CNN at the patch centre) * 0.1``, and the
negative patch distances pass a one-channel batch norm before the division by the temperature.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from n3sets.engine import neighbour_volumes
from n3sets.layers import positive_temperature

from .patches import col2im, grid_shape, im2col, pad_to_grid, patch_centres, window_blocks

__all__ = ["N3Block2d", "DistanceNorm", "AUTO_DENSE_MAX_ENTRIES"]

# impl="auto": the dense path (every block's weights kept by autograd) while B * L * U distance
# entries stay below this (the k weight matrices and their softmax buffers are ~3k times that:
# ~170 MiB for k = 7); beyond, the chunked path recomputes each block in the backward.
AUTO_DENSE_MAX_ENTRIES = 1 << 21


def _cnn(in_channels: int, hidden: int, out_channels: int, depth: int) -> nn.Sequential:
    """``depth`` 3x3 convolutions, batch norm + ReLU between them."""
    layers, c = [], in_channels
    for i in range(depth):
        last = i == depth - 1
        layers.append(nn.Conv2d(c, out_channels if last else hidden, 3, padding=1))
        if not last:
            layers += [nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)]
        c = hidden
    return nn.Sequential(*layers)


class DistanceNorm(nn.Module):
    """One-channel batch norm of the negative patch distances, folded into the temperatures.

    ``BN(-d) / t = (gamma * (-d - mu) / sigma + beta) / t``. Per query, ``mu`` and ``beta`` shift
    all candidates' logits equally and cancel in the softmax, so the norm acts as the scale
    ``gamma / sigma``: :meth:`effective_temperature` returns ``t * sigma / gamma``. ``sigma`` is
    the batch standard deviation of the valid distances in training (running average kept as
    :class:`torch.nn.BatchNorm1d` does) and the running one in eval. The batch statistics are
    taken without gradient: the chunked engine never holds all distances at once, and the mean
    has no effect anyway.
    """

    def __init__(self, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))  # kept for the BatchNorm layout; cancels in the softmax
        self.register_buffer("running_mean", torch.zeros(1))
        self.register_buffer("running_var", torch.ones(1))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    @torch.no_grad()
    def _batch_stats(self, emb: torch.Tensor, layout, chunk: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        total = torch.zeros((), dtype=torch.float64, device=emb.device)
        total_sq, count = total.clone(), 0
        emb = layout.prepare(emb)
        for s, e in layout.chunks(emb.shape[-1], chunk):
            d, mask = layout.distances(emb, emb, s, e)
            d = d.masked_select(mask).double()
            total += d.sum()
            total_sq += (d * d).sum()
            count += d.numel()
        mean = total / max(count, 1)
        var = (total_sq / max(count, 1) - mean * mean).clamp_min(0.0)
        return mean, var, count

    def effective_temperature(self, t: torch.Tensor, emb: torch.Tensor, layout, chunk: int) -> torch.Tensor:
        """``(B, L)`` temperatures that give ``BN(-d) / t`` up to a per-query shift."""
        if self.training:
            mean, var, count = self._batch_stats(emb, layout, chunk)
            with torch.no_grad():
                self.num_batches_tracked += 1
                unbiased = var * (count / max(count - 1, 1))
                # the norm sees -d: its mean is -mean(d), its variance that of d
                self.running_mean.mul_(1 - self.momentum).add_(-self.momentum * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased.to(self.running_var.dtype))
        else:
            var = self.running_var
        sigma = torch.sqrt(var.to(t.dtype) + self.eps)
        return t * sigma / self.weight


class N3Block2d(nn.Module):
    """Neural nearest neighbours block for images: ``(B, C, H, W) -> (B, (k + 1) * C, H, W)``.

    Output channels are ``[x, vol_1, ..., vol_k]``; ``vol_j`` is the image of the j-th relaxed
    nearest-neighbour patches of the patches covering each pixel (col2im, averaged).

    Configuration (``default_conf`` merged with keyword arguments):

    * ``k`` neighbours, ``patch_size`` p, ``stride`` s, ``window`` w (in grid positions).
    * ``embed``: ``"cnn"`` (learned embedding, the N3 block) or ``"none"`` (distances between
      patches of the block input -- or of ``guide`` when given -- in a fixed space: with
      ``relaxation="hard"`` the paper's KNN baseline).
    * ``embed_channels``, ``embed_hidden``, ``embed_depth``: embedding CNN (3x3 convs).
    * ``temp_hidden``, ``temp_depth``: temperature CNN; ``t = exp(out at the patch centre) *
      init_temperature`` (paper: 0.1).
    * ``temp_extra_channels``: channels of a ``temperature_input`` map that the temperature CNN
      sees next to the block input (0: none; N3Net-SR's ``scale_aware`` passes the scale).
    * ``distance_norm``: the one-channel batch norm of the negative distances (:class:`DistanceNorm`).
    * ``relaxation``: ``"continuous"`` or ``"hard"`` (no temperature CNN, no gradient through
      the selection).
    * ``impl``: ``"dense"``, ``"chunked"`` or ``"auto"``; ``tile``: patches per side of a block of
      queries that share one candidate union (:func:`n3images.patches.window_blocks`), the chunk
      of the chunked path.
    """

    default_conf = {
        "k": 7,
        "patch_size": 10,
        "stride": 5,
        "window": 15,
        "embed": "cnn",
        "embed_channels": 8,
        "embed_hidden": 64,
        "embed_depth": 3,
        "temp_hidden": 64,
        "temp_depth": 3,
        "temp_extra_channels": 0,
        "init_temperature": 0.1,
        "distance_norm": True,
        "relaxation": "continuous",
        "impl": "auto",
        "tile": 8,
    }

    def __init__(self, in_channels: int, **kwargs: object):
        super().__init__()
        unknown = set(kwargs) - set(self.default_conf)
        if unknown:
            raise ValueError(f"N3Block2d: unknown options {sorted(unknown)}; known: {sorted(self.default_conf)}")
        conf = {**self.default_conf, **kwargs}
        for key in ("k", "patch_size", "stride", "window", "embed_depth", "temp_depth", "tile"):
            v = conf[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"N3Block2d: {key} must be a positive int, got {v!r}")
        extra = conf["temp_extra_channels"]
        if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
            raise ValueError(f"N3Block2d: temp_extra_channels must be an int >= 0, got {extra!r}")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"N3Block2d: in_channels must be a positive int, got {in_channels!r}")
        if conf["embed"] not in ("cnn", "none"):
            raise ValueError(f"N3Block2d: embed must be 'cnn' or 'none', got {conf['embed']!r}")
        if conf["relaxation"] not in ("continuous", "hard"):
            raise ValueError(f"N3Block2d: relaxation must be 'continuous' or 'hard', got {conf['relaxation']!r}")
        if conf["impl"] not in ("auto", "dense", "chunked"):
            raise ValueError(f"N3Block2d: impl must be 'auto', 'dense' or 'chunked', got {conf['impl']!r}")
        if conf["window"] < 2:
            raise ValueError("N3Block2d: window must be >= 2 (a patch needs candidates besides itself)")
        self.in_channels, self.conf, self.k = in_channels, conf, conf["k"]
        self.out_channels = (self.k + 1) * in_channels
        self.embed = (_cnn(in_channels, conf["embed_hidden"], conf["embed_channels"], conf["embed_depth"])
                      if conf["embed"] == "cnn" else None)
        continuous = conf["relaxation"] == "continuous"
        self.temperature = (_cnn(in_channels + conf["temp_extra_channels"], conf["temp_hidden"], 1, conf["temp_depth"])
                            if continuous else None)
        self.distance_norm = DistanceNorm() if continuous and conf["distance_norm"] else None

    def reset_parameters(self) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def extra_repr(self) -> str:
        c = self.conf
        return (f"in_channels={self.in_channels}, k={c['k']}, patch_size={c['patch_size']}, stride={c['stride']}, "
                f"window={c['window']}, embed={c['embed']!r}, relaxation={c['relaxation']!r}, impl={c['impl']!r}")

    @property
    def halo(self) -> int:
        """Pixels of context an output pixel depends on (receptive-field radius; for tiling)."""
        c = self.conf
        cnn = max(c["embed_depth"] if self.embed is not None else 0,
                  c["temp_depth"] if self.temperature is not None else 0)
        # candidate patches of the patches covering a pixel: window reach plus two patch extents
        return (c["window"] // 2 + 1) * c["stride"] + 2 * c["patch_size"] + cnn

    def resolve_impl(self, batch: int, gh: int, gw: int) -> str:
        """The execution path ``impl="auto"`` picks for ``batch`` images of a ``gh x gw`` patch grid.

        Dense (autograd keeps every block's weights) while ``B * L * U`` distance entries stay
        below ``AUTO_DENSE_MAX_ENTRIES``; chunked (blocks recomputed in the backward) beyond, and
        whenever no gradient is recorded (it writes the volumes in place instead of
        concatenating the blocks' results).
        """
        if self.conf["impl"] != "auto":
            return self.conf["impl"]
        if not torch.is_grad_enabled():
            return "chunked"
        union = min(gh, self.conf["tile"] + self.conf["window"] - 1) * min(gw, self.conf["tile"] + self.conf["window"] - 1)
        return "dense" if batch * gh * gw * union <= AUTO_DENSE_MAX_ENTRIES else "chunked"

    def _check(self, x, guide):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"N3Block2d: x must have shape (B, {self.in_channels}, H, W), got {got}")
        if not x.is_floating_point():
            raise ValueError(f"N3Block2d: x of shape {tuple(x.shape)} must be floating point, got {x.dtype}")
        if x.shape[0] == 0 or x.shape[-1] == 0 or x.shape[-2] == 0:
            raise ValueError(f"N3Block2d: empty input {tuple(x.shape)}")
        if guide is not None:
            if self.embed is not None:
                raise ValueError("N3Block2d: guide is only used with embed='none' (a fixed matching space)")
            if guide.dim() != 4 or guide.shape[0] != x.shape[0] or guide.shape[-2:] != x.shape[-2:]:
                raise ValueError(f"N3Block2d: guide must have shape (B, C', H, W) with B, H, W of x "
                                 f"{tuple(x.shape)}, got {tuple(guide.shape)}")

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None,
                temperature_scale: float = 1.0, temperature_input: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, C, H, W)`` -> ``(B, (k + 1) * C, H, W)``.

        ``guide`` (``(B, C', H, W)``, only with ``embed="none"``): the image whose patches are
        matched instead of the block input's (e.g. the noisy network input).
        ``temperature_scale``: every temperature multiplied by this positive factor (above 1:
        softer neighbour weights; an inference-time calibration, e.g. per SR scale); ignored by
        the hard relaxation, which has no temperature.
        ``temperature_input`` (``(B, temp_extra_channels, H, W)``): given exactly when
        ``temp_extra_channels > 0``; concatenated to ``x`` for the temperature CNN only.
        """
        self._check(x, guide)
        if not (math.isfinite(temperature_scale) and temperature_scale > 0):
            raise ValueError(f"N3Block2d: temperature_scale must be a positive finite number, got {temperature_scale}")
        c = self.conf
        p, s, k = c["patch_size"], c["stride"], self.k
        B, C, H, W = x.shape
        gh, gw, _, _ = grid_shape(H, W, p, s)
        if self.embed is not None:
            emb_map = self.embed(x)
        else:
            emb_map = x if guide is None else guide.to(x.dtype)
        xp = pad_to_grid(x, p, s)
        # patches tile by tile, so that a tile's shared search window is one dense block; the
        # reordering gathers patch rows, and the (B, D, L) views it hands the engine are the
        # transposes of contiguous (B, L, D) tensors, the item-major form the engine works in
        order, layout = window_blocks(gh, gw, c["window"], c["tile"], device=x.device)
        emb = im2col(pad_to_grid(emb_map, p, s), p, s).transpose(1, 2).index_select(1, order).transpose(1, 2)
        feat = im2col(xp, p, s).transpose(1, 2).index_select(1, order).transpose(1, 2)
        L = gh * gw
        impl = self.resolve_impl(B, gh, gw)
        temp = None
        if self.temperature is not None:
            t_in = x
            if c["temp_extra_channels"]:
                want = (B, c["temp_extra_channels"], H, W)
                if temperature_input is None or tuple(temperature_input.shape) != want:
                    got = None if temperature_input is None else tuple(temperature_input.shape)
                    raise ValueError(f"N3Block2d: temperature_input must have shape {want}, got {got}")
                t_in = torch.cat([x, temperature_input.to(x.dtype)], dim=1)
            t_map = pad_to_grid(self.temperature(t_in), p, s)
            temp = positive_temperature(patch_centres(t_map, p, s), c["init_temperature"]).index_select(-1, order)
            if self.distance_norm is not None:
                temp = self.distance_norm.effective_temperature(temp, emb, layout, None)
            if temperature_scale != 1.0:
                temp = temp * temperature_scale
        vol = neighbour_volumes(emb, emb, feat, temp, k, layout, impl=impl, relaxation=c["relaxation"])
        # back in grid order (rows of the (B, k, L, C*p*p) view): (B, k, C*p*p, L)
        vol = vol.transpose(-1, -2).index_select(2, torch.argsort(order)).transpose(-1, -2)
        size = xp.shape[-2:]
        imgs = col2im(vol.reshape(B * k, C * p * p, L), size, p, s)[..., :H, :W]
        return torch.cat([x, imgs.reshape(B, k * C, H, W)], dim=1)
