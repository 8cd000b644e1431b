#!/usr/bin/env python
"""Train and evaluate the image models of one GPU lease in a fixed wall-clock window.

    PYTHONPATH=. python results/gpu_images/run.py --images DIR --out OUT [--window 540]

Used on a one-GPU machine lent for about ten minutes (see results/gpu_images/README.md). Six
trainings run at once on the one GPU, in pairs that share one schedule (the network and its
baseline get the same steps, crops and learning rates):

    denoising sigma 25:  n3net / dncnn       denoising sigma 50:  n3net / dncnn
    super-resolution x2, x3, x4 in one model: n3net / vdsr

1. probe: every training runs one short epoch at the same time (same contention as later); the
   seconds per step and per validation pass of the slower model of each pair give the pair's epoch
   count that fits the training window;
2. train: all six at once with that schedule (learning rate x0.3 at 70 % and 90 % of the epochs),
   ``--time-budget`` as a safety net, best validation epoch exported to ``OUT/<name>.pt``;
3. evaluate: ``eval_denoise.py`` (urban10, set12, bsd68 at the model's sigma) and ``eval_sr.py``
   (set5, set14, urban10, x2 x3 x4) on the GPU in full float32;
4. pack the logs and result JSONs into ``OUT/runs.tgz`` (after each phase, so that a lease cut
   short still returns what was done).

``DIR`` holds the image folders train400, urban10, set12, bsd68, set5 and set14.

``--plan`` picks the trainings (several plans run at once): ``shipped`` (the above), ``seeds`` (the
two denoising pairs again with seed 1, at the shipped schedules, for the seed spread; ``seeds-s25``
and ``seeds-s50`` are its halves) or ``ablation`` (N3Net k = 1, k = 4,
hard-KNN and an 18-layer DnCNN at the shipped sigma-25 schedule, evaluated on urban10) or ``k1``
(N3Net with k = 1: a second seed at sigma 25, and sigma 50 at the shipped sigma-50 schedule) or ``sr``
(at the shipped SR schedule: a ``scale_aware`` N3Net-SR, whose temperature CNNs are told the
scale, and both SR models again with seed 1 for the seed spread) or ``sr-prior`` (at the shipped SR
schedule: a scale-aware N3Net-SR with the per-scale temperature factors 10 / 0.5 / 0.1 as a fixed prior,
two seeds, and VDSR with seed 2) or ``hetero`` (heteroscedastic
raw-like noise at the shipped sigma-25 schedule: blind N3Net, non-blind N3Net and non-blind DnCNN,
which are told the noise level, evaluated with ``eval_denoise.py --noise hetero`` on set12, bsd68
and urban10). Plans with fixed schedules skip the probe. ``--no-eval`` trains only (evaluate later, e.g. on a CPU).
"""
from __future__ import annotations

import argparse
import json
import shutil
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

START = time.time()
PY = sys.executable

DENOISE = ["--crop", "80", "--batch-size", "32", "--samples-per-epoch", "3200", "--lr", "1e-3", "--lr-decay", "0.3"]
SR = ["--scales", "2", "3", "4", "--crop", "48", "--batch-size", "64", "--samples-per-epoch", "6400", "--lr", "1e-4",
      "--lr-decay", "0.3"]
SCHEDULE_S25 = {"epochs": 14, "decay": [11, 14]}  # what the shipped sigma-25 pair got (chosen by the probe)
SCHEDULE_S50 = {"epochs": 13, "decay": [10, 13]}
SCHEDULE_SR = {"epochs": 12, "decay": [9, 12]}  # what the shipped SR pair got
ALL_SETS = ("set12", "bsd68", "urban10")


def _denoise(model: str, sigma: str, pair: str, extra=(), schedule=None, sets=ALL_SETS) -> dict:
    return {"program": "train_denoise", "pair": pair, "schedule": schedule, "eval": ("denoise", sigma, sets),
            "args": ["--model", model, "--sigma", sigma] + DENOISE + list(extra)}


def _hetero(model: str, extra=()) -> dict:
    return {"program": "train_denoise", "pair": "hetero", "schedule": SCHEDULE_S25, "eval": ("hetero", None, ALL_SETS),
            "args": ["--model", model, "--noise", "hetero"] + DENOISE + list(extra)}


def _seed1(sigma: str, schedule: dict) -> dict:
    """The denoising pair of ``sigma`` again with seed 1."""
    return {f"{m}-s{sigma}-seed1": _denoise(m, sigma, f"s{sigma}", ["--seed", "1"], schedule) for m in ("n3net", "dncnn")}


