"""``followup --sr``: the follow-up as a TID 1500 report and a SEG on the baseline DICOM series.

Evidence: a hand-made pair with every status (boxes with hand-counted volumes), the baseline a
DICOM series; the report and the SEG read back with highdicom / pydicom and compared with
lesions.csv and summary.csv, which the other follow-up tests check against the phantom's truth.
"""
from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from analysis.cohort.examples import write_dicom_series
from analysis.lesions.change import GROWN, NEW, RESOLVED, SHRUNK, STABLE, STATUSES
from analysis.monitoring.followup import LESIONS_CSV, read_summary
from analysis.monitoring.followup_sr import PRIVATE_SCHEME, STATUS, read_followup_report
from analysis.imaging.io import Geometry, write_array
from analysis.imaging.records import read_csv
from analysis.imaging.rtstruct import fill_even_odd
from tests.badinput import assert_clean_error, invoke, snapshot

BASE = Geometry((40, 40, 20), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
#: the follow-up sees 8 mm more on the left (x 40..47 mm): a lesion there has no voxel in the baseline frame
FOLLOW = Geometry((48, 40, 20), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
# (z0, z1, y0, y1, x0, x1); voxels of 2 mm^3 = 0.002 ml
BASELINE_BOXES = [
    (4, 8, 6, 12, 6, 12),      # stable: 144 voxels
    (10, 12, 20, 26, 6, 12),   # grown: 72 -> 144
    (4, 8, 20, 30, 20, 30),    # shrunk: 400 -> 200
    (14, 16, 28, 32, 28, 32),  # resolved: 32
]
FOLLOWUP_BOXES = [
    (4, 8, 6, 12, 6, 12), (10, 14, 20, 26, 6, 12), (4, 6, 20, 30, 20, 30),
    (14, 16, 6, 10, 26, 30),   # new: 32
    (14, 16, 30, 34, 42, 46),  # new, outside the baseline's field of view: 32
    (18, 19, 34, 36, 34, 35),  # indeterminate: 2 voxels, below --min-lesion-ml 0.02
]
SERIES_UID = "1.2.826.0.1.3680043.8.498.77"


def _pair(tmp: Path, *, dicom_baseline: bool = True) -> list:
    paths = {}
    for name, g, boxes in (("b", BASE, BASELINE_BOXES), ("f", FOLLOW, FOLLOWUP_BOXES)):
        shape = g.size[::-1]
        ct = np.full(shape, 40, np.int16)
        ct[2:18, 5:35, 5:35] = 400
        ct[:, :3, :] = -1000  # air in front of the patient (a CT's field of view holds some)
        mask = np.zeros(shape, np.uint8)
        for z0, z1, y0, y1, x0, x1 in boxes:
            mask[z0:z1, y0:y1, x0:x1] = 1
        write_array(mask, g, tmp / f"{name}_mask.nii.gz")
        if name == "b" and dicom_baseline:
            write_dicom_series(ct, g, tmp / "dicom" / "baseline", patient_id="P3", localizer=False)
            for f in (tmp / "dicom" / "baseline").iterdir():  # a known SeriesInstanceUID
                ds = pydicom.dcmread(f)
                ds.SeriesInstanceUID = SERIES_UID
                ds.save_as(f)
            paths[name] = tmp / "dicom" / "baseline"
        else:
            write_array(ct, g, tmp / f"{name}_ct.nii.gz")
            paths[name] = tmp / f"{name}_ct.nii.gz"
    return ["followup", "--baseline", paths["b"], "--followup", paths["f"], "--baseline-mask", tmp / "b_mask.nii.gz",
            "--followup-mask", tmp / "f_mask.nii.gz", "--no-registration", "--min-change-ml", "0.02",
            "--min-lesion-ml", "0.02", "--match-mm", "5"]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("followup_sr")
    result = invoke([*_pair(tmp), "--sr", "--out", tmp / "out"])
    assert result.exit_code == 0, result.output
    return tmp / "out"


def test_every_tracked_lesion_is_one_group_with_its_status_volumes_and_change(written):
    rows = read_csv(written / LESIONS_CSV)
    assert sorted(r["status"] for r in rows) == sorted([*STATUSES, NEW])  # every status, two new lesions
    back = read_followup_report(written / "followup_sr.dcm")
    assert [g["lesion"] for g in back["lesions"]] == [int(r["lesion"]) for r in rows]
    for row, group in zip(rows, back["lesions"]):
        assert group["status"] == row["status"]
        for key in ("baseline_ml", "followup_ml", "change_ml"):
            assert group[key] == pytest.approx(float(row[key]), rel=1e-9, abs=1e-12), (row["lesion"], key)
        assert group["change_pct"] == (None if row["change_pct"] == "" else pytest.approx(float(row["change_pct"])))
        # a lesion without a voxel in the baseline frame is listed among the report's evaluations
        assert group["time_point"] == (None if row["followup_id"] == "5" else "follow-up")
    by_status = {g["status"]: g for g in back["lesions"]}
    assert by_status[GROWN]["change_ml"] == pytest.approx(0.144)
    assert by_status[GROWN]["change_pct"] == pytest.approx(100)
    assert by_status[SHRUNK]["followup_ml"] == pytest.approx(0.4) and by_status[RESOLVED]["followup_ml"] == 0
    # the coded statuses: SNOMED CT where one fits (indeterminate too), the private scheme for "resolved"
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(written / "followup_sr.dcm"))
    values = set()
    for g in sr.content.get_volumetric_roi_measurement_groups():
        values |= {(e.value.scheme_designator, e.value.value) for e in g.get_qualitative_evaluations(name=STATUS)}
    assert values == {("SCT", "129721008"), ("SCT", "15454001"), ("SCT", "19776001"), ("SCT", "260388006"),
                      ("SCT", "82334004"), (PRIVATE_SCHEME, "RESOLVED")}  # 82334004: Indeterminate


def test_the_patient_group_equals_summary_csv(written):
    summary = read_summary(written)
    back = read_followup_report(written / "followup_sr.dcm")["summary"]
    assert list(back) == list(summary)
    for key, value in summary.items():
        assert back[key] == pytest.approx(float(value)), key
    assert (back[NEW], back[RESOLVED], back["new_lesions_flag"]) == (2, 1, 1)


def test_the_seg_holds_the_lesions_in_the_baseline_frame_and_the_report_references_it(written):
    rows = read_csv(written / LESIONS_CSV)
    seg = pydicom.dcmread(written / "followup_seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == SERIES_UID
    outside = next(r for r in rows if r["followup_id"] == "5")  # the lesion beyond the baseline's field of view
    tracked = [f"lesion {r['lesion']}" for r in rows if r is not outside]
    assert [s.TrackingID for s in seg.SegmentSequence] == tracked
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == list(range(1, len(tracked) + 1))
    back = read_followup_report(written / "followup_sr.dcm")
    segments = {s.TrackingID: (int(s.SegmentNumber), str(s.TrackingUID)) for s in seg.SegmentSequence}
    for group in back["lesions"]:
        if group["lesion"] == int(outside["lesion"]):
            # nothing in the baseline frame to point at: a TEXT item of the Qualitative Evaluations container
            assert group["segment"] is None and group["outline"] is None
        else:
            assert (group["segment"], group["tracking_uid"]) == segments[f"lesion {group['lesion']}"]
    # each segment's voxels are its tracked lesion's: the stable box is the first baseline lesion's voxels
    stable = next(r for r in rows if r["status"] == STABLE)
    volume = hd.seg.segread(written / "followup_seg.dcm").get_volume(combine_segments=True)
    assert int((np.asarray(volume.array) == segments[f"lesion {stable['lesion']}"][0]).sum()) == 144
    sr = pydicom.dcmread(written / "followup_sr.dcm")
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage and sr.PatientID == "P3"
    assert sr.StudyInstanceUID == seg.StudyInstanceUID
    record = json.loads((written / "followup.json").read_text(encoding="utf-8"))
    assert record["dicom"]["sr"]["sop_instance_uid"] == sr.SOPInstanceUID
    assert record["dicom"]["sr"]["path"] == "followup_sr.dcm"
    assert record["dicom"]["seg"]["sop_instance_uid"] == seg.SOPInstanceUID
    assert {"followup_sr.dcm", "followup_seg.dcm"} <= set(record["outputs"])


def test_every_lesion_in_the_baseline_frame_is_outlined_on_its_largest_baseline_slice(written):
    """OHIF draws a group only with image coordinates: each segment's lesion is outlined on the
    baseline instance of its largest cross-section, with the time point of what it outlines."""
    rows = {int(r["lesion"]): r for r in read_csv(written / LESIONS_CSV)}
    seg = pydicom.dcmread(written / "followup_seg.dcm")
    files = sorted((written.parent / "dicom" / "baseline").iterdir())
    headers = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in files),
                     key=lambda h: float(h.ImagePositionPatient[2]))
    uids = [str(h.SOPInstanceUID) for h in headers]
    pixels = hd.seg.Segmentation.from_dataset(seg)
    back = {g["lesion"]: g for g in read_followup_report(written / "followup_sr.dcm")["lesions"]}
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(written / "followup_sr.dcm"))
    assert not sr.content.get_image_measurement_groups()  # no group without coordinates
    for item in seg.SegmentSequence:
        n = int(str(item.TrackingID).split()[-1])
        mask = np.asarray(pixels.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=[int(item.SegmentNumber)], combine_segments=True,
            assert_missing_frames_are_empty=True)) > 0
        z = int(np.argmax(mask.sum(axis=(1, 2))))
        group = back[n]
        assert group["outline_sop_instance_uid"] == uids[z]
        xy = group["outline"]
        inside = fill_even_odd([np.stack([xy[:, 1] - 0.5, xy[:, 0] - 0.5], axis=1)], mask.shape[1:])
        np.testing.assert_array_equal(inside, mask[z])
        # the baseline lesion where there is one, else the follow-up lesion registered onto the baseline
        assert group["outline_time_point"] == ("baseline" if float(rows[n]["baseline_ml"]) > 0 else "follow-up")


