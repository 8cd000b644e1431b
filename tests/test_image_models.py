"""Image models (DnCNN, N3NetDenoiser), the model registry for image models, tiled inference."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import n3images
from n3images.inference import denoise_image, tiled_apply
from n3images.models import DnCNN, DnCNNStage, N3NetDenoiser
from n3images.n3block2d import N3Block2d
from n3sets.pretrained import save_model

SMALL_BLOCK = {"patch_size": 4, "stride": 2, "window": 5}


def _randomise_bn(model):
    """Non-trivial running statistics, so that eval-mode tests exercise them."""
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


def test_dncnn_stage_layers_follow_the_published_architecture():
    st = DnCNNStage(8, 8, depth=6, features=64)
    convs = [m for m in st.body if isinstance(m, nn.Conv2d)]
    bns = [m for m in st.body if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 6 and len(bns) == 4
    assert convs[0].bias is not None and convs[-1].bias is not None
    assert all(c.bias is None for c in convs[1:-1])
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    # order: conv, ReLU, then (conv, BN, ReLU) x (depth - 2), then conv
    kinds = [type(m).__name__ for m in st.body]
    assert kinds[:2] == ["Conv2d", "ReLU"] and kinds[2:5] == ["Conv2d", "BatchNorm2d", "ReLU"] and kinds[-1] == "Conv2d"


@pytest.mark.parametrize("cin,cout", [(1, 8), (64, 8), (64, 1), (3, 3)])
def test_stage_adds_its_input_to_the_first_channels(cin, cout):
    st = DnCNNStage(cin, cout, depth=3, features=8).eval()
    x = torch.randn(2, cin, 9, 7)
    c = min(cin, cout)
    torch.testing.assert_close(st(x), st.body(x) + torch.cat([x[:, :c], x.new_zeros(2, cout - c, 9, 7)], 1))


def test_n3net_matches_the_paper_layout():
    m = N3NetDenoiser()
    assert len(m.stages) == 3 and len(m.blocks) == 2
    assert [(s.in_channels, s.out_channels, s.depth, s.features) for s in m.stages] == [
        (1, 8, 6, 64), (64, 8, 6, 64), (64, 1, 6, 64)]
    for b in m.blocks:
        assert isinstance(b, N3Block2d) and b.k == 7 and b.out_channels == 64
        assert (b.conf["patch_size"], b.conf["stride"], b.conf["window"]) == (10, 5, 15)
        emb = [l for l in b.embed if isinstance(l, nn.Conv2d)]
        assert [(c.in_channels, c.out_channels) for c in emb] == [(8, 64), (64, 64), (64, 8)]
        tmp = [l for l in b.temperature if isinstance(l, nn.Conv2d)]
        assert [(c.in_channels, c.out_channels) for c in tmp] == [(8, 64), (64, 64), (64, 1)]
        assert b.distance_norm is not None
    light = N3NetDenoiser(stages=2)
    assert len(light.stages) == 2 and len(light.blocks) == 1
    assert sum(p.numel() for p in light.parameters()) < sum(p.numel() for p in DnCNN().parameters())
    assert DnCNN().stage.depth == 17


def test_knn_baseline_matches_noisy_input_patches():
    m = N3NetDenoiser(depth=3, features=8, block={**SMALL_BLOCK, "embed": "none", "relaxation": "hard"}, match_on="input")
    assert all(b.embed is None and b.temperature is None for b in m.blocks)
    y = m.eval()(torch.rand(1, 1, 20, 18))
    assert y.shape == (1, 1, 20, 18)
    with pytest.raises(ValueError, match="embed"):
        N3NetDenoiser(match_on="input")


def test_gradients_reach_every_block_part():
    m = N3NetDenoiser(depth=3, features=8, k=2, block=SMALL_BLOCK).train()
    x = torch.rand(2, 1, 16, 14)
    m(x).square().mean().backward()
    for b in m.blocks:
        assert b.embed[0].weight.grad.abs().sum() > 0
        assert b.temperature[0].weight.grad.abs().sum() > 0
        assert b.distance_norm.weight.grad.abs() > 0


@pytest.mark.parametrize("tile", [8, 20, 33])
def test_tiled_inference_equals_untiled(tile):
    torch.manual_seed(0)
    m = _randomise_bn(N3NetDenoiser(depth=3, features=8, k=3, block=SMALL_BLOCK)).eval().double()
    x = torch.rand(1, 1, 61, 47, dtype=torch.float64)
    full = tiled_apply(m, x, None)
    calls = []
    tiled = tiled_apply(m, x, tile, progress=lambda d, t: calls.append((d, t)))
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-10)
    assert calls[-1][0] == calls[-1][1] > 1


def test_tiled_dncnn_equals_untiled():
    m = _randomise_bn(DnCNN(depth=5, features=8)).eval().double()
    x = torch.rand(2, 1, 40, 29, dtype=torch.float64)
    torch.testing.assert_close(tiled_apply(m, x, 10), m(x), rtol=0, atol=1e-12)


def test_denoise_image_grey_and_colour_channel_by_channel():
    m = _randomise_bn(DnCNN(depth=3, features=8)).eval()
    grey = np.random.default_rng(0).random((20, 17)).astype(np.float32)
    out = denoise_image(m, grey)
    assert out.shape == grey.shape and out.dtype == np.float32
    with torch.no_grad():
        ref = m(torch.from_numpy(grey)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-6)
    rgb = np.random.default_rng(1).random((20, 17, 3)).astype(np.float32)
    out = denoise_image(m, rgb)
    np.testing.assert_allclose(out[..., 1], denoise_image(m, rgb[..., 1]), atol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((0, 5), np.float32), "non-empty"),
    (np.full((8, 8), np.nan, np.float32), "NaN"),
    (np.zeros((8, 8, 2), np.float32), "2 channels"),
])
def test_denoise_image_bad_inputs(bad, match):
    m = DnCNN(depth=3, features=8, channels=3).eval()
    with pytest.raises(ValueError, match=match):
        denoise_image(m, bad)


def test_models_check_their_input():
    m = N3NetDenoiser(depth=3, features=8, block=SMALL_BLOCK).eval()
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\).*\(1, 3, 8, 8\)"):
        m(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="empty"):
        m(torch.zeros(1, 1, 0, 8))
    with pytest.raises(ValueError, match="floating"):
        DnCNN(depth=3)(torch.zeros(1, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown configuration key"):
        DnCNN(width=3)


def test_weight_file_round_trip_through_the_registry(tmp_path):
    m = _randomise_bn(N3NetDenoiser(depth=3, features=8, block=SMALL_BLOCK)).eval()
    path = save_model(tmp_path / "tiny.pt", m, sigma=25)
    loaded = n3images.load_model(path)
    assert type(loaded) is N3NetDenoiser and loaded.conf == m.conf and loaded.meta["sigma"] == 25
    x = torch.rand(1, 1, 21, 19)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x))
    with pytest.raises(ValueError, match="not a denoiser"):
        n3images.load_model("n3net-strecha")
    with pytest.raises(FileNotFoundError, match="image model"):
        n3images.load_model("no-such-model")


SHIPPED = {"dncnn-s25": 25.0, "n3net-s25": 25.0, "dncnn-s50": 50.0, "n3net-s50": 50.0, "n3net-k1-s25": 25.0}


def test_shipped_image_models_are_listed():
    assert set(SHIPPED) <= set(n3images.available_models())


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_models_load_and_denoise(name, data_root):
    from n3images.io import read_image
    from n3images.metrics import psnr
    from n3images.noise import add_gaussian_noise

    model = n3images.load_model(name)
    sigma = SHIPPED[name]
    assert model.meta["sigma"] == sigma and model.meta["noise"] == "gaussian"
    clean = read_image(data_root / "images" / "set12" / "01.png", "gray")[64:160, 64:160]
    noisy = add_gaussian_noise(clean, sigma, 0)
    out = np.clip(denoise_image(model, noisy), 0, 1)
    # the noisy crop is ~20.2 dB at sigma 25 (~14.5 at 50); any working denoiser of its sigma is far above it
    assert psnr(out, clean) > psnr(np.clip(noisy, 0, 1), clean) + 5


def test_shipped_hetero_model_denoises_raw_like_noise(data_root):
    from n3images.io import read_image
    from n3images.metrics import psnr
    from n3images.noise import hetero_eval_noise, hetero_eval_target

    model = n3images.load_model("n3net-hetero")
    assert model.meta["noise"] == "hetero" and model.meta["sigma"] is None
    clean = torch.from_numpy(read_image(data_root / "images" / "set12" / "05.png", "gray")[64:160, 64:160])
    raw = hetero_eval_target(clean[None, None], 1)
    noisy = hetero_eval_noise(raw, 1e-2, 1e-4, 1)
    out = np.clip(denoise_image(model, noisy[0, 0].numpy()), 0, 1)
    target = raw[0, 0].numpy()
    # measured +1.5 dB at this medium level on this crop; an untrained or broken model loses PSNR
    assert psnr(out, target) > psnr(np.clip(noisy[0, 0].numpy(), 0, 1), target) + 1


def test_shipped_nonblind_hetero_model_uses_the_noise_level(data_root):
    from n3images.io import read_image
    from n3images.metrics import psnr
    from n3images.noise import hetero_eval_noise, hetero_eval_target

    model, blind = n3images.load_model("n3net-hetero-nonblind"), n3images.load_model("n3net-hetero")
    assert model.conf["noise_input"] == "level" and model.meta["noise"] == "hetero"
    clean = torch.from_numpy(read_image(data_root / "images" / "set12" / "05.png", "gray")[64:160, 64:160])
    raw = hetero_eval_target(clean[None, None], 1)
    noisy = hetero_eval_noise(raw, 5e-2, 5e-4, 1)[0, 0].numpy()
    target = raw[0, 0].numpy()
    told = psnr(np.clip(denoise_image(model, noisy, noise_level=(5e-2, 5e-4)), 0, 1), target)
    # measured on this crop at the highest level: noisy 20.8, blind n3net-hetero 23.6, non-blind 24.8 dB
    assert told > psnr(np.clip(noisy, 0, 1), target) + 3
    assert told > psnr(np.clip(denoise_image(blind, noisy), 0, 1), target) + 0.5
    with pytest.raises(ValueError, match="needs noise_level"):
        denoise_image(model, noisy)
