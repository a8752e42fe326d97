"""Clients that vanish at awkward moments, in both pool modes with a pool small enough to share (size 2):
closing the socket without Terminate, Terminate then close, half a message then close. After each the
proxy must be back to a clean state: the next clients of both tenants are served promptly with their own
rows, the server connection they get is idle with no transaction open and none of the vanished client's
settings, the admin console's counters are back to idle numbers, no statement of the vanished client
runs on after a short deadline once it was cancelled, and the proxy logged no traceback."""

from __future__ import annotations

import csv
import io
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from differential import Wire, connect_proxy, copy_data, flush, send_cancel
from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres
from proxy.protocol import messages
from support import ACME, GLOBEX, ROWS, ProxyProcess, wait_until

SIZE = 2
DEADLINE = 10.0
ADMIN = {"admin.required_claims": {"role": ["proxy-admin"]}}
TABLE = "vanish_copy"


def console(proxy: ProxyProcess, command: str) -> list[dict[str, str]]:
    environment = {**os.environ, "PGPASSWORD": proxy.token(role="proxy-admin", sub="ops")}
    result = subprocess.run(["psql", "-X", "--csv", "-w", f"host=127.0.0.1 port={proxy.port} user=ops dbname=pgtenantproxy"
                             " sslmode=disable", "-c", command], capture_output=True, text=True, env=environment,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return list(csv.DictReader(io.StringIO(result.stdout)))


def app_backends(pg: EmbeddedPostgres, db: TenantDatabase) -> list[str]:
    """`state|xact_start is null|query` of the application role's backends (the proxy's server connections)."""
    out = pg.psql(f"SELECT state || '|' || (xact_start IS NULL) || '|' || left(query, 60) FROM pg_stat_activity"
                  f" WHERE usename = '{db.app_role}' AND pid <> pg_backend_pid()")
    return [line for line in out.splitlines() if line.strip()]


def running(pg: EmbeddedPostgres, marker: str) -> int:
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%{marker}%'"
                       " AND query NOT LIKE '%pg_stat_activity%' AND state <> 'idle'").strip() or 0)


def pools_idle(proxy: ProxyProcess) -> bool:
    pools = [row for row in console(proxy, "SHOW POOLS") if row["database"] != "pgtenantproxy"]
    servers = console(proxy, "SHOW SERVERS")
    clients = [row for row in console(proxy, "SHOW CLIENTS") if row["database"] != "pgtenantproxy"]
    return (all(row["cl_active"] == "0" and row["cl_waiting"] == "0" and row["sv_active"] == "0"
                and row["sv_login"] == "0" for row in pools)
            and all(row["state"] == "idle" for row in servers) and len(servers) <= SIZE and not clients)


def query(wire: Wire, sql: str) -> list[tuple[bytes, bytes]]:
    wire.send(messages.query(sql))
    return wire.read_ready()


def rows(replies: list[tuple[bytes, bytes]]) -> list[list[str | None]]:
    out = []
    for kind, body in replies:
        if kind == b"D":
            count = int.from_bytes(body[:2], "big")
            values, at = [], 2
            for _ in range(count):
                size = int.from_bytes(body[at:at + 4], "big", signed=True)
                at += 4
                values.append(None if size < 0 else body[at:at + size].decode())
                at += max(size, 0)
            out.append(values)
        assert kind != b"E", messages.parse_error_fields(body)
    return out


CHECK = ("SELECT tenant_proxy.current_tenant(), (SELECT count(*) FROM leads), txid_current_if_assigned() IS NULL,"
         " current_setting('work_mem'), current_setting('myapp.vanish', true), current_setting('statement_timeout')")


def assert_clean(proxy: ProxyProcess, pg: EmbeddedPostgres, db: TenantDatabase, marker: str | None = None) -> None:
    """The proxy is back to idle: counters, server states, the next clients of both tenants, the log."""
    if marker is not None:
        wait_until(lambda: running(pg, marker) == 0, deadline=DEADLINE)
    wait_until(lambda: pools_idle(proxy), deadline=DEADLINE)
    wait_until(lambda: all(line.startswith("idle|true|") for line in app_backends(pg, db)), deadline=DEADLINE)
    for tenant in (ACME, GLOBEX, ACME, GLOBEX):
        wire = connect_proxy(proxy.port, proxy.token(tenant))
        try:
            (row,) = rows(query(wire, CHECK))
            assert row == [tenant, str(ROWS[tenant]), "t", "4MB", row[4], "0"], row
            assert row[4] in (None, ""), row
            assert wire.status == b"I"
        finally:
            wire.close()
    wait_until(lambda: pools_idle(proxy), deadline=DEADLINE)
    assert proxy.alive()
    log = proxy.log()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]



