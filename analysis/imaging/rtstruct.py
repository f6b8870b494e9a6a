"""RTSTRUCT (RT Structure Set) lesion labels: read the contours, check what they reference, rasterise.

highdicom does not read RTSTRUCT, so the structure set is read with pydicom from the
attributes the standard defines (DICOM PS3.3 C.8.8.5 "Structure Set Module" and C.8.8.6
"ROI Contour Module"):

- ROI names in ``StructureSetROISequence`` (``ROINumber``, ``ROIName``,
  ``ReferencedFrameOfReferenceUID``);
- contours in ``ROIContourSequence[].ContourSequence[]``, matched to their ROI by
  ``ReferencedROINumber``; each has a ``ContourGeometricType`` (only ``CLOSED_PLANAR``
  describes an area), ``ContourData`` as x, y, z triplets in patient mm (LPS) and
  optionally ``ContourImageSequence`` naming the image it was drawn on;
- the series the structure set was drawn on in
  ``ReferencedFrameOfReferenceSequence[].RTReferencedStudySequence[].RTReferencedSeriesSequence[]``.

Rasterisation rule (the one the import states): a contour belongs to the series slice whose
position along the slice normal is within :data:`SLICE_TOL` slice spacings of the contour's
plane (a contour on no slice of the series is refused); its points are mapped to that slice's
continuous pixel coordinates through the slice's ImagePositionPatient,
ImageOrientationPatient and PixelSpacing; a pixel is inside the ROI when its **centre** is
inside an odd number of the ROI's contours on that slice (the even-odd rule, PS3.3 C.8.8.6.3:
holes and islands are separate contours on one slice). Several ROIs are merged by union.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom

from analysis.errors import InputError
from analysis.imaging.dicom import DicomSeries

log = logging.getLogger(__name__)

__all__ = ["RoiContours", "StructureSet", "read_rtstruct", "check_references", "select_rois", "rasterise",
           "fill_even_odd", "rtstruct_mask", "SLICE_TOL"]

#: A contour's plane may lie this many slice spacings from its slice's position (writers
#: round coordinates); farther from every slice, it is on no slice of the series.
SLICE_TOL = 0.1
#: At most this many names are listed in a message.
SHOWN = 12


@dataclass(frozen=True)
class RoiContours:
    """One ROI of a structure set.

    Attributes:
        number: ROINumber.
        name: ROIName.
        frame_of_reference_uid: its ReferencedFrameOfReferenceUID ("" when absent).
        contours: each CLOSED_PLANAR contour's points, ``(n, 3)`` float64 patient mm (LPS).
        other_types: ContourGeometricType of every contour that is not CLOSED_PLANAR (POINT,
            OPEN_PLANAR, ...), which describe no area and are not rasterised.
        images: ``(ReferencedSOPInstanceUID, ReferencedFrameNumber or None)`` of every
            ContourImageSequence item of its contours.
    """

    number: int
    name: str
    frame_of_reference_uid: str
    contours: list[np.ndarray] = field(default_factory=list)
    other_types: list[str] = field(default_factory=list)
    images: set[tuple[str, int | None]] = field(default_factory=set)


@dataclass(frozen=True)
class StructureSet:
    """The parts of an RTSTRUCT the import needs.

    Attributes:
        path: the file.
        frame_of_reference_uids: every referenced FrameOfReferenceUID, in file order.
        series_uids: the referenced series' SeriesInstanceUIDs, in file order.
        images: ``(SOPInstanceUID, frame number or None)`` listed under the referenced series.
        rois: the ROIs in file order.
    """

    path: Path
    frame_of_reference_uids: list[str]
    series_uids: list[str]
    images: set[tuple[str, int | None]]
    rois: list[RoiContours]

    def names(self) -> str:
        """The ROI names for a message: ``'GTV' (3 contours), 'Isocenter' (1 POINT)``."""
        parts = []
        for roi in self.rois[:SHOWN]:
            what = [f"{len(roi.contours)} contours"] if roi.contours or not roi.other_types else []
            what += [f"{roi.other_types.count(t)} {t}" for t in sorted(set(roi.other_types))]
            parts.append(f"'{roi.name}' ({', '.join(what)})")
        more = f" and {len(self.rois) - SHOWN} more" if len(self.rois) > SHOWN else ""
        return (", ".join(parts) + more) if parts else "none"


def _image_refs(items: Sequence[pydicom.Dataset]) -> set[tuple[str, int | None]]:
    out = set()
    for item in items:
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        frames = item.get("ReferencedFrameNumber")
        if frames is None or frames == "":
            out.add((uid, None))
        else:
            for f in (frames if isinstance(frames, (list, pydicom.multival.MultiValue)) else [frames]):
                out.add((uid, int(f)))
    return out


def read_rtstruct(path: str | os.PathLike) -> StructureSet:
    """Read an RTSTRUCT's ROIs, contours and references (no image needed).

    Files without the DICOM preamble and file meta header (as pydicom's own test file
    ``rtstruct.dcm``) are read too.

    Raises:
        InputError: not a readable DICOM file, Modality not RTSTRUCT, a contour whose
            ContourData is not x, y, z triplets, or an ROIContourSequence item naming an
            ROI number the StructureSetROISequence does not define.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # pydicom raises many kinds for a damaged file
        raise InputError(f"{path}: not a readable DICOM RTSTRUCT ({type(exc).__name__})") from None
    if str(ds.get("Modality", "")) != "RTSTRUCT":
        raise InputError(f"{path}: Modality {ds.get('Modality')!s}; expected RTSTRUCT")
    fors, series_uids, images = [], [], set()
    for ref in ds.get("ReferencedFrameOfReferenceSequence", []):
        fors.append(str(ref.get("FrameOfReferenceUID", "")))
        for study in ref.get("RTReferencedStudySequence", []):
            for ser in study.get("RTReferencedSeriesSequence", []):
                series_uids.append(str(ser.get("SeriesInstanceUID", "")))
                images |= _image_refs(ser.get("ContourImageSequence", []))
    rois: dict[int, RoiContours] = {}
    for item in ds.get("StructureSetROISequence", []):
        number = int(item.ROINumber)
        rois[number] = RoiContours(number=number, name=str(item.get("ROIName", "")),
                                   frame_of_reference_uid=str(item.get("ReferencedFrameOfReferenceUID", "")))
        if rois[number].frame_of_reference_uid and rois[number].frame_of_reference_uid not in fors:
            fors.append(rois[number].frame_of_reference_uid)
    for item in ds.get("ROIContourSequence", []):
        number = int(item.ReferencedROINumber)
        if number not in rois:
            raise InputError(f"{path}: ROIContourSequence names ROI number {number}, which "
                             f"StructureSetROISequence does not define (ROIs there: {sorted(rois)})")
        roi = rois[number]
        for c in item.get("ContourSequence", []):
            kind = str(c.get("ContourGeometricType", ""))
            roi.images.update(_image_refs(c.get("ContourImageSequence", [])))
            if kind != "CLOSED_PLANAR":
                roi.other_types.append(kind or "no ContourGeometricType")
                continue
            data = np.asarray([float(v) for v in c.get("ContourData", [])], np.float64)
            if data.size < 9 or data.size % 3:
                raise InputError(f"{path}: ROI '{roi.name}' has a CLOSED_PLANAR contour of {data.size} values; "
                                 f"expected x, y, z triplets of at least three points")
            roi.contours.append(data.reshape(-1, 3))
    return StructureSet(path=path, frame_of_reference_uids=fors, series_uids=series_uids, images=images,
                        rois=list(rois.values()))


