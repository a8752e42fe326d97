#!/bin/bash
# docker-compose.yml's `db` service, at its first start: the role the proxy logs in as, the database,
# the verifier with the proxy's signing key, and the demo's `leads` table with two tenants' rows.
set -euo pipefail
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d postgres \
     -v password="$(cat /run/secrets/pgtp/upstream-password)" <<'SQL'
CREATE ROLE tenant_app LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE PASSWORD :'password';
CREATE DATABASE app;
REVOKE ALL ON DATABASE app FROM PUBLIC;
GRANT CONNECT ON DATABASE app TO tenant_app;
SQL
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d app -f /run/secrets/pgtp/verifier.sql
sed 's/@APP_ROLE@/tenant_app/g' /demo/demo.sql | psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d app
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d app <<'SQL'
INSERT INTO leads (tenant_id, name, email) VALUES
    ('11111111-1111-4111-8111-111111111111', 'Ada Lovelace', 'ada@acme.test'),
    ('11111111-1111-4111-8111-111111111111', 'Alan Turing', 'alan@acme.test'),
    ('22222222-2222-4222-8222-222222222222', 'Grace Hopper', 'grace@globex.test'),
    ('22222222-2222-4222-8222-222222222222', 'Edsger Dijkstra', 'edsger@globex.test');
SQL
