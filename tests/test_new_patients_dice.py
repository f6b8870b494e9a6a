"""The demo report's New patients Dice is the project's Dice (analysis.lesions.overlap)."""
from __future__ import annotations

import csv

import numpy as np

from analysis.imaging.io import Geometry, write_mask
from study.new_patients import new_patients_section

GEO = Geometry(size=(4, 4, 3), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
               direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def _case(out, folder: str, case: str, pred: np.ndarray, truth: np.ndarray) -> None:
    root = out / "new_patients"
    write_mask(pred, GEO, root / folder / f"{case}.nii.gz")
    write_mask(truth, GEO, root / "inputs" / "truth" / f"{case}.nii.gz")
    with open(root / folder / "patients.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["case", "lesions", "volume_ml", "largest_ml", "weight_bearing", "diffuse"])
        w.writerow([case, 1, 0.001, 0.001, "", "no"])


def _dice_cells(tmp_path) -> dict[str, str]:
    """The "Dice vs known lesions" cell of each case's row."""
    figures = tmp_path / "figures"
    figures.mkdir()
    tables = []
    new_patients_section(tmp_path, figures, lambda header, rows: tables.append((header, rows)) or [])
    [(header, rows)] = tables
    column = header.index("Dice vs known lesions")
    return {r[1]: r[column] for r in rows}


def test_dice_cells_follow_the_overlap_definition(tmp_path):
    pred = np.zeros(GEO.shape, np.uint8)
    truth = np.zeros(GEO.shape, np.uint8)
    truth[1, 1, 1:3] = 1                     # 2 voxels
    pred[1, 1, 1] = 1                        # 1 voxel, overlapping: Dice 2*1/3
    _case(tmp_path, "nifti", "pt_nifti", pred, truth)
    _case(tmp_path, "dicom", "pt_dicom", np.zeros(GEO.shape), np.zeros(GEO.shape))  # both empty: NaN, not 1.0
    assert _dice_cells(tmp_path) == {"pt_nifti": "0.67", "pt_dicom": "-"}
