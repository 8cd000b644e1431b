"""torch.hub entry points (hubconf.py) give the shipped models exactly as n3sets.pretrained loads them."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import n3images
import n3sets
from n3sets.pretrained import WEIGHTS_DIR, load_model

ROOT = Path(__file__).resolve().parents[1]


def _hub(entry, **kwargs):
    return torch.hub.load(str(ROOT), entry, source="local", trust_repo=True, **kwargs)


def _hubconf():
    spec = importlib.util.spec_from_file_location("n3_hubconf", ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entries(hubconf) -> set:
    # what torch.hub.list reports for a repository (it only takes GitHub repositories)
    return {f for f in dir(hubconf) if callable(getattr(hubconf, f)) and not f.startswith("_")}


def test_dependencies_are_importable():
    for dep in _hubconf().dependencies:
        assert importlib.util.find_spec(dep) is not None, dep


def test_every_shipped_model_has_an_entry():
    hubconf = _hubconf()
    entries = _entries(hubconf)
    assert set(hubconf.__all__) == entries
    shipped = {p.stem for p in WEIGHTS_DIR.glob("*.pt")} | {p.stem for p in n3images.WEIGHTS_DIR.glob("*.pt")}
    assert shipped, "no shipped weights found"
    assert {s.replace("-", "_") for s in shipped} | {"match_filter"} == entries


def test_entries_have_docstrings():
    hubconf = _hubconf()
    for entry in _entries(hubconf):
        assert len((getattr(hubconf, entry).__doc__ or "").strip()) > 20, entry


@pytest.mark.parametrize("entry, name", [("n3net_strecha", "n3net-strecha"), ("cnnet_strecha_side", "cnnet-strecha-side")])
def test_correspondence_entry_equals_pretrained(entry, name):
    model = _hub(entry)
    ref = load_model(name)
    assert type(model) is type(ref) and not model.training
    assert model.meta == ref.meta
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, ref.conf["in_channels"], 60, generator=g)
    mask = torch.ones(2, 60, dtype=torch.bool)
    mask[1, 45:] = False
    with torch.no_grad():
        assert torch.equal(model(x, mask), ref(x, mask))


def test_image_entry_equals_pretrained():
    model = _hub("dncnn_s25")
    ref = n3images.load_model("dncnn-s25")
    x = torch.rand(1, 1, 40, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_pretrained_false_gives_same_architecture_untrained():
    model = _hub("cnnet_strecha", pretrained=False)
    ref = load_model("cnnet-strecha")
    assert type(model) is type(ref) and model.conf == ref.conf
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_match_filter_entry_passes_options_through():
    mf = _hub("match_filter", name="cnnet-strecha", threshold=0.7)
    assert isinstance(mf, n3sets.MatchFilter)
    assert mf.name == "cnnet-strecha" and mf.conf["threshold"] == 0.7
    ref = n3sets.MatchFilter.from_pretrained("cnnet-strecha", threshold=0.7)
    rng = np.random.default_rng(0)
    k1 = rng.uniform(0, 600, (50, 2))
    k2 = k1 + rng.normal(0, 5, (50, 2))
    K = np.array([[500.0, 0, 300], [0, 500, 300], [0, 0, 1]])
    a = mf.filter(k1, k2, K, K, refine=None)
    b = ref.filter(k1, k2, K, K, refine=None)
    np.testing.assert_array_equal(a.prob, b.prob)