def check_references(ss: StructureSet, series: DicomSeries) -> None:
    """Refuse a structure set that was not drawn on ``series``.

    The structure set must reference the series' FrameOfReferenceUID and its
    SeriesInstanceUID (in the RT referenced series; a file without one must reference
    images instead), and every image it names (under the referenced series or in a
    contour's ContourImageSequence) must be an instance (and frame) of the series.

    Raises:
        InputError: one line naming the series and frame of reference the structure set
            references and those of the imported series.
    """
    refs = f"series {', '.join(ss.series_uids) or '(none)'} in frame of reference " \
           f"{', '.join(ss.frame_of_reference_uids) or '(none)'}"
    ours = f"the imported series {series.series_uid} (frame of reference {series.frame_of_reference_uid or 'none'}) " \
           f"in {series.folder}"
    if not series.frame_of_reference_uid:
        raise InputError(f"{series.folder}: series {series.series_uid} has no FrameOfReferenceUID; "
                         f"an RTSTRUCT's contours cannot be placed on it ({ss.path} references {refs})")
    if series.frame_of_reference_uid not in ss.frame_of_reference_uids or \
            (ss.series_uids and series.series_uid not in ss.series_uids):
        raise InputError(f"{ss.path}: references {refs}; expected {ours}")
    known = set(zip(series.sop_instance_uids, series.frame_numbers or [None] * series.n_slices))
    known_uids = set(series.sop_instance_uids)
    named = set(ss.images)
    for roi in ss.rois:
        named |= roi.images
    if not ss.series_uids and not named:
        raise InputError(f"{ss.path}: references no series and no image; expected {ours}")
    stray = sorted(uid for uid, frame in named
                   if (uid, frame) not in known and not (frame is None and uid in known_uids))
    if stray:
        more = f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""
        raise InputError(f"{ss.path}: references image {stray[0]}{more} of {refs}, not an instance of {ours}")


