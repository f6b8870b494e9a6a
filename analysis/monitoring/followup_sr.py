"""``followup``'s comparison of two CTs as a DICOM Comprehensive 3D SR, TID 1500 ("Measurement
Report") on the baseline series, written with highdicom and verified by reading it back.

Laid out like predict's report (:mod:`analysis.imaging.dicom_sr`), so that OHIF Viewer draws it:
per tracked lesion with voxels in the baseline frame, a planar group (its outline on the baseline
slice of its largest cross-section) and a volumetric group (its SEG segment, its status, its
volumes at both time points and their change) sharing the lesion's tracking identifier and UID;
the patient-level numbers (counts per status, total volumes, the new-lesions rule) and the tracked
lesions that have no voxel in the baseline images in the document-level Qualitative Evaluations
container. followup's lesions.csv and summary.csv (:mod:`analysis.monitoring.followup`); the
statuses, their counts and the rule are those of :mod:`analysis.lesions.change`
(:data:`~analysis.lesions.change.STATUSES`, :data:`~analysis.lesions.change.NEW_LESIONS_FLAG`).
Concepts without a standard code use the private coding scheme
:data:`~analysis.imaging.dicom_sr.PRIVATE_SCHEME` (``99BONEMETS``).
"""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from analysis.errors import InputError
from analysis.imaging.dicom import DicomSeries
from analysis.imaging.dicom_seg import PROPERTY_TYPE
from analysis.imaging.dicom_sr import (CM3, PRIVATE_SCHEME, RTOL, TOTAL_VOLUME, VOLUME, Anchor, finding_site,
                                       measurement_value, number_text, observer, planar_group, read_evaluations,
                                       read_groups, read_number, read_outline, read_seg, referenced_segment,
                                       report_evidence, report_identity, save_report, text_item, tracking_identifier)
from analysis.lesions.change import GROWN, INDETERMINATE, NEW, NEW_LESIONS_FLAG, RESOLVED, SHRUNK, STABLE, STATUSES

log = logging.getLogger(__name__)

__all__ = ["PRIVATE_SCHEME", "STATUS", "STATUS_VALUES", "STATUS_COUNTS", "NEW_LESIONS_RULE", "OUTSIDE_BASELINE",
           "write_followup_report", "read_followup_report"]

#: Concept name of a tracked lesion's follow-up status (qualitative evaluation).
STATUS = hd.sr.CodedConcept("FUSTATUS", PRIVATE_SCHEME, "Follow-up status")
#: Values of :data:`STATUS`: SNOMED CT where a finding fits (pydicom's tables, from PS3.16: "New
#: finding" and the size changes are CID 6002 "Change Since Last Mammogram or Prior Surgery"
#: values, "No change" is in CID 3235), a private code for "resolved" (SNOMED CT's "Problem
#: resolved" is a problem-list status, not an imaging finding); SNOMED CT 82334004 "Indeterminate"
#: (a qualifier value in pydicom's table) for a lesion too small to call new or resolved.
STATUS_VALUES: dict[str, Any] = {
    NEW: codes.SCT.NewFinding,              # 129721008
    RESOLVED: hd.sr.CodedConcept("RESOLVED", PRIVATE_SCHEME, "Resolved"),
    GROWN: codes.SCT.IncreaseInSize,        # 15454001
    SHRUNK: codes.SCT.DecreaseInSize,       # 19776001
    STABLE: codes.SCT.NoChange,             # 260388006
    INDETERMINATE: codes.SCT.Indeterminate,  # 82334004
}
BASELINE_VOLUME = hd.sr.CodedConcept("BLVOLUME", PRIVATE_SCHEME, "Volume at baseline")
VOLUME_CHANGE = hd.sr.CodedConcept("VOLCHANGE", PRIVATE_SCHEME, "Volume change since baseline")
RELATIVE_CHANGE = hd.sr.CodedConcept("RELVOLCHANGE", PRIVATE_SCHEME, "Relative volume change since baseline")
BASELINE_COUNT = hd.sr.CodedConcept("BLLESIONS", PRIVATE_SCHEME, "Number of lesions at baseline")
#: The patient's total lesion volume at baseline, its change and relative change (summary.csv).
BASELINE_TOTAL = hd.sr.CodedConcept("BLTOTALVOL", PRIVATE_SCHEME, "Total lesion volume at baseline")
TOTAL_CHANGE = hd.sr.CodedConcept("TOTALVOLCHANGE", PRIVATE_SCHEME, "Total lesion volume change since baseline")
TOTAL_RELATIVE = hd.sr.CodedConcept("RELTOTVOLCHANGE", PRIVATE_SCHEME,
                                    "Relative total lesion volume change since baseline")
