"""Reading CT from real PACS exports: series choice, localizers, multi-frame objects, refusals.

A *series folder* is a folder that directly holds DICOM files. Its files' headers are read
with pydicom (``stop_before_pixels``) and grouped by SeriesInstanceUID. These are skipped,
each with its reason in the record:

- localizers: files whose ImageType holds ``LOCALIZER``, and series whose files differ in
  ImageOrientationPatient (scouts taken from two sides);
- objects without an image of their own (SEG, SR, RTSTRUCT, presentation states, DICOMDIR:
  no Rows/Columns or a non-image modality), other modalities than CT, and CT-modality
  objects of another SOP class (secondary captures such as dose screens);
- CT series that are not axial (slice normal more than 45 degrees from the patient axis),
  unless forced with ``series_uid``.

Among the remaining series the one with the most slices is used; ties go to the thinnest
slices (SliceThickness, else the slice spacing); a tie that remains is refused (pick one
with ``series_uid``). The chosen series is then refused when it has one slice, a gantry tilt
(GantryDetectorTilt != 0, or slice positions not stacked along the normal of
ImageOrientationPatient) or missing/duplicated slices (gaps deviating from their median by
more than :data:`SLICE_GAP_RTOL`).

Volumes come back as SimpleITK's series reader gives them: voxel ``[k, i, j]`` is pixel
``(row i, column j)`` of the slice ``k`` along the slice normal (cross product of the row
and column cosines), direction columns = row cosine, column cosine, normal, origin = the
first slice's ImagePositionPatient, rescale slope/intercept applied (HU). An Enhanced
(multi-frame) CT object is read from its frames with the same convention.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage

from analysis.errors import InputError

log = logging.getLogger(__name__)

#: Relative deviation of slice gaps from their median that counts as a missing or
#: misplaced slice (uneven spacing) in a DICOM series.
SLICE_GAP_RTOL = 0.05
#: Largest angle (radians) between the slice stacking direction and the normal of
#: ImageOrientationPatient before a series counts as gantry-tilted (about 0.06 degrees).
TILT_TOL_RAD = 1e-3
#: Largest difference of ImageOrientationPatient cosines within one series.
ORIENTATION_TOL = 1e-4

CT_SOP_CLASSES = {str(CTImageStorage), str(EnhancedCTImageStorage), str(LegacyConvertedEnhancedCTImageStorage)}
MULTIFRAME_CT_SOP_CLASSES = {str(EnhancedCTImageStorage), str(LegacyConvertedEnhancedCTImageStorage)}
#: Modalities of objects that hold no image of their own.
NON_IMAGE_MODALITIES = {"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTRECORD", "PR", "KO", "REG", "DOC", "PLAN", "FID"}


@dataclass(frozen=True)
class DicomSeries:
    """One chosen CT series, described from its headers (no pixel data read).

    Slice ``k`` is index ``k`` along array axis 0 of the volume :func:`read_series` returns.

    Attributes:
        folder: the series folder.
        series_uid: SeriesInstanceUID.
        files: single-frame series: the file of each slice ``k``; multi-frame: the one file.
        sop_instance_uids: SOPInstanceUID of each slice ``k`` (multi-frame: the one UID, repeated).
        frame_numbers: multi-frame only: the 1-based frame number of each slice ``k``; else None.
        positions: ImagePositionPatient (mm, LPS) of each slice ``k``.
        orientation: ImageOrientationPatient (row cosine, column cosine).
        pixel_spacing: PixelSpacing as DICOM gives it: (between rows, between columns) in mm.
        slice_spacing: distance between neighbouring slices along the normal, mm.
        slice_thickness: SliceThickness, None when the header lacks it.
        rows, columns: pixel matrix size.
        n_slices: number of slices.
        description: SeriesDescription ("" when absent).
        modality: Modality ("CT").
        series_number: SeriesNumber, None when absent.
        sop_class_uid: SOPClassUID of the slices.
        study_uid: StudyInstanceUID.
        frame_of_reference_uid: FrameOfReferenceUID, None when absent.
        patient_id: PatientID ("" when absent).
        record: JSON-able record of the choice and of every skipped series (see :func:`find_series`).
    """

    folder: Path
    series_uid: str
    files: list[Path]
    sop_instance_uids: list[str]
    frame_numbers: list[int] | None
    positions: list[tuple[float, float, float]]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    slice_thickness: float | None
    rows: int
    columns: int
    n_slices: int
    description: str
    modality: str
    series_number: int | None
    sop_class_uid: str
    study_uid: str
    frame_of_reference_uid: str | None
    patient_id: str
    record: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def multiframe(self) -> bool:
        """True for an Enhanced (multi-frame) CT object."""
        return self.frame_numbers is not None

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal: cross product of the row and column cosines."""
        return _normal(self.orientation)


