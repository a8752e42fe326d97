"""Attacks on the SQL guard itself, through a real proxy in both pool modes (issue 14).

A tenant with psql and a token tries to get a statement past the guard: text the guard cannot read (a
parse error, nesting deeper than it walks, more bytes than it parses), a lexing mode in which the server
reads the text differently (standard_conforming_strings off, SJIS/BIG5/GBK), a protocol message the
guard does not see (FunctionCall), or a statement that carries other tenants' data past row-level
security or blocks every tenant. Each test names the attack and the layer that stops it; each refusal
is an ErrorResponse with its own SQLSTATE, and the session goes on.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Any

import asyncpg
import psycopg
import pytest

from support import ACME, GLOBEX, ROWS, ProxyProcess, RawClient, login, startup
from proxy import guard, lexing
from proxy.embedded import EmbeddedPostgres
from proxy.protocol import messages

NESTED = "ALTER ROLE CURRENT_USER PASSWORD 'x'; SELECT " + "1+(" * 1000 + "1" + ")" * 1000


def transaction_mode(proxy: ProxyProcess) -> bool:
    return 'mode = "transaction"' in proxy.config.read_text()


def refused(conn: psycopg.Connection[Any], sql: str, sqlstate: str, fragment: str = "") -> psycopg.Error:
    """Run `sql`, expect the refusal, and check that the session goes on, isolated."""
    with pytest.raises(psycopg.Error) as info:
        conn.execute(sql)
    assert info.value.sqlstate == sqlstate, info.value
    assert fragment in str(info.value) and info.value.diag.message_hint
    assert conn.execute("SELECT count(*) FROM leads WHERE tenant_id <> %s", (ACME,)).fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[ACME]
    return info.value


# -- 1. Text the guard cannot read with certainty --------------------------------------------------

def test_nesting_that_broke_the_guard_no_longer_hides_alter_role(
    conn: psycopg.Connection[Any], pg: EmbeddedPostgres, tenant_db: Any
) -> None:
    """Attacker: ALTER ROLE ... PASSWORD followed by 1,000 levels of nesting (4 kB), which made the old
    guard's json.loads raise and the guard allow the whole Query. Stopped by: the guard, which reads
    the tree without recursion and refuses ALTER ROLE (42501). The role's password is unchanged."""
    refused(conn, NESTED, "42501", "ALTER ROLE")
    with psycopg.connect(host="127.0.0.1", port=pg.port, user=tenant_db.app_role, password=tenant_db.app_password,
                         dbname=tenant_db.database, sslmode="disable") as direct:
        assert direct.execute("SELECT current_user").fetchone()[0] == tenant_db.app_role


@pytest.mark.parametrize(
    "sql, sqlstate, fragment",
    [
        ("SELECT set_config('a.b', 'c', false) + " + "1+(" * 3400 + "1" + ")" * 3400, "54001", "nested too deeply"),
        ("SELECT set_config('app.current_tenant', 'x', false", "42601", "syntax error"),
        ("SELECT set_config('a.b', '" + "x" * 1_000_000 + "', false)", "54000", "max_parse_bytes"),
    ],
    ids=["too-deep", "parse-error", "too-long"],
)
def test_text_the_guard_cannot_read_is_refused(conn: psycopg.Connection[Any], sql: str, sqlstate: str,
                                               fragment: str) -> None:
    """Attacker: make the guard give up (nesting, a syntax error, a megabyte of text) hoping it lets the
    text through. Stopped by: the guard failing closed, with 54001, 42601 (Postgres's parser's own
    message) or 54000 and a hint saying what to change."""
    refused(conn, sql, sqlstate, fragment)


# -- 2. Lexing modes the guard does not model ---------------------------------------------------------

