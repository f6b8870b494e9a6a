"""Example "new patients" for the demo and the tests: phantom CTs as real exports store them.

:func:`write_example_patients` writes two phantom patients that are not in the cohort:

* ``nifti/pt_nifti.nii.gz``: stored RAS (direction ``diag(-1, -1, 1)``), as many NIfTI
  converters write CT;
* ``dicom/pt_dicom/``: a CT Image Storage series written with pydicom (int16 stored values
  with RescaleIntercept -1024, slices in random file order), beside a localizer image, as a
  PACS export folder holds them;
* ``truth/<case>.nii.gz``: their lesion masks, in each input's own geometry, for checking.

The CTs come from :func:`analysis.cohort.phantom.generate_case` (identity direction, LPS); nothing
here is patient data.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np

from analysis.cohort.phantom import generate_case
from analysis.imaging.io import Geometry, atomic_directory, write_array

#: Seeds of the two example patients (far from the cohort's case seeds).
EXAMPLE_SEEDS = {"pt_nifti": 90_001, "pt_dicom": 90_002}
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _ras(array: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, Geometry]:
    """The same physical image stored RAS: x and y reversed, origin at the other corner."""
    nx, ny, _ = geometry.size
    sx, sy, _ = geometry.spacing
    origin = (geometry.origin[0] + (nx - 1) * sx, geometry.origin[1] + (ny - 1) * sy, geometry.origin[2])
    return (np.ascontiguousarray(array[:, ::-1, ::-1]),
            Geometry(size=geometry.size, spacing=geometry.spacing, origin=origin, direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)))


def write_dicom_series(ct: np.ndarray, geometry: Geometry, folder: str | os.PathLike, *, patient_id: str,
                       description: str = "Phantom CT", series_number: int = 2, localizer: bool = True,
                       seed: int = 0, study_date: str = "20261201", study_uid: str | None = None) -> list[Path]:
    """Write an identity-direction (LPS) CT volume as a DICOM CT series with pydicom.

    Args:
        ct: HU ``(slices, rows, cols)`` (rounded to int16).
        geometry: its geometry; the direction must be the identity.
        folder: the series folder (created).
        patient_id: PatientID and PatientName.
        localizer: also write one localizer image (ImageType LOCALIZER, another series).
        study_date: StudyDate (YYYYMMDD).
        study_uid: StudyInstanceUID (default: a new one).

    Returns:
        The files written (slices in random name order, then the localizer).
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if tuple(round(d) for d in geometry.direction) != (1, 0, 0, 0, 1, 0, 0, 0, 1):
        raise ValueError("write_dicom_series: expected an identity-direction (LPS) volume")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    study, frame = study_uid or generate_uid(), generate_uid()

    def base(series_uid: str, number: int, text: str) -> Dataset:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Modality, ds.Manufacturer = "CT", "bonemets phantom"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = f"{patient_id}^", patient_id, "", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study, study_date, "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, number, text
        ds.FrameOfReferenceUID = frame
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        return ds

    series_uid = generate_uid()
    sx, sy, sz = geometry.spacing
    hu = np.clip(np.rint(ct), -32768, 32767).astype(np.int16)
    paths = []
    for k in range(hu.shape[0]):
        ds = base(series_uid, series_number, description)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{geometry.origin[0]:.4f}", f"{geometry.origin[1]:.4f}",
                                   f"{geometry.origin[2] + k * sz:.4f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = [f"{sy:g}", f"{sx:g}"]
        ds.SliceThickness = f"{sz:g}"
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.PixelData = np.ascontiguousarray(hu[k]).tobytes()
        path = folder / f"{rng.getrandbits(40):010x}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    if localizer:
        ds = base(generate_uid(), 1, "Topogram")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.InstanceNumber = 1
        ds.ImagePositionPatient = [f"{geometry.origin[0]:.4f}", "0", f"{geometry.origin[2]:.4f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
        ds.PixelSpacing = ["2", "2"]
        ds.Rows, ds.Columns = 32, 32
        ds.PixelData = np.full((32, 32), -1000, np.int16).tobytes()
        path = folder / "localizer.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def write_example_patients(out: str | os.PathLike, *, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                           overwrite: bool = False) -> dict[str, Any]:
    """Write the two example patients (module docstring) into ``out``, atomically.

    Returns:
        ``{"nifti": folder, "dicom": folder, "truth": folder, "cases": [...]}`` (paths as str).
    """
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        pc = generate_case(EXAMPLE_SEEDS["pt_nifti"], shape, spacing)
        ct, geometry = _ras(pc.ct, pc.geometry)
        label, _ = _ras(pc.label, pc.geometry)
        write_array(ct, geometry, tmp / "nifti" / "pt_nifti.nii.gz")
        write_array(label, geometry, tmp / "truth" / "pt_nifti.nii.gz")
        pc = generate_case(EXAMPLE_SEEDS["pt_dicom"], shape, spacing)
        write_dicom_series(pc.ct, pc.geometry, tmp / "dicom" / "pt_dicom", patient_id="PHANTOM-2")
        write_array(pc.label, pc.geometry, tmp / "truth" / "pt_dicom.nii.gz")
    return {"nifti": str(out / "nifti"), "dicom": str(out / "dicom"), "truth": str(out / "truth"),
            "cases": sorted(EXAMPLE_SEEDS)}
