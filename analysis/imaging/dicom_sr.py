"""A lesion measurement report as a DICOM Comprehensive 3D SR, TID 1500 ("Measurement Report"),
written with highdicom and verified by reading it back.

What a radiologist reads from a PACS instead of ``lesions.csv``, laid out so that OHIF Viewer
(3.13) draws it as well as any TID 1500 reader reads it. Per lesion, in lesion order, two
measurement groups in the Imaging Measurements container sharing one tracking identifier (text
``"lesion N"``, N the ``lesion_id`` of ``lesions.csv``) and one tracking UID (the segment's
TrackingUID in the SEG, or one derived from ``uid_seed``), which is how TID 1500 says that they
are about one finding:

- a TID 1410 planar group: the lesion's outline on the CT instance of its largest axial
  cross-section (SCOORD POLYLINE, closed; :class:`analysis.lesions.CrossSection`), with its
  bidirectional measurement there, SCT 103339001 "Long axis" and SCT 103340004 "Short axis" in
  UCUM ``mm`` (the ``long_axis_mm`` and ``short_axis_mm`` of ``lesions.csv``);
- a TID 1411 volumetric group: the lesion as segment N of the DICOM SEG
  (:mod:`analysis.imaging.dicom_seg`, one segment per lesion), with

  * SCT 118565006 "Volume" in UCUM ``cm3`` (1 cm3 = 1 ml: ``volume_ml``);
  * DCM 112031 "Attenuation Coefficient" in UCUM ``[hnsf'U]`` with derivation SCT 373098007
    "Mean" (``hu_mean``) and SCT 56851009 "Maximum" (``hu_max``), the way dcmqi and 3D Slicer's
    Quantitative Reporting encode region statistics (TID 1419 concept + CID 7464 derivation).

Both groups carry the finding type SCT 14799000 "Neoplasm, Secondary" (the SEG's property type),
the finding site when a bone map is known (SNOMED CT body structures, :data:`BONE_SITES`) and the
algorithm's name and version (TID 4019); the model is the device observer (TID 1004).

Every group in the Imaging Measurements container has image coordinates: OHIF reads a group
without a spatial coordinate as a measurement it cannot place and fails on it (OHIF issue #3390).
The patient-level numbers of ``patients.csv``, the number of lesions and their total volume, are
not a finding at a place: they go to the document-level "Qualitative Evaluations" container (TID
1500 row 12, UMLS C0034375) as TEXT items (row 14), SCT 246206008 "Number of lesions" and
:data:`TOTAL_VOLUME`. TID 1500's other place for them, "Derived Imaging Measurements" (row 10),
holds TID 1420 measurements, which must point back at the lesion groups by reference (R-INFERRED
FROM), and a by-reference item makes highdicom (0.28) refuse to read the document.

The report sits in the source's Study (highdicom copies Patient/Study from the evidence: the
SEG, then the source images) and lists the SEG and the source series as evidence.

The TID 1500 scaffolding here (finding sites, tracking identifiers, SEG references, outlines,
document-level evaluations, evidence, observer, saving with a read-back, reading groups and
values) is shared with ``followup``'s report (:mod:`analysis.monitoring.followup_sr`), which sits
in the monitoring room beside the follow-up whose statuses (:mod:`analysis.lesions.change`) it
reports.
"""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from analysis import __version__
from analysis.errors import InputError
from analysis.imaging.dicom import DicomSeries
from analysis.imaging.dicom_seg import PROPERTY_TYPE, _with_defaults, names_from_source, result_uid
from analysis.imaging.io import atomic_file

log = logging.getLogger(__name__)

__all__ = ["BONE_SITES", "VOLUME", "CM3", "HU_NAME", "HU", "LONG_AXIS", "SHORT_AXIS", "MM", "PRIVATE_SCHEME",
           "TOTAL_VOLUME", "QUALITATIVE_EVALUATIONS", "RTOL", "Anchor", "write_measurement_report",
           "read_measurement_report", "finding_site", "tracking_identifier", "referenced_segment", "planar_group",
           "read_groups", "read_outline", "measurement_value", "report_identity", "read_seg", "report_evidence",
           "observer", "text_item", "read_evaluations", "number_text", "read_number", "save_report"]

#: Private coding scheme of the concepts no DICOM/SNOMED CT code in pydicom 3.0.2's tables fits
#: (PS3.16 8.2: a private scheme designator starts with "99").
PRIVATE_SCHEME = "99BONEMETS"


def _site(code: Any, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme_designator, meaning)


