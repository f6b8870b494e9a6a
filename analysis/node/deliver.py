"""Sending results to the destination: C-STORE to a DICOM node (pynetdicom's SCU) or STOW-RS to
a DICOMweb server (dicomweb-client), and the delivery of an outbox's due jobs with bounded,
growing back-off (:func:`deliver_due`, the node's and the review's)."""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from analysis.errors import InputError
from analysis.node.spool import OUTBOX, SENT, Outbox, parse_job

log = logging.getLogger(__name__)

_DIMSE = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


class DeliveryError(Exception):
    """A result could not be delivered (one line: why)."""


@dataclass(frozen=True)
class Destination:
    """Where results go.

    Attributes:
        kind: ``dimse`` (C-STORE) or ``dicomweb`` (STOW-RS).
        ae_title, host, port: the DICOM node (``dimse``).
        url: the DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web`` (``dicomweb``).
    """

    kind: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    url: str = ""

    @classmethod
    def parse(cls, text: str) -> "Destination":
        """``AE@HOST:PORT`` or ``dicomweb:URL``.

        >>> Destination.parse("ORTHANC@127.0.0.1:4242").port
        4242

        Raises:
            InputError: anything else.
        """
        if text.startswith("dicomweb:"):
            url = text[len("dicomweb:"):]
            if not url.startswith(("http://", "https://")):
                raise InputError(f"--destination {text}: expected dicomweb:http(s)://HOST:PORT/ROOT")
            return cls(kind="dicomweb", url=url.rstrip("/"))
        m = _DIMSE.match(text)
        if not m or not 0 < int(m["port"]) < 65536:
            raise InputError(f"--destination {text}: expected AE@HOST:PORT (a DICOM node) or dicomweb:URL")
        return cls(kind="dimse", ae_title=m["ae"], host=m["host"], port=int(m["port"]))

    def __str__(self) -> str:
        return self.url if self.kind == "dicomweb" else f"{self.ae_title}@{self.host}:{self.port}"


def deliver(path: Path, destination: Destination, *, calling_ae: str, timeout: float = 30.0) -> None:
    """Send one DICOM file to ``destination``.

    Raises:
        DeliveryError: the destination could not be reached or did not accept it.
    """
    import pydicom

    ds = pydicom.dcmread(path)
    if destination.kind == "dicomweb":
        _stow(ds, destination, timeout)
    else:
        _c_store(ds, destination, calling_ae, timeout)


def _stow(ds, destination: Destination, timeout: float) -> None:
    import requests
    from dicomweb_client.api import DICOMwebClient

    try:
        client = DICOMwebClient(url=destination.url)
        client._session.request = _with_timeout(client._session.request, timeout)  # no hanging forever
        client.store_instances([ds])
    except (requests.RequestException, OSError) as exc:
        raise DeliveryError(f"STOW-RS to {destination.url}: {type(exc).__name__}: {str(exc)[:200]}") from None


def _with_timeout(request, timeout: float):
    def call(*args, **kwargs):
        kwargs.setdefault("timeout", timeout)
        return request(*args, **kwargs)

    return call


def _c_store(ds, destination: Destination, calling_ae: str, timeout: float) -> None:
    from pynetdicom import AE
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(str(ds.SOPClassUID), [str(ds.file_meta.TransferSyntaxUID), ExplicitVRLittleEndian,
                                                   ImplicitVRLittleEndian])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise DeliveryError(f"C-STORE to {destination}: no association (refused, rejected or unreachable)")
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    code = int(status.Status) if status and "Status" in status else None
    if code is None or (code != 0 and code not in (0x0001, 0xB000, 0xB007, 0xB006)):
        raise DeliveryError(f"C-STORE to {destination}: status {'none' if code is None else hex(code)}")


@dataclass(frozen=True)
class Retries:
    """How often and how patiently an outbox is delivered: at most ``retries`` retries,
    ``seconds`` x 2^k apart, then the job goes to ``undelivered/``."""

    retries: int = 5
    seconds: float = 5.0


def deliver_due(outbox: Outbox, destination: Destination, *, calling_ae: str, retries: Retries,
                what: str = "series", command: str = "serve") -> float | None:
    """Deliver every job of ``outbox`` whose next attempt is due, each result once.

    A result is moved to ``sent/`` after its destination accepted it; a job whose results
    are all sent is finished (``done/``); a failure schedules the next attempt, and after
    ``retries.retries`` retries the job goes to ``undelivered/`` with one log line.

    Args:
        what: how the log names a job (``series`` for the node's, ``review`` for signed reviews).
        command: the command whose ``--resend`` sends undelivered jobs again (for the log line).

    Returns:
        Seconds until the next attempt of a waiting job (None: none waits).
    """
    wait = None
    for job in outbox.jobs(OUTBOX):
        record = outbox.delivery(job)
        now = time.time()
        name = parse_job(job)[0]
        if record["next_at"] > now:
            wait = min(wait if wait is not None else float("inf"), record["next_at"] - now)
            continue
        try:
            for path in outbox.pending(job):
                deliver(path, destination, calling_ae=calling_ae)
                outbox.mark_sent(path)
        except (DeliveryError, OSError) as exc:
            attempts = record["attempts"] + 1
            if attempts > retries.retries:
                target = outbox.give_up(job)
                log.error("%s %s: delivery to %s failed %d times (%s); results kept in %s (%s --resend)",
                          what, name, destination, attempts, exc, target, command)
                continue
            delay = retries.seconds * 2 ** (attempts - 1)
            outbox.set_delivery(job, {"attempts": attempts, "next_at": now + delay, "last_error": str(exc)})
            log.warning("%s %s: delivery to %s failed (%s); retry %d/%d in %.0f s", what, name, destination, exc,
                        attempts, retries.retries, delay)
            wait = min(wait if wait is not None else float("inf"), delay)
            continue
        sent = len(list((outbox.job_path(job, OUTBOX) / SENT).glob("*.dcm")))
        outbox.finish(job)
        log.info("%s %s: delivered %d result(s) to %s", what, name, sent, destination)
    return wait
