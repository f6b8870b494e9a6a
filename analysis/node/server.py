"""The node's storage SCP (pynetdicom) and the loop that completes, predicts and delivers series.

- C-ECHO is answered; C-STORE of CT (CT Image, Enhanced CT Image) is written to the spool
  (:mod:`analysis.node.spool`); a SEG is kept too (``viewer/``): a reader's edit of a result in
  a viewer is a review (:mod:`analysis.review.viewer`: compared lesion by lesion with the
  prediction, rows in ``reviews.csv`` with source ``viewer``); the node's own SEGs and SEGs of
  series it did not predict are dropped with a log line, one that arrives while its series is
  still being predicted waits for the result; other instances are acknowledged and ignored
  with a log line.
- A malformed instance (undecodable, no UIDs, pixel data shorter than its rows x columns x
  frames) is answered 0xC210 / 0xA900 (failure) and logged; the rest of its series still goes.
- With less than ``min_free_gb`` free on the spool's disk an instance is refused with 0xA700
  ("Out of resources", PS3.4 Annex B.2.3).
- Associations from calling AE titles outside ``allow`` are rejected (when given).
- A series with no new instance for ``idle_seconds`` is complete: it is claimed and given to
  ``predict_series(series_dir, out_dir)``, the same prediction as ``predict --images``; its
  SEG and SR go to the destination, with at most ``retries`` retries ``retry_seconds`` x 2^k
  apart, then to ``undelivered/`` with one log line.
- With ``priors`` > 0 the predicted series is archived and, when the patient has earlier CT
  studies (the archive, then the destination's query/retrieve), its timeline's SEG and report
  replace predict's (:mod:`analysis.node.history`).
- SIGTERM (:meth:`Node.stop`) lets the running predictions finish, then the node exits.
- SIGHUP (:meth:`Node.reload`) reads the model again from where it was given (``serve --model
  PATH``: e.g. a symbolic link now pointing at a fine-tuned RUN): no new series starts, the
  running predictions finish with the model they started with, then the new model predicts
  every later series. A model that cannot be read is refused with one log line and the node
  goes on with the one it had. Between two SIGHUPs the model never changes, whatever happens to
  the path (it is resolved once per load).
- Each result names its model: the series' log line, ``predict.json`` in its PRED folder and
  ``model.json`` beside its results in the spool (``done/<job>/model.json``: name, fingerprint,
  source), so a study predicted before a switch and one after say which model made them.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydicom.uid import SegmentationStorage

from analysis.errors import DataProblems, InputError
from analysis.node.deliver import Destination, Retries, deliver_due
from analysis.node.spool import INPUT, PRED, Spool, parse_job
from analysis.prediction.folder import DICOM_SEG, SR
from analysis.prediction.tables import LESIONS_CSV, read_lesions

log = logging.getLogger(__name__)

#: ``predict_series(series_dir, out_dir)``: predict one series folder into the PRED folder
#: ``out_dir`` (:data:`~analysis.prediction.folder.DICOM_SEG` and :data:`~analysis.prediction.folder.SR`
#: inside); raises InputError/DataProblems with predict's reason.
PredictSeries = Callable[[Path, Path], Any]
#: The spool's record of the model that made a job's results (beside them, ``done/<job>/model.json``).
MODEL_RECORD = "model.json"


@dataclass(frozen=True)
class NodeModel:
    """The model the node predicts with, as loaded.

    Attributes:
        predict_series: predicts one series with this model (:data:`PredictSeries`).
        name: the model's name (a fine-tune's shows its parent: :attr:`bonemets_tf.run.RunInfo.name`).
        fingerprint: identifies its weights (the hash ``predict.json`` and the SEG's UIDs use).
        source: where it was loaded from (the resolved RUN or work folder).
    """

    predict_series: PredictSeries
    name: str = "model"
    fingerprint: str = ""
    source: str = ""

    def record(self) -> dict[str, str]:
        """``model.json``: what identifies the model."""
        return {"name": self.name, "fingerprint": self.fingerprint, "source": self.source}


#: ``load_model() -> NodeModel``: reads the model from where ``serve`` was told to find it;
#: raises InputError when it cannot.
LoadModel = Callable[[], NodeModel]

CT_STORAGE = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1")  # CT Image, Enhanced CT Image
OUT_OF_RESOURCES, CANNOT_UNDERSTAND, DATASET_MISMATCH = 0xA700, 0xC210, 0xA900


@dataclass(frozen=True)
class NodeConfig:
    """How the node listens, waits, and delivers (the options of ``serve``)."""

    spool: Path
    destination: Destination
    ae_title: str = "BONEMETS"
    host: str = "127.0.0.1"
    port: int = 11112
    allow: tuple[str, ...] = ()
    idle_seconds: float = 10.0
    workers: int = 1
    min_free_gb: float = 1.0
    retries: int = 5
    retry_seconds: float = 5.0
    deliver_seg: bool = True
    deliver_sr: bool = True
    priors: int = 0

    def check(self) -> None:
        """Raise :class:`InputError` (one line, naming the option) for an out-of-range value."""
        if not 0 < len(self.ae_title) <= 16:
            raise InputError(f"--ae-title {self.ae_title!r}: expected 1 to 16 characters")
        if not 0 <= self.port < 65536:
            raise InputError(f"--port {self.port}: expected 0..65535")
        for name, value in (("--idle-seconds", self.idle_seconds), ("--min-free-gb", self.min_free_gb),
                            ("--retry-seconds", self.retry_seconds), ("--retries", self.retries)):
            if value < 0:
                raise InputError(f"{name} {value}: expected >= 0")
        if self.workers < 1:
            raise InputError(f"--workers {self.workers}: expected >= 1")
        if self.priors < 0:
            raise InputError(f"--priors {self.priors}: expected >= 0")


def _pixel_problem(ds) -> str | None:
    """Why a decoded CT instance cannot be used (None when it can)."""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not ds.get(keyword):
            return f"no {keyword}"
    if "PixelData" not in ds:
        return "no PixelData"
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return None
    expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.BitsAllocated) // 8)
    got = len(ds.PixelData)
    return None if got >= expected else f"PixelData of {got} bytes; {expected} expected (truncated)"


class Node:
    """The node: call :meth:`run`; :meth:`stop` (e.g. from SIGTERM) ends it after the running work."""

    def __init__(self, config: NodeConfig, model: NodeModel | PredictSeries, *,
                 load_model: LoadModel | None = None) -> None:
        """Args:
            config: the node's settings.
            model: the model to start with (a bare ``predict_series`` is a model without a name).
            load_model: reads the model again on :meth:`reload` (None: SIGHUP changes nothing).
        """
        config.check()
        self.config = config
        self.model = model if isinstance(model, NodeModel) else NodeModel(model)
        self.load_model = load_model
        self.spool = Spool(config.spool)
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._assocs: dict[int, dict[str, int]] = {}
        self._lock = threading.Lock()
        self.server = None
        self.started = time.time()

    # --- the SCP ----------------------------------------------------------------------------

    def listen(self) -> tuple[str, int]:
        """Start the storage SCP in the background; returns the address it listens on."""
        from pydicom.uid import AllTransferSyntaxes
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.config.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, AllTransferSyntaxes)
        ae.add_supported_context(Verification)
        if self.config.allow:
            ae.require_calling_aet = list(self.config.allow)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_ACCEPTED, self._on_accepted),
                    (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_RELEASED, self._on_end),
                    (evt.EVT_ABORTED, self._on_end)]
        self.server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers)
        self.started = time.time()
        host, port = self.server.server_address[:2]
        log.info("serve: %s listening on %s:%d, spool %s, results to %s", self.config.ae_title, host, port,
                 self.config.spool, self.config.destination)
        return host, port

    def _count(self, event, key: str) -> None:
        with self._lock:
            self._assocs.setdefault(id(event.assoc), {"stored": 0, "ignored": 0, "refused": 0})[key] += 1

    def _on_accepted(self, event) -> None:
        with self._lock:
            self._assocs[id(event.assoc)] = {"stored": 0, "ignored": 0, "refused": 0}

    def _on_rejected(self, event) -> None:
        req = event.assoc.requestor
        log.warning("association from %s (%s:%s) rejected: calling AE title not in --allow", req.ae_title,
                    req.address, req.port)

    def _on_end(self, event) -> None:
        req = event.assoc.requestor
        with self._lock:
            counts = self._assocs.pop(id(event.assoc), None)
        if counts is None:
            return
        how = "released" if event.event.name == "EVT_RELEASED" else "aborted"
        log.info("association from %s (%s:%s) %s: %d instance(s) stored, %d ignored, %d refused", req.ae_title,
                 req.address, req.port, how, counts["stored"], counts["ignored"], counts["refused"])

    def _on_store(self, event) -> int:
        if self.spool.free_gb() < self.config.min_free_gb:
            log.error("refused an instance: %.2f GB free on the spool's disk, --min-free-gb %.2f",
                      self.spool.free_gb(), self.config.min_free_gb)
            self._count(event, "refused")
            return OUT_OF_RESOURCES
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            sop_class = str(ds.get("SOPClassUID", event.request.AffectedSOPClassUID))
            if sop_class == SegmentationStorage:
                self.spool.store_viewer(ds.SOPInstanceUID, event.encoded_dataset(include_meta=True))
                self._count(event, "stored")
                return 0x0000
            if sop_class not in CT_STORAGE:
                log.info("ignored an instance of SOP class %s (%s): not CT", sop_class, ds.get("Modality", "?"))
                self._count(event, "ignored")
                return 0x0000
            problem = _pixel_problem(ds)
        except Exception as exc:  # pydicom raises many kinds for a malformed data set
            log.error("refused an undecodable instance from %s: %s", event.assoc.requestor.ae_title,
                      f"{type(exc).__name__}: {exc}"[:200])
            self._count(event, "refused")
            return CANNOT_UNDERSTAND
        if problem:
            log.error("refused instance %s of series %s: %s", ds.get("SOPInstanceUID"), ds.get("SeriesInstanceUID"),
                      problem)
            self._count(event, "refused")
            return DATASET_MISMATCH
        try:
            self.spool.store(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                             event.encoded_dataset(include_meta=True))
        except ValueError as exc:
            log.error("refused an instance: %s", exc)
            self._count(event, "refused")
            return CANNOT_UNDERSTAND
        except OSError as exc:
            log.error("could not spool an instance: %s", exc)
            self._count(event, "refused")
            return OUT_OF_RESOURCES
        self._count(event, "stored")
        return 0x0000

    # --- the loop ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Finish the running predictions and deliveries, then return from :meth:`run`."""
        self._stop.set()

    def reload(self) -> None:
        """Read the model again once the running predictions have finished (SIGHUP; module docstring)."""
        self._reload.set()

    def _swap_model(self) -> None:
        """Load the model again (no prediction is running); keep the old one when that fails."""
        self._reload.clear()
        if self.load_model is None:
            log.warning("serve: SIGHUP: this node has no model source to read again; still %s", self.model.name)
            return
        old = self.model
        try:
            new = self.load_model()
        except (InputError, OSError) as exc:
            log.error("serve: SIGHUP: the model could not be read (%s); still predicting with %s (%s)",
                      str(exc).splitlines()[0][:300], old.name, old.fingerprint)
            return
        self.model = new
        log.info("serve: SIGHUP: now predicting with %s (%s) from %s; before: %s (%s)", new.name, new.fingerprint,
                 new.source, old.name, old.fingerprint)

    def run(self, *, once: bool = False, poll: float = 0.2) -> int:
        """Serve until :meth:`stop` (``once``: process the spool's content and return).

        Returns:
            The number of series predicted.
        """
        if not once and self.server is None:
            self.listen()
        done = 0
        running: dict[str, Future] = {}
        with ThreadPoolExecutor(max_workers=self.config.workers, thread_name_prefix="predict") as pool:
            while True:
                for job, future in list(running.items()):
                    if future.done():
                        running.pop(job)
                        done += future.result()
                if self._reload.is_set() and not running:
                    self._swap_model()
                if not self._stop.is_set():
                    idle = 0.0 if once else self.config.idle_seconds
                    for series in self.spool.complete_series(idle, 0.0 if once else self.started):
                        self.spool.claim(series)
                    for job in self.spool.to_predict() if not self._reload.is_set() else []:
                        if job not in running and len(running) < self.config.workers:
                            running[job] = pool.submit(self._predict, job, self.model)
                waiting = self._deliver_due()
                self._read_viewer_segs()
                if self._stop.is_set() and not running:
                    break
                if once and not running and not self.spool.to_predict() and waiting is None:
                    break
                time.sleep(poll if waiting is None else max(0.0, min(poll, waiting)))
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        return done

    def _predict(self, job: str, model: NodeModel) -> int:
        spool = self.spool
        t0 = time.perf_counter()
        out = spool.job_path(job, PRED)
        try:
            model.predict_series(spool.job_path(job, INPUT), out)
        except DataProblems as exc:
            self._failed(job, "; ".join(exc.problems))
            return 0
        except InputError as exc:
            self._failed(job, str(exc))
            return 0
        results = []
        if self.config.deliver_seg:
            results += sorted((out / DICOM_SEG).glob("*.dcm"))
        if self.config.deliver_sr:
            results += sorted((out / SR).glob("*.dcm"))
        if self.config.priors:  # with earlier studies: the timeline's SEG and report replace predict's
            from analysis.node.history import timeline_report

            report = timeline_report(spool.root, job, spool.job_path(job, "input"), out, limit=self.config.priors,
                                     destination=self.config.destination, calling_ae=self.config.ae_title,
                                     predict=model.predict_series)
            if report:
                results = [r for r in report if (self.config.deliver_seg if "_seg" in r.name else self.config.deliver_sr)]
        lesions = len(read_lesions(out)) if (out / LESIONS_CSV).is_file() else 0  # a detector writes none
        spool.open_outbox(job, results, record={MODEL_RECORD: model.record()})
        log.info("series %s: predicted by %s (%s) in %.1f s, %d lesion(s), %d result(s) to deliver",
                 parse_job(job)[0], model.name, model.fingerprint, time.perf_counter() - t0, lesions, len(results))
        return 1

    def _read_viewer_segs(self) -> None:
        """Take each received SEG as a viewer's review (module docstring); one that cannot be
        read goes to ``failed/`` with its reason."""
        for path in self.spool.viewer_segs():
            from analysis.review.viewer import ViewerIgnored, referenced_series, review_viewer_seg

            try:
                if any(self.spool.predicting(uid) for uid in referenced_series(path)):
                    continue  # its series' result is not there yet: read it after
                review_viewer_seg(path, self.spool.root)
            except ViewerIgnored as exc:
                log.info("viewer SEG %s: ignored: %s", path.stem, exc)
                path.unlink(missing_ok=True)
            except (InputError, DataProblems, OSError, ValueError) as exc:
                reason = "; ".join(exc.problems) if isinstance(exc, DataProblems) else str(exc)
                target = self.spool.fail_viewer(path, reason)
                log.error("viewer SEG %s: not read (%s); kept in %s", path.stem, reason.splitlines()[0][:300], target)

    def _failed(self, job: str, reason: str) -> None:
        target = self.spool.fail(job, reason)
        log.error("series %s: not predicted (%s); kept in %s", parse_job(job)[0], reason, target)

    def _deliver_due(self) -> float | None:
        """Deliver every outbox whose next attempt is due; seconds until the next one (None: none waits)."""
        cfg = self.config
        return deliver_due(self.spool, cfg.destination, calling_ae=cfg.ae_title,
                           retries=Retries(cfg.retries, cfg.retry_seconds))
