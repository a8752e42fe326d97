"""The upstream Postgres going away and coming back under client load, in both pool modes: a fast
restart, a crash (`pg_ctl restart -m immediate`) and a stop of a few seconds, on the same port.

Against a cluster of the module's own (the session-wide one is shared by other tests). What must hold,
as a PgBouncer user expects it:
- the proxy lives on and logs no traceback;
- while Postgres is down, clients get a Postgres error with a class 57 or 08 SQLSTATE, within the
  configured timeouts (never a hang);
- once it is back, a new client works at once, and in transaction mode a client that was idle between
  transactions during the outage runs its next transaction (it held no server connection, and must not
  be handed a dead pooled one);
- SHOW POOLS and SHOW SERVERS come back to consistent values (nothing active, logging in or waiting
  is left; every server connection listed is a live backend), and file descriptors do not grow from
  one outage to the next.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.demo import TenantDatabase, prepare_database
from proxy.embedded import EmbeddedPostgres
from support import ACME, GLOBEX, ROWS, ProxyProcess, wait_until

CONNECT_TIMEOUT = 3  # [upstream] connect_timeout_seconds
CHECKOUT_TIMEOUT = 4  # [pool] checkout_timeout
# Any single client operation during an outage ends within the proxy's timeouts (plus scheduling slack).
LONGEST_OPERATION = CONNECT_TIMEOUT + CHECKOUT_TIMEOUT + 3
OUTAGE_SQLSTATES = {"57P01", "57P02", "57P03", "08006", "08001", "08003", "08000"}

MODES = {
    "session": {"mode": "session", "size": 8},
    "transaction": {"mode": "transaction", "size": 8, "min_size": 2},
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedPostgres]:
    own = EmbeddedPostgres().start()
    yield own
    own.stop()


@pytest.fixture(scope="module")
def database(cluster: EmbeddedPostgres) -> TenantDatabase:
    return prepare_database(cluster)


@pytest.fixture(params=list(MODES))
def proxy(request: pytest.FixtureRequest, cluster: EmbeddedPostgres, database: TenantDatabase,
          tmp_path: Path) -> Iterator[ProxyProcess]:
    process = ProxyProcess(cluster, database, tmp_path, {
        "pool": {**MODES[request.param], "checkout_timeout": CHECKOUT_TIMEOUT},
        "upstream": {"connect_timeout_seconds": CONNECT_TIMEOUT},
        "admin.required_claims": {"role": "proxy-admin"},
    }).start()
    yield process
    process.stop()


def console(proxy: ProxyProcess, sql: str) -> list[dict[str, str]]:
    environment = {**os.environ, "PGPASSWORD": proxy.token(role="proxy-admin", sub="ops")}
    result = subprocess.run(
        ["psql", "-X", "--csv", "-v", "ON_ERROR_STOP=1", "-w",
         f"host=127.0.0.1 port={proxy.port} user=ops dbname=pgtenantproxy sslmode=disable", "-c", sql],
        capture_output=True, text=True, env=environment, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return list(csv.DictReader(io.StringIO(result.stdout)))


def connect(proxy: ProxyProcess, tenant: str) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(connect_timeout="10"), password=proxy.token(tenant), autocommit=True)


def count_leads(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM leads").fetchone()
    assert row is not None
    return int(row[0])


class Load:
    """Clients of both tenants running short transactions in a loop, reconnecting after an error; every
    error is kept with its SQLSTATE and how long the operation took."""

    def __init__(self, proxy: ProxyProcess, clients: int = 4) -> None:
        self.proxy = proxy
        self.stop = threading.Event()
        self.errors: list[tuple[str | None, str, float]] = []
        self.successes = 0
        self.slowest = 0.0
        self.bugs: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(ACME if n % 2 else GLOBEX,), daemon=True)
                        for n in range(clients)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(LONGEST_OPERATION + 10)
        assert not any(thread.is_alive() for thread in self.threads), "a load client hangs"

    def _run(self, tenant: str) -> None:
        conn: psycopg.Connection[Any] | None = None
        try:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    if conn is None:
                        conn = connect(self.proxy, tenant)
                    with conn.transaction():
                        assert count_leads(conn) == ROWS[tenant]
                    self.successes += 1
                except psycopg.OperationalError as exc:
                    self.errors.append((exc.sqlstate, str(exc).strip(), time.monotonic() - started))
                    if conn is not None:
                        conn.close()
                    conn = None
                    self.stop.wait(0.05)  # pacing, not synchronisation
                self.slowest = max(self.slowest, time.monotonic() - started)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.bugs.append(exc)
        finally:
            if conn is not None:
                conn.close()


def lost_connection(error: tuple[str | None, str, float]) -> bool:
    """libpq's own report of a connection closed under it (no SQLSTATE): what a client whose next message
    crossed the server's FATAL gets, through the proxy as directly (the close of a socket with unread
    input resets it, and the FATAL in flight is lost)."""
    return error[0] is None and "server closed the connection unexpectedly" in error[1]


def open_fds(proxy: ProxyProcess) -> int:
    assert proxy.process is not None
    return len(os.listdir(f"/proc/{proxy.process.pid}/fd"))


def pools_settled(proxy: ProxyProcess, cluster: EmbeddedPostgres, database: TenantDatabase) -> bool:
    """No client left, nothing active, logging in or waiting, and every listed server connection is a live
    backend of the application role (no dead one kept idle)."""
    pools = [row for row in console(proxy, "SHOW POOLS") if row["database"] == database.database]
    assert len(pools) == 1, pools
    row = pools[0]
    if any(row[key] != "0" for key in ("cl_active", "cl_waiting", "sv_active", "sv_login")):
        return False
    servers = console(proxy, "SHOW SERVERS")
    if len(servers) != int(row["sv_idle"]) or any(server["state"] != "idle" for server in servers):
        return False
    live = set(cluster.psql(f"SELECT pid FROM pg_stat_activity WHERE usename = '{database.app_role}'").split())
    return {server["remote_pid"] for server in servers} <= live


OUTAGES: list[tuple[str, Callable[[EmbeddedPostgres], None]]] = [
    ("restart -m fast", lambda pg: pg.restart("fast")),
    ("restart -m immediate", lambda pg: pg.restart("immediate")),
    ("stopped for 5 s", lambda pg: None),  # handled in the test: down while clients try
]


def test_postgres_restarts_under_load(proxy: ProxyProcess, cluster: EmbeddedPostgres, database: TenantDatabase,
                                      request: pytest.FixtureRequest) -> None:
    transaction_mode = "transaction" in request.node.name
    fds: list[int] = []
    for name, outage in OUTAGES:
        idle = connect(proxy, ACME)  # between transactions across the outage
        assert count_leads(idle) == ROWS[ACME]
        with Load(proxy) as load:
            wait_until(lambda: load.successes >= 20)
            if name == "stopped for 5 s":
                cluster.halt("fast")
                try:
                    # Down: new clients are refused quickly with a connection-class error.
                    for _ in range(3):
                        started = time.monotonic()
                        with pytest.raises(psycopg.OperationalError) as refused:
                            with connect(proxy, GLOBEX) as conn:
                                count_leads(conn)
                        assert refused.value.sqlstate in OUTAGE_SQLSTATES, (name, refused.value.sqlstate, refused.value)
                        assert time.monotonic() - started < LONGEST_OPERATION, name
                    time.sleep(5)  # the outage's length, not synchronisation
                finally:
                    cluster.resume()
            else:
                outage(cluster)
            # Back: a new client works at once.
            with connect(proxy, GLOBEX) as fresh:
                assert count_leads(fresh) == ROWS[GLOBEX], name
            before = load.successes
            wait_until(lambda: load.successes >= before + 20, deadline=LONGEST_OPERATION)
        assert not load.bugs, (name, load.bugs)
        assert load.slowest < LONGEST_OPERATION, (name, load.slowest, load.errors)
        unexpected = [error for error in load.errors if error[0] not in OUTAGE_SQLSTATES and not lost_connection(error)]
        assert not unexpected, (name, unexpected)
        if transaction_mode:
            # It held no server connection: its next transaction runs on a live one.
            assert count_leads(idle) == ROWS[ACME], name
        else:
            # It held one, which the server ended: it learns so with the server's own error, or 08006.
            with pytest.raises(psycopg.OperationalError) as ended:
                count_leads(idle)
            assert ended.value.sqlstate in OUTAGE_SQLSTATES | {None}, (name, ended.value)
        idle.close()
        wait_until(lambda: pools_settled(proxy, cluster, database), deadline=15)
        fds.append(open_fds(proxy))
    assert proxy.alive()
    assert "Traceback" not in proxy.log(), proxy.log()[-5000:]
    assert fds[-1] <= fds[0] + 2, fds
