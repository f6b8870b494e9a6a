"""A timeline phantom: several CTs of each phantom patient over time, with a stated schedule of events
and known truth (tracks, statuses, PCWG3 states) for ``timeline``.

Each patient of a phantom cohort (:mod:`analysis.cohort.phantom`) is planned again for t0, t1, t2, t3
(the same anatomy and noise; only its lesions differ). A lesion-free patient stays lesion-free (every
scan "no progression"). A lesion-bearing patient gets a **scenario** (:data:`SCENARIOS`, in turn) and,
at t0, lesions designed for it (:func:`_design`), all single ellipsoids in the spine or pelvis, at least
:data:`~analysis.cohort.followup_phantom.ISOLATION_MM` apart (centre to centre) and
:data:`Z_MARGIN_MM` inside both ends of t0's field of view (every later scan holds them whole):

* ``A`` (radius 4 mm): ``grow A`` scales it by :data:`~analysis.cohort.followup_phantom.GROW` about its
  centre from then on;
* ``B`` (5 mm): ``shrink B`` by :data:`~analysis.cohort.followup_phantom.SHRINK`;
* ``C`` (4 mm): ``resolve C`` removes it, ``reappear C`` puts it back as it was;
* ``S`` (5.5 mm): ``split S`` cuts a slab :data:`GAP_MM` wide out of it across its centre from then on:
  two pieces of the lesion as it was;
* ``N1`` .. ``N4`` (radius drawn in :data:`NEW_RADIUS_MM`): ``new N1`` adds it from then on;
* up to :data:`BACKGROUND` of the patient's own focal lesions (outside the ribs, radius >= 3 mm, as
  isolated from the designed ones) stay unchanged throughout.

A role the patient's bones have no room for is left out, and so are its events (the schedule CSV
lists the events that happened). The scenarios (days after t0; events at t1 | t2 | t3; the PCWG3
states they are built to give by :mod:`analysis.monitoring.pcwg3` with its defaults):

=========  ===============  ==========================================================================
scenario   days             events t1 | t2 | t3 -> states t0, t1, t2, t3
=========  ===============  ==========================================================================
flare      0, 84, 168, 252  new N1 N2, grow A | new N3, shrink B, resolve C | reappear C, split S
                            -> baseline, not confirmed (flare), no progression, no progression
t1         0, 84, 168, 252  new N1 N2, resolve C | new N3 N4, grow A, reappear C | split S, shrink B
                            -> baseline, progression (t1) x3
t2         0, 84, 168, 252  grow A, shrink B | new N1 N2, resolve C | reappear C, split S
                            -> baseline, no progression, progression (t2) x2
early      0, 84, 112, 196  new N1 N2, resolve C | new N3 N4 (28 days after t1: cannot confirm) |
                            reappear C, split S, shrink B, grow A
                            -> baseline, progression (t1), not evaluable, progression (t1)
=========  ===============  ==========================================================================

So the cohort holds the rule's edge cases: two new then one more (flare: not confirmed), two new then
two more (t1: progression dated t1), two new at t2 persisting at t3 (t2: progression dated t2), and a
confirmation scan under six weeks (early). Each scan k >= 1 is rendered in the patient's frame (t0's
grid, where t0 stays), moved by its own known rigid motion
(:func:`~analysis.cohort.followup_phantom.random_motion`) and resampled onto its own grid: storage
orientation and spacing from :data:`~analysis.cohort.followup_phantom.VARIANTS` in turn (by patient
and scan) and a 9 mm shorter field of view at both ends, as the follow-up phantom's.

**Truth** is measured, as the follow-up phantom's: lesions are the 26-connected components of each
scan's own mask, volumes from its own grid; they are placed in t0's frame through the *exact* motion
(no registration) and tracked by :func:`analysis.monitoring.tracking.track_lesions` with its defaults
but the minimum size: every change is called whatever its size (``min_lesion_ml=0``, as the follow-up
phantom's truth; a lesion can measure under ``followup``'s 0.1 ml on a coarse later grid, and
``timeline --min-lesion-ml 0`` reproduces the truth); the PCWG3 states follow from those tracks
(:func:`analysis.monitoring.pcwg3.pcwg3_tracks`, every new lesion counting). The
schedule is written beside it with the truth track each event landed on, so a test can check both that
the truth shows what the schedule meant and that ``timeline`` recovers the truth.

Layout added to the cohort folder::

    timeline/t0/imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz, bonesTr/<case>.nii.gz, dataset.json
    timeline/t1/...                       scans t0, t1, ... (t0: the cohort's grid, designed lesions)
    timeline_scans.csv     case,scan,date,scenario,state,<followup_transforms.csv's columns but case>
    timeline_truth.csv     case,scan,track,present,volume_ml,status,event,lesion_ids
    timeline_schedule.csv  case,scenario,scan,event,role,track
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from analysis.cohort import phantom as ph
from analysis.cohort.followup_phantom import (
    GROW,
    ISOLATION_MM,
    SHRINK,
    TRANSFORM_COLUMNS,
    VARIANTS,
    followup_grid,
    motion_row,
    nominal_mm,
    physical_box,
    random_motion,
    resample_onto,
    scaled_lesion,
)
from analysis.cohort.layout import Cohort, write_dataset_json
from analysis.imaging.io import Geometry, atomic_write_text, write_array
from analysis.imaging.records import csv_text
from analysis.monitoring.matching import scan_lesions
from analysis.monitoring.pcwg3 import pcwg3_tracks
from analysis.monitoring.tracking import PlacedScan, Tracking, field_of_view, track_lesions

__all__ = ["Scenario", "SCENARIOS", "Timelines", "TimelineCase", "generate_timeline", "START_DATE", "TIMELINE_DIR",
           "SCANS_CSV", "TRUTH_CSV", "SCHEDULE_CSV", "SCAN_COLUMNS", "TRUTH_COLUMNS", "SCHEDULE_COLUMNS",
           "MAX_TIMEPOINTS", "scan_folder", "scan_date", "intended_states", "NO_EVENTS"]

TIMELINE_DIR = "timeline"
SCANS_CSV, TRUTH_CSV, SCHEDULE_CSV = "timeline_scans.csv", "timeline_truth.csv", "timeline_schedule.csv"
SCAN_COLUMNS = ("case", "scan", "date", "scenario", "state", *TRANSFORM_COLUMNS[1:])
TRUTH_COLUMNS = ("case", "scan", "track", "present", "volume_ml", "status", "event", "lesion_ids")
SCHEDULE_COLUMNS = ("case", "scenario", "scan", "event", "role", "track")
#: t0's date; scan k is ``START_DATE + days[k]``.
START_DATE = dt.date(2025, 1, 6)
#: A split cuts a slab this wide (physical mm) out of the lesion: wider than two voxel diagonals of the
#: coarsest follow-up grid (1.25 x t0's in-plane spacing), so the pieces stay apart at 26-connectivity.
GAP_MM = 4.0
#: Designed lesions: where (project bone codes: spine, pelvis), their radii (physical mm), the range new
#: lesions' radii are drawn from, and how far inside both ends of t0's field of view their centres
#: lie (later scans are 9 mm shorter at both ends and move by up to 12 mm and 5 degrees).
DESIGN_BONES = (ph.SPINE, ph.PELVIS)
ROLE_RADIUS_MM = {"A": 4.0, "B": 5.0, "C": 4.0, "S": 5.5}
NEW_RADIUS_MM = (3.5, 5.0)
Z_MARGIN_MM = 30.0
#: At most this many of the patient's own focal lesions stay (unchanged), each outside the ribs, with a
#: radius of at least :data:`BACKGROUND_MIN_MM` and isolated from the designed ones.
BACKGROUND, BACKGROUND_MIN_MM = 3, 3.0


@dataclass(frozen=True)
class Scenario:
    """A patient's schedule: days after t0 and events per scan (t0 has none).

    Attributes:
        name: the scenario's name.
        days: days after t0 of t0, t1, ...
        events: per scan, ``"verb ROLE"`` words (verbs: new, grow, shrink, resolve, reappear, split).
        states: the PCWG3 states the schedule is built to give (``progression (tK)`` for the date of tK).
    """

    name: str
    days: tuple[int, ...]
    events: tuple[tuple[str, ...], ...]
    states: tuple[str, ...]


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("flare", (0, 84, 168, 252),
             ((), ("new N1", "new N2", "grow A"), ("new N3", "shrink B", "resolve C"), ("reappear C", "split S")),
             ("baseline", "not confirmed (flare)", "no progression", "no progression")),
    Scenario("t1", (0, 84, 168, 252),
             ((), ("new N1", "new N2", "resolve C"), ("new N3", "new N4", "grow A", "reappear C"),
              ("split S", "shrink B")),
             ("baseline", "progression (t1)", "progression (t1)", "progression (t1)")),
    Scenario("t2", (0, 84, 168, 252),
             ((), ("grow A", "shrink B"), ("new N1", "new N2", "resolve C"), ("reappear C", "split S")),
             ("baseline", "no progression", "progression (t2)", "progression (t2)")),
    Scenario("early", (0, 84, 112, 196),
             ((), ("new N1", "new N2", "resolve C"), ("new N3", "new N4"),
              ("reappear C", "split S", "shrink B", "grow A")),
             ("baseline", "progression (t1)", "not evaluable", "progression (t1)")),
)
#: A patient without lesions: no events, a scan every 12 weeks.
NO_EVENTS = Scenario("none", (0, 84, 168, 252), ((),) * 4, ("baseline", *["no progression"] * 3))
MAX_TIMEPOINTS = len(SCENARIOS[0].days)


def scan_folder(root: str | Path, k: int) -> Path:
    """The cohort layout of scan ``k`` of a timeline phantom (``timeline/tK``)."""
    return Path(root) / TIMELINE_DIR / f"t{k}"


def scan_date(scenario: Scenario, k: int) -> dt.date:
    return START_DATE + dt.timedelta(days=scenario.days[k])


@dataclass
class _Roles:
    """The lesions a patient's events act on (indices into the t0 plan's lesions) and its new lesions."""

    lesion: dict[str, int] = field(default_factory=dict)
    new: dict[str, Any] = field(default_factory=dict)          # N1.. -> ph._Lesion


@dataclass(frozen=True)
class _Cut:
    """A primitive with a slab of half-width ``half`` (nominal mm) removed across the in-plane
    direction ``angle`` through ``centre``: what is left of a lesion cut in two."""

    prim: Any
    centre: tuple[float, float, float]
    angle: float
    half: float

    def bbox(self) -> tuple[float, ...]:
        return self.prim.bbox()

    def eval(self, Z: np.ndarray, Y: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inside, depth = self.prim.eval(Z, Y, X)
        u = math.cos(self.angle) * (X - self.centre[0]) + math.sin(self.angle) * (Y - self.centre[1])
        return inside & (np.abs(u) > self.half), depth


def _split(plan: Any, lesion: Any) -> Any:
    """The lesion with a slab :data:`GAP_MM` wide cut out across its main lobe's longer in-plane axis
    through its centre: two pieces, each a part of the lesion as it was (so a tracker sees one lesion
    become two, both on its footprint)."""
    p = lesion.prims[0]
    a = p.angle if p.r[0] >= p.r[1] else p.angle + math.pi / 2
    half = GAP_MM / 2 / plan.frame.mm_xy
    return ph._Lesion([_Cut(q, tuple(p.c), a, half) for q in lesion.prims], lesion.hu, lesion.diffuse)


def _bone_at(plan: Any, bones: np.ndarray, point: tuple[float, float, float]) -> int:
    """The bone code of t0's voxel nearest a plan point (nominal mm)."""
    f = plan.frame
    return int(bones[tuple(int(np.argmin(np.abs(axis - v))) for axis, v in zip((f.z, f.y, f.x), point[::-1]))])


