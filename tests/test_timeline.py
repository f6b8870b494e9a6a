"""The timeline phantom (analysis.monitoring.timeline_phantom) and ``timeline`` on it (framework-free).

Evidence: the phantom's schedule states what each patient's lesions do and which PCWG3 state each
scan should get; its truth is measured (tracks through the exact, known motion; volumes on each
scan's own grid). The tests check that the truth shows what the schedule meant, then that
``timeline`` (registration instead of the exact motion) recovers every track id, status and state.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from analysis.cohort.phantom import generate_cohort
from analysis.imaging.io import read_array
from analysis.imaging.records import read_csv
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
