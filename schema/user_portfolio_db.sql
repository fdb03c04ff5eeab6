-- user-portfolio-db: owned by the portfolio services. Shipped here for development, tests and the
-- demo. The consistency manager updates rows of these two tables and never alters them.

CREATE TABLE IF NOT EXISTS user_portfolios (
    accountid        VARCHAR(10) PRIMARY KEY,
    currency         TEXT NOT NULL DEFAULT 'USD',
    tier1_allocation NUMERIC(15, 2) NOT NULL DEFAULT 0,
    tier2_allocation NUMERIC(15, 2) NOT NULL DEFAULT 0,
    tier3_allocation NUMERIC(15, 2) NOT NULL DEFAULT 0,
    total_allocation NUMERIC(15, 2) NOT NULL DEFAULT 0,
    tier1_value      NUMERIC(15, 2) NOT NULL DEFAULT 0,
    tier2_value      NUMERIC(15, 2) NOT NULL DEFAULT 0,
    tier3_value      NUMERIC(15, 2) NOT NULL DEFAULT 0,
    total_value      NUMERIC(15, 2) NOT NULL DEFAULT 0,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT allocations_sum CHECK (
        tier1_allocation + tier2_allocation + tier3_allocation = total_allocation),
    CONSTRAINT values_sum CHECK (tier1_value + tier2_value + tier3_value = total_value)
);

CREATE TABLE IF NOT EXISTS portfolio_transactions (
    id               UUID PRIMARY KEY,
    accountid        VARCHAR(10) NOT NULL REFERENCES user_portfolios (accountid),
    transaction_type VARCHAR(20) NOT NULL CHECK (transaction_type IN ('INVEST', 'WITHDRAWAL')),
    tier1_change     NUMERIC(15, 2) NOT NULL DEFAULT 0,
    tier2_change     NUMERIC(15, 2) NOT NULL DEFAULT 0,
    tier3_change     NUMERIC(15, 2) NOT NULL DEFAULT 0,
    total_amount     NUMERIC(15, 2) NOT NULL DEFAULT 0,
    fees             NUMERIC(10, 2) NOT NULL DEFAULT 0,
    status           VARCHAR(20) NOT NULL DEFAULT 'PENDING'
                     CHECK (status IN ('PENDING', 'PROCESSED', 'COMPLETED', 'FAILED', 'CANCELLED')),
    created_at       TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE INDEX IF NOT EXISTS portfolio_transactions_accountid ON portfolio_transactions (accountid);
