"""The lesion label of an imported DICOM series, from whatever the contouring tool wrote.

A label is one of:

- an image file (NIfTI, NRRD, MHA...) with the CT's geometry, holding only 0 and 1
  (checked by :func:`analysis.cohort.case.label_problems`, the rule every reader of a case applies);
- a DICOM-SEG (OHIF, 3D Slicer, MONAI Label, highdicom): :func:`analysis.imaging.seg_labels.read_seg_label`,
  the segment chosen by ``segment`` (number or label; ``"all"`` merges);
- an RTSTRUCT (radiotherapy planning systems): :func:`analysis.imaging.rtstruct.rtstruct_mask`,
  the ROIs named by ``rois`` merged, rasterised on the series' grid (pixel centres, even-odd rule).

Which one a file is comes from its content: a DICOM file (with or without the preamble and
file meta header) whose Modality is SEG or RTSTRUCT; anything else is read as an image file.
A DICOM label must reference the imported series (Frame of Reference, series and instances).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk

from analysis.cohort.case import label_problems
from analysis.errors import DataProblems, InputError
from analysis.imaging.dicom import DicomSeries
from analysis.imaging.io import Geometry, read_array

__all__ = ["LabelKind", "label_kind", "dicom_label_header", "label_for_series"]

LabelKind = Literal["SEG", "RTSTRUCT", "image"]
DICOM_LABEL_MODALITIES = ("SEG", "RTSTRUCT")


def dicom_label_header(path: str | os.PathLike) -> pydicom.Dataset | None:
    """The header of a DICOM SEG or RTSTRUCT file (no pixel data), or None for anything else.

    Files lacking the preamble and file meta header are accepted when their first element
    is a DICOM group 0008 tag and their Modality is SEG or RTSTRUCT.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except pydicom.errors.InvalidDicomError:
        try:
            with open(path, "rb") as fh:
                head = fh.read(2)
            if head != b"\x08\x00":    # a dataset without meta header starts with group 0008 (little endian)
                return None
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:  # not DICOM at all
            return None
    except Exception:  # unreadable header: not a DICOM label
        return None
    try:
        modality = str(ds.get("Modality", ""))
    except Exception:  # a forced read of non-DICOM bytes
        return None
    return ds if modality in DICOM_LABEL_MODALITIES else None


def label_kind(path: str | os.PathLike) -> LabelKind:
    """``"SEG"``, ``"RTSTRUCT"`` or ``"image"`` (see the module docstring)."""
    ds = dicom_label_header(path)
    return "image" if ds is None else str(ds.Modality)  # type: ignore[return-value]


def _image_label(path: Path, image: sitk.Image) -> np.ndarray:
    label, label_geometry = read_array(path)
    problems = label_problems(path, label, label_geometry, Geometry.of(image))
    if len(problems) > 1:
        raise DataProblems(problems)
    if problems:
        raise InputError(problems[0])
    return label.astype(np.uint8)


def label_for_series(path: str | os.PathLike, series: DicomSeries, image: sitk.Image, *,
                     segment: str | None = None, rois: Sequence[str] = ()) -> tuple[np.ndarray, LabelKind]:
    """The lesion mask a label file gives for an imported series.

    Args:
        path: the label file (image, DICOM-SEG or RTSTRUCT).
        series: the imported series (headers).
        image: the series' volume as :func:`analysis.imaging.dicom.read_series` returned it.
        segment: SEG only: segment number or label, ``"all"``; None: the only segment.
        rois: RTSTRUCT only: ROI names to merge; empty: the only ROI.

    Returns:
        ``(mask, kind)``: uint8 0/1 ``(slices, rows, cols)`` in ``image``'s array order, and
        what the file was.

    Raises:
        InputError: ``segment`` or ``rois`` given for another kind of label, or the label's
            own refusals (see the readers named in the module docstring).
    """
    path = Path(path)
    kind = label_kind(path)
    if segment is not None and kind != "SEG":
        raise InputError(f"{path}: --segment applies to a DICOM-SEG label; this is {_kind_name(kind)}")
    if rois and kind != "RTSTRUCT":
        raise InputError(f"{path}: --roi applies to an RTSTRUCT label; this is {_kind_name(kind)}")
    if kind == "image":
        other = _other_dicom_modality(path)
        if other is not None:
            raise InputError(f"{path}: a DICOM {other} object; expected a DICOM-SEG or RTSTRUCT of the series, "
                             f"or a mask image file (NIfTI/NRRD)")
        return _image_label(path, image), kind
    if kind == "SEG":
        from analysis.imaging.seg_labels import read_seg_label

        mask = read_seg_label(path, series, segment)
    else:
        from analysis.imaging.rtstruct import rtstruct_mask

        mask = rtstruct_mask(path, series, list(rois))
    expected = tuple(reversed(image.GetSize()))
    if mask.shape != expected:  # the readers place by the series' headers; the image must agree
        raise InputError(f"{path}: label of shape {mask.shape}; expected the series' (slices, rows, cols) {expected}")
    return mask, kind


def _other_dicom_modality(path: Path) -> str | None:
    """The Modality of a DICOM file (with its preamble) that is not a label, else None."""
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality", "?"))
    except Exception:  # not a DICOM file: an image file for SimpleITK
        return None


def _kind_name(kind: LabelKind) -> str:
    return {"SEG": "a DICOM-SEG", "RTSTRUCT": "an RTSTRUCT", "image": "an image file"}[kind]
