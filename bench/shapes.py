"""Traffic shapes: each shape's backlog drained by the service and by the lean bound, on an empty ledger and behind
applied history; their rates, whether they agree, and the service's batches by way.

python -m bench.shapes runs this part alone. The shapes (bench/backlogs.py): clustered (10 entries of an account in
a row, one timestamp: the main rows' backlog), interleaved (entry i of account i mod A, A = entries / 10, 1 ms
apart), skewed (1% of the accounts carry half the entries) and mixed (interleaved; 80% COMPLETED,
10% FAILED, 10% CANCELLED; a few entries the service parks, and on history a few corrections).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg2

from bench.approaches import BOUND_BATCH, lean
from bench.backlogs import (
    SHAPES,
    Ledger,
    add_entries,
    busiest_share,
    correct_history,
    history_ledger,
    parked_of,
    vacuum,
)
from bench.data import TIERS, fresh_copy, snapshot
from bench.profile import PROFILED, Function, profile_lines, top_functions, track_functions
from bench.serve import service_env, status, worker_peak_rss_mb
from devkit import ROOT, gunicorn, postgres
from devkit.net import free_port, wait_until

TARGET = 0.8  # the service's target on every shape, as a share of the lean bound's rate
APPROACHES = ("service", "lean bound")
SERVICE_COUNTS = (
    "SELECT (SELECT count(*) FROM consistency.applied_entries), (SELECT count(*) FROM consistency.journal),"
    " (SELECT count(*) FROM consistency.parked_entries), (SELECT count(*) FROM consistency.corrections)"
)


@dataclass(frozen=True)
class Backlog:
    """A shape's backlog on a ledger, held in templates, and what applying it must leave."""

    shape: str
    ledger: Ledger
    entries: int
    templates: tuple[str, str]
    parked: int
    corrections: int

    def expected(self) -> dict[str, int]:
        """The service's rows after the drain: ledger, journal (applied, parked, corrected), parked, corrections."""
        return {
            "ledger": self.ledger.history + self.entries - self.parked,
            "journal": self.ledger.journal + self.entries + self.corrections,
            "parked": self.parked,
            "corrections": self.corrections,
        }


@dataclass(frozen=True)
class Served:
    """What the service's drain took: its time, its batches by way, its workers' peak RSS and its longest lease gap."""

    seconds: float
    ways: dict[str, int]
    rss_mb: float
    unrenewed_s: float  # the longest /status saw the lease go unrenewed: over by up to a second, never under


