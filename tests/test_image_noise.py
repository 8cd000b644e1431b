import math

import numpy as np
import pytest
import torch

from n3images import noise as N
from n3images.noise import (
    HETERO_EVAL_PAIRS,
    add_gaussian_noise,
    gaussian_noise,
    hetero_eval_noise,
    hetero_eval_target,
    heteroscedastic_noise,
    noise_std_map,
    sample_raw_params,
    to_raw,
    training_gaussian_noise,
)

# ------------------------------------------------------------------ Gaussian protocol


def test_gaussian_protocol_checksum():
    # Stored once (torch 2.13.0, CPU) from
    #   n = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(3)) * 25 / 255
    #   n.double().sum(), n.flatten()[:3], n.double().pow(2).sum()
    # If this fails, the benchmark's noisy images changed and old results are not comparable.
    n = gaussian_noise((1, 1, 8, 8), 25, 3)
    assert n.shape == (1, 1, 8, 8) and n.dtype == torch.float32
    assert n.double().sum().item() == pytest.approx(1.0091781662777066, abs=1e-6)
    assert n.flatten()[:3].tolist() == pytest.approx([-0.007514146156609058, 0.035282500088214874, -0.07666831463575363], abs=1e-6)
    assert n.double().pow(2).sum().item() == pytest.approx(0.561544326334383, abs=1e-6)


def test_gaussian_is_the_literal_protocol_and_shape_independent():
    ref = torch.randn((1, 1, 16, 12), generator=torch.Generator().manual_seed(7)) * 50 / 255
    assert torch.equal(gaussian_noise((1, 1, 16, 12), 50, 7), ref)
    # the values depend only on the element count: (H, W) and (1, 1, H, W) images get the same noise
    assert torch.equal(gaussian_noise((16, 12), 50, 7), ref[0, 0])
    # float64 is the float32 protocol cast, not a different draw
    assert torch.equal(gaussian_noise((16, 12), 50, 7, dtype=torch.float64), ref[0, 0].double())
    assert not torch.equal(gaussian_noise((16, 12), 50, 8), ref[0, 0])


def test_gaussian_noise_level():
    n = gaussian_noise((256, 256), 25, 0).double()
    # 65536 samples: the std of the sample std is ~0.3 %; 2 % cannot fail for this fixed seed
    assert n.std().item() == pytest.approx(25 / 255, rel=0.02)
    assert abs(n.mean().item()) < 0.01 * 25 / 255 * 5
    assert torch.count_nonzero(gaussian_noise((4, 4), 0, 0)) == 0


def test_add_gaussian_noise_torch_numpy_no_clipping():
    img = torch.zeros(1, 1, 32, 32, dtype=torch.float64)
    img[..., 16:] = 1.0
    noisy = add_gaussian_noise(img, 25, 5)
    assert noisy.dtype == torch.float64 and noisy.shape == img.shape
    assert torch.equal(noisy - img, gaussian_noise(img.shape, 25, 5, dtype=torch.float64))
    assert noisy.min() < 0 and noisy.max() > 1  # not clipped
    arr = img[0, 0].float().numpy()
    noisy_np = add_gaussian_noise(arr, 25, 5)
    assert isinstance(noisy_np, np.ndarray) and noisy_np.dtype == np.float32 and noisy_np.shape == (32, 32)
    np.testing.assert_array_equal(noisy_np, (torch.from_numpy(arr) + gaussian_noise((32, 32), 25, 5)).numpy())


@pytest.mark.parametrize("sigma", [-1.0, float("nan"), float("inf"), "25", True])
def test_gaussian_bad_sigma(sigma):
    with pytest.raises(ValueError, match="sigma"):
        gaussian_noise((4, 4), sigma, 0)


@pytest.mark.parametrize("index", [-1, 1.5, True])
def test_gaussian_bad_index(index):
    with pytest.raises(ValueError, match="index"):
        gaussian_noise((4, 4), 25, index)


def test_add_gaussian_noise_rejects_integer_images():
    with pytest.raises(ValueError, match="float"):
        add_gaussian_noise(np.zeros((4, 4), np.uint8), 25, 0)
    with pytest.raises(ValueError, match="float"):
        add_gaussian_noise(torch.zeros(4, 4, dtype=torch.uint8), 25, 0)


