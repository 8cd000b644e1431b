import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]

#: Set to 1 (CI does, in .ci/run) to make missing real data or shipped weights an error instead
#: of a skip: a CI run without ../shared/data must not pass green with the real-data tests skipped.
REQUIRE_DATA_ENV = "N3_REQUIRE_DATA"

# Property tests draw the same examples on every run (and keep no example database), so a
# failure reproduces and a green run means the same thing everywhere.
settings.register_profile("n3", derandomize=True, database=None, print_blob=True)
settings.load_profile("n3")


def data_required() -> bool:
    """Whether ``$N3_REQUIRE_DATA`` asks for missing data to fail the run rather than skip."""
    return os.environ.get(REQUIRE_DATA_ENV, "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail_missing(reason: str):
    """Skip a test whose data is missing, or fail it when ``$N3_REQUIRE_DATA`` is set."""
    if data_required():
        pytest.fail(f"{reason} -- {REQUIRE_DATA_ENV} is set, so missing data is an error "
                    f"(unset it to skip these tests instead)", pytrace=False)
    pytest.skip(reason)


def _data_root() -> Path:
    return Path(os.environ.get("N3_DATA", ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real data (../shared/data or $N3_DATA); tests that need it skip when it is missing
    (fail when $N3_REQUIRE_DATA is set)."""
    root = _data_root()
    if not (root / "strecha").is_dir():
        skip_or_fail_missing(f"real data not found at {root} (set N3_DATA)")
    return root


@pytest.fixture(scope="session")
def missing_data():
    """``missing_data(reason)``: skip, or fail under $N3_REQUIRE_DATA (for data other than data_root)."""
    return skip_or_fail_missing


@pytest.fixture(scope="session")
def strecha_root(data_root) -> Path:
    return data_root / "strecha"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def load_program():
    """``load_program("eval_corr")`` -> the module ``pipelines/eval_corr.py`` (the programs are files,
    not a package); each program is loaded once per session."""
    import importlib.util
    import sys

    cache = {}

    def load(name: str):
        if name not in cache:
            spec = importlib.util.spec_from_file_location(f"pipelines_{name}", ROOT / "pipelines" / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            cache[name] = module
        return cache[name]

    return load


@pytest.fixture(scope="module")
def stripe_images(tmp_path_factory) -> Path:
    """A folder of five structured 36x34 grey PNGs (sine stripes under a cosine): data a tiny
    image model can learn from, for trainer tests."""
    import numpy as np

    from n3images.io import write_image

    folder = tmp_path_factory.mktemp("stripe_images")
    yy, xx = np.mgrid[0:36, 0:34]
    for i in range(5):
        img = 0.5 + 0.4 * np.sin(xx * (0.3 + 0.1 * i) + yy * 0.2 * i) * np.cos(yy * 0.25)
        write_image(folder / f"img{i}.png", img.astype(np.float32))
    return folder


@pytest.fixture(scope="session")
def torchrun():
    """``torchrun("train_denoise.py", args)`` runs ``pipelines/train_denoise.py ARGS`` as two gloo
    processes, restartable as the README's DDP commands are (``torchrun --standalone
    --nproc_per_node=2 --max-restarts=1``; ``--standalone``: a free port, not a fixed one), and
    returns the finished ``subprocess.CompletedProcess``.

    ``crash_after_barrier=N`` launches it through ``tests/torchrun_crash.py``: rank 1 aborts after
    its N-th end-of-epoch barrier, once, and torchrun restarts the group. A failed run fails the
    test with the error lines of every process (not just the launcher's last words); a restart
    nobody asked for is reported as a warning, so that a crash absorbed by it stays visible.
    """
    import re
    import subprocess
    import sys
    import warnings

    def run(program: str, args, *, crash_after_barrier: int | None = None, timeout: float = 300):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--max-restarts=1"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        if crash_after_barrier is not None:
            cmd.append(str(ROOT / "tests" / "torchrun_crash.py"))
            env["N3_TEST_CRASH_AFTER_BARRIER"] = str(crash_after_barrier)
        cmd += [str(ROOT / "pipelines" / program), *map(str, args)]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        errors = [line for line in r.stderr.splitlines()
                  if re.search(r"Error|terminate called|what\(\)|Fatal|failed \(exitcode|Signal \d+", line)]
        if r.returncode != 0:
            pytest.fail(f"torchrun {program} exited with {r.returncode}; error lines of all processes:\n"
                        + "\n".join(errors[-60:]) + "\n--- end of stderr ---\n" + r.stderr[-1500:], pytrace=False)
        restarts = [line for line in errors if "failed (exitcode" in line]
        if restarts and crash_after_barrier is None:
            warnings.warn(f"torchrun {program} succeeded only after restarting its workers:\n" + "\n".join(errors[-30:]))
        r.restarts = len(restarts)
        return r

    return run
