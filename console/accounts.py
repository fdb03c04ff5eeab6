"""The console's page of one account: why its portfolio shows what it does (service().portfolio): its amounts now,
whether they are still those the newest completed entry of each queue left, and its journal, newest first, a page at
a time, each record's amounts before and after named by column, with the factor and the entry it came from."""

from __future__ import annotations

from typing import Any

from flask import Response, request

from console import bp, page, page_position, render, service
from console.entries import Amount, problem
from domain import QUEUES
from models import ACCOUNT_MAX
from portfolios import labels, total_label

PAGE = 50  # journal records on a page
# The portfolio's amounts as the page shows them: the values (what investments change), then the allocations.
KINDS = [(queue.portfolio_columns, [*labels(queue), total_label(queue)]) for queue in QUEUES]


@bp.get("/accounts")
@page
def accounts() -> Response:
    """An account's page, found by the number the header's search form sends (?account=)."""
    return account_page(request.args.get("account", ""))


@bp.get("/accounts/<account>")
@page
def account(account: str) -> Response:
    """An account's page, by its number in the path."""
    return account_page(account)


def account_page(account: str) -> Response:
    """Show why an account's portfolio shows what it does, its journal a page at a time below `before`."""
    if not account.strip() or len(account) > ACCOUNT_MAX:
        return problem(400, "Not an account", f"An account number is 1 to {ACCOUNT_MAX} characters, not all spaces.")
    try:
        before = page_position()
    except ValueError as err:
        return problem(400, "Not a page", str(err))
    told = service().portfolio(account, PAGE, before)
    if told is None:
        return problem(404, "No such account", f"Account {account} has neither a portfolio nor a journal record.")
    return render(
        "console/account.html",
        account=account,
        told=told,
        rows=[(record, amounts(record)) for record in told["entries"]],
        kinds=KINDS,
        before=before,
    )


def amounts(record: dict[str, Any]) -> list[Amount]:
    """List a record's amounts before and after by column, with the factor of each; none for a record without."""
    before, after, factors = record.get("before"), record.get("after"), record.get("factors") or {}
    if not isinstance(before, dict) or not isinstance(after, dict):
        return []
    return [Amount(column, before[column], after[column], factors.get(column)) for column in after]
