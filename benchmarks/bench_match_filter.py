"""Cost of filtering the putative matches of one image pair: shipped models against the estimators.

    python benchmarks/bench_match_filter.py --json out.json [--data FILE.h5] [--pairs 8]
        [--matches 2000] [--weights n3net-strecha cnnet-strecha ...] [--repeats 3] [--threads 1]

What a user of ``MatchFilter`` pays per pair, on the same pairs and in the same run:

- ``ransac``, ``magsac``: OpenCV RANSAC / USAC MAGSAC++ on all matches (10,000 iterations, the
  evaluation's setting; ``--max-iters``), the tools a learned filter replaces;
- ``ratio+magsac``: Lowe's ratio test at 0.8, then MAGSAC++;
- ``<model>``: ``MatchFilter.filter(..., refine=None)`` (network + weighted eight-point pose);
- ``<model>+ransac``: ``MatchFilter.filter(...)`` with its default RANSAC on the kept matches.

For the model rows the network's forward pass alone is timed too (``network_ms``). Every method
runs in its own subprocess, so its peak resident memory (``ru_maxrss`` after the run minus the
value after loading model and data) is its own. Times are medians over ``--repeats`` passes
over all pairs, after one warm-up pair. Ratios are against ``ransac`` (time per pair) and
against the network of ``cnnet-strecha`` (the plain CNNet without an N3 block), when it is among
the weights.

Pairs: the first ``--pairs`` pairs of ``--data`` (an h5 of ``data_prep``, e.g.
``data_out/strecha_test.h5``), or without it synthetic pairs of ``--matches`` matches (20 %
inliers) from ``data_prep.synthetic``.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BASELINES = ("ransac", "magsac", "ratio+magsac")
RATIO_TEST = 0.8


def load_pairs(args) -> list[dict]:
    """Pair records (numpy) to time: from ``--data`` or synthetic."""
    import numpy as np

    if args.data:
        import h5py

        from data_prep.h5io import pair_keys, read_pair

        path = Path(args.data)
        if not path.is_file():
            raise SystemExit(f"--data {path}: no such file")
        with h5py.File(path, "r") as f:
            keys = pair_keys(f)[: args.pairs]
            return [read_pair(f[k]) for k in keys]
    from data_prep.synthetic import synthetic_pair

    rng = np.random.default_rng(0)
    return [synthetic_pair(rng, num_matches=args.matches, outlier_ratio=0.8) for _ in range(args.pairs)]


def worker(args) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from n3sets.match_filter import MatchFilter
    from n3sets.robust import estimate_essential

    pairs = load_pairs(args)
    method = args.method
    model_name = method[: -len("+ransac")] if method.endswith("+ransac") else method
    mf = None if method in BASELINES else MatchFilter.from_pretrained(model_name, ransac_max_iters=args.max_iters)
    refine = "ransac" if method.endswith("+ransac") else None

    def run_pair(p):
        if mf is not None:
            side = dict(ratio=p["ratio"], mutual=p["mutual"]) if mf.side_info else {}
            res = mf.filter(p["kpts1"], p["kpts2"], p["K1"], p["K2"], refine=refine, **side)
            return res.ok
        n1, n2 = p["xs"][:, :2], p["xs"][:, 2:]  # normalized coordinates, stored by data_prep
        if method == "ratio+magsac":
            keep = np.flatnonzero(p["ratio"] < RATIO_TEST)
            n1, n2 = n1[keep], n2[keep]
        est = estimate_essential(n1, n2, method=method.split("+")[-1], seed=0, max_iters=args.max_iters)
        return bool(est["ok"])

    def run_network(p):
        r, m = (p["ratio"], p["mutual"]) if mf.side_info else (None, None)
        return mf._logits([(p["kpts1"], p["kpts2"], p["K1"], p["K2"], r, m)])

    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run_pair(pairs[0])  # warm-up: lazy imports, allocator, OpenCV thread pool
    passes, ok = [], 0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ok = sum(bool(run_pair(p)) for p in pairs)
        passes.append((time.perf_counter() - t0) / len(pairs))
    out = {
        "method": method,
        "ms_per_pair": 1000 * statistics.median(passes),
        "ok_pairs": ok,
        "pairs": len(pairs),
        "mean_matches": float(np.mean([p["kpts1"].shape[0] for p in pairs])),
    }
    if mf is not None and refine is None:  # the network alone (the same for the +ransac row)
        net = []
        with torch.no_grad():
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for p in pairs:
                    run_network(p)
                net.append((time.perf_counter() - t0) / len(pairs))
        out["network_ms_per_pair"] = 1000 * statistics.median(net)
    if mf is not None:
        out["parameters"] = sum(q.numel() for q in mf.model.parameters())
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["peak_mib"] = max(0, peak_kib - baseline_kib) / 1024
    return out


def table(rows: list[dict], ratios: dict) -> str:
    lines = ["| method | ms / pair | x RANSAC | network ms / pair | network x CNNet | peak MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["method"]
        net = r.get("network_ms_per_pair")
        net_ratio = ratios["network_vs_cnnet"].get(m)
        lines.append(
            f"| {m} | {r['ms_per_pair']:.1f} | {ratios['time_vs_ransac'][m]:.2f} | "
            f"{'' if net is None else f'{net:.1f}'} | {'' if net_ratio is None else f'{net_ratio:.2f}'} | "
            f"{r['peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--json", required=True, help="write the report here")
    ap.add_argument("--data", default=None, help="h5 of data_prep; omit for synthetic pairs")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--matches", type=int, default=2000, help="matches per synthetic pair (without --data)")
    ap.add_argument("--weights", nargs="+", default=["cnnet-strecha", "n3net-strecha", "n3net-strecha-refine"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--max-iters", type=int, default=10000, help="RANSAC / MAGSAC++ iteration cap (the evaluation's)")
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)  # worker mode
    args = ap.parse_args(argv)
    if args.pairs < 1 or args.repeats < 1 or args.matches < 8 or args.max_iters < 1:
        ap.error("--pairs, --repeats and --max-iters must be >= 1 and --matches >= 8")

    if args.method:  # child process: one method, result as JSON on stdout
        print(json.dumps(worker(args)))
        return 0

    if args.data and not Path(args.data).is_file():
        ap.error(f"--data {args.data}: no such file")
    from n3sets.pretrained import resolve_weights

    for w in args.weights:
        try:
            resolve_weights(w)
        except (FileNotFoundError, ValueError) as exc:
            ap.error(f"--weights {w}: {exc}")
    methods = list(BASELINES)
    for w in args.weights:
        methods += [w, f"{w}+ransac"]
    common = ["--pairs", str(args.pairs), "--matches", str(args.matches), "--repeats", str(args.repeats),
              "--threads", str(args.threads), "--max-iters", str(args.max_iters), "--json", "-"]
    if args.data:
        common += ["--data", args.data]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    rows = []
    for m in methods:
        proc = subprocess.run([sys.executable, __file__, "--method", m, *common],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"{m}: benchmark worker failed:\n{proc.stderr[-2000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{m:32s} {row['ms_per_pair']:8.1f} ms/pair  peak {row['peak_mib']:6.0f} MiB", flush=True)

    by = {r["method"]: r for r in rows}
    ransac_ms = by["ransac"]["ms_per_pair"]
    cnnet_net = by.get("cnnet-strecha", {}).get("network_ms_per_pair")
    ratios = {
        "time_vs_ransac": {m: by[m]["ms_per_pair"] / ransac_ms for m in methods},
        "network_vs_cnnet": {m: by[m]["network_ms_per_pair"] / cnnet_net
                             for m in methods if cnnet_net and "network_ms_per_pair" in by[m]},
    }
    import torch

    from n3sets.cli import cpu_info

    report = {
        "settings": {k: getattr(args, k) for k in ("data", "pairs", "matches", "weights", "repeats", "threads",
                                                      "max_iters")},
        "machine": {"platform": platform.platform(), **cpu_info(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpus": os.cpu_count()},
        "results": rows,
        "ratios": ratios,
    }
    report["table_markdown"] = table(rows, ratios)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(report["table_markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
