from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from analysis.errors import InputError
from analysis.imaging.io import Geometry, atomic_directory, read_array, read_header, write_array, write_mask
from tests.conftest import make_geometry

OBLIQUE = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def test_round_trip_keeps_geometry_and_values(tmp_path):
    geom = make_geometry((5, 7, 9), spacing=(0.7, 0.8, 2.5), origin=(-3.0, 4.5, 100.0), direction=OBLIQUE)
    arr = np.arange(5 * 7 * 9, dtype=np.int16).reshape(5, 7, 9) - 100
    path = write_array(arr, geom, tmp_path / "img.nii.gz")
    back, g2 = read_array(path)
    assert np.array_equal(back, arr)
    assert g2.mismatch(geom) is None
    assert g2.shape == (5, 7, 9)
    assert read_header(path).mismatch(geom) is None
    assert geom.voxel_volume_ml == pytest.approx(0.7 * 0.8 * 2.5 / 1000)


def test_write_mask_is_binary_uint8_with_reference_geometry(tmp_path):
    geom = make_geometry((4, 6, 6), direction=OBLIQUE)
    mask = np.zeros((4, 6, 6), np.float32)
    mask[1, 2, 3] = 0.7
    path = write_mask(mask, geom, tmp_path / "m.nii.gz")
    img = sitk.ReadImage(str(path))
    assert img.GetPixelID() == sitk.sitkUInt8
    arr = sitk.GetArrayFromImage(img)
    assert arr.sum() == 1 and arr[1, 2, 3] == 1
    assert Geometry.of(img).mismatch(geom) is None


def test_mismatch_names_the_differing_property():
    a = make_geometry((4, 6, 6))
    assert "spacing" in Geometry(a.size, (0.8, 0.9, 5.0), a.origin, a.direction).mismatch(a)
    assert "size" in Geometry((6, 6, 5), a.spacing, a.origin, a.direction).mismatch(a)
    assert "origin" in Geometry(a.size, a.spacing, (0, 0, 0), a.direction).mismatch(a)
    assert "direction" in Geometry(a.size, a.spacing, a.origin, OBLIQUE).mismatch(a)
    # within tolerance: float32 header round-off
    assert Geometry(a.size, tuple(s * (1 + 1e-6) for s in a.spacing), a.origin, a.direction).mismatch(a) is None


@pytest.mark.parametrize("content, expect", [(b"", "empty"), (b"not an image at all" * 10, "not a gzip-compressed NIfTI"), (b"\x1f\x8b\x08\x00garbage", "truncated")])
def test_bad_files_raise_one_line_input_errors(tmp_path, content, expect):
    p = tmp_path / "bad.nii.gz"
    p.write_bytes(content)
    with pytest.raises(InputError) as exc:
        read_array(p)
    assert expect in str(exc.value) and str(p) in str(exc.value) and "\n" not in str(exc.value)


def test_2d_image_refused_where_3d_needed(tmp_path):
    p = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4), np.int16)), str(p))
    with pytest.raises(InputError, match="2D image, expected 3D"):
        read_array(p)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "a.csv").write_text("x", encoding="utf-8")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(out) as tmp:
        (tmp / "a.csv").write_text("x", encoding="utf-8")
    assert (out / "a.csv").read_text(encoding="utf-8") == "x"
    with pytest.raises(InputError, match="--overwrite"):
        with atomic_directory(out):
            pass
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "b.csv").write_text("y", encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["b.csv"]


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_gzip_nifti_is_refused(tmp_path, keep):
    """ITK reads a cut .nii.gz silently (filling zeros); the reader must refuse it."""
    geom = make_geometry((6, 16, 20))
    arr = np.random.default_rng(1).integers(-1000, 1000, size=(6, 16, 20)).astype(np.int16)
    full = write_array(arr, geom, tmp_path / "full.nii.gz").read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(full[: int(len(full) * keep)])
    with pytest.raises(InputError, match="truncated"):
        read_array(cut)
    with pytest.raises(InputError, match="truncated"):
        read_header(cut)


def test_nan_in_float_image_is_refused(tmp_path):
    """ITK reads stored NaN as 0; the reader checks the stored values itself."""
    arr = np.zeros((3, 4, 5), np.float32)
    arr[1, 2, 3] = np.nan
    p = write_array(arr, make_geometry((3, 4, 5)), tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match="1 voxel"):
        read_array(p)
