"""The HTTP API's models: what each endpoint takes (path, query, body) and what it answers.

pydantic validates requests from them and flask-openapi3 writes the OpenAPI document from them (api.py), so the
document and the checks cannot drift apart. Every model refuses fields it does not name. What a model cannot say
by its types (the prose, the examples) is written here, next to it: a model's docstring is its description.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictInt,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from audit import Action
from config import check_tier_value
from domain import BASELINE_SOURCES, COUNT_KEYS, DRIFT_KINDS, TIER_KEYS, InputError, Mode, Outcome, QueueName
from parked import ParkedFilter, ParkedPosition

QUEUE_ID_MAX = 2**31 - 1  # queue_id is an INTEGER
LIMIT_MAX = 1000  # rows a listing or a bulk action takes at most
POSITION_MAX = 999_999_999_999_999_999  # a paged listing's `before`: an id
REASON_MAX = 500  # characters of an operator's reason, or of a bulk action's filter text
ACCOUNT_MAX = 64  # characters of an account number in a path or a query

Reason = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=REASON_MAX, pattern=r"\S")]
FilterText = Annotated[str, StringConstraints(min_length=1, max_length=REASON_MAX, pattern=r"\S")]
Account = Annotated[str, StringConstraints(min_length=1, max_length=ACCOUNT_MAX, pattern=r"\S")]
Limit = Annotated[int, Field(ge=1, le=LIMIT_MAX, description="how many to take, from 1 to 1000")]
# A time in an answer, as the service writes it: ISO 8601 text (isoformat: +00:00, not Z). Checked as text, not
# parsed and written again: that was a third of the time api.answer took for /status (65 µs, now 41 µs).
Time = Annotated[
    str,
    StringConstraints(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d(:\d\d)?|Z)?$"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
Before = Annotated[
    int | None, Field(ge=0, le=POSITION_MAX, description="the `next_before` of the page before; none for the first")
]


class Model(BaseModel):
    """A request or answer: it names every field it takes."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The model's JSON schema. flask-openapi3 asks for the default one at every request it validates, and
        pydantic makes it anew each time (a third of a request's time): it is made once per model here."""
        if args or kwargs:
            return super().model_json_schema(*args, **kwargs)
        return _default_schema(cls)


@functools.cache
def _default_schema(model: type[Model]) -> dict[str, Any]:
    """Make a model's default JSON schema, once."""
    return super(Model, model).model_json_schema()


# Requests: path, query and body. --------------------------------------------------------------------------------


# A parked listing's position, as parked.ParkedPosition shows it: 2026-12-01T22:05:26.115042Z~investment~17.
POSITION_TEXT = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z~[a-z]+~\d{1,10}$"


def _position(token: Any) -> ParkedPosition:
    """Read a parked listing's position (a `next_after`) from its text."""
    if not isinstance(token, str):
        raise ValueError("give the next_after of the page before")
    try:
        return ParkedPosition.parse(token)
    except InputError as err:
        raise ValueError(err.message) from None


ParkedAfter = Annotated[
    ParkedPosition,
    PlainValidator(_position),
    WithJsonSchema({"type": "string", "pattern": POSITION_TEXT, "description": "a page's next_after"}),
]


class NoQuery(Model):
    """No query parameter: any one given is refused, named."""


class Page(Model):
    """A page of a listing, newest first: `limit` rows, below `before` (the `next_before` of the page before)."""

    limit: Limit = 100
    before: Before = None


class AuditQuery(Page):
    """A page of the audit trail, of one action and one actor when given."""

    action: Action | None = Field(None, description="only actions of this kind")
    actor: FilterText | None = Field(None, description="only actions of this token's name")

    def filter(self) -> dict[str, str]:
        """The filters given, as the answer shows them."""
        return {name: value for name, value in (("action", self.action), ("actor", self.actor)) if value is not None}


class Listing(Model):
    """A listing's size: `limit` rows."""

    limit: Limit = 100


class AccountPage(Page):
    """One account's journal records, a page at a time."""

    account: Account


class ParkedQuery(Model):
    """The parked entries a filter matches (fields left out match every entry), oldest first, a page at a time: the
    same filters as the bulk actions."""

    queue: QueueName | None = None
    account: FilterText | None = None
    reason: FilterText | None = Field(None, description="a substring of the parked reason")
    limit: Limit = 100
    after: ParkedAfter | None = Field(None, description="the `next_after` of the page before; none for the first")

    def where(self) -> ParkedFilter:
        """The filter, as the parked listing takes it."""
        return ParkedFilter(self.queue, self.account, self.reason)


class DriftCheckPath(Model):
    """A drift check, by its id."""

    check_id: Annotated[int, Field(ge=1, le=POSITION_MAX)]


class AccountPath(Model):
    """An account, by its number."""

    account: Annotated[str, StringConstraints(min_length=1, max_length=ACCOUNT_MAX, pattern=r"^[^/]*[^/\s][^/]*$")]


class EntryPath(Model):
    """A queue entry: its queue and queue_id."""

    queue: QueueName
    queue_id: Annotated[int, Field(ge=0, le=QUEUE_ID_MAX)]


# A body that may be left out: flask-openapi3 reads `openapi_extra` for the document's requestBody.required.
OPTIONAL_BODY = {"required": False}


class OptionalReason(Model):
    """An optional reason, kept in the audit trail; the body may be left out."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"reason": "its portfolio was opened"}]},
        openapi_extra=OPTIONAL_BODY,  # type: ignore[typeddict-unknown-key]
    )

    reason: Reason | None = None


class RequiredReason(Model):
    """Why: kept in the audit trail and the journal."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"reason": "refunded by hand"}]})

    reason: Reason


class Filter(Model):
    """Which parked entries a bulk action takes: every field given must match; at least one is given."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    queue: QueueName | None = None
    parked_reason: FilterText | None = Field(None, description="a substring of the parked reason")
    account: FilterText | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> Filter:
        """Refuse a filter that would match every parked entry."""
        if self.queue is None and self.parked_reason is None and self.account is None:
            raise ValueError("give at least one of queue, parked_reason, account")
        return self

    def shown(self) -> dict[str, str]:
        """Return the fields given, for the audit trail and the answer."""
        return self.model_dump(exclude_none=True)


class Bulk(Model):
    """A bulk action on the parked entries a filter matches, up to `limit`; a dry run only lists them."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"filter": {"parked_reason": "no portfolio"}, "dry_run": True}]}
    )

    filter: Filter
    reason: Reason | None = None
    dry_run: StrictBool = False
    limit: Annotated[StrictInt, Field(ge=1, le=LIMIT_MAX)] = 100


