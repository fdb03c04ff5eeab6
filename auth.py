"""Who is calling the API: bearer tokens, checked in constant time, and the name and role they carry."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from functools import wraps
from typing import Any

from flask import Response, current_app, g, jsonify, request

from config import OPERATE, READ, Credential

__all__ = ["OPERATE", "READ", "actor", "authenticate", "require"]

EXTENSION = "consistency_credentials"  # where create_app keeps the accepted credentials


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


def require(role: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Let a request through only with a bearer token whose role allows `role`; `actor()` names its holder."""

    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(view)
        def checked(*args: Any, **kwargs: Any) -> Any:
            credentials: tuple[Credential, ...] = current_app.extensions[EXTENSION]
            if not credentials:
                return _refuse(401, "this endpoint needs a bearer token: set API_TOKEN or API_TOKENS_FILE")
            credential = authenticate(request.headers.get("Authorization", ""), credentials)
            if credential is None:
                return _refuse(401, "missing or wrong bearer token")
            if not credential.may(role):
                return _refuse(403, f"the token of {credential.name} has the {credential.role} role; this needs {role}")
            g.credential = credential
            return view(*args, **kwargs)

        return checked

    return decorate


def actor() -> str:
    """Return the name of the credential the current request was let through with."""
    credential: Credential = g.credential
    return credential.name


def _refuse(status: int, message: str) -> tuple[Response, int]:
    """Answer a request that is not let through, in JSON, with the scheme to use."""
    response = jsonify({"error": message})
    response.headers["WWW-Authenticate"] = "Bearer"
    return response, status
