"""A prepared statement's result shape after a schema change, in transaction mode, against direct Postgres
(found by a driver breaker). In Postgres a protocol-level prepared statement keeps the result shape it was
parsed with: once a schema change would change it, every Bind (and Describe) of it fails with 0A000
"cached plan must not change result type", and asyncpg, which caches descriptions, then drops its cache and
prepares again. The proxy shares server-side statements between clients and prepares them again on other
server connections, so before the fix a client decoded new rows with its old description: values under the
wrong column names, or protocol errors.

Each scenario runs the same steps with two clients directly (both the application role) and through a
transaction-mode proxy (ACME and GLOBEX, pool size 1 or 2), on a table of its own, with the DDL run by the
superuser in between, and compares what the clients got.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from differential import assert_same, close, connect_direct, connect_proxy
from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres
from proxy.protocol import messages
from support import ACME, GLOBEX, ProxyProcess

Connect = Callable[[str], Awaitable[asyncpg.Connection]]
Steps = Callable[[Connect, Callable[[str], None], str], Awaitable[dict[str, Any]]]


def shown(records: list[asyncpg.Record]) -> list[list[tuple[str, Any]]]:
    """Rows with their column names, in order."""
    return [list(record.items()) for record in records]


def failure(exc: Exception) -> dict[str, str]:
    return {"sqlstate": getattr(exc, "sqlstate", None) or type(exc).__name__, "type": type(exc).__name__}


async def fetched_around(connect: Connect, admin: Callable[[str], None], create: str, change: str, query: str,
                         again: bool = False) -> dict[str, Any]:
    """A's fetch of `query` (asyncpg caches the statement), the schema `change`, B's fetch of the same text
    (the proxy parses the shared server-side statement again), A's fetch again (and once more)."""
    admin(create)
    a, b = await connect(ACME), await connect(GLOBEX)
    try:
        seen: dict[str, Any] = {"a before": shown(await a.fetch(query))}
        admin(change)
        seen["b after"] = shown(await b.fetch(query))
        seen["a after"] = shown(await a.fetch(query))
        if again:
            seen["a again"] = shown(await a.fetch(query))
        return seen
    finally:
        await a.close()
        await b.close()


async def labels_after_another_client_parsed_it(connect: Connect, admin: Callable[[str], None], table: str) -> dict[str, Any]:
    """The breaker's case: a column dropped and one added."""
    return await fetched_around(
        connect, admin, f"CREATE TABLE {table} (a int, b text, s text); INSERT INTO {table} VALUES (7, 'bbb', 'sss')",
        f"ALTER TABLE {table} DROP COLUMN b, ADD COLUMN n text DEFAULT 'new column n'", f"SELECT * FROM {table}", again=True)


async def int_to_bigint(connect: Connect, admin: Callable[[str], None], table: str) -> dict[str, Any]:
    """A column's type changes (asyncpg read eight bytes where its description said four: "unexpected
    trailing 4 bytes", forever)."""
    return await fetched_around(
        connect, admin, f"CREATE TABLE {table} (a int, s text); INSERT INTO {table} VALUES (7, 'sss')",
        f"ALTER TABLE {table} ALTER COLUMN a TYPE bigint", f"SELECT a, s FROM {table}")


async def column_count(connect: Connect, admin: Callable[[str], None], table: str) -> dict[str, Any]:
    """A column added: the statement's rows get one more field (a ProtocolError in asyncpg)."""
    return await fetched_around(
        connect, admin, f"CREATE TABLE {table} (a int); INSERT INTO {table} VALUES (7)",
        f"ALTER TABLE {table} ADD COLUMN n text DEFAULT 'n'", f"SELECT * FROM {table}")


async def write_after_the_change(connect: Connect, admin: Callable[[str], None], table: str) -> dict[str, Any]:
    """An INSERT ... RETURNING prepared by A (asyncpg's prepare(), which does not prepare again on 0A000):
    after the change Postgres refuses its Bind, so nothing is inserted. A's cached fetch of the same text
    is refused too, prepared again by asyncpg, and inserts once."""
    admin(f"CREATE TABLE {table} (id int, b text, s text)")
    a, b = await connect(ACME), await connect(GLOBEX)
    insert = f"INSERT INTO {table} (id, s) VALUES ($1, 'x') RETURNING *"
    try:
        statement = await a.prepare(insert)
        seen: dict[str, Any] = {"a before": shown(await statement.fetch(1))}
        await a.fetch(insert, 2)
        admin(f"ALTER TABLE {table} DROP COLUMN b, ADD COLUMN n text DEFAULT 'n'")
        seen["b after"] = shown(await b.fetch(insert, 3))
        try:
            seen["a prepared after"] = shown(await statement.fetch(4))
        except asyncpg.PostgresError as exc:
            seen["a prepared after"] = failure(exc)
        seen["a cached after"] = shown(await a.fetch(insert, 5))
        seen["rows"] = sorted(await b.fetchval(f"SELECT array_agg(id) FROM {table}"))
        return seen
    finally:
        await a.close()
        await b.close()


