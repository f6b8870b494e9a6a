"""The node's priors: a patient's earlier CT studies, from the node's own archive or the PACS.

When the node has predicted a CT series, it looks for earlier CT studies of the same patient
(PatientID, and IssuerOfPatientID when the series carries one) to build a timeline
(:mod:`analysis.monitoring.timeline`):

1. **its own archive** (``SPOOL/archive/``, :class:`Archive`): every series it predicted, kept with
   its PRED folder (mask, lesions.csv) under a folder named by a hash of the patient's key;
2. **the PACS** (the ``--destination``): a study-level query for the patient's studies holding CT
   (C-FIND with pynetdicom for a DICOM node, QIDO-RS with dicomweb-client for a DICOMweb root), a
   series-level query for each study's CT series (Modality CT: the node's own SEG and SR series are
   never taken for CT, and any instance retrieved that is not CT is dropped), then the retrieval of
   the series with most instances (C-GET, or WADO-RS), which the node predicts and archives.

Only studies dated before the new one count (StudyDate; a study without one, or on the same day, is
left out: a timeline needs dates in order): the ``limit`` newest of them (so at most ``limit``
retrievals per new series). Every failure (the PACS unreachable, a retrieval or a prediction that
fails) is one log line and that prior is skipped, not replaced by an older one: the new result is
delivered whatever happens here.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from analysis.imaging.io import atomic_write_json, read_json

log = logging.getLogger(__name__)

__all__ = ["PatientKey", "Prior", "Archive", "PacsClient", "find_priors", "series_header", "CT_STORAGE"]

CT_STORAGE = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1")  # CT Image, Enhanced CT Image
ARCHIVE = "archive"
STUDY_JSON = "study.json"


@dataclass(frozen=True)
class PatientKey:
    """Who a series belongs to: PatientID and IssuerOfPatientID ("" when the series has none)."""

    patient_id: str
    issuer: str = ""

    @property
    def folder(self) -> str:
        """A folder name for the patient that holds no identifier (a hash of the key)."""
        return hashlib.sha256(f"{self.patient_id}\0{self.issuer}".encode("utf-8")).hexdigest()[:24]

    def matches(self, patient_id: str, issuer: str) -> bool:
        """The same patient: equal PatientID, and equal issuers where both carry one."""
        return patient_id == self.patient_id and (not issuer or not self.issuer or issuer == self.issuer)


def _date(value: Any) -> dt.date | None:
    text = str(value or "").strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def series_header(folder: Path) -> dict[str, Any]:
    """PatientID, IssuerOfPatientID, StudyInstanceUID, StudyDate, SeriesInstanceUID of a series
    folder's first CT instance (headers only)."""
    import pydicom

    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if str(ds.get("SOPClassUID", "")) in CT_STORAGE:
            return {"patient_id": str(ds.get("PatientID", "") or ""),
                    "issuer": str(ds.get("IssuerOfPatientID", "") or ""),
                    "study_uid": str(ds.StudyInstanceUID), "study_date": _date(ds.get("StudyDate")),
                    "series_uid": str(ds.SeriesInstanceUID)}
    raise ValueError(f"{folder}: no CT instance")


@dataclass(frozen=True)
class Prior:
    """An earlier CT study of the patient, ready for the timeline.

    Attributes:
        study_uid, series_uid: the study and its CT series.
        date: its StudyDate.
        ct: the series folder.
        pred: its PRED folder (the node's prediction: mask, lesions.csv, predict.json).
        source: ``archive`` (the node had it) or ``pacs`` (queried and retrieved now).
    """

    study_uid: str
    series_uid: str
    date: dt.date
    ct: Path
    pred: Path
    source: str


