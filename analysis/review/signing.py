"""Signing a study: the final SEG and the verified report, written, read back and delivered once.

What is written (the project's own writers, :func:`analysis.imaging.dicom_seg.write_dicom_seg` and
:func:`analysis.imaging.dicom_sr.write_measurement_report`), in new series of the study, described
``bonemets reviewed`` (SEG, series number :data:`SEG_SERIES_NUMBER`) and ``bonemets reviewed report``
(:data:`SR_SERIES_NUMBER`); the preliminary SEG and report stay where they are:

* the final SEG: one segment per accepted or added lesion, segment numbers 1..K in lesion-id order,
  each keeping its lesion id (label "bone metastasis N", TrackingID "lesion N"); a kept lesion keeps
  the preliminary segment's TrackingUID; an added lesion is SEMIAUTOMATIC, drawn by :data:`GROWING`;
* the final TID 1500 report: the same content as ``predict``'s report for those lesions (the
  accepted ones' rows of ``lesions.csv``, an added one's measured like them by
  :func:`analysis.prediction.tables.lesion_rows`), CompletionFlag COMPLETE, VerificationFlag VERIFIED,
  the signed-in reader as verifying observer. Rejected lesions are left out: the report states the
  findings; the rejections and their reasons are in the journal and ``reviews.csv`` (and the
  preliminary report, still in the study, lists every predicted lesion).

The UIDs derive (:func:`analysis.imaging.dicom_seg.result_uid`) from the preliminary SEG's (or
report's) SOPInstanceUID and a digest of the review (the lesions kept, the added voxels, the
reader): signing the same review again after a crash writes the same objects, which a PACS stores once.

Order, each step safe to repeat after a kill: the files are written into
``review/signed/<study>/``; the ``sign`` decision is appended to the journal (it names the outbox
job); the job's outbox is opened (:class:`analysis.node.spool.Outbox` under ``review/outbox/``) and
delivered by the node's :func:`analysis.node.deliver.deliver_due` (retries, ``undelivered/``,
``--resend``). :func:`recover` opens the outbox of a ``sign`` whose job is nowhere (a kill between
the last two steps).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from analysis.node.spool import Outbox, job_id
from analysis.prediction.folder import DICOM_SEG, REVIEW
from analysis.review.growing import GROW_HU, GROW_RADIUS_MM, decode_voxels
from analysis.review.journal import Entry, lesion_states
from analysis.review.store import Study, Volume

log = logging.getLogger(__name__)

__all__ = ["DESCRIPTION", "SEG_SERIES_NUMBER", "SR_SERIES_NUMBER", "GROWING", "final_lesions", "review_seed",
           "write_final", "outbox_of", "signed_folder", "open_outbox", "recover"]

DESCRIPTION = "bonemets reviewed"
SEG_SERIES_NUMBER = 9920
SR_SERIES_NUMBER = 9921
#: The algorithm of an added lesion's segment (:mod:`analysis.review.growing`).
GROWING = ("bonemets review region growing", f"HU>={GROW_HU:g} within {GROW_RADIUS_MM:g} mm, 26-connected")
SEG_FILE, SR_FILE = "seg.dcm", "sr.dcm"


def outbox_of(root: Path) -> Outbox:
    """The outbox of a review root's signed studies (``review/outbox/``)."""
    return Outbox(Path(root) / REVIEW / "outbox")


def signed_folder(root: Path, study_uid: str) -> Path:
    """``review/signed/<study>/``: the final objects of a signed study."""
    return Path(root) / REVIEW / "signed" / study_uid


def added_voxels(entries: list[Entry]) -> dict[int, np.ndarray]:
    """Flat voxel indices of every lesion a reader added, by lesion id."""
    return {e.decision.lesion_id: decode_voxels(e.detail["voxels"]) for e in entries
            if e.decision.decision == "add"}


def final_lesions(volume: Volume, entries: list[Entry]) -> tuple[list[int], np.ndarray, list[dict[str, Any]]]:
    """What a signature keeps: ``(lesion ids, segments, rows)``.

    Returns:
        The accepted and added lesion ids, ascending; their segment numbers ``(slices, rows, cols)``
        uint16 (segment i is lesion ``ids[i - 1]``); and their report rows (``lesion_id``,
        ``volume_ml``, ``hu_mean``, ``hu_max``, ``bone``, ``weight_bearing``, ...).
    """
    from analysis.prediction.tables import lesion_rows

    states = lesion_states(entries)
    added = added_voxels(entries)
    ids = sorted(lid for lid, e in states.items() if e.decision.decision in ("accept", "add"))
    segments = np.zeros(volume.labels.shape, np.uint16)
    by_id = {int(r["lesion_id"]): r for r in volume.rows}
    rows = []
    for number, lid in enumerate(ids, 1):
        if lid in added:
            single = np.zeros(volume.labels.shape, np.uint8)
            single.flat[added[lid]] = 1
            segments.flat[added[lid]] = number
            (row,) = lesion_rows(volume.study.case, single, volume.ct, volume.geometry,
                                 labels=(single.astype(np.int32), 1))
            rows.append({**row, "lesion_id": lid})
        else:
            segments[volume.labels == lid] = number
            rows.append(by_id[lid])
    return ids, segments, rows


