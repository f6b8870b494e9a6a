"""Lesion-level evaluation: any-overlap detection, panoptic quality and BraTS lesion-wise Dice.

Lesions are the connected components of a binary mask ``(slices, rows, cols)``
(:func:`analysis.lesions.lesion_instances`, 26-connectivity by default). Every
function here takes label volumes that are already computed, so a mask is labelled once.
Per case, :func:`case_lesion_counts` reduces a (ground truth, prediction) pair to a few
integers and sums (:class:`LesionCounts`); counts add up over cases, and
:func:`lesionwise_metrics` turns the pooled counts into the reported values. The
bootstrap (:mod:`analysis.evaluation.bootstrap`) resamples the same per-case counts.

Definitions (all counts pooled over the analysed cases):

* **Any-overlap rule** (as in :func:`analysis.lesions.match_lesions`; the hit
  rule of BraTS, autoPET and MedPy): a GT lesion is *found* (``tp``) when a predicted
  lesion shares at least one voxel with it, otherwise missed (``fn``); a predicted
  lesion sharing no voxel with any GT lesion is a false positive (``fp``).
  ``sensitivity = tp / n_gt``; ``precision`` = predicted lesions overlapping a GT lesion
  / ``n_pred``; ``f1`` = harmonic mean of sensitivity and precision;
  ``fp_per_case = fp / n_cases``.
* **Panoptic quality** (Kirillov et al., "Panoptic Segmentation", CVPR 2019, as
  implemented by panoptica, Kofler et al. 2023, with its naive threshold matcher):
  GT and predicted lesions are matched one-to-one when their IoU is >= 0.5 (pairs taken
  by decreasing IoU, ties by lower GT id then lower predicted id; at IoU >= 0.5 between
  components of one connectivity a lesion has at most one such partner, so the order
  only matters in degenerate inputs). Matched pairs are ``pq_tp``, unmatched GT lesions
  ``pq_fn``, unmatched predicted lesions ``pq_fp``.
  ``RQ = TP / (TP + FP/2 + FN/2)``, ``SQ`` = mean Dice over all matched pairs,
  ``PQ = SQ x RQ``.
* **BraTS 2023 lesion-wise Dice** (BraTS 2023 challenge lesion-wise metrics,
  Kazerooni et al., arXiv:2305.17033): each GT lesion is dilated once with the
  18-neighbourhood (``scipy.ndimage.generate_binary_structure(3, 2)``); its matches are
  all predicted components with a voxel in the dilated lesion, and its Dice is that of
  the (undilated) lesion against the union of its matches, 0 without matches. Predicted
  components touching no dilated GT lesion are false positives (``lw_fp``).
  ``lw_dice = sum of GT lesions' Dice / (n_gt + lw_fp)``.

Empty cases, defined once here:

* a missed GT lesion scores 0 in every lesion-wise mean (sensitivity, SQ/PQ, ``lw_dice``),
  and a prediction with no lesion against GT lesions scores 0 everywhere (precision and
  F1 included), never NaN;
* no GT lesion: sensitivity is NaN (nothing to find), while the prediction's lesions still
  count as false positives (precision 0, RQ/SQ/PQ 0, ``lw_dice`` 0);
* neither GT nor predicted lesions anywhere: sensitivity, precision, F1, RQ, SQ and PQ
  are NaN (panoptica 2.1.7 also gives NaN there) and ``lw_dice`` is 1 (BraTS 2023).

GT lesion sizes for recall by size fall in :data:`SIZE_BINS` (ml, lower bound inclusive).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
from scipy import ndimage

from analysis.lesions.overlap import OverlapCounts, dice_from_counts, overlap_pairs

__all__ = ["LesionCounts", "SIZE_BINS", "PQ_IOU_THRESHOLD", "any_overlap", "panoptic_matches",
           "brats_lesion_dice", "case_lesion_counts", "lesionwise_metrics", "size_bin_index", "size_bin_counts"]

#: GT lesion volume bins in ml: (name, lower bound inclusive, upper bound exclusive).
SIZE_BINS: tuple[tuple[str, float, float], ...] = (
    ("<0.1", 0.0, 0.1), ("0.1-1", 0.1, 1.0), ("1-10", 1.0, 10.0), (">=10", 10.0, math.inf))
#: IoU at or above which a GT and a predicted lesion are a panoptic match (panoptica's default).
PQ_IOU_THRESHOLD = 0.5
#: BraTS 2023 dilation of each GT lesion: the 18-neighbourhood, once.
BRATS_STRUCTURE = ndimage.generate_binary_structure(3, 2)


@dataclass
class LesionCounts:
    """Sufficient statistics of the lesion-level metrics; counts add over cases with ``+``.

    Attributes:
        n_cases: cases counted.
        n_gt, n_pred: GT and predicted lesions.
        tp: GT lesions overlapped by a predicted lesion (any-overlap rule).
        fp: predicted lesions overlapping no GT lesion.
        pq_tp, pq_fp, pq_fn: panoptic one-to-one matches at IoU >= 0.5 and the unmatched.
        pq_dice_sum: sum of the matched pairs' Dice.
        lw_dice_sum: sum over GT lesions of their BraTS lesion-wise Dice.
        lw_fp: predicted components touching no 18-dilated GT lesion.
    """

    n_cases: int = 0
    n_gt: int = 0
    n_pred: int = 0
    tp: int = 0
    fp: int = 0
    pq_tp: int = 0
    pq_fp: int = 0
    pq_fn: int = 0
    pq_dice_sum: float = 0.0
    lw_dice_sum: float = 0.0
    lw_fp: int = 0

    def __add__(self, other: LesionCounts) -> LesionCounts:
        return LesionCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def fn(self) -> int:
        """GT lesions overlapped by no predicted lesion."""
        return self.n_gt - self.tp


def any_overlap(n_gt: int, n_pred: int, gt_ids: np.ndarray, pred_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Any-overlap rule: which GT lesions are found and which predicted lesions hit a GT lesion.

    Args:
        n_gt, n_pred: lesion counts.
        gt_ids, pred_ids: the overlapping pairs from :func:`analysis.lesions.overlap.overlap_pairs`.

    Returns:
        ``(gt_found, pred_hit)``: bool per GT lesion and per predicted lesion (index ``id - 1``).
    """
    gt_found = np.zeros(n_gt, bool)
    pred_hit = np.zeros(n_pred, bool)
    gt_found[np.asarray(gt_ids, np.int64) - 1] = True
    pred_hit[np.asarray(pred_ids, np.int64) - 1] = True
    return gt_found, pred_hit