def select_rois(ss: StructureSet, names: Sequence[str] | None) -> list[RoiContours]:
    """The ROIs named (all merged), or the only ROI when no name is given.

    Raises:
        InputError: a name not in the file, no name with several ROIs, or a selected ROI
            without a CLOSED_PLANAR contour (an empty ROI); the message lists what is there.
    """
    by_name = {roi.name: roi for roi in ss.rois}
    if not names:
        if len(ss.rois) != 1:
            raise InputError(f"{ss.path}: {len(ss.rois)} ROIs ({ss.names()}); name the lesion ROI(s) with --roi")
        chosen = list(ss.rois)
    else:
        missing = [n for n in names if n not in by_name]
        if missing:
            raise InputError(f"{ss.path}: no ROI named '{missing[0]}'; ROIs there: {ss.names()}")
        chosen = [by_name[n] for n in dict.fromkeys(names)]
    for roi in chosen:
        if not roi.contours:
            raise InputError(f"{ss.path}: ROI '{roi.name}' holds no closed planar contour (an empty ROI); "
                             f"ROIs there: {ss.names()}")
    return chosen


def fill_even_odd(polygons: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre is inside an odd number of ``polygons`` (the even-odd rule).

    A scanline fill: for each pixel row, the crossings of every polygon edge with the row's
    centre line are counted to the right of each pixel centre; an odd count is inside.
    Edges are half-open in the row direction, so a vertex on a centre line counts once.

    Args:
        polygons: each ``(n, 2)`` continuous ``(row, col)`` pixel coordinates of a closed
            polygon (the last point joins the first; repeating the first point is allowed).
        shape: ``(rows, cols)`` of the slice.

    Returns:
        bool ``(rows, cols)``.

    Examples:
        A 5 x 5 square (pixel centres 1..5) with a one-pixel hole at (3, 3): two contours,
        one inside the other:

        >>> outer = np.array([[0.5, 0.5], [0.5, 5.5], [5.5, 5.5], [5.5, 0.5]])
        >>> inner = np.array([[2.5, 2.5], [2.5, 3.5], [3.5, 3.5], [3.5, 2.5]])
        >>> filled = fill_even_odd([outer, inner], (7, 7)).astype(int)
        >>> filled.sum(axis=1).tolist(), filled[3].tolist()
        ([0, 5, 5, 4, 5, 5, 0], [0, 1, 1, 0, 1, 1, 0])
    """
    rows, cols = shape
    out = np.zeros(shape, bool)
    edges = []
    for poly in polygons:
        p = np.asarray(poly, np.float64)
        edges.append(np.concatenate([p, np.roll(p, -1, axis=0)], axis=1))   # r0, c0, r1, c1
    if not edges:
        return out
    e = np.concatenate(edges)
    e = e[e[:, 0] != e[:, 2]]                                                # horizontal edges cross no centre line
    if e.size == 0:
        return out
    r0, c0, r1, c1 = e.T
    lo = max(int(np.ceil(min(r0.min(), r1.min()))), 0)
    hi = min(int(np.floor(max(r0.max(), r1.max()))), rows - 1)
    centres = np.arange(cols, dtype=np.float64)
    for i in range(lo, hi + 1):
        crossing = ((r0 <= i) & (r1 > i)) | ((r1 <= i) & (r0 > i))
        if not crossing.any():
            continue
        xs = np.sort(c0[crossing] + (i - r0[crossing]) * (c1[crossing] - c0[crossing]) / (r1[crossing] - r0[crossing]))
        right = xs.size - np.searchsorted(xs, centres, side="right")        # crossings right of each centre
        out[i] = right % 2 == 1
    return out


def _slice_of(points: np.ndarray, series: DicomSeries, along: np.ndarray, path: Path, roi: str) -> int:
    normal = series.normal
    depth = points @ normal
    tol = SLICE_TOL * series.slice_spacing
    if float(np.ptp(depth)) > tol:
        raise InputError(f"{path}: ROI '{roi}' has a contour that is not in one slice plane (spans "
                         f"{float(np.ptp(depth)):.3g} mm along the slice normal); expected a CLOSED_PLANAR contour "
                         f"on one slice of series {series.series_uid}")
    k = int(np.argmin(np.abs(along - depth.mean())))
    if abs(along[k] - depth.mean()) > tol:
        where = tuple(round(float(v), 3) for v in points[0])
        raise InputError(f"{path}: ROI '{roi}' has a contour at {where} mm, {abs(along[k] - depth.mean()):.3g} mm "
                         f"from the nearest slice of series {series.series_uid}; expected every contour on a "
                         f"slice of the series (within {tol:.3g} mm)")
    return k


def rasterise(rois: Sequence[RoiContours], series: DicomSeries, path: str | os.PathLike = "RTSTRUCT") -> np.ndarray:
    """The ROIs' contours as a mask on the series' grid (see the module docstring's rule).

    Args:
        rois: the ROIs to merge (union); each ROI's contours on one slice by the even-odd rule.
        series: the series the mask is for; voxel ``[k, i, j]`` is pixel ``(row i, col j)``
            of slice ``k`` (the order :func:`analysis.imaging.dicom.read_series` returns).
        path: named in messages.

    Returns:
        uint8 0/1 ``(slices, rows, cols)``.

    Raises:
        InputError: a contour not in one plane, or on no slice of the series.
    """
    path = Path(path)
    positions = np.asarray(series.positions, np.float64)
    along = positions @ series.normal
    row_cos = np.asarray(series.orientation[:3], np.float64)
    col_cos = np.asarray(series.orientation[3:], np.float64)
    row_mm, col_mm = series.pixel_spacing
    mask = np.zeros((series.n_slices, series.rows, series.columns), np.uint8)
    for roi in rois:
        by_slice: dict[int, list[np.ndarray]] = {}
        for points in roi.contours:
            k = _slice_of(points, series, along, path, roi.name)
            d = points - positions[k]
            by_slice.setdefault(k, []).append(np.stack([d @ col_cos / row_mm, d @ row_cos / col_mm], axis=1))
        for k, polygons in by_slice.items():
            mask[k] |= fill_even_odd(polygons, (series.rows, series.columns))
    return mask


def rtstruct_mask(path: str | os.PathLike, series: DicomSeries, rois: Sequence[str] | None = None) -> np.ndarray:
    """Read an RTSTRUCT, check it references ``series``, and rasterise the chosen ROIs on it.

    Args:
        path: the RTSTRUCT file.
        series: the imported series.
        rois: ROI names to merge; None or empty: the file's only ROI.

    Returns:
        uint8 0/1 ``(slices, rows, cols)`` in the order of :func:`analysis.imaging.dicom.read_series`.

    Raises:
        InputError: see :func:`read_rtstruct`, :func:`check_references`, :func:`select_rois`
            and :func:`rasterise`; also chosen ROIs whose contours cover no pixel centre.
    """
    ss = read_rtstruct(path)
    check_references(ss, series)
    chosen = select_rois(ss, rois)
    mask = rasterise(chosen, series, ss.path)
    if not mask.any():
        raise InputError(f"{ss.path}: ROI(s) {', '.join(repr(r.name) for r in chosen)} cover no pixel centre of "
                         f"series {series.series_uid}; ROIs there: {ss.names()}")
    log.info("%s: ROI(s) %s rasterised, %d voxels", ss.path, ", ".join(r.name for r in chosen), int(mask.sum()))
    return mask
