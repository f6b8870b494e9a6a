"""Patient-level bootstrap: percentile confidence intervals of pooled metrics.

Cases (one case is one patient, see :mod:`analysis.cohort.layout`) are drawn with replacement,
as many as there are, ``n_boot`` times, from ``numpy.random.default_rng(seed)``
(Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 6 and 13: the
nonparametric bootstrap and its percentile interval). Each replicate recomputes the pooled
metric from per-case sufficient statistics (sums and counts per case, or per-case arrays
for the slice AUC), so no volume is kept. The interval is the 2.5th and 97.5th percentile
(numpy's default linear interpolation) of the replicates whose metric is defined; a
replicate that draws e.g. no lesion at all has no sensitivity and is left out, and
``n_boot`` reports how many replicates were used. The same seed gives the same draws, so a
rerun gives identical numbers, and every metric of one run uses the same draws (paired
across models).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["Interval", "resample_indices", "case_weights", "percentile_interval", "ratio_interval",
           "statistic_interval", "CONFIDENCE"]

#: Confidence level of every interval.
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap percentile interval.

    Attributes:
        estimate: the metric on the analysed cases.
        low, high: interval bounds (NaN when no replicate is defined).
        n_boot: replicates that entered the interval.
    """

    estimate: float
    low: float
    high: float
    n_boot: int


def resample_indices(n_cases: int, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap draws of case indices.

    Args:
        n_cases: cases to draw from (and per replicate).
        n_boot: replicates.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        int64 array ``(n_boot, n_cases)`` of indices into the case list.
    """
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_cases, size=(n_boot, n_cases), dtype=np.int64)


def case_weights(indices: np.ndarray, n_cases: int) -> np.ndarray:
    """How often each case is drawn in each replicate: int64 ``(n_boot, n_cases)``."""
    n_boot = indices.shape[0]
    rows = np.repeat(np.arange(n_boot, dtype=np.int64), indices.shape[1])
    return np.bincount(rows * n_cases + indices.ravel(), minlength=n_boot * n_cases).reshape(n_boot, n_cases)


def percentile_interval(estimate: float, replicates: np.ndarray, level: float = CONFIDENCE) -> Interval:
    """Percentile interval of the finite replicates around ``estimate``."""
    reps = np.asarray(replicates, np.float64)
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return Interval(float(estimate), math.nan, math.nan, 0)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(reps, [tail, 100 - tail])
    return Interval(float(estimate), float(low), float(high), int(reps.size))


def _ratio(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    out = np.full(np.broadcast(num, den).shape, empty, np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def ratio_interval(num: np.ndarray, den: np.ndarray, weights: np.ndarray, *, empty: float = math.nan,
                   level: float = CONFIDENCE) -> Interval:
    """Interval of a pooled ratio ``sum(num) / sum(den)`` over cases.

    Args:
        num, den: one value per case (e.g. found GT lesions and GT lesions).
        weights: :func:`case_weights` of the draws.
        empty: the ratio's value when ``sum(den)`` is 0.
        level: confidence level.
    """
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    estimate = float(_ratio(num.sum(), den.sum(), empty))
    return percentile_interval(estimate, _ratio(weights @ num, weights @ den, empty), level)


def statistic_interval(statistic: Callable[[np.ndarray], float], indices: np.ndarray,
                       level: float = CONFIDENCE) -> Interval:
    """Interval of any statistic of a sample of cases.

    Args:
        statistic: maps an int array of case indices (with repeats) to the metric.
        indices: :func:`resample_indices` draws.
        level: confidence level.
    """
    estimate = statistic(np.arange(indices.shape[1], dtype=np.int64))
    return percentile_interval(estimate, np.array([statistic(row) for row in indices], np.float64), level)
