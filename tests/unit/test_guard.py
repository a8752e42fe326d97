"""The SQL guard's decisions, statement by statement: refusals with their SQLSTATEs, failing closed, the
Decision fields the relay acts on, the pre-scan, and FunctionCall messages."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pglast import parser

from proxy import guard as guard_module
from proxy.guard import ALLOW, Decision, Guard, needs_parse
from proxy.parameters import ProtectedSettings

PROTECTED = ProtectedSettings(["app.current_tenant", "tenant_proxy.proof"], ["app.", "request.jwt."])
NESTED = "ALTER ROLE CURRENT_USER PASSWORD 'x'; SELECT " + "1+(" * 1000 + "1" + ")" * 1000


def make(transaction_mode: bool = False, **switches: Any) -> Guard:
    return Guard(PROTECTED, allow_do=switches.pop("allow_do", False), transaction_mode=transaction_mode, **switches)


@pytest.fixture(params=[False, True], ids=["session", "transaction"])
def guard(request: pytest.FixtureRequest) -> Guard:
    return make(request.param)


def refusal(guard: Guard, sql: str) -> tuple[str, str, str]:
    decision = guard.check(sql)
    assert decision.refusal is not None, decision
    return decision.refusal.sqlstate, decision.refusal.message, decision.refusal.hint


@pytest.mark.parametrize(
    "sql, sqlstate, reason",
    [
        ("SET app.current_tenant = 'x'", "42501", 'setting "app.current_tenant" is protected'),
        ("SET SESSION app.current_tenant TO 'x'", "42501", "protected"),
        ("set local APP.CURRENT_TENANT = 'x'", "42501", "protected"),
        ('SET "app.current_tenant" = DEFAULT', "42501", "protected"),
        ("RESET app.current_tenant", "42501", "protected"),
        ("SET tenant_proxy.proof = '1:2'", "42501", "protected"),
        ("SET request.jwt.claims = '{}'", "42501", "protected"),
        ("SELECT set_config('app.current_tenant', 'x', false)", "42501", 'set_config() of "app.current_tenant"'),
        ("SELECT pg_catalog.set_config('app.current_tenant'::text, 'x', true)", "42501", "set_config()"),
        ("SELECT app.pg_catalog.set_config('app.current_tenant', 'x', false)", "42501", "set_config()"),  # database.schema.name
        ("SELECT \"a\"\"b\".pg_catalog.set_config('tenant_proxy.proof', 'x', false)", "42501", "set_config()"),
        ("WITH c AS (SELECT set_config('tenant_proxy.proof', 'x', false)) SELECT * FROM c", "42501", "set_config()"),
        ("SELECT * FROM leads WHERE set_config('app.current_tenant', 'x', false) IS NOT NULL", "42501", "set_config()"),
        ("SELECT set_config('role', 'postgres', false)", "42501", "set_config()"),
        ("SELECT set_config('app.current_tenant' COLLATE \"C\", 'x', false)", "42501", "set_config()"),
        ("SELECT set_config(('app.current_tenant' COLLATE \"C\")::pg_catalog.text, 'x', false)", "42501", "set_config()"),
        ("SELECT set_config('app.current_tenant'::pg_catalog.varchar COLLATE \"C\", 'x', false)", "42501", "set_config()"),
        ("SELECT set_config('client_encoding' COLLATE \"C\", 'SJIS' COLLATE \"C\", false)", "0A000", "SJIS"),
        # Function-style casts: Postgres takes text('x') as 'x'::text.
        ("SELECT set_config(text('app.current_tenant'), 'x', false)", "42501", "set_config()"),
        ("SELECT set_config(pg_catalog.name(('tenant_proxy.proof')), 'x', false)", "42501", "set_config()"),
        ("SELECT set_config(bpchar('seed'), '0.5', false)", "42501", '"seed"'),
        ("SELECT set_config('client_encoding', pg_catalog.text('SJIS'), false)", "0A000", "SJIS"),
        ("SELECT set_config(E'app\\x2ecurrent_tenant', 'x', false)", "42501", "set_config()"),
        ("SELECT * FROM set_config('app.current_tenant', 'x', false)", "42501", "set_config()"),
        ("SELECT * FROM ROWS FROM (set_config('app.current_tenant', 'x', false))", "42501", "set_config()"),
        ("COPY (SELECT set_config('app.current_tenant', 'x', false)) TO STDOUT", "42501", "set_config()"),
        ("VALUES (1, upper(set_config('app.current_tenant', 'x', false)))", "42501", "set_config()"),
        ("SELECT CASE WHEN true THEN set_config('tenant_proxy.proof', 'x', false) END", "42501", "set_config()"),
        ("SELECT (SELECT max(set_config('app.current_tenant', name, false)) FROM leads)", "42501", "set_config()"),
        ("SET ROLE postgres", "42501", "SET ROLE"),
        ("RESET ROLE", "42501", "SET ROLE / RESET ROLE"),
        ("SET SESSION AUTHORIZATION postgres", "42501", "SET SESSION AUTHORIZATION"),
        ("SET SESSION AUTHORIZATION DEFAULT", "42501", "SET SESSION AUTHORIZATION"),
        ("RESET SESSION AUTHORIZATION", "42501", "SET SESSION AUTHORIZATION"),
        # The seed outlives RESET ALL and DISCARD ALL: the next client of the connection would draw its sequence.
        ("SET seed = 0.5", "42501", 'writing the setting "seed"'),
        ("set SESSION \"SEED\" TO 0", "42501", '"seed"'),
        ("RESET seed", "42501", '"seed"'),
        ("SET seed TO DEFAULT", "42501", '"seed"'),
        ("BEGIN; SET LOCAL seed = 0.5; COMMIT", "42501", '"seed"'),
        ("SELECT pg_catalog.set_config('seed', '0.5', false)", "42501", '"seed"'),
        ("SELECT set_config('SEED'::text, '0.5', true)", "42501", '"seed"'),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql SET seed = 0.5 AS $$ SELECT 1 $$", "42501", '"seed"'),
        ("ALTER ROLE CURRENT_USER SET app.current_tenant = 'x'", "42501", "ALTER ROLE"),
        ("ALTER ROLE tenant_app BYPASSRLS", "42501", "ALTER ROLE"),
        ("ALTER USER CURRENT_USER SET app.current_tenant = 'x'", "42501", "ALTER ROLE"),
        ("ALTER DATABASE app SET app.current_tenant = 'x'", "42501", "ALTER DATABASE"),
        ("ALTER SYSTEM SET work_mem = '1GB'", "42501", "ALTER SYSTEM"),
        ("LOAD 'auto_explain'", "42501", "LOAD"),
        ("DO $$ BEGIN PERFORM 1; END $$", "42501", "DO blocks"),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql SET app.current_tenant = 'x' AS $$ SELECT 1 $$", "42501", "protected"),
        ("CREATE PROCEDURE p() LANGUAGE sql SET tenant_proxy.proof = 'x' AS $$ SELECT 1 $$", "42501", "protected"),
        ("ALTER FUNCTION f() SET app.current_tenant = 'x'", "42501", "protected"),
        ("SELECT 1; SET app.current_tenant = 'x'; SELECT 2", "42501", "protected"),
        ("BEGIN; SET LOCAL ROLE postgres; COMMIT", "42501", "SET ROLE"),
        ("/* comment */ SET app.current_tenant = 'x'", "42501", "protected"),
        ("-- comment\nSET app.current_tenant = 'x'", "42501", "protected"),
        ("/* a /* nested */ comment */ SET app.current_tenant = 'x'", "42501", "protected"),
        ("  \n\tset app.current_tenant = 'x'", "42501", "protected"),
        ('SELECT U&"\\0073et_config"(\'app.current_tenant\', \'x\', false)', "42501", "set_config()"),
        ("SELECT \"set_config\"('app.current_tenant', 'x', false)", "42501", "set_config()"),
        ("UPDATE pg_settings SET setting = 'x' WHERE name = 'app.current_tenant'", "42501", "pg_settings"),
        ("WITH u AS (UPDATE pg_catalog.pg_settings SET setting = 'x' RETURNING 1) SELECT 1", "42501", "pg_settings"),
        # Casts the server computes: char(n) drops trailing spaces, varchar(n) and char(n) cut (Postgres 15 takes each).
        ("SELECT set_config('role '::char(5), 'other', true)", "42501", 'set_config() of "role"'),
        ("SELECT set_config('tenant_proxy.proofX'::varchar(18), 'p', false)", "42501", '"tenant_proxy.proof"'),
        ("SELECT set_config('standard_conforming_strings_x'::varchar(27), 'off', true)", "0A000", "standard_conforming_strings"),
        ("SELECT set_config('client_encoding', 'sjisx'::varchar(4), true)", "0A000", 'client_encoding "sjis"'),
        ("SELECT set_config('client_encoding', 'sjis'::text, true)", "0A000", "computed value"),  # text may be pg_temp's
        # A view of pg_settings is updatable, and its UPDATE runs pg_settings's rules.
        ("CREATE OR REPLACE VIEW v AS SELECT name, setting FROM pg_settings", "42501", "a view of pg_settings"),
        ("CREATE VIEW v AS SELECT * FROM pg_catalog.pg_settings WHERE name LIKE 'x%'", "42501", "a view of pg_settings"),
        # Aggregates and operators that call a refused function under another name.
        ("CREATE AGGREGATE public.agg(text, boolean) (SFUNC = set_config, STYPE = text, INITCOND = 'app.current_tenant')",
         "42501", "SFUNC = set_config"),
        ("CREATE OPERATOR public.!!! (LEFTARG = text, RIGHTARG = text, FUNCTION = pg_notify)", "42501", "pg_notify"),
        ("CREATE OPERATOR app.public.!!! (RIGHTARG = oid, PROCEDURE = app.pg_catalog.lo_unlink)", "42501", "lo_unlink"),
        ("CREATE AGGREGATE a(oid) (SFUNC = int4pl, STYPE = oid, FINALFUNC = lo_get)", "42501", "FINALFUNC = lo_get"),
        ("CREATE OPERATOR !!! (RIGHTARG = int, FUNCTION = pg_cancel_backend)", "42501", "pg_cancel_backend"),
        # ALTER DATABASE / ALTER ROLE spelled as a rename or an owner change.
        ("ALTER DATABASE app OWNER TO tenant", "42501", "ALTER DATABASE ... OWNER TO"),
        ("ALTER DATABASE other RENAME TO x", "42501", "ALTER DATABASE ... RENAME"),
        ("ALTER USER tenant RENAME TO x", "42501", "ALTER ROLE ... RENAME"),
        # What carries other tenants' data past RLS, or blocks every tenant.
        ("EXPLAIN (ANALYZE false, ANALYZE true, COSTS off, TIMING off) SELECT 1", "42501", "EXPLAIN ANALYZE"),  # the last counts
        ("EXPLAIN (COSTS off, COSTS on) SELECT 1", "42501", "EXPLAIN with costs"),
        ("EXPLAIN ANALYZE SELECT * FROM leads WHERE name = 'x'", "42501", "EXPLAIN ANALYZE"),
        ("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT 1", "42501", "EXPLAIN ANALYZE"),
        ("EXPLAIN (ANALYZE 1) SELECT 1", "42501", "EXPLAIN ANALYZE"),
        ("explain analyze verbose select 1", "42501", "EXPLAIN ANALYZE"),
        ("EXPLAIN SELECT * FROM leads", "42501", "EXPLAIN with costs"),
        ("EXPLAIN (FORMAT JSON) SELECT 1", "42501", "EXPLAIN with costs"),
        ("EXPLAIN (COSTS ON) SELECT 1", "42501", "EXPLAIN with costs"),
        ("LOCK TABLE leads IN ACCESS EXCLUSIVE MODE", "42501", "ACCESS EXCLUSIVE MODE"),
        ("LOCK leads", "42501", "ACCESS EXCLUSIVE MODE"),
        ("BEGIN; LOCK TABLE leads IN SHARE MODE; COMMIT", "42501", "in SHARE MODE"),
        ("LOCK TABLE leads IN SHARE UPDATE EXCLUSIVE MODE", "42501", "SHARE UPDATE EXCLUSIVE"),
        ("LOCK TABLE leads IN EXCLUSIVE MODE NOWAIT", "42501", "in EXCLUSIVE MODE"),
        ("TRUNCATE leads", "42501", "TRUNCATE"),
        ("NOTIFY news, 'hello'", "42501", "NOTIFY"),
        ("SELECT pg_notify('news', 'x')", "42501", "pg_notify()"),
        ("SELECT pg_catalog.pg_notify('news', 'x')", "42501", "pg_notify()"),
        ("SELECT lo_get(16384)", "42501", "lo_get()"),
        ("SELECT lo_unlink(oid) FROM pg_largeobject_metadata", "42501", "lo_unlink()"),
        ("SELECT loread(lo_open(1, 262144), 10)", "42501", "large objects"),
        ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity", "42501", "pg_terminate_backend()"),
        ("SELECT pg_cancel_backend(42)", "42501", "pg_cancel_backend()"),
        # Lexing modes the guard does not model.
        ("SET standard_conforming_strings = off", "0A000", "standard_conforming_strings"),
        ("SET standard_conforming_strings TO false", "0A000", "standard_conforming_strings"),
        ("SET standard_conforming_strings = 0", "0A000", "standard_conforming_strings"),
        ("SET standard_conforming_strings = 'no'", "0A000", "standard_conforming_strings"),
        ("SET LOCAL standard_conforming_strings = of", "0A000", "standard_conforming_strings"),
        ("SELECT set_config('standard_conforming_strings', 'off', false)", "0A000", "standard_conforming_strings"),
        ("SELECT set_config('standard_conforming_strings', $1, false)", "0A000", "computed value"),
        # The attack: with strings read non-standard, the server runs a SET ROLE the guard reads as a string.
        ("SET standard_conforming_strings = off; SELECT 'a\\'  ,'  ; SET ROLE postgres; --'", "0A000",
         "standard_conforming_strings"),
        ("SET client_encoding = 'SJIS'", "0A000", 'client_encoding "SJIS"'),
        ("SET NAMES 'Shift_JIS'", "0A000", "Shift_JIS"),
        ("SET NAMES 'BIG5'", "0A000", "BIG5"),
        ("SET client_encoding TO gbk", "0A000", "gbk"),
        ("SET client_encoding = 'WIN936'", "0A000", "WIN936"),
        ("SET client_encoding = 'windows-950'", "0A000", "windows-950"),
        ("SET client_encoding = 'GB18030'", "0A000", "GB18030"),
        ("SET client_encoding = 'JOHAB'", "0A000", "JOHAB"),
        ("SET client_encoding = 'mskanji'", "0A000", "mskanji"),
        ("SET client_encoding = 'SHIFT_JIS_2004'", "0A000", "SHIFT_JIS_2004"),
        ("SELECT set_config('client_encoding', 'sjis', true)", "0A000", "sjis"),
        # Text the guard cannot read with certainty.
        ("SELECT set_config('a.b', 'c', false", "42601", "syntax error at end of input"),
        ("SET x = ;", "42601", 'syntax error at or near ";"'),
    ],
)
def test_refused(guard: Guard, sql: str, sqlstate: str, reason: str) -> None:
    state, message, hint = refusal(guard, sql)
    assert state == sqlstate and reason in message, message
    assert hint and hint != message


def test_each_kind_has_its_own_hint() -> None:
    guard = make()
    hints = {refusal(guard, sql)[2] for sql in (
        "SET app.current_tenant = 'x'", "SET ROLE x", "ALTER SYSTEM SET a = 1", "DO $$ $$", "EXPLAIN SELECT 1",
        "LOCK leads", "NOTIFY x", "SELECT lo_get(1)", "SELECT pg_cancel_backend(1)", "SET NAMES 'SJIS'",
        "SET standard_conforming_strings = off", "SET x =", "UPDATE pg_settings SET setting = 1",
    )}
    assert len(hints) == 13


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT set_config('a.b', 'c', false) + " + "1+(" * 5000 + "1" + ")" * 5000,  # the grammar's stack ("memory exhausted")
        "SELECT set_config('a.b', 'c', false)" + "+1" * 20_000,  # the parser's own stack depth limit
        "SELECT set_config('a.b', 'c'" + "::text" * 9_000 + ", false)",  # deeper than JSON_DEPTH
    ],
)
def test_nesting_too_deep_to_read_is_refused(sql: str) -> None:
    state, message, hint = refusal(make(max_parse_bytes=1 << 20), sql)
    assert state == "54001" and "nested too deeply" in message and "split" in hint


def test_deep_nesting_without_a_node_the_guard_acts_on_is_read() -> None:
    """Only the subtrees that hold a node the guard acts on are decoded: deep arithmetic around them is
    read as text, whatever its depth."""
    decision = make(max_parse_bytes=1 << 20).check("SELECT set_config('a.b', 'c', false)" + "::text" * 9_000)
    assert decision.refusal is None and decision.set_names == {"a.b"}


def test_the_nested_alter_role_is_read_and_refused(guard: Guard) -> None:
    """The issue's input: 1,000 levels of nesting (4 kB) after ALTER ROLE; the guard reads all of it."""
    assert len(NESTED) < 4100
    state, message, _ = refusal(guard, NESTED)
    assert (state, message.split(" is ")[0]) == ("42501", "ALTER ROLE")


