"""analysis.imaging.inputs: what ``--images PATH`` holds, with the documented case ids."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from analysis.errors import InputError
from analysis.imaging.inputs import discover_inputs, read_input, sanitise_case_id
from analysis.imaging.io import write_array
from tests.conftest import make_geometry
from tests.test_dicom import _base, hu_volume, write_ct, write_localizer


def _nifti(path: Path, value: int = 0) -> Path:
    return write_array(np.full((6, 16, 20), value, np.int16), make_geometry(), path)


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """NIfTI/NRRD files, nested series folders, a second series in one folder, localizers, an SR."""
    root = tmp_path / "images"
    _nifti(root / "a_0000.nii.gz", 1)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16)), str(root / "b.nrrd"))
    (root / "notes.txt").write_text("not an image", encoding="utf-8")
    _base("1.2.840.10008.5.1.4.1.1.88.22", series_uid=generate_uid(), modality="SR").save_as(
        root / "report.dcm", enforce_file_format=True)  # root holds no DICOM image: not a series folder
    write_ct(root / "patients" / "pt 01" / "CT", hu_volume(), series_number=3)
    write_ct(root / "patients" / "pt 01" / "CT", hu_volume((4, 16, 20)), series_number=7, origin=(0, 0, 0))
    write_ct(root / "patients" / "pt.02", hu_volume(seed=4), random_names=True)
    write_localizer(root / "patients" / "pt.02", (1, 0, 0, 0, 0, -1), series_uid=generate_uid(), name="scout.dcm")
    return root


def test_mixed_folder_gives_the_documented_case_ids(mixed):
    cases = discover_inputs(mixed)
    assert [(c.case_id, c.kind) for c in cases] == [
        ("a", "image"), ("b", "image"),
        ("patients_pt_01_CT", "dicom"), ("patients_pt_01_CT_s7", "dicom"), ("patients_pt_02", "dicom")]
    by_id = {c.case_id: c for c in cases}
    assert by_id["patients_pt_01_CT"].series.n_slices == 6 and by_id["patients_pt_01_CT_s7"].series.n_slices == 4
    assert by_id["a"].path == mixed / "a_0000.nii.gz" and by_id["a"].series is None
    skipped = by_id["patients_pt_02"].series.record["skipped"]
    assert [s["reason"] for s in skipped] == ["localizer"]
    image, record = read_input(by_id["patients_pt_02"])
    assert np.array_equal(sitk.GetArrayFromImage(image), hu_volume(seed=4))
    assert record["kind"] == "dicom" and record["dicom"]["n_slices"] == 6 and record["case_id"] == "patients_pt_02"
    image, record = read_input(by_id["a"])
    assert int(sitk.GetArrayFromImage(image).max()) == 1 and record == {
        "case_id": "a", "kind": "image", "path": str(mixed / "a_0000.nii.gz"), "dicom": None}


def test_only_the_chosen_series_when_asked(mixed):
    cases = discover_inputs(mixed, all_series=False)
    assert [c.case_id for c in cases] == ["a", "b", "patients_pt_01_CT", "patients_pt_02"]
    rec = next(c for c in cases if c.case_id == "patients_pt_01_CT").series.record
    assert any(s["series_number"] == 7 and s["reason"] == "not chosen: 4 slice(s)" for s in rec["skipped"])


def test_path_itself_a_series_folder_or_a_file(tmp_path):
    write_ct(tmp_path / "CT 2024", hu_volume())
    assert [c.case_id for c in discover_inputs(tmp_path / "CT 2024")] == ["CT_2024"]
    f = _nifti(tmp_path / "pt9_0000.nii.gz")
    (case,) = discover_inputs(f)
    assert (case.case_id, case.kind, case.path) == ("pt9", "image", f)
    for name in ("x.mha", "y.nii", "z_0000.nhdr"):
        assert sanitise_case_id(name.split(".")[0].removesuffix("_0000")) == name.split(".")[0].removesuffix("_0000")


def test_duplicate_case_ids_are_refused_naming_both(tmp_path):
    _nifti(tmp_path / "pt1.nii.gz")
    _nifti(tmp_path / "pt1_0000.nii.gz")
    with pytest.raises(InputError) as exc:
        discover_inputs(tmp_path)
    msg = str(exc.value)
    assert "pt1_0000.nii.gz" in msg and "pt1.nii.gz" in msg and "case id 'pt1'" in msg and "\n" not in msg
    root = tmp_path / "two"
    _nifti(root / "pt_2.nii.gz")
    write_ct(root / "pt 2", hu_volume())
    with pytest.raises(InputError, match=r"case id 'pt_2' is also that of .*pt_2\.nii\.gz"):
        discover_inputs(root)


def test_nothing_usable_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: holds no image file .* and no DICOM series"):
        discover_inputs(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(InputError, match=r"notes\.txt: not an image file"):
        discover_inputs(tmp_path / "notes.txt")
    with pytest.raises(InputError, match=r"missing: not found"):
        discover_inputs(tmp_path / "missing")
    write_localizer(tmp_path / "scouts", (1, 0, 0, 0, 0, -1), series_uid=generate_uid(), name="s.dcm")
    with pytest.raises(InputError, match=r"scouts: holds only localizers"):
        discover_inputs(tmp_path / "scouts")
