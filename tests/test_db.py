"""The pool wrapper: broken connections are discarded, driver errors become DatabaseError without credentials."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from db import Database, DatabaseError
from devkit import ROOT
from devkit.net import wait_until
from devkit.proxy import Proxy
from domain import Entry
from listener import PING_AFTER, Listener
from logs import mask_uri
from queries import query
from tests.world import (
    STAMP,
    World,
)
from watchdog import ANSWER_WAIT, WATCH_EVERY


def backend_pid(db: Database) -> int:
    """Return the server process behind the connection the pool lends next."""
    with db.transaction() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return cur.fetchone()[0]


def test_a_broken_pooled_connection_is_discarded_and_the_next_call_reconnects(settings, world: World) -> None:
    db = Database("user-portfolio-db", settings.portfolio_db_uri, settings)
    try:
        pid = backend_pid(db)
        world.p("SELECT pg_terminate_backend(%s, 5000)", (pid,))  # waits until it is gone

        with pytest.raises(DatabaseError) as failed:
            backend_pid(db)
        assert failed.value.database == "user-portfolio-db"
        assert backend_pid(db) != pid
    finally:
        db.close()


def test_errors_and_uris_never_show_a_password(settings) -> None:
    uri = "postgresql://svc:pw-0123-secret@127.0.0.1:1/queue-db"
    db = Database("queue-db", uri, replace(settings, db_connect_timeout=1))
    with pytest.raises(DatabaseError) as failed:
        backend_pid(db)
    assert "pw-0123-secret" not in str(failed.value)
    assert mask_uri(uri) == "postgresql://svc:***@127.0.0.1:1/queue-db"
    assert db.redact(f"could not use {uri} with pw-0123-secret") == (
        "could not use postgresql://svc:***@127.0.0.1:1/queue-db with ***"
    )
    db.close()


def test_a_busy_pool_waits_then_says_so(settings) -> None:
    db = Database("queue-db", settings.queue_db_uri, replace(settings, db_pool_size=2, db_connect_timeout=1))
    try:
        with db.connection(), db.connection(), pytest.raises(DatabaseError, match="no free connection within 1s"):
            backend_pid(db)
        assert backend_pid(db) > 0
    finally:
        db.close()


def test_array_literals_round_trip_any_text(world: World) -> None:
    from datetime import UTC, datetime
    from decimal import Decimal

    from db import pg_array

    nasty = ["plain", "", "NULL", None, "a,b", "{x}", 'say "hi"', "back\\slash", " padded ", "it's", "ü€"]
    assert world.p("SELECT %s::text[]", (pg_array(nasty),))[0][0] == nasty
    amounts = [Decimal("1E+6"), Decimal("-0.01"), Decimal("12345678901.23")]
    assert world.p("SELECT %s::numeric[]", (pg_array(amounts),))[0][0] == amounts
    moments = [datetime(2026, 11, 28, 12, 0, 0, 123456, tzinfo=UTC)]
    assert world.p("SELECT %s::timestamptz[]", (pg_array(moments),))[0][0] == moments
    assert world.p("SELECT %s::integer[]", (pg_array([]),))[0][0] == []
    assert world.p("SELECT %s::integer[]", (pg_array([1, -2, 2**31 - 1]),))[0][0] == [1, -2, 2**31 - 1]


def test_every_connection_carries_the_configured_timeouts(settings) -> None:
    timed = replace(settings, db_statement_timeout=0.5, db_lock_timeout=0.25, cycle_lease=6.0)
    db = Database("queue-db", settings.queue_db_uri, timed)
    try:
        with db.transaction() as cur:
            cur.execute("SELECT current_setting('statement_timeout'), current_setting('lock_timeout'),"
                        " current_setting('idle_in_transaction_session_timeout'), current_setting('jit')")  # fmt: skip
            assert cur.fetchone() == ("500ms", "250ms", "3s", "off")  # half the cycle lease; no JIT
            assert cur.connection.info.dsn_parameters["connect_timeout"] == str(settings.db_connect_timeout)
            if not cur.connection.info.host.startswith("/"):  # a Unix-domain socket (the embedded server) has no TCP
                # The server's end of the connection has TCP's bounds too.
                cur.execute("SELECT current_setting('tcp_keepalives_idle'), current_setting('tcp_keepalives_interval'),"
                            " current_setting('tcp_keepalives_count'),"
                            " current_setting('tcp_user_timeout')")  # fmt: skip
                assert cur.fetchone() == ("5", "2", "3", "10000")
                assert tcp_bounds(cur.connection) == (1, 5, 2, 3, 10_000)  # and the service's end, as libpq set them
        with pytest.raises(DatabaseError, match="statement timeout"), db.transaction() as cur:
            cur.execute("SELECT pg_sleep(2)")
    finally:
        db.close()


def tcp_bounds(conn) -> tuple[int, ...]:
    """Read a connection's keepalive settings and TCP_USER_TIMEOUT from its socket."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        options = [
            (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        ]
        return tuple(sock.getsockopt(level, option) for level, option in options)


