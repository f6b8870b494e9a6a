"""Bringing a user's data into the cohort layout: DICOM CT series and TotalSegmentator bone maps."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from analysis.cohort.bone_maps import BONE_MAP_KINDS, PROJECT, TOTALSEG_TO_BONE, TOTALSEGMENTATOR
from analysis.cohort.layout import MAX_BONE_CODE, Cohort, check_case_id, write_dataset_json
from analysis.errors import InputError
from analysis.imaging.dicom import read_dicom
from analysis.imaging.io import Geometry, read_array, read_image, require_writable, write_array, write_image

log = logging.getLogger(__name__)

def totalseg_lookup(max_id: int = 255) -> np.ndarray:
    """Lookup table ``lut[id] -> bone code`` for TotalSegmentator v2 "total" ids (others -> 0;
    :data:`analysis.cohort.bone_maps.TOTALSEG_TO_BONE`)."""
    lut = np.zeros(max(max_id, max(TOTALSEG_TO_BONE)) + 1, dtype=np.uint8)
    for src, dst in TOTALSEG_TO_BONE.items():
        lut[src] = dst
    return lut


def bones_from(path: str | os.PathLike, kind: str, geometry: Geometry) -> np.ndarray:
    """Read a case's bone map as project codes, checked against its CT's geometry.

    Args:
        path: the bone map file (e.g. ``DIR/<case>.nii.gz``).
        kind: one of :data:`analysis.cohort.bone_maps.BONE_MAP_KINDS`: ``"project"`` for project codes 0..7 (``bonesTr``, see
            :data:`analysis.cohort.layout.BONE_CODES`); ``"totalsegmentator"`` for a
            TotalSegmentator v2 "total" multilabel map (mapped through
            :func:`analysis.cohort.imports.totalseg_lookup`; non-bone classes become 0).
        geometry: the CT's geometry.

    Returns:
        uint8 ``(slices, rows, cols)`` bone codes in the stored file's order.

    Raises:
        InputError: unreadable file, geometry unlike the CT's, non-integer or negative
            labels, codes above 7 in a project map, or an unknown ``kind``.
    """
    if kind not in BONE_MAP_KINDS:
        raise InputError(f"bone map kind {kind!r}: expected one of {', '.join(BONE_MAP_KINDS)}")
    labels, geom = read_array(path)
    mismatch = geometry.mismatch(geom)
    if mismatch:
        raise InputError(f"{path}: {mismatch} of the case's CT")
    if np.issubdtype(labels.dtype, np.floating) and not np.array_equal(labels, np.round(labels)):
        raise InputError(f"{path}: holds non-integer values; expected integer bone labels")
    if labels.size == 0:
        return labels.astype(np.uint8)
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise InputError(f"{path}: holds negative labels (min {low}); expected bone labels >= 0")
    if kind == PROJECT:
        if high > MAX_BONE_CODE:
            raise InputError(f"{path}: holds code {high}; expected project bone codes 0..{MAX_BONE_CODE} "
                             f"(a TotalSegmentator map? pass kind '{TOTALSEGMENTATOR}')")
        return labels.astype(np.uint8, copy=False)
    return totalseg_lookup(high)[labels.astype(np.int64, copy=False)]


def import_bones(seg: str | os.PathLike, dataset: str | os.PathLike, case: str) -> Path:
    """Map a TotalSegmentator v2 "total" multilabel map to ``bonesTr/<case>.nii.gz``.

    Args:
        seg: the multilabel segmentation (NIfTI), same geometry as the case's CT.
        dataset: the cohort folder (must already hold the case's CT).
        case: case id.

    Returns:
        Path of the written bone map.

    Raises:
        InputError: unreadable map, non-integer or negative labels, geometry unlike the CT, or a
            dataset that cannot be written.
    """
    check_case_id(case)
    cohort = Cohort(dataset)
    require_writable(cohort.root)
    ct_path = cohort.image_path(case)
    if not ct_path.is_file():
        raise InputError(f"{ct_path}: not found; import the case's CT before its bone map")
    ct_geom = Geometry.of(read_image(ct_path))
    return write_array(bones_from(seg, TOTALSEGMENTATOR, ct_geom), ct_geom, cohort.bones_path(case))


def import_dicom(dicom_dir: str | os.PathLike, dataset: str | os.PathLike, case: str, *,
                 label: str | os.PathLike | None = None, series: str | None = None,
                 overwrite: bool = False, segment: str | None = None, rois: Sequence[str] = ()) -> Path:
    """Read a CT DICOM series and add it to a cohort as ``imagesTr/<case>_0000.nii.gz``.

    The series is chosen and read by :func:`analysis.imaging.dicom.read_dicom`: localizers, other
    modalities and objects without an image (SEG, SR, RTSTRUCT) are skipped, the axial CT
    series with the most slices is used (ties: the thinnest slices), an Enhanced
    (multi-frame) CT object is read as the volume it holds, and the rescale slope/intercept
    is applied (HU, int16 unless fractional). The dataset folder and its dataset.json are
    created when missing and ``numTraining`` is updated.

    Args:
        dicom_dir: folder directly holding the series' files.
        dataset: cohort folder.
        case: case id for the new case.
        label: optional lesion label, written to labelsTr: a mask file (NIfTI/NRRD) with the
            CT's geometry, a DICOM-SEG or an RTSTRUCT of the series
            (:func:`analysis.cohort.dicom_labels.label_for_series`).
        series: SeriesInstanceUID to use instead of the automatic choice.
        overwrite: replace an existing case of the same id.
        segment: DICOM-SEG label only: segment number or label, or ``"all"``.
        rois: RTSTRUCT label only: ROI names, merged.

    Returns:
        Path of the written image.

    Raises:
        InputError: no CT series, only localizers, equally large series (pick one with
            ``series``), one slice, gaps or uneven spacing, gantry tilt, an existing case,
            a bad label, or a dataset that cannot be written. Nothing is written then.

    The label is written before the image, so a case whose image exists is complete
    (what :func:`analysis.cohort.import_all.import_all` resumes by).
    """
    check_case_id(case)
    dicom_dir = Path(dicom_dir)
    cohort = Cohort(dataset)
    if cohort.root.exists() and not cohort.root.is_dir():
        raise InputError(f"{cohort.root}: exists and is not a folder")
    require_writable(cohort.root)
    img_path, lab_path = cohort.image_path(case), cohort.label_path(case)
    if img_path.exists() and not overwrite:
        raise InputError(f"{img_path}: case {case} already exists; pass --overwrite to replace it")
    out, chosen = read_dicom(dicom_dir, series)
    log.info("%s: series %s (%s, %d slices); skipped %d series", dicom_dir, chosen.series_uid,
             chosen.description or "no description", chosen.n_slices, len(chosen.record.get("skipped", [])))
    geom = Geometry.of(out)

    mask_arr = None
    if label is not None:
        from analysis.cohort.dicom_labels import label_for_series

        mask_arr, kind = label_for_series(label, chosen, out, segment=segment, rois=rois)
        log.info("%s: %s label, %d lesion voxels", label, kind, int(mask_arr.sum()))
    elif segment is not None or rois:
        raise InputError("--segment and --roi choose within a --label file; no --label was given")

    if mask_arr is not None:
        write_array(mask_arr, geom, lab_path)
    write_image(out, img_path)
    write_dataset_json(cohort.root, len(cohort.cases()))
    return img_path
