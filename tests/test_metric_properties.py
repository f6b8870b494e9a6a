"""Property tests (hypothesis) for metric invariants not covered by tests/test_metrics_*.py.

Already covered there: Dice symmetric, in [0, 1] and 1 iff equal for non-empty masks
(test_metrics_overlap.test_dice_properties); lesion counts invariant to a flip of one axis
(test_metrics_lesions.test_lesion_count_invariant_to_flips); neighbour counts symmetric
(test_metrics_lesions.test_neighbours_symmetric). Added here: invariance of every overlap
metric and of the lesion partition to any joint flip and in-plane transpose, Dice as the
harmonic mean of precision and recall, lesion sizes summing to the mask, hit symmetry of
lesion matching, neighbour counts invariant to reversing the slice order, and lesion
instances on volumes with two axes of length 1 (where cc3d 4.1 raised at 26-connectivity).
"""
from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from analysis.lesions import count_neighbours, dice, lesion_instances, lesion_table, match_lesions, precision, recall

shapes = st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 6))
masks = arrays(bool, shapes)
flips = st.lists(st.sampled_from([0, 1, 2]), unique=True, max_size=3)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@settings(max_examples=60, deadline=None)
@given(st.data(), flips, st.booleans())
def test_overlap_metrics_invariant_to_joint_flips_and_transpose(data, axes, transpose):
    a = data.draw(masks)
    b = data.draw(arrays(bool, a.shape))

    def move(m):
        m = np.flip(m, axes) if axes else m
        return np.swapaxes(m, 1, 2) if transpose else m

    for metric in (dice, precision, recall):
        assert _same(metric(move(a), move(b)), metric(a, b)), metric.__name__


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_dice_is_the_harmonic_mean_of_precision_and_recall(data):
    a = data.draw(masks)
    b = data.draw(arrays(bool, a.shape))
    p, r, d = precision(a, b), recall(a, b), dice(a, b)
    assert 0.0 <= p <= 1.0 or math.isnan(p)
    assert 0.0 <= r <= 1.0 or math.isnan(r)
    if a.any() and b.any():
        expected = 0.0 if p + r == 0 else 2 * p * r / (p + r)
        assert math.isclose(d, expected, rel_tol=1e-12, abs_tol=1e-15)
    # recall of pred vs ref is precision of ref vs pred (when both denominators are non-zero)
    if b.any():
        assert recall(a, b) == precision(b, a)


@settings(max_examples=50, deadline=None)
@given(masks, st.sampled_from([6, 18, 26]), flips, st.booleans())
def test_lesion_partition_invariant_to_flips_and_transpose(mask, conn, axes, transpose):
    labels, n = lesion_instances(mask, conn)
    moved = np.flip(mask, axes) if axes else mask
    moved = np.swapaxes(moved, 1, 2) if transpose else moved
    labels2, n2 = lesion_instances(moved, conn)
    assert n2 == n
    table, table2 = lesion_table(labels, n), lesion_table(labels2, n2)
    assert sorted(table.voxels.tolist()) == sorted(table2.voxels.tolist())
    assert int(table.voxels.sum()) == int(mask.sum())   # lesions partition the mask
    assert set(np.unique(labels[mask]).tolist()) == set(range(1, n + 1))


@settings(max_examples=50, deadline=None)
@given(st.data(), st.sampled_from([6, 26]))
def test_matching_hits_are_symmetric(data, conn):
    a = data.draw(masks)
    b = data.draw(arrays(bool, a.shape))
    la, na = lesion_instances(a, conn)
    lb, nb = lesion_instances(b, conn)
    a_match, a_shared, b_match = match_lesions(la, na, lb, nb)
    b_match2, _, a_match2 = match_lesions(lb, nb, la, na)
    # "lesion i of A overlaps some lesion of B" does not depend on which side is the reference
    assert np.array_equal(a_match > 0, a_match2 > 0)
    assert np.array_equal(b_match > 0, b_match2 > 0)
    assert np.all((a_match > 0) == (a_shared > 0))
    # a mask matched with itself: every lesion is hit by itself with all its voxels
    self_match, self_shared, _ = match_lesions(la, na, la, na)
    assert self_match.tolist() == list(range(1, na + 1))
    assert self_shared.tolist() == lesion_table(la, na).voxels.tolist()


def test_lesion_instances_on_thin_volumes_match_scipy():
    from scipy import ndimage

    for conn, rank in ((6, 1), (18, 2), (26, 3)):
        for shape in ((1, 1, 3), (1, 3, 1), (3, 1, 1), (1, 1, 5), (1, 1, 1)):
            for seed in range(20):
                mask = np.random.default_rng(seed).random(shape) > 0.5
                labels, n = lesion_instances(mask, conn)
                ref, n_ref = ndimage.label(mask, ndimage.generate_binary_structure(3, rank))
                assert n == n_ref and labels.shape == mask.shape and np.array_equal(labels > 0, mask)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 10)), min_size=1, max_size=12), st.integers(0, 15))
def test_neighbour_counts_invariant_to_reversing_the_slices(ranges, k):
    z_first = np.array([a for a, _ in ranges])
    z_last = z_first + np.array([b for _, b in ranges])
    top = 60
    assert count_neighbours(z_first, z_last, k).tolist() == count_neighbours(top - z_last, top - z_first, k).tolist()
