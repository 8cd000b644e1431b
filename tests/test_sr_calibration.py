"""Per-scale temperature calibration of N3Net-SR: the block/model plumbing, the search and calibrate_sr.py."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from n3images.io import write_image
from n3images.models import N3NetDenoiser, N3NetSR, VDSR
from n3images.n3block2d import N3Block2d
from n3images.sr import calibrate_temperature, degrade, sr_scores, super_resolve, to_luma, upscale_image
from n3sets.pretrained import load_model, save_model

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)
SMALL_BLOCK = {"patch_size": 4, "stride": 2, "window": 5}


def _tiny(seed=2, **conf):
    torch.manual_seed(seed)
    return N3NetSR(depth=3, features=8, k=2, block=SMALL_BLOCK, **conf).eval()


def _load_program():
    spec = importlib.util.spec_from_file_location("calibrate_sr_prog", ROOT / "pipelines" / "calibrate_sr.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _images(n=3, h=30, w=34, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    return [np.clip(0.5 + 0.3 * np.sin(xx / (2 + i) + yy / 3) + rng.normal(0, 0.03, (h, w)), 0, 1).astype(np.float32)
            for i in range(n)]


def test_block_temperature_scale_is_a_multiplier_and_checked():
    torch.manual_seed(0)
    block = N3Block2d(3, k=2, **SMALL_BLOCK).eval()
    x = torch.rand(1, 3, 14, 12)
    with torch.no_grad():
        base = block(x)
        assert torch.equal(block(x, temperature_scale=1.0), base)
        hot = block(x, temperature_scale=1e6)
        # an almost infinite temperature: every neighbour volume is the same (uniform) average
        vols = hot[:, 3:].reshape(1, 2, 3, 14, 12)
        torch.testing.assert_close(vols[:, 0], vols[:, 1], rtol=0, atol=1e-4)
        assert not torch.allclose(block(x, temperature_scale=0.3), base)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature_scale"):
            block(x, temperature_scale=bad)
    hard = N3Block2d(3, k=2, relaxation="hard", **SMALL_BLOCK).eval()
    with torch.no_grad():
        assert torch.equal(hard(x, temperature_scale=5.0), hard(x))  # no temperature to scale


def test_n3netsr_uses_the_factor_of_the_scale_it_is_told():
    model = _tiny(scale_temperature={"2": 3.0, 4: 0.5})
    assert model.conf["scale_temperature"] == {"2": 3.0, "4": 0.5}
    x = torch.rand(1, 1, 20, 18)
    with torch.no_grad():
        plain = model(x)
        assert torch.equal(model(x, scale=3), plain)       # not calibrated: as trained
        assert torch.equal(model(x, scale=None), plain)
        torch.testing.assert_close(model(x, scale=2), N3NetDenoiser.forward(model, x, temperature_scale=3.0),
                                   rtol=0, atol=0)
        assert not torch.allclose(model(x, scale=2), plain)
        vdsr = VDSR(depth=3, features=4).eval()
        assert torch.equal(vdsr(x, scale=2), vdsr(x))  # VDSR takes the argument and ignores it
    for bad, match in (({"1": 2.0}, "integer scale"), ({"x2": 2.0}, "integer scale"), ({"2": 0.0}, "positive"),
                       ({"2": "hot"}, "positive"), ([2.0], "dict")):
        with pytest.raises(ValueError, match=match):
            N3NetSR(depth=3, features=8, k=2, block=SMALL_BLOCK, scale_temperature=bad)


def test_super_resolve_and_upscale_pass_the_scale_through_tiles(tmp_path):
    model = _tiny(scale_temperature={"2": 4.0})
    hr = to_luma(_images(1, 40, 36)[0], quantize=True)
    inp = degrade(hr, 2)[1]
    untiled = super_resolve(model, inp, tile=None, scale=2)
    assert np.array_equal(super_resolve(model, inp, tile=16, scale=2), untiled)
    assert not np.array_equal(super_resolve(model, inp, tile=None), untiled)
    # a saved calibrated model keeps its factors; upscale_image tells it the scale
    path = save_model(tmp_path / "cal.pt", model, scales=[2])
    loaded = load_model(path)
    assert loaded.conf["scale_temperature"] == {"2": 4.0}
    rgb = np.stack([_images(1, 20, 18)[0]] * 3, axis=2)
    a = upscale_image(loaded, rgb, 2, tile=None)
    loaded.conf["scale_temperature"] = {}
    assert not np.array_equal(upscale_image(loaded, rgb, 2, tile=None), a)


def test_calibrate_temperature_picks_the_best_mean_psnr_and_leaves_the_model():
    model = _tiny(scale_temperature={"3": 7.0})
    lumas = [to_luma(img, quantize=True) for img in _images()]
    res = calibrate_temperature(model, lumas, scales=(2, 3), factors=(0.2, 5.0))
    assert res["factors"] == [0.2, 1.0, 5.0] and res["num_images"] == 3
    assert model.conf["scale_temperature"] == {"3": 7.0}  # restored
    # the current factor (7 at x3, none = 1 at x2) is always measured, and gains are against it
    assert res["scales"]["2"]["current"] == 1.0 and set(res["scales"]["2"]["psnr"]) == {"0.2", "1", "5"}
    assert res["scales"]["3"]["current"] == 7.0 and set(res["scales"]["3"]["psnr"]) == {"0.2", "1", "5", "7"}
    for s in (2, 3):
        r = res["scales"][str(s)]
        # recompute every factor's mean PSNR by hand
        for f in map(float, r["psnr"]):
            psnrs = []
            for img in lumas:
                hr = img[: img.shape[0] - img.shape[0] % s, : img.shape[1] - img.shape[1] % s].astype(np.float64)
                out = N3NetDenoiser.forward(model, torch.from_numpy(degrade(hr, s)[1].astype(np.float32))[None, None],
                                            temperature_scale=f)
                psnrs.append(sr_scores(out[0, 0].detach().numpy(), hr, s)[0])
            assert r["psnr"][f"{f:g}"] == pytest.approx(float(np.mean(psnrs)), abs=1e-9)
        assert r["psnr"][f"{r['best']:g}"] == max(r["psnr"].values())
        assert r["gain_db"] == pytest.approx(max(r["psnr"].values()) - r["psnr"][f"{r['current']:g}"])
    # a factor replaces the current one only when it gains at least min_gain dB
    kept = calibrate_temperature(model, lumas, scales=(2, 3), factors=(0.2, 5.0), min_gain=1e3)
    assert {k: v["best"] for k, v in kept["scales"].items()} == {"2": 1.0, "3": 7.0} and kept["min_gain"] == 1e3
    assert all(v["gain_db"] == 0 and v["psnr"] == res["scales"][k]["psnr"] for k, v in kept["scales"].items())
    with pytest.raises(ValueError, match="min_gain"):
        calibrate_temperature(model, lumas, min_gain=-0.1)
    with pytest.raises(ValueError, match="N3Net-SR"):
        calibrate_temperature(VDSR(depth=3, features=4), lumas)


def test_calibrate_sr_program_exports_and_refuses_bad_input(tmp_path, capsys):
    prog = _load_program()
    data = tmp_path / "train"
    for i, img in enumerate(_images(4)):
        write_image(data / f"im{i}.png", img)
    weights = save_model(tmp_path / "n3.pt", _tiny(), scales=[2, 3])
    out = prog.main(["--weights", str(weights), "--data", str(data), "--val-count", "2", "--scales", "2", "3",
                     "--factors", "0.5", "2", "--export", str(tmp_path / "cal.pt"), "--json", str(tmp_path / "c.json"),
                     "--device", "cpu"])
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["images"] == ["im2.png", "im3.png"] and set(saved["scales"]) == {"2", "3"}
    cal = load_model(tmp_path / "cal.pt")
    assert cal.conf["scale_temperature"] == {k: float(v) for k, v in out["scale_temperature"].items()}
    assert cal.meta["temperature_calibration"]["images"] == ["im2.png", "im3.png"]
    assert cal.meta["scales"] == [2, 3]  # the original meta is kept
    for k, v in load_model(weights).state_dict().items():
        assert torch.equal(cal.state_dict()[k], v)

    # --val: folders and files together, centre-cropped; the paths as given are recorded
    other = tmp_path / "other"
    write_image(other / "a.png", _images(1, 40, 36)[0])
    out = prog.main(["--weights", str(weights), "--val", str(other), str(data / "im0.png"), "--crop", "24",
                     "--scales", "2", "--factors", "3", "--json", str(tmp_path / "v.json"), "--device", "cpu"])
    assert out["images"] == [str(other / "a.png"), str(data / "im0.png")] and out["crop"] == 24
    assert out["num_images"] == 2 and set(out["scales"]["2"]["psnr"]) == {"1", "3"}
    from n3images.io import read_image
    crop = to_luma(read_image(other / "a.png", "auto")[8:32, 6:30], quantize=True).astype(np.float32)
    direct = calibrate_temperature(load_model(weights), [crop, to_luma(read_image(data / "im0.png", "auto")[3:27, 5:29],
                                                                       quantize=True).astype(np.float32)],
                                   scales=(2,), factors=(3.0,))
    assert out["scales"]["2"]["psnr"] == pytest.approx(direct["scales"]["2"]["psnr"], abs=1e-9)

    vdsr = save_model(tmp_path / "vdsr.pt", VDSR(depth=3, features=4))
    cases = [
        (["--weights", str(weights), "--data", str(data), "--export", str(tmp_path / "cal.pt")], "exists"),
        (["--weights", str(weights), "--data", str(data), "--export", str(weights), "--overwrite"], "input weight file"),
        (["--weights", str(vdsr), "--data", str(data)], "no N3 blocks"),
        (["--weights", str(weights), "--data", str(tmp_path / "missing")], "missing"),
        (["--weights", str(weights), "--data", str(data), "--val-count", "9"], "--val-count 9"),
        (["--weights", str(weights), "--val", str(other), str(tmp_path / "nope.png")], "--val " + str(tmp_path / "nope.png")),
        (["--weights", str(weights), "--val", str(tmp_path / "empty")], "--val"),
        (["--weights", str(weights), "--val", str(other), "--crop", "4"], "--crop"),
        (["--weights", str(weights), "--val", str(other), "--min-gain", "-0.5"], "--min-gain"),
    ]
    for argv, match in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            prog.main(argv + ["--device", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("calibrate_sr.py: error: "), err
        assert match in err[0], err


def test_shipped_calibrated_model(data_root):
    """n3net-sr-x234-cal: n3net-sr-x234's weights with the factors calibrate_sr.py chose (results/sr/calibration.json)."""
    import n3images

    cal, base = n3images.load_model("n3net-sr-x234-cal"), n3images.load_model("n3net-sr-x234")
    chosen = json.loads((ROOT / "results" / "sr" / "calibration.json").read_text())["scale_temperature"]
    assert cal.conf["scale_temperature"] == {k: float(v) for k, v in chosen.items()} and set(chosen) == {"2", "3", "4"}
    assert base.conf["scale_temperature"] == {}
    for k, v in base.state_dict().items():
        assert torch.equal(cal.state_dict()[k], v)
    from n3images.io import read_image
    hr = to_luma(read_image(data_root / "images" / "set5" / "butterfly.png", "rgb")[64:160, 64:160], quantize=True)
    inp = degrade(hr, 2)[1]
    bicubic = sr_scores(inp, hr, 2)[0]
    # x2 on this crop (measured): bicubic 27.7, as trained 28.7, calibrated 31.2 dB
    as_trained = sr_scores(super_resolve(base, inp, tile=None, scale=2), hr, 2)[0]
    calibrated = sr_scores(super_resolve(cal, inp, tile=None, scale=2), hr, 2)[0]
    assert as_trained > bicubic + 0.5 and calibrated > as_trained + 1.0


