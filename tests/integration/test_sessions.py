"""Session life cycle: cancel, many concurrent tenants, upstream failures, disconnects, logging."""

from __future__ import annotations

import asyncio
import random
import re
import time
from typing import Any

import asyncpg
import psycopg
import pytest

from support import ACME, GLOBEX, ROWS, ProxyProcess, cancel_when_running, wait_until
from proxy.embedded import EmbeddedPostgres, free_port
from proxy.protocol import messages



def test_cancel_reaches_the_running_query(make_proxy: Any, pg: EmbeddedPostgres) -> None:
    """A proxy of its own: on the shared one, a late cancel of an earlier test's client can reach this
    session's reused server connection (see docs/pool-modes.md on cancels)."""
    proxy = make_proxy()
    with psycopg.connect(proxy.dsn(), password=proxy.token()) as conn:
        start = time.monotonic()
        watcher = cancel_when_running(pg, conn.cancel, "cancel_me_1")
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(20) /* cancel_me_1 */")
        watcher.join()
        assert time.monotonic() - start < 10
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[ACME]


async def test_minted_key_differs_and_a_wrong_key_is_ignored(proxy: ProxyProcess) -> None:
    conn = await asyncpg.connect(
        host="127.0.0.1", port=proxy.port, user="alice", database="app", password=proxy.token(), ssl=False
    )
    try:
        minted_pid = conn.get_server_pid()
        assert minted_pid != await conn.fetchval("SELECT pg_backend_pid()")
        query = asyncio.ensure_future(conn.fetchval("SELECT pg_sleep(1.5) IS NOT NULL"))
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(messages.cancel_request(minted_pid, conn._protocol.backend_secret ^ 1))
        await writer.drain()
        assert await reader.read() == b""
        writer.close()
        assert await query is True
    finally:
        await conn.close()


async def test_hundred_concurrent_clients_never_mix(proxy: ProxyProcess) -> None:
    tenants = [ACME, GLOBEX]

    async def client(index: int) -> list[str]:
        tenant = tenants[index % 2]
        conn = await asyncpg.connect(
            host="127.0.0.1", port=proxy.port, user=f"user{index}", database="app", password=proxy.token(tenant), ssl=False
        )
        seen: list[str] = []
        try:
            for _ in range(5):
                rows = await conn.fetch("SELECT tenant_id::text AS t FROM leads")
                seen += [row["t"] for row in rows]
                assert len(rows) == ROWS[tenant]
                await asyncio.sleep(random.random() / 100)
        finally:
            await conn.close()
        return [t for t in seen if t != tenant]

    leaks = await asyncio.gather(*(client(i) for i in range(100)))
    assert all(not leak for leak in leaks)


async def test_upstream_down_gives_a_clean_error(make_proxy: Any) -> None:
    broken = make_proxy({"upstream": {"port": free_port(), "connect_timeout_seconds": 2}})
    for _ in range(2):
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(
                host="127.0.0.1", port=broken.port, user="alice", database="app", password=broken.token(), ssl=False
            )
        assert info.value.sqlstate == "08006"
        assert "could not connect to upstream server" in str(info.value)
    assert broken.alive()


async def test_upstream_refusal_is_relayed(make_proxy: Any) -> None:
    wrong = make_proxy({"upstream": {"password": "not-the-password"}})
    with pytest.raises(asyncpg.InvalidPasswordError, match="upstream server: password authentication failed"):
        await asyncpg.connect(
            host="127.0.0.1", port=wrong.port, user="alice", database="app", password=wrong.token(), ssl=False
        )


def test_terminated_backend_ends_the_session_cleanly(proxy: ProxyProcess, pg: EmbeddedPostgres) -> None:
    with psycopg.connect(proxy.dsn(), password=proxy.token(), autocommit=True) as conn:
        server_pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        pg.psql(f"SELECT pg_terminate_backend({server_pid})")
        with pytest.raises(psycopg.OperationalError, match="terminating connection|upstream server closed"):
            conn.execute("SELECT 1")
    with psycopg.connect(proxy.dsn(), password=proxy.token(GLOBEX)) as conn:
        assert conn.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[GLOBEX]


def test_client_disconnect_mid_transaction_closes_the_server_connection(
    proxy: ProxyProcess, pg: EmbeddedPostgres
) -> None:
    conn = psycopg.connect(proxy.dsn(), password=proxy.token())
    server_pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    conn.execute("UPDATE leads SET name = name")
    assert pg.psql(f"SELECT state FROM pg_stat_activity WHERE pid = {server_pid}").strip() == "idle in transaction"
    conn.pgconn.finish()  # drop the socket without ROLLBACK or Terminate
    wait_until(lambda: pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {server_pid}").strip() == "0")


def test_logs_name_sessions_but_hold_no_secret(proxy: ProxyProcess) -> None:
    token = proxy.token(sub="log-check")
    assert proxy.psql(token, "SELECT 1").returncode == 0
    bad = proxy.token(exp=int(time.time()) - 100)
    assert proxy.psql(bad, "SELECT 1").returncode != 0
    log = wait_until(lambda: re.search(r"session end client=.* sub=log-check .*duration=", proxy.log()) and proxy.log())
    assert "session start client=127.0.0.1:" in log and "sub=log-check" in log
    assert 'reason="token expired"' in log
    for secret in (token, bad, token.split(".")[2], proxy.db.jwt_secret, proxy.db.signing_key, proxy.db.app_password):
        assert secret not in log


def test_workers_share_the_port_and_route_cancels(make_proxy: Any, pg: EmbeddedPostgres) -> None:
    """With workers = 2 every session works, and a cancel reaches its query whichever worker gets it."""
    pair = make_proxy({"": {"workers": 2}})
    wait_until(lambda: pair.log().count("listening on") == 2)
    connections = [psycopg.connect(pair.dsn(), password=pair.token()) for _ in range(6)]
    try:
        for index, conn in enumerate(connections):
            watcher = cancel_when_running(pg, conn.cancel, f"worker_cancel_{index}")
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute(f"SELECT pg_sleep(20) /* worker_cancel_{index} */")
            watcher.join()
            conn.rollback()
            assert conn.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[ACME]
    finally:
        for conn in connections:
            conn.close()
    assert "worker 0/2" in pair.log() and "worker 1/2" in pair.log()


async def test_client_database_selects_the_upstream_database(make_proxy: Any) -> None:
    """With [upstream] databases (and no fixed database), the client's database is the upstream one; a
    listed one that does not exist is the server's own error."""
    open_proxy = make_proxy({"upstream": {"database": None, "databases": ["app", "nowhere"]}})
    # write_config leaves out None values, so [upstream] database is unset
    assert "\ndatabase =" not in open_proxy.config.read_text().split("[upstream]")[1].split("[")[0]
    conn = await asyncpg.connect(host="127.0.0.1", port=open_proxy.port, user="alice", database="app",
                                 password=open_proxy.token(), ssl=False)
    assert await conn.fetchval("SELECT current_database()") == "app"
    await conn.close()
    with pytest.raises(asyncpg.InvalidCatalogNameError, match='upstream server: database "nowhere" does not exist'):
        await asyncpg.connect(host="127.0.0.1", port=open_proxy.port, user="alice", database="nowhere",
                              password=open_proxy.token(), ssl=False)
