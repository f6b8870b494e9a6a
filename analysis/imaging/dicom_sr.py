"""A lesion measurement report as a DICOM Comprehensive 3D SR, TID 1500 ("Measurement Report"),
written with highdicom and verified by reading it back.

What a radiologist reads from a PACS instead of ``lesions.csv``:

- one TID 1411 volumetric measurement group per lesion, with a tracking identifier (text
  ``"lesion N"``, N the ``lesion_id`` of ``lesions.csv``, and a UID: the segment's TrackingUID in
  the SEG, or one derived from ``uid_seed``), the lesion referenced as segment N of the DICOM
  SEG (:mod:`analysis.imaging.dicom_seg`, one segment per lesion), finding type SCT 14799000
  "Neoplasm, Secondary" (the SEG's property type), and the measurements:

  * SCT 118565006 "Volume" in UCUM ``cm3`` (1 cm3 = 1 ml: ``volume_ml``);
  * DCM 112031 "Attenuation Coefficient" in UCUM ``[hnsf'U]`` with derivation SCT 373098007
    "Mean" (``hu_mean``) and SCT 56851009 "Maximum" (``hu_max``), the way dcmqi and 3D Slicer's
    Quantitative Reporting encode region statistics (TID 1419 concept + CID 7464 derivation);

  and, when a bone map is known, the finding site (TID 1411 row 7, SNOMED CT body structures:
  :data:`BONE_SITES`);
- one TID 1501 measurement group "all lesions" with SCT 246206008 "Number of lesions" (UCUM
  ``1``) and the total Volume (``cm3``), the patient-level numbers of ``patients.csv``;
- the algorithm's name and version (TID 4019) in every group, and the model as the device
  observer (TID 1004).

The report sits in the source's Study (highdicom copies Patient/Study from the evidence: the
SEG, then the source images) and lists the SEG and the source series as evidence.

:func:`write_followup_report` writes ``followup``'s comparison of two CTs the same way (one group
per tracked lesion with its status, volumes at both time points and change; a patient-level group
with the counts per status), sharing the SEG references, evidence, observer and read-back of
:func:`write_measurement_report`; its concepts without a standard code use the private coding
scheme ``99BONEMETS``.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from analysis import __version__
from analysis.errors import InputError
from analysis.imaging.dicom import DicomSeries
from analysis.imaging.dicom_seg import PROPERTY_TYPE, _with_defaults, names_from_source, result_uid
from analysis.imaging.io import atomic_file

log = logging.getLogger(__name__)

__all__ = ["BONE_SITES", "write_measurement_report", "read_measurement_report", "write_followup_report",
           "read_followup_report"]

#: Finding sites of the project's bone regions (``bone`` of ``lesions.csv``), SNOMED CT body
#: structures as pydicom's SNOMED table (from DICOM PS3.16) names them. "extremity" is told apart
#: by ``weight_bearing`` (lower limb: weight-bearing, analysis.lesions.WEIGHT_BEARING_CODES).
BONE_SITES = {
    "skull": codes.SCT.BoneStructureOfCranium,      # 89546000
    "spine": codes.SCT.BoneStructureOfSpine,        # 51282000
    "rib": codes.SCT.BoneStructureOfRib,            # 113197003
    "pelvis": codes.SCT.BoneStructureOfPelvis,      # 118645006
    ("extremity", False): codes.SCT.BoneOfUpperLimb,  # 371195002
    ("extremity", True): codes.SCT.BoneOfLowerLimb,   # 72001000
    "other": codes.SCT.BoneStructure,               # 272673000
}
VOLUME = codes.SCT.Volume
CM3 = codes.UCUM.CubicCentimeter
HU_NAME = codes.DCM.AttenuationCoefficient
HU = codes.UCUM.HounsfieldUnit
TOTAL_ID = "all lesions"
#: Relative tolerance of a read-back value (DS holds at most 16 characters).
_RTOL = 1e-6


def _site(row: Mapping[str, Any]) -> list[hd.sr.FindingSite] | None:
    bone = row.get("bone")
    if not bone:
        return None
    # an extremity is told apart only when the row says whether it bears weight (followup rows do not)
    key = (bone, bool(row["weight_bearing"])) if "weight_bearing" in row else bone
    code = BONE_SITES.get(key) or BONE_SITES.get(bone)
    return None if code is None else [hd.sr.FindingSite(anatomic_location=code)]


def _tracking(item: pydicom.Dataset | None, uid_seed: str, identifier: str) -> hd.sr.TrackingIdentifier:
    """The tracking identifier: the segment's TrackingUID, or (no segment) one derived from ``uid_seed``."""
    uid = item.get("TrackingUID") if item is not None else None
    return hd.sr.TrackingIdentifier(uid=uid or result_uid(uid_seed, identifier), identifier=identifier)