NONBLIND = ["--model-conf", json.dumps({"noise_input": "level"})]
# the per-scale temperature factors that calibrate_sr.py chose for n3net-sr-x234 on validation, as a fixed prior
# under scale-aware temperature CNNs: the route (calibrate, then train scale-aware) that put N3Net-SR above VDSR at x4
SR_PRIOR = ["--model-conf", json.dumps({"scale_aware": True, "scale_temperature": {"2": 10.0, "3": 0.5, "4": 0.1}})]


def _sr(model: str, extra=()) -> dict:
    return {"program": "train_sr", "pair": "sr", "schedule": SCHEDULE_SR, "eval": ("sr",),
            "args": ["--model", model] + SR + list(extra)}

# plan -> {name: job}; the members of a pair share one schedule: the probe's (schedule None) or a fixed one
PLANS = {
    # the shipped weights: three pairs, epochs from the probe
    "shipped": {
        "n3net-s25": _denoise("n3net", "25", "s25"),
        "dncnn-s25": _denoise("dncnn", "25", "s25"),
        "n3net-s50": _denoise("n3net", "50", "s50"),
        "dncnn-s50": _denoise("dncnn", "50", "s50"),
        "n3net-sr-x234": {"program": "train_sr", "pair": "sr", "schedule": None, "eval": ("sr",),
                          "args": ["--model", "n3net"] + SR},
        "vdsr-x234": {"program": "train_sr", "pair": "sr", "schedule": None, "eval": ("sr",), "args": ["--model", "vdsr"] + SR},
    },
    # seed spread of the denoising comparison: the shipped schedules with seed 1 (seeds = both halves)
    "seeds-s25": _seed1("25", SCHEDULE_S25),
    "seeds-s50": _seed1("50", SCHEDULE_S50),
    # the k / matching ablation at the shipped sigma-25 schedule (urban10 only)
    "ablation": {
        "n3net-k1-s25": _denoise("n3net", "25", "s25", ["--k", "1"], SCHEDULE_S25, ("urban10",)),
        "n3net-k4-s25": _denoise("n3net", "25", "s25", ["--k", "4"], SCHEDULE_S25, ("urban10",)),
        "n3net-knn-s25": _denoise("n3net", "25", "s25", ["--model-conf", json.dumps(
            {"block": {"embed": "none", "relaxation": "hard"}, "match_on": "input"})], SCHEDULE_S25, ("urban10",)),
        "dncnn18-s25": _denoise("dncnn", "25", "s25", ["--depth", "18"], SCHEDULE_S25, ("urban10",)),
    },
    # k = 1 (the best sigma-25 network of the ablation): a second seed, and sigma 50 against the shipped dncnn-s50
    "k1": {
        "n3net-k1-s25-seed1": _denoise("n3net", "25", "s25", ["--k", "1", "--seed", "1"], SCHEDULE_S25),
        "n3net-k1-s50": _denoise("n3net", "50", "s50", ["--k", "1"], SCHEDULE_S50),
    },
    # super-resolution: the trained per-scale temperature, and the seed spread of the shipped pair
    "sr": {
        "n3net-sr-aware-x234": _sr("n3net", ["--model-conf", json.dumps({"scale_aware": True})]),
        "n3net-sr-x234-seed1": _sr("n3net", ["--seed", "1"]),
        "vdsr-x234-seed1": _sr("vdsr", ["--seed", "1"]),
    },
    # super-resolution from scratch with the temperature prior, two seeds, and a third VDSR seed
    "sr-prior": {
        "n3net-sr-prior-x234": _sr("n3net", SR_PRIOR),
        "n3net-sr-prior-x234-seed1": _sr("n3net", SR_PRIOR + ["--seed", "1"]),
        "vdsr-x234-seed2": _sr("vdsr", ["--seed", "2"]),
    },
    # heteroscedastic noise: blind against non-blind (told (a, b)), the same schedule
    "hetero": {
        "n3net-hetero-blind": _hetero("n3net"),
        "n3net-hetero-nonblind": _hetero("n3net", NONBLIND),
        "dncnn-hetero-nonblind": _hetero("dncnn", NONBLIND),
    },
}
PLANS["seeds"] = {**PLANS["seeds-s25"], **PLANS["seeds-s50"]}
JOBS: dict = {}  # the chosen plans


def flag(name: str, option: str) -> int:
    """The integer value of ``option`` in job ``name``'s arguments."""
    args = JOBS[name]["args"]
    return int(args[args.index(option) + 1])


def elapsed() -> float:
    return time.time() - START


def say(msg: str) -> None:
    print(f"[{elapsed():6.1f} s] {msg}", flush=True)