def vanish(wire: Wire, how: str) -> None:
    if how == "terminate":
        wire.send(messages.terminate())
    elif how == "half":
        wire.send(messages.query("SELECT 1")[:7])
    wire.sock.close()


# -- the moments ------------------------------------------------------------------------------------
# Each takes the proxy, a logged-in wire, pg and a marker, and leaves the wire at the moment; it returns
# the marker when a statement of the client's runs on the server (which a cancel must end).


def after_login(proxy: ProxyProcess, wire: Wire, pg: EmbeddedPostgres, marker: str) -> str | None:
    return None


def mid_statement_cancelled(proxy: ProxyProcess, wire: Wire, pg: EmbeddedPostgres, marker: str) -> str | None:
    wire.send(messages.query(f"SELECT pg_sleep(60) AS {marker}"))
    wait_until(lambda: running(pg, marker) == 1, deadline=DEADLINE)
    assert wire.key is not None
    send_cancel(proxy.port, wire.key, DEADLINE)
    return marker


def unread(wire: Wire, pg: EmbeddedPostgres, marker: str, sql: str) -> None:
    """`sql` (naming `marker`) sends far more than the client's small receive buffer holds, which it never
    reads: running once the server has started it."""
    wire.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    wire.send(messages.query(sql))
    wait_until(lambda: running(pg, marker) == 1, deadline=DEADLINE)


def streaming(proxy: ProxyProcess, wire: Wire, pg: EmbeddedPostgres, marker: str) -> str | None:
    unread(wire, pg, marker, f"SELECT repeat('x', 2000) AS {marker} FROM generate_series(1, 100000)")
    return None


def copy_in(proxy: ProxyProcess, wire: Wire, pg: EmbeddedPostgres, marker: str) -> str | None:
    wire.send(messages.query(f"COPY {TABLE} FROM STDIN"))
    assert wire.read_message(DEADLINE + time.monotonic())[0] == b"G"
    wire.send(copy_data(b"1\n2\n"))
    return None


def copy_out(proxy: ProxyProcess, wire: Wire, pg: EmbeddedPostgres, marker: str) -> str | None:
    unread(wire, pg, marker, f"COPY (SELECT repeat('y', 2000) AS {marker} FROM generate_series(1, 100000)) TO STDOUT")
    return None


def idle_in_block(proxy: ProxyProcess, wire: Wire, pg: EmbeddedPostgres, marker: str) -> str | None:
    assert query(wire, "BEGIN")[-1] == (b"Z", b"T")
    assert query(wire, "SET LOCAL work_mem = '7MB'; SET statement_timeout = '5s';"
                       " SELECT set_config('myapp.vanish', 'leak', false), txid_current()")[-1] == (b"Z", b"T")
    return None


def failed_block(proxy: ProxyProcess, wire: Wire, pg: EmbeddedPostgres, marker: str) -> str | None:
    assert query(wire, "BEGIN; SET work_mem = '7MB'")[-1] == (b"Z", b"T")
    assert query(wire, "SELECT 1/0")[-1] == (b"Z", b"E")
    return None


def pipeline(proxy: ProxyProcess, wire: Wire, pg: EmbeddedPostgres, marker: str) -> str | None:
    group = (messages.parse("", f"SELECT pg_sleep(0.3), '{marker}'") + messages.bind("", "", []) + messages.execute("")
             + messages.sync())
    wire.send(group + messages.query("SET work_mem = '7MB'") + group * 3)
    return None


def unnamed_pending(proxy: ProxyProcess, wire: Wire, pg: EmbeddedPostgres, marker: str) -> str | None:
    wire.send(messages.parse("", "SELECT $1::int") + flush())
    return None


def named_pending(proxy: ProxyProcess, wire: Wire, pg: EmbeddedPostgres, marker: str) -> str | None:
    wire.send(messages.parse("s1", "SELECT count(*) FROM leads WHERE $1::int > 0")
              + messages.bind("", "s1", ["1"]) + messages.execute(""))
    return None


