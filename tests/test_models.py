"""CNNet / N3Net: shapes, masks, permutation equivariance, configuration; weight files."""
import os

import pytest
import torch

from n3sets.models import CNNet, MaskedBatchNorm1d, N3Net, PADDED_LOGIT, context_norm, model_inputs
from n3sets.pretrained import available_models, load_model, resolve_weights, save_model

SMALL = {"channels": 16, "num_blocks": 3}
SMALL_N3 = {**SMALL, "n3_after": 1, "k": 3, "embed_channels": 8}


def _padded_batch(sizes, channels=4, garbage=float("nan")):
    n = max(sizes)
    x = torch.randn(len(sizes), channels, n)
    mask = torch.zeros(len(sizes), n, dtype=torch.bool)
    for b, s in enumerate(sizes):
        mask[b, :s] = True
        x[b, :, s:] = garbage
    return x, mask


def _trained_a_little(model, steps=3):
    """A few training steps so that batch-norm running statistics are not the identity."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        x, mask = _padded_batch([25, 17, 30])
        logits = model(x, mask)
        (logits[mask] ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("cls,conf", [(CNNet, SMALL), (N3Net, SMALL_N3)])
def test_padded_batch_equals_sets_one_by_one(cls, conf):
    model = _trained_a_little(cls(**conf))
    sizes = [30, 12, 21]
    x, mask = _padded_batch(sizes)
    with torch.no_grad():
        out = model(x, mask)
        assert out.shape == (3, 30)
        assert torch.isfinite(out).all()
        assert (out[~mask] == PADDED_LOGIT).all()
        for b, s in enumerate(sizes):
            single = model(x[b : b + 1, :, :s])
            assert torch.allclose(single[0], out[b, :s], atol=1e-5), (b, (single[0] - out[b, :s]).abs().max())


@pytest.mark.parametrize("cls,conf", [(CNNet, SMALL), (N3Net, SMALL_N3)])
def test_permutation_equivariance(cls, conf):
    model = _trained_a_little(cls(**conf))
    x = torch.randn(2, 4, 40)
    perm = torch.randperm(40)
    with torch.no_grad():
        out = model(x)
        out_p = model(x[:, :, perm])
    assert torch.allclose(out[:, perm], out_p, atol=1e-5)


def test_training_mode_ignores_padding():
    """Masked batch norm: the loss and gradients of a padded batch do not depend on the padding."""
    torch.manual_seed(0)
    model = N3Net(**SMALL_N3).train()
    x, mask = _padded_batch([20, 9], garbage=0.0)
    x2 = x.clone()
    x2[~mask.unsqueeze(1).expand_as(x2)] = 1e3
    grads = []
    for inp in (x, x2):
        model.zero_grad()
        out = model(inp, mask)
        out[mask].sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g1, g2 in zip(*grads):
        assert torch.allclose(g1, g2, atol=1e-5)


def test_masked_batch_norm_statistics():
    bn = MaskedBatchNorm1d(3, momentum=1.0).train()
    x, mask = _padded_batch([5, 2], channels=3, garbage=100.0)
    y = bn(x, mask)
    valid = torch.cat([x[0, :, :5], x[1, :, :2]], dim=1)  # (C, 7)
    assert torch.allclose(bn.running_mean, valid.mean(1), atol=1e-6)
    assert torch.allclose(bn.running_var, valid.var(1, unbiased=True), atol=1e-5)
    ref = torch.nn.functional.batch_norm(valid[None], None, None, training=True, eps=bn.eps)[0]
    assert torch.allclose(torch.cat([y[0, :, :5], y[1, :, :2]], 1), ref, atol=1e-5)
    assert (y[~mask.unsqueeze(1).expand_as(y)] == 0).all()


def test_context_norm_uses_valid_items_only():
    x, mask = _padded_batch([6, 3], channels=2, garbage=float("inf"))
    y = context_norm(x, mask)
    for b, s in enumerate([6, 3]):
        ref = context_norm(x[b : b + 1, :, :s])
        assert torch.allclose(y[b, :, :s], ref[0], atol=1e-6)
        assert torch.allclose(y[b, :, :s].mean(-1), torch.zeros(2), atol=1e-6)
    assert (y[1, :, 3:] == 0).all()


def test_n3net_block_width_gives_c_channels():
    model = N3Net(channels=32, num_blocks=4, n3_after=2, k=3)
    assert model.n3_reduce.out_channels == 8 and model.n3.out_channels == 32 and model.n3_expand is None
    odd = N3Net(channels=30, num_blocks=2, n3_after=1, k=3)  # 30 // 4 = 7 -> 28 -> 1x1 conv back to 30
    assert odd.n3_expand is not None and odd.n3_expand.out_channels == 30
    assert odd(torch.randn(1, 4, 10)).shape == (1, 10)
    last = N3Net(channels=16, num_blocks=2, n3_after=2, k=1, embed_channels=4)  # block after the last one
    assert last(torch.randn(2, 4, 9)).shape == (2, 9)


def test_configuration_defaults_and_repr():
    model = CNNet()
    assert model.conf["channels"] == 128 and model.conf["num_blocks"] == 12 and model.conf["in_channels"] == 4
    assert len(model.blocks) == 12
    n3 = N3Net()
    assert n3.conf["n3_after"] == 6 and n3.conf["embed_depth"] == 3 and n3.conf["temp_depth"] == 3
    assert "channels=128" in repr(model) and "n3_after=6" in repr(n3)
    side = CNNet(side_info=True, **SMALL)
    assert side.conf["in_channels"] == 6
    assert side(torch.randn(1, 6, 5)).shape == (1, 5)
    merged = CNNet({"channels": 8}, num_blocks=1)
    assert merged.conf["channels"] == 8 and merged.conf["num_blocks"] == 1
    with pytest.raises(ValueError, match="unknown configuration key"):
        CNNet(chanels=8)
    with pytest.raises(ValueError, match="in_channels"):
        CNNet(side_info=True, in_channels=4)
    with pytest.raises(ValueError, match=r"\(B, 4, N\)"):
        model(torch.randn(1, 6, 5))
    with pytest.raises(ValueError, match="mask"):
        model(torch.randn(1, 4, 5), torch.ones(1, 4, dtype=torch.bool))


def test_reset_parameters_restores_initialisation():
    torch.manual_seed(3)
    model = _trained_a_little(N3Net(**SMALL_N3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    fresh = N3Net(**SMALL_N3)
    torch.manual_seed(3)
    model.reset_parameters()
    changed = [k for k in before if not torch.equal(before[k], model.state_dict()[k])]
    assert changed, "training must have changed something"
    fresh_sd, model_sd = fresh.state_dict(), model.state_dict()
    for k in ("input_proj.weight", "blocks.0.bn1.running_var", "output.bias"):
        assert model_sd[k].shape == fresh_sd[k].shape
    assert torch.equal(model_sd["blocks.0.bn1.running_mean"], torch.zeros(16))
    assert not torch.equal(model_sd["input_proj.weight"], before["input_proj.weight"])
    # the temperature head of the N3 block starts at zero (init_temperature) again
    assert torch.equal(model.n3.temperature[-1].weight, torch.zeros_like(model.n3.temperature[-1].weight))


def test_model_inputs():
    xs = torch.randn(2, 7, 4)
    ratio, mutual = torch.rand(2, 7), torch.rand(2, 7) > 0.5
    x = model_inputs(xs)
    assert x.shape == (2, 4, 7) and torch.equal(x[:, 2], xs[..., 2])
    x6 = model_inputs(xs, ratio, mutual, side_info=True)
    assert x6.shape == (2, 6, 7) and torch.equal(x6[:, 4], ratio) and torch.equal(x6[:, 5], mutual.float())
    with pytest.raises(ValueError, match="ratio"):
        model_inputs(xs, side_info=True)
    with pytest.raises(ValueError, match=r"\(B, N, 4\)"):
        model_inputs(xs[0])


def test_loss_decreases_on_tiny_synthetic_set(tmp_path):
    from data_prep.corr_dataset import CorrespondenceDataset, collate_sets
    from data_prep.synthetic import write_synthetic_dataset
    from n3sets.losses import balanced_bce

    path = write_synthetic_dataset(tmp_path / "tiny.h5", 8, seed=0, num_matches=(60, 90), outlier_ratio=0.5)
    batch = collate_sets([CorrespondenceDataset(path)[i] for i in range(8)])
    model = N3Net(**SMALL_N3).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = balanced_bce(model(batch["x"], batch["mask"]), batch["label"], batch["mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_save_load_round_trip(tmp_path):
    model = _trained_a_little(N3Net(**SMALL_N3))
    path = save_model(tmp_path / "sub" / "m.pt", model, command="python x.py", epochs=3, val_mAP20=0.5,
                      version=torch.__version__)
    assert path.is_file() and not [p for p in path.parent.iterdir() if p.name != "m.pt"]  # no temp files left
    loaded = load_model(path)
    assert type(loaded) is N3Net and not loaded.training and loaded.conf == model.conf
    assert loaded.meta["epochs"] == 3 and loaded.meta["version"] == str(torch.__version__)
    x = torch.randn(2, 4, 15)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert load_model(str(path)).conf == model.conf


def test_missing_weights_raise_with_available_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="available"):
        load_model("no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such"):
        resolve_weights(tmp_path / "no-such.pt")
    with pytest.raises(ValueError, match="CNNet"):
        save_model(tmp_path / "x.pt", torch.nn.Linear(2, 2))
    bad = tmp_path / "bad.pt"
    torch.save({"hello": 1}, bad)
    with pytest.raises(ValueError, match="not an n3sets model file"):
        load_model(bad)


@pytest.mark.parametrize("name", ["cnnet-strecha", "n3net-strecha", "cnnet-strecha-refine", "n3net-strecha-refine",
                                  "cnnet-scenes8", "n3net-scenes8", "cnnet-scenes8-side", "n3net-scenes8-side"])
def test_shipped_weights_load_and_run(name, missing_data):
    if name not in available_models():
        missing_data(f"{name} not shipped yet")
    model = load_model(name)
    assert os.path.getsize(resolve_weights(name)) < 20e6
    assert {"command", "epochs", "val_mAP20"} <= set(model.meta)
    x = torch.randn(1, model.conf["in_channels"], 50)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("cls,conf", [(CNNet, SMALL), (N3Net, SMALL_N3)])
def test_refine_stage_shapes_padding_and_stages(cls, conf):
    model = _trained_a_little(cls(**conf, refine_stage={"num_blocks": 2}))
    assert isinstance(model.refine_stage, cls) and model.refine_stage.input_proj.in_channels == 4 + 2
    assert len(model.refine_stage.blocks) == 2 and model.refine_stage.refine_stage is None
    sizes = [30, 12, 21]
    x, mask = _padded_batch(sizes)
    stages = model(x, mask, return_stages=True)
    assert len(stages) == 2 and all(s.shape == (3, 30) for s in stages)
    assert torch.equal(stages[-1], model(x, mask))  # the last stage is the model's output
    for b, s in enumerate(sizes):  # padding changes nothing, also through the first-stage E
        alone = model(x[b:b + 1, :, :s], mask[b:b + 1, :s])
        torch.testing.assert_close(alone[0], stages[-1][b, :s], atol=1e-4, rtol=1e-4)
    # the refinement stage sees the first stage only as detached inputs
    model.train()
    stages = model(x, mask, return_stages=True)
    stages[-1][mask].sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.blocks.parameters())
    assert model.refine_stage.input_proj.weight.grad.abs().sum() > 0


def test_refine_stage_configuration_errors():
    with pytest.raises(ValueError, match="unknown configuration key 'k'"):
        CNNet(**SMALL, refine_stage={"k": 3})
    with pytest.raises(ValueError, match="cannot override"):
        CNNet(**SMALL, refine_stage={"side_info": True})
    with pytest.raises(ValueError, match="dict of configuration overrides"):
        CNNet(**SMALL, refine_stage=True)
    # a stored configuration without the newer key resolves to the same conf as the model's
    old = {k: v for k, v in CNNet(**SMALL).conf.items() if k != "refine_stage"}
    assert CNNet.resolve_conf(old) == CNNet(**SMALL).conf


def test_residual_features_separate_inliers_from_outliers():
    from n3sets.geometry import essential_from_pose
    from n3sets.models import residual_features

    torch.manual_seed(0)
    X = torch.rand(1, 40, 3) * 2 - 1 + torch.tensor([0.0, 0.0, 5.0])
    R = torch.eye(3)[None]
    t = torch.tensor([[1.0, 0.0, 0.0]])
    x1 = X[..., :2] / X[..., 2:]
    X2 = X @ R[0].T + t
    x2 = X2[..., :2] / X2[..., 2:]
    x2[:, 20:] = torch.rand(1, 20, 2) - 0.5  # outliers
    mask = torch.ones(1, 40, dtype=torch.bool)
    mask[0, -1] = False
    f = residual_features(x1, x2, essential_from_pose(R, t), mask)
    assert f.shape == (1, 40) and torch.isfinite(f).all() and f[0, -1] == 0
    assert f[0, :20].max() < -20 < f[0, 20:39].median()  # exact inliers sit at the lower clamp


def test_loss_over_stages_is_the_sum():
    from n3sets.losses import CorrespondenceLoss

    torch.manual_seed(0)
    x1, x2 = torch.randn(2, 30, 2) * 0.3, torch.randn(2, 30, 2) * 0.3
    E_gt = torch.randn(2, 3, 3)
    labels = torch.rand(2, 30) > 0.5
    mask = torch.ones(2, 30, dtype=torch.bool)
    a, b = torch.randn(2, 30), torch.randn(2, 30)
    crit = CorrespondenceLoss(essential_after=0)
    la, _ = crit(a, labels, mask, x1, x2, E_gt, 5)
    lb, pb = crit(b, labels, mask, x1, x2, E_gt, 5)
    both, parts = crit([a, b], labels, mask, x1, x2, E_gt, 5)
    torch.testing.assert_close(both, la + lb)
    assert parts == pb
    with pytest.raises(ValueError, match="empty"):
        crit([], labels, mask, x1, x2, E_gt, 5)
