"""One reader of a cohort case (analysis.cohort.case), and validate applying its label rule.

* a RAS-stored case reads as SimpleITK's DICOMOrient(LPS) view, the label as uint8 0/1;
  ``canonical=False`` gives the stored arrays and geometry;
* each label problem is one line naming the label file, the same words in read_case and
  validate; both problems of one label are reported together (DataProblems);
* unreadable files and a direction that cannot be reoriented are one-line InputErrors.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from analysis.cohort.case import CohortCase, label_problems, read_case
from analysis.cohort.layout import Cohort
from analysis.cohort.validate import validate_dataset
from analysis.errors import DataProblems, InputError
from analysis.imaging.io import Geometry, write_array
from tests.conftest import make_geometry, write_tiny_cohort

RAS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
SHAPE = (6, 16, 20)


def _lps(path) -> np.ndarray:
    """The file's canonical view by SimpleITK alone (independent of Reorientation)."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS"))


@pytest.fixture
def ras_cohort(tmp_path) -> Cohort:
    geometry = make_geometry(SHAPE, direction=RAS)
    return Cohort(write_tiny_cohort(tmp_path / "ds", n_cases=2, geometry=geometry))


def test_canonical_view_of_a_ras_case_is_dicomorients(ras_cohort):
    case = read_case(ras_cohort, "case_000")
    assert isinstance(case, CohortCase) and case.canonical and case.case == "case_000"
    np.testing.assert_array_equal(case.image, _lps(ras_cohort.image_path("case_000")))
    np.testing.assert_array_equal(case.label, _lps(ras_cohort.label_path("case_000")))
    assert case.image.dtype == np.int16 and case.label.dtype == np.uint8
    assert case.image.flags.c_contiguous and case.label.flags.c_contiguous
    assert set(np.unique(case.label).tolist()) == {0, 1} and int(case.label.sum()) == 2 * 4 * 4
    oriented = sitk.DICOMOrient(sitk.ReadImage(str(ras_cohort.image_path("case_000"))), "LPS")
    assert case.geometry.direction == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert case.geometry.origin == pytest.approx(oriented.GetOrigin())
    assert case.geometry == case.reorientation.canonical_geometry
    assert case.reorientation.native.direction == pytest.approx(RAS)


def test_stored_view_keeps_the_files_order_and_geometry(ras_cohort):
    case = read_case(ras_cohort, "case_000", canonical=False)
    stored = sitk.ReadImage(str(ras_cohort.image_path("case_000")))
    np.testing.assert_array_equal(case.image, sitk.GetArrayFromImage(stored))
    assert not case.canonical and case.geometry == case.reorientation.native
    assert case.geometry.direction == pytest.approx(RAS) and case.label.dtype == np.uint8
    np.testing.assert_array_equal(case.reorientation.forward(case.label), read_case(ras_cohort, "case_000").label)


def test_float_labels_holding_0_and_1_are_accepted(tmp_path):
    cohort = Cohort(write_tiny_cohort(tmp_path / "ds", n_cases=1))
    label = np.zeros(SHAPE, np.float32)
    label[2, 3, 4] = 1.0
    write_array(label, make_geometry(SHAPE), cohort.label_path("case_000"))
    case = read_case(cohort, "case_000")
    assert case.label.dtype == np.uint8 and np.argwhere(case.label).tolist() == [[2, 3, 4]]


def _label(cohort: Cohort, values: np.ndarray, geometry: Geometry | None = None) -> None:
    write_array(values, geometry or make_geometry(SHAPE), cohort.label_path("case_000"))


def test_label_values_other_than_0_and_1_are_one_line_naming_the_first_eight(tmp_path):
    cohort = Cohort(write_tiny_cohort(tmp_path / "ds", n_cases=1))
    label = np.zeros(SHAPE, np.float32)
    label[0, 0, :11] = [1, 0.5, 2, 3, 4, 5, 6, 7, 8, 9, -1]
    _label(cohort, label)
    with pytest.raises(InputError) as err:
        read_case(cohort, "case_000")
    expected = (f"{cohort.label_path('case_000')}: label values {{-1, 0.5, 2, 3, 4, 5, 6, 7}} found; expected only "
                f"0 and 1 (a multi-label or probability mask? binarise it first)")
    assert str(err.value) == expected and type(err.value) is InputError
    assert validate_dataset(cohort.root).problems == [expected]     # validate: the same rule, the same words


def test_label_geometry_must_match_its_image(tmp_path):
    cohort = Cohort(write_tiny_cohort(tmp_path / "ds", n_cases=1))
    _label(cohort, np.zeros(SHAPE, np.uint8), make_geometry(SHAPE, spacing=(0.8, 0.9, 5.0)))
    expected = f"{cohort.label_path('case_000')}: spacing (0.8, 0.9, 5) differs from (0.8, 0.9, 3) of its image"
    with pytest.raises(InputError) as err:
        read_case(cohort, "case_000")
    assert str(err.value) == expected
    assert validate_dataset(cohort.root).problems == [expected]


def test_both_problems_of_one_label_are_reported_together(tmp_path):
    cohort = Cohort(write_tiny_cohort(tmp_path / "ds", n_cases=1))
    label = np.zeros(SHAPE, np.uint8)
    label[1, 1, 1] = 2
    _label(cohort, label, make_geometry(SHAPE, origin=(0.0, 0.0, 0.0)))
    with pytest.raises(DataProblems) as err:
        read_case(cohort, "case_000")
    path = cohort.label_path("case_000")
    assert [p.split(": ", 1)[1][:12] for p in err.value.problems] == ["origin (0, 0", "label values"]
    assert all(p.startswith(f"{path}: ") for p in err.value.problems)
    assert str(err.value).endswith("(and 1 more)") and "\n" not in str(err.value)
    assert validate_dataset(cohort.root).problems == err.value.problems


def test_label_problems_is_empty_for_a_usable_label():
    g = make_geometry(SHAPE)
    assert label_problems("x.nii.gz", np.ones(SHAPE, np.int16), g, g) == []
    assert label_problems("x.nii.gz", np.zeros(SHAPE, np.float64), g, g) == []


def test_unreadable_files_and_unorientable_directions_are_one_line(tmp_path):
    cohort = Cohort(write_tiny_cohort(tmp_path / "ds", n_cases=2))
    cohort.label_path("case_000").write_bytes(b"not a nifti")
    with pytest.raises(InputError, match=r"labelsTr/case_000\.nii\.gz: truncated or not a gzip"):
        read_case(cohort, "case_000")
    cohort.image_path("case_001").unlink()
    with pytest.raises(InputError, match=r"imagesTr/case_001_0000\.nii\.gz"):
        read_case(cohort, "case_001")
    c = float(np.sqrt(0.5))
    diagonal = make_geometry(SHAPE, direction=(c, c, 0.0, -c, c, 0.0, 0.0, 0.0, 1.0))  # x and y at 45 degrees
    other = Cohort(write_tiny_cohort(tmp_path / "diag", n_cases=1, geometry=diagonal))
    with pytest.raises(InputError) as err:
        read_case(other, "case_000")
    assert str(err.value).startswith(f"{other.image_path('case_000')}: direction") and "\n" not in str(err.value)