#: Finding sites of the project's bone regions (``bone`` of ``lesions.csv``): SNOMED CT body
#: structures (codes from pydicom's SNOMED table, from DICOM PS3.16), with SNOMED CT's terms as
#: their meanings, without the "(body structure)" tag of a fully specified name (viewers show the
#: meaning: OHIF lists "Bone structure of spine"). "extremity" is told apart by ``weight_bearing``
#: (lower limb: weight-bearing, analysis.lesions.WEIGHT_BEARING_CODES).
BONE_SITES = {
    "skull": _site(codes.SCT.BoneStructureOfCranium, "Bone structure of cranium"),  # 89546000
    "spine": _site(codes.SCT.BoneStructureOfSpine, "Bone structure of spine"),      # 51282000
    "rib": _site(codes.SCT.BoneStructureOfRib, "Bone structure of rib"),            # 113197003
    "pelvis": _site(codes.SCT.BoneStructureOfPelvis, "Bone structure of pelvis"),   # 118645006
    ("extremity", False): _site(codes.SCT.BoneOfUpperLimb, "Bone of upper limb"),   # 371195002
    ("extremity", True): _site(codes.SCT.BoneOfLowerLimb, "Bone of lower limb"),    # 72001000
    "other": _site(codes.SCT.BoneStructure, "Bone structure"),                      # 272673000
}
VOLUME = codes.SCT.Volume
CM3 = codes.UCUM.CubicCentimeter
HU_NAME = codes.DCM.AttenuationCoefficient
HU = codes.UCUM.HounsfieldUnit
LONG_AXIS = codes.SCT.LongAxis    # 103339001 "Long axis"
SHORT_AXIS = codes.SCT.ShortAxis  # 103340004 "Short axis"
MM = codes.UCUM.Millimeter
#: The summed volume of a patient's lesions (no standard code names a total lesion volume).
TOTAL_VOLUME = hd.sr.CodedConcept("TOTALVOL", PRIVATE_SCHEME, "Total lesion volume")
#: TID 1500 row 12: the document-level container of qualitative evaluations.
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
#: Relative tolerance of a read-back value (DS holds at most 16 characters).
RTOL = 1e-6


class Anchor(Protocol):
    """Where a lesion is drawn: slice ``z`` of the source series and a closed ring ``outline``
    (``(k, 2)``, ``(col, row)`` with 0, 0 the top left corner of the first pixel), with the long and
    short axis there (:class:`analysis.lesions.CrossSection` is one)."""

    z: int
    outline: np.ndarray
    long_axis_mm: float
    short_axis_mm: float


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


def planar_group(tracking: hd.sr.TrackingIdentifier, series: DicomSeries, anchor: Anchor, *,
                 algorithm: hd.sr.AlgorithmIdentification, finding_sites: list[hd.sr.FindingSite] | None,
                 measurements: Sequence[hd.sr.Measurement] = (),
                 time_point: hd.sr.TimePointContext | None = None,
                 ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """A TID 1410 group: the closed outline ``anchor.outline`` (SCOORD POLYLINE) on the instance
    (or frame) of slice ``anchor.z`` of ``series``, with ``measurements``."""
    frames = None if series.frame_numbers is None else [int(series.frame_numbers[anchor.z])]
    source = hd.sr.SourceImageForRegion(str(series.sop_class_uid), series.sop_instance_uids[anchor.z],
                                        referenced_frame_numbers=frames)
    region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                               graphic_data=np.asarray(anchor.outline, np.float64), source_image=source)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, referenced_region=region, time_point_context=time_point,
        finding_type=PROPERTY_TYPE, algorithm_id=algorithm, finding_sites=finding_sites,
        measurements=list(measurements) or None)


def _lesion_groups(row: Mapping[str, Any], anchor: Anchor, series: DicomSeries, seg: pydicom.Dataset,
                   algorithm: hd.sr.AlgorithmIdentification, uid_seed: str) -> list[Any]:
    """A lesion's planar group (outline and axes) and volumetric group (segment, volume, HU)."""
    n = int(row["lesion_id"])
    item = _segment_of(seg, n)
    tracking = tracking_identifier(item, uid_seed, f"lesion {n}")
    axes = [hd.sr.Measurement(name=LONG_AXIS, value=float(anchor.long_axis_mm), unit=MM, algorithm_id=algorithm),
            hd.sr.Measurement(name=SHORT_AXIS, value=float(anchor.short_axis_mm), unit=MM, algorithm_id=algorithm)]
    measurements = [
        hd.sr.Measurement(name=VOLUME, value=float(row["volume_ml"]), unit=CM3, algorithm_id=algorithm),
        hd.sr.Measurement(name=HU_NAME, value=float(row["hu_mean"]), unit=HU, derivation=codes.SCT.Mean,
                          algorithm_id=algorithm),
        hd.sr.Measurement(name=HU_NAME, value=float(row["hu_max"]), unit=HU, derivation=codes.SCT.Maximum,
                          algorithm_id=algorithm),
    ]
    sites = finding_site(row)
    return [planar_group(tracking, series, anchor, algorithm=algorithm, finding_sites=sites, measurements=axes),
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking, referenced_segment=referenced_segment(seg, item),
                finding_type=PROPERTY_TYPE, algorithm_id=algorithm, finding_sites=sites, measurements=measurements)]


