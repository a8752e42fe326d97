"""Pool limits, backpressure across the proxy, and keys fetched from a JWKS URL."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from support import ACME, ROWS, ProxyProcess, wait_until
from proxy.embedded import EmbeddedPostgres
from proxy.protocol import messages
from test_protocol import RawClient, login


async def connect(proxy: ProxyProcess, token: str, application_name: str = "limits") -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1", port=proxy.port, user="alice", database="app", password=token, ssl=False, timeout=20,
        server_settings={"application_name": application_name},
    )


def test_full_pool_refuses_with_53300_after_the_checkout_timeout(make_proxy: Any) -> None:
    """Login needs no server connection once the pool knows the server's parameters; the first query
    waits for one, and after checkout_timeout the client gets 53300 naming the pool."""
    small = make_proxy({"pool": {"size": 1, "checkout_timeout": 0.5}})
    holder, waiting = RawClient(small.port), RawClient(small.port)
    try:
        login(holder, small.token())  # the pool's first client: it gets the only server connection
        login(waiting, small.token())
        start = time.monotonic()
        waiting.send(messages.query("SELECT 1"))
        fields = waiting.error()
        assert (fields["S"], fields["C"]) == ("FATAL", "53300")
        assert 'pool for database "app" is full' in fields["M"]
        assert time.monotonic() - start >= 0.4
    finally:
        holder.close()
        waiting.close()
    # The slot comes back once the holder leaves.
    with psycopg.connect(small.dsn(), password=small.token()) as again:
        assert again.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[ACME]


async def test_idle_clients_hold_no_server_connection(make_proxy: Any, pg: EmbeddedPostgres) -> None:
    """Fifty logged-in clients that send nothing hold no backend; each gets one at its first query."""
    lazy = make_proxy({"pool": {"size": 5}})

    def backends() -> int:
        return int(pg.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'lazy-check'").strip())

    first = await connect(lazy, lazy.token(), "lazy-check")  # the pool's first client opens a connection
    await first.close()
    clients = [await connect(lazy, lazy.token(), "lazy-check") for _ in range(50)]
    try:
        assert backends() == 1  # the first client's, reset and idle in the pool
        assert await clients[0].fetchval("SELECT count(*) FROM leads") == ROWS[ACME]
        assert await clients[1].fetchval("SELECT tenant_proxy.current_tenant()") == ACME
        assert backends() == 2
    finally:
        for client in clients:
            await client.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_backpressure_reaches_the_server(proxy: ProxyProcess, pg: EmbeddedPostgres) -> None:
    """A client that stops reading makes the server wait on ClientWrite; the proxy does not buffer it all."""
    assert proxy.process is not None
    client = RawClient(proxy.port)
    try:
        login(client, proxy.token())
        client.send(messages.query("SELECT pg_backend_pid()"))
        pid = int([body for t, body in client.read_until(b"Z") if t == b"D"][0][6:])
        before = rss_kib(proxy.process.pid)
        client.send(messages.query("SELECT repeat('x', 1000000) FROM generate_series(1, 2000)"))  # about 2 GB
        wait_until(
            lambda: pg.psql(f"SELECT wait_event FROM pg_stat_activity WHERE pid = {pid}").strip() == "ClientWrite",
            deadline=30,
        )
        assert rss_kib(proxy.process.pid) - before < 64 * 1024
    finally:
        client.close()
    wait_until(lambda: pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}").strip() == "0", deadline=30)


class _JwksHandler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def jwks_server() -> Iterator[tuple[str, Any]]:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", alg="ES256", use="sig")
    handler = type("Handler", (_JwksHandler,), {"body": json.dumps({"keys": [jwk]}).encode()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", key
    server.shutdown()


async def test_es256_token_with_keys_from_a_jwks_url(make_proxy: Any, jwks_server: tuple[str, Any]) -> None:
    url, key = jwks_server
    proxy = make_proxy({"jwt": {"algorithms": ["ES256"], "jwks_url": url, "secret": None}})
    claims = {"tenant_id": ACME, "exp": int(time.time()) + 60}
    conn = await connect(proxy, jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k1"}))
    assert await conn.fetchval("SELECT tenant_proxy.current_tenant()") == ACME
    await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError, match="^token key id is not in the key set$"):
        await connect(proxy, jwt.encode(claims, key, algorithm="ES256", headers={"kid": "unknown"}))


def test_idle_server_connections_are_closed_after_the_idle_timeout(make_proxy: Any, pg: EmbeddedPostgres) -> None:
    """A reset connection waits in the pool, then goes once it was idle for server_idle_timeout."""
    brief = make_proxy({"pool": {"server_idle_timeout": 1.0}})
    with psycopg.connect(brief.dsn(application_name="idle-timeout"), password=brief.token()) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    wait_until(lambda: pg.psql(f"SELECT state FROM pg_stat_activity WHERE pid = {pid}").strip() == "idle")
    wait_until(lambda: pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}").strip() == "0",
               deadline=10)


def test_server_connections_past_their_lifetime_are_not_reused(make_proxy: Any, pg: EmbeddedPostgres) -> None:
    """A connection older than server_lifetime when its client leaves is closed, not reset and reused.
    A lifetime of a microsecond makes every connection too old by the time it comes back, with no sleep
    to age it (the boundary itself is tested on a fake clock in tests/unit/test_pool_clock.py)."""
    short = make_proxy({"pool": {"server_lifetime": 0.000001}})
    with psycopg.connect(short.dsn(), password=short.token()) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    wait_until(lambda: pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}").strip() == "0", deadline=10)
    with psycopg.connect(short.dsn(), password=short.token()) as conn:
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] != pid


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_client_that_sends_and_never_reads_is_bounded(make_proxy: Any, mode: str) -> None:
    """A client pipelines queries without reading a byte of the answers: the proxy stops reading it (in
    transaction mode it holds the messages that wait for the server's status, up to a bound) instead of
    buffering without limit; its memory stays within a bound while the client's writes block."""
    proxy = make_proxy({"pool": {"mode": mode, "size": 2}})
    assert proxy.process is not None
    client = RawClient(proxy.port)
    try:
        login(client, proxy.token())
        before = rss_kib(proxy.process.pid)
        query = messages.query("SELECT repeat('x', 1000) FROM generate_series(1, 100)")
        batch = query * 1000  # about 60 kB sent, about 10 MB of answers owed, per batch
        client.sock.settimeout(0.5)
        sent = 0
        try:
            while sent < 2_000_000_000:
                client.sock.sendall(batch)  # blocks once the proxy stops reading and the kernel buffers fill
                sent += len(batch)
        except (TimeoutError, BlockingIOError):
            pass
        assert sent < 500 * len(batch)  # the proxy stopped reading long before 30 MB of queries
        assert rss_kib(proxy.process.pid) - before < 64 * 1024
        assert proxy.alive()
    finally:
        client.close()
