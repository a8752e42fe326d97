"""The tenant context per transaction in transaction mode (issue 13): sent with the client's first
statement of each transaction, in the same write and implicit transaction; gone when it ends.

Each test runs through a real proxy process with real drivers or raw protocol; where a result could
differ from a direct session, the same steps run directly against Postgres give the expected value.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres
from proxy.protocol import messages
from proxy.tenant import ContextBuilder
from differential import Wire, connect_direct
from support import ACME, GLOBEX, ROWS, ProxyProcess, RawClient, login

TRANSACTION = {"mode": "transaction"}
TENANT_COUNT = 100
ROWS_EACH = 2


@pytest.fixture(scope="module")
def tx_proxy(pg: EmbeddedPostgres, tenant_db: TenantDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """Transaction mode over a single server connection: every client takes turns on it."""
    process = ProxyProcess(pg, tenant_db, tmp_path_factory.mktemp("tx"), {"pool": {**TRANSACTION, "size": 1}}).start()
    yield process
    process.stop()


def count(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute("SELECT count(*) FROM leads").fetchone()[0])


def test_a_rolled_back_transaction_takes_only_its_own_context(tx_proxy: ProxyProcess) -> None:
    """A first transaction rolled back, then a second on the same server connection: the second carries
    its own context (the rollback took the first one with it) and sees its own rows."""
    with psycopg.connect(tx_proxy.dsn(), password=tx_proxy.token(ACME)) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert count(conn) == ROWS[ACME]
        conn.rollback()
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
        assert count(conn) == ROWS[ACME]
        assert conn.execute("SELECT tenant_proxy.current_tenant()").fetchone()[0] == ACME
        conn.commit()


def read_until_ready(client: RawClient, groups: int) -> list[tuple[bytes, bytes]]:
    replies: list[tuple[bytes, bytes]] = []
    while groups:
        item = client.read_message()
        replies.append(item)
        groups -= item[0] == b"Z"
    return replies


def test_a_pipeline_of_three_transactions_with_a_failure_in_the_second(tx_proxy: ProxyProcess) -> None:
    """Three extended-protocol transactions in one write, the second failing: the first and third see
    their own tenant's rows, the second's error skips only to its own Sync."""
    client = RawClient(tx_proxy.port)
    try:
        login(client, tx_proxy.token(GLOBEX))
        group = (messages.parse("", "SELECT count(*) FROM leads") + messages.bind("", "", []) + messages.execute()
                 + messages.sync())
        failing = (messages.parse("", "SELECT 1 / (count(*) - count(*)) FROM leads") + messages.bind("", "", [])
                   + messages.execute() + messages.sync())
        client.send(group + failing + group)
        replies = read_until_ready(client, 3)
        kinds = [kind for kind, _ in replies]
        assert kinds == [b"1", b"2", b"D", b"C", b"Z", b"1", b"2", b"E", b"Z", b"1", b"2", b"D", b"C", b"Z"]
        rows = [messages.parse_data_row(body) for kind, body in replies if kind == b"D"]
        assert rows == [[str(ROWS[GLOBEX]).encode()]] * 2
        assert messages.parse_error_fields(replies[7][1])["C"] == "22012"
    finally:
        client.close()


def test_statements_after_a_commit_inside_one_query_run_without_context(tx_proxy: ProxyProcess) -> None:
    """`BEGIN; ...; COMMIT; SELECT` in one Query: the context ends with the COMMIT, so the SELECT after it
    sees no rows (fail closed), never another tenant's."""
    result = tx_proxy.psql(tx_proxy.token(ACME), "BEGIN; SELECT 1; COMMIT; SELECT count(*) FROM leads")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "0"  # the SELECT after the COMMIT
    assert tx_proxy.psql(tx_proxy.token(ACME), "SELECT count(*) FROM leads").stdout.split() == [str(ROWS[ACME])]


def test_statements_that_refuse_transaction_blocks_run_without_the_context(
    tx_proxy: ProxyProcess, pg: EmbeddedPostgres, tenant_db: TenantDatabase
) -> None:
    """VACUUM and CREATE INDEX CONCURRENTLY cannot run inside a transaction block (25001 behind the
    context's Execute); they read no tenant rows, so the proxy sends them without it."""
    table = owned_table(pg, tenant_db)
    with psycopg.connect(tx_proxy.dsn(), password=tx_proxy.token(ACME), autocommit=True) as conn:
        conn.execute(f"VACUUM {table}")
        conn.execute(f"CREATE INDEX CONCURRENTLY {table.split('.')[1]}_id ON {table} (id)")
        assert conn.execute("SELECT count(*) FROM pg_indexes WHERE indexname = %s", (f"{table.split('.')[1]}_id",)
                            ).fetchone()[0] == 1
        assert count(conn) == ROWS[ACME]