@pytest.mark.parametrize(
    "parameters",
    [
        {"standard_conforming_strings": "off"},
        {"standard_conforming_strings": "0"},
        {"options": "-c standard_conforming_strings=no"},
        {"client_encoding": "SJIS"},
        {"client_encoding": "BIG5"},
        {"client_encoding": "GBK"},
        {"options": "-c client_encoding=WIN936"},
    ],
)
def test_lexing_modes_are_refused_at_startup(proxy: ProxyProcess, parameters: dict[str, str]) -> None:
    """Attacker: log in with non-standard strings or a client encoding whose characters can hide a
    backslash or quote, so the server reads the SQL differently from the guard. Stopped by: the startup
    policy (0A000, connection refused before any token is asked for)."""
    client = RawClient(proxy.port)
    try:
        client.send(startup(**parameters))
        error = client.error()
        assert error["C"] == "0A000" and "is not supported through pg-tenant-proxy" in error["M"], error
        assert client.closed()
    finally:
        client.close()


async def test_asyncpg_connects_and_resets(proxy: ProxyProcess) -> None:
    """asyncpg always asks for client_encoding utf8, the encoding the guard reads; its pool's reset
    (pg_advisory_unlock_all(), CLOSE ALL, UNLISTEN *, RESET ALL) passes the guard."""
    conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="alice", database="app",
                                 password=proxy.token(ACME), ssl=False)
    try:
        await conn.reset()
        assert await conn.fetchval("SELECT count(*) FROM leads") == ROWS[ACME]
    finally:
        await conn.close()


def test_standard_conforming_strings_off_in_sql_is_refused(conn: psycopg.Connection[Any]) -> None:
    """Attacker: SET standard_conforming_strings = off, then a literal the guard reads as one string and
    the server, reading backslash escapes, as a string followed by SET ROLE. Stopped by: the guard (0A000)
    for the SET; the session keeps standard strings and the server reads 'a\\'b' as the guard does."""
    refused(conn, "SET standard_conforming_strings = off", "0A000", "standard_conforming_strings")
    refused(conn, "SET standard_conforming_strings = off; SELECT 'a\\'  ,'  ; SET ROLE postgres; --'", "0A000")
    refused(conn, "SELECT set_config('standard_conforming_strings', 'false', false)", "0A000")
    assert conn.execute("SHOW standard_conforming_strings").fetchone()[0] == "on"
    assert conn.execute("SELECT 'a\\'  ,'  ; SELECT '--'").fetchone()[0] == "a\\"


@pytest.mark.parametrize("sql", ["SET client_encoding = 'SJIS'", "SET NAMES 'BIG5'", "SET client_encoding TO 'GBK'",
                                 "SELECT set_config('client_encoding', 'Shift_JIS', false)"])
def test_unreadable_client_encodings_in_sql_are_refused(conn: psycopg.Connection[Any], sql: str) -> None:
    """Attacker: switch to an encoding where 0x5C can be the second byte of a character. Stopped by: the
    guard (0A000); the session stays in UTF8."""
    refused(conn, sql, "0A000", "client_encoding")
    assert conn.execute("SHOW client_encoding").fetchone()[0] == "UTF8"


# -- 3. What carries other tenants' data past RLS, or blocks every tenant ----------------------------------

@pytest.mark.parametrize(
    "sql, fragment",
    [
        ("EXPLAIN ANALYZE SELECT * FROM leads WHERE name = 'x'", "EXPLAIN ANALYZE"),
        ("EXPLAIN SELECT * FROM leads", "EXPLAIN with costs"),
        ("LOCK TABLE leads IN ACCESS EXCLUSIVE MODE", "LOCK TABLE in ACCESS EXCLUSIVE MODE"),
        ("TRUNCATE leads", "TRUNCATE"),
        ("NOTIFY acme_news, 'forged'", "NOTIFY"),
        (f"SELECT pg_notify('{GLOBEX}', 'forged')", "pg_notify()"),
        ("SELECT lo_get(oid) FROM pg_largeobject_metadata", "lo_get()"),
        ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()", "pg_terminate_backend()"),
        ("UPDATE pg_settings SET setting = 'x' WHERE name = 'app.current_tenant'", "pg_settings"),
    ],
)
def test_cross_tenant_statements_are_refused(conn: psycopg.Connection[Any], sql: str, fragment: str) -> None:
    """Attacker: recover other tenants' values from EXPLAIN row counts and estimates, block every tenant
    with a strong lock or TRUNCATE, reach other tenants through notifications, large objects or backend
    signals, or write settings through pg_settings. Stopped by: the guard (42501), with a hint naming
    the switch that allows it."""
    error = refused(conn, sql, "42501", fragment)
    assert "[guard] allow_" in (error.diag.message_hint or "") or "SET name" in (error.diag.message_hint or "")


