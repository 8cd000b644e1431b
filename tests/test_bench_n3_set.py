"""benchmarks/bench_n3_set.py runs end to end on a tiny set and writes its JSON report (no timing asserted)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_n3_set.py"


def test_set_benchmark_writes_report(tmp_path):
    out = tmp_path / "reports" / "set.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "150", "--repeats", "1", "--channels", "8", "--k", "2",
                           "--threads", "1", "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report) >= {"settings", "machine", "results", "ratios", "table_markdown"}
    assert report["machine"]["cpu"] and report["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    rows = {r["impl"]: r for r in report["results"]}
    assert set(rows) == {"dense", "chunked"}
    for r in rows.values():
        assert r["n"] == 150 and r["k"] == 2 and r["threads"] == 1
        assert math.isfinite(r["time_s"]) and r["time_s"] > 0 and r["peak_bytes"] >= 0
    ratio = report["ratios"]["150"]
    assert ratio["time"] == round(rows["chunked"]["time_s"] / rows["dense"]["time_s"], 3)
    assert "| 150 |" in report["table_markdown"]
    assert [p.name for p in out.parent.iterdir()] == ["set.json"]  # written atomically, no temporary left
