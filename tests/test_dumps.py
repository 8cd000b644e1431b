"""OANet hdf5 dumps and CNe (Yi et al.) pickle dumps -> this project's h5 schema.

The fixtures are written here in the public layouts (zjhthu/OANet ``dump_match`` ``collect`` and
``make_xy``; vcg-uvic/learned-correspondence-release ``dump_data.py``), from random two-view
geometry with the distances computed by the dumps' own formula (``get_episym``).
"""
import os
import pickle

import h5py
import numpy as np
import pytest

from data_prep.corr_dataset import CorrespondenceDataset
from data_prep.dumps import convert_dumps, read_cne_dump, read_oanet_dump
from data_prep.h5io import open_pairs, pair_keys, read_pair, read_settings


def _program_main(name):
    """``main`` of ``pipelines/NAME.py`` (the programs are files, not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"pipelines_{name}", Path(__file__).resolve().parents[1] / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.main


build_main = _program_main("build_corr_dataset")


def _skew(t):
    return np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])


def episym(x1, x2, R, t):
    """The dumps' ``get_episym`` (squared symmetric epipolar distance), written out independently."""
    F = _skew(t.reshape(3)) @ R
    h1 = np.concatenate([x1, np.ones((len(x1), 1))], 1)
    h2 = np.concatenate([x2, np.ones((len(x2), 1))], 1)
    Fx1, Ftx2 = h1 @ F.T, h2 @ F
    x2Fx1 = np.sum(h2 * Fx1, 1)
    return x2Fx1 ** 2 * (1 / (Fx1[:, 0] ** 2 + Fx1[:, 1] ** 2) + 1 / (Ftx2[:, 0] ** 2 + Ftx2[:, 1] ** 2))


def make_pair(rng, n=60, outliers=0.5, f=(500.0, 520.0), c=(319.5, 239.5)):
    """One pair in the dumps' conventions: x2 = dR x1 + dt, normalized x = (kp - c) / f."""
    angle = rng.uniform(-0.2, 0.2)
    R = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    t = rng.normal(size=3)
    t /= np.linalg.norm(t)
    X = np.concatenate([rng.uniform(-1, 1, (n, 2)), rng.uniform(4, 8, (n, 1))], 1)
    x1 = X[:, :2] / X[:, 2:]
    X2 = X @ R.T + t
    x2 = X2[:, :2] / X2[:, 2:]
    bad = rng.random(n) < outliers
    x2[bad] = rng.uniform(-0.6, 0.6, (int(bad.sum()), 2))
    ys = episym(x1, x2, R, t)
    return {"xs": np.concatenate([x1, x2], 1).reshape(1, -1, 4), "ys": ys, "R": R, "t": t.reshape(3, 1),
            "ratio": rng.uniform(0.3, 1.0, n), "mutual": (rng.random(n) < 0.5).astype(float),
            "cx": c[0], "cy": c[1], "f": f}


def write_oanet_dump(path, pairs):
    """OANet ``Dataset.collect``: groups of float32 datasets keyed '0', '1', ...; scalars as (1,), f as (1, 2)."""
    with h5py.File(path, "w") as h5:
        groups = {g: h5.create_group(g) for g in ("xs", "ys", "Rs", "ts", "ratios", "mutuals",
                                                  "cx1s", "cy1s", "cx2s", "cy2s", "f1s", "f2s")}
        for i, p in enumerate(pairs):
            items = {"xs": p["xs"], "ys": p["ys"].reshape(-1, 1), "Rs": p["R"], "ts": p["t"],
                     "ratios": p["ratio"], "mutuals": p["mutual"],
                     "cx1s": np.asarray([p["cx"]]), "cy1s": np.asarray([p["cy"]]),
                     "cx2s": np.asarray([p["cx"]]), "cy2s": np.asarray([p["cy"]]),
                     "f1s": np.asarray([list(p["f"])]), "f2s": np.asarray([list(p["f"])])}
            for g, v in items.items():
                groups[g].create_dataset(str(i), data=np.asarray(v, np.float32))
    return path


def write_cne_dump(root, pairs, split="tr", name="st_peters"):
    """learned-correspondence ``dump_data.py``: <prefix>/<name>/numkp-K/nn-1/nocrop/<split>-N/<var>_<split>.pkl."""
    folder = root / name / "numkp-2000" / "nn-1" / "nocrop" / f"{split}-{len(pairs)}"
    folder.mkdir(parents=True)
    fx_fy = lambda f: f[0] if np.isclose(f[0], f[1]) else tuple(f)  # noqa: E731 - as dump_data.py
    data = {
        "xs": [p["xs"] for p in pairs],
        "ys": [np.stack([p["ys"], np.zeros_like(p["ys"])], 1) for p in pairs],
        "Rs": [p["R"] for p in pairs],
        "ts": [p["t"].flatten() for p in pairs],
        "img1s": [np.zeros((3, 4, 4), np.uint8) for _ in pairs],
        "img2s": [np.zeros((3, 4, 4), np.uint8) for _ in pairs],
        "cx1s": [p["cx"] for p in pairs], "cy1s": [p["cy"] for p in pairs], "f1s": [fx_fy(p["f"]) for p in pairs],
        "cx2s": [p["cx"] for p in pairs], "cy2s": [p["cy"] for p in pairs], "f2s": [fx_fy(p["f"]) for p in pairs],
    }
    for var, values in data.items():
        with open(folder / f"{var}_{split}.pkl", "wb") as f:
            pickle.dump(values, f)
    (folder / "ready").write_text("This folder is ready\n")
    return folder


