"""The ``PRED/<model>/`` folder contract: what both model wings write and ``analyze`` reads.

One module, used by ``predict`` (Keras), ``nnunet predict`` (PyTorch) and ``analyze``, so the
meaning of a prediction folder cannot drift between them. A folder ``PRED/<model>/`` holds:

* ``<case>.nii.gz``: a segmenter's uint8 0/1 mask with its CT's exact geometry;
* ``slices.csv``: a detector's slice probabilities, columns ``case,slice,probability``
  (``slice`` is axis 0 of the ``(slices, rows, cols)`` array);
* ``detector_slices.csv``: the cascade's detector probabilities (same columns; not named
  ``slices.csv`` so that ``analyze`` scores the folder as the segmenter it is);
* ``predict.json``: the record of the runs that wrote the folder (every case listed);
* sub-folders that belong to the model and are never models or cases:
  :data:`SUBFOLDERS` (``probabilities/``, ``dicom_seg/``, ``sr/``, ``preview/``, and ``review/``,
  the reader's review of the folder's cases: :mod:`analysis.review`);
* ``reviews.csv``: every decision readers made on the folder's lesions (:data:`REVIEWS_CSV`);
* a hidden ``.parts/`` folder: one record per finished case (see
  :class:`PredictionFolder`). Every reader ignores hidden names.

Several processes may fill one folder at the same time (``--shard i/n``): each case's
outputs are written to a hidden staging folder and moved into place, then the case's part
record is written last; the merged tables (``slices.csv``, ``predict.json``) are rebuilt from
all part records under a file lock after each run, so the shards together give exactly the
folder one unsharded run gives, with no merge step. Rerunning the same command skips the
finished cases; other settings into the same folder are refused unless ``--overwrite``.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from scipy import ndimage

from analysis.errors import InputError
from analysis.imaging.hounsfield import AIR_OR_LUNG_HU
from analysis.imaging.io import (Geometry, atomic_write_json, atomic_write_text, check_output_folder, read_header,
                                 remove_stale_partials, require_finite)
from analysis.prediction.shards import Shard, shard_cases
from analysis.imaging.records import csv_text

log = logging.getLogger(__name__)

__all__ = ["MASK_SUFFIX", "SLICES_CSV", "DETECTOR_CSV", "RECORD", "PROBABILITIES", "DICOM_SEG", "SR", "PREVIEW",
           "REVIEW", "REVIEWS_CSV", "SUBFOLDERS", "SLICES_COLUMNS", "PARTS", "mask_path", "check_output_folder", "select_cases",
           "check_ct", "remove_small_components", "remove_components_in_air", "format_slices_csv", "read_slices_csv", "discover_models",
           "PredictionFolder", "settings_fingerprint", "read_record"]

MASK_SUFFIX = ".nii.gz"
SLICES_CSV = "slices.csv"
DETECTOR_CSV = "detector_slices.csv"
RECORD = "predict.json"
PROBABILITIES = "probabilities"
DICOM_SEG = "dicom_seg"
#: TID 1500 measurement reports (DICOM SR) of DICOM input, ``sr/<case>.dcm``.
SR = "sr"
PREVIEW = "preview"
#: The readers' review of the folder's cases (per-study journals, signed results, their outbox).
REVIEW = "review"
#: Every review decision on the folder's lesions, one row each (:mod:`analysis.review.journal`).
REVIEWS_CSV = "reviews.csv"
#: Sub-folders of a model folder: parts of the model's output, never models or cases.
SUBFOLDERS = (PROBABILITIES, DICOM_SEG, SR, PREVIEW, REVIEW)
SLICES_COLUMNS = ("case", "slice", "probability")
#: Hidden folder of per-case part records (ignored by every reader).
PARTS = ".parts"
_SETTINGS = "settings.json"
#: Key of a part record holding a detector's probabilities in slice order.
SLICE_PROBABILITIES = "slice_probabilities"
#: Part-record keys that feed the merged tables, kept out of ``predict.json``'s ``per_case``.
_TABLE_KEYS = frozenset({"case", SLICE_PROBABILITIES, "lesion_rows", "patient"})
_LOCK = ".lock"


def mask_path(folder: str | os.PathLike, case: str) -> Path:
    """``folder/<case>.nii.gz``."""
    return Path(folder) / f"{case}{MASK_SUFFIX}"


# --- cases and inputs ----------------------------------------------------------------------


def select_cases(cohort: Any, spec: str, shard: Shard | None) -> list[str]:
    """The cases of ``--cases`` (:meth:`analysis.cohort.layout.Cohort.select`) in shard ``(i, n)``
    (:func:`analysis.prediction.shards.shard_cases`: ``sorted(cases)[i::n]``).

    Raises:
        InputError: unknown cases, a bad shard, or a shard that selects no case.
    """
    chosen = cohort.select(spec)
    cases = shard_cases(chosen, shard)
    if not cases:
        raise InputError(f"--shard {shard[0]}/{shard[1]}: selects none of the {len(chosen)} case(s); "
                         f"use n <= {len(chosen)}")
    return cases


def check_ct(path: str | os.PathLike) -> Geometry:
    """The up-front check of one CT: a readable, complete 3D image whose voxels are finite.

    Returns:
        Its geometry (header only; float NIfTI files are decoded once to look for NaN).

    Raises:
        InputError: unreadable, truncated or not 3D, or NaN/infinite voxels.
    """
    geometry = read_header(path, ndim=None)
    if len(geometry.size) != 3:
        raise InputError(f"{path}: is a {len(geometry.size)}D image, expected a 3D CT")
    require_finite(path)  # the file alone: decodes float NIfTI files only (ITK would read NaN as 0)
    return geometry


def remove_small_components(mask: np.ndarray, min_size: int, connectivity: int = 26) -> np.ndarray:
    """Drop 3D connected components with fewer than ``min_size`` voxels (the lesions of
    :func:`analysis.lesions.lesion_instances`); ``min_size <= 1`` keeps everything.

    Args:
        mask: ``(slices, rows, cols)``, non-zero is lesion.

    Returns:
        uint8 0/1 mask of the same shape.
    """
    from analysis.lesions import lesion_instances

    mask = (np.asarray(mask) != 0).astype(np.uint8)
    if min_size <= 1 or not mask.any():
        return mask
    labels, _ = lesion_instances(mask, connectivity)
    keep = np.bincount(labels.ravel()) >= min_size
    keep[0] = False
    return keep[labels].astype(np.uint8)


def remove_components_in_air(mask: np.ndarray, ct: np.ndarray, *, below_hu: float = AIR_OR_LUNG_HU,
                             connectivity: int = 26) -> tuple[np.ndarray, np.ndarray]:
    """Drop 3D components whose median HU is that of air or aerated lung, where no bone metastasis
    can be: below :data:`analysis.imaging.hounsfield.AIR_OR_LUNG_HU` (-500 HU; lung parenchyma is
    about -900..-500 HU, air -1000), the rule of the QC report's ``in air`` flag.

    Args:
        mask: ``(slices, rows, cols)``, non-zero is lesion.
        ct: HU, same shape.

    Returns:
        ``(mask, removed)``: uint8 0/1 without those components, and the voxel count of each one
        removed (int64, in label order).

    Examples:
        >>> ct = np.full((2, 4, 4), -1000.0)
        >>> ct[:, :, 2:] = 700.0
        >>> mask = np.zeros((2, 4, 4), np.uint8)
        >>> mask[:, 0, 0] = mask[:, 3, 3] = 1
        >>> kept, removed = remove_components_in_air(mask, ct)
        >>> kept[:, 3, 3].tolist(), int(kept.sum()), removed.tolist()
        ([1, 1], 2, [2])
    """
    from analysis.lesions import lesion_instances

    mask = (np.asarray(mask) != 0).astype(np.uint8)
    if not mask.any():
        return mask, np.zeros(0, np.int64)
    labels, n = lesion_instances(mask, connectivity)
    index = np.arange(1, n + 1)
    median = np.asarray(ndimage.median(np.asarray(ct, np.float32), labels, index), np.float64).reshape(-1)
    gone = index[median < below_hu]
    if gone.size == 0:
        return mask, np.zeros(0, np.int64)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    mask[np.isin(labels, gone)] = 0
    return mask, sizes[gone].astype(np.int64)


# --- slices.csv --------------------------------------------------------------------------


def format_slices_csv(rows: Iterable[tuple[str, int, float]]) -> str:
    """``slices.csv`` text: header ``case,slice,probability``, probabilities to 6 significant digits."""
    return csv_text(SLICES_COLUMNS, ((case, int(z), float(p)) for case, z, p in rows), digits=6)


def read_slices_csv(path: Path, n_slices: dict[str, int], known_cases: Iterable[str]) -> dict[str, np.ndarray]:
    """Read and check a detector's ``slices.csv``.

    Args:
        path: the file, columns ``case,slice,probability`` (extra columns ignored).
        n_slices: slice count of each analysed case; rows of other known cases are ignored.
        known_cases: every case of the cohort.

    Returns:
        Per analysed case, the probability of each slice ``0..n-1`` (float64).

    Raises:
        InputError: missing columns, unknown case ids, slices out of range or repeated,
            probabilities not finite or outside [0, 1], or slices without a probability.
    """
    known = set(known_cases)
    probs = {case: np.full(n, np.nan) for case, n in n_slices.items()}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read as UTF-8 CSV ({exc})") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in SLICES_COLUMNS if c not in header]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}; expected columns "
                         f"{','.join(SLICES_COLUMNS)}, found {','.join(header) or 'none'}")
    reader.fieldnames = header
    for line, row in enumerate(reader, start=2):
        case = (row.get("case") or "").strip()
        if case not in known:
            raise InputError(f"{path}: line {line}: unknown case {case!r}; expected a case of the dataset")
        if case not in probs:
            continue
        try:
            z = int((row.get("slice") or "").strip())
        except ValueError:
            raise InputError(f"{path}: line {line}: slice {row.get('slice')!r} is not an integer") from None
        if not 0 <= z < n_slices[case]:
            raise InputError(f"{path}: line {line}: slice {z} out of range for case {case}; expected 0..{n_slices[case] - 1}")
        try:
            p = float((row.get("probability") or "").strip())
        except ValueError:
            raise InputError(f"{path}: line {line}: probability {row.get('probability')!r} is not a number") from None
        if not (math.isfinite(p) and 0.0 <= p <= 1.0):
            raise InputError(f"{path}: line {line}: probability {p} outside [0, 1]")
        if not math.isnan(probs[case][z]):
            raise InputError(f"{path}: line {line}: case {case} slice {z} appears twice")
        probs[case][z] = p
    for case, values in probs.items():
        gaps = np.flatnonzero(np.isnan(values))
        if gaps.size:
            shown = ", ".join(str(int(g)) for g in gaps[:5]) + (" ..." if gaps.size > 5 else "")
            raise InputError(f"{path}: case {case} has no probability for {gaps.size} slice(s) ({shown}); "
                             f"expected one row per slice 0..{values.size - 1}")
    return probs


# --- model discovery -----------------------------------------------------------------------


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def discover_models(predictions: Path) -> tuple[list[str], list[str]]:
    """Model folders of ``PRED``: segmenters (hold ``*.nii.gz``) and detectors (hold ``slices.csv``).

    Hidden names and the sub-folders of :data:`SUBFOLDERS` inside a model folder are ignored.

    Raises:
        InputError: ``PRED`` is missing or holds no model folder, or a folder holds neither.
    """
    if not predictions.is_dir():
        raise InputError(f"{predictions}: predictions folder not found")
    segmenters, detectors = [], []
    for folder in sorted(p for p in predictions.iterdir() if p.is_dir() and _visible(p)):
        seg = any(f.is_file() and f.name.endswith(MASK_SUFFIX) and _visible(f) for f in folder.iterdir())
        det = (folder / SLICES_CSV).is_file()
        if not (seg or det):
            raise InputError(f"{folder}: holds neither <case>.nii.gz masks nor {SLICES_CSV}; "
                             f"expected one folder per model")
        if seg:
            segmenters.append(folder.name)
        if det:
            detectors.append(folder.name)
    if not segmenters and not detectors:
        raise InputError(f"{predictions}: no model folders; expected PRED/<model>/<case>.nii.gz or PRED/<model>/{SLICES_CSV}")
    return segmenters, detectors


# --- predict.json -------------------------------------------------------------------------


def read_record(folder: str | os.PathLike, *, missing_ok: bool = False) -> dict[str, Any] | None:
    """``folder/predict.json``, the record :meth:`PredictionFolder.finish` writes: the one reader.

    Args:
        folder: a PRED folder ``PRED/<model>/``.
        missing_ok: return None when the folder has no record instead of raising.

    Raises:
        InputError: the record is missing (unless ``missing_ok``), not valid JSON or not an object.
    """
    path = Path(folder) / RECORD
    if not path.is_file():
        if missing_ok:
            return None
        raise InputError(f"{path}: prediction record not found (a PRED folder written by predict)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise InputError(f"{path}: expected a JSON object (a prediction record)")
    return record


#: The fields of a prediction record that say which model ran and how (not what it found): what
#: followup and timeline keep of the records of the PRED folders they predict into.
MODEL_FIELDS = ("model", "training", "threshold", "threshold_source", "folds", "mirroring", "device", "precision",
                "settings", "inference")


def model_fields(record: dict[str, Any]) -> dict[str, Any]:
    """``record``'s :data:`MODEL_FIELDS` that it has (a wing writes some of them only)."""
    return {k: record[k] for k in MODEL_FIELDS if k in record}


