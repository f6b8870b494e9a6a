"""Bringing a user's data into the cohort layout: DICOM CT series and TotalSegmentator bone maps."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from analysis.cohort import Cohort, check_case_id, write_dataset_json
from analysis.errors import InputError
from analysis.io import Geometry, read_array, read_image, write_array, write_image

#: Relative deviation of slice gaps from their median that counts as a missing or
#: misplaced slice (uneven spacing) in a DICOM series.
SLICE_GAP_RTOL = 0.05

# TotalSegmentator v2, task "total" class ids -> bonesTr codes (see analysis.cohort.BONE_CODES).
# Ids from TotalSegmentator's class map (map_to_binary.py, "total" task, v2):
# sacrum 25; vertebrae S1..C1 26-50; humerus 69/70; scapula 71/72; clavicula 73/74;
# femur 75/76; hip 77/78; skull 91; ribs 92-115; sternum 116; costal cartilages 117.
TOTALSEG_TO_BONE: dict[int, int] = {25: 4}
TOTALSEG_TO_BONE.update({i: 2 for i in range(26, 51)})
TOTALSEG_TO_BONE.update({i: 5 for i in range(69, 75)})
TOTALSEG_TO_BONE.update({75: 6, 76: 6, 77: 4, 78: 4, 91: 1})
TOTALSEG_TO_BONE.update({i: 3 for i in range(92, 116)})
TOTALSEG_TO_BONE.update({116: 7, 117: 7})


def totalseg_lookup(max_id: int = 255) -> np.ndarray:
    """Lookup table ``lut[id] -> bone code`` for TotalSegmentator v2 "total" ids (others -> 0)."""
    lut = np.zeros(max(max_id, max(TOTALSEG_TO_BONE)) + 1, dtype=np.uint8)
    for src, dst in TOTALSEG_TO_BONE.items():
        lut[src] = dst
    return lut


def import_bones(seg: str | os.PathLike, dataset: str | os.PathLike, case: str) -> Path:
    """Map a TotalSegmentator v2 "total" multilabel map to ``bonesTr/<case>.nii.gz``.

    Args:
        seg: the multilabel segmentation (NIfTI), same geometry as the case's CT.
        dataset: the cohort folder (must already hold the case's CT).
        case: case id.

    Returns:
        Path of the written bone map.

    Raises:
        InputError: unreadable map, non-integer or negative labels, or geometry unlike the CT.
    """
    check_case_id(case)
    cohort = Cohort(dataset)
    ct_path = cohort.image_path(case)
    if not ct_path.is_file():
        raise InputError(f"{ct_path}: not found; import the case's CT before its bone map")
    ct_geom = Geometry.of(read_image(ct_path))
    labels, geom = read_array(seg)
    mismatch = ct_geom.mismatch(geom)
    if mismatch:
        raise InputError(f"{seg}: {mismatch} of the case's CT {ct_path}")
    if np.issubdtype(labels.dtype, np.floating) and not np.array_equal(labels, np.round(labels)):
        raise InputError(f"{seg}: holds non-integer values; expected a TotalSegmentator multilabel map")
    labels = labels.astype(np.int64, copy=False)
    if labels.size and labels.min() < 0:
        raise InputError(f"{seg}: holds negative labels; expected TotalSegmentator class ids >= 0")
    lut = totalseg_lookup(int(labels.max()) if labels.size else 0)
    bones = lut[labels]
    return write_array(bones, ct_geom, cohort.bones_path(case))


def _choose_series(dicom_dir: Path, series: str | None) -> list[str]:
    if not dicom_dir.is_dir():
        raise InputError(f"{dicom_dir}: not a folder; expected a folder holding one DICOM CT series")
    ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(dicom_dir)) or [])
    if not ids:
        raise InputError(f"{dicom_dir}: no DICOM series found; expected .dcm files of one CT series")
    if series is None:
        if len(ids) > 1:
            raise InputError(f"{dicom_dir}: holds {len(ids)} DICOM series ({', '.join(ids)}); "
                             f"pick one with --series SERIES_UID")
        series = ids[0]
    elif series not in ids:
        raise InputError(f"--series {series}: not in {dicom_dir}; found {', '.join(ids)}")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(dicom_dir), series))


def _check_slice_positions(dicom_dir: Path, files: list[str]) -> None:
    """Refuse series with missing or duplicated slices (uneven gaps along the slice normal)."""
    if len(files) < 2:
        raise InputError(f"{dicom_dir}: the series has {len(files)} slice; expected a 3D CT volume")
    positions = []
    normal = None
    for f in files:
        r = sitk.ImageFileReader()
        r.SetFileName(f)
        r.LoadPrivateTagsOff()
        try:
            r.ReadImageInformation()
        except RuntimeError:
            raise InputError(f"{f}: unreadable DICOM file") from None
        direction = np.array(r.GetDirection()).reshape(3, 3)
        if normal is None:
            normal = direction[:, 2]
        positions.append(float(np.dot(np.array(r.GetOrigin()), normal)))
    pos = np.sort(np.array(positions))
    gaps = np.diff(pos)
    median = float(np.median(gaps))
    if median <= 0:
        raise InputError(f"{dicom_dir}: slices share one position; expected distinct slice positions")
    bad = np.flatnonzero(np.abs(gaps - median) > SLICE_GAP_RTOL * median)
    if bad.size:
        i = int(bad[0])
        raise InputError(f"{dicom_dir}: uneven slice spacing (gap {gaps[i]:.3g} mm after position {pos[i]:.4g} mm, "
                         f"expected {median:.3g} mm); slices are missing or duplicated")


def import_dicom(dicom_dir: str | os.PathLike, dataset: str | os.PathLike, case: str, *,
                 label: str | os.PathLike | None = None, series: str | None = None,
                 overwrite: bool = False) -> Path:
    """Read a CT DICOM series and add it to a cohort as ``imagesTr/<case>_0000.nii.gz``.

    The series is read with SimpleITK's series reader (files sorted by position; the
    rescale slope/intercept is applied, so values are HU). The dataset folder and its
    dataset.json are created when missing and ``numTraining`` is updated.

    Args:
        dicom_dir: folder holding the series.
        dataset: cohort folder.
        case: case id for the new case.
        label: optional lesion mask (NIfTI/NRRD) with the CT's geometry; written to labelsTr.
        series: SeriesInstanceUID when the folder holds several series.
        overwrite: replace an existing case of the same id.

    Returns:
        Path of the written image.

    Raises:
        InputError: no/several series, uneven slices, an existing case, or a bad label.
    """
    check_case_id(case)
    dicom_dir = Path(dicom_dir)
    cohort = Cohort(dataset)
    if cohort.root.exists() and not cohort.root.is_dir():
        raise InputError(f"{cohort.root}: exists and is not a folder")
    img_path, lab_path = cohort.image_path(case), cohort.label_path(case)
    if img_path.exists() and not overwrite:
        raise InputError(f"{img_path}: case {case} already exists; pass --overwrite to replace it")
    files = _choose_series(dicom_dir, series)
    _check_slice_positions(dicom_dir, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{dicom_dir}: the DICOM series cannot be read ({str(exc).strip().splitlines()[-1][:160]})") from None
    if image.GetDimension() != 3:
        raise InputError(f"{dicom_dir}: the series is {image.GetDimension()}D; expected a 3D CT")
    # HU fits int16; keep float only when the rescale produced fractional values.
    arr = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(arr.dtype, np.floating) and not np.array_equal(arr, np.round(arr)):
        out = sitk.Cast(image, sitk.sitkFloat32)
    else:
        out = sitk.Cast(image, sitk.sitkInt16)
    geom = Geometry.of(out)

    mask_arr = None
    if label is not None:
        mask_arr, mgeom = read_array(label)
        mismatch = geom.mismatch(mgeom)
        if mismatch:
            raise InputError(f"{label}: {mismatch} of the DICOM series in {dicom_dir}")
        values = [v for v in np.unique(mask_arr).tolist() if v not in (0, 1)]
        if values:
            raise InputError(f"{label}: label values {values[:8]} found; expected only 0 and 1 "
                             f"(a multi-label or probability mask? binarise it first)")

    write_image(out, img_path)
    if mask_arr is not None:
        write_array(mask_arr.astype(np.uint8), geom, lab_path)
    write_dataset_json(cohort.root, len(cohort.cases()))
    return img_path