def review_seed(study: Study, ids: list[int], entries: list[Entry], reader: str) -> str:
    """The UID seed of a signature: the preliminary object's UID and a digest of what is signed."""
    base = study.seg_uid or study.sr_uid or f"{study.series_uid}|{study.model_fingerprint}"
    added = {str(k): v.detail["voxels"] for k, v in lesion_states(entries).items() if v.decision.decision == "add"}
    digest = hashlib.sha256(json.dumps({"kept": ids, "added": added, "reader": reader},
                                       sort_keys=True).encode("utf-8")).hexdigest()[:32]
    return f"{base}|review|{digest}"


def _tracking_uids(pred: Path, case: str) -> dict[int, str]:
    """The preliminary SEG's TrackingUID of each lesion ("lesion N"), or {} without one."""
    from analysis.imaging.dicom_seg import segment_tracking_uids

    path = pred / DICOM_SEG / f"{case}.dcm"
    return segment_tracking_uids(path) if path.is_file() else {}


def write_final(volume: Volume, entries: list[Entry], reader: str, pred: Path, out: Path) -> dict[str, Any]:
    """Write the final SEG (when a lesion is kept) and the verified report into ``out``, each read back.

    Returns:
        ``{"lesions": ids, "seg": SOPInstanceUID or None, "sr": SOPInstanceUID, "files": [names in out]}``.

    Raises:
        InputError: the writers' refusals (source files changed, a read-back that differs).
    """
    from analysis.imaging.dicom_seg import write_dicom_seg
    from analysis.imaging.dicom_sr import write_measurement_report
    from analysis.prediction.tables import lesion_sections

    study = volume.study
    ids, segments, rows = final_lesions(volume, entries)
    # each kept lesion drawn on its largest cross-section, as in the model's report
    anchors = dict(zip(ids, lesion_sections((segments, len(ids)), volume.geometry))) if ids else {}
    seed = review_seed(study, ids, entries, reader)
    added = {e.decision.lesion_id for e in entries if e.decision.decision == "add"}
    seg = {"written": False}
    if ids:
        seg = write_dicom_seg((segments > 0).astype(np.uint8), volume.series, out / SEG_FILE,
                              model_name=study.model_name, model_version=study.model_fingerprint,
                              series_number=SEG_SERIES_NUMBER, series_description=DESCRIPTION, labels=segments,
                              uid_seed=seed, lesion_ids=ids, tracking_uids=_tracking_uids(pred, study.case),
                              semiautomatic={lid: GROWING for lid in ids if lid in added})
    sr = write_measurement_report(volume.series, out / SR_FILE, lesions=rows, anchors=anchors,
                                  seg_path=seg["path"] if seg["written"] else None, model_name=study.model_name,
                                  model_version=study.model_fingerprint, uid_seed=seed,
                                  series_number=SR_SERIES_NUMBER, series_description=f"{DESCRIPTION} report",
                                  verifying_observer=reader)
    files = ([SEG_FILE] if seg["written"] else []) + [SR_FILE]
    log.info("study %s: signed by %s, %d lesion(s) kept", study.uid, reader, len(ids))
    return {"lesions": ids, "seg": seg.get("sop_instance_uid"), "sr": sr["sop_instance_uid"], "files": files}


def new_job(study: Study) -> str:
    """An outbox job name, ``<SeriesInstanceUID>-<nanoseconds>`` as the node's (:func:`analysis.node.spool.job_id`)."""
    return job_id(study.series_uid)


def open_outbox(root: Path, study_uid: str, job: str, files: list[str]) -> None:
    """Put the signed files (names in :func:`signed_folder`) into job ``job`` of the root's outbox
    (once: nothing when the job exists)."""
    outbox = outbox_of(root)
    if outbox.where(job) is None:
        outbox.open_outbox(job, [signed_folder(root, study_uid) / f for f in files])


def recover(root: Path, journal_studies: dict[str, list[Entry]]) -> list[str]:
    """Open the outbox of every signature whose job is nowhere (a kill after the journal's ``sign``).

    Args:
        root: the review root.
        journal_studies: each study's journal entries.

    Returns:
        The jobs opened. A signed study whose files are gone is logged (sign it again by hand).
    """
    outbox = outbox_of(root)
    opened = []
    for uid, entries in journal_studies.items():
        # a viewer's review (analysis.review.viewer) delivers nothing: its SEG is in the study already
        sign = next((e for e in entries if e.decision.decision == "sign" and e.decision.source == "page"), None)
        if sign is None or outbox.where(sign.detail["job"]) is not None:
            continue
        files = [signed_folder(root, uid) / f for f in sign.detail["files"]]
        missing = [f for f in files if not f.is_file()]
        if missing:
            log.error("%s: the signed result of study %s is gone and was not sent", missing[0], uid)
            continue
        outbox.open_outbox(sign.detail["job"], files)
        opened.append(sign.detail["job"])
        log.warning("study %s: the outbox of its signature was not open (a kill); opened it", uid)
    return opened
