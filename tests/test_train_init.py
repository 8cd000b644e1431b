"""--init of the image trainers: fine-tuning from a weight file, widened inputs start at zero."""
import json

import numpy as np
import pytest
import torch

from n3images.models import DnCNN, N3NetSR, VDSR
from n3images.training import load_widened_state
from n3sets.pretrained import load_model, save_model

torch.set_num_threads(1)
SMALL_BLOCK = {"patch_size": 4, "stride": 2, "window": 5}


@pytest.fixture(scope="module")
def images(stripe_images):
    return stripe_images


def _tiny_sr(**conf):
    torch.manual_seed(3)
    model = N3NetSR(depth=3, features=8, k=2, block=SMALL_BLOCK, **conf)
    with torch.no_grad():  # temperature CNNs that depend on their input (they start at a constant)
        for block in model.blocks:
            for param in block.temperature.parameters():
                param.normal_(0, 0.3)
    return model.eval()


def test_widened_inputs_start_at_zero_and_keep_the_function():
    plain = _tiny_sr(scale_temperature={"2": 4.0})
    aware = N3NetSR(depth=3, features=8, k=2, block=SMALL_BLOCK, scale_temperature={"2": 4.0}, scale_aware=True).eval()
    widened = load_widened_state(aware, plain.state_dict(), "plain.pt")
    assert widened == ["blocks.0.temperature.0.weight", "blocks.1.temperature.0.weight"]
    for key in widened:
        new, old = aware.state_dict()[key], plain.state_dict()[key]
        assert torch.equal(new[:, :old.shape[1]], old) and not new[:, old.shape[1]:].any()
    x = torch.rand(1, 1, 22, 20)
    with torch.no_grad():
        for s in (2, 3):  # the log(scale) channel has zero weights: the same output at every scale
            assert torch.equal(aware(x, scale=s), plain(x, scale=s))
    # what cannot be widened is refused, naming the file and the tensor
    with pytest.raises(ValueError, match=r"plain\.pt: blocks\.0\.temperature\.0\.weight has shape"):
        load_widened_state(plain, aware.state_dict(), "plain.pt")
    with pytest.raises(ValueError, match=r"vdsr\.pt does not fit the model: missing"):
        load_widened_state(plain, VDSR(depth=3, features=8).state_dict(), "vdsr.pt")
    dn_wide = DnCNN(depth=3, features=16)
    with pytest.raises(ValueError, match="has shape"):  # wider outputs (dim 0) are not an added input
        load_widened_state(dn_wide, DnCNN(depth=3, features=8).state_dict(), "dn.pt")


def test_train_sr_init_fine_tunes_a_scale_aware_model(images, tmp_path, load_program):
    train_sr = load_program("train_sr")
    start = save_model(tmp_path / "start.pt", _tiny_sr(scale_temperature={"2": 4.0}), scales=[2, 3], steps=7,
                       patches_seen=28)
    argv = ["--data", str(images), "--model", "n3net", "--init", str(start), "--model-conf",
            json.dumps({"scale_aware": True}), "--crop", "24", "--batch-size", "4", "--samples-per-epoch", "8",
            "--val-count", "2", "--threads", "1", "--no-progress", "--device", "cpu", "--scales", "2", "3",
            "--lr", "1e-4"]
    s = train_sr.main(argv + ["--out", str(tmp_path / "run"), "--epochs", "1", "--export", str(tmp_path / "ft.pt")])
    model = load_model(tmp_path / "ft.pt")
    # the configuration is the init model's plus --model-conf; the meta says where training started
    assert model.conf["scale_aware"] is True and model.conf["scale_temperature"] == {"2": 4.0}
    assert model.conf["depth"] == 3 and model.conf["k"] == 2 and model.conf["block"]["patch_size"] == 4
    init = model.meta["init"]
    assert init["weights"] == str(start) and len(init["sha256"]) == 64 and init["steps"] == 7
    assert init["patches_seen"] == 28 and init["widened"] == ["blocks.0.temperature.0.weight",
                                                               "blocks.1.temperature.0.weight"]
    assert np.isfinite(s["best"]["val_psnr"])
    # trained from there: the new inputs' weights moved away from zero
    assert model.blocks[0].temperature[0].weight[:, -1].abs().sum() > 0
    # resume keeps the init; another --init is refused
    train_sr.main(argv + ["--out", str(tmp_path / "run"), "--epochs", "2", "--resume"])
    other = save_model(tmp_path / "other.pt", _tiny_sr(), scales=[2, 3])
    argv[argv.index(str(start))] = str(other)
    with pytest.raises(SystemExit, match="trained with --init"):
        train_sr.main(argv + ["--out", str(tmp_path / "run"), "--epochs", "3", "--resume"])


