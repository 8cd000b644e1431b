"""Speed and peak memory of the set N3 block, dense vs chunked (forward + backward).

    python benchmarks/bench_n3_set.py --json out.json [--sizes 1000 2000 4000 8000 16000]
        [--repeats 3] [--channels 128] [--k 4] [--mem-cap-gib 8] [--chunk-size N] [--threads T]

Every (N, impl) configuration runs in its own subprocess, so that its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own; the baseline taken after imports,
model and input creation is subtracted. Time is the median over ``--repeats`` forward+backward
passes after one warm-up pass. The dense path is skipped when its estimated peak exceeds
``--mem-cap-gib``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from n3sets.cli import cpu_info, write_json

GIB = 1024 ** 3


def dense_estimate_bytes(batch: int, n: int, k: int, bytes_per: int = 4) -> int:
    """Dense-path peak: ~(3k + 8) B x N x N float buffers (W, its gradient, distances, temporaries).

    Calibrated on this benchmark: N=4000, k=4 peaked at 1.2 GiB (20 buffers of 64 MB).
    """
    return (3 * k + 8) * batch * n * n * bytes_per


def worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from n3sets.n3block import N3Block

    torch.manual_seed(0)
    blk = N3Block(args.channels, k=args.k, impl=args.impl, chunk_size=args.chunk_size)
    x = torch.randn(args.batch, args.channels, args.n, requires_grad=True)
    g = torch.randn(args.batch, (args.k + 1) * args.channels, args.n)
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    def step():
        blk.zero_grad(set_to_none=True)
        x.grad = None
        t0 = time.perf_counter()
        y = blk(x)
        y.backward(g)
        return time.perf_counter() - t0

    step()  # warm-up (allocator, lazy imports); its memory counts towards the peak too
    times = [step() for _ in range(args.repeats)]
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = max(0, peak_kib - baseline_kib) * 1024
    from n3sets.n3block import AUTO_CHUNK_ENTRIES

    chunk = args.chunk_size or max(1, min(args.n, AUTO_CHUNK_ENTRIES // (args.batch * args.n)))
    return {
        "n": args.n,
        "impl": args.impl,
        "batch": args.batch,
        "channels": args.channels,
        "k": args.k,
        "chunk_size": chunk if args.impl == "chunked" else None,
        "time_s": statistics.median(times),
        "times_s": times,
        "peak_bytes": peak,
        "peak_gib": peak / GIB,
        "threads": torch.get_num_threads(),
    }


def run_config(args, n: int, impl: str) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker", "--n", str(n), "--impl", impl,
        "--channels", str(args.channels), "--k", str(args.k), "--batch", str(args.batch),
        "--repeats", str(args.repeats), "--threads", str(args.threads or 0),
    ]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        return {"n": n, "impl": impl, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info(threads: int) -> dict:
    import torch

    return {
        "platform": platform.platform(),
        **cpu_info(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": threads or torch.get_num_threads(),
        "load_avg_at_start": os.getloadavg(),
    }


def markdown(results: list[dict], ratios: dict) -> str:
    lines = [
        "| N | dense time (s) | dense peak (GiB) | chunked time (s) | chunked peak (GiB) | chunk | time chunked/dense | mem chunked/dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["n"], r["impl"]): r for r in results}
    for n in sorted({r["n"] for r in results}):
        d, c = by.get((n, "dense"), {}), by.get((n, "chunked"), {})

        def cell(r, key, fmt):
            if "skipped" in r:
                return r["skipped"]
            if "error" in r:
                return "error"
            return fmt.format(r[key]) if key in r else "-"

        rt = ratios.get(str(n), {})
        lines.append(
            f"| {n} | {cell(d, 'time_s', '{:.3f}')} | {cell(d, 'peak_gib', '{:.3f}')} | {cell(c, 'time_s', '{:.3f}')} | "
            f"{cell(c, 'peak_gib', '{:.3f}')} | {c.get('chunk_size', '-')} | "
            f"{rt['time'] if 'time' in rt else '-'} | {rt['memory'] if 'memory' in rt else '-'} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the report here")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000, 8000, 16000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=None, help="queries per chunk (default: the block's auto choice)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch default)")
    p.add_argument("--mem-cap-gib", type=float, default=8.0, help="skip dense when its estimated peak exceeds this")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.repeats < 1:
        p.error("--repeats must be >= 1")

    report = {"settings": {k: v for k, v in vars(args).items() if k not in ("worker", "n", "impl")},
              "machine": machine_info(args.threads), "results": [], "ratios": {}}
    for n in args.sizes:
        for impl in ("dense", "chunked"):
            if impl == "dense":
                est = dense_estimate_bytes(args.batch, n, args.k)
                if est > args.mem_cap_gib * GIB:
                    r = {"n": n, "impl": impl, "skipped": f"skipped: estimated {est / GIB:.1f} GiB"}
                    report["results"].append(r)
                    print(json.dumps(r), flush=True)
                    continue
            r = run_config(args, n, impl)
            report["results"].append(r)
            print(json.dumps(r), flush=True)
        by = {x["impl"]: x for x in report["results"] if x["n"] == n}
        if "time_s" in by.get("dense", {}) and "time_s" in by.get("chunked", {}):
            d, c = by["dense"], by["chunked"]
            report["ratios"][str(n)] = {
                "time": round(c["time_s"] / d["time_s"], 3),
                "memory": round(c["peak_bytes"] / d["peak_bytes"], 3) if d["peak_bytes"] else None,
            }
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    table = markdown(report["results"], report["ratios"])
    report["table_markdown"] = table
    print(table)
    if args.json:
        write_json(args.json, report, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
