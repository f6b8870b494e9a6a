"""The timeline phantom (analysis.monitoring.timeline_phantom) and ``timeline`` on it (framework-free).

Evidence: the phantom's schedule states what each patient's lesions do and which PCWG3 state each
scan should get; its truth is measured (tracks through the exact, known motion; volumes on each
scan's own grid). The tests check that the truth shows what the schedule meant, then that
``timeline`` (registration instead of the exact motion) recovers every track id, status and state.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from analysis.cohort.examples import write_dicom_series
from analysis.cohort.phantom import generate_cohort
from analysis.imaging.io import Geometry, read_array, write_array
from analysis.imaging.records import read_csv
from analysis.monitoring.registration import rotation_angle_deg
from analysis.monitoring.timeline import TIMELINE_COLUMNS, TRACK_COLUMNS
from analysis.monitoring.timeline_phantom import (
    SCANS_CSV,
    SCENARIOS,
    SCHEDULE_COLUMNS,
    SCHEDULE_CSV,
    TRUTH_COLUMNS,
    TRUTH_CSV,
    Timelines,
    intended_states,
    scan_folder,
)
from tests.badinput import assert_clean_error, invoke, snapshot

CASES = 5  # seed 0: case_000 lesion-free, case_001..004 one scenario each
TIMEPOINTS = 4
SHAPE = (96, 128, 128)  # 288 mm along z: room for every designed lesion


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("timeline") / "DS"
    return generate_cohort(root, cases=CASES, seed=0, shape=SHAPE, companion=Timelines(TIMEPOINTS))


def _truth(cohort: Path, case: str) -> dict[tuple[int, int], dict]:
    return {(int(r["scan"]), int(r["track"])): r for r in read_csv(cohort / TRUTH_CSV) if r["case"] == case}


def test_the_layout_and_the_storage_variety(cohort):
    for k in range(TIMEPOINTS):
        folder = scan_folder(cohort, k)
        assert (folder / "dataset.json").is_file()
        assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"case_{i:03d}_0000.nii.gz"
                                                                          for i in range(CASES)]
    assert list(read_csv(cohort / TRUTH_CSV)[0]) == list(TRUTH_COLUMNS)
    assert list(read_csv(cohort / SCHEDULE_CSV)[0]) == list(SCHEDULE_COLUMNS)
    scans = read_csv(cohort / SCANS_CSV)
    later = [r for r in scans if r["scan"] != "0"]
    assert len({r["orientation"] for r in later}) >= 4
    assert len({(r["spacing_x"], r["spacing_z"]) for r in later}) >= 4
    assert all(float(r["rotation_x_deg"]) == 0 and r["orientation"] == "LPS" for r in scans if r["scan"] == "0")
    _, g = read_array(scan_folder(cohort, 1) / "imagesTr" / "case_001_0000.nii.gz")
    _, g0 = read_array(scan_folder(cohort, 0) / "imagesTr" / "case_001_0000.nii.gz")
    assert g.spacing != g0.spacing and g.size[2] < g0.size[2] * g0.spacing[2] / g.spacing[2]  # shorter field of view


def test_every_scenario_gives_the_states_it_was_built_for(cohort):
    scans = read_csv(cohort / SCANS_CSV)
    by_case: dict[str, list[dict]] = {}
    for r in scans:
        by_case.setdefault(r["case"], []).append(r)
    seen = set()
    for case, rows in by_case.items():
        name = rows[0]["scenario"]
        if name == "none":
            assert [r["state"] for r in rows] == ["baseline"] + ["no progression"] * (TIMEPOINTS - 1)
            assert not any(r["case"] == case and r["present"] == "1" for r in read_csv(cohort / TRUTH_CSV))
            continue
        scenario = next(s for s in SCENARIOS if s.name == name)
        assert [r["state"] for r in rows] == intended_states(scenario), case
        seen.add(name)
    assert seen == {s.name for s in SCENARIOS}  # the rule's four edge cases are all in the cohort


def test_the_truth_shows_every_scheduled_event(cohort):
    schedule = read_csv(cohort / SCHEDULE_CSV)
    assert {r["event"] for r in schedule} == {"new", "grow", "shrink", "resolve", "reappear", "split"}
    expected_status = {"new": "new", "grow": "grown", "shrink": "shrunk", "resolve": "resolved", "reappear": "new"}
    for r in schedule:
        truth = _truth(cohort, r["case"])
        k = int(r["scan"])
        assert r["track"] and ";" not in r["track"], r  # each event landed on exactly one track
        step = truth[(k, int(r["track"]))]
        if r["event"] in expected_status:
            assert step["status"] == expected_status[r["event"]], (r, step)
        if r["event"] == "split":
            assert step["event"] == "split" and len(step["lesion_ids"].split(";")) == 2, (r, step)
        if r["event"] == "reappear":  # the same id as when it went
            gone = next(s for s in schedule if s["case"] == r["case"] and s["event"] == "resolve"
                        and s["role"] == r["role"])
            assert gone["track"] == r["track"] and step["event"] == "reappeared"
        if r["event"] == "new":
            assert all(t[1] != int(r["track"]) for t in truth if t[0] < k)  # a new id


# --- timeline on the phantom -------------------------------------------------------------------

def _timeline_args(cohort: Path, case: str, out: Path, *extra, scans=range(TIMEPOINTS)) -> list:
    dates = [r["date"] for r in read_csv(cohort / SCANS_CSV) if r["case"] == case]
    args = ["timeline", *(scan_folder(cohort, k) / "imagesTr" / f"{case}_0000.nii.gz" for k in scans)]
    for k in scans:
        args += ["--masks", scan_folder(cohort, k) / "labelsTr" / f"{case}.nii.gz"]
    return [*args, "--dates", ",".join(dates[k] for k in scans), "--out", out, *extra]


def _transform_errors(record: dict, truth: dict[str, str], points: np.ndarray) -> tuple[float, float]:
    """(rotation error in degrees, largest displacement error in mm over ``points``)."""
    m_est = np.asarray(record["matrix"]).reshape(3, 3)
    t_est = np.asarray(record["offset_mm"])
    m_true = np.array([[float(truth[f"m{i}{j}"]) for j in range(3)] for i in range(3)])
    t_true = np.array([float(truth[f"offset_{a}_mm"]) for a in "xyz"])
    shift = np.linalg.norm(points @ m_est.T + t_est - (points @ m_true.T + t_true), axis=1).max()
    return rotation_angle_deg(m_est.T @ m_true), float(shift)


@pytest.mark.parametrize("case", [f"case_{i:03d}" for i in range(1, CASES)])
def test_every_track_id_status_and_state_equals_the_truth(cohort, tmp_path, case):
    out = tmp_path / "out"
    bones = [a for k in range(TIMEPOINTS) for a in ("--bones", scan_folder(cohort, k) / "bonesTr" / f"{case}.nii.gz")]
    result = invoke(_timeline_args(cohort, case, out, *bones, "--min-lesion-ml", "0"))  # the truth's: any size
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "tracks.csv")
    assert list(rows[0]) == list(TRACK_COLUMNS)
    truth = [r for r in read_csv(cohort / TRUTH_CSV) if r["case"] == case]
    keys = ("scan", "track", "present", "status", "event", "lesion_ids")
    assert [tuple(r[k] for k in keys) for r in rows] == [tuple(t[k] for k in keys) for t in truth]
    for r, t in zip(rows, truth):  # volumes from each scan's own grid (NIfTI keeps spacings as float32)
        assert float(r["volume_ml"]) == pytest.approx(float(t["volume_ml"]), rel=1e-6)
        assert bool(r["bone"]) == (r["present"] == "1")
    scans = read_csv(cohort / SCANS_CSV)
    expected = [r for r in scans if r["case"] == case]
    got = read_csv(out / "timeline.csv")
    assert list(got[0]) == list(TIMELINE_COLUMNS)
    assert [r["state"] for r in got] == [r["state"] for r in expected]
    assert [r["date"] for r in got] == [r["date"] for r in expected]
    for r in got:  # the table's counts are the tracks'
        k = r["scan"]
        assert int(r["lesions"]) == sum(len(t["lesion_ids"].split(";")) for t in rows
                                        if t["scan"] == k and t["present"] == "1")
        assert int(r["resolved"]) == sum(t["status"] == "resolved" for t in rows if t["scan"] == k)
    record = json.loads((out / "timeline.json").read_text(encoding="utf-8"))
    assert record["registrations"][0] is None and "directly to the first" in record["registration_scheme"]
    _, g0 = read_array(scan_folder(cohort, 0) / "imagesTr" / f"{case}_0000.nii.gz")
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * (np.asarray(g0.size) - 1)
    corners = np.asarray(g0.origin) + (corners * np.asarray(g0.spacing)) @ np.asarray(g0.direction).reshape(3, 3).T
    for k in range(1, TIMEPOINTS):
        reg = record["registrations"][k]
        assert reg["to"] == "t0" and reg["bone_dice"] >= 0.7
        rotation, shift = _transform_errors(reg, expected[k], corners)
        assert rotation < 1.0 and shift < 1.0, (k, rotation, shift)
    assert [s["state"] for s in record["states"]] == [r["state"] for r in expected]
    assert record["inputs"][1]["date_source"] == "--dates" and len(record["inputs"][1]["sha256"]) == 64
    for name in ("timeline.png", *(f"preview_t{k}.png" for k in range(TIMEPOINTS))):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "index.html").read_text(encoding="utf-8")
    assert 'src="timeline.png"' in page and all(f'src="preview_t{k}.png"' in page for k in range(TIMEPOINTS))


def test_by_default_tracks_new_or_resolved_below_the_minimum_size_are_indeterminate(cohort, tmp_path):
    """followup's 0.1 ml floor: a track new or resolved below it is indeterminate, and the PCWG3 rule
    does not count it as new; every id, event and other status is the truth's."""
    from analysis.monitoring.pcwg3 import pcwg3_bone
    import datetime as dt

    case = "case_004"  # the scenario "early": lesion C comes back at t3 as 0.09 ml on t3's coarser grid
    out = tmp_path / "out"
    result = invoke(_timeline_args(cohort, case, out))
    assert result.exit_code == 0, result.output
    truth = [r for r in read_csv(cohort / TRUTH_CSV) if r["case"] == case]
    last: dict[str, float] = {}
    expected = []
    for t in truth:
        status = t["status"]
        if status in ("new", "resolved"):
            size = float(t["volume_ml"]) if status == "new" else last[t["track"]]
            status = status if size >= 0.1 else "indeterminate"
        if t["present"] == "1":
            last[t["track"]] = float(t["volume_ml"])
        expected.append((t["scan"], t["track"], t["event"], status))
    rows = read_csv(out / "tracks.csv")
    assert [(r["scan"], r["track"], r["event"], r["status"]) for r in rows] == expected
    assert ("3", "3", "reappeared", "indeterminate") in expected
    # PCWG3 on the truth's tracks, counting as new only lesions of at least 0.1 ml
    n = TIMEPOINTS
    present = [{t["track"] for t in truth if t["scan"] == str(k) and t["present"] == "1"} for k in range(n)]
    countable = [{t["track"] for t in truth if t["scan"] == str(k) and t["present"] == "1"
                  and float(t["volume_ml"]) >= 0.1} for k in range(n)]
    dates = [dt.date.fromisoformat(r["date"]) for r in read_csv(cohort / SCANS_CSV) if r["case"] == case]
    got = read_csv(out / "timeline.csv")
    states = pcwg3_bone(dates, present, countable)
    assert [r["state"] for r in got] == [s.state for s in states]
    assert [int(r["new"]) for r in got] == [len(s.new) for s in states]


