"""The TID 1500 measurement report (analysis.imaging.dicom_sr) and the SEG with one segment per
lesion it references, written by the runner as ``predict --sr`` does."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from analysis.cohort.examples import write_dicom_series
from analysis.errors import InputError
from analysis.imaging.dicom_seg import write_dicom_seg
from analysis.imaging.dicom_sr import read_measurement_report, write_measurement_report
from analysis.imaging.inputs import discover_inputs
from analysis.imaging.io import Geometry
from analysis.lesions import lesion_instances
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
    voxel_ml = 0.8 * 0.8 * 3.0 / 1000
    rows = [{"lesion_id": i, "volume_ml": float((labels == i).sum() * voxel_ml), "hu_mean": float(ct[labels == i].mean()),
             "hu_max": float(ct[labels == i].max()), "bone": bone, "weight_bearing": wb}
            for i, bone, wb in ((1, "spine", True), (2, "extremity", False))]
    rec = write_measurement_report(case.series, tmp_path / "sr.dcm", lesions=rows, seg_path=seg["path"],
                                   model_name="m", model_version="v1", uid_seed="S|v1")
    back = read_measurement_report(rec["path"])
    assert back["count"] == 2 and back["total_volume_ml"] == pytest.approx((32 + 72) * voxel_ml)
    one, two = back["lesions"]
    assert one["volume_ml"] == pytest.approx(32 * voxel_ml) and two["volume_ml"] == pytest.approx(72 * voxel_ml)
    assert one["hu_mean"] == 900 and two["hu_max"] == 1300 and two["hu_mean"] == pytest.approx((71 * 700 + 1300) / 72)
    assert (one["site"], two["site"]) == ("51282000", "371195002")  # bone structure of spine; bone of upper limb
    assert (one["segment"], two["segment"]) == (1, 2)
    # the lesion's tracking UID is its segment's in the SEG
    assert one["tracking_uid"] == str(ds.SegmentSequence[0].TrackingUID)
    sr = pydicom.dcmread(rec["path"])
    assert sr.Modality == "SR" and sr.StudyInstanceUID == ds.StudyInstanceUID and sr.PatientID == "P1"
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    # deterministic UIDs: the same seed gives the same report identity
    again = write_measurement_report(case.series, tmp_path / "sr2.dcm", lesions=rows, seg_path=seg["path"],
                                     model_name="m", model_version="v1", uid_seed="S|v1")
    assert again["sop_instance_uid"] == rec["sop_instance_uid"]


def test_report_refuses_lesions_without_their_segment(tmp_path):
    images, ct = _series(tmp_path)
    (case,) = discover_inputs(images)
    mask = (ct > 500).astype(np.uint8)
    seg = write_dicom_seg(mask, case.series, tmp_path / "seg.dcm", model_name="m", model_version="v")  # one segment
    rows = [{"lesion_id": i, "volume_ml": 1.0, "hu_mean": 1.0, "hu_max": 1.0} for i in (1, 2)]
    with pytest.raises(InputError, match="has no segment 2"):
        write_measurement_report(case.series, tmp_path / "sr.dcm", lesions=rows, seg_path=seg["path"],
                                 model_name="m", model_version="v", uid_seed="x")
    assert not list(tmp_path.glob("*sr*"))


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
                                 model_name="m", model_version="v", uid_seed="S|v")
        warnings.warn("another warning")
    assert [str(w.message) for w in caught] == ["another warning"]
    assert pydicom.dcmread(seg["path"]).PatientName == "Anonymous"
    assert pydicom.dcmread(tmp_path / "sr.dcm").PatientName == "Anonymous"