class BulkResolve(Bulk):
    """Resolve in bulk: the reason is required."""

    reason: Reason


# A decimal below 10^12 with at most 8 places, as a JSON number or a numeric string: what the document shows; the
# model's own check (tiers.check_tier_value) is the one every stored tier value passes.
DECIMAL_TEXT = r"^\s*\+?\d{1,12}(\.\d{0,8})?\s*$"


def _tier_schema(low: dict[str, int]) -> WithJsonSchema:
    """The document's schema of a tier value: a number from `low` up to 10^12, or numeric text."""
    number = {"type": "number", **low, "exclusiveMaximum": 10**12}
    return WithJsonSchema({"anyOf": [number, {"type": "string", "pattern": DECIMAL_TEXT}]})


Pool = Annotated[Decimal | None, Field(allow_inf_nan=False), _tier_schema({"exclusiveMinimum": 0})]
Market = Annotated[Decimal | None, Field(allow_inf_nan=False), _tier_schema({"minimum": 0})]


def _tier_update_schema(schema: dict[str, Any]) -> None:
    """Document a tier update: at least one field, an example, and no null default (a value left out is unchanged;
    one given is a number)."""
    for field in schema["properties"].values():
        if field.get("default", 0) is None:
            del field["default"]
    schema.update(minProperties=1, examples=[{TIER_KEYS[1]: "1100000", "reason": "market close"}])