def test_any_exception_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(sql: str) -> str:
        raise ValueError("unexpected")

    monkeypatch.setattr(guard_module, "parse_json", broken)
    state, message, _ = refusal(make(), "SET x = 1")
    assert state == "XX000" and "ValueError" in message


def test_a_zero_byte_inside_the_text_refuses() -> None:
    """pglast, like the server, would stop reading at the zero byte and never see what follows."""
    assert refusal(make(), "SET search_path = x\x00; SET ROLE postgres")[0] == "08P01"


def test_unencodable_text_refuses() -> None:
    assert refusal(make(), "SET search_path = '\udcff'")[0] == "XX000"


def test_recursion_anywhere_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    def deep(sql: str) -> str:
        raise RecursionError

    monkeypatch.setattr(guard_module, "parse_json", deep)
    assert refusal(make(), "SET x = 1")[0] == "54001"


def test_text_longer_than_max_parse_bytes_is_refused_only_when_it_needs_parsing() -> None:
    guard = make(max_parse_bytes=1000)
    state, message, hint = refusal(guard, "SET search_path = '" + "é" * 600 + "'")
    assert state == "54000" and "1220 bytes" in message and "max_parse_bytes = 1000" in message
    assert "Bind parameters" in hint
    assert guard.check("SELECT '" + "a" * 100_000 + "'") is ALLOW


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
        "SELECT * FROM pg_settings WHERE name = 'search_path'",
        "EXPLAIN (COSTS OFF) SELECT * FROM leads",
        "EXPLAIN (ANALYZE false, COSTS false) SELECT 1",
        "EXPLAIN (COSTS 0, VERBOSE) SELECT 1",
        "LOCK TABLE leads IN ROW EXCLUSIVE MODE",
        "LOCK TABLE leads IN ACCESS SHARE MODE",
        "SELECT * FROM leads FOR UPDATE",
        "SET standard_conforming_strings = on",
        "SET standard_conforming_strings TO 'true'",
        "SET client_encoding = 'UTF8'",
        "SET client_encoding = 'UHC'",
        "SET NAMES 'LATIN1'",
        "RESET client_encoding",
        "SET client_encoding TO DEFAULT",
        "SELECT pg_advisory_xact_lock(1)",
        "SELECT hello_world FROM t",
        "DISCARD PLANS",
        "DISCARD TEMP",
        "DEALLOCATE stmt",
        "DEALLOCATE ALL",
        "DISCARD ALL",
        "UNLISTEN *",
        "UNLISTEN news",
        "EXPLAIN (COSTS on, COSTS off) SELECT 1",
        "SET search_path = pg_catalog, pg_temp",
        "SELECT set_config('search_path', 'public, pg_catalog', false)",
        "CREATE VIEW v AS SELECT 1",
        "CREATE AGGREGATE a(int) (SFUNC = int4pl, STYPE = int)",
        "ALTER TABLE t RENAME TO u",
        "SELECT set_config('x.y'::pg_catalog.varchar(3), 'v', false)",
    ],
)
def test_allowed(guard: Guard, sql: str) -> None:
    assert guard.check(sql).refusal is None


