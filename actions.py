"""Operator actions on entries and on applying itself: retry, resolve (one or in bulk), pause and resume.

Each action is recorded in the audit trail, and on every entry it touches in the journal, in the transaction
of its effect. The actor always comes from the caller's credential.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg2.extensions

import audit
import journal
from db import Database, pg_array, plain
from domain import QUEUES, CycleResult, Pause
from queries import query

log = logging.getLogger(__name__)

Cursor = psycopg2.extensions.cursor
QUEUE_NAMES = tuple(queue.name for queue in QUEUES)
QUEUE_ID_MAX = 2**31 - 1  # queue_id is an INTEGER
FILTER_TEXT_MAX = 500  # characters of a filter's text


class Refused(Exception):
    """An action that cannot be done as asked: the HTTP status that says why, the message and what to show."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


@dataclass(frozen=True)
class EntryKey:
    """A queue entry's identity: its queue and queue_id."""

    queue: str
    queue_id: int

    def to_json(self) -> dict[str, Any]:
        """Return the identity as the audit trail and the answers show it."""
        return {"queue": self.queue, "queue_id": self.queue_id}


@dataclass(frozen=True)
class Selection:
    """Which parked entries a bulk action takes: a filter (fields left out match every entry) and a bound."""

    queue: str | None
    parked_reason: str | None
    account: str | None
    limit: int
    dry_run: bool

    def shown(self) -> dict[str, str]:
        """Return the filter as given, for the audit trail and the answer."""
        fields = {"queue": self.queue, "parked_reason": self.parked_reason, "account": self.account}
        return {name: value for name, value in fields.items() if value is not None}


@dataclass(frozen=True)
class Parked:
    """A parked entry as an action finds it."""

    queue: str
    queue_id: int
    uuid: str | None
    account_number: str | None
    status: str | None
    reason: str
    attempts: int
    parked_at: datetime
    last_attempt_at: datetime

    @property
    def key(self) -> EntryKey:
        """Return the entry's identity."""
        return EntryKey(self.queue, self.queue_id)

    def to_json(self) -> dict[str, Any]:
        """Return the entry as the parked listing shows it."""
        return {name: plain(value) for name, value in vars(self).items()}


@dataclass(frozen=True)
class Retried:
    """What became of a retry: the cycle that ran it (None if still running after TRIGGER_WAIT), and the entries."""

    cycle: CycleResult | None
    entries: list[dict[str, Any]]


def read_pause(cur: Cursor) -> Pause | None:
    """Return the pause in force, read in the caller's transaction, or None while applying goes on."""
    cur.execute(query("select_pause"))
    row = cur.fetchone()
    return None if row is None else Pause(*row)


def _keys(keys: Sequence[EntryKey]) -> dict[str, str]:
    """Write entry identities as the two array parameters the action queries take."""
    return {"queues": pg_array(k.queue for k in keys), "queue_ids": pg_array(k.queue_id for k in keys)}


def _lock(cur: Cursor, keys: Sequence[EntryKey]) -> list[Parked]:
    """Lock the given entries' parked rows until the caller's transaction ends; return those parked."""
    cur.execute(query("lock_parked_entries"), _keys(keys))
    return [Parked(*row) for row in cur.fetchall()]


def _matching(cur: Cursor, selection: Selection) -> tuple[list[Parked], bool]:
    """Find (and lock, unless a dry run) the parked entries a filter matches, up to its limit; and whether more do."""
    params = {"queue": selection.queue, "account": selection.account, "parked_reason": selection.parked_reason}
    name = "select_parked_matching" if selection.dry_run else "lock_parked_matching"
    cur.execute(query(name), {**params, "limit": selection.limit + 1})
    rows = [Parked(*row) for row in cur.fetchall()]
    return rows[: selection.limit], len(rows) > selection.limit


def _states(cur: Cursor, keys: Sequence[EntryKey]) -> list[dict[str, Any]]:
    """Tell where each entry stands: still parked, applied (with its outcome), resolved, or released.

    A queue row that came to carry another transaction is another entry: its parking, or else the newer of its
    latest application and its resolution, tells where it stands.
    """
    cur.execute(query("select_entry_states"), _keys(keys))
    states = []
    for queue, queue_id, applied, applied_at, resolved_by, resolved_at, reason, attempts in cur.fetchall():
        state: dict[str, Any] = {"queue": queue, "queue_id": queue_id}
        if reason is not None:
            state.update(result="parked", reason=reason, attempts=attempts)
        elif applied is not None and (resolved_at is None or applied_at > resolved_at):
            state.update(result="applied", outcome=applied)
        elif resolved_by is not None:
            state.update(result="resolved", resolved_by=resolved_by, resolved_at=resolved_at.isoformat())
        else:  # its queue row is open again, or there never was such an entry
            state.update(result="released")
        states.append(state)
    return states


