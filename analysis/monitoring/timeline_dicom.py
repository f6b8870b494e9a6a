"""``timeline --sr``: per follow-up study, a DICOM SEG of its tracked lesions and a TID 1500 report.

For each scan tk, k >= 1, given as a DICOM series:

- ``dicom/tK_seg.dcm``: a DICOM SEG of tk's series (:func:`analysis.imaging.dicom_seg.write_dicom_seg`)
  with one segment per track that has a lesion at tk: label "bone metastasis T", TrackingID "lesion T"
  and the **track's TrackingUID**, T the track id of ``tracks.csv``;
- ``dicom/tK_sr.dcm``: a Comprehensive 3D SR, TID 1500, in tk's study, read back with highdicom before
  it is moved into place: one group per track present or resolved at tk, with the same tracking
  identifier and UID as the segment (TID 1411 referencing it; TID 1501 for a resolved track), a TID 1502
  time point context (``tK``, order k + 1, the scan's date), the Volume at tk (SCT, UCUM cm3), the
  volume at the previous scan that saw it, the change in cm3 and %, the status as a qualitative
  evaluation (``followup``'s codes: SNOMED CT New finding / Increase in size / Decrease in size / No
  change, private Resolved and Indeterminate) and the finding site; plus a group "all lesions" with
  the number of lesions, the total volume, the new lesions against the PCWG3 reference, the resolved
  ones and the **PCWG3 state** of tk as a qualitative evaluation (private scheme ``99BONEMETS``: no
  standard code exists for the rule's states).

**One identity per track across studies**: a track's TrackingUID is the UID its first lesion had where
the track was first seen: the TrackingUID of that lesion's segment in the SEG ``predict`` wrote for that
scan when it is given (the node passes them, so the report of a study seen alone and the timeline
reports of later studies agree), else one derived from that scan's SeriesInstanceUID and the lesion's
id. The identifier is "lesion T". So every report of a patient's timeline names a lesion the same way.
"""
from __future__ import annotations

import logging
import math
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
    TOTAL_ID,
    VOLUME,
    finding_site,
    measurement_value,
    observer,
    read_groups,
    read_seg,
    referenced_segment,
    report_evidence,
    report_identity,
    save_report,
)
from analysis.lesions.change import STATUSES
from analysis.monitoring.followup_dicom import segment_labels
from analysis.monitoring.followup_sr import PRIVATE_SCHEME, STATUS, STATUS_VALUES
from analysis.monitoring.tracking import INDETERMINATE

log = logging.getLogger(__name__)

__all__ = ["ALGORITHM", "seg_name", "sr_name", "write_study_seg", "write_study_report", "read_timeline_report",
           "STATE", "STATE_CODES", "track_uid"]

ALGORITHM = "bonemets timeline"
#: Status values: followup's (:data:`analysis.monitoring.followup_sr.STATUS_VALUES`, keyed by
#: :data:`analysis.lesions.change.STATUSES`) and a private Indeterminate for new or resolved tracks below the
#: minimum size.
TIMELINE_STATUS_CODES = {**{name: STATUS_VALUES[name] for name in STATUSES},
                         INDETERMINATE: STATUS_VALUES.get(INDETERMINATE) or
                         hd.sr.CodedConcept("INDETERM", PRIVATE_SCHEME, "Indeterminate")}
PREVIOUS_VOLUME = hd.sr.CodedConcept("PRVOLUME", PRIVATE_SCHEME, "Volume at previous scan")
PREVIOUS_CHANGE = hd.sr.CodedConcept("PRVOLCHANGE", PRIVATE_SCHEME, "Volume change since previous scan")
PREVIOUS_RELATIVE = hd.sr.CodedConcept("PRRELCHANGE", PRIVATE_SCHEME, "Relative volume change since previous scan")
NEW_COUNT = hd.sr.CodedConcept("PCWG3NEWN", PRIVATE_SCHEME, "Number of new lesions against the PCWG3 reference scan")
RESOLVED_COUNT = hd.sr.CodedConcept("NRESOLVED", PRIVATE_SCHEME, "Number of resolved lesions")
#: The PCWG3 bone state of the scan (:mod:`analysis.monitoring.pcwg3`).
STATE = hd.sr.CodedConcept("PCWG3STATE", PRIVATE_SCHEME, "PCWG3 bone progression state")
STATE_CODES = {"baseline": "BASELINE", "no progression": "NOPROG", "unconfirmed": "UNCONFIRMED",
               "progression": "PROGRESSION", "not confirmed (flare)": "NOTCONFIRMED", "not evaluable": "NOTEVAL"}