# ------------------------------------------------------------------ scale-aware temperature (trained)


def test_scale_aware_model_feeds_the_scale_to_the_temperature_cnns(tmp_path):
    model = _tiny(scale_aware=True)
    for block in model.blocks:
        assert block.conf["temp_extra_channels"] == 1 and block.temperature[0].in_channels == 8 + 1
    with torch.no_grad():  # the temperature CNNs start at a constant output: give them weights that use the input
        for block in model.blocks:
            for param in block.temperature.parameters():
                param.normal_(0, 0.3)
    x = torch.rand(1, 1, 20, 18)
    with torch.no_grad():
        out2, out3 = model(x, scale=2), model(x, scale=3)
        assert not torch.allclose(out2, out3)  # the temperatures depend on the scale
        # the same as feeding the constant log(scale) map to the blocks by hand
        extra = torch.full((1, 1, 20, 18), float(np.log(3.0)))
        assert torch.equal(N3NetDenoiser.forward(model, x, temperature_input=extra), out3)
    for bad in (None, 1, 2.5, True):
        with pytest.raises(ValueError, match="scale_aware model needs"):
            model(x, scale=bad)
    with pytest.raises(ValueError, match="temperature_input must have shape"):
        model.blocks[0](torch.rand(1, 8, 20, 18))
    with pytest.raises(ValueError, match="scale_aware"):
        N3NetSR(depth=3, features=8, k=2, block=SMALL_BLOCK, scale_aware="yes")
    path = save_model(tmp_path / "aware.pt", model, scales=[2, 3])
    loaded = load_model(path)
    assert loaded.conf["scale_aware"] is True
    with torch.no_grad():
        assert torch.equal(loaded(x, scale=3), out3)