class TierUpdate(Model):
    """Any of the six tier values, all or nothing, and an optional reason. A pool (`TIERn`) is greater than 0, a
    market value (`TIERn_MV`) at least 0; each below 10^12 with at most 8 decimals, kept exact."""

    model_config = ConfigDict(json_schema_extra=lambda schema: _tier_update_schema(schema))

    TIER1: Pool = None
    TIER1_MV: Market = None
    TIER2: Pool = None
    TIER2_MV: Market = None
    TIER3: Pool = None
    TIER3_MV: Market = None
    reason: Reason | None = None

    @field_validator(*TIER_KEYS, mode="before")
    @classmethod
    def _given(cls, value: Any) -> Any:
        """Refuse a null: a tier value left out is not changed, one given must be a number."""
        if value is None:
            raise ValueError("must be a number or a numeric string")
        return value

    @field_validator(*TIER_KEYS)
    @classmethod
    def _storable(cls, value: Decimal | None, info: ValidationInfo) -> Decimal | None:
        """Check a value as every stored tier value is checked (tiers.check_tier_value)."""
        key = str(info.field_name)
        problem = None if value is None else check_tier_value(key, value)
        if problem:
            raise ValueError(problem.removeprefix(f"{key} "))
        return value

    @model_validator(mode="after")
    def _some_value(self) -> TierUpdate:
        """Refuse an update that changes nothing."""
        if not self.changes():
            raise ValueError(f"give at least one of {', '.join(TIER_KEYS)}")
        return self

    def changes(self) -> dict[str, Decimal]:
        """Return the values given, by key."""
        return {key: value for key in TIER_KEYS if (value := getattr(self, key)) is not None}


class DriftCheckRequest(Model):
    """An optional reason for a drift check; the body may be left out."""

    model_config = ConfigDict(openapi_extra=OPTIONAL_BODY)  # type: ignore[typeddict-unknown-key]

    reason: Reason | None = None


def _iso_text(value: Any) -> Any:
    """Take a time only as ISO 8601 text, not as a number of seconds."""
    if not isinstance(value, str) or len(value) > ACCOUNT_MAX:
        raise ValueError("give an ISO 8601 time with an offset, such as 2026-12-01T00:00:00Z")
    return value.strip()


def _in_utc(value: datetime) -> datetime:
    """Return a time in UTC; one that UTC cannot hold (within hours of year 1 or 9999) is refused."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("give a time UTC can hold") from None


class BaselineRequest(Model):
    """Record the settled entries before `before` as applied, moving no money, or count them first (dry run)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"before": "2026-12-01T00:00:00Z", "reason": "adopted after the migration", "dry_run": True}]
        }
    )

    before: Annotated[
        AwareDatetime,
        BeforeValidator(_iso_text),
        AfterValidator(_in_utc),
        Field(description="an ISO 8601 time with an offset, such as 2026-12-01T00:00:00Z"),
    ]
    reason: Reason
    dry_run: StrictBool


# Answers. ------------------------------------------------------------------------------------------------------


class Answer(BaseModel):
    """An answer: it names every field it may hold."""

    model_config = ConfigDict(extra="forbid")


class Error(Answer):
    """Why a request failed: `field` names the parameter or body field at fault, when one is."""

    error: str
    field: str | None = None
    result: str | None = None
    state: str | None = None
    id: int | None = None
    pause: dict[str, Any] | None = None
    entry: dict[str, Any] | None = None
    cycle: dict[str, Any] | None = None
    dry_run: bool | None = None
    filter: dict[str, str] | None = None
    count: int | None = None
    more: bool | None = None
    entries: list[dict[str, Any]] | None = None


class Liveness(Answer):
    """Liveness: the poller runs and progresses, and no process of this replica stalls the cycle lease."""

    status: Literal["ok", "failing"]
    poller: Literal["running", "stopped", "stuck", "lease-stalled"]
    seconds_without_progress: float | None = None
    lease_holder: str | None = Field(None, description="the process of this replica holding the lease")


