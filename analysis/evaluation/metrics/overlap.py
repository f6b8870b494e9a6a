"""Pixel overlap metrics: Dice, precision and recall, per case (3D) and per slice.

Definitions (Pawan, Rich et al., "Deep learning-based detection and segmentation of
osseous metastatic prostate cancer lesions on CT", pixel metrics)::

    tp = |P & R|,  dice = 2 tp / (|P| + |R|),  precision = tp / |P|,  recall = tp / |R|

with ``P`` the predicted and ``R`` the reference (ground-truth) voxels.

Empty cases, defined here once and used everywhere:

* both empty: Dice, precision and recall are NaN (nothing to score);
* empty reference, non-empty prediction: Dice 0, precision 0, recall NaN;
* empty prediction, non-empty reference: Dice 0, precision 0, recall 0.

The analysis layer adds one rule on top (see :func:`case_overlap`): a case whose
ground truth is empty gets NaN for all three, so no value is guessed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["OverlapCounts", "overlap_counts", "dice", "precision", "recall",
           "dice_from_counts", "precision_from_counts", "recall_from_counts",
           "case_overlap", "slice_overlap"]


@dataclass(frozen=True)
class OverlapCounts:
    """Voxel counts, scalars or arrays of one shape (e.g. one value per slice).

    Attributes:
        tp: voxels in both prediction and reference.
        n_pred: voxels in the prediction.
        n_ref: voxels in the reference.
    """

    tp: np.ndarray
    n_pred: np.ndarray
    n_ref: np.ndarray


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    return pred.astype(bool, copy=False), ref.astype(bool, copy=False)


def overlap_counts(pred: np.ndarray, ref: np.ndarray, axis: int | tuple[int, ...] | None = None) -> OverlapCounts:
    """Count tp, |P| and |R|, summed over ``axis`` (all axes when None).

    Args:
        pred: predicted mask, any shape; non-zero is foreground.
        ref: reference mask of the same shape.
        axis: axes to sum over; ``(1, 2)`` on a ``(slices, rows, cols)`` volume gives
            one count per slice.

    Returns:
        The counts as int64 arrays (0-d when ``axis`` is None).

    Raises:
        ValueError: the shapes differ.
    """
    p, r = _check_pair(pred, ref)
    tp = np.logical_and(p, r).sum(axis=axis, dtype=np.int64)
    return OverlapCounts(np.asarray(tp), np.asarray(p.sum(axis=axis, dtype=np.int64)),
                         np.asarray(r.sum(axis=axis, dtype=np.int64)))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def dice_from_counts(c: OverlapCounts) -> np.ndarray:
    """Dice ``2 tp / (|P| + |R|)``; NaN where both are empty."""
    return _ratio(2 * c.tp, c.n_pred + c.n_ref)


def precision_from_counts(c: OverlapCounts) -> np.ndarray:
    """Precision ``tp / |P|``; 0 for an empty prediction of a non-empty reference, NaN when both are empty."""
    out = _ratio(c.tp, c.n_pred)
    return np.where((np.asarray(c.n_pred) == 0) & (np.asarray(c.n_ref) > 0), 0.0, out)


def recall_from_counts(c: OverlapCounts) -> np.ndarray:
    """Recall ``tp / |R|``; NaN when the reference is empty."""
    return _ratio(c.tp, c.n_ref)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient of two binary masks of one shape (empty cases: module docstring).

    Examples:
        One shared voxel out of 2 + 2: ``2 * 1 / 4``. Two empty masks give NaN:

        >>> dice(np.array([1, 1, 0, 0]), np.array([0, 1, 1, 0]))
        0.5
        >>> dice(np.zeros(4), np.zeros(4))
        nan
        >>> dice(np.array([1, 0]), np.zeros(2))
        0.0
    """
    return float(dice_from_counts(overlap_counts(pred, ref)))


def precision(pred: np.ndarray, ref: np.ndarray) -> float:
    """Precision (positive predictive value) of ``pred`` against ``ref`` (empty cases: module docstring).

    Examples:
        >>> precision(np.array([1, 1, 1, 0]), np.array([0, 1, 0, 0]))
        0.3333333333333333
        >>> precision(np.zeros(2), np.array([1, 0]))
        0.0
    """
    return float(precision_from_counts(overlap_counts(pred, ref)))


def recall(pred: np.ndarray, ref: np.ndarray) -> float:
    """Recall (sensitivity) of ``pred`` against ``ref`` (empty cases: module docstring).

    Examples:
        >>> recall(np.array([1, 1, 1, 0]), np.array([0, 1, 0, 1]))
        0.5
        >>> recall(np.array([1, 0]), np.zeros(2))
        nan
    """
    return float(recall_from_counts(overlap_counts(pred, ref)))


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
