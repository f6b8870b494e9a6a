"""`followup`: two CTs of one patient compared lesion by lesion (framework-free).

Evidence: the follow-up phantom's truth (lesions linked through the exact, known motion; volumes
on each scan's own grid) for every lesion's status, and its known rigid transform for the
registration; hand-made pairs for splits, merges, empty pairs and refusals.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from analysis.cohort.followup_phantom import ORIENTATIONS, TRANSFORMS_CSV, TRUTH_CSV, Followups
from analysis.cohort.phantom import generate_cohort
from analysis.imaging.io import Geometry, read_array, write_array
from analysis.lesions.change import (GROWN, INDETERMINATE, NEW, NEW_LESIONS_FLAG, OUTSIDE_FOV, SHRUNK, STABLE,
                                     STATUSES)
from analysis.monitoring.followup import LESION_COLUMNS, LESIONS_CSV, SUMMARY_COLUMNS, read_summary
from analysis.monitoring.registration import rotation_angle_deg
from analysis.imaging.records import read_csv
from tests.badinput import assert_clean_error, invoke, snapshot
from tests.conftest import wrong_modes

CASES = 6  # seed 0: case_000 is lesion-free, the other five carry lesions


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("followup") / "DS"
    return generate_cohort(root, cases=CASES, seed=0, companion=Followups())


def _args(ds: Path, case: str, out: Path, *extra, followup_case: str | None = None) -> list:
    other = followup_case or case
    return ["followup", "--baseline", ds / "imagesTr" / f"{case}_0000.nii.gz",
            "--followup", ds / "followup" / "imagesTr" / f"{other}_0000.nii.gz",
            "--baseline-mask", ds / "labelsTr" / f"{case}.nii.gz",
            "--followup-mask", ds / "followup" / "labelsTr" / f"{other}.nii.gz", "--out", out, *extra]


def _transform_errors(record: dict, truth: dict[str, str], points: np.ndarray) -> tuple[float, float]:
    """(rotation error in degrees, largest displacement error in mm over ``points``)."""
    m_est = np.asarray(record["matrix"]).reshape(3, 3)
    t_est = np.asarray(record["offset_mm"])
    m_true = np.array([[float(truth[f"m{i}{j}"]) for j in range(3)] for i in range(3)])
    t_true = np.array([float(truth[f"offset_{a}_mm"]) for a in "xyz"])
    rotation = rotation_angle_deg(m_est.T @ m_true)
    shift = np.linalg.norm(points @ m_est.T + t_est - (points @ m_true.T + t_true), axis=1).max()
    return rotation, float(shift)


def _corners(geometry: Geometry) -> np.ndarray:
    d = np.asarray(geometry.direction).reshape(3, 3)
    idx = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * (np.asarray(geometry.size) - 1)
    return np.asarray(geometry.origin) + (idx * np.asarray(geometry.spacing)) @ d.T


def test_the_phantom_follow_ups_cover_every_status_orientation_and_spacing(cohort):
    truth = read_csv(cohort / TRUTH_CSV)
    transforms = read_csv(cohort / TRANSFORMS_CSV)
    # the phantom's changes at any size; indeterminate: a baseline lesion its shorter follow-up cannot see
    assert {r["status"] for r in truth} == set(STATUSES)
    assert all(r["followup_id"] == "" for r in truth if r["status"] == "indeterminate")
    assert len({r["orientation"] for r in transforms}) >= 4 and {r["orientation"] for r in transforms} <= set(ORIENTATIONS)
    assert len({(r["spacing_x"], r["spacing_z"]) for r in transforms}) >= 4
    _, g = read_array(cohort / "followup" / "imagesTr" / "case_005_0000.nii.gz")
    assert g.direction == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # RAS storage vs the LPS baseline
    assert not any(r["case"] == "case_000" for r in truth)                 # the lesion-free patient stays so


@pytest.mark.parametrize("case", [f"case_{i:03d}" for i in range(1, CASES)])
def test_every_lesion_status_equals_the_truth_and_the_motion_is_recovered(cohort, tmp_path, case):
    """The phantom's own changes, whatever their size: --min-lesion-ml 0 (the default test is below)."""
    out = tmp_path / "out"
    result = invoke(_args(cohort, case, out, "--baseline-bones", cohort / "bonesTr" / f"{case}.nii.gz",
                          "--min-lesion-ml", "0"))
    assert result.exit_code == 0, result.output
    rows = read_csv(out / LESIONS_CSV)
    truth = [r for r in read_csv(cohort / TRUTH_CSV) if r["case"] == case]
    assert truth
    got = [(r["lesion"], r["status"], r["baseline_id"], r["followup_id"]) for r in rows]
    assert got == [(r["lesion"], r["status"], r["baseline_id"], r["followup_id"]) for r in truth]
    for r, t in zip(rows, truth):  # volumes from each scan's own grid (NIfTI keeps spacings as float32)
        assert float(r["baseline_ml"]) == pytest.approx(float(t["baseline_ml"]), rel=1e-6)
        assert float(r["followup_ml"]) == pytest.approx(float(t["followup_ml"]), rel=1e-6)
        assert r["bone"] or not r["baseline_id"]
    record = json.loads((out / "followup.json").read_text(encoding="utf-8"))
    motion = next(r for r in read_csv(cohort / TRANSFORMS_CSV) if r["case"] == case)
    _, g = read_array(cohort / "imagesTr" / f"{case}_0000.nii.gz")
    rotation, shift = _transform_errors(record["registration"], motion, _corners(g))
    assert rotation < 1.0 and shift < 1.0, (rotation, shift)
    assert record["registration"]["bone_dice"] >= 0.7
    summary = read_summary(out)
    assert list(summary) == list(SUMMARY_COLUMNS) and list(rows[0]) == list(LESION_COLUMNS)
    for status in STATUSES:
        assert int(summary[status]) == sum(r["status"] == status for r in truth)
    assert summary["new_lesions_flag"] == str(int(int(summary[NEW]) >= NEW_LESIONS_FLAG))
    status, sg = read_array(out / "status.nii.gz")
    # indeterminate (6) at --min-lesion-ml 0 only where a baseline lesion lies outside the follow-up's view
    outside = [r for r in rows if r["status"] == INDETERMINATE]
    assert all(r["event"] == OUTSIDE_FOV and r["followup_id"] == "" for r in outside)
    assert sg.mismatch(g) is None and set(np.unique(status).tolist()) <= {0, 1, 2, 3, 4, 5} | ({6} if outside else set())
    _, rg = read_array(out / "followup_registered.nii.gz")
    assert rg.mismatch(g) is None
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("case", ["case_003", "case_004"])
def test_new_and_resolved_lesions_below_the_floor_are_indeterminate_and_do_not_raise_the_flag(cohort, tmp_path, case):
    """With the default --min-lesion-ml (0.1 ml) a new or resolved lesion of the phantom smaller than
    that is 'indeterminate' (status code 6) and left out of the new-lesion count; every other status
    is the truth's; a floor of 1 ml makes every new lesion indeterminate and lowers the flag."""
    from analysis.lesions.change import DEFAULT_MIN_LESION_ML, INDETERMINATE, RESOLVED, STATUS_CODES

    truth = [r for r in read_csv(cohort / TRUTH_CSV) if r["case"] == case]
    expected = []
    for t in truth:
        size = max(float(t["baseline_ml"]), float(t["followup_ml"]))
        small = t["status"] in (NEW, RESOLVED) and size < DEFAULT_MIN_LESION_ML
        expected.append(INDETERMINATE if small else t["status"])
    assert INDETERMINATE in expected and NEW in expected  # both kinds in these two pairs (seed 0)
    out = tmp_path / "out"
    assert invoke(_args(cohort, case, out)).exit_code == 0
    rows = read_csv(out / LESIONS_CSV)
    assert [r["status"] for r in rows] == expected
    summary = read_summary(out)
    assert int(summary[INDETERMINATE]) == expected.count(INDETERMINATE) and int(summary[NEW]) == expected.count(NEW)
    assert summary["new_lesions_flag"] == str(int(expected.count(NEW) >= NEW_LESIONS_FLAG))
    status, _ = read_array(out / "status.nii.gz")
    assert STATUS_CODES[INDETERMINATE] == 6 and 6 in np.unique(status)
    record = json.loads((out / "followup.json").read_text(encoding="utf-8"))
    assert "indeterminate: a lesion on one scan only, below 0.1 ml" in record["definitions"]["status"]
    out = tmp_path / "floor1"
    assert invoke(_args(cohort, case, out, "--min-lesion-ml", "1")).exit_code == 0
    summary = read_summary(out)
    assert summary[NEW] == "0" and summary["new_lesions_flag"] == "0"


