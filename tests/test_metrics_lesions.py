"""Lesion instances, extent, neighbours, matching, bone identity and diffuse fraction."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from analysis.lesions import (bone_identity, count_neighbours, diffuse_fractions, lesion_instances, lesion_table,
                              match_lesions)


def _two_lesions():
    m = np.zeros((5, 8, 8), bool)
    m[0:2, 1:3, 1:3] = True      # lesion 1: slices 0-1, 8 voxels
    m[4, 5:7, 5:7] = True        # lesion 2: slice 4, 4 voxels
    return m


def test_lesion_table_golden():
    labels, n = lesion_instances(_two_lesions())
    t = lesion_table(labels, n, spacing_mm=(0.5, 1.0, 4.0))
    assert n == 2
    assert t.z_first.tolist() == [0, 4] and t.z_last.tolist() == [1, 4]
    assert t.voxels.tolist() == [8, 4]
    np.testing.assert_allclose(t.volume_ml, [8 * 2.0 / 1000, 4 * 2.0 / 1000])


def test_connectivity_changes_partition():
    m = np.zeros((2, 2, 2), bool)
    m[0, 0, 0] = m[1, 1, 1] = True   # corner neighbours only
    assert lesion_instances(m, 26)[1] == 1
    assert lesion_instances(m, 18)[1] == 2
    m2 = np.zeros((1, 2, 2), bool)
    m2[0, 0, 0] = m2[0, 1, 1] = True  # in-plane diagonal = edge neighbours
    assert lesion_instances(m2, 18)[1] == 1 and lesion_instances(m2, 6)[1] == 2
    with pytest.raises(ValueError, match="connectivity"):
        lesion_instances(m, 8)


@pytest.mark.parametrize("conn,rank", [(6, 1), (18, 2), (26, 3)])
def test_cc3d_partition_equals_scipy_label(conn, rank):
    m = np.random.default_rng(conn).random((12, 20, 20)) > 0.7
    ours, n = lesion_instances(m, conn)
    ref, n_ref = ndimage.label(m, structure=ndimage.generate_binary_structure(3, rank))
    assert n == n_ref
    # same partition: a one-to-one map between label ids
    pairs = np.unique(np.stack([ours[m], ref[m]]), axis=1)
    assert pairs.shape[1] == n and len(set(pairs[0])) == n and len(set(pairs[1])) == n


def test_neighbours_gap_definition():
    # ranges [0,2], [13,14] (gap 11 from first), [12,12] (gap 10 from first), [30,31]
    z_first = np.array([0, 13, 12, 30])
    z_last = np.array([2, 14, 12, 31])
    assert count_neighbours(z_first, z_last, 10).tolist() == [1, 1, 2, 0]
    assert count_neighbours(z_first, z_last, 11).tolist() == [2, 2, 2, 0]
    assert count_neighbours(np.array([5]), np.array([5])).tolist() == [0]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 10)), min_size=1, max_size=12), st.integers(0, 15))
def test_neighbours_symmetric(ranges, k):
    z_first = np.array([a for a, _ in ranges])
    z_last = z_first + np.array([b for _, b in ranges])
    gap = np.maximum(0, np.maximum(z_first[None] - z_last[:, None], z_first[:, None] - z_last[None]))
    near = (gap <= k) & ~np.eye(len(ranges), dtype=bool)
    assert np.array_equal(near, near.T)
    assert count_neighbours(z_first, z_last, k).tolist() == near.sum(1).tolist()
    # the total is twice the number of neighbour pairs
    assert count_neighbours(z_first, z_last, k).sum() % 2 == 0


@settings(max_examples=40, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 6))),
       st.sampled_from([6, 18, 26]), st.sampled_from([0, 1, 2]))
def test_lesion_count_invariant_to_flips(mask, conn, axis):
    assert lesion_instances(mask, conn)[1] == lesion_instances(np.flip(mask, axis), conn)[1]


def test_matching_most_shared_voxels_and_false_positives():
    gt = np.zeros((1, 4, 10), np.uint8)
    gt[0, 1:3, 0:6] = 1                    # one GT lesion, 12 voxels
    pred = np.zeros_like(gt)
    pred[0, 1, 0:2] = 1                    # pred lesion 1 shares 2 voxels
    pred[0, 1:3, 4:7] = 1                  # pred lesion 2 shares 4 voxels
    pred[0, 3, 9] = 1                      # pred lesion 3 (raster order): false positive
    g, ng = lesion_instances(gt)
    p, npred = lesion_instances(pred)
    gt_match, shared, pred_match = match_lesions(g, ng, p, npred)
    assert npred == 3
    assert gt_match.tolist() == [2] and shared.tolist() == [4]
    assert pred_match.tolist() == [1, 1, 0]
    # nothing predicted
    empty, ne = lesion_instances(np.zeros_like(gt))
    assert match_lesions(g, ng, empty, ne)[0].tolist() == [0]


def test_bone_identity_rule_and_fallback():
    labels, n = lesion_instances(_two_lesions())
    table = lesion_table(labels, n)
    bones = np.zeros(labels.shape, np.uint8)
    bones[:, 1:3, 1:2] = 3                 # rib under 4 voxels of lesion 1
    bones[:, 1:3, 2:3] = 3
    bones[0, 1, 1] = 2                     # spine under 1 voxel: rib stays most frequent
    bones[4, 7, 7] = 6                     # lesion 2 (rows/cols 5-6): lower extremity 1 voxel away
    names, wb = bone_identity(labels, table, bones)
    assert names == ["rib", "extremity"] and wb.tolist() == [False, True]
    bones[4, 7, 7] = 0
    bones[4, 0, 0] = 4                     # pelvis 5 voxels away in-plane: beyond the 2-voxel dilation
    names, wb = bone_identity(labels, table, bones)
    assert names[1] == "unknown" and not wb[1]
    assert bone_identity(labels, table, None)[0] == ["unknown", "unknown"]


def test_bone_names_for_every_code():
    m = np.zeros((1, 1, 15), bool)
    m[0, 0, ::2] = True                    # 8 separate one-voxel lesions
    labels, n = lesion_instances(m, 6)
    bones = np.zeros(m.shape, np.uint8)
    bones[0, 0, ::2] = np.arange(8)
    names, wb = bone_identity(labels, lesion_table(labels, n), bones)
    # code 0 lesion: its 2-voxel in-plane dilation reaches code 1
    assert names == ["skull", "skull", "spine", "rib", "pelvis", "extremity", "extremity", "other"]
    assert wb.tolist() == [False, False, True, False, True, False, True, False]


def test_diffuse_fraction_golden():
    lesion = np.zeros((2, 6, 6), bool)
    lesion[0, 0:2, 0:2] = True             # 4 px in a bone block of 12 px (incl. lesion) in slice 0
    lesion[1, 0:2, 0:2] = True             # 4 px in slice 1 where the bone block is only 6 px
    bone = np.zeros_like(lesion)
    bone[0, 0:3, 0:4] = True
    bone[1, 0:2, 0:3] = True
    bone[0, 5, 5] = True                   # separate bone component: not part of the region
    labels, n = lesion_instances(lesion)
    frac = diffuse_fractions(labels, n, bone)
    np.testing.assert_allclose(frac, [4 / 6])
    # 8-connectivity: a diagonal bone pixel joins the region
    bone[1, 2, 3] = True
    np.testing.assert_allclose(diffuse_fractions(labels, n, bone), [4 / 7])
    assert diffuse_fractions(*lesion_instances(np.zeros_like(lesion)), bone).size == 0


def test_lesion_table_boxes_match_find_objects():
    m = np.random.default_rng(7).random((9, 14, 15)) > 0.75
    labels, n = lesion_instances(m, 6)
    t = lesion_table(labels, n)
    assert t.boxes == ndimage.find_objects(labels)
    np.testing.assert_array_equal(t.voxels, np.bincount(labels.ravel())[1:])
    empty = lesion_table(*lesion_instances(np.zeros((2, 2, 2), bool)))
    assert empty.n == 0 and empty.boxes == []