@dataclass
class _Candidate:
    """Files of one SeriesInstanceUID that may be the CT series (headers only)."""

    uid: str
    files: list[Path]
    headers: list[pydicom.Dataset]
    multiframe: bool
    n_slices: int
    description: str
    series_number: int | None
    thickness: float | None
    axial: bool
    orientation: tuple[float, ...]
    localizers_dropped: int = 0


@dataclass
class _Scan:
    folder: Path
    candidates: list[_Candidate]
    skipped: list[dict[str, Any]]
    ignored_files: int
    n_images: int  # DICOM objects with an image of their own (any modality)

    def holdings(self) -> str:
        """What the folder holds, per series: description, slices, modality."""
        parts = [f"'{c.description}' {c.n_slices} slice(s) CT" for c in self.candidates]
        parts += [f"'{s['description']}' {s['n_files']} file(s) {s['modality'] or '?'} ({s['reason']})"
                  for s in self.skipped]
        return "; ".join(parts) if parts else "nothing"


# --- small helpers ----------------------------------------------------------------------------


def _normal(orientation: tuple[float, ...]) -> np.ndarray:
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:6], float)
    n = np.cross(row, col)
    norm = float(np.linalg.norm(n))
    return n / norm if norm > 0 else n


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _image_types(ds: pydicom.Dataset) -> list[str]:
    types: list[str] = []
    for keyword in ("ImageType", "FrameType"):
        value = ds.get(keyword)
        if value is None:
            continue
        types += [str(v).upper() for v in ([value] if isinstance(value, str) else list(value))]
    shared = _shared_group(ds)
    if shared is not None and "CTImageFrameTypeSequence" in shared:
        types += [str(v).upper() for v in shared.CTImageFrameTypeSequence[0].get("FrameType", [])]
    return types


def _shared_group(ds: pydicom.Dataset) -> pydicom.Dataset | None:
    seq = ds.get("SharedFunctionalGroupsSequence")
    return seq[0] if seq else None


def _functional(ds: pydicom.Dataset, frame: pydicom.Dataset | None, sequence: str) -> pydicom.Dataset | None:
    """Item of a functional group macro (``sequence``) for one frame: per-frame first, then shared."""
    for group in (frame, _shared_group(ds)):
        if group is not None and sequence in group and len(group[sequence].value):
            return group[sequence].value[0]
    return None


