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

The TID 1500 scaffolding here (finding sites, tracking identifiers, SEG references, evidence,
observer, saving with a read-back, reading groups and values) is shared with ``followup``'s report
(:mod:`analysis.monitoring.followup_sr`), which sits in the monitoring room beside the follow-up
whose statuses (:mod:`analysis.lesions.change`) it reports.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from analysis import __version__
from analysis.errors import InputError
from analysis.imaging.dicom import DicomSeries
from analysis.imaging.dicom_seg import PROPERTY_TYPE, _with_defaults, result_uid
from analysis.imaging.io import atomic_file

log = logging.getLogger(__name__)

__all__ = ["BONE_SITES", "VOLUME", "CM3", "HU_NAME", "HU", "TOTAL_ID", "RTOL", "write_measurement_report",
           "read_measurement_report", "finding_site", "tracking_identifier", "referenced_segment", "read_groups",
           "measurement_value", "report_identity", "read_seg", "report_evidence", "observer", "save_report"]

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
#: Tracking identifier of the patient-level group (TID 1501) of a report.
TOTAL_ID = "all lesions"
#: Relative tolerance of a read-back value (DS holds at most 16 characters).
RTOL = 1e-6


def finding_site(row: Mapping[str, Any]) -> list[hd.sr.FindingSite] | None:
    """The TID 1411 finding site of a lesions.csv row's ``bone`` (:data:`BONE_SITES`), or None."""
    bone = row.get("bone")
    if not bone:
        return None
    # an extremity is told apart only when the row says whether it bears weight (followup rows do not)
    key = (bone, bool(row["weight_bearing"])) if "weight_bearing" in row else bone
    code = BONE_SITES.get(key) or BONE_SITES.get(bone)
    return None if code is None else [hd.sr.FindingSite(anatomic_location=code)]


def tracking_identifier(item: pydicom.Dataset | None, uid_seed: str, identifier: str) -> hd.sr.TrackingIdentifier:
    """The tracking identifier: the segment's TrackingUID, or (no segment) one derived from ``uid_seed``."""
    uid = item.get("TrackingUID") if item is not None else None
    return hd.sr.TrackingIdentifier(uid=uid or result_uid(uid_seed, identifier), identifier=identifier)


def referenced_segment(seg: pydicom.Dataset, item: pydicom.Dataset) -> hd.sr.ReferencedSegment:
    """Segment ``item`` of ``seg`` as a TID 1411 referenced segment.

    Built here: ``ReferencedSegment.from_segmentation`` needs per-frame segment items, which a
    one-segment SEG shares.
    """
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=int(item.SegmentNumber),
        source_series=hd.sr.SourceSeriesForSegmentation(str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)))


def _segment_of(seg: pydicom.Dataset, lesion: int) -> pydicom.Dataset | None:
    """The segment item of lesion ``lesion``: TrackingID "lesion N" (a reviewed SEG numbers its
    segments 1..K but keeps the lesion ids), else segment number N (a SEG without tracking ids)."""
    items = list(seg.SegmentSequence)
    tracked = next((s for s in items if s.get("TrackingID") == f"lesion {lesion}"), None)
    if tracked is not None:
        return tracked
    return next((s for s in items if "TrackingID" not in s and int(s.SegmentNumber) == lesion), None)


def _lesion_group(row: Mapping[str, Any], seg: pydicom.Dataset | None, algorithm: hd.sr.AlgorithmIdentification,
                  uid_seed: str) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    n = int(row["lesion_id"])
    item = None if seg is None else _segment_of(seg, n)
    tracking = tracking_identifier(item, uid_seed, f"lesion {n}")
    measurements = [
        hd.sr.Measurement(name=VOLUME, value=float(row["volume_ml"]), unit=CM3, algorithm_id=algorithm),
        hd.sr.Measurement(name=HU_NAME, value=float(row["hu_mean"]), unit=HU, derivation=codes.SCT.Mean,
                          algorithm_id=algorithm),
        hd.sr.Measurement(name=HU_NAME, value=float(row["hu_max"]), unit=HU, derivation=codes.SCT.Maximum,
                          algorithm_id=algorithm),
    ]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, referenced_segment=None if item is None else referenced_segment(seg, item),
        finding_type=PROPERTY_TYPE,
        algorithm_id=algorithm, finding_sites=finding_site(row), measurements=measurements)


def _total_group(rows: Sequence[Mapping[str, Any]], algorithm: hd.sr.AlgorithmIdentification,
                 uid_seed: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    total = float(sum(float(r["volume_ml"]) for r in rows))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=result_uid(uid_seed, TOTAL_ID), identifier=TOTAL_ID),
        finding_type=PROPERTY_TYPE, algorithm_id=algorithm,
        measurements=[hd.sr.Measurement(name=codes.SCT.NumberOfLesions, value=len(rows), unit=codes.UCUM.NoUnits,
                                        algorithm_id=algorithm),
                      hd.sr.Measurement(name=VOLUME, value=total, unit=CM3, algorithm_id=algorithm)])