def test_listen_is_refused_in_both_modes(proxy: ProxyProcess, conn: psycopg.Connection[Any]) -> None:
    """Attacker: LISTEN on another tenant's channel. Stopped by: the guard; under transaction pooling as
    a session feature (0A000), in session mode as a notification (42501)."""
    sqlstate = "0A000" if transaction_mode(proxy) else "42501"
    refused(conn, f"LISTEN \"{GLOBEX}\"", sqlstate, "LISTEN")
    assert conn.execute("SELECT count(*) FROM pg_listening_channels()").fetchone()[0] == 0


def test_explain_without_costs_still_works(conn: psycopg.Connection[Any]) -> None:
    """What stays allowed: EXPLAIN (COSTS OFF) shows the plan without any row count or estimate."""
    plan = "\n".join(row[0] for row in conn.execute("EXPLAIN (COSTS OFF) SELECT * FROM leads WHERE name = 'x'"))
    assert "leads" in plan and "rows=" not in plan


def test_weak_locks_still_work(proxy: ProxyProcess) -> None:
    """What stays allowed: LOCK TABLE in ROW EXCLUSIVE MODE, which blocks no other tenant's reads or writes."""
    with psycopg.connect(proxy.dsn(), password=proxy.token(ACME)) as conn:
        conn.execute("LOCK TABLE leads IN ROW EXCLUSIVE MODE")
        assert conn.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[ACME]


@pytest.mark.parametrize("sql", ["DEALLOCATE ALL", "DISCARD PLANS", "DEALLOCATE PREPARE ALL"])
def test_statement_resets_are_allowed_in_both_modes(conn: psycopg.Connection[Any], sql: str) -> None:
    """DEALLOCATE and DISCARD are no longer refused under transaction pooling: the relay is told about
    them in the Decision (drops_statements), and the session goes on."""
    conn.execute(sql)
    assert conn.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[ACME]


# -- 4. The FunctionCall message ----------------------------------------------------------------------

def function_call(oid: int, *arguments: bytes) -> bytes:
    """A FunctionCall message ('F', "Message Formats"): text arguments, text result."""
    body = struct.pack("!iHH", oid, 0, len(arguments))
    body += b"".join(struct.pack("!i", len(argument)) + argument for argument in arguments)
    body += struct.pack("!H", 0)
    return b"F" + struct.pack("!i", len(body) + 4) + body


def replies_until_ready(client: RawClient) -> list[tuple[bytes, bytes]]:
    """Every message up to and including the next ReadyForQuery."""
    replies = [client.read_message()]
    while replies[-1][0] != b"Z":
        replies.append(client.read_message())
    return replies


def test_function_call_of_set_config_is_refused(proxy: ProxyProcess) -> None:
    """Attacker: call set_config by its OID (2078) with a FunctionCall message, which names no function
    the SQL guard could read. Stopped by: the relay asking Guard.function_call (0A000 by default, 42501
    for set_config even when FunctionCall is allowed); the session goes on with its own context."""
    client = RawClient(proxy.port)
    try:
        login(client, proxy.token(ACME))
        client.send(function_call(2078, b"app.current_tenant", GLOBEX.encode(), b"false"))
        items = replies_until_ready(client)
        errors = [messages.parse_error_fields(body) for kind, body in items if kind == b"E"]
        assert errors and errors[0]["C"] == "0A000", items
        client.send(messages.query("SELECT tenant_proxy.current_tenant()"))
        rows = [body for kind, body in replies_until_ready(client) if kind == b"D"]
        assert rows and ACME.encode() in rows[0]
    finally:
        client.close()


