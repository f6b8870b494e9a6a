"""Pixel overlap metrics: golden values, empty cases, SimpleITK agreement, properties."""
from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from analysis.evaluation.metrics.overlap import case_overlap, slice_overlap
from analysis.lesions.overlap import dice, precision, recall


def test_golden_values_on_tiny_masks():
    pred = np.array([1, 1, 1, 0, 0], bool)
    ref = np.array([0, 1, 1, 1, 1], bool)
    # tp 2, |P| 3, |R| 4
    assert dice(pred, ref) == pytest.approx(4 / 7)
    assert precision(pred, ref) == pytest.approx(2 / 3)
    assert recall(pred, ref) == pytest.approx(2 / 4)


def test_empty_cases_are_defined():
    empty = np.zeros(4, bool)
    some = np.array([1, 0, 0, 0], bool)
    assert math.isnan(dice(empty, empty)) and math.isnan(precision(empty, empty)) and math.isnan(recall(empty, empty))
    # empty prediction of a lesion: 0, 0, 0
    assert (dice(empty, some), precision(empty, some), recall(empty, some)) == (0.0, 0.0, 0.0)
    # prediction on an empty reference: Dice 0, precision 0, recall undefined
    assert dice(some, empty) == 0.0 and precision(some, empty) == 0.0 and math.isnan(recall(some, empty))


def test_case_overlap_leaves_empty_ground_truth_empty():
    gt = np.zeros((2, 3, 3), bool)
    pred = gt.copy()
    pred[0, 0, 0] = True
    out = case_overlap(pred, gt)
    assert math.isnan(out["dice"]) and math.isnan(out["precision"]) and math.isnan(out["recall"])
    assert (out["gt_voxels"], out["pred_voxels"]) == (0, 1)


def test_slice_overlap_only_on_ground_truth_slices():
    gt = np.zeros((4, 3, 3), bool)
    gt[1, 0, :2] = True          # slice 1: 2 px, prediction covers 1 of them plus 1 false px
    gt[3, 1, 1] = True           # slice 3: prediction empty -> 0, 0, 0
    pred = np.zeros_like(gt)
    pred[1, 0, 1] = pred[1, 2, 2] = True
    pred[2, 1, 1] = True         # slice 2 has no ground truth: not scored
    z, d, p, r = slice_overlap(pred, gt)
    assert z.tolist() == [1, 3]
    np.testing.assert_allclose(d, [2 * 1 / 4, 0.0])
    np.testing.assert_allclose(p, [0.5, 0.0])
    np.testing.assert_allclose(r, [0.5, 0.0])


def test_dice_agrees_with_simpleitk_overlap_filter():
    rng = np.random.default_rng(3)
    pred = rng.random((6, 10, 12)) > 0.6
    ref = rng.random((6, 10, 12)) > 0.5
    f = sitk.LabelOverlapMeasuresImageFilter()
    f.Execute(sitk.GetImageFromArray(pred.astype(np.uint8)), sitk.GetImageFromArray(ref.astype(np.uint8)))
    assert dice(pred, ref) == pytest.approx(f.GetDiceCoefficient(), rel=1e-12)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros(3), np.zeros(4))


masks = arrays(bool, st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_dice_properties(data):
    a = data.draw(masks)
    b = data.draw(arrays(bool, a.shape))
    d = dice(a, b)
    if a.any() or b.any():
        assert 0.0 <= d <= 1.0
        assert d == dice(b, a)
        assert (d == 1.0) == np.array_equal(a, b)
    else:
        assert math.isnan(d)
