"""Exact decimal arithmetic for portfolio amounts."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

# NUMERIC(15, 2) holds amounts below 10^13.
AMOUNT_LIMIT = Decimal(10) ** 13


def scale(amount: Decimal, factor: Fraction) -> Decimal:
    """Multiply an amount by an exact factor, rounded half away from zero to cents.

    Whole numbers of cents keep it exact and fast: amount * n / d, with the remainder deciding the
    rounding.
    """
    numerator = int(amount.scaleb(2)) * factor.numerator  # amount has 2 decimals: exact
    cents, remainder = divmod(abs(numerator), factor.denominator)
    if 2 * remainder >= factor.denominator:
        cents += 1
    return Decimal(-cents if numerator < 0 else cents).scaleb(-2)