def test_cleared_text_is_the_allow_singleton() -> None:
    guard = make()
    assert guard.check("SELECT abalance FROM pgbench_accounts WHERE aid = 1") is ALLOW
    assert guard.check("SHOW search_path") is ALLOW


@pytest.mark.parametrize(
    "switch, sql",
    [
        ("allow_do", "DO $$ BEGIN PERFORM 1; END $$"),
        ("allow_explain", "EXPLAIN ANALYZE SELECT 1"),
        ("allow_explain", "EXPLAIN SELECT 1"),
        ("allow_strong_locks", "LOCK TABLE leads IN ACCESS EXCLUSIVE MODE"),
        ("allow_strong_locks", "TRUNCATE leads"),
        ("allow_notifications", "NOTIFY news"),
        ("allow_notifications", "SELECT pg_notify('news', 'x')"),
        ("allow_large_objects", "SELECT lo_get(1)"),
        ("allow_backend_signals", "SELECT pg_cancel_backend(1)"),
        ("allow_notifications", "CREATE OPERATOR pg_temp.!!! (LEFTARG = text, RIGHTARG = text, FUNCTION = pg_notify)"),
        ("allow_large_objects", "CREATE OPERATOR pg_temp.!!! (RIGHTARG = oid, FUNCTION = lo_unlink)"),
    ],
)
def test_switches_allow(switch: str, sql: str) -> None:
    assert make().check(sql).refusal is not None
    assert make(**{switch: True}).check(sql).refusal is None


