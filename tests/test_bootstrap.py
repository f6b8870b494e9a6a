"""Patient bootstrap: reproducible draws, pooled ratios equal to a direct recount, percentile bounds."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.evaluation.bootstrap import (case_weights, percentile_interval, ratio_interval, resample_indices,
                                           statistic_interval)
from analysis.evaluation.metrics.detection import roc_auc


def test_draws_are_reproducible_and_seeded():
    a = resample_indices(7, 50, seed=3)
    assert a.shape == (50, 7) and a.dtype == np.int64 and a.min() >= 0 and a.max() < 7
    assert np.array_equal(a, resample_indices(7, 50, seed=3))
    assert not np.array_equal(a, resample_indices(7, 50, seed=4))


def test_case_weights_count_draws():
    idx = np.array([[0, 0, 2], [1, 2, 2]])
    assert case_weights(idx, 3).tolist() == [[2, 0, 1], [0, 1, 2]]


def test_percentile_interval_hand_values_and_undefined_replicates():
    iv = percentile_interval(0.5, np.array([0.0, 1.0, 2.0, 3.0, 4.0, np.nan]))
    # numpy linear interpolation over 5 finite values: 2.5th pct = 0.1, 97.5th = 3.9
    assert (iv.estimate, iv.low, iv.high, iv.n_boot) == (0.5, pytest.approx(0.1), pytest.approx(3.9), 5)
    none = percentile_interval(1.0, np.array([np.nan]))
    assert math.isnan(none.low) and math.isnan(none.high) and none.n_boot == 0


def test_ratio_interval_equals_recount_of_each_resample():
    # per case: found lesions and lesions; case 2 has none (its replicates alone are undefined)
    found = np.array([1, 0, 0, 3])
    n_gt = np.array([2, 1, 0, 4])
    idx = resample_indices(4, 200, seed=0)
    iv = ratio_interval(found, n_gt, case_weights(idx, 4))
    assert iv.estimate == pytest.approx(4 / 7)
    reps = []
    for row in idx:
        den = sum(n_gt[i] for i in row)
        if den:
            reps.append(sum(found[i] for i in row) / den)
    assert iv.n_boot == len(reps)
    assert (iv.low, iv.high) == pytest.approx(tuple(np.percentile(reps, [2.5, 97.5])))
    assert iv.low <= iv.estimate <= iv.high


def test_ratio_interval_empty_value():
    iv = ratio_interval(np.zeros(3), np.zeros(3), case_weights(resample_indices(3, 10, 1), 3), empty=1.0)
    assert (iv.estimate, iv.low, iv.high, iv.n_boot) == (1.0, 1.0, 1.0, 10)


def test_statistic_interval_auc_by_patient():
    rng = np.random.default_rng(5)
    truth = [rng.random(12) < 0.4 for _ in range(6)]
    probs = [np.clip(t * 0.3 + rng.random(12) * 0.7, 0, 1) for t in truth]

    def auc(idx):
        return roc_auc(np.concatenate([truth[i] for i in idx]), np.concatenate([probs[i] for i in idx]))

    idx = resample_indices(6, 100, seed=2)
    iv = statistic_interval(auc, idx)
    assert iv.estimate == pytest.approx(roc_auc(np.concatenate(truth), np.concatenate(probs)))
    reps = [auc(r) for r in idx]
    assert (iv.low, iv.high) == pytest.approx(tuple(np.percentile(reps, [2.5, 97.5])))
    assert iv == statistic_interval(auc, resample_indices(6, 100, seed=2))     # identical on a rerun


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(0, 1), min_size=1, max_size=8), seed=st.integers(0, 2**32 - 1))
def test_interval_brackets_resampled_means(values, seed):
    v = np.array(values)
    idx = resample_indices(v.size, 50, seed)
    iv = ratio_interval(v, np.ones(v.size), case_weights(idx, v.size))
    assert v.min() - 1e-12 <= iv.low <= iv.high <= v.max() + 1e-12
    if np.ptp(v) == 0:
        assert iv.low == pytest.approx(iv.high) == pytest.approx(iv.estimate)