# --- one folder filled by one or many runs -------------------------------------------------


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """Canonical JSON of the settings that decide a folder's content (compared on resume)."""
    return json.dumps(settings, sort_keys=True, default=str)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    import fcntl

    parts = folder / PARTS
    parts.mkdir(parents=True, exist_ok=True)
    with open(parts / _LOCK, "a", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class PredictionFolder:
    """``PRED/<model>/`` as one or several runs fill it, case by case.

    A case is finished when its part record ``.parts/cases/<case>.json`` exists; it is written
    after the case's files are in place, so a killed run leaves finished cases and nothing
    half-written (hidden staging folders of dead processes are removed by the next run).

    Args:
        out: the folder.
        settings: what decides the folder's content (model, thresholds, input, ...; not the
            cases, the shard or the batch size). A non-empty folder made with other
            settings, or not made by a prediction, is refused unless ``overwrite``.
        overwrite: replace a folder made with other settings (it is emptied), or redo the
            selected cases of one made with the same settings.

    Raises:
        InputError: ``out`` is a file, or the folder rule above.
    """

    def __init__(self, out: str | os.PathLike, settings: dict[str, Any], *, overwrite: bool) -> None:
        self.out = Path(out)
        self.settings = settings
        self.overwrite = overwrite
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"{self.out}: exists and is not a folder")
        self._verdict = self._compare()
        if self._verdict not in ("new", "same") and not overwrite:
            raise InputError(f"{self.out}: output folder exists and is not empty, {self._verdict}; "
                             f"pass --overwrite to replace it")

    def _compare(self) -> str:
        if not self.out.is_dir() or not any(p for p in self.out.iterdir() if not self._bare_parts(p)):
            return "new"
        path = self.out / PARTS / _SETTINGS
        if not path.is_file():
            return "not written by a prediction"
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return "with an unreadable prediction record"
        if settings_fingerprint(previous) != settings_fingerprint(self.settings):
            changed = sorted(k for k in set(previous) | set(self.settings) if previous.get(k) != self.settings.get(k))
            return f"made with other settings ({', '.join(changed)})"
        return "same"

    @staticmethod
    def _bare_parts(path: Path) -> bool:
        """Whether ``path`` is a ``.parts`` folder holding nothing but its lock and perhaps the
        temporary file of a settings write (:func:`analysis.imaging.io.atomic_file`): what a run killed
        between taking the lock and writing its settings leaves (the folder is new)."""
        return path.name == PARTS and path.is_dir() and all(
            q.name == _LOCK or q.name.startswith(f".{_SETTINGS}.") for q in path.iterdir())

    # --- state ----------------------------------------------------------------------------
    def _part(self, case: str) -> Path:
        return self.out / PARTS / "cases" / f"{case}.json"

    def done(self, case: str) -> bool:
        """Whether ``case`` is finished (its part record exists)."""
        return self._part(case).is_file()

    def prepare(self, cases: Sequence[str]) -> list[str]:
        """Create the folder (emptying it first when ``overwrite`` replaces other settings)
        and return the cases still to do, in order.

        Cases already finished are skipped (and said so), except with ``overwrite``.
        """
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(exist_ok=True)
        with _locked(self.out):
            verdict = self._compare() if self.out.is_dir() else "new"
            if verdict not in ("new", "same"):  # overwrite: replace what another model or setting wrote
                for p in self.out.iterdir():
                    if p.name == PARTS:
                        for q in p.iterdir():
                            if q.name != _LOCK:
                                shutil.rmtree(q) if q.is_dir() else q.unlink()
                    elif p.is_dir():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
            atomic_write_json(self.out / PARTS / _SETTINGS, self.settings)
            if self.overwrite and verdict == "same":
                for case in cases:
                    self._part(case).unlink(missing_ok=True)
        remove_stale_partials(self.out / "staging")
        finished = [c for c in cases if self.done(c)]
        if finished:
            log.info("%s: %d of %d case(s) already finished, skipped (%s%s)", self.out, len(finished), len(cases),
                     ", ".join(finished[:5]), " ..." if len(finished) > 5 else "")
        return [c for c in cases if not self.done(c)]

    @contextlib.contextmanager
    def case(self, case: str) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Stage one case's outputs; on success move them into place, then write its part.

        Yields:
            ``(staging, part)``: write files into ``staging`` with their final relative
            paths (``<case>.nii.gz``, ``probabilities/<case>.nii.gz``, ...); fill ``part``
            (JSON-able) with the case's record; a detector's slice probabilities go under
            :data:`SLICE_PROBABILITIES` (rounded to the 6 digits ``slices.csv`` keeps).
        """
        from analysis.imaging.io import _HOST  # the same partial-folder naming as atomic_directory

        staging = Path(tempfile.mkdtemp(prefix=f".staging.{_HOST}.{os.getpid()}.", suffix=".partial", dir=self.out))
        part: dict[str, Any] = {"case": case}
        try:
            yield staging, part
            for f in sorted(staging.rglob("*")):
                if f.is_file():
                    target = self.out / f.relative_to(staging)
                    target.parent.mkdir(parents=True, exist_ok=True)  # mkdir honours the umask
                    os.replace(f, target)
            atomic_write_json(self._part(case), part)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def parts(self) -> dict[str, dict[str, Any]]:
        """Every finished case's part record, by case id."""
        out = {}
        folder = self.out / PARTS / "cases"
        if folder.is_dir():
            for p in sorted(folder.glob("*.json")):
                try:
                    record = json.loads(p.read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError):
                    continue
                out[record.get("case", p.stem)] = record
        return out

    def finish(self, run_record: dict[str, Any], *, slices_name: str | None = None,
               tables: Sequence[tuple[str, Any]] = (), summary: Any = None) -> dict[str, Any]:
        """Rebuild the merged outputs from every finished case, under the folder's lock.

        Args:
            run_record: this run's record (model, options, shard, timing, versions, ...):
                becomes ``predict.json`` with ``cases`` and ``per_case`` of every finished
                case and ``runs``, one entry per run that contributed.
            slices_name: ``slices.csv`` or ``detector_slices.csv`` to write from the parts'
                ``"slice_probabilities"`` entries (probabilities in slice order); None: none.
            tables: ``(file name, builder)``: ``builder(parts)`` returns the text of a merged
                table (lesion and patient tables of later outputs).
            summary: ``summary(parts)`` returns fields added to the record (totals over
                every finished case).

        Returns:
            The ``predict.json`` record written.
        """
        with _locked(self.out):
            parts = self.parts()
            cases = sorted(parts)
            if slices_name is not None:
                rows = ((c, z, p) for c in cases for z, p in enumerate(parts[c].get(SLICE_PROBABILITIES) or []))
                atomic_write_text(self.out / slices_name, format_slices_csv(rows))
            for name, builder in tables:
                atomic_write_text(self.out / name, builder(parts))
            runs_path = self.out / PARTS / "runs.json"
            try:
                runs = json.loads(runs_path.read_text(encoding="utf-8")) if runs_path.is_file() else []
            except (OSError, json.JSONDecodeError):
                runs = []
            runs.append({k: run_record.get(k) for k in ("shard", "cases_run", "timing", "versions") if k in run_record})
            atomic_write_json(runs_path, runs)
            record = {**run_record, "cases": cases,
                      "per_case": {c: {k: v for k, v in parts[c].items() if k not in _TABLE_KEYS} for c in cases},
                      **(summary(parts) if summary is not None else {}),
                      "runs": runs}
            atomic_write_json(self.out / RECORD, record)
        return record