def test_listen_in_session_mode_follows_the_switch() -> None:
    assert refusal(make(), "LISTEN news")[0] == "42501"
    assert make(allow_notifications=True).check("LISTEN news").refusal is None


# -- transaction pooling ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql, feature",
    [
        ("LISTEN news", "LISTEN"),
        ("BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT 1; COMMIT", "WITH HOLD"),
        ("PREPARE p AS SELECT 1", "PREPARE"),
        ("EXECUTE p", "EXECUTE"),
        ("SELECT pg_advisory_lock(7)", "pg_advisory_lock"),
        ("SELECT app.pg_catalog.pg_try_advisory_lock(7)", "pg_try_advisory_lock"),
        ("CREATE TEMP TABLE scratch (a int)", "CREATE TEMP TABLE"),
        ("CREATE TEMP TABLE t AS SELECT 1", "CREATE TEMP TABLE ... AS"),
        ("SELECT 1 INTO TEMP t", "SELECT ... INTO TEMP"),
        ("CREATE TEMP VIEW v AS SELECT 1", "CREATE TEMP VIEW"),
        ("CREATE TEMP SEQUENCE s", "CREATE TEMP SEQUENCE"),
        # created in the temporary schema by name: temporary all the same
        ("CREATE TABLE pg_temp.scratch (a int)", "CREATE TEMP TABLE"),
        ('create table "pg_temp".scratch (a int)', "CREATE TEMP TABLE"),
        ("CREATE TABLE pg_temp_3.scratch (a int)", "CREATE TEMP TABLE"),
        ("CREATE TABLE pg_temp.t AS SELECT 1", "CREATE TEMP TABLE ... AS"),
        ("SELECT 1 INTO pg_temp.t", "SELECT ... INTO TEMP"),
        ("CREATE VIEW PG_TEMP.v AS SELECT 1", "CREATE TEMP VIEW"),
        ("CREATE SEQUENCE pg_temp.s", "CREATE TEMP SEQUENCE"),
        # a search_path with pg_temp first makes unqualified CREATE TABLE temporary (schemas that do not exist are skipped)
        ("SET search_path = pg_temp, public", "search_path with pg_temp first"),
        ("BEGIN; SET LOCAL search_path = nosuch, pg_temp; CREATE TABLE t (a int); COMMIT", "search_path with pg_temp first"),
        ("SET SCHEMA 'pg_temp_3'", "search_path with pg_temp first"),
        ("SELECT set_config('search_path', 'nosuch, PG_TEMP', true)", "search_path with pg_temp first"),
        ("CREATE OPERATOR public.!!! (RIGHTARG = bigint, FUNCTION = pg_advisory_lock)", "pg_advisory_lock"),
        # objects other than relations created in the temporary schema by name stay for the next client,
        # and a type there shadows pg_catalog's (pg_temp is searched first for types)
        ("CREATE DOMAIN pg_temp.text AS varchar(3)", "temporary schema"),
        ("CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'", "temporary schema"),
        ("CREATE OR REPLACE PROCEDURE app.pg_temp.p() LANGUAGE sql AS 'SELECT 1'", "temporary schema"),
        ("CREATE TYPE pg_temp.pair AS (a int, b int)", "temporary schema"),
        ("CREATE TYPE PG_TEMP.mood AS ENUM ('ok')", "temporary schema"),
        ("CREATE TYPE pg_temp_3.span AS RANGE (subtype = int4)", "temporary schema"),
        ("CREATE TYPE pg_temp.shell", "temporary schema"),
        ("CREATE AGGREGATE pg_temp.total(int) (SFUNC = int4pl, STYPE = int)", "temporary schema"),
        ("CREATE OPERATOR pg_temp.=== (FUNCTION = int4pl, LEFTARG = int, RIGHTARG = int)", "temporary schema"),
        ("CREATE COLLATION pg_temp.c (locale = 'C')", "temporary schema"),
        ("CREATE TEXT SEARCH CONFIGURATION pg_temp.t (COPY = simple)", "temporary schema"),
        ("CREATE CONVERSION pg_temp.c FOR 'LATIN1' TO 'UTF8' FROM iso8859_1_to_utf8", "temporary schema"),
        ("CREATE STATISTICS pg_temp.s ON a, b FROM leads", "temporary schema"),
        ("CREATE OPERATOR FAMILY pg_temp.f USING btree", "temporary schema"),
        ("CREATE OPERATOR CLASS pg_temp.c FOR TYPE int USING btree AS OPERATOR 1 <", "temporary schema"),
        ("SELECT 1; CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'", "temporary schema"),
    ],
)
def test_session_features_under_transaction_pooling(sql: str, feature: str) -> None:
    state, message, hint = refusal(make(transaction_mode=True), sql)
    assert state == "0A000" and feature in message and "transaction pooling" in message
    assert 'mode = "session"' in hint
    assert make(allow_notifications=True).check(sql).refusal is None