def number_text(value: float, unit: str = "") -> str:
    """A number as a TEXT item's value: 10 significant digits (the CSV tables'), then its unit."""
    text = f"{float(value):.10g}" if not float(value).is_integer() or unit else str(int(value))
    return f"{text} {unit}" if unit else text


def read_number(text: str | None) -> float | None:
    """The number at the start of a TEXT item's value written by :func:`number_text`, or None."""
    found = re.match(r"\s*([-+0-9.eE]+)", text or "")
    return float(found.group(1)) if found else None


def text_item(name: Any, value: str) -> hd.sr.TextContentItem:
    """A TEXT item of the Qualitative Evaluations container (TID 1500 row 14)."""
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def read_groups(path: str | os.PathLike) -> tuple[hd.sr.Comprehensive3DSR, list[Any], list[Any], list[Any]]:
    """``(report, volumetric groups (TID 1411), planar groups (TID 1410), other groups (TID 1501))``.

    Raises:
        InputError: not a readable TID 1500 report.
    """
    try:
        sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
        content = sr.content
        return (sr, content.get_volumetric_roi_measurement_groups(), content.get_planar_roi_measurement_groups(),
                content.get_image_measurement_groups())
    except Exception as exc:  # highdicom/pydicom raise many kinds for a foreign file
        raise InputError(f"{path}: not a readable TID 1500 measurement report ({type(exc).__name__}: {exc})") from None


def read_outline(group: Any) -> tuple[str, np.ndarray]:
    """A planar group's ``(referenced SOP Instance UID, (k, 2) outline points)``."""
    region = group.roi
    reference = region.ContentSequence[0].ReferencedSOPSequence[0]
    return str(reference.ReferencedSOPInstanceUID), np.asarray(region.value, np.float64).reshape(-1, 2)


def read_evaluations(sr: hd.sr.Comprehensive3DSR) -> list[pydicom.Dataset]:
    """The items of the document-level Qualitative Evaluations container (TID 1500 rows 13-14)."""
    found = hd.sr.utils.find_content_items(sr.content[0], name=QUALITATIVE_EVALUATIONS)
    return list(found[0].ContentSequence) if found and "ContentSequence" in found[0] else []


def _text_of(items: Sequence[pydicom.Dataset], name: Any) -> str | None:
    for item in items:
        code = item.ConceptNameCodeSequence[0]  # a highdicom CodedConcept: .value reads a long code value too
        if (code.value, code.scheme_designator) == (name.value, name.scheme_designator) and item.ValueType == "TEXT":
            return str(item.TextValue)
    return None


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


def _lesion_number(group: Any) -> int | None:
    ident = str(group.tracking_identifier)
    return int(ident.split()[-1]) if ident.startswith("lesion ") else None


def read_measurement_report(path: str | os.PathLike) -> dict[str, Any]:
    """The numbers of a report written by :func:`write_measurement_report`, read with highdicom.

    Returns:
        ``{"lesions": [{"lesion_id", "tracking_uid", "volume_ml", "hu_mean", "hu_max",
        "long_axis_mm", "short_axis_mm", "site", "segment", "outline_sop_instance_uid",
        "outline"}...], "count": int, "total_volume_ml": float, "sop_instance_uid": str,
        "series_instance_uid": str, "study_uid": str}``; ``site`` is a SNOMED CT code value or
        None, ``segment`` the referenced SEG segment number, ``outline`` the ``(k, 2)`` points of
        the lesion's outline on instance ``outline_sop_instance_uid`` (None without a planar group).

    Raises:
        InputError: not a readable TID 1500 report.
    """
    sr, volumetric, planar, _ = read_groups(path)
    value = measurement_value
    outlines = {str(g.tracking_uid): g for g in planar}
    lesions = []
    for g in volumetric:
        ref = g.referenced_segment
        sites = g.finding_sites
        flat = outlines.get(str(g.tracking_uid))
        sop, points = read_outline(flat) if flat is not None else (None, None)
        lesions.append({"lesion_id": _lesion_number(g), "tracking_uid": str(g.tracking_uid),
                        "volume_ml": value(g, VOLUME), "hu_mean": value(g, HU_NAME, codes.SCT.Mean),
                        "hu_max": value(g, HU_NAME, codes.SCT.Maximum),
                        "long_axis_mm": None if flat is None else value(flat, LONG_AXIS),
                        "short_axis_mm": None if flat is None else value(flat, SHORT_AXIS),
                        "site": str(sites[0].value.value) if sites else None,
                        "segment": None if ref is None else int(ref.referenced_segment_numbers[0]),
                        "outline_sop_instance_uid": sop, "outline": points})
    items = read_evaluations(sr)
    count = read_number(_text_of(items, codes.SCT.NumberOfLesions))
    return {"lesions": lesions, "count": None if count is None else int(count),
            "total_volume_ml": read_number(_text_of(items, TOTAL_VOLUME)), **report_identity(sr)}


