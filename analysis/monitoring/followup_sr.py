"""``followup``'s comparison of two CTs as a DICOM Comprehensive 3D SR, TID 1500 ("Measurement
Report") on the baseline series, written with highdicom and verified by reading it back.

One group per tracked lesion with its status, its volumes at both time points and their change,
and a patient-level group with the counts per status and the new-lesions rule: followup's
lesions.csv and summary.csv (:mod:`analysis.monitoring.followup`). The statuses, their counts and
the rule are those of :mod:`analysis.lesions.change` (:data:`~analysis.lesions.change.STATUSES`,
:data:`~analysis.lesions.change.NEW_LESIONS_FLAG`); the TID 1500 scaffolding (SEG references,
evidence, observer, saving with a read-back) is predict's report's
(:mod:`analysis.imaging.dicom_sr`). Concepts without a standard code use the private coding
scheme :data:`PRIVATE_SCHEME` (``99BONEMETS``).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from analysis.errors import InputError
from analysis.imaging.dicom import DicomSeries
from analysis.imaging.dicom_seg import PROPERTY_TYPE, result_uid
from analysis.imaging.dicom_sr import (CM3, RTOL, TOTAL_ID, VOLUME, finding_site, measurement_value, observer,
                                       read_groups, read_seg, referenced_segment, report_evidence, report_identity,
                                       save_report, tracking_identifier)
from analysis.lesions.change import GROWN, NEW, NEW_LESIONS_FLAG, RESOLVED, SHRUNK, STABLE, STATUSES

log = logging.getLogger(__name__)

__all__ = ["PRIVATE_SCHEME", "STATUS", "STATUS_VALUES", "STATUS_COUNTS", "NEW_LESIONS_RULE", "write_followup_report",
           "read_followup_report"]

#: Private coding scheme of the concepts no DICOM/SNOMED CT code in pydicom 3.0.2's tables fits
#: (PS3.16 8.2: a private scheme designator starts with "99").
PRIVATE_SCHEME = "99BONEMETS"
#: Concept name of a tracked lesion's follow-up status (qualitative evaluation).
STATUS = hd.sr.CodedConcept("FUSTATUS", PRIVATE_SCHEME, "Follow-up status")
#: Values of :data:`STATUS`: SNOMED CT where a finding fits (pydicom's tables, from PS3.16: "New
#: finding" and the size changes are CID 6002 "Change Since Last Mammogram or Prior Surgery"
#: values, "No change" is in CID 3235), a private code for "resolved" (SNOMED CT's "Problem
#: resolved" is a problem-list status, not an imaging finding).
STATUS_VALUES: dict[str, Any] = {
    NEW: codes.SCT.NewFinding,              # 129721008
    RESOLVED: hd.sr.CodedConcept("RESOLVED", PRIVATE_SCHEME, "Resolved"),
    GROWN: codes.SCT.IncreaseInSize,        # 15454001
    SHRUNK: codes.SCT.DecreaseInSize,       # 19776001
    STABLE: codes.SCT.NoChange,             # 260388006
}
BASELINE_VOLUME = hd.sr.CodedConcept("BLVOLUME", PRIVATE_SCHEME, "Volume at baseline")
VOLUME_CHANGE = hd.sr.CodedConcept("VOLCHANGE", PRIVATE_SCHEME, "Volume change since baseline")
RELATIVE_CHANGE = hd.sr.CodedConcept("RELVOLCHANGE", PRIVATE_SCHEME, "Relative volume change since baseline")
BASELINE_COUNT = hd.sr.CodedConcept("BLLESIONS", PRIVATE_SCHEME, "Number of lesions at baseline")
#: Patient-level counts per status (summary.csv's count columns, :data:`analysis.lesions.change.STATUSES`).
STATUS_COUNTS = {name: hd.sr.CodedConcept(f"N{name.upper()}", PRIVATE_SCHEME, f"Number of {name} lesions")
                 for name in STATUSES}
#: summary.csv's ``new_lesions_flag`` (value SCT Yes / No; :func:`analysis.lesions.change.new_lesions_flag`).
NEW_LESIONS_RULE = hd.sr.CodedConcept("PCWG3NEW", PRIVATE_SCHEME,
                                      f"At least {NEW_LESIONS_FLAG} new lesions (PCWG3 count rule)")
#: TID 1502 "Time Point" (UMLS C2348792), as highdicom writes it.
_TIME_POINT = hd.sr.CodedConcept("C2348792", "UMLS", "Time Point")


def _changes(baseline_ml: float, followup_ml: float, change_ml: float,
             change_pct: float | None) -> list[tuple[Any, float, Any]]:
    """``(concept, value, unit)`` of the volumes of two time points and their change (no relative
    change without a baseline volume)."""
    rows = [(VOLUME, followup_ml, CM3), (BASELINE_VOLUME, baseline_ml, CM3), (VOLUME_CHANGE, change_ml, CM3)]
    return rows + ([] if change_pct is None else [(RELATIVE_CHANGE, change_pct, codes.UCUM.Percent)])


def _number(x: Any) -> float | None:
    return None if x is None or x == "" else float(x)


def _tracked_group(row: Mapping[str, Any], seg: pydicom.Dataset | None, algorithm: hd.sr.AlgorithmIdentification,
                   uid_seed: str, time_point: hd.sr.TimePointContext) -> Any:
    """One tracked lesion: TID 1411 referencing its SEG segment, or TID 1501 when it has none
    (no voxel in the baseline frame)."""
    ident = f"lesion {int(row['lesion'])}"
    item = None if seg is None else next((s for s in seg.SegmentSequence if s.get("TrackingID") == ident), None)
    measurements = [hd.sr.Measurement(name=name, value=v, unit=unit, algorithm_id=algorithm)
                    for name, v, unit in _changes(float(row["baseline_ml"]), float(row["followup_ml"]),
                                                  float(row["change_ml"]), _number(row.get("change_pct")))]
    common = dict(tracking_identifier=tracking_identifier(item, uid_seed, ident), time_point_context=time_point,
                  finding_type=PROPERTY_TYPE, algorithm_id=algorithm, finding_sites=finding_site(row),
                  measurements=measurements,
                  qualitative_evaluations=[hd.sr.QualitativeEvaluation(STATUS, STATUS_VALUES[row["status"]])])
    if item is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(**common)
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=referenced_segment(seg, item), **common)


def _followup_total(summary: Mapping[str, Any], algorithm: hd.sr.AlgorithmIdentification, uid_seed: str,
                    time_point: hd.sr.TimePointContext) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    counts = [(codes.SCT.NumberOfLesions, int(summary["followup_lesions"])),
              (BASELINE_COUNT, int(summary["baseline_lesions"]))]
    counts += [(STATUS_COUNTS[name], int(summary[name])) for name in STATUSES]
    measurements = [hd.sr.Measurement(name=name, value=n, unit=codes.UCUM.NoUnits, algorithm_id=algorithm)
                    for name, n in counts]
    measurements += [hd.sr.Measurement(name=name, value=v, unit=unit, algorithm_id=algorithm)
                     for name, v, unit in _changes(float(summary["baseline_ml"]), float(summary["followup_ml"]),
                                                   float(summary["change_ml"]), _number(summary.get("change_pct")))]
    flag = codes.SCT.Yes if int(summary["new_lesions_flag"]) else codes.SCT.No
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=result_uid(uid_seed, TOTAL_ID), identifier=TOTAL_ID),
        time_point_context=time_point, finding_type=PROPERTY_TYPE, algorithm_id=algorithm, measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(NEW_LESIONS_RULE, flag)])


def _coded(group: Any, name: Any) -> Any:
    found = group.get_qualitative_evaluations(name=name)
    return found[0].value if found else None


def _status_of(value: Any) -> str | None:
    for status, code in STATUS_VALUES.items():
        if value is not None and (value.value, value.scheme_designator) == (code.value, code.scheme_designator):
            return status
    return None


def _time_point(group: Any) -> str | None:
    found = hd.sr.utils.find_content_items(group[0], name=_TIME_POINT)
    return str(found[0].value) if found else None


def read_followup_report(path: str | os.PathLike) -> dict[str, Any]:
    """The numbers of a report written by :func:`write_followup_report`, read with highdicom.

    Returns:
        ``{"lesions": [{"lesion", "tracking_uid", "status", "followup_ml", "baseline_ml",
        "change_ml", "change_pct", "segment", "site", "time_point"}...], "summary": {the columns of
        followup's summary.csv}, "time_point", "sop_instance_uid", "series_instance_uid",
        "study_uid"}``; ``segment`` is the referenced SEG segment number or None, ``change_pct``
        None without a baseline volume.

    Raises:
        InputError: not a readable TID 1500 report.
    """
    sr, volumetric, others, total = read_groups(path)
    lesions = []
    for g in [*volumetric, *others]:
        ident = str(g.tracking_identifier)
        ref = getattr(g, "referenced_segment", None)
        sites = g.finding_sites
        lesions.append({
            "lesion": int(ident.split()[-1]) if ident.startswith("lesion ") else None,
            "tracking_uid": str(g.tracking_uid), "status": _status_of(_coded(g, STATUS)),
            "followup_ml": measurement_value(g, VOLUME), "baseline_ml": measurement_value(g, BASELINE_VOLUME),
            "change_ml": measurement_value(g, VOLUME_CHANGE), "change_pct": measurement_value(g, RELATIVE_CHANGE),
            "segment": None if ref is None else int(ref.referenced_segment_numbers[0]),
            "site": str(sites[0].value.value) if sites else None, "time_point": _time_point(g)})
    lesions.sort(key=lambda r: (r["lesion"] is None, r["lesion"] or 0))
    summary = None
    if total is not None:
        count = {name: measurement_value(total, concept) for name, concept in STATUS_COUNTS.items()}
        flag = _coded(total, NEW_LESIONS_RULE)
        summary = {"baseline_lesions": measurement_value(total, BASELINE_COUNT),
                   "followup_lesions": measurement_value(total, codes.SCT.NumberOfLesions), **count,
                   "baseline_ml": measurement_value(total, BASELINE_VOLUME), "followup_ml": measurement_value(total, VOLUME),
                   "change_ml": measurement_value(total, VOLUME_CHANGE), "change_pct": measurement_value(total, RELATIVE_CHANGE),
                   "new_lesions_flag": None if flag is None else int(flag.value == codes.SCT.Yes.value)}
        summary = {k: (int(v) if k.endswith("lesions") or k in STATUSES else v) if v is not None else None
                   for k, v in summary.items()}
    return {"lesions": lesions, "summary": summary, "time_point": None if total is None else _time_point(total),
            **report_identity(sr)}


def _close(got: float | None, expected: float | None) -> bool:
    if got is None or expected is None:
        return got is None and expected is None
    return math.isclose(got, expected, rel_tol=RTOL, abs_tol=1e-9)


def _verify_followup(path: Path, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any],
                     segments: Mapping[int, int]) -> None:
    back = read_followup_report(path)
    got = {r["lesion"]: r for r in back["lesions"]}
    if sorted(got) != sorted(int(r["lesion"]) for r in rows):
        raise InputError(f"{path}: the report read back tracks lesions {sorted(got)}; expected {len(rows)}; "
                         f"not written")
    for row in rows:
        n = int(row["lesion"])
        g = got[n]
        if g["status"] != row["status"] or g["segment"] != segments.get(n):
            raise InputError(f"{path}: lesion {n} read back as {g['status']} (segment {g['segment']}), expected "
                             f"{row['status']} (segment {segments.get(n)}); not written")
        for key in ("baseline_ml", "followup_ml", "change_ml", "change_pct"):
            if not _close(g[key], _number(row.get(key))):
                raise InputError(f"{path}: lesion {n} {key} read back {g[key]}, expected {row.get(key)}; not written")
    s = back["summary"] or {}
    for key, expected in summary.items():
        if not _close(_number(s.get(key)), _number(expected)):
            raise InputError(f"{path}: summary {key} read back {s.get(key)}, expected {expected}; not written")


def write_followup_report(series: DicomSeries, out_path: str | os.PathLike, *, lesions: Sequence[Mapping[str, Any]],
                          summary: Mapping[str, Any], seg_path: str | os.PathLike | None, followup_id: str,
                          model_name: str, model_version: str, uid_seed: str,
                          series_number: int = 9911) -> dict[str, Any]:
    """Write a follow-up comparison (``followup``'s lesions.csv and summary.csv) as a TID 1500
    report on the baseline series, read back with highdicom before it is moved into place.

    The report holds, in the baseline's Study (evidence: the SEG, then the baseline series):

    - one group per tracked lesion (TrackingIdentifier "lesion K", K the ``lesion`` of
      lesions.csv; its UID the SEG segment's TrackingUID, or one derived from ``uid_seed``): TID
      1411 referencing the segment whose TrackingID is "lesion K", or TID 1501 for a lesion with
      no segment (no voxel in the baseline frame). Measurements: SCT 118565006 "Volume" (the
      follow-up volume) and :data:`BASELINE_VOLUME`, :data:`VOLUME_CHANGE` in UCUM ``cm3``
      (= ml), :data:`RELATIVE_CHANGE` in ``%`` (absent for a new lesion); the qualitative
      evaluation :data:`STATUS` with a value of :data:`STATUS_VALUES`; the finding site as in
      :func:`write_measurement_report` when ``bone`` is known;
    - a TID 1501 group "all lesions": SCT 246206008 "Number of lesions" (follow-up),
      :data:`BASELINE_COUNT`, the counts per status (:data:`STATUS_COUNTS`), the total volumes
      and their change, and :data:`NEW_LESIONS_RULE` SCT 373066001 "Yes" / 373067005 "No" (the
      PCWG3 count rule of ``new_lesions_flag``, not a diagnosis).

    Every group carries a TID 1502 time point context: "follow-up", order 2, subject time point
    identifier ``followup_id``. One group per lesion holds both time points (TID 1500 has no
    per-measurement time point): the baseline numbers are named "at baseline" by their concept.
    Concepts without a standard code use the private scheme :data:`PRIVATE_SCHEME` ("99BONEMETS"),
    as PS3.16 8.2 allows; a reader that does not know it still gets the SNOMED CT status values
    and the standard Volume.

    Args:
        series: the baseline series.
        out_path: the SR file to write.
        lesions: rows of followup's lesions.csv (``lesion``, ``status``, ``baseline_ml``,
            ``followup_ml``, ``change_ml``, ``change_pct`` (None/"" without a baseline), ``bone``).
        summary: the row of followup's summary.csv.
        seg_path: the DICOM SEG on the baseline series whose segments carry TrackingID "lesion K"
            (:func:`analysis.imaging.dicom_seg.write_dicom_seg` with ``lesion_ids``), or None
            (no tracked lesion has voxels in the baseline frame).
        followup_id: what identifies the follow-up scan (its SeriesInstanceUID or file sha256).
        model_name, model_version: AlgorithmName/Version and the device observer.
        uid_seed: the report's UIDs (and tracking UIDs without a segment) derive from it.
        series_number: SeriesNumber of the report.

    Returns:
        ``{"written": True, "path", "bytes", "sop_instance_uid", "series_instance_uid",
        "study_uid", "lesions", "referenced_seg", "segments": {lesion: segment}, "verified"}``.

    Raises:
        InputError: an unknown status, unreadable headers or SEG, or a report that does not
            read back equal (nothing is left behind).
    """
    out_path = Path(out_path)
    rows = sorted(lesions, key=lambda r: int(r["lesion"]))
    unknown = sorted({str(r["status"]) for r in rows} - set(STATUSES))
    if unknown:
        raise InputError(f"{out_path}: status {unknown[0]!r}; expected one of {', '.join(STATUSES)}")
    seg = None if seg_path is None else read_seg(seg_path)
    items = [] if seg is None else list(seg.SegmentSequence)
    tracked = [s for s in items if str(s.get("TrackingID", "")).startswith("lesion ")]
    segments = {int(str(s.TrackingID).split()[-1]): int(s.SegmentNumber) for s in tracked}
    algorithm, context = observer(model_name, model_version)
    time_point = hd.sr.TimePointContext(time_point="follow-up", time_point_order=2,
                                        subject_time_point_identifier=followup_id[:64])
    groups = [_tracked_group(r, seg, algorithm, uid_seed, time_point) for r in rows]
    groups.append(_followup_total(summary, algorithm, uid_seed, time_point))
    sr = save_report(out_path, report_evidence(series, seg), groups, context, uid_seed=uid_seed, series_number=series_number,
               description="bonemets follow-up report",
               verify=lambda tmp: _verify_followup(tmp, rows, summary, segments))
    log.info("%s: TID 1500 follow-up report of %d tracked lesion(s)", out_path, len(rows))
    return {"written": True, "path": str(out_path), "bytes": out_path.stat().st_size, **report_identity(sr),
            "lesions": len(rows), "referenced_seg": None if seg is None else str(seg.SOPInstanceUID),
            "segments": {str(k): v for k, v in sorted(segments.items())},
            "verified": "read back with highdicom: every tracked lesion's status, volumes, change and segment, "
                        "and the summary counts, volumes and new-lesions rule"}