@pytest.mark.parametrize("sql", ["CREATE TEMP TABLE t (a int) ON COMMIT DROP", "CREATE TABLE pg_temp.t (a int) ON COMMIT DROP",
                                 "SET search_path = pg_catalog, pg_temp", 'SET search_path = "PG_TEMP"',
                                 'SET search_path = "$user", public, pg_temp', "SET search_path TO public, pg_temp",
                                 "SELECT set_config('search_path', '\"PG_TEMP\", public', false)",
                                 "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = pg_temp AS 'SELECT 1'",
                                 'CREATE TABLE "PG_TEMP".t (a int)', "SELECT * FROM pg_temp.t", "DEALLOCATE p", "DISCARD ALL",
                                 "CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS 'SELECT * FROM pg_temp.t'",
                                 'CREATE TYPE "PG_TEMP".pair AS (a int)', "CREATE DOMAIN d AS pg_temp.t", "SELECT pg_temp.f()"])
def test_transaction_pooling_allows(sql: str) -> None:
    assert make(transaction_mode=True).check(sql).refusal is None


# -- the Decision the relay acts on -------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql, fields",
    [
        ("SET search_path = public", {"takes_no_snapshot": True, "set_names": {"search_path"}}),
        ("SET SESSION Work_Mem TO '64MB'", {"takes_no_snapshot": True, "set_names": {"work_mem"}}),
        ("SET TIME ZONE 'UTC'", {"takes_no_snapshot": True, "set_names": {"timezone"}}),
        ("SET NAMES 'UTF8'", {"takes_no_snapshot": True, "set_names": {"client_encoding"}}),
        ("SET SCHEMA 'app'", {"takes_no_snapshot": True, "set_names": {"search_path"}}),
        ("SET XML OPTION DOCUMENT", {"takes_no_snapshot": True, "set_names": {"xmloption"}}),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY",
         {"takes_no_snapshot": True, "set_names": {"default_transaction_isolation", "default_transaction_read_only"}}),
        ("SET LOCAL search_path = public", {"takes_no_snapshot": True}),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", {"takes_no_snapshot": True, "transaction_setup": True}),
        ("SET LOCAL transaction_isolation = 'serializable'", {"takes_no_snapshot": True, "transaction_setup": True}),
        ("SET TRANSACTION SNAPSHOT '00000003-0000001B-1'", {"takes_no_snapshot": True, "transaction_setup": True}),
        ("SET TRANSACTION READ ONLY; SET transaction_deferrable = on",
         {"takes_no_snapshot": True, "transaction_setup": True, "statement_count": 2, "set_names": {"transaction_deferrable"}}),
        ("SET TRANSACTION READ ONLY; SELECT 1", {"statement_count": 2}),
        ("RESET search_path", {"reset_names": {"search_path"}}),
        ("SET search_path TO DEFAULT", {"reset_names": {"search_path"}}),
        ("LOCK TABLE t IN ROW EXCLUSIVE MODE", {"takes_no_snapshot": True}),
        ("SET LOCAL work_mem = '1MB'; LOCK t IN ROW SHARE MODE", {"takes_no_snapshot": True, "statement_count": 2}),
        ("LOCK TABLE t IN ROW EXCLUSIVE MODE; SELECT 1", {"statement_count": 2}),
        ("SAVEPOINT a", {}),
        ("SET search_path = DEFAULT", {"reset_names": {"search_path"}}),
        ("RESET ALL", {"resets_all": True}),
        ("SELECT 1; RESET ALL", {"resets_all": True, "statement_count": 2}),
        ("DISCARD ALL", {"resets_all": True, "drops_statements": True, "no_transaction_block": True}),
        ("discard all; SELECT 1", {"resets_all": True, "drops_statements": True, "statement_count": 2,
                                   "statement_after_reset": True}),
        ("RESET ALL; SAVEPOINT a", {"resets_all": True, "statement_count": 2, "statement_after_reset": True}),
        ("RESET work_mem; SELECT 1", {"reset_names": {"work_mem"}, "statement_count": 2, "statement_after_reset": True}),
        ("SELECT set_config('search_path', 'public', false)", {"set_names": {"search_path"}}),
        ("SELECT set_config('Search_Path', 'public', 'f')", {"set_names": {"search_path"}}),
        ("SELECT set_config('search_path', 'public', true)", {}),
        ("SELECT set_config('search_path', 'public', 'on')", {}),
        ("SELECT set_config('search_path', 'public', $1)", {"set_names": {"search_path"}}),
        ("SELECT set_config($1, 'public', false)", {"unknown_settings": True}),
        ("SELECT set_config('a.' || 'b', 'c', false)", {"unknown_settings": True}),
        ("SELECT set_config(n, 'x', false) FROM (VALUES ('MyApp.User_Id'), ('not a name'), ('v.1')) v(n)",
         {"unknown_settings": True, "set_names": {"myapp.user_id"}}),
        ("SELECT set_config(n, 'x', true) FROM (VALUES ('myapp.user_id')) v(n)", {}),
        ("SELECT set_config($1, 'public', true)", {}),
        ("DEALLOCATE Foo", {"deallocates": {"foo"}}),
        ('DEALLOCATE PREPARE "Foo"', {"deallocates": {"Foo"}}),
        ("DEALLOCATE a; DEALLOCATE b", {"deallocates": {"a", "b"}, "statement_count": 2}),
        ("DEALLOCATE ALL", {"drops_statements": True}),
        ("DEALLOCATE PREPARE ALL", {"drops_statements": True}),
        ("SELECT 1; SELECT 2; SELECT 3; SET a.b = 1", {"statement_count": 4, "set_names": {"a.b"}}),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = public AS 'SELECT 1'", {}),
    ],
)
def test_decision_fields(guard: Guard, sql: str, fields: dict[str, Any]) -> None:
    expected = {key: frozenset(value) if isinstance(value, set) else value for key, value in fields.items()}
    assert guard.check(sql) == Decision(**expected)


