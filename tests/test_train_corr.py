"""pipelines/train_corr.py on a tiny synthetic set: outputs, exact resume, export, torchrun/DDP."""
import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pipelines" / "train_corr.py"
TINY = ["--model", "n3net", "--channels", "8", "--blocks", "2", "--n3-after", "1", "--k", "1",
        "--embed-channels", "4", "--batch-size", "4", "--max-matches", "40", "--threads", "1", "--no-progress"]


def _load_pipeline():
    spec = importlib.util.spec_from_file_location("train_corr", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pipeline():
    return _load_pipeline()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from data_prep.synthetic import write_synthetic_dataset

    d = tmp_path_factory.mktemp("data")
    kw = {"num_matches": (40, 60), "outlier_ratio": 0.5}
    train = write_synthetic_dataset(d / "train.h5", 8, seed=0, **kw)
    val = write_synthetic_dataset(d / "val.h5", 4, seed=1, **kw)
    return Path(train), Path(val)


def _refused(pipeline, argv, capsys, pattern=None) -> str:
    """A run refused with exit code 2 and one stderr line ``train_corr.py: error: ...`` matching ``pattern``."""
    import re

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        pipeline.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_corr.py: error: "), err
    if pattern:
        assert re.search(pattern, err[0]), err[0]
    return err[0]


def _args(data, out, *extra):
    train, val = data
    return ["--train", str(train), "--val", str(val), "--out", str(out), *TINY, *extra]


def test_training_writes_logs_checkpoints_and_exports(pipeline, tiny_data, tmp_path):
    out = tmp_path / "run"
    export = tmp_path / "exported.pt"
    summary = pipeline.main(_args(tiny_data, out, "--epochs", "2", "--essential-after", "2", "--export", str(export)))
    for name in ("last.pt", "best.pt", "log.csv", "log.json", "curves.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp"))
    log = json.loads((out / "log.json").read_text())
    assert len(log["history"]) == 2 and log["model"] == "n3net"
    for key in ("mAP5", "mAP10", "mAP20", "f1", "train_loss", "val_cls"):
        assert 0 <= log["history"][-1][key] < 10, key
    assert log["history"][-1]["train_ess"] > 0  # the essential loss was switched on after 2 steps
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 4 and "optimizer" in ckpt and "rng" in ckpt

    from n3sets.pretrained import load_model

    model = load_model(export)
    assert summary["export"] == str(export)
    assert model.conf["channels"] == 8 and model.meta["epochs"] == summary["best"]["epoch"]
    assert model.meta["command"].startswith("python pipelines/train_corr.py --train")
    assert export.stat().st_size < (out / "last.pt").stat().st_size  # no optimizer state in a weight file


def test_resume_continues_exactly(pipeline, tiny_data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pipeline.main(_args(tiny_data, straight, "--epochs", "2"))
    pipeline.main(_args(tiny_data, resumed, "--epochs", "1"))
    pipeline.main(_args(tiny_data, resumed, "--epochs", "2", "--resume"))
    a = torch.load(straight / "last.pt", map_location="cpu", weights_only=False)
    b = torch.load(resumed / "last.pt", map_location="cpu", weights_only=False)
    assert a["step"] == b["step"] == 4
    assert len(b["commands"]) == 2 and b["commands"][1].endswith("--resume")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    ha, hb = a["history"], b["history"]
    assert [h["mAP20"] for h in ha] == [h["mAP20"] for h in hb]
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]


