"""Command-line programs live in pipelines/; data_prep/build_corr_dataset.py and
data_prep/colmap_export.py are aliases that run them (same help, output, files and exit codes)."""
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ["build_corr_dataset", "colmap_export"]


def _run(script, *args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def _both(name, *args, cwd):
    """(pipelines program, data_prep alias) runs of the same arguments."""
    return _run(f"pipelines/{name}.py", *args, cwd=cwd), _run(f"data_prep/{name}.py", *args, cwd=cwd)


@pytest.mark.parametrize("name", PROGRAMS)
def test_alias_help_is_the_programs_help(name, tmp_path):
    program, alias = _both(name, "--help", cwd=tmp_path)
    assert program.returncode == alias.returncode == 0, (program.stderr, alias.stderr)
    assert program.stdout == alias.stdout and program.stderr == alias.stderr == ""
    assert program.stdout.startswith(f"usage: {name}.py ")


def test_build_corr_dataset_alias_writes_the_same_dataset(tmp_path):
    args = ["--format", "synthetic", "--num-pairs", "3", "--num-kp", "30", "--seed", "4"]
    program, alias = (_run(f"{folder}/build_corr_dataset.py", *args, "--out", tmp_path / f"{folder}.h5", cwd=tmp_path)
                      for folder in ("pipelines", "data_prep"))
    assert program.returncode == alias.returncode == 0, (program.stderr, alias.stderr)
    assert program.stdout.replace("pipelines.h5", "X") == alias.stdout.replace("data_prep.h5", "X")

    def content(path):
        with h5py.File(path, "r") as f:
            out = {}
            f.visititems(lambda k, v: out.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
            return out

    a, b = content(tmp_path / "pipelines.h5"), content(tmp_path / "data_prep.h5")
    assert sorted(a) == sorted(b) and len(a) > 0
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # the same refusal, one line, exit code 2
    program, alias = _both("build_corr_dataset", *args, "--out", tmp_path / "pipelines.h5", cwd=tmp_path)
    assert program.returncode == alias.returncode == 2
    assert program.stderr == alias.stderr and len(program.stderr.strip().splitlines()) == 1
    assert program.stderr.startswith("build_corr_dataset.py: error: ") and "--overwrite" in program.stderr


def test_colmap_export_alias_refuses_like_the_program(tmp_path):
    program, alias = _both("colmap_export", "--images", tmp_path / "missing", "--database", tmp_path / "x.db",
                           "--no-filter", cwd=tmp_path)
    assert program.returncode == alias.returncode == 2, (program.stderr, alias.stderr)
    assert program.stderr == alias.stderr and program.stdout == alias.stdout == ""
    assert program.stderr.startswith("colmap_export.py: error: ") and "missing" in program.stderr
    assert len(program.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.db").exists()


def test_aliases_keep_their_python_entry_points():
    from data_prep import build_corr_dataset, colmap_export

    assert callable(build_corr_dataset.main) and callable(colmap_export.main)
    assert hasattr(colmap_export, "export_database") and hasattr(colmap_export, "run_mapper")


def test_no_sys_path_tricks_in_programs_or_packages():
    for folder in ("pipelines", "data_prep", "n3sets", "n3images"):
        for path in (ROOT / folder).glob("*.py"):
            assert "sys.path.insert" not in path.read_text(), path
