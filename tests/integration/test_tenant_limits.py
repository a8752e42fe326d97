"""Bounds that keep one tenant (or anyone without a token) from taking more than its share (issue 14,
items 3 and 4): server connections and client connections per tenant, fair queueing, the proxy's own
idle-transaction timeout, connections still logging in, partial messages, prepared statements of all
clients together. Each limit answers with a Postgres error and the SQLSTATE a driver can act on."""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from typing import Any

import asyncpg
import psycopg
import pytest

from differential import connect_direct
from proxy.protocol import messages
from support import ACME, GLOBEX, ROWS, RawClient, login, startup, wait_until


async def connect(proxy: Any, tenant: str) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="app", database="app",
                                 password=proxy.token(tenant), ssl=False)


async def test_a_hogging_tenant_cannot_starve_another(make_proxy: Any) -> None:
    """ACME opens transactions on as many server connections as it may and goes quiet, and more ACME
    clients queue behind them; GLOBEX's checkouts are still served at once (its p99 wait over 50
    transactions stays under 0.5 s), and the queued ACME clients get 53300 naming the pool."""
    proxy = make_proxy({"pool": {"mode": "transaction", "size": 3, "max_server_connections_per_tenant": 2,
                                 "checkout_timeout": 1.5}})
    hogs = [await connect(proxy, ACME) for _ in range(2)]
    queued = [await connect(proxy, ACME) for _ in range(3)]
    worker = await connect(proxy, GLOBEX)
    try:
        for hog in hogs:
            await hog.execute("BEGIN")
        waiting = [asyncio.ensure_future(conn.fetchval("SELECT 1")) for conn in queued]
        waits = []
        for _ in range(50):
            started = time.monotonic()
            assert await worker.fetchval("SELECT count(*) FROM leads") == ROWS[GLOBEX]
            waits.append(time.monotonic() - started)
        assert statistics.quantiles(waits, n=100)[98] < 0.5
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(result, asyncpg.PostgresError | asyncpg.InterfaceError)  # FATAL 53300, then closed
                   and 'pool for database "app" is full' in str(result) for result in results), results
    finally:
        for conn in (*hogs, *queued, worker):
            conn.terminate()


def test_idle_in_transaction_is_ended_by_the_proxy(make_proxy: Any) -> None:
    """A client that opens a transaction and goes quiet is ended with 25P03 after [pool]
    idle_transaction_timeout, whatever it SETs (the tenant cannot switch the proxy's timeout off)."""
    proxy = make_proxy({"pool": {"mode": "transaction", "idle_transaction_timeout": 0.5}})
    client = RawClient(proxy.port)
    try:
        login(client, proxy.token())
        client.send(messages.query("SET idle_in_transaction_session_timeout = 0; BEGIN"))
        assert client.read_until(b"Z")[-1] == (b"Z", b"T")
        fields = wait_until(lambda: client.error(), deadline=10.0)
        assert (fields["S"], fields["C"]) == ("FATAL", "25P03")
        assert client.closed()
    finally:
        client.close()


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_silent_client_is_ended_as_by_idle_session_timeout(make_proxy: Any, pg: Any, tenant_db: Any, mode: str) -> None:
    """[pool] client_idle_timeout ends a logged-in client that stays silent outside a transaction block
    with what Postgres's idle_session_timeout sends directly (FATAL 57P05, the same message), in both
    modes. A client that went silent earlier inside a block is left to idle_transaction_timeout (off
    here) and carries on; so does one that was silent for as long but is in the middle of a query."""
    proxy = make_proxy({"pool": {"mode": mode, "client_idle_timeout": 0.5}})
    direct = connect_direct(pg.port, tenant_db.app_role, tenant_db.app_password, tenant_db.database,
                            options="-c idle_session_timeout=500")
    in_block, idle, busy = RawClient(proxy.port), RawClient(proxy.port), RawClient(proxy.port)
    try:
        login(in_block, proxy.token(GLOBEX))
        in_block.send(messages.query("BEGIN"))
        assert in_block.read_until(b"Z")[-1] == (b"Z", b"T")
        login(busy, proxy.token(GLOBEX))
        busy.send(messages.query("SELECT pg_sleep(1.5)"))  # three timeouts long, silent meanwhile
        login(idle, proxy.token())
        idle.send(messages.query("SELECT 1"))
        assert idle.read_until(b"Z")[-1] == (b"Z", b"I")
        fields = wait_until(lambda: idle.error(), deadline=10.0)
        assert idle.closed()
        kind, body = direct.read_message(time.monotonic() + 10.0)
        expected = messages.parse_error_fields(body)
        assert kind == b"E" and expected["C"] == "57P05"
        assert (fields["S"], fields["C"], fields["M"]) == (expected["S"], expected["C"], expected["M"])
        assert "client_idle_timeout" in fields["D"]
        in_block.send(messages.query("SELECT count(*) FROM leads"))
        rows = in_block.read_until(b"Z")
        assert rows[-1] == (b"Z", b"T") and messages.parse_data_row([body for kind, body in rows if kind == b"D"][0]) == [
            str(ROWS[GLOBEX]).encode()]
        assert [kind for kind, _ in busy.read_until(b"Z")] == [b"T", b"D", b"C", b"Z"]
    finally:
        direct.close()
        for client in (in_block, idle, busy):
            client.close()
    assert proxy.alive()


