"""Image models: the denoisers DnCNN (Zhang et al., TIP 2017) and N3Net (Ploetz & Roth 2018, Sec. 5.1), and
the super-resolution models VDSR (Kim et al., CVPR 2016) and N3Net-SR (Ploetz & Roth 2018, Sec. 5.4).

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

Super-resolution models take the bicubically upscaled luma ``(B, 1, H, W)`` (the low-resolution
image brought back to the target size, :func:`n3images.sr.bicubic_input`) and return the
high-resolution luma of the same size; one model serves every scale. :class:`VDSR` is one stage
of 20 ``conv3x3 (bias) -> ReLU`` layers with 64 features, no batch norm, plus the input (the global
residual). :class:`N3NetSR` is :class:`N3NetDenoiser` built from VDSR stages: three of depth 7
without their own skips, N3 blocks (k = 7) between them, and one global residual.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from n3sets.models import merge_conf

from .n3block2d import N3Block2d

__all__ = ["DnCNNStage", "DnCNN", "N3NetDenoiser", "VDSR", "N3NetSR", "IMAGE_MODELS", "DENOISERS", "SR_MODELS",
           "IMAGE_MODEL_CLASSES", "NOISE_INPUTS", "model_task", "is_nonblind", "noise_level_kwargs"]


#: ``noise_input`` of the denoisers: ``"none"`` (blind) or ``"level"`` (told the noise level)
NOISE_INPUTS = ("none", "level")


def _check_noise_input(conf: dict, name: str) -> int:
    """Input channels of the first layer per image channel: 1 (blind) or 2 (image + noise std map)."""
    kind = conf.get("noise_input", "none")
    if kind not in NOISE_INPUTS:
        raise ValueError(f"{name}: noise_input must be one of {', '.join(map(repr, NOISE_INPUTS))}, got {kind!r}")
    return 2 if kind == "level" else 1


def is_nonblind(model: nn.Module) -> bool:
    """Whether ``model`` is a denoiser told the noise level (``conf["noise_input"] == "level"``)."""
    return getattr(model, "conf", {}).get("noise_input", "none") == "level"


def _with_noise_map(model: nn.Module, x: torch.Tensor, noise_level) -> torch.Tensor:
    """``x`` (blind model), or ``x`` with the per-pixel noise standard deviation appended
    (``noise_input="level"``): ``sqrt(a * max(x, 0) + b)`` of every channel, computed from the
    noisy input itself, for ``noise_level = (a, b)`` (floats or ``(B,)`` tensors)."""
    name = type(model).__name__
    if not is_nonblind(model):
        if noise_level is not None:
            raise ValueError(f"{name}: a blind model (noise_input='none') takes no noise_level")
        return x
    if noise_level is None or not isinstance(noise_level, (tuple, list)) or len(noise_level) != 2:
        raise ValueError(f"{name}: a non-blind model (noise_input='level') needs noise_level=(a, b), the noise "
                         f"variance a * x + b (Gaussian noise of std s on [0, 1]: (0, s ** 2)), got {noise_level!r}")
    from .noise import noise_std_map

    return torch.cat([x, noise_std_map(x, *noise_level)], dim=1)


def noise_level_kwargs(model: nn.Module, level: dict) -> dict:
    """Keyword arguments of a call of ``model`` on an image with this noise: ``{}`` for a blind
    model, ``{"noise_level": (a, b)}`` for a ``noise_input="level"`` one. ``level``:
    ``{"sigma": s}`` (white Gaussian, 0-255 scale: ``(0, (s / 255) ** 2)``) or ``{"a": a, "b": b}``
    (floats, or ``(B,)`` tensors: one pair per image of a batch); an empty ``level``: ``{}``."""
    if not level or not is_nonblind(model):
        return {}
    if "sigma" in level:
        return {"noise_level": (0.0, (float(level["sigma"]) / 255.0) ** 2)}
    a, b = level["a"], level["b"]  # floats, or (B,) tensors of a training batch
    return {"noise_level": (a if isinstance(a, torch.Tensor) else float(a), b if isinstance(b, torch.Tensor) else float(b))}


def _check_image(x: torch.Tensor, channels: int, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: input must have shape (B, {channels}, H, W), got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: input must be floating point, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name}: empty input {tuple(x.shape)}")


class DnCNNStage(nn.Module):
    """``conv+ReLU, (depth-2) x conv+BN+ReLU, conv``; the input is added to the first min(C_in, C_out) channels.

    ``batch_norm=False``: the middle layers are ``conv (bias) + ReLU`` (a VDSR stage);
    ``residual=False``: the input is not added.
    """

    def __init__(self, in_channels: int, out_channels: int, depth: int = 17, features: int = 64,
                 bn_momentum: float = 0.1, batch_norm: bool = True, residual: bool = True):
        super().__init__()
        if depth < 2:
            raise ValueError(f"DnCNNStage: depth must be >= 2, got {depth}")
        self.in_channels, self.out_channels, self.depth, self.features = in_channels, out_channels, depth, features
        self.batch_norm, self.residual = bool(batch_norm), bool(residual)
        layers = [nn.Conv2d(in_channels, features, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            if batch_norm:
                layers += [nn.Conv2d(features, features, 3, padding=1, bias=False),
                           nn.BatchNorm2d(features, momentum=bn_momentum), nn.ReLU(inplace=True)]
            else:
                layers += [nn.Conv2d(features, features, 3, padding=1), nn.ReLU(inplace=True)]
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
        if not self.residual:
            return out
        c = min(self.in_channels, self.out_channels)
        if c == self.out_channels:
            return out + x[:, :c]
        return torch.cat([out[:, :c] + x[:, :c], out[:, c:]], dim=1)

    def extra_repr(self) -> str:
        extra = "" if self.batch_norm else ", batch_norm=False"
        extra += "" if self.residual else ", residual=False"
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, depth={self.depth}, "
                f"features={self.features}{extra}")


class DnCNN(nn.Module):
    """DnCNN: one residual stage of ``depth`` layers, ``(B, C, H, W) -> (B, C, H, W)``.

    Configuration: ``channels`` (1 grey, 3 colour), ``depth`` (17), ``features`` (64), ``bn_momentum``,
    ``noise_input`` (``"none"``: blind; ``"level"``: the call gives ``noise_level=(a, b)`` and the
    per-pixel noise standard deviation map is a further input, see :class:`N3NetDenoiser`).
    """

    default_conf = {"channels": 1, "depth": 17, "features": 64, "bn_momentum": 0.1, "noise_input": "none"}

    def __init__(self, conf: dict | None = None, **kwargs: object):
        super().__init__()
        self.conf = conf = merge_conf(self.default_conf, conf, kwargs)
        per_channel = _check_noise_input(conf, "DnCNN")
        self.stage = DnCNNStage(per_channel * conf["channels"], conf["channels"], conf["depth"], conf["features"],
                                conf["bn_momentum"])

    @property
    def halo(self) -> int:
        """Receptive-field radius in pixels (context a tile needs for exact tiled inference)."""
        return self.conf["depth"]

    @property
    def grid_stride(self) -> int:
        """Tiles must start at multiples of this for tiled inference to equal untiled (1: any)."""
        return 1

    def forward(self, x: torch.Tensor, noise_level=None) -> torch.Tensor:
        """``noise_level``: ``(a, b)`` of a ``noise_input="level"`` model (required there), else None."""
        _check_image(x, self.conf["channels"], "DnCNN")
        return self.stage(_with_noise_map(self, x, noise_level))

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
        batch_norm: batch norm in the stages' middle layers (DnCNN stages; False: VDSR stages).
        residual: ``"stage"`` (every stage adds its input, no global skip: the paper's denoiser)
            or ``"global"`` (plain stages, the network input added to the output: N3Net-SR).
        noise_input: ``"none"`` (blind: the noisy image only) or ``"level"`` (non-blind: every call
            gives ``noise_level=(a, b)``, the noise variance ``a * x + b`` of the heteroscedastic
            model, ``(0, sigma ** 2)`` for white Gaussian noise; the first stage also sees the
            per-pixel standard deviation ``sqrt(a * max(x, 0) + b)`` of each channel, computed from
            the noisy input, and its residual still adds the image channels).
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
        "batch_norm": True,
        "residual": "stage",
        "noise_input": "none",
    }

    def __init__(self, conf: dict | None = None, **kwargs: object):
        super().__init__()
        self.conf = conf = merge_conf(self.default_conf, conf, kwargs)
        name = type(self).__name__
        if conf["stages"] < 1:
            raise ValueError(f"{name}: stages must be >= 1, got {conf['stages']}")
        if conf["match_on"] not in ("features", "input"):
            raise ValueError(f"{name}: match_on must be 'features' or 'input', got {conf['match_on']!r}")
        if conf["match_on"] == "input" and conf["block"].get("embed", "cnn") != "none":
            raise ValueError(f"{name}: match_on='input' needs block={{'embed': 'none'}} (a fixed matching space)")
        if conf["residual"] not in ("stage", "global"):
            raise ValueError(f"{name}: residual must be 'stage' or 'global', got {conf['residual']!r}")
        stage_residual = conf["residual"] == "stage"
        C, bc, k = conf["channels"], conf["block_channels"], conf["k"]
        self.stages, self.blocks = nn.ModuleList(), nn.ModuleList()
        c_in = C * _check_noise_input(conf, name)
        for i in range(conf["stages"]):
            last = i == conf["stages"] - 1
            c_out = C if last else bc
            self.stages.append(DnCNNStage(c_in, c_out, conf["depth"], conf["features"], conf["bn_momentum"],
                                          batch_norm=conf["batch_norm"], residual=stage_residual))
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

    def forward(self, x: torch.Tensor, temperature_scale: float = 1.0,
                temperature_input: torch.Tensor | None = None, noise_level=None) -> torch.Tensor:
        """``temperature_scale``: multiplies the temperatures of every N3 block (1: as trained);
        ``temperature_input``: extra input of the blocks' temperature CNNs (:class:`N3Block2d`);
        ``noise_level``: ``(a, b)`` of a ``noise_input="level"`` model (required there), else None."""
        _check_image(x, self.conf["channels"], type(self).__name__)
        guide = x if self.conf["match_on"] == "input" else None
        h = _with_noise_map(self, x, noise_level)
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if i < len(self.blocks):
                h = self.blocks[i](h, guide, temperature_scale, temperature_input)
        return h + x if self.conf["residual"] == "global" else h

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.conf.items())


class VDSR(nn.Module):
    """VDSR (Kim et al. 2016): ``depth`` 3x3 conv layers with ReLU, no batch norm, global residual.

    ``(B, C, H, W) -> (B, C, H, W)``: the bicubically upscaled image in, the sharpened image out
    (the network learns the residual). Configuration: ``channels`` (1: the luma), ``depth`` (20),
    ``features`` (64).
    """

    default_conf = {"channels": 1, "depth": 20, "features": 64}

    def __init__(self, conf: dict | None = None, **kwargs: object):
        super().__init__()
        self.conf = conf = merge_conf(self.default_conf, conf, kwargs)
        self.stage = DnCNNStage(conf["channels"], conf["channels"], conf["depth"], conf["features"], batch_norm=False)

    @property
    def halo(self) -> int:
        return self.conf["depth"]

    @property
    def grid_stride(self) -> int:
        return 1

    def forward(self, x: torch.Tensor, scale: int | None = None) -> torch.Tensor:
        """``scale`` is accepted so that every SR model takes the same call; VDSR does not use it."""
        _check_image(x, self.conf["channels"], "VDSR")
        return self.stage(x)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.conf.items())


class N3NetSR(N3NetDenoiser):
    """Super-resolution N3Net: three VDSR stages of depth 7 with two N3 blocks (k = 7) between them,
    global residual; ``(B, 1, H, W)`` bicubic luma -> ``(B, 1, H, W)``.

    The configuration keys are :class:`N3NetDenoiser`'s, with VDSR stages (``batch_norm=False``)
    and ``residual="global"`` by default, plus ``scale_temperature``: ``{"2": f2, "3": f3, ...}``,
    the factor by which the N3 blocks' temperatures are multiplied when :meth:`forward` is told
    the upscaling factor (missing scales and ``scale=None``: 1, the network as trained). One model
    serves every scale, but its temperature CNN sees only the bicubic image, not the scale; the
    factors are a per-scale calibration chosen on validation images after training
    (``pipelines/calibrate_sr.py``, :func:`n3images.sr.calibrate_temperature`). ``scale_aware``
    (default False) is the trained alternative: the temperature CNNs get one more input channel,
    the constant ``log(scale)``, so one network can learn a temperature per scale; such a model
    must be told the scale (``train_sr.py`` and every SR program do).
    """

    default_conf = {**{k: v for k, v in N3NetDenoiser.default_conf.items() if k != "noise_input"},
                    "depth": 7, "batch_norm": False, "residual": "global", "scale_temperature": {}, "scale_aware": False}

    def __init__(self, conf: dict | None = None, **kwargs: object):
        merged = merge_conf(self.default_conf, conf, kwargs)
        if not isinstance(merged["scale_aware"], bool):
            raise ValueError(f"N3NetSR: scale_aware must be true or false, got {merged['scale_aware']!r}")
        if merged["scale_aware"]:
            merged["block"] = {**merged["block"], "temp_extra_channels": 1}
        super().__init__(merged)
        table = self.conf["scale_temperature"]
        if not isinstance(table, dict):
            raise ValueError(f"N3NetSR: scale_temperature must be a dict {{scale: factor}}, got {table!r}")
        for key, factor in table.items():
            if not (str(key).isdigit() and int(key) >= 2):
                raise ValueError(f"N3NetSR: scale_temperature key {key!r} is not an integer scale >= 2")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (math.isfinite(factor) and factor > 0):
                raise ValueError(f"N3NetSR: scale_temperature[{key!r}] must be a positive number, got {factor!r}")
        self.conf["scale_temperature"] = {str(int(k)): float(v) for k, v in table.items()}

    def temperature_scale(self, scale: int | None) -> float:
        """The temperature factor used at ``scale`` (1.0 for None or an uncalibrated scale)."""
        return 1.0 if scale is None else self.conf["scale_temperature"].get(str(int(scale)), 1.0)

    def forward(self, x: torch.Tensor, scale: int | None = None) -> torch.Tensor:
        """``x (B, 1, H, W)`` bicubic luma -> ``(B, 1, H, W)``; ``scale`` picks the calibrated
        temperature factor and, for a ``scale_aware`` model (where it is required), is the extra
        input of the temperature CNNs."""
        extra = None
        if self.conf["scale_aware"]:
            if scale is None or isinstance(scale, bool) or int(scale) != scale or scale < 2:
                raise ValueError(f"N3NetSR: a scale_aware model needs the integer scale (>= 2), got {scale!r}")
            extra = torch.full((x.shape[0], 1, x.shape[2], x.shape[3]), math.log(scale), dtype=x.dtype, device=x.device)
        return super().forward(x, temperature_scale=self.temperature_scale(scale), temperature_input=extra)


#: denoisers by the name ``train_denoise.py --model`` takes
DENOISERS = {"dncnn": DnCNN, "n3net": N3NetDenoiser}
#: the denoisers (kept under its first name for existing callers)
IMAGE_MODELS = DENOISERS
#: super-resolution models by the name ``train_sr.py --model`` takes
SR_MODELS = {"vdsr": VDSR, "n3net": N3NetSR}
IMAGE_MODEL_CLASSES = (DnCNN, N3NetDenoiser, VDSR, N3NetSR)


def model_task(model: nn.Module) -> str | None:
    """``"denoising"``, ``"super-resolution"`` or None (not an image model) for a model instance."""
    if type(model) in SR_MODELS.values():
        return "super-resolution"
    if type(model) in DENOISERS.values():
        return "denoising"
    return None


def _register():
    """Every image model in the one registry of n3sets.pretrained, with its task and --model name."""
    from n3sets.pretrained import register_model_class

    for task, classes in (("denoising", DENOISERS), ("super-resolution", SR_MODELS)):
        for program_name, cls in classes.items():
            register_model_class(cls, task=task, program_name=program_name)


_register()