@pytest.mark.parametrize(
    "sql, alone",
    [
        ("VACUUM", True),
        ("VACUUM (ANALYZE) leads", True),
        ("vacuum full leads", True),
        ("ANALYZE leads", False),
        ("CREATE INDEX CONCURRENTLY i ON leads (name)", True),
        ("CREATE INDEX i ON leads (name)", False),
        ("DROP INDEX CONCURRENTLY i", True),
        ("DROP INDEX i", False),
        ("REINDEX (CONCURRENTLY) TABLE leads", True),
        ("REINDEX TABLE CONCURRENTLY leads", True),
        ("REINDEX TABLE leads", False),
        ("REINDEX SCHEMA public", True),
        ("REINDEX DATABASE app", True),
        ("REINDEX SYSTEM app", True),
        ("CREATE DATABASE other", True),
        ("DROP DATABASE other", True),
        ("CREATE TABLESPACE t LOCATION '/tmp'", True),
        ("DROP TABLESPACE t", True),
        ("DISCARD ALL", True),
        ("DISCARD PLANS", False),
        ("CLUSTER", True),
        ("CLUSTER leads", False),
        ("COMMIT PREPARED 'x'", True),
        ("ROLLBACK PREPARED 'x'", True),
        ("PREPARE TRANSACTION 'x'", False),
        ("CREATE SUBSCRIPTION s CONNECTION 'x' PUBLICATION p", True),
        ("DROP SUBSCRIPTION s", True),
        ("ALTER SUBSCRIPTION s REFRESH PUBLICATION", True),
        ("ALTER SUBSCRIPTION s DISABLE", False),
        ("ALTER TABLE t DETACH PARTITION p CONCURRENTLY", True),
        ("ALTER TABLE t DETACH PARTITION p", False),
        ("VACUUM; SELECT 1", False),
        ("SELECT 1; VACUUM", False),
    ],
)
def test_no_transaction_block(sql: str, alone: bool) -> None:
    guard = make(transaction_mode=True)
    assert needs_parse(sql, True) or not alone
    assert guard.check(sql).no_transaction_block is alone


# -- the pre-scan --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql, expected",
    [
        ("SELECT abalance FROM pgbench_accounts WHERE aid = 1", False),
        ("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1", False),
        ("INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET v = 1", False),
        ("INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET v = 1; SELECT 1", True),
        ("  (SELECT 1) UNION (SELECT 2)", False),
        ("(((set x = 1", True),
        ("COMMIT", False),
        ("COMMIT PREPARED 'x'", True),
        ("'garbage", True),
        ("", False),
        ("UPDATE t SET v = 1; SELECT 1", True),
        ("SET search_path = public", True),
        ("SELECT set_config('a.b', 'c', false)", True),
        ("SELECT settings FROM t", False),
        ("SELECT hello_world, block FROM t", False),
        ("SELECT lo_get(1)", True),
    ],
)
def test_pre_scan(sql: str, expected: bool) -> None:
    assert needs_parse(sql) is expected


def test_no_first_word_the_pre_scan_looks_for_begins_like_a_common_statement() -> None:
    """The pre-scan clears text beginning with a common first word (SELECT, INSERT ...) without cutting the
    word out: exact only while no word it looks for as a first word begins with one of them."""
    looked_for = guard_module._SESSION_FIRST_WORDS | {"commit", "rollback"}
    assert not [word for word in looked_for if word.startswith(guard_module._COMMON_FIRST)]


@settings(max_examples=300, deadline=None)
@given(first=st.sampled_from([*guard_module._COMMON_FIRST, "set", "reset", "commit", "do", "select_"]),
       rest=st.sampled_from(["", " 1", "(1)", "_x = 1", "$1", " * FROM t", "ing x", "\tx"]),
       transaction_mode=st.booleans())
def test_the_common_first_word_shortcut_agrees_with_the_first_word(first: str, rest: str, transaction_mode: bool) -> None:
    """Property: the pre-scan's answer for one statement is what the first word says, shortcut or not."""
    sql = first + rest
    word = guard_module._FIRST_WORD.match(sql.lower())
    assert word is not None
    looked_for = guard_module._SESSION_FIRST_WORDS if transaction_mode else guard_module._FIRST_WORDS
    assert needs_parse(sql, transaction_mode) is (word.group(1) in looked_for)


