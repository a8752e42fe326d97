"""Shared test helpers: the two tenants, waiting on a condition, a table without Row-Level Security,
and a real proxy process."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from proxy.demo import LEADS, TENANTS, TenantDatabase, wait_for_port, write_config
from proxy.embedded import EmbeddedPostgres, free_port
from proxy.protocol import messages
from proxy.protocol.framing import MessageReader
from proxy.tokens import mint

ACME = str(TENANTS["acme"])
GLOBEX = str(TENANTS["globex"])
ROWS = {ACME: len(LEADS["acme"]), GLOBEX: len(LEADS["globex"])}
REPO = Path(__file__).resolve().parents[1]


@contextmanager
def unprotected_table(pg: EmbeddedPostgres, db: TenantDatabase, name: str, columns: str,
                      grants: str = "SELECT, INSERT") -> Iterator[str]:
    """A table `name` (`columns`, SQL) without Row-Level Security that the application role may use as
    `grants` says (COPY targets, scratch data), dropped afterwards."""
    pg.psql(f"CREATE TABLE {name} ({columns});\nGRANT {grants} ON {name} TO {db.app_role};\n", database=db.database)
    try:
        yield name
    finally:
        pg.psql(f"DROP TABLE {name}", database=db.database)


def wait_until(condition: Any, deadline: float = 10.0, interval: float = 0.02) -> Any:
    """Poll `condition` until it returns something truthy; fail the test at the deadline."""
    end = time.monotonic() + deadline
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {deadline} s")
        time.sleep(interval)


def get(port: int, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:port/path (the proxy's [http] endpoint): (status, body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def cancel_when_running(pg: EmbeddedPostgres, cancel: Any, marker: str) -> threading.Thread:
    """Call `cancel()` from a thread once a query containing `marker` is running on the server."""

    def running() -> bool:
        # Not this probe's query, nor an earlier probe's backend still finishing (its text holds the marker too).
        sql = (f"SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%{marker}%'"
               " AND query NOT LIKE '%pg_stat_activity%' AND pid <> pg_backend_pid()")
        return pg.psql(sql).strip() not in ("", "0")

    def watch() -> None:
        wait_until(running, deadline=20.0)
        cancel()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


class ProxyProcess:
    """A `pg-tenant-proxy run` process with its own configuration and log file."""

    def __init__(self, pg: EmbeddedPostgres, db: TenantDatabase, workdir: Path, overrides: dict[str, dict[str, Any]]):
        self.pg = pg
        self.db = db
        self.port = free_port()
        self.workdir = workdir
        self.config = write_config(workdir / f"proxy-{self.port}.toml", pg, db, self.port, overrides)
        self.logfile = workdir / f"proxy-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ProxyProcess:
        with open(self.logfile, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "--config", str(self.config)], stderr=log, cwd=REPO
            )
        wait_for_port(self.port, self.process)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.logfile.read_text()

    def token(self, tenant: str = ACME, ttl: int = 3600, secret: str | None = None, **claims: Any) -> str:
        body: dict[str, Any] = {"tenant_id": tenant, "sub": "tester", "exp": int(time.time()) + ttl}
        body.update(claims)
        return mint(secret or self.db.jwt_secret, {k: v for k, v in body.items() if v is not None})

    def dsn(self, user: str = "alice", database: str = "app", **params: str) -> str:
        extra = "".join(f" {k}={v}" for k, v in params.items())
        return f"host=127.0.0.1 port={self.port} user={user} dbname={database} sslmode=disable{extra}"

    def psql(self, token: str, sql: str, database: str = "app", **env: str) -> subprocess.CompletedProcess[str]:
        environment = {**os.environ, "PGPASSWORD": token, "PGCONNECT_TIMEOUT": "10", **env}
        return subprocess.run(
            ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", self.dsn(database=database), "-c", sql],
            capture_output=True,
            text=True,
            env=environment,
            timeout=60,
            check=False,
        )


class RawClient:
    """A blocking socket speaking raw protocol bytes to the proxy."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.reader = MessageReader(1 << 24)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_byte(self) -> bytes:
        return self.sock.recv(1)

    def read_message(self) -> tuple[bytes, bytes]:
        while True:
            for item in self.reader:
                return item
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the proxy")
            self.reader.feed(data)

    def read_until(self, wanted: bytes) -> list[tuple[bytes, bytes]]:
        seen = []
        while True:
            item = self.read_message()
            seen.append(item)
            if item[0] in (wanted, b"E"):
                return seen

    def error(self) -> dict[str, str]:
        """The ErrorResponse that must come next (skipping authentication requests)."""
        while True:
            type_byte, body = self.read_message()
            if type_byte == b"E":
                return messages.parse_error_fields(body)
            assert type_byte in (b"R", b"v"), type_byte

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def startup(user: str = "alice", **params: str) -> bytes:
    return messages.startup_message({"user": user, "database": "app", **params})


def login(client: RawClient, token: str) -> None:
    client.send(startup())
    assert client.read_message() == (b"R", struct.pack("!i", messages.AUTH_CLEARTEXT_PASSWORD))
    client.send(messages.password_message(token))
    items = client.read_until(b"Z")
    assert items[-1] == (b"Z", b"I"), items


def pool_mode_fixtures(modes: dict[str, dict[str, Any]]) -> tuple[Any, Any]:
    """For a test module that runs each test in every pool mode: the `mode` fixture (one run per key of
    `modes`) and the `pooled` fixture (a proxy started with that key's settings, per test)."""

    @pytest.fixture(params=list(modes))
    def mode(request: pytest.FixtureRequest) -> str:
        return str(request.param)

    @pytest.fixture
    def pooled(mode: str, make_proxy: Any) -> ProxyProcess:
        proxy: ProxyProcess = make_proxy(modes[mode])
        return proxy

    return mode, pooled
