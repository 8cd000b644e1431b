import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from n3sets.evaluation import BASELINES, evaluate_correspondences

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("mAP5", "mAP10", "mAP20", "precision", "recall", "f1")


class _Oracle(torch.nn.Module):
    """A 'model' that returns +-10 logits from the ground-truth labels it is given."""

    def __init__(self, labels, invert=False):
        super().__init__()
        self.conf = {"side_info": False, "in_channels": 4}
        self.labels = labels
        self.invert = invert
        self.calls = 0

    def forward(self, x, mask=None):
        label = self.labels[self.calls]
        self.calls += 1
        assert x.shape == (1, 4, label.shape[0])
        logits = torch.where(label > 0.5, 10.0, -10.0)[None]
        return -logits.abs() if self.invert else logits


@pytest.fixture(scope="module")
def synthetic_pairs(tmp_path_factory):
    from data_prep.corr_dataset import CorrespondenceDataset
    from data_prep.synthetic import write_synthetic_dataset

    path = tmp_path_factory.mktemp("eval") / "syn.h5"
    write_synthetic_dataset(path, 6, seed=3, num_matches=(200, 300), outlier_ratio=0.5)
    ds = CorrespondenceDataset(path)
    return path, [ds[i] for i in range(len(ds))]


def test_evaluate_oracle_and_failing_model(synthetic_pairs):
    _, pairs = synthetic_pairs
    labels = [p["label"] for p in pairs]
    result = evaluate_correspondences(
        pairs, models={"oracle": _Oracle(labels), "none": _Oracle(labels, invert=True)}
    )
    methods = result["methods"]
    assert list(methods) == list(BASELINES) + ["oracle", "oracle+ransac", "none", "none+ransac"]
    assert result["num_pairs"] == len(pairs) and len(result["pair_names"]) == len(pairs)
    for name, m in methods.items():
        for key in METRICS:
            assert 0.0 <= m[key] <= 1.0, (name, key)
        assert len(result["errors"][name]) == len(pairs)
    # Perfect classification: precision = recall = 1 and the eight-point pose is nearly exact.
    oracle = methods["oracle"]
    assert oracle["precision"] == 1.0 and oracle["recall"] == 1.0 and oracle["f1"] == 1.0
    assert oracle["mAP5"] == 1.0 and oracle["failures"] == 0
    assert max(result["errors"]["oracle"]) < 5.0
    # Nothing predicted: every pair fails, counts as 180 degrees, and is not dropped.
    none = methods["none"]
    assert none["failures"] == len(pairs) and none["mAP20"] == 0.0
    assert result["errors"]["none"] == [180.0] * len(pairs)
    assert none["precision"] == 0.0 and none["recall"] == 0.0
    assert methods["none+ransac"]["mAP20"] == 0.0
    # Baselines on 50 % outliers with small noise recover the pose.
    assert methods["ransac"]["mAP10"] > 0.5 and methods["magsac"]["mAP10"] > 0.5
    # The curve is the accuracy per threshold, ending at the fraction below 30 degrees.
    curves = result["curves"]
    assert curves["thresholds"][0] == 0.0 and curves["oracle"][0] == 0.0
    assert curves["none"][-1] == 0.0 and curves["oracle"][-1] == 1.0


def test_evaluate_bad_input(synthetic_pairs):
    _, pairs = synthetic_pairs
    with pytest.raises(ValueError, match="baselines"):
        evaluate_correspondences(pairs[:1], baselines=("lmeds",))
    with pytest.raises(ValueError, match="no pairs"):
        evaluate_correspondences([], baselines=("ransac",))
    bad = dict(pairs[0])
    del bad["ratio"]
    with pytest.raises(ValueError, match="ratio"):
        evaluate_correspondences([bad])


def _load_cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_corr_cli", ROOT / "pipelines" / "eval_corr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_cli(args, cwd=ROOT):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "eval_corr.py"), *map(str, args), "--quiet"],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _check_json(path, names, num_pairs):
    out = json.loads(Path(path).read_text())
    assert out["num_pairs"] == num_pairs
    assert set(out["methods"]) == set(names)
    for name in names:
        for key in METRICS:
            assert isinstance(out["methods"][name][key], float), (name, key)
    for key in ("data", "thresholds", "seed", "ratio_threshold"):
        assert key in out
    return out


