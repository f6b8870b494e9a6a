"""Edited SEGs from a viewer are reviews too (issue #35).

A reader who corrects the node's result in a viewer (3D Slicer's Segment Editor, OHIF's
segmentation mode) saves a new SEG into the study, and the PACS sends it to the node like any
other instance. The node (:mod:`analysis.node.server`) keeps every SEG it receives in its spool
(``viewer/incoming/``) and hands it to :func:`review_viewer_seg`, which

1. ignores a SEG this project wrote itself (Manufacturer ``bonemets``,
   :data:`analysis.imaging.dicom_seg.MANUFACTURER`: the node's preliminary
   result or a signed ``bonemets reviewed`` one that the PACS routes back), and a SEG that
   references no series the node predicted (:class:`ViewerIgnored`, one log line);
2. reads it onto the predicted CT series (:func:`analysis.imaging.seg_labels.read_seg_label`,
   every segment merged: a viewer may keep one segment per lesion or one for all) and splits it
   into lesions (:func:`analysis.lesions.lesion_instances`, 26-connected);
3. compares it lesion by lesion with the node's prediction (:func:`compare`, through the shared
   voxels of :func:`overlap_pairs`): a predicted lesion that no viewer lesion touches was
   **deleted** (a false positive); one whose Dice with the viewer lesions it touches is at least
   :data:`KEPT_DICE` was **kept**, else **reshaped**; a viewer lesion touching no predicted one
   was **added** (missed);
4. writes one decision per lesion to the review journal and ``reviews.csv``
   (:class:`analysis.review.journal.Journal`, source ``viewer``, reader = the SEG's
   ContentCreatorName, else its Manufacturer): kept and reshaped lesions are ``accept`` (the
   verb and the Dice in the note), deleted ones ``reject`` with reason ``other``, added ones
   ``add`` (numbered after the predicted ones, their voxels in the journal as the review page's
   additions), then a ``sign``: the study counts as reviewed (``import-reviews`` takes the
   viewer's SEG as its label). The SEG file is kept under ``review/viewer/<study>/``. A later
   viewer SEG of the same study adds its own rows and signature (``import-reviews`` takes the
   latest); a study signed on the review page is final, and a viewer SEG of it is ignored.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import SegmentationStorage

from analysis.lesions.overlap import dice, overlap_pairs
from analysis.lesions import lesion_instances
from analysis.prediction.folder import REVIEW

log = logging.getLogger(__name__)

__all__ = ["KEPT_DICE", "LesionChange", "ViewerIgnored", "compare",
           "referenced_series", "review_viewer_seg", "viewer_folder"]

#: A predicted lesion whose Dice with the viewer's lesions it touches is at least this was kept
#: unchanged (a SEG saved again without an edit gives 1.0; one voxel of a 30-voxel lesion moved, 0.97).
KEPT_DICE = 0.9
VERBS = ("kept", "reshaped", "deleted", "added")


class ViewerIgnored(ValueError):
    """A SEG that is no reader's review of a prediction of this node (one line: why)."""