def _verify(path: Path, rows: Sequence[Mapping[str, Any]], segments: Mapping[int, int] | None,
            anchors: Mapping[int, Anchor], series: DicomSeries, observer: str | None) -> None:
    back = read_measurement_report(path)
    got = {r["lesion_id"]: r for r in back["lesions"]}
    if sorted(got) != sorted(int(r["lesion_id"]) for r in rows) or back["count"] != len(rows):
        raise InputError(f"{path}: the report read back lists lesions {sorted(got)} (count {back['count']}); "
                         f"expected {len(rows)}; not written")
    for row in rows:
        n = int(row["lesion_id"])
        anchor = anchors[n]
        expected = {"volume_ml": row["volume_ml"], "hu_mean": row["hu_mean"], "hu_max": row["hu_max"],
                    "long_axis_mm": anchor.long_axis_mm, "short_axis_mm": anchor.short_axis_mm}
        for key, want in expected.items():
            if got[n][key] is None or not math.isclose(got[n][key], float(want), rel_tol=RTOL, abs_tol=1e-9):
                raise InputError(f"{path}: lesion {n} {key} read back {got[n][key]}, expected {want}; not written")
        if segments is not None and got[n]["segment"] != segments[n]:
            raise InputError(f"{path}: lesion {n} references segment {got[n]['segment']}, expected {segments[n]}; "
                             f"not written")
        if got[n]["outline_sop_instance_uid"] != series.sop_instance_uids[anchor.z] or not np.allclose(
                got[n]["outline"], anchor.outline):
            raise InputError(f"{path}: lesion {n}'s outline read back differs from slice {anchor.z}'s; not written")
    total = sum(float(r["volume_ml"]) for r in rows)
    if back["total_volume_ml"] is None or not math.isclose(back["total_volume_ml"], total, rel_tol=RTOL,
                                                           abs_tol=1e-9):
        raise InputError(f"{path}: total volume read back {back['total_volume_ml']}, expected {total}; not written")
    if back["verifying_observer"] != observer:
        raise InputError(f"{path}: verifying observer read back {back['verifying_observer']!r}, expected {observer!r}; "
                         f"not written")


