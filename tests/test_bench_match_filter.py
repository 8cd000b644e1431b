"""The match-filter benchmark runs end to end and writes its JSON report (no timing asserted)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_match_filter.py"


def test_bench_match_filter_report(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(out), "--pairs", "1", "--matches", "80", "--repeats", "1",
         "--max-iters", "200", "--weights", "cnnet-strecha"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(out.read_text())
    methods = [r["method"] for r in rep["results"]]
    assert methods == ["ransac", "magsac", "ratio+magsac", "cnnet-strecha", "cnnet-strecha+ransac"]
    for r in rep["results"]:
        assert r["ms_per_pair"] > 0 and r["pairs"] == 1 and r["mean_matches"] == 80
    assert rep["ratios"]["time_vs_ransac"]["ransac"] == 1.0
    assert rep["ratios"]["network_vs_cnnet"]["cnnet-strecha"] == 1.0
    assert set(rep["ratios"]["network_vs_cnnet"]) == {"cnnet-strecha"}
    assert "network_ms_per_pair" not in rep["results"][-1]  # the +ransac row reuses the network
    assert "| cnnet-strecha+ransac |" in rep["table_markdown"]


def test_bench_match_filter_bad_weights(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(tmp_path / "b.json"), "--weights", "no-such-model"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    assert "--weights no-such-model" in proc.stderr
    assert not (tmp_path / "b.json").exists()


def test_bench_match_filter_missing_data(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(tmp_path / "b.json"), "--data", str(tmp_path / "nope.h5"),
         "--weights", "cnnet-strecha"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    assert "--data" in proc.stderr and "nope.h5" in proc.stderr
