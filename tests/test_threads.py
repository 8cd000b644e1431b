"""CPU threads: one rule (n3sets.cli.resolve_threads, default 1) for every program and MatchFilter;
the correspondence programs give the same numbers for 1 and 2 threads (oneDNN off, MKL strict mode)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from n3sets.cli import DEFAULT_THREADS, resolve_threads
from n3sets.training import set_threads, torch_threads

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ["train_corr.py", "eval_corr.py", "diagnose_corr.py", "filter_matches.py", "train_denoise.py",
            "eval_denoise.py", "denoise.py", "train_sr.py", "eval_sr.py", "upscale.py"]
# the correspondence programs turn oneDNN off, so their numbers do not depend on --threads
# (train_corr only for its demo and with --thread-independent: oneDNN's backward is ~3x faster)
THREAD_INDEPENDENT = {"eval_corr.py", "diagnose_corr.py", "filter_matches.py"}
# programs whose --threads help is not (yet) the shared one; none now
STALE_HELP: set = set()


@pytest.fixture(autouse=True)
def _restore_torch_settings():
    threads, mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    yield
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn


def test_resolve_threads_rule():
    assert DEFAULT_THREADS == 1
    assert resolve_threads(None) == 1
    assert resolve_threads(3) == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            resolve_threads(bad)


def test_set_threads_and_torch_threads_restores():
    torch.set_num_threads(2)
    torch.backends.mkldnn.enabled = True
    with torch_threads(None, thread_independent=True) as n:
        assert n == 1 and torch.get_num_threads() == 1 and not torch.backends.mkldnn.enabled
    assert torch.get_num_threads() == 2 and torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError):
        with torch_threads(1, thread_independent=True):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2 and torch.backends.mkldnn.enabled  # restored on errors too
    assert set_threads(None) == 1 and torch.get_num_threads() == 1 and torch.backends.mkldnn.enabled


def _start(program: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "pipelines" / program), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_every_program_documents_threads_and_refuses_zero():
    # in parallel: each one imports torch. "--threads 0" alone: argparse checks it before the
    # missing positional/required arguments, so the refusal is about --threads
    helps = {p: _start(p, "--help") for p in PROGRAMS}
    zeros = {p: _start(p, "--threads", "0") for p in PROGRAMS if p not in STALE_HELP}
    for program, proc in helps.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, (program, err)
        text = " ".join(out.split())
        assert "--threads" in text, program
        if program in STALE_HELP:
            continue
        assert "--threads N" in text, program
        assert "(default 1)" in text.split("--threads N", 2)[-1][:200], (program, text)
        same = "results are identical for N=1 and N=2" in text
        assert same == (program in THREAD_INDEPENDENT), program
    for program, proc in zeros.items():
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 2, (program, err)
        assert "argument --threads: must be an integer >= 1, got '0'" in err, (program, err)


def _n3net_step(threads: int, thread_independent: bool):
    from n3sets.models import N3Net

    torch.manual_seed(0)
    model = N3Net({"channels": 32, "num_blocks": 4, "n3_after": 2, "k": 3, "embed_channels": 16})
    x = torch.randn(4, 4, 300)
    mask = torch.ones(4, 300, dtype=torch.bool)
    mask[1, 200:] = False
    with torch_threads(threads, thread_independent=thread_independent):
        out = model(x, mask)
        out.square().sum().backward()
    return [out.detach()] + [p.grad for p in model.parameters()]


def test_n3net_forward_backward_identical_for_1_and_2_threads():
    # (with 3 or 4 threads MKL's weight-gradient products differ in the last bits: not promised)
    ref = _n3net_step(1, True)
    assert all(torch.equal(a, b) for a, b in zip(ref, _n3net_step(2, True)))
    assert all(torch.equal(a, b) for a, b in zip(ref, _n3net_step(1, False)))  # one thread: oneDNN unused anyway


def test_match_filter_threads_restored():
    from n3sets.match_filter import MatchFilter
    from n3sets.models import N3Net

    model = N3Net({"channels": 16, "num_blocks": 2, "n3_after": 1, "k": 2, "embed_channels": 8})
    rng = np.random.default_rng(0)
    kpts = rng.uniform(0, 640, (2, 100, 2))
    K = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])
    torch.set_num_threads(2)
    torch.backends.mkldnn.enabled = True
    for threads in (None, 2):
        mf = MatchFilter(model, threads=threads)
        assert mf.threads == (threads or 1) and f"threads={mf.threads}" in repr(mf)
        mf.filter(kpts[0], kpts[1], K, K)
        assert torch.get_num_threads() == 2 and torch.backends.mkldnn.enabled  # the caller's settings
    with pytest.raises(ValueError, match="threads"):
        MatchFilter(model, threads=0)


_MATCH_FILTER_SCRIPT = """
import numpy as np, torch
from n3sets.match_filter import MatchFilter
from n3sets.models import N3Net
torch.manual_seed(0)
model = N3Net({"channels": 16, "num_blocks": 2, "n3_after": 1, "k": 2, "embed_channels": 8})
rng = np.random.default_rng(0)
k1, k2 = rng.uniform(0, 640, (200, 2)), rng.uniform(0, 640, (200, 2))
K = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])
p = [MatchFilter(model, threads=t).filter(k1, k2, K, K).prob for t in (1, 2)]
print(all(np.array_equal(p[0], q) for q in p[1:]))
"""


def test_match_filter_same_probabilities_for_1_and_2_threads():
    """One pair (a batch of one, N3 input of 5 channels): MKL's strict mode matters here."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", _MATCH_FILTER_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "True"


DEMO_SMALL = ["--epochs", "2", "--max-train-pairs", "16", "--max-val-pairs", "8", "--essential-after", "1",
              "--no-progress"]


def test_demo_same_numbers_for_1_and_2_threads(tmp_path):
    """The README demo (train_corr.py without --train), shortened: every logged number is identical.

    Shortened because two threads on a shared 2-core machine are slow (the point of the default);
    the full demo was checked by hand (best mAP20 the same for --threads 1 and 2, README).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR")}
    env["PYTHONPATH"] = str(ROOT)
    logs = {}
    for threads in (1, 2):
        out = tmp_path / f"t{threads}"
        if threads == 2:  # the same synthetic data, written once
            shutil.copytree(tmp_path / "t1" / "data", out / "data")
        proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "train_corr.py"), "--out", str(out),
                               "--threads", str(threads), *DEMO_SMALL], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"threads/process: {threads}" in proc.stdout
        logs[threads] = json.loads((out / "log.json").read_text())["history"]
    timeless = [{k: v for k, v in row.items() if not k.endswith("time_s")} for row in logs[1]]
    assert timeless == [{k: v for k, v in row.items() if not k.endswith("time_s")} for row in logs[2]]
    assert timeless[-1]["train_ess"] > 0  # the essential loss (eigen decompositions) was part of it


def test_train_corr_keeps_onednn_for_real_runs():
    """oneDNN off costs ~3x per training step (convolution backward): only the demo and
    --thread-independent turn it off."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_corr_threads", ROOT / "pipelines" / "train_corr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    real = ["--train", "a.h5", "--val", "b.h5", "--out", "runs/x"]
    assert not module.thread_independent(module.parse_args(real))
    assert module.thread_independent(module.parse_args(real + ["--thread-independent"]))
    assert module.thread_independent(module.parse_args([]))  # the embedded demo
