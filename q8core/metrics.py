"""GLUE task metrics, computed by SciPy and scikit-learn.

A task declares metric names from :data:`METRICS`; :func:`compute` returns them as plain floats.
``corr`` is the mean of Pearson and Spearman (the ModelZoo's STS-B summary number).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def pearson(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(pearsonr(preds, labels)[0])


def spearman(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(spearmanr(preds, labels)[0])


def corr(preds: np.ndarray, labels: np.ndarray) -> float:
    return (pearson(preds, labels) + spearman(preds, labels)) / 2.0


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(accuracy_score(labels, preds))


def f1(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(f1_score(labels, preds))


def mcc(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(matthews_corrcoef(labels, preds))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "pearson": pearson,
    "spearmanr": spearman,
    "corr": corr,
    "accuracy": accuracy,
    "f1": f1,
    "mcc": mcc,
}


def compute(names: tuple[str, ...] | list[str], preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Each named metric of ``preds`` against ``labels`` (same length, 1-D)."""
    preds, labels = np.asarray(preds).reshape(-1), np.asarray(labels).reshape(-1)
    if preds.shape != labels.shape:
        raise ValueError(f"{preds.shape[0]} predictions for {labels.shape[0]} labels")
    return {name: METRICS[name](preds, labels) for name in names}
