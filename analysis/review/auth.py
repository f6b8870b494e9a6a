"""Readers, their passwords, sessions and the slow-down of failed sign-ins (standard library only).

* The users file (``review add-user NAME --users FILE``) holds one reader a line,
  ``NAME:scrypt$N$r$p$SALT$HASH`` (salt and hash in base64): a salted scrypt hash (RFC 7914,
  :func:`hashlib.scrypt`) with the cost the OWASP Password Storage Cheat Sheet gives as one of its
  equivalent minimums, N = 2^15 (32 MiB), r = 8, p = 3; the cost is stored with each hash, so it
  can be raised later without invalidating the old ones. The file is written atomically, mode 0600.
* Sessions live in the server's memory (a restart signs everyone out; their decisions are on
  disk): a random token (:func:`secrets.token_urlsafe`, 256 bits) in an HttpOnly, SameSite=Strict
  cookie, with its own CSRF token, ending after :data:`IDLE_MINUTES` without a request or
  :data:`MAX_HOURS` after sign-in.
* Failed sign-ins are slowed down per user name and per client address: after ``n`` failures the
  next attempt is refused for ``min(2^(n-1), 60)`` seconds (without checking the password).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from analysis.errors import InputError
from analysis.imaging.io import atomic_file

log = logging.getLogger(__name__)

__all__ = ["SCRYPT", "USER_NAME", "hash_password", "verify_password", "read_users", "add_user", "check_password",
           "UsersFile", "Session", "Sessions", "LoginThrottle", "IDLE_MINUTES", "MAX_HOURS"]

#: scrypt cost (OWASP Password Storage Cheat Sheet: N=2^15, r=8, p=3 is one of its equivalent minimums).
SCRYPT = {"n": 2 ** 15, "r": 8, "p": 3}
_MAXMEM = 512 * 2 ** 20
#: A reader's name: letters, digits and ``._@-``, 1 to 64 characters (it goes into DICOM PN and CSV cells).
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
IDLE_MINUTES = 30.0
MAX_HOURS = 12.0
_MIN_PASSWORD = 8
_DUMMY = None  # a hash to check unknown names against, so they take as long as known ones


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, *, n: int = SCRYPT["n"], r: int = SCRYPT["r"], p: int = SCRYPT["p"]) -> str:
    """``scrypt$N$r$p$SALT$HASH`` of ``password`` with a fresh 16-byte salt."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=32)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` gives ``stored`` (compared in constant time); False for a malformed hash."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             maxmem=_MAXMEM, dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def read_users(path: str | os.PathLike) -> dict[str, str]:
    """``{name: hash}`` of a users file.

    Raises:
        InputError: the file is missing or a line is not ``NAME:scrypt$...``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--users {path}: not found; create it with `review add-user NAME --users {path}`")
    users = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        name, _, stored = line.partition(":")
        if not USER_NAME.match(name) or not stored.startswith("scrypt$") or stored.count("$") != 5:
            raise InputError(f"--users {path}: line {n} is not NAME:scrypt$N$r$p$SALT$HASH")
        users[name] = stored
    return users


def add_user(path: str | os.PathLike, name: str, password: str, **cost: int) -> bool:
    """Add reader ``name`` (or set a new password) in the users file, written atomically with mode 0600.

    Args:
        cost: scrypt ``n``, ``r``, ``p`` instead of :data:`SCRYPT`.

    Returns:
        True when the reader was new.

    Raises:
        InputError: a name outside :data:`USER_NAME`, a password shorter than 8 characters, or an
            unreadable users file.
    """
    if not USER_NAME.match(name):
        raise InputError(f"user name {name!r}: expected 1-64 letters, digits or ._@- (starting with a letter or digit)")
    if len(password) < _MIN_PASSWORD:
        raise InputError(f"password for {name}: expected at least {_MIN_PASSWORD} characters")
    path = Path(path)
    users = read_users(path) if path.exists() else {}
    new = name not in users
    users[name] = hash_password(password, **cost)
    with atomic_file(path) as tmp:
        tmp.write_text("".join(f"{k}:{v}\n" for k, v in users.items()), encoding="utf-8")
        os.chmod(tmp, 0o600)
    os.chmod(path, 0o600)  # atomic_file gives the umask's mode: a password file is the owner's alone
    return new


class UsersFile:
    """A users file, read again when it changes (a reader added or removed while the server runs).

    Calling it returns ``{name: hash}``; a file that became unreadable keeps the last good readers
    (logged), so a half-edited file never locks everyone out or lets anyone in.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._stamp: tuple[float, int] | None = None
        self._users = read_users(self.path)
        self._stamp = self._stat()
        self._lock = threading.Lock()

    def _stat(self) -> tuple[float, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    def __call__(self) -> dict[str, str]:
        stamp = self._stat()
        with self._lock:
            if stamp != self._stamp and stamp is not None:
                try:
                    self._users = read_users(self.path)
                    log.info("%s: read again, %d reader(s)", self.path, len(self._users))
                except InputError as exc:
                    log.error("%s: %s; keeping the %d reader(s) read before", self.path, exc, len(self._users))
                self._stamp = stamp
            return dict(self._users)


def check_password(users: dict[str, str], name: str, password: str) -> bool:
    """Whether ``name`` is a reader with ``password``; an unknown name costs as much time as a known one."""
    global _DUMMY
    stored = users.get(name)
    if stored is None:
        if _DUMMY is None:
            _DUMMY = hash_password(secrets.token_hex(8))
        verify_password(password, _DUMMY)
        return False
    return verify_password(password, stored)


@dataclass
class Session:
    """A signed-in reader."""

    user: str
    csrf: str
    started: float
    seen: float


class Sessions:
    """Sessions in memory (module docstring)."""

    def __init__(self, idle_minutes: float = IDLE_MINUTES, max_hours: float = MAX_HOURS) -> None:
        self.idle = idle_minutes * 60.0
        self.max = max_hours * 3600.0
        self._by_token: dict[str, Session] = {}
        self._lock = threading.Lock()

    def start(self, user: str) -> str:
        """A new session of ``user``; returns its token."""
        token = secrets.token_urlsafe(32)
        t = time.monotonic()
        with self._lock:
            self._prune(t)
            self._by_token[token] = Session(user=user, csrf=secrets.token_urlsafe(32), started=t, seen=t)
        return token

    def get(self, token: str | None) -> Session | None:
        """The live session of ``token`` (its idle clock restarts), or None (unknown or expired)."""
        if not token:
            return None
        t = time.monotonic()
        with self._lock:
            session = self._by_token.get(token)
            if session is None:
                return None
            if t - session.seen > self.idle or t - session.started > self.max:
                del self._by_token[token]
                return None
            session.seen = t
            return session

    def end(self, token: str | None) -> None:
        with self._lock:
            self._by_token.pop(token or "", None)

    def _prune(self, t: float) -> None:
        for token, s in list(self._by_token.items()):
            if t - s.seen > self.idle or t - s.started > self.max:
                del self._by_token[token]


class LoginThrottle:
    """Failed sign-ins per key (user name, client address): after ``n`` failures the key waits
    ``min(base * 2^(n-1), cap)`` seconds; a success clears the user's key."""

    def __init__(self, base: float = 1.0, cap: float = 60.0, forget: float = 3600.0) -> None:
        self.base, self.cap, self.forget = base, cap, forget
        self._failures: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def wait(self, *keys: str) -> float:
        """Seconds before ``keys`` may try again (0: now)."""
        t = time.monotonic()
        with self._lock:
            waits = [until - t for n, until in (self._failures.get(k, (0, 0.0)) for k in keys)]
        return max([0.0, *waits])

    def failed(self, *keys: str) -> float:
        """Count a failure of each key; returns the wait it now has."""
        t = time.monotonic()
        with self._lock:
            if len(self._failures) > 10000:
                self._failures = {k: v for k, v in self._failures.items() if t - v[1] < self.forget}
            for key in keys:
                n, _ = self._failures.get(key, (0, 0.0))
                self._failures[key] = (n + 1, t + min(self.base * 2 ** n, self.cap))
        return self.wait(*keys)

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)