def test_train_sr_scale_aware_passes_the_scale_in_training_and_validation(tmp_path):
    spec = importlib.util.spec_from_file_location("train_sr_for_aware", ROOT / "pipelines" / "train_sr.py")
    train_sr = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = train_sr
    spec.loader.exec_module(train_sr)
    data = tmp_path / "train"
    for i, img in enumerate(_images(5, 40, 38)):
        write_image(data / f"g{i}.png", img)
    conf = json.dumps({"block": SMALL_BLOCK, "scale_aware": True})
    argv = ["--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", "--export", str(tmp_path / "a.pt"),
            "--model", "n3net", "--k", "2", "--model-conf", conf, "--crop", "24", "--batch-size", "4",
            "--samples-per-epoch", "8", "--val-count", "2", "--threads", "1", "--no-progress", "--device", "cpu",
            "--depth", "3", "--features", "8", "--scales", "2", "3"]
    s = train_sr.main(argv)  # a scale_aware model called without the scale would raise
    model = load_model(tmp_path / "a.pt")
    assert model.conf["scale_aware"] is True
    # the logged validation PSNR at x3 is what the model gives when told the scale
    psnrs = []
    for name in ("g3.png", "g4.png"):
        from n3images.io import read_image
        hr = to_luma(read_image(data / name, "auto"), quantize=True)
        hr = hr[: hr.shape[0] - hr.shape[0] % 3, : hr.shape[1] - hr.shape[1] % 3]
        psnrs.append(sr_scores(super_resolve(model, degrade(hr, 3)[1], tile=None, scale=3), hr, 3)[0])
    assert s["best"]["val_psnr_x3"] == pytest.approx(np.mean(psnrs), abs=1e-3)