@pytest.fixture
def pairs():
    rng = np.random.default_rng(0)
    return [make_pair(rng, n=40 + 10 * i, f=(500.0, 500.0) if i % 2 else (500.0, 520.0)) for i in range(4)]


def _check_converted(out, pairs, side_info=True):
    with open_pairs(out) as h5:
        keys = pair_keys(h5)
        assert len(keys) == len(pairs)
        for key, p in zip(keys, pairs):
            rec = read_pair(h5[key])
            xs = p["xs"][0]
            np.testing.assert_allclose(rec["xs"], xs, atol=1e-6)
            np.testing.assert_array_equal(rec["label"], (p["ys"].astype(np.float32) < 1e-4).astype(np.uint8))
            np.testing.assert_allclose(rec["R"], p["R"], atol=1e-6)
            np.testing.assert_allclose(rec["t"], p["t"].reshape(3), atol=1e-6)
            # pixel keypoints and K agree with the normalized coordinates (K^-1 kp = x)
            for k, K, x in (("kpts1", rec["K1"], xs[:, :2]), ("kpts2", rec["K2"], xs[:, 2:])):
                np.testing.assert_allclose((rec[k] - K[:2, 2]) / np.diag(K)[:2], x, atol=1e-4)
            assert rec["K1"][0, 0] == pytest.approx(p["f"][0]) and rec["K1"][1, 1] == pytest.approx(p["f"][1], rel=1e-6)
            assert rec["size1"].tolist() == [640, 480]
            # the project's convention: x2^T [t]x R x1 = 0 for inliers
            E = _skew(rec["t"]) @ rec["R"]
            h1 = np.concatenate([rec["xs"][:, :2], np.ones((len(xs), 1))], 1)
            h2 = np.concatenate([rec["xs"][:, 2:], np.ones((len(xs), 1))], 1)
            assert np.median(np.abs(np.sum(h2 * (h1 @ E.T), 1)[rec["label"] == 1])) < 1e-6
            if side_info:
                np.testing.assert_allclose(rec["ratio"], p["ratio"], atol=1e-6)
                np.testing.assert_array_equal(rec["mutual"], p["mutual"])
            else:
                assert (rec["ratio"] == 1).all() and (rec["mutual"] == 0).all()
    assert 0 < np.mean([np.mean(p["ys"] < 1e-4) for p in pairs]) < 1


def test_oanet_dump(tmp_path, pairs):
    dump = write_oanet_dump(tmp_path / "yfcc-sift-2000-train.hdf5", pairs)
    summary = convert_dumps("oanet-dump", [dump], tmp_path / "out.h5")
    assert summary["pairs"] == 4 and summary["sources"][0]["max_label_disagreement"] <= 0.01
    _check_converted(tmp_path / "out.h5", pairs)
    settings = read_settings(tmp_path / "out.h5")
    assert settings["format"] == "oanet-dump" and settings["side_info"] == "ratio,mutual"
    ds = CorrespondenceDataset(tmp_path / "out.h5", side_info=True)
    assert ds[0]["x"].shape == (6, 40) and ds[0]["name"] == "yfcc-sift-2000-train/000000"


def test_cne_dump(tmp_path, pairs):
    folder = write_cne_dump(tmp_path / "dump", pairs)
    summary = convert_dumps("cne-dump", [folder], tmp_path / "out.h5")
    assert summary["pairs"] == 4
    _check_converted(tmp_path / "out.h5", pairs, side_info=False)
    assert read_settings(tmp_path / "out.h5")["side_info"] == "none"
    assert CorrespondenceDataset(tmp_path / "out.h5")[1]["name"] == "st_peters-tr-4/000001"


def test_skips_and_max_pairs(tmp_path, pairs):
    rng = np.random.default_rng(1)
    dump = write_oanet_dump(tmp_path / "d.hdf5", pairs[:2] + [make_pair(rng, n=5)] + pairs[2:])
    summary = convert_dumps("oanet-dump", [dump], tmp_path / "out.h5")
    assert summary["pairs"] == 4 and summary["sources"][0]["skipped"] == 1
    assert convert_dumps("oanet-dump", [dump], tmp_path / "o2.h5", max_pairs=2)["pairs"] == 2
    assert [k for k, _ in read_oanet_dump(dump, max_pairs=3)] == [0, 1, 2]


