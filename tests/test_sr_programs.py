"""pipelines/train_sr.py, eval_sr.py and upscale.py on tiny models and small images (a few seconds each)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import n3images
from n3images.io import read_image, write_image
from n3images.metrics import modcrop
from n3images.models import DnCNN, N3NetSR, VDSR
from n3images.sr import degrade, sr_scores, super_resolve, to_luma, upscale_image
from n3sets.pretrained import load_model, save_model

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)
SMALL_BLOCK = {"patch_size": 4, "stride": 2, "window": 5}


def _load(name):
    spec = importlib.util.spec_from_file_location(f"sr_prog_{name}", ROOT / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


train_sr, eval_sr, upscale = _load("train_sr"), _load("eval_sr"), _load("upscale")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sr")
    train = root / "train"
    yy, xx = np.mgrid[0:40, 0:38]
    for i in range(5):
        img = 0.5 + 0.35 * np.sin(xx * (0.3 + 0.1 * i) + yy * 0.2 * i) * np.cos(yy * 0.25)
        write_image(train / f"g{i}.png", img.astype(np.float32))
    test = root / "set3"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:37, 0:43]
    for i in range(3):
        img = np.stack([0.5 + 0.3 * np.sin(xx / (3 + c) + i) * np.cos(yy / (4 + i)) for c in range(3)], axis=2)
        write_image(test / f"c{i}.png", np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1))
    torch.manual_seed(1)
    vdsr = save_model(root / "vdsr_t.pt", VDSR(depth=3, features=8).eval(), scales=[2, 3, 4], task="super-resolution")
    torch.manual_seed(2)
    n3 = save_model(root / "n3_t.pt", N3NetSR(depth=3, features=8, k=2, block=SMALL_BLOCK).eval(), scales=[2, 3])
    dn = save_model(root / "dncnn.pt", DnCNN(depth=3, features=8).eval(), sigma=25)
    return {"root": root, "train": train, "test": test, "vdsr": str(vdsr), "n3": str(n3), "dncnn": str(dn)}


TINY = ["--crop", "24", "--batch-size", "4", "--samples-per-epoch", "8", "--val-count", "2", "--threads", "1",
        "--no-progress", "--device", "cpu", "--depth", "3", "--features", "8"]
N3 = ["--model", "n3net", "--k", "2", "--model-conf", json.dumps({"block": SMALL_BLOCK})] + TINY


def _exit2(fn, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        fn(argv)
    assert info.value.code == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "error" in ln]  # argparse adds its usage
    assert len(err) == 1, err
    return err[0]


# ------------------------------------------------------------------------------------ training


def test_train_logs_exports_and_loads_by_path(env, tmp_path):
    out, export = tmp_path / "run", tmp_path / "n3sr.pt"
    s = train_sr.main(["--data", str(env["train"]), "--out", str(out), "--epochs", "2", "--export", str(export)] + N3)
    assert s["epochs"] == 2 and np.isfinite(s["best"]["val_psnr"])
    for f in ("last.pt", "best.pt", "log.csv", "log.json", "curves.png"):
        assert (out / f).is_file(), f
    log = json.loads((out / "log.json").read_text())
    row = log["history"][-1]
    assert row["step"] == 4 and {"val_psnr_x2", "val_psnr_x3", "val_psnr_x4"} <= set(row)
    assert row["val_psnr"] == pytest.approx(np.mean([row["val_psnr_x2"], row["val_psnr_x3"], row["val_psnr_x4"]]))
    assert "val_psnr_x3" in (out / "log.csv").read_text().splitlines()[0]
    model = n3images.load_model(export, task="super-resolution")
    assert type(model).__name__ == "N3NetSR" and model.meta["scales"] == [2, 3, 4]
    assert model.meta["task"] == "super-resolution" and "train_sr.py" in model.meta["command"]
    assert model.meta["optimizer"] == "adam" and model.meta["steps"] == 2 * s["best"]["epoch"]  # the best epoch


def test_train_validation_is_the_eval_protocol(env, tmp_path):
    """The validation PSNR of one scale is what eval_sr's functions give on the held-out images."""
    out = tmp_path / "v"
    s = train_sr.main(["--data", str(env["train"]), "--out", str(out), "--epochs", "1", "--scales", "3", "--model",
                       "vdsr", "--export", str(tmp_path / "v.pt")] + TINY)
    model = load_model(tmp_path / "v.pt")
    scores = []
    for name in ("g3.png", "g4.png"):
        hr = to_luma(modcrop(read_image(env["train"] / name, "auto"), 3), quantize=True)
        scores.append(sr_scores(super_resolve(model, degrade(hr, 3)[1], tile=None), hr, 3)[0])
    assert s["best"]["val_psnr"] == pytest.approx(np.mean(scores), abs=1e-3)


