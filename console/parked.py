"""The console's parked entries: filtered as the API filters them, oldest first, a page at a time; retry or resolve
one entry, the entries selected on a page, or every entry a filter matches. An action on several entries first shows
what it would take (the service's dry run, or the selection) and acts only when confirmed. Resolving needs a reason,
always; every action is the service's, as the signed-in credential, so it is audited as the API's are."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl, urlencode

from flask import Response, request

import auth
from actions import QUEUE_NAMES, EntryKey, Refused, Selection
from console import action, bp, done, page, refused, render, service
from console.entries import bad_entry, entry_key, problem
from domain import CycleResult, InputError
from models import REASON_MAX
from parked import ParkedFilter, ParkedPosition

PAGE = 50  # parked entries on a page, and the most one action on selected entries takes
BULK_LIMIT = 100  # the most entries one action on everything that matches takes (the API's default)
LISTING = ("queue", "account", "reason", "after")  # the query of a listing page, kept to go back to it
DOINGS = ("retry", "resolve")  # the actions on several entries, as their paths name them
NOTICE_MAX = 300  # characters of the line that says what an action did: it travels in a URL


def listing_filter() -> tuple[ParkedFilter, ParkedPosition | None]:
    """Read a listing's filter and position from the query (an empty field matches any); raise InputError if bad."""
    given = [request.args.get(name) or None for name in ("queue", "account", "reason")]
    after = request.args.get("after") or None
    return ParkedFilter(*given), None if after is None else ParkedPosition.parse(after)


@bp.get("/parked")
@page
def parked() -> Response:
    """The parked entries a filter matches, oldest first, a page at a time, each with its actions."""
    try:
        where, after = listing_filter()
    except InputError as err:
        return problem(400, "Not a filter of parked entries", str(err))
    listing = service().parked_page(where, PAGE, after)
    back = urlencode({**where.shown(), **({"after": after.token()} if after else {})})
    matching = {"queue": where.queue, "account": where.account, "parked_reason": where.reason}
    return render(
        "console/parked.html",
        listing=listing,
        where=where,
        after=after,
        queues=QUEUE_NAMES,
        back=back,
        matching={name: value for name, value in matching.items() if value is not None},
    )


@bp.post("/parked/<queue>/<queue_id>/retry")
@action
def parked_retry(queue: str, queue_id: str) -> Response:
    """Retry one parked entry now: the service records it and runs a cycle; say what became of the entry."""
    key = entry_key(queue, queue_id)
    if key is None:
        return bad_entry()
    reason = given_reason()
    if isinstance(reason, Response):
        return reason
    try:
        retried = service().actions.retry(key, auth.actor(), reason)
    except Refused as err:
        return refused(err.status, err.message)
    return back_to(f"Retry of {named(key)}: {told(retried.cycle, retried.entries[0])}.", key)


@bp.post("/parked/<queue>/<queue_id>/resolve")
@action
def parked_resolve(queue: str, queue_id: str) -> Response:
    """Resolve one parked entry, with the reason given: it is never applied."""
    key = entry_key(queue, queue_id)
    if key is None:
        return bad_entry()
    reason = given_reason(required=True)
    if isinstance(reason, Response):
        return reason
    try:
        service().actions.resolve(key, auth.actor(), reason or "")
    except Refused as err:
        return refused(err.status, err.message)
    return back_to(f"Resolved {named(key)}: it will not be applied.", key)


@bp.post("/parked/selected/<do>")
@action
def parked_selected(do: str) -> Response:
    """Retry or resolve the entries selected on a page: first show them, then act when confirmed."""
    if do not in DOINGS:
        return not_an_action()
    keys, reason = selected(), given_reason(required=do == "resolve")
    if isinstance(keys, Response):
        return keys
    if isinstance(reason, Response):
        return reason
    if request.form.get("confirm") != "yes":
        fields = [("entry", f"{key.queue}:{key.queue_id}") for key in keys]
        shown = [{"queue": key.queue, "queue_id": key.queue_id} for key in keys]
        return confirmation(do, "selected", shown, False, fields, reason)
    notice = resolve_each(keys, reason or "") if do == "resolve" else retry_each(keys, reason)
    return back_to(notice)


