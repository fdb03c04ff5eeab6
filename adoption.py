"""Adopting the service on a running system: the baseline before which settled entries are not applied."""

from __future__ import annotations

from config import Settings
from db import Database


class Adoption:
    """Adopting the service on a running system: the baseline before which settled entries are not applied."""

    def __init__(self, settings: Settings, queue_db: Database, portfolio_db: Database) -> None:
        self.settings = settings
        self.queue_db = queue_db
        self.portfolio_db = portfolio_db
