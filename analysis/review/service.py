"""What the review does, apart from the web: studies and their lesions with decisions, a decision,
an added lesion, a signature. :mod:`analysis.review.app` puts it on HTTP; its errors carry their
HTTP status (:class:`NotFound` 404, :class:`Conflict` 409, :class:`Unprocessable` 422).

Each decision is checked and written under the study's journal lock
(:meth:`analysis.review.journal.Journal.study`), so two readers of one study see each other's
decisions and only one of them signs; the other is answered "signed by NAME at TIME".
"""
from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from analysis.errors import InputError
from analysis.imaging.orientation import Reorientation
from analysis.review import signing, views
from analysis.review.growing import GrowRefused, decode_voxels, encode_voxels, grow, point_to_index
from analysis.review.journal import (NOTE_MAX, REASONS, Decision, Entry, Journal, lesion_states, now, signature,
                                     valid_uid)
from analysis.review.store import Study, StudyStore, Volume

log = logging.getLogger(__name__)

__all__ = ["ReviewError", "NotFound", "Conflict", "Unprocessable", "ReviewService", "VIEWS"]

VIEWS = ("axial", "coronal", "sagittal")


class ReviewError(Exception):
    """A request the review refuses (one line); ``status`` is its HTTP status."""

    status = 400


class NotFound(ReviewError):
    status = 404


class Conflict(ReviewError):
    status = 409


class Unprocessable(ReviewError):
    status = 422


def _clean_note(note: Any) -> str:
    if note is None:
        return ""
    if not isinstance(note, str):
        raise Unprocessable("note: expected text")
    note = " ".join(note.split())  # one line: a CSV cell and a journal field
    if len(note) > NOTE_MAX:
        raise Unprocessable(f"note: {len(note)} characters; expected at most {NOTE_MAX}")
    return note


def _signed_text(sign: Entry) -> str:
    return f"signed by {sign.decision.reader} at {sign.decision.time}"


