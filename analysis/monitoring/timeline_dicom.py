"""``timeline --sr``: per follow-up study, a DICOM SEG of its tracked lesions and a TID 1500 report.

For each scan tk, k >= 1, given as a DICOM series:

- ``dicom/tK_seg.dcm``: a DICOM SEG of tk's series (:func:`analysis.imaging.dicom_seg.write_dicom_seg`)
  with one segment per track that has a lesion at tk: label "bone metastasis T", TrackingID "lesion T"
  and the **track's TrackingUID**, T the track id of ``tracks.csv``;
- ``dicom/tK_sr.dcm``: a Comprehensive 3D SR, TID 1500, in tk's study, read back with highdicom before
  it is moved into place, laid out as predict's and followup's reports are so that OHIF Viewer draws
  it (:mod:`analysis.imaging.dicom_sr`): per track present at tk, two groups sharing the track's
  tracking identifier and UID (the segment's), a TID 1410 planar group (the track's outline on tk's
  CT slice of its largest axial cross-section, with its long and short axis there) and a TID 1411
  volumetric group referencing its segment, with the Volume at tk (SCT, UCUM cm3), the volume at the
  previous scan that saw it, the change in cm3 and %, the status as a qualitative evaluation
  (``followup``'s codes, :data:`analysis.monitoring.followup_sr.STATUS_VALUES`: SNOMED CT New finding /
  Increase in size / Decrease in size / No change / Indeterminate, private Resolved) and the finding
  site; both with a TID 1502 time point context (``tK``, the scan's date as its identifier; no
  order, a NUM OHIF would list among the lesion's values). In the document-level Qualitative
  Evaluations container (groups without image coordinates make OHIF fail): the number of lesions,
  the total volume, the new lesions against the PCWG3 reference, the resolved ones (TEXT) and the
  **PCWG3 state** of tk (CODE, private scheme ``99BONEMETS``: no standard code exists for the rule's
  states), and one TEXT item per track that has no lesion at tk but a status (resolved, or
  indeterminate when it was below the minimum size), naming its identifier and UID: nothing of tk's
  images to draw it on.

**One identity per track across studies**: a track's TrackingUID is the UID its first lesion had where
the track was first seen: the TrackingUID of that lesion's segment in the SEG ``predict`` wrote for that
scan when it is given (the node passes them, so the report of a study seen alone and the timeline
reports of later studies agree), else one derived from that scan's SeriesInstanceUID and the lesion's
id. The identifier is "lesion T". So every report of a patient's timeline names a lesion the same way.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from analysis import __version__
from analysis.errors import InputError
from analysis.imaging.dicom import DicomSeries
from analysis.imaging.dicom_seg import PROPERTY_TYPE, result_uid, write_dicom_seg
from analysis.imaging.dicom_sr import (
    CM3,
    LONG_AXIS,
    MM,
    RTOL,
    SHORT_AXIS,
    TOTAL_VOLUME,
    VOLUME,
    Anchor,
    finding_site,
    measurement_value,
    number_text,
    observer,
    planar_group,
    read_evaluations,
    read_groups,
    read_number,
    read_outline,
    read_seg,
    referenced_segment,
    report_evidence,
    report_identity,
    save_report,
    text_item,
)
from analysis.lesions import CrossSection, cross_sections, lesion_table
from analysis.lesions.change import STATUSES
from analysis.monitoring.followup_dicom import segment_labels
from analysis.monitoring.followup_sr import PRIVATE_SCHEME, STATUS, STATUS_VALUES

log = logging.getLogger(__name__)

__all__ = ["ALGORITHM", "seg_name", "sr_name", "write_study_seg", "write_study_report", "read_timeline_report",
           "STATE", "STATE_CODES", "ABSENT_TRACK", "track_uid"]

ALGORITHM = "bonemets timeline"
#: Status values: followup's (:data:`analysis.monitoring.followup_sr.STATUS_VALUES`, one per
#: :data:`analysis.lesions.change.STATUSES`, ``indeterminate`` included).
TIMELINE_STATUS_CODES = {name: STATUS_VALUES[name] for name in STATUSES}
PREVIOUS_VOLUME = hd.sr.CodedConcept("PRVOLUME", PRIVATE_SCHEME, "Volume at previous scan")
PREVIOUS_CHANGE = hd.sr.CodedConcept("PRVOLCHANGE", PRIVATE_SCHEME, "Volume change since previous scan")
PREVIOUS_RELATIVE = hd.sr.CodedConcept("PRRELCHANGE", PRIVATE_SCHEME, "Relative volume change since previous scan")
NEW_COUNT = hd.sr.CodedConcept("PCWG3NEWN", PRIVATE_SCHEME, "Number of new lesions against the PCWG3 reference scan")
RESOLVED_COUNT = hd.sr.CodedConcept("NRESOLVED", PRIVATE_SCHEME, "Number of resolved lesions")
#: The PCWG3 bone state of the scan (:mod:`analysis.monitoring.pcwg3`).
STATE = hd.sr.CodedConcept("PCWG3STATE", PRIVATE_SCHEME, "PCWG3 bone progression state")
STATE_CODES = {"baseline": "BASELINE", "no progression": "NOPROG", "unconfirmed": "UNCONFIRMED",
               "progression": "PROGRESSION", "not confirmed (flare)": "NOTCONFIRMED", "not evaluable": "NOTEVAL"}
#: A track with a status but no lesion at this scan (resolved, or indeterminate below the minimum
#: size): a TEXT item of the Qualitative Evaluations container, as followup's OUTSIDE_BASELINE.
ABSENT_TRACK = hd.sr.CodedConcept("TRACKABSENT", PRIVATE_SCHEME, "Tracked lesion without a lesion at this scan")
_TIME_POINT = hd.sr.CodedConcept("C2348792", "UMLS", "Time Point")
_ABSENT = re.compile(r"lesion (?P<track>\d+) \(tracking UID (?P<uid>[0-9.]+)\): (?P<status>\w+); "
                     r"(?P<volume_ml>\S+) cm3 at this scan; (?P<previous_ml>\S+) cm3 at the previous scan that saw it$")


def seg_name(k: int) -> str:
    return f"t{k}_seg.dcm"


def sr_name(k: int) -> str:
    return f"t{k}_sr.dcm"


def track_uid(scan_id: str, lesion: int, given: Mapping[int, str] | None = None) -> str:
    """A track's TrackingUID from its first lesion (``lesion`` of the scan ``scan_id`` where it was first
    seen): ``given[lesion]`` (that lesion's segment TrackingUID in predict's SEG) or a UID derived from
    ``scan_id`` (a SeriesInstanceUID, or ``sha256:...``)."""
    if given and lesion in given:
        return given[lesion]
    return result_uid(f"{scan_id}|timeline", f"lesion {lesion}")


def _state_code(state: str) -> hd.sr.CodedConcept:
    key = "progression" if state.startswith("progression (") else state
    return hd.sr.CodedConcept(STATE_CODES[key], PRIVATE_SCHEME, state[:64])


def write_study_seg(out: Path, k: int, series: DicomSeries, numbers: np.ndarray, uids: Mapping[int, str], *,
                    seed: str) -> tuple[dict[str, Any], dict[int, CrossSection]]:
    """The SEG of tk's tracked lesions (module docstring) and where the report draws each track.

    Args:
        out: the folder (``dicom/`` of the staging folder).
        k: the scan's index.
        series: its DICOM series; ``numbers`` is on its grid.
        numbers: track id per voxel of tk's own grid ``(slices, rows, cols)``, 0 elsewhere.
        uids: each present track's TrackingUID.
        seed: the SEG's UIDs derive from it.

    Returns:
        ``(write_dicom_seg's record, {track: its largest cross-section on the series' slices})``.
    """
    labels, tracks = segment_labels(numbers)
    record = write_dicom_seg((labels > 0).astype(np.uint8), series, out / seg_name(k), model_name=ALGORITHM,
                             model_version=__version__, series_number=9920,
                             series_description="bonemets timeline lesions", labels=labels, uid_seed=seed,
                             lesion_ids=tracks, tracking_uids={t: uids[t] for t in tracks})
    if record["written"]:
        record["path"] = seg_name(k)
    table = lesion_table(labels, len(tracks), spacing_mm=(1.0, 1.0, 1.0))
    sections = cross_sections(labels, table, pixel_spacing_mm=series.pixel_spacing)
    return record, dict(zip(tracks, sections))


def _changes(volume: float, previous: float) -> list[tuple[Any, float, Any]]:
    values = [(VOLUME, volume, CM3), (PREVIOUS_VOLUME, previous, CM3), (PREVIOUS_CHANGE, volume - previous, CM3)]
    if previous > 0:
        values.append((PREVIOUS_RELATIVE, 100.0 * (volume - previous) / previous, codes.UCUM.Percent))
    return values


def _track_groups(row: Mapping[str, Any], seg: pydicom.Dataset, anchor: Anchor, series: DicomSeries,
                  algorithm: Any, time_point: hd.sr.TimePointContext) -> list[Any]:
    """A present track's outline and axes (TID 1410) and its segment, volumes and status (TID 1411)."""
    ident = f"lesion {int(row['track'])}"
    item = next(s for s in seg.SegmentSequence if s.get("TrackingID") == ident)
    tracking = hd.sr.TrackingIdentifier(uid=row["tracking_uid"], identifier=ident)
    sites = finding_site(row)
    axes = [hd.sr.Measurement(name=LONG_AXIS, value=float(anchor.long_axis_mm), unit=MM, algorithm_id=algorithm),
            hd.sr.Measurement(name=SHORT_AXIS, value=float(anchor.short_axis_mm), unit=MM, algorithm_id=algorithm)]
    measurements = [hd.sr.Measurement(name=n, value=v, unit=u, algorithm_id=algorithm)
                    for n, v, u in _changes(float(row["volume_ml"]), float(row["previous_ml"]))]
    return [planar_group(tracking, series, anchor, algorithm=algorithm, finding_sites=sites, measurements=axes,
                         time_point=time_point),
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking, referenced_segment=referenced_segment(seg, item),
                time_point_context=time_point, finding_type=PROPERTY_TYPE, algorithm_id=algorithm,
                finding_sites=sites, measurements=measurements,
                qualitative_evaluations=[hd.sr.QualitativeEvaluation(STATUS, TIMELINE_STATUS_CODES[row["status"]])])]


