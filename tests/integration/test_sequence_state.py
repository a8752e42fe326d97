"""lastval() and currval() through the proxy. They read what the session's earlier transactions did
with sequences. In session mode, and inside the transaction that called nextval(), they answer as
directly. Under transaction pooling, a transaction's first statement that reads them is refused
(0A000): the earlier transactions ran on whichever server connection they got, and another client of
the tenant may have used this one since. Answering would give that client's value."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from differential import Wire, connect_direct, connect_proxy
from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres
from proxy.protocol import messages
from support import ACME, ProxyProcess

CLIENTS = Path(__file__).parent / "clients"
SEQUENCE = "sequence_state_probe"
REFUSED = ("error", "0A000")


@pytest.fixture(scope="module")
def sequence(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> Iterator[str]:
    pg.psql(f"CREATE SEQUENCE {SEQUENCE}; GRANT USAGE ON SEQUENCE {SEQUENCE} TO {tenant_db.app_role};",
            database=tenant_db.database)
    yield SEQUENCE
    pg.psql(f"DROP SEQUENCE {SEQUENCE}", database=tenant_db.database)


@pytest.fixture(scope="module")
def proxies(pg: EmbeddedPostgres, tenant_db: TenantDatabase, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, ProxyProcess]]:
    """A session-mode proxy, and a transaction-mode one with one server connection, so that every client
    of a tenant takes turns on it."""
    started = {
        mode: ProxyProcess(pg, tenant_db, tmp_path_factory.mktemp(mode), {"pool": {"mode": mode, "size": 1 if mode == "transaction" else 5}}).start()
        for mode in ("session", "transaction")
    }
    yield started
    for process in started.values():
        process.stop()


Connect = Callable[[], psycopg.Connection[Any]]


def connector(target: str, pg: EmbeddedPostgres, db: TenantDatabase, proxies: dict[str, ProxyProcess], simple: bool) -> Connect:
    """Connections straight to Postgres as the application role, or through a proxy with an ACME token;
    `simple`: psycopg's client-side binding cursor, which sends simple Queries (several statements in one)."""
    factory = {"cursor_factory": psycopg.ClientCursor} if simple else {}
    if target == "direct":
        return lambda: psycopg.connect(host="127.0.0.1", port=pg.port, user=db.app_role, password=db.app_password,
                                       dbname=db.database, autocommit=True, **factory)
    proxy = proxies[target]
    return lambda: psycopg.connect(proxy.dsn(), password=proxy.token(ACME), autocommit=True, **factory)


def outcome(conn: psycopg.Connection[Any], sql: str, last: int) -> tuple[str, Any]:
    """What the statement's last result says: ("mine", True) when it is `last`, the value this client's
    own latest nextval() gave; ("error", SQLSTATE) when it fails (a block it began is rolled back)."""
    try:
        cursor = conn.execute(sql)
        while cursor.nextset():
            pass
        row = cursor.fetchone()
        return ("mine", row is not None and row[0] == last)
    except psycopg.Error as exc:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")
        return ("error", exc.sqlstate)


def steps(connect: Connect, simple: bool) -> list[tuple[str, tuple[str, Any]]]:
    """Two clients of one tenant take turns calling nextval(); each then reads lastval() and currval() in
    later transactions, in a block, and in the transaction that called nextval()."""
    first, second = connect(), connect()
    try:
        seen: list[tuple[str, tuple[str, Any]]] = []

        def take(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute(f"SELECT nextval('{SEQUENCE}')").fetchone()
            assert row is not None
            return int(row[0])

        def in_block(sql: str, last: int) -> tuple[str, Any]:
            result = outcome(first, sql, last)
            if first.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                first.execute("COMMIT")
            return result

        mine = take(first)
        take(second)  # the other client's value is the server connection's lastval() now
        seen.append(("lastval() in a later transaction", outcome(first, "SELECT lastval()", mine)))
        seen.append(("currval() in a later transaction", outcome(first, f"SELECT currval('{SEQUENCE}')", mine)))
        first.execute("BEGIN")
        seen.append(("lastval() first in a block", in_block("SELECT lastval()", mine)))
        with first.transaction():
            mine = take(first)
            seen.append(("lastval() after nextval() in a block", outcome(first, "SELECT lastval()", mine)))
            seen.append(("currval() after nextval() in a block", outcome(first, f"SELECT currval('{SEQUENCE}')", mine)))
        if simple:  # several statements in one Query
            seen.append(("nextval() and lastval() in one Query",
                         outcome(first, f"SELECT nextval('{SEQUENCE}'); SELECT lastval() = currval('{SEQUENCE}')", True)))
            mine = take(first)
            take(second)
            seen.append(("BEGIN and lastval() in one Query", in_block("BEGIN; SELECT lastval()", mine)))
        seen.append(("the session goes on", outcome(first, "SELECT 1", 1)))
        return seen
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("simple", [False, True], ids=["extended", "simple"])
@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_lastval_and_currval_answer_as_directly_or_are_refused_at_a_transactions_start(
    mode: str, simple: bool, sequence: str, pg: EmbeddedPostgres, tenant_db: TenantDatabase, proxies: dict[str, ProxyProcess],
) -> None:
    expected = steps(connector("direct", pg, tenant_db, proxies, simple), simple)
    assert all(result == ("mine", True) for _, result in expected), expected
    got = steps(connector(mode, pg, tenant_db, proxies, simple), simple)
    if mode == "transaction":  # where the value would come from an earlier transaction: refused, never another's
        refused = {"lastval() in a later transaction", "currval() in a later transaction", "lastval() first in a block",
                   "BEGIN and lastval() in one Query"}
        expected = [(step, REFUSED if step in refused else result) for step, result in expected]
    assert got == expected


async def test_an_asyncpg_statement_refused_at_a_transactions_start_runs_inside_one(
    sequence: str, proxies: dict[str, ProxyProcess],
) -> None:
    """asyncpg prepares a named statement (Parse, Describe, Flush, then Bind, Execute, Sync): the refusal
    comes for the Execute, and the same cached statement runs inside a transaction."""
    proxy = proxies["transaction"]
    conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="alice", database="app",
                                 password=proxy.token(ACME), ssl=False)
    try:
        await conn.fetchval(f"SELECT nextval('{SEQUENCE}')")
        with pytest.raises(asyncpg.FeatureNotSupportedError, match="lastval"):
            await conn.fetchval("SELECT lastval()")
        async with conn.transaction():
            mine = await conn.fetchval(f"SELECT nextval('{SEQUENCE}')")
            assert await conn.fetchval("SELECT lastval()") == mine
        assert await conn.fetchval("SELECT 2") == 2
    finally:
        await conn.close()