def test_a_pair_without_lesions_gives_an_all_zero_summary(cohort, tmp_path):
    out = tmp_path / "out"
    result = invoke(_args(cohort, "case_000", out))
    assert result.exit_code == 0, result.output
    summary = read_summary(out)
    assert all(float(v) == 0 for v in summary.values()), summary
    assert read_csv(out / LESIONS_CSV) == []
    status, _ = read_array(out / "status.nii.gz")
    assert not status.any()


def test_two_different_patients_are_refused_with_one_line_and_nothing_written(cohort, tmp_path):
    before = snapshot(tmp_path)
    line = assert_clean_error(invoke(_args(cohort, "case_002", tmp_path / "out", followup_case="case_001")),
                              ["case_001_0000.nii.gz", "could not be aligned", "bone Dice"])
    assert "same patient" in line
    assert snapshot(tmp_path) == before


def test_no_resample_with_nnunet_is_refused_with_one_line_before_anything_runs(cohort, tmp_path):
    """--no-resample is the Keras wing's switch; nnU-Net runs at its plan's spacing, so followup,
    timeline and serve refuse it with --nnunet-work instead of ignoring it."""
    work = tmp_path / "work"
    work.mkdir()
    before = snapshot(tmp_path)
    base = ["--baseline", cohort / "imagesTr" / "case_000_0000.nii.gz",
            "--followup", cohort / "followup" / "imagesTr" / "case_000_0000.nii.gz"]
    needles = ["--no-resample", "Keras --model", str(work), "plan's spacing"]
    assert_clean_error(invoke(["followup", *base, "--nnunet-work", work, "--no-resample", "--out", tmp_path / "o"]),
                       needles)
    assert_clean_error(invoke(["timeline", base[1], base[3], "--nnunet-work", work, "--no-resample",
                               "--dates", "2025-01-06,2025-03-31", "--out", tmp_path / "o"]), needles)
    assert_clean_error(invoke(["serve", "--nnunet-work", work, "--no-resample", "--spool", tmp_path / "spool",
                               "--destination", "PACS@127.0.0.1:4242", "--once"]), needles)
    assert snapshot(tmp_path) == before


