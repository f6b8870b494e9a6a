"""DICOM Segmentation (SEG) output of a lesion mask, written with highdicom and verified by reading it back.

The SEG is BINARY, uncompressed (Explicit VR Little Endian). Given a 0/1 mask it holds one
segment; given lesion labels (``labels``: ids ``1..N``, the ``lesion_id`` of ``lesions.csv``) it
holds one segment per lesion, segment number = lesion id, so that OHIF's segmentation panel and
3D Slicer's Segment Editor list, colour, show and hide each lesion on its own (both display
segments, not regions of a segment) and a TID 1500 report (:mod:`analysis.imaging.dicom_sr`)
references each lesion as its segment. Every segment has:

- label "bone metastasis" (one segment) or "bone metastasis N" (lesion N);
- category SCT 49755003 "Morphologically Abnormal Structure";
- type SCT 14799000 "Neoplasm, Secondary";
- algorithm type AUTOMATIC, AlgorithmIdentificationSequence: name = the model's name,
  version = its fingerprint, family DCM 123110 "Artificial Intelligence" (CID 7162).

The codes were checked against the DICOM standard tables bundled with pydicom 3.0.2
(``pydicom.sr.codedict.codes``, generated from DICOM PS3.16): 49755003 is listed in CID 7150
"Segmentation Property Category" as "Morphologically Abnormal Structure"; 14799000 is listed
in CID 7151 "Segmentation Property Type", CID 7159 "Lesion Segmentation Type" and CID 7194
"Morphologically Abnormal Structure Segmentation Property Type" with the meaning "Neoplasm,
Secondary" (pydicom's SNOMED table also knows it under its SNOMED CT name "Neoplasm,
metastatic (morphologic abnormality)", SNOMED RT M-80006). The CID meaning is used because
the segment's type is drawn from CID 7151. No bone-specific code (e.g. SCT 94222008 "Bony
metastasis", a disorder) appears in a segmentation CID; the anatomy is left unstated.

The SEG sits in the source's Study with its Patient and Frame of Reference (highdicom copies
them from the source headers), references only the chosen series' own instances, and SEG
frame ``k`` is pixel for pixel the source slice at mask slice ``k``'s position.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from analysis import __version__
from analysis.errors import InputError
from analysis.imaging.dicom import DicomSeries
from analysis.imaging.io import atomic_file

log = logging.getLogger(__name__)

SEGMENT_LABEL = "bone metastasis"
#: Manufacturer of every SEG this project writes: how the node tells its own SEGs from a viewer's
#: (:mod:`analysis.review.viewer`).
MANUFACTURER = "bonemets"
#: CID 7150: Morphologically Abnormal Structure (SCT 49755003).
CATEGORY = codes.cid7150.MorphologicallyAbnormalStructure
#: CID 7151: Neoplasm, Secondary (SCT 14799000, SNOMED CT "Neoplasm, metastatic").
PROPERTY_TYPE = codes.cid7151.NeoplasmSecondary
#: Recommended display colours of the segments (RecommendedDisplayCIELabValue, PS3.3 C.8.20.2), by
#: lesion id in turn: eight of Trubetskoy's "20 distinct colours" in CIE L*a*b* (D65), so a viewer
#: shows neighbouring lesions apart (OHIF otherwise warns that the SEG has none and picks its own).
DISPLAY_COLOURS = ((49.5, 73.3, 28.1), (65.0, -54.7, 43.3), (89.5, -6.7, 86.4), (52.0, -3.8, -44.5),
                   (66.2, 38.7, 60.7), (38.3, 65.3, -54.4), (87.0, -41.7, -12.5), (58.5, 86.0, -49.9))
#: CID 7162: Artificial Intelligence (DCM 123110).
ALGORITHM_FAMILY = codes.cid7162.ArtificialIntelligence
#: Type 2 attributes highdicom copies from the source; anonymised exports may lack them.
_PATIENT_STUDY_DEFAULTS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                           "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
#: Largest distance (mm) between a mask slice's position and its source image's.
POSITION_TOL_MM = 1e-3


@contextlib.contextmanager
def names_from_source() -> Any:
    """Silence highdicom's person-name check while it copies names from the source headers.

    highdicom (``base.py``, ``check_person_name``) warns when PatientName or
    ReferringPhysicianName has no ``^`` ("unlikely to represent the intended person name"),
    which an anonymised export's "Anonymous" has; the name is the source series' own, copied
    unchanged as the standard requires, so the warning says nothing the user can act on (nor does
    it for a verifying reader's user name, one PN component as it is meant to be). Other
    warnings pass.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The string .* is unlikely to represent the intended person name",
                                category=UserWarning)
        yield