def _ellipsoid(plan: Any, centre: tuple[float, float, float], radius_mm: float, hu: float) -> Any:
    """A single-ellipsoid lesion of ``radius_mm`` physical mm (round in physical space)."""
    f = plan.frame
    r = radius_mm / f.mm_xy
    return ph._Lesion([ph._Ellipsoid(tuple(float(v) for v in centre), (r, r, radius_mm / f.mm_z))], hu, diffuse=False)


def _design(plan: Any, seed: int, bones: np.ndarray, scenario: Scenario) -> _Roles:
    """The t0 lesions of a timeline patient (module docstring), deterministically from ``seed``: the
    plan's lesions are replaced by the designed ones (in order A, B, C, S) and the background ones;
    new lesions are returned, not placed."""
    roles = _Roles()
    if not plan.lesions:
        return roles
    rng = np.random.default_rng([int(seed), 0x71AE])
    f = plan.frame
    words = [w.split()[1] for scan in scenario.events for w in scan]
    # the new lesions first (the rule's states rest on them), then the roles it is easiest to lack
    wanted = sorted({w for w in words if w.startswith("N")}) + [r for r in ("S", "C", "A", "B") if r in words]
    sites = [s for s in plan.sites if ph._in_scan(plan, s[2]) and s[1] in DESIGN_BONES]
    margin = Z_MARGIN_MM / f.mm_z
    centres: list[np.ndarray] = []
    designed: dict[str, Any] = {}
    for role in wanted:
        for _ in range(300):
            if not sites:
                break
            _, _, bone = sites[int(rng.integers(len(sites)))]
            centre, fit = ph._site_point(bone, rng, spread=0.3)
            radius = ROLE_RADIUS_MM.get(role) or float(rng.uniform(*NEW_RADIUS_MM))
            point = nominal_mm(plan, centre)
            if (f.z[0] + margin <= centre[2] <= f.z[-1] - margin and fit * f.mm_xy >= 0.8 * radius
                    and _bone_at(plan, bones, centre) in DESIGN_BONES
                    and all(np.linalg.norm(point - c) >= ISOLATION_MM for c in centres)):
                hu = float(np.clip(rng.normal(690, 100), 500, 950))
                designed[role] = _ellipsoid(plan, centre, radius, hu)
                centres.append(point)
                break
    background = []
    for les in sorted(plan.lesions, key=lambda les: -max(les.prims[0].r[:2])):
        point = nominal_mm(plan, les.prims[0].c)
        if (len(background) < BACKGROUND and not les.diffuse
                and max(les.prims[0].r[:2]) * f.mm_xy >= BACKGROUND_MIN_MM
                and _bone_at(plan, bones, les.prims[0].c) != ph.RIB
                and all(np.linalg.norm(point - c) >= ISOLATION_MM for c in centres)):
            background.append(les)
            centres.append(point)
    plan.lesions[:] = [designed[r] for r in ("A", "B", "C", "S") if r in designed] + background
    roles.lesion = {r: i for i, r in enumerate(r for r in ("A", "B", "C", "S") if r in designed)}
    roles.new = {r: les for r, les in designed.items() if r.startswith("N")}
    return roles


