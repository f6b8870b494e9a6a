"""``timeline``: a patient's CTs over time as one set of lesion tracks, with the PCWG3 bone rule.

Steps (definitions in :mod:`analysis.monitoring.tracking`, :mod:`analysis.monitoring.pcwg3` and
:mod:`analysis.monitoring.registration`):

1. the CTs (any form ``predict --images`` takes) in date order, their dates (DICOM StudyDate, or
   ``dates``), refused with one line when a date is missing, the dates are not strictly increasing or
   two DICOM series name different patients (PatientID, and IssuerOfPatientID when both carry one);
   masks given (each checked against its CT's geometry) or predicted by a model wing;
2. every scan registered rigidly and **directly to the first** (:data:`REGISTRATION_SCHEME`): each
   registration is the same two-scan problem ``followup`` solves and checks (bone Dice), errors do not
   add up along a chain, one scan that fails to align does not misplace the scans after it, and adding
   a scan never changes the registrations (hence the tracks) of the scans before it;
3. each scan's lesions placed in the first scan's frame and tracked
   (:class:`analysis.monitoring.tracking.Tracker`), one scan at a time, its registered CT drawn as its
   preview and then released (memory: about one scan and the first);
4. the PCWG3 state of every scan (:func:`analysis.monitoring.pcwg3.pcwg3_tracks`), the tables, the
   figure, the HTML page and the record, written atomically into OUT.

OUT holds ``timeline.csv`` (:data:`TIMELINE_COLUMNS`, one row per scan), ``tracks.csv``
(:data:`TRACK_COLUMNS`, one row per track and scan), ``timeline.png``
(:mod:`analysis.monitoring.timeline_figures`), ``preview_tK.png`` per scan, ``index.html`` and
``timeline.json`` (inputs with sha256 and dates, registrations, settings, definitions, the rule,
versions, seconds).
"""
from __future__ import annotations

import datetime as dt
import html
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from analysis.errors import InputError
from analysis.imaging.inputs import InputCase
from analysis.imaging.io import atomic_directory, atomic_write_json, atomic_write_text, check_output_folder
from analysis.imaging.records import csv_text, versions
from analysis.lesions import INDETERMINATE, NEW, RESOLVED, STABLE
from analysis.monitoring.followup import (
    FollowupSettings,
    Predictor,
    Scan,
    definitions as followup_definitions,
    lesion_bones,
    load_scan,
    one_case,
    place,
)
from analysis.monitoring.matching import scan_lesions
from analysis.monitoring.pcwg3 import Pcwg3Rule, TimePointState, pcwg3_tracks
from analysis.monitoring.registration import Registration, identity
from analysis.monitoring.timeline_dicom import track_uid, write_study_report, write_study_seg
from analysis.monitoring.timeline_figures import STATUS_NUMBERS, write_scan_preview, write_timeline_figure
from analysis.monitoring.tracking import PlacedScan, Tracker, TrackStep, field_of_view
from analysis.prediction.folder import mask_path, model_fields, read_record

log = logging.getLogger(__name__)

__all__ = ["TimelineSettings", "run_timeline", "TIMELINE_COLUMNS", "TRACK_COLUMNS", "REGISTRATION_SCHEME",
           "scan_date", "parse_date"]

TIMELINE_COLUMNS = ("scan", "date", "study", "lesions", "new", "resolved", "total_ml", "state", "reference", "note")
TRACK_COLUMNS = ("track", "scan", "date", "present", "volume_ml", "status", "bone", "lesion_ids", "event")
OUTPUTS = ("timeline.csv", "tracks.csv", "timeline.png", "index.html", "timeline.json")
REGISTRATION_SCHEME = (
    "each scan registered directly to the first (not chained scan to scan): every registration is the two-scan "
    "problem followup solves and checks, errors do not accumulate along a chain, a scan that fails to align "
    "misplaces no other, and a scan added later leaves the registrations and tracks of the earlier ones unchanged")