async def inside_a_transaction(connect: Connect, admin: Callable[[str], None], table: str) -> dict[str, Any]:
    """Inside a transaction block asyncpg does not prepare again: the 0A000 reaches the application and
    aborts the block, as directly."""
    admin(f"CREATE TABLE {table} (a int, b text, s text); INSERT INTO {table} VALUES (7, 'bbb', 'sss')")
    a, b = await connect(ACME), await connect(GLOBEX)
    query = f"SELECT * FROM {table}"
    try:
        seen: dict[str, Any] = {"a before": shown(await a.fetch(query))}
        admin(f"ALTER TABLE {table} DROP COLUMN b")
        seen["b after"] = shown(await b.fetch(query))
        transaction = a.transaction()
        await transaction.start()
        try:
            seen["a after"] = shown(await a.fetch(query))
        except asyncpg.PostgresError as exc:
            seen["a after"] = failure(exc)
        try:
            seen["a in the failed block"] = await a.fetchval("SELECT 1")
        except asyncpg.PostgresError as exc:
            seen["a in the failed block"] = failure(exc)
        await transaction.rollback()
        seen["a again"] = shown(await a.fetch(query))
        return seen
    finally:
        await a.close()
        await b.close()


SCENARIOS: dict[str, Steps] = {
    "labels after another client parsed the statement": labels_after_another_client_parsed_it,
    "int to bigint": int_to_bigint,
    "a column added": column_count,
    "a write after the change": write_after_the_change,
    "inside a transaction block": inside_a_transaction,
}


def connector(port: int, tokens: dict[str, str] | None, db: TenantDatabase) -> Connect:
    """Connect as a tenant through the proxy (`tokens`), or directly as the application role."""

    async def connect(tenant: str) -> asyncpg.Connection:
        if tokens is None:
            return await asyncpg.connect(host="127.0.0.1", port=port, user=db.app_role, password=db.app_password,
                                         database=db.database, ssl=False)
        return await asyncpg.connect(host="127.0.0.1", port=port, user="app", database="app", password=tokens[tenant],
                                     ssl=False)

    return connect


def administrator(pg: EmbeddedPostgres, db: TenantDatabase) -> Callable[[str], None]:
    def admin(sql: str) -> None:
        table = sql.split()[2] if sql.startswith("CREATE TABLE") else None
        if table is not None:
            sql = f"DROP TABLE IF EXISTS {table}; {sql}; GRANT ALL ON {table} TO {db.app_role}"
        pg.psql(sql, database=db.database)

    return admin


@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_a_statement_whose_result_shape_changed_answers_as_directly(
    make_proxy: Any, pg: EmbeddedPostgres, tenant_db: TenantDatabase, scenario: str, size: int
) -> None:
    proxy: ProxyProcess = make_proxy({"pool": {"mode": "transaction", "size": size}})
    admin = administrator(pg, tenant_db)
    steps = SCENARIOS[scenario]
    table = f"shape_{list(SCENARIOS).index(scenario)}_{size}"
    expected = await steps(connector(pg.port, None, tenant_db), admin, table + "_direct")
    got = await steps(connector(proxy.port, {ACME: proxy.token(ACME), GLOBEX: proxy.token(GLOBEX)}, tenant_db), admin,
                      table + "_proxy")
    assert got == expected
    assert proxy.alive()


async def test_a_statement_prepared_again_on_a_connection_that_never_held_it(
    make_proxy: Any, pg: EmbeddedPostgres, tenant_db: TenantDatabase
) -> None:
    """Pool size 2: A's next run lands on the server connection that never held its statement, where the
    proxy prepares it again under the new schema (no other client parses it); directly, A's statement is
    refused and asyncpg prepares again."""
    proxy: ProxyProcess = make_proxy({"pool": {"mode": "transaction", "size": 2}})
    admin = administrator(pg, tenant_db)

    async def steps(connect: Connect, table: str) -> dict[str, Any]:
        admin(f"CREATE TABLE {table} (a int, b text, s text); INSERT INTO {table} VALUES (7, 'bbb', 'sss')")
        a, b, c = await connect(ACME), await connect(GLOBEX), await connect(GLOBEX)
        query = f"SELECT * FROM {table}"
        try:
            async with a.transaction():  # to know the server connection that holds A's statement
                held_by = await a.fetchval("SELECT pg_backend_pid()")
                seen: dict[str, Any] = {"a before": shown(await a.fetch(query))}
            admin(f"ALTER TABLE {table} DROP COLUMN b, ADD COLUMN n text DEFAULT 'new column n'")
            # Keep that connection busy, so A gets the other one (directly, nothing is shared: no effect).
            holder, spare = b.transaction(), c.transaction()
            await holder.start()
            if await b.fetchval("SELECT pg_backend_pid()") != held_by:
                await spare.start()
                await c.fetchval("SELECT 1")
                await holder.rollback()
                holder = spare
            seen["a after"] = shown(await a.fetch(query))
            await holder.rollback()
            seen["a again"] = shown(await a.fetch(query))
            return seen
        finally:
            for conn in (a, b, c):
                await conn.close()

    expected = await steps(connector(pg.port, None, tenant_db), "shape_moved_direct")
    got = await steps(connector(proxy.port, {ACME: proxy.token(ACME), GLOBEX: proxy.token(GLOBEX)}, tenant_db),
                      "shape_moved_proxy")
    assert expected["a after"] == [[("a", 7), ("s", "sss"), ("n", "new column n")]]
    assert got == expected