def _reference(seg: pydicom.Dataset, item: pydicom.Dataset) -> hd.sr.ReferencedSegment:
    """Segment ``item`` of ``seg`` as a TID 1411 referenced segment.

    Built here: ``ReferencedSegment.from_segmentation`` needs per-frame segment items, which a
    one-segment SEG shares.
    """
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=int(item.SegmentNumber),
        source_series=hd.sr.SourceSeriesForSegmentation(str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)))


def _lesion_group(row: Mapping[str, Any], seg: pydicom.Dataset | None, algorithm: hd.sr.AlgorithmIdentification,
                  uid_seed: str) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    n = int(row["lesion_id"])
    item = None if seg is None else next(s for s in seg.SegmentSequence if int(s.SegmentNumber) == n)
    tracking = _tracking(item, uid_seed, f"lesion {n}")
    measurements = [
        hd.sr.Measurement(name=VOLUME, value=float(row["volume_ml"]), unit=CM3, algorithm_id=algorithm),
        hd.sr.Measurement(name=HU_NAME, value=float(row["hu_mean"]), unit=HU, derivation=codes.SCT.Mean,
                          algorithm_id=algorithm),
        hd.sr.Measurement(name=HU_NAME, value=float(row["hu_max"]), unit=HU, derivation=codes.SCT.Maximum,
                          algorithm_id=algorithm),
    ]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, referenced_segment=None if item is None else _reference(seg, item),
        finding_type=PROPERTY_TYPE,
        algorithm_id=algorithm, finding_sites=_site(row), measurements=measurements)


def _total_group(rows: Sequence[Mapping[str, Any]], algorithm: hd.sr.AlgorithmIdentification,
                 uid_seed: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    total = float(sum(float(r["volume_ml"]) for r in rows))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=result_uid(uid_seed, TOTAL_ID), identifier=TOTAL_ID),
        finding_type=PROPERTY_TYPE, algorithm_id=algorithm,
        measurements=[hd.sr.Measurement(name=codes.SCT.NumberOfLesions, value=len(rows), unit=codes.UCUM.NoUnits,
                                        algorithm_id=algorithm),
                      hd.sr.Measurement(name=VOLUME, value=total, unit=CM3, algorithm_id=algorithm)])


def _read_groups(path: str | os.PathLike) -> tuple[hd.sr.Comprehensive3DSR, list[Any], list[Any], Any]:
    """``(report, volumetric groups, other lesion groups (TID 1501), the "all lesions" group or None)``.

    Raises:
        InputError: not a readable TID 1500 report.
    """
    try:
        sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
        content = sr.content
        groups = content.get_volumetric_roi_measurement_groups()
        image_groups = content.get_image_measurement_groups()
    except Exception as exc:  # highdicom/pydicom raise many kinds for a foreign file
        raise InputError(f"{path}: not a readable TID 1500 measurement report ({type(exc).__name__}: {exc})") from None
    totals = [g for g in image_groups if str(g.tracking_identifier) == TOTAL_ID]
    others = [g for g in image_groups if str(g.tracking_identifier) != TOTAL_ID]
    return sr, groups, others, totals[0] if totals else None


def _value(group: Any, name: Any, derivation: Any = None) -> float | None:
    """The first measurement ``name`` (with ``derivation``) of ``group``, or None."""
    for m in group.get_measurements(name=name):
        if derivation is None or (m.derivation is not None and m.derivation.value == derivation.value):
            return float(m.value)
    return None