def _not_parked(cur: Cursor, key: EntryKey) -> Refused:
    """Explain why an action on one entry finds it not parked: 404, naming what became of it."""
    (state,) = _states(cur, [key])
    told = {
        "applied": f"it was applied as {state.get('outcome')}",
        "resolved": f"it was resolved by {state.get('resolved_by')}",
    }.get(state["result"], "no such entry is parked")
    return Refused(404, f"{key.queue} entry {key.queue_id} is not parked: {told}", state=state["result"])


def _refuse_if_applied(cur: Cursor, entries: Sequence[Parked]) -> None:
    """Refuse to resolve entries that have a ledger record: they were applied, and applied entries stay so."""
    params = {**_keys([e.key for e in entries]), "uuids": pg_array(e.uuid for e in entries)}
    cur.execute(query("select_ledger_records"), params)
    applied = [f"{queue} entry {queue_id}" for queue, queue_id in cur.fetchall()]
    if applied:
        raise Refused(409, f"applied, so not resolved: {', '.join(applied)}")


def _refuse_if_paused(cur: Cursor) -> None:
    """Refuse a retry while applying is paused: the cycle would apply nothing."""
    pause = read_pause(cur)
    if pause is not None:
        message = f"applying is paused by {pause.paused_by} since {pause.paused_at.isoformat()}; resume it first"
        raise Refused(409, message, result="paused", pause=pause.to_json())


def _note_retries(cur: Cursor, entries: Sequence[Parked], actor: str, reason: str | None) -> None:
    """Write a journal record of the retry against each entry."""
    for e in entries:
        journal.record(
            cur, e.queue, e.queue_id, journal.RETRIED, account=e.account_number, status=e.status,
            reason=reason, attempts=e.attempts, actor=actor,
        )  # fmt: skip


def _resolve(cur: Cursor, entries: Sequence[Parked], actor: str, reason: str) -> list[dict[str, Any]]:
    """Move locked parked entries to the resolved ones, each with its journal record; describe each."""
    cur.execute(query("resolve_parked_entries"), {**_keys([e.key for e in entries]), "actor": actor, "reason": reason})
    stored = {(queue, queue_id): at for queue, queue_id, at in cur.fetchall()}
    resolved = []
    for e in entries:
        journal.record(
            cur, e.queue, e.queue_id, journal.RESOLVED, account=e.account_number, status=e.status,
            reason=reason, attempts=e.attempts, actor=actor,
        )  # fmt: skip
        at = stored.get((e.queue, e.queue_id))
        when = None if at is None else at.isoformat()
        resolved.append({**e.to_json(), "resolved_by": actor, "resolved_at": when, "resolved_reason": reason})
    return resolved