class Archive:
    """``SPOOL/archive/<patient hash>/<study>/<series>/{ct/, pred/, study.json}``: the series the node
    predicted, kept for later timelines (each entry appears whole: built aside, then one rename)."""

    def __init__(self, spool: str | os.PathLike) -> None:
        self.root = Path(spool) / ARCHIVE
        self.root.mkdir(parents=True, exist_ok=True)

    def add(self, key: PatientKey, header: dict[str, Any], ct: Path, pred: Path) -> Path:
        """Keep a predicted series (its files are hard-linked when the disk allows, else copied)."""
        target = self.root / key.folder / header["study_uid"] / header["series_uid"]
        if target.is_dir():
            shutil.rmtree(target)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(ct, tmp / "ct", copy_function=_link_or_copy)
        shutil.copytree(pred, tmp / "pred", copy_function=_link_or_copy)
        date = header.get("study_date")
        atomic_write_json(tmp / STUDY_JSON, {"patient_id": key.patient_id, "issuer": key.issuer,
                                             "study_uid": header["study_uid"], "series_uid": header["series_uid"],
                                             "study_date": date.isoformat() if date else None,
                                             "instances": len(list((tmp / "ct").glob("*.dcm")))})
        os.rename(tmp, target)
        return target

    def prune(self, key: PatientKey, keep: int) -> list[str]:
        """Remove the patient's archived studies but the ``keep`` newest (by StudyDate; undated ones go
        first): the archive holds what later timelines can use, not every CT ever received. Returns the
        removed study UIDs."""
        folder = self.root / key.folder
        dated = []
        for entry in sorted(folder.glob(f"*/*/{STUDY_JSON}")):
            record = read_json(entry, what="archived study")
            dated.append((record.get("study_date") or "", entry.parent.parent.name))
        newest = {uid for _, uid in sorted(set(dated), reverse=True)[:keep]}
        gone = sorted({uid for _, uid in dated} - newest)
        for uid in gone:
            shutil.rmtree(folder / uid, ignore_errors=True)
        return gone

    def studies(self, key: PatientKey) -> dict[str, Prior]:
        """The patient's archived studies with a date: ``{study_uid: Prior}`` (per study, the series with
        most instances)."""
        found: dict[str, tuple[int, Prior]] = {}
        for entry in sorted((self.root / key.folder).glob(f"*/*/{STUDY_JSON}")):
            record = read_json(entry, what="archived study")
            if not key.matches(record["patient_id"], record.get("issuer", "")) or not record.get("study_date"):
                continue
            prior = Prior(record["study_uid"], record["series_uid"], dt.date.fromisoformat(record["study_date"]),
                          entry.parent / "ct", entry.parent / "pred", "archive")
            if record["study_uid"] not in found or record["instances"] > found[record["study_uid"]][0]:
                found[record["study_uid"]] = (record["instances"], prior)
        return {uid: prior for uid, (_, prior) in found.items()}


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


