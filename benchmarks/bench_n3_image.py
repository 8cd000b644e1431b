"""Speed and peak memory of the image N3 block, the denoisers, the SR models, and the set block before/after the engine refactor.

    python benchmarks/bench_n3_image.py --json out.json [--threads 1] [--repeats 3] [--quick]
        [--sections block2d denoiser set sr] [--mem-cap-gib 12] [--timeout 1800]

Four sections (the first three by default; ``sr`` on request), every configuration measured in
its own process:

``block2d``
    :class:`n3images.N3Block2d` forward + backward (train mode) at the denoiser's training
    configuration (batch 16, 80x80, 8 channels, k=7, p=10, s=5, w=15, tile 8) with
    ``impl="dense"`` and ``"chunked"``, against the *simple implementation*: im2col'd patches
    through :func:`n3sets.engine.neighbour_volumes` with the per-query gather layout
    (:func:`n3images.patches.window_candidates` -> ``IndexedCandidates``), a fixed temperature,
    and col2im -- i.e. the block without its embedding / temperature CNNs and distance norm, on a
    random 8-channel embedding map. The same engine call with the block's own layout
    (:func:`n3images.patches.window_blocks` -> ``BlockedCandidates``) is timed too, so that the
    layout's gain and the CNNs' cost can be told apart. Layout construction is inside the timed
    step (the block builds it on every forward).
``denoiser``
    :class:`n3images.N3NetDenoiser` and :class:`n3images.DnCNN` (depth 17) forward in eval mode
    under ``torch.no_grad`` on grey images of 512x512 and 1024x768 (width x height); untrained
    models with default batch-norm running statistics (timing does not depend on the weights).
``set``
    :class:`n3sets.N3Block` forward + backward (train mode) at B=4, N=500 and 2000, C=16, k=7,
    dense and chunked: the current code ("after") against the code before the engine refactor
    ("before", commit ``a9d5a60``), with identical weights (``load_state_dict``) and inputs. The
    old modules are extracted at run time with ``git show a9d5a60:n3sets/<file>`` (n3block.py and
    the modules it imports, followed recursively) into a temporary package that is deleted
    afterwards; without git or the commit the section is skipped with a note.
``sr`` (only with ``--sections ... sr``)
    :class:`n3images.VDSR` and :class:`n3images.N3NetSR` upscaling to a 512x512 output at x2 and x4
    in eval mode under ``torch.no_grad``: the bicubic upscaling of the low-resolution luma
    (:func:`n3images.sr.bicubic_up`, numpy float64) plus the network forward on the result, as
    ``eval_sr.py`` and ``upscale.py`` run them; untrained models. Both networks run on the
    upscaled image, so their cost depends on the output size, not on the scale.

Method (as ``bench_n3_set.py``): time is the median over ``--repeats`` passes after one warm-up
pass; peak memory is the resident-set high-water mark (``ru_maxrss``) of the configuration's own
process minus its value after imports, model and input creation (the warm-up counts towards the
peak). The processes are forked from one server process that has imported torch and the
project (``multiprocessing`` "forkserver"), so a configuration does not pay torch's import, and
each still has its own address space and high-water mark. Dense paths whose estimated peak
exceeds ``--mem-cap-gib`` are skipped. Ratios are taken between configurations of the same run.

``--quick`` runs tiny sizes (for the tests); its figures mean nothing.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import multiprocessing as mp
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from n3sets.cli import write_json

ROOT = Path(__file__).resolve().parents[1]


def _load_set_benchmark():
    """benchmarks/bench_n3_set.py by path (benchmarks/ is not a package; this script is itself
    loaded by path from the tests, so no sys.path entry can be relied upon)."""
    spec = importlib.util.spec_from_file_location("_bench_n3_set", Path(__file__).with_name("bench_n3_set.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_set_benchmark = _load_set_benchmark()
dense_estimate_bytes, machine_info = _set_benchmark.dense_estimate_bytes, _set_benchmark.machine_info  # shared

MIB = 1024 ** 2
GIB = 1024 ** 3
SECTIONS = ("block2d", "denoiser", "set")  # the default sections
ALL_SECTIONS = SECTIONS + ("sr",)
OLD_COMMIT = "a9d5a60"  # last commit before the N3 engine refactor of n3sets/n3block.py
OLD_PACKAGE = "n3sets_before_engine"
# modules the fork server imports once; torch.broadcast_shapes (used by n3sets.knn) imports sympy
# through torch.fx.experimental.symbolic_shapes on its first call (~0.5 s per process)
PRELOAD = ["torch", "torch.fx.experimental.symbolic_shapes", "n3sets.engine", "n3sets.n3block", "n3images.patches",
           "n3images.n3block2d", "n3images.models", "n3images.sr"]

# Indexed (per-query gather) dense path: peak ~ this many times the two gathered tensors
# (B, L, O, E) and (B, L, O, F) in float32 (kept for the backward, plus their gradients).
# Measured with this benchmark (1 thread): 1.61-1.69 on 40x40 (batch 2), 60x60 and 80x80 (batch 1).
INDEXED_DENSE_FACTOR = 1.75

CONFIGS = {
    "full": {
        "block2d": {"batch": 16, "height": 80, "width": 80, "channels": 8, "k": 7, "patch_size": 10, "stride": 5,
                    "window": 15, "tile": 8, "embed_channels": 8, "temperature": 0.1},
        "denoiser": {"channels": 1, "sizes": [[512, 512], [1024, 768]]},  # width x height
        "set": {"batch": 4, "sizes": [500, 2000], "channels": 16, "k": 7},
        "sr": {"output": [512, 512], "scales": [2, 4]},  # width x height of the output
    },
    "quick": {
        "block2d": {"batch": 2, "height": 30, "width": 30, "channels": 8, "k": 7, "patch_size": 10, "stride": 5,
                    "window": 15, "tile": 2, "embed_channels": 8, "temperature": 0.1},
        "denoiser": {"channels": 1, "sizes": [[40, 32], [48, 40]]},
        "set": {"batch": 2, "sizes": [40, 80], "channels": 16, "k": 7},
        "sr": {"output": [48, 40], "scales": [2, 4]},
    },
}

BLOCK2D_VARIANTS = ["n3block2d_dense", "n3block2d_chunked", "blocked_dense", "blocked_chunked",
                    "indexed_dense", "indexed_chunked"]
# (numerator, denominator) pairs reported as ratios; "indexed_*" is the simple implementation
BLOCK2D_RATIOS = [
    ("n3block2d_dense", "indexed_dense"), ("n3block2d_chunked", "indexed_chunked"),
    ("n3block2d_dense", "indexed_chunked"),
    ("blocked_dense", "indexed_dense"), ("blocked_chunked", "indexed_chunked"),
    ("n3block2d_chunked", "n3block2d_dense"), ("indexed_chunked", "indexed_dense"),
]


# --------------------------------------------------------------------------------------------
# measurement (runs in the forked configuration process)


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _measure(step, repeats: int, baseline_kib: int) -> dict:
    """One warm-up call of ``step`` (returns seconds), then ``repeats`` timed ones; peak over the baseline."""
    step()
    times = [step() for _ in range(repeats)]
    peak_kib = max(0, _maxrss_kib() - baseline_kib)
    return {"time_ms": 1000 * statistics.median(times), "times_ms": [1000 * t for t in times],
            "peak_mib": peak_kib / 1024}


def _grid(conf: dict) -> tuple[int, int]:
    from n3images.patches import grid_shape

    gh, gw, _, _ = grid_shape(conf["height"], conf["width"], conf["patch_size"], conf["stride"])
    return gh, gw


def indexed_dense_estimate_bytes(conf: dict) -> int:
    """Estimated peak of the indexed dense engine path (the gathered candidate tensors dominate)."""
    gh, gw = _grid(conf)
    slots = conf["window"] ** 2  # window_candidates keeps window^2 slots per patch (invalid ones too)
    pp = conf["patch_size"] ** 2
    dims = (conf["embed_channels"] + conf["channels"]) * pp
    return int(INDEXED_DENSE_FACTOR * conf["batch"] * gh * gw * slots * dims * 4)


def work_block2d(spec: dict) -> dict:
    import torch

    from n3images.n3block2d import N3Block2d
    from n3images.patches import col2im, im2col, pad_to_grid, window_blocks, window_candidates
    from n3sets.engine import neighbour_volumes

    c, variant = spec["config"], spec["variant"]
    kind, impl = variant.rsplit("_", 1)
    B, C, H, W, k = c["batch"], c["channels"], c["height"], c["width"], c["k"]
    p, s, w, tile, E = c["patch_size"], c["stride"], c["window"], c["tile"], c["embed_channels"]
    gh, gw = _grid(c)
    L = gh * gw
    torch.manual_seed(0)
    x = torch.randn(B, C, H, W, requires_grad=True)
    g = torch.randn(B, (k + 1) * C, H, W)
    info = {"grid": [gh, gw], "patches": L}
    if kind == "n3block2d":
        blk = N3Block2d(C, k=k, patch_size=p, stride=s, window=w, impl=impl, tile=tile, embed_channels=E).train()
        leaves = [x, *blk.parameters()]
        info["parameters"] = sum(q.numel() for q in blk.parameters())

        def forward():
            return blk(x)
    else:
        # a random embedding map scaled so that patch distances have a standard deviation of ~1
        # (about what the block's distance norm gives), with the block's initial temperature
        dim = E * p * p
        e_map = (torch.randn(B, E, H, W) * (8 * dim) ** -0.25).requires_grad_(True)
        temp = torch.full((B, L), float(c["temperature"]))
        leaves = [x, e_map]
        if kind == "indexed":
            lay = window_candidates(gh, gw, w)
            info["candidate_slots"] = lay.index.shape[1]
            if impl == "chunked":
                info["chunk"] = lay.auto_chunk(B, L, L, dim, C * p * p)
        else:
            _, lay = window_blocks(gh, gw, w, tile)
            info["tile"] = tile
            info["max_union"] = max(m.numel() for m in lay.members)

        def forward():
            xp = pad_to_grid(x, p, s)
            emb = im2col(pad_to_grid(e_map, p, s), p, s)  # (B, E*p*p, L)
            feat = im2col(xp, p, s)  # (B, C*p*p, L)
            if kind == "indexed":  # the simple implementation: per-query gathers of the window
                layout = window_candidates(gh, gw, w, device=x.device)
                vol = neighbour_volumes(emb, emb, feat, temp, k, layout, impl=impl)
            else:  # the block's layout: tiles of queries against the union of their windows
                order, layout = window_blocks(gh, gw, w, tile, device=x.device)
                emb = emb[:, :, order]  # one tensor for queries and candidates, as in the block
                vol = neighbour_volumes(emb, emb, feat[:, :, order], temp, k, layout, impl=impl)
                vol = vol[..., torch.argsort(order)]
            imgs = col2im(vol.reshape(B * k, C * p * p, L), xp.shape[-2:], p, s)[..., :H, :W]
            return torch.cat([x, imgs.reshape(B, k * C, H, W)], dim=1)

    baseline = _maxrss_kib()

    def step():
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        forward().backward(g)
        return time.perf_counter() - t0

    return {**info, **_measure(step, spec["repeats"], baseline)}


def work_denoiser(spec: dict) -> dict:
    import torch

    from n3images.models import DnCNN, N3NetDenoiser

    c, variant = spec["config"], spec["variant"]
    width, height = spec["size"]
    torch.manual_seed(0)
    model = (N3NetDenoiser(channels=c["channels"]) if variant == "n3net" else DnCNN(channels=c["channels"])).eval()
    for m in model.modules():  # default running statistics (fresh models have them; made explicit)
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
        elif type(m).__name__ == "DistanceNorm":
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
    x = torch.rand(1, c["channels"], height, width)
    info = {"parameters": sum(q.numel() for q in model.parameters())}
    baseline = _maxrss_kib()

    def step():
        with torch.no_grad():
            t0 = time.perf_counter()
            model(x)
            return time.perf_counter() - t0

    return {**info, **_measure(step, spec["repeats"], baseline)}


def work_sr(spec: dict) -> dict:
    import numpy as np
    import torch

    from n3images.models import N3NetSR, VDSR
    from n3images.sr import bicubic_up

    c, variant, scale = spec["config"], spec["variant"], spec["scale"]
    width, height = c["output"]
    torch.manual_seed(0)
    model = (N3NetSR() if variant == "n3net-sr" else VDSR()).eval()
    for m in model.modules():  # default running statistics, as in work_denoiser
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
        elif type(m).__name__ == "DistanceNorm":
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
    lr = np.random.default_rng(0).random((height // scale, width // scale))
    info = {"parameters": sum(q.numel() for q in model.parameters()), "input": [width // scale, height // scale]}
    baseline = _maxrss_kib()

    def step():
        with torch.no_grad():
            t0 = time.perf_counter()
            x = torch.from_numpy(bicubic_up(lr, scale).astype(np.float32))[None, None]
            model(x)
            return time.perf_counter() - t0

    return {**info, **_measure(step, spec["repeats"], baseline)}


def _old_n3block_module(old_dir: str):
    # Legitimate sys.path use: the pre-engine n3sets is rebuilt from git (OLD_COMMIT) into a
    # temporary folder as the package OLD_PACKAGE; that folder must be importable in this process.
    if old_dir not in sys.path:
        sys.path.insert(0, old_dir)
    return importlib.import_module(f"{OLD_PACKAGE}.n3block")


def work_set(spec: dict) -> dict:
    import torch

    from n3sets.n3block import N3Block

    c, variant, impl, n = spec["config"], spec["variant"], spec["impl"], spec["n"]
    B, C, k = c["batch"], c["channels"], c["k"]
    torch.manual_seed(0)
    new = N3Block(C, k=k, impl=impl).train()
    if variant == "before":
        blk = _old_n3block_module(spec["old_dir"]).N3Block(C, k=k, impl=impl).train()
        blk.load_state_dict(new.state_dict())  # identical weights (strict: same parameter layout)
    else:
        blk = new
    x = torch.randn(B, C, n, requires_grad=True)
    g = torch.randn(B, (k + 1) * C, n)
    leaves = [x, *blk.parameters()]
    baseline = _maxrss_kib()

    def step():
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        blk(x).backward(g)
        return time.perf_counter() - t0

    out = _measure(step, spec["repeats"], baseline)
    if variant == "before":  # after the peak is read: the old and new outputs agree
        with torch.no_grad():
            out["max_abs_diff_vs_after"] = float((blk(x) - new(x)).abs().max())
    return out


WORKERS = {"block2d": work_block2d, "denoiser": work_denoiser, "set": work_set, "sr": work_sr}


def _child(spec: dict, conn) -> None:
    try:
        import torch

        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        res = WORKERS[spec["section"]](spec)
        res["threads"] = torch.get_num_threads()
        conn.send(res)
    except BaseException:  # reported as the configuration's error
        conn.send({"error": traceback.format_exc()[-2000:]})
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# orchestration (main process)


class Runner:
    """Runs one configuration per process, forked from a server that has imported torch and the project."""

    def __init__(self, threads: int, timeout: float):
        if threads:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[var] = str(threads)  # inherited by the fork server
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        self.timeout = timeout

    def __call__(self, spec: dict) -> dict:
        recv, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_child, args=(spec, send))
        proc.start()
        send.close()
        res = None
        try:
            if recv.poll(self.timeout):
                res = recv.recv()
        except EOFError:  # the process died without a word (e.g. killed for memory)
            pass
        finally:
            recv.close()
        proc.join(5 if res is not None else 0.1)
        if proc.is_alive():
            proc.kill()
            proc.join()
            if res is None:
                return {"error": f"timed out after {self.timeout:.0f} s"}
        if res is None:
            return {"error": f"process exited with code {proc.exitcode} and no result"}
        return res


def _ratio(num: dict, den: dict, key: str):
    a, b = num.get(key), den.get(key)
    if a is None or b is None or not b:
        return None
    return round(a / b, 3)


def _ratios(rows: dict, pairs) -> dict:
    out = {}
    for a, b in pairs:
        if "time_ms" in rows.get(a, {}) and "time_ms" in rows.get(b, {}):
            out[f"{a}/{b}"] = {"time": _ratio(rows[a], rows[b], "time_ms"),
                               "memory": _ratio(rows[a], rows[b], "peak_mib")}
    return out


def _log(label: str, row: dict) -> None:
    if "time_ms" in row:
        print(f"{label:44s} {row['time_ms']:10.1f} ms  peak {row['peak_mib']:8.1f} MiB", flush=True)
    else:
        print(f"{label:44s} {row.get('skipped') or 'error: ' + row.get('error', '?').strip().splitlines()[-1]}",
              flush=True)


def run_block2d(run, conf: dict, args) -> dict:
    rows = {}
    for variant in BLOCK2D_VARIANTS:
        if variant == "indexed_dense":
            est = indexed_dense_estimate_bytes(conf)
            if est > args.mem_cap_gib * GIB:
                rows[variant] = {"skipped": f"skipped: estimated {est / GIB:.1f} GiB > --mem-cap-gib {args.mem_cap_gib:g}"}
                _log(f"block2d {variant}", rows[variant])
                continue
        rows[variant] = run({"section": "block2d", "variant": variant, "config": conf, "repeats": args.repeats,
                             "threads": args.threads})
        _log(f"block2d {variant}", rows[variant])
    return {"config": conf, "rows": rows, "ratios": _ratios(rows, BLOCK2D_RATIOS),
            "notes": "indexed_* is the simple implementation (window_candidates -> IndexedCandidates, fixed "
                     "temperature, im2col/col2im, no CNNs); blocked_* the same with the block's layout "
                     "(window_blocks -> BlockedCandidates); n3block2d_* the whole block (embedding and temperature "
                     "CNNs, distance norm). Forward + backward, train mode."}


def run_denoiser(run, conf: dict, args) -> dict:
    rows, ratios = {}, {}
    for width, height in conf["sizes"]:
        size = f"{width}x{height}"
        rows[size] = {}
        for variant in ("dncnn", "n3net"):
            r = run({"section": "denoiser", "variant": variant, "size": [width, height], "config": conf,
                     "repeats": args.repeats, "threads": args.threads})
            rows[size][variant] = r
            _log(f"denoiser {variant} {size}", r)
        ratios[size] = _ratios(rows[size], [("n3net", "dncnn")]).get("n3net/dncnn")
        if ratios[size] is None:
            del ratios[size]
    return {"config": conf, "rows": rows, "ratios": ratios,
            "notes": "forward only, eval mode, torch.no_grad, batch 1, untrained weights; sizes are width x height"}


def run_sr(run, conf: dict, args) -> dict:
    rows, ratios = {}, {}
    width, height = conf["output"]
    for scale in conf["scales"]:
        key = f"x{scale}"
        if width % scale or height % scale:
            raise SystemExit(f"sr: output {width}x{height} is not a multiple of scale {scale}")
        rows[key] = {}
        for variant in ("vdsr", "n3net-sr"):
            r = run({"section": "sr", "variant": variant, "scale": scale, "config": conf, "repeats": args.repeats,
                     "threads": args.threads})
            rows[key][variant] = r
            _log(f"sr {variant} {key} -> {width}x{height}", r)
        rt = _ratios(rows[key], [("n3net-sr", "vdsr")]).get("n3net-sr/vdsr")
        if rt is not None:
            ratios[key] = rt
    return {"config": conf, "rows": rows, "ratios": ratios,
            "notes": f"bicubic upscaling (numpy float64) + forward, eval mode, torch.no_grad, batch 1, luma, output "
                     f"{width}x{height} (width x height); untrained weights"}


def extract_old_package(dest: Path) -> tuple[dict | None, str | None]:
    """``git show OLD_COMMIT:n3sets/<file>`` for n3block.py and its package imports, recursively.

    Returns ``(info, None)`` or ``(None, reason)``.
    """
    git = shutil.which("git")
    if git is None:
        return None, "git not found"

    def git_out(*cmd):
        return subprocess.run([git, "-C", str(ROOT), *cmd], capture_output=True, text=True)

    rev = git_out("rev-parse", "--verify", "--quiet", f"{OLD_COMMIT}^{{commit}}")
    if rev.returncode != 0:
        return None, f"commit {OLD_COMMIT} not found in {ROOT}"
    pkg = dest / OLD_PACKAGE
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f'"""n3sets at {OLD_COMMIT}, extracted by bench_n3_image.py (temporary)."""\n')
    todo, done = ["n3block"], []
    while todo:
        name = todo.pop()
        if name in done:
            continue
        show = git_out("show", f"{OLD_COMMIT}:n3sets/{name}.py")
        if show.returncode != 0:
            return None, f"git show {OLD_COMMIT}:n3sets/{name}.py failed: {show.stderr.strip()[-300:]}"
        text = show.stdout
        deps = re.findall(r"^\s*from\s+(?:\.|n3sets\.)(\w+)\s+import\b", text, flags=re.M)
        # absolute imports of the package would reach the current code: point them at the copy
        text = re.sub(r"^(\s*from\s+)n3sets(\.\w+)?(\s+import\b)", rf"\g<1>{OLD_PACKAGE}\g<2>\g<3>", text, flags=re.M)
        (pkg / f"{name}.py").write_text(text)
        done.append(name)
        todo += [d for d in deps if d not in done]
    return {"commit": rev.stdout.strip(), "files": sorted(f"n3sets/{n}.py" for n in done)}, None


def run_set(run, conf: dict, args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench_n3_image_"))
    try:
        info, reason = extract_old_package(tmp)
        if info is None:
            note = f"skipped: {reason} (the pre-refactor code is taken from git at run time)"
            print(f"set block: {note}", flush=True)
            return {"config": conf, "skipped": note}
        rows, ratios = {}, {}
        for n in conf["sizes"]:
            for impl in ("dense", "chunked"):
                key = f"N={n} {impl}"
                rows[key] = {}
                for variant in ("before", "after"):
                    if impl == "dense":
                        est = dense_estimate_bytes(conf["batch"], n, conf["k"])
                        if est > args.mem_cap_gib * GIB:
                            r = {"skipped": f"skipped: estimated {est / GIB:.1f} GiB > --mem-cap-gib {args.mem_cap_gib:g}"}
                            rows[key][variant] = r
                            _log(f"set {variant} {key}", r)
                            continue
                    r = run({"section": "set", "variant": variant, "impl": impl, "n": n, "config": conf,
                             "old_dir": str(tmp), "repeats": args.repeats, "threads": args.threads})
                    rows[key][variant] = r
                    _log(f"set {variant} {key}", r)
                rt = _ratios(rows[key], [("after", "before")]).get("after/before")
                if rt is not None:
                    ratios[key] = rt
        return {"config": conf, "old_code": info, "rows": rows, "ratios": ratios,
                "notes": f"n3sets.N3Block forward + backward, train mode; before = commit {OLD_COMMIT} (extracted "
                         "from git at run time, same weights and inputs), after = the working tree; ratios after/before"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# tables


def _cell(r: dict, key: str, fmt: str) -> str:
    if not r:
        return "-"
    if "skipped" in r:
        return "skipped"
    if "error" in r:
        return "error"
    return fmt.format(r[key])


def _rcell(rt: dict | None, key: str) -> str:
    v = (rt or {}).get(key)
    return "-" if v is None else f"{v:.2f}"


def tables(results: dict) -> str:
    parts = []
    if "block2d" in results:
        sec = results["block2d"]
        c = sec["config"]
        parts.append(f"N3Block2d forward+backward, batch {c['batch']}, {c['width']}x{c['height']}, {c['channels']} "
                     f"channels, k={c['k']}, p={c['patch_size']}, s={c['stride']}, w={c['window']}")
        parts.append("| variant | time (ms) | peak (MiB) |\n|---|---:|---:|")
        parts[-1] += "".join(f"\n| {v} | {_cell(r, 'time_ms', '{:.1f}')} | {_cell(r, 'peak_mib', '{:.1f}')} |"
                             for v, r in sec["rows"].items())
        parts.append("| ratio | time | memory |\n|---|---:|---:|")
        parts[-1] += "".join(f"\n| {name} | {_rcell(rt, 'time')} | {_rcell(rt, 'memory')} |"
                             for name, rt in sec["ratios"].items())
    if "denoiser" in results:
        sec = results["denoiser"]
        parts.append("Denoiser forward (eval, no_grad, batch 1, grey)")
        lines = ["| size (WxH) | DnCNN-17 ms | DnCNN-17 MiB | N3Net ms | N3Net MiB | time N3Net/DnCNN | mem N3Net/DnCNN |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for size, rows in sec["rows"].items():
            d, n, rt = rows.get("dncnn", {}), rows.get("n3net", {}), sec["ratios"].get(size)
            lines.append(f"| {size} | {_cell(d, 'time_ms', '{:.1f}')} | {_cell(d, 'peak_mib', '{:.1f}')} | "
                         f"{_cell(n, 'time_ms', '{:.1f}')} | {_cell(n, 'peak_mib', '{:.1f}')} | "
                         f"{_rcell(rt, 'time')} | {_rcell(rt, 'memory')} |")
        parts.append("\n".join(lines))
    if "set" in results:
        sec = results["set"]
        c = sec["config"]
        parts.append(f"Set N3Block forward+backward, B={c['batch']}, C={c['channels']}, k={c['k']}: "
                     f"before ({OLD_COMMIT}) vs after the engine refactor")
        if "skipped" in sec:
            parts.append(sec["skipped"])
        else:
            lines = ["| config | before ms | before MiB | after ms | after MiB | time after/before | mem after/before |",
                     "|---|---:|---:|---:|---:|---:|---:|"]
            for key, rows in sec["rows"].items():
                b, a, rt = rows.get("before", {}), rows.get("after", {}), sec["ratios"].get(key)
                lines.append(f"| {key} | {_cell(b, 'time_ms', '{:.1f}')} | {_cell(b, 'peak_mib', '{:.1f}')} | "
                             f"{_cell(a, 'time_ms', '{:.1f}')} | {_cell(a, 'peak_mib', '{:.1f}')} | "
                             f"{_rcell(rt, 'time')} | {_rcell(rt, 'memory')} |")
            parts.append("\n".join(lines))
    if "sr" in results:
        sec = results["sr"]
        w, h = sec["config"]["output"]
        parts.append(f"Super-resolution to {w}x{h} (bicubic + forward, eval, no_grad, batch 1, luma)")
        lines = ["| scale | VDSR ms | VDSR MiB | N3Net-SR ms | N3Net-SR MiB | time N3Net-SR/VDSR | mem N3Net-SR/VDSR |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for key, rows in sec["rows"].items():
            v, n, rt = rows.get("vdsr", {}), rows.get("n3net-sr", {}), sec["ratios"].get(key)
            lines.append(f"| {key} | {_cell(v, 'time_ms', '{:.1f}')} | {_cell(v, 'peak_mib', '{:.1f}')} | "
                         f"{_cell(n, 'time_ms', '{:.1f}')} | {_cell(n, 'peak_mib', '{:.1f}')} | "
                         f"{_rcell(rt, 'time')} | {_rcell(rt, 'memory')} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--json", required=True, help="write the report here")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per configuration (0: torch default)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per configuration (after one warm-up)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (tests); the figures mean nothing")
    ap.add_argument("--sections", nargs="+", choices=ALL_SECTIONS, default=list(SECTIONS),
                    help="sr (VDSR vs N3Net-SR) runs only when named")
    ap.add_argument("--mem-cap-gib", type=float, default=12.0, help="skip dense paths whose estimated peak exceeds this")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.threads < 0 or args.mem_cap_gib <= 0 or args.timeout <= 0:
        ap.error("--repeats must be >= 1, --threads >= 0, --mem-cap-gib and --timeout > 0")

    confs = CONFIGS["quick" if args.quick else "full"]
    run = Runner(args.threads, args.timeout)
    report = {
        "settings": {"threads": args.threads, "repeats": args.repeats, "quick": args.quick,
                     "sections": args.sections, "mem_cap_gib": args.mem_cap_gib, "timeout_s": args.timeout,
                     "old_commit": OLD_COMMIT, "indexed_dense_factor": INDEXED_DENSE_FACTOR,
                     "units": {"time": "ms (median)", "memory": "MiB (peak RSS over the post-setup baseline)"}},
        "machine": machine_info(args.threads),
        "results": {},
    }
    runners = {"block2d": run_block2d, "denoiser": run_denoiser, "set": run_set, "sr": run_sr}
    for section in ALL_SECTIONS:
        if section in args.sections:
            report["results"][section] = runners[section](run, confs[section], args)
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    report["table_markdown"] = tables(report["results"])
    print(report["table_markdown"])
    write_json(args.json, report, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
