"""Tests of the continuous KNN relaxation (paper Eqs. 8-10) and hard KNN selection."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from n3sets.knn import continuous_knn, hard_knn, log1mexp


def reference_knn(dist, k, t, mask=None):
    """Eqs. 8-10 written the plain way with autograd (valid for moderate temperatures, no dead rows)."""
    logits = -dist / t
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    out = []
    for _ in range(k):
        logw = torch.log_softmax(logits, -1)
        w = logw.exp()
        out.append(w)
        logits = logits + torch.log1p(-w.clamp(max=1 - 1e-12))
    return torch.stack(out, -3)


def brute_force_knn(dist, k, mask=None):
    """One-hot of the k nearest allowed candidates by sorting (distance, index) pairs in Python."""
    *lead, M, O = dist.shape
    flat = dist.reshape(-1, M, O).tolist()
    fm = mask.reshape(-1, M, O).tolist() if mask is not None else None
    out = torch.zeros(len(flat), k, M, O, dtype=dist.dtype)
    for b, rows in enumerate(flat):
        for m, row in enumerate(rows):
            cands = [(row[o], o) for o in range(O) if fm is None or fm[b][m][o]]
            for j, (_, o) in enumerate(sorted(cands)[:k]):
                out[b, j, m, o] = 1.0
    return out.reshape(*lead, k, M, O)


def distinct_distances(shape, gen, scale=1.0):
    """Distances with pairwise gaps >= 0.1 * scale within each row (no ties)."""
    O = shape[-1]
    perm = torch.argsort(torch.rand(shape, generator=gen), dim=-1).to(torch.float64)
    return (perm + 0.5 * torch.rand(shape, generator=gen, dtype=torch.float64) * 0.1) * 0.1 * scale


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    B=st.integers(1, 2), M=st.integers(1, 5), O=st.integers(1, 9), k=st.integers(1, 6),
    masked=st.booleans(), seed=st.integers(0, 2**16), f32=st.booleans(), scale=st.sampled_from([1.0, 1e3]),
)
def test_zero_temperature_is_hard_knn(B, M, O, k, masked, seed, f32, scale):
    gen = torch.Generator().manual_seed(seed)
    dist = distinct_distances((B, M, O), gen, scale)
    mask = (torch.rand(B, M, O, generator=gen) > 0.3) if masked else None
    if f32:
        dist = dist.float()
    expected = brute_force_knn(dist, k, mask)
    W = continuous_knn(dist, k, 1e-6, mask)
    assert W.shape == (B, k, M, O)
    torch.testing.assert_close(W, expected.to(W.dtype), rtol=0, atol=1e-6)
    torch.testing.assert_close(hard_knn(dist, k, mask), expected.to(W.dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_temperature_relative_to_gaps_is_hard_knn(dtype):
    # Hard KNN is reached neighbour by neighbour once the top weight rounds to exactly 1 in
    # floating point (gap / t above ~17 in float32, ~37 in float64); gaps here are >= 1.
    gen = torch.Generator().manual_seed(3)
    dist = torch.argsort(torch.rand(3, 6, 10, generator=gen), -1).to(dtype)
    expected = brute_force_knn(dist, 4).to(dtype)
    for t in (2e-2, 1e-3, 1e-6):
        W = continuous_knn(dist, 4, t)
        for j in range(4):
            torch.testing.assert_close(W[:, j], expected[:, j], rtol=0, atol=1e-6)


def test_update_rule_w_next_proportional_to_w_times_one_minus_w():
    # Eq. 9 in closed form: softmax(alpha + log(1 - w)) = w (1 - w) / sum(w (1 - w)). At moderate
    # temperature this is what the relaxation does (e.g. the 2nd row mixes the 1st and 2nd item).
    dist = torch.tensor([[[0.0, 1.0, 2.0, 3.0, 4.0]]], dtype=torch.float64)
    W = continuous_knn(dist, 3, 0.3)
    for j in range(2):
        nxt = W[:, j] * (1 - W[:, j])
        torch.testing.assert_close(W[:, j + 1], nxt / nxt.sum(-1, keepdim=True))


def test_rows_are_distributions_and_masked_entries_are_zero():
    gen = torch.Generator().manual_seed(0)
    dist = torch.rand(2, 5, 8, generator=gen)
    mask = torch.rand(2, 5, 8, generator=gen) > 0.4
    W = continuous_knn(dist, 6, 0.3, mask)
    assert torch.all(W[mask.unsqueeze(1).expand_as(W).logical_not()] == 0)
    count = mask.sum(-1)  # (2, 5)
    sums = W.sum(-1)  # (2, 6, 5)
    for j in range(6):
        alive = count > j
        torch.testing.assert_close(sums[:, j][alive], torch.ones(int(alive.sum())))
        assert torch.all(W[:, j][~alive] == 0)


def test_matches_plain_autograd_reference_values_and_grads():
    gen = torch.Generator().manual_seed(1)
    dist = torch.rand(2, 4, 7, generator=gen, dtype=torch.float64)
    t = torch.rand(2, 4, 1, generator=gen, dtype=torch.float64) * 0.5 + 0.05
    mask = torch.rand(2, 4, 7, generator=gen) > 0.2
    mask[..., :4] = True  # every query keeps >= 4 candidates, so no rows are dead
    g = torch.randn(2, 3, 4, 7, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (continuous_knn, reference_knn):
        d = dist.clone().requires_grad_()
        tt = t.clone().requires_grad_()
        W = fn(d, 3, tt, mask)
        (W * g).sum().backward()
        grads.append((W.detach(), d.grad, tt.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_dist_and_per_query_temperature(masked):
    gen = torch.Generator().manual_seed(2)
    dist = torch.rand(2, 3, 5, generator=gen, dtype=torch.float64).requires_grad_()
    t = (torch.rand(2, 3, 1, generator=gen, dtype=torch.float64) * 0.4 + 0.1).requires_grad_()
    mask = (torch.rand(2, 3, 5, generator=gen) > 0.3) if masked else None
    assert torch.autograd.gradcheck(lambda d, tt: continuous_knn(d, 4, tt, mask), (dist, t))


def test_gradcheck_scalar_and_broadcast_temperature():
    gen = torch.Generator().manual_seed(4)
    dist = torch.rand(2, 3, 4, generator=gen, dtype=torch.float64).requires_grad_()
    t0 = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    t1 = torch.full((3, 1), 0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d, tt: continuous_knn(d, 2, tt), (dist, t0))
    assert torch.autograd.gradcheck(lambda d, tt: continuous_knn(d, 2, tt), (dist, t1))


def test_float_temperature_equals_tensor_temperature():
    dist = torch.rand(2, 3, 6)
    torch.testing.assert_close(continuous_knn(dist, 3, 0.25), continuous_knn(dist, 3, torch.tensor(0.25)))


def _check_finite(dist, t, mask, k):
    d = dist.clone().requires_grad_()
    tt = t.clone().requires_grad_()
    W = continuous_knn(d, k, tt, mask)
    (W * torch.randn_like(W)).sum().backward()
    assert torch.isfinite(W).all()
    assert torch.isfinite(d.grad).all() and torch.isfinite(tt.grad).all()
    return W


@pytest.mark.parametrize("t", [1e-6, 1e-3, 1.0, 1e4])
@pytest.mark.parametrize("scale", [1.0, 1e6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edge_cases_are_finite_forward_and_backward(t, scale, dtype):
    gen = torch.Generator().manual_seed(5)
    M, O, k = 6, 5, 7  # k > O: fewer candidates than neighbours
    dist = torch.rand(2, M, O, generator=gen).to(dtype) * scale
    dist[0, 1] = scale  # a query whose candidates are all duplicates
    dist[0, 2, 1:] = dist[0, 2, 0]
    mask = torch.rand(2, M, O, generator=gen) > 0.3
    mask[1, 0] = False  # fully masked row
    mask[1, 1] = False
    mask[1, 1, 3] = True  # a single candidate
    tt = torch.full((2, M, 1), t, dtype=dtype)
    W = _check_finite(dist, tt, mask, k)
    assert torch.all(W[1, :, 0] == 0)
    assert torch.all(W[1, 1:, 1] == 0) and W[1, 0, 1, 3] == 1
    for j in range(O, k):
        assert torch.all(W[:, j] == 0)
    W = _check_finite(dist, tt, None, k)
    assert torch.all(W[:, O:] == 0)


def test_garbage_at_masked_entries_does_not_leak():
    dist = torch.rand(1, 3, 4)
    dist[0, :, 2] = float("nan")
    dist[0, :, 3] = float("inf")
    mask = torch.tensor([True, True, False, False]).expand(1, 3, 4)
    W = _check_finite(dist, torch.full((1, 3, 1), 0.5), mask, 3)
    assert torch.all(W[..., 2:] == 0) and torch.all(W[:, 2] == 0)


def test_duplicates_split_weight_equally():
    W = continuous_knn(torch.zeros(1, 1, 4), 2, 1e-6)
    torch.testing.assert_close(W, torch.full((1, 2, 1, 4), 0.25))


def test_log1mexp_accuracy_and_gradient_at_zero():
    x = torch.tensor([-1e-20, -1e-8, -0.5, -0.7, -1.0, -30.0, -800.0], dtype=torch.float64)
    expected = torch.tensor([math.log(-math.expm1(v)) if v > -math.log(2) else math.log1p(-math.exp(v)) for v in x.tolist()],
                            dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), expected)
    z = torch.tensor([0.0, float("-inf")], requires_grad=True)
    y = log1mexp(z)
    y.sum().backward()
    assert y[0] == float("-inf") and y[1] == 0
    assert torch.isfinite(z.grad).all()


def test_hard_knn_ties_by_index_and_no_gradient():
    dist = torch.tensor([[[1.0, 0.0, 1.0, 0.0]]], requires_grad=True)
    W = hard_knn(dist, 3)
    assert not W.requires_grad
    assert W[0, :, 0].argmax(-1).tolist() == [1, 3, 0]


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: continuous_knn(torch.rand(5), 2), "(..., M, O)"),
        (lambda: continuous_knn(torch.ones(3, 4, dtype=torch.long), 2), "(..., M, O)"),
        (lambda: continuous_knn(torch.rand(2, 3, 4), 2, mask=torch.ones(2, 3, 5, dtype=torch.bool)), "(..., M, O)"),
        (lambda: continuous_knn(torch.rand(2, 3, 4), 2, mask=torch.ones(2, 3, 4)), "(..., M, O)"),
        (lambda: continuous_knn(torch.rand(2, 3, 4), 2, torch.ones(2, 3, 4)), "(..., M, 1)"),
        (lambda: continuous_knn(torch.rand(2, 3, 4), 0), "positive int"),
        (lambda: hard_knn(torch.rand(4), 2), "(..., M, O)"),
    ],
)
def test_bad_inputs_raise_value_error_naming_shape(call, words):
    with pytest.raises(ValueError) as exc:
        call()
    assert words in str(exc.value)
