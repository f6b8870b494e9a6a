"""Slice-level detection metrics for classifiers that score each axial slice.

A slice's label is positive when the ground truth has any lesion voxel in it; a
prediction is positive when its probability is >= the threshold (0.5 by default).

* accuracy = (tp + tn) / N; precision = tp / (tp + fp) (NaN with no positive
  predictions); recall = tp / (tp + fn) (NaN with no positive slices);
  F1 = 2 tp / (2 tp + fp + fn) (NaN when that is 0/0).
* ROC AUC = probability that a random positive slice scores above a random negative
  one, ties counting one half (Mann-Whitney U / (n_pos n_neg), with average ranks);
  NaN when either class is absent.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from analysis.evaluation.metrics.clinical import binary_counts

__all__ = ["roc_auc", "slice_detection"]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Rank-based ROC AUC with ties counted as one half.

    Args:
        labels: bool (or 0/1) truth per slice.
        scores: probabilities (any real scores) per slice.

    Returns:
        The AUC, or NaN when all labels are equal.
    """
    y = np.asarray(labels, bool)
    s = np.asarray(scores, np.float64)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks for ties
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def slice_detection(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, recall, F1 at ``threshold`` (>=) and ROC AUC.

    Args:
        labels: bool truth per slice.
        probabilities: probability per slice in [0, 1].
        threshold: a slice is predicted positive when its probability >= threshold.

    Returns:
        ``{"accuracy", "precision", "recall", "f1", "auc", "n_slices"}``.
    """
    y = np.asarray(labels, bool)
    p = np.asarray(probabilities, np.float64)
    c = binary_counts(y, p >= threshold)
    n = y.size

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else float("nan")

    return {
        "accuracy": ratio(c.tp + c.tn, n),
        "precision": ratio(c.tp, c.tp + c.fp),
        "recall": ratio(c.tp, c.tp + c.fn),
        "f1": ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn),
        "auc": roc_auc(y, p),
        "n_slices": int(n),
    }
