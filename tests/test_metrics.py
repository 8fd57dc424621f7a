"""GLUE metrics against hand-computed values and independent formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import rankdata

from q8core import metrics

# A small binary example, counted by hand:
#   idx   0  1  2  3  4  5  6  7
#   pred  1  1  0  0  1  0  1  0
#   label 1  0  0  1  1  0  0  0
# TP (pred 1, label 1): idx 0, 4     -> 2
# FP (pred 1, label 0): idx 1, 6     -> 2
# FN (pred 0, label 1): idx 3        -> 1
# TN (pred 0, label 0): idx 2, 5, 7  -> 3
PREDS = np.array([1, 1, 0, 0, 1, 0, 1, 0])
LABELS = np.array([1, 0, 0, 1, 1, 0, 0, 0])
TP, FP, FN, TN = 2, 2, 1, 3


def test_accuracy_hand():
    assert metrics.accuracy(PREDS, LABELS) == pytest.approx((TP + TN) / 8)  # 5/8
    assert metrics.accuracy(PREDS, LABELS) == pytest.approx(0.625)


def test_f1_hand():
    precision = TP / (TP + FP)  # 1/2
    recall = TP / (TP + FN)  # 2/3
    expected = 2 * precision * recall / (precision + recall)  # = 2TP / (2TP + FP + FN) = 4/7
    assert expected == pytest.approx(4 / 7)
    assert metrics.f1(PREDS, LABELS) == pytest.approx(4 / 7)


def test_f1_positive_class_is_one():
    # swapping the class labels changes F1: positive class is 1
    # flipped: TP'=TN=3, FP'=FN=1, FN'=FP=2 -> 6 / (6 + 1 + 2) = 2/3
    assert metrics.f1(1 - PREDS, 1 - LABELS) == pytest.approx(2 / 3)


def test_mcc_hand():
    expected = (TP * TN - FP * FN) / math.sqrt((TP + FP) * (TP + FN) * (TN + FP) * (TN + FN))
    # (6 - 2) / sqrt(4 * 3 * 5 * 4) = 4 / sqrt(240)
    assert expected == pytest.approx(4 / math.sqrt(240))
    assert metrics.mcc(PREDS, LABELS) == pytest.approx(4 / math.sqrt(240))


def test_mcc_perfect_and_inverse():
    assert metrics.mcc(LABELS, LABELS) == pytest.approx(1.0)
    assert metrics.mcc(1 - LABELS, LABELS) == pytest.approx(-1.0)


def test_pearson_vs_corrcoef():
    rng = np.random.default_rng(0)
    labels = rng.uniform(0, 5, 50)
    preds = labels + rng.normal(0, 1, 50)
    assert metrics.pearson(preds, labels) == pytest.approx(np.corrcoef(preds, labels)[0, 1], rel=1e-9)


def test_pearson_hand():
    # x = [1,2,3], y = [1,3,2]: dx = [-1,0,1], dy = [-1,1,0] -> cov 1, var 2 each -> 1/2
    assert metrics.pearson(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])) == pytest.approx(0.5)


def test_spearman_vs_pearson_of_ranks_with_ties():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, 40).astype(float)  # many ties
    preds = labels + rng.normal(0, 1.5, 40)
    preds[:5] = preds[5]  # ties in preds as well
    expected = np.corrcoef(rankdata(preds), rankdata(labels))[0, 1]
    assert metrics.spearman(preds, labels) == pytest.approx(expected, rel=1e-9)


def test_spearman_monotone_is_one_while_pearson_is_not():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    y = x**3
    assert metrics.spearman(x, y) == pytest.approx(1.0)
    assert metrics.pearson(x, y) < 0.99


def test_corr_is_mean_of_pearson_and_spearman():
    rng = np.random.default_rng(2)
    labels = rng.uniform(0, 5, 30)
    preds = np.exp(labels / 2) + rng.normal(0, 0.5, 30)
    p = np.corrcoef(preds, labels)[0, 1]
    s = np.corrcoef(rankdata(preds), rankdata(labels))[0, 1]
    assert abs(p - s) > 1e-3  # the example separates the two
    assert metrics.corr(preds, labels) == pytest.approx((p + s) / 2, rel=1e-9)


def test_compute_returns_exactly_requested_names_as_floats():
    names = ("f1", "accuracy")
    out = metrics.compute(names, PREDS, LABELS)
    assert list(out) == ["f1", "accuracy"]
    assert all(type(v) is float for v in out.values())
    assert out["f1"] == pytest.approx(4 / 7)
    assert out["accuracy"] == pytest.approx(0.625)


def test_compute_all_metrics_floats():
    names = ["pearson", "spearmanr", "corr", "accuracy", "f1", "mcc"]
    preds = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    labels = np.array([0.0, 1.0, 0.0, 0.0, 1.0])
    out = metrics.compute(names, preds, labels)
    assert list(out) == names
    assert all(type(v) is float for v in out.values())
    # TP 2, FP 1, FN 0, TN 2
    assert out["accuracy"] == pytest.approx(4 / 5)
    assert out["f1"] == pytest.approx(4 / 5)
    assert out["mcc"] == pytest.approx((2 * 2 - 1 * 0) / math.sqrt(3 * 2 * 3 * 2))
    assert out["pearson"] == pytest.approx(np.corrcoef(preds, labels)[0, 1])


def test_compute_empty_names():
    assert metrics.compute([], PREDS, LABELS) == {}


def test_compute_flattens_column_predictions():
    out = metrics.compute(["accuracy"], PREDS.reshape(-1, 1), LABELS)
    assert out == {"accuracy": pytest.approx(0.625)}


def test_compute_mismatched_lengths():
    with pytest.raises(ValueError, match=r"3 predictions for 4 labels"):
        metrics.compute(["accuracy"], np.array([1, 0, 1]), np.array([1, 0, 1, 1]))