@dataclass
class _Edit:
    """The plan edit for scan ``k``: the scenario's events up to ``k`` applied to the t0 plan."""

    scenario: Scenario
    k: int
    seed: int
    bones: np.ndarray
    roles: _Roles | None = None
    applied: list[tuple[str, str]] = field(default_factory=list)   # (verb, role) of scan k's own events
    probes: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)  # role -> nominal points
    frame: Any = None

    def __call__(self, plan: Any) -> None:
        roles = self.roles = _design(plan, self.seed, self.bones, self.scenario)
        self.frame = plan.frame
        scale: dict[str, float] = {}
        gone: set[str] = set()
        split: set[str] = set()
        born: list[str] = []
        for j in range(1, self.k + 1):  # t0 has no events
            for word in self.scenario.events[j]:
                verb, role = word.split()
                if role not in roles.lesion and role not in roles.new:
                    continue
                if j == self.k:
                    self.applied.append((verb, role))
                if verb == "grow":
                    scale[role] = GROW
                elif verb == "shrink":
                    scale[role] = SHRINK
                elif verb == "resolve":
                    gone.add(role)
                elif verb == "reappear":
                    gone.discard(role)
                elif verb == "split":
                    split.add(role)
                elif verb == "new":
                    born.append(role)
        by_index = {i: r for r, i in roles.lesion.items()}
        lesions = []
        for i, les in enumerate(plan.lesions):
            role = by_index.get(i)
            if role in gone:
                continue
            if role in split:
                les = _split(plan, les)
            elif role in scale:
                les = scaled_lesion(les, scale[role])
            lesions.append(les)
            if role is not None:
                self.probes[role] = _probe_points(les, role in split, plan)
        for role in born:
            lesions.append(roles.new[role])
            self.probes[role] = [tuple(roles.new[role].prims[0].c)]
        plan.lesions[:] = lesions


