"""Paired t-tests, Holm correction and ICC(A,1) against scipy, pingouin and hand values."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pingouin as pg
import pytest
from scipy import stats

from analysis.evaluation.stats import holm, icc_a1, paired_ttest


def test_paired_ttest_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.random(25)
    b = a - 0.05 + 0.1 * rng.random(25)
    ours = paired_ttest(a, b)
    ref = stats.ttest_rel(a, b)
    assert ours["t"] == pytest.approx(ref.statistic, rel=1e-10)
    assert ours["p_val"] == pytest.approx(ref.pvalue, rel=1e-8)
    assert ours["dof"] == 24 and ours["n"] == 25
    assert ours["mean_diff"] == pytest.approx(np.mean(a - b))
    assert ours["sd_diff"] == pytest.approx(np.std(a - b, ddof=1))


def test_paired_ttest_degenerate():
    out = paired_ttest([1.0, 2.0], [1.0, 2.0])
    assert out["sd_diff"] == 0 and math.isnan(out["t"]) and math.isnan(out["p_val"])


def test_holm_hand_values():
    # sorted 0.01, 0.02, 0.04 with m = 3: 0.03, 0.04, max(0.04, 0.04) ; NaN ignored
    out = holm([0.04, 0.01, float("nan"), 0.02])
    np.testing.assert_allclose(out[[0, 1, 3]], [0.04, 0.03, 0.04])
    assert math.isnan(out[2])
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_icc_a1_matches_pingouin(seed):
    rng = np.random.default_rng(seed)
    n = 12
    truth = rng.normal(10, 3, n)
    y = np.stack([truth + rng.normal(0, 1, n), truth + 0.5 + rng.normal(0, 1.5, n)], axis=1)
    df = pd.DataFrame({"target": np.repeat(np.arange(n), 2), "rater": np.tile([0, 1], n), "score": y.ravel()})
    ref = pg.intraclass_corr(df, targets="target", raters="rater", ratings="score").set_index("Type").loc["ICC(A,1)"]
    icc, low, high = icc_a1(y)
    assert icc == pytest.approx(ref["ICC"], rel=1e-10)
    # pingouin rounds its interval to 2 decimals
    assert low == pytest.approx(ref["CI95"][0], abs=0.0051)
    assert high == pytest.approx(ref["CI95"][1], abs=0.0051)


def test_icc_hand_value_and_special_cases():
    # rows (1,2), (3,3), (5,7): grand mean 3.5; SSR 21 -> MSR 10.5; column means 3, 4 -> MSC 1.5;
    # SST 23.5 -> SSE 1, MSE 0.5; ICC = (10.5 - 0.5) / (10.5 + 0.5 + 2 (1.5 - 0.5) / 3) = 6/7
    y = np.array([[1.0, 2.0], [3.0, 3.0], [5.0, 7.0]])
    assert icc_a1(y)[0] == pytest.approx(6 / 7, rel=1e-12)
    assert icc_a1(np.array([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]])) == (1.0, 1.0, 1.0)   # identical raters
    assert all(math.isnan(v) for v in icc_a1(np.full((4, 2), 3.0)))                   # constant feature
    assert all(math.isnan(v) for v in icc_a1(np.array([[1.0, 2.0]])))                 # one subject