#: Patient-level counts per status (summary.csv's count columns, :data:`analysis.lesions.change.STATUSES`).
STATUS_COUNTS = {name: hd.sr.CodedConcept(f"N{name.upper()}", PRIVATE_SCHEME, f"Number of {name} lesions")
                 for name in STATUSES}
#: summary.csv's ``new_lesions_flag`` (value SCT Yes / No; :func:`analysis.lesions.change.new_lesions_flag`).
NEW_LESIONS_RULE = hd.sr.CodedConcept("PCWG3NEW", PRIVATE_SCHEME,
                                      f"At least {NEW_LESIONS_FLAG} new lesions (PCWG3 count rule)")
#: A tracked lesion without a voxel in the baseline images (e.g. new beyond its field of view): no
#: place to draw it on the baseline series, so a TEXT item of the Qualitative Evaluations container.
OUTSIDE_BASELINE = hd.sr.CodedConcept("OUTSIDEBL", PRIVATE_SCHEME, "Tracked lesion outside the baseline images")
#: TID 1502 "Time Point" (UMLS C2348792), as highdicom writes it.
_TIME_POINT = hd.sr.CodedConcept("C2348792", "UMLS", "Time Point")
_OUTSIDE = re.compile(r"lesion (?P<lesion>\d+): (?P<status>\w+); (?P<followup_ml>\S+) cm3 at follow-up; "
                      r"(?P<baseline_ml>\S+) cm3 at baseline; change (?P<change_ml>\S+) cm3"
                      r"(?:; (?P<change_pct>\S+) %)?$")


def _changes(baseline_ml: float, followup_ml: float, change_ml: float,
             change_pct: float | None) -> list[tuple[Any, float, Any]]:
    """``(concept, value, unit)`` of the volumes of two time points and their change (no relative
    change without a baseline volume)."""
    rows = [(VOLUME, followup_ml, CM3), (BASELINE_VOLUME, baseline_ml, CM3), (VOLUME_CHANGE, change_ml, CM3)]
    return rows + ([] if change_pct is None else [(RELATIVE_CHANGE, change_pct, codes.UCUM.Percent)])


def _number(x: Any) -> float | None:
    return None if x is None or x == "" else float(x)


def _tracked_groups(row: Mapping[str, Any], item: pydicom.Dataset, seg: pydicom.Dataset, anchor: Anchor,
                    series: DicomSeries, algorithm: hd.sr.AlgorithmIdentification, uid_seed: str,
                    time_points: Mapping[str, hd.sr.TimePointContext]) -> list[Any]:
    """A tracked lesion with voxels in the baseline frame: its outline there (TID 1410; the
    baseline lesion, or for a new lesion the follow-up lesion registered onto the baseline, with
    that time point) and its segment with status, volumes and change (TID 1411, follow-up)."""
    tracking = tracking_identifier(item, uid_seed, f"lesion {int(row['lesion'])}")
    sites = finding_site(row)
    measurements = [hd.sr.Measurement(name=name, value=v, unit=unit, algorithm_id=algorithm)
                    for name, v, unit in _changes(float(row["baseline_ml"]), float(row["followup_ml"]),
                                                  float(row["change_ml"]), _number(row.get("change_pct")))]
    drawn = "baseline" if float(row["baseline_ml"]) > 0 else "follow-up"
    return [planar_group(tracking, series, anchor, algorithm=algorithm, finding_sites=sites,
                         time_point=time_points[drawn]),
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking, referenced_segment=referenced_segment(seg, item),
                time_point_context=time_points["follow-up"], finding_type=PROPERTY_TYPE, algorithm_id=algorithm,
                finding_sites=sites, measurements=measurements,
                qualitative_evaluations=[hd.sr.QualitativeEvaluation(STATUS, STATUS_VALUES[row["status"]])])]