def _probe_points(lesion: Any, split: bool, plan: Any) -> list[tuple[float, float, float]]:
    """Where to find a lesion (nominal mm): its main lobe's centre; a split lesion's two pieces,
    half-way between the cut and the lobe's edge on either side."""
    if not split:
        return [tuple(lesion.prims[0].c)]
    cut = lesion.prims[0]
    r = max(cut.prim.r[:2])
    d = (cut.half + r) / 2
    return [(cut.centre[0] + s * d * math.cos(cut.angle), cut.centre[1] + s * d * math.sin(cut.angle), cut.centre[2])
            for s in (-1.0, 1.0)]


@dataclass(frozen=True)
class TimelineCase:
    """One phantom patient's timeline and its truth.

    Attributes:
        scenario: its :class:`Scenario` (``none`` for a lesion-free patient).
        dates: the scans' dates.
        scans: scans t0, t1, ...: ``(ct, label, bones, geometry, orientation, motion)``, each on its
            own grid; the motion maps t0 LPS mm to the scan's (t0: the identity).
        tracking: the truth tracks (exact motion).
        states: the truth PCWG3 states.
        schedule: rows of :data:`SCHEDULE_COLUMNS` but ``case``.
    """

    scenario: Scenario
    dates: list[dt.date]
    scans: list[tuple[np.ndarray, np.ndarray, np.ndarray, Geometry, str, sitk.Euler3DTransform]]
    tracking: Tracking
    states: list[str]
    schedule: list[dict[str, Any]]


