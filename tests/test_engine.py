"""Tests of the N3 engine (n3sets.engine.neighbour_volumes) and its candidate layouts.

The shipped correspondence models must give bit-identical logits to the code before the engine
refactor; the Indexed and Blocked layouts must agree with the Global one (and each other) in
values and gradients; dense and chunked paths must agree; the hard relaxation must be brute-force
KNN over the allowed candidates.
"""
from pathlib import Path

import pytest
import torch

from n3images.patches import window_blocks, window_candidates
from n3sets.engine import BlockedCandidates, GlobalCandidates, IndexedCandidates, neighbour_volumes

REF = Path(__file__).resolve().parent / "data" / "shipped_logits_ref.pt"
DT = torch.float64


def _inputs(B, E, F, Q, N, seed=0, same=False):
    gen = torch.Generator().manual_seed(seed)
    cand = torch.randn(B, E, N, generator=gen, dtype=DT)
    query = cand if same else torch.randn(B, E, Q, generator=gen, dtype=DT)
    feat = torch.randn(B, F, N, generator=gen, dtype=DT)
    temp = torch.rand(B, Q, generator=gen, dtype=DT) * 1.5 + 0.3
    return query, cand, feat, temp


def _run(query, cand, feat, temp, k, layout, same=False, perm=None, **kw):
    """Volumes and gradients (query, cand, feat, temp) for a fixed random output gradient.

    ``perm``: the layout's item order; inputs are permuted into it and the volumes back to the
    order of the given tensors, so that results of differently ordered layouts compare directly.
    """
    leaves = [t.detach().clone().requires_grad_() for t in ((query,) if same else (query, cand)) + (feat, temp)]
    if same:
        q = c = leaves[0]
        f, t = leaves[1:]
    else:
        q, c, f, t = leaves
    if perm is not None:
        q_, f_, t_ = q[..., perm], f[..., perm], t[:, perm]
        c_ = q_ if same else c[..., perm]
    else:
        q_, c_, f_, t_ = q, c, f, t
    vol = neighbour_volumes(q_, c_, f_, t_, k, layout, **kw)
    if perm is not None:
        vol = vol[..., torch.argsort(perm)]
    g = torch.randn(vol.shape, generator=torch.Generator().manual_seed(123), dtype=vol.dtype)
    (vol * g).sum().backward()
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]
    if same:  # report the one embedding's gradient for both query and cand
        grads = [grads[0], grads[0]] + grads[1:]
    return vol.detach(), grads


def _assert_same(a, b, atol=1e-10):
    va, ga = a
    vb, gb = b
    torch.testing.assert_close(va, vb, rtol=0, atol=atol)
    for name, x, y in zip(("query", "cand", "feat", "temp"), ga, gb):
        torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=lambda m, n=name: f"grad {n}: {m}")


def _all_others(N):
    """IndexedCandidates of every other item: index (N, N - 1), j != q in increasing order."""
    idx = torch.tensor([[j for j in range(N) if j != q] for q in range(N)], dtype=torch.long)
    return IndexedCandidates(idx, torch.ones(N, N - 1, dtype=torch.bool))


# ----------------------------------------------------------------------------- shipped models


def _ref():
    return torch.load(REF, weights_only=True)


# The last commit before the engine refactor. The reference logits are recomputed from its
# n3sets (git archive) on this machine and thread count: float32 GEMMs and convolutions round
# differently with another thread count or instruction set, so a stored file (made with 2
# threads, the fallback without git) would not be a fair bit-for-bit reference everywhere.
PRE_REFACTOR = "a9d5a60"
_OLD_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from n3sets.pretrained import load_model
ref = torch.load(sys.argv[1], weights_only=True)
out = {}
for name, r in ref.items():
    m = load_model(name).eval()
    o = {}
    with torch.no_grad():
        o["logits"] = m(r["x"], r["mask"])
        if hasattr(m, "n3"):
            for blk in [m.n3] + ([m.refine_stage.n3] if m.refine_stage is not None else []):
                blk.conf["impl"], blk.conf["chunk_size"] = "chunked", 97
            o["logits_chunked"] = m(r["x"], r["mask"])
    out[name] = o