@dataclass(frozen=True)
class TimelineSettings(FollowupSettings):
    """``followup``'s thresholds and registration (its ``min_lesion_ml``: new or resolved tracks below it
    are ``indeterminate`` and never count as new lesions for PCWG3) and the PCWG3 rule's settings.

    Attributes:
        min_new, min_additional, min_persist, interval_days: :class:`analysis.monitoring.pcwg3.Pcwg3Rule`.
    """

    min_new: int = Pcwg3Rule.min_new
    min_additional: int = Pcwg3Rule.min_additional
    min_persist: int = Pcwg3Rule.min_persist
    interval_days: int = Pcwg3Rule.interval_days

    @property
    def rule(self) -> Pcwg3Rule:
        return Pcwg3Rule(self.min_new, self.min_additional, self.min_persist, self.interval_days)

    def check(self) -> None:
        """Raise :class:`InputError` (naming the option) for an out-of-range value."""
        super().check()
        for option, value in (("--pcwg3-new", self.min_new), ("--pcwg3-additional", self.min_additional),
                              ("--pcwg3-persist", self.min_persist)):
            if value < 1:
                raise InputError(f"{option} {value}: expected a count >= 1")
        if self.interval_days < 0:
            raise InputError(f"--pcwg3-interval-days {self.interval_days}: expected >= 0 days")


def parse_date(text: str, what: str) -> dt.date:
    """A date written ``YYYY-MM-DD`` or DICOM's ``YYYYMMDD``.

    Raises:
        InputError: anything else (naming ``what``).

    >>> parse_date("2026-03-01", "--dates"), parse_date("20260301", "StudyDate")
    (datetime.date(2026, 3, 1), datetime.date(2026, 3, 1))
    """
    t = text.strip()
    try:
        if len(t) == 8 and t.isdigit():
            return dt.date(int(t[:4]), int(t[4:6]), int(t[6:]))
        return dt.date.fromisoformat(t)
    except ValueError:
        raise InputError(f"{what} {text!r}: expected a date YYYY-MM-DD") from None


def _header(case: InputCase):
    import pydicom

    return pydicom.dcmread(case.series.files[0], stop_before_pixels=True)


def scan_date(case: InputCase) -> dt.date | None:
    """The StudyDate of a DICOM case (None for an image file or a series without one).

    Raises:
        InputError: a StudyDate that is not a date.
    """
    if case.series is None:
        return None
    value = str(_header(case).get("StudyDate", "") or "").strip()
    return parse_date(value, f"{case.path}: StudyDate") if value else None


def _patient(case: InputCase) -> tuple[str, str]:
    if case.series is None:
        return "", ""
    ds = _header(case)
    return str(ds.get("PatientID", "") or ""), str(ds.get("IssuerOfPatientID", "") or "")


def _check_inputs(cases: Sequence[InputCase], dates: Sequence[str] | None) -> tuple[list[dt.date], list[str]]:
    """The scans' dates (and where each came from); refuses missing or unordered dates and two patients."""
    if dates is not None and len(dates) != len(cases):
        raise InputError(f"--dates: {len(dates)} dates for {len(cases)} CTs; expected one per CT, in the same order")
    out, sources = [], []
    for k, case in enumerate(cases):
        if dates is not None:
            out.append(parse_date(dates[k], "--dates"))
            sources.append("--dates")
            continue
        found = scan_date(case)
        if found is None:
            why = "an image file carries none" if case.series is None else "the series has none"
            raise InputError(f"{case.path}: no StudyDate ({why}); give every CT's date with --dates YYYY-MM-DD,...")
        out.append(found)
        sources.append("StudyDate")
    for k in range(1, len(out)):
        if not out[k] > out[k - 1]:
            raise InputError(f"{cases[k].path}: dated {out[k]}, not after the CT before it ({cases[k - 1].path}, "
                             f"{out[k - 1]}); expected the CTs in strictly increasing date order")
    first = None
    for case in cases:
        who = _patient(case)
        if not who[0]:
            continue
        if first is None:
            first = (case, who)
        elif who[0] != first[1][0] or (who[1] and first[1][1] and who[1] != first[1][1]):
            raise InputError(f"{case.path}: patient {who[0]!r}{f' ({who[1]})' if who[1] else ''} differs from "
                             f"{first[1][0]!r}{f' ({first[1][1]})' if first[1][1] else ''} of {first[0].path}; "
                             "expected CTs of one patient")
    return out, sources


