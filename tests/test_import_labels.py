"""import-dicom --label with a DICOM-SEG or an RTSTRUCT, and import-dicom --all over a whole export.

Phantom masks round-trip through a highdicom SEG (voxel for voxel) and through an RTSTRUCT
traced from the mask's contours (tests/dicom_rt.py; Dice >= 0.98 under the import's rule:
pixel centres, even-odd over a slice's contours) for series stored in the geometries of
tests/test_dicom_seg.py: rows anterior-to-posterior, columns anterior (rows flipped), and an
Enhanced (multi-frame) CT with its frames out of order.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from analysis.cohort.imports import import_dicom
from analysis.cohort.import_all import import_all
from analysis.cohort.layout import Cohort
from analysis.errors import InputError
from analysis.imaging.dicom import read_dicom
from analysis.imaging.dicom_seg import write_dicom_seg
from analysis.imaging.io import read_array, write_mask
from analysis.lesions.overlap import dice
from analysis.cohort.phantom import generate_case
from cli import main
from tests.dicom_rt import write_rtstruct, write_seg
from tests.test_dicom import hu_volume, write_ct, write_enhanced_ct
from tests.test_dicom_seg import lesion_mask

PHANTOM_SHAPE = (8, 40, 40)


def phantom(seed: int = 1):
    pc = generate_case(seed, PHANTOM_SHAPE, (6.0, 6.0, 9.0), lesion_free=False)
    assert pc.label.sum() > 10
    return pc.ct, pc.label


def _standard(folder: Path, hu: np.ndarray) -> None:
    write_ct(folder, hu, spacing=(6.0, 6.0), step=9.0)


def _columns_anterior(folder: Path, hu: np.ndarray) -> None:
    write_ct(folder, hu, spacing=(6.0, 6.0), step=9.0, iop=(1, 0, 0, 0, -1, 0), random_names=True,
             shuffle_numbers=True)


def _enhanced(folder: Path, hu: np.ndarray) -> None:
    write_enhanced_ct(folder / "enh.dcm", hu, spacing=(6.0, 6.0), step=3.0, iop=(1, 0, 0, 0, -1, 0),
                      frame_order=[3, 0, 5, 1, 7, 4, 2, 6])


GEOMETRIES = {"standard": _standard, "columns-anterior": _columns_anterior, "enhanced-multiframe": _enhanced}


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_seg_label_round_trips_voxel_for_voxel(tmp_path, geometry):
    ct, mask = phantom()
    GEOMETRIES[geometry](tmp_path / "ct", ct)
    _, series = read_dicom(tmp_path / "ct")
    rec = write_dicom_seg(mask, series, tmp_path / "seg.dcm", model_name="reader", model_version="v1")
    r = CliRunner().invoke(main, ["import-dicom", str(tmp_path / "ct"), "--dataset", str(tmp_path / "ds"),
                                  "--case", "pt01", "--label", rec["path"]])
    assert r.exit_code == 0, r.output
    label, lgeom = read_array(tmp_path / "ds" / "labelsTr" / "pt01.nii.gz")
    image, igeom = read_array(tmp_path / "ds" / "imagesTr" / "pt01_0000.nii.gz")
    assert np.array_equal(label, mask) and label.dtype == np.uint8
    assert np.array_equal(image, ct) and igeom.mismatch(lgeom) is None


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_rtstruct_label_round_trips_with_dice_at_least_098(tmp_path, geometry):
    ct, mask = phantom(2)
    mask = mask.copy()
    mask[3, 12:22, 12:22] = 1          # a lesion with a hole: two nested contours on one slice
    mask[3, 16:18, 16:18] = 0
    GEOMETRIES[geometry](tmp_path / "ct", ct)
    _, series = read_dicom(tmp_path / "ct")
    other = np.zeros_like(mask)
    other[5, 2:6, 30:35] = 1
    rt = write_rtstruct(tmp_path / "rt.dcm", {"GTV": mask, "Spinal cord": other}, series)
    import_dicom(tmp_path / "ct", tmp_path / "ds", "pt01", label=rt, rois=["GTV"])
    label, _ = read_array(tmp_path / "ds" / "labelsTr" / "pt01.nii.gz")
    assert dice(label != 0, mask != 0) >= 0.98
    assert label[3, 16, 16] == 0 and label[3, 12, 12] == 1   # the hole stays a hole (even-odd rule)
    # several ROIs are merged
    import_dicom(tmp_path / "ct", tmp_path / "ds", "pt02", label=rt, rois=["GTV", "Spinal cord"])
    merged, _ = read_array(tmp_path / "ds" / "labelsTr" / "pt02.nii.gz")
    assert dice(merged != 0, (mask | other) != 0) >= 0.98


def test_segments_chosen_by_number_label_or_all(tmp_path):
    ct, mask = phantom(3)
    _standard(tmp_path / "ct", ct)
    _, series = read_dicom(tmp_path / "ct")
    second = np.zeros_like(mask)
    second[6, 30:34, 5:9] = 1
    seg = write_seg(tmp_path / "two.dcm", {"lesion": mask, "bone island": second}, series)
    for case, segment, expected in (("a", "1", mask), ("b", "bone island", second), ("c", "all", mask | second)):
        import_dicom(tmp_path / "ct", tmp_path / "ds", case, label=seg, segment=segment)
        label, _ = read_array(tmp_path / "ds" / "labelsTr" / f"{case}.nii.gz")
        assert np.array_equal(label, expected), segment


def test_many_overlapping_segments_merge_and_a_refusal_lists_ten(tmp_path):
    """--segment all is the union of every segment, overlaps included (read combined, one volume);
    without --segment the one-line refusal names ten segments and the count."""
    ct, mask = phantom(3)
    _standard(tmp_path / "ct", ct)
    _, series = read_dicom(tmp_path / "ct")
    segments = {}
    for i in range(12):
        m = np.zeros_like(mask)
        m[i % PHANTOM_SHAPE[0], 2 * i:2 * i + 6, 4:10] = 1       # each overlaps the next
        segments[f"vertebra {i + 1}"] = m
    segments["lesion"] = mask
    seg = write_seg(tmp_path / "many.dcm", segments, series)
    line = _refused(tmp_path, ["--label", str(seg)], "13 segments (1 'vertebra 1', 2 'vertebra 2',",
                    "10 'vertebra 10' and 3 more)")
    assert "'lesion'" not in line and len(line) - len(str(seg)) < 300
    import_dicom(tmp_path / "ct", tmp_path / "ds", "all", label=seg, segment="all")
    label, _ = read_array(tmp_path / "ds" / "labelsTr" / "all.nii.gz")
    assert np.array_equal(label, np.any(np.stack(list(segments.values())), axis=0).astype(np.uint8))


# --- refusals: one line naming what is there, nothing written -----------------------------------


def _refused(tmp_path: Path, args: list[str], *expected: str) -> str:
    r = CliRunner().invoke(main, ["import-dicom", str(tmp_path / "ct"), "--dataset", str(tmp_path / "ds"),
                                  "--case", "pt01", *args])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert not (tmp_path / "ds" / "imagesTr").exists() and not (tmp_path / "ds" / "labelsTr").exists()
    return lines[0]


@pytest.fixture
def two_series(tmp_path):
    """``ct``: the imported series; ``other``: another series of the same patient and frame of reference."""
    write_ct(tmp_path / "ct", hu_volume())
    write_ct(tmp_path / "other", hu_volume(seed=4))
    _, series = read_dicom(tmp_path / "ct")
    _, other = read_dicom(tmp_path / "other")
    return series, other


def test_seg_of_another_series_is_refused(tmp_path, two_series):
    series, other = two_series
    rec = write_dicom_seg(lesion_mask(), other, tmp_path / "seg.dcm", model_name="m", model_version="v")
    _refused(tmp_path, ["--label", rec["path"]], f"references series {other.series_uid} in frame of reference "
             f"{other.frame_of_reference_uid}", f"expected the imported series {series.series_uid}")


def test_rtstruct_of_another_series_or_frame_of_reference_is_refused(tmp_path, two_series):
    series, other = two_series
    rt = write_rtstruct(tmp_path / "rt.dcm", {"GTV": lesion_mask()}, other)
    _refused(tmp_path, ["--label", str(rt)], f"references series {other.series_uid}", series.series_uid)
    foreign = generate_uid()
    rt = write_rtstruct(tmp_path / "rt2.dcm", {"GTV": lesion_mask()}, series, frame_of_reference=foreign)
    _refused(tmp_path, ["--label", str(rt)], f"in frame of reference {foreign}",
             f"(frame of reference {series.frame_of_reference_uid})")


def test_pydicom_bundled_rtstruct_is_refused_naming_its_series_and_frame_of_reference(tmp_path):
    """A real structure set (its CT is not bundled) given as the label of a phantom series."""
    ct, _ = phantom()
    _standard(tmp_path / "ct", ct)
    path = get_testdata_file("rtstruct.dcm")
    line = _refused(tmp_path, ["--label", path], "rtstruct.dcm: references series "
                    "1.2.826.0.1.3680043.8.498.2010020400001.2.1.1 in frame of reference "
                    "1.2.826.0.1.3680043.8.498.2010020400001.2; expected the imported series")
    assert str(tmp_path / "ct") in line


def test_other_dicom_objects_are_refused_as_labels(tmp_path):
    """pydicom's bundled RT Dose (an image, but no label) and RT Plan."""
    write_ct(tmp_path / "ct", hu_volume())
    for name, modality in (("rtdose.dcm", "RTDOSE"), ("rtplan.dcm", "RTPLAN")):
        _refused(tmp_path, ["--label", get_testdata_file(name)], f"{name}: a DICOM {modality} object; expected a "
                 f"DICOM-SEG or RTSTRUCT of the series, or a mask image file")