def test_resume_refuses_a_different_model(pipeline, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    pipeline.main(_args(tiny_data, out, "--epochs", "1"))
    _refused(pipeline, _args(tiny_data, out, "--epochs", "2", "--resume", "--channels", "16"), capsys,
             "same model options")


def test_existing_run_is_never_replaced_silently(pipeline, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    pipeline.main(_args(tiny_data, out, "--epochs", "1"))
    before = (out / "last.pt").read_bytes()
    _refused(pipeline, _args(tiny_data, out, "--epochs", "2"), capsys,
             r"already holds a training run.*--resume.*--overwrite")
    assert (out / "last.pt").read_bytes() == before  # refused before anything was written
    _refused(pipeline, _args(tiny_data, out, "--epochs", "2", "--resume", "--overwrite"), capsys, "contradict")
    pipeline.main(_args(tiny_data, out, "--epochs", "1", "--overwrite", "--seed", "1"))
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1 and len(ckpt["commands"]) == 1 and "--overwrite" in ckpt["commands"][0]


@pytest.fixture(scope="module")
def ddp_run(tiny_data, tmp_path_factory, torchrun):
    """Two epochs under torchrun (2 gloo processes), uninterrupted: the reference run."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    torchrun("train_corr.py", _args(tiny_data, out, "--epochs", "2", "--resume"), timeout=180)
    return out


def test_torchrun_two_processes(ddp_run):
    log = json.loads((ddp_run / "log.json").read_text())
    assert log["world_size"] == 2 and log["command"].startswith("torchrun --nproc_per_node=2")
    assert [h["step"] for h in log["history"]] == [1, 2]  # 8 pairs / (2 processes x batch 4) per epoch
    ckpt = torch.load(ddp_run / "last.pt", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    # validation was split over the ranks and gathered: every pair counted once
    assert ckpt["best"]["num_pairs"] == 4


def test_torchrun_restart_after_a_crash_resumes_exactly(ddp_run, tiny_data, tmp_path, torchrun):
    """Rank 1 aborts after epoch 1; torchrun --max-restarts restarts both processes, --resume picks
    up epoch 1's checkpoint, and the result is the uninterrupted run's, bit for bit."""
    out = tmp_path / "crashed"
    r = torchrun("train_corr.py", _args(tiny_data, out, "--epochs", "2", "--resume"), crash_after_barrier=1,
                 timeout=180)
    assert r.restarts == 1 and f"resumed from {out / 'last.pt'}" in r.stdout
    got, want = (torch.load(d / "last.pt", map_location="cpu", weights_only=False) for d in (out, ddp_run))
    assert got["epoch"] == 2 and len(got["commands"]) == 2
    assert [h["train_loss"] for h in got["history"]] == [h["train_loss"] for h in want["history"]]
    assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])


def test_bad_arguments(pipeline, tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        pipeline.main(["--train", str(tiny_data[0]), "--out", str(tmp_path)])  # --val missing
    out = tmp_path / "run"
    _refused(pipeline, ["--train", str(tmp_path / "nothing.h5"), "--val", str(tiny_data[1]), "--out", str(out),
                        "--threads", "1"], capsys, r"--train \S*nothing.h5: no such file")
    assert not out.exists()  # no empty run folder left behind


def test_bad_data_is_refused_before_anything_is_written(pipeline, tiny_data, tmp_path, capsys):
    import h5py

    wrong, empty = tmp_path / "wrong.h5", tmp_path / "empty.h5"
    with h5py.File(wrong, "w") as f:
        f["something"] = [1.0, 2.0]
    with h5py.File(empty, "w") as f:
        f.attrs["schema_version"] = 1
    out = tmp_path / "run"
    _refused(pipeline, _args((wrong, tiny_data[1]), out), capsys, r"--train \S*wrong.h5: not a correspondence dataset")
    _refused(pipeline, _args((empty, tiny_data[1]), out), capsys, r"--train \S*empty.h5: holds no pairs")
    _refused(pipeline, _args((tiny_data[0], empty), out), capsys, r"--val \S*empty.h5: holds no pairs")
    _refused(pipeline, _args(tiny_data, tmp_path / "run2", "--init", str(wrong)), capsys, r"--init \S*wrong.h5: cannot read")
    assert not out.exists() and not (tmp_path / "run2").exists()


def test_truncated_last_checkpoint_points_at_best(pipeline, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    pipeline.main(_args(tiny_data, out, "--epochs", "1"))
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])
    _refused(pipeline, _args(tiny_data, out, "--epochs", "2", "--resume"), capsys, r"last.pt.*best.pt")


def test_lr_step_schedule_is_logged_and_survives_resume(pipeline, tiny_data, tmp_path):
    out = tmp_path / "sched"
    sched = ["--lr", "1e-3", "--lr-decay-epochs", "2", "3", "--lr-decay", "0.5"]
    pipeline.main(_args(tiny_data, out, "--epochs", "2", *sched))
    pipeline.main(_args(tiny_data, out, "--epochs", "3", "--resume", *sched))
    lrs = [h["lr"] for h in json.loads((out / "log.json").read_text())["history"]]
    assert lrs == pytest.approx([1e-3, 5e-4, 2.5e-4])
    with pytest.raises(SystemExit):
        pipeline.main(_args(tiny_data, tmp_path / "bad", "--epochs", "1", "--lr-decay-epochs", "0"))


def test_clip_grad_norm_is_applied_every_step(pipeline, tiny_data, tmp_path, monkeypatch):
    calls = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **kw):
        params = list(params)
        norm = real(params, max_norm, *a, **kw)
        after = torch.sqrt(sum((p.grad ** 2).sum() for p in params if p.grad is not None))
        calls.append((max_norm, float(after)))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    pipeline.main(_args(tiny_data, tmp_path / "clip", "--epochs", "1", "--clip-grad-norm", "1e-3"))
    assert len(calls) == 2 and all(m == 1e-3 and after <= 1e-3 * 1.01 for m, after in calls)
    with pytest.raises(SystemExit):
        pipeline.main(_args(tiny_data, tmp_path / "bad", "--epochs", "1", "--clip-grad-norm", "-1"))


def test_init_from_weights_and_augmentation_flags(pipeline, tiny_data, tmp_path, capsys):
    first = tmp_path / "first"
    export = tmp_path / "first.pt"
    pipeline.main(_args(tiny_data, first, "--epochs", "1", "--export", str(export)))
    from n3sets.pretrained import load_model

    # --init from a weight file and from a checkpoint: zero epochs keep the loaded weights
    for source in (export, first / "best.pt"):
        out = tmp_path / f"init_{source.stem}"
        pipeline.main(_args(tiny_data, out, "--epochs", "1", "--init", str(source), "--lr", "0",
                            "--export", str(out / "cont.pt")))
        ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
        # where the run started is kept, with the command that made the source
        assert ckpt["init"]["source"] == str(source) and ckpt["init"]["epochs"] == 1
        assert load_model(out / "cont.pt").meta["init"]["command"].startswith("python pipelines/train_corr.py --train")
        want = load_model(export).state_dict()
        for key, value in want.items():
            if value.is_floating_point() and "running" not in key:  # batch-norm statistics move with lr 0
                assert torch.equal(value, ckpt["model"][key]), key
    _refused(pipeline, _args(tiny_data, tmp_path / "bad", "--epochs", "1", "--init", str(export), "--channels", "16"),
             capsys, "same model options")
    # augmentation: trains, and the flags are range-checked
    out = tmp_path / "aug"
    pipeline.main(_args(tiny_data, out, "--epochs", "1", "--augment-swap", "0.5", "--augment-rotation", "15"))
    log = json.loads((out / "log.json").read_text())
    assert log["args"]["augment_rotation"] == 15 and torch.isfinite(torch.tensor(log["history"][0]["train_loss"]))
    for bad in (["--augment-swap", "1.5"], ["--augment-rotation", "90"]):
        with pytest.raises(SystemExit):
            pipeline.main(_args(tiny_data, tmp_path / "bad2", "--epochs", "1", *bad))


def test_refine_stage_trains_and_starts_from_a_one_stage_model(pipeline, tiny_data, tmp_path, capsys):
    one = tmp_path / "one.pt"
    pipeline.main(_args(tiny_data, tmp_path / "one", "--epochs", "1", "--export", str(one)))
    out = tmp_path / "two"
    pipeline.main(_args(tiny_data, out, "--epochs", "1", "--refine-stage", "--init", str(one),
                        "--export", str(out / "two.pt")))
    from n3sets.pretrained import load_model

    two = load_model(out / "two.pt")
    assert two.conf["refine_stage"] == {} and two.refine_stage is not None
    assert two.meta["init"]["first_stage_only"] is True
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    log = json.loads((out / "log.json").read_text())
    assert torch.isfinite(torch.tensor(log["history"][0]["train_loss"]))
    # the first stage started from the one-stage model (and trained on), the second did not exist there
    assert any(k.startswith("refine_stage.") for k in ckpt["model"])
    assert not any(k.startswith("refine_stage.") for k in load_model(one).state_dict())
    # a two-stage source cannot seed a one-stage model
    _refused(pipeline, _args(tiny_data, tmp_path / "bad", "--epochs", "1", "--init", str(out / "two.pt")), capsys,
             "same model options")