def after_set(proxy: ProxyProcess, wire: Wire, pg: EmbeddedPostgres, marker: str) -> str | None:
    wire.send(messages.query("SET work_mem = '7MB'; SELECT set_config('myapp.vanish', 'leak', false)"))
    return None


def cancel_sent(proxy: ProxyProcess, wire: Wire, pg: EmbeddedPostgres, marker: str) -> str | None:
    wire.send(messages.query(f"SELECT pg_sleep(60) AS {marker}"))
    wait_until(lambda: running(pg, marker) == 1, deadline=DEADLINE)
    assert wire.key is not None
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
    sock.sendall(messages.cancel_request(*wire.key))
    sock.close()
    return marker


def long_statement(proxy: ProxyProcess, wire: Wire, pg: EmbeddedPostgres, marker: str) -> str | None:
    """A statement that runs for a minute unless cancelled (only where the proxy ends the session: a client
    that closes mid-statement leaves it running directly too, until Postgres next writes)."""
    wire.send(messages.query(f"SELECT pg_sleep(60) AS {marker}"))
    wait_until(lambda: running(pg, marker) == 1, deadline=DEADLINE)
    return marker


MOMENTS: dict[str, Callable[[ProxyProcess, Wire, EmbeddedPostgres, str], str | None]] = {
    f.__name__: f for f in (after_login, mid_statement_cancelled, streaming, copy_in, copy_out, idle_in_block,
                            failed_block, pipeline, unnamed_pending, named_pending, after_set, cancel_sent)
}


@pytest.fixture(scope="module")
def copy_table(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> Iterator[str]:
    pg.psql(f"CREATE TABLE IF NOT EXISTS {TABLE} (x int); GRANT SELECT, INSERT ON {TABLE} TO {tenant_db.app_role};",
            tenant_db.database)
    yield TABLE
    pg.psql(f"DROP TABLE {TABLE}", tenant_db.database)


@pytest.fixture(scope="module", params=["session", "transaction"])
def shared(request: pytest.FixtureRequest, pg: EmbeddedPostgres, tenant_db: TenantDatabase,
           tmp_path_factory: pytest.TempPathFactory, copy_table: str) -> Iterator[ProxyProcess]:
    process = ProxyProcess(pg, tenant_db, tmp_path_factory.mktemp("vanish"),
                           {"pool": {"mode": request.param, "size": SIZE, "idle_transaction_timeout": 1.0},
                            "client": {"message_timeout_seconds": 1.0}, **ADMIN}).start()
    yield process
    process.stop()


@pytest.mark.parametrize("how", ["dropped", "terminate", "half"])
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_vanishing_client_leaves_a_clean_proxy(shared: ProxyProcess, pg: EmbeddedPostgres, tenant_db: TenantDatabase,
                                               moment: str, how: str) -> None:
    marker = f"vanish_{uuid.uuid4().hex[:10]}"
    try:
        wire = connect_proxy(shared.port, shared.token(GLOBEX))
        running_marker = MOMENTS[moment](shared, wire, pg, marker)
        vanish(wire, how)
        assert_clean(shared, pg, tenant_db, running_marker)
    finally:
        pg.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%{marker}%'"
                " AND query NOT LIKE '%pg_stat_activity%'")


# -- the proxy ends the session itself ----------------------------------------------------------------

BOGUS = b"\x01" + (4).to_bytes(4, "big")  # a message type no frontend message has


def ended_by_proxy(wire: Wire) -> dict[str, str]:
    """Read to the close: the last message is a FATAL (its fields)."""
    replies, state = wire.read_to_end(DEADLINE)
    assert state == "closed", replies[-3:]
    fatal = [messages.parse_error_fields(body) for kind, body in replies if kind == b"E"]
    assert fatal and fatal[-1]["S"] == "FATAL", replies[-3:]
    return fatal[-1]