@bp.post("/parked/matching/<do>")
@action
def parked_matching(do: str) -> Response:
    """Retry or resolve every parked entry a filter matches, up to BULK_LIMIT: show the dry run, act when confirmed."""
    if do not in DOINGS:
        return not_an_action()
    wanted, reason = matching_selection(), given_reason(required=do == "resolve")
    if isinstance(wanted, Response):
        return wanted
    if isinstance(reason, Response):
        return reason
    try:
        dry = run_matching(do, wanted, reason)
        fields = list(wanted.shown().items())
        if request.form.get("confirm") != "yes" or request.form.get("expect") != digest(dry["entries"]):
            changed = request.form.get("confirm") == "yes"
            return confirmation(do, "matching", dry["entries"], dry["more"], fields, reason, wanted, changed)
        done_listing = run_matching(do, replace(wanted, dry_run=False), reason)
    except Refused as err:
        return refused(err.status, err.message)
    return back_to(matching_told(do, done_listing))


def not_an_action() -> Response:
    """Refuse an action on several entries that is neither a retry nor a resolve (400)."""
    return problem(400, "Not an action", "Entries are retried or resolved: /retry or /resolve.")


def given_reason(required: bool = False) -> str | Response | None:
    """Read the form's reason, without the white space around it: None when left out, a 400 page when it must be
    given or is too long."""
    reason = request.form.get("reason", "").strip() or None
    if reason is None and required:
        return problem(400, "A reason is needed", "Resolving an entry needs a reason: say why it is not to be applied.")
    if reason is not None and len(reason) > REASON_MAX:
        return problem(400, "The reason is too long", f"A reason is at most {REASON_MAX} characters.")
    return reason


def selected() -> list[EntryKey] | Response:
    """Read the entries selected on a page (each `queue:queue_id`), once each; a 400 page for none, too many or one
    that names no entry."""
    keys: list[EntryKey] = []
    for text in request.form.getlist("entry"):
        queue, _, queue_id = text.partition(":")
        key = entry_key(queue, queue_id)
        if key is None:
            return bad_entry()
        if key not in keys:
            keys.append(key)
    if not keys:
        return problem(400, "Nothing selected", "Select the entries to act on with their checkboxes first.")
    if len(keys) > PAGE:
        return problem(400, "Too many selected", f"Select at most {PAGE} entries at a time.")
    return keys


def matching_selection() -> Selection | Response:
    """Read the filter of an action on everything that matches: at least one field; a 400 page otherwise."""
    given = [request.form.get(name) or None for name in ("queue", "account", "parked_reason")]
    try:
        where = ParkedFilter(*given)
    except InputError as err:
        return problem(400, "Not a filter of parked entries", str(err))
    if not where.shown():
        return problem(400, "No filter", "Give a queue, an account or a reason to match: an action on everything "
                       "that matches never takes every parked entry.")  # fmt: skip
    return Selection(where.queue, where.reason, where.account, BULK_LIMIT, dry_run=True)


def run_matching(do: str, wanted: Selection, reason: str | None) -> dict[str, Any]:
    """Run the service's bulk action (or its dry run) as the signed-in credential; return its listing, with where each
    retried entry stands and what the cycle did."""
    if do == "resolve":
        return service().actions.resolve_matching(wanted, auth.actor(), reason or "")
    listing, retried = service().actions.retry_matching(wanted, auth.actor(), reason)
    return {**listing, "cycle": None if retried is None else retried.cycle, "retried": retried is not None}


def digest(entries: Iterable[dict[str, Any]]) -> str:
    """Name a dry run's entries in a few characters, so that a confirmation acts only on what it showed."""
    keys = ",".join(f"{entry['queue']}:{entry['queue_id']}" for entry in entries)
    return hashlib.sha256(keys.encode()).hexdigest()[:32]


