"""Who is calling the API: bearer tokens, checked in constant time, and the name and role they carry.

The surface the HTTP layer needs, per request: `admit(header, role)` gives the credential an Authorization
header carries or the refusal (status, message); `actor()` names the credential the request was let through
with, once the caller put it in `g.credential` (the gate, gate.py, does both). Below them,
`tokens_of(app).current()` gives the credentials accepted now, and `authenticate(header, credentials)` picks one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence

from flask import Flask, current_app, g

from config import OPERATE, READ, Credential, Settings, parse_tokens

__all__ = ["OPERATE", "READ", "Tokens", "actor", "admit", "authenticate", "tokens_of"]

log = logging.getLogger(__name__)

EXTENSION = "consistency_credentials"  # where create_app keeps the Tokens of the app
# Seconds between two reads of API_TOKENS_FILE: a token removed from it is refused at most this long after the
# file changes (issue 23 asks for 15 s at most), and only one request in this long pays for the read.
CHECK_INTERVAL = 5.0


class Tokens:
    """The credentials the API accepts now: API_TOKEN's, and API_TOKENS_FILE's, read again when it changes.

    At most once every CHECK_INTERVAL the first request to come reads the file (a few hundred bytes) and
    compares its digest with the last version seen, so that any change counts: a Kubernetes Secret's swap of
    its `..data` link, a rename over the file, or an edit in place that keeps its size and time. A version
    that cannot be read or parsed leaves the last good tokens in force and is logged once, at ERROR.
    """

    def __init__(
        self,
        named: Sequence[Credential] = (),
        path: str | None = None,
        fixed: Sequence[Credential] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._named, self._path, self._fixed, self._clock = tuple(named), path, tuple(fixed), clock
        self._accepted = (*self._named, *self._fixed)
        self._lock = threading.Lock()
        self._version: str | None = None  # the digest of the version last seen, or the error that stopped its read
        self._bad = False
        self._due = clock()
        if path is not None:
            self.current()

    @classmethod
    def from_settings(cls, settings: Settings) -> Tokens:
        """Return the tokens the settings give: the named ones as read at start, their file, and API_TOKEN's; a
        file is then read every CHECK_INTERVAL whether requests come or not."""
        tokens = cls(settings.api_tokens, settings.api_tokens_file, settings.fixed_credentials)
        if tokens._path is not None:
            threading.Thread(target=_watch, args=(weakref.ref(tokens),), name="tokens-file", daemon=True).start()
        return tokens

    def current(self) -> tuple[Credential, ...]:
        """Return every credential accepted now, reading the file first when CHECK_INTERVAL has passed."""
        if self._path is not None and self._clock() >= self._due and self._lock.acquire(blocking=False):
            try:  # a request that finds another reading goes on with the tokens in force
                if self._clock() >= self._due:
                    self._due = self._clock() + CHECK_INTERVAL
                    self._read(self._path)
            finally:
                self._lock.release()
        return self._accepted

    def _read(self, path: str) -> None:
        """Take the file's tokens if it changed and is good; keep the last good ones otherwise."""
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as err:
            self._keep(f"errno {err.errno}", f"API_TOKENS_FILE {path} cannot be read ({err.strerror})")
            return
        version = hashlib.sha256(data).hexdigest()
        if version == self._version:
            return
        named, problems = parse_tokens(data, f"API_TOKENS_FILE {path}")
        if problems:
            self._keep(version, "; ".join(problems))
            return
        told = "is good again" if self._bad else "read" if self._version is None else "changed"
        self._named, self._accepted, self._version, self._bad = named, (*named, *self._fixed), version, False
        log.info("API_TOKENS_FILE %s %s: %s in force", path, told, _count(named))

    def _keep(self, version: str, problem: str) -> None:
        """Log, once per version of the file, why it is not used; the tokens in force stay."""
        if version != self._version:
            log.error("%s; the %s read before stay in force", problem, _count(self._named))
        self._version, self._bad = version, True


def _watch(ref: weakref.ref[Tokens]) -> None:
    """Read the file every CHECK_INTERVAL while its Tokens live, so that a process no request reaches still sees
    every version: one that saw only the version before a removal would keep the removed token in force if the
    next version were bad."""
    while (tokens := ref()) is not None:
        tokens.current()
        del tokens  # hold no reference while asleep: the Tokens may go with its app
        time.sleep(CHECK_INTERVAL)


def tokens_of(app: Flask) -> Tokens:
    """Return the Tokens of an app, as create_app keeps them."""
    tokens: Tokens = app.extensions[EXTENSION]
    return tokens


def _count(named: Sequence[Credential]) -> str:
    """Say how many named tokens of each role there are, and never which: a token written as a name would show."""
    roles = ", ".join(f"{sum(c.role == role for c in named)} {role}" for role in (OPERATE, READ))
    return f"{len(named)} named tokens ({roles})"


def authenticate(header: str, credentials: Sequence[Credential]) -> Credential | None:
    """Return the credential an Authorization header carries, or None.

    Every token is compared, in constant time, whichever matches: the answer's timing tells nothing of
    which token is near.
    """
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    presented = given.strip().encode()
    found = None
    for credential in credentials:
        if hmac.compare_digest(presented, credential.token.encode()) and found is None:
            found = credential
    return found


def admit(header: str, role: str) -> tuple[Credential | None, tuple[int, str] | None]:
    """Check an Authorization header against the current app's tokens: its credential, or the status and message
    that refuse it (401 without a known token, 403 when its role does not allow `role`)."""
    credentials = tokens_of(current_app).current()
    if not credentials:
        return None, (401, "this endpoint needs a bearer token: set API_TOKEN or API_TOKENS_FILE")
    credential = authenticate(header, credentials)
    if credential is None:
        return None, (401, "missing or wrong bearer token")
    if not credential.may(role):
        return None, (403, f"the token of {credential.name} has the {credential.role} role; this needs {role}")
    return credential, None


def actor() -> str:
    """Return the name of the credential the current request was let through with."""
    credential: Credential = g.credential
    return credential.name