def test_pydicom_bundled_rtstruct_on_the_series_it_references(tmp_path):
    """The same real file on a series that carries its references: ROI 'patient' (a 400 x 300 mm
    rectangle at z = -200, -190 and -180 mm) rasterises; ROI 'Isocenter 1' holds only a POINT: an
    empty ROI; on slices 3 mm apart its contour at z = -190 mm lies on no slice."""
    ds = pydicom.dcmread(get_testdata_file("rtstruct.dcm"), force=True)
    ref = ds.ReferencedFrameOfReferenceSequence[0]
    series_uid = ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID
    for folder, step in (("ct", 10.0), ("ct3", 3.0)):
        for f in write_ct(tmp_path / folder, hu_volume((4, 24, 20)), spacing=(25.0, 25.0), step=step,
                          origin=(-237.5, -287.5, -210.0 + 10.0 - step), series_uid=series_uid):
            one = pydicom.dcmread(f)
            one.FrameOfReferenceUID = ref.FrameOfReferenceUID
            one.save_as(f)
    import_dicom(tmp_path / "ct", tmp_path / "ds", "real", label=get_testdata_file("rtstruct.dcm"), rois=["patient"])
    label, _ = read_array(tmp_path / "ds" / "labelsTr" / "real.nii.gz")
    expected = np.zeros_like(label)
    expected[1:4, 6:18, 2:18] = 1      # x -200..200 -> cols 1.5..17.5; y -150..150 -> rows 5.5..17.5
    assert np.array_equal(label, expected)
    with pytest.raises(InputError, match=r"ROI 'Isocenter 1' holds no closed planar contour \(an empty ROI\); "
                                         r"ROIs there: 'patient' \(3 contours\), 'Isocenter 1' \(1 POINT\)"):
        import_dicom(tmp_path / "ct", tmp_path / "ds", "iso", label=get_testdata_file("rtstruct.dcm"),
                     rois=["Isocenter 1"])
    with pytest.raises(InputError, match=r"ROI 'patient' has a contour at \(200\.0, -0\.0, -190\.0\) mm, 4 mm from the "
                                         r"nearest slice of series"):
        import_dicom(tmp_path / "ct3", tmp_path / "ds", "off", label=get_testdata_file("rtstruct.dcm"),
                     rois=["patient"])