def _listing(selection: Selection, entries: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    """Describe what a bulk action took: its filter, how many entries, whether more match, and the entries."""
    return {"dry_run": selection.dry_run, "filter": selection.shown(), "count": len(entries), "more": more,
            "entries": entries}  # fmt: skip


def _bulk_target(selection: Selection, entries: Sequence[Parked]) -> dict[str, Any]:
    """What a bulk action touched, for the audit trail: the filter, the count and the entries."""
    keys = [e.key.to_json() for e in entries]
    return {"filter": selection.shown(), "limit": selection.limit, "count": len(entries), "entries": keys}


def _selected_target(asked: Sequence[EntryKey], entries: Sequence[Parked]) -> dict[str, Any]:
    """What an action on entries named one by one touched, for the audit trail: how many asked, how many, which."""
    return {"selected": len(asked), "count": len(entries), "entries": [e.key.to_json() for e in entries]}


class Actions:
    """Operator actions on parked entries and on applying itself, each audited in the transaction of its effect."""

    def __init__(
        self,
        portfolio_db: Database,
        trigger: Callable[[], CycleResult | None],
        wake: Callable[[], None],
        changed: Callable[[], None],
    ) -> None:
        self._portfolio_db = portfolio_db
        self._trigger = trigger  # runs a cycle now (Poller.trigger): every cycle retries every parked entry
        self._wake = wake  # has this process's next cycle start now
        self._changed = changed  # has the next status request read the stored state again

    def retry(self, key: EntryKey, actor: str, reason: str | None) -> Retried:
        """Record a retry of one parked entry, run a cycle now, and tell what became of the entry."""
        with self._portfolio_db.transaction() as cur:
            entries = _lock(cur, [key])
            if not entries:
                raise _not_parked(cur, key)
            _refuse_if_paused(cur)
            _note_retries(cur, entries, actor, reason)
            (entry,) = entries
            detail = {"parked_reason": entry.reason, "attempts": entry.attempts}
            audit.record(cur, actor, audit.RETRY, key.to_json(), reason, detail)
        return self._run([key])

    def retry_matching(
        self, selection: Selection, actor: str, reason: str | None
    ) -> tuple[dict[str, Any], Retried | None]:
        """Record a retry of the entries a filter matches and run a cycle; a dry run only lists them (no cycle)."""
        with self._portfolio_db.transaction() as cur:
            entries, more = _matching(cur, selection)
            if selection.dry_run or not entries:
                return _listing(selection, [e.to_json() for e in entries], more), None
            _refuse_if_paused(cur)
            _note_retries(cur, entries, actor, reason)
            audit.record(cur, actor, audit.RETRY, _bulk_target(selection, entries), reason)
        retried = self._run([e.key for e in entries])
        return _listing(selection, retried.entries, more), retried

    def retry_entries(self, keys: Sequence[EntryKey], actor: str, reason: str | None) -> Retried | None:
        """Record a retry of those of the named entries still parked, in one audit record, and run one cycle for all;
        None when none of them is parked."""
        with self._portfolio_db.transaction() as cur:
            entries = _lock(cur, keys)
            if not entries:
                return None
            _refuse_if_paused(cur)
            _note_retries(cur, entries, actor, reason)
            audit.record(cur, actor, audit.RETRY, _selected_target(keys, entries), reason)
        return self._run([e.key for e in entries])

    def resolve_entries(self, keys: Sequence[EntryKey], actor: str, reason: str) -> list[dict[str, Any]]:
        """Dismiss those of the named entries still parked, in one transaction and one audit record; return them."""
        with self._portfolio_db.transaction() as cur:
            entries = _lock(cur, keys)
            if not entries:
                return []
            _refuse_if_applied(cur, entries)
            resolved = _resolve(cur, entries, actor, reason)
            audit.record(cur, actor, audit.RESOLVE, _selected_target(keys, entries), reason)
        self._changed()
        return resolved

    def resolve(self, key: EntryKey, actor: str, reason: str) -> dict[str, Any]:
        """Dismiss one parked entry for good, without applying it; return it as resolved."""
        with self._portfolio_db.transaction() as cur:
            entries = _lock(cur, [key])
            if not entries:
                raise _not_parked(cur, key)
            _refuse_if_applied(cur, entries)
            (resolved,) = _resolve(cur, entries, actor, reason)
            (entry,) = entries
            detail = {"uuid": entry.uuid, "account_number": entry.account_number, "status": entry.status,
                      "parked_reason": entry.reason, "attempts": entry.attempts}  # fmt: skip
            audit.record(cur, actor, audit.RESOLVE, key.to_json(), reason, detail)
        self._changed()
        return resolved

    def resolve_matching(self, selection: Selection, actor: str, reason: str) -> dict[str, Any]:
        """Dismiss the parked entries a filter matches, up to its limit (or list them, in a dry run)."""
        with self._portfolio_db.transaction() as cur:
            entries, more = _matching(cur, selection)
            if selection.dry_run or not entries:
                return _listing(selection, [e.to_json() for e in entries], more)
            _refuse_if_applied(cur, entries)
            resolved = _resolve(cur, entries, actor, reason)
            audit.record(cur, actor, audit.RESOLVE, _bulk_target(selection, entries), reason)
        self._changed()
        return _listing(selection, resolved, more)

    def pause(self, actor: str, reason: str) -> Pause:
        """Pause applying in every process and replica; refuse (409) when it is paused already."""
        with self._portfolio_db.transaction() as cur:
            cur.execute(query("insert_pause"), {"actor": actor, "reason": reason})
            row = cur.fetchone()
            if row is None:
                current = read_pause(cur)
                raise _already_paused(current)
            pause = Pause(*row)
            audit.record(cur, actor, audit.PAUSE, {"applying": "paused"}, reason, pause.to_json())
        self._changed()
        log.warning("applying paused by %s: %s", actor, reason, extra={"event": "pause", "actor": actor})
        return pause

    def resume(self, actor: str, reason: str | None) -> dict[str, Any]:
        """End the pause, so that every process applies again; refuse (409) when applying is not paused."""
        with self._portfolio_db.transaction() as cur:
            cur.execute(query("delete_pause"))
            row = cur.fetchone()
            if row is None:
                raise Refused(409, "applying is not paused", pause=None)
            ended = Pause(*row)
            lasted = round((datetime.now(UTC) - ended.paused_at).total_seconds(), 1)
            detail = {"pause": ended.to_json(), "paused_for_s": lasted}
            audit.record(cur, actor, audit.RESUME, {"applying": "resumed"}, reason, detail)
        self._changed()
        self._wake()
        log.warning("applying resumed by %s after %gs", actor, lasted, extra={"event": "resume", "actor": actor})
        return {"resumed_by": actor, "pause": ended.to_json(), "paused_for_s": lasted}

    def _run(self, keys: Sequence[EntryKey]) -> Retried:
        """Run a cycle now, then read where each entry stands."""
        cycle = self._trigger()
        with self._portfolio_db.transaction() as cur:
            return Retried(cycle, _states(cur, keys))


def _already_paused(current: Pause | None) -> Refused:
    """Refuse a second pause, naming the one in force."""
    if current is None:  # resumed between the two statements
        return Refused(409, "applying was paused and resumed meanwhile; try again", pause=None)
    message = f"applying is already paused by {current.paused_by} since {current.paused_at.isoformat()}"
    return Refused(409, message, pause=current.to_json())
