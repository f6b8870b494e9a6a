"""Pixel overlap per case (3D) and per slice: the aggregations ``analyze`` reports, on top of the
one Dice, precision and recall of :mod:`analysis.lesions.overlap` (definitions, and the rule
for empty masks, there).

On top of that rule, each aggregation says what it scores: a case whose ground truth is empty
gets NaN for all three (:func:`case_overlap`: nothing is guessed), and per slice only the slices
with ground truth are scored (:func:`slice_overlap`).
"""
from __future__ import annotations

import numpy as np

from analysis.lesions.overlap import (OverlapCounts, dice_from_counts, overlap_counts, precision_from_counts,
                                      recall_from_counts)

__all__ = ["case_overlap", "slice_overlap"]


def case_overlap(pred: np.ndarray, ref: np.ndarray) -> dict[str, float | int]:
    """Per-case (3D) metrics of a ``(slices, rows, cols)`` prediction against its ground truth.

    A case with an empty ground truth gets NaN Dice, precision and recall (left empty,
    not guessed), whatever the prediction.

    Returns:
        ``{"dice", "precision", "recall", "gt_voxels", "pred_voxels"}``.
    """
    c = overlap_counts(pred, ref)
    empty = int(c.n_ref) == 0
    return {
        "dice": np.nan if empty else float(dice_from_counts(c)),
        "precision": np.nan if empty else float(precision_from_counts(c)),
        "recall": np.nan if empty else float(recall_from_counts(c)),
        "gt_voxels": int(c.n_ref),
        "pred_voxels": int(c.n_pred),
    }


def slice_overlap(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-slice metrics over the slices where the ground truth has lesion voxels.

    Vectorised: counts are sums over axes 1 and 2 of ``(slices, rows, cols)`` volumes.
    On the returned slices an empty prediction gives Dice 0, precision 0, recall 0, so
    every model is scored on the same slice set and the values pair across models.

    Returns:
        ``(slices, dice, precision, recall)``: the axial indices (int64, ascending) and
        one float64 value per slice.

    Examples:
        Slice 1 has no ground truth and is left out; slice 2 is missed:

        >>> ref = np.zeros((3, 1, 2), bool); ref[0, 0, :] = ref[2, 0, 0] = True
        >>> pred = np.zeros((3, 1, 2), bool); pred[0, 0, 0] = pred[1, 0, 0] = True
        >>> z, d, p, r = slice_overlap(pred, ref)
        >>> z.tolist(), d.tolist(), p.tolist(), r.tolist()
        ([0, 2], [0.6666666666666666, 0.0], [1.0, 0.0], [0.5, 0.0])
    """
    if np.ndim(pred) != 3:
        raise ValueError(f"expected (slices, rows, cols) volumes, got shape {np.shape(pred)}")
    c = overlap_counts(pred, ref, axis=(1, 2))
    z = np.flatnonzero(c.n_ref > 0)
    sub = OverlapCounts(c.tp[z], c.n_pred[z], c.n_ref[z])
    return z.astype(np.int64), dice_from_counts(sub), precision_from_counts(sub), recall_from_counts(sub)