torch.save(out, sys.argv[2])
"""


@pytest.fixture(scope="module")
def pre_refactor(tmp_path_factory):
    """(reference logits per model, thread count to compare at)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    tmp = tmp_path_factory.mktemp("pre_refactor")
    try:
        archive = subprocess.run(["git", "-C", str(root), "archive", PRE_REFACTOR, "n3sets"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError):
        stored = _ref()
        return {n: {k: v for k, v in r.items() if k.startswith("logits")} for n, r in stored.items()}, 2
    out = tmp / "old_logits.pt"
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", _OLD_SCRIPT, str(REF), str(out)], check=True, env=env, cwd=tmp)
    return torch.load(out, weights_only=True), 1


@pytest.mark.parametrize("name", sorted(_ref()))
def test_shipped_models_bit_identical_to_pre_refactor_logits(name, pre_refactor):
    from n3sets.pretrained import load_model

    reference, threads = pre_refactor
    ref, expected = _ref()[name], reference[name]
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = load_model(name).eval()
        with torch.no_grad():
            logits = model(ref["x"], ref["mask"])
        assert logits.dtype == expected["logits"].dtype and torch.equal(logits, expected["logits"])
        if "logits_chunked" in expected:
            blocks = [model.n3] + ([model.refine_stage.n3] if model.refine_stage is not None else [])
            for blk in blocks:
                blk.conf["impl"], blk.conf["chunk_size"] = "chunked", 97
            with torch.no_grad():
                chunked = model(ref["x"], ref["mask"])
            assert torch.equal(chunked, expected["logits_chunked"])
        else:
            assert not hasattr(model, "n3")
    finally:
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------- layouts agree


@pytest.mark.parametrize("same", [True, False])
def test_indexed_all_others_equals_global(same):
    B, E, F, N, k = 2, 3, 4, 11, 3
    q, c, f, t = _inputs(B, E, F, N, N, seed=1, same=same)
    ref = _run(q, c, f, t, k, GlobalCandidates(), same=same, impl="dense")
    layout = _all_others(N)
    _assert_same(_run(q, c, f, t, k, layout, same=same, impl="dense"), ref)
    for chunk in (1, 4, N, 50):
        _assert_same(_run(q, c, f, t, k, layout, same=same, impl="chunked", chunk_size=chunk), ref)
        _assert_same(_run(q, c, f, t, k, GlobalCandidates(), same=same, impl="chunked", chunk_size=chunk), ref)
    assert ref[1][3].abs().sum() > 0 and ref[1][0].abs().sum() > 0  # gradients really flow


def test_indexed_with_invalid_items_equals_global_with_valid_mask():
    # the same validity for every batch element: item 3 and 8 are padding
    B, E, F, N, k = 2, 3, 2, 10, 4
    q, c, f, t = _inputs(B, E, F, N, N, seed=2, same=True)
    valid_items = torch.ones(N, dtype=torch.bool)
    valid_items[[3, 8]] = False
    glob = GlobalCandidates(valid_items.expand(B, N).clone())
    base = _all_others(N)
    indexed = IndexedCandidates(base.index, valid_items[base.index])
    ref = _run(q, c, f, t, k, glob, same=True, impl="dense")
    for kw in ({"impl": "dense"}, {"impl": "chunked", "chunk_size": 3}):
        _assert_same(_run(q, c, f, t, k, indexed, same=True, **kw), ref)
    # padded items never contribute: their features get no gradient
    assert torch.all(ref[1][2][..., [3, 8]] == 0)


GRIDS = [(3, 4, 5), (2, 2, 5), (9, 7, 5), (8, 10, 4), (6, 6, 3)]  # (gh, gw, window): smaller and larger than w


@pytest.mark.parametrize("gh,gw,window", GRIDS)
@pytest.mark.parametrize("tile", [1, 3, 8])
def test_blocked_window_equals_indexed_window(gh, gw, window, tile):
    B, E, F, k = 2, 3, 2, 4  # (2, 2, 5): 3 candidates, the last volume is empty (all zero)
    L = gh * gw
    q, c, f, t = _inputs(B, E, F, L, L, seed=gh * 31 + gw, same=True)
    ref = _run(q, c, f, t, k, window_candidates(gh, gw, window), same=True, impl="dense")
    order, blocked = window_blocks(gh, gw, window, tile)
    assert sorted(order.tolist()) == list(range(L))
    assert len(blocked.starts) == -(-gh // tile) * -(-gw // tile) + 1
    for kw in ({"impl": "dense"}, {"impl": "chunked"}):
        _assert_same(_run(q, c, f, t, k, blocked, same=True, perm=order, **kw), ref)
    # and with separate query / candidate tensors
    q2, c2, f2, t2 = _inputs(B, E, F, L, L, seed=5)
    ref2 = _run(q2, c2, f2, t2, k, window_candidates(gh, gw, window), impl="dense")
    _assert_same(_run(q2, c2, f2, t2, k, blocked, perm=order, impl="chunked"), ref2)


def test_blocked_mask_matches_window_candidates_exactly():
    gh, gw, window, tile = 7, 9, 5, 3
    idx_layout = window_candidates(gh, gw, window)
    order, blocked = window_blocks(gh, gw, window, tile)
    expected = {q: {int(i) for i, v in zip(idx_layout.index[q], idx_layout.valid[q]) if v} for q in range(gh * gw)}
    got = {}
    for b, (s, e) in enumerate(zip(blocked.starts[:-1], blocked.starts[1:])):
        members = blocked.members[b]
        for r in range(e - s):
            got[int(order[s + r])] = {int(order[members[u]]) for u in range(members.numel()) if blocked.masks[b][r, u]}
    assert got == expected


# ----------------------------------------------------------------------------- dense vs chunked, gradcheck


def test_dense_equals_chunked_indexed():
    B, E, F, Q, N, O, k = 2, 3, 4, 13, 9, 6, 4
    q, c, f, t = _inputs(B, E, F, Q, N, seed=3)
    gen = torch.Generator().manual_seed(4)
    index = torch.randint(0, N, (Q, O), generator=gen)
    valid = torch.rand(Q, O, generator=gen) > 0.3
    valid[0] = False  # no candidates: all-zero volumes
    valid[1] = False
    valid[1, 2] = True  # one candidate
    layout = IndexedCandidates(index, valid)
    ref = _run(q, c, f, t, k, layout, impl="dense")
    assert torch.all(ref[0][:, :, :, 0] == 0) and torch.all(ref[0][:, 1:, :, 1] == 0)
    torch.testing.assert_close(ref[0][:, 0, :, 1], f[:, :, index[1, 2]], rtol=0, atol=0)
    for chunk in (1, 2, 5, Q, 100):
        _assert_same(_run(q, c, f, t, k, layout, impl="chunked", chunk_size=chunk), ref, atol=1e-12)
    assert all(torch.isfinite(g).all() for g in ref[1])


def test_dense_equals_chunked_blocked():
    gh, gw, window, tile = 7, 6, 4, 3
    L = gh * gw
    q, c, f, t = _inputs(2, 3, 2, L, L, seed=6)
    order, layout = window_blocks(gh, gw, window, tile)
    dense = _run(q, c, f, t, 5, layout, impl="dense")
    chunked = _run(q, c, f, t, 5, layout, impl="chunked")
    assert torch.equal(dense[0], chunked[0])  # the same per-block code in the forward
    _assert_same(chunked, dense, atol=1e-12)


def test_gradcheck_chunked_indexed():
    B, E, F, Q, N, k = 1, 2, 2, 4, 5, 2
    q, c, f, t = _inputs(B, E, F, Q, N, seed=7)
    index = torch.tensor([[1, 2, 3], [0, 4, 2], [3, 3, 1], [4, 0, 1]])
    valid = torch.tensor([[True, True, True], [True, False, True], [True, False, False], [True, True, True]])
    layout = IndexedCandidates(index, valid)
    args = tuple(x.clone().requires_grad_() for x in (q, c, f, t))

    def fn(q, c, f, t):
        return neighbour_volumes(q, c, f, t, k, layout, impl="chunked", chunk_size=3)

    assert torch.autograd.gradcheck(fn, args)


def test_gradcheck_chunked_blocked():
    gh, gw, window, tile = 3, 3, 2, 2
    L = gh * gw
    q, c, f, t = _inputs(1, 2, 2, L, L, seed=8)
    _, layout = window_blocks(gh, gw, window, tile)
    args = tuple(x.clone().requires_grad_() for x in (q, c, f, t))

    def fn(q, c, f, t):
        return neighbour_volumes(q, c, f, t, 2, layout, impl="chunked")

    assert torch.autograd.gradcheck(fn, args)


def test_blocked_groups_equal_blocks_and_matches_indexed():
    """Consecutive equal-shape blocks run as one batched group; values and gradients are unchanged."""
    gh, gw, window, tile = 20, 17, 5, 3
    L = gh * gw
    q, c, f, t = _inputs(2, 3, 2, L, L, seed=11, same=True)
    ref = _run(q, c, f, t, 4, window_candidates(gh, gw, window), same=True, impl="dense")
    order, layout = window_blocks(gh, gw, window, tile)
    blocks = len(layout.starts) - 1
    assert len(layout.chunks(L, None)) <= blocks // 2  # runs of equal interior tiles grouped
    assert len(layout.chunks(L, 9)) == blocks  # at most 9 queries per chunk: one block of 3x3 each
    for kw in ({"impl": "dense"}, {"impl": "chunked"}, {"impl": "chunked", "chunk_size": 9},
               {"impl": "chunked", "chunk_size": 40}, {"impl": "chunked", "chunk_size": 10_000}):
        _assert_same(_run(q, c, f, t, 4, layout, same=True, perm=order, **kw), ref)


def test_gradcheck_grouped_blocks():
    gh, gw, window, tile = 3, 3, 2, 1  # nine one-patch blocks with four candidates each: one group
    L = gh * gw
    q, c, f, t = _inputs(1, 2, 2, L, L, seed=12)
    _, layout = window_blocks(gh, gw, window, tile)
    assert len(layout.chunks(L, None)) == 1
    args = tuple(x.clone().requires_grad_() for x in (q, c, f, t))

    def fn(q, c, f, t):
        return neighbour_volumes(q, c, f, t, 2, layout, impl="chunked", chunk_size=L)

    assert torch.autograd.gradcheck(fn, args)


# ----------------------------------------------------------------------------- hard relaxation


def _brute_hard(query, cand, feat, k, allowed):
    """Volumes (B, k, F, Q) of the k nearest allowed candidates: plain Python, ties by candidate order.

    ``allowed(b, q)`` lists the candidate items of query q, in tie-break order.
    """
    B, F, Q = query.shape[0], feat.shape[1], query.shape[-1]
    ql, cl = query.tolist(), cand.tolist()
    out = torch.zeros(B, k, F, Q, dtype=feat.dtype)
    for b in range(B):
        for qi in range(Q):
            scored = []
            for rank, n in enumerate(allowed(b, qi)):
                d = sum((ql[b][e][qi] - cl[b][e][n]) ** 2 for e in range(len(ql[b])))
                scored.append((d, rank, n))
            for j, (_, _, n) in enumerate(sorted(scored)[:k]):
                out[b, j, :, qi] = feat[b, :, n]
    return out


def test_hard_indexed_is_brute_force_knn_and_skips_invalid_slots():
    B, E, F, Q, N, O, k = 2, 3, 2, 7, 8, 5, 3
    q, c, f, t = _inputs(B, E, F, Q, N, seed=9)
    gen = torch.Generator().manual_seed(10)
    index = torch.randint(0, N, (Q, O), generator=gen)
    valid = torch.rand(Q, O, generator=gen) > 0.35
    valid[0] = False  # no candidate at all
    valid[1] = False
    valid[1, :2] = True  # two candidates: volume 3 is zero
    valid[2] = True
    # invalid slots point at a candidate identical to the query (distance 0: nearest if not masked)
    index[3, 0], valid[3, 0] = 7, False
    c[:, :, 7] = q[:, :, 3]
    layout = IndexedCandidates(index, valid)
    expected = _brute_hard(q, c, f, k, lambda b, qi: [int(index[qi, o]) for o in range(O) if valid[qi, o]])
    for kw in ({"impl": "dense"}, {"impl": "chunked", "chunk_size": 2}):
        vol = neighbour_volumes(q, c, f, t, k, layout, relaxation="hard", **kw)
        assert torch.equal(vol, expected)
        # the temperature is ignored (may even be None)
        assert torch.equal(neighbour_volumes(q, c, f, None, k, layout, relaxation="hard", **kw), expected)
    assert torch.all(expected[:, :, :, 0] == 0) and torch.all(expected[:, 2, :, 1] == 0)
    assert not torch.equal(expected[:, 0, :, 3], f[:, :, 7])


def test_hard_global_with_padding_is_brute_force_knn():
    B, E, F, N, k = 2, 2, 3, 9, 4
    q, _, f, _ = _inputs(B, E, F, N, N, seed=11, same=True)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, 4:] = False  # set 1 has 4 items: 3 candidates each, volume 4 empty
    q[1, :, 6] = q[1, :, 0]  # a padded item at distance 0 from item 0
    expected = _brute_hard(q, q, f, k, lambda b, qi: [n for n in range(N) if n != qi and valid[b, n]])
    for kw in ({"impl": "dense"}, {"impl": "chunked", "chunk_size": 4}):
        vol = neighbour_volumes(q, q, f, None, k, GlobalCandidates(valid), relaxation="hard", **kw)
        assert torch.equal(vol, expected)  # padded queries too: their candidates are the valid items
    assert torch.all(expected[1, 3, :, :4] == 0)


def test_hard_blocked_is_brute_force_knn():
    gh, gw, window, tile, k = 5, 6, 3, 2, 9  # k > 8 candidates: the last volume is empty
    L = gh * gw
    q, _, f, _ = _inputs(1, 2, 2, L, L, seed=12, same=True)
    idx = window_candidates(gh, gw, window)
    expected = _brute_hard(q, q, f, k, lambda b, qi: [int(i) for i, v in zip(idx.index[qi], idx.valid[qi]) if v])
    order, layout = window_blocks(gh, gw, window, tile)
    for impl in ("dense", "chunked"):
        vol = neighbour_volumes(q[..., order], q[..., order], f[..., order], None, k, layout, impl=impl,
                                relaxation="hard")
        assert torch.equal(vol[..., torch.argsort(order)], expected)
    assert torch.all(expected[:, 8] == 0) and torch.all(expected[:, 7] != 0)


def test_hard_gradient_reaches_features_only():
    q, c, f, _ = _inputs(1, 2, 3, 6, 7, seed=13)
    index = torch.randint(0, 7, (6, 4), generator=torch.Generator().manual_seed(0))
    layout = IndexedCandidates(index, torch.ones(6, 4, dtype=torch.bool))
    grads = []
    for impl in ("dense", "chunked"):
        qq, cc, ff = (x.clone().requires_grad_() for x in (q, c, f))
        vol = neighbour_volumes(qq, cc, ff, None, 2, layout, impl=impl, chunk_size=4, relaxation="hard")
        vol.sum().backward()
        assert qq.grad is None or torch.all(qq.grad == 0)
        assert cc.grad is None or torch.all(cc.grad == 0)
        grads.append(ff.grad)
    # each selected slot adds 1 to its item's feature gradient: the gradient counts the selections
    assert torch.equal(grads[0], grads[1])
    assert grads[0].sum() == 6 * 2 * 3


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_shape():
    q, c, f, t = _inputs(2, 3, 4, 5, 6)
    layout = IndexedCandidates(torch.zeros(5, 2, dtype=torch.long), torch.ones(5, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"temperature must have shape \(B, Q\) = \(2, 5\), got \(2, 6\)"):
        neighbour_volumes(q, c, f, torch.ones(2, 6, dtype=DT), 2, layout)
    with pytest.raises(ValueError, match=r"temperature.*got None"):
        neighbour_volumes(q, c, f, None, 2, layout)
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        neighbour_volumes(q[0], c, f, t, 2, layout)
    with pytest.raises(ValueError, match=r"feat \(2, 4, 7\)"):
        neighbour_volumes(q, c, torch.zeros(2, 4, 7, dtype=DT), t, 2, layout)
    with pytest.raises(ValueError, match=r"cand \(2, 2, 6\)"):
        neighbour_volumes(q, c[:, :2], f, t, 2, layout)
    bad = IndexedCandidates(torch.full((5, 2), 6, dtype=torch.long), torch.ones(5, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[0, N=6\)"):
        neighbour_volumes(q, c, f, t, 2, bad)
    with pytest.raises(ValueError, match=r"\[0, N=6\)"):
        neighbour_volumes(q, c, f, t, 2, IndexedCandidates(torch.full((5, 2), -1, dtype=torch.long),
                                                           torch.ones(5, 2, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"4 rows for Q=5"):
        neighbour_volumes(q, c, f, t, 2, IndexedCandidates(torch.zeros(4, 2, dtype=torch.long),
                                                           torch.ones(4, 2, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"valid must be bool of shape \(5, 2\), got torch.bool \(5, 3\)"):
        IndexedCandidates(torch.zeros(5, 2, dtype=torch.long), torch.ones(5, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        IndexedCandidates(torch.zeros(5, 2, dtype=torch.int32), torch.ones(5, 2, dtype=torch.bool))
    # GlobalCandidates: mismatched valid mask, Q != N
    qg, _, fg, tg = _inputs(2, 3, 4, 6, 6, same=True)
    with pytest.raises(ValueError, match=r"valid must have shape \(B, N\) = \(2, 6\), got \(2, 5\)"):
        neighbour_volumes(qg, qg, fg, tg, 2, GlobalCandidates(torch.ones(2, 5, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"Q=5 and N=6"):
        neighbour_volumes(q, c, f, t, 2, GlobalCandidates())
    # BlockedCandidates: mask shape, coverage, members out of range
    with pytest.raises(ValueError, match=r"masks\[0\] must be bool of shape \(6, 3\), got torch.bool \(6, 2\)"):
        BlockedCandidates([0, 6], [torch.arange(3)], [torch.ones(6, 2, dtype=torch.bool)])
    with pytest.raises(ValueError, match=r"cover 4 queries, got Q=6"):
        neighbour_volumes(qg, qg, fg, tg, 2, BlockedCandidates([0, 4], [torch.arange(3)], [torch.ones(4, 3, dtype=torch.bool)]))
    with pytest.raises(ValueError, match=r"\[0, N=6\)"):
        neighbour_volumes(qg, qg, fg, tg, 2, BlockedCandidates([0, 6], [torch.tensor([0, 6])], [torch.ones(6, 2, dtype=torch.bool)]))
    with pytest.raises(ValueError, match="impl"):
        neighbour_volumes(q, c, f, t, 2, layout, impl="fast")
    with pytest.raises(ValueError, match="relaxation"):
        neighbour_volumes(q, c, f, t, 2, layout, relaxation="soft")
    with pytest.raises(ValueError, match="k must be a positive int"):
        neighbour_volumes(q, c, f, t, 0, layout)