def _placed(label: np.ndarray, geometry: Geometry, reference: Geometry, to_scan: sitk.Transform,
            first: bool = False) -> PlacedScan:
    """A scan's lesions placed on t0's grid through the exact motion (t0 -> scan LPS mm)."""
    lesions = scan_lesions(label, geometry)
    moved = resample_onto(lesions.labels.astype(np.uint32), geometry, reference, to_scan, labels=True)
    inverse = to_scan.GetInverse()
    cents = np.array([inverse.TransformPoint(tuple(float(v) for v in c)) for c in lesions.centroid_mm]).reshape(-1, 3)

    def forward(points: np.ndarray) -> np.ndarray:
        return np.array([to_scan.TransformPoint(tuple(float(v) for v in p)) for p in points]).reshape(-1, 3)

    sees = None if first else field_of_view(reference, geometry, forward)
    return PlacedScan(moved.astype(np.uint32), cents, lesions.volume_ml, sees)


def _probe_track(placed: PlacedScan, steps: list, frame: Any, point: tuple[float, float, float]) -> int | None:
    """The truth track whose lesion lies at a plan point (nominal mm) on t0's grid, or nearest within 3 voxels."""
    idx = [int(np.argmin(np.abs(axis - v))) for axis, v in zip((frame.z, frame.y, frame.x), point[::-1])]
    moved = placed.moved
    for r in range(4):
        box = moved[tuple(slice(max(0, i - r), i + r + 1) for i in idx)]
        ids = box[box > 0]
        if ids.size:
            lesion = int(np.bincount(ids).argmax())
            return next((s.track for s in steps if lesion in s.lesions), None)
    return None


def generate_timeline(seed: int, baseline: ph.PhantomCase, scenario: Scenario, *, timepoints: int, index: int = 0,
                      include_head: bool | None = None, lesion_free: bool | None = None) -> TimelineCase:
    """The timeline of phantom patient ``seed`` whose t0 is ``baseline``.

    Args:
        seed: the patient's seed (:func:`analysis.cohort.phantom.case_seed`).
        baseline: ``generate_case(seed, ...)`` with the same ``include_head``/``lesion_free``.
        scenario: the schedule (:data:`SCENARIOS`, or :data:`NO_EVENTS`).
        timepoints: scans including t0 (2 .. :data:`MAX_TIMEPOINTS`).
        index: the patient's index (picks the storage variants in turn).
        include_head, lesion_free: as given to :func:`~analysis.cohort.phantom.generate_case`.
    """
    g0 = baseline.geometry
    lo, hi = physical_box(g0)
    rng = np.random.default_rng([int(seed), 0x71AE, 1])
    dates = [scan_date(scenario, k) for k in range(timepoints)]
    identity = sitk.Euler3DTransform()
    placed, scans, edits = [], [], []
    for k in range(timepoints):
        edit = _Edit(scenario, k, seed, baseline.bones)
        frame = ph.generate_case(seed, g0.shape, g0.spacing, include_head=include_head, lesion_free=lesion_free,
                                 edit=edit)
        if k == 0:
            scans.append((frame.ct, frame.label, frame.bones, g0, "LPS", identity))
            placed.append(_placed(frame.label, g0, g0, identity, first=True))
            edits.append(edit)
            continue
        motion = random_motion(rng, (lo + hi) / 2)
        orientation, factors = VARIANTS[(index + k) % len(VARIANTS)]
        grid = followup_grid(g0, orientation, factors)
        back = motion.GetInverse()
        ct = np.clip(np.rint(resample_onto(frame.ct, g0, grid, back, labels=False)), ph.HU_MIN,
                     ph.HU_MAX).astype(np.int16)
        label = (resample_onto(frame.label, g0, grid, back, labels=True) > 0).astype(np.uint8)
        bones = resample_onto(frame.bones, g0, grid, back, labels=True).astype(np.uint8)
        scans.append((ct, label, bones, grid, orientation, motion))
        placed.append(_placed(label, grid, g0, motion))
        edits.append(edit)
        del frame
    tracking = track_lesions(placed, min_lesion_ml=0.0)  # the phantom's own changes, any size
    states = [s.state for s in pcwg3_tracks(dates, tracking, min_lesion_ml=0.0)]
    schedule = []
    for k, edit in enumerate(edits):
        for verb, role in edit.applied:
            tracks = {_probe_track(placed[k], tracking.steps[k], edit.frame, p) for p in edit.probes.get(role, [])}
            if verb == "resolve":  # gone at k: the track that held it at k-1
                points = edits[k - 1].probes.get(role, [])
                tracks = {_probe_track(placed[k - 1], tracking.steps[k - 1], edit.frame, p) for p in points}
            tracks.discard(None)
            schedule.append({"scenario": scenario.name, "scan": k, "event": verb, "role": role,
                             "track": ";".join(str(t) for t in sorted(tracks))})
    return TimelineCase(scenario=scenario, dates=dates, scans=scans, tracking=tracking, states=states,
                        schedule=schedule)


