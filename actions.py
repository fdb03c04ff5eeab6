"""Operator actions on entries and on applying itself: retry, resolve (one or in bulk), pause and resume."""

from __future__ import annotations

from config import Settings
from db import Database


class Actions:
    """Operator actions on entries and on applying itself: retry, resolve (one or in bulk), pause and resume."""

    def __init__(self, settings: Settings, queue_db: Database, portfolio_db: Database) -> None:
        self.settings = settings
        self.queue_db = queue_db
        self.portfolio_db = portfolio_db
