"""Upstream authentication through a real proxy: SCRAM with a non-ASCII password against Postgres,
SCRAM-SHA-256-PLUS channel binding over TLS, require_auth, and a fake server that skips SCRAM's final
message."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from certificates import make_certificates
from support import ACME, ROWS, ProxyProcess
from proxy.demo import TenantDatabase, prepare_database
from proxy.embedded import EmbeddedPostgres
from proxy.protocol import messages

PASSWORD = "pässwörd-Ⅸ\u00ad"  # not ASCII, and changed by SASLprep (NFKC, soft hyphen dropped)


@pytest.fixture(scope="module")
def scram_pg() -> Iterator[tuple[EmbeddedPostgres, TenantDatabase]]:
    """A Postgres with TLS whose roles log in with SCRAM-SHA-256 only (so -PLUS is offered over TLS)."""
    directory = Path(tempfile.mkdtemp(prefix="pgtp-certs-"))
    directory.chmod(0o755)
    _, cert, key = make_certificates(directory)
    if os.geteuid() == 0:
        for path in (cert, key):
            shutil.chown(path, "postgres", "postgres")
    cluster = EmbeddedPostgres(
        settings={"ssl": "on", "ssl_cert_file": str(cert), "ssl_key_file": str(key)},
        hba=["host all scram_app 127.0.0.1/32 scram-sha-256"],
    ).start()
    db = prepare_database(cluster)
    literal = PASSWORD.replace("'", "''")
    cluster.psql(f"CREATE ROLE scram_app LOGIN PASSWORD '{literal}' IN ROLE tenant_app")
    yield cluster, db
    cluster.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def scram_proxy(scram_pg: tuple[EmbeddedPostgres, TenantDatabase], tmp_path: Path) -> Iterator[Any]:
    started: list[ProxyProcess] = []

    def factory(**upstream: Any) -> ProxyProcess:
        cluster, db = scram_pg
        settings = {"user": "scram_app", "password": PASSWORD, **upstream}
        process = ProxyProcess(cluster, db, tmp_path, {"upstream": settings})
        started.append(process)
        return process.start()

    yield factory
    for process in started:
        process.stop()


def leads(proxy: ProxyProcess) -> int:
    with psycopg.connect(proxy.dsn(), password=proxy.token()) as conn:
        return int(conn.execute("SELECT count(*) FROM leads").fetchone()[0])


def test_scram_with_a_non_ascii_password(scram_proxy: Any) -> None:
    assert leads(scram_proxy(sslmode="disable", require_auth="scram-sha-256")) == ROWS[ACME]


def test_scram_plus_with_channel_binding_over_tls(scram_proxy: Any) -> None:
    """channel_binding=require succeeds only through SCRAM-SHA-256-PLUS bound to the server's certificate."""
    assert leads(scram_proxy(sslmode="require", channel_binding="require")) == ROWS[ACME]


async def test_channel_binding_required_without_tls_is_refused(make_proxy: Any) -> None:
    """The session-wide Postgres has no TLS: sslmode=prefer falls back to plain, where SCRAM cannot bind."""
    proxy = make_proxy({"upstream": {"sslmode": "prefer", "channel_binding": "require"}})
    error = await connect_and_expect(proxy, "28000")
    assert "channel_binding is 'require', but the server authenticated without channel binding" in error


async def test_require_auth_refuses_a_weaker_method(scram_proxy: Any) -> None:
    proxy = scram_proxy(sslmode="disable", require_auth="password,md5")
    error = await connect_and_expect(proxy, "28000")
    assert "requested SASL (SCRAM-SHA-256), but upstream.require_auth is 'password,md5'" in error


async def connect_and_expect(proxy: ProxyProcess, sqlstate: str | None) -> str:
    try:
        conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="a", database="app",
                                     password=proxy.token(), ssl=False, timeout=10)
    except asyncpg.PostgresError as exc:
        assert exc.sqlstate == sqlstate, str(exc)
        return str(exc)
    try:
        assert sqlstate is None
        assert await conn.fetchval("SELECT count(*) FROM leads") == ROWS[ACME]
    finally:
        await conn.close()
    return ""


class SkippingServer:
    """A fake upstream that runs SCRAM up to the client-final, then says AuthenticationOk at once."""

    def __init__(self) -> None:
        self.client_final: bytes | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            length = struct.unpack("!i", await reader.readexactly(4))[0]
            await reader.readexactly(length - 4)  # StartupMessage
            writer.write(messages.message(b"R", struct.pack("!i", messages.AUTH_SASL) + b"SCRAM-SHA-256\0\0"))
            initial = await self._read_password_message(reader)
            client_nonce = initial.split(b"r=", 1)[1].split(b",")[0]
            server_first = b"r=" + client_nonce + b"server,s=" + base64.b64encode(b"salt" * 4) + b",i=4096"
            writer.write(messages.message(b"R", struct.pack("!i", messages.AUTH_SASL_CONTINUE) + server_first))
            self.client_final = await self._read_password_message(reader)
            writer.write(messages.message(b"R", struct.pack("!i", messages.AUTH_OK)))
            writer.write(messages.message(b"Z", b"I"))
            await writer.drain()
            await reader.read()  # until the proxy closes
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _read_password_message(reader: asyncio.StreamReader) -> bytes:
        header = await reader.readexactly(5)
        assert header[:1] == b"p"
        return await reader.readexactly(struct.unpack("!i", header[1:])[0] - 4)


async def test_a_server_that_skips_the_final_scram_message_is_refused(make_proxy: Any) -> None:
    fake = SkippingServer()
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = make_proxy({"upstream": {"port": port, "sslmode": "disable", "password": "secret"}})
        loop = asyncio.get_running_loop()
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="a", database="app",
                                  password=proxy.token(), ssl=False, timeout=10)
        assert info.value.sqlstate == "28000"
        assert "before completing SCRAM" in str(info.value)
        assert fake.client_final is not None and b",p=" in fake.client_final  # it got that far, no further
        assert await loop.run_in_executor(None, proxy.alive)
    finally:
        server.close()
        await server.wait_closed()