def owned_table(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> str:
    """A table without row-level security in a schema of the application role's own, for maintenance
    statements and COPY FROM (which Postgres refuses on tables under RLS)."""
    schema = f"own_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE SCHEMA {schema} AUTHORIZATION {tenant_db.app_role}; CREATE TABLE {schema}.t (id int);"
            f" ALTER TABLE {schema}.t OWNER TO {tenant_db.app_role}", tenant_db.database)
    return f"{schema}.t"


def test_copy_in_and_out(tx_proxy: ProxyProcess, pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    """COPY TO STDOUT of a tenant table carries the context and sees only the tenant's rows; COPY FROM
    STDIN (into a table without RLS: Postgres refuses it under RLS) goes through and the connection serves
    the next transaction."""
    table = owned_table(pg, tenant_db)
    with psycopg.connect(tx_proxy.dsn(), password=tx_proxy.token(ACME), autocommit=True) as conn:
        with conn.cursor().copy("COPY (SELECT tenant_id FROM leads) TO STDOUT") as copy:
            tenants = {bytes(row).decode().strip() for row in copy}
        assert tenants == {ACME}
        with conn.cursor().copy(f"COPY {table} (id) FROM STDIN") as copy:
            for number in range(100):
                copy.write_row((number,))
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 100
        assert count(conn) == ROWS[ACME]


@pytest.fixture(scope="module")
def hundred_tenants(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> list[str]:
    tenants = [str(uuid.UUID(int=0x6000_0000_0000_4000_8000_0000_0000_0000 + index)) for index in range(TENANT_COUNT)]
    values = ", ".join(f"('{tenant}', 'row {row} of {tenant}', 'x@example.com')" for tenant in tenants for row in range(ROWS_EACH))
    pg.psql(f"INSERT INTO leads (tenant_id, name, email) VALUES {values}", database=tenant_db.database)
    return tenants


async def test_200_clients_of_100_tenants_over_4_connections(make_proxy: Any, hundred_tenants: list[str]) -> None:
    """Every statement of 200 clients of 100 tenants, sharing 4 server connections, sees exactly its own
    tenant: its rows and current_tenant(), with no mismatch."""
    pooled = make_proxy({"pool": {**TRANSACTION, "size": 4}})
    mismatches: list[str] = []

    async def client(index: int) -> None:
        tenant = hundred_tenants[index % TENANT_COUNT]
        conn = await asyncpg.connect(host="127.0.0.1", port=pooled.port, user="app", database="app",
                                     password=pooled.token(tenant), ssl=False)
        try:
            for _ in range(5):
                rows = await conn.fetch("SELECT tenant_id::text AS tenant, tenant_proxy.current_tenant() AS current FROM leads")
                if len(rows) != ROWS_EACH or any(row["tenant"] != tenant or row["current"] != tenant for row in rows):
                    mismatches.append(f"{tenant}: {[tuple(row) for row in rows]}")
                if await conn.fetchval("SELECT tenant_proxy.current_tenant()") != tenant:
                    mismatches.append(f"{tenant}: current_tenant() differs")
        finally:
            await conn.close()

    results = await asyncio.gather(*(client(index) for index in range(200)), return_exceptions=True)
    assert [result for result in results if isinstance(result, BaseException)] == []
    assert mismatches == []


def test_a_connection_holds_no_context_between_transactions(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    """The proxy's own context messages (ContextBuilder.transaction_messages, exactly the bytes it sends)
    before a Query, directly against Postgres: inside that transaction the context verifies; after it the
    backend holds no tenant and no proof, so a statement that somehow ran without the proxy's messages
    would see nothing."""
    context = ContextBuilder("app.current_tenant", "tenant_proxy.proof", tenant_db.signing_key)
    wire = connect_direct(pg.port, tenant_db.app_role, tenant_db.app_password, tenant_db.database)
    try:
        pid = int(rows_of(exchange(wire, messages.query("SELECT pg_backend_pid()")))[0][0])
        inside = exchange(wire, messages.parse(context.statement_name.decode(), context.statement),
                          context.transaction_messages(ACME, pid, 2_000_000_000, "{}"),
                          messages.query("SELECT tenant_proxy.current_tenant(), count(*) FROM leads"))
        assert rows_of(inside)[-1] == [ACME.encode(), str(ROWS[ACME]).encode()]
        after = exchange(wire, messages.query("SELECT coalesce(current_setting('app.current_tenant', true), ''),"
                                              " coalesce(current_setting('tenant_proxy.proof', true), ''), count(*) FROM leads"))
        assert rows_of(after) == [[b"", b"", b"0"]]
    finally:
        wire.close()


def exchange(wire: Wire, *frontend: bytes) -> list[tuple[bytes, bytes]]:
    """Send the messages as one write and read up to the next ReadyForQuery."""
    wire.send(b"".join(frontend))
    return wire.read_ready(1)


def rows_of(replies: list[tuple[bytes, bytes]]) -> list[list[bytes | None]]:
    return [messages.parse_data_row(body) for kind, body in replies if kind == b"D"]
