"""pipelines/leave_one_out.py: per-fold manifests, training + evaluation of the held-out scene, the table."""
import json
from pathlib import Path

import pytest

TINY = ["--model", "n3net", "--channels", "8", "--blocks", "2", "--n3-after", "1", "--k", "1",
        "--embed-channels", "4", "--batch-size", "4", "--max-matches", "40", "--threads", "1", "--no-progress",
        "--epochs", "1"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from data_prep.synthetic import write_synthetic_dataset

    d = tmp_path_factory.mktemp("loso")
    kw = {"num_matches": (40, 60), "outlier_ratio": 0.5}
    files = {name: Path(write_synthetic_dataset(d / f"{name}.h5", n, seed=s, **kw))
             for s, (name, n) in enumerate((("a", 6), ("b", 5), ("c", 4), ("val", 3)))}
    m = {"train": [{"scene": s, "path": files[s].name} for s in ("a", "b", "c")],
         "val": [{"scene": "val", "path": files["val"].name}]}
    path = d / "m.json"
    path.write_text(json.dumps(m))
    return path


def test_folds_train_evaluate_and_tabulate(manifest, tmp_path, capsys, load_program):
    prog = load_program("leave_one_out")
    out = tmp_path / "loso"
    argv = ["--manifest", str(manifest), "--out", str(out), "--fold", "a", "--fold", "c", "--eval-max-pairs", "5", "--", *TINY]
    assert prog.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a", "c"]
    fold = json.loads((out / "a" / "manifest.json").read_text())
    assert [e["scene"] for e in fold["train"]] == ["b", "c"]
    assert [e["scene"] for e in fold["val"]] == ["val"] and [e["scene"] for e in fold["test"]] == ["a"]
    res = json.loads((out / "a" / "eval.json").read_text())
    assert res["num_pairs"] == 5 and "ransac" in res["methods"]  # the seeded subset of a's 6 pairs
    assert json.loads((out / "c" / "eval.json").read_text())["num_pairs"] == 4  # fewer pairs than the cap: all
    log = json.loads((out / "a" / "run" / "log.json").read_text())
    assert log["data"]["train_scenes"] == {"b": 5, "c": 4}
    capsys.readouterr()
    # a finished fold is not run again
    assert prog.main(argv) == 0
    assert "a: done already" in capsys.readouterr().out

    table_json = tmp_path / "t.json"
    assert prog.main(["--table", str(out), "--json", str(table_json)]) == 0
    printed = capsys.readouterr().out
    assert "| held-out scene | pairs | ransac | loso | loso+ransac |" in printed
    table = json.loads(table_json.read_text())
    assert [r["scene"] for r in table["rows"]] == ["a", "c", "mean"]
    for r in table["rows"]:
        assert 0 <= r["loso"] <= 1 and 0 <= r["loso+ransac"] <= 1


@pytest.mark.parametrize("argv, needle", [
    (["--fold", "zzz"], "--fold zzz: not a training scene"),
    (["--", "--out", "x"], "--out after '--'"),
])
def test_bad_input(manifest, tmp_path, capsys, argv, needle, load_program):
    prog = load_program("leave_one_out")
    assert prog.main(["--manifest", str(manifest), "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("leave_one_out.py: error:") and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_table_of_nothing(tmp_path, capsys, load_program):
    (tmp_path / "empty").mkdir()
    assert load_program("leave_one_out").main(["--table", str(tmp_path / "empty")]) == 2
    assert "no finished fold" in capsys.readouterr().err
