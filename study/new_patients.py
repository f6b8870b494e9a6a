"""The demo report's "New patients" section: the best Keras segmenter run on two phantom CTs
given as a new team would (a RAS-stored NIfTI file and a DICOM series beside a localizer), with
their previews and patient rows, and the check against the phantoms' known lesions."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from analysis.imaging.io import read_array
from analysis.imaging.records import read_csv
from analysis.lesions import overlap
from analysis.prediction.folder import read_record
from analysis.prediction.tables import PATIENTS_CSV


def _rows(path: Path) -> list[dict[str, str]]:
    """The rows of a patient table as text (the report shows them as written), [] without one."""
    return read_csv(path) if path.is_file() else []


def new_patients_section(out: Path, figures: Path, table) -> list[str]:
    """Markdown lines of the section (empty when the demo has no new-patient outputs); copies
    the previews into ``figures``. ``table(header, rows)`` renders a Markdown table."""
    root = out / "new_patients"
    folders = [root / "nifti", root / "dicom"]
    if not any((f / PATIENTS_CSV).is_file() for f in folders):
        return []
    md = ["## New patients", "",
          "The best Keras segmenter on two phantom patients that are not in the cohort, given as new CT "
          "arrives: `new_patients/inputs/nifti/pt_nifti.nii.gz` (stored RAS) and the DICOM folder "
          "`new_patients/inputs/dicom/pt_dicom/` (a CT series in random file order beside a localizer, "
          "which is skipped). Commands: `predict --images ...` (see docs/new-patients.md); outputs in "
          "`new_patients/nifti/` and `new_patients/dicom/` (masks in each input's geometry, `lesions.csv`, "
          "`patients.csv`, previews, probability maps, and a DICOM-SEG for the DICOM case).", ""]
    header = ["input", "case", "lesions", "volume ml", "largest ml", "weight-bearing", "diffuse",
              "Dice vs known lesions", "DICOM-SEG"]
    rows: list[list[Any]] = []
    for folder in folders:
        record = read_record(folder, missing_ok=True) or {}
        for p in _rows(folder / PATIENTS_CSV):
            case = p["case"]
            truth = root / "inputs" / "truth" / f"{case}.nii.gz"  # the phantom's lesions, in the input's geometry
            dice = ""
            if truth.is_file() and (folder / f"{case}.nii.gz").is_file():
                # the project's Dice (analysis.lesions.overlap): NaN, shown "-", when both are empty
                value = overlap.dice(read_array(folder / f"{case}.nii.gz")[0], read_array(truth)[0])
                dice = "-" if np.isnan(value) else f"{value:.2f}"
            seg = record.get("per_case", {}).get(case, {}).get("dicom_seg")
            rows.append([folder.name, case, p["lesions"], f"{float(p['volume_ml']):.2f}",
                         f"{float(p['largest_ml']):.2f}", p["weight_bearing"] or "-", p["diffuse"], dice,
                         ("written, verified" if seg.get("written") else seg.get("reason", "-")) if seg else "-"])
            preview = folder / "preview" / f"{case}.png"
            if preview.is_file():
                shutil.copy(preview, figures / f"new_patient_{folder.name}_{case}.png")
    md += table(header, rows)
    for folder in folders:
        for p in _rows(folder / PATIENTS_CSV):
            name = f"new_patient_{folder.name}_{p['case']}.png"
            if (figures / name).is_file():
                md += [f"Preview of `{p['case']}` ({folder.name} input): coronal and sagittal bone-window MIPs, "
                       f"lesions outlined and numbered as in `lesions.csv`, radiological orientation.", "",
                       f"![{p['case']}](figures/{name})", ""]
    return md