# Statements that set a Decision field or are refused, written the ways a client may write them.
FIELD_STATEMENTS = [
    "SET {name} = 1", "SET SESSION {name} TO 'x'", "RESET {name}", "SET {name} TO DEFAULT", "RESET ALL",
    "SET TIME ZONE 'UTC'", "SET NAMES 'UTF8'", "SET SCHEMA 'x'", "DISCARD ALL", "DEALLOCATE {name}",
    "DEALLOCATE PREPARE ALL", "SELECT set_config('{name}', 'x', false)", "SELECT pg_catalog.set_config($1, 'x', false)",
    "VACUUM", "VACUUM {name}", "CREATE INDEX CONCURRENTLY ON t ({name})", "DROP INDEX CONCURRENTLY {name}",
    "REINDEX SCHEMA {name}", "CREATE DATABASE {name}", "DROP TABLESPACE {name}", "CLUSTER", "COMMIT PREPARED 'x'",
    "DROP SUBSCRIPTION {name}", "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "LOCK {name}", "TRUNCATE {name}", "NOTIFY {name}", "LISTEN {name}", "SELECT pg_notify('{name}', '')",
    "EXPLAIN SELECT 1", "SELECT lo_get(1)", "SELECT pg_terminate_backend(1)", "SET ROLE {name}",
    "UPDATE pg_settings SET setting = 1",
]
# Statements whose only effect is no_transaction_block, which needs them alone in the text.
ALONE_ONLY = {
    "VACUUM", "VACUUM {name}", "CREATE INDEX CONCURRENTLY ON t ({name})", "DROP INDEX CONCURRENTLY {name}",
    "REINDEX SCHEMA {name}", "CREATE DATABASE {name}", "DROP TABLESPACE {name}", "CLUSTER", "COMMIT PREPARED 'x'",
    "DROP SUBSCRIPTION {name}",
}
PREFIXES = ["", "SELECT 1; ", "/* note */ ", "-- note\n", "BEGIN;", "\n\t  ", "select 'set';"]


def case_variant(text: str, pattern: list[bool]) -> str:
    return "".join(char.upper() if upper else char.lower() for char, upper in zip(text, pattern * len(text)))


@settings(max_examples=400, deadline=None)
@given(
    template=st.sampled_from(FIELD_STATEMENTS),
    name=st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True),
    prefix=st.sampled_from(PREFIXES),
    suffix=st.sampled_from(["", ";", "; SELECT 2", " -- done"]),
    pattern=st.lists(st.booleans(), min_size=1, max_size=5),
    transaction_mode=st.booleans(),
)
def test_pre_scan_never_clears_a_statement_that_matters(
    template: str, name: str, prefix: str, suffix: str, pattern: list[bool], transaction_mode: bool
) -> None:
    """Property: a text holding a statement that sets a Decision field or is refused always reaches the
    parser, whatever the case, comments, prefix and neighbours; and the parsed decision says so."""
    sql = prefix + case_variant(template.format(name=name), pattern) + suffix
    assert needs_parse(sql, transaction_mode), sql
    decision = make(transaction_mode).check(sql)
    if template not in ALONE_ONLY or decision.statement_count == 1:
        assert decision != Decision(statement_count=decision.statement_count), sql


def test_decisions_are_cached_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    guard = make()
    first = guard.check("SET ROLE postgres")
    assert guard.check("SET ROLE postgres") is first
    monkeypatch.setattr(guard_module, "CACHE_SIZE", 3)
    for index in range(10):
        guard.check(f"SET a.b = {index}")
    assert len(guard._cache) == 3


# -- FunctionCall messages -----------------------------------------------------------------------------


def test_function_call_is_refused_unless_allowed() -> None:
    refused = make().function_call(1)
    assert refused is not None and refused.sqlstate == "0A000" and "allow_function_call" in refused.hint
    assert make(allow_function_call=True).function_call(1) is None


def test_function_call_of_set_config_is_always_refused() -> None:
    every_switch = make(allow_function_call=True, allow_notifications=True, allow_large_objects=True,
                        allow_backend_signals=True)
    refused = every_switch.function_call(guard_module.SET_CONFIG_OID)
    assert refused is not None and refused.sqlstate == "42501" and "set_config()" in refused.message


@pytest.mark.parametrize(
    "oid, switch, name",
    [
        (3036, "allow_notifications", "pg_notify()"),
        (3458, "allow_large_objects", "lo_get()"),
        (964, "allow_large_objects", "lo_unlink()"),
        (955, "allow_large_objects", "lowrite()"),
        (2096, "allow_backend_signals", "pg_terminate_backend()"),
    ],
)
def test_function_call_keeps_the_sql_switches(oid: int, switch: str, name: str) -> None:
    refused = make(allow_function_call=True).function_call(oid)
    assert refused is not None and refused.sqlstate == "42501" and name in refused.message
    assert make(allow_function_call=True, **{switch: True}).function_call(oid) is None


def test_function_call_of_sequence_state_and_session_advisory_locks_under_transaction_pooling() -> None:
    """lastval() and currval() by FunctionCall carry the refusal at a transaction's start, as in SQL; session
    advisory locks by FunctionCall are refused as in SQL. Session mode forwards both."""
    pooled, session = make(transaction_mode=True, allow_function_call=True), make(allow_function_call=True)
    for oid in guard_module.SEQUENCE_STATE_OIDS:
        assert pooled.function_call(oid) is None
        assert pooled.function_call_decision(oid).refusal_at_transaction_start is guard_module.SEQUENCE_STATE
        assert session.function_call_decision(oid) is guard_module.ALLOW
    for oid, name in guard_module.SESSION_ADVISORY_LOCK_OIDS.items():
        refused = pooled.function_call(oid)
        assert refused is not None and refused.sqlstate == "0A000" and f"{name}()" in refused.message
        assert session.function_call(oid) is None