def read_header(path: Path) -> pydicom.Dataset | None:
    """The DICOM header of ``path`` (no pixel data), or None when it is not a DICOM file."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return None
    except Exception as exc:  # a damaged file: pydicom raises many kinds; count it as not DICOM
        log.debug("%s: unreadable DICOM header (%s)", path, exc)
        return None


def has_image(ds: pydicom.Dataset) -> bool:
    """True when the object carries an image of its own (not SEG/SR/RTSTRUCT/DICOMDIR ...)."""
    modality = _text(ds, "Modality").upper()
    sop = str(ds.get("SOPClassUID", ""))
    if sop.startswith("1.2.840.10008.5.1.4.1.1.66"):  # segmentation, registration, fiducials, raw data
        return False
    return "Rows" in ds and "Columns" in ds and modality not in NON_IMAGE_MODALITIES


# --- scanning a folder ------------------------------------------------------------------------


def _skip_record(uid: str, headers: list[pydicom.Dataset], reason: str) -> dict[str, Any]:
    first = headers[0]
    return {"series_uid": uid, "series_number": _int(first.get("SeriesNumber")),
            "description": _text(first, "SeriesDescription"), "modality": _text(first, "Modality"),
            "n_files": len(headers), "reason": reason}


def _file_problem(ds: pydicom.Dataset) -> str | None:
    """Why one file cannot be a slice of the CT series; None when it can."""
    modality = _text(ds, "Modality").upper()
    sop = str(ds.get("SOPClassUID", ""))
    if not has_image(ds):
        name = UID(sop).name if sop else modality or "unknown SOP class"
        return f"not an image ({name})"
    if modality != "CT":
        return f"modality {modality or 'missing'}, expected CT"
    if sop not in CT_SOP_CLASSES:
        return f"{UID(sop).name if sop else 'no SOP class'}, expected CT Image Storage or Enhanced CT Image Storage"
    if "LOCALIZER" in _image_types(ds):
        return "localizer"
    return None


def _orientation_of(ds: pydicom.Dataset) -> tuple[float, ...] | None:
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    if iop is None and "SharedFunctionalGroupsSequence" in ds:
        item = _functional(ds, None, "PlaneOrientationSequence")
        if item is None and ds.get("PerFrameFunctionalGroupsSequence"):
            item = _functional(ds, ds.PerFrameFunctionalGroupsSequence[0], "PlaneOrientationSequence")
        iop = _floats(item.get("ImageOrientationPatient"), 6) if item is not None else None
    return iop


def _candidate(uid: str, files: list[Path], headers: list[pydicom.Dataset], dropped: int) -> _Candidate | str:
    """A candidate series, or the reason it is skipped."""
    multi = [str(h.get("SOPClassUID", "")) in MULTIFRAME_CT_SOP_CLASSES for h in headers]
    if any(multi) and len(headers) > 1:
        return f"{len(headers)} objects of which {sum(multi)} multi-frame; expected one Enhanced CT object"
    orientations = [_orientation_of(h) for h in headers]
    if any(o is None for o in orientations):
        return "ImageOrientationPatient missing or malformed"
    if multi and multi[0]:
        frame_iops = [_orientation_of_frame(headers[0], f) for f in headers[0].get("PerFrameFunctionalGroupsSequence", [])]
        orientations = [o for o in frame_iops if o is not None] or orientations
    ref = np.asarray(orientations[0])
    if any(np.max(np.abs(np.asarray(o) - ref)) > ORIENTATION_TOL for o in orientations):
        return "localizer (image orientations differ within the series)"
    first = headers[0]
    n_slices = (_int(first.get("NumberOfFrames")) or 1) if multi[0] else len(headers)
    normal = _normal(tuple(ref))
    thickness = _float(first.get("SliceThickness"))
    if multi[0] and thickness is None:
        pm = _functional(first, None, "PixelMeasuresSequence")
        thickness = _float(pm.get("SliceThickness")) if pm is not None else None
    return _Candidate(uid=uid, files=files, headers=headers, multiframe=bool(multi[0]), n_slices=int(n_slices),
                      description=_text(first, "SeriesDescription"), series_number=_int(first.get("SeriesNumber")),
                      thickness=thickness, axial=abs(float(normal[2])) >= np.sqrt(0.5) - 1e-9,
                      orientation=tuple(float(v) for v in ref), localizers_dropped=dropped)


def _orientation_of_frame(ds: pydicom.Dataset, frame: pydicom.Dataset) -> tuple[float, ...] | None:
    item = _functional(ds, frame, "PlaneOrientationSequence")
    return _floats(item.get("ImageOrientationPatient"), 6) if item is not None else None


def _scan(folder: Path) -> _Scan:
    """Read the headers of the DICOM files directly in ``folder`` and sort them into series."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; expected a folder holding a DICOM CT series")
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    ignored = n_images = 0
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        ds = read_header(path)
        if ds is None:
            ignored += 1
            continue
        n_images += has_image(ds)
        groups.setdefault(str(ds.get("SeriesInstanceUID", "") or "(no SeriesInstanceUID)"), []).append((path, ds))
    candidates: list[_Candidate] = []
    skipped: list[dict[str, Any]] = []
    for uid, members in groups.items():
        headers = [ds for _, ds in members]
        problems = [_file_problem(ds) for ds in headers]
        keep = [(p, ds) for (p, ds), why in zip(members, problems) if why is None]
        dropped = sum(why == "localizer" for why in problems)
        if not keep:
            reasons = sorted({why for why in problems if why})
            skipped.append(_skip_record(uid, headers, "; ".join(reasons)))
            continue
        if dropped:
            skipped.append(_skip_record(uid, [ds for (_, ds), why in zip(members, problems) if why], "localizer"))
        cand = _candidate(uid, [p for p, _ in keep], [ds for _, ds in keep], dropped)
        if isinstance(cand, str):
            skipped.append(_skip_record(uid, [ds for _, ds in keep], cand))
        else:
            candidates.append(cand)
    return _Scan(folder=folder, candidates=candidates, skipped=skipped, ignored_files=ignored, n_images=n_images)


