"""The studies there are to review: where they are, what was predicted, and their CT.

Two kinds of review root:

* a node's spool (``serve --spool``): every job whose prediction is complete
  (:meth:`analysis.node.spool.Spool.kept`: an open outbox, ``done/`` or ``undelivered/``),
  its PRED folder ``pred/`` and its series ``input/``;
* a PRED folder ``PRED/<model>/`` of ``predict --images`` on DICOM: each case whose input was a
  DICOM series (``predict.json``'s ``per_case[case]["input"]["dicom"]``), its series folder as
  recorded there.

Everything about a case is read through the PRED folder contract: ``predict.json``
(:func:`analysis.prediction.folder.read_record`), ``lesions.csv``
(:func:`analysis.prediction.tables.read_lesions`), the mask ``<case>.nii.gz``
(:func:`analysis.prediction.folder.mask_path`); the lesion ids are those of
:func:`analysis.lesions.lesion_instances` on the stored mask, as ``lesions.csv`` numbers them.

A study is named by its StudyInstanceUID. When one study was predicted more than once (two
series, two models, a series sent again), the newest prediction is the one reviewed.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from analysis.errors import InputError
from analysis.imaging.io import Geometry
from analysis.prediction.folder import RECORD, mask_path, read_record
from analysis.prediction.tables import LESIONS_CSV, read_lesions
from analysis.review.journal import valid_uid

log = logging.getLogger(__name__)

__all__ = ["Source", "Study", "Volume", "StudyStore"]


@dataclass(frozen=True)
class Source:
    """A review root: ``kind`` ``spool`` or ``pred``, and its folder."""

    kind: str
    root: Path

    @classmethod
    def spool(cls, path: str | os.PathLike) -> "Source":
        """A node's spool.

        Raises:
            InputError: ``path`` is not a spool (no ``jobs/`` or ``done/`` in it).
        """
        root = Path(path)
        if not ((root / "jobs").is_dir() or (root / "done").is_dir()):
            raise InputError(f"--spool {root}: not a node's spool (no jobs/ or done/ in it)")
        return cls("spool", root)

    @classmethod
    def pred(cls, path: str | os.PathLike) -> "Source":
        """A PRED folder of ``predict --images``.

        Raises:
            InputError: ``path`` has no ``predict.json`` or no ``lesions.csv``.
        """
        root = Path(path)
        read_record(root)
        if not (root / LESIONS_CSV).is_file():
            raise InputError(f"--pred {root}: no {LESIONS_CSV}; expected a PRED folder written by predict")
        return cls("pred", root)


@dataclass(frozen=True)
class Study:
    """One study to review: its newest prediction.

    Attributes:
        uid, series_uid: StudyInstanceUID and the predicted CT series' SeriesInstanceUID.
        source: the review root it belongs to (its journal and ``reviews.csv`` are there).
        job: the spool job (None for a PRED folder).
        case: the case id in the PRED folder.
        patient_id, study_date, study_time: from the series' headers (no patient name is read).
        model_name, model_fingerprint: the model that predicted it.
        seg_uid, sr_uid: SOPInstanceUIDs of the preliminary SEG and report (None when not written).
        predicted: the prediction record's modification time (seconds since the epoch).
    """

    uid: str
    series_uid: str
    source: Source
    job: str | None
    case: str
    patient_id: str
    study_date: str
    study_time: str
    model_name: str
    model_fingerprint: str
    seg_uid: str | None
    sr_uid: str | None
    predicted: float


@dataclass
class Volume:
    """A study's CT and predicted lesions, read.

    Attributes:
        ct: HU ``(slices, rows, cols)`` in the series' stored order (:func:`analysis.imaging.dicom.read_series`).
        geometry: its geometry.
        labels: lesion ids ``(slices, rows, cols)``, 0 outside lesions, ids as in ``lesions.csv``.
        rows: the case's rows of ``lesions.csv`` (:data:`analysis.prediction.tables.LESION_COLUMNS`).
        series: the series (headers), for the signed SEG and report.
    """

    study: Study
    ct: np.ndarray
    geometry: Geometry
    labels: np.ndarray
    rows: list[dict[str, Any]]
    series: Any
    boxes: list[Any] = field(default_factory=list)

    def voxels(self, lesion_id: int) -> np.ndarray:
        """The ``(n, 3)`` ``(k, j, i)`` indices of predicted lesion ``lesion_id`` (read in its bounding box)."""
        if not self.boxes:
            from scipy import ndimage

            self.boxes = ndimage.find_objects(self.labels)
        box = self.boxes[lesion_id - 1]
        return np.argwhere(self.labels[box] == lesion_id) + np.array([s.start for s in box])

    def lesion_row(self, voxels: np.ndarray) -> dict[str, Any]:
        """The measurements of a lesion given by its flat voxel indices (a reader's addition on the
        page or in a viewer), as ``lesions.csv`` measures a predicted one
        (:func:`analysis.prediction.tables.lesion_rows`): voxels, volume, centroid, HU, score, bone."""
        from analysis.prediction.tables import lesion_rows

        single = np.zeros(self.labels.shape, np.uint8)
        single.flat[voxels] = 1
        (row,) = lesion_rows(self.study.case, single, self.ct, self.geometry, labels=(single.astype(np.int32), 1))
        return {k: row[k] for k in ("voxels", "volume_ml", "x_mm", "y_mm", "z_mm", "hu_mean", "hu_max", "score",
                                    "bone")}


def _header(folder: Path) -> dict[str, str]:
    """PatientID, StudyDate and StudyTime of the first readable DICOM file in ``folder``."""
    import pydicom

    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "StudyDate", "StudyTime"])
        except Exception:  # pydicom raises many kinds for a non-DICOM file
            continue
        return {k: str(ds.get(k, "") or "") for k in ("PatientID", "StudyDate", "StudyTime")}
    return {"PatientID": "", "StudyDate": "", "StudyTime": ""}


def _model(record: dict[str, Any], part: dict[str, Any]) -> tuple[str, str]:
    """``(name, fingerprint)`` of the model of a prediction record (the SEG's algorithm when written)."""
    algorithm = (part.get("dicom_seg") or {}).get("algorithm") or {}
    model = record.get("model") if isinstance(record.get("model"), dict) else {}
    name = algorithm.get("name") or model.get("name") or model.get("arch") or Path(
        str(model.get("path") or model.get("model_folder") or "model")).name
    return str(name), str(algorithm.get("version") or model.get("fingerprint") or "")


class StudyStore:
    """The studies of the review roots (module docstring), found again on each :meth:`studies` call.

    Args:
        sources: the review roots.
        cache: how many studies' volumes stay in memory.
    """

    def __init__(self, sources: list[Source], cache: int = 2, rescan_seconds: float = 2.0) -> None:
        self.sources = sources
        self.rescan_seconds = rescan_seconds
        self._headers: dict[Path, dict[str, str]] = {}
        self._records: dict[Path, tuple[float, dict[str, Any]]] = {}
        self._tables: dict[Path, tuple[float, list[dict[str, Any]]]] = {}
        self._found: tuple[float, list[Study]] | None = None
        self._volumes: OrderedDict[tuple[str, str], Volume] = OrderedDict()
        self._loading: dict[tuple[str, str], threading.Lock] = {}
        self._cache = cache
        self._lock = threading.Lock()

    def _record(self, pred: Path) -> tuple[dict[str, Any], float]:
        """``predict.json`` of a PRED folder and its modification time (read again when it changes)."""
        mtime = (pred / RECORD).stat().st_mtime
        return self._fresh(self._records, pred, mtime, lambda: read_record(pred)), mtime

    def _fresh(self, cache: dict, key: Any, mtime: float, load: Any) -> Any:
        """``cache[key]``'s value while its file's ``mtime`` is unchanged, else ``load()`` again."""
        with self._lock:
            known = cache.get(key)
        if known is None or known[0] != mtime:
            known = (mtime, load())
            with self._lock:
                cache[key] = known
        return known[1]

    # --- finding studies ------------------------------------------------------------------

    def _cases(self, source: Source) -> list[tuple[str | None, Path, Path | None]]:
        """``(job, pred folder, series folder or None: as recorded)`` of a root."""
        if source.kind == "spool":
            from analysis.node.spool import Spool

            return Spool(source.root).kept()
        return [(None, source.root, None)]

    def _studies_of(self, source: Source) -> list[Study]:
        found = []
        for job, pred, series_folder in self._cases(source):
            try:
                record, predicted = self._record(pred)
            except (InputError, OSError) as exc:  # a job moving on, or a damaged folder
                log.debug("%s: skipped (%s)", pred, exc)
                continue
            for case, part in (record.get("per_case") or {}).items():
                dicom = ((part or {}).get("input") or {}).get("dicom")
                if not dicom or not valid_uid(str(dicom.get("study_uid", ""))):
                    continue  # NIfTI input: nothing to sign against
                folder = series_folder if series_folder is not None else Path(dicom.get("folder") or "")
                with self._lock:
                    header = self._headers.get(folder)
                if header is None:
                    header = _header(folder)
                    with self._lock:
                        self._headers[folder] = header
                name, fingerprint = _model(record, part)
                found.append(Study(
                    uid=str(dicom["study_uid"]), series_uid=str(dicom["series_uid"]), source=source, job=job,
                    case=case, patient_id=header["PatientID"], study_date=header["StudyDate"],
                    study_time=header["StudyTime"], model_name=name, model_fingerprint=fingerprint,
                    seg_uid=(part.get("dicom_seg") or {}).get("sop_instance_uid"),
                    sr_uid=(part.get("sr") or {}).get("sop_instance_uid"), predicted=predicted))
        return found

    def studies(self) -> list[Study]:
        """Every study, newest first (study date and time, then prediction time); one per StudyInstanceUID.
        The roots are looked at again at most every ``rescan_seconds``."""
        now = time.monotonic()
        with self._lock:
            if self._found is not None and now - self._found[0] < self.rescan_seconds:
                return list(self._found[1])
        newest: dict[str, Study] = {}
        for source in self.sources:
            for study in self._studies_of(source):
                if study.uid not in newest or study.predicted > newest[study.uid].predicted:
                    newest[study.uid] = study
        found = sorted(newest.values(), key=lambda s: (s.study_date, s.study_time, s.predicted), reverse=True)
        with self._lock:
            self._found = (now, found)
        return list(found)

    def get(self, uid: str) -> Study | None:
        """The study ``uid`` (a StudyInstanceUID), or None: unknown, or not a UID at all."""
        if not valid_uid(uid):
            return None
        return next((s for s in self.studies() if s.uid == uid), None)

    # --- where a study's files are now ----------------------------------------------------

    def folders(self, study: Study) -> tuple[Path, Path]:
        """``(PRED folder, series folder)`` of ``study`` as they are now (a spool job's move on).

        Raises:
            InputError: the study's files are gone.
        """
        if study.job is None:
            record, _ = self._record(study.source.root)
            dicom = record["per_case"][study.case]["input"]["dicom"]
            return study.source.root, Path(dicom["folder"])
        from analysis.node.spool import Spool

        for job, pred, series in Spool(study.source.root).kept():
            if job == study.job:
                return pred, series
        raise InputError(f"{study.source.root}: job {study.job} of study {study.uid} is no longer in the spool")

    def rows(self, study: Study) -> list[dict[str, Any]]:
        """The study's rows of ``lesions.csv``, in the file's order."""
        pred, _ = self.folders(study)
        path = pred / LESIONS_CSV
        mtime = path.stat().st_mtime if path.is_file() else -1.0
        return [r for r in self._fresh(self._tables, path, mtime, lambda: read_lesions(pred)) if r["case"] == study.case]

    def volume(self, study: Study) -> Volume:
        """The study's CT, lesion labels and rows (cached for the last few studies).

        Raises:
            InputError: the series or mask cannot be read, or they disagree with ``lesions.csv``.
        """
        key = (study.uid, f"{study.job}|{study.case}|{study.predicted}")
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one reader of a study's CT at a time; the others wait for it
            with self._lock:
                if key in self._volumes:
                    self._volumes.move_to_end(key)
                    return self._volumes[key]
            volume = self._read(study)
            with self._lock:
                self._volumes[key] = volume
                while len(self._volumes) > self._cache:
                    self._loading.pop(self._volumes.popitem(last=False)[0], None)
        return volume

    def _read(self, study: Study) -> Volume:
        import SimpleITK as sitk

        from analysis.imaging.dicom import find_series, read_series
        from analysis.imaging.io import read_array
        from analysis.lesions import lesion_instances

        pred, folder = self.folders(study)
        series = find_series(folder, study.series_uid)
        image = read_series(series)
        geometry = Geometry.of(image)
        ct = sitk.GetArrayFromImage(image)
        mask, mask_geometry = read_array(mask_path(pred, study.case))
        problem = geometry.mismatch(mask_geometry)
        if problem:
            raise InputError(f"{mask_path(pred, study.case)}: {problem} (the CT series {study.series_uid})")
        labels, n = lesion_instances(mask, 26)
        rows = self.rows(study)
        if n != len(rows) or [r["lesion_id"] for r in rows] != list(range(1, n + 1)):
            raise InputError(f"{pred / LESIONS_CSV}: case {study.case} lists {len(rows)} lesion(s); its mask has {n}")
        log.info("study %s: read %d slices, %d lesion(s)", study.uid, ct.shape[0], n)
        return Volume(study=study, ct=ct, geometry=geometry, labels=labels.astype(np.int32, copy=False), rows=rows,
                      series=series)