def intended_states(scenario: Scenario) -> list[str]:
    """The PCWG3 states ``scenario`` is built to give over all its scans, as the rule writes them
    (``progression (tK)`` becomes ``progression (tK's date)``)."""
    out = []
    for state in scenario.states:
        if state.startswith("progression (t"):
            k = int(state[len("progression (t"):-1])
            state = f"progression ({scan_date(scenario, k).isoformat()})"
        out.append(state)
    return out


class Timelines:
    """The companion of :func:`analysis.cohort.phantom.generate_cohort` that writes the timelines
    (see the module docstring for the layout).

    Args:
        timepoints: scans per patient including t0 (2 .. :data:`MAX_TIMEPOINTS`).
    """

    def __init__(self, timepoints: int) -> None:
        if not 2 <= int(timepoints) <= MAX_TIMEPOINTS:
            raise ValueError(f"timepoints {timepoints}: expected 2 to {MAX_TIMEPOINTS}")
        self.timepoints = int(timepoints)
        self.scans: list[dict[str, Any]] = []
        self.truth: list[dict[str, Any]] = []
        self.schedule: list[dict[str, Any]] = []
        self.cases = 0
        self.with_lesions = 0

    def add(self, root: Path, case: str, seed: int, include_head: bool, lesion_free: bool,
            baseline: ph.PhantomCase) -> None:
        if baseline.label.any():
            scenario = SCENARIOS[self.with_lesions % len(SCENARIOS)]
            self.with_lesions += 1
        else:
            scenario = NO_EVENTS
        tc = generate_timeline(seed, baseline, scenario, timepoints=self.timepoints, index=self.cases,
                               include_head=include_head, lesion_free=lesion_free)
        self.cases += 1
        for k, (ct, label, bones, grid, orientation, motion) in enumerate(tc.scans):
            cohort = Cohort(scan_folder(root, k))
            write_array(ct, grid, cohort.image_path(case))
            write_array(label, grid, cohort.label_path(case))
            write_array(bones, grid, cohort.bones_path(case))
        for k, (_, _, _, grid, orientation, motion) in enumerate(tc.scans):
            row = motion_row(case, orientation, grid, motion)
            self.scans.append({"case": case, "scan": k, "date": tc.dates[k].isoformat(), "scenario": tc.scenario.name,
                               "state": tc.states[k], **{c: row[c] for c in TRANSFORM_COLUMNS[1:]}})
        for k, steps in enumerate(tc.tracking.steps):
            self.truth += [{"case": case, "scan": k, "track": s.track, "present": int(s.present),
                            "volume_ml": s.volume_ml, "status": s.status or "", "event": s.event,
                            "lesion_ids": ";".join(map(str, s.lesions))} for s in steps]
        self.schedule += [{"case": case, **row} for row in tc.schedule]

    def finish(self, root: Path) -> None:
        for k in range(self.timepoints):
            write_dataset_json(scan_folder(root, k), self.cases,
                               description=f"{ph.PHANTOM_DESCRIPTION}: timeline scan t{k}")
        atomic_write_text(Path(root) / SCANS_CSV, csv_text(SCAN_COLUMNS, self.scans))
        atomic_write_text(Path(root) / TRUTH_CSV, csv_text(TRUTH_COLUMNS, self.truth))
        atomic_write_text(Path(root) / SCHEDULE_CSV, csv_text(SCHEDULE_COLUMNS, self.schedule))