# --- choosing -------------------------------------------------------------------------------


def _rank_key(c: _Candidate) -> tuple[int, float]:
    return (-c.n_slices, c.thickness if c.thickness is not None else float("inf"))


def _no_series_error(scan: _Scan) -> InputError:
    folder = scan.folder
    if not scan.skipped and not scan.candidates:
        return InputError(f"{folder}: no DICOM series found; expected DICOM files of one CT series")
    kinds = {s["reason"].split(" ")[0] for s in scan.skipped}
    if not scan.candidates and kinds == {"localizer"}:
        return InputError(f"{folder}: holds only localizers ({scan.holdings()}); expected an axial CT series")
    return InputError(f"{folder}: no axial CT series; it holds {scan.holdings()}")


def _ordered_candidates(scan: _Scan, series_uid: str | None) -> list[_Candidate]:
    """The candidates, the one to use first; refuses when there is none or a tie."""
    if series_uid is not None:
        forced = [c for c in scan.candidates if c.uid == series_uid]
        if not forced:
            found = [c.uid for c in scan.candidates] + [s["series_uid"] for s in scan.skipped]
            if series_uid in found:
                reason = next(s["reason"] for s in scan.skipped if s["series_uid"] == series_uid)
                raise InputError(f"--series {series_uid}: in {scan.folder} but not a usable CT series ({reason})")
            raise InputError(f"--series {series_uid}: not in {scan.folder}; found {', '.join(found) or 'no series'}")
        return forced + [c for c in scan.candidates if c.uid != series_uid and c.axial]
    axial = [c for c in scan.candidates if c.axial]
    if not axial:
        raise _no_series_error(scan)
    return sorted(axial, key=lambda c: (*_rank_key(c), c.series_number if c.series_number is not None else 10**9, c.uid))


def _not_axial(scan: _Scan, chosen_uid: str) -> list[dict[str, Any]]:
    return [_skip_record(c.uid, c.headers, "not axial (slice normal more than 45 degrees from the patient axis)")
            for c in scan.candidates if not c.axial and c.uid != chosen_uid]


def find_series(folder: str | os.PathLike, series_uid: str | None = None) -> DicomSeries:
    """Choose and check the CT series of a series folder, from headers only.

    Args:
        folder: a folder that directly holds the DICOM files (not searched recursively).
        series_uid: SeriesInstanceUID to use instead of the automatic choice.

    Returns:
        The chosen series. Its ``record`` (JSON-able) is::

            {"folder": str, "series_uid": str, "series_number": int | None, "description": str,
             "modality": "CT", "sop_class": str, "multiframe": bool, "n_slices": int,
             "rows": int, "columns": int, "pixel_spacing": [row, col], "slice_spacing": float,
             "slice_thickness": float | None, "orientation": [6 floats], "study_uid": str,
             "frame_of_reference_uid": str | None,
             "chosen_because": str,
             "skipped": [{"series_uid", "series_number", "description", "modality", "n_files", "reason"}],
             "ignored_files": int}   # files that are not DICOM

    Raises:
        InputError: no DICOM, only localizers, no axial CT series, a tie between series, an
            unknown ``series_uid``, or a chosen series with one slice, a gantry tilt, gaps or
            uneven spacing. One line naming the folder and what it holds.
    """
    scan = _scan(Path(folder))
    ordered = _ordered_candidates(scan, series_uid)
    chosen = ordered[0]
    if series_uid is None and len(ordered) > 1 and _rank_key(ordered[1]) == _rank_key(chosen):
        tied = [c for c in ordered if _rank_key(c) == _rank_key(chosen)]
        listing = ", ".join(f"{c.uid} ('{c.description}' {c.n_slices} slices)" for c in tied)
        raise InputError(f"{scan.folder}: holds {len(tied)} DICOM series of equal size ({listing}); "
                         f"pick one with --series SERIES_UID")
    because = (f"forced by series_uid {series_uid}" if series_uid is not None
               else "the only axial CT series" if len(ordered) == 1
               else "the axial CT series with the most slices (ties: the thinnest slices)")
    others = [_skip_record(c.uid, c.headers, f"not chosen: {c.n_slices} slice(s)") for c in ordered[1:]]
    return _build(scan, chosen, because, others + _not_axial(scan, chosen.uid))