_RTOL = 1e-6


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
                    seed: str) -> dict[str, Any]:
    """The SEG of tk's tracked lesions (module docstring).

    Args:
        out: the folder (``dicom/`` of the staging folder).
        k: the scan's index.
        series: its DICOM series; ``numbers`` is on its grid.
        numbers: track id per voxel of tk's own grid ``(slices, rows, cols)``, 0 elsewhere.
        uids: each present track's TrackingUID.
        seed: the SEG's UIDs derive from it.
    """
    labels, tracks = segment_labels(numbers)
    record = write_dicom_seg((labels > 0).astype(np.uint8), series, out / seg_name(k), model_name=ALGORITHM,
                             model_version=__version__, series_number=9920,
                             series_description="bonemets timeline lesions", labels=labels, uid_seed=seed,
                             lesion_ids=tracks, tracking_uids={t: uids[t] for t in tracks})
    if record["written"]:
        record["path"] = seg_name(k)
    return record


def _track_group(row: Mapping[str, Any], seg: pydicom.Dataset | None, algorithm: Any,
                 time_point: hd.sr.TimePointContext) -> Any:
    ident = f"lesion {int(row['track'])}"
    item = None if seg is None else next((s for s in seg.SegmentSequence if s.get("TrackingID") == ident), None)
    volume, previous = float(row["volume_ml"]), float(row["previous_ml"])
    values = [(VOLUME, volume, CM3), (PREVIOUS_VOLUME, previous, CM3), (PREVIOUS_CHANGE, volume - previous, CM3)]
    if previous > 0:
        values.append((PREVIOUS_RELATIVE, 100.0 * (volume - previous) / previous, codes.UCUM.Percent))
    common = dict(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=row["tracking_uid"], identifier=ident),
        time_point_context=time_point, finding_type=PROPERTY_TYPE, algorithm_id=algorithm,
        finding_sites=finding_site(row),
        measurements=[hd.sr.Measurement(name=n, value=v, unit=u, algorithm_id=algorithm) for n, v, u in values],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(STATUS, TIMELINE_STATUS_CODES[row["status"]])])
    if item is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(**common)
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=referenced_segment(seg, item),
                                                                     **common)


def _total_group(summary: Mapping[str, Any], algorithm: Any, seed: str, time_point: hd.sr.TimePointContext) -> Any:
    counts = [(codes.SCT.NumberOfLesions, int(summary["lesions"])), (NEW_COUNT, int(summary["new"])),
              (RESOLVED_COUNT, int(summary["resolved"]))]
    measurements = [hd.sr.Measurement(name=n, value=v, unit=codes.UCUM.NoUnits, algorithm_id=algorithm)
                    for n, v in counts]
    measurements.append(hd.sr.Measurement(name=VOLUME, value=float(summary["total_ml"]), unit=CM3,
                                          algorithm_id=algorithm))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=result_uid(seed, TOTAL_ID), identifier=TOTAL_ID),
        time_point_context=time_point, finding_type=PROPERTY_TYPE, algorithm_id=algorithm, measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(STATE, _state_code(summary["state"]))])


def read_timeline_report(path: str | Path) -> dict[str, Any]:
    """The content of a report written by :func:`write_study_report`, read with highdicom.

    Returns:
        ``{"tracks": [{"track", "tracking_uid", "status", "volume_ml", "previous_ml", "segment",
        "time_point"}...], "summary": {"lesions", "new", "resolved", "total_ml", "state"}, "sop_instance_uid",
        "series_instance_uid", "study_uid"}``.
    """
    sr, volumetric, others, total = read_groups(path)
    names = {(c.value, c.scheme_designator): s for s, c in TIMELINE_STATUS_CODES.items()}
    tracks = []
    for g in [*volumetric, *others]:
        ident = str(g.tracking_identifier)
        ref = getattr(g, "referenced_segment", None)
        status = g.get_qualitative_evaluations(name=STATUS)
        tp = hd.sr.utils.find_content_items(g[0], name=hd.sr.CodedConcept("C2348792", "UMLS", "Time Point"))
        tracks.append({"track": int(ident.split()[-1]) if ident.startswith("lesion ") else None,
                       "tracking_uid": str(g.tracking_uid),
                       "status": names.get((status[0].value.value, status[0].value.scheme_designator))
                       if status else None,
                       "volume_ml": measurement_value(g, VOLUME), "previous_ml": measurement_value(g, PREVIOUS_VOLUME),
                       "segment": None if ref is None else int(ref.referenced_segment_numbers[0]),
                       "time_point": str(tp[0].value) if tp else None})
    tracks.sort(key=lambda r: r["track"] or 0)
    summary = None
    if total is not None:
        state = total.get_qualitative_evaluations(name=STATE)
        value = measurement_value
        summary = {"lesions": value(total, codes.SCT.NumberOfLesions), "new": value(total, NEW_COUNT),
                   "resolved": value(total, RESOLVED_COUNT), "total_ml": value(total, VOLUME),
                   "state": str(state[0].value.meaning) if state else None}
    return {"tracks": tracks, "summary": summary, **report_identity(sr)}


