"""Fault injection on the network: a replica cut off from its databases by a TCP proxy that forwards nothing, and
connections cut right after a COMMIT reaches the server. Real replicas, writers throughout, then the model check."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from devkit import roles
from devkit.net import wait_until
from devkit.proxy import Proxy
from tests.faults.conftest import Stage, record
from tests.faults.harness import Replica, Writers, bulk_backlog, check_model, open_portfolios, wait_caught_up
from tests.world import World

ACCOUNTS = [f"44000{n:05d}" for n in range(200)]  # ~60 completions each at most: no tier value overflows
LEASE_S = 6.0
POLL_S = 1.0  # the bound on a takeover is CYCLE_LEASE plus two intervals: room for the first batch on a loaded machine
PARTITION_S = 15.0  # longer than the bound on noticing a dead peer (11 s), so that it shows


@dataclass
class Sample:
    """One answer of a probe endpoint: when it was asked (seconds after the partition), its status, how long it took."""

    at: float
    status: int | None  # None: no answer within the client's timeout
    took: float


@dataclass
class Sampler:
    """Asks one endpoint of a replica again and again in a thread, as a kubelet would, and keeps every answer."""

    replica: Replica
    path: str
    since: float
    every: float
    samples: list[Sample] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Sampler:
        """Start asking."""
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def stop(self) -> list[Sample]:
        """Stop asking; return the answers."""
        self.stopping.set()
        time.sleep(0.1)
        return list(self.samples)

    def _run(self) -> None:
        """Ask until stopped."""
        while not self.stopping.is_set():
            asked = time.monotonic()
            status = http_status(self.replica, self.path, timeout=6)
            self.samples.append(Sample(asked - self.since, status, time.monotonic() - asked))
            self.stopping.wait(max(0.0, self.every - (time.monotonic() - asked)))


def http_status(replica: Replica, path: str, timeout: float) -> int | None:
    """GET a path of a replica; return its status, or None when no answer comes within the timeout."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{replica.port}{path}", timeout=timeout) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except (TimeoutError, urllib.error.URLError):
        return None


@dataclass
class Proxied:
    """A replica whose connections to both databases go through proxies of its own."""

    replica: Replica
    proxies: tuple[Proxy, Proxy]  # queue-db's, user-portfolio-db's

    def blackhole(self) -> None:
        """Cut the replica off from both databases: its sockets stay open, nothing goes through."""
        for proxy in self.proxies:
            proxy.blackhole()

    def forward(self) -> None:
        """Heal the partition."""
        for proxy in self.proxies:
            proxy.forward()

    def close(self) -> None:
        """Close both proxies."""
        for proxy in self.proxies:
            proxy.close()


def proxied_replica(stage: Stage, workers: int = 2, **env: str) -> Proxied:
    """Start a replica that reaches each database through a proxy of its own, as the stage's role."""
    uris = [roles.with_user(uri, stage.role) for uri in stage.dbs]
    proxies = (Proxy.before(uris[0]), Proxy.before(uris[1]))
    through = {"QUEUE_DB_URI": proxies[0].uri(uris[0]), "USER_PORTFOLIO_DB_URI": proxies[1].uri(uris[1])}
    return Proxied(stage.replica(workers=workers, **through, **env), proxies)


def lease_holder(world: World) -> tuple[str | None, int]:
    """The cycle lease's holder (None when free) and epoch."""
    return world.p("SELECT holder, epoch FROM consistency.cycle_lease")[0]


def held_by(world: World, replica: Replica) -> bool:
    """Tell whether a process of this replica holds the cycle lease now."""
    holder, _ = lease_holder(world)
    return holder is not None and holder.split(":")[1] == str(replica.process.pid)


def applied_twice(world: World) -> int:
    """Count the portfolio transactions with more than one row in the ledger."""
    return world.p(
        "SELECT count(*) FROM (SELECT txn_id FROM consistency.applied_entries"
        " WHERE txn_id IS NOT NULL GROUP BY txn_id HAVING count(*) > 1) AS d"
    )[0][0]