def test_out_is_refused_when_it_exists_and_outputs_honour_the_umask(cohort, tmp_path, umask_022):
    out = tmp_path / "out"
    out.mkdir()
    assert_clean_error(invoke(_args(cohort, "case_000", out)), [str(out), "--overwrite"])
    assert list(out.iterdir()) == []
    os.umask(0o027)
    try:
        assert invoke(_args(cohort, "case_000", out, "--overwrite")).exit_code == 0
        assert wrong_modes(out, 0o027) == []
    finally:
        os.umask(0o022)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_a_failure_while_writing_leaves_no_partial_output(cohort, tmp_path, monkeypatch):
    import analysis.monitoring.followup as followup

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(followup, "write_followup_preview", fail)
    with pytest.raises(OSError):
        followup.run_followup(cohort / "imagesTr" / "case_000_0000.nii.gz",
                              cohort / "followup" / "imagesTr" / "case_000_0000.nii.gz", tmp_path / "out",
                              baseline_mask=cohort / "labelsTr" / "case_000.nii.gz",
                              followup_mask=cohort / "followup" / "labelsTr" / "case_000.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_a_mask_whose_geometry_is_not_its_cts_is_refused(cohort, tmp_path):
    mask, g = read_array(cohort / "followup" / "labelsTr" / "case_003.nii.gz")
    shifted = Geometry(g.size, g.spacing, (g.origin[0] + 2.0, *g.origin[1:]), g.direction)
    write_array(mask, shifted, tmp_path / "moved_mask.nii.gz")
    before = snapshot(tmp_path)
    args = _args(cohort, "case_003", tmp_path / "out")
    args[args.index("--followup-mask") + 1] = tmp_path / "moved_mask.nii.gz"
    assert_clean_error(invoke(args), ["moved_mask.nii.gz", "origin", "expected the CT's geometry"])
    assert snapshot(tmp_path) == before
    only_one = _args(cohort, "case_003", tmp_path / "out")[:-4] + ["--out", tmp_path / "out"]
    assert_clean_error(invoke(only_one), ["--baseline-mask", "--followup-mask"])


def _tiny_pair(tmp: Path, baseline_boxes, followup_boxes) -> list:
    """A 20 x 40 x 40 CT with a bone block and box lesions, stored twice (no motion)."""
    g = Geometry((40, 40, 20), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    ct = np.full((20, 40, 40), 40, np.int16)
    ct[2:18, 5:35, 5:35] = 400
    ct[:, :3, :] = -1000  # air in front of the patient (a CT's field of view holds some)
    paths = []
    for name, boxes in (("b", baseline_boxes), ("f", followup_boxes)):
        mask = np.zeros(ct.shape, np.uint8)
        for z0, z1, y0, y1, x0, x1 in boxes:
            mask[z0:z1, y0:y1, x0:x1] = 1
        write_array(ct, g, tmp / f"{name}_ct.nii.gz")
        write_array(mask, g, tmp / f"{name}_mask.nii.gz")
        paths += [tmp / f"{name}_ct.nii.gz", tmp / f"{name}_mask.nii.gz"]
    return ["followup", "--baseline", paths[0], "--followup", paths[2], "--baseline-mask", paths[1],
            "--followup-mask", paths[3], "--no-registration"]


def test_splits_merges_and_centroid_matches_are_recorded(tmp_path):
    # baseline: A splits into two, B and C merge into one, D moves 6 mm along x (no overlap left)
    base = [(4, 8, 6, 16, 6, 12), (10, 12, 20, 24, 6, 9), (10, 12, 20, 24, 11, 14), (14, 16, 28, 30, 28, 30)]
    fu = [(4, 8, 6, 10, 6, 12), (4, 8, 13, 16, 6, 12), (10, 12, 20, 24, 6, 14), (14, 16, 28, 30, 22, 24)]
    out = tmp_path / "out"
    result = invoke([*_tiny_pair(tmp_path, base, fu), "--min-change-ml", "0.02", "--out", out])
    assert result.exit_code == 0, result.output
    rows = read_csv(out / LESIONS_CSV)
    # voxels of 2 mm^3: A 240 -> 96 + 72 (0.48 -> 0.336 ml, ratio 0.7); B + C 2 x 24 -> 64 (0.096 -> 0.128 ml,
    # ratio 1.33, +0.032 ml >= the 0.02 ml floor); D 8 -> 8 voxels
    assert [(r["baseline_id"], r["followup_id"], r["status"]) for r in rows] == [
        ("1", "1;2", SHRUNK), ("2;3", "3", GROWN), ("4", "4", STABLE)]
    assert [float(r["change_ml"]) for r in rows] == pytest.approx([-0.144, 0.032, 0.0])
    assert float(rows[0]["change_pct"]) == pytest.approx(-30.0)
    record = json.loads((out / "followup.json").read_text(encoding="utf-8"))
    assert record["splits"] == [1] and record["merges"] == [2]
    assert float(rows[2]["distance_mm"]) == pytest.approx(6.0)
    assert "PCWG3" in record["definitions"]["new_lesions_flag"]
    assert record["registration"]["registered"] is False


def test_a_float_ct_holding_nan_is_refused_with_predicts_message(tmp_path):
    args = _tiny_pair(tmp_path, [(4, 8, 6, 12, 6, 12)], [(4, 8, 6, 12, 6, 12)])
    ct_path = tmp_path / "f_ct.nii.gz"
    ct, g = read_array(ct_path)
    ct = ct.astype(np.float32)
    ct[3, 10, 10] = ct[4, 11, 12] = np.nan
    write_array(ct, g, ct_path)
    import SimpleITK as sitk

    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(ct_path)))).all()  # ITK decodes NaN as 0
    line = assert_clean_error(invoke([*args, "--out", tmp_path / "out"]),
                              [str(ct_path), "2 voxel(s) are NaN or infinite; expected finite values (HU)"])
    assert not (tmp_path / "out").exists()
    # predict's per-case pipeline (both wings run it) refuses the same file with the same line
    from analysis.prediction.folder import PredictionFolder
    from analysis.prediction.runner import Network, Outputs, plan_inputs, run_cases

    def never(volume, z, spacing):
        raise AssertionError("the network ran on a CT holding NaN")

    plan = plan_inputs(None, ct_path)
    folder = PredictionFolder(tmp_path / "pred", {"test": "pred"}, overwrite=False)
    _, failures, _ = run_cases(folder, plan.cases, Network(name="p", fingerprint="0", segment=never), Outputs(),
                               strict=False)
    assert [f"error: {f}" for f in failures] == [line]


