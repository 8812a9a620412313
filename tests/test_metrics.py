"""Metric values against ones computed by hand on a fixed set of predictions."""

import numpy as np
import pytest

from pneumonia.metrics import (
    auroc,
    average_precision,
    binary_metrics,
    bootstrap_intervals,
    confusion_matrix,
    expected_calibration_error,
    multiclass_metrics,
    roc_curve,
    specificity_at_sensitivity,
    threshold_for_sensitivity,
    youden_threshold,
)

# 4 negatives, 4 positives
Y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
P = np.array([0.1, 0.3, 0.6, 0.2, 0.8, 0.4, 0.9, 0.7])


def test_confusion_counts_and_rates_at_a_threshold():
    m = binary_metrics(Y, P, 0.5)
    # predicted positive: 0.6 (neg), 0.8, 0.9, 0.7 (pos) -> TP 3, FP 1, FN 1 (0.4), TN 3
    assert (m["false_positives"], m["false_negatives"]) == (1, 1)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)


def test_auroc_counts_ordered_pairs():
    # of 16 (pos, neg) pairs only (0.4 vs 0.6) is misordered
    assert auroc(Y, P) == pytest.approx(15 / 16)
    assert auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # ties count half


def test_average_precision_by_hand():
    # ranked: .9+ .8+ .7+ .6- .4+ : precision at each positive 1, 1, 1, 4/5; recall steps 1/4
    assert average_precision(Y, P) == pytest.approx((1 + 1 + 1 + 0.8) / 4)


def test_roc_curve_points():
    fpr, tpr, thresholds = roc_curve(Y, P)
    assert thresholds[0] == np.inf and (fpr[0], tpr[0]) == (0, 0)
    assert (fpr[-1], tpr[-1]) == (1, 1)
    i = list(thresholds).index(0.4)
    assert (fpr[i], tpr[i]) == (0.25, 1.0)


def test_operating_points():
    # full sensitivity first reached at 0.4, where one negative (0.6) is above it
    assert threshold_for_sensitivity(Y, P, 0.99) == pytest.approx(0.4)
    assert specificity_at_sensitivity(Y, P, 0.99) == pytest.approx(0.75)
    assert specificity_at_sensitivity(Y, P, 0.75) == pytest.approx(1.0)  # at 0.7
    # J = tpr - fpr: 0.7 -> 0.75, 0.4 -> 0.75; the higher threshold wins the tie
    assert youden_threshold(Y, P) == pytest.approx(0.7)


def test_multiclass_metrics_and_confusion():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    cm = confusion_matrix(y, pred, 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    m = multiclass_metrics(y, pred, ["normal", "bacterial", "viral"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision_bacterial"] == pytest.approx(2 / 3)
    assert m["recall_viral"] == pytest.approx(1 / 2)
    assert m["f1_normal"] == pytest.approx(0.5)


def test_expected_calibration_error_by_hand():
    y = np.array([1, 0, 1, 1])
    p = np.array([0.95, 0.95, 0.15, 0.15])
    # bin 9: mean p .95, observed .5 -> .45; bin 1: mean p .15, observed 1 -> .85; equal weights
    assert expected_calibration_error(y, p) == pytest.approx(0.5 * 0.45 + 0.5 * 0.85)


def test_bootstrap_interval_brackets_the_estimate_and_shrinks_with_more_data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    lo, hi = bootstrap_intervals(lambda a, b: binary_metrics(a, b, 0.5), (y, p), n=300)["accuracy"]
    assert lo < binary_metrics(y, p, 0.5)["accuracy"] < hi
    big = np.tile(y, 10), np.tile(p, 10)
    lo2, hi2 = bootstrap_intervals(lambda a, b: binary_metrics(a, b, 0.5), big, n=300)["accuracy"]
    assert hi2 - lo2 < (hi - lo) / 2
