"""How two masks, or two sets of lesions, overlap: Dice, precision and recall, the pairs of
lesions that share voxels, and the matching of predicted to ground-truth lesions.

Definitions (Pawan, Rich et al., "Deep learning-based detection and segmentation of
osseous metastatic prostate cancer lesions on CT", pixel metrics)::

    tp = |P & R|,  dice = 2 tp / (|P| + |R|),  precision = tp / |P|,  recall = tp / |R|

with ``P`` the predicted (or second) and ``R`` the reference (or first) voxels.

**Empty masks, defined here once for every caller** (a ratio whose denominator is 0 is NaN):

* both empty: Dice, precision and recall are NaN;
* empty reference, non-empty prediction: Dice 0, precision 0, recall NaN;
* empty prediction, non-empty reference: Dice 0, precision 0, recall 0.

For example (one shared voxel of 2 + 2), then the three empty cases::

    >>> a, b, empty = np.array([1, 1, 0, 0]), np.array([0, 1, 1, 0]), np.zeros(4)
    >>> dice(a, b), precision(a, b), recall(a, b)
    (0.5, 0.5, 0.5)
    >>> dice(empty, empty), precision(empty, empty), recall(empty, empty)
    (nan, nan, nan)
    >>> dice(a, empty), precision(a, empty), recall(a, empty)  # an empty reference
    (0.0, 0.0, nan)
    >>> dice(empty, b), precision(empty, b), recall(empty, b)  # an empty prediction
    (0.0, 0.0, 0.0)

Why NaN and not 1 (or 0) when both are empty: Dice is 0/0 there, and each number a
convention puts in its place answers a question of the caller's, not of the masks. 1
("perfect agreement") lifts a cohort's mean with every lesion-free case a model leaves
empty and so rewards predicting nothing; 0 punishes a correct empty answer. Reinke et al.
("Understanding metric-related pitfalls in image analysis validation", Nat. Methods 2024,
the "empty reference" pitfall) and Maier-Hein et al. ("Metrics reloaded", Nat. Methods
2024) ask that this case be decided explicitly by the use. So the metric says "undefined"
and each caller that needs a number states its choice where it calls, e.g.
``value = dice(a, b); 0.0 if math.isnan(value) else value``: the per-case and per-slice
aggregations of :mod:`analysis.evaluation.metrics.overlap`, the registration check's bone
Dice (:func:`analysis.monitoring.registration.bone_dice`: 0, no bone is no alignment) and
the crop check of :mod:`analysis.prediction.runner` (recorded as null) each do.

Lesions (3D connected components, :func:`analysis.lesions.instances.lesion_instances`) of
two label volumes overlap when they share a voxel: :func:`overlap_pairs` lists every such
pair once, for the any-overlap rule of :func:`match_lesions` and the lesion-wise metrics
(:mod:`analysis.evaluation.metrics.lesionwise`, FROC) and for the follow-up's matching of
two scans (:mod:`analysis.monitoring.matching`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["OverlapCounts", "overlap_counts", "dice", "precision", "recall", "dice_from_counts",
           "precision_from_counts", "recall_from_counts", "overlap_pairs", "match_lesions"]


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
    """Dice ``2 tp / (|P| + |R|)``; NaN where both are empty (module docstring)."""
    return _ratio(2 * np.asarray(c.tp), np.asarray(c.n_pred) + np.asarray(c.n_ref))


def precision_from_counts(c: OverlapCounts) -> np.ndarray:
    """Precision ``tp / |P|``; 0 for an empty prediction of a non-empty reference, NaN when both are empty."""
    out = _ratio(c.tp, c.n_pred)
    return np.where((np.asarray(c.n_pred) == 0) & (np.asarray(c.n_ref) > 0), 0.0, out)


def recall_from_counts(c: OverlapCounts) -> np.ndarray:
    """Recall ``tp / |R|``; NaN when the reference is empty."""
    return _ratio(c.tp, c.n_ref)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient of two binary masks of one shape (examples and empty masks: module docstring)."""
    return float(dice_from_counts(overlap_counts(pred, ref)))


