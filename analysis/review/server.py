"""``python cli.py review``: the review application served by waitress, and the delivery of signed studies.

On start the journals are reconciled (:meth:`analysis.review.service.ReviewService.recover`: rows a
kill left out of ``reviews.csv``, the outbox of a signature a kill left unopened); then, with a
destination, a thread delivers each root's ``review/outbox`` as the node delivers its spool
(:func:`analysis.node.deliver.deliver_due`: retries with growing back-off, then ``undelivered/``);
without one, signed results wait in the outbox for a later ``review --destination``.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from analysis.errors import InputError
from analysis.node.deliver import Destination, Retries, deliver_due
from analysis.review.auth import Sessions, UsersFile
from analysis.review.signing import outbox_of
from analysis.review.store import Source, StudyStore

log = logging.getLogger(__name__)

__all__ = ["ReviewConfig", "serve", "resend"]


@dataclass(frozen=True)
class ReviewConfig:
    """The options of ``review``.

    Attributes:
        spool: a node's spool, or None.
        preds: PRED folders of ``predict --images``.
        users: the users file.
        host, port: where to listen (127.0.0.1 unless asked; port 0: any free one).
        destination: where signed results go (None: they wait in the outbox).
        ae_title: the calling AE title of a C-STORE.
        retries: delivery retries and their first wait.
        secure_cookies: mark the session cookie Secure (behind a TLS proxy).
        idle_minutes: a session ends after this long without a request.
        threads: waitress's worker threads.
    """

    spool: Path | None
    preds: tuple[Path, ...]
    users: Path
    host: str = "127.0.0.1"
    port: int = 8080
    destination: Destination | None = None
    ae_title: str = "BONEMETS"
    retries: Retries = field(default_factory=Retries)
    secure_cookies: bool = False
    idle_minutes: float = 30.0
    threads: int = 8

    def sources(self) -> list[Source]:
        """The review roots.

        Raises:
            InputError: neither a spool nor a PRED folder, or one that is not what it should be.
        """
        if self.spool is None and not self.preds:
            raise InputError("review: give --spool SPOOL or --pred PRED/NAME (repeatable)")
        if not 0 <= self.port < 65536:
            raise InputError(f"--port {self.port}: expected 0..65535")
        return ([Source.spool(self.spool)] if self.spool is not None else []) + [Source.pred(p) for p in self.preds]


def resend(config: ReviewConfig) -> list[str]:
    """Move every undelivered signed result of the roots back to its outbox (``--resend``)."""
    return [job for source in config.sources() for job in outbox_of(source.root).resend()]


def _deliver_forever(roots: list[Path], config: ReviewConfig, stop: threading.Event) -> None:
    while not stop.is_set():
        waits = []
        for root in roots:
            try:
                wait = deliver_due(outbox_of(root), config.destination, calling_ae=config.ae_title,
                                   retries=config.retries, what="review", command="review")
            except Exception as exc:  # keep delivering the other roots; say why once per round
                log.error("review: delivery from %s stopped this round: %s", root, exc)
                wait = 5.0
            if wait is not None:
                waits.append(wait)
        stop.wait(min([0.5, *waits]))


def serve(config: ReviewConfig, *, on_listen: Callable[[str, int], None] | None = None) -> None:
    """Serve the review until the process ends (SIGTERM or SIGINT end it cleanly).

    Raises:
        InputError: bad options, a bad users file, a root that is not a spool or PRED folder.
    """
    from waitress import create_server

    from analysis.review.app import create_app
    from analysis.review.service import ReviewService

    users = UsersFile(config.users)
    if not users():
        raise InputError(f"--users {config.users}: no reader in it; add one with `review add-user NAME --users ...`")
    store = StudyStore(config.sources())
    service = ReviewService(store)
    service.recover()
    app = create_app(service, users, sessions=Sessions(idle_minutes=config.idle_minutes),
                     secure_cookies=config.secure_cookies)
    stop = threading.Event()
    if config.destination is not None:
        threading.Thread(target=_deliver_forever, args=(service.roots(), config, stop), name="review-delivery",
                         daemon=True).start()
    else:
        log.warning("review: no --destination: signed results wait in %s",
                    ", ".join(str(outbox_of(r).root) for r in service.roots()))
    server = create_server(app, host=config.host, port=config.port, threads=config.threads, ident="bonemets-review")
    host, port = str(server.effective_host), int(server.effective_port)
    log.info("review: listening on http://%s:%d (%d study(ies), %d reader(s))", host, port, len(store.studies()),
             len(users()))
    if on_listen is not None:
        on_listen(host, port)
    try:
        server.run()
    finally:
        stop.set()
        server.close()
