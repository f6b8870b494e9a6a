"""The TID 1500 measurement report (analysis.imaging.dicom_sr) and the SEG with one segment per
lesion it references, written by the runner as ``predict --sr`` does. What OHIF makes of it is
tests/tf/test_ohif.py's."""
from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from analysis.cohort.examples import write_dicom_series
from analysis.errors import InputError
from analysis.imaging.dicom_seg import write_dicom_seg
from analysis.imaging.dicom_sr import (QUALITATIVE_EVALUATIONS, TOTAL_VOLUME, read_measurement_report,
                                       write_measurement_report)
from analysis.imaging.inputs import discover_inputs
from analysis.imaging.io import Geometry
from analysis.imaging.rtstruct import fill_even_odd
from analysis.lesions import cross_sections, lesion_instances, lesion_table
from analysis.prediction.folder import PredictionFolder
from analysis.prediction.runner import Network, Outputs, lesion_tables, plan_inputs, run_cases
from analysis.prediction.tables import LESION_COLUMNS, read_rows

GEOMETRY = Geometry(size=(32, 32, 6), spacing=(0.8, 0.8, 3.0), origin=(-5.0, 2.0, 10.0),
                    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))


def _series(tmp_path: Path) -> tuple[Path, np.ndarray]:
    ct = np.full((6, 32, 32), 40.0)
    ct[:, 28:, :] = -1000.0         # air below the patient (a CT's field of view holds some)
    ct[1:3, 4:8, 4:8] = 900.0       # lesion 1: 2 x 4 x 4 voxels
    ct[3:6, 20:24, 20:26] = 700.0   # lesion 2: 3 x 4 x 6 voxels
    ct[4, 21, 21] = 1300.0          # its maximum
    write_dicom_series(ct, GEOMETRY, tmp_path / "dicom" / "pt", patient_id="P1", localizer=False)
    return tmp_path / "dicom", ct


def _sections(labels: np.ndarray, n: int, series) -> dict:
    return {i + 1: c for i, c in enumerate(cross_sections(labels, lesion_table(labels, n),
                                                           pixel_spacing_mm=series.pixel_spacing))}