def pack(runs: Path, out: Path) -> None:
    """Logs, curves, result JSONs and process outputs (no checkpoints) into out/runs.tgz, atomically."""
    tmp = out / "runs.tgz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for f in sorted(runs.rglob("*")):
            if f.is_file() and f.suffix in (".json", ".csv", ".png", ".txt", ".log"):
                tar.add(f, arcname=str(f.relative_to(runs)))
    os.replace(tmp, out / "runs.tgz")


def launch(cmd: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    log.with_suffix(".command.txt").write_text(" ".join(cmd) + "\n")
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_all(procs: dict[str, subprocess.Popen], deadline: float) -> dict[str, int | None]:
    """Wait until every process ends or ``deadline`` (seconds since start) passes; kill the rest."""
    while any(p.poll() is None for p in procs.values()) and elapsed() < deadline:
        time.sleep(1)
    for name, p in procs.items():
        if p.poll() is None:
            say(f"{name}: still running at the deadline, killed")
            p.kill()
            p.wait()
    return {name: p.returncode for name, p in procs.items()}


SMOKE = ["--depth", "2", "--features", "4", "--crop", "24", "--batch-size", "2", "--samples-per-epoch", "4",
         "--val-count", "2"]


def train_cmd(name: str, a, out_dir: Path, extra: list[str]) -> list[str]:
    program, args = JOBS[name]["program"], JOBS[name]["args"]
    return [PY, f"pipelines/{program}.py", "--data", str(a.images / "train400"), "--out", str(out_dir),
            "--device", a.device, "--threads", "2", "--num-workers", "2", "--no-progress", "--seed", "0"] + args + extra \
        + (SMOKE if a.smoke else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--runs", type=Path, default=Path("/tmp/gpu_runs"))
    ap.add_argument("--window", type=float, default=540, help="seconds from start by which everything is packed")
    ap.add_argument("--eval-seconds", type=float, default=110, help="seconds kept for evaluation and packing")
    ap.add_argument("--probe-steps", type=int, default=25)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny models and epochs: a check of this script on a CPU")
    ap.add_argument("--plan", nargs="+", choices=sorted(PLANS), default=["shipped"],
                    help="which trainings; several plans run at once (default: the shipped weights)")
    ap.add_argument("--no-eval", action="store_true", help="train only (evaluate later, e.g. on the CPU)")
    a = ap.parse_args()
    for plan in a.plan:
        JOBS.update(PLANS[plan])
    runs, out = a.runs, a.out
    runs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    info = {"window_s": a.window, "host": os.uname().nodename, "plan": a.plan}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:  # noqa: BLE001 - informational only
        smi = f"nvidia-smi failed: {exc}"
    import torch
    info.update(gpu=smi, torch=torch.__version__, python=sys.version.split()[0])
    say(f"GPU: {smi}; torch {torch.__version__}")

    # 1. probe (only the pairs without a fixed schedule)
    to_probe = [n for n, j in JOBS.items() if j["schedule"] is None]
    procs = {}
    for name in to_probe:
        per_epoch = flag(name, "--batch-size") * a.probe_steps
        cmd = train_cmd(name, a, runs / "probe" / name, ["--epochs", "1", "--samples-per-epoch", str(per_epoch)])
        procs[name] = launch(cmd, runs / "probe" / name / "stdout.log")
    codes = wait_all(procs, deadline=min(90.0, a.window / 4))
    probe_end = elapsed()
    speeds = {}
    for name in to_probe:
        log = runs / "probe" / name / "log.json"
        if codes[name] != 0 or not log.is_file():
            say(f"{name}: probe failed (exit {codes[name]}); last output:\n"
                + (runs / "probe" / name / "stdout.log").read_text()[-2000:])
            continue
        row = json.loads(log.read_text())["history"][0]
        speeds[name] = {"step_s": row["train_time_s"] / row["step"], "val_s": row["epoch_time_s"] - row["train_time_s"]}
        say(f"{name}: probe {speeds[name]['step_s'] * 1000:.0f} ms/step, validation {speeds[name]['val_s']:.1f} s")
    info["probe"] = speeds
    pack(runs, out)

    # 2. train: every pair's epochs fit the window left before evaluation (with a start-up margin)
    eval_seconds = 0.0 if a.no_eval else a.eval_seconds
    train_window = a.window - eval_seconds - probe_end - 25
    schedule = {}
    for pair in sorted({j["pair"] for j in JOBS.values()}):
        members = [n for n, j in JOBS.items() if j["pair"] == pair]
        fixed = JOBS[members[0]]["schedule"]
        if fixed is not None:
            schedule[pair] = dict(fixed)
            say(f"pair {pair}: fixed schedule, {fixed['epochs']} epochs, lr decay at {fixed['decay']}")
            continue
        if not all(n in speeds for n in members):
            continue
        steps = {n: flag(n, "--samples-per-epoch") // flag(n, "--batch-size") for n in members}
        epoch_s = max(steps[n] * speeds[n]["step_s"] + speeds[n]["val_s"] for n in members)
        epochs = max(2, int(train_window // epoch_s))
        decay = sorted({max(2, round(0.7 * epochs) + 1), max(2, round(0.9 * epochs) + 1)})
        decay = [e for e in decay if e <= epochs]
        schedule[pair] = {"epochs": epochs, "decay": decay, "epoch_s_probe": epoch_s}
        say(f"pair {pair}: {epochs} epochs of {max(steps.values())} steps, lr decay at {decay} "
            f"(probe: {epoch_s:.1f} s per epoch, window {train_window:.0f} s)")
    info["schedule"] = schedule
    procs = {}
    for name, job in JOBS.items():
        if job["pair"] not in schedule:
            continue
        s = schedule[job["pair"]]
        extra = ["--epochs", str(s["epochs"]), "--lr-decay-epochs", *map(str, s["decay"]),
                 "--time-budget", f"{train_window + 10:.0f}", "--export", str(out / f"{name}.pt")]
        procs[name] = launch(train_cmd(name, a, runs / "train" / name, extra), runs / "train" / name / "stdout.log")
    codes = wait_all(procs, deadline=a.window - eval_seconds + (20 if eval_seconds else -8))
    info["train_exit"] = codes
    for name in procs:  # a run killed before its export: ship its best checkpoint as it is
        best = runs / "train" / name / "best.pt"
        if not (out / f"{name}.pt").is_file() and best.is_file():
            shutil.copy(best, out / f"{name}.pt")
            say(f"{name}: not exported, {best} copied instead")
    for name in procs:
        log = runs / "train" / name / "log.json"
        if log.is_file():
            h = json.loads(log.read_text())
            say(f"{name}: exit {codes[name]}, {len(h['history'])} epochs, best val PSNR {h['best']['val_psnr']:.3f} "
                f"(epoch {h['best']['epoch']}), {h['history'][-1]['train_time_s']:.0f} s training")
    (runs / "driver.json").write_text(json.dumps(info, indent=2))
    pack(runs, out)

    # 3. evaluate on the GPU, one process per (task, noise level, data) so that the CPU-side metrics run in parallel
    d = a.images
    limit = ["--max-images", "1"] if a.smoke else []
    procs = {}
    groups: dict = {}
    for name, job in JOBS.items():
        if not a.no_eval and (out / f"{name}.pt").is_file():
            groups.setdefault(job["eval"], []).append(str(out / f"{name}.pt"))
    for spec, weights in sorted(groups.items()):
        if spec[0] in ("denoise", "hetero"):
            _, sigma, sets = spec
            noise = ["--sigma", sigma] if spec[0] == "denoise" else ["--noise", "hetero"]
            split = [s for s in (("urban10",), tuple(x for x in sets if x != "urban10")) if set(s) & set(sets) and s]
            for part in split:
                tag = f"{f's{sigma}' if spec[0] == 'denoise' else 'hetero'}_{'_'.join(part)}"
                cmd = [PY, "pipelines/eval_denoise.py", "--data", *[str(d / x) for x in part], *noise,
                       "--weights", *weights, "--device", a.device, "--quiet",
                       "--json", str(runs / "eval" / f"denoise_{tag}.json")] + limit
                procs[f"eval-{tag}"] = launch(cmd, runs / "eval" / f"denoise_{tag}.log")
        else:
            for scale in ("2", "3", "4"):
                cmd = [PY, "pipelines/eval_sr.py", "--data", str(d / "set5"), str(d / "set14"), str(d / "urban10"),
                       "--scale", scale, "--weights", *weights, "--device", a.device, "--quiet",
                       "--json", str(runs / "eval" / f"sr_x{scale}.json")] + limit
                procs[f"eval-sr-x{scale}"] = launch(cmd, runs / "eval" / f"sr_x{scale}.log")
    codes = wait_all(procs, deadline=a.window - 8)
    info["eval_exit"] = codes
    info["total_s"] = elapsed()
    (runs / "driver.json").write_text(json.dumps(info, indent=2))
    for name in procs:
        say(f"{name}: exit {codes[name]}")
    pack(runs, out)
    say("done")


if __name__ == "__main__":
    main()
