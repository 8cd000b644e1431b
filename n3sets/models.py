"""Correspondence classifiers: CNNet (Yi et al. 2018) and N3Net (Ploetz & Roth 2018, Sec. 5.5).

Both take a padded batch of putative matches ``x (B, C_in, N)`` -- the normalized coordinates
``[x1, y1, x2, y2]``, optionally followed by side information ``[ratio, mutual]`` -- and a mask
``(B, N)`` (True = real match) and return one logit per match ``(B, N)``. Every layer that pools
over a set (context normalization, batch normalization, the N3 block) uses the valid items only,
so in eval mode a padded batch gives the same logits per set as the sets one by one.

Either model can end in a residual refinement stage (conf ``refine_stage``, after the iterative
networks of Zhang et al., OANet, ICCV 2019, and Ranftl & Koltun, ECCV 2018): the first network's
weights give an essential matrix by the weighted eight-point algorithm, and a second network of
the same kind sees each match's coordinates together with its first-stage weight and its
epipolar residual under that matrix. The residual is a consensus cue that does not depend on the
scene, which a classifier of coordinates alone has to learn from the training scenes.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .essential import logits_to_weights, weighted_eight_point
from .geometry import symmetric_epipolar_distance
from .layers import MaskedBatchNorm1d, context_norm
from .n3block import N3Block

__all__ = ["CNNet", "N3Net", "context_norm", "MaskedBatchNorm1d", "model_inputs", "residual_features",
           "PADDED_LOGIT"]

# Logit written at padded positions: sigmoid -> 0 and relu(tanh(.)) -> 0, still finite.
PADDED_LOGIT = -1e4
# Input channels a refinement stage adds: first-stage weight and log epipolar residual.
REFINE_INPUTS = 2
# Range of the squared symmetric epipolar distance (normalized units) before its log is taken:
# 1e-10 is ~0.01 px at f ~ 1000 px, 1.0 is about an image width.
_RESIDUAL_RANGE = (1e-10, 1.0)
# Weight added to every valid match for the first-stage E of a refinement stage.
_WEIGHT_FLOOR = 1e-4


def _check_inputs(x: torch.Tensor, mask: torch.Tensor | None, channels: int) -> torch.Tensor:
    if x.dim() != 3 or x.shape[1] != channels:
        raise ValueError(f"x must have shape (B, {channels}, N), got {tuple(x.shape)}")
    if mask is None:
        return torch.ones(x.shape[0], x.shape[2], dtype=torch.bool, device=x.device)
    if mask.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"mask must have shape (B, N) = {(x.shape[0], x.shape[2])}, got {tuple(mask.shape)}")
    return mask.to(torch.bool)


class ResidualCNBlock(nn.Module):
    """Two times (1x1 conv, context norm, batch norm, ReLU) plus the identity (Yi et al.)."""

    def __init__(self, channels: int, cn_eps: float = 1e-3, bn_momentum: float = 0.1):
        super().__init__()
        self.channels, self.cn_eps = channels, cn_eps
        self.conv1 = nn.Conv1d(channels, channels, 1)
        self.bn1 = MaskedBatchNorm1d(channels, momentum=bn_momentum)
        self.conv2 = nn.Conv1d(channels, channels, 1)
        self.bn2 = MaskedBatchNorm1d(channels, momentum=bn_momentum)

    def reset_parameters(self) -> None:
        for layer in (self.conv1, self.bn1, self.conv2, self.bn2):
            layer.reset_parameters()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(context_norm(self.conv1(x), mask, self.cn_eps), mask))
        y = F.relu(self.bn2(context_norm(self.conv2(y), mask, self.cn_eps), mask))
        return x + y

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def merge_conf(default: dict, conf: dict | None, kwargs: dict) -> dict:
    """``default`` updated by ``conf`` then ``kwargs`` (nested dicts merged); unknown keys raise ValueError."""
    merged = copy.deepcopy(default)
    for source in (conf or {}, kwargs):
        for key, value in source.items():
            if key not in merged:
                raise ValueError(f"unknown configuration key {key!r}; known: {sorted(merged)}")
            if isinstance(merged[key], dict) and isinstance(value, dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return merged


class CNNet(nn.Module):
    """Context normalization network of Yi et al. (2018): per-match logits for a set of matches.

    ``x (B, C_in, N) -> 1x1 conv to C -> num_blocks residual CN blocks -> 1x1 conv -> (B, N)``.

    Configuration (``default_conf``, overridden by a ``conf`` dict and/or keyword arguments):
        side_info: add ``[ratio, mutual]`` input channels (``in_channels`` becomes 6).
        in_channels: None (derived from side_info) or the explicit input width.
        channels: feature width C; num_blocks: residual blocks; cn_eps, bn_momentum.
        refine_stage: None (one network) or a dict of configuration overrides for a second
            network of the same class that refines the logits from the first stage's weights and
            epipolar residuals (``{}``: the same configuration). See :meth:`forward`.
    """

    default_conf = {
        "side_info": False,
        "in_channels": None,
        "channels": 128,
        "num_blocks": 12,
        "cn_eps": 1e-3,
        "bn_momentum": 0.1,
        "refine_stage": None,
    }

    @classmethod
    def resolve_conf(cls, conf: dict | None = None, **kwargs: object) -> dict:
        """The full configuration (defaults, overrides, derived ``in_channels``) a model would get.

        Lets a stored configuration from an older version, without keys added since, be compared
        with a model's ``conf``.
        """
        conf = merge_conf(cls.default_conf, conf, kwargs)
        expected = 6 if conf["side_info"] else 4
        if conf["in_channels"] is None:
            conf["in_channels"] = expected
        elif conf["in_channels"] != expected:
            raise ValueError(f"in_channels={conf['in_channels']} does not match side_info={conf['side_info']} "
                             f"(expected {expected})")
        refine = conf["refine_stage"]
        if refine is not None:
            if not isinstance(refine, dict):
                raise ValueError(f"refine_stage must be None or a dict of configuration overrides, got {refine!r}")
            fixed = {"side_info", "in_channels", "refine_stage"} & set(refine)
            if fixed:
                raise ValueError(f"refine_stage cannot override {sorted(fixed)} (set by the first stage)")
            merge_conf(cls.default_conf, refine, {})  # unknown keys fail here, naming the key
        return conf

    def __init__(self, conf: dict | None = None, _extra_inputs: int = 0, **kwargs: object):
        super().__init__()
        conf = self.resolve_conf(conf, **kwargs)
        self.conf = conf
        C = conf["channels"]
        self.input_proj = nn.Conv1d(conf["in_channels"] + _extra_inputs, C, 1)
        self.blocks = nn.ModuleList(
            ResidualCNBlock(C, conf["cn_eps"], conf["bn_momentum"]) for _ in range(conf["num_blocks"]))
        self.output = nn.Conv1d(C, 1, 1)
        self.refine_stage = None
        if conf["refine_stage"] is not None:
            stage_conf = {**conf, **conf["refine_stage"], "refine_stage": None}
            self.refine_stage = type(self)(stage_conf, _extra_inputs=REFINE_INPUTS)

    def reset_parameters(self) -> None:
        # Only top-level layers: a sub-module's own reset_parameters knows its special
        # initialisations (e.g. the N3 block's zero temperature head), which a recursive
        # reset of every nn.Conv1d would undo.
        def reset(module):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                for child in module.children():
                    reset(child)

        for child in self.children():
            reset(child)

    def _run_block(self, i: int, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.blocks[i](x, mask)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                return_stages: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Logits ``(B, N)`` for ``x (B, C_in, N)`` and ``mask (B, N)`` (padded logits = PADDED_LOGIT).

        With a refinement stage the first network's logits give weights ``relu(tanh(.))`` and an
        essential matrix by the weighted eight-point algorithm; the second network gets ``x``
        followed by each match's first-stage weight and :func:`residual_features` under that
        matrix (both without gradient, as in OANet), and its logits are returned.
        ``return_stages=True`` returns the list of every stage's logits instead (for a loss on
        each stage).
        """
        mask = _check_inputs(x, mask, self.conf["in_channels"])
        logits = self._stage(x, mask)
        stages = [logits]
        if self.refine_stage is not None:
            with torch.no_grad():
                w = logits_to_weights(logits) * mask.to(logits.dtype)
                x1, x2 = x[:, 0:2].transpose(1, 2), x[:, 2:4].transpose(1, 2)
                # a small floor on every valid match keeps E determined when the first stage
                # passes fewer than eight matches (and so independent of padding)
                E = weighted_eight_point(x1, x2, w + _WEIGHT_FLOOR * mask.to(w.dtype), mask)
                extra = torch.stack([w, residual_features(x1, x2, E, mask)], dim=1).to(x.dtype)
            stages.append(self.refine_stage._stage(torch.cat([x, extra], dim=1), mask))
        return stages if return_stages else stages[-1]

    def _stage(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """This network's own logits (checked inputs, no refinement)."""
        m = mask.unsqueeze(1).to(x.dtype)
        # padding may hold NaN/inf from the caller; zero it before it enters any layer
        h = self.input_proj(torch.where(mask.unsqueeze(1), x, torch.zeros_like(x))) * m
        for i in range(len(self.blocks)):
            h = self._run_block(i, h, mask)
        logits = self.output(self._after_blocks(h, mask)).squeeze(1)
        return logits.masked_fill(~mask, PADDED_LOGIT)

    def _after_blocks(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hook between the last residual block and the output layer (identity here)."""
        return h

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.conf.items())


class N3Net(CNNet):
    """CNNet with an N3 block (global continuous KNN over the set) after block ``n3_after``.

    Before the block a 1x1 conv reduces C to ``C // (k + 1)`` channels, so that the block's
    output -- the input followed by its k neighbour volumes -- has C channels again (paper
    Sec. 5.5); if C is not divisible by k + 1 a 1x1 conv restores C. The N3 block's embedding
    and temperature networks are MLPs of depth ``embed_depth`` / ``temp_depth``.

    Extra configuration: n3_after (blocks before the N3 block), k, embed_channels,
    embed_depth, temp_depth, relaxation ("continuous" | "hard"), impl, n3block (dict of further
    keyword arguments for :class:`n3sets.n3block.N3Block`).
    """

    default_conf = {
        **CNNet.default_conf,
        "n3_after": 6,
        "k": 7,
        "embed_channels": 32,
        "embed_depth": 3,
        "temp_depth": 3,
        "relaxation": "continuous",
        "impl": "auto",
        "n3block": {},
    }

    def __init__(self, conf: dict | None = None, _extra_inputs: int = 0, **kwargs: object):
        super().__init__(conf, _extra_inputs, **kwargs)
        conf = self.conf
        C, k = conf["channels"], conf["k"]
        if not 0 <= conf["n3_after"] <= conf["num_blocks"]:
            raise ValueError(f"n3_after must be in [0, num_blocks={conf['num_blocks']}], got {conf['n3_after']}")
        block_in = C // (k + 1)
        if block_in < 1:
            raise ValueError(f"channels={C} is too small for k={k}: need channels >= k + 1")
        self.n3_reduce = nn.Conv1d(C, block_in, 1)
        self.n3 = N3Block(block_in, k=k, embed_channels=conf["embed_channels"], embed_depth=conf["embed_depth"],
                          temp_depth=conf["temp_depth"], impl=conf["impl"], relaxation=conf["relaxation"],
                          **conf["n3block"])
        out = (k + 1) * block_in
        self.n3_expand = nn.Conv1d(out, C, 1) if out != C else None

    def _run_block(self, i: int, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if i == self.conf["n3_after"]:
            x = self._n3(x, mask)
        return self.blocks[i](x, mask)

    def _n3(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.n3_reduce(x) * mask.unsqueeze(1).to(x.dtype)
        h = self.n3(h, mask)
        if self.n3_expand is not None:
            h = self.n3_expand(h)
        return h * mask.unsqueeze(1).to(h.dtype)

    def _after_blocks(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # block after the last residual block: run it before the output layer
        return self._n3(h, mask) if self.conf["n3_after"] == self.conf["num_blocks"] else h


def model_inputs(xs: torch.Tensor, ratio: torch.Tensor | None = None, mutual: torch.Tensor | None = None,
                 side_info: bool = False) -> torch.Tensor:
    """Stack model inputs ``(B, C_in, N)`` from normalized matches and optional side information.

    Args:
        xs: ``(B, N, 4)`` normalized coordinates ``[x1, y1, x2, y2]``.
        ratio: ``(B, N)`` Lowe ratio of each match (needed when side_info).
        mutual: ``(B, N)`` mutual-nearest-neighbour flag (needed when side_info).
        side_info: append ratio and mutual as channels 4 and 5.
    """
    if xs.dim() != 3 or xs.shape[-1] != 4:
        raise ValueError(f"xs must have shape (B, N, 4), got {tuple(xs.shape)}")
    x = xs.transpose(1, 2)
    if not side_info:
        return x.contiguous()
    for name, value in (("ratio", ratio), ("mutual", mutual)):
        if value is None:
            raise ValueError(f"{name} is required when side_info=True")
        if value.shape != xs.shape[:2]:
            raise ValueError(f"{name} must have shape (B, N) = {tuple(xs.shape[:2])}, got {tuple(value.shape)}")
    extra = torch.stack([ratio.to(xs.dtype), mutual.to(xs.dtype)], dim=1)
    return torch.cat([x, extra], dim=1).contiguous()


def residual_features(x1: torch.Tensor, x2: torch.Tensor, E: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Log squared symmetric epipolar distance of each match under ``E``: ``(B, N)``.

    ``x1, x2 (B, N, 2)`` normalized points, ``E (B, 3, 3)``. The distance is clamped to
    ``[1e-10, 1]`` (normalized units squared) before the log, so outliers far off their line and
    exact inliers both stay finite; padded items get 0.
    """
    if mask is not None:
        x1 = x1.masked_fill(~mask.unsqueeze(-1), 0.0)
        x2 = x2.masked_fill(~mask.unsqueeze(-1), 0.0)
    d = symmetric_epipolar_distance(x1.double(), x2.double(), E.double())
    f = torch.log(torch.nan_to_num(d, nan=_RESIDUAL_RANGE[1]).clamp(*_RESIDUAL_RANGE))
    if mask is not None:
        f = f.masked_fill(~mask, 0.0)
    return f.to(x1.dtype)