def _close(a: float | None, b: float) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=_RTOL, abs_tol=1e-9)


def _verify(path: Path, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any],
            segments: Mapping[int, int]) -> None:
    back = read_timeline_report(path)
    got = {r["track"]: r for r in back["tracks"]}
    if sorted(got) != sorted(int(r["track"]) for r in rows):
        raise InputError(f"{path}: the report read back holds tracks {sorted(got)}; expected "
                         f"{sorted(int(r['track']) for r in rows)}; not written")
    for row in rows:
        g = got[int(row["track"])]
        if (g["tracking_uid"], g["status"], g["segment"]) != (row["tracking_uid"], row["status"],
                                                               segments.get(int(row["track"]))):
            raise InputError(f"{path}: track {row['track']} read back as {g['status']} {g['tracking_uid']} (segment "
                             f"{g['segment']}); not written")
        if not (_close(g["volume_ml"], float(row["volume_ml"]))
                and _close(g["previous_ml"], float(row["previous_ml"]))):
            raise InputError(f"{path}: track {row['track']} volumes read back {g['volume_ml']}, {g['previous_ml']}; "
                             "not written")
    s = back["summary"] or {}
    if s.get("state") != summary["state"][:64] or not _close(s.get("total_ml"), float(summary["total_ml"])):
        raise InputError(f"{path}: the patient group read back {s}; not written")


def write_study_report(out: Path, k: int, series: DicomSeries, *, rows: Sequence[Mapping[str, Any]],
                       summary: Mapping[str, Any], date: str, seg_path: Path | None, seed: str) -> dict[str, Any]:
    """The TID 1500 report of tk (module docstring), verified before it is moved into place.

    Args:
        out: the folder (``dicom/`` of the staging folder).
        k: the scan's index.
        series: tk's DICOM series.
        rows: per track present or resolved at tk: ``track``, ``tracking_uid``, ``status``, ``volume_ml``,
            ``previous_ml``, ``bone``.
        summary: ``lesions``, ``new``, ``resolved``, ``total_ml`` and ``state`` of ``timeline.csv``'s row.
        date: tk's date (the time point identifier).
        seg_path: tk's SEG (:func:`write_study_seg`), or None when no track has a lesion there.
        seed: the report's UIDs derive from it.
    """
    unknown = sorted({str(r["status"]) for r in rows} - set(TIMELINE_STATUS_CODES))
    if unknown:
        raise InputError(f"{out / sr_name(k)}: status {unknown[0]!r}; expected one of "
                         f"{', '.join(TIMELINE_STATUS_CODES)}")
    seg = None if seg_path is None else read_seg(seg_path)
    items = [] if seg is None else [s for s in seg.SegmentSequence
                                    if str(s.get("TrackingID", "")).startswith("lesion ")]
    segments = {int(str(s.TrackingID).split()[-1]): int(s.SegmentNumber) for s in items}
    algorithm, context = observer(ALGORITHM, __version__)
    time_point = hd.sr.TimePointContext(time_point=f"t{k}", time_point_order=k + 1,
                                        subject_time_point_identifier=date)
    rows = sorted(rows, key=lambda r: int(r["track"]))
    groups = [_track_group(r, seg, algorithm, time_point) for r in rows]
    groups.append(_total_group(summary, algorithm, seed, time_point))
    path = out / sr_name(k)
    sr = save_report(path, report_evidence(series, seg), groups, context, uid_seed=seed, series_number=9921,
               description="bonemets timeline report", verify=lambda tmp: _verify(tmp, rows, summary, segments))
    log.info("%s: TID 1500 timeline report of t%d, %d track(s), %s", path, k, len(rows), summary["state"])
    return {"written": True, "path": sr_name(k), **report_identity(sr), "tracks": len(rows), "state": summary["state"],
            "referenced_seg": None if seg is None else str(seg.SOPInstanceUID)}