def _identity(sr: pydicom.Dataset) -> dict[str, str]:
    return {"sop_instance_uid": str(sr.SOPInstanceUID), "series_instance_uid": str(sr.SeriesInstanceUID),
            "study_uid": str(sr.StudyInstanceUID)}


def read_measurement_report(path: str | os.PathLike) -> dict[str, Any]:
    """The numbers of a report written by :func:`write_measurement_report`, read with highdicom.

    Returns:
        ``{"lesions": [{"lesion_id", "tracking_uid", "volume_ml", "hu_mean", "hu_max", "site",
        "segment"}...], "count": int, "total_volume_ml": float, "sop_instance_uid": str,
        "series_instance_uid": str, "study_uid": str}``; ``site`` is a SNOMED CT code value or
        None, ``segment`` the referenced SEG segment number or None.

    Raises:
        InputError: not a readable TID 1500 report.
    """
    sr, groups, _, total = _read_groups(path)
    value = _value
    lesions = []
    for g in groups:
        ident = str(g.tracking_identifier)
        ref = g.referenced_segment
        segment = None if ref is None else int(ref.referenced_segment_numbers[0])
        sites = g.finding_sites
        lesions.append({"lesion_id": int(ident.split()[-1]) if ident.startswith("lesion ") else None,
                        "tracking_uid": str(g.tracking_uid), "volume_ml": value(g, VOLUME),
                        "hu_mean": value(g, HU_NAME, codes.SCT.Mean), "hu_max": value(g, HU_NAME, codes.SCT.Maximum),
                        "site": str(sites[0].value.value) if sites else None, "segment": segment})
    return {"lesions": lesions, "count": None if total is None else int(value(total, codes.SCT.NumberOfLesions)),
            "total_volume_ml": None if total is None else value(total, VOLUME), **_identity(sr)}


def _verify(path: Path, rows: Sequence[Mapping[str, Any]], with_seg: bool) -> None:
    back = read_measurement_report(path)
    got = {r["lesion_id"]: r for r in back["lesions"]}
    if sorted(got) != sorted(int(r["lesion_id"]) for r in rows) or back["count"] != len(rows):
        raise InputError(f"{path}: the report read back lists lesions {sorted(got)} (count {back['count']}); "
                         f"expected {len(rows)}; not written")
    for row in rows:
        n = int(row["lesion_id"])
        for key in ("volume_ml", "hu_mean", "hu_max"):
            if not math.isclose(got[n][key], float(row[key]), rel_tol=_RTOL, abs_tol=1e-9):
                raise InputError(f"{path}: lesion {n} {key} read back {got[n][key]}, expected {row[key]}; not written")
        if with_seg and got[n]["segment"] != n:
            raise InputError(f"{path}: lesion {n} references segment {got[n]['segment']}; not written")
    total = sum(float(r["volume_ml"]) for r in rows)
    if not math.isclose(back["total_volume_ml"], total, rel_tol=_RTOL, abs_tol=1e-9):
        raise InputError(f"{path}: total volume read back {back['total_volume_ml']}, expected {total}; not written")


