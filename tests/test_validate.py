from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from analysis.cohort.validate import validate_dataset
from analysis.imaging.io import Geometry, read_array, write_array
from cli import main
from tests.conftest import make_geometry, tree_hash


def run_validate(path):
    return CliRunner().invoke(main, ["validate", str(path)])


def test_clean_cohort_passes_with_summary(tiny_cohort):
    before = tree_hash(tiny_cohort)
    r = run_validate(tiny_cohort)
    assert r.exit_code == 0, r.output
    assert "case_000" in r.output and "3 cases, 18 slices, 64 lesion voxels" in r.output
    assert tree_hash(tiny_cohort) == before  # inputs never modified


def _break_label(ds, case, arr=None, geom=None):
    lab, g = read_array(ds / "labelsTr" / f"{case}.nii.gz")
    write_array(lab if arr is None else arr(lab), geom or g, ds / "labelsTr" / f"{case}.nii.gz")


@pytest.mark.parametrize("breaker, expected", [
    (lambda ds: _break_label(ds, "case_000", geom=Geometry((20, 16, 6), (0.8, 0.9, 5.0), (-10.0, 5.0, 2.5), make_geometry().direction)),
     "labelsTr/case_000.nii.gz: spacing (0.8, 0.9, 5) differs from (0.8, 0.9, 3) of its image"),
    (lambda ds: _break_label(ds, "case_001", geom=Geometry((20, 16, 6), (0.8, 0.9, 3.0), (0.0, 0.0, 0.0), make_geometry().direction)),
     "labelsTr/case_001.nii.gz: origin"),
    (lambda ds: _break_label(ds, "case_000", arr=lambda a: a * 2),
     "labelsTr/case_000.nii.gz: label values {2} found; expected only 0 and 1"),
    (lambda ds: (ds / "labelsTr" / "case_002.nii.gz").unlink(),
     "imagesTr/case_002_0000.nii.gz: image without a label"),
    (lambda ds: (ds / "imagesTr" / "case_002_0000.nii.gz").unlink(),
     "labelsTr/case_002.nii.gz: label without an image"),
    (lambda ds: (ds / "imagesTr" / "case_001_0000.nii.gz").write_bytes(b""),
     "imagesTr/case_001_0000.nii.gz: file is empty"),
    (lambda ds: (ds / "imagesTr" / "case_001_0000.nii.gz").write_bytes(
        (ds / "imagesTr" / "case_001_0000.nii.gz").read_bytes()[:200]),
     "imagesTr/case_001_0000.nii.gz:"),
    (lambda ds: (ds / "dataset.json").write_text("{not json", encoding="utf-8"), "dataset.json: malformed dataset.json"),
    (lambda ds: (ds / "dataset.json").unlink(), "dataset.json: missing"),
    (lambda ds: (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1}, "numTraining": 3, "file_ending": ".nii"}), encoding="utf-8"),
     "'file_ending' must be '.nii.gz'"),
    (lambda ds: (ds / "splits.json").write_text(json.dumps({"seed": 0, "test": ["case_009"], "folds": [{"train": ["case_000"], "val": ["case_001"]}]}), encoding="utf-8"),
     "splits.json: names unknown case(s) case_009"),
    (lambda ds: (ds / "splits.json").write_text(json.dumps({"seed": 0, "test": ["case_000"], "folds": [{"train": ["case_000"], "val": ["case_001"]}]}), encoding="utf-8"),
     "fold 0: test cases used for training/validation: case_000"),
])
def test_each_problem_is_one_line_naming_the_file(tiny_cohort, breaker, expected):
    breaker(tiny_cohort)
    r = run_validate(tiny_cohort)
    assert r.exit_code == 2
    assert expected in r.output, r.output
    assert "Traceback" not in r.output
    assert all(line.startswith(("error:", "warning:")) or not line.startswith(" ") for line in r.output.splitlines())


def test_nan_hu_and_4d_and_bone_codes(tiny_cohort):
    geom = make_geometry()
    ct = np.zeros((6, 16, 20), np.float32)
    ct[0, 0, 0] = np.nan
    ct[1, 1, 1] = np.inf
    write_array(ct, geom, tiny_cohort / "imagesTr" / "case_000_0000.nii.gz")
    img4 = sitk.GetImageFromArray(np.zeros((2, 6, 16, 20), np.int16), isVector=False)
    sitk.WriteImage(img4, str(tiny_cohort / "imagesTr" / "case_001_0000.nii.gz"))
    bones = np.full((6, 16, 20), 9, np.uint8)
    write_array(bones, geom, tiny_cohort / "bonesTr" / "case_002.nii.gz")
    report = validate_dataset(tiny_cohort)
    text = "\n".join(report.problems)
    assert "case_000_0000.nii.gz: 2 voxel(s) are NaN or infinite; expected finite values (HU)" in text
    assert "case_001_0000.nii.gz: is a 4D image, expected 3D" in text
    assert "bonesTr/case_002.nii.gz: bone codes [9] out of range" in text
    assert len(report.problems) == 3


def test_missing_dataset_folder():
    r = run_validate("/nonexistent/ds")
    assert r.exit_code == 2 and "dataset folder not found" in r.output


def test_an_image_that_is_not_ct_is_a_problem_unless_the_check_is_off(tiny_cohort):
    """An MR-like image (values 0..3000, no air) in a cohort: one problem naming it; --no-ct-check
    (a cohort of tightly cropped CT) accepts it."""
    geom = make_geometry()
    mr = np.random.default_rng(0).uniform(0, 3000, (6, 16, 20)).astype(np.float32)
    mr[0, 0, 0], mr[0, 0, 1] = 0.0, 3000.0
    path = tiny_cohort / "imagesTr" / "case_001_0000.nii.gz"
    write_array(mr, geom, path)
    r = CliRunner().invoke(main, ["validate", str(tiny_cohort)])
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {path}: values 0..3000 with nothing below 0: not CT in Hounsfield units (air is -1000 HU); "
                     f"--no-ct-check accepts it (a CT cropped tightly)"]
    r = CliRunner().invoke(main, ["validate", str(tiny_cohort), "--no-ct-check"])
    assert r.exit_code == 0, r.output