class Readiness(Answer):
    """Readiness: each database answers, within 1.5 s, and the state schema is migrated."""

    status: Literal["ready", "not ready"]
    checks: dict[str, str]


class Tiers(Answer):
    """The stored tier values, as exact decimal strings, and the deltas they give."""

    TIER1: str
    TIER1_MV: str
    TIER2: str
    TIER2_MV: str
    TIER3: str
    TIER3_MV: str
    deltas: dict[str, str]


class TiersAnswer(Answer):
    """The tier values now in force."""

    tiers: Tiers


Counts = dict[str, Annotated[int, Field(ge=0)]]


class CycleSummary(Answer):
    """A cycle: when it started, how it ended, how long it took, and what it did per queue."""

    started_at: Time
    result: Outcome
    mode: Mode | None = None
    horizon: Time | None = None
    oldest_transaction_s: float | None = None
    prepared_transactions: int | None = None
    untracked_sessions: int | None = None
    reconciled: bool | None = None
    counts: dict[str, Counts] | None = Field(None, description=f"per queue: {', '.join(COUNT_KEYS)}")
    stopped_early: bool | None = None
    cycle: int | None = None
    error: str | None = None
    duration_ms: float


class Running(Answer):
    """The cycle is still running after TRIGGER_WAIT; follow it at GET /api/v1/consistency/status."""

    result: Literal["running"]
    message: str
    entry: dict[str, Any] | None = None
    dry_run: bool | None = None
    filter: dict[str, str] | None = None
    count: int | None = None
    more: bool | None = None
    entries: list[dict[str, Any]] | None = None


class Pause(Answer):
    """The pause in force: who paused applying, why, and since when."""

    paused_by: str
    reason: str
    paused_at: Time


class Paused(Answer):
    """Applying is paused in every process and replica."""

    paused: Pause


class Resumed(Answer):
    """The pause that ended, and how long it lasted."""

    resumed_by: str
    pause: Pause
    paused_for_s: float


class ParkedEntry(Answer):
    """A parked entry: why it cannot apply yet, and how often it was tried."""

    queue: QueueName
    queue_id: int
    uuid: str | None
    account_number: str | None
    status: str | None
    reason: str
    attempts: int
    parked_at: Time
    last_attempt_at: Time


class ParkedPage(Answer):
    """A page of the parked entries a filter matches, oldest first; `more` says whether another page follows, and
    `next_after` where it starts. A page filtered by reason reads at most 5,000 entries per queue: it may then hold
    fewer than `limit`, even none, with `more` true."""

    filter: dict[str, str]
    entries: list[ParkedEntry]
    more: bool
    next_after: str | None


class Correction(Answer):
    """An applied entry whose queue status changed afterwards: the first outcome stays applied."""

    queue: QueueName
    uuid: str | None
    queue_id: int
    applied_status: str
    queue_status: str | None
    first_seen_at: Time
    noticed_at: Time


class CorrectionListing(Answer):
    """How many corrections there are, and the newest of them."""

    count: int
    entries: list[Correction]


class Reuse(Answer):
    """A queue row found carrying another transaction than the one applied under its queue_id: a new entry."""

    id: int
    noticed_at: Time
    queue: QueueName
    queue_id: int
    earlier_transaction: str
    portfolio_transaction: str | None
    uuid: str | None
    account_number: str | None
    status: str | None
    cycle: int | None
    state: Literal["applied", "parked", "resolved", "not applied yet"]
    parked_reason: str | None


class ReusePage(Answer):
    """How many reused queue rows there are, and a page of them, newest first."""

    count: int
    entries: list[Reuse]
    next_before: int | None


class AuditRecord(Answer):
    """An operator's action: who, when, what it touched and why."""

    id: int
    at: Time
    actor: str
    action: str
    target: dict[str, Any]
    reason: str | None
    detail: dict[str, Any]