def write_measurement_report(series: DicomSeries, out_path: str | os.PathLike, *,
                             lesions: Sequence[Mapping[str, Any]], seg_path: str | os.PathLike | None,
                             model_name: str, model_version: str, uid_seed: str,
                             series_number: int = 9901) -> dict[str, Any]:
    """Write the lesions of one series as a TID 1500 report (module docstring), read back before
    it is moved into place.

    Args:
        series: the source series (its files are the report's evidence).
        out_path: the SR file to write (its folder is created).
        lesions: one mapping per lesion with ``lesion_id`` (1..N), ``volume_ml``, ``hu_mean``,
            ``hu_max`` and optionally ``bone`` (a region name of ``lesions.csv``, or None) and
            ``weight_bearing`` (rows of ``lesions.csv``).
        seg_path: the DICOM SEG of the same lesions, one segment per lesion (segment N = lesion
            N), or None (no lesion voxels: no SEG; the report then says 0 lesions).
        model_name: AlgorithmName and the device observer's name.
        model_version: AlgorithmVersion (the model's fingerprint).
        uid_seed: the Series/SOP Instance UIDs (and tracking UIDs without a SEG) derive from it
            (:func:`analysis.imaging.dicom_seg.result_uid`): a resend replaces.
        series_number: SeriesNumber of the report.

    Returns:
        ``{"written": True, "path", "bytes", "sop_instance_uid", "series_instance_uid",
        "study_uid", "lesions", "total_volume_ml", "referenced_seg", "verified"}``.

    Raises:
        InputError: unreadable source headers or SEG, a SEG without a lesion's segment, or a
            report that does not read back equal (nothing is left behind).
    """
    out_path = Path(out_path)
    if lesions and seg_path is None:
        raise InputError(f"{out_path}: {len(lesions)} lesion(s) but no SEG to reference; write the SEG first")
    seg = None if seg_path is None else _read_seg(seg_path)
    if seg is not None:
        numbers = {int(item.SegmentNumber) for item in seg.SegmentSequence}
        missing = sorted({int(r["lesion_id"]) for r in lesions} - numbers)
        if missing:
            raise InputError(f"{seg_path}: the SEG has no segment {missing[0]} (of {len(missing)} lesion(s) without "
                             f"one); expected one segment per lesion (write_dicom_seg(labels=...))")
    algorithm, context = _observer(model_name, model_version)
    rows = sorted(lesions, key=lambda r: int(r["lesion_id"]))
    groups = [_lesion_group(r, seg, algorithm, uid_seed) for r in rows] + [_total_group(rows, algorithm, uid_seed)]
    sr = _save(out_path, _evidence(series, seg), groups, context, uid_seed=uid_seed, series_number=series_number,
               description=f"bonemets {model_name} report", verify=lambda tmp: _verify(tmp, rows, seg is not None))
    total = sum(float(r["volume_ml"]) for r in rows)
    log.info("%s: TID 1500 report of %d lesion(s), %.3f ml", out_path, len(rows), total)
    return {"written": True, "path": str(out_path), "bytes": out_path.stat().st_size, **_identity(sr),
            "lesions": len(rows), "total_volume_ml": total,
            "referenced_seg": None if seg is None else str(seg.SOPInstanceUID),
            "verified": "read back with highdicom: every lesion's volume, mean and max HU and segment, and the total"}


def _read_seg(seg_path: str | os.PathLike) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(seg_path)
    except Exception as exc:  # pydicom raises many kinds for a damaged file
        raise InputError(f"{seg_path}: unreadable DICOM SEG ({type(exc).__name__})") from None


def _evidence(series: DicomSeries, seg: pydicom.Dataset | None) -> list[pydicom.Dataset]:
    """The report's evidence: the SEG (first: highdicom copies Patient/Study from it), then the
    source series' headers."""
    evidence: list[pydicom.Dataset] = [] if seg is None else [seg]
    thickness = series.slice_thickness or series.slice_spacing
    for f in sorted(set(series.files)):
        try:
            evidence.append(_with_defaults(pydicom.dcmread(f, stop_before_pixels=True), thickness))
        except Exception as exc:  # pydicom raises many kinds for a damaged file
            raise InputError(f"{f}: unreadable DICOM header ({type(exc).__name__})") from None
    return evidence


def _observer(model_name: str, model_version: str) -> tuple[hd.sr.AlgorithmIdentification, hd.sr.ObservationContext]:
    """The algorithm (TID 4019) and the device observer (TID 1004) of a report."""
    algorithm = hd.sr.AlgorithmIdentification(name=model_name[:64], version=model_version[:64])
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=result_uid(model_version, "device observer"),
                                                       name=model_name[:64], manufacturer_name="bonemets",
                                                       model_name=model_name[:64])
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    return algorithm, context


