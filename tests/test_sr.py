"""Super-resolution conventions (MATLAB bicubic imresize, BT.601 luma, modcrop and shave) and the SR models."""
import math

import numpy as np
import pytest
import torch

import n3images
from n3images.inference import tiled_apply
from n3images.metrics import modcrop, rgb_to_y, rgb_to_ycbcr, shave, ycbcr_to_rgb
from n3images.models import N3NetSR, VDSR, model_task
from n3images.resize import cubic, imresize, resize_batch, resize_matrix
from n3images.sr import degrade, degrade_batch, from_luma, sr_scores, to_luma, upscale_image
from n3sets.pretrained import save_model

torch.set_num_threads(1)
SMALL_BLOCK = {"patch_size": 4, "stride": 2, "window": 5}

# The kernel shrunk by 2 (antialiasing), 0.5 * cubic(0.5 t), at the half-integer offsets of a x1/2
# output pixel, by hand: cubic(0.25) = 0.8671875, cubic(0.75) = 0.2265625, cubic(1.25) = -0.0703125,
# cubic(1.75) = -0.0234375; they sum to 1 over both sides, so normalising changes nothing.
W_HALF = {0.5: 0.43359375, 1.5: 0.11328125, 2.5: -0.03515625, 3.5: -0.01171875}


def test_cubic_kernel_values():
    assert cubic(np.array([0.0, 0.25, 0.75, 1.0, 1.25, 1.75, 2.0, 2.5])) == pytest.approx(
        [1.0, 0.8671875, 0.2265625, 0.0, -0.0703125, -0.0234375, 0.0, 0.0], abs=1e-15)
    assert 0.5 * cubic(0.5 * np.array(list(W_HALF))) == pytest.approx(list(W_HALF.values()), abs=1e-15)


def test_ramp_downscale_by_hand():
    ramp = np.tile(np.arange(1, 17, dtype=np.float64), (3, 1))  # rows 1..16 along the width
    out = imresize(ramp, 0.5)
    assert out.shape == (2, 8)
    # interior: output x sits at u = 2x - 0.5, between two samples; a symmetric kernel keeps a line
    assert out[0, 2:6] == pytest.approx([5.5, 7.5, 9.5, 11.5], abs=1e-12)
    # x = 1, u = 1.5: taps 1,2 | 0,3 | -1,4 | -2,5 with 0 -> 1, -1 -> 2, -2 -> 3 (edge mirrored)
    first = W_HALF[0.5] * (1 + 2) + W_HALF[1.5] * (1 + 3) + W_HALF[2.5] * (2 + 4) + W_HALF[3.5] * (3 + 5)
    assert first == 1.44921875
    assert out[0, 0] == pytest.approx(first, abs=1e-12)
    assert out[0, -1] == pytest.approx(17 - first, abs=1e-12)  # mirror image of the first
    assert np.allclose(out, out[0])  # constant along the height


def test_ramp_upscale_by_hand():
    ramp = np.arange(1, 9, dtype=np.float64)[:, None] * np.ones((1, 4))
    out = imresize(ramp, 2)
    assert out.shape == (16, 8)
    # x = 2: u = 2/2 + 0.25 = 1.25, taps 0 (-> 1), 1, 2, 3 at offsets 1.25, 0.25, -0.75, -1.75
    value = -0.0703125 * 1 + 0.8671875 * 1 + 0.2265625 * 2 - 0.0234375 * 3
    assert out[1, 0] == pytest.approx(value, abs=1e-12) and value == 1.1796875
    # interior outputs reproduce the line u(x) = x / 2 + 0.25 (cubic convolution is exact on lines)
    x = np.arange(5, 13)
    assert out[x - 1, 2] == pytest.approx(x / 2 + 0.25, abs=1e-12)


def test_checkerboard_downscale_by_hand():
    board = (np.add.outer(np.arange(16), np.arange(16)) % 2).astype(np.float64)  # 0 at (1, 1)
    out = imresize(board, 0.5)
    # along one axis an alternating 0,1,0,... becomes 1/2 inside (each symmetric tap pair holds a 0
    # and a 1) and, at x = 1, W(0.5) * (0 + 1) + W(1.5) * (0 + 0) + W(2.5) * (1 + 1) + W(3.5) * (0 + 0)
    f1 = W_HALF[0.5] + 2 * W_HALF[2.5]
    assert f1 == 0.36328125
    # the board is a(i) (1 - a(j)) + (1 - a(i)) a(j), separable per term
    assert out[3, 4] == pytest.approx(0.5, abs=1e-12)
    assert out[0, 0] == pytest.approx(2 * f1 * (1 - f1), abs=1e-12)
    assert out[0, 4] == pytest.approx(f1 * 0.5 + (1 - f1) * 0.5, abs=1e-12)


