"""Non-blind denoisers (noise_input="level"): the model, training, evaluation and denoise.py are told the noise level."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from n3images.inference import denoise_image, tiled_apply
from n3images.io import read_image, write_image
from n3images.metrics import psnr
from n3images.models import DnCNN, N3NetDenoiser, N3NetSR, noise_level_kwargs
from n3images.noise import HETERO_EVAL_PAIRS, hetero_eval_noise, hetero_eval_target, noise_std_map
from n3sets.pretrained import load_model, save_model

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)
SMALL_BLOCK = {"patch_size": 4, "stride": 2, "window": 5}


def _n3(**conf):
    torch.manual_seed(4)
    return N3NetDenoiser(depth=3, features=8, k=2, block=SMALL_BLOCK, **conf).eval()


@pytest.fixture(scope="module")
def images(stripe_images):
    return stripe_images


def test_model_sees_the_noise_std_map():
    model = _n3(noise_input="level")
    assert model.stages[0].in_channels == 2 and model.stages[0].out_channels == 8
    assert DnCNN(depth=3, features=8, channels=3, noise_input="level").stage.in_channels == 6
    x = torch.rand(2, 1, 20, 22)
    with torch.no_grad():
        low, high = model(x, noise_level=(1e-3, 1e-5)), model(x, noise_level=(5e-2, 5e-4))
        assert not torch.allclose(low, high)
        # per-image levels of a batch: the same as each image alone
        both = model(x, noise_level=(torch.tensor([1e-3, 5e-2]), torch.tensor([1e-5, 5e-4])))
        assert torch.allclose(both[:1], low[:1], atol=1e-6) and torch.allclose(both[1:], high[1:], atol=1e-6)
        # the map is sqrt(a * max(x, 0) + b) of the noisy input, appended to the image channels
        first = model.stages[0].body[0]
        expect = torch.cat([x, noise_std_map(x, 1e-3, 1e-5)], 1)
        assert torch.equal(first(expect), first(torch.cat([x, (1e-3 * x + 1e-5).sqrt()], 1)))
    with pytest.raises(ValueError, match=r"non-blind model \(noise_input='level'\) needs noise_level=\(a, b\)"):
        model(x)
    with pytest.raises(ValueError, match="needs noise_level"):
        model(x, noise_level=0.1)
    with pytest.raises(ValueError, match="blind model .* takes no noise_level"):
        _n3()(x, noise_level=(0.0, 0.01))
    with pytest.raises(ValueError, match="noise_input must be one of 'none', 'level'"):
        DnCNN(depth=3, features=8, noise_input="sigma")
    assert "noise_input" not in N3NetSR().conf  # the SR models are not denoisers


def test_noise_level_kwargs():
    blind, told = _n3(), _n3(noise_input="level")
    assert noise_level_kwargs(blind, {"sigma": 25}) == {}
    assert noise_level_kwargs(told, {"sigma": 25.5})["noise_level"] == pytest.approx((0.0, 0.01), rel=1e-12)
    assert noise_level_kwargs(told, {"a": 1e-2, "b": 1e-4}) == {"noise_level": (1e-2, 1e-4)}
    a = torch.tensor([1e-3, 1e-2])
    assert noise_level_kwargs(told, {"a": a, "b": a / 100})["noise_level"][0] is a


def test_tiled_equals_untiled_with_a_noise_level():
    model = _n3(noise_input="level")
    x = torch.rand(1, 1, 60, 52)
    with torch.no_grad():
        whole = model(x, noise_level=(1e-2, 1e-4))
        tiled = tiled_apply(model, x, tile=16, noise_level=(1e-2, 1e-4))
    assert torch.allclose(whole, tiled, atol=1e-5)
    out = denoise_image(model, x[0, 0].numpy(), tile=16, noise_level=(1e-2, 1e-4))
    assert np.allclose(out, whole[0, 0].numpy(), atol=1e-5)


def test_train_hetero_nonblind_logs_each_level_and_eval_agrees(images, tmp_path, load_program):
    train_denoise, eval_denoise = load_program("train_denoise"), load_program("eval_denoise")
    argv = ["--data", str(images), "--model", "n3net", "--noise", "hetero", "--depth", "3", "--features", "8",
            "--k", "2", "--model-conf", json.dumps({"block": SMALL_BLOCK, "noise_input": "level"}), "--crop", "16",
            "--batch-size", "4", "--samples-per-epoch", "8", "--val-count", "2", "--threads", "1", "--no-progress",
            "--device", "cpu", "--epochs", "1", "--out", str(tmp_path / "run"), "--export", str(tmp_path / "nb.pt")]
    s = train_denoise.main(argv)
    tags = [f"a{a:g}_b{b:g}" for a, b in HETERO_EVAL_PAIRS]
    header = (tmp_path / "run" / "log.csv").read_text().splitlines()[0].split(",")
    assert all(f"val_psnr_{t}" in header for t in tags)
    model = load_model(tmp_path / "nb.pt")
    assert model.conf["noise_input"] == "level" and model.meta["noise"] == "hetero"
    # the logged validation PSNR of a level is the model told that level, as eval_denoise.py does
    a, b = HETERO_EVAL_PAIRS[2]
    scores = []
    for i, name in enumerate(["img3.png", "img4.png"]):
        raw = hetero_eval_target(torch.from_numpy(read_image(images / name, "gray"))[None, None], i)
        out = denoise_image(model, hetero_eval_noise(raw, a, b, i)[0, 0].numpy(), tile=None, noise_level=(a, b))
        scores.append(psnr(np.clip(out, 0, 1), raw[0, 0].numpy()))
    assert s["best"][f"val_psnr_{tags[2]}"] == pytest.approx(np.mean(scores), abs=1e-4)
    val = tmp_path / "val"
    for name in ("img3.png", "img4.png"):
        val.mkdir(exist_ok=True)
        (val / name).write_bytes((images / name).read_bytes())
    result = eval_denoise.main(["--data", str(val), "--noise", "hetero", "--weights", str(tmp_path / "nb.pt"),
                                "--threads", "1", "--quiet"])
    got = result["datasets"]["val"]["noise_level"][f"a={a:g},b={b:g}"]["methods"]["nb"]["psnr"]
    assert got == pytest.approx(np.mean(scores), abs=1e-4)


def test_denoise_cli_tells_a_nonblind_model_the_level(tmp_path):
    model = _n3(noise_input="level")
    path = save_model(tmp_path / "nb.pt", model, noise="hetero", sigma=None)
    rng = np.random.default_rng(0)
    img = np.clip(0.5 + 0.1 * rng.standard_normal((30, 26)), 0, 1).astype(np.float32)
    write_image(tmp_path / "in.png", img)
    noisy = read_image(tmp_path / "in.png", "auto")

    def run(*extra):
        return subprocess.run([sys.executable, str(ROOT / "pipelines" / "denoise.py"), str(tmp_path / "in.png"),
                               str(tmp_path / "out.png"), "--weights", str(path), "--overwrite", "--quiet",
                               "--threads", "1", *extra], capture_output=True, text=True)

    r = run()
    assert r.returncode == 2 and "non-blind model" in r.stderr and "--noise-level A B" in r.stderr
    assert not (tmp_path / "out.png").exists()
    for extra, level in ((["--sigma", "25.5"], (0.0, 0.01)), (["--noise-level", "0.01", "1e-4"], (0.01, 1e-4))):
        r = run(*extra)
        assert r.returncode == 0, r.stderr
        expect = np.clip(denoise_image(model, noisy, noise_level=level), 0, 1)
        assert np.abs(read_image(tmp_path / "out.png", "auto") - expect).max() <= 0.5 / 255 + 1e-6
    for extra, msg in ((["--noise-level", "0", "0"], "not both 0"), (["--noise-level", "-1", "0"], ">= 0"),
                       (["--sigma", "5", "--noise-level", "0.1", "0"], "not both")):
        r = run(*extra)
        assert r.returncode == 2 and msg in r.stderr, r.stderr