def test_client_connections_per_tenant(make_proxy: Any) -> None:
    """[client] max_connections_per_tenant: the tenant's next login gets 53300; another tenant logs in."""
    proxy = make_proxy({"client": {"max_connections_per_tenant": 2}})
    kept = [psycopg.connect(proxy.dsn(), password=proxy.token(ACME)) for _ in range(2)]
    try:
        with pytest.raises(psycopg.OperationalError, match="too many connections for this tenant"):
            psycopg.connect(proxy.dsn(), password=proxy.token(ACME))
        with psycopg.connect(proxy.dsn(), password=proxy.token(GLOBEX)) as other:
            assert other.execute("SELECT 1").fetchone()[0] == 1
        kept.pop().close()
        with psycopg.connect(proxy.dsn(), password=proxy.token(ACME)) as again:
            assert again.execute("SELECT 1").fetchone()[0] == 1
    finally:
        for conn in kept:
            conn.close()


def test_silent_connections_are_counted_apart_and_time_out(make_proxy: Any) -> None:
    """Sockets that never send a startup packet fill only [client] max_unauthenticated_connections (the
    next one gets 53300 at once) and are closed after [client] startup_timeout_seconds; then logins
    work again. Logged-in clients are never refused for them."""
    proxy = make_proxy({"client": {"max_unauthenticated_connections": 4, "startup_timeout_seconds": 0.5}})
    with psycopg.connect(proxy.dsn(), password=proxy.token()) as logged_in:
        silent = [socket.create_connection(("127.0.0.1", proxy.port), timeout=10) for _ in range(4)]
        try:
            refused = RawClient(proxy.port)
            refused.send(startup())
            assert refused.error()["C"] == "53300"
            refused.close()
            assert logged_in.execute("SELECT 1").fetchone()[0] == 1
            for sock in silent:
                assert sock.recv(65536)[:1] in (b"E", b"")  # closed by the startup timeout
            with psycopg.connect(proxy.dsn(), password=proxy.token()) as later:
                assert later.execute("SELECT 1").fetchone()[0] == 1
        finally:
            for sock in silent:
                sock.close()


def test_a_message_left_unfinished_ends_the_session(make_proxy: Any) -> None:
    """A header announcing a large message, then silence: after [client] message_timeout_seconds the
    session ends with 08P01, and the proxy holds nothing more of it."""
    proxy = make_proxy({"client": {"message_timeout_seconds": 0.5}})
    client = RawClient(proxy.port)
    try:
        login(client, proxy.token())
        client.send(messages.query("SELECT 1")[:1] + (1 << 20).to_bytes(4, "big") + b"SELECT ")
        fields = client.error()
        assert (fields["S"], fields["C"]) == ("FATAL", "08P01")
        assert client.closed()
    finally:
        client.close()


def test_prepared_statements_of_all_clients_are_bounded(make_proxy: Any) -> None:
    """[client] max_total_prepared_statement_bytes: once all clients together keep that much, a named
    Parse gets 53400 naming the bound; the session goes on, and a client leaving frees its share."""
    proxy = make_proxy({"pool": {"mode": "transaction"}, "client": {"max_total_prepared_statement_bytes": 1500}})
    first, second = RawClient(proxy.port), RawClient(proxy.port)
    try:
        login(first, proxy.token())
        login(second, proxy.token(GLOBEX))
        first.send(b"".join(messages.parse(f"s{n}", f"SELECT {n}") for n in range(5)) + messages.sync())
        assert [kind for kind, _ in first.read_until(b"Z")] == [b"1"] * 5 + [b"Z"]
        second.send(b"".join(messages.parse(f"t{n}", f"SELECT {n}") for n in range(5)) + messages.sync())
        replies = second.read_until(b"Z")
        errors = [messages.parse_error_fields(body) for kind, body in replies if kind == b"E"]
        assert errors and errors[0]["C"] == "53400" and "all clients together" in errors[0]["M"]
        first.send(messages.terminate())
        wait_until(first.closed)

        def fits() -> bool:
            second.send(messages.parse("late", "SELECT 1") + messages.sync())
            return [kind for kind, _ in second.read_until(b"Z")] == [b"1", b"Z"]

        wait_until(fits)
    finally:
        first.close()
        second.close()