class AuditPage(Answer):
    """Operator actions, newest first, a page at a time; `filter` shows the action and actor asked for."""

    filter: dict[str, str]
    entries: list[AuditRecord]
    next_before: int | None


class RecordFields(Answer):
    """What every journal record tells."""

    id: int
    at: Time
    kind: str
    queue: QueueName | None = None
    queue_id: int | None = None
    portfolio_transaction: str | None = None
    account_number: str | None = None
    status: str | None = None
    reason: str | None = None
    attempts: int | None = None
    tier_version: int | None = None
    tiers_in_force: dict[str, Any] | None = None
    cycle: int | None = None
    actor: str | None = None


class JournalRecord(RecordFields):
    """What became of an entry at one moment; a completed one's three tier amounts before and after it."""

    before: list[str] | None = None
    after: list[str] | None = None


class JournalPage(Answer):
    """One account's journal records, newest first, a page at a time."""

    account: str
    entries: list[JournalRecord]
    next_before: int | None


class CarriedTransaction(Answer):
    """A portfolio transaction a queue row has carried, and whether it was applied."""

    portfolio_transaction: str | None
    uuid: str | None
    applied: bool
    carried_now: bool
    applied_status: str | None = None
    applied_at: Time | None = None


class EntryStory(Answer):
    """One entry's whole story: its queue row now, where it stands, every transaction its row carried, every
    journal record."""

    queue: QueueName
    queue_id: int
    state: Literal["applied", "parked", "resolved", "open", "not applied yet"]
    queue_row: dict[str, Any] | None
    ledger: dict[str, Any] | None
    parked: dict[str, Any] | None
    resolved: dict[str, Any] | None
    correction: dict[str, Any] | None
    transactions: list[CarriedTransaction]
    reuses: list[dict[str, Any]]
    records: list[JournalRecord]


class EntryState(Answer):
    """Where an entry stands after an action."""

    queue: QueueName
    queue_id: int
    result: Literal["applied", "resolved", "parked", "released"]
    outcome: str | None = None
    resolved_by: str | None = None
    resolved_at: Time | None = None
    reason: str | None = None
    attempts: int | None = None


class Retried(Answer):
    """The retry ran: where the entry stands now, and the cycle that ran it."""

    entry: EntryState
    cycle: CycleSummary


class Resolved(Answer):
    """The entry as resolved: it leaves the parked list and is never applied."""

    resolved: dict[str, Any]


class BulkAnswer(Answer):
    """What a bulk action took (or would take, in a dry run): its filter, how many, whether more match, each entry;
    after a retry, where each stands and the cycle that ran."""

    dry_run: bool
    filter: dict[str, str]
    count: int
    more: bool
    entries: list[dict[str, Any]]
    cycle: CycleSummary | None = None


DriftCounts = dict[str, Annotated[int, Field(ge=0)]]


class DriftStarted(Answer):
    """The check is stored and runs in the background."""

    id: int
    started_by: str
    state: Literal["running"]
    started_at: Time


class Finding(Answer):
    """One disagreement a drift check found, with the entry or the transaction named."""

    kind: str = Field(description=f"one of {', '.join(DRIFT_KINDS)}")
    queue: str | None
    queue_id: int | None
    uuid: str | None
    txn_id: str | None
    account_number: str | None
    detail: dict[str, Any]


class DriftReport(Answer):
    """A drift check: its state, times, rows read, findings by kind and the findings kept."""

    id: int
    started_by: str = Field(description="the name of the token that started it, or `schedule`")
    reason: str | None
    state: Literal["running", "done", "failed"]
    started_at: Time
    finished_at: Time | None
    rows_read: int
    counts: DriftCounts
    positions: dict[str, Any] = Field(description="per phase: where the walk goes on, or that it is done")
    error: str | None
    findings_kept_per_kind: int
    findings: list[Finding]


