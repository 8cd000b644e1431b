"""Tests of the set N3 block: dense vs chunked paths, masks/padding, equivariance, torch-geometric input."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from n3sets.batching import to_dense_sets, to_flat_sets
from n3sets.knn import hard_knn
from n3sets.n3block import HardKNNBlock, N3Block, n3_aggregate


def make_block(C=6, k=3, **kw):
    torch.manual_seed(0)
    blk = N3Block(C, k=k, embed_channels=5, embed_hidden=8, temp_hidden=8, init_temperature=0.5, **kw).double()
    # a non-constant temperature head, so per-item temperatures are exercised
    torch.nn.init.normal_(blk.temperature[-1].weight, std=0.3) if blk.temperature is not None else None
    return blk


def run(blk, x, mask, impl, chunk_size=None, seed=1):
    """Output and gradients w.r.t. x and every parameter for a fixed random output gradient."""
    blk.conf["impl"], blk.conf["chunk_size"] = impl, chunk_size
    blk.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = blk(x, mask)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    (y * g).sum().backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in blk.named_parameters()}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("relaxation", ["continuous", "hard"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_dense_and_chunked_agree_in_values_and_gradients(relaxation, masked, train):
    blk = make_block(relaxation=relaxation)
    blk.train(train)
    x = torch.randn(2, 6, 17, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.ones(2, 17, dtype=torch.bool)
        mask[1, 11:] = False
    yd, gxd, gpd = run(blk, x, mask, "dense")
    for chunk in (1, 5, 17, 100):
        yc, gxc, gpc = run(blk, x, mask, "chunked", chunk)
        torch.testing.assert_close(yc, yd)
        torch.testing.assert_close(gxc, gxd)
        for name in gpd:
            torch.testing.assert_close(gpc[name], gpd[name], msg=name)
    if relaxation == "continuous":
        assert gpd["temperature.0.weight"].abs().sum() > 0 and gpd["embed.0.weight"].abs().sum() > 0


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_gradcheck_aggregation_paths(impl):
    gen = torch.Generator().manual_seed(0)
    B, C, E, N = 2, 2, 3, 6
    x = torch.randn(B, C, N, generator=gen, dtype=torch.float64, requires_grad=True)
    emb = torch.randn(B, E, N, generator=gen, dtype=torch.float64, requires_grad=True)
    temp = (torch.rand(B, N, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 4:] = False

    def f(x, emb, temp):
        return n3_aggregate(x, emb, temp, 3, mask, impl=impl, chunk_size=4)

    assert torch.autograd.gradcheck(f, (x, emb, temp))


def test_output_layout_and_hard_limit():
    blk = make_block(k=2).eval()
    x = torch.randn(2, 6, 9, dtype=torch.float64)
    y = blk(x)
    assert y.shape == (2, 3 * 6, 9)
    torch.testing.assert_close(y[:, :6], x)
    # volumes aggregate the block input x: with a tiny temperature they are x at the hard KNN of
    # the embedding distances (brute force: sort each row, self excluded)
    blk.conf["min_temperature"] = 1e-6
    with torch.no_grad():
        blk.temperature[-1].weight.zero_()
        blk.temperature[-1].bias.fill_(-20.0)
        y = blk(x)
        emb = blk.embedding(x)
    d = torch.cdist(emb.transpose(1, 2), emb.transpose(1, 2))
    d = d + torch.diag_embed(torch.full((2, 9), float("inf"), dtype=d.dtype))
    order = d.argsort(-1)  # (B, N, N)
    for j in range(2):
        expected = torch.gather(x, 2, order[:, :, j].unsqueeze(1).expand(-1, 6, -1))
        torch.testing.assert_close(y[:, 6 * (j + 1): 6 * (j + 2)], expected)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=3), impl=st.sampled_from(["dense", "chunked"]),
       seed=st.integers(0, 1000))
def test_padded_batch_equals_sets_one_by_one(sizes, impl, seed):
    blk = make_block(k=3, impl=impl, chunk_size=4).eval()
    gen = torch.Generator().manual_seed(seed)
    sets = [torch.randn(6, n, generator=gen, dtype=torch.float64) for n in sizes]
    N = max(sizes)
    x = torch.full((len(sets), 6, N), float("nan"), dtype=torch.float64)  # padding holds garbage
    mask = torch.zeros(len(sets), N, dtype=torch.bool)
    for b, s in enumerate(sets):
        x[b, :, : s.shape[1]] = s
        mask[b, : s.shape[1]] = True
    x.requires_grad_()
    y = blk(x, mask)
    y[mask.unsqueeze(1).expand_as(y)].sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    for b, s in enumerate(sets):
        s = s.clone().requires_grad_()
        ys = blk(s.unsqueeze(0))
        ys.sum().backward()
        torch.testing.assert_close(y[b, :, : s.shape[1]], ys[0].detach())
        torch.testing.assert_close(x.grad[b, :, : s.shape[1]], s.grad)
        if s.shape[1] - 1 < 3:  # fewer candidates than neighbours: those volumes are zero
            assert torch.all(ys[0, 6 * s.shape[1]:] == 0)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_permutation_equivariance(impl):
    blk = make_block(impl=impl, chunk_size=3).eval()
    x = torch.randn(2, 6, 11, dtype=torch.float64)
    perm = torch.randperm(11)
    y = blk(x)
    torch.testing.assert_close(blk(x[:, :, perm]), y[:, :, perm])


def test_hard_block_gradient_reaches_features_only():
    blk = HardKNNBlock(4, k=2, embed_channels=3, embed_hidden=5).double()
    assert blk.temperature is None and blk.conf["relaxation"] == "hard"
    x = torch.randn(1, 4, 7, dtype=torch.float64, requires_grad=True)
    for impl in ("dense", "chunked"):
        blk.conf["impl"] = impl
        x.grad = None
        blk.zero_grad()
        y = blk(x)
        y[:, 4:].sum().backward()
        assert x.grad.abs().sum() > 0
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in blk.parameters())
    # its volumes are x at hard_knn of the embedding distances
    with torch.no_grad():
        emb = blk.embedding(x)
        d = torch.cdist(emb.transpose(1, 2), emb.transpose(1, 2)) ** 2
        W = hard_knn(d, 2, ~torch.eye(7, dtype=torch.bool).unsqueeze(0))
        torch.testing.assert_close(blk(x)[:, 4:].reshape(1, 2, 4, 7), torch.einsum("bjmo,bco->bjcm", W, x))


def test_edge_cases_finite():
    blk = make_block(k=4, norm="none")
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    x[0] = 0  # duplicates: all items identical
    x[1] *= 1e3
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2] = False  # an empty set
    mask[2, 0] = True  # ... with one item: no candidates at all
    for impl in ("dense", "chunked"):
        xx = x.clone().requires_grad_()
        blk.conf["impl"] = impl
        blk.zero_grad()
        y = blk(xx, mask)
        (y * torch.randn_like(y)).sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(xx.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in blk.parameters() if p.grad is not None)
        assert torch.all(y[2, 6:, 0] == 0)


def test_torch_geometric_input_equals_padded_path():
    blk = make_block(k=2).eval()
    sizes = [4, 7, 1]
    x = torch.randn(sum(sizes), 6, dtype=torch.float64)
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    dense, mask = to_dense_sets(x, batch)
    assert dense.shape == (3, 6, 7) and mask.sum().item() == 12
    torch.testing.assert_close(to_flat_sets(dense, mask), x)
    out = blk.forward_flat(x, batch)
    assert out.shape == (12, 18)
    torch.testing.assert_close(out, to_flat_sets(blk(dense, mask), mask))
    start = 0
    for n in sizes:  # and each set alone
        torch.testing.assert_close(out[start:start + n], blk(x[start:start + n].T.unsqueeze(0))[0].T)
        start += n


def test_auto_impl_threshold_and_repr():
    blk = N3Block(4, k=2, auto_dense_max=100)
    assert blk.resolve_impl(1, 10) == "dense" and blk.resolve_impl(2, 10) == "chunked"
    assert "k=2" in repr(blk) and "impl='auto'" in repr(blk)
    blk.reset_parameters()
    assert torch.all(blk.temperature[-1].weight == 0)
    torch.testing.assert_close(blk.temperatures(torch.randn(1, 4, 3)), torch.ones(1, 3))


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda b: b(torch.randn(2, 5, 7)), "(B, 4, N)"),
        (lambda b: b(torch.randn(4, 7)), "(B, 4, N)"),
        (lambda b: b(torch.randn(2, 4, 7), torch.ones(2, 6, dtype=torch.bool)), "(B, N)"),
        (lambda b: b(torch.randn(2, 4, 7), torch.ones(2, 7)), "(B, N)"),
        (lambda b: b(torch.ones(2, 4, 7, dtype=torch.long)), "(B, C, N)"),
        (lambda b: to_dense_sets(torch.randn(5, 4, 1), torch.zeros(5, dtype=torch.long)), "(sumN, C)"),
        (lambda b: to_dense_sets(torch.randn(5, 4), torch.zeros(4, dtype=torch.long)), "(sumN,)"),
        (lambda b: N3Block(4, impl="fast"), "impl"),
        (lambda b: N3Block(4, nonsense=1), "unknown"),
    ],
)
def test_bad_inputs_raise_value_error(call, words):
    blk = N3Block(4, k=2)
    with pytest.raises(ValueError) as exc:
        call(blk)
    assert words in str(exc.value)


def test_identity_embedding_knn_in_input_space():
    blk = HardKNNBlock(3, k=2, embed_depth=0).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 6:] = False
    y = blk(x, mask)
    xm = x * mask.unsqueeze(1)
    d = torch.cdist(xm.transpose(1, 2), xm.transpose(1, 2)) ** 2
    cand = mask.unsqueeze(1) & ~torch.eye(8, dtype=torch.bool)
    W = hard_knn(d, 2, cand)
    torch.testing.assert_close(y[:, 3:].reshape(2, 2, 3, 8), torch.einsum("bjmo,bco->bjcm", W, xm))
