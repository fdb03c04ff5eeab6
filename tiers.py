"""Tier pool and market values: stored, validated, changed with a history, and their deltas."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Any

import psycopg2.extensions

from db import Database, fetch_page
from domain import Queue
from queries import query

# Deltas are shown to this many places; the cycle itself uses exact fractions.
DELTA_PLACES = Decimal("1e-12")
# Enough digits for any delta the limits allow: below 10^20 (a market under 10^12 over a pool of 10^-8),
# shown to 12 places.
DELTA_DIGITS = 40


class TiersNotStored(RuntimeError):
    """The state schema holds no tier values yet: the service has not finished starting."""


class TiersChanged(RuntimeError):
    """The tier values changed since the version an update was reviewed against: nothing was stored."""


@dataclass(frozen=True)
class Tier:
    """One tier's pool value (TIERn) and market value (TIERn_MV)."""

    pool: Decimal
    market: Decimal

    @property
    def delta(self) -> Fraction:
        """Return del_tN = (TIERN_MV - TIERN) / TIERN, exactly."""
        return (Fraction(self.market) - Fraction(self.pool)) / Fraction(self.pool)

    @property
    def invest_factor(self) -> Fraction:
        """Return the factor a completed investment applies to tier values: 1 + del."""
        return 1 + self.delta

    @property
    def withdraw_factor(self) -> Fraction:
        """Return the factor a completed withdrawal applies to tier allocations: 1 - del."""
        return 1 - self.delta


Tiers = tuple[Tier, ...]  # three, in tier order


def shown_delta(tier: Tier) -> str:
    """Return a tier's delta as a decimal string for people to read."""
    return shown_fraction(tier.delta)


def shown_fraction(value: Fraction) -> str:
    """Return an exact fraction, such as a delta or a factor, as a decimal string to 12 places for people to read."""
    with localcontext() as ctx:
        ctx.prec = DELTA_DIGITS
        return plain_decimal((Decimal(value.numerator) / Decimal(value.denominator)).quantize(DELTA_PLACES))


def factors_for(queue: Queue, current: Tiers) -> tuple[Fraction, ...]:
    """Return the exact factor per tier that a completed entry of this queue applies."""
    if queue.portfolio_columns == "values":
        return tuple(t.invest_factor for t in current)
    return tuple(t.withdraw_factor for t in current)


def plain_decimal(value: Decimal) -> str:
    """Show a decimal without trailing zeros or an exponent."""
    return format(value.normalize(), "f")


def tiers_json(tiers: Tiers) -> dict[str, Any]:
    """Describe tier values and deltas for the API."""
    described: dict[str, Any] = {}
    for n, tier in enumerate(tiers, start=1):
        described[f"TIER{n}"] = plain_decimal(tier.pool)
        described[f"TIER{n}_MV"] = plain_decimal(tier.market)
    described["deltas"] = {f"del_t{n}_mv": shown_delta(t) for n, t in enumerate(tiers, start=1)}
    return described


def seed(cur: psycopg2.extensions.cursor, values: tuple[tuple[Decimal, Decimal], ...]) -> None:
    """Store the configured tier values unless values are stored already."""
    cur.execute(
        query("seed_tier_values"),
        {
            "tiers": [1, 2, 3],
            "pools": [pool for pool, _ in values],
            "markets": [market for _, market in values],
        },
    )


def load(cur: psycopg2.extensions.cursor, lock: bool = False) -> Tiers:
    """Return the stored tier values, optionally locked for an update."""
    cur.execute(query("lock_tier_values" if lock else "select_tier_values"))
    rows = cur.fetchall()
    if len(rows) != 3:
        raise TiersNotStored("tier values are not stored yet")
    return tuple(Tier(pool, market) for _, pool, market in rows)


def load_in_force(cur: psycopg2.extensions.cursor) -> tuple[Tiers, int]:
    """Return the stored tier values and the newest tier_value_history id, which names them, in one snapshot."""
    cur.execute(query("select_tier_values_in_force"))
    rows = cur.fetchall()
    if len(rows) != 3:
        raise TiersNotStored("tier values are not stored yet")
    return tuple(Tier(pool, market) for _, pool, market, _ in rows), rows[0][3]


def update(cur: psycopg2.extensions.cursor, changes: dict[str, Decimal], expected_version: int | None = None) -> Tiers:
    """Apply a validated update to the stored values, all or nothing, keeping a history; with `expected_version`,
    only if the values in force are still that version (the newest history id), checked under the rows' lock."""
    current = load(cur, lock=True)
    if expected_version is not None and load_in_force(cur)[1] != expected_version:
        raise TiersChanged(f"the tier values are no longer version {expected_version}")
    result = []
    for n, tier in enumerate(current, start=1):
        pool = changes.get(f"TIER{n}", tier.pool)
        market = changes.get(f"TIER{n}_MV", tier.market)
        if (pool, market) != (tier.pool, tier.market):
            cur.execute(query("update_tier_value"), {"tier": n, "pool": pool, "market": market})
        result.append(Tier(pool, market))
    return tuple(result)


def history(portfolio_db: Database, limit: int, before: int | None) -> dict[str, Any]:
    """List the changes of the tier values, newest first, `limit` at a time below the id `before`: each tier's pool
    and market values before (None for the seed) and after, and when; one walk of the primary key, however long."""
    with portfolio_db.transaction() as cur:
        page = fetch_page(cur, "list_tier_history", {"before": before}, limit)
    amounts = ("old_pool", "new_pool", "old_market", "new_market")
    shown = [{**change, **{key: _plain_text(change[key]) for key in amounts}} for change in page["entries"]]
    return {**page, "entries": shown}


def _plain_text(value: str | None) -> str | None:
    """Show a stored amount (as json_rows gives it) without trailing zeros."""
    return None if value is None else plain_decimal(Decimal(value))
