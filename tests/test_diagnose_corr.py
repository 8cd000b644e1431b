import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("diagnose_corr", ROOT / "pipelines" / "diagnose_corr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Leaky(torch.nn.Module):
    """Logit 10 on ground-truth inliers and ``outlier_logit`` on outliers (a fixed weight leak)."""

    def __init__(self, labels, outlier_logit):
        super().__init__()
        self.conf = {"side_info": False, "in_channels": 4}
        self.labels, self.outlier_logit, self.calls = labels, outlier_logit, 0

    def forward(self, x, mask=None):
        label = self.labels[self.calls % len(self.labels)]
        self.calls += 1
        return torch.where(label > 0.5, 10.0, self.outlier_logit)[None]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from data_prep.corr_dataset import CorrespondenceDataset
    from data_prep.synthetic import write_synthetic_dataset

    path = tmp_path_factory.mktemp("diag") / "syn.h5"
    write_synthetic_dataset(path, 5, seed=4, num_matches=(200, 300), outlier_ratio=0.5)
    return path, CorrespondenceDataset(path)


def test_outlier_weight_is_measured_and_its_cost_isolated(data):
    diag = _load()
    _, ds = data
    labels = [ds[i]["label"] for i in range(len(ds))]
    out = diag.diagnose(ds, {"leaky": _Leaky(labels, 0.5), "clean": _Leaky(labels, -10.0)})
    m = out["methods"]
    assert out["num_pairs"] == len(ds)
    assert m["labels"]["mAP5"] == 1.0 and m["clean"]["mAP5"] == 1.0
    assert m["clean"]["outlier_weight_share_median"] == 0.0
    # outliers at weight tanh(0.5): their share of the weight, exactly, and the pose it costs
    w = torch.tanh(torch.tensor(0.5)).item()
    expect = [w * float((l < 0.5).sum()) / (float((l > 0.5).sum()) + w * float((l < 0.5).sum())) for l in labels]
    assert m["leaky"]["outlier_weight_share_mean"] == pytest.approx(sum(expect) / len(expect), rel=1e-5)
    assert m["leaky|inliers"]["mAP5"] == 1.0
    assert m["leaky"]["median_error_deg"] > 5 * m["leaky|inliers"]["median_error_deg"]
    # the Hartley-normalised solve is a different estimator on the same weights: exact on clean
    # weights, a different (not identical) error where outliers carry weight
    assert m["clean|hartley"]["mAP5"] == 1.0 and m["labels|hartley"]["mAP5"] == 1.0
    assert m["leaky|hartley"]["median_error_deg"] != m["leaky"]["median_error_deg"]


def test_cli_writes_json(data, tmp_path):
    from n3sets.models import N3Net
    from n3sets.pretrained import save_model

    diag = _load()
    path, _ = data
    torch.manual_seed(0)
    weights = save_model(tmp_path / "tiny.pt", N3Net({"channels": 8, "num_blocks": 2, "n3_after": 1, "k": 1,
                                                       "embed_channels": 4}).eval())
    out = diag.main(["--data", str(path), "--weights", str(weights), "--json", str(tmp_path / "d.json"),
                     "--max-pairs", "2"])
    saved = json.loads((tmp_path / "d.json").read_text())
    assert saved["num_pairs"] == 2 == out["num_pairs"]
    assert set(saved["methods"]) == {"labels", "labels|hartley", "tiny", "tiny|inliers", "tiny|binary", "tiny|hartley"}
    assert 0.0 <= saved["methods"]["tiny"]["outlier_weight_share_median"] <= 1.0
    assert saved["command"].startswith("python pipelines/diagnose_corr.py --data")


def test_cli_weights_forms_and_bad_input(data, tmp_path, capsys):
    diag = _load()
    a = diag.parse_args(["--data", "d.h5", "--weights", "x", "--weights", "y"])
    b = diag.parse_args(["--data", "d.h5", "--weights", "x", "y"])
    assert a.weights == b.weights == ["x", "y"]
    path, _ = data
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    for argv, words in ((["--data", str(tmp_path / "nope.h5"), "--weights", "x"], ("--data", "nope.h5", "no such file")),
                        (["--data", str(empty), "--weights", "x"], ("empty.h5", "not a readable HDF5 file")),
                        (["--data", str(path), "--weights", "no-such-model"], ("--weights no-such-model",)),
                        (["--data", str(path), "--weights", str(path)], ("HDF5 file", "not a weight file"))):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            diag.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("diagnose_corr.py: error: "), err
        assert all(w in err[0] for w in words), err[0]
