"""TLS on both sides, and every upstream authentication method (trust aside: SCRAM, md5, cleartext)."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
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
from test_protocol import RawClient, startup


@pytest.fixture(scope="module")
def certs() -> Iterator[tuple[Path, Path, Path]]:
    directory = Path(tempfile.mkdtemp(prefix="pgtp-certs-"))  # readable by the postgres user, unlike tmp_path
    directory.chmod(0o755)
    paths = make_certificates(directory)
    if os.geteuid() == 0:
        for path in paths:
            shutil.chown(path, "postgres", "postgres")
    yield paths
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_pg(certs: tuple[Path, Path, Path]) -> Iterator[tuple[EmbeddedPostgres, TenantDatabase]]:
    _, cert, key = certs
    cluster = EmbeddedPostgres(
        settings={"ssl": "on", "ssl_cert_file": str(cert), "ssl_key_file": str(key)},
        hba=[
            "hostssl all md5_app 127.0.0.1/32 md5",
            "hostssl all plain_app 127.0.0.1/32 password",
        ],
    ).start()
    db = prepare_database(cluster)
    cluster.psql(
        "SET password_encryption = 'md5'; CREATE ROLE md5_app LOGIN PASSWORD 'md5-secret' IN ROLE tenant_app;"
        "RESET password_encryption; CREATE ROLE plain_app LOGIN PASSWORD 'plain-secret' IN ROLE tenant_app;"
    )
    yield cluster, db
    cluster.stop()


@pytest.fixture
def upstream_proxy(tls_pg: tuple[EmbeddedPostgres, TenantDatabase], tmp_path: Path) -> Iterator[Any]:
    started: list[ProxyProcess] = []

    def factory(**upstream: Any) -> ProxyProcess:
        cluster, db = tls_pg
        process = ProxyProcess(cluster, db, tmp_path, {"upstream": {"host": "localhost", **upstream}})
        started.append(process)
        return process.start()

    yield factory
    for process in started:
        process.stop()


def server_ssl(proxy: ProxyProcess, **connect: Any) -> bool:
    with psycopg.connect(proxy.dsn(), password=proxy.token(), **connect) as conn:
        assert conn.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[ACME]
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        # pg_stat_ssl is revoked from the hardened upstream role: read it as the administrator
        return proxy.pg.psql(f"SELECT ssl FROM pg_stat_ssl WHERE pid = {pid}").strip() == "t"


def test_upstream_verify_full(upstream_proxy: Any, certs: tuple[Path, Path, Path]) -> None:
    assert server_ssl(upstream_proxy(sslmode="verify-full", ca_file=str(certs[0]))) is True


@pytest.mark.parametrize("sslmode", ["prefer", "require"])
def test_upstream_prefer_and_require(upstream_proxy: Any, sslmode: str) -> None:
    assert server_ssl(upstream_proxy(sslmode=sslmode)) is True


@pytest.mark.parametrize("user, password", [("md5_app", "md5-secret"), ("plain_app", "plain-secret")])
def test_upstream_md5_and_cleartext(upstream_proxy: Any, user: str, password: str) -> None:
    assert server_ssl(upstream_proxy(sslmode="require", user=user, password=password)) is True


async def test_upstream_with_an_unknown_ca_is_refused(upstream_proxy: Any, tmp_path: Path) -> None:
    other_ca, _, _ = make_certificates(tmp_path / "other", ca_name="someone else")
    proxy = upstream_proxy(sslmode="verify-full", ca_file=str(other_ca))
    with pytest.raises(asyncpg.PostgresError, match="TLS handshake with upstream failed") as info:
        await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="a", database="app", password=proxy.token(),
                              ssl=False)
    assert info.value.sqlstate == "08006"


async def test_require_against_a_server_without_ssl(make_proxy: Any) -> None:
    proxy = make_proxy({"upstream": {"sslmode": "require"}})
    with pytest.raises(asyncpg.PostgresError, match="does not support SSL") as info:
        await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="a", database="app", password=proxy.token(),
                              ssl=False)
    assert info.value.sqlstate == "08006"


def test_client_tls_with_psql_verify_full(make_proxy: Any, certs: tuple[Path, Path, Path]) -> None:
    ca, cert, key = certs
    proxy = make_proxy({"tls": {"cert_file": str(cert), "key_file": str(key)}})
    env = {**os.environ, "PGPASSWORD": proxy.token()}
    result = subprocess.run(
        ["psql", "-X", "-A", "-t",
         f"host=localhost port={proxy.port} user=alice dbname=app sslmode=verify-full sslrootcert={ca}",
         "-c", "SELECT count(*) FROM leads", "-c", "\\conninfo"],
        capture_output=True, text=True, env=env, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == str(ROWS[ACME])
    assert "SSL connection (protocol: TLSv1." in result.stdout


def test_client_tls_refuses_bytes_sent_before_the_handshake(make_proxy: Any, certs: tuple[Path, Path, Path]) -> None:
    _, cert, key = certs
    proxy = make_proxy({"tls": {"cert_file": str(cert), "key_file": str(key)}})
    client = RawClient(proxy.port)
    try:
        client.send(messages.ssl_request() + startup())
        fields = client.error()
        assert fields["C"] == "08P01"
        assert client.closed()
    finally:
        client.close()


def test_client_tls_refuses_an_ssl_request_repeated_inside_tls(make_proxy: Any, certs: tuple[Path, Path, Path]) -> None:
    _, cert, key = certs
    proxy = make_proxy({"tls": {"cert_file": str(cert), "key_file": str(key)}})
    client = RawClient(proxy.port)
    try:
        client.send(messages.ssl_request())
        assert client.read_byte() == b"S"
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        client.sock = context.wrap_socket(client.sock)
        client.send(messages.ssl_request())
        fields = client.error()
        assert (fields["C"], fields["M"]) == ("08P01", "SSLRequest repeated after TLS was established")
    finally:
        client.close()
