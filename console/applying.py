"""The console's applying page: pause and resume applying, the tier values now and their history, and an update of
them, checked as the API checks it (models.TierUpdate) and shown old against new before it is stored."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from flask import Response, request
from pydantic import BaseModel, ValidationError

import tiers
from actions import Refused
from auth import actor
from console import action, bp, done, page, page_position, refused, render, service
from domain import TIER_KEYS
from models import RequiredReason, TierUpdate

HISTORY_SIZE = 20  # changes of tier values on a page of their history
VERSION_DIGITS = 19  # a version is a history id: a BIGINT


@dataclass(frozen=True)
class Change:
    """One of the six tier values as a confirmation shows it: now, after the update, and by how much it changes."""

    key: str
    now: str
    after: str
    by: str


@dataclass(frozen=True)
class DeltaChange:
    """One tier's delta (del_tN = (TIERN_MV - TIERN) / TIERN) now and after the update."""

    name: str
    now: str
    after: str


def problems_of(err: ValidationError) -> dict[str, str]:
    """Say what is wrong with each field a model refused, by field ("" for the whole form), as the API says it."""
    found: dict[str, str] = {}
    for each in err.errors(include_url=False):
        field = ".".join(str(part) for part in each["loc"])
        found.setdefault(field, each["msg"].removeprefix("Value error, "))
    return found


def checked(model: type[BaseModel], fields: dict[str, str]) -> tuple[Any, dict[str, str]]:
    """Check form fields with an API model, blank ones left out; return the model, or None and the problems."""
    given = {name: value.strip() for name, value in fields.items() if value.strip()}
    try:
        return model.model_validate(given), {}
    except ValidationError as err:
        return None, problems_of(err)


def tier_form() -> dict[str, str]:
    """Return the tier update's fields as sent: the six values and the reason."""
    return {name: request.form.get(name, "") for name in (*TIER_KEYS, "reason")}


def newest_version() -> int:
    """Return the id of the newest change of the tier values, which names the values in force."""
    newest = service().tier_history(1, None)["entries"]
    return int(newest[0]["id"]) if newest else 0


def changes_shown(now: dict[str, Any], update: TierUpdate) -> tuple[list[Change], list[DeltaChange]]:
    """Show an update against the values now: each value given, old and new, and each tier's delta, old and new."""
    given = update.changes()
    after = {key: given.get(key, Decimal(now[key])) for key in TIER_KEYS}
    values = [
        Change(key, now[key], tiers.plain_decimal(after[key]), _signed(after[key] - Decimal(now[key])))
        for key in TIER_KEYS
        if key in given
    ]
    deltas = []
    for n in (1, 2, 3):
        tier = tiers.Tier(after[f"TIER{n}"], after[f"TIER{n}_MV"])
        deltas.append(DeltaChange(f"del_t{n}_mv", now["deltas"][f"del_t{n}_mv"], tiers.shown_delta(tier)))
    return values, deltas


def _signed(difference: Decimal) -> str:
    """Show a difference with its sign."""
    shown = tiers.plain_decimal(difference)
    return shown if difference < 0 else f"+{shown}"


def applying_page(code: int = 200, **context: Any) -> Response:
    """Render the applying page, with what the caller adds: a problem, the update's fields and their problems."""
    try:
        before = page_position()
    except ValueError as err:
        return refused(400, str(err))
    shown: dict[str, Any] = {"problem": None, "fields": dict.fromkeys((*TIER_KEYS, "reason"), ""), "problems": {}}
    shown.update(context)
    status = service().status()
    changes = service().tier_history(HISTORY_SIZE, before)
    return render("console/applying.html", code, status=status, tiers_now=status["tiers"], tier_keys=TIER_KEYS,
                  changes=changes, before=before, **shown)  # fmt: skip


def confirmation(update: TierUpdate, code: int = 200, problem: str | None = None) -> Response:
    """Render the confirmation of a tier update: old and new values and deltas, and the button that stores them."""
    now = service().status()["tiers"]
    values, deltas = changes_shown(now, update)
    hidden = {key: tiers.plain_decimal(value) for key, value in update.changes().items()}
    return render("console/tiers_confirm.html", code, values=values, deltas=deltas, hidden=hidden,
                  reason=update.reason, version=newest_version(), problem=problem)  # fmt: skip


@bp.get("/applying")
@page
def applying() -> Response:
    """Whether applying goes on, who paused it and why; the tier values now, their history and the update form."""
    return applying_page()


@bp.post("/applying/pause")
@action
def pause_applying() -> Response:
    """Pause applying everywhere, with a required reason, as the session's token; refused when it is paused."""
    wanted, problems = checked(RequiredReason, {"reason": request.form.get("reason", "")})
    if wanted is None:
        return applying_page(400, problem=f"A pause needs a reason: {problems['reason']}.")
    try:
        service().actions.pause(actor(), wanted.reason)
    except Refused as err:
        return applying_page(err.status, problem=f"Not paused: {err.message}.")
    return done("console.applying", "Applying is paused")


@bp.post("/applying/resume")
@action
def resume_applying() -> Response:
    """End the pause, with a required reason, as the session's token; refused when applying is not paused."""
    wanted, problems = checked(RequiredReason, {"reason": request.form.get("reason", "")})
    if wanted is None:
        return applying_page(400, problem=f"A resume needs a reason: {problems['reason']}.")
    try:
        resumed = service().actions.resume(actor(), wanted.reason)
    except Refused as err:
        return applying_page(err.status, problem=f"Not resumed: {err.message}.")
    return done("console.applying", f"Applying resumed after {resumed['paused_for_s']:g} s of pause")


@bp.post("/applying/tiers/review")
@action
def review_tier_update() -> Response:
    """Check a tier update as the API does and show it old against new, to be confirmed; store nothing."""
    fields = tier_form()
    update, problems = checked(TierUpdate, fields)
    if update is None:
        return applying_page(400, fields=fields, problems=problems, problem="Nothing is stored: fix the values.")
    return confirmation(update)


@bp.post("/applying/tiers")
@action
def update_tier_values() -> Response:
    """Store a confirmed tier update, audited as the session's token, unless the values changed since its review."""
    fields = tier_form()
    update, problems = checked(TierUpdate, fields)
    if update is None:
        return applying_page(400, fields=fields, problems=problems, problem="Nothing is stored: fix the values.")
    version = request.form.get("version", "")
    if not version.isascii() or not version.isdigit() or len(version) > VERSION_DIGITS:
        return refused(400, "version must be the version the update was reviewed against: a whole number")
    try:
        service().update_tiers(update.changes(), actor(), update.reason, expected_version=int(version))
    except tiers.TiersChanged:
        problem = "The tier values changed since this update was reviewed: nothing is stored. Review it again."
        return confirmation(update, 409, problem)
    return done("console.applying", f"Tier values updated: {', '.join(update.changes())}")