# -- 5. One client's big statement does not stall the others ---------------------------------------------

@pytest.mark.parametrize("size", [1_000_000, 3_000_000], ids=["1MB", "3MB"])
def test_a_huge_statement_does_not_stall_other_clients(proxy: ProxyProcess, size: int) -> None:
    """Attacker: a Query of 1 or 3 MB mentioning set_config, which once froze the whole proxy for
    seconds while the guard parsed it on the event loop. Stopped by: [guard] max_parse_bytes (54000),
    checked before parsing; another tenant's SELECT 1 goes on. Prints the delays measured."""
    attack = "SELECT set_config('app.x', 'y', false), '" + "z" * size + "'"
    with psycopg.connect(proxy.dsn(), password=proxy.token(GLOBEX), autocommit=True) as other, \
            psycopg.connect(proxy.dsn(), password=proxy.token(ACME), autocommit=True) as attacker:
        baseline = _latencies(other, 50)
        states: list[str | None] = []

        def attack_five_times() -> None:
            for _ in range(5):
                try:
                    attacker.execute(attack)
                except psycopg.Error as exc:
                    states.append(exc.sqlstate)

        thread = threading.Thread(target=attack_five_times)
        thread.start()
        during: list[float] = []
        while thread.is_alive():
            during.extend(_latencies(other, 1))
        thread.join()
    assert states == ["54000"] * 5
    print(f"\n{size} B attack: other client's SELECT 1 max {max(during) * 1000:.1f} ms over {len(during)} queries "
          f"(baseline max {max(baseline) * 1000:.1f} ms)")
    assert max(during) < 0.25 + max(baseline)


def _latencies(conn: psycopg.Connection[Any], count: int) -> list[float]:
    """Seconds each of `count` SELECT 1 round trips took."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        conn.execute("SELECT 1").fetchone()
        times.append(time.perf_counter() - start)
    return times


# -- 6. The guard's tables against the real server --------------------------------------------------------

def test_function_call_oids_name_the_functions_on_the_server(pg: EmbeddedPostgres) -> None:
    """FunctionCall names a function only by OID: the guard's OIDs must be the server's own functions."""
    expected = {guard.SET_CONFIG_OID: "set_config", guard.PG_NOTIFY_OID: "pg_notify", **guard.SIGNAL_OIDS,
                **guard.LARGE_OBJECT_OIDS, **guard.SEQUENCE_STATE_OIDS, **guard.SESSION_ADVISORY_LOCK_OIDS}
    rows = pg.psql("SELECT oid, proname FROM pg_proc WHERE oid IN (" + ",".join(map(str, expected)) + ")").split()
    assert dict((int(oid), name) for oid, name in (row.split("|") for row in rows)) == expected
    names = pg.psql("SELECT string_agg(DISTINCT proname, ' ') FROM pg_proc WHERE proname LIKE 'lo\\_%' "
                    "OR proname IN ('loread', 'lowrite')").split()
    assert set(names) == guard.LARGE_OBJECT_FUNCTIONS == set(guard.LARGE_OBJECT_OIDS.values())


def test_refused_encoding_names_are_the_servers_unreadable_encodings(pg: EmbeddedPostgres) -> None:
    """Every spelling the proxy refuses is one the server maps to an encoding whose characters can carry
    an ASCII byte; every such encoding's own name is refused."""
    unreadable = {"SJIS", "SHIFT_JIS_2004", "BIG5", "GBK", "GB18030", "JOHAB"}
    names = ",".join(f"'{name}'" for name in sorted(lexing.UNREADABLE_ENCODINGS))
    mapped = pg.psql(f"SELECT DISTINCT pg_encoding_to_char(pg_char_to_encoding(n)) FROM unnest(ARRAY[{names}]) n").split()
    assert set(mapped) == unreadable
    assert all(lexing.encoding_key(name) in lexing.UNREADABLE_ENCODINGS for name in unreadable)
