"""The console's drift checks: every check kept, newest first, a page at a time, and a button to start one; and one
check's report, its findings grouped by kind, each naming its entry and account with links to their pages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Response, request
from pydantic import ValidationError

from auth import actor
from console import action, bp, done, page, page_position, refused, render, service
from domain import DRIFT_KINDS
from drift import CheckRunning
from models import DriftCheckRequest

PAGE_SIZE = 20  # checks on a page of the history
FINDINGS_SHOWN = 100  # findings of a kind on a page of a report
# What each kind of finding means, as docs/concepts/drift-checks.md says it.
KIND_TEXT = {
    "unapplied_entry": "Settled queue entries at or behind the watermark with no ledger record, neither parked nor "
    "resolved",
    "changed_entry": "Ledger records whose queue row is gone, or whose queue status changed since it was applied",
    "changed_transaction": "Portfolio transactions whose status differs from the outcome the ledger applied",
    "unrecorded_transaction": "PROCESSED portfolio transactions that no ledger record settled",
    "reused_entry": "Ledger records whose queue row now carries another transaction",
}


@dataclass(frozen=True)
class KindFindings:
    """The findings of one kind in a report, as a page shows them: how many there were, kept, and shown from where."""

    kind: str
    text: str
    counted: int
    kept: int
    start: int
    shown: list[dict[str, Any]]

    @property
    def next_start(self) -> int | None:
        """Where the next page of this kind's kept findings starts, or None when this page shows the last."""
        following = self.start + len(self.shown)
        return following if following < self.kept else None


def grouped(report: dict[str, Any], only: str | None, start: int) -> list[KindFindings]:
    """Group a report's findings by kind, each cut to a page: from `start` for the kind `only`, else from the first."""
    groups = []
    for kind in DRIFT_KINDS if only is None else (only,):
        kept = [finding for finding in report["findings"] if finding["kind"] == kind]
        first = start if kind == only else 0
        shown = kept[first : first + FINDINGS_SHOWN]
        groups.append(KindFindings(kind, KIND_TEXT[kind], report["counts"].get(kind, 0), len(kept), first, shown))
    return groups


def history(before: int | None, **context: Any) -> Response:
    """Render the history of checks from a position, with what the caller adds (a problem, and its status)."""
    code = context.pop("code", 200)
    checks = service().drift.page(PAGE_SIZE, before)
    return render("console/drift_checks.html", code, checks=checks, before=before, kinds=DRIFT_KINDS, **context)


@bp.get("/drift-checks")
@page
def drift_checks() -> Response:
    """Every drift check kept, newest first, with its counts by kind; and the button to start one."""
    try:
        before = page_position()
    except ValueError as err:
        return refused(400, str(err))
    return history(before, problem=None, reason="")


@bp.post("/drift-checks")
@action
def start_drift_check() -> Response:
    """Start a drift check with an optional reason, audited under the session's token; refused while one runs."""
    reason = request.form.get("reason", "").strip()
    try:
        wanted = DriftCheckRequest(reason=reason or None)
    except ValidationError as err:
        problem = f"The reason: {err.errors(include_url=False)[0]['msg']}."
        return history(None, code=400, problem=problem, reason=reason)
    try:
        check = service().drift.request(actor(), wanted.reason)
    except CheckRunning as running:
        problem = f"Drift check {running.check_id} is running: a new one can start once it has finished."
        return history(None, code=409, problem=problem, running=running.check_id, reason=reason)
    return done("console.drift_report", f"Drift check {check['id']} started", check_id=check["id"])


@bp.get("/drift-checks/<int:check_id>")
@page
def drift_report(check_id: int) -> Response:
    """One check's report: its state and counts, and its findings grouped by kind, a page of each."""
    only = request.args.get("kind") or None
    try:
        start = page_position("start") or 0
    except ValueError as err:
        return refused(400, str(err))
    if only is not None and only not in DRIFT_KINDS:
        return refused(400, f"there is no kind of finding {only!r}")
    report = service().drift.report(check_id)
    if report is None:
        return render("console/drift_report.html", 404, report=None, check_id=check_id)
    groups = grouped(report, only, start)
    return render("console/drift_report.html", report=report, check_id=check_id, groups=groups, only=only,
                  texts=KIND_TEXT)  # fmt: skip