def _as_dicom(nifti: Path, folder: Path, patient_id: str, series_uid: str) -> Path:
    """The CT of an LPS-stored NIfTI file as a DICOM series with a PatientID."""
    import pydicom

    from tests.test_imports import write_dicom_series

    hu, g = read_array(nifti)
    assert g.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    write_dicom_series(folder, hu, spacing=g.spacing, origin=g.origin, series_uid=series_uid)
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.PatientID = patient_id
        ds.save_as(f)
    return folder


def test_dicom_series_work_and_two_patient_ids_are_refused(cohort, tmp_path):
    case = "case_004"  # its follow-up is stored LPS, so both can be written as plain axial series
    base = _as_dicom(cohort / "imagesTr" / f"{case}_0000.nii.gz", tmp_path / "dicom" / "2025", "P7", "1.2.3.4.5.1")
    fu = _as_dicom(cohort / "followup" / "imagesTr" / f"{case}_0000.nii.gz", tmp_path / "dicom" / "2026", "P7",
                   "1.2.3.4.5.2")
    masks = ["--baseline-mask", cohort / "labelsTr" / f"{case}.nii.gz",
             "--followup-mask", cohort / "followup" / "labelsTr" / f"{case}.nii.gz"]
    result = invoke(["followup", "--baseline", base, "--followup", fu, *masks, "--out", tmp_path / "out",
                     "--min-lesion-ml", "0"])
    assert result.exit_code == 0, result.output
    truth = [(r["status"], r["baseline_id"], r["followup_id"]) for r in read_csv(cohort / TRUTH_CSV) if r["case"] == case]
    assert [(r["status"], r["baseline_id"], r["followup_id"]) for r in read_csv(tmp_path / "out" / LESIONS_CSV)] == truth
    record = json.loads((tmp_path / "out" / "followup.json").read_text(encoding="utf-8"))
    assert record["inputs"]["followup"]["dicom"]["series_uid"] == "1.2.3.4.5.2"
    other = _as_dicom(cohort / "followup" / "imagesTr" / f"{case}_0000.nii.gz", tmp_path / "dicom" / "other", "P8",
                      "1.2.3.4.5.3")
    before = snapshot(tmp_path)
    assert_clean_error(invoke(["followup", "--baseline", base, "--followup", other, *masks, "--out", tmp_path / "o2"]),
                       ["PatientID 'P8'", "'P7'", "same patient"])
    assert snapshot(tmp_path) == before


