"""The node's spool: a journal on disk in which every step is one atomic rename, so a node
killed at any moment (SIGKILL included) and started again with the same folder processes each
complete series once and delivers each result once.

Layout of ``SPOOL/``::

    incoming/<study>/<series>/<sop>.dcm   instances as received (each written atomically)
    viewer/<sop>.dcm                      SEGs received (a viewer's edit: analysis.review.viewer), until read
    jobs/<job>.input/                     a complete series, claimed (renamed from incoming)
    jobs/<job>.pred/                      its prediction folder (predict resumes a killed run)
    jobs/<job>.outbox/                    results to deliver (appears whole: renamed from .tmp)
    jobs/<job>.outbox/sent/               results delivered (moved there after each success)
    jobs/<job>.outbox/delivery.json       attempts, next attempt time, last error
    jobs/<job>.outbox/model.json          the model that made the results (name, fingerprint, source)
    jobs/<job>.outbox/input/, pred/       the series and its prediction, moved in once the outbox is open
    done/<job>/                           delivered results, with input/ and pred/ (kept for ``review``)
    failed/<job>/                         a series that could not be predicted + reason.txt
    undelivered/<job>/                    results whose delivery gave up + delivery.json, input/, pred/

``<job>`` is ``<SeriesInstanceUID>-<nanoseconds>``: a series sent again after it was claimed
is a new job. The series and its prediction stay with the job's results (``done/<job>/input``,
``pred/``) so that a reader can review them (``python cli.py review --spool``); removing
``done/<job>`` folders of reviewed studies is the site's retention policy.

:class:`Outbox` is the delivery half of the journal (``jobs/<job>.outbox``, ``done/``,
``undelivered/``, ``--resend``) on its own, for results made elsewhere: the reader's signed
review (:mod:`analysis.review.signing`) goes through one. A result delivered just before a kill, but not yet moved to ``sent/``, is sent
once more after the restart; its UIDs are those of the first send (derived from the source
series and the model, :func:`analysis.imaging.dicom_seg.result_uid`), so the PACS keeps one.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from pathlib import Path

from analysis.imaging.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json

log = logging.getLogger(__name__)

INCOMING, JOBS, DONE, FAILED, UNDELIVERED, VIEWER = "incoming", "jobs", "done", "failed", "undelivered", "viewer"
SENT = "sent"
DELIVERY = "delivery.json"
REASON = "reason.txt"
_UID = re.compile(r"^[0-9.]{1,64}$")
#: The parts of a job in ``jobs/``: ``<job>.input``, ``<job>.pred``, ``<job>.outbox`` (and its ``.tmp``).
INPUT, PRED, OUTBOX, OUTBOX_TMP = "input", "pred", "outbox", "outbox.tmp"


def job_id(series_uid: str, ns: int | None = None) -> str:
    """A new job's id, ``<SeriesInstanceUID>-<nanoseconds>`` (the time of the claim by default).

    Examples:
        >>> job_id("1.2.3", 42), parse_job("1.2.3-42")
        ('1.2.3-42', ('1.2.3', 42))
    """
    return f"{series_uid}-{time.time_ns() if ns is None else ns}"


def parse_job(job: str) -> tuple[str, int]:
    """``(SeriesInstanceUID, nanoseconds)`` of a job id (:func:`job_id`)."""
    series, _, ns = job.rpartition("-")
    return series, int(ns)


def safe_uid(uid: str, what: str) -> str:
    """``uid`` when it is a DICOM UID (digits and dots, at most 64), usable as a folder name.

    Raises:
        ValueError: anything else (a name that could leave the spool, e.g. ``../x``).
    """
    uid = str(uid).strip().rstrip("\0")
    if not _UID.match(uid) or ".." in uid:
        raise ValueError(f"{what} {uid!r} is not a DICOM UID")
    return uid


class Outbox:
    """Results waiting for delivery and delivered: ``jobs/<job>.outbox``, ``done/<job>``,
    ``undelivered/<job>`` under ``root`` (module docstring). Each step is one rename."""

    PARTS: tuple[str, ...] = (JOBS, DONE, UNDELIVERED)

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        for name in self.PARTS:
            (self.root / name).mkdir(parents=True, exist_ok=True)

    def job_path(self, job: str, part: str) -> Path:
        """``jobs/<job>.<part>``, ``part`` one of :data:`INPUT`, :data:`PRED`, :data:`OUTBOX`, :data:`OUTBOX_TMP`."""
        return self.root / JOBS / f"{job}.{part}"

    def jobs(self, part: str) -> list[str]:
        """Jobs that have ``jobs/<job>.<part>`` (:data:`INPUT`, :data:`OUTBOX`), oldest first."""
        names = [p.name[: -len(part) - 1] for p in (self.root / JOBS).iterdir() if p.name.endswith(f".{part}")]
        return sorted(names, key=lambda n: parse_job(n)[1])

    def open_outbox(self, job: str, results: list[Path], *, record: dict[str, dict] | None = None) -> Path:
        """Copy ``results`` into ``jobs/<job>.outbox`` (appears whole, one rename), with the JSON
        files ``record`` names (e.g. ``model.json``) beside them."""
        final = self.job_path(job, OUTBOX)
        tmp = self.job_path(job, OUTBOX_TMP)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / SENT).mkdir(parents=True)
        for path in results:  # dicom_seg/<case>.dcm, sr/<case>.dcm: one name each
            shutil.copy2(path, tmp / f"{path.parent.name}-{path.name}")
        for name, content in (record or {}).items():
            atomic_write_json(tmp / name, content)
        atomic_write_json(tmp / DELIVERY, {"attempts": 0, "next_at": 0.0, "last_error": None})
        os.rename(tmp, final)
        return final

    def where(self, job: str) -> Path | None:
        """The folder holding ``job``'s results now (its outbox, ``done/`` or ``undelivered/``), or None."""
        for path in (self.job_path(job, OUTBOX), self.root / DONE / job, self.root / UNDELIVERED / job):
            if path.is_dir():
                return path
        return None

    def pending(self, job: str) -> list[Path]:
        """Results of ``job`` not yet delivered."""
        return sorted(p for p in self.job_path(job, OUTBOX).glob("*.dcm"))

    def mark_sent(self, path: Path) -> None:
        os.replace(path, path.parent / SENT / path.name)

    def delivery(self, job: str) -> dict:
        return read_json(self.job_path(job, OUTBOX) / DELIVERY, what="delivery record")

    def set_delivery(self, job: str, record: dict) -> None:
        atomic_write_json(self.job_path(job, OUTBOX) / DELIVERY, record)

    def _settle(self, job: str) -> None:
        """What happens to a job's other folders when its outbox closes (nothing here)."""

    def finish(self, job: str) -> Path:
        """All results delivered: the outbox becomes ``done/<job>``."""
        self._settle(job)
        target = self.root / DONE / job
        os.rename(self.job_path(job, OUTBOX), target)
        return target

    def give_up(self, job: str) -> Path:
        """Delivery gave up: the outbox becomes ``undelivered/<job>`` (``--resend``)."""
        self._settle(job)
        target = self.root / UNDELIVERED / job
        os.rename(self.job_path(job, OUTBOX), target)
        return target

    def resend(self) -> list[str]:
        """Move every undelivered result back to its outbox with a fresh attempt count."""
        jobs = []
        for folder in sorted((self.root / UNDELIVERED).iterdir()):
            if not folder.is_dir():
                continue
            atomic_write_json(folder / DELIVERY, {"attempts": 0, "next_at": 0.0, "last_error": None})
            (folder / SENT).mkdir(exist_ok=True)
            os.rename(folder, self.job_path(folder.name, OUTBOX))
            jobs.append(folder.name)
        return jobs


