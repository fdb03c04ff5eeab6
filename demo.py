"""The demo: two sample databases, the service under gunicorn, and a queue that keeps settling requests."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid as uuidlib
from collections import Counter

import psycopg2

from config import demo_server_uri, load_settings
from devkit import ROOT, gunicorn, postgres
from devkit.net import wait_until
from logs import mask_uri

QUEUE_DB, PORTFOLIO_DB = "consistency_demo_queue", "consistency_demo_portfolio"
# Where the demo's server listens unless DEMO_HOST says otherwise: this machine only, since its token is public.
DEMO_HOST = "127.0.0.1"
WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 - how the demo reaches a server on all interfaces
# Development default, for the demo only: never use it anywhere else.
DEMO_TOKEN = "demo-token-not-for-production"  # noqa: S105 - a marked development default
DEMO_TIERS = {"TIER1_MV": "1030000.0", "TIER2_MV": "1990000.0", "TIER3_MV": "512500.0"}
# accountid: (tier values, tier allocations)
PORTFOLIOS = {
    "1011226111": (("12000.00", "8000.00", "4000.00"), ("12000.00", "8000.00", "4000.00")),
    "1033623433": (("5150.25", "2600.00", "1000.00"), ("5000.00", "2500.00", "1000.00")),
    "1055757655": (("700.00", "300.00", "0.00"), ("700.00", "300.00", "0.00")),
    "1077441377": (("25000.00", "25000.00", "10000.00"), ("24000.00", "25000.00", "9000.00")),
}
# queue, account, status: what user-request-queue-svc has done so far.
SAMPLE_REQUESTS = [
    ("investment", "1011226111", "COMPLETED"),
    ("investment", "1033623433", "COMPLETED"),
    ("investment", "1055757655", "FAILED"),
    ("withdrawal", "1011226111", "COMPLETED"),
    ("withdrawal", "1077441377", "CANCELLED"),
    ("investment", "1077441377", "PENDING"),
    ("withdrawal", "1033623433", "PENDING"),
]
SHOWN_ACCOUNT = "1011226111"  # the account the printed commands look at
ORPHAN_ACCOUNT = "1099999999"  # a request for an account with no portfolio yet: it will be parked
NEW_REQUEST_EVERY = 5.0  # seconds between the requests the demo keeps queueing and completing


def which_server(server: str, embedded: object | None) -> str:
    """Say which PostgreSQL the demo uses, and why."""
    if demo_server_uri() and demo_server_uri() != postgres.EMBEDDED:
        return f"{mask_uri(server)}, as DEMO_PG_URI says"
    if embedded is None:
        return f"at {postgres.LOCAL_SERVER.split('@')[-1].split('/')[0]}, which answered"
    why = "as DEMO_PG_URI says" if demo_server_uri() else "since nothing answered at 127.0.0.1:5432"
    return f"embedded (from the pgserver package, its files in .demo/pgdata), {why}"


def recreate(server: str, dbname: str, schema: str) -> str:
    """Drop and create a demo database with a schema file; return its URI."""
    postgres.drop(server, dbname)
    return postgres.create_database(server, dbname, ROOT / "schema" / schema)


def load_sample(queue_uri: str, portfolio_uri: str) -> None:
    """Fill both databases with a few portfolios and requests in every state."""
    queue, portfolio = psycopg2.connect(queue_uri), psycopg2.connect(portfolio_uri)
    with portfolio, portfolio.cursor() as pcur, queue, queue.cursor() as qcur:
        for account, (values, allocations) in PORTFOLIOS.items():
            pcur.execute(
                "INSERT INTO user_portfolios (accountid, tier1_allocation, tier2_allocation, tier3_allocation,"
                " total_allocation, tier1_value, tier2_value, tier3_value, total_value)"
                " VALUES (%s, %s, %s, %s, %s::numeric + %s + %s, %s, %s, %s, %s::numeric + %s + %s)",
                (account, *allocations, *allocations, *values, *values),
            )
        for queue_name, account, status in [*SAMPLE_REQUESTS, ("withdrawal", ORPHAN_ACCOUNT, "COMPLETED")]:
            add_request(pcur, qcur, queue_name, account, status, with_transaction=account != ORPHAN_ACCOUNT)
    queue.close()
    portfolio.close()


def add_request(pcur, qcur, queue: str, account: str, status: str, with_transaction: bool = True) -> None:  # noqa: ANN001
    """Record one request the way the portfolio and queue services do."""
    entry = str(uuidlib.uuid4())
    kind = "INVEST" if queue == "investment" else "WITHDRAWAL"
    if with_transaction:
        pcur.execute(
            "INSERT INTO portfolio_transactions (id, accountid, transaction_type, tier1_change, tier2_change,"
            " tier3_change, total_amount) VALUES (%s, %s, %s, 100, 50, 25, 175)",
            (entry, account, kind),
        )
    qcur.execute(
        f"INSERT INTO {queue}_queue (account_number, tier_1, tier_2, tier_3, uuid, status)"  # noqa: S608 - fixed names
        " VALUES (%s, 100, 50, 25, %s, %s)",
        (account, entry, status),
    )


def settle_one(queue_uri: str) -> str | None:
    """Act as user-request-queue-svc: complete the oldest pending request; describe what was done."""
    conn = psycopg2.connect(queue_uri)
    with conn, conn.cursor() as cur:
        for queue in ("investment", "withdrawal"):
            cur.execute(
                f"UPDATE {queue}_queue SET status = 'COMPLETED', processed_at = now()"  # noqa: S608 - fixed names
                " WHERE queue_id = (SELECT min(queue_id) FROM {queue}_queue WHERE status = 'PENDING')"
                " RETURNING queue_id, account_number".replace("{queue}", queue)
            )
            row = cur.fetchone()
            if row:
                conn.commit()
                return f"{queue} request {row[0]} for account {row[1]} is now COMPLETED"
    conn.close()
    return None


def new_request(queue_uri: str, portfolio_uri: str, turn: int) -> str:
    """Act as the request and portfolio services: queue a new request for one of the portfolios, in turn, and
    complete it at once; describe it."""
    queue = ("investment", "withdrawal")[turn % 2]
    account = list(PORTFOLIOS)[turn % len(PORTFOLIOS)]
    qconn, pconn = psycopg2.connect(queue_uri), psycopg2.connect(portfolio_uri)
    with pconn, pconn.cursor() as pcur, qconn, qconn.cursor() as qcur:
        add_request(pcur, qcur, queue, account, "COMPLETED")
    qconn.close()
    pconn.close()
    return f"a new {queue} request for account {account} is COMPLETED"


def stage_the_console(base: str, queue_uri: str, portfolio_uri: str) -> None:
    """Give every page of the console something to show: a correction, a drift finding, a pause and its end in
    the audit trail (the parked entry is in the sample already)."""
    applied = request_json(base, "POST", "/api/v1/consistency/trigger")
    conn = psycopg2.connect(queue_uri)
    with conn, conn.cursor() as cur:  # the queue changes an entry after it was applied: a correction
        cur.execute("UPDATE investment_queue SET status = 'FAILED' WHERE queue_id = 1")
    conn.close()
    conn = psycopg2.connect(portfolio_uri)
    with conn, conn.cursor() as cur:  # a transaction settled out of band: what a drift check finds
        cur.execute(
            "INSERT INTO portfolio_transactions (id, accountid, transaction_type, total_amount, status)"
            " VALUES (%s, %s, 'INVEST', 50, 'PROCESSED')",
            (str(uuidlib.uuid4()), list(PORTFOLIOS)[2]),
        )
    conn.close()
    request_json(base, "POST", "/api/v1/consistency/pause", {"reason": "demo: a pause for the audit trail"})
    request_json(base, "POST", "/api/v1/consistency/resume", {"reason": "demo: back to work"})
    request_json(base, "POST", "/api/v1/consistency/trigger")
    request_json(base, "POST", "/api/v1/consistency/drift-checks", {"reason": "demo: the first check"})
    if applied[0] != 200:
        raise SystemExit(f"the demo's first cycle did not run: {applied}")


def request_json(base: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """Call the API with the demo token, with a JSON body if given."""
    data = None if body is None else json.dumps(body).encode()
    call = urllib.request.Request(f"{base}{path}", data=data, method=method)  # noqa: S310 - the http:// base_url
    call.add_header("Authorization", f"Bearer {DEMO_TOKEN}")
    if data is not None:
        call.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(call, timeout=30) as answer:  # noqa: S310 - the http:// base_url
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def demo_host() -> str:
    """Return DEMO_HOST: the address the demo's server listens on (127.0.0.1 unless set)."""
    return os.environ.get("DEMO_HOST") or DEMO_HOST