@pytest.fixture
def proxy(pg: str) -> Iterator[Proxy]:
    """A TCP proxy in front of the test server."""
    made = Proxy.before(pg)
    yield made
    made.close()


def test_a_request_the_database_never_answers_ends_within_the_bound_logged_once(settings, proxy, caplog) -> None:
    uri = proxy.uri(settings.portfolio_db_uri).replace("@", ":pw-4711-secret@", 1)  # trust: the server asks for none
    db = Database("user-portfolio-db", uri, replace(settings, db_connect_timeout=2))
    try:
        with db.transaction() as cur:
            cur.execute(query("ping"))
        proxy.blackhole()  # its kernel still acknowledges: TCP's keepalives and user timeout see a live peer
        asked = time.monotonic()
        with caplog.at_level(logging.INFO, "watchdog"), pytest.raises(DatabaseError) as failed, db.transaction() as cur:
            cur.execute(query("ping"))
        took = time.monotonic() - asked
        proxy.forward()
        with db.transaction() as cur:  # the pool discarded the dead connection: a new one works
            cur.execute(query("ping"))
    finally:
        db.close()
    assert failed.value.database == "user-portfolio-db"
    assert "server closed the connection unexpectedly" in failed.value.detail  # the watchdog shut its socket
    # No answer for ANSWER_WAIT, then a probe that gets none within DB_CONNECT_TIMEOUT (2 s here).
    assert ANSWER_WAIT + 2 <= took <= ANSWER_WAIT + WATCH_EVERY + 2 + 1.0, took
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("user-portfolio-db gave no answer for "), warnings
    assert "nor to a new connection: " in warnings[0] and "pw-4711-secret" not in warnings[0]


def test_a_long_statement_on_a_database_that_answers_is_left_to_finish(settings, caplog) -> None:
    db = Database("user-portfolio-db", settings.portfolio_db_uri, settings)
    try:
        with caplog.at_level(logging.INFO, logger="watchdog"), db.transaction() as cur:
            cur.execute("SELECT pg_sleep(%s)", (ANSWER_WAIT + 1.5,))  # the watchdog probes, and the probe answers
    finally:
        db.close()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_ready_answers_within_two_seconds_when_a_database_gives_no_answer(make_app, settings, proxy) -> None:
    # The check's request is lost with the bytes the proxy drops: once it forwards again, the connection is
    # dropped when it has waited longer than any statement may run.
    app = make_app(portfolio_db_uri=proxy.uri(settings.portfolio_db_uri), db_statement_timeout=2.0)
    client = app.test_client()
    assert client.get("/ready").status_code == 200
    proxy.blackhole()
    answers = []
    for _ in range(3):  # the first waits for its check; the next ones join the check still waiting
        asked = time.monotonic()
        answers.append((client.get("/ready"), time.monotonic() - asked))
    proxy.forward()
    assert [answer.status_code for answer, _ in answers] == [503, 503, 503]
    assert max(took for _, took in answers) < 2.0
    checks = answers[-1][0].get_json()["checks"]
    assert checks["queue-db"] == "ok"
    assert checks["user-portfolio-db"].startswith("unreachable: no answer for ")
    wait_until(lambda: client.get("/ready").status_code == 200, 15, "readiness once the database answers again")