def read_groups(path: str | os.PathLike) -> tuple[hd.sr.Comprehensive3DSR, list[Any], list[Any], Any]:
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


def measurement_value(group: Any, name: Any, derivation: Any = None) -> float | None:
    """The first measurement ``name`` (with ``derivation``) of ``group``, or None."""
    for m in group.get_measurements(name=name):
        if derivation is None or (m.derivation is not None and m.derivation.value == derivation.value):
            return float(m.value)
    return None


def report_identity(sr: pydicom.Dataset) -> dict[str, Any]:
    """The report's SOP Instance, Series and Study UIDs (the records' keys), its series description
    and its verification (flag and verifying observer, None when unverified)."""
    observers = sr.get("VerifyingObserverSequence") or []
    return {"sop_instance_uid": str(sr.SOPInstanceUID), "series_instance_uid": str(sr.SeriesInstanceUID),
            "study_uid": str(sr.StudyInstanceUID), "series_description": str(sr.get("SeriesDescription", "")),
            "verification_flag": str(sr.get("VerificationFlag", "")),
            "verifying_observer": str(observers[0].VerifyingObserverName) if observers else None}


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
    sr, groups, _, total = read_groups(path)
    value = measurement_value
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
            "total_volume_ml": None if total is None else value(total, VOLUME), **report_identity(sr)}


def _verify(path: Path, rows: Sequence[Mapping[str, Any]], segments: Mapping[int, int] | None,
            observer: str | None) -> None:
    back = read_measurement_report(path)
    got = {r["lesion_id"]: r for r in back["lesions"]}
    if sorted(got) != sorted(int(r["lesion_id"]) for r in rows) or back["count"] != len(rows):
        raise InputError(f"{path}: the report read back lists lesions {sorted(got)} (count {back['count']}); "
                         f"expected {len(rows)}; not written")
    for row in rows:
        n = int(row["lesion_id"])
        for key in ("volume_ml", "hu_mean", "hu_max"):
            if not math.isclose(got[n][key], float(row[key]), rel_tol=RTOL, abs_tol=1e-9):
                raise InputError(f"{path}: lesion {n} {key} read back {got[n][key]}, expected {row[key]}; not written")
        if segments is not None and got[n]["segment"] != segments[n]:
            raise InputError(f"{path}: lesion {n} references segment {got[n]['segment']}, expected {segments[n]}; "
                             f"not written")
    if back["verifying_observer"] != observer:
        raise InputError(f"{path}: verifying observer read back {back['verifying_observer']!r}, expected {observer!r}; "
                         f"not written")
    total = sum(float(r["volume_ml"]) for r in rows)
    if not math.isclose(back["total_volume_ml"], total, rel_tol=RTOL, abs_tol=1e-9):
        raise InputError(f"{path}: total volume read back {back['total_volume_ml']}, expected {total}; not written")