def test_train_resume_is_exact_and_sgd(env, tmp_path):
    common = ["--data", str(env["train"]), "--model", "vdsr", "--optimizer", "sgd", "--lr", "0.01",
              "--weight-decay", "1e-4", "--clip-grad-theta", "0.001"] + TINY
    a, b = tmp_path / "a", tmp_path / "b"
    train_sr.main(common + ["--out", str(a), "--epochs", "3"])
    train_sr.main(common + ["--out", str(b), "--epochs", "1"])
    train_sr.main(common + ["--out", str(b), "--epochs", "3", "--resume"])
    sa, sb = (torch.load(d / "last.pt", weights_only=False) for d in (a, b))
    assert sa["step"] == sb["step"] == 6
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key
    assert [h["val_psnr"] for h in sa["history"]] == [h["val_psnr"] for h in sb["history"]]
    with pytest.raises(SystemExit, match="--scales"):
        train_sr.main(common + ["--out", str(b), "--epochs", "4", "--resume", "--scales", "2"])


def test_train_bad_arguments(env, tmp_path, capsys):
    base = ["--data", str(env["train"]), "--out", str(tmp_path / "o")] + TINY
    assert "--scales" in _exit2(train_sr.main, base + ["--scales", "1"], capsys)
    assert "--crop" in _exit2(train_sr.main, base + ["--crop", "6"], capsys)
    assert "--data" in _exit2(train_sr.main, ["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys)
    with pytest.raises(SystemExit, match="--k does not apply"):
        train_sr.main(base + ["--model", "vdsr", "--k", "3"])
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------- evaluation


def test_eval_json_contract(env, tmp_path, capsys):
    out, save = tmp_path / "res" / "r.json", tmp_path / "imgs"
    result = eval_sr.main(["--data", str(env["test"]), "--scale", "2", "3", "--weights", env["vdsr"], env["n3"],
                           "--json", str(out), "--save-images", str(save), "--threads", "1", "--quiet"])
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(result))
    names = ["bicubic@x2", "vdsr_t@x2", "n3_t@x2", "bicubic@x3", "vdsr_t@x3", "n3_t@x3"]
    assert list(on_disk["methods"]) == names
    for m in on_disk["methods"].values():
        assert set(m) == {"psnr", "ssim", "time_s"} and np.isfinite(m["psnr"]) and m["time_s"] >= 0
    ds = on_disk["datasets"]["set3"]
    assert ds["num_images"] == 3 and list(ds["scale"]) == ["2", "3"]
    assert ds["scale"]["3"]["methods"] == {n: on_disk["methods"][n] for n in names[3:]}
    assert all(len(v) == 3 for v in ds["scale"]["2"]["per_image"].values())
    # the protocol, computed directly
    model = load_model(env["vdsr"])
    bic, net = [], []
    for i in range(3):
        hr = to_luma(modcrop(read_image(env["test"] / f"c{i}.png", "auto"), 3), quantize=True)
        inp = degrade(hr, 3)[1]
        bic.append(sr_scores(inp, hr, 3)[0])
        net.append(sr_scores(super_resolve(model, inp), hr, 3)[0])
    assert ds["scale"]["3"]["per_image"]["bicubic@x3"] == pytest.approx(bic, abs=1e-9)
    assert ds["scale"]["3"]["per_image"]["vdsr_t@x3"] == pytest.approx(net, abs=1e-4)
    s = on_disk["settings"]
    assert s["scale"] == [2, 3] and s["images"] == {"set3": ["c0.png", "c1.png", "c2.png"]} and s["threads"] == 1
    assert s["weights"]["n3_t"]["class"] == "N3NetSR" and len(s["weights"]["vdsr_t"]["sha256"]) == 64
    assert "eval_sr.py" in s["command"]
    saved = cv2.imread(str(save / "set3" / "x3" / "n3_t" / "c1.png"), cv2.IMREAD_UNCHANGED)
    assert saved.shape == (36, 42, 3) and saved.dtype == np.uint8
    assert (save / "set3" / "x2" / "hr" / "c0.png").is_file() and (save / "set3" / "x2" / "bicubic" / "c0.png").is_file()
    err = capsys.readouterr().err
    assert "n3_t was trained for scales 2 3" not in err  # x2 and x3 are trained scales


@pytest.mark.data
def test_eval_bicubic_set5_published_values(data_root):
    set5 = data_root / "images" / "set5"
    if not set5.is_dir():
        pytest.skip(f"{set5} missing")
    m = eval_sr.main(["--data", str(set5), "--scale", "2", "3", "4", "--threads", "1", "--quiet"])["methods"]
    # the values every SR paper lists for bicubic on Set5 (PSNR / SSIM on Y)
    for s, (p, q) in {2: (33.66, 0.9299), 3: (30.39, 0.8682), 4: (28.42, 0.8104)}.items():
        assert m[f"bicubic@x{s}"]["psnr"] == pytest.approx(p, abs=0.005)
        assert m[f"bicubic@x{s}"]["ssim"] == pytest.approx(q, abs=0.0005)


def test_eval_bad_inputs(env, tmp_path, capsys):
    base = ["--data", str(env["test"]), "--threads", "1", "--quiet"]
    msg = _exit2(eval_sr.main, base + ["--weights", env["dncnn"]], capsys)
    assert "dncnn.pt" in msg and "not a super-resolution model" in msg
    msg = _exit2(eval_sr.main, base + ["--weights", "n3net-strecha"], capsys)
    assert "n3net-strecha" in msg
    msg = _exit2(eval_sr.main, ["--data", str(tmp_path / "missing"), "--quiet"], capsys)
    assert str(tmp_path / "missing") in msg
    assert "--scale" in _exit2(eval_sr.main, base + ["--scale", "1"], capsys)
    msg = _exit2(eval_sr.main, base + ["--scale", "9", "--json", str(tmp_path / "r.json")], capsys)
    assert "c0.png" in msg and "at least" in msg and not (tmp_path / "r.json").exists()
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(np.random.default_rng(1).bytes(300))
    assert str(bad) in _exit2(eval_sr.main, base + ["--weights", str(bad)], capsys)


# ------------------------------------------------------------------------------------- upscale


def test_upscale_colour_image(env, tmp_path, capsys):
    src = env["test"] / "c1.png"
    out = tmp_path / "up" / "c1_x4.png"
    info = upscale.main([str(src), str(out), "--scale", "4", "--weights", env["n3"], "--tile", "64", "--threads", "1"])
    img = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert img.shape == (148, 172, 3) and img.dtype == np.uint8 and info["out_width"] == 172
    expected = upscale_image(load_model(env["n3"]), read_image(src), 4, tile=None)
    got = cv2.cvtColor(img, cv2.COLOR_BGR2RGB) / 255.0
    assert np.abs(got - expected).max() <= 0.5 / 255 + 1e-6  # tiled == untiled, up to the 8-bit rounding
    captured = capsys.readouterr()
    assert "upscaling: tile" in captured.err and "warning" in captured.err  # x4 is not among n3_t's scales
    assert str(out) in captured.out
    grey = tmp_path / "g.png"
    upscale.main([str(env["train"] / "g0.png"), str(grey), "--scale", "2", "--weights", "bicubic", "--quiet"])
    assert cv2.imread(str(grey), cv2.IMREAD_UNCHANGED).shape == (80, 76)


def test_upscale_bad_inputs(env, tmp_path, capsys):
    src = str(env["test"] / "c0.png")
    assert "no such file" in _exit2(upscale.main, [str(tmp_path / "x.png"), str(tmp_path / "o.png"), "--scale", "2",
                                                   "--weights", env["vdsr"]], capsys)
    msg = _exit2(upscale.main, [src, str(tmp_path / "o.png"), "--scale", "2", "--weights", env["dncnn"]], capsys)
    assert "--weights" in msg and "not a super-resolution model" in msg
    assert "--scale" in _exit2(upscale.main, [src, str(tmp_path / "o.png"), "--scale", "1", "--weights", "bicubic"], capsys)
    assert "input file" in _exit2(upscale.main, [src, src, "--scale", "2", "--weights", "bicubic", "--overwrite"], capsys)
    (tmp_path / "exists.png").write_bytes(b"keep")
    msg = _exit2(upscale.main, [src, str(tmp_path / "exists.png"), "--scale", "2", "--weights", "bicubic"], capsys)
    assert "exists" in msg and (tmp_path / "exists.png").read_bytes() == b"keep"
    assert "suffix" in _exit2(upscale.main, [src, str(tmp_path / "o.gif"), "--scale", "2", "--weights", "bicubic"], capsys)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert "broken.png" in _exit2(upscale.main, [str(broken), str(tmp_path / "o.png"), "--scale", "2", "--weights",
                                                 "bicubic"], capsys)
    assert "available" in _exit2(upscale.main, [src, str(tmp_path / "o.png"), "--scale", "2", "--weights", "no-such"],
                                 capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.png", "exists.png"]


def test_upscale_subprocess_exit_code(env, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "upscale.py"), str(tmp_path / "missing.png"),
                           str(tmp_path / "o.png"), "--scale", "2", "--weights", "bicubic"],
                          capture_output=True, text=True, timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "missing.png" in proc.stderr


# ----------------------------------------------------------------------------------- benchmark


def test_bench_sr_section_quick(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_n3_image.py"), "--json", str(out), "--quick",
                           "--repeats", "1", "--threads", "1", "--sections", "sr"],
                          capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    sec = rep["results"]["sr"]
    assert list(rep["results"]) == ["sr"] and list(sec["rows"]) == ["x2", "x4"]
    for rows in sec["rows"].values():
        assert set(rows) == {"vdsr", "n3net-sr"}
        for r in rows.values():
            assert "error" not in r and r["time_ms"] > 0 and r["peak_mib"] >= 0 and r["threads"] == 1
    assert sec["rows"]["x4"]["vdsr"]["input"] == [12, 10]
    assert set(sec["ratios"]["x2"]) == {"time", "memory"} and "N3Net-SR" in rep["table_markdown"]


@pytest.mark.slow
def test_train_torchrun_two_processes_n3net(env, tmp_path, torchrun):
    """DDP with N3 blocks (whose DistanceNorm shift gets no gradient) and per-step scales shared by the processes."""
    out = tmp_path / "ddp"
    torchrun("train_sr.py", ["--data", env["train"], "--out", out, "--epochs", "1"] + N3)
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 2 and "torchrun --nproc_per_node=2" in ckpt["command"]
