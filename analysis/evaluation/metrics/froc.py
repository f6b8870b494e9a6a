"""Free-response ROC (FROC) of voxel probability maps against GT lesions.

Definitions (FROC as in Bandos et al., Biometrics 2009, and the competition performance
metric, CPM, of ANODE09 / LUNA16, Setio et al., Med. Image Anal. 2017):

* candidates: connected components (26-connectivity by default) of the voxels with
  probability >= ``floor`` (0.1 by default, ``--froc-floor``), each scored by its highest
  probability;
* an operating point at each distinct candidate score ``s`` keeps the candidates scoring
  >= ``s``; sensitivity = GT lesions sharing a voxel with a kept candidate / N_GT, and
  FP per case = kept candidates sharing no voxel with any GT lesion / number of cases;
* "nothing kept" is the operating point (FP per case 0, sensitivity 0); it is not a row
  of the curve, but it takes part in the summary;
* sensitivity at a rate ``r`` is the highest sensitivity among the operating points
  (including "nothing kept") with FP per case <= ``r``; the CPM is the mean over
  :data:`FROC_RATES` (1/8 to 8 false positives per case).

Empty cases: without GT lesions every sensitivity and the CPM are NaN; without candidates
the curve has no rows and every sensitivity is 0 (only "nothing kept" exists).

Per case, :func:`froc_case` keeps only the candidate scores and, per GT lesion, the best
score touching it (:class:`FrocCase`); :func:`froc_curve` pools any number of cases.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from analysis.lesions import lesion_instances, overlap_pairs

__all__ = ["FrocCase", "FrocCurve", "FROC_RATES", "DEFAULT_FROC_FLOOR", "froc_case", "froc_curve", "froc_summary"]

#: False positives per case at which sensitivity is read off for the CPM.
FROC_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: Lowest probability that still forms a candidate.
DEFAULT_FROC_FLOOR = 0.1


@dataclass(frozen=True)
class FrocCase:
    """One case's FROC sufficient statistics.

    Attributes:
        scores: float64 score of every candidate.
        false_positive: bool per candidate, True when it shares no voxel with a GT lesion.
        gt_best: float64 per GT lesion, the highest score of a candidate touching it
            (``-inf`` when none does).
    """

    scores: np.ndarray
    false_positive: np.ndarray
    gt_best: np.ndarray


@dataclass(frozen=True)
class FrocCurve:
    """Pooled operating points, thresholds in decreasing order (arrays of one length)."""

    thresholds: np.ndarray
    fp_per_case: np.ndarray
    sensitivity: np.ndarray
    n_gt: int
    n_cases: int


def froc_case(probabilities: np.ndarray, gt_labels: np.ndarray, n_gt: int, *, floor: float = DEFAULT_FROC_FLOOR,
              connectivity: int = 26) -> FrocCase:
    """Candidates of one probability map and what they touch.

    Args:
        probabilities: ``(slices, rows, cols)`` voxel probabilities in [0, 1].
        gt_labels: ``(slices, rows, cols)`` GT lesion labels ``0..n_gt`` of the same shape.
        n_gt: GT lesion count.
        floor: voxels with probability >= this form candidates; in (0, 1].
        connectivity: 6, 18 or 26.

    Returns:
        The case's :class:`FrocCase`.

    Raises:
        ValueError: the shapes differ.

    Examples:
        Two candidates (voxels 0-1 scoring 0.9, voxel 3 scoring 0.3; voxel 5 is below the
        floor); the first hits GT lesion 1, the second is a false positive, lesion 2 is missed:

        >>> prob = np.array([[[0.9, 0.9, 0.0, 0.3, 0.0, 0.05]]])
        >>> gt = np.array([[[1, 1, 0, 0, 0, 2]]])
        >>> case = froc_case(prob, gt, 2)
        >>> case.scores.tolist(), case.false_positive.tolist(), case.gt_best.tolist()
        ([0.9, 0.3], [False, True], [0.9, -inf])
        >>> curve = froc_curve([case])
        >>> curve.thresholds.tolist(), curve.fp_per_case.tolist(), curve.sensitivity.tolist()
        ([0.9, 0.3], [0.0, 1.0], [0.5, 0.5])
    """
    if probabilities.shape != gt_labels.shape:
        raise ValueError(f"probabilities shape {probabilities.shape} differs from GT shape {gt_labels.shape}")
    labels, n = lesion_instances(probabilities >= floor, connectivity)
    scores = (np.asarray(ndimage.maximum(probabilities, labels, index=np.arange(1, n + 1)), np.float64).reshape(-1)
              if n else np.zeros(0, np.float64))
    g, c, _ = overlap_pairs(gt_labels, labels)
    false_positive = np.ones(n, bool)
    false_positive[c - 1] = False
    gt_best = np.full(n_gt, -np.inf)
    np.maximum.at(gt_best, g - 1, scores[c - 1])
    return FrocCase(scores, false_positive, gt_best)


def froc_curve(cases: Sequence[FrocCase]) -> FrocCurve:
    """Pool cases into the FROC operating points (definitions: module docstring)."""
    n_cases = len(cases)
    scores = np.concatenate([c.scores for c in cases]) if cases else np.zeros(0)
    fp_scores = np.sort(np.concatenate([c.scores[c.false_positive] for c in cases]) if cases else np.zeros(0))
    gt_best = np.sort(np.concatenate([c.gt_best for c in cases]) if cases else np.zeros(0))
    thresholds = np.unique(scores)[::-1]
    fp = (fp_scores.size - np.searchsorted(fp_scores, thresholds, side="left")) / max(n_cases, 1)
    found = gt_best.size - np.searchsorted(gt_best, thresholds, side="left")
    sens = found / gt_best.size if gt_best.size else np.full(thresholds.size, np.nan)
    return FrocCurve(thresholds, fp.astype(np.float64), np.asarray(sens, np.float64), int(gt_best.size), n_cases)


def froc_summary(curve: FrocCurve, rates: Sequence[float] = FROC_RATES) -> tuple[list[float], float]:
    """Sensitivity at each FP-per-case rate and their mean, the CPM.

    Returns:
        ``(sensitivities, cpm)``: one value per rate; NaN throughout without GT lesions.
    """
    if curve.n_gt == 0:
        return [float("nan")] * len(rates), float("nan")
    sens = []
    for r in rates:
        ok = curve.fp_per_case <= r
        sens.append(float(max(0.0, curve.sensitivity[ok].max())) if ok.any() else 0.0)
    return sens, float(np.mean(sens))
