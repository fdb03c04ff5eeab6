"""The benchmark's data: a backlog of completed entries, 10 per account, half investments, half withdrawals."""

from __future__ import annotations

import psycopg2

from devkit import ROOT, postgres

# Deltas of a few percent, so every application changes the portfolio.
TIERS = {"TIER1": "1000000", "TIER1_MV": "1030000", "TIER2": "2000000", "TIER2_MV": "1990000",
         "TIER3": "500000", "TIER3_MV": "512500"}  # fmt: skip
ENTRIES_PER_ACCOUNT = 10


def run(uri: str, statement: str, params: tuple | dict[str, object] = ()) -> None:
    """Run one statement and commit."""
    conn = psycopg2.connect(uri)
    with conn, conn.cursor() as cur:
        cur.execute(statement, params)
    conn.close()


def fresh_copy(server: str, templates: tuple[str, str]) -> tuple[str, str, list[str]]:
    """Clone the backlog's databases; return their URIs and names."""
    names = [postgres.clone(server, template) for template in templates]
    return postgres.with_database(server, names[0]), postgres.with_database(server, names[1]), names


def build_templates(server: str, entries: int) -> tuple[str, str]:
    """Create template databases holding the backlog; return their names."""
    queue = postgres.create_template(server, "bench_tpl_queue", ROOT / "schema" / "queue_db.sql")
    portfolio = postgres.create_template(server, "bench_tpl_portfolio", ROOT / "schema" / "user_portfolio_db.sql")
    quri, puri = postgres.with_database(server, queue), postgres.with_database(server, portfolio)
    accounts = max(1, entries // ENTRIES_PER_ACCOUNT)
    run(puri, "INSERT INTO user_portfolios (accountid, tier1_allocation, tier2_allocation, tier3_allocation,"
              " total_allocation, tier1_value, tier2_value, tier3_value, total_value)"
              " SELECT (1000000000 + a)::text, 100, 200, 300, 600, 1000, 2000, 3000, 6000"
              " FROM generate_series(0, %s - 1) AS a", (accounts,))  # fmt: skip
    # Entry n belongs to account n / 10; even entries are investments, odd ones withdrawals.
    for queue_name, table, kind, parity in (("investment", "investment_queue", "INVEST", 0),
                                            ("withdrawal", "withdrawal_queue", "WITHDRAWAL", 1)):  # fmt: skip
        run(puri, "INSERT INTO portfolio_transactions (id, accountid, transaction_type, total_amount)"
                  " SELECT md5('e' || n)::uuid, (1000000000 + n / %s)::text, %s, 100"
                  " FROM generate_series(0, %s - 1) AS n WHERE n %% 2 = %s",
            (ENTRIES_PER_ACCOUNT, kind, entries, parity))  # fmt: skip
        run(quri, f"INSERT INTO {table} (account_number, tier_1, tier_2, tier_3, uuid, status, processed_at)"  # noqa: S608
                  " SELECT (1000000000 + n / %s)::text, 10, 20, 30, md5('e' || n)::uuid::text, 'COMPLETED', now()"
                  " FROM generate_series(0, %s - 1) AS n WHERE n %% 2 = %s",
            (ENTRIES_PER_ACCOUNT, entries, parity))  # fmt: skip
        del queue_name
    for uri in (quri, puri):
        conn = psycopg2.connect(uri)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("VACUUM ANALYZE")
        conn.close()
    return queue, portfolio


def snapshot(portfolio_uri: str) -> tuple[str, str]:
    """Fingerprint what an approach left: every portfolio's amounts and every transaction's status."""
    conn = psycopg2.connect(portfolio_uri)
    with conn.cursor() as cur:
        cur.execute("SELECT md5(string_agg(concat_ws(',', accountid, tier1_value, tier2_value, tier3_value,"
                    " total_value, tier1_allocation, tier2_allocation, tier3_allocation, total_allocation), ';'"
                    " ORDER BY accountid)) FROM user_portfolios")  # fmt: skip
        portfolios = cur.fetchone()[0]
        cur.execute("SELECT md5(string_agg(id::text || status, ';' ORDER BY id)) FROM portfolio_transactions")
        statuses = cur.fetchone()[0]
    conn.close()
    return portfolios, statuses