def _absent_text(row: Mapping[str, Any]) -> str:
    return (f"lesion {int(row['track'])} (tracking UID {row['tracking_uid']}): {row['status']}; "
            f"{number_text(float(row['volume_ml']))} cm3 at this scan; {number_text(float(row['previous_ml']))} cm3 "
            "at the previous scan that saw it")


def _summary_items(summary: Mapping[str, Any]) -> list[Any]:
    counts = [(codes.SCT.NumberOfLesions, summary["lesions"]), (NEW_COUNT, summary["new"]),
              (RESOLVED_COUNT, summary["resolved"])]
    items = [text_item(name, number_text(int(n))) for name, n in counts]
    items.append(text_item(TOTAL_VOLUME, number_text(float(summary["total_ml"]), "cm3")))
    items.append(hd.sr.CodeContentItem(name=STATE, value=_state_code(summary["state"]),
                                       relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return items


def _is(item: pydicom.Dataset, name: Any) -> bool:
    code = item.ConceptNameCodeSequence[0]
    return (code.value, code.scheme_designator) == (name.value, name.scheme_designator)


def _read_summary(items: Sequence[pydicom.Dataset]) -> dict[str, Any] | None:
    def text(name: Any) -> float | None:
        found = [i for i in items if _is(i, name) and i.ValueType == "TEXT"]
        return read_number(str(found[0].TextValue)) if found else None

    state = [i for i in items if _is(i, STATE) and i.ValueType == "CODE"]
    if not state:
        return None
    counts = {key: text(name) for key, name in (("lesions", codes.SCT.NumberOfLesions), ("new", NEW_COUNT),
                                                 ("resolved", RESOLVED_COUNT))}
    return {**{k: None if v is None else int(v) for k, v in counts.items()}, "total_ml": text(TOTAL_VOLUME),
            "state": str(state[0].ConceptCodeSequence[0].CodeMeaning)}


def _read_absent(items: Sequence[pydicom.Dataset]) -> list[dict[str, Any]]:
    tracks = []
    for item in items:
        found = _ABSENT.match(str(item.TextValue)) if _is(item, ABSENT_TRACK) and item.ValueType == "TEXT" else None
        if found is not None:
            g = found.groupdict()
            tracks.append({"track": int(g["track"]), "tracking_uid": g["uid"],
                           "status": g["status"] if g["status"] in TIMELINE_STATUS_CODES else None,
                           "volume_ml": float(g["volume_ml"]), "previous_ml": float(g["previous_ml"]),
                           "segment": None, "time_point": None, "outline_sop_instance_uid": None, "outline": None,
                           "long_axis_mm": None, "short_axis_mm": None})
    return tracks


def read_timeline_report(path: str | Path) -> dict[str, Any]:
    """The content of a report written by :func:`write_study_report`, read with highdicom.

    Returns:
        ``{"tracks": [{"track", "tracking_uid", "status", "volume_ml", "previous_ml", "segment",
        "time_point", "outline_sop_instance_uid", "outline", "long_axis_mm", "short_axis_mm"}...],
        "summary": {"lesions", "new", "resolved", "total_ml", "state"}, "sop_instance_uid",
        "series_instance_uid", "study_uid"}``; a track without a lesion at the scan (resolved or
        indeterminate) has ``segment``, ``time_point`` and its outline None.

    Raises:
        InputError: not a readable TID 1500 report.
    """
    sr, volumetric, planar, _ = read_groups(path)
    names = {(c.value, c.scheme_designator): s for s, c in TIMELINE_STATUS_CODES.items()}
    outlines = {str(g.tracking_uid): g for g in planar}
    tracks = []
    for g in volumetric:
        ident = str(g.tracking_identifier)
        ref = g.referenced_segment
        status = g.get_qualitative_evaluations(name=STATUS)
        tp = hd.sr.utils.find_content_items(g[0], name=_TIME_POINT)
        flat = outlines.get(str(g.tracking_uid))
        sop, points = read_outline(flat) if flat is not None else (None, None)
        tracks.append({"track": int(ident.split()[-1]) if ident.startswith("lesion ") else None,
                       "tracking_uid": str(g.tracking_uid),
                       "status": names.get((status[0].value.value, status[0].value.scheme_designator))
                       if status else None,
                       "volume_ml": measurement_value(g, VOLUME), "previous_ml": measurement_value(g, PREVIOUS_VOLUME),
                       "segment": None if ref is None else int(ref.referenced_segment_numbers[0]),
                       "time_point": str(tp[0].value) if tp else None,
                       "outline_sop_instance_uid": sop, "outline": points,
                       "long_axis_mm": None if flat is None else measurement_value(flat, LONG_AXIS),
                       "short_axis_mm": None if flat is None else measurement_value(flat, SHORT_AXIS)})
    items = read_evaluations(sr)
    tracks += _read_absent(items)
    tracks.sort(key=lambda r: r["track"] or 0)
    return {"tracks": tracks, "summary": _read_summary(items), **report_identity(sr)}


def _close(a: float | None, b: float) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-9)


def _verify(path: Path, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any],
            segments: Mapping[int, int], anchors: Mapping[int, Anchor], series: DicomSeries) -> None:
    back = read_timeline_report(path)
    got = {r["track"]: r for r in back["tracks"]}
    if sorted(got) != sorted(int(r["track"]) for r in rows):
        raise InputError(f"{path}: the report read back holds tracks {sorted(got)}; expected "
                         f"{sorted(int(r['track']) for r in rows)}; not written")
    for row in rows:
        t = int(row["track"])
        g = got[t]
        if (g["tracking_uid"], g["status"], g["segment"]) != (row["tracking_uid"], row["status"], segments.get(t)):
            raise InputError(f"{path}: track {t} read back as {g['status']} {g['tracking_uid']} (segment "
                             f"{g['segment']}); not written")
        if not (_close(g["volume_ml"], float(row["volume_ml"]))
                and _close(g["previous_ml"], float(row["previous_ml"]))):
            raise InputError(f"{path}: track {t} volumes read back {g['volume_ml']}, {g['previous_ml']}; not written")
        if t in segments and (g["outline_sop_instance_uid"] != series.sop_instance_uids[anchors[t].z]
                              or not _close(g["long_axis_mm"], float(anchors[t].long_axis_mm))):
            raise InputError(f"{path}: track {t}'s outline is not on slice {anchors[t].z} as drawn; not written")
    s = back["summary"] or {}
    expected = {"lesions": int(summary["lesions"]), "new": int(summary["new"]), "resolved": int(summary["resolved"]),
                "state": str(summary["state"])[:64]}
    if {k: s.get(k) for k in expected} != expected or not _close(s.get("total_ml"), float(summary["total_ml"])):
        raise InputError(f"{path}: the patient's numbers read back {s}; expected {expected}; not written")


