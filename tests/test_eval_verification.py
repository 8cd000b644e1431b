"""pipelines/eval_verification.py: positives, negatives and identical pairs; JSON contract; rescoring."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_prep.synthetic import write_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = ROOT / "pipelines" / "eval_verification.py"


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, str(PROGRAM), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verif")
    write_synthetic_dataset(tmp / "pos.h5", num_pairs=3, seed=1, num_matches=(300, 400), outlier_ratio=0.5, noise_px=0.5)
    rng = np.random.default_rng(0)
    folders = []
    for s in range(2):  # two "scenes" of textured noise images: every cross pair is a negative
        folder = tmp / f"scene{s}"
        folder.mkdir()
        for i in range(2):
            img = cv2.GaussianBlur((rng.random((240, 320)) * 255).astype(np.uint8), (5, 5), 1.5)
            cv2.imwrite(str(folder / f"{i}.png"), img)
        folders.append(folder)
    return tmp, folders


@pytest.mark.slow
def test_contract_and_rescore(inputs):
    tmp, folders = inputs
    out = tmp / "v.json"
    r = _run("--positives", tmp / "pos.h5", "--negatives", *folders, "--max-negatives", 3, "--identical", 1,
             "--num-kp", 300, "--cache-dir", tmp / "cache", "--choose", "--json", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert set(res) >= {"settings", "summary", "pairs", "seconds", "choose"}
    kinds = [p["kind"] for p in res["pairs"]]
    assert kinds.count("positive") == 3 and kinds.count("negative") == 3 and kinds.count("identical") == 1
    for p in res["pairs"]:
        assert set(p) >= {"kind", "name", "num_matches", "num_kept", "estimated", "accepted", "reason", "stats"}
        assert p["accepted"] == (p["reason"] == "")
    same = next(p for p in res["pairs"] if p["kind"] == "identical")
    assert not same["accepted"] and "no baseline" in same["reason"]
    assert res["summary"]["negative"]["accepted"] == 0
    assert res["summary"]["positive"]["pairs"] == 3 and "pose_below_10deg" in res["summary"]["positive"]
    # rescoring with an impossible threshold rejects everything, naming the test
    out2 = tmp / "v2.json"
    r = _run("--rescore", out, "--verify-conf", '{"min_inliers": 100000}', "--json", out2)
    assert r.returncode == 0, r.stderr
    res2 = json.loads(out2.read_text())
    assert all(not p["accepted"] for p in res2["pairs"])
    assert any("min_inliers" in p["reason"] for p in res2["pairs"])
    # refuses to overwrite
    r = _run("--rescore", out, "--json", out2)
    assert r.returncode == 2 and "exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bad_input(inputs, tmp_path):
    tmp, folders = inputs
    r = _run("--positives", tmp_path / "missing.h5", "--json", tmp_path / "o.json")
    assert r.returncode == 2 and "missing.h5" in r.stderr
    r = _run("--negatives", folders[0], "--json", tmp_path / "o.json")
    assert r.returncode == 2 and "at least two" in r.stderr
    r = _run("--rescore", tmp / "pos.h5", "--json", tmp_path / "o.json")
    assert r.returncode == 2 and "--rescore" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _run("--negatives", folders[0], folders[1], "--verify-conf", '{"min_inlier": 3}', "--json", tmp_path / "o.json")
    assert r.returncode == 2 and "min_inlier" in r.stderr
    assert not (tmp_path / "o.json").exists()
