"""n3sets.pretrained: one loader for weight files and trainer checkpoints, one registry of model classes."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import n3images
from n3images.io import write_image
from n3sets import MatchFilter
from n3sets.models import CNNet, N3Net
from n3sets.pretrained import (build_model, load_model, model_class, model_classes, read_checkpoint,
                               read_weight_file, register_model_class)

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def _program(name):
    spec = importlib.util.spec_from_file_location(f"ckpt_prog_{name}", ROOT / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _same_outputs(a, b, x):
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.fixture(scope="module")
def grey_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    yy, xx = np.mgrid[0:40, 0:38]
    for i in range(5):
        img = 0.5 + 0.35 * np.sin(xx * (0.3 + 0.1 * i) + yy * 0.2 * i) * np.cos(yy * 0.25)
        write_image(d / f"g{i}.png", img.astype(np.float32))
    return d


def test_one_registry_names_every_trainer_model():
    from n3images.models import DENOISERS, SR_MODELS

    assert model_classes("correspondence") == {"cnnet": CNNet, "n3net": N3Net}
    assert model_classes("denoising") == DENOISERS and model_classes("super-resolution") == SR_MODELS
    assert model_class("N3Net") is N3Net and model_class("n3net", "super-resolution") is SR_MODELS["n3net"]
    with pytest.raises(ValueError, match="unknown correspondence model 'vdsr'.*cnnet, n3net"):
        model_class("vdsr", "correspondence")
    with pytest.raises(ValueError, match="task must be one of"):
        model_classes("deblurring")
    with pytest.raises(ValueError, match="already registered"):
        register_model_class(CNNet, task="correspondence", program_name="n3net")


def test_train_corr_checkpoint_loads_like_its_export(tmp_path):
    from data_prep.synthetic import write_synthetic_dataset

    train_corr = _program("train_corr")
    kw = {"num_matches": (40, 60), "outlier_ratio": 0.5}
    train = write_synthetic_dataset(tmp_path / "train.h5", 8, seed=0, **kw)
    val = write_synthetic_dataset(tmp_path / "val.h5", 4, seed=1, **kw)
    out, export = tmp_path / "run", tmp_path / "tiny.pt"
    train_corr.main(["--train", str(train), "--val", str(val), "--out", str(out), "--epochs", "1", "--export",
                     str(export), "--model", "n3net", "--channels", "8", "--blocks", "2", "--n3-after", "1",
                     "--k", "1", "--embed-channels", "4", "--batch-size", "4", "--max-matches", "40", "--threads",
                     "1", "--no-progress"])
    with pytest.raises(Exception, match="weights_only"):  # the RNG state needs numpy's arrays allowed, nothing more
        torch.load(out / "best.pt", weights_only=True)
    assert "optimizer" in read_checkpoint(out / "best.pt")
    exported = load_model(export)
    for name in ("best.pt", "last.pt"):
        model = load_model(out / name)
        assert type(model) is N3Net and not model.training and model.conf == exported.conf
        assert model.meta["task"] == "correspondence" and model.meta["epochs"] == 1
        assert "train_corr.py" in model.meta["command"] and model.meta["checkpoint"] == str(out / name)
        _same_outputs(model, exported, torch.randn(2, 4, 30))
    payload = read_weight_file(out / "best.pt")
    assert payload["class"] == "N3Net" and "optimizer" not in payload and "rng" not in str(payload["meta"])
    fresh = build_model(payload, pretrained=False)
    assert fresh.conf == exported.conf and fresh.meta == {}
    mf = MatchFilter.from_pretrained(out / "best.pt")
    assert type(mf.model) is N3Net and mf.name == "best"
    hub = torch.hub.load(str(ROOT), "match_filter", source="local", name=str(out / "best.pt"))
    _same_outputs(hub.model, exported, torch.randn(1, 4, 25))


@pytest.mark.parametrize("program,task,model,args", [
    ("train_denoise", "denoising", "DnCNN", ["--model", "dncnn", "--sigma", "15"]),
    ("train_sr", "super-resolution", "VDSR", ["--model", "vdsr", "--scales", "2", "3"]),
])
def test_image_checkpoints_load_like_their_export(grey_images, tmp_path, program, task, model, args):
    prog = _program(program)
    out, export = tmp_path / "run", tmp_path / "tiny.pt"
    prog.main(["--data", str(grey_images), "--out", str(out), "--epochs", "1", "--export", str(export), "--crop",
               "24", "--batch-size", "4", "--samples-per-epoch", "8", "--val-count", "2", "--threads", "1",
               "--no-progress", "--device", "cpu", "--depth", "3", "--features", "8", *args])
    exported = n3images.load_model(export, task=task)
    loaded = n3images.load_model(out / "best.pt", task=task)
    assert type(loaded).__name__ == model and loaded.meta["task"] == task
    for key in ("noise", "sigma", "scales"):  # what the image programs check
        assert loaded.meta.get(key) == exported.meta.get(key), key
    _same_outputs(loaded, exported, torch.rand(1, 1, 20, 22))
    other = "super-resolution" if task == "denoising" else "denoising"
    with pytest.raises(ValueError, match=f"not a {other} model"):
        n3images.load_model(out / "best.pt", task=other)


def test_checkpoint_of_an_unknown_model_and_foreign_pickles_are_refused(tmp_path):
    path = tmp_path / "best.pt"
    torch.save({"model_name": "transformer", "model_conf": {}, "model": {}, "data": {"train_pairs": 3}}, path)
    with pytest.raises(ValueError, match="unknown correspondence model 'transformer'"):
        load_model(path)
    evil = tmp_path / "evil.pt"
    torch.save({"model_name": "n3net", "model_conf": {}, "model": {}, "x": Path("/")}, evil)  # a non-allowed class
    with pytest.raises(ValueError, match="cannot read weight file .*evil.pt"):
        load_model(evil)
    plain = tmp_path / "plain.pt"
    torch.save({"hello": 1}, plain)
    with pytest.raises(ValueError, match="not an n3sets model file .* or a checkpoint of this project's trainers"):
        load_model(plain)
