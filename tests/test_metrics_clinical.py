"""Clinical lesion tasks (GT lesions as anchors) and slice-level detection metrics."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from analysis.evaluation.metrics.clinical import Counts, anchored_answers, binary_counts, sensitivity, specificity
from analysis.evaluation.metrics.detection import roc_auc, slice_detection


def test_binary_counts_and_rates():
    truth = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    answer = np.array([1, 0, 0, 1, 0, 0, 0], bool)
    c = binary_counts(truth, answer)
    assert (c.tp, c.fp, c.fn, c.tn) == (1, 1, 2, 3)
    assert c.sensitivity == pytest.approx(1 / 3) and c.specificity == pytest.approx(3 / 4)


def test_rates_nan_when_denominator_is_zero():
    assert math.isnan(sensitivity(0, 0))
    assert math.isnan(specificity(0, 0))
    assert math.isnan(specificity(None, 5))      # detection/lesion: no true negatives exist
    c = Counts(tp=2, fn=1, fp=4, tn=None)
    c += Counts(tp=1, fn=0, fp=0, tn=None)
    assert (c.tp, c.fp, c.fn, c.tn) == (3, 4, 1, None) and c.sensitivity == 0.75


def test_anchored_answers_unmatched_is_negative():
    pred_diffuse = np.array([True, False, True])
    gt_match = np.array([3, 0, 2, 1])            # gt lesion 2 unmatched
    assert anchored_answers(pred_diffuse, gt_match).tolist() == [True, False, False, True]
    bones = np.array(["rib", "spine"], dtype=object)
    assert anchored_answers(bones, np.array([2, 0]), negative="").tolist() == ["spine", ""]
    assert anchored_answers(np.array([], bool), np.array([0, 0])).tolist() == [False, False]


def test_slice_detection_golden():
    y = np.array([1, 1, 0, 0, 1], bool)
    p = np.array([0.9, 0.5, 0.5, 0.1, 0.2])
    m = slice_detection(y, p, 0.5)                # predicted positive: 0, 1, 2 (>= 0.5)
    assert m["accuracy"] == pytest.approx(3 / 5)  # tp 2, tn 1
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["n_slices"] == 5
    # pairs (pos, neg): 0.9>0.5, 0.9>0.1, 0.5=0.5 (1/2), 0.5>0.1, 0.2<0.5, 0.2>0.1 -> 4.5/6
    assert m["auc"] == pytest.approx(4.5 / 6)


def test_detection_empty_classes():
    m = slice_detection(np.zeros(3, bool), np.array([0.1, 0.2, 0.3]))
    assert math.isnan(m["precision"]) and math.isnan(m["recall"]) and math.isnan(m["f1"]) and math.isnan(m["auc"])
    assert m["accuracy"] == 1.0


def test_auc_matches_brute_force_pair_count_with_ties():
    rng = np.random.default_rng(1)
    y = rng.random(60) > 0.6
    s = np.round(rng.random(60), 1)               # many ties
    pos, neg = s[y], s[~y]
    brute = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg)) / (len(pos) * len(neg))
    assert roc_auc(y, s) == pytest.approx(brute, abs=1e-12)
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        return
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
