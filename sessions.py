"""The console's sign-in sessions, kept in user-portfolio-db so that every worker and replica knows them.

A session is opened with a bearer token and names its credential. The browser holds a random id in an HttpOnly,
SameSite=Strict cookie; the database holds only the id's SHA-256, the token's SHA-256, and the CSRF token every
form of the session carries. A session ends at sign-out, after CONSOLE_IDLE_TIMEOUT seconds without a request,
or at its first request once its token is no longer accepted (rotated out of API_TOKENS_FILE).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from config import Credential
from db import Database
from queries import query

# A session seen less than this many seconds ago is not written again: one write a minute at most per session.
TOUCH_EVERY = 60.0


def digest(text: str) -> str:
    """Return the SHA-256 of a text, in hex: what the database keeps of a session id or a token."""
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Session:
    """A signed-in session: the credential it acts as, now, and the CSRF token its forms carry."""

    credential: Credential
    csrf: str


class ConsoleSessions:
    """Opens, finds and closes the console's sessions."""

    def __init__(self, portfolio_db: Database, idle_timeout: float) -> None:
        self._db = portfolio_db
        self._idle = idle_timeout

    def open(self, credential: Credential) -> str:
        """Open a session for a credential; return the id its cookie carries."""
        session_id = secrets.token_urlsafe(32)
        params = {
            "id_digest": digest(session_id),
            "name": credential.name,
            "token_digest": digest(credential.token),
            "csrf": secrets.token_urlsafe(32),
            "idle": self._idle,
        }
        with self._db.transaction() as cur:
            cur.execute(query("open_console_session"), params)
        return session_id

    def find(self, session_id: str, accepted: Sequence[Credential]) -> Session | None:
        """Return the live session a cookie names, as its token's credential is now; None if there is none."""
        key = {"id_digest": digest(session_id)}
        with self._db.transaction() as cur:
            cur.execute(query("find_console_session"), key)
            row = cur.fetchone()
            if row is None:
                return None
            _, token_digest, csrf, idle_s = row
            credential = next((c for c in accepted if digest(c.token) == token_digest), None)
            if credential is None or idle_s > self._idle:
                cur.execute(query("close_console_session"), key)
                return None
            if idle_s > TOUCH_EVERY:
                cur.execute(query("touch_console_session"), key)
        return Session(credential, csrf)

    def close(self, session_id: str) -> None:
        """End a session; nothing happens if there is none."""
        with self._db.transaction() as cur:
            cur.execute(query("close_console_session"), {"id_digest": digest(session_id)})
