"""The review journal: every decision a reader makes, written when it is made.

Under a review root (a spool, or a PRED folder ``PRED/<model>/``):

* ``review/<StudyInstanceUID>.jsonl``: the study's journal, one JSON object a line, append-only:
  the :class:`Decision` fields and a ``detail`` object (an added lesion's click and voxels, a
  signature's results). It is the record of the study's review: replaying it gives each lesion's
  decision and whether the study is signed.
* ``reviews.csv``: the same decisions of every study, one row each, columns :data:`COLUMNS`.

Each append is flushed and ``fsync``'d before the request that made it is answered, so a server
killed at any moment (SIGKILL included) keeps every decision a reader saw accepted. A line cut
off by a kill (no final newline) was never acknowledged: readers skip it and the next append
removes it first. The study's journal is written before ``reviews.csv``; :meth:`Journal.reconcile`
appends the rows a kill left out (a study's rows are always a prefix of its journal lines).

Two servers (or the node, which writes ``viewer`` rows) may append to one root: a study's journal
is appended under an exclusive ``flock`` on it, ``reviews.csv`` under one on itself.

The decision record is declared once, :class:`Decision`; :data:`COLUMNS` are its field names.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import logging
import os
import re
import threading
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

from analysis.prediction.folder import REVIEW, REVIEWS_CSV

log = logging.getLogger(__name__)

__all__ = ["Decision", "Entry", "COLUMNS", "REASONS", "DECISIONS", "SOURCES", "Journal", "StudyLog", "now",
           "lesion_states", "signature", "valid_uid"]

#: Why a reader rejects a lesion (the page's ``select name="reason"`` offers exactly these).
REASONS: tuple[str, ...] = ("bone island", "degenerative change", "fracture or callus", "artefact", "normal bone",
                            "other")
#: ``accept`` / ``reject`` a lesion, ``add`` one the model missed (it counts as accepted), ``sign`` the study.
DECISIONS: tuple[str, ...] = ("accept", "reject", "add", "sign")
#: Where a decision was made: the review page, or a viewer (written by the node, issue #35).
SOURCES: tuple[str, ...] = ("page", "viewer")
#: Longest note kept (characters).
NOTE_MAX = 1000
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def valid_uid(text: str) -> bool:
    """Whether ``text`` is a DICOM UID (digits in dot-separated components, at most 64 characters;
    DICOM PS3.5 9.1), so it can name a file.

    >>> valid_uid("1.2.840.10008"), valid_uid("../etc"), valid_uid("1..2")
    (True, False, False)
    """
    return isinstance(text, str) and len(text) <= 64 and bool(_UID.match(text))


def now() -> str:
    """The current time, UTC, ISO 8601 with milliseconds (the ``time`` column)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Decision:
    """One decision: a row of ``reviews.csv`` and the head of a journal line.

    Attributes:
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID of the CT series the lesions were predicted on.
        lesion_id: the lesion (``lesion_id`` of ``lesions.csv``; added lesions are numbered after
            the predicted ones); None for ``sign``.
        decision: one of :data:`DECISIONS`.
        reason: for ``reject``, one of :data:`REASONS`; else None.
        note: the reader's note (one line, at most :data:`NOTE_MAX` characters; may be empty).
        reader: the signed-in reader's name.
        time: when it was made (:func:`now`).
        model_fingerprint: the fingerprint of the model that predicted the lesions.
        source: one of :data:`SOURCES`.
    """

    study_uid: str
    series_uid: str
    lesion_id: int | None
    decision: str
    reason: str | None
    note: str
    reader: str
    time: str
    model_fingerprint: str
    source: str = "page"

    def __post_init__(self) -> None:
        if not valid_uid(self.study_uid) or not valid_uid(self.series_uid):
            raise ValueError(f"decision: study {self.study_uid!r} / series {self.series_uid!r} is not a DICOM UID")
        if self.decision not in DECISIONS:
            raise ValueError(f"decision {self.decision!r}: expected one of {', '.join(DECISIONS)}")
        if (self.lesion_id is None) != (self.decision == "sign"):
            raise ValueError(f"decision {self.decision}: lesion id {self.lesion_id!r}")
        if self.decision == "reject" and self.reason not in REASONS:
            raise ValueError(f"reject: reason {self.reason!r}; expected one of {', '.join(REASONS)}")
        if self.decision != "reject" and self.reason is not None:
            raise ValueError(f"{self.decision}: a reason is for a rejection only")
        if self.source not in SOURCES:
            raise ValueError(f"source {self.source!r}: expected one of {', '.join(SOURCES)}")
        if "\n" in self.note or "\r" in self.note or len(self.note) > NOTE_MAX:
            raise ValueError(f"note: expected one line of at most {NOTE_MAX} characters")

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "Decision":
        return cls(**{name: obj.get(name) for name in COLUMNS})


#: The columns of ``reviews.csv``: :class:`Decision`'s fields, in order.
COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Decision))


@dataclass(frozen=True)
class Entry:
    """One journal line: a decision and what else it needs (an added lesion's voxels, ...)."""

    decision: Decision
    detail: dict[str, Any] = field(default_factory=dict)

    def to_line(self) -> str:
        return json.dumps({**asdict(self.decision), "detail": self.detail}, sort_keys=False,
                          separators=(",", ":")) + "\n"


def lesion_states(entries: list[Entry]) -> dict[int, Entry]:
    """Each lesion's latest decision (``accept``, ``reject`` or ``add``), by lesion id."""
    out: dict[int, Entry] = {}
    for entry in entries:
        if entry.decision.lesion_id is not None:
            out[entry.decision.lesion_id] = entry
    return out


