"""Transaction characteristics in transaction mode: BEGIN ISOLATION LEVEL, DEFERRABLE, SET TRANSACTION and
SET transaction_isolation work through the proxy as directly (found by a breaker helper: the context,
pipelined in front of them, ran a query first and Postgres refused them with 25001).

Postgres takes an isolation level, DEFERRABLE or a snapshot only before the transaction's first query,
and the context is a query; so a Query or Execute that only begins a transaction or sets its
characteristics goes without it, and the context goes in front of the transaction's next statement.
Each test runs the same steps directly against Postgres for the expected value, and checks that the
statements inside the transaction still carry the tenant's context.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pg8000.native
import psycopg
import pytest

from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres
from support import ACME, GLOBEX, ROWS, ProxyProcess

MODES = {"session": {"pool": {"mode": "session"}}, "transaction": {"pool": {"mode": "transaction", "size": 1}}}

SCRIPTS = [
    ["BEGIN ISOLATION LEVEL SERIALIZABLE", "SHOW transaction_isolation", "COMMIT"],
    ["BEGIN", "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", "SHOW transaction_isolation", "COMMIT"],
    ["BEGIN; SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", "SHOW transaction_isolation", "COMMIT"],
    ["BEGIN DEFERRABLE", "SHOW transaction_deferrable", "COMMIT"],
    ["BEGIN READ ONLY", "SHOW transaction_read_only", "COMMIT"],
    ["START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY, DEFERRABLE", "SHOW transaction_isolation", "COMMIT"],
    ["BEGIN", "SET TRANSACTION READ WRITE", "SHOW transaction_read_only", "COMMIT"],
    ["BEGIN", "SET LOCAL transaction_isolation = 'serializable'", "SHOW transaction_isolation", "COMMIT"],
    ["BEGIN", "SELECT set_config('transaction_isolation', 'repeatable read', true)", "COMMIT"],
    ["SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "SHOW transaction_isolation"],  # outside a block: a warning
    ["BEGIN", "SELECT 1", "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "ROLLBACK"],  # too late, as directly
    ["BEGIN ISOLATION LEVEL SERIALIZABLE", "COMMIT", "SHOW transaction_isolation"],
]


@pytest.fixture(params=list(MODES))
def proxy_of_mode(request: pytest.FixtureRequest, make_proxy: Any) -> ProxyProcess:
    proxy: ProxyProcess = make_proxy(MODES[request.param])
    return proxy


def direct_dsn(pg: EmbeddedPostgres, db: TenantDatabase) -> str:
    return f"host=127.0.0.1 port={pg.port} user={db.app_role} dbname={db.database} sslmode=disable password={db.app_password}"


def outcome(conn: psycopg.Connection[Any], sql: str) -> tuple[Any, str]:
    """The rows (or command tag) of `sql`, or the SQLSTATE of its error; and the transaction status after."""
    try:
        cur = conn.execute(sql)
        result: Any = ("ok", cur.fetchall() if cur.description else cur.statusmessage)
    except psycopg.Error as exc:
        result = ("error", exc.sqlstate)
    return result, conn.info.transaction_status.name


def tenant_rows(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    row = conn.execute("SELECT tenant_proxy.current_tenant()::text, count(*) FROM leads").fetchone()
    assert row is not None
    return tuple(row)


@pytest.mark.parametrize("script", SCRIPTS, ids=[" | ".join(script)[:60] for script in SCRIPTS])
def test_transaction_characteristics_answer_as_directly(proxy_of_mode: ProxyProcess, pg: EmbeddedPostgres,
                                                       tenant_db: TenantDatabase, script: list[str]) -> None:
    with psycopg.connect(direct_dsn(pg, tenant_db), autocommit=True) as direct, \
            psycopg.connect(proxy_of_mode.dsn(), password=proxy_of_mode.token(ACME), autocommit=True) as proxied:
        expected = [outcome(direct, sql) for sql in script]
        got = [outcome(proxied, sql) for sql in script]
        assert tenant_rows(proxied) == (ACME, ROWS[ACME])
    assert got == expected


def test_a_serializable_transaction_carries_the_tenant_context_while_another_tenant_takes_turns(
        proxy_of_mode: ProxyProcess) -> None:
    """psycopg's isolation_level sends BEGIN ISOLATION LEVEL ... READ ONLY; the block's statements see the
    tenant's rows only, before and after another tenant's transaction (which waits for the one connection
    in transaction mode: it runs after the COMMIT)."""
    with psycopg.connect(proxy_of_mode.dsn(), password=proxy_of_mode.token(ACME)) as acme:
        acme.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
        acme.read_only = True
        assert acme.execute("SHOW transaction_isolation").fetchone() == ("serializable",)
        assert tenant_rows(acme) == (ACME, ROWS[ACME])
        acme.commit()
        with psycopg.connect(proxy_of_mode.dsn(), password=proxy_of_mode.token(GLOBEX), autocommit=True) as globex:
            assert tenant_rows(globex) == (GLOBEX, ROWS[GLOBEX])
        assert acme.execute("SHOW transaction_read_only").fetchone() == ("on",)
        assert tenant_rows(acme) == (ACME, ROWS[ACME])
        acme.commit()


async def test_asyncpg_transaction_with_isolation_readonly_and_deferrable(proxy_of_mode: ProxyProcess) -> None:
    conn = await asyncpg.connect(host="127.0.0.1", port=proxy_of_mode.port, user="alice", database="app",
                                 password=proxy_of_mode.token(ACME), ssl=False)
    try:
        async with conn.transaction(isolation="serializable", readonly=True, deferrable=True):
            assert await conn.fetchval("SHOW transaction_isolation") == "serializable"
            assert await conn.fetchval("SHOW transaction_deferrable") == "on"
            assert tuple(await conn.fetchrow("SELECT tenant_proxy.current_tenant()::text, count(*) FROM leads")) == (
                ACME, ROWS[ACME])
    finally:
        await conn.close()


def test_pg8000_start_transaction_over_the_extended_protocol(proxy_of_mode: ProxyProcess) -> None:
    """pg8000 runs every statement with Parse, Bind, Execute and Sync: the Execute of START TRANSACTION
    goes without the context, the next Execute with it."""
    conn = pg8000.native.Connection("alice", host="127.0.0.1", port=proxy_of_mode.port, database="app",
                                    password=proxy_of_mode.token(ACME))
    try:
        conn.run("START TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        assert conn.run("SHOW transaction_isolation") == [["repeatable read"]]
        assert conn.run("SELECT tenant_proxy.current_tenant()::text, count(*) FROM leads") == [[ACME, ROWS[ACME]]]
        conn.run("COMMIT")
    finally:
        conn.close()
