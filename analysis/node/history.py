"""A new series in the light of the patient's history: the node's step between prediction and delivery.

With ``--priors N`` > 0, once a CT series is predicted the node

1. keeps it in its archive (:class:`analysis.node.priors.Archive`) for later timelines (per patient the
   N + 1 newest studies: older ones can no longer enter a timeline of N priors);
2. finds the patient's earlier CT studies (:func:`analysis.node.priors.find_priors`: its archive first,
   then the PACS, newest first, at most N);
3. with at least one prior, builds the timeline of the priors and the new series
   (:func:`analysis.monitoring.timeline.run_timeline`, the same as ``python cli.py timeline``) into the
   archive entry of the new series (``.../timeline/``), with the TID 1500 report of the new study and
   its SEG, which the node then delivers in place of predict's.

Nothing here holds up or loses the new result: any failure (no StudyDate, a prior that cannot be had,
scans that do not align) is one log line and the node delivers predict's SEG and report as without
priors.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from analysis.errors import DataProblems, InputError
from analysis.prediction.folder import DICOM_SEG
from analysis.node.priors import Archive, PacsClient, PatientKey, Predict, find_priors, series_header

log = logging.getLogger(__name__)

__all__ = ["timeline_report", "TIMELINE", "mask_in"]

TIMELINE = "timeline"


def mask_in(pred: Path) -> Path:
    """The one lesion mask of a PRED folder written for one series (``<case>.nii.gz`` at its top).

    Raises:
        InputError: none or several.
    """
    masks = sorted(pred.glob("*.nii.gz"))
    if len(masks) != 1:
        raise InputError(f"{pred}: {len(masks)} masks; expected the one mask of its series")
    return masks[0]


def timeline_report(spool: Path, job: str, series_dir: Path, pred_dir: Path, *, destination: Any, calling_ae: str,
                    limit: int, predict: Predict) -> list[Path]:
    """Archive the new series and, with priors, build its timeline (module docstring).

    Args:
        spool: the node's spool folder (the archive and a work folder live in it).
        job: the job's name (its work folder).
        series_dir, pred_dir: the new series and its PRED folder.
        destination: the PACS (:class:`analysis.node.deliver.Destination`) to query and retrieve from.
        calling_ae: the node's AE title.
        limit: ``--priors``.
        predict: the node's prediction of one series (for priors retrieved from the PACS).

    Returns:
        The DICOM files to deliver instead of predict's SEG and report (the timeline's SEG and TID 1500
        report of the new study); empty: deliver predict's.
    """
    try:
        header = series_header(series_dir)
    except (ValueError, OSError) as exc:
        log.warning("series %s: no timeline (%s)", series_dir.name, exc)
        return []
    if not header["patient_id"]:
        log.info("series %s: no PatientID; no timeline", header["series_uid"])
        return []
    archive = Archive(spool)
    key = PatientKey(header["patient_id"], header["issuer"])
    stored = archive.add(key, header, series_dir, pred_dir)
    work = spool / "priors-work" / job
    try:
        priors = find_priors(header, archive, PacsClient(destination, calling_ae=calling_ae), limit=limit,
                             predict=predict, work=work)
        if not priors:
            return []
        return _build(stored, priors, header)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        archive.prune(key, keep=limit + 1)


def _lesion_uids(pred: Path) -> dict[int, str] | None:
    """The TrackingUID of each lesion's segment in the SEG predict wrote into a PRED folder."""
    from analysis.imaging.dicom_seg import segment_tracking_uids

    segs = sorted((pred / DICOM_SEG).glob("*.dcm"))
    return segment_tracking_uids(segs[0]) if len(segs) == 1 else None


def _build(stored: Path, priors: list, header: dict[str, Any]) -> list[Path]:
    from analysis.monitoring.timeline import run_timeline

    out = stored / TIMELINE
    try:
        preds = [p.pred for p in priors] + [stored / "pred"]
        cts = [str(p.ct) for p in priors] + [str(stored / "ct")]
        # every series was predicted by this node (predict's CT check as serve was told: --no-ct-check or not)
        run_timeline(cts, out, masks=[str(mask_in(p)) for p in preds], overwrite=True, sr=True,
                     lesion_uids=[_lesion_uids(p) for p in preds], ct_check=False)
    except (InputError, DataProblems, OSError, ValueError, KeyError) as exc:
        log.warning("series %s: timeline with %d prior(s) not built (%s); delivering predict's results",
                    header["series_uid"], len(priors), str(exc)[:300])
        return []
    log.info("series %s: timeline of %d scans in %s", header["series_uid"], len(priors) + 1, out)
    return sorted((out / "dicom").glob(f"t{len(priors)}_*.dcm")) if (out / "dicom").is_dir() else []