def definitions(settings: TimelineSettings) -> dict[str, str]:
    """The definitions ``timeline.json`` carries, with the thresholds filled in."""
    base = followup_definitions(settings)
    return {
        "lesion": base["lesion"], "volume": base["volume"],
        "registration": base["registration"].replace("follow-up onto baseline", "each scan onto the first"),
        "registration_scheme": REGISTRATION_SCHEME,
        "track": "every scan's lesions placed in the first scan's frame; each track's footprint (first-frame voxels "
                 "and centroid at the last scan that showed it) matched to the next scan's lesions with followup's "
                 f"rule (shared voxel, then centroids within {settings.match_mm:g} mm, nearest first, one to one); a "
                 "split keeps the id, a merge continues the oldest id, a lesion back where a track was keeps its "
                 "id; a track with less than half of its footprint in a scan's field of view is 'outside field of "
                 "view' there, not resolved",
        "status": base["status"] + " (against the last scan that saw the track's place; indeterminate: new or "
                  f"resolved below {settings.min_lesion_ml:g} ml)",
        "pcwg3": settings.rule.describe(),
        "new": "timeline.csv's new: lesions new against the scan's PCWG3 reference (t0 for t1, t1 after) that count",
        "resolved": "timeline.csv's resolved: tracks resolved against the previous scan",
    }


@dataclass
class _Placed:
    """One scan after registration and placement, before its images are dropped."""

    placed: PlacedScan
    registration: Registration
    dice: float | None
    registered_ct: np.ndarray
    labels: np.ndarray  # the scan's own lesion ids, its own grid


def _place(first: Scan, scan: Scan, settings: TimelineSettings, where: str, *, is_first: bool) -> _Placed:
    """Register ``scan`` to ``first`` (``followup``'s step and check) and place its lesions in the first
    scan's frame, with the part of that frame the scan's field of view holds."""
    if is_first:
        lesions = scan_lesions(scan.mask, scan.geometry)
        return _Placed(PlacedScan(lesions.labels, lesions.centroid_mm, lesions.volume_ml), identity(), None, first.ct,
                       lesions.labels)
    p = place(first, scan, settings, where=where, against="the first CT")
    sees = field_of_view(first.geometry, scan.geometry, p.registration.to_followup)
    return _Placed(PlacedScan(p.moved, p.centroids, p.lesions.volume_ml, sees), p.registration, p.bone_dice,
                   p.registered_ct, p.lesions.labels)


