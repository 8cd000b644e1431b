import math

import pytest
import torch

from n3sets.metrics import accuracy_curve, classification_metrics, mean_average_precision


def test_map_hand_computed():
    # accuracies at 5/10/15/20: 1/4, 2/4, 3/4, 3/4
    m = mean_average_precision([3.0, 7.0, 12.0, 30.0])
    assert m == pytest.approx({"mAP5": 0.25, "mAP10": 0.375, "mAP20": 0.5625})


def test_map_threshold_is_strict_and_failures_count_as_180():
    # 5.0 is not below 5; NaN and inf are failures (180) and stay in the denominator.
    m = mean_average_precision(torch.tensor([5.0, 0.0, float("nan"), float("inf")]), (5, 10, 20))
    assert m["mAP5"] == pytest.approx(0.25)
    assert m["mAP10"] == pytest.approx((0.25 + 0.5) / 2)
    assert m["mAP20"] == pytest.approx((0.25 + 0.5 + 0.5 + 0.5) / 4)


def test_map_other_thresholds_and_bad_input():
    m = mean_average_precision([1.0, 26.0], max_thresholds=(30,))
    # accuracies at 5..30: 0.5 x5, 1.0 at 30
    assert m == {"mAP30": pytest.approx((0.5 * 5 + 1.0) / 6)}
    with pytest.raises(ValueError):
        mean_average_precision([1.0], max_thresholds=(7,))
    with pytest.raises(ValueError):
        mean_average_precision([])


def test_accuracy_curve():
    acc = accuracy_curve([1.0, 4.0, 9.0, 179.0], [2, 5, 10, 180])
    assert acc.tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_classification_metrics_hand_computed_and_batched():
    pred = torch.tensor([[1, 1, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    label = torch.tensor([[1, 0, 1, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    out = classification_metrics(pred, label)
    # set 0: tp=2, predicted 3, true 3; set 1: nothing predicted -> precision 0, recall 0, f1 0
    assert out["precision"].tolist() == pytest.approx([2 / 3, 0.0])
    assert out["recall"].tolist() == pytest.approx([2 / 3, 0.0])
    assert out["f1"].tolist() == pytest.approx([2 / 3, 0.0])
    assert not any(torch.isnan(v).any() for v in out.values())


def test_classification_metrics_mask_ignores_padding():
    pred = torch.tensor([1.0, 1.0, 1.0, 0.0])
    label = torch.tensor([1.0, 1.0, 0.0, 1.0])
    mask = torch.tensor([True, True, False, False])
    out = classification_metrics(pred, label, mask)
    assert float(out["precision"]) == 1.0 and float(out["recall"]) == 1.0
    out = classification_metrics(pred, label)
    assert float(out["precision"]) == pytest.approx(2 / 3)
    assert float(out["recall"]) == pytest.approx(2 / 3)
    assert float(out["f1"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        classification_metrics(pred, label[:3])
