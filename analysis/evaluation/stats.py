"""Statistics: paired t-tests with Holm correction, and the intraclass correlation ICC(A,1).

Implemented from their definitions in numpy/scipy (tests check them against
``scipy.stats.ttest_rel`` and ``pingouin.intraclass_corr``).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

__all__ = ["paired_ttest", "holm", "icc_a1"]


def paired_ttest(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Two-sided paired t-test of ``a - b`` (e.g. per-slice Dice of two models on the same slices).

    t = mean(d) / (sd(d) / sqrt(n)) with sd over n - 1 degrees of freedom; the p-value is
    two-sided from Student's t with n - 1 dof. With fewer than two pairs, or differences
    that are all equal (sd 0), t and p are NaN.

    Args:
        a, b: paired values, same length.

    Returns:
        ``{"n", "mean_diff", "sd_diff", "t", "dof", "p_val"}``.

    Raises:
        ValueError: the lengths differ.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} vs {b.shape}")
    d = a - b
    n = d.size
    mean = float(d.mean()) if n else math.nan
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    if n > 1 and sd > 0:
        t = mean / (sd / math.sqrt(n))
        p = float(2 * stats.t.sf(abs(t), n - 1))
    else:
        t = p = math.nan
    return {"n": n, "mean_diff": mean, "sd_diff": sd, "t": t, "dof": n - 1 if n else 0, "p_val": p}


def holm(p_values: list[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values (NaN entries stay NaN, not counted).

    With the m finite p-values sorted ascending, ``p_holm(i) = max_{j<=i} min(1, (m - j + 1) p(j))``
    (1-based j), mapped back to the input order.
    """
    p = np.asarray(p_values, np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adjusted = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adjusted)
    return out


def icc_a1(ratings: np.ndarray, alpha: float = 0.05) -> tuple[float, float, float]:
    """ICC(A,1): two-way random effects, absolute agreement, single rater, with its CI.

    McGraw & Wong (1996) case 2A, equal to Shrout & Fleiss (1979) ICC(2,1)::

        ICC = (MSR - MSE) / (MSR + (k - 1) MSE + k (MSC - MSE) / n)

    from the two-way ANOVA of an ``(n subjects, k raters)`` table (MSR rows, MSC
    columns, MSE residual). The confidence interval is McGraw & Wong's F-based interval
    with Satterthwaite's degrees of freedom (the one pingouin reports, unrounded here).

    Special cases: identical columns (perfect agreement, e.g. identical masks) give
    ICC 1 with interval (1, 1) provided the subjects vary; a table with no variation
    at all (constant feature) or fewer than 2 subjects gives NaN for all three;
    zero residual with a constant offset between raters gives the ICC with a NaN interval.

    Args:
        ratings: ``(n, k)`` float array, one row per subject, one column per rater.
        alpha: 1 - confidence level.

    Returns:
        ``(icc, ci_low, ci_high)``.
    """
    y = np.asarray(ratings, np.float64)
    n, k = y.shape
    nan = (math.nan, math.nan, math.nan)
    if n < 2 or k < 2 or np.ptp(y) == 0:
        return nan
    if all(np.array_equal(y[:, 0], y[:, j]) for j in range(1, k)):
        return 1.0, 1.0, 1.0
    gm = y.mean()
    rows = y.mean(axis=1)
    cols = y.mean(axis=0)
    msr = k * np.sum((rows - gm) ** 2) / (n - 1)
    msc = n * np.sum((cols - gm) ** 2) / (k - 1)
    resid = y - rows[:, None] - cols[None, :] + gm
    mse = np.sum(resid ** 2) / ((n - 1) * (k - 1))
    icc = (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
    if mse <= 0:
        return float(icc), math.nan, math.nan
    fj = msc / mse
    vn = (k - 1) * (n - 1) * (k * icc * fj + n * (1 + (k - 1) * icc) - k * icc) ** 2
    vd = (n - 1) * k ** 2 * icc ** 2 * fj ** 2 + (n * (1 + (k - 1) * icc) - k * icc) ** 2
    v = vn / vd
    f_up = stats.f.ppf(1 - alpha / 2, n - 1, v)
    f_low = stats.f.ppf(1 - alpha / 2, v, n - 1)
    low = n * (msr - f_up * mse) / (f_up * (k * msc + (k * n - k - n) * mse) + n * msr)
    high = n * (f_low * msr - mse) / (k * msc + (k * n - k - n) * mse + n * f_low * msr)
    return float(icc), float(low), float(high)
