"""Test writers of DICOM labels: an RTSTRUCT from a mask's contours, a multi-segment DICOM-SEG.

RTSTRUCT: each slice ``k`` of each ROI's mask is traced with
``skimage.measure.find_contours(padded slice, 0.5)``: on a 0/1 image the 0.5 iso-line runs
through the midpoints between inside and outside pixel centres, so every pixel centre lies
strictly on its own side of the traced polygons, and holes come out as separate contours
nested inside their outline. The ``(row, col)`` points are mapped to patient mm through the
slice's ImagePositionPatient, ImageOrientationPatient and PixelSpacing. Read back with the
import's rule (:mod:`analysis.imaging.rtstruct`: pixel centres, even-odd over a slice's
contours), the mask comes back whole; the round-trip tests require Dice >= 0.98.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import RTStructureSetStorage, generate_uid
from skimage.measure import find_contours

from analysis.imaging.dicom import DicomSeries
from tests.test_dicom import _base


def mask_contours(mask_slice: np.ndarray) -> list[np.ndarray]:
    """Closed ``(row, col)`` polygons of a 0/1 slice at the 0.5 iso-line (holes included)."""
    padded = np.pad(np.asarray(mask_slice, np.float64), 1)
    return [c - 1.0 for c in find_contours(padded, 0.5)]


def to_patient(points_rc: np.ndarray, series: DicomSeries, k: int) -> np.ndarray:
    """Patient mm ``(n, 3)`` of continuous ``(row, col)`` pixel points of slice ``k``."""
    origin = np.asarray(series.positions[k], np.float64)
    row_cos, col_cos = np.asarray(series.orientation[:3]), np.asarray(series.orientation[3:])
    row_mm, col_mm = series.pixel_spacing
    return origin + points_rc[:, 1:2] * col_mm * row_cos + points_rc[:, 0:1] * row_mm * col_cos


def _image_ref(series: DicomSeries, k: int) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = series.sop_class_uid
    ref.ReferencedSOPInstanceUID = series.sop_instance_uids[k]
    if series.multiframe:
        ref.ReferencedFrameNumber = series.frame_numbers[k]
    return ref


def write_rtstruct(path: Path, rois: Mapping[str, np.ndarray], series: DicomSeries, *,
                   frame_of_reference: str | None = None, series_uid: str | None = None,
                   extra_contours: Mapping[str, list[np.ndarray]] | None = None,
                   empty_rois: tuple[str, ...] = ()) -> Path:
    """An RTSTRUCT of ``series`` with one ROI per ``rois`` entry, contours traced from each mask.

    Args:
        path: the file to write.
        rois: ROI name -> 0/1 mask ``(slices, rows, cols)`` on the series' grid.
        series: the series the contours are drawn on.
        frame_of_reference, series_uid: reference these instead of the series' own.
        extra_contours: ROI name -> further CLOSED_PLANAR contours ``(n, 3)`` in patient mm
            (without ContourImageSequence).
        empty_rois: ROI names defined without any contour.
    """
    ds = _base(RTStructureSetStorage, series_uid=generate_uid(), description="lesions", series_number=60,
               modality="RTSTRUCT")
    del ds.FrameOfReferenceUID            # an RTSTRUCT names it per ROI and in the referenced frames
    ds.StudyInstanceUID = series.study_uid
    ds.PatientID = series.patient_id
    ds.StructureSetLabel = "lesions"
    for_uid = frame_of_reference or series.frame_of_reference_uid
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = series_uid or series.series_uid
    ref_series.ContourImageSequence = Sequence([_image_ref(series, k) for k in range(series.n_slices)])
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study.ReferencedSOPInstanceUID = series.study_uid
    study.RTReferencedSeriesSequence = Sequence([ref_series])
    ref_for = Dataset()
    ref_for.FrameOfReferenceUID = for_uid
    ref_for.RTReferencedStudySequence = Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([ref_for])
    names = list(rois) + [n for n in (extra_contours or {}) if n not in rois] + list(empty_rois)
    ss_rois, roi_contours = [], []
    for number, name in enumerate(names, start=1):
        item = Dataset()
        item.ROINumber = number
        item.ReferencedFrameOfReferenceUID = for_uid
        item.ROIName = name
        item.ROIGenerationAlgorithm = "MANUAL"
        ss_rois.append(item)
        if name in empty_rois:
            continue
        contours = []
        mask = rois.get(name)
        for k in range(series.n_slices if mask is not None else 0):
            for poly in mask_contours(mask[k]):
                c = Dataset()
                c.ContourImageSequence = Sequence([_image_ref(series, k)])
                c.ContourGeometricType = "CLOSED_PLANAR"
                pts = to_patient(poly[:-1], series, k)    # find_contours repeats the first point
                c.NumberOfContourPoints = len(pts)
                c.ContourData = [f"{v:.4f}" for v in pts.ravel()]
                contours.append(c)
        for pts in (extra_contours or {}).get(name, []):
            c = Dataset()
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(pts)
            c.ContourData = [f"{v:.4f}" for v in np.asarray(pts).ravel()]
            contours.append(c)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ROIDisplayColor = [255, 0, 0]
        rc.ContourSequence = Sequence(contours)
        roi_contours.append(rc)
    ds.StructureSetROISequence = Sequence(ss_rois)
    ds.ROIContourSequence = Sequence(roi_contours)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_seg(path: Path, segments: Mapping[str, np.ndarray], series: DicomSeries) -> Path:
    """A BINARY DICOM-SEG of a single-frame ``series``, one segment per entry (numbered from 1)."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]
    descriptions = [hd.seg.SegmentDescription(
        segment_number=i, segment_label=label, segmented_property_category=codes.cid7150.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.cid7151.NeoplasmSecondary,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL) for i, label in enumerate(segments, start=1)]
    pixels = np.stack([np.asarray(m, np.uint8) for m in segments.values()], axis=-1)
    seg = hd.seg.Segmentation(
        source_images=headers, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=50, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="tests", manufacturer_model_name="tests", software_versions="0",
        device_serial_number="0", omit_empty_frames=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path
