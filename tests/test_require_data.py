"""The N3_REQUIRE_DATA switch (set by .ci/run): missing real data fails the run instead of skipping."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_data_test(tmp_path, require):
    env = {k: v for k, v in os.environ.items() if k not in ("N3_REQUIRE_DATA",)}
    env["N3_DATA"] = str(tmp_path / "no-data-here")
    env["OMP_NUM_THREADS"] = "1"
    if require is not None:
        env["N3_REQUIRE_DATA"] = require
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rsf",
         "tests/test_image_io.py::test_real_set12"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_missing_data_skips_by_default_and_fails_when_required(tmp_path):
    plain = _run_data_test(tmp_path, None)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "1 skipped" in plain.stdout and "real data not found" in plain.stdout

    off = _run_data_test(tmp_path, "0")
    assert off.returncode == 0 and "1 skipped" in off.stdout

    required = _run_data_test(tmp_path, "1")
    assert required.returncode == 1, required.stdout + required.stderr
    assert "1 error" in required.stdout  # failed in the data_root fixture
    assert "real data not found" in required.stdout and "N3_REQUIRE_DATA" in required.stdout


def test_ci_requires_data():
    run = (ROOT / ".ci" / "run").read_text()
    assert "N3_REQUIRE_DATA=1 .venv/bin/python -m pytest -q" in run