ENDINGS: dict[str, tuple[str, Callable[[Wire], None], str]] = {
    # name: (moment, what the client does then, the FATAL's SQLSTATE)
    "half_message_after_login": ("after_login", lambda w: w.send(messages.query("SELECT 1")[:6]), "08P01"),
    "half_message_in_block": ("idle_in_block", lambda w: w.send(messages.query("SELECT 1")[:6]), "08P01"),
    "half_message_in_pipeline": ("pipeline", lambda w: w.send(messages.query("SELECT 1")[:6]), "08P01"),
    "half_copy_data": ("copy_in", lambda w: w.send(copy_data(b"3\n")[:3]), "08P01"),
    "half_message_mid_statement": ("long_statement", lambda w: w.send(messages.query("SELECT 1")[:6]), "08P01"),
    "bogus_mid_statement": ("long_statement", lambda w: w.send(BOGUS), "08P01"),
    "idle_in_block": ("idle_in_block", lambda w: None, "25P03"),
    "idle_in_failed_block": ("failed_block", lambda w: None, "25P03"),
    "bogus_after_login": ("after_login", lambda w: w.send(BOGUS), "08P01"),
    "bogus_in_block": ("idle_in_block", lambda w: w.send(BOGUS), "08P01"),
    "bogus_in_pipeline": ("pipeline", lambda w: w.send(BOGUS), "08P01"),
    "bogus_in_copy_in": ("copy_in", lambda w: w.send(BOGUS), "08P01"),
    "bogus_after_set": ("after_set", lambda w: w.send(BOGUS), "08P01"),
    "bogus_named_pending": ("named_pending", lambda w: w.send(BOGUS), "08P01"),
}


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_session_the_proxy_ends_leaves_a_clean_proxy(shared: ProxyProcess, pg: EmbeddedPostgres,
                                                     tenant_db: TenantDatabase, ending: str) -> None:
    moment, then, sqlstate = ENDINGS[ending]
    marker = f"vanish_{uuid.uuid4().hex[:10]}"
    try:
        wire = connect_proxy(shared.port, shared.token(GLOBEX))
        statement = {**MOMENTS, "long_statement": long_statement}[moment](shared, wire, pg, marker)
        then(wire)
        if moment == "streaming":
            wire.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        fatal = ended_by_proxy(wire)
        assert fatal["C"] == sqlstate, fatal
        wire.sock.close()
        assert_clean(shared, pg, tenant_db, statement)
    finally:
        pg.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%{marker}%'"
                " AND query NOT LIKE '%pg_stat_activity%'")


@pytest.mark.parametrize("moment", ["after_login", "copy_in", "pipeline", "mid_statement"])
def test_token_expiring_leaves_a_clean_proxy(shared: ProxyProcess, pg: EmbeddedPostgres, tenant_db: TenantDatabase,
                                             moment: str) -> None:
    marker = f"vanish_{uuid.uuid4().hex[:10]}"
    try:
        wire = connect_proxy(shared.port, shared.token(GLOBEX, ttl=2))
        if moment == "mid_statement":
            wire.send(messages.query(f"SELECT pg_sleep(60) AS {marker}"))
        else:
            MOMENTS[moment](shared, wire, pg, marker)
        fatal = ended_by_proxy(wire)
        assert fatal["C"] == "28P01", fatal
        wire.sock.close()
        assert_clean(shared, pg, tenant_db, marker)
    finally:
        pg.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%{marker}%'"
                " AND query NOT LIKE '%pg_stat_activity%'")


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_an_invalid_message_type_ends_only_its_own_session(make_proxy: Any, mode: str) -> None:
    """A message of a type no frontend sends: Postgres ends the session with FATAL 08P01. The proxy passed
    it upstream as if it were CopyData (owing no reply), so in transaction mode it released the server
    connection at once, silently: the next client handed that connection (another tenant's, waiting in
    the queue of a pool of one) got the FATAL and lost its session, and the sender never heard of it."""
    proxy = make_proxy({"pool": {"mode": mode, "size": 1 if mode == "transaction" else 3}, **ADMIN})
    holder = connect_proxy(proxy.port, proxy.token(ACME))
    sender = connect_proxy(proxy.port, proxy.token(GLOBEX))
    waiter = connect_proxy(proxy.port, proxy.token(ACME))
    try:
        assert query(holder, "BEGIN")[-1] == (b"Z", b"T")
        sender.send(BOGUS)
        fatal = ended_by_proxy(sender)
        assert (fatal["C"], fatal["M"]) == ("08P01", "invalid frontend message type 1"), fatal
        waiter.send(messages.query("SELECT tenant_proxy.current_tenant()"))
        if mode == "transaction":
            wait_until(lambda: console(proxy, "SHOW POOLS")[0]["cl_waiting"] == "1")
        assert query(holder, "COMMIT")[-1] == (b"Z", b"I")
        assert rows(waiter.read_ready()) == [[ACME]]
    finally:
        for wire in (holder, sender, waiter):
            wire.sock.close()