@dataclass(frozen=True)
class LesionChange:
    """What a viewer SEG did to one lesion.

    Attributes:
        lesion_id: the predicted lesion's id (``lesions.csv``), or for an added lesion its new id
            (numbered after the predicted ones, in the viewer lesions' order).
        verb: ``kept``, ``reshaped``, ``deleted`` or ``added``.
        dice: the predicted lesion's Dice with the viewer lesions it touches (None: deleted or added).
        voxels: an added lesion's flat voxel indices (empty otherwise).
    """

    lesion_id: int
    verb: str
    dice: float | None = None
    voxels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def compare(predicted: np.ndarray, n_predicted: int, viewer: np.ndarray, *, kept_dice: float = KEPT_DICE,
            first_added: int | None = None) -> list[LesionChange]:
    """Lesion by lesion, what a viewer's mask did to a prediction (rules: module docstring, step 3).

    Args:
        predicted: predicted lesion ids ``(slices, rows, cols)``, ``0..n_predicted``.
        n_predicted: predicted lesion count.
        viewer: the viewer's mask of the same shape (non-zero: lesion).
        kept_dice: the Dice from which a lesion counts as kept.
        first_added: the id of the first added lesion (default ``n_predicted + 1``; after the ids
            the study's review has used already).

    Returns:
        One change per predicted lesion (ids ascending), then one per added lesion.

    Example:
        Lesion 1 kept, lesion 2 deleted, one lesion added:

        >>> pred = np.array([[[1, 1, 0, 2, 0, 0]]]); view = np.array([[[1, 1, 0, 0, 0, 1]]])
        >>> [(c.lesion_id, c.verb, c.dice) for c in compare(pred, 2, view)]
        [(1, 'kept', 1.0), (2, 'deleted', None), (3, 'added', None)]
    """
    if predicted.shape != viewer.shape:
        raise ValueError(f"prediction {predicted.shape} and viewer mask {viewer.shape}: expected one shape")
    view_ids, n_view = lesion_instances(viewer != 0, 26)
    ids_p, ids_v, _ = overlap_pairs(predicted, view_ids)
    changes = []
    for lid in range(1, n_predicted + 1):
        partners = ids_v[ids_p == lid]
        if partners.size == 0:
            changes.append(LesionChange(lid, "deleted"))
            continue
        d = dice(predicted == lid, np.isin(view_ids, partners))
        changes.append(LesionChange(lid, "kept" if d >= kept_dice else "reshaped", round(d, 4)))
    touched = set(ids_v.tolist())
    new_id = (n_predicted + 1 if first_added is None else first_added) - 1
    for vid in range(1, n_view + 1):
        if vid not in touched:
            new_id += 1
            changes.append(LesionChange(new_id, "added", voxels=np.flatnonzero(view_ids == vid).astype(np.int64)))
    return changes


def viewer_folder(root: Path, study_uid: str) -> Path:
    """``review/viewer/<study>/``: the viewer SEGs of a study kept with its review."""
    return Path(root) / REVIEW / "viewer" / study_uid


