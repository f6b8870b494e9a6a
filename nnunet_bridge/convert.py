"""Cohort -> nnU-Net raw dataset of true 2D axial slices, and patient-grouped splits.

The paper trains nnU-Net in 2D. Each axial slice ``array[z]`` of a training patient's CT
volume ``(slices, rows, cols)`` becomes one 2D NIfTI image ``(rows, cols)`` whose
spacing is the in-plane spacing ``(x, y)`` in mm of the CT's canonical view, with case id
``<patient>_<z:04d>``. Patients are read by :func:`analysis.cohort.case.read_case`, so the
slices are those of the canonical view (LPS, :mod:`analysis.imaging.orientation`) that every
model trains on, written as identity-direction images with origin 0: prediction feeds nnU-Net
the canonical CT in the same order and writes the result back in the CT's own storage order
and geometry, so masks align voxel for voxel.

A 1-slice 3D NIfTI would not do: nnU-Net's planner mis-transposes it when its z spacing
is not the largest (nnU-Net issue 2463); a true 2D image gets nnU-Net's 2D handling.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from analysis.cohort.case import read_case
from analysis.cohort.layout import FILE_ENDING, Cohort
from analysis.errors import InputError
from analysis.imaging.io import Geometry, atomic_directory, atomic_write_json, write_image

log = logging.getLogger(__name__)


def slice_case_id(patient: str, z: int) -> str:
    """nnU-Net case id of axial slice ``z`` of ``patient``: ``<patient>_<z:04d>``."""
    return f"{patient}_{z:04d}"


def slice_image(array2d: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A true 2D SimpleITK image of one axial slice ``(rows, cols)`` with the CT's in-plane spacing."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array2d))
    image.SetSpacing(tuple(geometry.spacing[:2]))
    return image


def convert_patients(cohort: Cohort, patients: Sequence[str], raw_dataset: str | Path) -> dict[str, list[str]]:
    """Write the patients' slices as an nnU-Net raw dataset (built atomically, replacing any old one).

    Writes ``imagesTr/<patient>_<z:04d>_0000.nii.gz`` (CT, HU, the CT's dtype),
    ``labelsTr/<patient>_<z:04d>.nii.gz`` (uint8 0/1) and ``dataset.json`` (through
    nnU-Net's ``generate_dataset_json``; channel "CT" selects nnU-Net's CT normalisation).

    Args:
        cohort: the source cohort (read only).
        patients: the patients to convert (training patients only: the caller never
            passes test patients).
        raw_dataset: ``nnUNet_raw/DatasetXXX_Name``.

    Returns:
        Slice case ids per patient, in slice order.

    Raises:
        InputError: see :func:`analysis.cohort.case.read_case`; no patients.
    """
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    if not patients:
        raise InputError(f"{cohort.root}: no training patients to convert")
    slices: dict[str, list[str]] = {}
    with atomic_directory(raw_dataset, overwrite=True) as tmp:
        for patient in tqdm(patients, desc="nnU-Net conversion", unit="patient", leave=False):
            source = read_case(cohort, patient, canonical=True)
            ct, label, geometry = source.image, source.label, source.geometry
            ids = [slice_case_id(patient, z) for z in range(ct.shape[0])]
            for z, case in enumerate(ids):
                write_image(slice_image(ct[z], geometry), tmp / "imagesTr" / f"{case}_0000{FILE_ENDING}")
                write_image(slice_image(label[z], geometry), tmp / "labelsTr" / f"{case}{FILE_ENDING}")
            slices[patient] = ids
        n = sum(len(v) for v in slices.values())
        generate_dataset_json(str(tmp), channel_names={0: "CT"}, labels={"background": 0, "lesion": 1},
                              num_training_cases=n, file_ending=FILE_ENDING, dataset_name=Path(raw_dataset).name,
                              description="Axial CT slices of the bonemets cohort's training patients",
                              overwrite_image_reader_writer="SimpleITKIO",
                              converted_by="nnunet_bridge.convert", license="see the source cohort")
    log.info("converted %d patients into %d 2D slices in %s", len(slices), n, raw_dataset)
    return slices


def nnunet_splits(splits: dict[str, Any], slices: dict[str, list[str]]) -> list[dict[str, list[str]]]:
    """nnU-Net's ``splits_final.json`` content from the cohort's patient-level ``splits.json``.

    Fold k of the result is fold k of ``splits``: its train/val lists hold the slices of
    that fold's train/val patients, so one patient's slices never straddle train and
    validation, and test patients (absent from ``slices``) never appear.

    Args:
        splits: the cohort's splits ({"test": [...], "folds": [{"train", "val"}, ...]}).
        slices: slice case ids per converted patient (:func:`convert_patients`).

    Raises:
        InputError: a fold names a patient that was not converted.
    """
    result = []
    for k, fold in enumerate(splits["folds"]):
        entry = {}
        for part in ("train", "val"):
            missing = [p for p in fold[part] if p not in slices]
            if missing:
                raise InputError(f"splits.json fold {k} {part}: patient(s) {', '.join(missing)} not among the "
                                 f"converted training patients")
            entry[part] = [case for p in sorted(fold[part]) for case in slices[p]]
        result.append(entry)
    return result


def write_splits_final(preprocessed_dataset: str | Path, folds: list[dict[str, list[str]]]) -> Path:
    """Write ``splits_final.json`` into nnU-Net's preprocessed dataset folder (atomically)."""
    return atomic_write_json(Path(preprocessed_dataset) / "splits_final.json", folds)