class PacsClient:
    """Study and series queries and series retrieval at the destination (C-FIND/C-GET or QIDO/WADO-RS).

    Args:
        destination: :class:`analysis.node.deliver.Destination`.
        calling_ae: the node's AE title.
        timeout: seconds for each network exchange.
    """

    def __init__(self, destination: Any, *, calling_ae: str, timeout: float = 30.0) -> None:
        self.destination, self.calling_ae, self.timeout = destination, calling_ae, timeout

    # --- DIMSE ----------------------------------------------------------------------------------

    def _associate(self, *, get: bool = False):
        from pynetdicom import AE, build_role
        from pynetdicom.sop_class import (
            CTImageStorage,
            EnhancedCTImageStorage,
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelGet,
        )

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        roles = []
        if get:
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
            for storage in (CTImageStorage, EnhancedCTImageStorage):
                ae.add_requested_context(storage)
                roles.append(build_role(storage, scp_role=True))
        return ae, roles

    def _find(self, query) -> list:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        ae, _ = self._associate()
        d = self.destination
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title)
        if not assoc.is_established:
            raise OSError(f"C-FIND at {d}: no association (refused, rejected or unreachable)")
        found = []
        try:
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                code = int(status.Status) if status and "Status" in status else None
                if code in (0xFF00, 0xFF01) and identifier is not None:
                    found.append(identifier)
                elif code is None or code not in (0x0000, 0xFF00, 0xFF01):
                    raise OSError(f"C-FIND at {d}: status {'none' if code is None else hex(code)}")
        finally:
            assoc.release()
        return found

    def studies(self, key: PatientKey) -> list[tuple[str, dt.date | None]]:
        """``(StudyInstanceUID, StudyDate)`` of the patient's studies holding CT."""
        if self.destination.kind == "dicomweb":
            found = self._client().search_for_studies(search_filters={"PatientID": key.patient_id,
                                                                      "ModalitiesInStudy": "CT"},
                                                      fields=["StudyDate", "IssuerOfPatientID", "PatientID"])
            out = []
            for s in found:
                if key.matches(_web(s, "00100020"), _web(s, "00100021")):
                    out.append((_web(s, "0020000D"), _date(_web(s, "00080020"))))
            return out
        from pydicom.dataset import Dataset

        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.PatientID = key.patient_id
        q.IssuerOfPatientID = ""
        q.StudyInstanceUID = ""
        q.StudyDate = ""
        q.ModalitiesInStudy = "CT"
        return [(str(r.StudyInstanceUID), _date(r.get("StudyDate"))) for r in self._find(q)
                if key.matches(str(r.get("PatientID", "")), str(r.get("IssuerOfPatientID", "") or ""))
                and "CT" in _modalities(r.get("ModalitiesInStudy"))]

    def ct_series(self, study_uid: str) -> list[tuple[str, int]]:
        """``(SeriesInstanceUID, instances)`` of the study's CT series (Modality CT only)."""
        if self.destination.kind == "dicomweb":
            found = self._client().search_for_series(study_uid, search_filters={"Modality": "CT"},
                                                     fields=["NumberOfSeriesRelatedInstances", "Modality"])
            return [(_web(s, "0020000E"), int(_web(s, "00201209") or 0)) for s in found
                    if _web(s, "00080060") == "CT"]
        from pydicom.dataset import Dataset

        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = ""
        q.Modality = "CT"
        q.NumberOfSeriesRelatedInstances = ""
        return [(str(r.SeriesInstanceUID), int(r.get("NumberOfSeriesRelatedInstances") or 0)) for r in self._find(q)
                if str(r.get("Modality", "")) == "CT"]

    def retrieve(self, study_uid: str, series_uid: str, folder: Path) -> int:
        """Write the series' CT instances into ``folder`` (one file each); returns how many."""
        folder.mkdir(parents=True, exist_ok=True)
        if self.destination.kind == "dicomweb":
            written = 0
            for ds in self._client().retrieve_series(study_uid, series_uid):
                written += _keep(ds, folder)
            return written
        from pydicom.dataset import Dataset
        from pynetdicom import evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

        ae, roles = self._associate(get=True)
        counter = {"n": 0}

        def on_store(event) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            counter["n"] += _keep(ds, folder)
            return 0x0000

        d = self.destination
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title, ext_neg=roles,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        if not assoc.is_established:
            raise OSError(f"C-GET at {d}: no association (refused, rejected or unreachable)")
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = series_uid
        final = None
        try:
            for status, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet):
                final = int(status.Status) if status and "Status" in status else None
        finally:
            assoc.release()
        if final not in (0x0000, 0xB000) or counter["n"] == 0:
            raise OSError(f"C-GET of series {series_uid} at {d}: status {'none' if final is None else hex(final)}, "
                          f"{counter['n']} CT instance(s) received")
        return counter["n"]

    # --- DICOMweb -------------------------------------------------------------------------------

    def _client(self):
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(url=self.destination.url)
        request = client._session.request

        def call(*args, **kwargs):
            kwargs.setdefault("timeout", self.timeout)
            return request(*args, **kwargs)

        client._session.request = call  # no hanging forever
        return client


def _web(item: dict, tag: str) -> str:
    value = item.get(tag, {}).get("Value", [""])
    return str(value[0]) if value else ""


def _modalities(value: Any) -> set[str]:
    if value is None:
        return set()
    return {str(v) for v in value} if not isinstance(value, str) else {value}


def _keep(ds, folder: Path) -> int:
    """Write one retrieved instance if it is CT (1), else drop it (0)."""
    if str(ds.get("SOPClassUID", "")) not in CT_STORAGE:
        log.info("priors: dropped a retrieved instance of SOP class %s (not CT)", ds.get("SOPClassUID"))
        return 0
    from analysis.node.spool import safe_uid

    ds.save_as(folder / f"{safe_uid(ds.SOPInstanceUID, 'SOPInstanceUID')}.dcm", enforce_file_format=True)
    return 1


