"""The paper's clinical lesion tasks, scored with ground-truth lesions as anchors.

For each ground-truth lesion the truth is its own attribute, computed on the ground-truth
mask; the model's answer is the same attribute of its matched predicted lesion, computed
on the prediction's own lesions (see :func:`analysis.lesions.match_lesions`). An
unmatched ground-truth lesion counts as a negative answer. Counts run over ground-truth
lesions, one category versus the rest:

* ``diffuse/diffuse``: diffuse (largest bone-region fraction >= threshold);
* ``weight_bearing/weight_bearing``: spine, pelvis or lower extremity;
* ``clustering/clustered``: at least one neighbouring lesion (``n_neighbours >= 1``);
* ``location/<bone>`` for skull, spine, rib, pelvis and extremity.

Two detection tasks complete the table:

* ``detection/lesion``: tp = matched ground-truth lesions, fn = unmatched ones,
  fp = predicted lesions overlapping no ground-truth lesion; tn is empty because there
  are no negative lesions, so specificity is undefined (NaN).
* ``detection/slice``: over every analysed axial slice, positive when it holds any
  lesion voxel (ground truth) or any predicted voxel (answer).

sensitivity = tp / (tp + fn) and specificity = tn / (tn + fp), NaN when the
denominator is 0 (or tn is undefined).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Counts", "binary_counts", "sensitivity", "specificity", "anchored_answers"]


@dataclass
class Counts:
    """Confusion counts of one task; ``tn`` is None where true negatives do not exist."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int | None = 0

    def __iadd__(self, other: "Counts") -> "Counts":
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.tn = None if self.tn is None or other.tn is None else self.tn + other.tn
        return self

    @property
    def sensitivity(self) -> float:
        return sensitivity(self.tp, self.fn)

    @property
    def specificity(self) -> float:
        return specificity(self.tn, self.fp)


def binary_counts(truth: np.ndarray, answer: np.ndarray) -> Counts:
    """tp, fp, fn, tn of boolean ``answer`` against boolean ``truth`` (same length)."""
    t = np.asarray(truth, bool)
    a = np.asarray(answer, bool)
    if t.shape != a.shape:
        raise ValueError(f"truth shape {t.shape} differs from answer shape {a.shape}")
    return Counts(tp=int((t & a).sum()), fp=int((~t & a).sum()), fn=int((t & ~a).sum()), tn=int((~t & ~a).sum()))


def sensitivity(tp: int, fn: int) -> float:
    """tp / (tp + fn); NaN when there are no positives."""
    return tp / (tp + fn) if tp + fn > 0 else float("nan")


def specificity(tn: int | None, fp: int) -> float:
    """tn / (tn + fp); NaN when there are no negatives or tn is undefined (None)."""
    if tn is None or tn + fp == 0:
        return float("nan")
    return tn / (tn + fp)


def anchored_answers(pred_values: np.ndarray, gt_match: np.ndarray, negative: object = False) -> np.ndarray:
    """The model's answer for each ground-truth lesion: its matched predicted lesion's value.

    Args:
        pred_values: one value per predicted lesion (index ``id - 1``).
        gt_match: per ground-truth lesion the matched predicted id, 0 for none.
        negative: the answer for unmatched ground-truth lesions.

    Returns:
        Array of one answer per ground-truth lesion.
    """
    pred_values = np.asarray(pred_values)
    gt_match = np.asarray(gt_match, np.int64)
    out = np.full(gt_match.shape, negative, dtype=pred_values.dtype if pred_values.size else object)
    hit = gt_match > 0
    if hit.any():
        out[hit] = pred_values[gt_match[hit] - 1]
    return out