def describe(name: str) -> bytes:
    return messages.message(b"D", b"S" + name.encode() + b"\0")


# Wire-level steps, each a function of the table's name: ("a" or "b", a write answered by one ReadyForQuery),
# or ("admin", DDL run by the superuser).
WIRE_STEPS: dict[str, list[tuple[str, Callable[[str], bytes | str]]]] = {
    "the unnamed statement described in one group, bound in a later one (pg8000)": [
        ("a", lambda t: messages.parse("", f"SELECT * FROM {t}") + describe("") + messages.sync()),
        ("admin", lambda t: f"ALTER TABLE {t} DROP COLUMN b, ADD COLUMN n text DEFAULT 'n'"),
        ("b", lambda t: messages.query("SELECT 1")),  # drops the server's unnamed statement: the proxy prepares A's again
        ("a", lambda t: messages.bind("", "", []) + messages.execute("") + messages.sync()),  # 0A000
        ("a", lambda t: messages.bind("", "", []) + messages.execute("") + messages.sync()),  # 0A000 still
    ],
    "a statement runs again once the schema gives its shape back": [
        ("a", lambda t: messages.parse("s1", f"SELECT * FROM {t}") + describe("s1") + messages.sync()),
        ("admin", lambda t: f"ALTER TABLE {t} ALTER COLUMN a TYPE bigint"),
        ("b", lambda t: messages.parse("s2", f"SELECT * FROM {t}") + describe("s2") + messages.sync()),
        ("a", lambda t: messages.bind("", "s1", []) + messages.execute("") + messages.sync()),  # 0A000
        ("admin", lambda t: f"ALTER TABLE {t} ALTER COLUMN a TYPE int"),
        # B prepares it again, without describing it: the proxy describes it before A's Bind
        ("b", lambda t: close("S", "s2") + messages.parse("s2", f"SELECT * FROM {t}") + messages.sync()),
        ("a", lambda t: messages.bind("", "s1", []) + messages.execute("") + messages.sync()),  # runs
    ],
    "an INSERT ... RETURNING refused at Bind inserts nothing": [
        ("a", lambda t: messages.parse("w", f"INSERT INTO {t} (a) VALUES (8) RETURNING *") + describe("w") + messages.sync()),
        ("admin", lambda t: f"ALTER TABLE {t} DROP COLUMN b"),
        ("b", lambda t: messages.parse("w", f"INSERT INTO {t} (a) VALUES (8) RETURNING *") + messages.sync()),
        ("a", lambda t: messages.bind("", "w", []) + messages.execute("") + messages.sync()),  # 0A000
        ("b", lambda t: messages.query(f"SELECT count(*) FROM {t}")),  # 1
    ],
}


def _untabled(reply: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
    """A RowDescription without its columns' table oids (each scenario has a table of its own)."""
    kind, body = reply
    if kind != b"T":
        return reply
    fields, pos = [body[:2]], 2
    for _ in range(struct.unpack_from("!h", body)[0]):
        end = body.index(b"\0", pos) + 1
        fields.append(body[pos:end] + b"\0\0\0\0" + body[end + 4:end + 18])
        pos = end + 18
    return kind, b"".join(fields)


@pytest.mark.parametrize("case", list(WIRE_STEPS))
def test_wire_steps_answer_as_directly(make_proxy: Any, pg: EmbeddedPostgres, tenant_db: TenantDatabase, case: str) -> None:
    """Byte for byte (but the table oids): the unnamed statement, a shape given back, a write refused."""
    proxy: ProxyProcess = make_proxy({"pool": {"mode": "transaction", "size": 1}})
    admin = administrator(pg, tenant_db)
    replies: dict[str, list[list[tuple[bytes, bytes]]]] = {}
    for target in ("direct", "proxy"):
        table = f"shape_wire_{list(WIRE_STEPS).index(case)}_{target}"
        admin(f"CREATE TABLE {table} (a int, b text, s text)")
        if target == "direct":
            wires = {who: connect_direct(pg.port, tenant_db.app_role, tenant_db.app_password, tenant_db.database, name=who)
                     for who in "ab"}
        else:
            wires = {"a": connect_proxy(proxy.port, proxy.token(ACME), name="a"),
                     "b": connect_proxy(proxy.port, proxy.token(GLOBEX), name="b")}
        seen = replies[target] = []
        try:
            for who, step in WIRE_STEPS[case]:
                made = step(table)
                if isinstance(made, str):
                    admin(made)
                    continue
                wires[who].send(made)
                seen.append([_untabled(reply) for reply in wires[who].read_ready()])
        finally:
            for wire in wires.values():
                wire.close()
    for index, (expected, got) in enumerate(zip(replies["direct"], replies["proxy"], strict=True)):
        assert_same(expected, got, f"replies to step {index}")
