"""A whole DICOM export at once: every patient folder under ROOT becomes a case of the cohort.

``ROOT/<patient>/...``: each folder directly under ROOT (hidden ones aside) is one patient;
its name is the case id. Its CT series is chosen as :func:`analysis.cohort.imports.import_dicom`
chooses it in a series folder (:func:`analysis.imaging.dicom.find_series`); a patient folder
holding several series folders (one per series, as most PACS exports lay them out) uses the
folder whose chosen series has the most slices (ties: the thinnest slices; a tie that remains
is refused).

The lesion label of a case comes from

- the labels CSV, ``case,label_path[,roi_or_segment]`` (``label_path`` relative to the CSV's
  folder; the third column is the SEG segment number/label/``all``, or the RTSTRUCT ROI
  names separated by ``;``), or else
- the one DICOM-SEG or RTSTRUCT found anywhere in the patient folder that references the
  chosen series (several: name one in the CSV); none found: the CT is imported without label.

Resumable: a case whose image is already in the dataset is skipped (the label is written
before the image, so an image means a complete case); a killed import run again continues
where it stopped, after removing the killed case's temporary files. A bad case is reported
and skipped, the others are imported.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from analysis.cohort.dicom_labels import dicom_label_header
from analysis.cohort.imports import import_dicom
from analysis.cohort.layout import Cohort, check_case_id
from analysis.errors import InputError
from analysis.imaging.dicom import DicomSeries, find_series, series_folders
from analysis.imaging.io import require_writable
from analysis.imaging.records import read_csv

log = logging.getLogger(__name__)

__all__ = ["CaseOutcome", "ImportSummary", "read_labels_csv", "patient_folders", "import_all"]

LABELS_CSV_COLUMNS = ("case", "label_path")


@dataclass(frozen=True)
class CaseOutcome:
    """What happened to one patient folder.

    Attributes:
        case: the case id (the folder's name).
        status: ``"imported"``, ``"present"`` (already in the dataset, skipped) or ``"failed"``.
        slices: slices of the imported series (None unless imported).
        label: where the label came from (``"RTSTRUCT rt.dcm"``, ``"mask.nii.gz"``, ``"none"``).
        message: the refusal (failed) or "".
    """

    case: str
    status: str
    slices: int | None = None
    label: str = ""
    message: str = ""


@dataclass
class ImportSummary:
    """The outcome of :func:`import_all`, one row per case, in case order."""

    root: str
    dataset: str
    outcomes: list[CaseOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def table(self) -> str:
        """One plain-text table: a row per case, then the counts."""
        width = max([4] + [len(o.case) for o in self.outcomes])
        head = f"{'case':<{width}}  {'status':<8} {'slices':>6}  {'label':<28} note"
        lines = [head, "-" * len(head)]
        for o in self.outcomes:
            slices = "" if o.slices is None else str(o.slices)
            lines.append(f"{o.case:<{width}}  {o.status:<8} {slices:>6}  {o.label[:28]:<28} {o.message}".rstrip())
        counts = {s: sum(o.status == s for o in self.outcomes) for s in ("imported", "present", "failed")}
        lines.append("-" * len(head))
        lines.append(f"{len(self.outcomes)} cases: {counts['imported']} imported, {counts['present']} already present, "
                     f"{counts['failed']} failed")
        return "\n".join(lines)


def read_labels_csv(path: str | os.PathLike) -> dict[str, tuple[Path, str | None]]:
    """``{case: (label file, roi_or_segment or None)}`` from a labels CSV.

    Raises:
        InputError: unreadable file, missing columns, an empty or repeated case, or an
            empty label path; one line naming the CSV and its row.
    """
    path = Path(path)
    try:
        rows = read_csv(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: unreadable labels CSV ({type(exc).__name__}); expected UTF-8 text") from None
    if rows and not set(LABELS_CSV_COLUMNS) <= set(rows[0]):
        raise InputError(f"{path}: columns {sorted(rows[0])}; expected case,label_path[,roi_or_segment]")
    out: dict[str, tuple[Path, str | None]] = {}
    for line, row in enumerate(rows, start=2):
        case, label = (row.get("case") or "").strip(), (row.get("label_path") or "").strip()
        if not case or not label:
            raise InputError(f"{path}: row {line} lacks a case or a label_path")
        if case in out:
            raise InputError(f"{path}: case {case!r} appears twice (row {line})")
        choice = (row.get("roi_or_segment") or "").strip() or None
        out[case] = ((path.parent / label) if not Path(label).is_absolute() else Path(label), choice)
    return out


def patient_folders(root: str | os.PathLike) -> list[Path]:
    """The folders directly under ``root`` (hidden ones aside), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder; expected a DICOM export with one folder per patient")
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _choose_series(patient: Path) -> DicomSeries:
    folders = series_folders(patient)
    if not folders:
        raise InputError(f"{patient}: holds no DICOM image; expected the patient's CT series")
    if len(folders) == 1:
        return find_series(folders[0])
    found, problems = [], []
    for folder in folders:
        try:
            found.append(find_series(folder))
        except InputError as exc:
            problems.append(str(exc))
    if not found:
        raise InputError(problems[0] if len(problems) == 1 else f"{patient}: no usable CT series in "
                         f"{len(folders)} series folders ({problems[0]})")

    def rank(s: DicomSeries) -> tuple[int, float]:
        return (s.n_slices, -(s.slice_thickness or s.slice_spacing))

    found.sort(key=rank, reverse=True)
    if len(found) > 1 and rank(found[0]) == rank(found[1]):
        raise InputError(f"{patient}: series folders {found[0].folder} and {found[1].folder} hold equally large CT "
                         f"series; keep one per patient folder")
    return found[0]


def _referenced_series(ds) -> list[str]:
    if str(ds.Modality) == "SEG":
        return [str(s.get("SeriesInstanceUID", "")) for s in ds.get("ReferencedSeriesSequence", [])]
    return [str(se.get("SeriesInstanceUID", "")) for ref in ds.get("ReferencedFrameOfReferenceSequence", [])
            for st in ref.get("RTReferencedStudySequence", []) for se in st.get("RTReferencedSeriesSequence", [])]


def labels_beside(patient: Path, series: DicomSeries) -> Path | None:
    """The one DICOM-SEG or RTSTRUCT in ``patient`` (any depth) that references ``series``.

    Returns:
        Its path, or None when the folder holds no DICOM label.

    Raises:
        InputError: labels there, but none referencing the series; or several that do.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(patient):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            ds = dicom_label_header(Path(dirpath) / name)
            if ds is not None:
                found.append((Path(dirpath) / name, str(ds.Modality), _referenced_series(ds)))
    if not found:
        return None
    ours = [f for f in found if series.series_uid in f[2]]
    if len(ours) == 1:
        return ours[0][0]
    if not ours:
        listing = "; ".join(f"{p.name} ({m}) references {', '.join(s) or 'no series'}" for p, m, s in found[:4])
        raise InputError(f"{patient}: no DICOM label references series {series.series_uid} ({listing}); "
                         f"name the label in --labels")
    raise InputError(f"{patient}: {len(ours)} DICOM labels reference series {series.series_uid} "
                     f"({', '.join(p.name for p, _, _ in ours)}); name one in --labels")


def _clear_partials(cohort: Cohort, case: str) -> None:
    """Remove the temporary files a killed import of ``case`` left (atomic writers' ``.<name>.*``)."""
    for final in (cohort.image_path(case), cohort.label_path(case)):
        if final.parent.is_dir():
            for tmp in final.parent.glob(f".{final.name}.*"):
                log.info("%s: removing a killed import's temporary file", tmp)
                tmp.unlink(missing_ok=True)


def _import_case(patient: Path, dataset: Path, case: str, label: tuple[Path, str | None] | None,
                 overwrite: bool) -> CaseOutcome:
    check_case_id(case)
    series = _choose_series(patient)
    if label is None:
        beside = labels_beside(patient, series)
        label = (beside, None) if beside is not None else None
    kwargs = {}
    if label is not None:
        path, choice = label
        if not path.is_file():
            raise InputError(f"{path}: label of case {case} not found")
        kind = dicom_label_header(path)
        if choice is not None and kind is not None and str(kind.Modality) == "RTSTRUCT":
            kwargs["rois"] = [n.strip() for n in choice.split(";") if n.strip()]
        elif choice is not None:
            kwargs["segment"] = choice
        kwargs["label"] = path
    _clear_partials(Cohort(dataset), case)
    import_dicom(series.folder, dataset, case, series=series.series_uid, overwrite=overwrite, **kwargs)
    where = "none" if label is None else (f"{label[0].name}" + (f" ({label[1]})" if label[1] else ""))
    return CaseOutcome(case=case, status="imported", slices=series.n_slices, label=where)


def import_all(root: str | os.PathLike, dataset: str | os.PathLike, *, labels_csv: str | os.PathLike | None = None,
               overwrite: bool = False,
               progress: Callable[[int, int, CaseOutcome], None] | None = None) -> ImportSummary:
    """Import every patient folder under ``root`` into the cohort ``dataset`` (see the module docstring).

    Args:
        root: the export, one folder per patient.
        dataset: the cohort folder (created when missing).
        labels_csv: optional CSV ``case,label_path[,roi_or_segment]``.
        overwrite: re-import cases already in the dataset instead of skipping them.
        progress: called as ``progress(done, total, outcome)`` after each case.

    Returns:
        The :class:`ImportSummary`; its ``failed`` cases were reported and skipped.

    Raises:
        InputError: ``root`` is not a folder, ``dataset`` cannot be written, or the labels CSV is
            unreadable. A bad case
            never raises: it is a failed row.
    """
    root, dataset = Path(root), Path(dataset)
    folders = patient_folders(root)
    require_writable(dataset)  # one line, not the same failure for every case
    labels = read_labels_csv(labels_csv) if labels_csv is not None else {}
    cohort = Cohort(dataset)
    summary = ImportSummary(root=str(root), dataset=str(dataset))
    by_case = {p.name: p for p in folders}
    cases = sorted(set(by_case) | set(labels))
    for done, case in enumerate(cases, start=1):
        if case not in by_case:
            outcome = CaseOutcome(case=case, status="failed", message=f"{labels_csv}: case {case} has no folder "
                                                                        f"under {root}")
        elif cohort.image_path(case).is_file() and not overwrite:
            outcome = CaseOutcome(case=case, status="present", label="", message="already in the dataset")
        else:
            try:
                outcome = _import_case(by_case[case], dataset, case, labels.get(case), overwrite)
            except InputError as exc:
                outcome = CaseOutcome(case=case, status="failed", message=str(exc))
        if outcome.status == "failed":
            log.warning("case %s skipped: %s", case, outcome.message)
        summary.outcomes.append(outcome)
        if progress is not None:
            progress(done, len(cases), outcome)
    return summary