@dataclass(frozen=True)
class Drain:
    """What one approach's drain of a copy took and left."""

    seconds: float
    snapshot: tuple[str, str]
    counts: dict[str, int]
    served: Served | None = None  # the service's own figures; None for the bound
    functions: tuple[Function, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """One shape on one ledger: best rates, batches by way, and what differed (nothing, when all is well)."""

    shape: str
    ledger: str
    service: float
    bound: float
    ways: dict[str, int]
    problems: tuple[str, ...]
    rss_mb: float = 0.0  # the service's highest worker peak RSS over its drains
    unrenewed_s: float = 0.0  # the longest the service's lease went unrenewed over its drains, as /status saw it
    functions: tuple[Function, ...] = ()
    profiled_seconds: float = 0.0  # the profiled drain's time, timing on

    @property
    def ratio(self) -> float:
        """The service's rate as a share of the lean bound's."""
        return self.service / self.bound


def build_backlog(server: str, shape: str, ledger: Ledger, entries: int) -> Backlog:
    """Make templates of a shape's backlog on a ledger: fresh databases, or a copy of the history."""
    if ledger.templates is None or ledger.ends is None:
        names = (
            postgres.create_template(server, "bench_tpl_sq", ROOT / "schema" / "queue_db.sql"),
            postgres.create_template(server, "bench_tpl_sp", ROOT / "schema" / "user_portfolio_db.sql"),
        )
        base = datetime.now(UTC) - timedelta(days=1)
    else:
        names = (postgres.clone(server, ledger.templates[0]), postgres.clone(server, ledger.templates[1]))
        base = max(end for end, _ in ledger.ends.values()) + timedelta(seconds=1)
    quri, puri = (postgres.with_database(server, name) for name in names)
    corrections = correct_history(quri, base, entries) if shape == "mixed" and ledger.history else 0
    add_entries(quri, puri, shape, entries, base)
    vacuum(quri, puri)
    return Backlog(shape, ledger, entries, names, parked_of(shape, entries), corrections)


def serve(queue_uri: str, portfolio_uri: str, batch_size: int, reads: int) -> Served:
    """Drain a copy by the service's start-up cycle under gunicorn; return what it took."""
    port = free_port()
    # No cycle but the start-up one, and no drift check beside it, as bench.__main__.run_service.
    env = service_env(queue_uri, portfolio_uri, port, POLLING_INTERVAL="3600", BATCH_SIZE=str(batch_size),
                      LISTEN_NOTIFY="false", DRIFT_CHECK_INTERVAL="0")  # fmt: skip
    launched = datetime.now(UTC)
    with gunicorn.running(gunicorn.command(), env, subprocess.DEVNULL) as service:
        cycle, unrenewed = drained_cycle(port, launched)
        ways = batches(port)  # before the service stops: its counters go with it
        rss = worker_peak_rss_mb(service.pid)
    read = sum(counts["read"] for counts in cycle["counts"].values()) if cycle["result"] == "ok" else 0
    if read != reads:
        raise SystemExit(f"the service's start-up cycle is not the drain of {reads} entries: {cycle}")
    return Served(cycle["duration_ms"] / 1000, ways, rss, unrenewed)


def drained_cycle(port: int, launched: datetime) -> tuple[dict[str, Any], float]:
    """Wait for the first cycle stored since the launch (a history's copy holds an older one); return it, and the
    longest the lease went unrenewed as /status showed it meanwhile, every 0.2 s."""
    seen: list[dict[str, Any]] = []
    gaps = [0.0]

    def stored() -> bool:
        now = status(port)
        gaps.append(now["lease"]["renewed_s_ago"] or 0.0)
        last = now.get("last_cycle")
        if last and datetime.fromisoformat(last["started_at"]) > launched:
            seen.append(last)
        return bool(seen)

    wait_until(stored, 3600, "the drain to finish", interval=0.2)
    return seen[-1], max(gaps)


def batches(port: int) -> dict[str, int]:
    """Read the service's batches by way, clean and careful, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found = dict(re.findall(r'^consistency_batches_total\{way="(\w+)"\} (\S+)$', text, re.MULTILINE))
    return {way: int(float(found.get(way, 0))) for way in ("clean", "careful")}


def counts_of(portfolio_uri: str, approach: str) -> dict[str, int]:
    """Count what a drain recorded: the service's ledger, journal, parked entries and corrections, or the bound's."""
    conn = psycopg2.connect(portfolio_uri)
    with conn.cursor() as cur:
        if approach == "service":
            cur.execute(SERVICE_COUNTS)
            found = dict(zip(("ledger", "journal", "parked", "corrections"), cur.fetchone(), strict=True))
        else:
            cur.execute("SELECT count(*) FROM bench_applied")
            found = {"ledger": cur.fetchone()[0]}
    conn.close()
    return found


def drain_copy(server: str, backlog: Backlog, approach: str, batch_size: int) -> Drain:
    """Drain a fresh copy of a backlog by one approach (the service, profiled or not, or the bound); return it."""
    queue_uri, portfolio_uri, names = fresh_copy(server, backlog.templates)
    try:
        served = None
        if approach == PROFILED:
            track_functions(server, names[1])
        if approach in ("service", PROFILED):
            served = serve(queue_uri, portfolio_uri, batch_size, backlog.entries + backlog.corrections)
            seconds = served.seconds
        else:
            seconds = lean(queue_uri, portfolio_uri, TIERS, after=backlog.ledger.ends)
        functions = top_functions(portfolio_uri) if approach == PROFILED else ()
        counts = counts_of(portfolio_uri, "service" if approach == PROFILED else approach)
        return Drain(seconds, snapshot(portfolio_uri), counts, served, functions)
    finally:
        for name in names:
            postgres.drop(server, name)


def problems(backlog: Backlog, drains: dict[str, list[Drain]]) -> tuple[str, ...]:
    """Tell what is wrong: portfolios or statuses that differ between drains, and counts the model does not expect."""
    found = []
    if len({drain.snapshot for runs in drains.values() for drain in runs}) != 1:
        found.append("portfolios or transaction statuses differ")
    expected = backlog.expected()
    for drain in drains["service"] + drains.get("profiled", []):
        found += [f"service {k} rows {drain.counts[k]:,} != {v:,}" for k, v in expected.items() if drain.counts[k] != v]
    for drain in drains["lean bound"]:
        if drain.counts["ledger"] != expected["ledger"]:
            found.append(f"lean bound recorded {drain.counts['ledger']:,} != {expected['ledger']:,}")
    return tuple(dict.fromkeys(found))


def measure_shape(
    server: str, shape: str, ledger: Ledger, entries: int, batch_size: int, rounds: int, profile: bool = False
) -> Outcome:
    """Drain copies of one shape's backlog on one ledger, the service and the bound taking turns; keep each's best.

    With `profile`, the service drains one more copy with PostgreSQL timing its functions.
    """
    backlog = build_backlog(server, shape, ledger, entries)
    drains: dict[str, list[Drain]] = {approach: [] for approach in APPROACHES}
    try:
        for _ in range(rounds):
            for approach, runs in drains.items():
                runs.append(drain_copy(server, backlog, approach, batch_size))
        profiled = [drain_copy(server, backlog, PROFILED, batch_size)] if profile else []
    finally:
        for template in backlog.templates:
            postgres.drop(server, template)
    best = {approach: entries / min(drain.seconds for drain in runs) for approach, runs in drains.items()}
    served = [drain.served for drain in drains["service"] if drain.served is not None]
    found = problems(backlog, {**drains, "profiled": profiled})
    functions, timed = (profiled[0].functions, profiled[0].seconds) if profiled else ((), 0.0)
    outcome = Outcome(shape, ledger.describe(), best["service"], best["lean bound"], served[0].ways, found,
                      max(s.rss_mb for s in served), max(s.unrenewed_s for s in served), functions, timed)  # fmt: skip
    print(f"shape {shape}, {outcome.ledger}: {outcome.ratio:.2f}x", file=sys.stderr, flush=True)
    return outcome


def measure_shapes(
    server: str,
    entries: int,
    history: int,
    batch_size: int,
    rounds: int,
    profile: bool = False,
    shapes: tuple[str, ...] = SHAPES,
) -> list[Outcome]:
    """Measure each shape on an empty ledger, then (unless history is 0) behind `history` applied entries."""
    ledgers = [Ledger(0)] + ([history_ledger(server, history)] if history else [])
    try:
        return [
            measure_shape(server, shape, ledger, entries, batch_size, rounds, profile)
            for ledger in ledgers
            for shape in shapes
        ]
    finally:
        for template in ledgers[-1].templates or ():
            postgres.drop(server, template)


def description(server: str, entries: int, history: int) -> str:
    """Describe the shapes' backlogs and ledgers in a line."""
    share = busiest_share(server, "skewed", entries)
    return (
        f"{entries:,} entries each, half withdrawals: clustered (10 per account in a row, one timestamp), "
        f"interleaved (entry i of account i mod {max(1, entries // 10):,}, 1 ms apart), skewed (1 ms apart, "
        f"the busiest 1% of the accounts carry {share:.0%}), mixed (interleaved; 80% COMPLETED, 10% FAILED, "
        f"10% CANCELLED, {parked_of('mixed', entries)} to park, and on history a few corrections); each on an "
        + (f"empty ledger and behind {history:,} entries of history" if history else "empty ledger")
    )


def verdict(outcome: Outcome) -> str:
    """Say whether a shape's drains agree, or what differed."""
    return "yes" if not outcome.problems else "NO: " + "; ".join(outcome.problems)


def shape_rows(outcomes: list[Outcome]) -> list[tuple[str, str]]:
    """Describe each shape on each ledger as a row of the benchmark's table."""
    return [
        (
            f"shape {o.shape}, {o.ledger}",
            f"service {o.service:,.0f} entries/s, lean bound {o.bound:,.0f} entries/s = {o.ratio:.2f}x (target >= "
            f"{TARGET}x); identical {verdict(o)}; batches {o.ways['clean']} clean, {o.ways['careful']} careful; "
            f"peak RSS {o.rss_mb:.0f} MB; lease unrenewed at most {o.unrenewed_s:.1f} s",
        )
        for o in outcomes
    ]


def shape_table(outcomes: list[Outcome]) -> list[str]:
    """Return the shapes' own table, a row per shape and ledger, as Markdown lines."""
    lines = [
        "| shape | ledger | service entries/s | lean bound entries/s | service / lean | identical "
        "| batches clean / careful | peak RSS MB | lease unrenewed, s |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for o in outcomes:
        cells = (o.shape, o.ledger, f"{o.service:,.0f}", f"{o.bound:,.0f}", f"{o.ratio:.2f}x", verdict(o),
                 f"{o.ways['clean']} / {o.ways['careful']}", f"{o.rss_mb:.0f}", f"{o.unrenewed_s:.1f}")  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def differing(outcomes: list[Outcome]) -> list[str]:
    """Name each shape on a ledger whose drains disagree, or leave other counts than the model's."""
    return [f"{o.shape}, {o.ledger}: results differ ({verdict(o)})" for o in outcomes if o.problems]


def low_ratios(outcomes: list[Outcome]) -> list[str]:
    """Name each shape on a ledger whose ratio is under the target."""
    return [f"{o.shape}, {o.ledger}: {o.ratio:.2f}x < {TARGET}x" for o in outcomes if o.ratio < TARGET]


def main() -> None:
    """Measure the shapes and print their table; exit non-zero when results differ, or with --check a ratio is low."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=200_000, help="backlog size of each shape (default 200000)")
    parser.add_argument(
        "--history", type=int, default=1_000_000, help="applied entries behind the second ledger; 0 skips it (1000000)"
    )
    parser.add_argument("--batch-size", type=int, default=5000, help="the service's BATCH_SIZE (default 5000)")
    parser.add_argument("--rounds", type=int, default=2, help="turns the service and the bound take (default 2)")
    parser.add_argument("--check", action="store_true", help=f"also exit non-zero when a ratio is under {TARGET}x")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="drain each shape once more by the service with track_functions on, and print its functions' time",
    )
    parser.add_argument("--shape", action="append", choices=SHAPES, help="measure this shape only (repeatable)")
    args = parser.parse_args()
    server, keep_alive = postgres.server_uri()
    shapes = tuple(args.shape or SHAPES)
    outcomes = measure_shapes(server, args.entries, args.history, args.batch_size, args.rounds, args.profile, shapes)
    print(description(server, args.entries, args.history))
    print(f"The service at BATCH_SIZE {args.batch_size}, the lean bound at {BOUND_BATCH}; best of {args.rounds}.")
    print("\n".join(shape_table(outcomes)))
    for outcome in outcomes if args.profile else []:
        print(f"\n{outcome.shape}, {outcome.ledger}: the service's functions by time of their own (track_functions), "
              f"in a drain of {outcome.profiled_seconds * 1000:,.0f} ms")  # fmt: skip
        print("\n".join(profile_lines(outcome.functions)))
    del keep_alive
    failed = differing(outcomes) + (low_ratios(outcomes) if args.check else [])
    if failed:
        raise SystemExit("failed: " + "; ".join(failed))


if __name__ == "__main__":
    main()