def log_lines(replica: Replica, start: int = 0) -> list[dict]:
    """The JSON lines a replica logged from a byte offset on."""
    with replica.log.open("rb") as file:
        file.seek(start)
        text = file.read().decode(errors="replace")
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def assert_exact(world: World, scenario: str, **figures: object) -> None:
    """Run the model check, record its figures and fail on any mismatch or any transaction applied twice."""
    report = check_model(world)
    doubled = applied_twice(world)
    record(scenario, report, applied_twice=doubled, **figures)
    assert report.mismatches == [], report.mismatches[:20]
    assert report.completed > 0
    assert doubled == 0


@dataclass
class Seen:
    """What a partition of the lease's holder showed, in seconds after it began (None: never, while it lasted)."""

    caught_holding: bool = False  # the partition did cut off the lease's holder
    taken_over: float | None = None  # the other replica holds the lease
    flowing: float | None = None  # an entry applied in a transaction that began after the partition
    noticed: float | None = None  # the cut-off replica logged that user-portfolio-db gives no answer
    health: list[Sample] = field(default_factory=list)
    ready: list[Sample] = field(default_factory=list)

    def figures(self) -> dict[str, object]:
        """The figures to report."""
        first_503 = next((s.at for s in self.health if s.status == 503), None)
        slowest = max((s.took for s in self.ready), default=None)
        return {
            "taken_over_s": _round(self.taken_over),
            "flowing_s": _round(self.flowing),
            "health_503_s": _round(first_503),
            "ready_statuses": sorted({str(s.status) for s in self.ready}),
            "ready_slowest_s": _round(slowest),
            "dead_peer_logged_s": _round(self.noticed),
        }


def _round(seconds: float | None) -> float | None:
    """Seconds to two places, or None."""
    return None if seconds is None else round(seconds, 2)


def partition(world: World, cut_off: Proxied, other: Proxied, seconds: float) -> Seen:
    """Cut a replica off from both databases for a while, watching its probes, its log and the other replica."""
    server_at = world.p("SELECT clock_timestamp()")[0][0]
    cut_off.blackhole()
    started, log_at = time.monotonic(), cut_off.replica.log.stat().st_size
    epoch = lease_holder(world)[1]
    health = Sampler(cut_off.replica, "/health", started, every=0.1).start()
    ready = Sampler(cut_off.replica, "/ready", started, every=0.5).start()
    seen = Seen()
    while time.monotonic() - started < seconds:
        now = time.monotonic() - started
        if seen.taken_over is None and lease_holder(world)[1] != epoch and held_by(world, other.replica):
            seen.taken_over = now
        applied = "SELECT count(*) FROM consistency.applied_entries WHERE applied_at > %s"
        if seen.flowing is None and world.p(applied, (server_at,))[0][0]:
            seen.flowing = now
        if seen.noticed is None and any(dead_peer(line) for line in log_lines(cut_off.replica, log_at)):
            seen.noticed = now
        time.sleep(0.05)
    seen.caught_holding = held_by(world, cut_off.replica) or seen.taken_over is not None
    seen.health, seen.ready = health.stop(), ready.stop()
    cut_off.forward()
    return seen


