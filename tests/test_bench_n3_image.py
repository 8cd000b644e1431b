"""The image benchmark runs end to end with --quick and writes its JSON report (no timing asserted)."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_n3_image.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_n3_image_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _old_commit_available(bench) -> bool:
    proc = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{bench.OLD_COMMIT}^{{commit}}"],
                          capture_output=True, text=True)
    return proc.returncode == 0


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _check_row(r):
    assert "error" not in r and "skipped" not in r, r
    assert _positive_finite(r["time_ms"]) and len(r["times_ms"]) == 1
    assert math.isfinite(r["peak_mib"]) and r["peak_mib"] >= 0
    assert r["threads"] == 1


def _check_ratio(rt):
    assert set(rt) == {"time", "memory"}
    assert _positive_finite(rt["time"]) and _positive_finite(rt["memory"]), rt


def test_bench_n3_image_quick_report(tmp_path):
    bench = _load_bench()
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(out), "--quick", "--repeats", "1", "--threads", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert set(rep) == {"settings", "machine", "results", "table_markdown"}
    s = rep["settings"]
    assert s["quick"] is True and s["repeats"] == 1 and s["threads"] == 1
    assert s["sections"] == ["block2d", "denoiser", "set"]
    res = rep["results"]
    assert set(res) == {"block2d", "denoiser", "set"}

    b2 = res["block2d"]
    assert list(b2["rows"]) == bench.BLOCK2D_VARIANTS
    for r in b2["rows"].values():
        _check_row(r)
    assert set(b2["ratios"]) == {f"{a}/{b}" for a, b in bench.BLOCK2D_RATIOS}
    for rt in b2["ratios"].values():
        _check_ratio(rt)
    assert b2["rows"]["indexed_chunked"]["chunk"] >= 1
    assert b2["rows"]["indexed_dense"]["candidate_slots"] == b2["config"]["window"] ** 2

    dn = res["denoiser"]
    sizes = [f"{w}x{h}" for w, h in dn["config"]["sizes"]]
    assert list(dn["rows"]) == sizes and list(dn["ratios"]) == sizes
    for size in sizes:
        assert set(dn["rows"][size]) == {"dncnn", "n3net"}
        for r in dn["rows"][size].values():
            _check_row(r)
        assert dn["rows"][size]["n3net"]["parameters"] > 0
        _check_ratio(dn["ratios"][size])

    st = res["set"]
    if not _old_commit_available(bench):
        assert "skipped" in st and bench.OLD_COMMIT in st["skipped"]
    else:
        assert "skipped" not in st
        assert st["old_code"]["commit"].startswith(bench.OLD_COMMIT)
        assert "n3sets/n3block.py" in st["old_code"]["files"]
        keys = [f"N={n} {impl}" for n in st["config"]["sizes"] for impl in ("dense", "chunked")]
        assert list(st["rows"]) == keys and list(st["ratios"]) == keys
        for key in keys:
            for variant in ("before", "after"):
                _check_row(st["rows"][key][variant])
            # identical weights and inputs: the old and new blocks agree
            assert st["rows"][key]["before"]["max_abs_diff_vs_after"] < 1e-4
            _check_ratio(st["ratios"][key])

    table = rep["table_markdown"]
    assert "| n3block2d_dense/indexed_dense |" in table and "| 40x32 |" in table
    assert table in proc.stdout


def test_old_package_extraction(tmp_path, monkeypatch):
    bench = _load_bench()
    if _old_commit_available(bench):
        info, reason = bench.extract_old_package(tmp_path / "ok")
        assert reason is None
        pkg = tmp_path / "ok" / bench.OLD_PACKAGE
        for name in ("__init__", "n3block", "knn", "models"):
            assert (pkg / f"{name}.py").is_file()
        assert "engine" not in " ".join(info["files"])  # the pre-refactor block has no engine
    monkeypatch.setattr(bench, "OLD_COMMIT", "0" * 40)
    info, reason = bench.extract_old_package(tmp_path / "missing")
    assert info is None and "not found" in reason