def confirmation(
    do: str,
    mode: str,
    entries: Sequence[dict[str, Any]],
    more: bool,
    fields: list[tuple[str, str]],
    reason: str | None,
    wanted: Selection | None = None,
    changed: bool = False,
) -> Response:
    """Show what an action on several entries would take, with the form that confirms it."""
    return render(
        "console/parked_confirm.html",
        do=do,
        mode=mode,
        entries=entries,
        more=more,
        fields=fields,
        reason=reason,
        wanted=wanted,
        changed=changed,
        expect=digest(entries),
        back=request.form.get("back", ""),
        back_values=listing_values(),
        limit=BULK_LIMIT,
    )


def resolve_each(keys: Sequence[EntryKey], reason: str) -> str:
    """Resolve those of the selected entries still parked, in one service action and one audit record; say so."""
    try:
        resolved = service().actions.resolve_entries(keys, auth.actor(), reason)
    except Refused as err:
        return err.message
    gone = len(keys) - len(resolved)
    no_longer = f"; {gone} no longer parked" if gone else ""
    return f"Resolved {len(resolved)} of the {len(keys)} selected entries: they will not be applied{no_longer}."


def retry_each(keys: Sequence[EntryKey], reason: str | None) -> str:
    """Retry those of the selected entries still parked, in one service action and one cycle; tell the outcome."""
    try:
        retried = service().actions.retry_entries(keys, auth.actor(), reason)
    except Refused as err:
        return err.message
    if retried is None:
        return "None of the selected entries is parked now: nothing to retry."
    each = [f"{named(EntryKey(e['queue'], e['queue_id']))}: {told(retried.cycle, e)}" for e in retried.entries]
    return "; ".join([f"Retried {len(retried.entries)} of the {len(keys)} selected entries", *each]) + "."


def told(cycle: CycleResult | None, state: dict[str, Any]) -> str:
    """Say what became of an entry a retry's cycle ran: applied, still parked, resolved or released; or why the cycle
    did not run."""
    if cycle is None:
        return "recorded; the cycle is still running"
    if cycle.outcome == "skipped":
        return "recorded, but another process held the cycle turn; the next cycle retries it"
    if cycle.outcome == "paused":
        return "recorded, but applying was paused meanwhile"
    if cycle.outcome == "error":
        return f"recorded, but the cycle failed: {cycle.error}"
    return {
        "applied": f"applied ({state.get('outcome')})",
        "parked": f"still parked: {state.get('reason')} (attempt {state.get('attempts')})",
        "resolved": "resolved",
    }.get(state["result"], "released: its queue row is open again, and it is read again when it settles")


def matching_told(do: str, listing: dict[str, Any]) -> str:
    """Say what an action on everything that matches did: how many, what became of them, whether more match."""
    count, more = listing["count"], " More match: act again for the rest." if listing["more"] else ""
    if do == "resolve":
        return f"Resolved {count} entries that matched: they will not be applied.{more}"
    results: dict[str, int] = {}
    for entry in listing["entries"]:
        results[entry.get("result", "recorded")] = results.get(entry.get("result", "recorded"), 0) + 1
    cycle: CycleResult | None = listing["cycle"]
    ran = ", ".join(f"{n} {result}" for result, n in results.items()) if cycle and cycle.outcome == "ok" else None
    return f"Retried {count} entries that matched: {ran or told(cycle, {'result': 'released'})}.{more}"


def named(key: EntryKey) -> str:
    """Name an entry in a line for people."""
    return f"{key.queue} entry {key.queue_id}"


def listing_values() -> dict[str, str]:
    """Read the query of the listing page an action came from (the form's `back`), its known fields only."""
    return {name: value for name, value in parse_qsl(request.form.get("back", "")) if name in LISTING}


def back_to(notice: str, key: EntryKey | None = None) -> Response:
    """Go back after an action to the page it came from (an entry's, or a listing's), saying what was done."""
    line = notice if len(notice) <= NOTICE_MAX else notice[: NOTICE_MAX - 1] + "…"
    if key is not None and request.form.get("back") == "entry":
        return done("console.entry", line, queue=key.queue, queue_id=key.queue_id)
    return done("console.parked", line, **listing_values())