def precision(pred: np.ndarray, ref: np.ndarray) -> float:
    """Precision (positive predictive value) of ``pred`` against ``ref`` (module docstring)."""
    return float(precision_from_counts(overlap_counts(pred, ref)))


def recall(pred: np.ndarray, ref: np.ndarray) -> float:
    """Recall (sensitivity) of ``pred`` against ``ref`` (module docstring)."""
    return float(recall_from_counts(overlap_counts(pred, ref)))


def overlap_pairs(labels_a: np.ndarray, labels_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of a lesion of ``labels_a`` and a lesion of ``labels_b`` that share voxels,
    with the shared voxel count.

    Args:
        labels_a, labels_b: label volumes of one shape, ``(slices, rows, cols)`` (0 =
            background, lesions ``1..n``): e.g. ground truth and prediction, or a baseline and
            its follow-up resampled onto the baseline grid.

    Returns:
        ``(ids_a, ids_b, shared)``: int64 arrays, one entry per overlapping pair, sorted by the
        id in ``labels_a`` then the id in ``labels_b``.

    Raises:
        ValueError: the shapes differ.

    Examples:
        Lesion 1 of A touches lesions 1 and 2 of B; lesion 2 of A touches nothing:

        >>> a = np.array([[[1, 1, 1, 0, 2]]]); b = np.array([[[1, 2, 2, 0, 0]]])
        >>> [x.tolist() for x in overlap_pairs(a, b)]
        [[1, 1], [1, 2], [1, 2]]
    """
    if labels_a.shape != labels_b.shape:
        raise ValueError(f"label volumes of shapes {labels_a.shape} and {labels_b.shape}; expected one shape")
    both = (labels_a != 0) & (labels_b != 0)
    a = labels_a[both].astype(np.int64)
    b = labels_b[both].astype(np.int64)
    if a.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty.copy(), empty.copy()
    base = int(b.max()) + 1
    keys, shared = np.unique(a * base + b, return_counts=True)
    return keys // base, keys % base, shared.astype(np.int64)


def _best_partner(ids: np.ndarray, partners: np.ndarray, shared: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For each id ``1..n``: the partner with the most shared voxels (ties: the lower partner id)
    and that count; 0 and 0 for an id without a pair."""
    best = np.zeros(n, np.int64)
    count = np.zeros(n, np.int64)
    if ids.size:
        order = np.lexsort((partners, -shared, ids))
        first = order[np.r_[True, ids[order][1:] != ids[order][:-1]]]
        best[ids[first] - 1] = partners[first]
        count[ids[first] - 1] = shared[first]
    return best, count


def match_lesions(gt_labels: np.ndarray, n_gt: int, pred_labels: np.ndarray, n_pred: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Match predicted to ground-truth lesions by shared voxels (:func:`overlap_pairs`).

    A predicted lesion matches a ground-truth lesion when they share at least one voxel
    (the BraTS/autoPET/MedPy hit rule). A ground-truth lesion's match is the overlapping
    predicted lesion with the most shared voxels, and a predicted lesion's is the
    overlapping ground-truth lesion with the most shared voxels; ties go to the lower id.

    Args:
        gt_labels, pred_labels: label volumes of one shape (0 = background).
        n_gt, n_pred: their lesion counts.

    Returns:
        ``(gt_match, gt_shared, pred_match)``: for each ground-truth lesion the id of its
        predicted match (0 = none) and the shared voxel count; for each predicted lesion
        the id of its ground-truth match (0 = overlaps no ground-truth lesion).

    Examples:
        >>> gt = np.array([[[1, 1, 1, 0, 2]]]); pred = np.array([[[1, 2, 2, 0, 0]]])
        >>> [x.tolist() for x in match_lesions(gt, 2, pred, 2)]
        [[2, 0], [2, 0], [1, 1]]
    """
    g, p, shared = overlap_pairs(gt_labels, pred_labels)
    gt_match, gt_shared = _best_partner(g, p, shared, n_gt)
    pred_match, _ = _best_partner(p, g, shared, n_pred)
    return gt_match, gt_shared, pred_match