def test_the_same_comparison_gives_the_same_uids(written, tmp_path):
    # the pair written again (the same follow-up bytes, the same baseline SeriesInstanceUID)
    result = invoke([*_pair(tmp_path), "--sr", "--out", tmp_path / "again"])
    assert result.exit_code == 0, result.output
    first = read_followup_report(written / "followup_sr.dcm")
    again = read_followup_report(tmp_path / "again" / "followup_sr.dcm")
    assert [g["tracking_uid"] for g in again["lesions"]] == [g["tracking_uid"] for g in first["lesions"]]
    assert again["sop_instance_uid"] == first["sop_instance_uid"]


def test_a_nifti_baseline_with_sr_is_refused_with_one_line_and_nothing_written(tmp_path):
    args = _pair(tmp_path, dicom_baseline=False)
    before = snapshot(tmp_path)
    assert_clean_error(invoke([*args, "--sr", "--out", tmp_path / "out"]),
                       ["--sr", "b_ct.nii.gz", "not a DICOM series"])
    assert snapshot(tmp_path) == before


def test_the_report_keys_off_the_one_status_vocabulary():
    from analysis.lesions.change import NEW_LESIONS_FLAG
    from analysis.monitoring.followup_sr import NEW_LESIONS_RULE, STATUS_COUNTS, STATUS_VALUES

    assert list(STATUS_VALUES) == list(STATUS_COUNTS) == list(STATUSES)
    assert len({(c.scheme_designator, c.value) for c in STATUS_VALUES.values()}) == len(STATUSES)
    assert NEW_LESIONS_RULE.meaning.startswith(f"At least {NEW_LESIONS_FLAG} new lesions")
    # the preview's colours too, in the order of the status.nii.gz codes (its legend's order)
    from analysis.lesions.change import STATUS_CODES
    from analysis.monitoring.preview import STATUS_COLOURS

    assert list(STATUS_COLOURS) == sorted(STATUSES, key=STATUS_CODES.__getitem__)
    assert sorted(STATUS_CODES.values()) == list(range(1, len(STATUSES) + 1))