def test_a_real_ct_moved_rigidly_raises_no_flag(tmp_path):
    """The real head CT of Debian's invesalius-examples (24 slices) against itself moved by 4 degrees and
    (5, -3, 2) mm, each with a mask drawn the same way on its own scan (dense skull, >= 1200 HU: a
    thresholded finding that the interpolation of the motion redraws, as a model's noise is): without a
    minimum size a few 'new' lesions raise the flag on an unchanged patient; with the default 0.1 ml they
    are indeterminate and the flag stays 0. (With a trained model on the whole head: BENCHMARKS.md.)"""
    from analysis.imaging.io import write_mask
    from analysis.lesions.change import DEFAULT_MIN_LESION_ML, INDETERMINATE, RESOLVED
    from tests.real_ct import head_ct, moved

    ct, g = head_ct()
    ct = ct[36:60]
    g = Geometry(size=(256, 256, 24), spacing=g.spacing, origin=g.origin, direction=g.direction)
    mv = np.rint(moved(ct.astype(np.float32), g, 4.0, (5.0, -3.0, 2.0))).astype(np.int16)
    for name, volume in (("head", ct), ("moved", mv)):
        write_array(volume, g, tmp_path / f"{name}.nii.gz")
        write_mask((volume >= 1200).astype(np.uint8), g, tmp_path / f"{name}_mask.nii.gz")
    args = ["followup", "--baseline", tmp_path / "head.nii.gz", "--followup", tmp_path / "moved.nii.gz",
            "--baseline-mask", tmp_path / "head_mask.nii.gz", "--followup-mask", tmp_path / "moved_mask.nii.gz"]
    assert invoke([*args, "--out", tmp_path / "all", "--min-lesion-ml", "0"]).exit_code == 0
    every = read_summary(tmp_path / "all")
    assert int(every[NEW]) >= NEW_LESIONS_FLAG and every["new_lesions_flag"] == "1"  # the rule is needed
    assert invoke([*args, "--out", tmp_path / "out"]).exit_code == 0
    summary = read_summary(tmp_path / "out")
    assert summary[NEW] == "0" and summary[RESOLVED] == "0" and summary["new_lesions_flag"] == "0"
    assert int(summary[INDETERMINATE]) == int(every[NEW]) + int(every[RESOLVED]) + int(every[INDETERMINATE])
    record = json.loads((tmp_path / "out" / "followup.json").read_text(encoding="utf-8"))
    assert record["registration"]["bone_dice"] >= 0.9
    # too small to call, or (the moved head's 24 slices are not all in the other's view) outside the follow-up's
    small = [r for r in read_csv(tmp_path / "out" / LESIONS_CSV) if r["status"] == INDETERMINATE
             and r["event"] != OUTSIDE_FOV]
    assert all(max(float(r["baseline_ml"] or 0), float(r["followup_ml"] or 0)) < DEFAULT_MIN_LESION_ML for r in small)
