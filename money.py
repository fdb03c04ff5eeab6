"""Exact decimal arithmetic for portfolio amounts."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

CENT = Fraction(1, 100)
# NUMERIC(15, 2) holds amounts below 10^13.
AMOUNT_LIMIT = Decimal(10) ** 13


def round_cents(exact: Fraction) -> Decimal:
    """Round an exact amount to 2 decimals, half away from zero."""
    cents, remainder = divmod(abs(exact) / CENT, 1)
    if remainder >= Fraction(1, 2):
        cents += 1
    return Decimal(int(cents) * (1 if exact >= 0 else -1)).scaleb(-2)


def scale(amount: Decimal, factor: Fraction) -> Decimal:
    """Multiply an amount by an exact factor, rounded to cents."""
    return round_cents(Fraction(amount) * factor)
