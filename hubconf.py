"""torch.hub entry points: the shipped models of this repository by name.

    model = torch.hub.load("/path/to/checkout", "n3net_strecha", source="local")
    mf = torch.hub.load("/path/to/checkout", "match_filter", source="local", name="cnnet-strecha")
    torch.hub.list("/path/to/checkout", source="local")

One entry per shipped weight file (``n3sets/weights/*.pt``, ``n3images/weights/*.pt``), named
like the file with ``-`` replaced by ``_``. Each returns the model in eval mode exactly as
:func:`n3sets.pretrained.load_model` does (same class, conf, weights and ``meta``); with
``pretrained=False`` it returns the same architecture, freshly initialised. ``match_filter``
returns a ready :class:`n3sets.MatchFilter`. Keyword arguments are passed through.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: hub entries import n3sets when called
    from n3sets.match_filter import MatchFilter

# checked by torch.hub before any entry runs (module names as imported)
dependencies = ["torch", "torch_geometric", "numpy", "scipy", "cv2"]

__all__ = [
    "cnnet_strecha",
    "cnnet_strecha_refine",
    "cnnet_strecha_side",
    "n3net_strecha",
    "n3net_strecha_refine",
    "n3net_strecha_side",
    "cnnet_scenes8",
    "n3net_scenes8",
    "cnnet_scenes8_side",
    "n3net_scenes8_side",
    "dncnn_s25",
    "n3net_s25",
    "dncnn_s50",
    "n3net_s50",
    "n3net_k1_s25",
    "n3net_hetero",
    "n3net_hetero_nonblind",
    "vdsr_x234",
    "n3net_sr_x234",
    "n3net_sr_x234_cal",
    "vdsr_x234_ft",
    "n3net_sr_x234_ft",
    "n3net_sr_x234_ft_cal",
    "vdsr_x234_ft2",
    "n3net_sr_x234_ft2",
    "n3net_sr_aware_x234",
    "match_filter",
]


def _correspondence_model(name: str, pretrained: bool, map_location) -> torch.nn.Module:
    from n3sets.pretrained import build_model, load_model, read_weight_file

    if pretrained:
        return load_model(name, map_location=map_location)
    model = build_model(read_weight_file(name, map_location="cpu"), pretrained=False)
    return model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()


def _image_model(name: str, pretrained: bool, map_location) -> torch.nn.Module:
    import n3images  # registers the image weights folder and model classes

    if pretrained:
        return n3images.load_model(name, map_location=map_location)
    return _correspondence_model(name, False, map_location)


# ----------------------------------------------------------------------------- correspondences


def n3net_strecha(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """N3Net correspondence classifier trained on Strecha castle-P30 + Herz-Jesus-P25 (``n3net-strecha``).

    ``model.meta`` holds the training command and validation mAP of the shipped weights.

    Input ``(B, 4, N)`` normalized matches ``[x1, y1, x2, y2]`` (and an optional ``(B, N)``
    mask); output ``(B, N)`` inlier logits. See :mod:`n3sets.models`.

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _correspondence_model("n3net-strecha", pretrained, map_location)


