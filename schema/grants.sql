-- Least privilege for the consistency manager's role: exactly what the service needs, nothing more.
-- Run by an owner of both databases, with psql:
--
--   psql -v service_role=consistency_manager -v queue_db=queue-db -v portfolio_db=user-portfolio-db \
--        -f schema/grants.sql
--
-- The role must exist already (CREATE ROLE ... LOGIN PASSWORD ...).

\connect :"queue_db"
GRANT CONNECT ON DATABASE :"queue_db" TO :"service_role";
GRANT USAGE ON SCHEMA public TO :"service_role";
-- Read the two queues; nothing else.
GRANT SELECT ON investment_queue, withdrawal_queue TO :"service_role";

\connect :"portfolio_db"
GRANT CONNECT ON DATABASE :"portfolio_db" TO :"service_role";
GRANT USAGE ON SCHEMA public TO :"service_role";
-- Read and update rows of the two portfolio tables; no INSERT, DELETE or DDL.
GRANT SELECT, UPDATE ON user_portfolios, portfolio_transactions TO :"service_role";
-- The service's own schema, which it migrates at start-up.
CREATE SCHEMA IF NOT EXISTS consistency AUTHORIZATION :"service_role";

-- Optional: exact watermark mode. Without it the service runs in look-back mode with reconciliation.
-- GRANT pg_read_all_stats TO :"service_role";