def _save(out_path: Path, evidence: list[pydicom.Dataset], groups: list[Any], context: hd.sr.ObservationContext, *,
          uid_seed: str, series_number: int, description: str,
          verify: Callable[[Path], None]) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 report, save it to a temporary file, ``verify`` it and move it into place."""
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
                                     imaging_measurements=groups)
    with names_from_source():  # Patient/Study are the evidence's own
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence, content=report, series_instance_uid=result_uid(uid_seed, "sr-series"),
            series_number=series_number, sop_instance_uid=result_uid(uid_seed, "sr"), instance_number=1,
            manufacturer="bonemets", is_complete=True, series_description=description[:64],
            software_versions=f"bonemets {__version__}")
    with atomic_file(out_path, suffix=".dcm") as tmp:
        sr.save_as(tmp, enforce_file_format=True)
        verify(tmp)
    return sr


# ---- the follow-up report (``followup --sr``) ------------------------------------------------------

#: Private coding scheme of the concepts no DICOM/SNOMED CT code in pydicom 3.0.2's tables fits
#: (PS3.16 8.2: a private scheme designator starts with "99").
PRIVATE_SCHEME = "99BONEMETS"
#: Concept name of a tracked lesion's follow-up status (qualitative evaluation).
STATUS = hd.sr.CodedConcept("FUSTATUS", PRIVATE_SCHEME, "Follow-up status")
#: Values of :data:`STATUS`: SNOMED CT where a finding fits (pydicom's tables, from PS3.16: "New
#: finding" and the size changes are CID 6002 "Change Since Last Mammogram or Prior Surgery"
#: values, "No change" is in CID 3235), a private code for "resolved" (SNOMED CT's "Problem
#: resolved" is a problem-list status, not an imaging finding).
STATUS_CODES: dict[str, Any] = {
    "new": codes.SCT.NewFinding,            # 129721008
    "resolved": hd.sr.CodedConcept("RESOLVED", PRIVATE_SCHEME, "Resolved"),
    "grown": codes.SCT.IncreaseInSize,      # 15454001
    "shrunk": codes.SCT.DecreaseInSize,     # 19776001
    "stable": codes.SCT.NoChange,           # 260388006
}
BASELINE_VOLUME = hd.sr.CodedConcept("BLVOLUME", PRIVATE_SCHEME, "Volume at baseline")
VOLUME_CHANGE = hd.sr.CodedConcept("VOLCHANGE", PRIVATE_SCHEME, "Volume change since baseline")
RELATIVE_CHANGE = hd.sr.CodedConcept("RELVOLCHANGE", PRIVATE_SCHEME, "Relative volume change since baseline")
BASELINE_COUNT = hd.sr.CodedConcept("BLLESIONS", PRIVATE_SCHEME, "Number of lesions at baseline")
#: Patient-level counts per status (summary.csv's new, resolved, grown, shrunk, stable).
STATUS_COUNTS = {name: hd.sr.CodedConcept(f"N{name.upper()}", PRIVATE_SCHEME, f"Number of {name} lesions")
                 for name in STATUS_CODES}
#: summary.csv's ``new_lesions_flag`` (value SCT Yes / No).
NEW_LESIONS_RULE = hd.sr.CodedConcept("PCWG3NEW", PRIVATE_SCHEME, "At least 2 new lesions (PCWG3 count rule)")
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
    common = dict(tracking_identifier=_tracking(item, uid_seed, ident), time_point_context=time_point,
                  finding_type=PROPERTY_TYPE, algorithm_id=algorithm, finding_sites=_site(row),
                  measurements=measurements,
                  qualitative_evaluations=[hd.sr.QualitativeEvaluation(STATUS, STATUS_CODES[row["status"]])])
    if item is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(**common)
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=_reference(seg, item), **common)


def _followup_total(summary: Mapping[str, Any], algorithm: hd.sr.AlgorithmIdentification, uid_seed: str,
                    time_point: hd.sr.TimePointContext) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    counts = [(codes.SCT.NumberOfLesions, int(summary["followup_lesions"])),
              (BASELINE_COUNT, int(summary["baseline_lesions"]))]
    counts += [(STATUS_COUNTS[name], int(summary[name])) for name in STATUS_CODES]
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
    for status, code in STATUS_CODES.items():
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
    sr, volumetric, others, total = _read_groups(path)
    lesions = []
    for g in [*volumetric, *others]:
        ident = str(g.tracking_identifier)
        ref = getattr(g, "referenced_segment", None)
        sites = g.finding_sites
        lesions.append({
            "lesion": int(ident.split()[-1]) if ident.startswith("lesion ") else None,
            "tracking_uid": str(g.tracking_uid), "status": _status_of(_coded(g, STATUS)),
            "followup_ml": _value(g, VOLUME), "baseline_ml": _value(g, BASELINE_VOLUME),
            "change_ml": _value(g, VOLUME_CHANGE), "change_pct": _value(g, RELATIVE_CHANGE),
            "segment": None if ref is None else int(ref.referenced_segment_numbers[0]),
            "site": str(sites[0].value.value) if sites else None, "time_point": _time_point(g)})
    lesions.sort(key=lambda r: (r["lesion"] is None, r["lesion"] or 0))
    summary = None
    if total is not None:
        count = {name: _value(total, concept) for name, concept in STATUS_COUNTS.items()}
        flag = _coded(total, NEW_LESIONS_RULE)
        summary = {"baseline_lesions": _value(total, BASELINE_COUNT),
                   "followup_lesions": _value(total, codes.SCT.NumberOfLesions), **count,
                   "baseline_ml": _value(total, BASELINE_VOLUME), "followup_ml": _value(total, VOLUME),
                   "change_ml": _value(total, VOLUME_CHANGE), "change_pct": _value(total, RELATIVE_CHANGE),
                   "new_lesions_flag": None if flag is None else int(flag.value == codes.SCT.Yes.value)}
        summary = {k: (int(v) if k.endswith("lesions") or k in STATUS_COUNTS else v) if v is not None else None
                   for k, v in summary.items()}
    return {"lesions": lesions, "summary": summary, "time_point": None if total is None else _time_point(total),
            **_identity(sr)}


def _close(got: float | None, expected: float | None) -> bool:
    if got is None or expected is None:
        return got is None and expected is None
    return math.isclose(got, expected, rel_tol=_RTOL, abs_tol=1e-9)


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
      evaluation :data:`STATUS` with a value of :data:`STATUS_CODES`; the finding site as in
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
    unknown = sorted({str(r["status"]) for r in rows} - set(STATUS_CODES))
    if unknown:
        raise InputError(f"{out_path}: status {unknown[0]!r}; expected one of {', '.join(STATUS_CODES)}")
    seg = None if seg_path is None else _read_seg(seg_path)
    items = [] if seg is None else list(seg.SegmentSequence)
    tracked = [s for s in items if str(s.get("TrackingID", "")).startswith("lesion ")]
    segments = {int(str(s.TrackingID).split()[-1]): int(s.SegmentNumber) for s in tracked}
    algorithm, context = _observer(model_name, model_version)
    time_point = hd.sr.TimePointContext(time_point="follow-up", time_point_order=2,
                                        subject_time_point_identifier=followup_id[:64])
    groups = [_tracked_group(r, seg, algorithm, uid_seed, time_point) for r in rows]
    groups.append(_followup_total(summary, algorithm, uid_seed, time_point))
    sr = _save(out_path, _evidence(series, seg), groups, context, uid_seed=uid_seed, series_number=series_number,
               description="bonemets follow-up report",
               verify=lambda tmp: _verify_followup(tmp, rows, summary, segments))
    log.info("%s: TID 1500 follow-up report of %d tracked lesion(s)", out_path, len(rows))
    return {"written": True, "path": str(out_path), "bytes": out_path.stat().st_size, **_identity(sr),
            "lesions": len(rows), "referenced_seg": None if seg is None else str(seg.SOPInstanceUID),
            "segments": {str(k): v for k, v in sorted(segments.items())},
            "verified": "read back with highdicom: every tracked lesion's status, volumes, change and segment, "
                        "and the summary counts, volumes and new-lesions rule"}