def _code_record(code: Any) -> dict[str, str]:
    return {"value": str(code.value), "scheme": str(code.scheme_designator), "meaning": str(code.meaning)}


def _source_headers(series: DicomSeries) -> list[pydicom.Dataset]:
    """The series' headers in mask slice order, matched by ImagePositionPatient (not file order).

    Raises:
        InputError: a file unreadable or no longer at a position of the series.
    """
    if series.multiframe:
        try:
            return [pydicom.dcmread(series.files[0], stop_before_pixels=True)]
        except Exception as exc:  # pydicom raises many kinds for a damaged file
            raise InputError(f"{series.files[0]}: unreadable DICOM header ({type(exc).__name__})") from None
    normal = series.normal
    along = np.array(series.positions) @ normal
    spacing = series.slice_spacing
    by_slice: dict[int, pydicom.Dataset] = {}
    for path in series.files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many kinds for a damaged file
            raise InputError(f"{path}: unreadable DICOM header ({type(exc).__name__})") from None
        pos = np.array([float(v) for v in ds.ImagePositionPatient])
        k = int(round((float(pos @ normal) - along[0]) / spacing))
        if not 0 <= k < series.n_slices or np.linalg.norm(pos - np.array(series.positions[k])) > POSITION_TOL_MM \
                or k in by_slice:
            raise InputError(f"{path}: ImagePositionPatient {tuple(pos)} is not a free slice position of series "
                             f"{series.series_uid}; expected the series as it was read")
        by_slice[k] = ds
    headers = [by_slice[k] for k in range(series.n_slices)]
    for k, ds in enumerate(headers):
        if str(ds.SOPInstanceUID) != series.sop_instance_uids[k]:
            raise InputError(f"{series.files[k]}: SOPInstanceUID differs from the one read for slice {k}; "
                             f"expected the series unchanged since it was read")
    return headers


def _with_defaults(ds: pydicom.Dataset, thickness: float) -> pydicom.Dataset:
    """A copy with what highdicom copies from the source set when an anonymised export lacks it.

    Patient/Study attributes become empty (type 2 in the SEG); a missing SliceThickness of a
    single-frame slice becomes ``thickness`` (the series' slice spacing).
    """
    out = pydicom.Dataset(ds)  # shallow copy: new top-level element container
    out.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
    for keyword in _PATIENT_STUDY_DEFAULTS:
        if keyword not in out or out.get(keyword) is None:
            setattr(out, keyword, "")
    if "PerFrameFunctionalGroupsSequence" not in out and not out.get("SliceThickness"):
        out.SliceThickness = f"{thickness:.6g}"
    return out


def result_uid(seed: str, what: str) -> str:
    """A deterministic UID of ``what`` for a result identified by ``seed`` (e.g. the source
    SeriesInstanceUID and the model's fingerprint): ``2.25.`` and the integer of a name-based
    UUID (RFC 4122 version 5), the UUID-derived form of DICOM PS3.5 B.2. The same prediction
    sent twice carries the same Series/SOP Instance UIDs, so a PACS replaces or ignores it
    instead of keeping two. (pydicom's ``generate_uid(prefix=None)`` ignores its entropy sources.)

    >>> result_uid("1.2.3|abc", "seg")
    '2.25.176536469783130981062538386292921105546'
    """
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, f'{seed}|{what}').int}"


def _check_labels(labels: np.ndarray, mask: np.ndarray, series: DicomSeries) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != mask.shape or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels for series {series.series_uid}: shape {labels.shape} dtype {labels.dtype}; expected "
                         f"integer lesion ids of the mask's shape {mask.shape}")
    if not np.array_equal(labels > 0, mask > 0):
        raise InputError(f"labels for series {series.series_uid}: non-zero voxels differ from the mask's")
    n = int(labels.max())
    if n > 65535 or not np.array_equal(np.unique(labels[labels > 0]), np.arange(1, n + 1)):
        raise InputError(f"labels for series {series.series_uid}: expected lesion ids 1..N, each present, N <= 65535")
    return labels.astype(np.uint16, copy=False)