def test_a_patient_without_lesions_has_no_tracks_and_no_progression(cohort, tmp_path):
    out = tmp_path / "out"
    result = invoke(_timeline_args(cohort, "case_000", out, scans=range(3)))
    assert result.exit_code == 0, result.output
    assert read_csv(out / "tracks.csv") == []
    assert [r["state"] for r in read_csv(out / "timeline.csv")] == ["baseline", "no progression", "no progression"]


def test_dates_missing_unordered_or_miscounted_are_refused_with_one_line(cohort, tmp_path):
    case = "case_000"
    before = snapshot(tmp_path)
    args = _timeline_args(cohort, case, tmp_path / "out", scans=range(2))
    no_dates = args[:args.index("--dates")] + args[args.index("--dates") + 2:]
    assert_clean_error(invoke(no_dates), ["t0/imagesTr/case_000_0000.nii.gz", "no StudyDate", "--dates"])
    swapped = list(args)
    swapped[swapped.index("--dates") + 1] = "2025-03-31,2025-01-06"
    assert_clean_error(invoke(swapped), ["t1/imagesTr", "2025-01-06", "not after", "strictly increasing"])
    short = list(args)
    short[short.index("--dates") + 1] = "2025-03-31"
    assert_clean_error(invoke(short), ["--dates", "1 dates for 2 CTs"])
    bad = list(args)
    bad[bad.index("--dates") + 1] = "2025-01-06,31.03.2025"
    assert_clean_error(invoke(bad), ["--dates", "'31.03.2025'", "YYYY-MM-DD"])
    ct0, ct1, mask0 = args[1], args[2], args[4]
    assert_clean_error(invoke(["timeline", ct0, ct1, "--masks", mask0, "--dates", "2025-01-06,2025-03-31", "--out",
                               tmp_path / "out"]), ["--masks", "1 files for 2 CTs"])
    assert_clean_error(invoke(["timeline", ct0, "--masks", mask0, "--dates", "2025-01-06", "--out",
                               tmp_path / "out"]), ["1 CT given", "at least two"])
    assert snapshot(tmp_path) == before


