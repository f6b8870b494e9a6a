"""The node's spool: a journal on disk in which every step is one atomic rename, so a node
killed at any moment (SIGKILL included) and started again with the same folder processes each
complete series once and delivers each result once.

Layout of ``SPOOL/``::

    incoming/<study>/<series>/<sop>.dcm   instances as received (each written atomically)
    jobs/<job>.input/                     a complete series, claimed (renamed from incoming)
    jobs/<job>.pred/                      its prediction folder (predict resumes a killed run)
    jobs/<job>.outbox/                    results to deliver (appears whole: renamed from .tmp)
    jobs/<job>.outbox/sent/               results delivered (moved there after each success)
    jobs/<job>.outbox/delivery.json       attempts, next attempt time, last error
    jobs/<job>.outbox/model.json          the model that made the results (name, fingerprint, source)
    done/<job>/                           delivered results (the series' input is removed)
    failed/<job>/                         a series that could not be predicted + reason.txt
    undelivered/<job>/                    results whose delivery gave up + delivery.json

``<job>`` is ``<SeriesInstanceUID>-<nanoseconds>``: a series sent again after it was claimed
is a new job. A result delivered just before a kill, but not yet moved to ``sent/``, is sent
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

INCOMING, JOBS, DONE, FAILED, UNDELIVERED = "incoming", "jobs", "done", "failed", "undelivered"
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


class Spool:
    """The spool folder (module docstring)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        for name in (INCOMING, JOBS, DONE, FAILED, UNDELIVERED):
            (self.root / name).mkdir(parents=True, exist_ok=True)

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

    def job_path(self, job: str, part: str) -> Path:
        """``jobs/<job>.<part>``, ``part`` one of :data:`INPUT`, :data:`PRED`, :data:`OUTBOX`, :data:`OUTBOX_TMP`."""
        return self.root / JOBS / f"{job}.{part}"

    def jobs(self, part: str) -> list[str]:
        """Jobs that have ``jobs/<job>.<part>`` (:data:`INPUT`, :data:`OUTBOX`), oldest first."""
        names = [p.name[: -len(part) - 1] for p in (self.root / JOBS).iterdir() if p.name.endswith(f".{part}")]
        return sorted(names, key=lambda n: parse_job(n)[1])

    def to_predict(self) -> list[str]:
        """Claimed jobs whose results are not yet in an outbox (a kill during prediction included)."""
        return [j for j in self.jobs(INPUT) if not self.job_path(j, OUTBOX).exists()]

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

    def pending(self, job: str) -> list[Path]:
        """Results of ``job`` not yet delivered."""
        return sorted(p for p in self.job_path(job, OUTBOX).glob("*.dcm"))

    def mark_sent(self, path: Path) -> None:
        os.replace(path, path.parent / SENT / path.name)

    def delivery(self, job: str) -> dict:
        return read_json(self.job_path(job, OUTBOX) / DELIVERY, what="delivery record")

    def set_delivery(self, job: str, record: dict) -> None:
        atomic_write_json(self.job_path(job, OUTBOX) / DELIVERY, record)

    def _drop_work(self, job: str) -> None:
        for part in (INPUT, PRED, OUTBOX_TMP):
            shutil.rmtree(self.job_path(job, part), ignore_errors=True)

    def finish(self, job: str) -> Path:
        """All results delivered: the outbox becomes ``done/<job>``, the input goes."""
        target = self.root / DONE / job
        os.rename(self.job_path(job, OUTBOX), target)
        self._drop_work(job)
        return target

    def give_up(self, job: str) -> Path:
        """Delivery gave up: the outbox becomes ``undelivered/<job>`` (``serve --resend``)."""
        target = self.root / UNDELIVERED / job
        os.rename(self.job_path(job, OUTBOX), target)
        self._drop_work(job)
        return target

    def fail(self, job: str, reason: str) -> Path:
        """The series could not be predicted: its input becomes ``failed/<job>`` with ``reason.txt``."""
        target = self.root / FAILED / job
        os.rename(self.job_path(job, INPUT), target)
        atomic_write_text(target / REASON, reason.rstrip("\n") + "\n")
        self._drop_work(job)
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

    def is_empty(self) -> bool:
        """Nothing received, claimed or waiting for delivery."""
        return not any((self.root / INCOMING).iterdir()) and not any(
            p.name.endswith((f".{INPUT}", f".{OUTBOX}")) for p in (self.root / JOBS).iterdir())