def _maps(placed: PlacedScan, steps: Sequence[TrackStep], first_scan: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per first-frame voxel: the status code (:data:`STATUS_NUMBERS`) and track id of this scan's lesions."""
    n = placed.n
    codes = np.zeros(n + 1, np.uint8)
    ids = np.zeros(n + 1, np.uint16)
    for s in steps:
        status = "baseline" if first_scan else (s.status or STABLE)
        for j in s.lesions:
            codes[j] = STATUS_NUMBERS[status]
            ids[j] = s.track
    return codes[placed.moved], ids[placed.moved]


def _bones_of(scan: Scan, steps: Sequence[TrackStep]) -> dict[int, str | None]:
    """The bone of each present track at this scan (its largest lesion's), from the scan's bone map."""
    if scan.bones is None:
        return {}
    lesions = scan_lesions(scan.mask, scan.geometry)
    names = lesion_bones(lesions, scan.bones)
    return {s.track: names[max(s.lesions, key=lambda j: lesions.volume_ml[j - 1]) - 1] for s in steps if s.lesions}


def _study(case: InputCase) -> str:
    return str(case.series.study_uid) if case.series is not None else Path(case.path).name


def run_timeline(cts: Sequence[str], out: str | os.PathLike, *, masks: Sequence[str] | None = None,
                 predictor: Predictor | None = None, model: str | None = None, dates: Sequence[str] | None = None,
                 bones: Sequence[str] | None = None, settings: TimelineSettings = TimelineSettings(),
                 series: str | None = None, overwrite: bool = False, sr: bool = False,
                 lesion_uids: Sequence[Mapping[int, str] | None] | None = None, ct_check: bool = True) -> Path:
    """Track a patient's CTs over time and write OUT (see the module docstring).

    Args:
        cts: the CTs in date order (image files or DICOM series folders), at least two.
        out: the folder to write (refused if it exists, unless ``overwrite``).
        masks: lesion masks in the same order, each with its CT's geometry (mask mode).
        predictor: instead of masks, a model wing's ``predict`` (:data:`analysis.monitoring.followup.Predictor`).
        model: what the predictor runs (for the record).
        dates: each CT's date (``YYYY-MM-DD``) instead of DICOM StudyDate.
        bones: bone maps (project codes) in the same order, for tracks.csv's bone column.
        settings: thresholds, registration and the PCWG3 rule.
        series: DICOM: the SeriesInstanceUID to use in folders holding several.
        overwrite: replace an existing OUT.
        sr: also write each follow-up study's SEG and TID 1500 report into ``OUT/dicom/``
            (:mod:`analysis.monitoring.timeline_dicom`); every CT must then be a DICOM series.
        lesion_uids: per CT, ``{lesion id: TrackingUID}`` of the SEG ``predict`` wrote for it (None where
            there is none): a track keeps the UID of its first lesion.
        ct_check: refuse a volume that does not look like CT in Hounsfield units (``followup``'s check).

    Returns:
        OUT.

    Raises:
        InputError: bad inputs (one line naming the file or option), OUT existing, a scan not aligned.
    """
    start = time.perf_counter()
    settings.check()
    out = Path(out)
    check_output_folder(out, overwrite=overwrite, allow_empty=False)
    if len(cts) < 2:
        raise InputError(f"timeline: {len(cts)} CT given; expected at least two CTs of one patient")
    if (predictor is None) == (masks is None):
        raise InputError("timeline: give --model or --nnunet-work, or --masks (one per CT)")
    for name, values in (("--masks", masks), ("--bones", bones)):
        if values is not None and len(values) != len(cts):
            raise InputError(f"{name}: {len(values)} files for {len(cts)} CTs; expected one per CT, in the same order")
    cases = [one_case(p, what=f"t{k}", series=series) for k, p in enumerate(cts)]
    if sr:
        for case in cases:
            if case.series is None:
                raise InputError(f"--sr: {case.path} is not a DICOM series; each study's SEG and report reference "
                                 "its DICOM images (give every CT as a DICOM series folder)")
    when, date_sources = _check_inputs(cases, dates)
    with tempfile.TemporaryDirectory(prefix=".timeline-predict-", dir=out.resolve().parent
                                     if out.resolve().parent.is_dir() else None) as tmp, \
            atomic_directory(out, overwrite=True) as staging:
        model_record = None
        if predictor is not None:
            masks, model_record = _predict_all(predictor, cases, Path(tmp))
        result = _track(cases, masks, bones, when, settings, staging, sr=sr, lesion_uids=lesion_uids,
                        predicted=predictor is not None, ct_check=ct_check)
        states = pcwg3_tracks(when, result["tracker"].tracking, rule=settings.rule,
                              min_lesion_ml=settings.min_lesion_ml)
        _write(staging, cases, when, date_sources, states, result, settings, model=model,
               model_record=model_record, seconds_so_far=time.perf_counter() - start, sr=sr)
    log.info("timeline: wrote %s", out)
    return out


def _predict_all(predictor: Predictor, cases: Sequence[InputCase], tmp: Path) -> tuple[list[str], dict[str, Any]]:
    """Each CT predicted by the wing into its own temporary PRED folder: the masks and the model fields
    of the first prediction record (the same model predicts every scan)."""
    masks, record = [], {}
    for k, case in enumerate(cases):
        folder = tmp / f"t{k}"
        predictor(str(case.path), folder)
        found = mask_path(folder, case.case_id)
        if not found.is_file():
            raise InputError(f"{case.path}: the model wrote no mask for case {case.case_id}")
        masks.append(str(found))
        if not record:
            record = model_fields(read_record(folder))
    return masks, record


def _scan_id(case: InputCase, record: dict[str, Any]) -> str:
    return case.series.series_uid if case.series is not None else f"sha256:{record['sha256'][:32]}"


def _track(cases: Sequence[InputCase], masks: Sequence[str], bones: Sequence[str] | None, when: Sequence[dt.date],
           settings: TimelineSettings, staging: Path, *, sr: bool,
           lesion_uids: Sequence[Mapping[int, str] | None] | None, predicted: bool,
           ct_check: bool) -> dict[str, Any]:
    """Load, register, place, track and preview each scan in turn (the first kept, the others released);
    with ``sr`` also each follow-up study's SEG (its tracks known once the scan is tracked)."""
    tracker = Tracker(match_mm=settings.match_mm, change=settings.change, min_change_ml=settings.min_change_ml,
                      min_lesion_ml=settings.min_lesion_ml)
    records, registrations, seconds, track_bones, segs, anchors = [], [], [], [], {}, {}
    uids: dict[int, str] = {}
    first: Scan | None = None
    for k, case in enumerate(cases):
        t0 = time.perf_counter()
        scan = load_scan(case, masks[k], bones[k] if bones else None, what=f"t{k}", ct_check=ct_check)
        if predicted:  # the mask lived in a temporary PRED folder (as followup records it)
            scan.record["mask"] = "predicted"
        if first is None:
            first = scan
        t_read = time.perf_counter()
        p = _place(first, scan, settings, str(case.path), is_first=k == 0)
        t_place = time.perf_counter()
        steps = tracker.add(p.placed)
        for st in steps:  # a track keeps the UID of the lesion it was first seen as
            if st.present and st.track not in uids:
                uids[st.track] = track_uid(_scan_id(case, scan.record), min(st.lesions),
                                           lesion_uids[k] if lesion_uids else None)
        if sr and k:
            lut = np.zeros(p.placed.n + 1, np.uint32)
            for st in steps:
                lut[list(st.lesions)] = st.track
            seed = f"{case.series.series_uid}|timeline|{scan.record['sha256'][:32]}"
            segs[k], anchors[k] = write_study_seg(_dicom_dir(staging), k, case.series, lut[p.labels], uids, seed=seed)
        t_track = time.perf_counter()
        codes, numbers = _maps(p.placed, steps, k == 0)
        present = [s for s in steps if s.present]
        small = sum(s.status == INDETERMINATE for s in steps)
        title = (f"t{k} {when[k].isoformat()}\n{len(present)} tracked lesion(s), "
                 f"{sum(s.status == NEW for s in steps)} new, {sum(s.status == RESOLVED for s in steps)} resolved"
                 + (f", {small} indeterminate" if small else ""))
        write_scan_preview(staging / f"preview_t{k}.png", p.registered_ct, first.geometry, codes, numbers, title=title)
        track_bones.append(_bones_of(scan, steps))
        records.append(scan.record)
        registrations.append(None if k == 0 else {**p.registration.to_json(), "to": "t0", "direct": True,
                                                  "bone_dice": round(p.dice, 6)})
        seconds.append({"scan": k, "reading": round(t_read - t0, 3), "registration": round(p.registration.seconds, 3),
                        "placement": round(t_place - t_read - p.registration.seconds, 3),
                        "tracking_and_seg": round(t_track - t_place, 3),
                        "preview": round(time.perf_counter() - t_track, 3),
                        "total": round(time.perf_counter() - t0, 3)})
        if k:
            del scan
    return {"tracker": tracker, "records": records, "registrations": registrations, "seconds": seconds,
            "bones": track_bones, "uids": uids, "segs": segs, "anchors": anchors}


def _dicom_dir(staging: Path) -> Path:
    folder = staging / "dicom"
    folder.mkdir(exist_ok=True)
    return folder


def _rows(when: Sequence[dt.date], cases: Sequence[InputCase], steps: Sequence[Sequence[TrackStep]],
          states: Sequence[TimePointState], bones: Sequence[dict[int, str | None]]
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    scans, tracks = [], []
    for k, (scan_steps, state) in enumerate(zip(steps, states)):
        present = [s for s in scan_steps if s.present]
        scans.append({"scan": k, "date": when[k], "study": _study(cases[k]),
                      "lesions": sum(len(s.lesions) for s in present),
                      "new": len(state.new), "resolved": sum(s.status == RESOLVED for s in scan_steps),
                      "total_ml": float(sum(s.volume_ml for s in present)), "state": state.state,
                      "reference": "" if state.reference is None else f"t{state.reference}", "note": state.note})
        for s in scan_steps:
            tracks.append({"track": s.track, "scan": k, "date": when[k], "present": int(s.present),
                           "volume_ml": s.volume_ml, "status": s.status or "", "bone": bones[k].get(s.track),
                           "lesion_ids": ";".join(map(str, s.lesions)), "event": s.event})
    return scans, tracks


def _write_reports(staging: Path, cases: Sequence[InputCase], scans: Sequence[dict[str, Any]],
                   steps: Sequence[Sequence[TrackStep]], result: dict[str, Any]) -> dict[str, Any]:
    """Each follow-up study's TID 1500 report (its SEG is already written)."""
    out = {}
    for k in range(1, len(cases)):
        rows = [{"track": s.track, "tracking_uid": result["uids"][s.track], "status": s.status,
                 "volume_ml": s.volume_ml, "previous_ml": s.previous_ml, "bone": result["bones"][k].get(s.track)}
                for s in steps[k] if s.present or (s.status is not None)]
        seg = result["segs"][k]
        record = cases[k].series
        sr = write_study_report(_dicom_dir(staging), k, record, rows=rows, summary=scans[k],
                                date=scans[k]["date"].isoformat(),
                                seg_path=_dicom_dir(staging) / seg["path"] if seg["written"] else None,
                                anchors=result["anchors"][k],
                                seed=f"{record.series_uid}|timeline-sr|{result['records'][k]['sha256'][:32]}")
        out[f"t{k}"] = {"seg": seg, "sr": sr}
    return out


def _html(scans: Sequence[dict[str, Any]], tracks: Sequence[dict[str, Any]], settings: TimelineSettings) -> str:
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in TIMELINE_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{e(_cell(r[c]))}</td>" for c in TIMELINE_COLUMNS) + "</tr>" for r in scans)
    thead = "".join(f"<th>{e(c)}</th>" for c in TRACK_COLUMNS)
    tbody = "".join("<tr>" + "".join(f"<td>{e(_cell(r[c]))}</td>" for c in TRACK_COLUMNS) + "</tr>"
                    for r in tracks if r["present"] or r["status"] or r["event"] not in ("absent",))
    previews = "".join(f'<figure><img src="preview_t{r["scan"]}.png" alt="t{r["scan"]}" height="480">'
                       f'<figcaption>t{r["scan"]} {e(_cell(r["date"]))}: {e(r["state"])}</figcaption></figure>'
                       for r in scans)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Timeline</title><style>"
            "body{font-family:sans-serif;margin:16px}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #bbb;padding:2px 6px}figure{display:inline-block;margin:4px}"
            "figure img{background:#000}</style></head><body>\n"
            f"<h1>Timeline: {len(scans)} CTs, {len({r['track'] for r in tracks})} lesion tracks</h1>\n"
            f"<p>{e(settings.rule.describe())}. Registration: {e(REGISTRATION_SCHEME)}.</p>\n"
            f'<img src="timeline.png" alt="timeline"><h2>Scans</h2><table><tr>{head}</tr>{body}</table>\n'
            f"<h2>Each scan in the first scan's frame (coronal MIP, tracks numbered)</h2>{previews}\n"
            f"<h2>Tracks</h2><table><tr>{thead}</tr>{tbody}</table>\n</body></html>\n")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)