def test_a_partitioned_lease_holder_fails_its_probes_fast_and_recovers_without_restart(stage: Stage, world: World):
    open_portfolios(world, ACCOUNTS)
    bulk_backlog(world, ACCOUNTS, 12000)  # a drain of several seconds: the first replica holds the lease throughout
    # A request sent just before the partition heals is lost with it (the proxy dropped it) and gets no answer even
    # though the database does again: it is dropped when it outlasts any statement, DB_STATEMENT_TIMEOUT.
    env = {"CYCLE_LEASE": str(LEASE_S), "POLLING_INTERVAL": str(POLL_S), "DB_STATEMENT_TIMEOUT": "5"}
    cut_off = proxied_replica(stage, **env)
    wait_until(lambda: world.applied() > 300, 30, "the drain to be under way")
    other = proxied_replica(stage, **env)
    other.replica.wait_ready()
    writers = Writers(world, ACCOUNTS, pause=0.02).start()
    try:
        wait_until(lambda: held_by(world, cut_off.replica), 20, "the first replica to hold the lease", interval=0.01)
        seen = partition(world, cut_off, other, PARTITION_S)
        figures = {"lease_s": LEASE_S, "partition_s": PARTITION_S, **seen.figures()}
        print(figures)
        healed_at = cut_off.replica.log.stat().st_size
        cut_off.replica.wait_ready(timeout=30)
        wait_until(lambda: cycles_ok(cut_off.replica, healed_at) > 0, 30, "the healed replica to apply again")
    finally:
        writers.stop()
    wait_caught_up(world, timeout=120)

    bound = LEASE_S + 2 * POLL_S
    assert seen.caught_holding
    assert seen.taken_over is not None and seen.taken_over <= bound, figures
    assert seen.flowing is not None and seen.flowing <= bound, figures
    assert figures["health_503_s"] is not None and figures["health_503_s"] <= LEASE_S / 4 + 2.0, figures
    assert {s.status for s in seen.ready} == {503}, seen.ready
    assert max(s.took for s in seen.ready) < 2.0, seen.ready
    assert seen.noticed is not None, "no log line named the database that gave no answer"
    assert cut_off.replica.process.poll() is None  # the same master all along
    assert cut_off.replica.log.read_text().count("Booting worker") == 2  # and the same two workers: none restarted
    assert_exact(world, "partitioned lease holder", **figures)
    stop(cut_off, other)


def stop(*replicas: Proxied) -> None:
    """Stop replicas, then their proxies (the other way round, they would log the proxies' going): each within
    gunicorn's graceful_timeout (20 s), which the partition's after-effects may take part of."""
    for each in replicas:
        code = each.replica.terminate(timeout=25)
        assert code == 0, each.replica.log.read_text()[-4000:]
    for each in replicas:
        each.close()


def dead_peer(line: dict) -> bool:
    """Tell whether a log line says that user-portfolio-db gave no answer, naming it."""
    return line.get("level") == "WARNING" and "user-portfolio-db gave no answer" in line.get("message", "")


def cycles_ok(replica: Replica, start: int) -> int:
    """Count the cycles a replica ran to the end, from a byte offset of its log on."""
    return sum(1 for line in log_lines(replica, start) if line.get("event") == "cycle" and line.get("result") == "ok")


def test_connections_cut_right_after_commit_leave_the_money_exact(stage: Stage, world: World) -> None:
    open_portfolios(world, ACCOUNTS)
    replicas = [proxied_replica(stage, CYCLE_LEASE=str(LEASE_S)) for _ in range(2)]
    for each in replicas:
        each.replica.wait_ready()
    writers = Writers(world, ACCOUNTS).start()
    try:
        for each in replicas:
            each.proxies[1].cut_commits(every=4)  # a quarter of every COMMIT on user-portfolio-db: batches too
        time.sleep(10)
        for each in replicas:
            each.forward()
    finally:
        writers.stop()
    wait_caught_up(world, timeout=60)
    commits = sum(each.proxies[1].commits for each in replicas)
    cuts = sum(each.proxies[1].cuts for each in replicas)
    # The cycles that lost their connection right after a COMMIT, of a batch among others.
    failed = sum(1 for each in replicas for line in log_lines(each.replica) if line.get("result") == "error")
    for each in replicas:
        assert each.replica.process.poll() is None  # no restart
    assert cuts >= 20
    assert_exact(world, "cut after COMMIT", commits=commits, cuts=cuts, failed_cycles=failed)
    stop(*replicas)
