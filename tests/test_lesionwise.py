"""Lesion-level metrics: hand-worked values, panoptica's numbers, a second implementation, properties."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from analysis.evaluation.metrics.lesionwise import (SIZE_BINS, LesionCounts, case_lesion_counts, lesionwise_metrics,
                                                    panoptic_matches, size_bin_counts, size_bin_index)
from analysis.lesions import lesion_instances, overlap_pairs


def case_a() -> tuple[np.ndarray, np.ndarray]:
    """Two GT lesions: one matched at IoU 0.6, one split into two slabs; one FP voxel."""
    gt = np.zeros((6, 12, 12), np.uint8)
    pred = np.zeros_like(gt)
    gt[1:4, 1:5, 1:5] = 1            # 48 voxels
    pred[1:4, 1:5, 2:6] = 1          # shifted one column: 36 shared, union 60 -> IoU 0.6, Dice 0.75
    gt[1:5, 7:11, 7:11] = 1          # 64 voxels
    pred[1:5, 7:11, 7:8] = 1         # slab of 16 (IoU 0.25)
    pred[1:5, 7:11, 10:11] = 1       # slab of 16, two columns apart
    pred[5, 0, 11] = 1               # isolated FP voxel
    return gt, pred


def case_b() -> tuple[np.ndarray, np.ndarray]:
    """Three GT lesions of 18 voxels: two merged into one predicted lesion of 42, one missed."""
    gt = np.zeros((5, 10, 14), np.uint8)
    pred = np.zeros_like(gt)
    gt[1:3, 1:4, 1:4] = 1
    gt[1:3, 1:4, 5:8] = 1
    pred[1:3, 1:4, 1:8] = 1          # IoU 18/42 with each
    gt[3:5, 6:9, 10:13] = 1          # missed
    return gt, pred


def case_c() -> tuple[np.ndarray, np.ndarray]:
    """One GT lesion of 48 with a prediction of 36 inside it; an FP blob touching its corner only."""
    gt = np.zeros((4, 8, 8), np.uint8)
    pred = np.zeros_like(gt)
    gt[0:3, 2:6, 2:6] = 1
    pred[0:3, 2:6, 2:5] = 1          # IoU 0.75, Dice 6/7
    pred[3, 0:2, 6:8] = 1            # (3, 1, 6) is a corner (26-, not 18-) neighbour of GT voxel (2, 2, 5)
    return gt, pred


CASES = {"a": case_a, "b": case_b, "c": case_c}


def counts_of(gt: np.ndarray, pred: np.ndarray) -> LesionCounts:
    g, ng = lesion_instances(gt)
    p, n_pred = lesion_instances(pred)
    return case_lesion_counts(g, ng, p, n_pred)[0]


# --- hand-worked values ----------------------------------------------------------------------

HAND = {  # n_gt, n_pred, tp, fp, pq_tp, pq_fp, pq_fn, pq_dice_sum, lw_dice_sum, lw_fp
    "a": (2, 4, 2, 1, 1, 3, 1, 0.75, 0.75 + 2 / 3, 1),     # GT 2: slabs' union 32 inside 64 -> 2*32/96
    "b": (3, 1, 2, 0, 0, 1, 3, 0.0, 0.6 + 0.6, 0),          # each merged GT: 2*18/(18+42)
    "c": (1, 2, 1, 1, 1, 1, 0, 6 / 7, 6 / 7, 1),            # corner blob is an FP for BraTS' 18-dilation
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_hand_counts(name):
    c = counts_of(*CASES[name]())
    got = (c.n_gt, c.n_pred, c.tp, c.fp, c.pq_tp, c.pq_fp, c.pq_fn, c.pq_dice_sum, c.lw_dice_sum, c.lw_fp)
    assert got == pytest.approx(HAND[name])


def test_hand_pooled_metrics():
    total = sum((counts_of(*f()) for f in CASES.values()), LesionCounts())
    m = lesionwise_metrics(total)
    assert (total.n_cases, total.n_gt, total.n_pred, total.tp, total.fn, total.fp) == (3, 6, 7, 5, 1, 2)
    assert m["sensitivity"] == pytest.approx(5 / 6)
    assert m["precision"] == pytest.approx(5 / 7)            # predicted lesions overlapping a GT lesion
    assert m["f1"] == pytest.approx(10 / 13)                 # harmonic mean of 5/6 and 5/7
    assert m["fp_per_case"] == pytest.approx(2 / 3)
    assert m["rq"] == pytest.approx(2 / (2 + 5 / 2 + 4 / 2))
    assert m["sq_dice"] == pytest.approx((0.75 + 6 / 7) / 2)
    assert m["pq_dice"] == pytest.approx((0.75 + 6 / 7) / 2 * 4 / 13)
    assert m["lw_dice"] == pytest.approx((0.75 + 2 / 3 + 1.2 + 6 / 7) / (6 + 2))


def test_brats_dilation_is_18_neighbourhood():
    gt = np.zeros((3, 3, 6), np.uint8)
    gt[1, 1, 0:2] = 1
    face = np.zeros_like(gt)
    face[1, 1, 2] = 1                # face neighbour: matched, shares nothing -> Dice 0, no FP
    c = counts_of(gt, face)
    assert (c.lw_dice_sum, c.lw_fp, c.fp) == (0.0, 0, 1)
    assert lesionwise_metrics(c)["lw_dice"] == 0.0
    edge = np.zeros_like(gt)
    edge[0, 0, 1] = 1                # edge neighbour of (1, 1, 1): inside the 18-dilation
    assert counts_of(gt, edge).lw_fp == 0
    corner = np.zeros_like(gt)
    corner[0, 0, 2] = 1              # corner neighbour of (1, 1, 1): outside it
    assert counts_of(gt, corner).lw_fp == 1


def test_worst_cases_score_zero_never_nan():
    gt, _ = case_b()
    m = lesionwise_metrics(counts_of(gt, np.zeros_like(gt)))         # lesions, empty prediction
    assert all(m[k] == 0.0 for k in ("sensitivity", "precision", "f1", "rq", "sq_dice", "pq_dice", "lw_dice")), m
    fp_only = np.zeros((4, 4, 4), np.uint8)
    fp_only[0, 0, 0] = fp_only[3, 3, 3] = 1
    empty = np.zeros_like(fp_only)
    m = lesionwise_metrics(counts_of(empty, fp_only))                # lesion-free case with two FPs
    assert math.isnan(m["sensitivity"]) and m["fp_per_case"] == 2.0
    assert (m["precision"], m["f1"], m["rq"], m["sq_dice"], m["pq_dice"], m["lw_dice"]) == (0, 0, 0, 0, 0, 0)
    # a lesion-free case's FPs count against a perfect case
    gt_c, _ = case_c()
    pooled = counts_of(gt_c, gt_c) + counts_of(empty, fp_only)
    m = lesionwise_metrics(pooled)
    assert (pooled.fp, m["fp_per_case"], m["sensitivity"]) == (2, 1.0, 1.0)
    assert m["lw_dice"] == pytest.approx(1 / 3) and m["rq"] == pytest.approx(1 / 2)
    m = lesionwise_metrics(counts_of(empty, empty))                  # nothing anywhere
    assert m["lw_dice"] == 1.0 and all(math.isnan(m[k]) for k in ("sensitivity", "precision", "f1", "rq", "pq_dice"))


def test_size_bins_lower_bound_inclusive():
    assert [b[0] for b in SIZE_BINS] == ["<0.1", "0.1-1", "1-10", ">=10"]
    vols = np.array([0.05, 0.1, 0.99, 1.0, 9.99, 10.0, 250.0])
    assert size_bin_index(vols).tolist() == [0, 1, 1, 2, 2, 3, 3]
    found = np.array([True, False, True, True, False, False, True])
    assert size_bin_counts(vols, found).tolist() == [[1, 1], [2, 1], [2, 1], [2, 1]]


# --- panoptica ---------------------------------------------------------------------------------
# Golden values from panoptica 2.1.7 (numpy 2.2.6, connected-components-3d 3.29.0, Python 3.11), run
# once in a throwaway venv on case_a/case_b/case_c above (same arrays) with
#   Panoptica_Evaluator(expected_input=InputType.SEMANTIC,
#                       instance_approximator=ConnectedComponentsInstanceApproximator(cca_backend=CCABackend.cc3d),
#                       instance_matcher=NaiveThresholdMatching(matching_metric=Metric.IOU, matching_threshold=0.5)
#                       ).evaluate(pred, gt)["ungrouped"]
# reading .tp .fp .fn .rq .sq_dsc .pq_dsc. Both empty gave rq = sq_dsc = pq_dsc = nan; a missed lesion
# alone and an FP alone gave 0.0 for all three.
PANOPTICA_2_1_7 = {
    "a": {"tp": 1, "fp": 3, "fn": 1, "rq": 0.3333333333333333, "sq_dsc": 0.75, "pq_dsc": 0.25},
    "b": {"tp": 0, "fp": 1, "fn": 3, "rq": 0.0, "sq_dsc": 0.0, "pq_dsc": 0.0},
    "c": {"tp": 1, "fp": 1, "fn": 0, "rq": 0.6666666666666666, "sq_dsc": 0.8571428571428571,
          "pq_dsc": 0.5714285714285714},
}


@pytest.mark.parametrize("name", sorted(PANOPTICA_2_1_7))
def test_agrees_with_panoptica(name):
    ref = PANOPTICA_2_1_7[name]
    c = counts_of(*CASES[name]())
    m = lesionwise_metrics(c)
    assert (c.pq_tp, c.pq_fp, c.pq_fn) == (ref["tp"], ref["fp"], ref["fn"])
    assert m["rq"] == pytest.approx(ref["rq"], abs=1e-12)
    assert m["sq_dice"] == pytest.approx(ref["sq_dsc"], abs=1e-12)
    assert m["pq_dice"] == pytest.approx(ref["pq_dsc"], abs=1e-12)


def test_panoptica_edge_cases():
    z = np.zeros((3, 4, 4), np.uint8)
    one = z.copy()
    one[1, 1, 1] = 1
    both_empty = lesionwise_metrics(counts_of(z, z))
    assert all(math.isnan(both_empty[k]) for k in ("rq", "sq_dice", "pq_dice"))
    for gt, pred in ((one, z), (z, one)):
        m = lesionwise_metrics(counts_of(gt, pred))
        assert (m["rq"], m["sq_dice"], m["pq_dice"]) == (0.0, 0.0, 0.0)


# --- a second, straightforward implementation ------------------------------------------------------

FULL = np.ones((3, 3, 3), bool)


def naive_counts(gt: np.ndarray, pred: np.ndarray) -> LesionCounts:
    """Loops over lesion masks, scipy labelling, whole-volume dilation: slow and obvious."""
    g, ng = ndimage.label(gt, structure=FULL)
    p, n_pred = ndimage.label(pred, structure=FULL)
    gts = [g == i for i in range(1, ng + 1)]
    preds = [p == j for j in range(1, n_pred + 1)]
    tp = sum(any((a & b).any() for b in preds) for a in gts)
    fp = sum(not any((a & b).any() for a in gts) for b in preds)
    pairs = []
    for i, a in enumerate(gts):
        for j, b in enumerate(preds):
            inter = (a & b).sum()
            if inter:
                pairs.append((inter / (a | b).sum(), i, j, 2 * inter / (a.sum() + b.sum())))
    used_g, used_p, dices = set(), set(), []
    for iou, i, j, d in sorted(pairs, key=lambda t: (-t[0], t[1], t[2])):
        if iou >= 0.5 and i not in used_g and j not in used_p:
            used_g.add(i)
            used_p.add(j)
            dices.append(d)
    touched = set()
    lw = 0.0
    for a in gts:
        grown = ndimage.binary_dilation(a, structure=ndimage.generate_binary_structure(3, 2))
        hits = [j for j, b in enumerate(preds) if (b & grown).any()]
        touched.update(hits)
        if hits:
            union = np.logical_or.reduce([preds[j] for j in hits])
            lw += 2 * (a & union).sum() / (a.sum() + union.sum())
    return LesionCounts(1, ng, n_pred, tp, fp, len(dices), n_pred - len(dices), ng - len(dices), float(sum(dices)),
                        lw, n_pred - len(touched))


def _same(a: LesionCounts, b: LesionCounts) -> None:
    assert (a.n_gt, a.n_pred, a.tp, a.fp, a.pq_tp, a.pq_fp, a.pq_fn, a.lw_fp) == \
           (b.n_gt, b.n_pred, b.tp, b.fp, b.pq_tp, b.pq_fp, b.pq_fn, b.lw_fp)
    assert a.pq_dice_sum == pytest.approx(b.pq_dice_sum, abs=1e-12)
    assert a.lw_dice_sum == pytest.approx(b.lw_dice_sum, abs=1e-12)


@pytest.mark.parametrize("name", sorted(CASES))
def test_second_implementation_on_hand_cases(name):
    gt, pred = CASES[name]()
    _same(counts_of(gt, pred), naive_counts(gt, pred))


@pytest.mark.parametrize("seed", range(6))
def test_second_implementation_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    gt = ndimage.binary_opening(rng.random((7, 12, 12)) < 0.35)
    pred = gt.copy()
    pred ^= ndimage.binary_opening(rng.random(gt.shape) < 0.3)   # adds, removes, splits and merges lesions
    _same(counts_of(gt, pred), naive_counts(gt, pred))


masks = arrays(np.bool_, (3, 4, 5), elements=st.booleans())


@settings(max_examples=60, deadline=None)
@given(gt=masks, pred=masks)
def test_second_implementation_property(gt, pred):
    _same(counts_of(gt, pred), naive_counts(gt, pred))


@settings(max_examples=60, deadline=None)
@given(gt=masks)
def test_prediction_equal_to_gt_is_perfect(gt):
    m = lesionwise_metrics(counts_of(gt, gt))
    if gt.any():
        assert (m["sensitivity"], m["precision"], m["f1"], m["rq"], m["sq_dice"], m["pq_dice"], m["lw_dice"]) == \
               pytest.approx((1, 1, 1, 1, 1, 1, 1))
        assert m["fp_per_case"] == 0
    else:
        assert m["lw_dice"] == 1.0 and math.isnan(m["pq_dice"])


def test_overlap_pairs_and_matching_rules():
    gt = np.array([[[1, 1, 0, 2]]])
    pred = np.array([[[1, 0, 0, 2]]])
    g, p, shared = overlap_pairs(gt, pred)
    assert (g.tolist(), p.tolist(), shared.tolist()) == ([1, 2], [1, 2], [1, 1])
    # IoU exactly 0.5 matches (>=); 1/3 does not
    mg, mp, dice = panoptic_matches(np.array([2, 1]), np.array([1, 1]), g, p, shared)
    assert (mg.tolist(), mp.tolist()) == ([2, 1], [2, 1]) and dice.tolist() == pytest.approx([1.0, 2 / 3])
    mg, _, _ = panoptic_matches(np.array([3, 1]), np.array([1, 1]), g, p, shared)
    assert mg.tolist() == [2]
    with pytest.raises(ValueError, match="shape"):
        overlap_pairs(gt, pred[..., :2])
