"""The OpenAPI document the service serves, as the tests read it: built from the models, as the app builds it."""

from __future__ import annotations

from functools import cache
from typing import Any


@cache
def openapi_document() -> dict[str, Any]:
    """The document of an app on the default settings; building the app connects to nothing."""
    from config import Settings
    from consistency_manager_svc import create_app

    document: dict[str, Any] = create_app(Settings()).api_doc  # type: ignore[attr-defined]
    return document
