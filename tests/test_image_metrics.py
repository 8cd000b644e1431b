import math

import numpy as np
import pytest
import torch
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from n3images.io import list_images, read_image
from n3images.metrics import psnr, rgb_to_y, shave, ssim
from n3images.noise import add_gaussian_noise


def _sk_ssim(x, y, data_range=1.0):
    # the denoising papers' convention (Wang et al. 2004)
    return structural_similarity(
        np.asarray(x, np.float64), np.asarray(y, np.float64), data_range=data_range, gaussian_weights=True,
        sigma=1.5, use_sample_covariance=False, channel_axis=-1 if np.ndim(x) == 3 else None,
    )


def test_psnr_hand_computed():
    x = np.zeros((4, 5))
    assert psnr(x, x + 0.1) == pytest.approx(20.0)  # mse 0.01
    assert psnr(x, x + 25.5, data_range=255) == pytest.approx(20.0)
    y = x.copy()
    y[0, 0] = 1.0  # mse 1/20
    assert psnr(x, y) == pytest.approx(10 * math.log10(20))
    assert psnr(y, y) == math.inf


def test_psnr_matches_skimage_and_accepts_torch():
    rng = np.random.default_rng(0)
    x = rng.random((37, 41, 3))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    ref = peak_signal_noise_ratio(x, y, data_range=1.0)
    assert psnr(x, y) == pytest.approx(ref, abs=1e-10)
    assert psnr(torch.from_numpy(x).float(), torch.from_numpy(y).float()) == pytest.approx(ref, abs=1e-4)


@pytest.mark.parametrize("shape", [(64, 48), (11, 11), (40, 33, 3), (30, 30, 1)])
@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_ssim_matches_skimage_random(shape, data_range):
    rng = np.random.default_rng(1)
    x = rng.random(shape) * data_range
    y = np.clip(x + rng.normal(0, 0.2 * data_range, shape), 0, data_range)
    assert ssim(x, y, data_range=data_range) == pytest.approx(_sk_ssim(x, y, data_range), abs=1e-6)


def test_ssim_properties():
    rng = np.random.default_rng(2)
    x = rng.random((32, 32))
    y = x + rng.normal(0, 0.05, x.shape)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert ssim(x, y) == pytest.approx(ssim(y, x), abs=1e-12)
    assert ssim(x, y) < 0.99
    assert ssim(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(ssim(x, y), abs=1e-12)
    # a stronger corruption scores lower
    assert ssim(x, x + rng.normal(0, 0.2, x.shape)) < ssim(x, y)


def test_metrics_on_real_images(data_root):
    files = list_images(data_root / "images" / "set12")
    for i in (0, 7):  # 256x256 and 512x512
        clean = read_image(files[i])
        noisy = add_gaussian_noise(clean, 25, i)
        assert psnr(noisy, clean) == pytest.approx(peak_signal_noise_ratio(clean.astype(np.float64), noisy.astype(np.float64), data_range=1.0), abs=1e-6)
        assert psnr(noisy, clean) == pytest.approx(20.17, abs=0.1)  # sigma 25 without clipping
        assert ssim(noisy, clean) == pytest.approx(_sk_ssim(noisy, clean), abs=1e-6)
    colour = read_image(list_images(data_root / "images" / "set5")[0])
    assert colour.ndim == 3
    noisy = add_gaussian_noise(colour, 15, 0)
    assert ssim(noisy, colour) == pytest.approx(_sk_ssim(noisy, colour), abs=1e-6)
    assert ssim(rgb_to_y(noisy), rgb_to_y(colour)) == pytest.approx(_sk_ssim(rgb_to_y(noisy), rgb_to_y(colour)), abs=1e-6)


@pytest.mark.parametrize("func", [psnr, ssim])
def test_metric_errors(func):
    with pytest.raises(ValueError, match=r"\(16, 16\) and \(16, 17\)"):
        func(np.zeros((16, 16)), np.zeros((16, 17)))
    with pytest.raises(ValueError, match="empty"):
        func(np.zeros((0, 16)), np.zeros((0, 16)))
    bad = np.zeros((16, 16))
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        func(bad, np.zeros((16, 16)))
    with pytest.raises(ValueError, match=r"channel-last.*\(3, 16, 16\)"):
        func(np.zeros((3, 16, 16)), np.zeros((3, 16, 16)))
    with pytest.raises(ValueError, match="data_range"):
        func(np.zeros((16, 16)), np.zeros((16, 16)), data_range=0)
    with pytest.raises(ValueError, match="numpy array or torch tensor"):
        func([[0.0]], [[0.0]])


def test_ssim_too_small():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(np.zeros((10, 20)), np.zeros((10, 20)))


def test_rgb_to_y_known_values():
    colours = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    expected = np.array([235.0, 16.0, 16 + 65.481, 16 + 128.553, 16 + 24.966]) / 255
    np.testing.assert_allclose(rgb_to_y(colours), expected, atol=1e-12)
    t = rgb_to_y(torch.tensor(colours, dtype=torch.float32))
    assert t.dtype == torch.float32 and t.shape == (5,)
    np.testing.assert_allclose(t.numpy(), expected, atol=1e-6)
    img = np.random.default_rng(3).random((8, 9, 3))
    np.testing.assert_allclose(rgb_to_y(img), rgb2ycbcr(img)[..., 0] / 255, atol=1e-10)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        rgb_to_y(np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="float"):
        rgb_to_y(np.zeros((8, 8, 3), np.uint8))


def test_shave():
    img = np.arange(10 * 12 * 3).reshape(10, 12, 3)
    out = shave(img, 2)
    assert out.shape == (6, 8, 3)
    assert out[0, 0, 0] == img[2, 2, 0] and out[-1, -1, -1] == img[7, 9, 2]
    assert shave(img, 0) is img
    assert shave(torch.zeros(10, 12), 4).shape == (2, 4)
    with pytest.raises(ValueError, match="border 5"):
        shave(img, 5)
    with pytest.raises(ValueError, match="border"):
        shave(img, -1)