def test_the_listener_notices_a_connection_that_gives_no_answer_and_listens_again(settings, proxy, caplog) -> None:
    db = Database("queue-db", proxy.uri(settings.queue_db_uri), replace(settings, db_connect_timeout=2))
    ear = Listener(db, lambda: None)
    ear.start()
    try:
        wait_until(ear.listening.is_set, 10, "the listener to listen")
        with caplog.at_level(logging.INFO):
            proxy.blackhole()
            lost = time.monotonic()
            # Silent for PING_AFTER, it pings; the ping gets no answer, which the watchdog notices.
            wait_until(lambda: not ear.listening.is_set(), PING_AFTER + ANSWER_WAIT + 5, "the listener to notice")
            noticed = time.monotonic() - lost
            proxy.forward()
            wait_until(ear.listening.is_set, 40, "the listener to listen again")
    finally:
        ear.stop()
        db.close()
    assert noticed <= PING_AFTER + ANSWER_WAIT + WATCH_EVERY + 2 + 1.0, noticed
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("queue-db gave no answer for ") for m in messages), messages
    assert any(m.startswith("queue-db notifications unavailable") for m in messages), messages
    assert "listening to queue-db notifications again" in messages


# A server that answers the startup and every query until told to stop, for the test below (run in a network
# namespace of its own, where a route can drop every packet).
PARTITIONED = r"""
import json, socket, struct, subprocess, threading, time
import psycopg2
from config import Settings
from db import connect_options

def message(kind, body):
    return kind + struct.pack("!i", len(body) + 4) + body

def session(conn, answering):
    data = b""
    def take(n):
        nonlocal data
        while len(data) < n:
            more = conn.recv(65536)
            if not more:
                raise EOFError
            data += more
        head, data = data[:n], data[n:]
        return head
    try:
        take(struct.unpack("!i", take(4))[0] - 4)
        hello = message(b"R", struct.pack("!i", 0)) + message(b"K", struct.pack("!ii", 1, 2))
        for name, value in (("server_version", "15.0"), ("client_encoding", "UTF8"), ("DateStyle", "ISO, MDY"),
                            ("integer_datetimes", "on"), ("standard_conforming_strings", "on")):
            hello += message(b"S", f"{name}\0{value}\0".encode())
        conn.sendall(hello + message(b"Z", b"I"))
        while True:
            take(struct.unpack("!i", take(5)[1:])[0] - 4)
            if answering.is_set():
                conn.sendall(message(b"C", b"SELECT 1\0") + message(b"Z", b"I"))
    except (EOFError, OSError):
        pass

def serve(server, answering):
    while True:
        conn, _ = server.accept()
        threading.Thread(target=session, args=(conn, answering), daemon=True).start()

subprocess.run("ip link set lo up && ip addr add 10.9.9.9/32 dev lo", shell=True, check=True)
answering = threading.Event()
answering.set()
server = socket.create_server(("10.9.9.9", 5432))
threading.Thread(target=serve, args=(server, answering), daemon=True).start()
options = {k: v for k, v in connect_options(Settings()).items() if k != "options"}
conns = [psycopg2.connect(host="10.9.9.9", user="x", dbname="x", sslmode="disable", **options) for _ in range(2)]
for conn in conns:
    conn.autocommit = True
    conn.cursor().execute("SELECT 1")
answering.clear()
took = {}

def ask(name, conn):
    asked = time.monotonic()
    try:
        conn.cursor().execute("SELECT 1")
    except psycopg2.Error as err:
        took[name] = [str(err).splitlines()[0], time.monotonic() - asked]

waiting = threading.Thread(target=ask, args=("waiting", conns[0]))
waiting.start()  # its request reaches the server, which does not answer: then the path goes
time.sleep(0.5)
subprocess.run("ip addr del 10.9.9.9/32 dev lo && ip route add blackhole 10.9.9.9/32", shell=True, check=True)
sending = threading.Thread(target=ask, args=("sending", conns[1]))
sending.start()  # its request is lost with the path
waiting.join(60)
sending.join(60)
print(json.dumps(took))
"""


