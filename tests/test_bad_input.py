"""Malformed input never crashes: a clear error (ValueError in the library, exit code 2 and one
stderr line in the programs) or a valid result.

Property-based (hypothesis, derandomized: the same examples every run) for the readers of the
correspondence h5 files, the camera files and ``n3sets.MatchFilter``; a few fixed examples for the
programs, run as subprocesses.
"""
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_prep.corr_dataset import CorrespondenceDataset, collate_sets
from data_prep.h5io import PAIR_ATTRS, PAIR_FIELDS, SCHEMA_VERSION, check_pair, open_pairs, read_settings
from data_prep.scenes import read_strecha_camera, read_yi_scene
from n3sets import MatchFilter
from n3sets.models import CNNet

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = settings(derandomize=True, max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PER_MATCH = [f for f, (_, shape) in PAIR_FIELDS.items() if shape[0] is None]


def _valid_record(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "xs": rng.normal(size=(n, 4)).astype(np.float32), "kpts1": rng.uniform(0, 500, (n, 2)),
        "kpts2": rng.uniform(0, 500, (n, 2)), "ratio": rng.uniform(0, 1, n), "mutual": rng.integers(0, 2, n),
        "epi_dist": rng.uniform(0, 1, n), "label": rng.integers(0, 2, n), "R": np.eye(3),
        "t": np.array([1.0, 0.0, 0.0]), "K1": np.eye(3), "K2": np.eye(3), "size1": [640, 480], "size2": [640, 480],
        "name": f"scene/a{seed}-b{seed}", "scene": "scene", "image1": "a.jpg", "image2": "b.jpg",
    }


# One mutation of a valid record: what a damaged or hand-made file may hold.
_values = st.tuples(st.just("value"), st.sampled_from(list(PAIR_FIELDS)),
                   st.sampled_from([np.nan, np.inf, -np.inf, 2.0, -1.0, 1e30]))
mutations = st.one_of(
    st.tuples(st.just("drop"), st.sampled_from(list(PAIR_FIELDS))),
    st.tuples(st.just("length"), st.sampled_from(PER_MATCH), st.integers(-3, 3)),
    _values, _values,  # NaN/inf in any field: the mutation that used to crash deep inside
    st.tuples(st.just("shape"), st.sampled_from(list(PAIR_FIELDS)), st.lists(st.integers(0, 5), max_size=3)),
    st.tuples(st.just("none"),),
)


def _mutate(rec: dict, mutation) -> dict:
    rec = dict(rec)
    kind, *arg = mutation
    if kind == "drop":
        del rec[arg[0]]
    elif kind == "length":
        field, delta = arg
        value = np.asarray(rec[field])
        rec[field] = value[: max(len(value) + delta, 0)] if delta < 0 else np.concatenate([value, value[:delta]])
    elif kind == "value":
        field, value = arg
        arr = np.array(rec[field], dtype=np.float64)
        if arr.size:
            arr.reshape(-1)[arr.size // 2] = value
        rec[field] = arr
    elif kind == "shape":
        field, shape = arg
        rec[field] = np.zeros(shape, np.float64)
    return rec


def _write_raw(path: Path, records: list, version=SCHEMA_VERSION) -> None:
    """An h5 file written without the writer's checks (as a foreign or damaged tool would)."""
    with h5py.File(path, "w") as h5:
        if version is not None:
            h5.attrs["schema_version"] = version
        for i, rec in enumerate(records):
            g = h5.create_group(f"pair_{i:06d}")
            for field in PAIR_FIELDS:
                if field in rec:
                    g.create_dataset(field, data=np.asarray(rec[field]))
            for attr in PAIR_ATTRS:
                g.attrs[attr] = rec.get(attr, "")


@settings(SETTINGS, max_examples=60)
@given(n=st.integers(1, 12), mutation=mutations, where=st.integers(0, 2))
def test_h5_readers_reject_malformed_pairs_by_name(tmp_path, n, mutation, where):
    records = [_valid_record(n, seed=i) for i in range(3)]
    records[where] = _mutate(records[where], mutation)
    path = tmp_path / "pairs.h5"
    _write_raw(path, records)
    # the writer's check and the readers' check agree
    try:
        check_pair(records[where])
        writable = True
    except ValueError:
        writable = False
    try:
        ds = CorrespondenceDataset(path, side_info=True)
    except ValueError as exc:
        assert not writable, exc
        assert str(path) in str(exc) and f"pair_{where:06d}" in str(exc), exc
        return
    assert writable
    batch = collate_sets([ds[i] for i in range(len(ds))])
    assert batch["x"].shape[:2] == (3, 6) and torch.isfinite(batch["x"]).all()


@SETTINGS
@given(data=st.binary(min_size=0, max_size=600), cut=st.floats(0.0, 0.99))
def test_h5_readers_reject_truncated_and_random_files(tmp_path, data, cut):
    good = tmp_path / "good.h5"
    if not good.exists():
        _write_raw(good, [_valid_record(10)])
    raw = good.read_bytes()
    for name, content in (("random.h5", data), ("truncated.h5", raw[: int(len(raw) * cut)])):
        path = tmp_path / name
        path.write_bytes(content)
        for read in (CorrespondenceDataset, read_settings, lambda p: open_pairs(p).close()):
            with pytest.raises(ValueError, match=str(path)):
                read(path)


def test_h5_readers_reject_foreign_schemas(tmp_path):
    cases = {}
    path = cases["no_version"] = tmp_path / "no_version.h5"
    _write_raw(path, [_valid_record(5)], version=None)
    path = cases["other_version"] = tmp_path / "other_version.h5"
    _write_raw(path, [_valid_record(5)], version=99)
    path = cases["dataset_not_group"] = tmp_path / "dataset_not_group.h5"
    with h5py.File(path, "w") as h5:
        h5.attrs["schema_version"] = SCHEMA_VERSION
        h5["pair_000000"] = np.zeros(3)
    path = cases["strings"] = tmp_path / "strings.h5"
    rec = _valid_record(5)
    rec["xs"] = np.array([b"a", b"b"])
    _write_raw(path, [rec])
    for name, path in cases.items():
        with pytest.raises(ValueError, match=str(path)):
            CorrespondenceDataset(path)
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        CorrespondenceDataset(tmp_path / "missing.h5")
    # an empty file of the schema is valid (a build where every pair was skipped): zero pairs
    _write_raw(tmp_path / "empty.h5", [])
    assert len(CorrespondenceDataset(tmp_path / "empty.h5")) == 0


# ------------------------------------------------------------------------------------ cameras
GOOD_CAMERA = [900, 0, 512, 0, 900, 340, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0.5, -1, 2, 1024, 683]


@SETTINGS
@given(changes=st.lists(st.tuples(st.integers(0, 25), st.sampled_from(["nan", "inf", "-inf", "0", "-900", "1e400",
                                                                        "abc", "3.5", ""])), max_size=3),
       extra=st.integers(-2, 2))
def test_camera_files_are_valid_or_rejected_by_name(tmp_path, changes, extra):
    tokens = [str(v) for v in GOOD_CAMERA]
    for index, value in changes:
        tokens[index] = value
    tokens = tokens[: len(tokens) + extra] if extra < 0 else tokens + ["1"] * extra
    path = tmp_path / "0000.jpg.camera"
    path.write_text(" ".join(tokens))
    try:
        cam = read_strecha_camera(path)
    except ValueError as exc:
        assert str(path) in str(exc), exc
        return
    assert np.isfinite(cam["K"]).all() and cam["K"][0, 0] > 0 and cam["K"][1, 1] > 0
    assert np.isfinite(cam["t"]).all() and (cam["size"] >= 1).all()


@SETTINGS
@given(field=st.sampled_from(["K", "R", "T", "imsize"]),
       value=st.one_of(st.sampled_from([np.nan, np.inf, 0.0, -1.0]), st.lists(st.floats(-10, 10), max_size=5)))
def test_yi_calibration_files_are_valid_or_rejected_by_name(tmp_path, field, value):
    folder = tmp_path / "split"
    (folder / "calibration").mkdir(parents=True, exist_ok=True)
    (folder / "images.txt").write_text("images/a.jpg\n")
    (folder / "calibration.txt").write_text("calibration/c.h5\n")
    data = {"K": np.array([[900.0, 0, 0], [0, 900, 0], [0, 0, 1]]), "R": np.eye(3), "T": np.array([[1.0], [0], [0]]),
            "imsize": np.array([[1024.0, 683.0]])}
    if isinstance(value, list):
        data[field] = np.asarray(value, dtype=np.float64)
    else:
        arr = data[field].copy()
        arr.reshape(-1)[0] = value
        data[field] = arr
    path = folder / "calibration" / "c.h5"
    with h5py.File(path, "w") as h5:
        for k, v in data.items():
            h5[k] = v
    try:
        scene = read_yi_scene(folder)
    except ValueError as exc:
        assert str(path) in str(exc), exc
        return
    assert np.isfinite(scene.K).all() and scene.K[0, 0, 0] > 0


# -------------------------------------------------------------------------------- MatchFilter
@pytest.fixture(scope="module")
def match_filter():
    torch.manual_seed(0)
    return MatchFilter(CNNet(channels=8, num_blocks=1))


arrays = st.one_of(
    st.integers(0, 20).map(lambda n: np.random.default_rng(n).uniform(0, 100, (n, 2))),
    st.lists(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=0, max_size=3), max_size=12),
    st.sampled_from([None, "text", 3.0, np.zeros((4, 3)), np.zeros((2, 2, 2))]),
)
intrinsics = st.one_of(
    st.just(np.array([[500.0, 0, 50], [0, 500, 50], [0, 0, 1]])),
    st.sampled_from([np.eye(3) * 0, np.full((3, 3), np.nan), np.eye(2), "K", None]),
    st.lists(st.floats(-1e3, 1e3), min_size=9, max_size=9).map(lambda v: np.reshape(v, (3, 3))),
)


@SETTINGS
@given(k1=arrays, k2=arrays, K1=intrinsics, K2=intrinsics, refine=st.sampled_from([None, "ransac", "bogus"]),
       threshold=st.sampled_from([None, 0.0, 0.5, 1.0, -0.1, 2.0, float("nan")]))
def test_match_filter_rejects_bad_input_or_returns_a_result(match_filter, k1, k2, K1, K2, refine, threshold):
    try:
        res = match_filter.filter(k1, k2, K1, K2, threshold=threshold, refine=refine)
    except ValueError as exc:
        assert str(exc)
        return
    n = res.prob.shape[0]
    assert res.inliers.shape == (n,) and res.inliers.dtype == bool and np.isfinite(res.prob).all()
    assert res.ok == (res.E is not None) and (res.ok or res.reason)


# ------------------------------------------------------------------------------------ programs
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from data_prep.synthetic import write_synthetic_dataset

    d = tmp_path_factory.mktemp("bad_programs")
    good = Path(write_synthetic_dataset(d / "good.h5", 3, seed=0, num_matches=(30, 40)))
    raw = good.read_bytes()
    (d / "truncated.h5").write_bytes(raw[: len(raw) // 2])
    (d / "random.h5").write_bytes(np.random.default_rng(0).bytes(4000))
    with h5py.File(d / "wrong.h5", "w") as h5:
        h5["a"] = np.zeros(3)
    rec = _valid_record(20)
    rec["xs"][3, 1] = np.nan
    _write_raw(d / "nan.h5", [rec])
    rec = _valid_record(20)
    rec["label"] = rec["label"][:-2]
    _write_raw(d / "labels.h5", [rec])
    _write_raw(d / "empty.h5", [])
    return d


def _run(script, *args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)


@pytest.mark.parametrize("name, words", [
    ("truncated.h5", ["not a readable HDF5 file"]), ("random.h5", ["not a readable HDF5 file"]),
    ("wrong.h5", ["schema_version"]), ("nan.h5", ["pair_000000", "'xs'", "NaN"]),
    ("labels.h5", ["pair_000000", "'label'", "matches"]), ("empty.h5", ["no pairs"]),
    ("missing.h5", ["no such file"]),
])
def test_eval_corr_bad_data(files, tmp_path, name, words):
    # run from another folder: the programs import the installed packages, not sys.path tricks
    proc = _run("pipelines/eval_corr.py", "--data", files / name, "--quiet", "--baselines", "ransac",
                "--json", tmp_path / "r.json", cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("eval_corr.py: error: --data ") and name in lines[0], lines
    assert all(w in lines[0] for w in words), lines
    assert not (tmp_path / "r.json").exists()


def test_programs_refuse_bad_input_on_one_line(files, tmp_path):
    cases = [
        (["pipelines/train_corr.py", "--train", files / "wrong.h5", "--val", files / "good.h5", "--out", tmp_path / "run"],
         ["--train", "wrong.h5"]),
        (["pipelines/diagnose_corr.py", "--data", files / "good.h5", "--weights", files / "good.h5"],
         ["--weights", "HDF5"]),
        (["pipelines/filter_matches.py", "a.jpg", "b.jpg", "--focal", "0", "--out", tmp_path / "fm"], ["--focal 0"]),
        (["pipelines/build_corr_dataset.py", "--format", "synthetic", "--num-pairs", "2", "--num-kp", "20",
          "--out", files / "good.h5"], ["good.h5 exists", "--overwrite"]),
    ]
    for (script, *args), words in cases:
        proc = _run(script, *args, cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (script, proc.stderr)
        assert all(w in lines[0] for w in words), (script, lines)
    assert not (tmp_path / "run").exists() and not (tmp_path / "fm").exists()
    assert len(CorrespondenceDataset(files / "good.h5")) == 3  # not overwritten
