"""The SQL guard's decisions, statement by statement."""

import pytest

from proxy.guard import ALLOW, Guard, needs_parse
from proxy.parameters import ProtectedSettings


@pytest.fixture
def guard() -> Guard:
    return Guard(ProtectedSettings(["app.current_tenant", "tenant_proxy.proof"], ["app.", "request.jwt."]), allow_do=False)


@pytest.mark.parametrize(
    "sql, reason",
    [
        ("SET app.current_tenant = 'x'", 'setting "app.current_tenant" is protected'),
        ("SET SESSION app.current_tenant TO 'x'", "protected"),
        ("set local APP.CURRENT_TENANT = 'x'", "protected"),
        ('SET "app.current_tenant" = DEFAULT', "protected"),
        ("RESET app.current_tenant", "protected"),
        ("SET tenant_proxy.proof = '1:2'", "protected"),
        ("SET request.jwt.claims = '{}'", "protected"),
        ("SELECT set_config('app.current_tenant', 'x', false)", "set_config() of \"app.current_tenant\""),
        ("SELECT pg_catalog.set_config('app.current_tenant'::text, 'x', true)", "set_config()"),
        ("WITH c AS (SELECT set_config('tenant_proxy.proof', 'x', false)) SELECT * FROM c", "set_config()"),
        ("SELECT * FROM leads WHERE set_config('app.current_tenant', 'x', false) IS NOT NULL", "set_config()"),
        ("SELECT set_config('role', 'postgres', false)", "set_config()"),
        ("SET ROLE postgres", "SET ROLE"),
        ("RESET ROLE", "SET ROLE / RESET ROLE"),
        ("SET SESSION AUTHORIZATION postgres", "SET SESSION AUTHORIZATION"),
        ("SET SESSION AUTHORIZATION DEFAULT", "SET SESSION AUTHORIZATION"),
        ("ALTER ROLE CURRENT_USER SET app.current_tenant = 'x'", "ALTER ROLE"),
        ("ALTER ROLE tenant_app BYPASSRLS", "ALTER ROLE"),
        ("ALTER USER CURRENT_USER SET app.current_tenant = 'x'", "ALTER ROLE"),
        ("RESET SESSION AUTHORIZATION", "SET SESSION AUTHORIZATION"),
        ("ALTER DATABASE app SET app.current_tenant = 'x'", "ALTER DATABASE"),
        ("ALTER SYSTEM SET work_mem = '1GB'", "ALTER SYSTEM"),
        ("LOAD 'auto_explain'", "LOAD"),
        ("DO $$ BEGIN PERFORM 1; END $$", "DO blocks"),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql SET app.current_tenant = 'x' AS $$ SELECT 1 $$", "protected"),
        ("CREATE PROCEDURE p() LANGUAGE sql SET tenant_proxy.proof = 'x' AS $$ SELECT 1 $$", "protected"),
        ("ALTER FUNCTION f() SET app.current_tenant = 'x'", "protected"),
        ("SELECT 1; SET app.current_tenant = 'x'; SELECT 2", "protected"),
        ("BEGIN; SET LOCAL ROLE postgres; COMMIT", "SET ROLE"),
        ("/* comment */ SET app.current_tenant = 'x'", "protected"),
        ("-- comment\nSET app.current_tenant = 'x'", "protected"),
        ("/* a /* nested */ comment */ SET app.current_tenant = 'x'", "protected"),
        ("  \n\tset app.current_tenant = 'x'", "protected"),
        ('SELECT U&"\\0073et_config"(\'app.current_tenant\', \'x\', false)', "set_config()"),
        ("SELECT \"set_config\"('app.current_tenant', 'x', false)", "set_config()"),
    ],
)
def test_refused(guard: Guard, sql: str, reason: str) -> None:
    decision = guard.check(sql)
    assert decision.refusal is not None and reason in decision.refusal, decision


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM leads WHERE tenant_id = $1",
        "SET search_path = public",
        "SET LOCAL statement_timeout = '5s'",
        "SELECT set_config('search_path', 'public', false)",
        "SELECT set_config($1, $2, false)",
        "SELECT current_setting('app.current_tenant')",
        "SHOW app.current_tenant",
        "INSERT INTO leads (tenant_id, name, email) VALUES ($1, $2, $3) RETURNING id",
        "BEGIN; UPDATE leads SET name = 'x' WHERE id = 1; COMMIT",
        "COPY leads TO STDOUT",
        "SELECT 'SET app.current_tenant = 1'",
        "this is not sql at all",
        "CREATE TEMP TABLE t (id int)",
    ],
)
def test_allowed(guard: Guard, sql: str) -> None:
    decision = guard.check(sql)
    assert decision.refusal is None and not decision.reassert


@pytest.mark.parametrize("sql", ["RESET ALL", "DISCARD ALL", "SELECT 1; RESET ALL", "discard all"])
def test_reset_all_and_discard_all_reassert(guard: Guard, sql: str) -> None:
    decision = guard.check(sql)
    assert decision.refusal is None and decision.reassert


def test_do_allowed_when_configured() -> None:
    guard = Guard(ProtectedSettings(["app.current_tenant"], ["app."]), allow_do=True)
    assert guard.check("DO $$ BEGIN PERFORM 1; END $$") == ALLOW


@pytest.mark.parametrize(
    "sql, expected",
    [
        ("SELECT abalance FROM pgbench_accounts WHERE aid = 1", False),
        ("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1", False),
        ("INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET v = 1", True),
        ("UPDATE t SET v = 1; SELECT 1", True),
        ("SET search_path = public", True),
        ("SELECT set_config('a.b', 'c', false)", True),
        ("SELECT settings FROM t", False),
    ],
)
def test_pre_scan(sql: str, expected: bool) -> None:
    assert needs_parse(sql) is expected


def test_decisions_are_cached(guard: Guard) -> None:
    first = guard.check("SET ROLE postgres")
    assert guard.check("SET ROLE postgres") is first
