from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from click.testing import CliRunner

from analysis.cohort.bone_maps import TOTALSEG_TO_BONE
from analysis.cohort.imports import totalseg_lookup
from analysis.cohort.layout import Cohort
from analysis.imaging.io import Geometry, read_array, write_array
from cli import main
from tests.conftest import make_geometry


def write_dicom_series(folder, hu: np.ndarray, spacing=(0.7, 0.7, 2.5), origin=(-50.0, -60.0, 100.0),
                       skip=(), series_uid="1.2.826.0.1.3680043.2.1125.1"):
    """Write a CT series as unsigned stored values with rescale intercept -1024 (0028|1052):
    GDCM stores HU + 1024, so reading gives HU only when the rescale is applied."""
    folder.mkdir(parents=True, exist_ok=True)
    vol = sitk.GetImageFromArray(hu.astype(np.int16))
    vol.SetSpacing(spacing)
    vol.SetOrigin(origin)
    for k in range(hu.shape[0]):
        if k in skip:
            continue
        sl = vol[:, :, k]
        pos = (origin[0], origin[1], origin[2] + k * spacing[2])
        tags = {
            "0008|0060": "CT", "0020|000e": series_uid, "0020|000d": "1.2.3.4",
            "0020|0013": str(k + 1), "0020|0032": "\\".join(f"{v:.4f}" for v in pos),
            "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": f"{spacing[1]}\\{spacing[0]}",
            "0018|0050": str(spacing[2]), "0028|1054": "HU", "0028|1052": "-1024", "0028|1053": "1",
            "0028|0100": "16", "0028|0101": "16", "0028|0102": "15", "0028|0103": "0",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        w = sitk.ImageFileWriter()
        w.KeepOriginalImageUIDOn()
        w.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        w.Execute(sl)


def test_dicom_import_preserves_hu_and_geometry(tmp_path):
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1500, size=(5, 12, 10)).astype(np.int16)
    write_dicom_series(tmp_path / "dcm", hu)
    mask = np.zeros_like(hu, dtype=np.uint8)
    mask[2, 3:5, 4:6] = 1
    geom = Geometry(size=(10, 12, 5), spacing=(0.7, 0.7, 2.5), origin=(-50.0, -60.0, 100.0),
                    direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    write_array(mask, geom, tmp_path / "mask.nii.gz")
    ds = tmp_path / "ds"
    r = CliRunner().invoke(main, ["import-dicom", str(tmp_path / "dcm"), "--dataset", str(ds), "--case", "pt01",
                                  "--label", str(tmp_path / "mask.nii.gz")])
    assert r.exit_code == 0, r.output
    r0 = sitk.ImageFileReader()
    r0.SetFileName(str(tmp_path / "dcm" / "slice_000.dcm"))
    r0.ReadImageInformation()
    assert float(r0.GetMetaData("0028|1052")) == -1024.0
    arr, g = read_array(ds / "imagesTr" / "pt01_0000.nii.gz")
    assert np.allclose(arr, hu, atol=0.5)
    assert g.mismatch(geom) is None
    assert Cohort(ds).dataset_json()["numTraining"] == 1
    lab, _ = read_array(ds / "labelsTr" / "pt01.nii.gz")
    assert lab.sum() == 4
    # importing the same case again is refused
    r = CliRunner().invoke(main, ["import-dicom", str(tmp_path / "dcm"), "--dataset", str(ds), "--case", "pt01"])
    assert r.exit_code == 2 and "already exists" in r.output


def test_dicom_missing_slice_is_refused(tmp_path):
    hu = np.zeros((6, 8, 8), np.int16)
    write_dicom_series(tmp_path / "dcm", hu, skip=(3,))
    r = CliRunner().invoke(main, ["import-dicom", str(tmp_path / "dcm"), "--dataset", str(tmp_path / "ds"), "--case", "a"])
    assert r.exit_code == 2 and "uneven slice spacing" in r.output
    assert not (tmp_path / "ds").exists()


def test_dicom_several_series_and_none(tmp_path):
    hu = np.zeros((3, 8, 8), np.int16)
    write_dicom_series(tmp_path / "dcm", hu, series_uid="1.2.3.1")
    write_dicom_series(tmp_path / "dcm2", hu, series_uid="1.2.3.2")
    for f in (tmp_path / "dcm2").iterdir():
        f.rename(tmp_path / "dcm" / ("b_" + f.name))
    r = CliRunner().invoke(main, ["import-dicom", str(tmp_path / "dcm"), "--dataset", str(tmp_path / "ds"), "--case", "a"])
    assert r.exit_code == 2 and "holds 2 DICOM series" in r.output and "--series" in r.output
    r = CliRunner().invoke(main, ["import-dicom", str(tmp_path / "dcm"), "--dataset", str(tmp_path / "ds"),
                                  "--case", "a", "--series", "1.2.3.2"])
    assert r.exit_code == 0, r.output
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["import-dicom", str(tmp_path / "empty"), "--dataset", str(tmp_path / "ds"), "--case", "b"])
    assert r.exit_code == 2 and "no DICOM series found" in r.output


def test_totalsegmentator_mapping():
    lut = totalseg_lookup()
    expected = {25: 4, 26: 2, 50: 2, 69: 5, 74: 5, 75: 6, 76: 6, 77: 4, 78: 4, 91: 1, 92: 3, 115: 3,
                116: 7, 117: 7, 0: 0, 1: 0, 24: 0, 51: 0, 68: 0, 79: 0, 90: 0, 118: 0}
    for src, dst in expected.items():
        assert lut[src] == dst, src
    assert len(TOTALSEG_TO_BONE) == 1 + 25 + 6 + 5 + 24 + 2


def test_import_bones_cli(tiny_cohort):
    geom = make_geometry()
    seg = np.zeros((6, 16, 20), np.uint8)
    seg[0, :2] = 30; seg[1, :2] = 91; seg[2, :2] = 100; seg[3, :2] = 77; seg[4, :2] = 70; seg[5, :2] = 5
    write_array(seg, geom, tiny_cohort / "seg.nii.gz")
    r = CliRunner().invoke(main, ["import-bones", str(tiny_cohort / "seg.nii.gz"), "--dataset", str(tiny_cohort), "--case", "case_000"])
    assert r.exit_code == 0, r.output
    bones, g = read_array(tiny_cohort / "bonesTr" / "case_000.nii.gz")
    assert g.mismatch(geom) is None
    assert [int(bones[k, 0, 0]) for k in range(6)] == [2, 1, 3, 4, 5, 0]
    bad = Geometry(geom.size, (1.0, 1.0, 1.0), geom.origin, geom.direction)
    write_array(seg, bad, tiny_cohort / "seg2.nii.gz")
    r = CliRunner().invoke(main, ["import-bones", str(tiny_cohort / "seg2.nii.gz"), "--dataset", str(tiny_cohort), "--case", "case_001"])
    assert r.exit_code == 2 and "seg2.nii.gz: spacing" in r.output
    assert not (tiny_cohort / "bonesTr" / "case_001.nii.gz").exists()