@pytest.mark.parametrize("how", ["dropped", "terminate", "half"])
def test_vanishing_while_waiting_for_a_server_connection(shared: ProxyProcess, pg: EmbeddedPostgres,
                                                         tenant_db: TenantDatabase, how: str) -> None:
    holders = [connect_proxy(shared.port, shared.token(ACME)) for _ in range(SIZE)]
    try:
        for holder in holders:
            assert query(holder, "BEGIN; SELECT txid_current()")[-1] == (b"Z", b"T")
        wire = connect_proxy(shared.port, shared.token(GLOBEX))
        wire.send(messages.query("SET work_mem = '7MB'; SELECT set_config('myapp.vanish', 'leak', false)"))
        wait_until(lambda: console(shared, "SHOW POOLS")[0]["cl_waiting"] == "1")
        vanish(wire, how)
        wait_until(lambda: console(shared, "SHOW POOLS")[0]["cl_waiting"] == "0")
        for holder in holders:
            assert query(holder, "COMMIT")[-1] == (b"Z", b"I")
    finally:
        for holder in holders:
            holder.close()
    assert_clean(shared, pg, tenant_db)


def rss_kib(proxy: ProxyProcess) -> int:
    assert proxy.process is not None
    status = Path(f"/proc/{proxy.process.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def test_memory_stays_flat_over_many_vanishing_clients(shared: ProxyProcess, pg: EmbeddedPostgres,
                                                       tenant_db: TenantDatabase) -> None:
    """500 clients that vanish mid-pipeline, right after a SET, with a named statement pending: the proxy's
    RSS after the last 400 is about what it was after the first 100."""
    token = shared.token(GLOBEX)
    group = (messages.parse("", "SELECT count(*) FROM leads") + messages.bind("", "", []) + messages.execute("")
             + messages.sync())
    writes = [group * 3, messages.query("SET work_mem = '7MB'"), messages.parse("n", "SELECT $1::int") + flush()]
    hows = ["dropped", "terminate", "half"]

    def vanishings(count: int, offset: int) -> None:
        for index in range(offset, offset + count):
            wire = connect_proxy(shared.port, token)
            wire.send(writes[index % len(writes)])
            vanish(wire, hows[index % len(hows)])
        wait_until(lambda: pools_idle(shared), deadline=DEADLINE)

    vanishings(100, 0)
    before = rss_kib(shared)
    vanishings(400, 100)
    after = rss_kib(shared)
    assert after - before < 4096, (before, after)  # KiB: 10 bytes per vanished client would be 4 KiB
    assert_clean(shared, pg, tenant_db)


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_cancel_sent_with_the_terminate_reaches_the_statement(make_proxy: Any, pg: EmbeddedPostgres,
                                                                mode: str) -> None:
    """The CancelRequest and the Terminate leave together (lib/pq on a cancelled context): a cancel the proxy
    read after the Terminate but before the close was through (one turn of its loop) was dropped, and the
    statement slept on."""
    proxy = make_proxy({"pool": {"mode": mode, "size": SIZE}})
    for _ in range(8):
        marker = f"vanish_{uuid.uuid4().hex[:10]}"
        try:
            wire = connect_proxy(proxy.port, proxy.token(GLOBEX))
            assert wire.key is not None
            wire.send(messages.query(f"SELECT pg_sleep(60) AS {marker}"))
            wait_until(lambda: running(pg, marker) == 1, deadline=DEADLINE)
            canceller = socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE)
            wire.send(messages.terminate())
            canceller.sendall(messages.cancel_request(*wire.key))
            wire.sock.close()
            canceller.close()
            wait_until(lambda: running(pg, marker) == 0, deadline=DEADLINE)
        finally:
            pg.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%{marker}%'"
                    " AND query NOT LIKE '%pg_stat_activity%'")
    assert proxy.alive()
