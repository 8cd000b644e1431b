"""pipelines/eval_denoise.py on tiny untrained models and 40x36 images (no training, a few seconds)."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from n3images.inference import denoise_image
from n3images.io import read_image
from n3images.metrics import psnr, ssim
from n3images.models import DnCNN, N3NetDenoiser
from n3images.noise import HETERO_EVAL_PAIRS, add_gaussian_noise, hetero_eval_noise, hetero_eval_target
from n3sets.pretrained import load_model, save_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pipelines" / "eval_denoise.py"
torch.set_num_threads(1)


def _load_script():
    spec = importlib.util.spec_from_file_location("eval_denoise", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ed = _load_script()


def _grey_images(folder: Path, n=3, h=36, w=40, seed=0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    for i in range(n):
        img = 128 + 60 * np.sin(x / 5 + i) * np.cos(y / 7) + rng.normal(0, 5, (h, w))
        cv2.imwrite(str(folder / f"img{i}.png"), np.clip(img, 0, 255).astype(np.uint8))
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_denoise")
    data = _grey_images(root / "set3")
    torch.manual_seed(1)
    dncnn = save_model(root / "dncnn_a.pt", DnCNN(depth=3, features=8).eval(), sigma=25, noise="gaussian",
                       command="test", steps=0, val_psnr=0.0)
    torch.manual_seed(2)
    dncnn_b = save_model(root / "dncnn_b.pt", DnCNN(depth=3, features=8).eval(), sigma=25, noise="gaussian")
    torch.manual_seed(3)
    n3 = save_model(root / "n3.pt", N3NetDenoiser(depth=3, features=8, block={"patch_size": 4, "stride": 2, "window": 5})
                    .eval(), sigma=25, noise="gaussian")
    return {"root": root, "data": data, "dncnn": str(dncnn), "dncnn_b": str(dncnn_b), "n3": str(n3)}


def run_main(argv):
    return ed.main([*argv, "--threads", "1", "--quiet"])


def expect_exit2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        run_main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_json_contract_and_protocol(env, tmp_path, capsys):
    out = tmp_path / "res" / "r.json"
    result = run_main(["--data", str(env["data"]), "--sigma", "25", "50", "--weights", env["dncnn"], env["n3"],
                       "--baselines", "nlm", "--json", str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert not [p for p in out.parent.iterdir() if p.name != "r.json"]  # no temporary left behind

    names = ["noisy", "nlm", "dncnn_a", "n3"]
    assert list(on_disk["methods"]) == names
    for m in on_disk["methods"].values():
        assert set(m) == {"psnr", "ssim", "time_s"}
        assert np.isfinite(m["psnr"]) and -1 <= m["ssim"] <= 1 and m["time_s"] >= 0
    ds = on_disk["datasets"]["set3"]
    assert ds["num_images"] == 3 and list(ds["sigma"]) == ["25", "50"]
    assert ds["sigma"]["25"]["methods"] == on_disk["methods"]
    for key in ("25", "50"):
        assert all(len(v) == 3 for v in ds["sigma"][key]["per_image"].values())
        assert ds["sigma"][key]["methods"]["nlm"]["psnr"] > ds["sigma"][key]["methods"]["noisy"]["psnr"]
    assert ds["sigma"]["50"]["methods"]["noisy"]["psnr"] < ds["sigma"]["25"]["methods"]["noisy"]["psnr"] - 5

    # the protocol, computed directly: seeded noise of image i, clipped output vs clean
    clean = [read_image(env["data"] / f"img{i}.png", "gray") for i in range(3)]
    model = load_model(env["n3"])
    noisy_p, model_p, model_s = [], [], []
    for i, c in enumerate(clean):
        noisy = add_gaussian_noise(c, 25, i)
        noisy_p.append(psnr(np.clip(noisy, 0, 1), c))
        den = np.clip(denoise_image(model, noisy), 0, 1)
        model_p.append(psnr(den, c))
        model_s.append(ssim(den, c))
    assert ds["sigma"]["25"]["per_image"]["noisy"] == pytest.approx(noisy_p, abs=1e-9)
    assert on_disk["methods"]["noisy"]["psnr"] == pytest.approx(np.mean(noisy_p), abs=1e-9)
    assert on_disk["methods"]["noisy"]["psnr"] == pytest.approx(20.0, abs=0.5)  # sigma 25 on [0, 1] data
    assert ds["sigma"]["25"]["per_image"]["n3"] == pytest.approx(model_p, abs=1e-4)
    assert on_disk["methods"]["n3"]["ssim"] == pytest.approx(np.mean(model_s), abs=1e-5)

    s = on_disk["settings"]
    assert s["images"] == {"set3": ["img0.png", "img1.png", "img2.png"]}
    assert s["sigma"] == [25.0, 50.0] and s["noise"] == "gaussian" and s["baselines"] == ["nlm"]
    assert s["threads"] == 1 and s["device"] == "cpu" and s["torch"] == str(torch.__version__)
    assert s["cpu"] and s["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # timings depend on it
    assert "eval_denoise.py" in s["command"] and "--weights" in s["command"]
    w = s["weights"]["dncnn_a"]
    assert w["path"] == env["dncnn"] and w["class"] == "DnCNN" and len(w["sha256"]) == 64
    assert w["meta"]["sigma"] == 25 and w["meta"]["command"] == "test" and w["meta"]["steps"] == 0
    assert s["weights"]["n3"]["class"] == "N3NetDenoiser"

    printed = capsys.readouterr().out
    assert "| method | PSNR | SSIM | s/image |" in printed and "set3 (3 images), sigma 50" in printed


def test_bm3d_and_saved_images(env, tmp_path):
    save = tmp_path / "imgs"
    result = run_main(["--data", str(env["data"]), "--max-images", "1", "--baselines", "bm3d,nlm",
                       "--weights", env["dncnn"], "--save-images", str(save)])
    m = result["methods"]
    assert list(m) == ["noisy", "bm3d", "nlm", "dncnn_a"]
    assert m["bm3d"]["psnr"] > m["noisy"]["psnr"] + 3
    assert result["settings"]["images"]["set3"] == ["img0.png"]
    for method in ("clean", "noisy", "bm3d", "nlm", "dncnn_a"):
        f = save / "set3" / "s25" / method / "img0.png"
        img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        assert img.shape == (36, 40) and img.dtype == np.uint8, f
    clean = cv2.imread(str(env["data"] / "img0.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(cv2.imread(str(save / "set3" / "s25" / "clean" / "img0.png"), cv2.IMREAD_UNCHANGED), clean)
    # the saved output is the evaluated one, quantised to 8 bit
    saved = cv2.imread(str(save / "set3" / "s25" / "bm3d" / "img0.png"), cv2.IMREAD_UNCHANGED) / 255.0
    assert psnr(saved, clean / 255.0) == pytest.approx(m["bm3d"]["psnr"], abs=0.1)


def test_weights_extend_equals_nargs(env):
    a = run_main(["--data", str(env["data"]), "--max-images", "2", "--weights", env["dncnn"], "--weights", env["dncnn_b"]])
    b = run_main(["--data", str(env["data"]), "--max-images", "2", "--weights", env["dncnn"], env["dncnn_b"]])
    assert list(a["methods"]) == list(b["methods"]) == ["noisy", "dncnn_a", "dncnn_b"]
    for name in a["methods"]:
        for metric in ("psnr", "ssim"):
            assert a["methods"][name][metric] == b["methods"][name][metric]
    assert a["methods"]["dncnn_a"]["psnr"] != a["methods"]["dncnn_b"]["psnr"]
    assert list(a["settings"]["weights"]) == ["dncnn_a", "dncnn_b"]


def test_same_weights_twice_evaluated_once(env, tmp_path, capsys):
    copy = shutil.copy(env["dncnn"], tmp_path / "copy_of_a.pt")
    result = run_main(["--data", str(env["data"]), "--max-images", "1",
                       "--weights", env["dncnn"], env["dncnn"], "--weights", str(copy)])
    assert list(result["methods"]) == ["noisy", "dncnn_a"]
    assert result["settings"]["weights_duplicates"] == {env["dncnn"]: "dncnn_a", str(copy): "dncnn_a"}
    err = capsys.readouterr().err
    assert "evaluated once" in err and "copy_of_a.pt" in err


def test_two_files_with_one_name_refused(env, tmp_path, capsys):
    for d, key in (("x", "dncnn"), ("y", "dncnn_b")):
        (tmp_path / d).mkdir()
        shutil.copy(env[key], tmp_path / d / "model.pt")
    msg = expect_exit2(["--data", str(env["data"]), "--weights", str(tmp_path / "x" / "model.pt"),
                        str(tmp_path / "y" / "model.pt")], capsys)
    assert "both named 'model'" in msg


def test_hetero_protocol(env):
    result = run_main(["--data", str(env["data"]), "--max-images", "2", "--noise", "hetero", "--baselines", "nlm",
                       "--weights", env["dncnn"]])
    levels = result["datasets"]["set3"]["noise_level"]
    keys = [f"a={a:g},b={b:g}" for a, b in HETERO_EVAL_PAIRS]
    assert list(levels) == keys and list(result["methods"]) == ["noisy", "nlm", "dncnn_a"]
    assert result["methods"] == levels[keys[0]]["methods"]
    a, b = HETERO_EVAL_PAIRS[1]
    noisy_p, sigmas = [], []
    for i in range(2):
        img = torch.from_numpy(read_image(env["data"] / f"img{i}.png", "gray"))[None, None]
        raw = hetero_eval_target(img, i)
        noisy = hetero_eval_noise(raw, a, b, i)
        noisy_p.append(psnr(noisy[0, 0].clamp(0, 1), raw[0, 0]))
        sigmas.append(float(torch.sqrt((a * raw.double() + b).mean())) * 255)
    assert levels[keys[1]]["per_image"]["noisy"] == pytest.approx(noisy_p, abs=1e-6)
    assert levels[keys[1]]["baseline_sigma"] == pytest.approx(sigmas, rel=1e-5)
    # more noise, lower PSNR
    noisy_means = [levels[k]["methods"]["noisy"]["psnr"] for k in keys]
    assert noisy_means == sorted(noisy_means, reverse=True)


def test_hetero_rejects_sigma(env, capsys):
    with pytest.raises(SystemExit) as info:
        run_main(["--data", str(env["data"]), "--noise", "hetero", "--sigma", "25"])
    assert info.value.code == 2
    assert "--sigma does not apply" in capsys.readouterr().err


def test_error_missing_and_empty_folder(env, tmp_path, capsys):
    missing = tmp_path / "nope"
    assert str(missing) in expect_exit2(["--data", str(missing)], capsys)
    (tmp_path / "empty").mkdir()
    msg = expect_exit2(["--data", str(env["data"]), str(tmp_path / "empty")], capsys)
    assert "--data" in msg and "empty" in msg and "no images" in msg


def test_error_unreadable_image(env, tmp_path, capsys):
    data = _grey_images(tmp_path / "d", n=2)
    (data / "img1b.png").write_bytes(np.random.default_rng(0).bytes(200))
    msg = expect_exit2(["--data", str(data), "--json", str(tmp_path / "r.json")], capsys)
    assert "img1b.png" in msg
    assert not (tmp_path / "r.json").exists()


def test_error_correspondence_weights(env, capsys):
    msg = expect_exit2(["--data", str(env["data"]), "--weights", "n3net-strecha"], capsys)
    assert "n3net-strecha" in msg and "not a denoiser" in msg


def test_error_random_bytes_weights(env, tmp_path, capsys):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(np.random.default_rng(1).bytes(300))
    msg = expect_exit2(["--data", str(env["data"]), "--weights", env["dncnn"], str(bad)], capsys)
    assert str(bad) in msg


def test_error_unknown_weights_lists_names(env, capsys):
    msg = expect_exit2(["--data", str(env["data"]), "--weights", "no-such-model"], capsys)
    assert "no-such-model" in msg and "available:" in msg


def test_error_colour_model(env, tmp_path, capsys):
    path = save_model(tmp_path / "rgb.pt", DnCNN(channels=3, depth=3, features=8).eval(), sigma=25)
    msg = expect_exit2(["--data", str(env["data"]), "--weights", str(path)], capsys)
    assert "rgb.pt" in msg and "3-channel" in msg


def test_error_json_not_writable(env, capsys):
    msg = expect_exit2(["--data", str(env["data"]), "--json", str(env["data"] / "img0.png" / "r.json")], capsys)
    assert "--json" in msg and "not a folder" in msg


def test_subprocess_error_exit_code(env, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tmp_path / "missing"), "--threads", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert str(tmp_path / "missing") in proc.stderr


def test_scores_layout_shared_by_both_evaluations():
    from n3images.programs import Scores

    scores = Scores(["a", "b"])
    scores.add("a", 30.0, 0.8, 0.5)
    scores.add("b", 20.0, 0.5, 0.0)
    scores.add("a", 32.0, 0.9, 1.5)
    scores.add("b", 22.0, 0.7, 0.0)
    res = scores.result()
    assert list(res) == ["methods", "per_image", "per_image_ssim"]
    assert res["methods"]["a"] == pytest.approx({"psnr": 31.0, "ssim": 0.85, "time_s": 1.0})
    assert res["methods"]["b"]["psnr"] == pytest.approx(21.0)
    assert res["per_image"] == {"a": [30.0, 32.0], "b": [20.0, 22.0]} and res["per_image_ssim"]["b"] == [0.5, 0.7]