def test_empty_missing_and_unchosen_rois_are_refused(tmp_path, two_series):
    series, _ = two_series
    rt = write_rtstruct(tmp_path / "rt.dcm", {"GTV": lesion_mask(), "Cord": lesion_mask()}, series, empty_rois=("Empty",))
    _refused(tmp_path, ["--label", str(rt), "--roi", "Empty"], "ROI 'Empty' holds no closed planar contour",
             "'GTV' (", "'Cord' (")
    _refused(tmp_path, ["--label", str(rt), "--roi", "Liver"], "no ROI named 'Liver'; ROIs there: 'GTV'")
    _refused(tmp_path, ["--label", str(rt)], "3 ROIs (", "name the lesion ROI(s) with --roi")
    _refused(tmp_path, ["--label", str(rt), "--segment", "1"], "--segment applies to a DICOM-SEG label; this is an RTSTRUCT")


def test_a_contour_on_no_slice_of_the_series_is_refused(tmp_path, two_series):
    series, _ = two_series
    z = series.positions[2][2] + 1.5       # between slices 2 and 3 (3 mm apart)
    square = np.array([[-5, 8, z], [-2, 8, z], [-2, 11, z], [-5, 11, z]], float)
    rt = write_rtstruct(tmp_path / "rt.dcm", {"GTV": lesion_mask()}, series, extra_contours={"GTV": [square]})
    _refused(tmp_path, ["--label", str(rt), "--roi", "GTV"], "ROI 'GTV' has a contour at (-5.0, 8.0,",
             "1.5 mm from the nearest slice of series", "expected every contour on a slice of the series")
    tilted = square.copy()
    tilted[2, 2] += 2.0
    rt = write_rtstruct(tmp_path / "rt2.dcm", {"GTV": lesion_mask()}, series, extra_contours={"GTV": [tilted]})
    _refused(tmp_path, ["--label", str(rt)], "not in one slice plane")


