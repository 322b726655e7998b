import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longtail.evaluation import (
    confusion_matrix,
    evaluate_logits,
    expected_calibration_error,
    per_class_accuracy,
    reliability_bins,
    shot_groups,
    topk_accuracy,
)

# --- top-k -------------------------------------------------------------------------------------

LOGITS = torch.tensor(
    [
        [0.1, 0.5, 0.4],  # label 2: 2nd
        [0.9, 0.05, 0.05],  # label 0: 1st
        [0.2, 0.3, 0.5],  # label 0: 3rd
        [0.6, 0.3, 0.1],  # label 1: 2nd
    ]
)
LABELS = torch.tensor([2, 0, 0, 1])


@pytest.mark.parametrize(("k", "expected"), [(1, 0.25), (2, 0.75), (3, 1.0)])
def test_topk_hand_computed(k, expected):
    assert topk_accuracy(LOGITS, LABELS, k) == pytest.approx(expected)


def test_topk_accepts_numpy_and_lists():
    assert topk_accuracy(LOGITS.numpy(), LABELS.tolist(), 2) == pytest.approx(0.75)


@pytest.mark.parametrize("k", [0, 4, 5])
def test_topk_rejects_k_outside_classes(k):
    with pytest.raises(ValueError, match="k must be"):
        topk_accuracy(LOGITS, LABELS, k)


def test_topk_rejects_bad_shapes():
    with pytest.raises(ValueError):
        topk_accuracy(LOGITS, LABELS[:3])
    with pytest.raises(ValueError):
        topk_accuracy(LOGITS[:0], LABELS[:0])
    with pytest.raises(ValueError):
        topk_accuracy(LOGITS, torch.tensor([0, 1, 2, 3]))


# --- confusion and per-class -------------------------------------------------------------------

PREDS = [0, 1, 1, 2, 2, 2]
TRUE = [0, 0, 1, 2, 2, 1]


def test_confusion_hand_computed():
    expected = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 2, 0], [0, 0, 0, 0]])
    cm = confusion_matrix(torch.tensor(PREDS), torch.tensor(TRUE), 4)
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype == np.int64


def test_confusion_rejects_out_of_range():
    with pytest.raises(ValueError, match="preds"):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="labels"):
        confusion_matrix([0, 1], [0, -1], 3)
    with pytest.raises(ValueError, match="length"):
        confusion_matrix([0, 1], [0], 3)


def test_per_class_hand_computed_with_absent_class():
    acc = per_class_accuracy(np.array(PREDS), np.array(TRUE), 4)
    np.testing.assert_allclose(acc[:3], [0.5, 0.5, 1.0])
    assert math.isnan(acc[3])


# --- calibration -------------------------------------------------------------------------------

ECE_PROBS = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.45, 0.55], [0.55, 0.45]])
ECE_LABELS = torch.tensor([0, 1, 1, 0])


def test_ece_hand_computed():
    # Bin (14/15, 1]: acc 0.5, conf 0.95; bin (8/15, 9/15]: acc 1.0, conf 0.55.
    # ECE = 0.5 * 0.45 + 0.5 * 0.45.
    assert expected_calibration_error(ECE_PROBS, ECE_LABELS) == pytest.approx(0.45)


def test_ece_one_bin_is_global_gap():
    # Overall accuracy 0.75 equals mean confidence 0.75: errors cancel in a single bin.
    assert expected_calibration_error(ECE_PROBS, ECE_LABELS, n_bins=1) == pytest.approx(0.0)


def test_ece_bins_are_right_closed():
    # Confidence 0.5 falls in (0, 0.5], not with 0.75 in (0.5, 1]: 0.5*0.5 + 0.5*0.75.
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.75, 0.25, 0.0]])
    labels = torch.tensor([0, 1])
    assert expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.625)


def test_reliability_bins_hand_computed():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 1, 0])
    bins = reliability_bins(probs, labels, n_bins=2)
    assert bins["edges"] == [0.0, 0.5, 1.0]
    assert bins["count"] == [0, 4]
    assert bins["accuracy"] == [None, pytest.approx(0.5)]
    assert bins["confidence"] == [None, pytest.approx((0.9 + 0.8 + 0.7 + 0.55) / 4)]
    # ECE is the count-weighted gap of the same bins.
    ece = expected_calibration_error(probs, labels, n_bins=2)
    assert ece == pytest.approx(abs(0.5 - (0.9 + 0.8 + 0.7 + 0.55) / 4))


def test_ece_perfect_and_worst():
    one_hot = torch.eye(3)
    assert expected_calibration_error(one_hot, torch.tensor([0, 1, 2])) == 0.0
    assert expected_calibration_error(one_hot, torch.tensor([1, 2, 0])) == pytest.approx(1.0)


def test_ece_rejects_bad_bins():
    with pytest.raises(ValueError):
        expected_calibration_error(ECE_PROBS, ECE_LABELS, n_bins=0)


# --- shot groups -------------------------------------------------------------------------------


def test_shot_groups_boundaries():
    groups = shot_groups([5000, 120, 100, 50, 20, 19, 1])
    assert groups == {"many": [0, 1], "medium": [2, 3, 4], "few": [5, 6]}