def test_train_denoise_init_errors_name_the_file(images, tmp_path, load_program):
    train_denoise = load_program("train_denoise")
    base = ["--data", str(images), "--batch-size", "4", "--samples-per-epoch", "8", "--val-count", "2", "--threads",
            "1", "--no-progress", "--device", "cpu", "--crop", "16", "--epochs", "1"]
    dn = save_model(tmp_path / "dn.pt", DnCNN(depth=3, features=8), sigma=25.0, noise="gaussian")
    s = train_denoise.main(base + ["--model", "dncnn", "--init", str(dn), "--out", str(tmp_path / "ok")])
    assert np.isfinite(s["best"]["val_psnr"])
    log = json.loads((tmp_path / "ok" / "log.json").read_text())
    assert log["init"]["path"] == str(dn) and log["init"]["widened"] == []
    vdsr = save_model(tmp_path / "vdsr.pt", VDSR(depth=3, features=8), scales=[2])
    with pytest.raises(SystemExit, match=r"--init .*vdsr\.pt: .* holds a VDSR, not the DnCNN of --model dncnn"):
        train_denoise.main(base + ["--model", "dncnn", "--init", str(vdsr), "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match=r"--init .*missing\.pt: no weight file"):
        train_denoise.main(base + ["--model", "dncnn", "--init", str(tmp_path / "missing.pt"), "--out",
                                   str(tmp_path / "b")])
    with pytest.raises(SystemExit, match=r"--init .*dn\.pt .*features\.0\.weight|--init .*dn\.pt.*has shape"):
        train_denoise.main(base + ["--model", "dncnn", "--features", "16", "--init", str(dn), "--out",
                                   str(tmp_path / "c")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _check_init_record(model, parent: str) -> dict:
    """``model.meta["init"]`` names ``parent`` and the sha256 of its shipped file; returns the record."""
    from n3images.programs import sha256
    from n3sets.pretrained import resolve_weights

    init = model.meta["init"]
    assert init["weights"] == parent and init["sha256"] == sha256(resolve_weights(parent))
    return init


def _butterfly_gains(data_root, names, scale: int) -> dict:
    """PSNR gain over bicubic (dB) of each shipped SR model on a 96x96 crop of set5 butterfly."""
    import n3images
    from n3images.io import read_image
    from n3images.sr import degrade, sr_scores, super_resolve, to_luma

    hr = to_luma(read_image(data_root / "images" / "set5" / "butterfly.png", "rgb")[64:160, 64:160], quantize=True)
    inp = degrade(hr, scale)[1]
    bicubic = sr_scores(inp, hr, scale)[0]
    return {name: sr_scores(super_resolve(n3images.load_model(name), inp, tile=None, scale=scale), hr, scale)[0] - bicubic
            for name in names}


def test_shipped_fine_tuned_models_record_where_they_started(data_root):
    """vdsr-x234-ft / n3net-sr-x234-ft: the shipped SR models trained further with --init, the same budget each."""
    import n3images

    for name, parent in (("vdsr-x234-ft", "vdsr-x234"), ("n3net-sr-x234-ft", "n3net-sr-x234-cal")):
        model = n3images.load_model(name)
        init = _check_init_record(model, parent)
        assert model.meta["patches_seen"] + init["patches_seen"] > init["patches_seen"] > 0
    n3 = n3images.load_model("n3net-sr-x234-ft")
    cal = n3images.load_model("n3net-sr-x234-cal")
    assert n3.conf["scale_aware"] is True and n3.conf["scale_temperature"] == cal.conf["scale_temperature"]
    assert n3.meta["init"]["widened"] == ["blocks.0.temperature.0.weight", "blocks.1.temperature.0.weight"]
    # x4 on this crop (measured): bicubic 22.65, vdsr-x234-ft 26.13, n3net-sr-x234-ft 26.20 dB
    for name, gain in _butterfly_gains(data_root, ("vdsr-x234-ft", "n3net-sr-x234-ft"), 4).items():
        assert gain > 2.5, name


def test_shipped_second_fine_tune_round(data_root):
    """vdsr-x234-ft2 / n3net-sr-x234-ft2: one more --init round from the -ft models, the same recipe and
    budget each; N3Net-SR keeps the configuration (scale-aware, factors) it was trained with."""
    import n3images

    budgets = []
    for name, parent in (("vdsr-x234-ft2", "vdsr-x234-ft"), ("n3net-sr-x234-ft2", "n3net-sr-x234-ft")):
        model, before = n3images.load_model(name), n3images.load_model(parent)
        assert not _check_init_record(model, parent)["widened"]
        assert model.conf == before.conf
        assert "--seed 3" in model.meta["command"] and "--lr 2e-5" in model.meta["command"]
        budgets.append((model.meta["epochs_trained_total"], model.meta["batch_size"], model.meta["crop"]))
    assert budgets[0] == budgets[1] == (12, 16, 48)
    # x3 on this crop (measured): bicubic 24.43, vdsr-x234-ft2 28.91, n3net-sr-x234-ft2 28.29 dB
    for name, gain in _butterfly_gains(data_root, ("vdsr-x234-ft2", "n3net-sr-x234-ft2"), 3).items():
        assert gain > 2.0, name