def test_missing_and_unchosen_segments_are_refused(tmp_path, two_series):
    series, _ = two_series
    second = np.zeros_like(lesion_mask())
    second[0, 0:2, 0:2] = 1
    seg = write_seg(tmp_path / "two.dcm", {"lesion": lesion_mask(), "bone island": second}, series)
    listing = "segments there: 1 'lesion', 2 'bone island'"
    _refused(tmp_path, ["--label", str(seg), "--segment", "3"], "no segment '3'", listing)
    _refused(tmp_path, ["--label", str(seg), "--segment", "liver"], "no segment 'liver'", listing)
    _refused(tmp_path, ["--label", str(seg)], "2 segments (1 'lesion', 2 'bone island')", "--segment all")
    _refused(tmp_path, ["--label", str(seg), "--roi", "GTV"], "--roi applies to an RTSTRUCT label; this is a DICOM-SEG")


def test_image_labels_keep_their_checks(tmp_path, two_series):
    series, _ = two_series
    image, _ = read_dicom(tmp_path / "ct")
    from analysis.imaging.io import Geometry

    write_mask(lesion_mask(), Geometry.of(image), tmp_path / "mask.nii.gz")
    r = CliRunner().invoke(main, ["import-dicom", str(tmp_path / "ct"), "--dataset", str(tmp_path / "ds"),
                                  "--case", "pt01", "--label", str(tmp_path / "mask.nii.gz")])
    assert r.exit_code == 0, r.output
    assert np.array_equal(read_array(tmp_path / "ds" / "labelsTr" / "pt01.nii.gz")[0], lesion_mask())
    r = CliRunner().invoke(main, ["import-dicom", str(tmp_path / "ct"), "--dataset", str(tmp_path / "ds2"),
                                  "--case", "pt01", "--label", str(tmp_path / "mask.nii.gz"), "--roi", "GTV"])
    assert r.exit_code == 2 and "--roi applies to an RTSTRUCT label; this is an image file" in r.output


# --- a whole export ---------------------------------------------------------------------------------


def _export(root: Path) -> dict[str, np.ndarray]:
    """Five patients: SEG beside the series, RTSTRUCT and NIfTI named in a CSV, no label, one broken series."""
    masks = {}
    for i, name in enumerate(["p1", "p2", "p3", "p4", "p5"]):
        folder = root / name / "CT"
        write_ct(folder, hu_volume(seed=i), skip=(3,) if name == "p4" else ())
        m = np.zeros((6, 16, 20), np.uint8)
        m[1:3, 2 + i:6 + i, 3:7] = 1
        masks[name] = m
    _, s1 = read_dicom(root / "p1" / "CT")
    write_dicom_seg(masks["p1"], s1, root / "p1" / "SEG" / "seg.dcm", model_name="reader", model_version="v")
    _, s2 = read_dicom(root / "p2" / "CT")
    write_rtstruct(root / "labels" / "p2_rt.dcm", {"GTV": masks["p2"], "Body": np.ones_like(masks["p2"])}, s2)
    image3, _ = read_dicom(root / "p3" / "CT")
    from analysis.imaging.io import Geometry

    write_mask(masks["p3"], Geometry.of(image3), root / "labels" / "p3.nii.gz")
    (root / "labels" / "labels.csv").write_text("case,label_path,roi_or_segment\np2,p2_rt.dcm,GTV\np3,p3.nii.gz,\n",
                                                encoding="utf-8")
    return masks