def _raster(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels inside an SCOORD polygon ((column, row), 0, 0 the top left corner of the first pixel)."""
    return fill_even_odd([np.stack([points[:, 1] - 0.5, points[:, 0] - 0.5], axis=1)], shape)


def test_report_reads_back_with_volumes_hu_sites_and_segments(tmp_path):
    images, ct = _series(tmp_path)
    (case,) = discover_inputs(images)
    mask = (ct > 500).astype(np.uint8)
    labels, n = lesion_instances(mask)
    seg = write_dicom_seg(mask, case.series, tmp_path / "seg.dcm", model_name="m", model_version="v1",
                          labels=labels, uid_seed="S|v1")
    ds = pydicom.dcmread(seg["path"])
    assert seg["segments"] == n == 2 and [s.SegmentLabel for s in ds.SegmentSequence] == [
        "bone metastasis 1", "bone metastasis 2"]
    # a colour of its own for each lesion (a viewer without one picks its own and says so)
    colours = [tuple(s.RecommendedDisplayCIELabValue) for s in ds.SegmentSequence]
    assert len(set(colours)) == 2
    voxel_ml = 0.8 * 0.8 * 3.0 / 1000
    rows = [{"lesion_id": i, "volume_ml": float((labels == i).sum() * voxel_ml), "hu_mean": float(ct[labels == i].mean()),
             "hu_max": float(ct[labels == i].max()), "bone": bone, "weight_bearing": wb}
            for i, bone, wb in ((1, "spine", True), (2, "extremity", False))]
    anchors = _sections(labels, n, case.series)
    rec = write_measurement_report(case.series, tmp_path / "sr.dcm", lesions=rows, seg_path=seg["path"],
                                   anchors=anchors, model_name="m", model_version="v1", uid_seed="S|v1")
    back = read_measurement_report(rec["path"])
    assert back["count"] == 2 and back["total_volume_ml"] == pytest.approx((32 + 72) * voxel_ml)
    one, two = back["lesions"]
    assert one["volume_ml"] == pytest.approx(32 * voxel_ml) and two["volume_ml"] == pytest.approx(72 * voxel_ml)
    assert one["hu_mean"] == 900 and two["hu_max"] == 1300 and two["hu_mean"] == pytest.approx((71 * 700 + 1300) / 72)
    assert (one["site"], two["site"]) == ("51282000", "371195002")  # bone structure of spine; bone of upper limb
    assert (one["segment"], two["segment"]) == (1, 2)
    # the bidirectional measurement: 4 x 4 and 4 x 6 pixels of 0.8 mm; a rectangle's long axis is its
    # diagonal, its short axis the chord through its centre perpendicular to it (b x diagonal / a)
    diagonal = 0.8 * np.hypot(4, 6)
    assert (one["long_axis_mm"], one["short_axis_mm"]) == (pytest.approx(0.8 * 4 * np.sqrt(2)),) * 2
    assert (two["long_axis_mm"], two["short_axis_mm"]) == (pytest.approx(diagonal), pytest.approx(4 * diagonal / 6))
    # each outline is drawn on the instance of the lesion's largest cross-section (ties: the first
    # slice) and encloses exactly the lesion's pixels there
    for lesion, z in ((one, 1), (two, 3)):
        assert lesion["outline_sop_instance_uid"] == case.series.sop_instance_uids[z]
        np.testing.assert_array_equal(lesion["outline"][0], lesion["outline"][-1])  # closed
        np.testing.assert_array_equal(_raster(lesion["outline"], (32, 32)), labels[z] == lesion["lesion_id"])
    # the lesion's tracking UID is its segment's in the SEG
    assert one["tracking_uid"] == str(ds.SegmentSequence[0].TrackingUID)
    sr = pydicom.dcmread(rec["path"])
    assert sr.Modality == "SR" and sr.StudyInstanceUID == ds.StudyInstanceUID and sr.PatientID == "P1"
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    # deterministic UIDs: the same seed gives the same report identity
    again = write_measurement_report(case.series, tmp_path / "sr2.dcm", lesions=rows, seg_path=seg["path"],
                                     anchors=anchors, model_name="m", model_version="v1", uid_seed="S|v1")
    assert again["sop_instance_uid"] == rec["sop_instance_uid"]


def test_every_group_has_coordinates_and_the_patient_numbers_are_document_level_evaluations(tmp_path):
    """OHIF fails on a group without a spatial coordinate: each lesion is one planar group (its outline)
    and one volumetric group (its segment) sharing a tracking identifier and UID, and the count and
    total volume sit in TID 1500's Qualitative Evaluations container, not among the groups."""
    images, ct = _series(tmp_path)
    (case,) = discover_inputs(images)
    mask = (ct > 500).astype(np.uint8)
    labels, n = lesion_instances(mask)
    seg = write_dicom_seg(mask, case.series, tmp_path / "seg.dcm", model_name="m", model_version="v", labels=labels)
    rows = [{"lesion_id": i, "volume_ml": 0.5 * i, "hu_mean": 1.0, "hu_max": 2.0} for i in (1, 2)]
    write_measurement_report(case.series, tmp_path / "sr.dcm", lesions=rows, seg_path=seg["path"],
                             anchors=_sections(labels, n, case.series), model_name="m", model_version="v",
                             uid_seed="x")
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(tmp_path / "sr.dcm"))
    (container,) = hd.sr.utils.find_content_items(sr.content[0], name=codes.DCM.ImagingMeasurements)
    templates = [g.ContentTemplateSequence[0].TemplateIdentifier for g in container.ContentSequence]
    assert templates == ["1410", "1411", "1410", "1411"]
    planar = sr.content.get_planar_roi_measurement_groups()
    volumetric = sr.content.get_volumetric_roi_measurement_groups()
    assert [(str(p.tracking_identifier), str(p.tracking_uid)) for p in planar] == \
        [(str(v.tracking_identifier), str(v.tracking_uid)) for v in volumetric]
    assert all(p.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE for p in planar)
    (evaluations,) = hd.sr.utils.find_content_items(sr.content[0], name=QUALITATIVE_EVALUATIONS)
    texts = {(i.ConceptNameCodeSequence[0].CodeValue, i.TextValue) for i in evaluations.ContentSequence}
    assert texts == {(codes.SCT.NumberOfLesions.value, "2"), (TOTAL_VOLUME.value, "1.5 cm3")}


def test_a_case_without_lesions_is_a_report_of_zero_lesions_without_groups(tmp_path):
    images, _ = _series(tmp_path)
    (case,) = discover_inputs(images)
    rec = write_measurement_report(case.series, tmp_path / "sr.dcm", lesions=[], seg_path=None, anchors={},
                                   model_name="m", model_version="v", uid_seed="x")
    back = read_measurement_report(rec["path"])
    assert (back["lesions"], back["count"], back["total_volume_ml"]) == ([], 0, 0.0)
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(rec["path"]))
    assert not hd.sr.utils.find_content_items(sr.content[0], name=codes.DCM.ImagingMeasurements)