def panoptic_matches(gt_voxels: np.ndarray, pred_voxels: np.ndarray, gt_ids: np.ndarray, pred_ids: np.ndarray,
                     shared: np.ndarray, iou_threshold: float = PQ_IOU_THRESHOLD
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matching at IoU >= ``iou_threshold`` (panoptica's naive threshold matcher).

    Candidate pairs are taken by decreasing IoU (ties: lower GT id, then lower predicted
    id); a pair is kept when its IoU reaches the threshold and neither lesion is matched yet.

    Args:
        gt_voxels, pred_voxels: voxel count of each lesion (index ``id - 1``).
        gt_ids, pred_ids, shared: overlapping pairs from :func:`analysis.lesions.overlap.overlap_pairs`.
        iou_threshold: smallest IoU of a match.

    Returns:
        ``(matched_gt, matched_pred, dice)``: ids of the matched pairs and their Dice.
    """
    gt_ids = np.asarray(gt_ids, np.int64)
    pred_ids = np.asarray(pred_ids, np.int64)
    inter = np.asarray(shared, np.float64)
    a = np.asarray(gt_voxels, np.float64)[gt_ids - 1]
    b = np.asarray(pred_voxels, np.float64)[pred_ids - 1]
    iou = inter / (a + b - inter) if inter.size else inter
    order = np.lexsort((pred_ids, gt_ids, -iou))
    used_gt: set[int] = set()
    used_pred: set[int] = set()
    keep = []
    for k in order:
        if iou[k] < iou_threshold:
            break
        g, p = int(gt_ids[k]), int(pred_ids[k])
        if g in used_gt or p in used_pred:
            continue
        used_gt.add(g)
        used_pred.add(p)
        keep.append(k)
    keep_arr = np.array(keep, np.int64)
    dice = dice_from_counts(OverlapCounts(inter[keep_arr], b[keep_arr], a[keep_arr]))  # never empty lesions
    return gt_ids[keep_arr], pred_ids[keep_arr], dice


def _dilated_touch(gt_labels: np.ndarray, lesion_id: int, box: tuple[slice, ...],
                   pred_labels: np.ndarray) -> np.ndarray:
    """Predicted ids with a voxel in GT lesion ``lesion_id`` dilated once (18-neighbourhood)."""
    grown = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, gt_labels.shape))
    region = ndimage.binary_dilation(gt_labels[grown] == lesion_id, structure=BRATS_STRUCTURE)
    ids = np.unique(pred_labels[grown][region])
    return ids[ids != 0].astype(np.int64)


def brats_lesion_dice(gt_labels: np.ndarray, n_gt: int, pred_labels: np.ndarray, n_pred: int, *,
                      gt_voxels: np.ndarray, pred_voxels: np.ndarray, gt_covered: np.ndarray,
                      gt_boxes: Sequence[tuple[slice, ...]]) -> tuple[np.ndarray, int]:
    """BraTS 2023 lesion-wise Dice of each GT lesion, and the false-positive components.

    Args:
        gt_labels, pred_labels: ``(slices, rows, cols)`` label volumes of one shape.
        n_gt, n_pred: their lesion counts.
        gt_voxels, pred_voxels: voxel count of each lesion (index ``id - 1``).
        gt_covered: per GT lesion, its voxels inside any predicted lesion (every predicted
            lesion that overlaps it touches it dilated, so this is the intersection with
            the union of its matches).
        gt_boxes: bounding box of each GT lesion (as ``scipy.ndimage.find_objects`` gives).

    Returns:
        ``(dice, n_fp)``: float64 Dice per GT lesion (0 without a match) and the number of
        predicted components touching no dilated GT lesion.
    """
    union = np.zeros(n_gt, np.int64)
    matched = np.zeros(n_gt, bool)
    touched = np.zeros(n_pred, bool)
    pred_voxels = np.asarray(pred_voxels, np.int64)
    for i in range(n_gt):
        ids = _dilated_touch(gt_labels, i + 1, gt_boxes[i], pred_labels)
        if ids.size == 0:
            continue
        touched[ids - 1] = True
        matched[i] = True
        union[i] = int(pred_voxels[ids - 1].sum())
    dice = dice_from_counts(OverlapCounts(np.asarray(gt_covered), union, np.asarray(gt_voxels, np.int64)))
    return np.where(matched, dice, 0.0), int(n_pred - touched.sum())  # BraTS: 0 without a match


def _boxes(labels: np.ndarray, n: int) -> list[tuple[slice, ...]]:
    found = ndimage.find_objects(labels, max_label=n) if n else []
    return [b if b is not None else tuple(slice(0, 0) for _ in labels.shape) for b in found]


def case_lesion_counts(gt_labels: np.ndarray, n_gt: int, pred_labels: np.ndarray, n_pred: int, *,
                       gt_voxels: np.ndarray | None = None, pred_voxels: np.ndarray | None = None,
                       gt_boxes: Sequence[tuple[slice, ...]] | None = None,
                       pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                       ) -> tuple[LesionCounts, np.ndarray]:
    """All lesion-level counts of one case (definitions: module docstring).

    Args:
        gt_labels, pred_labels: ``(slices, rows, cols)`` label volumes ``0..n`` of one shape.
        n_gt, n_pred: their lesion counts.
        gt_voxels, pred_voxels, gt_boxes: lesion sizes and GT bounding boxes when already
            known (e.g. from :func:`analysis.lesions.lesion_table`); computed otherwise.
        pairs: :func:`analysis.lesions.overlap.overlap_pairs` of the two volumes when already known.

    Returns:
        ``(counts, gt_found)``: the case's :class:`LesionCounts` and, per GT lesion, whether
        the any-overlap rule finds it.
    """
    if gt_voxels is None:
        gt_voxels = np.bincount(gt_labels.ravel().astype(np.int64), minlength=n_gt + 1)[1:n_gt + 1]
    if pred_voxels is None:
        pred_voxels = np.bincount(pred_labels.ravel().astype(np.int64), minlength=n_pred + 1)[1:n_pred + 1]
    if gt_boxes is None:
        gt_boxes = _boxes(gt_labels, n_gt)
    g, p, shared = overlap_pairs(gt_labels, pred_labels) if pairs is None else pairs
    gt_found, pred_hit = any_overlap(n_gt, n_pred, g, p)
    _, _, pair_dice = panoptic_matches(gt_voxels, pred_voxels, g, p, shared)
    covered = np.bincount(g, weights=shared, minlength=n_gt + 1)[1:n_gt + 1]
    lw, lw_fp = brats_lesion_dice(gt_labels, n_gt, pred_labels, n_pred, gt_voxels=gt_voxels, pred_voxels=pred_voxels,
                                  gt_covered=covered, gt_boxes=gt_boxes)
    n_match = int(pair_dice.size)
    counts = LesionCounts(n_cases=1, n_gt=int(n_gt), n_pred=int(n_pred), tp=int(gt_found.sum()),
                          fp=int((~pred_hit).sum()), pq_tp=n_match, pq_fp=int(n_pred) - n_match,
                          pq_fn=int(n_gt) - n_match, pq_dice_sum=float(pair_dice.sum()),
                          lw_dice_sum=float(lw.sum()), lw_fp=lw_fp)
    return counts, gt_found


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def lesionwise_metrics(c: LesionCounts) -> dict[str, float]:
    """The reported lesion-level metrics from pooled counts (definitions: module docstring).

    Returns:
        ``{"sensitivity", "precision", "f1", "fp_per_case", "rq", "sq_dice", "pq_dice", "lw_dice"}``.
    """
    anything = c.n_gt + c.n_pred > 0
    sens = _ratio(c.tp, c.n_gt)
    prec = _ratio(c.n_pred - c.fp, c.n_pred) if c.n_pred else (0.0 if c.n_gt else math.nan)
    if math.isnan(sens) or math.isnan(prec):
        f1 = 0.0 if c.n_pred and c.n_pred == c.fp else math.nan
    else:
        f1 = 2 * sens * prec / (sens + prec) if sens + prec > 0 else 0.0
    rq = c.pq_tp / (c.pq_tp + c.pq_fp / 2 + c.pq_fn / 2) if anything else math.nan
    sq = (c.pq_dice_sum / c.pq_tp if c.pq_tp else 0.0) if anything else math.nan
    lw_den = c.n_gt + c.lw_fp
    return {
        "sensitivity": sens, "precision": prec, "f1": f1,
        "fp_per_case": _ratio(c.fp, c.n_cases),
        "rq": rq, "sq_dice": sq, "pq_dice": sq * rq,
        "lw_dice": c.lw_dice_sum / lw_den if lw_den else 1.0,
    }


def size_bin_index(volume_ml: np.ndarray) -> np.ndarray:
    """Index into :data:`SIZE_BINS` of each volume (ml; lower bounds inclusive)."""
    edges = np.array([b[1] for b in SIZE_BINS[1:]], np.float64)
    return np.searchsorted(edges, np.asarray(volume_ml, np.float64), side="right").astype(np.int64)


def size_bin_counts(volume_ml: np.ndarray, found: np.ndarray) -> np.ndarray:
    """GT lesions and found GT lesions per :data:`SIZE_BINS` bin.

    Args:
        volume_ml: volume of each GT lesion in ml.
        found: bool per GT lesion (any-overlap rule).

    Returns:
        int64 array ``(len(SIZE_BINS), 2)``: columns ``n_gt``, ``detected``.
    """
    idx = size_bin_index(volume_ml)
    k = len(SIZE_BINS)
    return np.stack([np.bincount(idx, minlength=k), np.bincount(idx[np.asarray(found, bool)], minlength=k)],
                    axis=1).astype(np.int64)
