"""Run a ``pipelines/`` program whose rank 1 crashes once: a worker to launch under ``torchrun``.

    torchrun --nproc_per_node=2 --max-restarts=1 tests/torchrun_crash.py pipelines/PROGRAM.py ARGS

In the first attempt of the worker group (``TORCHELASTIC_RESTART_COUNT`` 0), rank 1 aborts
(SIGABRT, like a crash inside a native library) right after its ``$N3_TEST_CRASH_AFTER_BARRIER``-th
call of ``n3sets.training.barrier`` -- the trainers call it once at the end of every epoch, after
rank 0 has written ``last.pt``. torchrun then restarts the group, and with ``--resume`` the run
continues from that checkpoint. Later attempts run the program unchanged.
"""
import os
import resource
import runpy
import sys

program = sys.argv[1]
sys.argv = [program, *sys.argv[2:]]
after = int(os.environ.get("N3_TEST_CRASH_AFTER_BARRIER", "1"))

if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ.get("RANK") == "1":
    import n3sets.training as training  # patched before any trainer imports ``barrier`` from it

    real_barrier, calls = training.barrier, [0]

    def barrier(world: int) -> None:
        real_barrier(world)
        calls[0] += 1
        if calls[0] == after:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the working tree
            os.abort()

    training.barrier = barrier

runpy.run_path(program, run_name="__main__")
