"""``import-reviews``: every reviewed study becomes a training case (issue #35).

A study is reviewed when its journal (:mod:`analysis.review.journal`) holds a signature: a reader
signed it on the review page, or the node took a viewer's edited SEG as its review
(:mod:`analysis.review.viewer`). Each such study of a review root (a node's spool or a PRED
folder of ``predict --images``) is added to a cohort (:mod:`analysis.cohort.layout`) as one case:

* ``imagesTr/<case>_0000.nii.gz``: the CT series, imported as ``import-dicom`` imports one
  (:func:`analysis.cohort.imports.import_dicom`: the same series chosen by its UID, HU, the
  stored geometry);
* ``labelsTr/<case>.nii.gz``: what the reader kept: the accepted lesions as predicted and the
  added ones as grown from the reader's click (:func:`analysis.review.signing.final_lesions`, the
  lesions of the signed SEG), or, for a viewer's review, the viewer's SEG (every segment);
* ``negativesTr/<case>.nii.gz``: the predicted lesions the reader rejected (or deleted in the
  viewer): hard negatives for ``train --hard-negative-fraction``. Where a rejected lesion and a
  kept or added one share voxels, the label wins (the map never marks a lesion voxel,
  :func:`analysis.cohort.case.negatives_problems`); a study without rejections gets no map.
  A lesion a reader added and then rejected again is neither (the model never called it);
* ``reviews.json``: the review set, one entry per imported case (study and series UID, source
  ``page``/``viewer``, reader, signing time, the predicting model's fingerprint, lesion counts,
  and ``review``: a digest of the journal lines it was made from);
* ``splits.json``, when the cohort has one: each new case joins the training side of every
  fold (never a validation or test set: those keep measuring what they measured).

The case id is ``rev_`` and 12 hex digits of the study's and series' UIDs (no patient data).
Resumable: a study whose case is in ``reviews.json`` with the same digest is skipped; a case's
files are written first and its ``reviews.json`` entry last, so a kill between them is redone.
One study that cannot be imported is reported and skipped; the others are imported.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from analysis.cohort.layout import Cohort
from analysis.errors import DataProblems, InputError
from analysis.imaging.io import atomic_write_json, write_mask

log = logging.getLogger(__name__)

__all__ = ["ImportOutcome", "ImportSummary", "import_reviews", "case_id_of", "review_of"]

#: Case ids of imported reviews: this prefix and 12 hex digits.
CASE_PREFIX = "rev_"


@dataclass(frozen=True)
class ImportOutcome:
    """One study: ``status`` ``imported``, ``kept`` (already imported, unchanged) or ``failed``."""

    study_uid: str
    case: str
    status: str
    message: str = ""


@dataclass
class ImportSummary:
    """What :func:`import_reviews` did."""

    dataset: Path
    outcomes: list[ImportOutcome] = field(default_factory=list)
    not_reviewed: int = 0

    @property
    def failed(self) -> list[ImportOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def table(self) -> str:
        """One line per study, then the counts."""
        lines = [f"{o.case:<17} {o.status:<9} {o.study_uid} {o.message}".rstrip() for o in self.outcomes]
        count = {s: sum(o.status == s for o in self.outcomes) for s in ("imported", "kept", "failed")}
        lines.append(f"{count['imported']} imported, {count['kept']} already imported, {count['failed']} failed, "
                     f"{self.not_reviewed} not reviewed yet; cohort {self.dataset}")
        return "\n".join(lines)


def case_id_of(study_uid: str, series_uid: str) -> str:
    """The case id of a reviewed series: :data:`CASE_PREFIX` and 12 hex digits of both UIDs."""
    return CASE_PREFIX + hashlib.sha256(f"{study_uid}|{series_uid}".encode("utf-8")).hexdigest()[:12]


def review_of(entries: list) -> tuple[Any, list] | None:
    """The signature a study is imported by and the journal lines before it, or None (not reviewed).

    A page signature (the first ``sign``, there is never a second) wins; without one, the latest
    viewer signature, with the journal lines up to it.
    """
    signs = [i for i, e in enumerate(entries) if e.decision.decision == "sign"]
    page = [i for i in signs if entries[i].decision.source == "page"]
    if page:
        return entries[page[0]], entries[:page[0]]
    if signs:
        return entries[signs[-1]], entries[:signs[-1]]
    return None


def _digest(entries: list) -> str:
    text = "\n".join(e.to_line().strip() for e in entries)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _source(root: Path):
    """The review root ``root``: a node's spool, or a PRED folder.

    Raises:
        InputError: neither.
    """
    from analysis.review.store import Source

    if (root / "jobs").is_dir() or (root / "done").is_dir():
        return Source.spool(root)
    try:
        return Source.pred(root)
    except InputError:
        raise InputError(f"{root}: neither a node's spool (serve --spool: jobs/, done/) nor a PRED folder of "
                         f"predict --images (predict.json, lesions.csv)") from None


def _label_and_negatives(volume, sign, entries: list, root: Path) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The case's label and hard negatives ``(slices, rows, cols)`` uint8 in the series' stored
    order, and lesion counts (module docstring)."""
    from analysis.review.journal import lesion_states

    states = lesion_states(entries)
    n_predicted = len(volume.rows)
    rejected = sorted(lid for lid, e in states.items() if e.decision.decision == "reject" and lid <= n_predicted)
    if sign.decision.source == "viewer":
        from analysis.imaging.seg_labels import read_seg_label

        seg = root / sign.detail["viewer_seg"]["file"]
        if not seg.is_file():
            raise InputError(f"{seg}: the viewer's SEG of this review is gone")
        label = read_seg_label(seg, volume.series, "all").astype(np.uint8)
        kept = sum(e.decision.decision in ("accept", "add") for e in states.values())
    else:
        from analysis.review.signing import final_lesions

        ids, segments, _ = final_lesions(volume, entries)
        label = (segments > 0).astype(np.uint8)
        kept = len(ids)
    negatives = (np.isin(volume.labels, rejected) & (label == 0)).astype(np.uint8)
    added = sum(e.decision.decision == "add" for e in states.values())
    return label, negatives, {"kept": kept, "added": added, "rejected": len(rejected)}