def _check_mask(mask: np.ndarray, series: DicomSeries) -> np.ndarray:
    mask = np.asarray(mask)
    expected = (series.n_slices, series.rows, series.columns)
    if mask.shape != expected:
        raise InputError(f"mask for series {series.series_uid} in {series.folder}: shape {mask.shape} differs from "
                         f"the series' (slices, rows, cols) {expected}")
    if mask.dtype != np.uint8 and mask.dtype != bool:
        if not np.issubdtype(mask.dtype, np.integer):
            raise InputError(f"mask for series {series.series_uid}: dtype {mask.dtype}; expected uint8 0/1")
    values = np.unique(mask)
    if not set(values.tolist()) <= {0, 1}:
        raise InputError(f"mask for series {series.series_uid}: values {values[:8].tolist()}; expected only 0 and 1")
    return mask.astype(np.uint8, copy=False)


def _build(mask: np.ndarray, series: DicomSeries, headers: list[pydicom.Dataset], *, model_name: str,
           model_version: str, series_number: int, series_description: str, per_lesion: bool,
           uids: tuple[str, str], lesion_ids: Sequence[int] | None = None,
           tracking_uids: Mapping[int, str] | None = None,
           semiautomatic: Mapping[int, tuple[str, str]] | None = None) -> hd.seg.Segmentation:
    """``mask``: 0/1 (one segment) or segment numbers 1..N (``per_lesion``: segment i is lesion
    ``lesion_ids[i - 1]``, default lesion i)."""
    algorithm = hd.AlgorithmIdentificationSequence(name=model_name, family=ALGORITHM_FAMILY, version=model_version)
    n = int(mask.max()) if per_lesion else 1
    ids = list(lesion_ids) if lesion_ids is not None else list(range(1, n + 1))
    tracking_uids = tracking_uids or {}
    semiautomatic = semiautomatic or {}

    def how(lesion: int) -> dict[str, Any]:
        if lesion not in semiautomatic:
            return {"algorithm_type": hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, "algorithm_identification": algorithm}
        name, version = semiautomatic[lesion]
        return {"algorithm_type": hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
                "algorithm_identification": hd.AlgorithmIdentificationSequence(name=name, family=ALGORITHM_FAMILY,
                                                                               version=version)}

    segments = [hd.seg.SegmentDescription(
        segment_number=i, segment_label=f"{SEGMENT_LABEL} {ids[i - 1]}" if per_lesion else SEGMENT_LABEL,
        segmented_property_category=CATEGORY, segmented_property_type=PROPERTY_TYPE, **how(ids[i - 1]),
        tracking_id=f"lesion {ids[i - 1]}" if per_lesion else None,
        tracking_uid=(tracking_uids.get(ids[i - 1]) or result_uid(uids[0], f"lesion {ids[i - 1]}")) if per_lesion
        else None, display_color=hd.color.CIELabColor(*DISPLAY_COLOURS[(ids[i - 1] - 1) % len(DISPLAY_COLOURS)]))
        for i in range(1, n + 1)]
    row_spacing, col_spacing = series.pixel_spacing
    thickness = series.slice_thickness if series.slice_thickness else series.slice_spacing
    measures = hd.PixelMeasuresSequence(pixel_spacing=(row_spacing, col_spacing), slice_thickness=thickness,
                                        spacing_between_slices=series.slice_spacing)
    if series.multiframe:
        # pixel_array[i] must be source frame i + 1; slice k is frame frame_numbers[k].
        n_frames = int(headers[0].get("NumberOfFrames", series.n_slices))
        pixels = np.zeros((n_frames, series.rows, series.columns), mask.dtype)
        for k, num in enumerate(series.frame_numbers or []):
            pixels[num - 1] = mask[k]
    else:
        pixels = mask
    with names_from_source():  # Patient/Study are the source's own
        return hd.seg.Segmentation(
            source_images=[_with_defaults(ds, thickness) for ds in headers], pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
            series_instance_uid=uids[0], series_number=series_number, sop_instance_uid=uids[1], instance_number=1,
            manufacturer=MANUFACTURER, manufacturer_model_name=model_name[:64],
            software_versions=f"bonemets {__version__}", device_serial_number=model_version[:64],
            transfer_syntax_uid=ExplicitVRLittleEndian, pixel_measures=measures,
            content_label="BONEMETS", content_description=f"{SEGMENT_LABEL} ({model_name})"[:64],
            series_description=series_description[:64], omit_empty_frames=True)


