"""The named tokens the tests call the API with: a reader and an operator, and their Authorization headers."""

from __future__ import annotations

from config import Credential

READER = Credential("dashboard", "read", "reader-token-0123456789")
OPERATOR = Credential("alice", "operate", "alice-token-0123456789")


def bearer(credential: Credential) -> dict[str, str]:
    """Headers that carry a credential's token."""
    return {"Authorization": f"Bearer {credential.token}"}