def signature(entries: list[Entry]) -> Entry | None:
    """The study's ``sign`` entry (the first; the page never writes a second: a viewer's later edits
    of the study add theirs, :mod:`analysis.review.viewer`), or None."""
    return next((e for e in entries if e.decision.decision == "sign"), None)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_torn_tail(fh) -> None:
    """Cut a last line without its newline (a write cut off by a kill) from a file open for reading and writing."""
    size = os.fstat(fh.fileno()).st_size
    if size == 0:
        return
    fh.seek(size - 1)
    if fh.read(1) == b"\n":
        return
    fh.seek(0)
    data = fh.read()
    keep = data.rfind(b"\n") + 1
    fh.truncate(keep)
    log.warning("%s: dropped an unfinished last line (%d bytes) left by a kill", fh.name, len(data) - keep)


def _append(path: Path, text: str) -> None:
    """Append ``text`` to ``path`` (created with the umask's mode) under an exclusive flock, fsync'd."""
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    with os.fdopen(fd, "r+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            _drop_torn_tail(fh)
            fh.seek(0, os.SEEK_END)
            fh.write(text.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    if created:
        _fsync_dir(path.parent)


def _csv_rows(entries: list[Entry], header: bool) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header:
        writer.writerow(COLUMNS)
    for entry in entries:
        d = asdict(entry.decision)
        writer.writerow(["" if d[c] is None else d[c] for c in COLUMNS])
    return buf.getvalue()


def _complete_lines(path: Path) -> list[str]:
    """The lines of ``path`` that end with a newline (a cut-off last line is not one)."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    return text.split("\n")[:-1]


class StudyLog:
    """One study's journal, held under its lock (:meth:`Journal.study`): read, check, append."""

    def __init__(self, journal: "Journal", study_uid: str, entries: list[Entry]) -> None:
        self.journal = journal
        self.study_uid = study_uid
        self.entries = entries

    def append(self, decision: Decision, detail: Mapping[str, Any] | None = None) -> Entry:
        """Write one decision to the study's journal, then to ``reviews.csv``, each fsync'd."""
        if decision.study_uid != self.study_uid:
            raise ValueError(f"decision of study {decision.study_uid} written to the journal of {self.study_uid}")
        entry = Entry(decision, dict(detail or {}))
        _append(self.journal.path(self.study_uid), entry.to_line())
        self.entries.append(entry)
        self.journal.add_rows([entry])
        return entry


class Journal:
    """The decisions under one review root (module docstring).

    Args:
        root: the spool, or a PRED folder ``PRED/<model>/``.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.folder = self.root / REVIEW
        self.csv = self.root / REVIEWS_CSV
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def path(self, study_uid: str) -> Path:
        """``review/<StudyInstanceUID>.jsonl``.

        Raises:
            ValueError: ``study_uid`` is not a DICOM UID (it could name a file elsewhere).
        """
        if not valid_uid(study_uid):
            raise ValueError(f"StudyInstanceUID {study_uid!r} is not a DICOM UID")
        return self.folder / f"{study_uid}.jsonl"

    def read(self, study_uid: str) -> list[Entry]:
        """The study's journal (complete lines only), oldest first."""
        out = []
        path = self.path(study_uid)
        for n, line in enumerate(_complete_lines(path), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                out.append(Entry(Decision.from_json(obj), obj.get("detail") or {}))
            except (json.JSONDecodeError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}: line {n} is not a decision record ({exc})") from None
        return out

    @contextlib.contextmanager
    def study(self, study_uid: str) -> Iterator[StudyLog]:
        """Hold the study's journal exclusively (threads of this process and other processes)
        and yield it read, so that a check and the append it allows are one step."""
        self.path(study_uid)  # refuses a name that is not a UID
        with self._guard:
            lock = self._locks.setdefault(study_uid, threading.Lock())
        with lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / f".{study_uid}.lock", os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield StudyLog(self, study_uid, self.read(study_uid))
            finally:
                os.close(fd)  # releases the flock

    def append(self, decision: Decision, detail: Mapping[str, Any] | None = None) -> Entry:
        """Write one decision (its study's journal, then ``reviews.csv``), fsync'd: for writers
        with nothing to check first, e.g. the node's ``viewer`` rows."""
        with self.study(decision.study_uid) as study:
            return study.append(decision, detail)

    def add_rows(self, entries: list[Entry]) -> None:
        """Append ``entries`` to ``reviews.csv`` (with its header when new), fsync'd."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.csv, os.O_RDWR | os.O_CREAT, 0o666)
        with os.fdopen(fd, "r+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                _drop_torn_tail(fh)
                end = fh.seek(0, os.SEEK_END)
                fh.write(_csv_rows(entries, header=end == 0).encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def studies(self) -> list[str]:
        """StudyInstanceUIDs that have a journal."""
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob("*.jsonl") if valid_uid(p.stem))

    def rows(self) -> list[dict[str, str]]:
        """``reviews.csv`` as read back (complete rows), or [] when there is none."""
        if not self.csv.is_file():
            return []
        lines = _complete_lines(self.csv)
        return list(csv.DictReader(io.StringIO("\n".join(lines) + "\n"))) if lines else []

    def reconcile(self) -> int:
        """Append to ``reviews.csv`` the journal lines a kill left out of it; returns how many."""
        added = 0
        for study_uid in self.studies():
            with self.study(study_uid) as study:  # counted under the lock: another writer may append meanwhile
                written = sum(row["study_uid"] == study_uid for row in self.rows())
                missing = study.entries[written:]
                if missing:
                    self.add_rows(missing)
                    added += len(missing)
        if added:
            log.warning("%s: %d decision(s) of the study journals were missing and were added", self.csv, added)
        return added