def _read_back(path: Path, series: DicomSeries) -> np.ndarray:
    seg = hd.seg.segread(path)
    if series.multiframe:
        return np.asarray(seg.get_pixels_by_source_frame(
            source_sop_instance_uid=series.sop_instance_uids[0], source_frame_numbers=series.frame_numbers,
            combine_segments=True, assert_missing_frames_are_empty=True))
    return np.asarray(seg.get_pixels_by_source_instance(
        source_sop_instance_uids=series.sop_instance_uids, combine_segments=True,
        assert_missing_frames_are_empty=True))


def _frames_aligned(path: Path, series: DicomSeries) -> str | None:
    """None when every SEG frame lies at its source image's position; else what differs."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    where = {}
    for k, uid in enumerate(series.sop_instance_uids):
        where[(uid, series.frame_numbers[k] if series.frame_numbers else None)] = np.array(series.positions[k])
    for i, frame in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
        src = frame.DerivationImageSequence[0].SourceImageSequence[0]
        num = int(src.ReferencedFrameNumber[0] if isinstance(src.get("ReferencedFrameNumber"), list)
                  else src.ReferencedFrameNumber) if series.multiframe else None
        expected = where.get((str(src.ReferencedSOPInstanceUID), num))
        got = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
        if expected is None or np.linalg.norm(expected - got) > POSITION_TOL_MM:
            return f"frame {i} at {tuple(got)} references {src.ReferencedSOPInstanceUID} at {expected}"
    return None


def segment_tracking_uids(path: str | os.PathLike) -> dict[int, str]:
    """``{lesion id: TrackingUID}`` of the segments of a SEG whose TrackingID is "lesion N" (as
    :func:`write_dicom_seg` writes them with ``labels``): what a later object about the same lesions
    reuses (the reviewed SEG, a timeline's tracks)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    out = {}
    for item in ds.SegmentSequence:
        ident = str(item.get("TrackingID", ""))
        if ident.startswith("lesion ") and item.get("TrackingUID"):
            out[int(ident.split()[-1])] = str(item.TrackingUID)
    return out


def write_dicom_seg(mask: np.ndarray, series: DicomSeries, out_path: str | os.PathLike, *, model_name: str,
                    model_version: str, series_number: int = 9900,
                    series_description: str | None = None, labels: np.ndarray | None = None,
                    uid_seed: str | None = None, lesion_ids: Sequence[int] | None = None,
                    tracking_uids: Mapping[int, str] | None = None,
                    semiautomatic: Mapping[int, tuple[str, str]] | None = None) -> dict[str, Any]:
    """Write a lesion mask as a DICOM SEG of its source series, verified before it is moved into place.

    The SEG is written to a temporary file in ``out_path``'s folder, read back with
    ``highdicom.seg.segread`` and compared voxel for voxel with ``mask`` (by source instance,
    in mask slice order) and frame by frame with the source positions; only then is it given
    the umask's mode and renamed to ``out_path``.

    Args:
        mask: uint8 (or bool) 0/1, ``(slices, rows, cols)``, exactly the grid of the image
            :func:`analysis.imaging.dicom.read_series` returned for ``series``.
        series: the source series (:func:`analysis.imaging.dicom.find_series` / ``list_series``).
        out_path: the SEG file to write (its folder is created).
        model_name: the model's name (AlgorithmName, ManufacturerModelName).
        model_version: the model's fingerprint, e.g. a sha256 prefix of its run folder
            (AlgorithmVersion, DeviceSerialNumber).
        series_number: SeriesNumber of the new SEG series.
        series_description: SeriesDescription; default ``"bonemets <model_name>"``.
        labels: lesion ids ``(slices, rows, cols)`` 1..N where ``mask`` is 1 (the ``lesion_id`` of
            ``lesions.csv``): one segment per lesion, segment number = lesion id. None: one segment.
        uid_seed: derive the Series and SOP Instance UIDs from this (:func:`result_uid`), e.g.
            ``"<source SeriesInstanceUID>|<model fingerprint>"``; None: new random UIDs.
        lesion_ids: with ``labels``: segment i (``labels == i``) is lesion ``lesion_ids[i - 1]``
            (its label "bone metastasis K", TrackingID "lesion K" and TrackingUID), for lesion ids
            that are not 1..N (e.g. ``followup``'s tracked lesions absent from the baseline
            frame); None: segment i is lesion i.
        tracking_uids: with ``labels``: the TrackingUID of some lesions by lesion id (a reviewed
            SEG keeps the preliminary one's); the others derive from the SEG's series UID.
        semiautomatic: with ``labels``: lesions drawn with a reader's help, by lesion id, each with
            the ``(name, version)`` of the tool (e.g. the review's region growing): their segments
            are SEMIAUTOMATIC with that algorithm; the others AUTOMATIC with the model.

    Returns:
        A JSON-able record. With lesion voxels::

            {"written": True, "path": str, "bytes": int, "seconds": float,
             "sop_instance_uid": str, "series_instance_uid": str, "study_uid": str,
             "frame_of_reference_uid": str, "referenced_series_uid": str,
             "n_frames": int, "lesion_voxels": int, "segment": {"label", "category", "type"},
             "algorithm": {"name", "version", "family"}, "verified": str}

        With an empty mask no file is written: ``{"written": False, "path": None,
        "reason": "no lesion voxels", "lesion_voxels": 0, "referenced_series_uid": str}``.

    Raises:
        InputError: a mask of the wrong shape or values, source files changed since they
            were read, a series without FrameOfReferenceUID, or a SEG that does not read
            back equal (nothing is left behind).
    """
    out_path = Path(out_path)
    mask = _check_mask(mask, series)
    if labels is not None:
        mask = _check_labels(labels, mask, series)
        if lesion_ids is not None and len(lesion_ids) != int(mask.max()):
            raise InputError(f"labels for series {series.series_uid}: {int(mask.max())} segment(s) but "
                             f"{len(lesion_ids)} lesion id(s); expected one id per segment")
    voxels = int(np.count_nonzero(mask))
    if voxels == 0:
        return {"written": False, "path": None, "reason": "no lesion voxels", "lesion_voxels": 0,
                "referenced_series_uid": series.series_uid}
    if not series.frame_of_reference_uid:
        raise InputError(f"{series.folder}: series {series.series_uid} has no FrameOfReferenceUID; "
                         f"a DICOM SEG needs the source's frame of reference")
    start = time.perf_counter()
    headers = _source_headers(series)
    uids = (result_uid(uid_seed, "seg-series"), result_uid(uid_seed, "seg")) if uid_seed else (hd.UID(), hd.UID())
    seg = _build(mask, series, headers, model_name=model_name, model_version=model_version,
                 series_number=series_number, series_description=series_description or f"bonemets {model_name}",
                 per_lesion=labels is not None, uids=uids, lesion_ids=lesion_ids, tracking_uids=tracking_uids,
                 semiautomatic=semiautomatic)
    with atomic_file(out_path) as tmp:  # moved into place only when it reads back equal
        seg.save_as(tmp)
        back = _read_back(tmp, series)
        if back.shape != mask.shape or not np.array_equal(back, mask):
            differ = int(np.count_nonzero(back != mask)) if back.shape == mask.shape else -1
            raise InputError(f"{out_path}: the SEG read back differs from the mask ({differ} voxels, shapes "
                             f"{back.shape} vs {mask.shape}); not written")
        misaligned = _frames_aligned(tmp, series)
        if misaligned:
            raise InputError(f"{out_path}: a SEG frame is not at its source image's position ({misaligned}); not written")
    seconds = time.perf_counter() - start
    log.info("%s: SEG of %d lesion voxels, %d frames, %.2f s", out_path, voxels, int(seg.NumberOfFrames), seconds)
    return {
        "written": True, "path": str(out_path), "bytes": out_path.stat().st_size, "seconds": round(seconds, 3),
        "sop_instance_uid": str(seg.SOPInstanceUID), "series_instance_uid": str(seg.SeriesInstanceUID),
        "study_uid": str(seg.StudyInstanceUID), "frame_of_reference_uid": str(seg.FrameOfReferenceUID),
        "referenced_series_uid": series.series_uid, "n_frames": int(seg.NumberOfFrames), "lesion_voxels": voxels,
        "segments": len(seg.SegmentSequence),
        "segment": {"label": SEGMENT_LABEL, "category": _code_record(CATEGORY), "type": _code_record(PROPERTY_TYPE)},
        "algorithm": {"name": model_name, "version": model_version, "family": _code_record(ALGORITHM_FAMILY)},
        "verified": "read back with highdicom: voxel for voxel equal; every frame at its source image's position",
    }


@dataclass(frozen=True)
class SegVolume:
    """The frames of a DICOM SEG stacked on their slice grid (all segments combined).

    Attributes:
        mask: uint8 0/1 ``(slices, rows, cols)``, slice ``k`` at ``origins[k]``.
        origins: ``{k: (x, y, z)}`` patient position (LPS mm) of slice ``k``'s first pixel.
        row_cosine, col_cosine: ImageOrientationPatient's two direction cosines.
        row_spacing, col_spacing: PixelSpacing, mm.
    """

    mask: np.ndarray
    origins: dict[int, np.ndarray]
    row_cosine: np.ndarray
    col_cosine: np.ndarray
    row_spacing: float
    col_spacing: float

    def points(self, k: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Patient positions ``(n, 3)`` (LPS mm) of voxels ``(k, i, j)``: pixel ``(row i, col j)``
        of the frame at ``p`` is at ``p + j * col_spacing * row_cosine + i * row_spacing * col_cosine``."""
        return (np.array([self.origins[int(kk)] for kk in k]).reshape(-1, 3)
                + (np.asarray(j) * self.col_spacing)[:, None] * self.row_cosine
                + (np.asarray(i) * self.row_spacing)[:, None] * self.col_cosine)


def read_seg_volume(seg_path: str | os.PathLike) -> SegVolume:
    """A DICOM SEG's frames placed on their slice grid, from the frames' own geometry.

    Frames are placed from PlanePositionSequence, the shared PlaneOrientationSequence and
    PixelMeasuresSequence (PixelSpacing; SpacingBetweenSlices, else the smallest gap between
    frame positions, sets the slice grid). All segments are combined.

    Raises:
        InputError: not a readable SEG.
    """
    path = Path(seg_path)
    try:
        ds = pydicom.dcmread(path)
        frames = np.asarray(ds.pixel_array)
    except Exception as exc:  # pydicom raises many kinds for a damaged file
        raise InputError(f"{path}: not a readable DICOM SEG ({type(exc).__name__})") from None
    if str(ds.get("Modality", "")) != "SEG":
        raise InputError(f"{path}: Modality {ds.get('Modality')!s}; expected SEG")
    frames = frames.reshape(int(ds.get("NumberOfFrames", 1)), int(ds.Rows), int(ds.Columns))
    shared = ds.SharedFunctionalGroupsSequence[0]
    per_frame = ds.PerFrameFunctionalGroupsSequence

    def item(i: int, seq: str) -> pydicom.Dataset:
        frame = per_frame[i]
        return (frame if seq in frame else shared)[seq][0]

    iop = np.array([float(v) for v in item(0, "PlaneOrientationSequence").ImageOrientationPatient])
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    pm = item(0, "PixelMeasuresSequence")
    row_spacing, col_spacing = (float(v) for v in pm.PixelSpacing)
    positions = np.array([[float(v) for v in item(i, "PlanePositionSequence").ImagePositionPatient]
                          for i in range(len(per_frame))])
    along = positions @ normal
    unique = np.unique(np.round(along, 4))
    step = float(pm.get("SpacingBetweenSlices") or (np.min(np.diff(unique)) if unique.size > 1 else 1.0))
    k_of = np.round((along - unique[0]) / step).astype(int)
    volume = np.zeros((int(k_of.max()) + 1, frames.shape[1], frames.shape[2]), np.uint8)
    origin_of = {}
    for i, k in enumerate(k_of):
        volume[k] |= frames[i] != 0
        origin_of[int(k)] = positions[i]
    return SegVolume(mask=volume, origins=origin_of, row_cosine=row_cos, col_cosine=col_cos,
                     row_spacing=row_spacing, col_spacing=col_spacing)