def _outside_text(row: Mapping[str, Any]) -> str:
    pct = _number(row.get("change_pct"))
    return (f"lesion {int(row['lesion'])}: {row['status']}; {number_text(float(row['followup_ml']))} cm3 at "
            f"follow-up; {number_text(float(row['baseline_ml']))} cm3 at baseline; change "
            f"{number_text(float(row['change_ml']))} cm3" + ("" if pct is None else f"; {number_text(pct)} %"))


def _summary_items(summary: Mapping[str, Any]) -> list[Any]:
    """The patient-level numbers as TEXT items and the new-lesions rule as a CODE item (TID 1500 rows 13-14)."""
    counts = [(codes.SCT.NumberOfLesions, summary["followup_lesions"]), (BASELINE_COUNT, summary["baseline_lesions"])]
    counts += [(STATUS_COUNTS[name], summary[name]) for name in STATUSES]
    items = [text_item(name, number_text(int(n))) for name, n in counts]
    volumes = [(TOTAL_VOLUME, summary["followup_ml"], "cm3"), (BASELINE_TOTAL, summary["baseline_ml"], "cm3"),
               (TOTAL_CHANGE, summary["change_ml"], "cm3"), (TOTAL_RELATIVE, _number(summary.get("change_pct")), "%")]
    items += [text_item(name, number_text(float(v), unit)) for name, v, unit in volumes if v is not None]
    flag = codes.SCT.Yes if int(summary["new_lesions_flag"]) else codes.SCT.No
    items.append(hd.sr.CodeContentItem(name=NEW_LESIONS_RULE, value=flag,
                                       relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return items


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


def _is(item: pydicom.Dataset, name: Any) -> bool:
    code = item.ConceptNameCodeSequence[0]  # a highdicom CodedConcept: .value reads a long code value too
    return (code.value, code.scheme_designator) == (name.value, name.scheme_designator)


def _read_summary(items: Sequence[pydicom.Dataset]) -> dict[str, Any] | None:
    def text(name: Any) -> float | None:
        found = [i for i in items if _is(i, name) and i.ValueType == "TEXT"]
        return read_number(str(found[0].TextValue)) if found else None

    flag = [i for i in items if _is(i, NEW_LESIONS_RULE) and i.ValueType == "CODE"]
    if not flag:
        return None
    summary = {"baseline_lesions": text(BASELINE_COUNT), "followup_lesions": text(codes.SCT.NumberOfLesions),
               **{name: text(concept) for name, concept in STATUS_COUNTS.items()},
               "baseline_ml": text(BASELINE_TOTAL), "followup_ml": text(TOTAL_VOLUME), "change_ml": text(TOTAL_CHANGE),
               "change_pct": text(TOTAL_RELATIVE),
               "new_lesions_flag": int(flag[0].ConceptCodeSequence[0].value == codes.SCT.Yes.value)}
    return {k: (int(v) if k.endswith("lesions") or k in STATUSES else v) if v is not None else None
            for k, v in summary.items()}


def _read_outside(items: Sequence[pydicom.Dataset]) -> list[dict[str, Any]]:
    lesions = []
    for item in items:
        if not (_is(item, OUTSIDE_BASELINE) and item.ValueType == "TEXT"):
            continue
        found = _OUTSIDE.match(str(item.TextValue))
        if found is None:
            continue
        g = found.groupdict()
        lesions.append({"lesion": int(g["lesion"]), "tracking_uid": None, "status": g["status"],
                        **{k: None if g[k] is None else float(g[k]) for k in
                           ("followup_ml", "baseline_ml", "change_ml", "change_pct")},
                        "segment": None, "site": None, "time_point": None, "outline_sop_instance_uid": None,
                        "outline": None, "outline_time_point": None})
    return lesions


def read_followup_report(path: str | os.PathLike) -> dict[str, Any]:
    """The numbers of a report written by :func:`write_followup_report`, read with highdicom.

    Returns:
        ``{"lesions": [{"lesion", "tracking_uid", "status", "followup_ml", "baseline_ml",
        "change_ml", "change_pct", "segment", "site", "time_point", "outline_sop_instance_uid",
        "outline", "outline_time_point"}...], "summary": {the columns of followup's summary.csv},
        "sop_instance_uid", "series_instance_uid", "study_uid"}``; ``segment`` is the referenced
        SEG segment number, ``outline`` the ``(k, 2)`` points drawn on the baseline instance
        ``outline_sop_instance_uid``; all three (and ``tracking_uid``, ``site``, ``time_point``)
        are None for a lesion outside the baseline images; ``change_pct`` None without a
        baseline volume.

    Raises:
        InputError: not a readable TID 1500 report.
    """
    sr, volumetric, planar, _ = read_groups(path)
    outlines = {str(g.tracking_uid): g for g in planar}
    lesions = []
    for g in volumetric:
        ident = str(g.tracking_identifier)
        ref = g.referenced_segment
        sites = g.finding_sites
        flat = outlines.get(str(g.tracking_uid))
        sop, points = read_outline(flat) if flat is not None else (None, None)
        lesions.append({
            "lesion": int(ident.split()[-1]) if ident.startswith("lesion ") else None,
            "tracking_uid": str(g.tracking_uid), "status": _status_of(_coded(g, STATUS)),
            "followup_ml": measurement_value(g, VOLUME), "baseline_ml": measurement_value(g, BASELINE_VOLUME),
            "change_ml": measurement_value(g, VOLUME_CHANGE), "change_pct": measurement_value(g, RELATIVE_CHANGE),
            "segment": None if ref is None else int(ref.referenced_segment_numbers[0]),
            "site": str(sites[0].value.value) if sites else None, "time_point": _time_point(g),
            "outline_sop_instance_uid": sop, "outline": points,
            "outline_time_point": None if flat is None else _time_point(flat)})
    items = read_evaluations(sr)
    lesions += _read_outside(items)
    lesions.sort(key=lambda r: (r["lesion"] is None, r["lesion"] or 0))
    return {"lesions": lesions, "summary": _read_summary(items), **report_identity(sr)}


def _close(got: float | None, expected: float | None) -> bool:
    if got is None or expected is None:
        return got is None and expected is None
    return math.isclose(got, expected, rel_tol=RTOL, abs_tol=1e-9)


def _verify_followup(path: Path, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any],
                     segments: Mapping[int, int], anchors: Mapping[int, Anchor], series: DicomSeries) -> None:
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
        if n in segments and g["outline_sop_instance_uid"] != series.sop_instance_uids[anchors[n].z]:
            raise InputError(f"{path}: lesion {n}'s outline is not on baseline slice {anchors[n].z}; not written")
    s = back["summary"] or {}
    for key, expected in summary.items():
        if not _close(_number(s.get(key)), _number(expected)):
            raise InputError(f"{path}: summary {key} read back {s.get(key)}, expected {expected}; not written")


def write_followup_report(series: DicomSeries, out_path: str | os.PathLike, *, lesions: Sequence[Mapping[str, Any]],
                          summary: Mapping[str, Any], seg_path: str | os.PathLike | None,
                          anchors: Mapping[int, Anchor], followup_id: str, model_name: str, model_version: str,
                          uid_seed: str, series_number: int = 9911) -> dict[str, Any]:
    """Write a follow-up comparison (``followup``'s lesions.csv and summary.csv) as a TID 1500
    report on the baseline series, read back with highdicom before it is moved into place.

    The report holds, in the baseline's Study (evidence: the SEG, then the baseline series):

    - per tracked lesion with a segment (TrackingIdentifier "lesion K", K the ``lesion`` of
      lesions.csv; its UID the SEG segment's TrackingUID), two groups in the Imaging Measurements
      container sharing them:

      * TID 1410: the closed outline (SCOORD POLYLINE) of the segment's largest cross-section on
        that baseline instance (``anchors[K]``), with the time point of what it outlines: the
        baseline lesion ("baseline", subject time point identifier the baseline
        SeriesInstanceUID), or for a new lesion the follow-up lesion registered onto the baseline
        ("follow-up");
      * TID 1411: the segment whose TrackingID is "lesion K", SCT 118565006 "Volume" (the
        follow-up volume) and :data:`BASELINE_VOLUME`, :data:`VOLUME_CHANGE` in UCUM ``cm3``
        (= ml), :data:`RELATIVE_CHANGE` in ``%`` (absent for a new lesion), the qualitative
        evaluation :data:`STATUS` with a value of :data:`STATUS_VALUES`, and the finding site as
        in :func:`~analysis.imaging.dicom_sr.write_measurement_report` when ``bone`` is known;
        time point "follow-up" (identifier ``followup_id``): one group holds both time points (TID
        1500 has no per-measurement time point), the baseline numbers named "at baseline". The
        TID 1502 contexts name their time point and leave out its optional order (a NUM that
        OHIF would list among the lesion's values);

    - in the document-level Qualitative Evaluations container (TID 1500 row 12; see
      :mod:`analysis.imaging.dicom_sr` for why not in Imaging Measurements): summary.csv as TEXT
      items (SCT 246206008 "Number of lesions" at follow-up, :data:`BASELINE_COUNT`,
      :data:`STATUS_COUNTS`, the total volumes :data:`~analysis.imaging.dicom_sr.TOTAL_VOLUME`,
      :data:`BASELINE_TOTAL` and their change :data:`TOTAL_CHANGE`, :data:`TOTAL_RELATIVE`), the
      CODE item :data:`NEW_LESIONS_RULE` SCT 373066001 "Yes" / 373067005 "No" (the PCWG3 count
      rule of ``new_lesions_flag``, not a diagnosis), and one TEXT item :data:`OUTSIDE_BASELINE`
      per tracked lesion without a voxel in the baseline frame ("lesion K: new; V cm3 at
      follow-up; 0 cm3 at baseline; change V cm3"): nothing of the baseline series to draw it on.

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
        anchors: per lesion K with a segment, the segment's largest cross-section on the baseline
            series (:func:`analysis.lesions.cross_sections`).
        followup_id: what identifies the follow-up scan (its SeriesInstanceUID or file sha256).
        model_name, model_version: AlgorithmName/Version and the device observer.
        uid_seed: the report's UIDs derive from it.
        series_number: SeriesNumber of the report.

    Returns:
        ``{"written": True, "path", "bytes", "sop_instance_uid", "series_instance_uid",
        "study_uid", "lesions", "referenced_seg", "segments": {lesion: segment}, "verified"}``.

    Raises:
        InputError: an unknown status, unreadable headers or SEG, a segment without its anchor,
            or a report that does not read back equal (nothing is left behind).
    """
    out_path = Path(out_path)
    rows = sorted(lesions, key=lambda r: int(r["lesion"]))
    unknown = sorted({str(r["status"]) for r in rows} - set(STATUSES))
    if unknown:
        raise InputError(f"{out_path}: status {unknown[0]!r}; expected one of {', '.join(STATUSES)}")
    seg = None if seg_path is None else read_seg(seg_path)
    items = {str(s.TrackingID): s for s in ([] if seg is None else seg.SegmentSequence)
             if str(s.get("TrackingID", "")).startswith("lesion ")}
    segments = {int(k.split()[-1]): int(s.SegmentNumber) for k, s in items.items()}
    unanchored = sorted(set(segments) - set(anchors))
    if unanchored:
        raise InputError(f"{out_path}: lesion {unanchored[0]} has a segment but no cross-section to draw")
    algorithm, context = observer(model_name, model_version)
    # no Time Point Order (a NUM, which OHIF would list among a lesion's values): the time points are named
    time_points = {
        "baseline": hd.sr.TimePointContext(time_point="baseline", subject_time_point_identifier=series.series_uid[:64]),
        "follow-up": hd.sr.TimePointContext(time_point="follow-up", subject_time_point_identifier=followup_id[:64])}
    groups, outside = [], []
    for row in rows:
        n = int(row["lesion"])
        if n in segments:
            groups += _tracked_groups(row, items[f"lesion {n}"], seg, anchors[n], series, algorithm, uid_seed,
                                      time_points)
        else:
            outside.append(text_item(OUTSIDE_BASELINE, _outside_text(row)))
    sr = save_report(out_path, report_evidence(series, seg), groups, context, uid_seed=uid_seed,
                     series_number=series_number, description="bonemets follow-up report",
                     evaluations=[*_summary_items(summary), *outside],
                     verify=lambda tmp: _verify_followup(tmp, rows, summary, segments, anchors, series))
    log.info("%s: TID 1500 follow-up report of %d tracked lesion(s)", out_path, len(rows))
    return {"written": True, "path": str(out_path), "bytes": out_path.stat().st_size, **report_identity(sr),
            "lesions": len(rows), "referenced_seg": None if seg is None else str(seg.SOPInstanceUID),
            "segments": {str(k): v for k, v in sorted(segments.items())},
            "verified": "read back with highdicom: every tracked lesion's status, volumes, change, segment and "
                        "outline, and the summary counts, volumes and new-lesions rule"}