def test_tcp_alone_gives_up_a_path_that_drops_every_packet_within_eleven_seconds() -> None:
    """What TCP's own bounds give, on a path that loses every packet (a partition without a proxy)."""
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a network namespace of its own (unshare -n), to drop packets without touching others")
    done = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", PARTITIONED], cwd=ROOT, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stderr
    took = json.loads(done.stdout)
    # Waiting for an answer, its request acknowledged: keepalive probes from 5 s, every 2 s, given up at the first
    # past TCP_USER_TIMEOUT (10 s), at 11 s. Sending: TCP_USER_TIMEOUT, 10 s without an acknowledgement.
    assert took["waiting"][0].endswith("Connection timed out") and 10.5 <= took["waiting"][1] <= 12.5, took
    assert took["sending"][0].endswith("Connection timed out") and 9.5 <= took["sending"][1] <= 11.5, took


def test_the_portfolio_lock_lets_other_services_insert_transactions(settings, world: World) -> None:
    from apply import apply_each_entry
    from domain import INVESTMENT
    from tiers import load

    world.portfolio_for("1000000001")
    request = world.request("investment", "1000000001")
    (entry,) = world.q("SELECT queue_id, account_number, uuid, status, updated_at FROM investment_queue")
    db = Database("user-portfolio-db", settings.portfolio_db_uri, settings)
    try:
        with db.transaction() as cur:
            factors = [t.invest_factor for t in load(cur)]
            assert apply_each_entry(cur, INVESTMENT, [Entry(*entry)], factors, STAMP) == {"COMPLETED": 1}
            # The portfolio service's foreign-key insert must not wait for the cycle's row lock.
            world.p("SET lock_timeout = '1s'")
            world.transaction_for("investment", "1000000001")
    finally:
        db.close()
    assert world.txn_status(request.uuid) == "PROCESSED"


def pooled_pids(db: Database) -> list[int]:
    """Return the server processes behind the connections the pool keeps, without lending them."""
    return sorted(conn.info.backend_pid for conn in db._pool._pool)


@pytest.mark.parametrize("failing", ["queue-db", "user-portfolio-db"])
def test_a_lost_connection_is_named_by_its_own_database_and_only_it_is_discarded(
    svc, world: World, caplog, failing
) -> None:
    assert svc.runner.run().to_json()["result"] == "ok"
    dbs = {"queue-db": svc.queue_db, "user-portfolio-db": svc.portfolio_db}
    healthy = next(db for name, db in dbs.items() if name != failing)
    kept = pooled_pids(healthy)
    for pid in pooled_pids(dbs[failing]):
        world.p("SELECT pg_terminate_backend(%s, 5000)", (pid,))

    with caplog.at_level(logging.ERROR, logger="cycle"):
        summary = svc.poller.run_once().to_json()

    assert summary["result"] == "error"
    assert summary["error"].startswith(f"{failing}: ")
    assert svc.status()["this_process"]["last_attempt"]["error"] == summary["error"]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        f"consistency cycle failed in {summary['duration_ms']:g} ms; error: {summary['error']}"
    ]
    assert pooled_pids(healthy) == kept  # the healthy database's connections stay in the pool
    assert svc.runner.run().to_json()["result"] == "ok"


def test_a_lock_timeout_on_user_portfolio_db_is_named_so(make_service, world: World) -> None:
    svc = make_service(db_lock_timeout=0.3)
    svc.runner.prepare()
    world.portfolio_for("1000000001")
    world.request("investment", "1000000001")
    with world.portfolio.cursor() as cur:
        cur.execute("BEGIN")
        # A held row of the service's own state: the cycle waits for it, where it skips held portfolio rows.
        cur.execute("SELECT 1 FROM consistency.watermarks WHERE queue = 'investment' FOR UPDATE")
        summary = svc.runner.run().to_json()
        kept = pooled_pids(svc.queue_db)
        cur.execute("ROLLBACK")

    assert summary["result"] == "error"
    assert summary["error"] == "user-portfolio-db: canceling statement due to lock timeout"
    assert len(kept) == 1  # the queue-db connection went back to the pool