class Spool(Outbox):
    """The spool folder (module docstring)."""

    PARTS = (INCOMING, JOBS, DONE, FAILED, UNDELIVERED, VIEWER)

    def free_gb(self) -> float:
        """Free space (GB, 1e9 bytes) on the spool's disk."""
        return shutil.disk_usage(self.root).free / 1e9

    # --- reception ------------------------------------------------------------------------

    def store(self, study: str, series: str, sop: str, data: bytes) -> Path:
        """Write one received instance atomically to ``incoming/<study>/<series>/<sop>.dcm``."""
        folder = self.root / INCOMING / safe_uid(study, "StudyInstanceUID") / safe_uid(series, "SeriesInstanceUID")
        path = folder / f"{safe_uid(sop, 'SOPInstanceUID')}.dcm"
        for _ in range(3):  # the series folder may be claimed (renamed) while we write: write again
            try:
                return atomic_write_bytes(path, data)  # the rename also moves the folder's mtime: its idle clock
            except FileNotFoundError:
                continue
        raise OSError(f"{path}: the series folder kept moving while the instance was written")

    def store_viewer(self, sop: str, data: bytes) -> Path:
        """Write a received SEG atomically to ``viewer/<sop>.dcm``."""
        return atomic_write_bytes(self.root / VIEWER / f"{safe_uid(sop, 'SOPInstanceUID')}.dcm", data)

    def viewer_segs(self) -> list[Path]:
        """Received SEGs not read yet, oldest first."""
        found = [p for p in (self.root / VIEWER).glob("*.dcm") if not p.name.startswith(".")]
        return sorted(found, key=lambda p: p.stat().st_mtime)

    def fail_viewer(self, path: Path, reason: str) -> Path:
        """A received SEG that could not be read: ``failed/viewer-<sop>/`` with ``reason.txt``."""
        target = self.root / FAILED / f"viewer-{path.stem}"
        target.mkdir(parents=True, exist_ok=True)
        os.replace(path, target / path.name)
        atomic_write_text(target / REASON, reason.rstrip("\n") + "\n")
        return target

    def predicting(self, series_uid: str) -> bool:
        """Whether series ``series_uid`` is still being received or predicted (not in an outbox yet)."""
        if any((study / series_uid).is_dir() for study in (self.root / INCOMING).iterdir()):
            return True
        return any(parse_job(j)[0] == series_uid for j in self.to_predict())

    def complete_series(self, idle_seconds: float, since: float, now: float | None = None) -> list[Path]:
        """Incoming series folders without a new instance for ``idle_seconds``, counted from
        ``since`` at the earliest (the node's start: a series half received before a restart waits
        for the rest), oldest first."""
        now = time.time() if now is None else now
        found = []
        for study in sorted((self.root / INCOMING).iterdir()):
            for series in sorted(p for p in study.iterdir() if p.is_dir()) if study.is_dir() else []:
                last = max(series.stat().st_mtime, since)
                if now - last >= idle_seconds and any(p.suffix == ".dcm" and not p.name.startswith(".")
                                                      for p in series.iterdir()):
                    found.append((last, series))
        return [p for _, p in sorted(found)]

    def claim(self, series_dir: Path) -> str:
        """Move a complete series into ``jobs/<job>.input`` (one rename) and return ``<job>``."""
        job = job_id(series_dir.name)
        target = self.job_path(job, INPUT)
        os.rename(series_dir, target)
        for tmp in target.glob(".*.tmp"):  # an instance write cut off by a kill (atomic_file's temporary name)
            tmp.unlink()
        with contextlib.suppress(OSError):
            series_dir.parent.rmdir()  # the study folder, when it was its last series
        return job

    # --- jobs -------------------------------------------------------------------------------

    def to_predict(self) -> list[str]:
        """Claimed jobs whose results are not yet in an outbox (a kill during prediction included)."""
        return [j for j in self.jobs(INPUT) if not self.job_path(j, OUTBOX).exists()]

    def open_outbox(self, job: str, results: list[Path], *, record: dict[str, dict] | None = None) -> Path:
        """Open the job's outbox (:meth:`Outbox.open_outbox`, with ``record``'s JSON files such as
        ``model.json``), then move the series and its prediction into it (``input/``, ``pred/``),
        where they stay with the results."""
        final = super().open_outbox(job, results, record=record)
        self._settle(job)
        return final

    def _settle(self, job: str) -> None:
        """Move ``jobs/<job>.input`` and ``.pred`` into the open outbox (each one rename; a kill
        between leaves the rest for the next call) and drop a half-made ``outbox.tmp``."""
        outbox = self.job_path(job, OUTBOX)
        for part in (INPUT, PRED):
            source = self.job_path(job, part)
            if source.is_dir() and not (outbox / part).exists():
                os.rename(source, outbox / part)
            else:
                shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(self.job_path(job, OUTBOX_TMP), ignore_errors=True)

    def kept(self) -> list[tuple[str, Path, Path]]:
        """``(job, pred, input)`` of every job whose prediction is complete and kept (an open
        outbox, ``done/`` or ``undelivered/``): where its PRED folder and series folder are now,
        oldest first. They move (into the outbox, then with it): look again before each use."""
        found = []
        for job in self.jobs(OUTBOX):
            outbox = self.job_path(job, OUTBOX)
            found.append((job, *(self.job_path(job, part) if self.job_path(job, part).is_dir() else outbox / part
                                 for part in (PRED, INPUT))))
        for part in (DONE, UNDELIVERED):
            for folder in (self.root / part).iterdir():
                if folder.is_dir() and (folder / PRED).is_dir():
                    found.append((folder.name, folder / PRED, folder / INPUT))
        return sorted(found, key=lambda item: parse_job(item[0])[1])

    def fail(self, job: str, reason: str) -> Path:
        """The series could not be predicted: its input becomes ``failed/<job>`` with ``reason.txt``."""
        target = self.root / FAILED / job
        os.rename(self.job_path(job, INPUT), target)
        atomic_write_text(target / REASON, reason.rstrip("\n") + "\n")
        for part in (PRED, OUTBOX_TMP):
            shutil.rmtree(self.job_path(job, part), ignore_errors=True)
        return target

    def is_empty(self) -> bool:
        """Nothing received, claimed or waiting for delivery."""
        return not any((self.root / INCOMING).iterdir()) and not any(
            p.name.endswith((f".{INPUT}", f".{OUTBOX}")) for p in (self.root / JOBS).iterdir()) and not self.viewer_segs()