def list_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """Every usable axial CT series of a series folder, the one :func:`find_series` chooses first.

    A tie between the largest series is not refused here: the tied series come in
    SeriesNumber (then UID) order. Additional series that fail the checks (one slice, gaps,
    tilt) are left out and recorded in the first series' record; the first one's failure is
    raised as :func:`find_series` raises it.

    Raises:
        InputError: as :func:`find_series` for the first series.
    """
    scan = _scan(Path(folder))
    ordered = _ordered_candidates(scan, None)
    extra = _not_axial(scan, ordered[0].uid)
    out: list[DicomSeries] = []
    failed: list[dict[str, Any]] = []
    for i, cand in enumerate(ordered):
        because = ("the axial CT series with the most slices (ties: the thinnest slices, then SeriesNumber)" if i == 0
                   else "an additional axial CT series in the folder")
        others = [_skip_record(c.uid, c.headers, "a case of its own") for c in ordered if c is not cand]
        try:
            out.append(_build(scan, cand, because, others + extra))
        except InputError as exc:
            if i == 0:
                raise
            failed.append(_skip_record(cand.uid, cand.headers, str(exc).split(": ", 1)[-1]))
    if failed:
        out[0].record["skipped"].extend(failed)
    return out


# --- checking and describing the chosen series ------------------------------------------------


def _frames(ds: pydicom.Dataset) -> list[tuple[int, tuple[float, float, float] | None]]:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    out = []
    for i, frame in enumerate(per_frame, start=1):
        item = _functional(ds, frame, "PlanePositionSequence")
        out.append((i, _floats(item.get("ImagePositionPatient"), 3) if item is not None else None))
    return out


def _tilt(ds: pydicom.Dataset) -> float | None:
    for group in (ds, _shared_group(ds)):
        if group is None:
            continue
        value = _float(group.get("GantryDetectorTilt"))
        if value is None and "CTAcquisitionDetailsSequence" in group:
            value = _float(group.CTAcquisitionDetailsSequence[0].get("GantryDetectorTilt"))
        if value is not None:
            return value
    return None


