"""Reorientation.stored_slices / canonical_slices: the one canonical <-> stored slice-number map.

Checked against the general voxel map (Reorientation.index_forward) and against SimpleITK's
DICOMOrient on real files (the docstring's example runs with ``make test``'s --doctest-modules).
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from analysis.imaging.io import Geometry, write_array
from analysis.imaging.orientation import Reorientation

AXIAL = {
    "LPS": (1, 0, 0, 0, 1, 0, 0, 0, 1),
    "RAS": (-1, 0, 0, 0, -1, 0, 0, 0, 1),
    "head-to-feet": (1, 0, 0, 0, 1, 0, 0, 0, -1),
    "RAI, x/y swapped": (0, -1, 0, -1, 0, 0, 0, 0, -1),
}


def _geometry(direction, size=(4, 3, 7)) -> Geometry:
    return Geometry(size=size, spacing=(0.8, 0.9, 2.5), origin=(1.0, 2.0, 3.0),
                    direction=tuple(float(v) for v in direction))


@pytest.mark.parametrize("name", sorted(AXIAL))
def test_slice_map_agrees_with_the_voxel_map(name):
    reo = Reorientation.of(_geometry(AXIAL[name]))
    n = 7
    stored = np.arange(n)
    canonical = reo.canonical_slices(stored)
    voxels = np.stack([stored, np.zeros(n), np.zeros(n)], axis=1)          # (slice, row, col) of stored voxels
    np.testing.assert_array_equal(canonical, reo.index_forward(voxels)[:, 0].astype(np.int64))
    np.testing.assert_array_equal(reo.stored_slices(canonical), stored)   # inverse
    assert canonical.dtype == np.int64
    assert sorted(canonical.tolist()) == list(range(n))


@pytest.mark.parametrize("name", sorted(AXIAL))
def test_canonical_slice_k_is_the_stored_slice_of_the_same_content(tmp_path, name):
    geometry = _geometry(AXIAL[name])
    native = np.arange(7 * 3 * 4, dtype=np.int16).reshape(7, 3, 4)
    write_array(native, geometry, tmp_path / "ct.nii.gz")
    canonical = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(tmp_path / "ct.nii.gz")), "LPS"))
    reo = Reorientation.of(geometry)
    for k in range(7):
        s = int(reo.stored_slices(k))
        assert set(canonical[k].ravel().tolist()) == set(native[s].ravel().tolist())


def test_two_dimensional_index_arrays_keep_their_shape():
    reo = Reorientation.of(_geometry(AXIAL["head-to-feet"]))
    np.testing.assert_array_equal(reo.stored_slices([[0, 1], [5, 6]]), [[6, 5], [1, 0]])
    assert reo.stored_slices(np.array([], np.int64)).shape == (0,)


def test_non_axial_storage_and_out_of_range_indices_are_refused():
    sagittal = Reorientation.of(_geometry((0, 0, 1, 1, 0, 0, 0, 1, 0)))
    with pytest.raises(ValueError, match="not the axial slice axis"):
        sagittal.stored_slices([0])
    reo = Reorientation.of(_geometry(AXIAL["RAS"]))
    with pytest.raises(ValueError, match=r"slice index 7 outside 0\.\.6"):
        reo.canonical_slices([0, 7])
    with pytest.raises(ValueError, match=r"slice index -1 outside"):
        reo.stored_slices(-1)