def run_pdo(dsn: str, user: str, password: str) -> list[Any]:
    environment = {**os.environ, "PDO_DSN": dsn, "PDO_USER": user, "PDO_PASSWORD": password, "PDO_SEQUENCE": SEQUENCE}
    result = subprocess.run(["php", str(CLIENTS / "pdo_last_insert_id.php")], capture_output=True, text=True,
                            env=environment, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_php_pdo_last_insert_id(mode: str, sequence: str, pg: EmbeddedPostgres, tenant_db: TenantDatabase,
                                proxies: dict[str, ProxyProcess]) -> None:
    """PDO's lastInsertId() after an autocommitted statement: as directly in session mode; refused (0A000)
    under transaction pooling, where it runs as a transaction of its own; inside beginTransaction() as
    directly in both."""
    dsn = "pgsql:host=127.0.0.1;port={};dbname={};sslmode=disable"
    expected = run_pdo(dsn.format(pg.port, tenant_db.database), tenant_db.app_role, tenant_db.app_password)
    assert all(value is True for step in expected for value in step.values()), expected
    proxy = proxies[mode]
    got = run_pdo(dsn.format(proxy.port, "app"), "alice", proxy.token(ACME))
    if mode == "transaction":
        expected = [{name: "0A000" if name.startswith("autocommit") else value for name, value in step.items()}
                    for step in expected]
    assert got == expected


def in_block_steps(connect: Connect) -> list[tuple[str, tuple[str, Any]]]:
    """In the block that called nextval(), lastval() and currval() after statements that may end a
    transaction or reset the session by their words (CASE ... END, a string holding "end", ROLLBACK TO a
    savepoint, RESET ALL): the block and its server connection are the client's throughout."""
    first = connect()
    try:
        seen: list[tuple[str, tuple[str, Any]]] = []
        first.execute("BEGIN")
        row = first.execute(f"SELECT nextval('{SEQUENCE}')").fetchone()
        assert row is not None
        mine = int(row[0])
        first.execute("SELECT CASE WHEN true THEN 'the end' END")
        seen.append(("lastval() after CASE ... END", outcome(first, "SELECT lastval()", mine)))
        first.execute("SAVEPOINT a")
        first.execute("ROLLBACK TO SAVEPOINT a")
        seen.append(("currval() after ROLLBACK TO", outcome(first, f"SELECT currval('{SEQUENCE}')", mine)))
        first.execute("RESET ALL")
        seen.append(("lastval() after RESET ALL", outcome(first, "SELECT lastval()", mine)))
        if first.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            first.execute("COMMIT")
        seen.append(("the session goes on", outcome(first, "SELECT 1", 1)))
        return seen
    finally:
        first.close()


@pytest.mark.parametrize("simple", [False, True], ids=["extended", "simple"])
@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_lastval_and_currval_answer_as_directly_after_words_that_may_end_a_transaction(
    mode: str, simple: bool, sequence: str, pg: EmbeddedPostgres, tenant_db: TenantDatabase, proxies: dict[str, ProxyProcess],
) -> None:
    """The relay sets the context again in front of the statement after one that may end the transaction
    (its words: a CASE ... END too) or that resets the session; that is no transaction start for lastval()."""
    expected = in_block_steps(connector("direct", pg, tenant_db, proxies, simple))
    assert all(result == ("mine", True) for _, result in expected), expected
    assert in_block_steps(connector(mode, pg, tenant_db, proxies, simple)) == expected


def qualified_steps(connect: Connect) -> list[tuple[str, tuple[str, Any]]]:
    """lastval() and currval() named with the database in front (`app.pg_catalog.lastval()`), which
    Postgres takes for the current database, in a later transaction than the client's nextval()."""
    first, second = connect(), connect()
    try:
        row = first.execute(f"SELECT current_database(), nextval('{SEQUENCE}')").fetchone()
        assert row is not None
        database, mine = row[0], int(row[1])
        second.execute(f"SELECT nextval('{SEQUENCE}')")
        return [
            ("database.pg_catalog.lastval()", outcome(first, f'SELECT "{database}".pg_catalog.lastval()', mine)),
            ("database.pg_catalog.currval()", outcome(first, f"SELECT {database}.pg_catalog.currval('{SEQUENCE}')", mine)),
        ]
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_lastval_and_currval_named_with_the_database(
    mode: str, sequence: str, pg: EmbeddedPostgres, tenant_db: TenantDatabase, proxies: dict[str, ProxyProcess],
) -> None:
    expected = qualified_steps(connector("direct", pg, tenant_db, proxies, False))
    assert all(result == ("mine", True) for _, result in expected), expected
    got = qualified_steps(connector(mode, pg, tenant_db, proxies, False))
    if mode == "transaction":
        expected = [(step, REFUSED) for step, _ in expected]
    assert got == expected


LASTVAL_OID, CURRVAL_OID, ADVISORY_LOCK_OID = 2559, 1575, 2880


def function_call(oid: int, *arguments: bytes) -> bytes:
    """A FunctionCall message ('F'): text arguments, text result."""
    body = struct.pack("!iHH", oid, 0, len(arguments))
    body += b"".join(struct.pack("!i", len(argument)) + argument for argument in arguments)
    return b"F" + struct.pack("!i", len(body) + 6) + body + struct.pack("!H", 0)


def function_call_steps(connect: Callable[[str], Wire]) -> list[tuple[str, Any]]:
    """What FunctionCall messages of lastval() and currval() answer (the value, or the SQLSTATE), after this
    client's nextval() and another's, in a later transaction and in the block that called nextval(); and a
    session advisory lock taken by FunctionCall."""
    first, second = connect("first"), connect("second")

    def answer(wire: Wire, data: bytes) -> Any:
        wire.send(data)
        replies = wire.read_ready()
        for kind, body in replies:
            if kind == b"V":
                return body[4:].decode()
            if kind == b"E":
                return next(field[1:].decode() for field in body.split(b"\0") if field[:1] == b"C")
        return None

    try:
        def take(wire: Wire) -> str:
            wire.send(messages.query(f"SELECT nextval('{SEQUENCE}')::text"))
            return next(body for kind, body in wire.read_ready() if kind == b"D")[6:].decode()

        def own(value: Any, mine: str) -> Any:
            return "mine" if value == mine else value

        mine = take(first)
        take(second)
        seen: list[tuple[str, Any]] = [
            ("lastval() in a later transaction", own(answer(first, function_call(LASTVAL_OID)), mine)),
            ("currval() in a later transaction", own(answer(first, function_call(CURRVAL_OID, SEQUENCE.encode())), mine)),
        ]
        answer(first, messages.query("BEGIN"))
        mine = take(first)
        seen.append(("lastval() after nextval() in a block", own(answer(first, function_call(LASTVAL_OID)), mine)))
        seen.append(("currval() after nextval() in a block", own(answer(first, function_call(CURRVAL_OID, SEQUENCE.encode())), mine)))
        answer(first, messages.query("COMMIT"))
        seen.append(("pg_advisory_lock()", answer(first, function_call(ADVISORY_LOCK_OID, b"4242"))))
        answer(first, messages.query("SELECT pg_advisory_unlock_all()"))
        return seen
    finally:
        first.close()
        second.close()


def test_lastval_currval_and_session_advisory_locks_by_function_call(
    sequence: str, pg: EmbeddedPostgres, tenant_db: TenantDatabase, tmp_path: Path,
) -> None:
    """With [guard] allow_function_call, a FunctionCall of lastval() or currval() is refused (0A000) at a
    transaction's start under transaction pooling, as its SQL call is, and answers as directly inside the
    block that called nextval(); a session advisory lock by FunctionCall is refused as in SQL."""
    expected = function_call_steps(lambda name: connect_direct(pg.port, tenant_db.app_role, tenant_db.app_password,
                                                              tenant_db.database, name))
    assert expected == [("lastval() in a later transaction", "mine"), ("currval() in a later transaction", "mine"),
                        ("lastval() after nextval() in a block", "mine"), ("currval() after nextval() in a block", "mine"),
                        ("pg_advisory_lock()", "")]
    proxy = ProxyProcess(pg, tenant_db, tmp_path, {"pool": {"mode": "transaction", "size": 1},
                                                   "guard": {"allow_function_call": True}}).start()
    try:
        got = function_call_steps(lambda name: connect_proxy(proxy.port, proxy.token(ACME), name))
    finally:
        proxy.stop()
    refused = {"lastval() in a later transaction", "currval() in a later transaction"}
    assert got == [(step, "0A000" if step in refused else result) for step, result in expected[:4]] + [("pg_advisory_lock()", "0A000")]