class ReviewService:
    """The review of the studies in ``store``'s roots.

    Args:
        store: the studies.
    """

    def __init__(self, store: StudyStore) -> None:
        self.store = store
        self.journals = {source.root: Journal(source.root) for source in store.sources}
        self._pictures: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    # --- reading --------------------------------------------------------------------------

    def journal(self, study: Study) -> Journal:
        return self.journals[study.source.root]

    def study_of(self, uid: str) -> Study:
        """The study ``uid`` (404 for anything else, a path included)."""
        study = self.store.get(uid) if valid_uid(uid) else None
        if study is None:
            raise NotFound(f"no study {uid!r} to review")
        return study

    def worklist(self) -> list[dict[str, Any]]:
        """One row per study, newest first: uid, patient id, study date, model, lesion count, state."""
        rows = []
        for study in self.store.studies():
            entries = self.journal(study).read(study.uid)
            sign = signature(entries)
            try:
                predicted = len(self.store.rows(study))
            except InputError as exc:
                log.warning("study %s: %s", study.uid, exc)
                continue
            added = sum(e.decision.decision == "add" for e in entries)
            decided = len(lesion_states(entries))
            rows.append({"uid": study.uid, "patient_id": study.patient_id, "study_date": study.study_date,
                         "model": study.model_name, "lesions": predicted + added, "decided": decided,
                         "state": _signed_text(sign) if sign else "to review",
                         "signed_by": sign.decision.reader if sign else None,
                         "signed_at": sign.decision.time if sign else None})
        return rows

    def _lesions(self, study: Study, entries: list[Entry]) -> list[dict[str, Any]]:
        states = lesion_states(entries)
        out = []
        for row in self.store.rows(study):
            out.append({"id": int(row["lesion_id"]), "added": False, **self._facts(row),
                        **self._state(states.get(int(row["lesion_id"])))})
        for e in entries:
            if e.decision.decision == "add":
                out.append({"id": e.decision.lesion_id, "added": True, **self._facts(e.detail["row"]),
                            **self._state(states.get(e.decision.lesion_id))})
        return out

    @staticmethod
    def _facts(row: Mapping[str, Any]) -> dict[str, Any]:
        return {k: row.get(k) for k in ("voxels", "volume_ml", "x_mm", "y_mm", "z_mm", "hu_mean", "hu_max", "score",
                                        "bone")}

    @staticmethod
    def _state(entry: Entry | None) -> dict[str, Any]:
        if entry is None:
            return {"decision": None, "reason": None, "note": "", "reader": None, "time": None}
        d = entry.decision
        return {"decision": "accept" if d.decision == "add" else d.decision, "reason": d.reason, "note": d.note,
                "reader": d.reader, "time": d.time}

    def study(self, uid: str, *, with_slices: bool = True) -> dict[str, Any]:
        """The study with every lesion (predicted, then added) and its latest decision."""
        study = self.study_of(uid)
        entries = self.journal(study).read(study.uid)
        sign = signature(entries)
        out = {"uid": study.uid, "series_uid": study.series_uid, "patient_id": study.patient_id,
               "study_date": study.study_date, "model": study.model_name,
               "model_fingerprint": study.model_fingerprint,
               "state": _signed_text(sign) if sign else "to review",
               "signed": None if sign is None else {"by": sign.decision.reader, "at": sign.decision.time,
                                                    "lesions": sign.detail.get("lesions"),
                                                    "seg": sign.detail.get("seg"), "sr": sign.detail.get("sr")},
               "lesions": self._lesions(study, entries), "version": len(entries)}
        if with_slices:
            reo = Reorientation.of(self._volume(study).geometry)
            out["slices"] = {"count": views.slice_count(reo), "affine": views.slice_affine(reo),
                             "start": self._start_slice(study, out["lesions"], reo)}
        return out

    def _volume(self, study: Study) -> Volume:
        try:
            return self.store.volume(study)
        except InputError as exc:
            log.error("study %s: %s", study.uid, exc)
            raise Conflict(f"study {study.uid} cannot be read: {exc}") from None

    def _start_slice(self, study: Study, lesions: list[dict[str, Any]], reo: Reorientation) -> int:
        """The canonical axial slice through the first lesion, else the middle one."""
        n = views.slice_count(reo)
        if not lesions:
            return n // 2
        volume = self._volume(study)
        first = lesions[0]
        index = point_to_index((first["x_mm"], first["y_mm"], first["z_mm"]), volume.geometry)
        k = reo.index_forward(np.asarray([index]))[0][0]
        return int(min(max(round(float(k)), 0), n - 1))

    # --- pictures -------------------------------------------------------------------------

    def _taken(self, volume: Volume, entries: list[Entry]) -> np.ndarray:
        """Lesion ids of every lesion there, the added ones painted in (a copy when there are any)."""
        added = signing.added_voxels(entries)
        if not added:
            return volume.labels
        labels = volume.labels.copy()
        for lid, voxels in added.items():
            labels.flat[voxels] = lid
        return labels

    def _cached(self, key: tuple, make) -> bytes:
        with self._lock:
            if key in self._pictures:
                self._pictures.move_to_end(key)
                return self._pictures[key]
        data = make()
        with self._lock:
            self._pictures[key] = data
            while len(self._pictures) > 256:
                self._pictures.popitem(last=False)
        return data

    def lesion_picture(self, uid: str, lesion_id: int, view: str) -> bytes:
        """A card's PNG (``view`` of :data:`VIEWS`)."""
        study = self.study_of(uid)
        if view not in VIEWS:
            raise NotFound(f"no view {view!r}; expected one of {', '.join(VIEWS)}")
        entries = self.journal(study).read(study.uid)
        lesion = next((l for l in self._lesions(study, entries) if l["id"] == lesion_id), None)
        if lesion is None:
            raise NotFound(f"study {uid} has no lesion {lesion_id}")

        def make() -> dict[str, bytes]:
            volume = self._volume(study)
            if lesion["added"]:
                flat = signing.added_voxels(entries)[lesion_id]
                labels = np.zeros(volume.labels.shape, np.int32)  # untouched pages cost nothing
                labels.flat[flat] = lesion_id
                voxels = np.stack(np.unravel_index(flat, labels.shape), axis=1)
            else:
                labels, voxels = volume.labels, volume.voxels(lesion_id)
            centroid = point_to_index((lesion["x_mm"], lesion["y_mm"], lesion["z_mm"]), volume.geometry)
            return views.lesion_views(volume.ct, labels, lesion_id, voxels, Reorientation.of(volume.geometry), centroid)

        key = ("lesion", study.uid, study.predicted, lesion_id)
        with self._lock:
            found = self._pictures.get(key + (view,))
        if found is not None:
            return found
        pictures = make()
        for name, data in pictures.items():
            self._cached(key + (name,), lambda data=data: data)
        return pictures[view]

    def slice_picture(self, uid: str, k: int) -> bytes:
        """PNG of canonical axial slice ``k`` with the lesions outlined."""
        study = self.study_of(uid)
        volume = self._volume(study)
        reo = Reorientation.of(volume.geometry)
        if not 0 <= k < views.slice_count(reo):
            raise NotFound(f"study {uid} has no slice {k}")
        entries = self.journal(study).read(study.uid)

        def make() -> bytes:
            return views.axial_slice(volume.ct, volume.labels, reo, k, signing.added_voxels(entries))

        n_added = sum(e.decision.decision == "add" for e in entries)
        return self._cached(("slice", study.uid, study.predicted, n_added, k), make)

    # --- decisions ------------------------------------------------------------------------

    def _decision(self, study: Study, lesion_id: int | None, decision: str, reader: str, *,
                  reason: str | None = None, note: str = "") -> Decision:
        return Decision(study_uid=study.uid, series_uid=study.series_uid, lesion_id=lesion_id, decision=decision,
                        reason=reason, note=note, reader=reader, time=now(), model_fingerprint=study.model_fingerprint,
                        source="page")

    @staticmethod
    def _refuse_signed(entries: list[Entry]) -> None:
        sign = signature(entries)
        if sign is not None:
            raise Conflict(f"the study is {_signed_text(sign)}")

    def decide(self, uid: str, lesion_id: int, body: Any, reader: str) -> dict[str, Any]:
        """Accept or reject one lesion: ``{"decision": "accept"|"reject", "reason": ..., "note": ...}``."""
        study = self.study_of(uid)
        if not isinstance(body, dict):
            raise Unprocessable('expected a JSON object {"decision": "accept"|"reject", "reason": ..., "note": ...}')
        decision = body.get("decision")
        if decision not in ("accept", "reject"):
            raise Unprocessable(f"decision {decision!r}: expected accept or reject")
        reason = body.get("reason") or None
        if decision == "reject" and reason not in REASONS:
            raise Unprocessable(f"reason {reason!r}: a rejection needs one of {', '.join(REASONS)}")
        note = _clean_note(body.get("note"))
        with self.journal(study).study(study.uid) as journal:
            self._refuse_signed(journal.entries)
            known = {l["id"] for l in self._lesions(study, journal.entries)}
            if lesion_id not in known:
                raise NotFound(f"study {uid} has no lesion {lesion_id}")
            journal.append(self._decision(study, lesion_id, decision, reader,
                                          reason=reason if decision == "reject" else None, note=note))
            lesion = next(l for l in self._lesions(study, journal.entries) if l["id"] == lesion_id)
        log.info("study %s: lesion %d %sed by %s%s", study.uid, lesion_id, decision.rstrip("e"), reader,
                 f" ({reason})" if decision == "reject" else "")
        return lesion

    def add(self, uid: str, body: Any, reader: str) -> dict[str, Any]:
        """Add a missed lesion grown from ``{"point_mm": [x, y, z]}`` (LPS mm)."""
        study = self.study_of(uid)
        point = body.get("point_mm") if isinstance(body, dict) else None
        if (not isinstance(point, list) or len(point) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in point)):
            raise Unprocessable('expected {"point_mm": [x, y, z]}: three finite numbers, LPS mm')
        note = _clean_note(body.get("note"))
        volume = self._volume(study)
        with self.journal(study).study(study.uid) as journal:
            self._refuse_signed(journal.entries)
            try:
                grown = grow(volume.ct, volume.geometry, [float(v) for v in point], self._taken(volume, journal.entries))
            except GrowRefused as exc:
                raise (Conflict if exc.lesion else Unprocessable)(str(exc)) from None
            lesion_id = int(max([len(volume.rows), *(e.decision.lesion_id for e in journal.entries
                                                       if e.decision.decision == "add")])) + 1
            row = volume.lesion_row(grown.voxels)
            journal.append(self._decision(study, lesion_id, "add", reader, note=note),
                           {"point_mm": [float(v) for v in point], "seed": list(grown.seed),
                            "voxels": encode_voxels(grown.voxels), "row": row})
            lesion = next(l for l in self._lesions(study, journal.entries) if l["id"] == lesion_id)
        log.info("study %s: lesion %d added by %s (%d voxels)", study.uid, lesion_id, reader, grown.voxels.size)
        return lesion

    def sign(self, uid: str, reader: str) -> dict[str, Any]:
        """Sign the study: the final SEG and report are written and put into the outbox."""
        study = self.study_of(uid)
        volume = self._volume(study)
        journal_of = self.journal(study)
        with journal_of.study(study.uid) as journal:
            self._refuse_signed(journal.entries)
            lesions = self._lesions(study, journal.entries)
            undecided = [l["id"] for l in lesions if l["decision"] is None]
            if undecided:
                raise Conflict(f"lesion(s) {', '.join(map(str, undecided))} have no decision yet")
            pred, _ = self.store.folders(study)
            out = signing.signed_folder(study.source.root, study.uid)
            try:
                final = signing.write_final(volume, journal.entries, reader, pred, out)
            except (InputError, OSError) as exc:  # OSError: a node's job moved on under it; sign again
                log.error("study %s: not signed: %s", study.uid, exc)
                raise Conflict(f"not signed: {exc}") from None
            job = signing.new_job(study)
            entry = journal.append(self._decision(study, None, "sign", reader), {**final, "job": job})
            signing.open_outbox(study.source.root, study.uid, job, final["files"])
        return {"signed": {"by": reader, "at": entry.decision.time, "lesions": final["lesions"], "seg": final["seg"],
                           "sr": final["sr"]}, "state": _signed_text(entry)}

    # --- start-up -------------------------------------------------------------------------

    def recover(self) -> None:
        """After a kill: the rows ``reviews.csv`` lacks, and the outbox of a signature that lacks one."""
        for root, journal in self.journals.items():
            journal.reconcile()
            entries = {uid: journal.read(uid) for uid in journal.studies()}
            signing.recover(root, entries)

    def voxels_of(self, uid: str, lesion_id: int) -> np.ndarray:
        """Flat voxel indices of an added lesion (for tests and tools)."""
        study = self.study_of(uid)
        for e in self.journal(study).read(study.uid):
            if e.decision.decision == "add" and e.decision.lesion_id == lesion_id:
                return decode_voxels(e.detail["voxels"])
        raise NotFound(f"study {uid} has no added lesion {lesion_id}")

    def roots(self) -> list[Path]:
        return list(self.journals)