def test_from_settings_reads_every_guard_key(tmp_path: Any) -> None:
    from proxy import config

    path = tmp_path / "proxy.toml"
    switches = ["allow_do", "allow_explain", "allow_strong_locks", "allow_notifications", "allow_large_objects",
                "allow_backend_signals", "allow_function_call"]
    base = '[upstream]\nuser = "app"\ndatabase = "app"\n[jwt]\nsecret = "' + "s" * 40 + '"\n[tenant]\nsigning_key = "' + "k" * 40 + '"\n'
    path.write_text(base + "[guard]\nmax_parse_bytes = 4096\n" + "".join(f"{switch} = true\n" for switch in switches))
    settings = config.load(path, environ={}).guard
    guard = Guard.from_settings(settings, PROTECTED, transaction_mode=True)
    assert guard.max_parse_bytes == 4096 and guard.transaction_mode
    assert all(getattr(guard, switch) is True for switch in switches)
    path.write_text(base)
    assert config.load(path, environ={}).guard.max_parse_bytes == guard_module.DEFAULT_MAX_PARSE_BYTES


# -- the targeted reading against a full walk -----------------------------------------------------------


def full_walk(guard: Guard, sql: str) -> Decision:
    """The reference reading: decode pglast's whole tree and walk every node."""
    text = guard_module.parse_json(sql)
    tree = json.loads(text)
    effects = guard_module._Effects()
    walked = guard_module._SESSION_WALKED_KINDS if guard.transaction_mode else guard_module._WALKED_KINDS
    statements = tree.get("stmts", [])
    for statement in statements:
        effects.statement(*guard_module._only_node(statement["stmt"]))
        found = guard._statement(*guard_module._only_node(statement["stmt"]))
        if found is not None:
            return Decision(refusal=found)
        for kind, node in guard_module._nodes(statement):
            found = guard._node(kind, node, effects) if kind in walked else None
            if found is not None:
                return Decision(refusal=found)
    alone = len(statements) == 1 and guard_module._no_transaction_block(*guard_module._only_node(statements[0]["stmt"]))
    effects.computed_names(text)
    return effects.decision(len(statements), alone)


CORPUS = sorted({case[0] for mark in test_refused.pytestmark for case in mark.args[1]}
                | set(test_allowed.pytestmark[0].args[1]) | {case[0] for case in test_decision_fields.pytestmark[0].args[1]})


@pytest.mark.parametrize("transaction_mode", [False, True])
def test_reading_only_what_matters_agrees_with_a_full_walk(transaction_mode: bool) -> None:
    """Differential: the targeted reading and a walk of the whole tree refuse the same texts and report
    the same effects."""
    guard = make(transaction_mode, max_parse_bytes=1 << 20)
    for sql in CORPUS:
        try:
            expected = full_walk(guard, sql)
        except (parser.ParseError, RecursionError):
            continue
        decision = guard._decide(sql)
        assert (decision.refusal is None) == (expected.refusal is None), sql
        assert decision.refusal is not None or decision == expected, sql


@settings(max_examples=300, deadline=None)
@given(body=st.text(max_size=200), template=st.sampled_from(FIELD_STATEMENTS + ["SELECT {name}", "{name}"]))
def test_check_never_raises(body: str, template: str) -> None:
    """Property: whatever the text, the guard answers with a Decision (a refusal if it cannot read it)."""
    for sql in (template.format(name=body), body + "; " + template.format(name="x")):
        assert isinstance(make(transaction_mode=True).check(sql), Decision)


@pytest.mark.parametrize(("sql", "expected"), [
    ("SELECT abalance FROM pgbench_accounts WHERE aid = 1;", False),  # one statement with its ';' (pgbench)
    ("select 1 ;\n ;", False),
    ("SELECT 1; DROP TABLE t;", True),  # a second statement still needs the parse
    ("SET app.current_tenant = 'x';", True),
    ("SELECT 1; SET ROLE postgres;", True),
    ("select 1; -- set role x", True),  # a comment: its words count, as before
])
def test_a_trailing_semicolon_does_not_make_text_several_statements(sql: str, expected: bool) -> None:
    assert needs_parse(sql) is expected
    assert needs_parse(sql, transaction_mode=True) is expected


@pytest.mark.parametrize("sql, setup", [
    ("BEGIN", True),
    ("begin isolation level serializable", True),
    ("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY, DEFERRABLE", True),
    ("BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", True),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE; SELECT 1", False),
    ("BEGIN; SELECT 1", False),
    ("COMMIT", False),
    ("SAVEPOINT a", False),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE", False),
    ("SELECT set_config('transaction_isolation', 'serializable', true)", False),
])
def test_transaction_setup_in_transaction_mode(sql: str, setup: bool) -> None:
    """Texts that only begin a transaction or set its characteristics, which the context must not
    precede (Postgres refuses them after a query: 25001); the pre-scan hands them to the parser."""
    assert needs_parse(sql, True) or not setup
    assert make(transaction_mode=True).check(sql).transaction_setup is setup


@pytest.mark.parametrize("sql, refused", [
    ("SELECT lastval()", True),
    ("SELECT /* x */ LastVal ( )", True),
    ("select pg_catalog.currval('s')", True),
    ("SELECT x FROM t WHERE id = (SELECT currval('s'))", True),
    ("BEGIN; SELECT lastval()", True),
    ("START TRANSACTION READ ONLY; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; SELECT currval('s')", True),
    ("INSERT INTO t VALUES (1); SELECT lastval()", False),  # the INSERT may call nextval() in the same transaction
    ("SELECT nextval('s')", False),
    ("SELECT other.lastval()", False),
    ("SELECT app.pg_catalog.lastval()", True),  # Postgres takes database.schema.name for the current database
    ("SELECT \"a\"\"b\".pg_catalog.currval('s')", True),
    ("SELECT app.public.lastval()", False),
    ("SELECT lastval_seen FROM t", False),
])
def test_lastval_and_currval_first_in_a_transaction(sql: str, refused: bool) -> None:
    """Under transaction pooling, lastval() and currval() in the first statement that does more than begin
    a transaction read what other transactions, on other server connections, did: the relay refuses them
    there (`refusal_at_transaction_start`). Session mode and the classifier (guard off) never do."""
    decision = make(transaction_mode=True).check(sql)
    assert decision.refusal is None
    assert (decision.refusal_at_transaction_start is guard_module.SEQUENCE_STATE) is refused
    assert decision.refusal_at_transaction_start is None or decision.refusal_at_transaction_start.sqlstate == "0A000"
    assert make().check(sql).refusal_at_transaction_start is None
    assert guard_module.Classifier(True).check(sql).refusal_at_transaction_start is None