def address(host: str, port: int) -> str:
    """Write host and port as gunicorn's --bind and a URL take them: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def base_url(host: str, port: int) -> str:
    """Return the URL this machine reaches the demo's server at: a wildcard address through the loopback."""
    return f"http://{address(WILDCARDS.get(host, host), port)}"


def get(base: str, path: str) -> tuple[int, dict]:
    """GET a path of the running service."""
    try:
        with urllib.request.urlopen(f"{base}{path}", timeout=5) as answer:  # noqa: S310 - the http:// base_url
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_ready(base: str, service: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Wait until the service reports ready; stop the demo if it exits first or takes too long."""
    try:
        wait_until(lambda: service.poll() is not None or get(base, "/ready")[0] == 200, timeout, "readiness", 0.2)
    except AssertionError:
        raise SystemExit("the service did not become ready") from None
    if service.poll() is not None:
        raise SystemExit(f"the service exited with status {service.returncode}")


def print_try_these(base: str) -> None:
    """Show the console, the token and the commands a newcomer can try."""
    auth = '-H "Authorization: Bearer $API_TOKEN"'
    print(
        f"""
The consistency manager is running on {base}.

  The console: {base}/console/  (sign in with the demo token below)
  The API's document: {base}/api/v1/docs/swagger

  export API_TOKEN={DEMO_TOKEN}
  curl -s {base}/api/v1/consistency/status
  curl -s {auth} "{base}/api/v1/consistency/parked?queue=withdrawal"
  curl -s {auth} {base}/api/v1/consistency/portfolios/{SHOWN_ACCOUNT}
  curl -s {auth} {base}/api/v1/consistency/drift-checks/latest
  curl -s -X POST {auth} -H "Content-Type: application/json" -d '{{"reason": "trying it"}}' \\
       {base}/api/v1/consistency/pause

Every {NEW_REQUEST_EVERY:g} s the demo queues a request and completes it, as the other services would; the log
shows each cycle that applied something. Ctrl-C stops it all.
""",
        flush=True,
    )


def smoke(portfolio_uri: str) -> None:
    """Check that the sample was applied as the demo promises; exit non-zero if not."""
    outcome = {"COMPLETED": "PROCESSED"}
    want = Counter(outcome.get(status, status) for _, _, status in SAMPLE_REQUESTS)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        conn = psycopg2.connect(portfolio_uri)
        with conn, conn.cursor() as cur:
            cur.execute("SELECT status, count(*) FROM portfolio_transactions GROUP BY status")
            statuses = dict(cur.fetchall())
            cur.execute("SELECT count(*) FROM consistency.parked_entries")
            parked = cur.fetchone()[0]
        conn.close()
        if Counter(statuses) == want and parked == 1:
            print(f"demo smoke check passed: transactions {statuses}, {parked} parked")
            return
        time.sleep(0.3)
    raise SystemExit(f"demo smoke check failed: transactions {statuses}, {parked} parked; wanted {want}, 1 parked")


def main() -> None:
    """Set up the sample databases, run the service, and keep settling requests until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="check the demo works, then stop")
    args = parser.parse_args()
    server, embedded = postgres.find_server(demo_server_uri(), ROOT / ".demo" / "pgdata")
    print(f"demo: PostgreSQL {which_server(server, embedded)}", flush=True)
    queue_uri = recreate(server, QUEUE_DB, "queue_db.sql")
    portfolio_uri = recreate(server, PORTFOLIO_DB, "user_portfolio_db.sql")
    load_sample(queue_uri, portfolio_uri)
    host, port = demo_host(), load_settings().port
    base = base_url(host, port)
    env = {
        **os.environ,
        **DEMO_TIERS,
        "QUEUE_DB_URI": queue_uri,
        "USER_PORTFOLIO_DB_URI": portfolio_uri,
        "API_TOKEN": DEMO_TOKEN,
        "POLLING_INTERVAL": os.environ.get("POLLING_INTERVAL", "5"),
        # Lines for a person: the text format, which leaves out the cycles that found nothing to do.
        "LOG_FORMAT": os.environ.get("LOG_FORMAT", "text"),
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "INFO"),
    }
    try:
        # --bind replaces gunicorn.conf.py's 0.0.0.0, which a container needs and a laptop does not.
        # No access log: the demo's commands and the cycles' lines stay readable.
        command = gunicorn.command("--bind", address(host, port), "--access-logfile", "/dev/null")
        with gunicorn.running(command, env) as service:  # its lines go to this terminal
            wait_ready(base, service)
            if args.smoke:
                smoke(portfolio_uri)
                return
            stage_the_console(base, queue_uri, portfolio_uri)
            print_try_these(base)
            turn = 0
            while service.poll() is None:
                time.sleep(NEW_REQUEST_EVERY)
                print(f"queue: {settle_one(queue_uri) or new_request(queue_uri, portfolio_uri, turn)}", flush=True)
                turn += 1
    except KeyboardInterrupt:
        pass
    finally:
        del embedded


if __name__ == "__main__":
    main()