#: ``predict(series_dir, pred_dir)``: the node's prediction of one series (raises on failure).
Predict = Callable[[Path, Path], Any]


def find_priors(header: dict[str, Any], archive: Archive, pacs: PacsClient | None, *, limit: int, predict: Predict,
                work: Path) -> list[Prior]:
    """The patient's earlier CT studies for a new series (the rules: module docstring), oldest first.

    Args:
        header: :func:`series_header` of the new series.
        archive: the node's archive.
        pacs: the destination to query and retrieve from (None: the archive only).
        limit: at most this many priors (0: none).
        predict: predicts a retrieved series into a PRED folder.
        work: a folder for retrieved series (they are archived from there).

    Returns:
        The priors, oldest first; never raises for a prior that could not be had (one log line each).
    """
    date = header.get("study_date")
    if limit <= 0 or date is None or not header.get("patient_id"):
        if limit > 0:
            log.info("priors: series %s has no %s; no timeline", header.get("series_uid"),
                     "StudyDate" if date is None else "PatientID")
        return []
    key = PatientKey(header["patient_id"], header.get("issuer", ""))
    own = {uid: p for uid, p in archive.studies(key).items() if uid != header["study_uid"] and p.date < date}
    candidates: dict[str, dt.date] = {uid: p.date for uid, p in own.items()}
    if pacs is not None:
        try:
            for uid, when in pacs.studies(key):
                if uid != header["study_uid"] and when is not None and when < date:
                    candidates.setdefault(uid, when)
        except Exception as exc:  # an unreachable or failing PACS: the archive only
            log.warning("priors: query at %s failed (%s); using the node's own archive only", pacs.destination,
                        f"{type(exc).__name__}: {exc}"[:200])
    chosen: list[Prior] = []
    for uid in sorted(candidates, key=lambda u: candidates[u], reverse=True)[:limit]:
        if uid in own:
            chosen.append(own[uid])
            continue
        prior = _fetch(uid, candidates[uid], key, archive, pacs, predict, work)
        if prior is not None:
            chosen.append(prior)
    dates = [p.date for p in chosen]
    if len(set(dates)) != len(dates):  # two studies of one day: keep the first found of each day
        seen: set[dt.date] = set()
        chosen = [p for p in chosen if not (p.date in seen or seen.add(p.date))]
    chosen.sort(key=lambda p: p.date)
    log.info("priors: %d earlier CT stud%s for series %s (%s)", len(chosen), "y" if len(chosen) == 1 else "ies",
             header["series_uid"], ", ".join(f"{p.date} from the {p.source}" for p in chosen) or "none")
    return chosen


def _fetch(study_uid: str, date: dt.date, key: PatientKey, archive: Archive, pacs: PacsClient, predict: Predict,
           work: Path) -> Prior | None:
    """Retrieve a study's largest CT series from the PACS, predict and archive it; None (one log line) on failure."""
    try:
        series = sorted(pacs.ct_series(study_uid), key=lambda s: -s[1])
        if not series:
            log.warning("priors: study %s at %s holds no CT series; skipped", study_uid, pacs.destination)
            return None
        series_uid = series[0][0]
        folder = work / study_uid / series_uid
        pacs.retrieve(study_uid, series_uid, folder / "ct")
        header = series_header(folder / "ct")
        if not key.matches(header["patient_id"], header["issuer"]):
            log.warning("priors: study %s retrieved from %s is of another patient; skipped", study_uid,
                        pacs.destination)
            return None
        predict(folder / "ct", folder / "pred")
        header["study_date"] = header["study_date"] or date
        stored = archive.add(key, header, folder / "ct", folder / "pred")
    except Exception as exc:  # network, DICOM and prediction failures alike: this prior is skipped
        log.warning("priors: study %s could not be retrieved from %s (%s); the timeline goes without it", study_uid,
                    pacs.destination, f"{type(exc).__name__}: {exc}"[:200])
        return None
    return Prior(study_uid, header["series_uid"], header["study_date"], stored / "ct", stored / "pred", "pacs")
