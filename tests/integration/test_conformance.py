"""The driver inputs of issue 12, each through a real proxy in both pool modes (transaction mode with
one server connection, so clients share it) and compared with the same steps run directly against
Postgres as the application role. Direct sessions have no tenant context, so the steps avoid results
that depend on Row-Level Security; where a tenant matters it is checked through the proxy alone."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pg8000.native
import psycopg
import pytest

from differential import Reply, Wire, assert_same, close, connect_direct, connect_proxy, describe
from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres
from proxy.protocol import messages
from support import ACME, GLOBEX, ProxyProcess, pool_mode_fixtures

MODES = {"session": {"pool": {"mode": "session"}}, "transaction": {"pool": {"mode": "transaction", "size": 1}}}
CLIENTS = Path(__file__).parent / "clients"

mode, pooled = pool_mode_fixtures(MODES)


class Direct:
    """Connections straight to Postgres as the application role: where the expected values come from."""

    def __init__(self, pg: EmbeddedPostgres, db: TenantDatabase) -> None:
        self.pg, self.db = pg, db

    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.pg.port} user={self.db.app_role} dbname={self.db.database} sslmode=disable"

    def wire(self, name: str = "direct") -> Wire:
        return connect_direct(self.pg.port, self.db.app_role, self.db.app_password, self.db.database, name)

    def asyncpg_arguments(self) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.pg.port, "user": self.db.app_role, "password": self.db.app_password,
                "database": self.db.database, "ssl": False}

    def pg8000(self) -> pg8000.native.Connection:
        return pg8000.native.Connection(self.db.app_role, host="127.0.0.1", port=self.pg.port,
                                        database=self.db.database, password=self.db.app_password)


@pytest.fixture
def direct(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> Direct:
    return Direct(pg, tenant_db)


@pytest.fixture(scope="module")
def conformance_scratch(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> Iterator[None]:
    """A table without Row-Level Security that the application role may write, for the PDO script."""
    pg.psql(
        "CREATE TABLE conformance_scratch (run int NOT NULL, n int NOT NULL);\n"
        f"GRANT SELECT, INSERT ON conformance_scratch TO {tenant_db.app_role};\n",
        database=tenant_db.database,
    )
    yield
    pg.psql("DROP TABLE conformance_scratch", database=tenant_db.database)


def proxy_arguments(proxy: ProxyProcess, tenant: str = ACME) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": proxy.port, "user": "alice", "password": proxy.token(tenant),
            "database": "app", "ssl": False}


def close_all(*wires: Wire) -> None:
    for wire in wires:
        wire.close()


def exchange(wire: Wire, *frontend: bytes, ready: int = 1) -> list[Reply]:
    """Send the messages as one write and read up to the `ready`th ReadyForQuery."""
    wire.send(b"".join(frontend))
    return wire.read_ready(ready)


def current_tenant(wire: Wire) -> bytes | None:
    replies = exchange(wire, messages.query("SELECT tenant_proxy.current_tenant()"))
    rows = [messages.parse_data_row(body) for type_byte, body in replies if type_byte == b"D"]
    assert len(rows) == 1, replies
    return rows[0][0]


# ---------------------------------------------------------------------------------------------
# Input 1: the unnamed statement across Syncs (pg8000).


def unnamed_across_syncs(first: Wire, second: Wire) -> list[Reply]:
    """`first` parses the unnamed statement and syncs, `second` runs a query, `first` describes, binds
    and executes it in two more Sync groups; the replies `first` got."""
    replies = exchange(first, messages.parse("", "SELECT $1::text, $2::text"), messages.sync())
    exchange(second, messages.query("SELECT 1"))
    replies += exchange(first, describe("S", ""), messages.sync(), messages.bind("", "", ["hello", "world"]),
                        messages.execute(""), messages.sync(), ready=2)
    return replies


def test_raw_unnamed_statement_survives_syncs_and_another_tenant(pooled: ProxyProcess, direct: Direct) -> None:
    first, second = direct.wire("direct A"), direct.wire("direct B")
    expected = unnamed_across_syncs(first, second)
    close_all(first, second)
    assert (b"D", b"\x00\x02\x00\x00\x00\x05hello\x00\x00\x00\x05world") in expected

    first = connect_proxy(pooled.port, pooled.token(ACME), "proxy A")
    second = connect_proxy(pooled.port, pooled.token(GLOBEX), "proxy B")
    try:
        assert_same(expected, unnamed_across_syncs(first, second), "client A's replies")
        assert current_tenant(first) == ACME.encode()
        assert current_tenant(second) == GLOBEX.encode()
    finally:
        close_all(first, second)


def pg8000_worker(connect: Callable[[], pg8000.native.Connection], name: str, tenant: str | None, results: list[Any]) -> None:
    """Queries with one and two parameters, all through pg8000's unnamed statement; appends each
    result (or the exception that stopped it) to `results`."""
    try:
        conn = connect()
        try:
            for index in range(60):
                if index % 2:
                    results.append(conn.run("SELECT CAST(:a AS text), CAST(:b AS text)", a=f"{name}{index}", b=str(index)))
                else:
                    results.append(conn.run("SELECT CAST(:a AS int) + 1", a=index))
                if tenant is not None and index % 10 == 0:
                    assert conn.run("SELECT tenant_proxy.current_tenant()") == [[tenant]]
        finally:
            conn.close()
    except Exception as exc:  # collected and reported by the test
        results.append(exc)


def run_pg8000_pair(connect: Callable[[str], pg8000.native.Connection], tenants: dict[str, str | None]) -> dict[str, list[Any]]:
    results: dict[str, list[Any]] = {name: [] for name in tenants}
    threads = [
        threading.Thread(target=pg8000_worker, args=(lambda tenant=tenant: connect(tenant or ""), name, tenant, results[name]))
        for name, tenant in tenants.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
        assert not thread.is_alive(), "a pg8000 client got no answer within 120 s"
    return results


def test_pg8000_clients_of_two_tenants_interleave_without_errors(pooled: ProxyProcess, direct: Direct) -> None:
    expected = run_pg8000_pair(lambda _: direct.pg8000(), {"a": None, "b": None})
    got = run_pg8000_pair(
        lambda tenant: pg8000.native.Connection("alice", host="127.0.0.1", port=pooled.port, database="app",
                                                password=pooled.token(tenant)),
        {"a": ACME, "b": GLOBEX},
    )
    assert [r for rs in got.values() for r in rs if isinstance(r, BaseException)] == []
    assert got == expected


# ---------------------------------------------------------------------------------------------
# Input 2: a simple Query pipelined behind a failing Parse.


def query_behind_failing_parse(wire: Wire) -> list[Reply]:
    replies = exchange(wire, messages.parse("", "SELEC 1"), messages.query("SELECT 1"), messages.sync())
    replies += exchange(wire, messages.query("RESET ALL"))
    return replies + exchange(wire, messages.query("SELECT 1"))


def test_raw_query_behind_a_failing_parse_is_skipped(pooled: ProxyProcess, direct: Direct) -> None:
    wire = direct.wire()
    expected = query_behind_failing_parse(wire)
    wire.close()
    assert [type_byte for type_byte, _ in expected[:2]] == [b"E", b"Z"]

    wire = connect_proxy(pooled.port, pooled.token(ACME))
    other = connect_proxy(pooled.port, pooled.token(GLOBEX), "second client")
    try:
        assert_same(expected, query_behind_failing_parse(wire), "the client's replies")
        # In transaction mode the one server connection must be free again for the next client.
        replies = exchange(other, messages.query("SELECT 2"))
        assert [type_byte for type_byte, _ in replies] == [b"T", b"D", b"C", b"Z"], replies
    finally:
        close_all(wire, other)


# ---------------------------------------------------------------------------------------------
# Input 3: custom settings, RESET to startup values, and settings that keep the server connection.

SETTING_STEPS = (
    "SET myapp.user_id = '42'",
    "SELECT current_setting('myapp.user_id', true)",
    "SHOW statement_timeout",
    "SET statement_timeout = '1s'",
    "SHOW statement_timeout",
    "RESET statement_timeout",
    "SHOW statement_timeout",
    "SET statement_timeout = '2s'",
    "SET myapp.user_id = '43'",
    "RESET ALL",
    "SHOW statement_timeout",
    "SELECT current_setting('myapp.user_id', true)",
)
PEEK = "SELECT current_setting('myapp.user_id', true), current_setting('statement_timeout')"


def settings_seen(main: psycopg.Connection[Any], other: psycopg.Connection[Any]) -> list[Any]:
    """Each step's result on `main`, and what `other` (same tenant, no SET) reads after it.

    A custom placeholder setting that another client once set on a shared server connection reads as ''
    there after the proxy resets it, where a fresh session reads NULL: Postgres keeps a placeholder
    defined for the life of a backend. Neither is another client's value, so the two read alike here
    (the README lists the difference)."""
    seen: list[Any] = []
    for sql in SETTING_STEPS:
        cursor = main.execute(sql)
        peek = tuple(None if value == "" else value for value in other.execute(PEEK).fetchone())
        seen.append((sql, cursor.fetchone() if cursor.description else cursor.statusmessage, peek))
    return seen


def test_psycopg_settings_follow_the_client_and_reset_to_startup_values(pooled: ProxyProcess, direct: Direct) -> None:
    options = "-c statement_timeout=7s"
    with (
        psycopg.connect(direct.dsn(), password=direct.db.app_password, options=options, autocommit=True) as main,
        psycopg.connect(direct.dsn(), password=direct.db.app_password, autocommit=True) as other,
    ):
        expected = settings_seen(main, other)
    assert expected[1][1] == ("42",) and expected[2][1] == ("7s",) and expected[-2][1] == ("7s",)

    with (
        psycopg.connect(pooled.dsn(), password=pooled.token(ACME), options=options, autocommit=True) as main,
        psycopg.connect(pooled.dsn(), password=pooled.token(ACME), autocommit=True) as other,
    ):
        assert settings_seen(main, other) == expected


SET_CONFIG_LOCAL = "SELECT set_config('statement_timeout', '5s', true)"


def psycopg_transaction_pid(conn: psycopg.Connection[Any]) -> int:
    with conn.transaction():
        assert conn.execute(SET_CONFIG_LOCAL).fetchone() == ("5s",)
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
    conn.commit()
    assert row is not None
    return int(row[0])


def simple_transaction_pid(wire: Wire) -> int:
    replies = exchange(wire, messages.query(f"BEGIN; {SET_CONFIG_LOCAL}; SELECT pg_backend_pid(); COMMIT"))
    rows = [messages.parse_data_row(body)[0] for type_byte, body in replies if type_byte == b"D"]
    assert rows[0] == b"5s" and replies[-1] == (b"Z", b"I"), replies
    return int(rows[1] or b"")


def test_set_config_local_keeps_the_server_connection(pooled: ProxyProcess, mode: str) -> None:
    """Two clients take turns for 100 transactions that each run set_config(..., true), one with
    psycopg 3 (extended protocol), one with simple Queries: each keeps using the same server
    connection, and in transaction mode both share the only one, so no server connection is closed."""
    pids: dict[str, set[int]] = {"psycopg": set(), "simple": set()}
    wire = connect_proxy(pooled.port, pooled.token(GLOBEX))
    try:
        with psycopg.connect(pooled.dsn(), password=pooled.token(ACME)) as conn:
            for _ in range(50):
                pids["psycopg"].add(psycopg_transaction_pid(conn))
                pids["simple"].add(simple_transaction_pid(wire))
            assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)
    finally:
        wire.close()
    assert {name: len(seen) for name, seen in pids.items()} == {"psycopg": 1, "simple": 1}
    assert len(pids["psycopg"] | pids["simple"]) == (1 if mode == "transaction" else 2)


# ---------------------------------------------------------------------------------------------
# Input 4: PHP PDO deallocates its statement inside a transaction.


def run_pdo(dsn: str, user: str, password: str) -> list[Any]:
    environment = {**os.environ, "PDO_DSN": dsn, "PDO_USER": user, "PDO_PASSWORD": password,
                   "PDO_RUN": str(secrets.randbelow(1 << 30))}
    result = subprocess.run(["php", str(CLIENTS / "pdo_deallocate.php")], capture_output=True, text=True,
                            env=environment, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_php_pdo_deallocate_inside_a_transaction(pooled: ProxyProcess, direct: Direct, conformance_scratch: None) -> None:
    dsn = "pgsql:host=127.0.0.1;port={};dbname=app;sslmode=disable"
    expected = run_pdo(dsn.format(direct.pg.port), direct.db.app_role, direct.db.app_password)
    assert expected == [{"inserted": 1}, {"in_transaction": 1, "active": True}, {"after_commit": 1}]
    assert run_pdo(dsn.format(pooled.port), "alice", pooled.token(ACME)) == expected


# ---------------------------------------------------------------------------------------------
# Input 5: psycopg 3 sends DEALLOCATE ALL after ROLLBACK and after DDL; DISCARD ALL in a pipeline.


def psycopg_with_deallocate_all(conn: psycopg.Connection[Any]) -> list[Any]:
    """With the default prepare_threshold, a query run 10 times is prepared; rollback() and the
    command after DDL make psycopg send DEALLOCATE ALL by itself."""
    seen: list[Any] = []
    for value in range(10):
        seen.append(conn.execute("SELECT %s::int * 2", (value,)).fetchone())
    conn.rollback()
    for value in range(10):
        seen.append(conn.execute("SELECT %s::int * 3", (value,)).fetchone())
    seen.append(conn.execute("DROP TABLE IF EXISTS conformance_no_such_table").statusmessage)
    seen.append(conn.execute("SELECT %s::int * 2", (5,)).fetchone())
    conn.rollback()
    seen.append(conn.execute("SELECT %s::int * 3", (7,)).fetchone())
    conn.commit()
    return seen


def test_psycopg_rollback_after_prepared_statements(pooled: ProxyProcess, direct: Direct) -> None:
    with psycopg.connect(direct.dsn(), password=direct.db.app_password) as conn:
        expected = psycopg_with_deallocate_all(conn)
    with psycopg.connect(pooled.dsn(), password=pooled.token(ACME)) as conn:
        assert psycopg_with_deallocate_all(conn) == expected


def discard_all_in_a_pipeline(owner: Wire, other: Wire, late: Wire) -> list[list[Reply]]:
    """`owner` prepares x1; `other` (same tenant) pipelines Parse x1 with the same text, Bind, Execute,
    Sync and Query DISCARD ALL in one write; then `owner` binds x1 again, `other` binds its x1 (gone),
    and `late` (same tenant) prepares the same text and binds it. The replies of the three."""
    text = "SELECT $1::int + 100"

    def use(wire: Wire, value: str) -> list[Reply]:
        return exchange(wire, messages.bind("", "x1", [value]), messages.execute(""), messages.sync())

    owner_replies = exchange(owner, messages.parse("x1", text), messages.sync()) + use(owner, "1")
    other_replies = exchange(other, messages.parse("x1", text), messages.bind("", "x1", ["2"]), messages.execute(""),
                             messages.sync(), messages.query("DISCARD ALL"), ready=2)
    owner_replies += use(owner, "3")
    other_replies += use(other, "4")
    late_replies = exchange(late, messages.parse("x1", text), messages.sync()) + use(late, "5")
    return [owner_replies, other_replies, late_replies]


def test_raw_discard_all_pipelined_after_parse_leaves_other_clients_statements(pooled: ProxyProcess, direct: Direct) -> None:
    names = ("owner", "other", "late")
    wires = [direct.wire(f"direct {name}") for name in names]
    expected = discard_all_in_a_pipeline(*wires)
    close_all(*wires)
    assert [type_byte for type_byte, _ in expected[1][-2:]] == [b"E", b"Z"]  # x1 is gone for `other` only

    wires = [connect_proxy(pooled.port, pooled.token(ACME), f"proxy {name}") for name in names]
    try:
        got = discard_all_in_a_pipeline(*wires)
        assert_same(expected[0], got[0], "the replies of the client that prepared x1 first")
        assert_same(expected[1], got[1], "the replies of the client that sent DISCARD ALL")
        assert_same(expected[2], got[2], "the replies of a client that prepared x1 afterwards")
    finally:
        close_all(*wires)


# ---------------------------------------------------------------------------------------------
# Input 6: an asyncpg pool resets each released connection with RESET ALL.

SERVER_SETTINGS = {"application_name": "billing", "jit": "off", "statement_timeout": "5s"}
SHOW = ("application_name", "jit", "statement_timeout")


async def pool_cycles(pool_arguments: dict[str, Any], other_arguments: dict[str, Any]) -> list[Any]:
    """What a pooled connection and a plain one (no server_settings) show, over acquire/release cycles
    in which the pooled client also changes a setting the reset must undo."""
    pool = await asyncpg.create_pool(min_size=1, max_size=1, server_settings=SERVER_SETTINGS, **pool_arguments)
    other = await asyncpg.connect(**other_arguments)
    seen: list[Any] = []
    try:
        for _ in range(4):
            async with pool.acquire() as conn:
                seen.append([await conn.fetchval(f"SHOW {name}") for name in SHOW])
                await conn.execute("SET statement_timeout = '9s'")
            seen.append([await other.fetchval(f"SHOW {name}") for name in SHOW])
    finally:
        await other.close()
        await asyncio.wait_for(pool.close(), 30)
    return seen


async def test_asyncpg_pool_reset_returns_to_server_settings(pooled: ProxyProcess, direct: Direct) -> None:
    expected = await pool_cycles(direct.asyncpg_arguments(), direct.asyncpg_arguments())
    assert expected[::2] == [["billing", "off", "5s"]] * 4
    got = await pool_cycles(proxy_arguments(pooled, ACME), proxy_arguments(pooled, GLOBEX))
    assert got[::2] == expected[::2]
    assert got[1::2] == expected[1::2]


# ---------------------------------------------------------------------------------------------
# Statement management in SQL acts on the client's own statements, as in a session.

MANAGEMENT = ("DEALLOCATE s1", "DEALLOCATE ALL", "DISCARD ALL", "DISCARD PLANS", "DISCARD TEMP")


def statement_management(sql: str, client: Wire, neighbour: Wire) -> tuple[list[Reply], list[Reply]]:
    """Both clients prepare s1; `client` runs `sql` inside a transaction and outside one, then both
    bind s1."""
    prepare = (messages.parse("s1", "SELECT $1::int + 1"), messages.sync())
    use = (messages.bind("", "s1", ["41"]), messages.execute(""), messages.sync())
    mine = exchange(client, *prepare)
    theirs = exchange(neighbour, *prepare)
    mine += exchange(client, messages.query("BEGIN"), messages.query(sql), messages.query("SELECT 2"),
                     messages.query("COMMIT"), ready=4)
    theirs += exchange(neighbour, *use)
    mine += exchange(client, messages.query(sql))
    mine += exchange(client, *use)
    theirs += exchange(neighbour, *use)
    mine += exchange(client, close("S", "s1"), messages.sync())
    return mine, theirs


@pytest.mark.parametrize("sql", MANAGEMENT)
def test_raw_statement_management_in_sql_acts_on_own_statements(pooled: ProxyProcess, direct: Direct, sql: str) -> None:
    client, neighbour = direct.wire("direct client"), direct.wire("direct neighbour")
    expected = statement_management(sql, client, neighbour)
    close_all(client, neighbour)

    client = connect_proxy(pooled.port, pooled.token(ACME), "proxy client")
    neighbour = connect_proxy(pooled.port, pooled.token(ACME), "proxy neighbour")
    try:
        mine, theirs = statement_management(sql, client, neighbour)
        assert_same(expected[0], mine, f"replies of the client that ran {sql}")
        assert_same(expected[1], theirs, "replies of another client of the same tenant")
    finally:
        close_all(client, neighbour)


def test_raw_sql_prepare_and_execute_answer_and_the_session_goes_on(pooled: ProxyProcess, direct: Direct, mode: str) -> None:
    """SQL PREPARE and EXECUTE may be refused in transaction mode; if so, with an ErrorResponse that
    names a SQLSTATE and says what to do, and the session goes on. In session mode, as directly."""
    steps = (messages.query("PREPARE q AS SELECT 1"), messages.query("EXECUTE q"), messages.query("DEALLOCATE q"))
    wire = direct.wire()
    expected = exchange(wire, *steps, ready=3)
    wire.close()
    wire = connect_proxy(pooled.port, pooled.token(ACME))
    try:
        got = exchange(wire, *steps, ready=3)
        if mode == "session":
            assert_same(expected, got, "replies to PREPARE, EXECUTE, DEALLOCATE")
        for type_byte, body in got:
            if type_byte == b"E":
                fields = messages.parse_error_fields(body)
                assert len(fields.get("C", "")) == 5 and fields.get("M"), fields
        assert exchange(wire, messages.query("SELECT 3"))[1] == (b"D", b"\x00\x01\x00\x00\x00\x013")
    finally:
        wire.close()