def write_measurement_report(series: DicomSeries, out_path: str | os.PathLike, *,
                             lesions: Sequence[Mapping[str, Any]], seg_path: str | os.PathLike | None,
                             model_name: str, model_version: str, uid_seed: str,
                             series_number: int = 9901, series_description: str | None = None,
                             verifying_observer: str | None = None,
                             verifying_organization: str = "bonemets review") -> dict[str, Any]:
    """Write the lesions of one series as a TID 1500 report (module docstring), read back before
    it is moved into place.

    A report verified by a reader (``verifying_observer``) is final: CompletionFlag COMPLETE,
    VerificationFlag VERIFIED, the reader in VerifyingObserverSequence (PS3.3 C.17.2); without one
    it is the model's preliminary report (UNVERIFIED).

    Args:
        series: the source series (its files are the report's evidence).
        out_path: the SR file to write (its folder is created).
        lesions: one mapping per lesion with ``lesion_id`` (1..N), ``volume_ml``, ``hu_mean``,
            ``hu_max`` and optionally ``bone`` (a region name of ``lesions.csv``, or None) and
            ``weight_bearing`` (rows of ``lesions.csv``).
        seg_path: the DICOM SEG of the same lesions, one segment per lesion (TrackingID "lesion N";
            segment N = lesion N in a SEG without tracking ids), or None (no lesion voxels: no SEG;
            the report then says 0 lesions).
        model_name: AlgorithmName and the device observer's name.
        model_version: AlgorithmVersion (the model's fingerprint).
        uid_seed: the Series/SOP Instance UIDs (and tracking UIDs without a SEG) derive from it
            (:func:`analysis.imaging.dicom_seg.result_uid`): a resend replaces.
        series_number: SeriesNumber of the report.
        series_description: SeriesDescription; default ``"bonemets <model_name> report"``.
        verifying_observer: the reader who verified the report (VerifyingObserverName), or None.
        verifying_organization: the reader's organisation (VerifyingOrganization, required with one).

    Returns:
        ``{"written": True, "path", "bytes", "sop_instance_uid", "series_instance_uid",
        "study_uid", "series_description", "verification_flag", "verifying_observer", "lesions",
        "total_volume_ml", "referenced_seg", "verified"}``.

    Raises:
        InputError: unreadable source headers or SEG, a SEG without a lesion's segment, or a
            report that does not read back equal (nothing is left behind).
    """
    out_path = Path(out_path)
    if lesions and seg_path is None:
        raise InputError(f"{out_path}: {len(lesions)} lesion(s) but no SEG to reference; write the SEG first")
    seg = None if seg_path is None else read_seg(seg_path)
    segments = None
    if seg is not None:
        found = {int(r["lesion_id"]): _segment_of(seg, int(r["lesion_id"])) for r in lesions}
        missing = sorted(n for n, item in found.items() if item is None)
        if missing:
            raise InputError(f"{seg_path}: the SEG has no segment {missing[0]} (of {len(missing)} lesion(s) without "
                             f"one); expected one segment per lesion (write_dicom_seg(labels=...))")
        segments = {n: int(item.SegmentNumber) for n, item in found.items()}
    algorithm, context = observer(model_name, model_version)
    rows = sorted(lesions, key=lambda r: int(r["lesion_id"]))
    groups = [_lesion_group(r, seg, algorithm, uid_seed) for r in rows] + [_total_group(rows, algorithm, uid_seed)]
    verification = None if verifying_observer is None else (verifying_observer, verifying_organization)
    sr = save_report(out_path, report_evidence(series, seg), groups, context, uid_seed=uid_seed,
                     series_number=series_number, description=series_description or f"bonemets {model_name} report",
                     verification=verification, verify=lambda tmp: _verify(tmp, rows, segments, verifying_observer))
    total = sum(float(r["volume_ml"]) for r in rows)
    log.info("%s: TID 1500 report of %d lesion(s), %.3f ml", out_path, len(rows), total)
    return {"written": True, "path": str(out_path), "bytes": out_path.stat().st_size, **report_identity(sr),
            "lesions": len(rows), "total_volume_ml": total,
            "referenced_seg": None if seg is None else str(seg.SOPInstanceUID),
            "verified": "read back with highdicom: every lesion's volume, mean and max HU and segment, and the total"}


def read_seg(seg_path: str | os.PathLike) -> pydicom.Dataset:
    """The DICOM SEG a report references (:class:`InputError` when unreadable)."""
    try:
        return pydicom.dcmread(seg_path)
    except Exception as exc:  # pydicom raises many kinds for a damaged file
        raise InputError(f"{seg_path}: unreadable DICOM SEG ({type(exc).__name__})") from None


def report_evidence(series: DicomSeries, seg: pydicom.Dataset | None) -> list[pydicom.Dataset]:
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


def observer(model_name: str, model_version: str) -> tuple[hd.sr.AlgorithmIdentification, hd.sr.ObservationContext]:
    """The algorithm (TID 4019) and the device observer (TID 1004) of a report."""
    algorithm = hd.sr.AlgorithmIdentification(name=model_name[:64], version=model_version[:64])
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=result_uid(model_version, "device observer"),
                                                       name=model_name[:64], manufacturer_name="bonemets",
                                                       model_name=model_name[:64])
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    return algorithm, context


def save_report(out_path: Path, evidence: list[pydicom.Dataset], groups: list[Any], context: hd.sr.ObservationContext, *,
          uid_seed: str, series_number: int, description: str,
          verify: Callable[[Path], None], verification: tuple[str, str] | None = None) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 report, save it to a temporary file, ``verify`` it and move it into place;
    ``verification``: ``(observer, organisation)`` of a verified, final report."""
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
                                     imaging_measurements=groups)
    verified = {} if verification is None else {
        "is_final": True, "is_verified": True, "verifying_observer_name": verification[0][:64],
        "verifying_organization": verification[1][:64]}
    with warnings.catch_warnings():  # a reader's user name is one PN component, as it is meant to be
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence, content=report, series_instance_uid=result_uid(uid_seed, "sr-series"),
            series_number=series_number, sop_instance_uid=result_uid(uid_seed, "sr"), instance_number=1,
            manufacturer="bonemets", is_complete=True, series_description=description[:64],
            software_versions=f"bonemets {__version__}", **verified)
    with atomic_file(out_path, suffix=".dcm") as tmp:
        sr.save_as(tmp, enforce_file_format=True)
        verify(tmp)
    return sr