def _reference_1d(signal: np.ndarray, scale: float, m: int) -> np.ndarray:
    """The kernel definition written out as loops (1-based coordinates, symmetric edges)."""
    n, width = len(signal), (4 / scale if scale < 1 else 4)
    h = (lambda t: scale * cubic(scale * t)) if scale < 1 else cubic
    out = []
    for x in range(1, m + 1):
        u = x / scale + 0.5 * (1 - 1 / scale)
        total = weight = 0.0
        for j in range(math.floor(u - width / 2), math.floor(u - width / 2) + math.ceil(width) + 2):
            i = j
            while not 1 <= i <= n:
                i = 1 - i if i < 1 else 2 * n + 1 - i
            w = float(h(u - j))
            total, weight = total + w * signal[i - 1], weight + w
        out.append(total / weight)
    return np.array(out)


@pytest.mark.parametrize("n, scale", [(10, 0.35), (7, 0.3), (9, 1.5), (13, 1 / 3)])
def test_non_integer_output_size(n, scale):
    rng = np.random.default_rng(n)
    sig = rng.random(n)
    m = math.ceil(n * scale - 1e-9)
    assert resize_matrix(n, scale=scale).shape == (m, n)
    assert imresize(np.tile(sig, (2, 1)), (1, scale))[0] == pytest.approx(_reference_1d(sig, scale, m), abs=1e-12)
    assert np.allclose(resize_matrix(n, scale=scale).sum(1), 1)


def test_output_size_and_separability():
    img = np.random.default_rng(0).random((48, 30, 3))
    assert imresize(img, 1 / 3).shape == (16, 10, 3)  # 48 * (1/3) is 16, not 17
    assert imresize(img, output_shape=(20, 7)).shape == (20, 7, 3)
    # one dimension at a time: resizing rows then columns equals the 2-D call
    rows = imresize(img, (0.5, 1.0))
    both = imresize(rows, (1.0, 0.25))
    assert both == pytest.approx(imresize(img, (0.5, 0.25)), abs=1e-12)
    # the torch path gives the same numbers
    t = torch.from_numpy(img).permute(2, 0, 1)
    assert resize_batch(t, 0.5).permute(1, 2, 0).numpy() == pytest.approx(imresize(img, 0.5), abs=1e-12)
    # constants stay constant (weights sum to 1)
    assert imresize(np.full((9, 11), 0.7), 0.4) == pytest.approx(np.full((4, 5), 0.7), abs=1e-12)


def test_resize_errors():
    with pytest.raises(ValueError, match="scale"):
        imresize(np.zeros((4, 4)), 0)
    with pytest.raises(ValueError, match="output_shape"):
        imresize(np.zeros((4, 4)), output_shape=(0, 3))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        imresize(np.zeros(4), 2)
    with pytest.raises(ValueError, match="floating-point"):
        resize_batch(torch.zeros(3, 4, dtype=torch.int64), 2)