def test_shipped_scale_aware_model_trained_from_scratch(data_root):
    """n3net-sr-aware-x234: scale-aware temperature CNNs trained from scratch (no --init) at vdsr-x234's budget."""
    import n3images
    from n3images.io import read_image

    model, vdsr = n3images.load_model("n3net-sr-aware-x234"), n3images.load_model("vdsr-x234")
    assert model.conf["scale_aware"] is True and model.conf["scale_temperature"] == {}
    assert model.meta.get("init") is None and "cuda" in model.meta["device"]
    assert model.meta["batch_size"] == vdsr.meta["batch_size"] and model.meta["crop"] == vdsr.meta["crop"]
    assert model.meta["epochs_trained_total"] == vdsr.meta["epochs_trained_total"] == 12
    hr = to_luma(read_image(data_root / "images" / "set5" / "butterfly.png", "rgb")[64:160, 64:160], quantize=True)
    # on this crop (measured): bicubic 27.71 / 24.43 / 22.65, this model 31.54 / 28.41 / 25.10 dB at x2 / x3 / x4
    for scale, gain in ((2, 3.0), (3, 3.0), (4, 2.0)):
        inp = degrade(hr, scale)[1]
        out = super_resolve(model, inp, tile=None, scale=scale)
        assert sr_scores(out, hr, scale)[0] > sr_scores(inp, hr, scale)[0] + gain, scale


def test_shipped_ft_model_recalibrated_on_building_crops(data_root):
    """n3net-sr-x234-ft-cal: n3net-sr-x234-ft's weights with the factors calibrate_sr.py chose on
    centre crops of Strecha building images (results/sr/calibration_ft_strecha.json): only x3 moved."""
    import n3images

    cal, ft = n3images.load_model("n3net-sr-x234-ft-cal"), n3images.load_model("n3net-sr-x234-ft")
    record = json.loads((ROOT / "results" / "sr" / "calibration_ft_strecha.json").read_text())
    assert cal.conf["scale_temperature"] == {k: float(v) for k, v in record["scale_temperature"].items()}
    assert record["crop"] == 320 and all("/strecha/" in p for p in record["images"]) and len(record["images"]) == 11
    assert {k: v["current"] for k, v in record["scales"].items()} == ft.conf["scale_temperature"]
    changed = {k for k, v in cal.conf["scale_temperature"].items() if v != ft.conf["scale_temperature"][k]}
    assert changed == {"3"}
    assert "--crop 320" in cal.meta["temperature_calibration"]["command"]
    for k, v in ft.state_dict().items():
        assert torch.equal(cal.state_dict()[k], v)
    from n3images.io import read_image
    hr = to_luma(read_image(data_root / "images" / "set5" / "butterfly.png", "rgb")[64:160, 64:160], quantize=True)
    for s in (2, 3, 4):
        inp = degrade(hr[: 96 - 96 % s, : 96 - 96 % s], s)[1]
        same = np.array_equal(super_resolve(cal, inp, tile=None, scale=s), super_resolve(ft, inp, tile=None, scale=s))
        assert same == (str(s) not in changed), s