def write_measurement_report(series: DicomSeries, out_path: str | os.PathLike, *,
                             lesions: Sequence[Mapping[str, Any]], anchors: Mapping[int, Anchor],
                             seg_path: str | os.PathLike | None, model_name: str, model_version: str,
                             uid_seed: str, series_number: int = 9901, series_description: str | None = None,
                             verifying_observer: str | None = None,
                             verifying_organization: str = "bonemets review") -> dict[str, Any]:
    """Write the lesions of one series as a TID 1500 report (module docstring), read back before
    it is moved into place.

    A report verified by a reader (``verifying_observer``) is final: CompletionFlag COMPLETE,
    VerificationFlag VERIFIED, the reader in VerifyingObserverSequence (PS3.3 C.17.2); without one
    it is the model's preliminary report (UNVERIFIED).

    Args:
        series: the source series (its files are the report's evidence; slice ``k`` is
            ``series.sop_instance_uids[k]``).
        out_path: the SR file to write (its folder is created).
        lesions: one mapping per lesion with ``lesion_id`` (1..N), ``volume_ml``, ``hu_mean``,
            ``hu_max`` and optionally ``bone`` (a region name of ``lesions.csv``, or None) and
            ``weight_bearing`` (rows of ``lesions.csv``).
        anchors: per ``lesion_id``, its largest cross-section (:class:`Anchor`, e.g.
            :func:`analysis.lesions.cross_sections`), on the series' slices.
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
        InputError: unreadable source headers or SEG, a SEG without a lesion's segment, a lesion
            without its anchor, or a report that does not read back equal (nothing is left behind).
    """
    out_path = Path(out_path)
    if lesions and seg_path is None:
        raise InputError(f"{out_path}: {len(lesions)} lesion(s) but no SEG to reference; write the SEG first")
    seg = None if seg_path is None else read_seg(seg_path)
    ids = {int(r["lesion_id"]) for r in lesions}
    segments = None
    if seg is not None:
        found = {n: _segment_of(seg, n) for n in ids}
        missing = sorted(n for n, item in found.items() if item is None)
        segments = {n: int(item.SegmentNumber) for n, item in found.items() if item is not None}
        if missing:
            raise InputError(f"{seg_path}: the SEG has no segment {missing[0]} (of {len(missing)} lesion(s) without "
                             f"one); expected one segment per lesion (write_dicom_seg(labels=...))")
    unanchored = sorted(ids - set(anchors))
    if unanchored:
        raise InputError(f"{out_path}: lesion {unanchored[0]} has no cross-section to draw; expected one per lesion")
    algorithm, context = observer(model_name, model_version)
    rows = sorted(lesions, key=lambda r: int(r["lesion_id"]))
    groups = [g for r in rows for g in _lesion_groups(r, anchors[int(r["lesion_id"])], series, seg, algorithm,
                                                      uid_seed)]
    total = float(sum(float(r["volume_ml"]) for r in rows))
    evaluations = [text_item(codes.SCT.NumberOfLesions, number_text(len(rows))),
                   text_item(TOTAL_VOLUME, number_text(total, "cm3"))]
    verification = None if verifying_observer is None else (verifying_observer, verifying_organization)
    sr = save_report(out_path, report_evidence(series, seg), groups, context, uid_seed=uid_seed,
                     series_number=series_number, description=series_description or f"bonemets {model_name} report",
                     evaluations=evaluations, verification=verification,
                     verify=lambda tmp: _verify(tmp, rows, segments, anchors, series, verifying_observer))
    log.info("%s: TID 1500 report of %d lesion(s), %.3f ml", out_path, len(rows), total)
    return {"written": True, "path": str(out_path), "bytes": out_path.stat().st_size, **report_identity(sr),
            "lesions": len(rows), "total_volume_ml": total,
            "referenced_seg": None if seg is None else str(seg.SOPInstanceUID),
            "verified": "read back with highdicom: every lesion's volume, mean and max HU, long and short axis, "
                        "segment and outline, the count and the total volume"}


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


def _report(context: hd.sr.ObservationContext, groups: list[Any],
            evaluations: Sequence[Any]) -> hd.sr.MeasurementReport:
    """TID 1500 with ``groups`` in its Imaging Measurements container (row 6; left out when there is
    none, as row 12 then stands in) and ``evaluations`` in a Qualitative Evaluations container (row 12)."""
    if not groups and not evaluations:
        raise ValueError("a measurement report needs a measurement group or an evaluation")
    # highdicom wants one group at least: a report without any gets the container removed again
    placeholder = [hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="none"))]
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
                                     imaging_measurements=groups or placeholder)
    root = report[0].ContentSequence
    if not groups:
        (index,) = [i for i, item in enumerate(root)
                    if item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ImagingMeasurements.value]
        del root[index]
    if evaluations:
        container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, is_content_continuous=False,
                                               relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        container.ContentSequence = hd.sr.ContentSequence(list(evaluations))
        root.append(container)
    return report


def save_report(out_path: Path, evidence: list[pydicom.Dataset], groups: list[Any], context: hd.sr.ObservationContext,
                *, uid_seed: str, series_number: int, description: str, verify: Callable[[Path], None],
                evaluations: Sequence[Any] = (),
                verification: tuple[str, str] | None = None) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 report (:func:`_report`), save it to a temporary file, ``verify`` it and
    move it into place; ``verification``: ``(observer, organisation)`` of a verified, final report."""
    verified = {} if verification is None else {
        "is_final": True, "is_verified": True, "verifying_observer_name": verification[0][:64],
        "verifying_organization": verification[1][:64]}
    # Patient/Study are the evidence's own; a reader's user name is one PN component, as it is meant to be
    with names_from_source():
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence, content=_report(context, groups, evaluations),
            series_instance_uid=result_uid(uid_seed, "sr-series"), series_number=series_number,
            sop_instance_uid=result_uid(uid_seed, "sr"), instance_number=1, manufacturer="bonemets",
            is_complete=True, series_description=description[:64], software_versions=f"bonemets {__version__}",
            **verified)
    with atomic_file(out_path, suffix=".dcm") as tmp:
        sr.save_as(tmp, enforce_file_format=True)
        verify(tmp)
    return sr