def _build(scan: _Scan, cand: _Candidate, because: str, others: list[dict[str, Any]]) -> DicomSeries:
    folder = scan.folder
    first = cand.headers[0]
    what = f"series {cand.uid} ('{cand.description}')"
    if cand.n_slices < 2:
        raise InputError(f"{folder}: {what} has {cand.n_slices} slice; expected a 3D CT volume "
                         f"(the folder holds {scan.holdings()})")
    tilt = _tilt(first)
    if tilt is not None and abs(tilt) > 1e-6:
        raise InputError(f"{folder}: {what} has a gantry tilt of {tilt:g} degrees (GantryDetectorTilt); "
                         f"expected 0 (resample the tilted series first; the folder holds {scan.holdings()})")
    orientation = cand.orientation
    normal = _normal(orientation)
    if cand.multiframe:
        frames = _frames(first)
        if len(frames) != cand.n_slices or any(p is None for _, p in frames):
            raise InputError(f"{cand.files[0]}: {cand.n_slices} frames but {len(frames)} with a "
                             f"PlanePositionSequence; expected a position for every frame")
        entries = [(Path(cand.files[0]), str(first.SOPInstanceUID), num, pos) for num, pos in frames]
        pm = _functional(first, None, "PixelMeasuresSequence") or first
        if pm is first and first.get("PerFrameFunctionalGroupsSequence"):
            pm = _functional(first, first.PerFrameFunctionalGroupsSequence[0], "PixelMeasuresSequence") or first
        spacing = _floats(pm.get("PixelSpacing"), 2)
    else:
        entries = []
        for path, ds in zip(cand.files, cand.headers):
            pos = _floats(ds.get("ImagePositionPatient"), 3)
            if pos is None:
                raise InputError(f"{path}: ImagePositionPatient missing or malformed; expected 3 numbers")
            entries.append((Path(path), str(ds.get("SOPInstanceUID", "")), None, pos))
        spacing = _floats(first.get("PixelSpacing"), 2)
        grids = {(int(ds.get("Rows", 0)), int(ds.get("Columns", 0)), _floats(ds.get("PixelSpacing"), 2)) for ds in cand.headers}
        if len(grids) > 1:
            raise InputError(f"{folder}: {what} mixes pixel grids {sorted(map(str, grids))[:3]}; expected one rows x columns "
                             f"grid and PixelSpacing for every slice")
    if spacing is None or min(spacing) <= 0:
        raise InputError(f"{folder}: {what} has no valid PixelSpacing; expected two positive numbers")
    entries.sort(key=lambda e: float(np.dot(e[3], normal)))
    pos = np.array([e[3] for e in entries], float)
    along = pos @ normal
    gaps = np.diff(along)
    median = float(np.median(gaps))
    if median <= 1e-6:
        raise InputError(f"{folder}: {what}: slices share one position; expected distinct slice positions "
                         f"(the folder holds {scan.holdings()})")
    bad = np.flatnonzero(np.abs(gaps - median) > SLICE_GAP_RTOL * median)
    if bad.size:
        i = int(bad[0])
        raise InputError(f"{folder}: uneven slice spacing in {what} (gap {gaps[i]:.3g} mm after position "
                         f"{along[i]:.4g} mm, expected {median:.3g} mm); slices are missing or duplicated (the folder holds "
                         f"{scan.holdings()})")
    stack = pos[-1] - pos[0]
    sine = float(np.linalg.norm(np.cross(stack / np.linalg.norm(stack), normal)))
    if sine > TILT_TOL_RAD:
        raise InputError(f"{folder}: {what} is gantry-tilted (slices stacked {np.degrees(np.arcsin(min(sine, 1.0))):.2f} "
                         f"degrees off the ImageOrientationPatient normal); expected 0 (resample the tilted series first; "
                         f"the folder holds {scan.holdings()})")
    slice_spacing = float((along[-1] - along[0]) / (len(along) - 1))
    rows, cols = int(first.Rows), int(first.Columns)
    series = DicomSeries(
        folder=folder, series_uid=cand.uid,
        files=[cand.files[0]] if cand.multiframe else [e[0] for e in entries],
        sop_instance_uids=[e[1] for e in entries],
        frame_numbers=[int(e[2]) for e in entries] if cand.multiframe else None,
        positions=[tuple(float(v) for v in e[3]) for e in entries],  # type: ignore[misc]
        orientation=tuple(orientation),  # type: ignore[arg-type]
        pixel_spacing=(float(spacing[0]), float(spacing[1])), slice_spacing=slice_spacing,
        slice_thickness=cand.thickness, rows=rows, columns=cols, n_slices=len(entries),
        description=cand.description, modality="CT", series_number=cand.series_number,
        sop_class_uid=str(first.get("SOPClassUID", "")), study_uid=str(first.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(first.FrameOfReferenceUID) if first.get("FrameOfReferenceUID") else None,
        patient_id=_text(first, "PatientID"),
    )
    series.record.update({
        "folder": str(folder), "series_uid": cand.uid, "series_number": cand.series_number,
        "description": cand.description, "modality": "CT", "sop_class": UID(series.sop_class_uid).name,
        "multiframe": cand.multiframe, "n_slices": series.n_slices, "rows": rows, "columns": cols,
        "pixel_spacing": list(series.pixel_spacing), "slice_spacing": round(slice_spacing, 6),
        "slice_thickness": cand.thickness, "orientation": list(orientation), "study_uid": series.study_uid,
        "frame_of_reference_uid": series.frame_of_reference_uid, "chosen_because": because,
        "skipped": [dict(s) for s in scan.skipped] + others, "ignored_files": scan.ignored_files,
    })
    return series


# --- reading the volume ---------------------------------------------------------------------------


def _hu_image(image: sitk.Image) -> sitk.Image:
    """int16 when every value is an integer in int16's range, else float32."""
    arr = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(arr.dtype, np.integer):
        integral = True
    else:
        integral = bool(np.all(np.isfinite(arr))) and np.array_equal(arr, np.round(arr))
    if integral and (arr.size == 0 or (arr.min() >= -32768 and arr.max() <= 32767)):
        return sitk.Cast(image, sitk.sitkInt16)
    return sitk.Cast(image, sitk.sitkFloat32)


def _check_geometry(series: DicomSeries, image: sitk.Image) -> None:
    """The image's grid must be the one the headers describe (slice k at positions[k])."""
    expected_size = (series.columns, series.rows, series.n_slices)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if (image.GetSize() != expected_size or not np.allclose(image.GetOrigin(), series.positions[0], atol=1e-3)
            or float(direction[:, 2] @ series.normal) < 1 - 1e-6):
        raise InputError(f"{series.folder}: series {series.series_uid} read as size {image.GetSize()}, origin "
                         f"{tuple(round(v, 3) for v in image.GetOrigin())}; expected size {expected_size} with the "
                         f"first slice at {series.positions[0]}")


def _read_single_frame(series: DicomSeries) -> sitk.Image:
    ours = [str(p) for p in series.files]
    try:
        gdcm = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series.folder), series.series_uid))
    except RuntimeError:
        gdcm = []
    wanted = set(ours)
    gdcm = [f for f in gdcm if f in wanted]
    if gdcm != ours:
        log.debug("%s: GDCM's file order differs from the slice positions; using the positions", series.folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(gdcm if gdcm == ours else ours)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        raise InputError(f"{series.folder}: the DICOM series cannot be read ({(lines or ['?'])[-1][:160]})") from None
    return image


def _read_multiframe(series: DicomSeries) -> sitk.Image:
    path = series.files[0]
    try:
        ds = pydicom.dcmread(path)
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # pydicom raises many kinds for undecodable pixel data
        raise InputError(f"{path}: the Enhanced CT pixel data cannot be decoded ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    n_frames = _int(ds.get("NumberOfFrames")) or 1
    pixels = pixels.reshape(n_frames, series.rows, series.columns)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    out = np.empty((series.n_slices, series.rows, series.columns), np.float64)
    for k, num in enumerate(series.frame_numbers or []):
        item = _functional(ds, per_frame[num - 1], "PixelValueTransformationSequence")
        slope = _float(item.get("RescaleSlope")) if item is not None else _float(ds.get("RescaleSlope"))
        intercept = _float(item.get("RescaleIntercept")) if item is not None else _float(ds.get("RescaleIntercept"))
        out[k] = pixels[num - 1] * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)
    image = sitk.GetImageFromArray(out)
    row_spacing, col_spacing = series.pixel_spacing
    image.SetSpacing((col_spacing, row_spacing, series.slice_spacing))
    image.SetOrigin(series.positions[0])
    direction = np.column_stack([series.orientation[:3], series.orientation[3:], series.normal])
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def read_series(series: DicomSeries) -> sitk.Image:
    """Read the volume of a chosen series: HU as int16 (float32 when fractional).

    Args:
        series: from :func:`find_series` or :func:`list_series`.

    Returns:
        A 3D image; its array is ``(slices, rows, cols)`` with slice ``k`` from
        ``series.files[k]`` (multi-frame: frame ``series.frame_numbers[k]``).

    Raises:
        InputError: undecodable pixel data, or a read grid unlike the headers.
    """
    image = _read_multiframe(series) if series.multiframe else _read_single_frame(series)
    if image.GetDimension() != 3:
        raise InputError(f"{series.folder}: the series is {image.GetDimension()}D; expected a 3D CT")
    _check_geometry(series, image)
    return _hu_image(image)


def read_dicom(folder: str | os.PathLike, series_uid: str | None = None) -> tuple[sitk.Image, DicomSeries]:
    """:func:`find_series` then :func:`read_series`: the CT volume of a series folder and its description."""
    series = find_series(folder, series_uid)
    return read_series(series), series


def series_folders(root: str | os.PathLike) -> list[Path]:
    """Folders at or below ``root`` that directly hold a DICOM object with an image (sorted).

    Folders holding only non-image objects (DICOMDIR, SR, SEG) do not count; hidden folders
    (names starting with ``.``) are not searched.
    """
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            ds = read_header(Path(dirpath) / name)
            if ds is not None and has_image(ds):
                out.append(Path(dirpath))
                break
    return out