def _damage(path, fn):
    with h5py.File(path, "a") as h5:
        fn(h5)
    return path


@pytest.mark.parametrize("damage, message", [
    (lambda h5: h5.__delitem__("ys"), "missing group(s) ys"),
    (lambda h5: h5["xs"].move("1", "pair1"), "holds key 'pair1'"),
    (lambda h5: h5["ratios"].__delitem__("2"), "group 'ratios' holds 3 pairs"),
    (lambda h5: (h5["ys"].__delitem__("0"), h5["ys"].create_dataset("0", data=np.ones((3, 1), np.float32))),
     "pair 0: ys must have shape"),
    (lambda h5: (h5["ys"].__delitem__("1"), h5["ys"].create_dataset("1", data=np.full((50, 1), 1e-6, np.float32))),
     "pair 1: ys[:, 0] is not the squared symmetric epipolar distance"),
    (lambda h5: (h5["Rs"].__delitem__("0"), h5["Rs"].create_dataset("0", data=np.full((3, 3), np.nan, np.float32))),
     "pair 0: R holds NaN"),
    (lambda h5: (h5["f1s"].__delitem__("0"), h5["f1s"].create_dataset("0", data=np.zeros((1, 2), np.float32))),
     "positive focal"),
])
def test_oanet_bad_layout(tmp_path, pairs, damage, message):
    dump = _damage(write_oanet_dump(tmp_path / "d.hdf5", pairs), damage)
    with pytest.raises(ValueError, match=r"d\.hdf5") as err:
        convert_dumps("oanet-dump", [dump], tmp_path / "out.h5")
    assert message in str(err.value)
    assert not (tmp_path / "out.h5").exists() and not (tmp_path / "out.h5.tmp").exists()


def test_oanet_not_a_dump(tmp_path, pairs):
    junk = tmp_path / "junk.hdf5"
    junk.write_bytes(os.urandom(2000))
    with pytest.raises(ValueError, match="junk.hdf5: not a readable HDF5"):
        list(read_oanet_dump(junk))
    convert_dumps("oanet-dump", [write_oanet_dump(tmp_path / "d.hdf5", pairs)], tmp_path / "ours.h5")
    with pytest.raises(ValueError, match="ours.h5: already a correspondence dataset of this project"):
        list(read_oanet_dump(tmp_path / "ours.h5"))
    with pytest.raises(FileNotFoundError, match="nothere"):
        list(read_oanet_dump(tmp_path / "nothere.hdf5"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cne_bad_layout(tmp_path, pairs):
    with pytest.raises(ValueError, match="not a CNe dump split folder"):
        list(read_cne_dump(tmp_path))
    folder = write_cne_dump(tmp_path / "a", pairs)
    (folder / "f2s_tr.pkl").unlink()
    with pytest.raises(ValueError, match="misses f2s_tr.pkl"):
        list(read_cne_dump(folder))
    folder = write_cne_dump(tmp_path / "b", pairs)
    with open(folder / "ts_tr.pkl", "wb") as f:
        pickle.dump([p["t"] for p in pairs[:3]], f)
    with pytest.raises(ValueError, match="ts_tr.pkl: holds 3 pairs, xs_tr.pkl 4"):
        list(read_cne_dump(folder))
    folder = write_cne_dump(tmp_path / "c", pairs)
    with open(folder / "ys_tr.pkl", "wb") as f:
        pickle.dump([_Evil()] * 4, f)
    with pytest.raises(ValueError, match="ys_tr.pkl: not a readable pickle.*refusing to load"):
        list(read_cne_dump(folder))
    folder = write_cne_dump(tmp_path / "d", pairs)
    (folder / "xs_va.pkl").write_bytes((folder / "xs_tr.pkl").read_bytes())
    with pytest.raises(ValueError, match="several splits"):
        list(read_cne_dump(folder))


def test_cli(tmp_path, pairs, capsys):
    dump = write_oanet_dump(tmp_path / "d.hdf5", pairs)
    out = tmp_path / "out.h5"
    assert build_main(["--format", "oanet-dump", "--scene", str(dump), "--out", str(out),
                       "--summary-json", str(tmp_path / "s.json")]) == 0
    assert "4 pairs" in capsys.readouterr().out and out.is_file()
    _damage(dump, lambda h5: h5.__delitem__("Rs"))
    assert build_main(["--format", "oanet-dump", "--scene", str(dump), "--out", str(tmp_path / "o2.h5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "d.hdf5" in err[0] and "missing group(s) Rs" in err[0]
    assert not (tmp_path / "o2.h5").exists()
    with pytest.raises(SystemExit):
        build_main(["--format", "cne-dump", "--scene", str(tmp_path), "--out", str(tmp_path / "o3.h5"),
                    "--val-out", str(tmp_path / "v.h5"), "--val-fraction", "0.1"])
