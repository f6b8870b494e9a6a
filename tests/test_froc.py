"""FROC: hand-worked operating points and CPM, a brute-force re-count, properties, uint8 maps."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from analysis.evaluation.metrics.froc import FROC_RATES, froc_case, froc_curve, froc_summary
from analysis.lesions import lesion_instances


def two_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    """Case 1: GT lesions L1, L2; candidates A (0.9, on L1), B (0.6, FP), C (0.4, touches L2 by a 0.2 tail).
    Case 2: no GT lesion; candidate D (0.7, FP); a 0.05 voxel below the floor."""
    gt1 = np.zeros((4, 10, 10), np.uint8)
    p1 = np.zeros(gt1.shape, np.float32)
    gt1[1, 1:3, 1:3] = 1
    p1[1, 1:3, 1:3] = 0.5
    p1[1, 1, 1] = 0.9                      # A
    p1[3, 8, 8] = 0.6                      # B
    gt1[1, 6:8, 6:8] = 1
    p1[1, 6, 4] = 0.4                      # C's peak lies outside L2 ...
    p1[1, 6, 5] = 0.2                      # ... and its tail enters L2 at (1, 6, 6)
    p1[1, 6, 6] = 0.2
    gt2 = np.zeros((4, 10, 10), np.uint8)
    p2 = np.zeros(gt2.shape, np.float32)
    p2[2, 2:4, 2:4] = 0.7                  # D
    p2[0, 9, 9] = 0.05
    return [(p1, gt1), (p2, gt2)]


def cases_of(pairs, floor=0.1):
    out = []
    for probs, gt in pairs:
        labels, n = lesion_instances(gt)
        out.append(froc_case(probs, labels, n, floor=floor))
    return out


def test_hand_operating_points_and_cpm():
    cases = cases_of(two_cases())
    assert sorted(cases[0].scores.tolist()) == pytest.approx([0.4, 0.6, 0.9])
    assert cases[0].gt_best.tolist() == pytest.approx([0.9, 0.4])
    curve = froc_curve(cases)
    assert curve.thresholds.tolist() == pytest.approx([0.9, 0.7, 0.6, 0.4])
    assert curve.fp_per_case.tolist() == [0.0, 0.5, 1.0, 1.0]
    assert curve.sensitivity.tolist() == [0.5, 0.5, 0.5, 1.0]
    sens, cpm = froc_summary(curve)
    assert sens == [0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert cpm == pytest.approx(5.5 / 7)


def test_floor_removes_candidates_and_nothing_kept_counts():
    curve = froc_curve(cases_of(two_cases(), floor=0.5))   # C (peak 0.4) is gone; A keeps only its >= 0.5 part
    assert curve.thresholds.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert curve.sensitivity.tolist() == [0.5, 0.5, 0.5]
    # only FPs: at 1/8 FP per case only "nothing kept" qualifies, so sensitivity 0 there
    gt = np.zeros((2, 3, 3), np.uint8)
    gt[0, 0, 0] = 1
    probs = np.zeros(gt.shape, np.float32)
    probs[1, 2, 2] = 0.8
    labels, n = lesion_instances(gt)
    sens, cpm = froc_summary(froc_curve([froc_case(probs, labels, n)]))
    assert sens == [0.0] * 7 and cpm == 0.0


def test_empty_cases():
    gt = np.zeros((2, 3, 3), np.uint8)
    probs = np.zeros(gt.shape, np.float32)
    curve = froc_curve([froc_case(probs, gt, 0)])
    assert curve.thresholds.size == 0
    sens, cpm = froc_summary(curve)
    assert all(math.isnan(s) for s in sens) and math.isnan(cpm)      # no GT lesion: nothing to find
    gt[0, 1, 1] = 1
    labels, n = lesion_instances(gt)
    sens, cpm = froc_summary(froc_curve([froc_case(probs, labels, n)]))
    assert sens == [0.0] * 7 and cpm == 0.0                           # lesions, empty map: 0, not NaN
    with pytest.raises(ValueError, match="shape"):
        froc_case(probs[:1], labels, n)


def naive_curve(pairs, floor):
    cand = []       # (score, touched GT keys)
    n_gt = 0
    for k, (probs, gt) in enumerate(pairs):
        g, ng = ndimage.label(gt, structure=np.ones((3, 3, 3)))
        c, nc = ndimage.label(probs >= floor, structure=np.ones((3, 3, 3)))
        n_gt += ng
        for j in range(1, nc + 1):
            comp = c == j
            cand.append((float(probs[comp].max()), {(k, int(i)) for i in np.unique(g[comp]) if i}))
    rows = []
    for s in sorted({sc for sc, _ in cand}, reverse=True):
        kept = [t for sc, t in cand if sc >= s]
        found = set().union(*kept) if kept else set()
        rows.append((s, sum(1 for t in kept if not t) / len(pairs), len(found) / n_gt if n_gt else math.nan))
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_brute_force(seed):
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(3):
        gt = ndimage.binary_opening(rng.random((5, 10, 10)) < 0.55).astype(np.uint8)
        probs = np.round(ndimage.uniform_filter(rng.random(gt.shape), 2), 2).astype(np.float32)
        pairs.append((probs, gt))
    curve = froc_curve(cases_of(pairs, floor=0.5))
    ref = naive_curve(pairs, 0.5)
    assert len(ref) == curve.thresholds.size > 0
    assert curve.thresholds.tolist() == pytest.approx([r[0] for r in ref])
    assert curve.fp_per_case.tolist() == pytest.approx([r[1] for r in ref])
    assert curve.sensitivity.tolist() == pytest.approx([r[2] for r in ref], nan_ok=True)


@settings(max_examples=50, deadline=None)
@given(gt=arrays(np.bool_, (3, 4, 5), elements=st.booleans()).filter(lambda a: a.any()))
def test_probability_one_on_the_gt_gives_cpm_one(gt):
    labels, n = lesion_instances(gt)
    curve = froc_curve([froc_case(gt.astype(np.float32), labels, n)])
    sens, cpm = froc_summary(curve)
    assert cpm == 1.0 and sens == [1.0] * len(FROC_RATES)
    assert curve.thresholds.tolist() == [1.0] and curve.fp_per_case.tolist() == [0.0]


def test_uint8_map_with_scl_slope_is_read_as_probabilities(tmp_path):
    """A uint8 NIfTI with scl_slope 1/255 written by nibabel reads (via SimpleITK) as values in [0, 1]."""
    import nibabel as nib

    from analysis.prediction.probabilities import read_probability

    zyx = np.zeros((3, 4, 5), np.uint8)
    zyx[1, 2, 3] = 255
    zyx[0, 0, 0] = 51
    img = nib.Nifti1Image(np.ascontiguousarray(zyx.transpose(2, 1, 0)), np.diag([-1.0, -1.0, 2.0, 1.0]))
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1 / 255, 0)
    path = tmp_path / "case.nii.gz"
    nib.save(img, path)
    probs = read_probability(path)
    assert probs.dtype == np.float32 and probs.shape == (3, 4, 5)
    assert float(probs[1, 2, 3]) == pytest.approx(1.0, abs=1e-6) and float(probs.max()) <= 1.0
    assert float(probs[0, 0, 0]) == pytest.approx(0.2, abs=1e-6)
    raw = nib.Nifti1Image(np.ascontiguousarray(zyx.transpose(2, 1, 0)), np.eye(4))   # no slope: 0..255
    nib.save(raw, tmp_path / "raw.nii.gz")
    from analysis.errors import InputError

    with pytest.raises(InputError, match=r"raw\.nii\.gz: probabilities outside \[0, 1\]"):
        read_probability(tmp_path / "raw.nii.gz")
