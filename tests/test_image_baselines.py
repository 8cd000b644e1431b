import sys

import numpy as np
import pytest
import torch

from n3images.baselines import BASELINES, bm3d_denoise, nlm_denoise
from n3images.io import list_images, read_image
from n3images.metrics import psnr
from n3images.noise import add_gaussian_noise


@pytest.fixture(scope="module")
def crop(data_root):
    # a 96x96 crop of set12 01.png (cameraman), benchmark noise at sigma 25
    clean = read_image(list_images(data_root / "images" / "set12")[0])[80:176, 80:176]
    return clean, add_gaussian_noise(clean, 25, 0)


def test_registry():
    assert BASELINES == {"bm3d": bm3d_denoise, "nlm": nlm_denoise}


def test_baselines_improve_psnr_on_real_crop(crop):
    clean, noisy = crop
    p_noisy = psnr(noisy, clean)
    assert p_noisy == pytest.approx(20.14, abs=0.1)
    results = {}
    for name, func in BASELINES.items():
        out = func(noisy, 25)
        assert out.shape == clean.shape and out.dtype == np.float32
        results[name] = psnr(out, clean)
    # measured: bm3d 27.16 dB, nlm 26.36 dB
    assert results["bm3d"] > p_noisy + 6.5
    assert results["nlm"] > p_noisy + 5.5
    assert results["bm3d"] > results["nlm"]


def test_colour_and_torch_input(data_root):
    clean = read_image(list_images(data_root / "images" / "set5")[0])[:64, :64]
    assert clean.shape == (64, 64, 3)
    noisy = add_gaussian_noise(clean, 25, 0)
    for func in BASELINES.values():
        out = func(torch.from_numpy(noisy), 25)
        assert isinstance(out, np.ndarray) and out.shape == clean.shape and out.dtype == np.float64
        assert psnr(out, clean) > psnr(noisy, clean) + 6


def test_wrong_sigma_is_worse(crop):
    # the denoisers use sigma: a 4x too small sigma leaves most of the noise in
    clean, noisy = crop
    for func in BASELINES.values():
        assert psnr(func(noisy, 25), clean) > psnr(func(noisy, 6.25), clean) + 2


@pytest.mark.parametrize("func", [bm3d_denoise, nlm_denoise])
def test_bad_input(func):
    img = np.zeros((16, 16))
    for sigma in (0, -5, float("nan"), "25"):
        with pytest.raises(ValueError, match="sigma"):
            func(img, sigma)
    with pytest.raises(ValueError, match=r"\(16, 16, 2\)"):
        func(np.zeros((16, 16, 2)), 25)
    with pytest.raises(ValueError, match="NaN"):
        func(np.full((16, 16), np.nan), 25)


def test_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "bm3d", None)  # makes `import bm3d` raise ImportError
    with pytest.raises(ImportError, match="pip install bm3d"):
        bm3d_denoise(np.zeros((16, 16)), 25)