def test_training_gaussian_noise_per_sample_and_generator():
    x = torch.zeros(3, 1, 128, 128)
    sig = torch.tensor([5.0, 25.0, 50.0])
    n = training_gaussian_noise(x, sig, generator=torch.Generator().manual_seed(0))
    std = n.flatten(1).std(1)
    assert torch.allclose(std, sig / 255, rtol=0.03)
    again = training_gaussian_noise(x, sig, generator=torch.Generator().manual_seed(0))
    assert torch.equal(n, again)
    assert training_gaussian_noise(x, 10.0).std().item() == pytest.approx(10 / 255, rel=0.03)
    with pytest.raises(ValueError, match=r"sigma.*\(B,\)"):
        training_gaussian_noise(x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="sigma"):
        training_gaussian_noise(x, torch.tensor([1.0, -2.0, 3.0]))


# ------------------------------------------------------------------- heteroscedastic


def test_heteroscedastic_variance_is_a_x_plus_b():
    # constant images, one (x, a, b) per batch sample, 2**16 pixels each: the relative standard
    # error of the sample variance is sqrt(2 / 65536) = 0.55 %, so 4 % is > 7 standard errors
    # (and the seed is fixed).
    x_vals = torch.tensor([0.05, 0.3, 0.9, 0.5], dtype=torch.float64)
    a = torch.tensor([1e-2, 1e-3, 5e-2, 0.0], dtype=torch.float64)
    b = torch.tensor([1e-4, 1e-5, 0.0, 2e-3], dtype=torch.float64)
    x = x_vals.view(4, 1, 1, 1).expand(4, 1, 256, 256).clone()
    noisy = heteroscedastic_noise(x, a, b, generator=torch.Generator().manual_seed(1))
    var = (noisy - x).flatten(1).var(1)
    expected = a * x_vals + b
    assert torch.allclose(var, expected, rtol=0.04), (var, expected)
    assert torch.allclose((noisy - x).flatten(1).mean(1), torch.zeros(4, dtype=torch.float64), atol=4 * expected.sqrt().max().item() / 256)


def test_heteroscedastic_variance_varies_within_an_image_and_clamps_negative():
    x = torch.full((1, 256, 256), 0.8)
    x[:, :128] = 0.1
    x[:, :16] = -0.5  # variance a * max(x, 0) + b = b there
    a, b = 0.02, 1e-4
    noisy = heteroscedastic_noise(x, a, b, generator=torch.Generator().manual_seed(2))
    d = (noisy - x).double()
    assert d[:, 128:].var().item() == pytest.approx(a * 0.8 + b, rel=0.05)
    assert d[:, 16:128].var().item() == pytest.approx(a * 0.1 + b, rel=0.05)
    assert d[:, :16].var().item() == pytest.approx(b, rel=0.1)
    assert torch.isfinite(noisy).all()
    clipped = heteroscedastic_noise(x, a, b, generator=torch.Generator().manual_seed(2), clip=True)
    assert clipped.min() >= 0 and clipped.max() <= 1