class DriftCheck(Answer):
    """A drift check: who started it and why, its state and times, the rows it read and its findings by kind."""

    id: int
    started_by: str
    reason: str | None
    state: Literal["running", "done", "failed"]
    started_at: Time
    finished_at: Time | None
    rows_read: int
    error: str | None
    counts: DriftCounts


class DriftCheckPage(Answer):
    """Every drift check, newest first, a page at a time."""

    entries: list[DriftCheck]
    next_before: int | None


Amounts = dict[str, str]  # by portfolio column: tier1_value, ... or tier1_allocation, ...


class LabelledRecord(RecordFields):
    """A journal record of an account, its amounts before and after named by the portfolio columns they are, with
    the factor applied to each."""

    before: Amounts | None = None
    after: Amounts | None = None
    factors: Amounts | None = None


class Agreement(Answer):
    """Whether a portfolio's values (or allocations) are still those after the newest completed entry that changed
    them: `equal`, `differs` (what differs, now and after), or why they are not compared."""

    queue: QueueName
    agreement: Literal["equal", "differs", "no_record", "not_in_recent_records", "no_portfolio"]
    equal: bool | None
    finding: str
    record: LabelledRecord | None
    differences: dict[str, dict[str, str]]


class PortfolioAnswer(Answer):
    """Why an account's balances are what they are: its portfolio now, whether its values and its allocations are
    those after the newest completed entry that changed them, and its journal records, newest first."""

    account: str
    portfolio: dict[str, str] | None
    agreement: dict[Literal["values", "allocations"], Agreement]
    entries: list[LabelledRecord]
    next_before: int | None


class Baseline(Answer):
    """A queue's adoption baseline: settled entries before it were applied by whatever ran before."""

    updated_at: Time
    queue_id: int
    source: str = Field(description=f"one of {', '.join(BASELINE_SOURCES)}")
    set_by: str | None
    set_at: Time


class BaselineReport(Answer):
    """Per queue, the entries a dry run would record, or that the run recorded; and the baseline in force."""

    before: Time
    dry_run: bool
    entries: dict[str, int]
    audit_id: int | None
    baseline: dict[str, Baseline]


class Position(Answer):
    """Where an entry sits in the order a queue is read: (updated_at, queue_id)."""

    updated_at: Time
    queue_id: int


class Watermark(Position):
    """How far a queue has been read: every entry at or before it is done; and when it last moved."""

    moved_at: Time


class LeaseState(Answer):
    """The cycle lease: who holds it (host:master pid:pid), how long ago it was renewed, when it expires."""

    holder: str | None
    epoch: int
    renewed_s_ago: float | None
    expires_in_s: float | None = Field(description="below 0: expired")


class QueueBacklog(Answer):
    """What waits in one queue: the oldest settled entry after where it is known to be read, and its age."""

    read_to: Position
    oldest_waiting: Position | None
    lag_s: float


class Backlog(Answer):
    """How far behind applying is: the largest lag of the queues, 0 when nothing waits, null when queue-db could
    not be read (`error` says why)."""

    lag_s: float | None
    error: str | None
    queues: dict[QueueName, QueueBacklog]


class Attempt(CycleSummary):
    """What this process's poller last did, and the lease holder it found when another process had the turn."""

    lease_holder: str | None = None


class ThisProcess(Answer):
    """The process that answers, named as the lease names it."""

    name: str
    poller_alive: bool
    listening: bool | None = Field(description="null when LISTEN_NOTIFY is off")
    last_attempt: Attempt | None


class Status(Answer):
    """The deployment's state, the same whichever process answers (every field but `this_process`, read at most
    a second ago), and the process that answers (`this_process`)."""

    tiers: Tiers
    watermarks: dict[QueueName, Watermark]
    baseline: dict[QueueName, Baseline]
    mode: Mode | None
    parked_entries: int
    corrections: int
    reused_entries: int
    applying: Literal["running", "paused"]
    pause: Pause | None
    last_cycle: CycleSummary | None = Field(description="the last cycle that ran, on any process")
    lease: LeaseState
    backlog: Backlog
    polling_interval: float
    this_process: ThisProcess