def test_report_refuses_lesions_without_their_segment_or_outline(tmp_path):
    images, ct = _series(tmp_path)
    (case,) = discover_inputs(images)
    mask = (ct > 500).astype(np.uint8)
    labels, n = lesion_instances(mask)
    anchors = _sections(labels, n, case.series)
    seg = write_dicom_seg(mask, case.series, tmp_path / "seg.dcm", model_name="m", model_version="v")  # one segment
    rows = [{"lesion_id": i, "volume_ml": 1.0, "hu_mean": 1.0, "hu_max": 1.0} for i in (1, 2)]
    with pytest.raises(InputError, match="has no segment 2"):
        write_measurement_report(case.series, tmp_path / "sr.dcm", lesions=rows, seg_path=seg["path"],
                                 anchors=anchors, model_name="m", model_version="v", uid_seed="x")
    seg = write_dicom_seg(mask, case.series, tmp_path / "seg2.dcm", model_name="m", model_version="v", labels=labels)
    with pytest.raises(InputError, match="lesion 2 has no cross-section"):
        write_measurement_report(case.series, tmp_path / "sr.dcm", lesions=rows, seg_path=seg["path"],
                                 anchors={1: anchors[1]}, model_name="m", model_version="v", uid_seed="x")
    assert not list(tmp_path.glob("sr*"))


def test_runner_writes_seg_per_lesion_and_a_report_matching_lesions_csv(tmp_path):
    images, _ = _series(tmp_path)
    plan = plan_inputs(None, images, dicom_seg=True)
    folder = PredictionFolder(tmp_path / "out", {"test": 1}, overwrite=False)
    net = Network(name="thr", fingerprint="abc", segment=lambda v, z, s: np.where(v[z] > 500, 0.9, 0.0).astype(np.float32))
    done, failures, _ = run_cases(folder, plan.cases, net, Outputs(sr=True, preview=False), strict=False)
    folder.finish({"model": "thr"}, tables=lesion_tables())
    assert failures == []
    out = folder.out
    rows = read_rows(out / "lesions.csv", LESION_COLUMNS)
    back = read_measurement_report(out / "sr" / "pt.dcm")
    assert back["count"] == len(rows) == 2
    for row, lesion in zip(rows, back["lesions"]):
        assert lesion["lesion_id"] == row["lesion_id"] and lesion["volume_ml"] == pytest.approx(row["volume_ml"])
        assert lesion["hu_max"] == pytest.approx(row["hu_max"])
        axes = [row["long_axis_mm"], row["short_axis_mm"]]
        assert [lesion["long_axis_mm"], lesion["short_axis_mm"]] == pytest.approx(axes, rel=1e-9)
    seg = pydicom.dcmread(out / "dicom_seg" / "pt.dcm")
    assert len(seg.SegmentSequence) == 2 and back["sop_instance_uid"] == done[0]["sr"]["sop_instance_uid"]
    # the SEG's UIDs derive from the source series and the model: a rerun gives the same ones
    assert seg.SOPInstanceUID == done[0]["dicom_seg"]["sop_instance_uid"] and seg.SOPInstanceUID.startswith("2.25.")


def test_an_anonymised_name_from_the_source_raises_no_person_name_warning(tmp_path):
    """highdicom warns about a PatientName without '^' ("Anonymous"); the SEG and the report copy
    the source's own name, so they write it without that warning (other warnings still show)."""
    import warnings

    images, ct = _series(tmp_path)
    for f in (images / "pt").glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.PatientName = "Anonymous"
        ds.save_as(f)
    (case,) = discover_inputs(images)
    mask = (ct > 500).astype(np.uint8)
    labels, _ = lesion_instances(mask)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seg = write_dicom_seg(mask, case.series, tmp_path / "seg.dcm", model_name="m", model_version="v",
                              labels=labels, uid_seed="S|v")
        rows = [{"lesion_id": i, "volume_ml": 1.0, "hu_mean": 1.0, "hu_max": 1.0} for i in (1, 2)]
        write_measurement_report(case.series, tmp_path / "sr.dcm", lesions=rows, seg_path=seg["path"],
                                 anchors=_sections(labels, 2, case.series), model_name="m", model_version="v",
                                 uid_seed="S|v")
        warnings.warn("another warning")
    assert [str(w.message) for w in caught] == ["another warning"]
    assert pydicom.dcmread(seg["path"]).PatientName == "Anonymous"
    assert pydicom.dcmread(tmp_path / "sr.dcm").PatientName == "Anonymous"