def test_shot_groups_custom_thresholds_and_tensor_input():
    groups = shot_groups(torch.tensor([10, 5, 3, 1]), many=5, few=3)
    assert groups == {"many": [0], "medium": [1, 2], "few": [3]}
    counts = [101, 100, 50, 20, 19, 1]
    assert shot_groups(counts) == {"many": [0], "medium": [1, 2, 3], "few": [4, 5]}
    assert shot_groups(counts, many=19, few=1) == {
        "many": [0, 1, 2, 3],
        "medium": [4, 5],
        "few": [],
    }


def test_shot_groups_can_be_empty():
    assert shot_groups([500, 400]) == {"many": [0, 1], "medium": [], "few": []}


# --- evaluate_logits ---------------------------------------------------------------------------


def test_evaluate_logits_hand_computed():
    logits = torch.tensor([[2.0, 0, 0], [2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0], [2.0, 0, 0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    result = evaluate_logits(logits, labels, train_counts=[500, 50, 5])

    p_max = math.exp(2) / (math.exp(2) + 2)
    assert result["top1"] == pytest.approx(0.6)
    assert result["top5"] is None  # only 3 classes
    assert result["per_class"] == pytest.approx([1.0, 0.5, 0.0])
    assert (result["many"], result["medium"], result["few"]) == pytest.approx((1.0, 0.5, 0.0))
    assert result["ece"] == pytest.approx(p_max - 0.6)  # one bin: conf p_max, acc 0.6
    assert result["nll"] == pytest.approx(math.log(math.exp(2) + 2) - 6 / 5)
    assert result["confusion"] == [[2, 0, 0], [0, 1, 1], [1, 0, 0]]
    assert result["num_samples"] == 5
    assert set(result) == {
        "top1", "top5", "per_class", "many", "medium", "few", "ece", "reliability", "nll",
        "confusion", "num_samples",
    }  # fmt: skip
    bins = result["reliability"]
    full = [i for i, c in enumerate(bins["count"]) if c]
    assert [bins["count"][i] for i in full] == [5]  # every sample has confidence p_max
    assert bins["accuracy"][full[0]] == pytest.approx(0.6)
    assert bins["confidence"][full[0]] == pytest.approx(p_max)
    assert bins["edges"][full[0]] < p_max <= bins["edges"][full[0] + 1]


def test_evaluate_logits_top5_groups_and_json():
    torch.manual_seed(0)
    logits = torch.randn(40, 7)
    labels = torch.arange(40) % 6  # class 6 never appears
    counts = [5000, 120, 100, 50, 20, 19, 1]
    result = evaluate_logits(logits, labels, counts)
    assert result["top5"] == pytest.approx(topk_accuracy(logits, labels, 5))
    assert result["top1"] <= result["top5"]
    assert math.isnan(result["per_class"][6])
    # The few group's mean skips the absent class 6.
    assert result["few"] == pytest.approx(result["per_class"][5])
    assert result["nll"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())
    json.dumps(result)  # plain Python values only
    assert all(type(v) is float for v in result["per_class"])


def test_evaluate_logits_empty_or_unseen_group_is_none():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    result = evaluate_logits(logits, torch.tensor([0, 0]), [1000, 10])
    assert result["medium"] is None  # no medium classes at all
    assert result["few"] is None  # class 1 is few-shot but absent from the labels
    assert result["many"] == pytest.approx(0.5)


def test_evaluate_logits_checks_counts_length():
    with pytest.raises(ValueError, match="train_counts"):
        evaluate_logits(torch.zeros(2, 3), torch.tensor([0, 1]), [10, 10])


# --- properties --------------------------------------------------------------------------------


@st.composite
def predictions(draw):
    num_classes = draw(st.integers(1, 6))
    n = draw(st.integers(1, 30))
    labels = draw(st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n))
    logits = draw(
        st.lists(
            st.lists(st.floats(-5, 5), min_size=num_classes, max_size=num_classes),
            min_size=n,
            max_size=n,
        )
    )
    return torch.tensor(logits), torch.tensor(labels), num_classes


@settings(max_examples=50, deadline=None)
@given(predictions())
def test_metric_invariants(case):
    logits, labels, num_classes = case
    preds = logits.argmax(dim=1)
    cm = confusion_matrix(preds, labels, num_classes)
    assert cm.sum() == labels.numel()
    np.testing.assert_array_equal(cm.sum(axis=1), np.bincount(labels, minlength=num_classes))
    assert np.trace(cm) / cm.sum() == pytest.approx(topk_accuracy(logits, labels, 1))

    acc = per_class_accuracy(preds, labels, num_classes)
    present = np.bincount(labels, minlength=num_classes) > 0
    np.testing.assert_array_equal(np.isnan(acc), ~present)

    ks = range(1, num_classes + 1)
    topk = [topk_accuracy(logits, labels, k) for k in ks]
    assert topk == sorted(topk) and topk[-1] == 1.0

    ece = expected_calibration_error(logits.softmax(dim=1), labels)
    assert 0.0 <= ece <= 1.0


def test_topk_ties_break_like_argmax():
    logits = torch.zeros(3, 4)
    assert topk_accuracy(logits, torch.tensor([0, 0, 1])) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, torch.tensor([1, 2, 3]), k=2) == pytest.approx(1 / 3)