def _cli_error(cli, argv, capsys) -> str:
    """The one stderr line of a refused eval_corr.py run (exit code 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eval_corr.py: error: "), err
    return err[0]


def test_cli_with_saved_model_on_synthetic(synthetic_pairs, tmp_path, capsys):
    from n3sets.models import CNNet
    from n3sets.pretrained import save_model

    data, _ = synthetic_pairs
    weights = save_model(tmp_path / "tiny-cnnet.pt", CNNet(num_blocks=1, channels=8))
    out_json, out_png = tmp_path / "res.json", tmp_path / "res.png"
    cli = _load_cli()
    args = ["--data", data, "--weights", weights, "--json", out_json, "--png", out_png, "--max-pairs", 3]
    cli.main([str(a) for a in args] + ["--quiet"])
    names = list(BASELINES) + ["tiny-cnnet", "tiny-cnnet+ransac"]
    out = _check_json(out_json, names, 3)
    assert out["weights"]["tiny-cnnet"]["path"] == str(weights)
    assert len(out["weights"]["tiny-cnnet"]["sha256"]) == 64
    # Baselines reused from that file: same numbers, models evaluated again.
    again = tmp_path / "again.json"
    cli.main([str(a) for a in args[:4]] + ["--json", str(again), "--max-pairs", "3", "--quiet",
                                          "--reuse-baselines", str(out_json)])
    out2 = _check_json(again, names, 3)
    assert out2["methods"]["ransac"] == out["methods"]["ransac"]
    assert out2["methods"]["tiny-cnnet"]["mAP20"] == out["methods"]["tiny-cnnet"]["mAP20"]
    err = _cli_error(cli, ["--data", data, "--max-pairs", "3", "--threshold", "2e-3", "--quiet",
                           "--reuse-baselines", out_json], capsys)
    assert "--reuse-baselines" in err and "thresholds" in err
    assert out_png.stat().st_size > 1000


def test_cli_missing_inputs(synthetic_pairs, tmp_path, capsys):
    cli = _load_cli()
    err = _cli_error(cli, ["--data", tmp_path / "nope.h5"], capsys)
    assert "--data" in err and "nope.h5" in err and "no such file" in err
    data = tmp_path / "empty.h5"
    data.touch()
    err = _cli_error(cli, ["--data", data], capsys)
    assert "empty.h5" in err and "not a readable HDF5 file" in err
    good, _ = synthetic_pairs
    err = _cli_error(cli, ["--data", good, "--weights", "no-such-model"], capsys)
    assert "--weights no-such-model" in err and "not a shipped model name" in err
    # an h5 dataset given as weights: said plainly, without torch's advice to unpickle it anyway
    err = _cli_error(cli, ["--data", good, "--weights", good], capsys)
    assert "HDF5 file" in err and "weights_only" not in err
    err = _cli_error(cli, ["--data", good, "--json", tmp_path], capsys)
    assert "--json" in err and "folder" in err


def test_cli_weights_repeated_or_listed_mean_the_same():
    cli = _load_cli()
    a = cli.parse_args(["--data", "d.h5", "--weights", "x", "--weights", "y"])
    b = cli.parse_args(["--data", "d.h5", "--weights", "x", "y"])
    assert a.weights == b.weights == ["x", "y"]
    assert cli.parse_args(["--data", "d.h5"]).weights == []


@pytest.fixture(scope="module")
def real_fixture(tmp_path_factory, request):
    """A tiny entry-P10 h5 (3 neighbouring views, few keypoints) built with data_prep's builder."""
    strecha_root = request.getfixturevalue("strecha_root")
    from dataclasses import replace

    from data_prep.build import BuildConfig, build_dataset
    from data_prep.scenes import read_strecha_scene

    scene = read_strecha_scene(strecha_root / "entry-P10")
    keep = slice(3, 6)  # neighbouring views: wide enough baselines, plenty of overlap
    scene = replace(
        scene,
        image_paths=scene.image_paths[keep], image_names=scene.image_names[keep],
        K=scene.K[keep], R=scene.R[keep], t=scene.t[keep], sizes=scene.sizes[keep],
    )
    tmp = tmp_path_factory.mktemp("real")
    out = tmp / "entry_tiny.h5"
    cfg = BuildConfig(num_kp=400, max_pairs=4, min_verified=8, cache_dir=str(tmp / "cache"))
    build_dataset([scene], out, cfg, progress=False)
    return out


@pytest.mark.data
def test_cli_on_real_fixture(real_fixture, tmp_path):
    from data_prep.corr_dataset import CorrespondenceDataset
    from n3sets.models import N3Net
    from n3sets.pretrained import save_model

    num_pairs = len(CorrespondenceDataset(real_fixture))
    assert num_pairs >= 2
    weights = save_model(tmp_path / "n3-side.pt", N3Net(side_info=True, num_blocks=2, channels=16, n3_after=1))
    out_json = tmp_path / "real.json"
    _run_cli(["--data", real_fixture, "--weights", weights, "--json", out_json])
    names = list(BASELINES) + ["n3-side", "n3-side+ransac"]
    out = _check_json(out_json, names, num_pairs)
    # Real SIFT matches of overlapping neighbouring views: the baselines find the pose.
    assert out["methods"]["ratio+ransac"]["mAP20"] > 0.5
    assert out["methods"]["ransac"]["precision"] > 0.5
    assert all(len(out["errors"][n]) == num_pairs for n in names)