# --- DICOM dates and patients; appending a scan -----------------------------------------------

TINY = Geometry((40, 40, 12), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def _tiny_study(tmp: Path, name: str, boxes, *, date: str, patient: str = "P1") -> tuple[Path, Path]:
    """A DICOM CT series (air around soft tissue, a bone block, box lesions) of ``patient`` dated ``date``,
    and its mask file."""
    ct = np.full((12, 40, 40), -1000, np.int16)  # air beside the patient: the CT check sees Hounsfield units
    ct[:, 2:38, 2:38] = 40
    ct[1:11, 5:35, 5:35] = 400
    mask = np.zeros(ct.shape, np.uint8)
    for z0, z1, y0, y1, x0, x1 in boxes:
        mask[z0:z1, y0:y1, x0:x1] = 1
        ct[z0:z1, y0:y1, x0:x1] = 900
    folder = tmp / name
    write_dicom_series(ct, TINY, folder, patient_id=patient, localizer=False, study_date=date)
    write_array(mask, TINY, tmp / f"{name}_mask.nii.gz")
    return folder, tmp / f"{name}_mask.nii.gz"


def _tiny_timeline_args(studies) -> list:
    """``timeline CT... --masks M...`` of :func:`_tiny_study` results, in their order."""
    args: list = ["timeline", *(s[0] for s in studies)]
    for s in studies:
        args += ["--masks", s[1]]
    return args


def test_dicom_dates_studies_and_one_patient(tmp_path):
    a = (2, 6, 6, 12, 6, 12)
    b = (2, 6, 24, 30, 24, 30)
    c = (7, 10, 6, 12, 24, 30)
    studies = [_tiny_study(tmp_path, "s0", [a], date="20250106"),
               _tiny_study(tmp_path, "s1", [a, b], date="20250331"),
               _tiny_study(tmp_path, "s2", [a, b, c], date="20250623")]

    def run(chosen, out):
        args = ["timeline", *(s[0] for s in chosen)]
        for s in chosen:
            args += ["--masks", s[1]]
        return invoke([*args, "--no-registration", "--out", out])

    result = run(studies, tmp_path / "out3")
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "out3" / "timeline.csv")
    assert [r["date"] for r in rows] == ["2025-01-06", "2025-03-31", "2025-06-23"]
    import pydicom

    uids = [str(pydicom.dcmread(next(s[0].iterdir()), stop_before_pixels=True).StudyInstanceUID) for s in studies]
    assert [r["study"] for r in rows] == uids
    record = json.loads((tmp_path / "out3" / "timeline.json").read_text(encoding="utf-8"))
    assert [i["date_source"] for i in record["inputs"]] == ["StudyDate"] * 3
    tracks = read_csv(tmp_path / "out3" / "tracks.csv")
    assert [(r["track"], r["scan"], r["status"]) for r in tracks if r["present"] == "1"] == [
        ("1", "0", ""), ("1", "1", "stable"), ("2", "1", "new"), ("1", "2", "stable"), ("2", "2", "stable"),
        ("3", "2", "new")]
    # appending a scan leaves the earlier scans' rows as they were
    assert run(studies[:2], tmp_path / "out2").exit_code == 0
    shorter = read_csv(tmp_path / "out2" / "tracks.csv")
    assert shorter == [r for r in tracks if r["scan"] in ("0", "1")]
    # another patient, and a series without StudyDate, are refused
    other = _tiny_study(tmp_path, "x", [a], date="20251001", patient="P2")
    undated = _tiny_study(tmp_path / "u", "u", [a], date="")
    before = snapshot(tmp_path)
    assert_clean_error(run([*studies, other], tmp_path / "o"), ["patient 'P2'", "'P1'", "one patient"])
    assert_clean_error(run([studies[0], undated], tmp_path / "o"), ["no StudyDate", "--dates"])
    assert snapshot(tmp_path) == before


