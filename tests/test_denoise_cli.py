"""pipelines/denoise.py on small images with tiny untrained models."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from n3images.inference import denoise_image
from n3images.io import read_image
from n3images.models import DnCNN, N3NetDenoiser
from n3sets.pretrained import load_model, save_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pipelines" / "denoise.py"
torch.set_num_threads(1)


def _load_script():
    spec = importlib.util.spec_from_file_location("denoise_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dn = _load_script()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("denoise_cli")
    rng = np.random.default_rng(0)
    files = {
        "grey": root / "grey.png",
        "colour": root / "colour.png",
        "grey16": root / "grey16.png",
        "jpeg": root / "photo.jpg",
    }
    cv2.imwrite(str(files["grey"]), rng.integers(0, 256, (36, 40), dtype=np.uint8))
    cv2.imwrite(str(files["colour"]), rng.integers(0, 256, (30, 44, 3), dtype=np.uint8))
    cv2.imwrite(str(files["grey16"]), rng.integers(0, 65536, (28, 33), dtype=np.uint16))
    cv2.imwrite(str(files["jpeg"]), rng.integers(0, 256, (32, 40, 3), dtype=np.uint8))
    torch.manual_seed(1)
    dncnn = save_model(root / "dncnn.pt", DnCNN(depth=3, features=8).eval(), sigma=25, noise="gaussian")
    torch.manual_seed(2)
    n3 = save_model(root / "n3.pt", N3NetDenoiser(depth=3, features=8, block={"patch_size": 4, "stride": 2, "window": 5})
                    .eval(), sigma=25, noise="gaussian")
    return {"root": root, **{k: str(v) for k, v in files.items()}, "dncnn": str(dncnn), "n3": str(n3)}


def run_main(argv):
    return dn.main([*argv, "--threads", "1"])


def expect_exit2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        run_main(argv)
    assert info.value.code == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "error" in ln]
    assert len(err) == 1, err
    return err[0]


def _read(path):
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def test_grey_8bit_png_matches_library(env, tmp_path, capsys):
    out = tmp_path / "sub" / "out.png"
    info = run_main([env["grey"], str(out), "--weights", env["n3"], "--tile", "16"])
    img = _read(out)
    assert img.shape == (36, 40) and img.dtype == np.uint8
    assert info["bit_depth"] == 8 and info["channels"] == 1 and info["output"] == str(out)
    expected = np.rint(np.clip(denoise_image(load_model(env["n3"]), read_image(env["grey"]), tile=None), 0, 1) * 255)
    assert np.abs(img.astype(int) - expected.astype(int)).max() <= 1  # tiled == untiled, up to rounding
    captured = capsys.readouterr()
    assert "tile" in captured.err  # progress
    summary = captured.out.strip().splitlines()
    assert len(summary) == 1 and "40x36" in summary[0] and str(out) in summary[0]


def test_colour_png(env, tmp_path):
    out = tmp_path / "c.png"
    run_main([env["colour"], str(out), "--weights", env["dncnn"], "--quiet"])
    img = _read(out)
    assert img.shape == (30, 44, 3) and img.dtype == np.uint8
    # a grey model denoises channel by channel: each output channel is the model applied to that channel
    model = load_model(env["dncnn"])
    rgb = read_image(env["colour"])
    red = np.rint(np.clip(denoise_image(model, rgb[..., 0]), 0, 1) * 255)
    assert np.abs(img[..., 2].astype(int) - red.astype(int)).max() <= 1  # cv2 stores BGR


def test_16bit_png_stays_16bit(env, tmp_path):
    out = tmp_path / "o16.png"
    info = run_main([env["grey16"], str(out), "--weights", env["dncnn"], "--quiet"])
    img = _read(out)
    assert img.shape == (28, 33) and img.dtype == np.uint16 and info["bit_depth"] == 16
    out8 = tmp_path / "o8.png"
    run_main([env["grey16"], str(out8), "--weights", env["dncnn"], "--quiet", "--bit-depth", "8"])
    assert _read(out8).dtype == np.uint8
    tif = tmp_path / "o16.tif"
    run_main([env["grey16"], str(tif), "--weights", env["dncnn"], "--quiet"])
    assert _read(tif).dtype == np.uint16


def test_jpeg_in_and_out(env, tmp_path):
    out = tmp_path / "o.jpg"
    run_main([env["jpeg"], str(out), "--weights", env["dncnn"], "--quiet"])
    img = _read(out)
    assert img.shape == (32, 40, 3) and img.dtype == np.uint8
    png = tmp_path / "o.png"
    info = run_main([env["jpeg"], str(png), "--weights", env["dncnn"], "--quiet"])
    assert _read(png).dtype == np.uint8 and info["input_bit_depth"] == 8


def test_colour_model_on_grey_image(env, tmp_path):
    rgb_model = save_model(tmp_path / "rgb.pt", DnCNN(channels=3, depth=3, features=8).eval(), sigma=25)
    out = tmp_path / "g.png"
    run_main([env["grey"], str(out), "--weights", str(rgb_model), "--quiet"])
    assert _read(out).shape == (36, 40)


def test_sigma_warning(env, tmp_path, capsys):
    info = run_main([env["grey"], str(tmp_path / "a.png"), "--weights", env["dncnn"], "--sigma", "50", "--quiet"])
    err = capsys.readouterr().err
    assert "warning" in err and "sigma 25" in err and info["warning"]
    info = run_main([env["grey"], str(tmp_path / "b.png"), "--weights", env["dncnn"], "--sigma", "25", "--quiet"])
    assert info["warning"] is None and "warning" not in capsys.readouterr().err


def test_refuses_input_as_output(env, tmp_path, capsys):
    before = Path(env["grey"]).read_bytes()
    msg = expect_exit2([env["grey"], env["grey"], "--weights", env["dncnn"], "--overwrite"], capsys)
    assert "input" in msg
    # the same file by another spelling
    other = str(Path(env["grey"]).parent / "." / Path(env["grey"]).name)
    expect_exit2([env["grey"], other, "--weights", env["dncnn"], "--overwrite"], capsys)
    assert Path(env["grey"]).read_bytes() == before


def test_refuses_existing_output_unless_overwrite(env, tmp_path, capsys):
    out = tmp_path / "exists.png"
    out.write_bytes(b"keep me")
    msg = expect_exit2([env["grey"], str(out), "--weights", env["dncnn"], "--quiet"], capsys)
    assert "exists" in msg and "--overwrite" in msg
    assert out.read_bytes() == b"keep me"
    run_main([env["grey"], str(out), "--weights", env["dncnn"], "--quiet", "--overwrite"])
    assert _read(out).shape == (36, 40)


@pytest.mark.parametrize("case", ["missing", "unreadable", "weights", "corr_weights", "folder", "suffix", "jpeg16"])
def test_errors_write_nothing(env, tmp_path, capsys, case):
    inp, out, weights, extra = env["grey"], tmp_path / "out.png", env["dncnn"], []
    if case == "missing":
        inp = str(tmp_path / "nope.png")
    elif case == "unreadable":
        inp = str(tmp_path / "bad.png")
        Path(inp).write_bytes(np.random.default_rng(0).bytes(100))
    elif case == "weights":
        weights = "no-such-model"
    elif case == "corr_weights":
        weights = "n3net-strecha"
    elif case == "folder":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = blocker / "out.png"
    elif case == "suffix":
        out = tmp_path / "out.gif"
    elif case == "jpeg16":
        out, extra = tmp_path / "out.jpg", ["--bit-depth", "16"]
    msg = expect_exit2([inp, str(out), "--weights", weights, "--quiet", *extra], capsys)
    named = {"missing": inp, "unreadable": inp, "weights": weights, "corr_weights": weights, "folder": str(out),
             "suffix": str(out), "jpeg16": "--bit-depth"}[case]
    assert named in msg
    if case == "corr_weights":
        assert "not a denoiser" in msg
    if case == "weights":
        assert "available" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {"unreadable": ["bad.png"], "folder": ["file"]}.get(case, []))


def test_subprocess(env, tmp_path):
    out = tmp_path / "p.png"
    proc = subprocess.run([sys.executable, str(SCRIPT), env["grey"], str(out), "--weights", env["dncnn"],
                           "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _read(out).shape == (36, 40) and str(out) in proc.stdout
    proc = subprocess.run([sys.executable, str(SCRIPT), env["grey"], str(out), "--weights", env["dncnn"],
                           "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "exists" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
