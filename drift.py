"""Drift checks: proof that the queue, the ledger and the portfolio transactions agree, chunk by chunk."""

from __future__ import annotations

from config import Settings
from db import Database


class DriftChecks:
    """Drift checks: proof that the queue, the ledger and the portfolio transactions agree, chunk by chunk."""

    def __init__(self, settings: Settings, queue_db: Database, portfolio_db: Database) -> None:
        self.settings = settings
        self.queue_db = queue_db
        self.portfolio_db = portfolio_db