def test_all_imports_four_of_five_and_reports_the_broken_one(tmp_path):
    root = tmp_path / "export"
    masks = _export(root)
    (root / "labels").rename(tmp_path / "labels")   # the CSV's folder is not a patient
    r = CliRunner().invoke(main, ["import-dicom", str(root), "--dataset", str(tmp_path / "ds"), "--all",
                                  "--labels", str(tmp_path / "labels" / "labels.csv")])
    assert r.exit_code == 2, r.output
    table = r.output.split("error:")[0]
    assert "5 cases: 4 imported, 0 already present, 1 failed" in table
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "case p4:" in errors[0] and "uneven slice spacing" in errors[0]
    cohort = Cohort(tmp_path / "ds")
    assert cohort.image_cases() == ["p1", "p2", "p3", "p5"]
    assert cohort.label_cases() == ["p1", "p2", "p3"]           # p5 has no label anywhere
    for case in ("p1", "p2", "p3"):
        assert np.array_equal(read_array(cohort.label_path(case))[0], masks[case]), case
    assert cohort.dataset_json()["numTraining"] == 3               # cases with image and label
    rows = {line.split()[0]: line for line in table.splitlines()[2:7]}
    assert "seg.dcm" in rows["p1"] and "p2_rt.dcm (GTV)" in rows["p2"] and "failed" in rows["p4"]


def test_all_resumes_a_killed_import(tmp_path):
    root = tmp_path / "export"
    _export(root)
    (root / "labels").rename(tmp_path / "labels")
    csv_path = tmp_path / "labels" / "labels.csv"

    def kill_after_two(done, total, outcome):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_all(root, tmp_path / "ds", labels_csv=csv_path, progress=kill_after_two)
    cohort = Cohort(tmp_path / "ds")
    assert cohort.image_cases() == ["p1", "p2"]
    first = {c: cohort.image_path(c).stat().st_mtime_ns for c in ("p1", "p2")}
    # a kill in the middle of p3: its label written, its image not, a temporary file left behind
    cohort.label_path("p3").write_bytes(b"half")
    (cohort.images_dir / ".p3_0000.nii.gz.abc123.tmp.nii.gz").write_bytes(b"partial")
    summary = import_all(root, tmp_path / "ds", labels_csv=csv_path)
    assert [o.status for o in summary.outcomes] == ["present", "present", "imported", "failed", "imported"]
    assert {c: cohort.image_path(c).stat().st_mtime_ns for c in ("p1", "p2")} == first
    assert cohort.image_cases() == ["p1", "p2", "p3", "p5"]
    assert read_array(cohort.label_path("p3"))[0].sum() > 0
    assert not list(cohort.images_dir.glob(".*"))


def test_all_csv_rows_and_labels_beside(tmp_path):
    root = tmp_path / "export"
    _export(root)
    csv_path = root / "labels" / "labels.csv"
    with open(csv_path, "a", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerow(["p9", "p3.nii.gz", ""])
    summary = import_all(root, tmp_path / "ds", labels_csv=csv_path)
    by_case = {o.case: o for o in summary.outcomes}
    assert by_case["labels"].status == "failed" and "holds no DICOM image" in by_case["labels"].message
    assert by_case["p9"].status == "failed" and "case p9 has no folder under" in by_case["p9"].message
    # two labels beside one series: the case is refused, naming both
    _, s5 = read_dicom(root / "p5" / "CT")
    for name in ("a.dcm", "b.dcm"):
        write_rtstruct(root / "p5" / name, {"GTV": lesion_mask()}, s5)
    summary = import_all(root, tmp_path / "ds2")
    p5 = next(o for o in summary.outcomes if o.case == "p5")
    assert p5.status == "failed" and "2 DICOM labels reference series" in p5.message and "a.dcm, b.dcm" in p5.message


def test_case_is_required_without_all_and_single_options_refused_with_it(tmp_path):
    write_ct(tmp_path / "ct", hu_volume())
    r = CliRunner().invoke(main, ["import-dicom", str(tmp_path / "ct"), "--dataset", str(tmp_path / "ds")])
    assert r.exit_code == 2 and "--case ID is required" in r.output
    r = CliRunner().invoke(main, ["import-dicom", str(tmp_path), "--dataset", str(tmp_path / "ds"), "--all",
                                  "--case", "x"])
    assert r.exit_code == 2 and "--case choose within one case" in r.output