def test_luma_known_values():
    rgb = np.array([[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    assert rgb_to_y(rgb) * 255 == pytest.approx([16, 235, 16 + 65.481, 16 + 128.553, 16 + 24.966], abs=1e-9)
    # MATLAB: rgb2ycbcr(uint8([255 0 0])) = [81 90 240]
    ycc = rgb_to_ycbcr(rgb[2:3]) * 255
    assert np.rint(ycc[0]).tolist() == [81, 90, 240]
    chroma = 128 + np.array([[0, 0], [0, 0], [-37.797, 112], [-74.203, -93.786], [112, -18.214]])
    assert np.abs(rgb_to_ycbcr(rgb)[:, 1:] * 255 - chroma).max() < 1e-9
    x = np.random.default_rng(1).random((5, 4, 3))
    assert ycbcr_to_rgb(rgb_to_ycbcr(x)) == pytest.approx(x, abs=1e-12)
    assert torch.allclose(rgb_to_y(torch.from_numpy(x)), torch.from_numpy(rgb_to_y(x)))
    # grey images are R = G = B
    g = np.random.default_rng(2).random((3, 4))
    assert to_luma(g) == pytest.approx(rgb_to_y(np.repeat(g[..., None], 3, 2)), abs=1e-12)
    assert from_luma(to_luma(g)) == pytest.approx(g, abs=1e-12)
    assert to_luma(np.array([[1.0]]), quantize=True)[0, 0] == 235 / 255


def test_modcrop_and_shave():
    img = np.arange(7 * 10).reshape(7, 10).astype(float)
    assert modcrop(img, 3).shape == (6, 9) and np.array_equal(modcrop(img, 3), img[:6, :9])
    assert modcrop(np.zeros((8, 8, 3)), 4).shape == (8, 8, 3)
    assert np.array_equal(shave(img, 2), img[2:-2, 2:-2])
    with pytest.raises(ValueError, match="smaller than the scale"):
        modcrop(np.zeros((2, 5)), 3)
    with pytest.raises(ValueError, match="scale"):
        modcrop(img, 0)


def test_degrade_and_scores():
    hr = np.random.default_rng(3).random((24, 36))
    lr, inp = degrade(hr, 3)
    assert lr.shape == (8, 12) and inp.shape == hr.shape
    batch = degrade_batch(torch.from_numpy(hr)[None, None].float(), 3)
    assert batch[0, 0].numpy() == pytest.approx(inp, abs=1e-5)
    with pytest.raises(ValueError, match="multiple of the scale"):
        degrade(hr[:23], 3)
    p, s = sr_scores(hr, hr, 3)
    assert p == math.inf or p > 50
    # only the shaved centre counts
    spoiled = hr.copy()
    spoiled[:3] = 0
    assert sr_scores(spoiled, hr, 3, quantize=False)[0] == math.inf


def test_models_shapes_halo_registry(tmp_path):
    v = VDSR(depth=4, features=8)
    assert len([m for m in v.modules() if isinstance(m, torch.nn.Conv2d)]) == 4
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in v.modules())
    assert VDSR().conf == {"channels": 1, "depth": 20, "features": 64}
    full = N3NetSR()
    assert len(full.stages) == 3 and len(full.blocks) == 2 and full.conf["depth"] == 7 and full.conf["k"] == 7
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for s in full.stages for m in s.modules())
    n3 = N3NetSR(depth=3, features=8, k=2, block=SMALL_BLOCK).eval()
    x = torch.rand(1, 1, 30, 26)
    # global residual: a model whose last layer is zero is the identity
    with torch.no_grad():
        n3.stages[-1].body[-1].weight.zero_()
        n3.stages[-1].body[-1].bias.zero_()
        assert torch.equal(n3(x), x)
    n3 = N3NetSR(depth=3, features=8, k=2, block=SMALL_BLOCK).eval()
    torch.testing.assert_close(tiled_apply(n3, x, tile=12), n3(x), atol=1e-5, rtol=0)
    assert model_task(n3) == model_task(v) == "super-resolution"
    path = save_model(tmp_path / "sr.pt", n3, scales=[2, 3, 4])
    loaded = n3images.load_model(path, task="super-resolution")
    assert type(loaded) is N3NetSR and loaded.meta["scales"] == [2, 3, 4]
    with pytest.raises(ValueError, match="not a denoising model"):
        n3images.load_model(path, task="denoising")
    with pytest.raises(ValueError, match="input must have shape"):
        v(torch.rand(1, 3, 8, 8))


def test_tiny_vdsr_overfits_one_pair():
    torch.manual_seed(0)
    yy, xx = np.mgrid[0:24, 0:24]
    hr = 0.5 + 0.3 * np.sin(xx * 0.9) * np.cos(yy * 0.7) + 0.15 * ((xx // 5 + yy // 5) % 2)
    _, inp = degrade(hr, 2)
    x, y = torch.from_numpy(inp).float()[None, None], torch.from_numpy(hr).float()[None, None]
    model = VDSR(depth=4, features=16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = sr_scores(inp, hr, 2, quantize=False)[0]
    for _ in range(300):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = sr_scores(model(x).detach()[0, 0].numpy(), hr, 2, quantize=False)[0]
    assert after > before + 5, (before, after)


def test_upscale_image_colour_and_grey():
    rng = np.random.default_rng(4)
    rgb = rng.random((10, 12, 3))
    out = upscale_image(None, rgb, 3)
    assert out.shape == (30, 36, 3) and out.min() >= 0 and out.max() <= 1
    # a flat colour stays that colour
    flat = np.ones((6, 5, 3)) * np.array([0.2, 0.5, 0.7])
    assert upscale_image(None, flat, 2) == pytest.approx(np.ones((12, 10, 3)) * np.array([0.2, 0.5, 0.7]), abs=1e-12)
    grey = rng.random((8, 9))
    model = VDSR(depth=3, features=4).eval()
    assert upscale_image(model, grey, 2, tile=7).shape == (16, 18)
    with pytest.raises(ValueError, match="scale"):
        upscale_image(None, grey, 1)
