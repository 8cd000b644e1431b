"""Tests of the image N3 block (n3images.N3Block2d) and its patch grid (n3images.patches).

Patch grid geometry by hand, im2col/col2im round trips, the search-window candidates, the block's
output layout, its hard limit against a brute-force windowed KNN written with plain loops, the
continuous block at a tiny temperature, gradients, DistanceNorm statistics, guides and errors.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from n3images.n3block2d import DistanceNorm, N3Block2d
from n3images.patches import (col2im, grid_shape, im2col, pad_to_grid, patch_centres,
                              window_candidates)

DT = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def small_block(C=1, **kw):
    conf = dict(k=3, patch_size=4, stride=2, window=5, embed_channels=3, embed_hidden=6, temp_hidden=6)
    conf.update(kw)
    torch.manual_seed(0)
    return N3Block2d(C, **conf).double()


# ----------------------------------------------------------------------------- patch grid


@pytest.mark.parametrize("h,w,p,s,expected", [
    (80, 80, 10, 5, (15, 15, 0, 0)),
    (37, 29, 10, 5, (7, 5, 3, 1)),  # rows: ceil(27/5)+1 = 7, 6*5+10-37 = 3; cols: ceil(19/5)+1 = 5, 4*5+10-29 = 1
    (6, 7, 10, 5, (1, 1, 4, 3)),  # smaller than one patch: one patch, padded up to it
    (10, 9, 4, 4, (3, 3, 2, 3)),
    (5, 5, 3, 1, (3, 3, 0, 0)),
    (23, 19, 4, 2, (11, 9, 1, 1)),
    (1, 1, 1, 1, (1, 1, 0, 0)),
    (10, 10, 2, 3, (4, 4, 1, 1)),  # stride > patch size: ceil(8/3)+1 = 4, 3*3+2-10 = 1
])
def test_grid_shape_by_hand(h, w, p, s, expected):
    assert grid_shape(h, w, p, s) == expected
    x = _rand(1, 2, h, w)
    xp = pad_to_grid(x, p, s)
    gh, gw, ph, pw = expected
    assert xp.shape[-2:] == ((gh - 1) * s + p, (gw - 1) * s + p) == (h + ph, w + pw)
    assert torch.equal(xp[..., :h, :w], x)
    assert im2col(xp, p, s).shape == (1, 2 * p * p, gh * gw)


def test_grid_shape_and_pad_errors_and_padding_values():
    with pytest.raises(ValueError, match="0x5"):
        grid_shape(0, 5, 3, 1)
    with pytest.raises(ValueError, match=">= 1"):
        grid_shape(5, 5, 3, 0)
    with pytest.raises(ValueError, match=">= 1"):
        grid_shape(5, 5, 0, 1)
    x = _rand(1, 1, 37, 29)
    xp = pad_to_grid(x, 10, 5)  # pad 3 rows, 1 column: reflection (the edge pixel not repeated)
    assert torch.equal(xp[0, 0, 37:, :29], x[0, 0, [35, 34, 33], :])
    assert torch.equal(xp[0, 0, :37, 29], x[0, 0, :, 27])
    small = _rand(1, 1, 6, 7)
    sp = pad_to_grid(small, 10, 5)  # pads 4 and 3 fit a reflection of a 6x7 image (pad < size)
    assert sp.shape[-2:] == (10, 10) and torch.equal(sp[0, 0, 6, :7], small[0, 0, 4])
    tiny = _rand(1, 1, 2, 3)
    tp = pad_to_grid(tiny, 10, 5)  # pads 8 and 7 do not: replicate
    assert tp.shape[-2:] == (10, 10) and torch.equal(tp[0, 0, 9, :3], tiny[0, 0, 1])


@pytest.mark.parametrize("h,w", [(80, 80), (37, 29), (6, 7), (16, 12), (13, 11)])
@pytest.mark.parametrize("p,s", [(10, 5), (3, 1), (4, 4)])
def test_im2col_col2im_round_trip(h, w, p, s):
    x = _rand(2, 3, h, w, seed=h * w)
    xp = pad_to_grid(x, p, s)
    cols = im2col(xp, p, s)
    back = col2im(cols, xp.shape[-2:], p, s)
    torch.testing.assert_close(back, xp, rtol=1e-14, atol=1e-14)
    if p == s:  # non-overlapping patches: nothing is averaged, exact
        assert torch.equal(back, xp)


def test_col2im_averages_overlapping_patches():
    # different values per patch: each pixel is the mean of the values its covering patches give it
    p, s, gh, gw = 3, 2, 3, 4
    H, W = (gh - 1) * s + p, (gw - 1) * s + p
    cols = _rand(1, 2 * p * p, gh * gw, seed=3)
    out = col2im(cols, (H, W), p, s)
    acc = torch.zeros(2, H, W, dtype=DT)
    cnt = torch.zeros(H, W, dtype=DT)
    for i in range(gh):
        for j in range(gw):
            acc[:, i * s:i * s + p, j * s:j * s + p] += cols[0, :, i * gw + j].view(2, p, p)
            cnt[i * s:i * s + p, j * s:j * s + p] += 1
    torch.testing.assert_close(out[0], acc / cnt, rtol=0, atol=1e-14)


def test_patch_centres_by_hand():
    t = torch.arange(23 * 19, dtype=DT).view(1, 1, 23, 19)
    tp = pad_to_grid(t, 4, 2)
    c = patch_centres(tp, 4, 2)
    gh, gw, _, _ = grid_shape(23, 19, 4, 2)
    assert c.shape == (1, gh * gw)
    for i in range(gh):
        for j in range(gw):
            assert c[0, i * gw + j] == tp[0, 0, i * 2 + 2, j * 2 + 2]


# ----------------------------------------------------------------------------- window candidates


def _cands(layout, q):
    return [int(i) for i, v in zip(layout.index[q], layout.valid[q]) if v]


def _window_set(r0, c0, w, gw, q):
    return {r * gw + c for r in range(r0, r0 + w) for c in range(c0, c0 + w)} - {q}


def test_window_candidates_interior_border_and_corner():
    gh = gw = 20
    lay = window_candidates(gh, gw, 15)
    assert lay.index.shape == lay.valid.shape == (400, 225)
    cases = {  # (row, col) -> first window row / column, by hand (half = 7, shifted inwards)
        (10, 10): (3, 3), (0, 0): (0, 0), (19, 19): (5, 5), (0, 19): (0, 5), (19, 10): (5, 3),
        (7, 12): (0, 5), (8, 3): (1, 0), (12, 12): (5, 5),
    }
    for (i, j), (r0, c0) in cases.items():
        q = i * gw + j
        got = _cands(lay, q)
        assert len(got) == len(set(got)) == 224
        assert set(got) == _window_set(r0, c0, 15, gw, q), (i, j)
        assert sorted(got) == got  # slots in grid order: ties go to the lower grid index
    assert lay.valid.sum(1).eq(224).all()


def test_window_candidates_grid_smaller_than_window():
    lay = window_candidates(5, 7, 15)
    assert lay.index.shape == (35, 225)
    for q in range(35):
        assert _cands(lay, q) == [n for n in range(35) if n != q]
    lay = window_candidates(3, 30, 5)  # smaller in one direction only
    q = 1 * 30 + 15
    assert set(_cands(lay, q)) == {r * 30 + c for r in range(3) for c in range(13, 18)} - {q}


def test_window_candidates_even_window():
    gh, gw, w = 10, 9, 4  # half = 2: rows q-2 .. q+1, shifted inwards at the borders
    lay = window_candidates(gh, gw, w)
    for (i, j), (r0, c0) in {(5, 5): (3, 3), (0, 0): (0, 0), (9, 8): (6, 5), (1, 7): (0, 5)}.items():
        q = i * gw + j
        assert set(_cands(lay, q)) == _window_set(r0, c0, w, gw, q)
    assert lay.valid.sum(1).eq(15).all()


# ----------------------------------------------------------------------------- the block


@pytest.mark.parametrize("B,H,W,kw", [
    (1, 13, 11, {}),
    (3, 17, 20, {}),
    (2, 6, 7, {"patch_size": 10, "stride": 5, "window": 15}),  # smaller than one patch: no candidates
    (1, 3, 2, {}),  # smaller than a patch of 4
    (2, 9, 9, {"relaxation": "hard"}),
    (1, 12, 14, {"embed": "none"}),
])
def test_output_shape_and_input_channels(B, H, W, kw):
    C, k = 2, 3
    blk = small_block(C, **kw).eval()
    x = _rand(B, C, H, W, seed=H + W)
    with torch.no_grad():
        y = blk(x)
    assert y.shape == (B, (k + 1) * C, H, W) and blk.out_channels == (k + 1) * C
    assert torch.equal(y[:, :C], x)
    assert torch.isfinite(y).all()
    gh, gw, _, _ = grid_shape(H, W, blk.conf["patch_size"], blk.conf["stride"])
    if gh * gw == 1:  # a single patch has no candidates: every volume is zero
        assert torch.all(y[:, C:] == 0)
    else:
        assert y[:, C:].abs().sum() > 0


def brute_force_hard_block(x, match, p, s, window, k, pads):
    """Windowed hard KNN with plain loops: volumes (B, k*C, H, W) of the block input ``x``.

    Patches of ``match`` are compared (squared Euclidean over their pixels; ties: lower grid
    index); the neighbours' patches of ``x`` are put back into images, averaging overlaps.
    """
    B, C, H, W = x.shape
    ph, pw = pads
    xp = F.pad(x, (0, pw, 0, ph), mode="reflect")
    mp = F.pad(match, (0, pw, 0, ph), mode="reflect")
    Hp, Wp = H + ph, W + pw
    gh, gw = (Hp - p) // s + 1, (Wp - p) // s + 1
    wh, ww = min(window, gh), min(window, gw)
    out = torch.zeros(B, k * C, H, W, dtype=x.dtype)
    for b in range(B):
        mpatch = [[mp[b, :, i * s:i * s + p, j * s:j * s + p].reshape(-1).tolist() for j in range(gw)] for i in range(gh)]
        acc = torch.zeros(k, C, Hp, Wp, dtype=x.dtype)
        cnt = torch.zeros(Hp, Wp, dtype=x.dtype)
        for i in range(gh):
            for j in range(gw):
                r0 = min(max(i - window // 2, 0), gh - wh)
                c0 = min(max(j - window // 2, 0), gw - ww)
                scored = []
                for r in range(r0, r0 + wh):
                    for c in range(c0, c0 + ww):
                        if (r, c) != (i, j):
                            d = sum((u - v) ** 2 for u, v in zip(mpatch[i][j], mpatch[r][c]))
                            scored.append((d, r * gw + c))
                scored.sort()
                for n, (_, g) in enumerate(scored[:k]):
                    r, c = divmod(g, gw)
                    acc[n, :, i * s:i * s + p, j * s:j * s + p] += xp[b, :, r * s:r * s + p, c * s:c * s + p]
                cnt[i * s:i * s + p, j * s:j * s + p] += 1
        out[b] = (acc / cnt).reshape(k * C, Hp, Wp)[:, :H, :W]
    return out


P, S, WIN, K, PADS = 4, 2, 5, 3, (1, 1)  # 23x19 image: 11x9 grid, padded to 24x20


@pytest.mark.parametrize("binary", [False, True])
def test_hard_block_equals_brute_force_windowed_knn(binary):
    assert grid_shape(23, 19, P, S) == (11, 9) + PADS
    x = _rand(2, 1, 23, 19, seed=1)
    if binary:  # 0/1 pixels: integer distances, many exact ties (broken by the lower grid index)
        x = (x > 0).to(DT)
    expected = brute_force_hard_block(x, x, P, S, WIN, K, PADS)
    for impl in ("dense", "chunked"):
        for tile in (1, 3, 8):
            blk = small_block(1, embed="none", relaxation="hard", k=K, patch_size=P, stride=S, window=WIN,
                              impl=impl, tile=tile)
            assert blk.temperature is None and blk.distance_norm is None
            y = blk(x)
            torch.testing.assert_close(y[:, 1:], expected, rtol=0, atol=1e-13, msg=lambda m: f"{impl} {tile}: {m}")


def test_continuous_block_at_tiny_temperature_is_the_hard_block():
    x = _rand(1, 1, 23, 19, seed=2)
    expected = brute_force_hard_block(x, x, P, S, WIN, K, PADS)
    blk = small_block(1, embed="none", k=K, patch_size=P, stride=S, window=WIN, temp_depth=1, distance_norm=False)
    with torch.no_grad():
        blk.temperature[-1].weight.zero_()
        blk.temperature[-1].bias.fill_(math.log(1e-5))  # t = exp(log 1e-5) * 0.1 = 1e-6
    for impl in ("dense", "chunked"):
        blk.conf["impl"] = impl
        with torch.no_grad():
            y = blk.eval()(x)
        torch.testing.assert_close(y[:, 1:], expected, rtol=0, atol=1e-12)


def test_guide_changes_the_matching():
    x = _rand(1, 1, 23, 19, seed=4)
    guide = _rand(1, 2, 23, 19, seed=5)  # a different image, even another channel count
    blk = small_block(1, embed="none", relaxation="hard", k=K, patch_size=P, stride=S, window=WIN)
    y_guided, y_self = blk(x, guide=guide), blk(x)
    assert not torch.allclose(y_guided, y_self)
    torch.testing.assert_close(y_guided[:, 1:], brute_force_hard_block(x, guide, P, S, WIN, K, PADS), rtol=0, atol=1e-13)
    assert torch.equal(blk(x, guide=x), y_self)
    assert torch.equal(y_guided[:, :1], x)
    with pytest.raises(ValueError, match="guide"):
        small_block(1, embed="cnn")(x, guide=guide)
    with pytest.raises(ValueError, match=r"got \(1, 2, 23, 18\)"):
        blk(x, guide=guide[..., :18])


@pytest.mark.parametrize("train", [False, True])
def test_dense_chunked_and_tiles_agree(train):
    x = _rand(2, 2, 15, 13, seed=6)
    g = _rand(2, 8, 15, 13, seed=7)
    results = []
    for impl, tile in (("dense", 8), ("chunked", 8), ("chunked", 1), ("dense", 3)):
        blk = small_block(2, impl=impl, tile=tile).train(train)
        xx = x.clone().requires_grad_()
        y = blk(xx)
        (y * g).sum().backward()
        results.append((y.detach(), xx.grad, {n: p.grad for n, p in blk.named_parameters()}, dict(blk.named_buffers())))
    # in training the DistanceNorm statistics are summed block by block: another tile size sums
    # in another order (running_var differs in the 14th digit), which the sharp softmax amplifies
    tol = 1e-8 if train else 1e-11
    y0, gx0, gp0, buf0 = results[0]
    for y, gx, gp, buf in results[1:]:
        torch.testing.assert_close(y, y0, rtol=0, atol=tol)
        torch.testing.assert_close(gx, gx0, rtol=0, atol=tol)
        for n in gp0:
            if gp0[n] is None:
                assert gp[n] is None, n
            else:
                torch.testing.assert_close(gp[n], gp0[n], rtol=0, atol=10 * tol, msg=lambda m, n=n: f"{n}: {m}")
        for n in buf0:
            torch.testing.assert_close(buf[n], buf0[n], rtol=1e-13, atol=1e-13, msg=lambda m, n=n: f"{n}: {m}")
    assert torch.equal(results[1][0], y0)  # dense and chunked over the same tiles: the same forward


def test_gradients_reach_embedding_temperature_and_distance_norm():
    blk = small_block(2).train()
    x = _rand(2, 2, 14, 13, seed=8).requires_grad_()
    y = blk(x)
    (y[:, 2:] * _rand(*y[:, 2:].shape, seed=9)).sum().backward()
    for name in ("embed.0.weight", "embed.6.weight", "embed.6.bias", "temperature.0.weight", "temperature.6.weight",
                 "distance_norm.weight"):
        p = dict(blk.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_distance_norm_running_stats_and_eval():
    blk = small_block(1, k=2)
    x = _rand(2, 1, 13, 11, seed=10)
    dn = blk.distance_norm
    assert float(dn.running_var) == 1.0 and int(dn.num_batches_tracked) == 0
    blk.train()
    blk(x)
    # the batch statistics are those of every query's valid window distances in the embedding
    with torch.no_grad():
        emb = im2col(pad_to_grid(blk.embed(x), 4, 2), 4, 2)  # (B, E*p*p, L)
    gh, gw, _, _ = grid_shape(13, 11, 4, 2)
    lay = window_candidates(gh, gw, 5)
    d = ((emb.unsqueeze(-1) - emb[:, :, lay.index]) ** 2).sum(1)  # (B, L, O)
    d = d[lay.valid.expand_as(d)]
    n = d.numel()
    assert n == 2 * int(lay.valid.sum())
    torch.testing.assert_close(dn.running_mean, -0.1 * d.mean().view(1), rtol=1e-10, atol=0)
    torch.testing.assert_close(dn.running_var, 0.9 + 0.1 * d.var(unbiased=True).view(1), rtol=1e-10, atol=0)
    assert int(dn.num_batches_tracked) == 1
    # eval: running statistics are used and not updated
    blk.eval()
    state = {n: b.clone() for n, b in blk.named_buffers()}
    with torch.no_grad():
        y1 = blk(x)
        assert torch.equal(blk(x), y1)
    assert all(torch.equal(b, state[n]) for n, b in blk.named_buffers())
    with torch.no_grad():
        dn.running_var.mul_(100.0)
        y2 = blk(x)
    assert not torch.allclose(y1, y2)
    # the effective temperature is t * sqrt(running_var + eps) / weight
    t = torch.rand(2, 7, dtype=DT) + 0.1
    with torch.no_grad():
        dn.weight.fill_(2.5)
    eff = dn.effective_temperature(t, None, None, None)
    torch.testing.assert_close(eff, t * torch.sqrt(dn.running_var + dn.eps) / 2.5, rtol=1e-14, atol=0)


def test_distance_norm_defaults_like_batchnorm():
    dn = DistanceNorm()
    sd = dn.state_dict()
    assert set(sd) == set(torch.nn.BatchNorm1d(1).state_dict())
    dn.running_var.fill_(3.0)
    dn.reset_parameters()
    assert float(dn.running_var) == 1.0 and float(dn.weight.detach()) == 1.0


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_name_the_shape():
    blk = small_block(1)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\), got \(1, 2, 8, 8\)"):
        blk(torch.zeros(1, 2, 8, 8, dtype=DT))
    with pytest.raises(ValueError, match=r"got \(1, 8, 8\)"):
        blk(torch.zeros(1, 8, 8, dtype=DT))
    with pytest.raises(ValueError, match="floating point"):
        blk(torch.zeros(1, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(1, 1, 0, 8\)"):
        blk(torch.zeros(1, 1, 0, 8, dtype=DT))
    with pytest.raises(ValueError, match=r"\(0, 1, 8, 8\)"):
        blk(torch.zeros(0, 1, 8, 8, dtype=DT))
    with pytest.raises(ValueError, match="x must have shape"):
        blk("not a tensor")


def test_integer_input_error_names_the_shape():
    with pytest.raises(ValueError, match=r"\(1, 1, 8, 8\)"):
        small_block(1)(torch.zeros(1, 1, 8, 8, dtype=torch.long))


@pytest.mark.parametrize("kw,match", [
    ({"kk": 3}, "unknown options"),
    ({"k": 0}, "k must be a positive int"),
    ({"k": -2}, "k must be a positive int"),
    ({"k": True}, "k must be a positive int"),
    ({"k": 2.0}, "k must be a positive int"),
    ({"patch_size": 0}, "patch_size"),
    ({"stride": 0}, "stride"),
    ({"window": 1}, "window"),
    ({"tile": 0}, "tile"),
    ({"embed": "mlp"}, "embed"),
    ({"relaxation": "soft"}, "relaxation"),
    ({"impl": "fast"}, "impl"),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        N3Block2d(1, **kw)


def test_bad_in_channels():
    for c in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="in_channels"):
            N3Block2d(c)


# ----------------------------------------------------------------------------- device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    blk = small_block(2).eval()
    x = _rand(2, 2, 21, 18, seed=11)
    with torch.no_grad():
        y_cpu = blk(x)
        y_gpu = blk.cuda()(x.cuda())
    assert y_gpu.device.type == "cuda"
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=0, atol=1e-5)
    blk.train()
    xx = x.cuda().requires_grad_()
    blk(xx).sum().backward()
    assert torch.isfinite(xx.grad).all()
