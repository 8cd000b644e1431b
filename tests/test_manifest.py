"""Dataset manifests (data_prep.manifest): reading, errors, scene-balanced sampling, train_corr --manifest."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.manifest import (
    SceneBalancedSampler,
    ScenesDataset,
    read_manifest,
    scene_quotas,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    from data_prep.synthetic import write_synthetic_dataset

    d = tmp_path_factory.mktemp("scenes")
    kw = {"num_matches": (40, 60), "outlier_ratio": 0.5}
    return {name: Path(write_synthetic_dataset(d / f"{name}.h5", n, seed=s, **kw))
            for s, (name, n) in enumerate((("big", 12), ("small", 3), ("val", 4)))}


def _write(tmp_path, content, name="m.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _good(files):
    return {"train": [{"scene": "big", "path": str(files["big"])},
                      {"scene": "small", "path": files["small"].name, "weight": 2}],
            "val": [{"scene": "val", "path": str(files["val"])}]}


def test_read_manifest(scene_files):
    folder = scene_files["big"].parent
    m = read_manifest(_write(folder, _good(scene_files)))
    assert [e.scene for e in m["train"]] == ["big", "small"] and m["test"] == [] and m.sampling == "sqrt"
    assert m["train"][1].path == folder / "small.h5" and m["train"][1].weight == 2.0  # relative to the manifest
    assert m["val"][0].weight == 1.0


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("val"), "misses the 'val' list"),
    (lambda m: m.update(train=[]), "'train' must be a non-empty list"),
    (lambda m: m.update(extra=1), "unknown key(s) 'extra'"),
    (lambda m: m.update(sampling="uniform"), "'sampling' must be one of"),
    (lambda m: m["train"].append("x.h5"), "train[2] must be an object"),
    (lambda m: m["train"][0].pop("path"), "train[0] misses 'path'"),
    (lambda m: m["train"][0].update(scene=""), "'scene' must be a non-empty string"),
    (lambda m: m["train"][0].update(weight=0), "'weight' must be a positive number"),
    (lambda m: m["train"][0].update(weight=True), "'weight' must be a positive number"),
    (lambda m: m["train"][0].update(wieght=1), "unknown key(s) 'wieght'"),
    (lambda m: m["train"][0].update(path="nothere.h5"), "h5 file not found"),
    (lambda m: m["train"][1].update(scene="big"), "scene 'big' appears twice in 'train'"),
    (lambda m: m["val"][0].update(scene="big"), "scene 'big' is in 'train' and in 'val'"),
    (lambda m: m["val"][0].update(path=m["train"][0]["path"]), "the file of train scene 'big'"),
    (lambda m: m.update(test=[dict(m["train"][1])]), "scene 'small' is in 'train' and in 'test'"),
])
def test_bad_manifests(scene_files, tmp_path, edit, message):
    m = _good(scene_files)
    m["train"][1]["path"] = str(scene_files["small"])
    edit(m)
    path = _write(tmp_path, m)
    with pytest.raises(ValueError) as err:
        read_manifest(path)
    assert str(path) in str(err.value) and message in str(err.value), str(err.value)


def test_not_json(tmp_path):
    with pytest.raises(ValueError, match=r"m.json: not valid JSON \(line 1"):
        read_manifest(_write(tmp_path, "{train: []"))
    with pytest.raises(ValueError, match="a manifest is a JSON object"):
        read_manifest(_write(tmp_path, "[1, 2]"))
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(tmp_path / "none.json")


def test_quotas():
    # sqrt: a scene 100 times larger gets 10 times the pairs
    q = scene_quotas([10_000, 100], num_samples=1100)
    assert q.tolist() == [1000, 100]
    assert scene_quotas([10_000, 100], num_samples=1100, mode="equal").tolist() == [550, 550]
    assert scene_quotas([300, 100], mode="proportional").tolist() == [300, 100]
    assert scene_quotas([5, 5, 5], num_samples=10).tolist() == [4, 3, 3]  # largest remainder, ties to the first
    assert scene_quotas([100, 100], weights=[3, 1], num_samples=8).tolist() == [6, 2]
    assert scene_quotas([7, 2, 30]).sum() == 39
    with pytest.raises(ValueError, match="at least one pair"):
        scene_quotas([3, 0])


class _Fake:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def test_sampler_is_balanced_and_deterministic():
    sets = ScenesDataset([_Fake(400), _Fake(4), _Fake(16)], ["a", "b", "c"])
    s = SceneBalancedSampler(sets, seed=3)
    assert s.quotas.tolist() == [323, 32, 65] and len(s) == 420  # 420 * (20, 2, 4) / 26, sqrt(400):sqrt(4):sqrt(16)
    s.set_epoch(0)
    e0 = list(s)
    assert e0 == list(SceneBalancedSampler(sets, seed=3))  # a function of (seed, epoch)
    scene = np.searchsorted(sets.offsets, e0, side="right") - 1
    assert np.bincount(scene).tolist() == [323, 32, 65]
    # the small scene repeats its pairs evenly (each of its 4 pairs 8 times); the big one never repeats within an epoch
    assert np.bincount(np.asarray(e0)[scene == 1] - 400).tolist() == [8, 8, 8, 8]
    assert len(set(np.asarray(e0)[scene == 0].tolist())) == 323
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0 and set(np.asarray(e1)[np.asarray(e1) < 400]) != set(np.asarray(e0)[np.asarray(e0) < 400])
    assert list(SceneBalancedSampler(sets, seed=4)) != e0
    # two processes split one epoch's list, together covering it (padded by wrapping)
    parts = [SceneBalancedSampler(sets, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    merged = [x for pair in zip(*map(list, parts)) for x in pair]
    assert merged == e0 and len(parts[0]) == 210
    odd = [SceneBalancedSampler(sets, seed=3, num_replicas=4, rank=r, num_samples=5) for r in range(4)]
    assert all(len(list(p)) == 2 for p in odd)


def test_scenes_dataset_indexing(scene_files):
    from data_prep.corr_dataset import CorrespondenceDataset

    sets = ScenesDataset([CorrespondenceDataset(scene_files[n]) for n in ("big", "small")], ["big", "small"])
    assert len(sets) == 15 and sets.locate(12) == (1, 0) and sets.locate(11) == (0, 11)
    assert sets[13]["name"] == CorrespondenceDataset(scene_files["small"])[1]["name"]
    with pytest.raises(IndexError):
        sets.locate(15)


def _pipeline():
    spec = importlib.util.spec_from_file_location("train_corr_m", ROOT / "pipelines" / "train_corr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--model", "n3net", "--channels", "8", "--blocks", "2", "--n3-after", "1", "--k", "1",
        "--embed-channels", "4", "--batch-size", "4", "--max-matches", "40", "--threads", "1", "--no-progress"]


def test_train_corr_manifest(scene_files, tmp_path, capsys):
    pipeline = _pipeline()
    m = _good(scene_files)
    m["train"][1]["path"] = str(scene_files["small"])
    manifest = _write(tmp_path, {**m, "sampling": "equal"})
    out = tmp_path / "run"
    summary = pipeline.main(["--manifest", str(manifest), "--out", str(out), "--epochs", "1", *TINY])
    assert summary["epochs"] == 1
    log = json.loads((out / "log.json").read_text())
    assert log["data"]["train_scenes"] == {"big": 12, "small": 3} and log["data"]["val_scenes"] == {"val": 4}
    assert log["data"]["pairs_per_epoch"] == 15 and log["data"]["sampling"] == "equal"
    assert log["history"][0]["step"] == 4  # 15 pairs drawn, batches of 4
    assert "big 12 (draws 5/epoch), small 3 (draws 10/epoch)" in capsys.readouterr().out
    # refusals: one line, exit 2, nothing written
    bad = _write(tmp_path, {"train": m["train"], "val": [{"scene": "big", "path": str(scene_files["val"])}]}, "bad.json")
    with pytest.raises(SystemExit) as exc:
        pipeline.main(["--manifest", str(bad), "--out", str(tmp_path / "run2"), *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "bad.json" in err[0] and "is in 'train' and in 'val'" in err[0]
    assert not (tmp_path / "run2").exists()
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not h5" * 100)
    m2 = {"train": [m["train"][0], {"scene": "junk", "path": str(junk)}], "val": m["val"]}
    with pytest.raises(SystemExit):
        pipeline.main(["--manifest", str(_write(tmp_path, m2, "j.json")), "--out", str(tmp_path / "run3"), *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train scene 'junk'" in err[0] and "junk.h5" in err[0]
    with pytest.raises(SystemExit):
        pipeline.main(["--manifest", str(manifest), "--train", str(scene_files["big"]), "--val", str(scene_files["val"]),
                       "--out", str(tmp_path / "run4")])