def write_study_report(out: Path, k: int, series: DicomSeries, *, rows: Sequence[Mapping[str, Any]],
                       summary: Mapping[str, Any], date: str, seg_path: Path | None,
                       anchors: Mapping[int, Anchor], seed: str) -> dict[str, Any]:
    """The TID 1500 report of tk (module docstring), verified before it is moved into place.

    Args:
        out: the folder (``dicom/`` of the staging folder).
        k: the scan's index.
        series: tk's DICOM series.
        rows: per track present at tk or with a status there (resolved, indeterminate): ``track``,
            ``tracking_uid``, ``status``, ``volume_ml``, ``previous_ml``, ``bone``.
        summary: ``lesions``, ``new``, ``resolved``, ``total_ml`` and ``state`` of ``timeline.csv``'s row.
        date: tk's date (the time point identifier).
        seg_path: tk's SEG (:func:`write_study_seg`), or None when no track has a lesion there.
        anchors: per track with a segment, its largest cross-section on tk's slices (:func:`write_study_seg`).
        seed: the report's UIDs derive from it.

    Raises:
        InputError: an unknown status, a present track without its segment or anchor, or a report
            that does not read back equal (nothing is left behind).
    """
    path = out / sr_name(k)
    unknown = sorted({str(r["status"]) for r in rows} - set(TIMELINE_STATUS_CODES))
    if unknown:
        raise InputError(f"{path}: status {unknown[0]!r}; expected one of {', '.join(TIMELINE_STATUS_CODES)}")
    seg = None if seg_path is None else read_seg(seg_path)
    items = [] if seg is None else [s for s in seg.SegmentSequence
                                    if str(s.get("TrackingID", "")).startswith("lesion ")]
    segments = {int(str(s.TrackingID).split()[-1]): int(s.SegmentNumber) for s in items}
    present = sorted(int(r["track"]) for r in rows if float(r["volume_ml"]) > 0)
    lacking = [t for t in present if t not in segments or t not in anchors]
    if lacking:
        raise InputError(f"{path}: track {lacking[0]} has a lesion at t{k} but no segment or cross-section to draw")
    algorithm, context = observer(ALGORITHM, __version__)
    time_point = hd.sr.TimePointContext(time_point=f"t{k}", subject_time_point_identifier=date)
    rows = sorted(rows, key=lambda r: int(r["track"]))
    groups, absent = [], []
    for r in rows:
        if int(r["track"]) in present:
            groups += _track_groups(r, seg, anchors[int(r["track"])], series, algorithm, time_point)
        else:
            absent.append(text_item(ABSENT_TRACK, _absent_text(r)))
    sr = save_report(path, report_evidence(series, seg), groups, context, uid_seed=seed, series_number=9921,
                     description="bonemets timeline report", evaluations=[*_summary_items(summary), *absent],
                     verify=lambda tmp: _verify(tmp, rows, summary, segments, anchors, series))
    log.info("%s: TID 1500 timeline report of t%d, %d track(s), %s", path, k, len(rows), summary["state"])
    return {"written": True, "path": sr_name(k), **report_identity(sr), "tracks": len(rows), "state": summary["state"],
            "referenced_seg": None if seg is None else str(seg.SOPInstanceUID)}
