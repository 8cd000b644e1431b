"""n3sets.training: the generic trainer machinery (schedule, run-folder checks, logs, checkpoints)."""
import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from n3sets import training
from n3sets.training import (all_reduce_sums, check_out_dir, command_line, export_target, gather_lists,
                             load_checkpoint, rng_state, save_figure_atomic, scheduled_lr, set_rng_state, write_logs)


def test_scheduled_lr_steps_at_absolute_milestones():
    lrs = [scheduled_lr(1.0, 0.5, [3, 5], e) for e in range(1, 7)]
    assert lrs == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert scheduled_lr(2e-3, 0.3, [], 100) == 2e-3
    assert scheduled_lr(1.0, 0.1, [1], 1) == pytest.approx(0.1)  # a milestone applies from its own epoch on


def test_check_out_dir_refusals_and_allowed_cases(tmp_path):
    check_out_dir(tmp_path / "new", resume=False, overwrite=False)  # no folder yet
    check_out_dir(tmp_path, resume=False, overwrite=False)  # an empty folder
    with pytest.raises(SystemExit, match="contradict"):
        check_out_dir(tmp_path, resume=True, overwrite=True)
    (tmp_path / "best.pt").write_bytes(b"x")
    with pytest.raises(SystemExit, match=r"already holds a training run \(best.pt\).*--resume.*--overwrite"):
        check_out_dir(tmp_path, resume=False, overwrite=False)
    (tmp_path / "last.pt").write_bytes(b"x")
    with pytest.raises(SystemExit) as err:
        check_out_dir(tmp_path, resume=False, overwrite=False)
    assert str(err.value) == (f"--out {tmp_path} already holds a training run (last.pt, best.pt): pass --resume to "
                              "continue it, --overwrite to replace it, or choose another --out")
    check_out_dir(tmp_path, resume=True, overwrite=False)
    check_out_dir(tmp_path, resume=False, overwrite=True)
    check_out_dir(tmp_path, resume=False, overwrite=False, exempt=True)
    with pytest.raises(SystemExit, match="contradict"):  # exempt does not excuse a contradiction
        check_out_dir(tmp_path, resume=True, overwrite=True, exempt=True)


def test_write_logs_csv_json_and_a_failing_plot(tmp_path, capsys):
    history = [{"epoch": 1, "loss": 0.5, "extra": "not a column"}, {"epoch": 2, "loss": 0.25}]
    calls = []

    def plot(path, hist):
        calls.append((path, len(hist)))
        raise RuntimeError("no display")

    write_logs(tmp_path, history, {"command": "python x.py"}, ["epoch", "loss", "psnr"], plot)
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert rows == [{"epoch": "1", "loss": "0.5", "psnr": ""}, {"epoch": "2", "loss": "0.25", "psnr": ""}]
    logged = json.loads((tmp_path / "log.json").read_text())
    assert logged["command"] == "python x.py" and logged["history"] == history
    assert calls == [(tmp_path / "curves.png", 2)]
    assert "warning: could not write curves.png: no display" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv", "log.json"]  # no temporaries left

    write_logs(tmp_path, history[:1], {}, ["epoch"], None)  # no plot at all; files replaced
    assert len(list(csv.DictReader(open(tmp_path / "log.csv")))) == 1


def test_save_figure_atomic(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    plt.plot([0, 1], [1, 0])
    path = save_figure_atomic(fig, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]
    assert not plt.fignum_exists(fig.number)


def test_load_checkpoint_round_trip_and_truncated_file(tmp_path):
    ckpt = {"epoch": 3, "rng": rng_state(), "history": [{"epoch": 1}]}
    training.atomic_torch_save(ckpt, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["epoch"] == 3 and loaded["history"] == [{"epoch": 1}]

    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit) as err:
        load_checkpoint(tmp_path / "last.pt")
    msg = str(err.value)
    assert str(tmp_path / "last.pt") in msg and "\n" not in msg and "best.pt" not in msg  # no best.pt yet

    (tmp_path / "best.pt").write_bytes(data)
    with pytest.raises(SystemExit) as err:
        load_checkpoint(tmp_path / "last.pt")
    msg = str(err.value)
    assert msg.startswith(f"cannot read checkpoint {tmp_path / 'last.pt'}") and "\n" not in msg
    assert str(tmp_path / "best.pt") in msg

    (tmp_path / "other.pt").write_bytes(b"garbage, not a torch file")
    with pytest.raises(SystemExit, match="other.pt") as err:
        load_checkpoint(tmp_path / "other.pt")
    assert "best.pt" not in str(err.value) and "\n" not in str(err.value)


def test_rng_state_round_trip():
    state = rng_state()
    a = (torch.rand(3), np.random.rand(), random.random())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_export_target(tmp_path):
    assert export_target("n3net-x", tmp_path) == tmp_path / "n3net-x.pt"
    assert export_target("model.pt", tmp_path) == Path("model.pt")
    assert export_target("runs/model", tmp_path) == Path("runs/model")
    assert export_target(str(tmp_path / "a.pt"), Path("/elsewhere")) == tmp_path / "a.pt"


def test_command_line():
    argv = ["--out", "my runs/a", "--epochs", "2"]
    assert command_line("pipelines/train_x.py", argv, 1) == "python pipelines/train_x.py --out 'my runs/a' --epochs 2"
    assert command_line("pipelines/train_x.py", argv, 4) == \
        "torchrun --nproc_per_node=4 pipelines/train_x.py --out 'my runs/a' --epochs 2"
    assert command_line("p.py", [], 1) == "python p.py "  # as train_corr always wrote it


def test_single_process_collectives():
    rows = [(1.0, 2.0), (3.0, 4.0)]
    assert gather_lists(rows, 1) == rows
    sums = all_reduce_sums({"loss": 1.5, "n": 3}, 1)
    assert sums == {"loss": 1.5, "n": 3.0} and list(sums) == ["loss", "n"]
    assert all(isinstance(v, float) for v in sums.values())


def test_module_is_generic_and_cheap_to_import():
    import ast

    source = Path(training.__file__).read_text()
    top = set()
    for node in ast.parse(source).body:  # module-level imports only (lazy ones live inside functions)
        if isinstance(node, ast.Import):
            top.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            top.add("." * node.level + (node.module or ""))
    assert not {m for m in top if m.split(".")[0].lstrip(".") in ("matplotlib", "tqdm") or "models" in m}, top
    # torch itself may pull in tqdm, so only matplotlib and the models are checked at run time
    code = ("import sys, n3sets.training as t; "
            "bad = [m for m in ('matplotlib', 'n3sets.models') if m in sys.modules]; "
            "assert not bad, bad; assert t.atomic_torch_save.__module__ == 'n3sets.pretrained'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_write_json_is_atomic_and_leaves_no_temporary(tmp_path):
    from n3sets.cli import write_json

    path = tmp_path / "sub" / "r.json"
    assert write_json(path, {"a": [1, 2]}) == path
    assert json.loads(path.read_text()) == {"a": [1, 2]} and path.read_text().endswith("\n")

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        write_json(path, {"a": Unserialisable()})
    assert json.loads(path.read_text()) == {"a": [1, 2]}  # the old file survives a failed write
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    from n3sets.cli import atomic_write

    path = tmp_path / "w.bin"
    with atomic_write(path, "wb") as f:
        f.write(b"first")
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_bytes() == b"first" and path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it
    with pytest.raises(RuntimeError):
        with atomic_write(path, "wb") as f:
            f.write(b"half")
            raise RuntimeError("interrupted")
    assert path.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["w.bin"]