def n3net_strecha_refine(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """N3Net correspondence classifier with a residual refinement stage on top of ``n3net-strecha`` (``n3net-strecha-refine``).

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _correspondence_model("n3net-strecha-refine", pretrained, map_location)


def n3net_strecha_side(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """N3Net correspondence classifier with side information (ratio test and mutual check), ``n3net-strecha-side``.

    Input ``(B, 6, N)``: the four normalized coordinates, then ratio and mutual flag.

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _correspondence_model("n3net-strecha-side", pretrained, map_location)


def cnnet_strecha(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """CNNet baseline (Yi et al. 2018, no N3 block) trained like ``n3net-strecha`` (``cnnet-strecha``).

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _correspondence_model("cnnet-strecha", pretrained, map_location)


def cnnet_strecha_refine(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """CNNet baseline with a residual refinement stage on top of ``cnnet-strecha`` (``cnnet-strecha-refine``).

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _correspondence_model("cnnet-strecha-refine", pretrained, map_location)


def cnnet_strecha_side(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """CNNet baseline with side information (ratio test and mutual check), ``cnnet-strecha-side``.

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _correspondence_model("cnnet-strecha-side", pretrained, map_location)


def n3net_scenes8(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """N3Net correspondence classifier trained on seven scenes (Strecha castle-P30, Middlebury
    templeSparseRing / dinoRing, four SfM photo scenes; ``n3net-scenes8``), selected on Herz-Jesus-P25.

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _correspondence_model("n3net-scenes8", pretrained, map_location)


def cnnet_scenes8(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """CNNet baseline trained like ``n3net-scenes8`` on the same seven scenes (``cnnet-scenes8``).

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _correspondence_model("cnnet-scenes8", pretrained, map_location)


def n3net_scenes8_side(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """``n3net-scenes8`` with side information (Lowe ratio and mutual flag as input channels),
    trained the same way on the same seven scenes (``n3net-scenes8-side``).

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _correspondence_model("n3net-scenes8-side", pretrained, map_location)


def cnnet_scenes8_side(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """CNNet with side information trained like ``n3net-scenes8-side`` (``cnnet-scenes8-side``).

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _correspondence_model("cnnet-scenes8-side", pretrained, map_location)


# ----------------------------------------------------------------------------- image restoration


def dncnn_s25(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """DnCNN denoiser for Gaussian noise of sigma 25 (images in [0, 1]), ``dncnn-s25``.

    ``(B, 1, H, W) -> (B, 1, H, W)``; :func:`n3images.denoise_image` tiles large images.

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _image_model("dncnn-s25", pretrained, map_location)


def n3net_s25(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """N3Net denoiser (DnCNN stages with N3 blocks) for Gaussian noise of sigma 25, ``n3net-s25``.

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _image_model("n3net-s25", pretrained, map_location)


def n3net_k1_s25(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """N3Net denoiser with one neighbour per N3 block (k = 1) for Gaussian noise of sigma 25,
    ``n3net-k1-s25``: the best sigma-25 network on the validation images at the shared budget.

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _image_model("n3net-k1-s25", pretrained, map_location)


def dncnn_s50(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """DnCNN denoiser for Gaussian noise of sigma 50 (images in [0, 1]), ``dncnn-s50``.

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _image_model("dncnn-s50", pretrained, map_location)


def n3net_s50(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """N3Net denoiser (DnCNN stages with N3 blocks) for Gaussian noise of sigma 50, ``n3net-s50``.

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _image_model("n3net-s50", pretrained, map_location)


def n3net_hetero(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Blind N3Net denoiser for heteroscedastic raw-like noise, ``n3net-hetero``.

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _image_model("n3net-hetero", pretrained, map_location)


def n3net_hetero_nonblind(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Non-blind N3Net denoiser for heteroscedastic raw-like noise, ``n3net-hetero-nonblind``:
    call it as ``model(x, noise_level=(a, b))`` with the noise variance ``a * x + b``
    (``(0, sigma ** 2)`` for white Gaussian noise on [0, 1]).

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _image_model("n3net-hetero-nonblind", pretrained, map_location)


def vdsr_x234(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """VDSR super-resolution (Y channel, one model for x2 / x3 / x4), ``vdsr-x234``.

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _image_model("vdsr-x234", pretrained, map_location)


def n3net_sr_x234(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """N3Net-SR super-resolution (VDSR stages with two N3Block2d; x2 / x3 / x4), ``n3net-sr-x234``.

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _image_model("n3net-sr-x234", pretrained, map_location)


def n3net_sr_x234_cal(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """``n3net-sr-x234`` with per-scale N3-block temperature factors chosen on validation images
    (``pipelines/calibrate_sr.py``), ``n3net-sr-x234-cal``; call it as ``model(x, scale=s)``.

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _image_model("n3net-sr-x234-cal", pretrained, map_location)


def vdsr_x234_ft(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """``vdsr-x234`` trained further (1200 more steps of 16 crops on the CPU), ``vdsr-x234-ft``.

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _image_model("vdsr-x234-ft", pretrained, map_location)


def n3net_sr_x234_ft(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """``n3net-sr-x234-cal`` made scale-aware (its temperature CNNs see ``log(scale)``) and trained
    further with the budget of ``vdsr-x234-ft``, ``n3net-sr-x234-ft``; call it as ``model(x, scale=s)``.

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _image_model("n3net-sr-x234-ft", pretrained, map_location)


def n3net_sr_x234_ft_cal(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """``n3net-sr-x234-ft`` with its per-scale temperature factors re-chosen on validation crops of
    building scenes (only x3 changed: 0.5 -> 1), ``n3net-sr-x234-ft-cal``; call it as ``model(x, scale=s)``.

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _image_model("n3net-sr-x234-ft-cal", pretrained, map_location)


def vdsr_x234_ft2(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """``vdsr-x234-ft`` trained one more round with the same budget (1200 steps of 16 crops on the
    CPU), ``vdsr-x234-ft2``.

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _image_model("vdsr-x234-ft2", pretrained, map_location)


def n3net_sr_x234_ft2(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """``n3net-sr-x234-ft`` trained one more round with the budget of ``vdsr-x234-ft2``,
    ``n3net-sr-x234-ft2`` (the recommended super-resolution model); call it as ``model(x, scale=s)``.

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _image_model("n3net-sr-x234-ft2", pretrained, map_location)


def n3net_sr_aware_x234(pretrained: bool = True, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """N3Net-SR whose temperature CNNs see ``log(scale)``, trained from scratch with the budget of
    ``vdsr-x234``, ``n3net-sr-aware-x234``; call it as ``model(x, scale=s)``.

    Args:
        pretrained: load the shipped weights (False: same architecture, random initialisation).
        map_location: device to load onto.
    """
    return _image_model("n3net-sr-aware-x234", pretrained, map_location)


# ----------------------------------------------------------------------------- user-facing API


def match_filter(name: str = "n3net-strecha", device: str | torch.device = "cpu", **conf: object) -> MatchFilter:
    """A ready :class:`n3sets.MatchFilter` (learned outlier filter of putative matches).

    Args:
        name: shipped correspondence model (``"n3net-strecha"``, ``"cnnet-strecha"``, ...) or a
            weight file path.
        device: where the network runs (``"cpu"``, ``"cuda"``, ``"auto"``).
        **conf: MatchFilter options (e.g. ``threshold=0.5``), passed through.

    Returns:
        ``MatchFilter``; ``mf.filter(kpts1, kpts2, K1, K2)`` gives inliers, E, R, t.
    """
    from n3sets.match_filter import MatchFilter

    return MatchFilter.from_pretrained(name, device=device, **conf)