def test_noise_std_map():
    x = torch.tensor([[[[0.0, 0.25], [1.0, -1.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    a = torch.tensor([0.01, 0.04])
    b = torch.tensor([1e-4, 0.0])
    s = noise_std_map(x, a, b)
    expected = torch.tensor([[[[1e-4, 0.0025 + 1e-4], [0.0101, 1e-4]]], [[[0.02, 0.02], [0.02, 0.02]]]]).sqrt()
    assert s.shape == x.shape
    assert torch.allclose(s, expected)
    assert torch.allclose(noise_std_map(x[0], 0.01, 1e-4), expected[0])


@pytest.mark.parametrize(
    "a, b, match",
    [(-1e-3, 1e-4, "a"), (1e-3, float("nan"), "b"), (torch.tensor([1e-3, 1e-3]), 1e-4, r"a must be .*\(3,\)")],
)
def test_heteroscedastic_bad_parameters(a, b, match):
    with pytest.raises(ValueError, match=match):
        heteroscedastic_noise(torch.zeros(3, 1, 8, 8), a, b)


@pytest.mark.parametrize("x", [torch.zeros(8, 8), torch.zeros(3, 1, 8, 8, dtype=torch.int64), np.zeros((1, 8, 8))])
def test_heteroscedastic_bad_image(x):
    with pytest.raises(ValueError, match="x_raw"):
        heteroscedastic_noise(x, 1e-3, 1e-4)


def test_to_raw_grey_colour_and_per_sample():
    img = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    out = to_raw(img, torch.tensor([2.0, 3.0]), torch.tensor([0.5, 1.0]))
    assert out.shape == (2, 1, 8, 8)
    assert torch.allclose(out[0], img[0] ** 2 * 0.5) and torch.allclose(out[1], img[1] ** 3)
    rgb = torch.rand(3, 8, 8, dtype=torch.float64)
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    assert torch.allclose(to_raw(rgb, 2.2, 0.7), (lum ** 2.2 * 0.7)[None])
    neg = to_raw(torch.full((1, 2, 2), -0.1), 2.5, 1.0)
    assert torch.equal(neg, torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="channels"):
        to_raw(torch.rand(2, 2, 8, 8), 2.0, 1.0)
    with pytest.raises(ValueError, match="gamma"):
        to_raw(img, 0.0, 1.0)
    with pytest.raises(ValueError, match="scale"):
        to_raw(img, 2.0, torch.tensor([1.0, -1.0]))


def test_sample_raw_params_ranges_and_reproducibility():
    p = sample_raw_params(torch.Generator().manual_seed(0))
    assert set(p) == {"gamma", "scale", "a", "b"} and all(isinstance(v, float) for v in p.values())
    assert p == sample_raw_params(torch.Generator().manual_seed(0))
    q = sample_raw_params(torch.Generator().manual_seed(1), batch_size=20000)
    assert all(v.shape == (20000,) for v in q.values())
    for key, (lo, hi) in (("gamma", N.GAMMA_RANGE), ("scale", N.SCALE_RANGE), ("a", (1e-4, 1e-1))):
        assert q[key].min() >= lo and q[key].max() <= hi
        # the whole range is used: 20000 uniform draws come within 1 % of both ends
        if key != "a":  # a is log-uniform, checked below
            assert q[key].min() < lo + 0.01 * (hi - lo) and q[key].max() > hi - 0.01 * (hi - lo)
    log_a = q["a"].double().log10()
    assert log_a.min() < -3.95 and log_a.max() > -1.05
    ratio = q["b"].double().log10() - log_a
    assert ratio.min() >= N.LOG10_B_OFFSET - N.LOG10_B_SPREAD - 1e-5
    assert ratio.max() <= N.LOG10_B_OFFSET + N.LOG10_B_SPREAD + 1e-5
    # b is tied to a (correlated shot and read noise): corr(log a, log b) = sqrt(var U(3) /
    # (var U(3) + var U(2.6))) = 0.756 in theory; independent draws would give 0
    assert np.corrcoef(log_a.numpy(), q["b"].double().log10().numpy())[0, 1] == pytest.approx(0.756, abs=0.03)
    with pytest.raises(ValueError, match="batch_size"):
        sample_raw_params(batch_size=0)


def test_sampled_batch_runs_through_the_pipeline():
    g = torch.Generator().manual_seed(3)
    p = sample_raw_params(g, batch_size=4)
    clean = to_raw(torch.rand(4, 3, 16, 16, generator=g), p["gamma"], p["scale"])
    noisy = heteroscedastic_noise(clean, p["a"], p["b"], generator=g)
    assert clean.shape == noisy.shape == (4, 1, 16, 16)
    assert noise_std_map(clean, p["a"], p["b"]).shape == (4, 1, 16, 16)


def test_hetero_eval_pairs_and_noise():
    assert 3 <= len(HETERO_EVAL_PAIRS) <= 4
    a_vals = [a for a, _ in HETERO_EVAL_PAIRS]
    assert a_vals == sorted(a_vals) and len(set(a_vals)) == len(a_vals)  # low -> high
    for a, b in HETERO_EVAL_PAIRS:
        # evaluation levels lie inside the training distribution
        assert N.LOG10_A_RANGE[0] <= math.log10(a) <= N.LOG10_A_RANGE[1]
        assert abs(math.log10(b) - math.log10(a) - N.LOG10_B_OFFSET) <= N.LOG10_B_SPREAD
    clean = hetero_eval_target(torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(4)), 3)
    a, b = HETERO_EVAL_PAIRS[1]
    noisy = hetero_eval_noise(clean, a, b, 3)
    n = torch.randn((1, 1, 32, 32), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(noisy, clean + (a * clean + b).sqrt() * n)
    assert torch.equal(noisy, hetero_eval_noise(clean, a, b, 3))
    assert not torch.equal(noisy, hetero_eval_noise(clean, a, b, 4))
    with pytest.raises(ValueError, match="index"):
        hetero_eval_noise(clean, a, b, -1)


def test_hetero_eval_target_is_deterministic():
    img = torch.rand(1, 16, 16, dtype=torch.float64)
    assert torch.allclose(hetero_eval_target(img, 0), img ** N.HETERO_EVAL_GAMMA * N.HETERO_EVAL_SCALES[0])
    assert torch.allclose(hetero_eval_target(img, 1), img ** N.HETERO_EVAL_GAMMA * N.HETERO_EVAL_SCALES[1])