def _import_study(study, store, sign, entries: list, cohort: Cohort, case: str, root: Path) -> dict[str, Any]:
    """Write one case (image, label, negatives); its ``reviews.json`` entry."""
    from analysis.cohort.imports import import_dicom

    volume = store.volume(study)
    label, negatives, counts = _label_and_negatives(volume, sign, entries, root)
    _, series_folder = store.folders(study)
    cohort.negatives_dir.mkdir(parents=True, exist_ok=True)
    if negatives.any():
        write_mask(negatives, volume.geometry, cohort.negatives_path(case))
    else:
        cohort.negatives_path(case).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix=".import-reviews.", dir=cohort.root) as tmp:
        label_file = Path(tmp) / "label.nii.gz"
        write_mask(label, volume.geometry, label_file)
        import_dicom(series_folder, cohort.root, case, label=label_file, series=study.series_uid, overwrite=True)
    d = sign.decision
    return {"study_uid": study.uid, "series_uid": study.series_uid, "source": d.source, "reader": d.reader,
            "signed_at": d.time, "model": study.model_name, "model_fingerprint": d.model_fingerprint,
            "root": str(root.resolve()), "lesions": counts, "hard_negative_voxels": int(negatives.sum()),
            "review": _digest(entries + [sign])}


def _clear(cohort: Cohort, case: str) -> None:
    for path in (cohort.image_path(case), cohort.label_path(case), cohort.negatives_path(case)):
        path.unlink(missing_ok=True)


def _add_to_splits(cohort: Cohort, cases: list[str]) -> None:
    """New cases join every fold's training side in ``splits.json`` (when the cohort has one)."""
    splits = cohort.splits() if cases else None
    if splits is None:
        return
    placed = set(splits["test"]) | {c for f in splits["folds"] for c in f["train"] + f["val"]}
    new = [c for c in cases if c not in placed]
    if new:
        for fold in splits["folds"]:
            fold["train"] = sorted(set(fold["train"]) | set(new))
        atomic_write_json(cohort.splits_path, splits)
        log.info("%s: %d reviewed case(s) added to the training side of every fold", cohort.splits_path, len(new))


def import_reviews(root: str | os.PathLike, dataset: str | os.PathLike, *,
                   progress: Callable[[int, int, ImportOutcome], None] | None = None) -> ImportSummary:
    """Add every reviewed study of a review root to a cohort (module docstring).

    Args:
        root: a node's spool or a PRED folder of ``predict --images`` with its review.
        dataset: the cohort (created when missing).
        progress: called after each study with ``(done, total, outcome)``.

    Returns:
        The summary; its ``failed`` outcomes name each study that could not be imported.

    Raises:
        InputError: ``root`` is no review root, or the cohort's ``reviews.json``/``splits.json``
            cannot be read.
    """
    from analysis.review.journal import Journal
    from analysis.review.store import StudyStore

    root = Path(root)
    source = _source(root)
    journal = Journal(root)
    cohort = Cohort(dataset)
    cohort.root.mkdir(parents=True, exist_ok=True)
    known = cohort.review_set()
    store = StudyStore([source], rescan_seconds=0.0)
    studies = {s.uid: s for s in store.studies()}
    summary = ImportSummary(dataset=cohort.root)
    uids = journal.studies()
    new_cases = []
    for n, uid in enumerate(uids, 1):
        entries = journal.read(uid)
        found = review_of(entries)
        if found is None:
            summary.not_reviewed += 1
            continue
        sign, before = found
        study = studies.get(uid)
        case = case_id_of(uid, sign.decision.series_uid)
        try:
            if study is None or study.series_uid != sign.decision.series_uid:
                raise InputError(f"the reviewed series {sign.decision.series_uid} is no longer in {root}")
            digest = _digest(before + [sign])
            if known.get(case, {}).get("review") == digest and cohort.image_path(case).is_file():
                outcome = ImportOutcome(uid, case, "kept")
            else:
                record = _import_study(study, store, sign, before, cohort, case, root)
                known[case] = record
                atomic_write_json(cohort.reviews_path, {"cases": known})
                new_cases.append(case)
                c = record["lesions"]
                outcome = ImportOutcome(uid, case, "imported", f"{c['kept']} lesion(s), {c['rejected']} rejected "
                                                               f"({record['source']}, {record['reader']})")
        except (InputError, DataProblems, OSError, ValueError, KeyError) as exc:
            _clear(cohort, case)
            message = "; ".join(exc.problems) if isinstance(exc, DataProblems) else str(exc)
            outcome = ImportOutcome(uid, case, "failed", message.splitlines()[0][:300] if message else type(exc).__name__)
            log.error("import-reviews: study %s: %s", uid, outcome.message)
        summary.outcomes.append(outcome)
        if progress is not None:
            progress(n, len(uids), outcome)
    _add_to_splits(cohort, new_cases)
    return summary