def _write(staging: Path, cases: Sequence[InputCase], when: Sequence[dt.date], date_sources: Sequence[str],
           states: Sequence[TimePointState], result: dict[str, Any], settings: TimelineSettings, *,
           model: str | None, model_record: dict[str, Any] | None, seconds_so_far: float, sr: bool) -> None:
    t0 = time.perf_counter()
    tracking = result["tracker"].tracking
    scans, tracks = _rows(when, cases, tracking.steps, states, result["bones"])
    dicom = _write_reports(staging, cases, scans, tracking.steps, result) if sr else None
    atomic_write_text(staging / "timeline.csv", csv_text(TIMELINE_COLUMNS, scans))
    atomic_write_text(staging / "tracks.csv", csv_text(TRACK_COLUMNS, tracks))
    write_timeline_figure(staging / "timeline.png", scans, tracks)
    atomic_write_text(staging / "index.html", _html(scans, tracks, settings))
    events = [(s.track, k, s.event) for k, steps in enumerate(tracking.steps) for s in steps]
    inputs = [{**rec, "date": when[k].isoformat(), "date_source": date_sources[k], "study": _study(cases[k])}
              for k, rec in enumerate(result["records"])]
    record = {
        "command": "timeline",
        "inputs": inputs,
        "registration_scheme": REGISTRATION_SCHEME,
        "registrations": result["registrations"],
        "settings": asdict(settings),
        "definitions": definitions(settings),
        "states": [{"scan": s.index, "date": s.date.isoformat(), "state": s.state, "reference": s.reference,
                    "new": list(s.new), "confirms": s.confirms, "note": s.note} for s in states],
        "tracks": sorted(tracking.tracks),
        "splits": sorted({(t, k) for t, k, e in events if e in ("split", "split-merge")}),
        "merges": [{"track": t, "scan": k, "into": into} for t, (k, into) in sorted(tracking.merged.items())],
        "reappeared": sorted({(t, k) for t, k, e in events if e == "reappeared"}),
        "tracking_uids": {str(t): u for t, u in sorted(result["uids"].items())},
        "model": None if model is None else {"model": model, "predict": model_record},
        "dicom": dicom,
        "outputs": [*OUTPUTS, *(f"preview_t{k}.png" for k in range(len(cases))),
                    *(f"dicom/{r[part]['path']}" for r in (dicom or {}).values() for part in ("seg", "sr")
                      if r[part]["written"])],
        "versions": versions(core=True),
        "seconds": {"scans": result["seconds"], "writing": round(time.perf_counter() - t0, 3),
                    "total": round(seconds_so_far + time.perf_counter() - t0, 3)},
    }
    atomic_write_json(staging / "timeline.json", record)