def _header(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many kinds for a damaged file
        raise ViewerIgnored(f"{path.name}: not readable as DICOM ({type(exc).__name__})") from None


def _referenced_series(ds) -> list[str]:
    return [str(item.SeriesInstanceUID) for item in ds.get("ReferencedSeriesSequence", [])
            if item.get("SeriesInstanceUID")]


def referenced_series(path: str | Path) -> list[str]:
    """The SeriesInstanceUIDs a SEG file references (none for an unreadable file)."""
    try:
        return _referenced_series(_header(Path(path)))
    except ViewerIgnored:
        return []


def _reader(ds) -> str:
    """The reader: ContentCreatorName (``Family^Given`` as stored), else the Manufacturer, else ``viewer``."""
    for keyword in ("ContentCreatorName", "Manufacturer"):
        value = str(ds.get(keyword, "") or "").strip()
        if value:
            return value[:64]
    return "viewer"


def _study_of(store, ds):
    """The study of this node that the SEG reviews, or :class:`ViewerIgnored`."""
    study_uid = str(ds.get("StudyInstanceUID", ""))
    referenced = _referenced_series(ds)
    for study in store.studies():
        if study.uid == study_uid and study.series_uid in referenced:
            return study
    raise ViewerIgnored(f"SEG {ds.get('SOPInstanceUID')} references series {', '.join(referenced) or 'none'} of "
                        f"study {study_uid}: no series this node predicted")


def review_viewer_seg(path: str | Path, root: str | Path, *, kept_dice: float = KEPT_DICE) -> dict[str, Any]:
    """Turn a SEG received from a viewer into review decisions (module docstring).

    Args:
        path: the received SEG file (moved under :func:`viewer_folder` when it is a review).
        root: the node's spool (its review root: ``reviews.csv`` and ``review/`` are there).
        kept_dice: see :func:`compare`.

    Returns:
        ``{"study_uid", "series_uid", "reader", "seg", "changes": {verb: [lesion ids]}}``.

    Raises:
        ViewerIgnored: not a reader's review of this node's prediction (our own SEG, another
            series, not a SEG), a SEG read before (sent again), or a study signed on the page.
        InputError: the SEG cannot be read onto the series, or the prediction cannot be read.
    """
    from analysis.imaging.dicom_seg import MANUFACTURER
    from analysis.imaging.seg_labels import read_seg_label
    from analysis.review.growing import encode_voxels
    from analysis.review.journal import Decision, Journal, now, signature, valid_uid
    from analysis.review.store import Source, StudyStore

    path, root = Path(path), Path(root)
    ds = _header(path)
    if str(ds.get("SOPClassUID", "")) != SegmentationStorage:
        raise ViewerIgnored(f"{path.name}: SOP class {ds.get('SOPClassUID')}, not a SEG")
    if str(ds.get("Manufacturer", "")).strip() == MANUFACTURER:
        raise ViewerIgnored(f"SEG {ds.get('SOPInstanceUID')} (series {ds.get('SeriesInstanceUID')}) was written by "
                            f"{MANUFACTURER} itself")
    sop = str(ds.get("SOPInstanceUID", ""))
    if not valid_uid(sop):
        raise ViewerIgnored(f"{path.name}: SOPInstanceUID {sop!r} is not a DICOM UID")
    store = StudyStore([Source.spool(root)], rescan_seconds=0.0)
    study = _study_of(store, ds)
    keep = viewer_folder(root, study.uid) / f"{sop}.dcm"
    volume = store.volume(study)
    viewer = read_seg_label(path, volume.series, "all")
    reader = _reader(ds)
    seg = {"sop_instance_uid": sop, "series_uid": str(ds.SeriesInstanceUID), "file": str(keep.relative_to(root)),
           "manufacturer": str(ds.get("Manufacturer", "")), "software": str(ds.get("SoftwareVersions", ""))}

    def decision(lesion_id: int | None, what: str, note: str, reason: str | None = None) -> Decision:
        return Decision(study_uid=study.uid, series_uid=study.series_uid, lesion_id=lesion_id, decision=what,
                        reason=reason, note=note, reader=reader, time=now(), model_fingerprint=study.model_fingerprint,
                        source="viewer")

    with Journal(root).study(study.uid) as journal:
        signed = signature(journal.entries)
        if signed is not None and signed.decision.source == "page":
            raise ViewerIgnored(f"study {study.uid} is signed on the review page by {signed.decision.reader} at "
                                f"{signed.decision.time}; SEG {sop} stays in the PACS only")
        if any(e.decision.decision == "sign" and (e.detail.get("viewer_seg") or {}).get("sop_instance_uid") == sop
               for e in journal.entries):  # its signature is written last: a kill before it reads it again
            raise ViewerIgnored(f"SEG {sop} was read before (sent again); its decisions are in the journal once")
        used = [e.decision.lesion_id for e in journal.entries if e.decision.lesion_id is not None]
        changes = compare(volume.labels, len(volume.rows), viewer, kept_dice=kept_dice,
                          first_added=max([len(volume.rows), *used]) + 1)
        keep.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, keep)
        for change in changes:
            detail: dict[str, Any] = {"viewer": change.verb, "seg": sop}
            if change.verb in ("kept", "reshaped"):
                journal.append(decision(change.lesion_id, "accept", f"viewer: {change.verb}, Dice {change.dice:.3f}"),
                               {**detail, "dice": change.dice})
            elif change.verb == "deleted":
                journal.append(decision(change.lesion_id, "reject", "viewer: deleted", "other"), detail)
            else:
                journal.append(decision(change.lesion_id, "add", "viewer: added"),
                               {**detail, "voxels": encode_voxels(change.voxels), "row": volume.lesion_row(change.voxels)})
        journal.append(decision(None, "sign", f"viewer SEG {sop}"), {"viewer_seg": seg})
    path.unlink(missing_ok=True)
    summary = {verb: [c.lesion_id for c in changes if c.verb == verb] for verb in VERBS}
    log.info("study %s: viewer SEG %s by %s: %s", study.uid, sop, reader,
             ", ".join(f"{len(ids)} {verb}" for verb, ids in summary.items()))
    return {"study_uid": study.uid, "series_uid": study.series_uid, "reader": reader, "seg": seg, "changes": summary}

