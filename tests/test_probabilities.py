"""Compact probability maps: uint8 with scl_slope 1/255, threshold kept exactly."""
from __future__ import annotations

import gzip
import os
import struct

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from analysis.errors import InputError
from analysis.imaging.io import Geometry, read_header, write_mask
from analysis.prediction.probabilities import LEVELS, SLOPE, nifti_affine, quantise, read_probability, write_probability

SHAPE = (9, 12, 14)
OBLIQUE = np.array([[0.9950042, -0.0998334, 0.0], [0.0998334, 0.9950042, 0.0], [0.0, 0.0, 1.0]])


def _geometry(direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)) -> Geometry:
    z, y, x = SHAPE
    return Geometry(size=(x, y, z), spacing=(0.82, 0.91, 2.5), origin=(120.5, -33.25, 905.0),
                    direction=tuple(float(v) for v in direction))


def _adversarial(threshold: float, seed: int = 0) -> np.ndarray:
    """A random map with many values at, just below and just above the threshold and k/255 levels."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0, 1, SHAPE)
    flat = p.ravel()
    n = flat.size // 10
    special = np.concatenate([
        [threshold] * 5, [np.nextafter(threshold, 0.0)] * 5, [np.nextafter(threshold, 1.0)] * 5,
        threshold + rng.uniform(-1.5 / 255, 1.5 / 255, n),
        np.arange(LEVELS + 1) / LEVELS,
        [0.0, 1.0],
    ])
    special = np.clip(special, 0.0, 1.0)
    idx = rng.choice(flat.size, size=min(special.size, flat.size), replace=False)
    flat[idx] = special[:idx.size]
    return p


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.05, 0.95, 0.2, 1 / 255, 0.0, 1.0])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_threshold_is_reproduced_by_every_reader(tmp_path, threshold: float, dtype) -> None:
    prob = _adversarial(threshold).astype(dtype)
    geom = _geometry()
    path = tmp_path / "prob.nii.gz"
    stored = write_probability(prob, geom, path, threshold=threshold)
    assert stored.dtype == np.uint8 and stored.shape == SHAPE
    truth = prob >= threshold
    # SimpleITK: float32, compared with a Python float (numpy compares in float32) and a float64
    itk = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert itk.dtype == np.float32
    np.testing.assert_array_equal(itk >= threshold, truth)
    np.testing.assert_array_equal(itk >= np.float64(threshold), truth)
    # nibabel: float64 and float32 decodings
    img = nib.load(str(path))
    for data in (img.get_fdata(), img.get_fdata(dtype=np.float32)):
        np.testing.assert_array_equal(data.transpose(2, 1, 0) >= threshold, truth)
    back = read_probability(path)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back >= threshold, truth)
    np.testing.assert_array_equal(back, (stored.astype(np.float64) * np.float64(SLOPE)).astype(np.float32))
    # decoded values are k/255 to float32 precision, and close to the input
    np.testing.assert_allclose(back, stored / 255.0, rtol=1e-7, atol=0)
    err = np.abs(back - prob)
    assert err.max() < 3 / 255
    far = np.abs(prob - threshold) > 2 / 255
    assert err[far].max() <= 0.5 / 255 + 1e-7


def test_header_and_geometry(tmp_path) -> None:
    for direction in [(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),   # RAS-stored
                      (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0),    # permuted and flipped
                      tuple(OBLIQUE.ravel())]:
        geom = _geometry(direction)
        path = tmp_path / "p.nii.gz"
        write_probability(np.full(SHAPE, 0.25), geom, path, threshold=0.5)
        assert read_header(path).mismatch(geom) is None
        img = nib.load(str(path))
        hdr = img.header
        assert hdr.get_data_dtype() == np.uint8
        # nibabel moves the scaling from the header to the data proxy on load; the raw header holds it
        assert img.dataobj.slope == float(np.float32(1 / 255)) and img.dataobj.inter == 0.0
        with gzip.open(path, "rb") as fh:
            raw = fh.read(348)
        assert struct.unpack("<2f", raw[112:120]) == (float(np.float32(1 / 255)), 0.0)
        assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
        np.testing.assert_allclose(img.affine, nifti_affine(geom), atol=1e-5)
        np.testing.assert_allclose(hdr.get_qform(), nifti_affine(geom), atol=1e-5)
        # voxel (x=1, y=2, z=3): ITK's physical point (LPS) is the RAS point with x, y negated
        ras = img.affine @ np.array([1, 2, 3, 1.0])
        itk = sitk.ReadImage(str(path)).TransformIndexToPhysicalPoint((1, 2, 3))
        np.testing.assert_allclose(itk, (-ras[0], -ras[1], ras[2]), atol=1e-4)


def test_atomic_write_honours_the_umask(tmp_path) -> None:
    old = os.umask(0o027)
    try:
        write_probability(np.zeros(SHAPE), _geometry(), tmp_path / "p.nii.gz", threshold=0.5)
    finally:
        os.umask(old)
    assert ((tmp_path / "p.nii.gz").stat().st_mode & 0o777) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["p.nii.gz"]      # no temporary file left


def test_bad_input() -> None:
    geom = _geometry()
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        quantise(np.full(SHAPE, 1.5), 0.5)
    with pytest.raises(ValueError, match="finite"):
        quantise(np.full(SHAPE, np.nan), 0.5)
    with pytest.raises(ValueError, match="threshold"):
        quantise(np.zeros(SHAPE), 1.5)
    with pytest.raises(ValueError, match="shape"):
        write_probability(np.zeros((2, 2, 2)), geom, "unused.nii.gz", threshold=0.5)


def test_read_probability_refuses_non_probabilities(tmp_path) -> None:
    path = tmp_path / "ct.nii.gz"
    write_mask(np.ones(SHAPE), _geometry(), path)
    assert read_probability(path).max() == 1.0
    sitk.WriteImage(sitk.GetImageFromArray(np.full(SHAPE, 7, np.int16)), str(tmp_path / "hu.nii.gz"))
    with pytest.raises(InputError, match=r"hu\.nii\.gz: probabilities outside \[0, 1\] \(found 7 to 7\)"):
        read_probability(tmp_path / "hu.nii.gz")


def test_size_of_a_smooth_map_versus_its_mask(tmp_path) -> None:
    """48 x 128 x 128 random smooth map: stored size versus the uint8 mask (numbers in the report)."""
    rng = np.random.default_rng(0)
    shape = (48, 128, 128)
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(1.5, 4, 4))
    prob = 1 / (1 + np.exp(-(field - field.mean()) / field.std() * 3 + 4))     # mostly low, some blobs
    z, y, x = shape
    geom = Geometry((x, y, z), (1.0, 1.0, 3.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    p_path = tmp_path / "prob.nii.gz"
    m_path = tmp_path / "mask.nii.gz"
    write_probability(prob, geom, p_path, threshold=0.5)
    write_mask(prob >= 0.5, geom, m_path)
    p_size, m_size = p_path.stat().st_size, m_path.stat().st_size
    assert 0.005 < (prob >= 0.5).mean() < 0.3
    # larger than its mask, smaller than the uncompressed uint8 volume (a quarter of float32)
    assert m_size < p_size < prob.size
    np.testing.assert_array_equal(read_probability(p_path) >= 0.5, prob >= 0.5)


def test_plain_rounding_would_cross_the_threshold() -> None:
    """The nudging is needed: round(p * 255) alone flips voxels next to these thresholds."""
    for threshold in (0.3, 0.05, 0.95):
        prob = _adversarial(threshold)
        naive = np.rint(prob * LEVELS) * np.float64(SLOPE)
        assert ((naive >= threshold) != (prob >= threshold)).any()
        decoded = quantise(prob, threshold) * np.float64(SLOPE)
        np.testing.assert_array_equal(decoded >= threshold, prob >= threshold)


def test_a_level_whose_decodings_disagree_is_never_stored(tmp_path) -> None:
    """A threshold between float64 and float32 decodings of one level: that level is skipped."""
    k = 3
    d64 = k * np.float64(SLOPE)
    d32 = np.float64(np.float32(d64))
    assert d32 > d64
    threshold = (d64 + d32) / 2
    prob = _adversarial(threshold)
    stored = write_probability(prob, _geometry(), tmp_path / "p.nii.gz", threshold=threshold)
    assert not (stored == k).any() and (stored == k - 1).any() and (stored == k + 1).any()
    itk = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p.nii.gz")))
    np.testing.assert_array_equal(itk >= threshold, prob >= threshold)
    nib_data = nib.load(str(tmp_path / "p.nii.gz")).get_fdata().transpose(2, 1, 0)
    np.testing.assert_array_equal(nib_data >= threshold, prob >= threshold)
