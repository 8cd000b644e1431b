"""Image denoisers: DnCNN (Zhang et al., TIP 2017) and the denoising N3Net (Ploetz & Roth 2018, Sec. 5.1).

Both map a noisy image ``(B, C, H, W)`` (C = 1 grey or 3 colour, values ~[0, 1]) to a denoised
image of the same shape. A model is one class with a ``default_conf`` merged with a ``conf``
dict and keyword overrides, as the correspondence models in :mod:`n3sets.models`.

Architecture facts of the published denoising N3Net that :class:`N3NetDenoiser` follows:

* every DnCNN stage is ``conv3x3 (bias) -> ReLU``, then ``(depth - 2) x [conv3x3 (no bias) -> BN
  -> ReLU]``, then ``conv3x3 (bias)``, and is residual by itself: its input is added to the first
  ``min(C_in, C_out)`` output channels (no global skip);
* three stages of depth 6 with 64 features; the first two output 8 channels and are each
  followed by an :class:`n3images.N3Block2d` (k = 7), so the stage after a block sees
  ``8 * (k + 1) = 64`` channels; the last stage outputs the image.

:class:`DnCNN` is one such stage of depth 17 from C to C channels, i.e. residual learning.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from n3sets.models import merge_conf

from .n3block2d import N3Block2d

__all__ = ["DnCNNStage", "DnCNN", "N3NetDenoiser", "IMAGE_MODELS"]


def _check_image(x: torch.Tensor, channels: int, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: input must have shape (B, {channels}, H, W), got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: input must be floating point, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name}: empty input {tuple(x.shape)}")


class DnCNNStage(nn.Module):
    """``conv+ReLU, (depth-2) x conv+BN+ReLU, conv``; the input is added to the first min(C_in, C_out) channels."""

    def __init__(self, in_channels: int, out_channels: int, depth: int = 17, features: int = 64,
                 bn_momentum: float = 0.1):
        super().__init__()
        if depth < 2:
            raise ValueError(f"DnCNNStage: depth must be >= 2, got {depth}")
        self.in_channels, self.out_channels, self.depth, self.features = in_channels, out_channels, depth, features
        layers = [nn.Conv2d(in_channels, features, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(features, features, 3, padding=1, bias=False),
                       nn.BatchNorm2d(features, momentum=bn_momentum), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(features, out_channels, 3, padding=1))
        self.body = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.body:
            if isinstance(m, nn.Conv2d):
                # He init for the ReLU layers; biases zero
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
        # the residual starts small (He init gives outputs of std ~1.4, ten times the noise of
        # sigma 25): the stage starts near the identity
        with torch.no_grad():
            self.body[-1].weight.mul_(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        c = min(self.in_channels, self.out_channels)
        if c == self.out_channels:
            return out + x[:, :c]
        return torch.cat([out[:, :c] + x[:, :c], out[:, c:]], dim=1)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, depth={self.depth}, features={self.features}"


class DnCNN(nn.Module):
    """DnCNN: one residual stage of ``depth`` layers, ``(B, C, H, W) -> (B, C, H, W)``.

    Configuration: ``channels`` (1 grey, 3 colour), ``depth`` (17), ``features`` (64), ``bn_momentum``.
    """

    default_conf = {"channels": 1, "depth": 17, "features": 64, "bn_momentum": 0.1}

    def __init__(self, conf: dict | None = None, **kwargs: object):
        super().__init__()
        self.conf = conf = merge_conf(self.default_conf, conf, kwargs)
        self.stage = DnCNNStage(conf["channels"], conf["channels"], conf["depth"], conf["features"], conf["bn_momentum"])

    @property
    def halo(self) -> int:
        """Receptive-field radius in pixels (context a tile needs for exact tiled inference)."""
        return self.conf["depth"]

    @property
    def grid_stride(self) -> int:
        """Tiles must start at multiples of this for tiled inference to equal untiled (1: any)."""
        return 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, self.conf["channels"], "DnCNN")
        return self.stage(x)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.conf.items())


class N3NetDenoiser(nn.Module):
    """Denoising N3Net: DnCNN stages with N3 blocks between them, ``(B, C, H, W) -> (B, C, H, W)``.

    Configuration:
        channels: image channels (1 grey, 3 colour).
        stages: number of DnCNN stages (3: the paper's N3Net; 2: its light variant).
        depth, features: of each stage (6, 64).
        block_channels: output channels of every stage but the last (8), the block input width.
        k: neighbours of each block (7).
        block: dict of further :class:`n3images.N3Block2d` options (patch_size, stride, window,
            relaxation, embed, ...). ``{"embed": "none", "relaxation": "hard"}`` with
            ``match_on="input"`` is the paper's KNN baseline (matching noisy input patches).
        match_on: ``"features"`` (the block input, through the embedding CNN) or ``"input"``
            (patches of the network input; needs ``block={"embed": "none"}``).
    """

    default_conf = {
        "channels": 1,
        "stages": 3,
        "depth": 6,
        "features": 64,
        "block_channels": 8,
        "k": 7,
        "block": {},
        "match_on": "features",
        "bn_momentum": 0.1,
    }

    def __init__(self, conf: dict | None = None, **kwargs: object):
        super().__init__()
        self.conf = conf = merge_conf(self.default_conf, conf, kwargs)
        if conf["stages"] < 1:
            raise ValueError(f"N3NetDenoiser: stages must be >= 1, got {conf['stages']}")
        if conf["match_on"] not in ("features", "input"):
            raise ValueError(f"N3NetDenoiser: match_on must be 'features' or 'input', got {conf['match_on']!r}")
        if conf["match_on"] == "input" and conf["block"].get("embed", "cnn") != "none":
            raise ValueError("N3NetDenoiser: match_on='input' needs block={'embed': 'none'} (a fixed matching space)")
        C, bc, k = conf["channels"], conf["block_channels"], conf["k"]
        self.stages, self.blocks = nn.ModuleList(), nn.ModuleList()
        c_in = C
        for i in range(conf["stages"]):
            last = i == conf["stages"] - 1
            c_out = C if last else bc
            self.stages.append(DnCNNStage(c_in, c_out, conf["depth"], conf["features"], conf["bn_momentum"]))
            if not last:
                block = N3Block2d(bc, k=k, **conf["block"])
                self.blocks.append(block)
                c_in = block.out_channels

    @property
    def halo(self) -> int:
        return sum(s.depth for s in self.stages) + sum(b.halo for b in self.blocks)

    @property
    def grid_stride(self) -> int:
        return max([b.conf["stride"] for b in self.blocks] or [1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, self.conf["channels"], "N3NetDenoiser")
        guide = x if self.conf["match_on"] == "input" else None
        h = x
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if i < len(self.blocks):
                h = self.blocks[i](h, guide)
        return h

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.conf.items())


IMAGE_MODELS = {"dncnn": DnCNN, "n3net": N3NetDenoiser}


def _register():
    from n3sets.pretrained import register_model_class

    for cls in (DnCNN, N3NetDenoiser):
        register_model_class(cls)


_register()
