"""pipelines/train_denoise.py: training loop, logs, exact resume, refusal to overwrite, export, DDP."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import n3images
from n3images.io import write_image

ROOT = Path(__file__).resolve().parents[1]


def _load_program(name):
    """A program of pipelines/ (not a package) as a module, by file path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so that its functions pickle by reference
    spec.loader.exec_module(module)
    return module


train_denoise = _load_program("train_denoise")

COMMON = ["--batch-size", "4", "--samples-per-epoch", "8", "--val-count", "2", "--threads", "1", "--no-progress",
          "--device", "cpu"]
N3 = ["--model", "n3net", "--depth", "3", "--features", "8", "--k", "2", "--crop", "16",
      "--model-conf", json.dumps({"block": {"patch_size": 4, "stride": 2, "window": 5}})] + COMMON
DN = ["--model", "dncnn", "--depth", "3", "--features", "8", "--crop", "16"] + COMMON


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six structured 32x30 grey images (stripes and blobs), so that denoising can be learned."""
    d = tmp_path_factory.mktemp("imgs")
    yy, xx = np.mgrid[0:32, 0:30]
    for i in range(6):
        img = 0.5 + 0.4 * np.sin(xx * (0.3 + 0.1 * i) + yy * 0.2 * i) * np.cos(yy * 0.25)
        write_image(d / f"img{i}.png", img.astype(np.float32))
    return d


def _run(args):
    return train_denoise.main(args)


def test_trains_logs_and_exports(images, tmp_path):
    out = tmp_path / "run"
    export = tmp_path / "tiny.pt"
    s = _run(["--data", str(images), "--out", str(out), "--epochs", "2", "--export", str(export)] + N3)
    assert s["epochs"] == 2 and np.isfinite(s["best"]["val_psnr"])
    for f in ("last.pt", "best.pt", "log.csv", "log.json", "curves.png"):
        assert (out / f).is_file(), f
    log = json.loads((out / "log.json").read_text())
    assert [h["epoch"] for h in log["history"]] == [1, 2] and log["history"][-1]["step"] == 4
    model = n3images.load_model(export)
    assert type(model).__name__ == "N3NetDenoiser"
    assert model.meta["sigma"] == 25.0 and model.meta["steps"] >= 2 and model.meta["noise"] == "gaussian"
    assert "train_denoise.py" in model.meta["command"]


def test_resume_is_exact(images, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(["--data", str(images), "--out", str(a), "--epochs", "3"] + DN)
    _run(["--data", str(images), "--out", str(b), "--epochs", "1"] + DN)
    _run(["--data", str(images), "--out", str(b), "--epochs", "3", "--resume"] + DN)
    sa = torch.load(a / "last.pt", weights_only=False)
    sb = torch.load(b / "last.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 6
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key
    assert [h["val_psnr"] for h in sa["history"]] == [h["val_psnr"] for h in sb["history"]]
    assert len(sb["commands"]) == 2


def test_time_budget_stops_cleanly_and_resume_finishes_exactly(images, tmp_path):
    """--time-budget ends after a whole epoch (checkpoint, logs, export); --resume then matches an uninterrupted run."""
    a, b, export = tmp_path / "a", tmp_path / "b", tmp_path / "cut.pt"
    _run(["--data", str(images), "--out", str(a), "--epochs", "3"] + DN)
    s = _run(["--data", str(images), "--out", str(b), "--epochs", "3", "--time-budget", "1e-6",
              "--export", str(export)] + DN)
    assert s["stopped_early"] and s["epochs"] == 1
    log = json.loads((b / "log.json").read_text())
    assert log["stopped_early"] == "--time-budget 1e-06 s" and len(log["history"]) == 1
    assert n3images.load_model(export).meta["steps"] == 2
    s = _run(["--data", str(images), "--out", str(b), "--epochs", "3", "--resume", "--time-budget", "1e6"] + DN)
    assert not s["stopped_early"] and s["epochs"] == 3
    sa = torch.load(a / "last.pt", weights_only=False)
    sb = torch.load(b / "last.pt", weights_only=False)
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key
    with pytest.raises(SystemExit):
        _run(["--data", str(images), "--out", str(tmp_path / "c"), "--time-budget", "-1"] + DN)


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_finite_checkpoint(images, tmp_path):
    out = tmp_path / "run"
    _run(["--data", str(images), "--out", str(out), "--epochs", "1"] + DN)
    with pytest.raises(SystemExit, match=r"diverged in epoch 2 .*NaN or inf.*keeps epoch 1.*--clip-grad-norm"):
        _run(["--data", str(images), "--out", str(out), "--epochs", "3", "--resume"] + DN + ["--lr", "1e30"])
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] == 1


def test_refuses_to_overwrite_a_run(images, tmp_path):
    out = tmp_path / "run"
    _run(["--data", str(images), "--out", str(out), "--epochs", "1"] + DN)
    with pytest.raises(SystemExit, match="already holds a training run"):
        _run(["--data", str(images), "--out", str(out), "--epochs", "1"] + DN)
    with pytest.raises(SystemExit, match="--crop"):  # an exact resume needs the same crops
        _run(["--data", str(images), "--out", str(out), "--epochs", "2", "--resume"] + DN + ["--crop", "12"])


def test_heteroscedastic_noise_trains(images, tmp_path):
    s = _run(["--model", "dncnn", "--noise", "hetero", "--data", str(images), "--out", str(tmp_path / "h"),
              "--epochs", "1"] + DN)
    assert np.isfinite(s["best"]["val_psnr"])


def test_bad_data_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")] + DN)
    assert "--data" in capsys.readouterr().err
    small = tmp_path / "small"
    small.mkdir()
    write_image(small / "a.png", np.zeros((8, 8), np.float32))
    write_image(small / "b.png", np.zeros((8, 8), np.float32))
    write_image(small / "c.png", np.zeros((8, 8), np.float32))
    with pytest.raises(SystemExit, match="smaller than the crop"):
        _run(["--data", str(small), "--out", str(tmp_path / "o2")] + DN + ["--val-count", "1"])


@pytest.fixture(scope="module")
def ddp_run(images, tmp_path_factory, torchrun):
    """Two epochs under torchrun (2 gloo processes), uninterrupted: the reference run."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    torchrun("train_denoise.py", ["--data", images, "--out", out, "--epochs", "2", "--resume"] + DN)
    return out


@pytest.mark.slow
def test_torchrun_two_processes(ddp_run):
    ckpt = torch.load(ddp_run / "last.pt", weights_only=False)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 4 and "torchrun --nproc_per_node=2" in ckpt["command"]


@pytest.mark.slow
def test_torchrun_restart_after_a_crash_resumes_exactly(ddp_run, images, tmp_path, torchrun):
    """Rank 1 aborts after epoch 1; torchrun --max-restarts restarts both processes, --resume picks
    up epoch 1's checkpoint, and the result is the uninterrupted run's, bit for bit."""
    out = tmp_path / "crashed"
    r = torchrun("train_denoise.py", ["--data", images, "--out", out, "--epochs", "2", "--resume"] + DN,
                 crash_after_barrier=1)
    assert r.restarts == 1 and f"resumed from {out / 'last.pt'}: epoch 1, step 2" in r.stdout
    got, want = (torch.load(d / "last.pt", weights_only=False) for d in (out, ddp_run))
    assert got["epoch"] == 2 and got["step"] == 4 and len(got["commands"]) == 2
    assert [h["train_loss"] for h in got["history"]] == [h["train_loss"] for h in want["history"]]
    assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])