def test_sr_one_report_per_follow_up_study_with_one_uid_per_track(tmp_path):
    import pydicom

    from analysis.monitoring.timeline_dicom import read_timeline_report

    a = (2, 6, 6, 12, 6, 12)
    b = (2, 6, 24, 30, 24, 30)
    c = (7, 10, 6, 12, 24, 30)
    d = (7, 10, 26, 32, 6, 12)
    e = (7, 10, 32, 38, 32, 38)
    tiny = (10, 11, 2, 4, 36, 38)  # 0.008 ml: below followup's 0.1 ml, indeterminate rather than new
    studies = [_tiny_study(tmp_path, "s0", [a], date="20250106"),
               _tiny_study(tmp_path, "s1", [a, b, d], date="20250331"),
               _tiny_study(tmp_path, "s2", [b, c, d, e, tiny], date="20250623")]
    args = _tiny_timeline_args(studies)
    out = tmp_path / "out"
    result = invoke([*args, "--no-registration", "--sr", "--out", out])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "dicom").iterdir()) == ["t1_seg.dcm", "t1_sr.dcm", "t2_seg.dcm", "t2_sr.dcm"]
    r1, r2 = (read_timeline_report(out / "dicom" / f"t{k}_sr.dcm") for k in (1, 2))
    record = json.loads((out / "timeline.json").read_text(encoding="utf-8"))
    uids = record["tracking_uids"]
    assert [(t["track"], t["status"]) for t in r1["tracks"]] == [(1, "stable"), (2, "new"), (3, "new")]
    assert [(t["track"], t["status"]) for t in r2["tracks"]] == [(1, "resolved"), (2, "stable"), (3, "stable"),
                                                                  (4, "new"), (5, "new"), (6, "indeterminate")]
    # the two new lesions of t2 confirm t1 (the indeterminate one does not count as new against t1)
    assert (r1["summary"]["new"], r2["summary"]["new"], r2["summary"]["resolved"]) == (2, 2, 1)
    assert r2["summary"]["lesions"] == 5 and r2["summary"]["total_ml"] == pytest.approx(0.288 + 3 * 0.216 + 0.008)
    # every present track is drawn where OHIF can place it: an outline on one of t2's CT instances
    instances = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in studies[2][0].iterdir()}
    for t in r2["tracks"][1:]:
        assert t["outline_sop_instance_uid"] in instances and t["long_axis_mm"] >= t["short_axis_mm"] > 0, t
        assert t["time_point"] == "t2" and t["segment"] is not None
    for report in (r1, r2):  # one identifier and UID per track, in every study
        assert all(t["tracking_uid"] == uids[str(t["track"])] for t in report["tracks"])
    assert r1["summary"]["state"] == "progression (2025-03-31)" and r2["summary"]["state"] == "progression (2025-03-31)"
    assert r2["tracks"][0]["segment"] is None and r2["tracks"][0]["previous_ml"] > 0  # resolved: no segment
    seg2 = pydicom.dcmread(out / "dicom" / "t2_seg.dcm")
    study2 = pydicom.dcmread(next(studies[2][0].iterdir()), stop_before_pixels=True)
    assert (r2["study_uid"], str(seg2.StudyInstanceUID)) == (str(study2.StudyInstanceUID),) * 2
    assert {(str(i.TrackingID), str(i.TrackingUID)) for i in seg2.SegmentSequence} == {
        (f"lesion {t}", uids[str(t)]) for t in (2, 3, 4, 5, 6)}
    # without DICOM inputs --sr is refused before any work
    before = snapshot(tmp_path)
    assert_clean_error(invoke(["timeline", studies[0][1], studies[1][0], "--masks", studies[0][1], "--masks",
                               studies[1][1], "--sr", "--out", tmp_path / "o"]), ["--sr", "s0_mask.nii.gz",
                                                                                  "not a DICOM series"])
    assert snapshot(tmp_path) == before
