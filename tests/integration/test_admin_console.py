"""The admin console (the virtual database `pgtenantproxy`) against real proxy processes, spoken to with
psql as an operator would: the SHOW commands report live clients and pools, PAUSE holds checkouts until
RESUME, KILL ends only what it names, access needs the required claims or the admin Unix socket, and
every command is in the audit log."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from support import ACME, GLOBEX, ROWS, ProxyProcess, RawClient, wait_until
from proxy.protocol import errors, messages

ADMIN_CLAIMS = {"admin.required_claims": {"role": ["proxy-admin", "sre"]}}


def admin_token(proxy: ProxyProcess, **claims: Any) -> str:
    return proxy.token(role="proxy-admin", sub="ops-alice", **claims)


def psql_console(proxy: ProxyProcess, sql: str, token: str | None = None,
                 host: str = "127.0.0.1") -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key != "PGPASSWORD"}
    if token is not None:
        environment["PGPASSWORD"] = token
    return subprocess.run(
        ["psql", "-X", "--csv", "-v", "ON_ERROR_STOP=1", "-w",
         f"host={host} port={proxy.port} user=ops dbname=pgtenantproxy sslmode=disable", "-c", sql],
        capture_output=True, text=True, env=environment, timeout=60, check=False,
    )


def console(proxy: ProxyProcess, sql: str, token: str | None = None, host: str = "127.0.0.1") -> list[dict[str, str]]:
    """The rows a console command returns (as psql prints them in CSV); fails on an error."""
    result = psql_console(proxy, sql, token if token is not None or host != "127.0.0.1" else admin_token(proxy), host)
    assert result.returncode == 0, result.stderr
    return list(csv.DictReader(io.StringIO(result.stdout)))


def connect(proxy: ProxyProcess, tenant: str, **params: str) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(**params), password=proxy.token(tenant), autocommit=True)


def count_leads(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM leads").fetchone()
    assert row is not None
    return int(row[0])


def raw_console(proxy: ProxyProcess, token: str) -> RawClient:
    """A console client logged in over the raw protocol."""
    client = RawClient(proxy.port)
    client.send(messages.startup_message({"user": "ops", "database": "pgtenantproxy"}))
    client.read_message()
    client.send(messages.password_message(token))
    assert client.read_until(b"Z")[-1] == (b"Z", b"I")
    return client


def test_show_commands_report_live_clients_pools_and_servers(make_proxy: Any) -> None:
    proxy = make_proxy(ADMIN_CLAIMS)
    with connect(proxy, ACME, application_name="report-me") as conn:
        assert count_leads(conn) == ROWS[ACME]
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        backend_pid = str(row[0])

        clients = console(proxy, "show clients;")
        mine = [c for c in clients if c["application_name"] == "report-me"]
        assert len(mine) == 1
        assert (mine[0]["tenant"], mine[0]["user"], mine[0]["database"], mine[0]["sub"]) == (
            ACME, "alice", proxy.db.database, "tester")
        assert mine[0]["state"] == "active" and mine[0]["remote_pid"] == backend_pid  # session mode: held
        assert mine[0]["addr"] == "127.0.0.1" and int(mine[0]["xact_count"]) >= 2
        own = [c for c in clients if c["database"] == "pgtenantproxy"]
        assert len(own) == 1 and own[0]["sub"] == "ops-alice" and own[0]["tenant"] == ""

        pools = {p["database"]: p for p in console(proxy, "SHOW POOLS")}
        pool = pools[proxy.db.database]
        assert (pool["cl_active"], pool["cl_waiting"], pool["sv_active"], pool["pool_mode"], pool["paused"]) == (
            "1", "0", "1", "session", "0")
        assert pool["user"] == proxy.db.app_role

        servers = console(proxy, "SHOW SERVERS")
        held = [s for s in servers if s["remote_pid"] == backend_pid]
        assert len(held) == 1 and held[0]["state"] == "active" and held[0]["tenant"] == ACME
        assert held[0]["link"] == mine[0]["id"] and held[0]["database"] == proxy.db.database

        tenants = {t["tenant"]: t for t in console(proxy, "SHOW TENANTS")}
        assert tenants[ACME]["cl_active"] == "1" and int(tenants[ACME]["xact_count"]) >= 2
        assert int(tenants[ACME]["bytes_received"]) > 0 and int(tenants[ACME]["bytes_sent"]) > 0
        assert GLOBEX not in tenants

        stats = console(proxy, "SHOW STATS")
        assert len(stats) == 1 and int(stats[0]["total_xact_count"]) >= 2
        assert int(stats[0]["total_login_count"]) == 1  # the tenant client (consoles are not tenant logins)

    # The session ended: its numbers stay in SHOW TENANTS.
    wait_until(lambda: not [c for c in console(proxy, "SHOW CLIENTS") if c["application_name"] == "report-me"])
    tenant = {t["tenant"]: t for t in console(proxy, "SHOW TENANTS")}[ACME]
    assert (tenant["cl_active"], tenant["sessions"]) == ("0", "1") and int(tenant["xact_count"]) >= 2


def test_show_config_never_prints_a_secret(make_proxy: Any) -> None:
    proxy = make_proxy(ADMIN_CLAIMS)
    result = psql_console(proxy, "SHOW CONFIG", admin_token(proxy))
    assert result.returncode == 0, result.stderr
    rows = {row["key"]: row for row in csv.DictReader(io.StringIO(result.stdout))}
    for key in ("jwt.secret", "tenant.signing_key", "upstream.password"):
        assert (rows[key]["value"], rows[key]["default"]) == ("<set>", "")
    assert rows["jwt.secret_file"]["value"] == ""
    assert rows["pool.mode"]["value"] == "session" and rows["pool.size"]["default"] == "20"
    assert rows["listen"]["value"] == f"127.0.0.1:{proxy.port}"
    assert json.loads(rows["admin.required_claims"]["value"]) == {"role": ["proxy-admin", "sre"]}
    for secret in (proxy.db.jwt_secret, proxy.db.signing_key, proxy.db.app_password):
        assert secret not in result.stdout


def test_unknown_commands_and_the_extended_protocol_are_refused_clearly(make_proxy: Any) -> None:
    proxy = make_proxy(ADMIN_CLAIMS)
    result = psql_console(proxy, "SHOW DATABASES", admin_token(proxy))
    assert result.returncode == 1
    assert 'ERROR:  unknown admin console command "SHOW DATABASES"' in result.stderr
    assert "HINT:  commands: SHOW POOLS, SHOW CLIENTS" in result.stderr
    client = raw_console(proxy, admin_token(proxy))
    try:
        client.send(messages.parse("", "SHOW POOLS") + messages.bind("", "", []) + messages.execute() + messages.sync())
        error = messages.parse_error_fields(client.read_message()[1])
        assert error["C"] == errors.FEATURE_NOT_SUPPORTED and "simple Query" in error["M"]
        assert client.read_message() == (b"Z", b"I")  # one error per group, then ReadyForQuery at Sync
        client.send(messages.query("KILL CLIENT 999999"))
        error = client.error()
        assert error["C"] == errors.UNDEFINED_OBJECT and error["M"] == "no client with id 999999"
        assert client.read_message() == (b"Z", b"I")
        client.send(messages.query("show pools"))  # the session goes on after errors
        assert [type_byte for type_byte, _ in client.read_until(b"Z")][0] == b"T"
    finally:
        client.close()


def test_a_token_without_the_required_claim_is_refused(make_proxy: Any) -> None:
    proxy = make_proxy(ADMIN_CLAIMS)
    for token in (proxy.token(), proxy.token(role="reader"), proxy.token(role=["reader", "writer"])):
        client = RawClient(proxy.port)
        try:
            client.send(messages.startup_message({"user": "ops", "database": "pgtenantproxy"}))
            client.read_message()
            client.send(messages.password_message(token))
            error = client.error()
        finally:
            client.close()
        assert error["C"] == errors.INVALID_AUTHORIZATION
        assert error["M"] == 'token claim "role" does not grant access to the admin console'
    assert console(proxy, "SHOW POOLS", proxy.token(role=["reader", "sre"]))  # an array claim holding one value
    bad_signature = psql_console(proxy, "SHOW POOLS", admin_token(proxy, secret="z" * 40))
    assert bad_signature.returncode == 2 and "signature" in bad_signature.stderr


def test_without_an_admin_section_the_console_does_not_exist(make_proxy: Any) -> None:
    proxy = make_proxy()
    result = psql_console(proxy, "SHOW POOLS", admin_token(proxy))
    assert result.returncode == 2
    assert 'database "pgtenantproxy" is not available through this proxy' in result.stderr


def pool_of(proxy: ProxyProcess) -> dict[str, str]:
    return {p["database"]: p for p in console(proxy, "SHOW POOLS")}[proxy.db.database]


def test_pause_holds_checkouts_until_resume_and_lets_transactions_finish(make_proxy: Any) -> None:
    proxy = make_proxy({**ADMIN_CLAIMS, "pool": {"mode": "transaction", "size": 2, "checkout_timeout": 60}})
    with connect(proxy, ACME) as waiting, connect(proxy, GLOBEX) as in_flight:
        assert count_leads(waiting) == ROWS[ACME]
        in_flight.execute("BEGIN")
        assert count_leads(in_flight) == ROWS[GLOBEX]
        assert console(proxy, "PAUSE") == []
        assert pool_of(proxy)["paused"] == "1"
        counted: list[int] = []
        query = threading.Thread(target=lambda: counted.append(count_leads(waiting)), daemon=True)
        query.start()
        wait_until(lambda: pool_of(proxy)["cl_waiting"] == "1")
        # The transaction in flight goes on and commits; the waiting client still waits.
        assert count_leads(in_flight) == ROWS[GLOBEX]
        in_flight.execute("COMMIT")
        assert pool_of(proxy)["cl_waiting"] == "1" and not counted and query.is_alive()
        assert int(pool_of(proxy)["maxwait"]) >= 0 and pool_of(proxy)["sv_idle"] != "0"
        assert console(proxy, "RESUME;") == []
        query.join(30)
        assert counted == [ROWS[ACME]]
        assert pool_of(proxy)["paused"] == "0"
    refused = psql_console(proxy, "RESUME", admin_token(proxy))
    assert refused.returncode == 1 and "ERROR:  nothing is paused" in refused.stderr
    database_pause = psql_console(proxy, f"PAUSE {proxy.db.database}", admin_token(proxy))
    assert database_pause.returncode == 0 and pool_of(proxy)["paused"] == "1"
    unknown = psql_console(proxy, "PAUSE nosuchdb", admin_token(proxy))
    assert unknown.returncode == 1 and 'no pool for database "nosuchdb"' in unknown.stderr
    assert psql_console(proxy, f'RESUME "{proxy.db.database}"', admin_token(proxy)).returncode == 0
    # RESUME without a name ends every pause, those of single databases too.
    assert console(proxy, f"PAUSE {proxy.db.database}") == [] and pool_of(proxy)["paused"] == "1"
    assert console(proxy, "RESUME") == [] and pool_of(proxy)["paused"] == "0"


def test_pause_in_session_mode_holds_new_sessions_until_resume(make_proxy: Any) -> None:
    """In session mode a client holds its server connection for the whole session: one that has it
    keeps working while paused; a new one waits for its first connection until RESUME."""
    proxy = make_proxy({**ADMIN_CLAIMS, "pool": {"checkout_timeout": 60}})
    with connect(proxy, ACME) as first:
        assert count_leads(first) == ROWS[ACME]  # the pool's first session: the parameters are known now
        assert console(proxy, "PAUSE") == []
        assert count_leads(first) == ROWS[ACME]
        counted: list[int] = []

        def new_session() -> None:
            with connect(proxy, GLOBEX) as second:
                counted.append(count_leads(second))

        query = threading.Thread(target=new_session, daemon=True)
        query.start()
        wait_until(lambda: pool_of(proxy)["cl_waiting"] == "1")
        assert not counted and query.is_alive()
        assert console(proxy, "RESUME") == []
        query.join(30)
        assert counted == [ROWS[GLOBEX]]


def test_kill_tenant_ends_only_that_tenants_clients(make_proxy: Any) -> None:
    proxy = make_proxy({**ADMIN_CLAIMS, "pool": {"mode": "transaction"}})
    with connect(proxy, ACME) as first, connect(proxy, ACME) as second, connect(proxy, GLOBEX) as other:
        for conn in (first, second, other):
            count_leads(conn)
        second.execute("BEGIN")
        count_leads(second)  # holds a server connection mid-transaction
        result = psql_console(proxy, f"KILL TENANT '{ACME}'", admin_token(proxy))
        assert result.returncode == 0 and "2 client connection(s) of tenant" in result.stderr
        for victim in (first, second):
            with pytest.raises(psycopg.OperationalError) as caught:
                count_leads(victim)
            assert "terminating connection due to administrator command" in str(caught.value)
        assert count_leads(other) == ROWS[GLOBEX]
    with connect(proxy, ACME) as again:  # as PgBouncer's KILL: later logins are not refused
        assert count_leads(again) == ROWS[ACME]


def test_kill_client_ends_that_client(make_proxy: Any) -> None:
    proxy = make_proxy(ADMIN_CLAIMS)
    with connect(proxy, ACME, application_name="victim") as victim, connect(proxy, ACME) as bystander:
        ids = [c["id"] for c in console(proxy, "SHOW CLIENTS") if c["application_name"] == "victim"]
        assert len(ids) == 1
        assert psql_console(proxy, f"kill client {ids[0]}", admin_token(proxy)).returncode == 0
        with pytest.raises(psycopg.OperationalError, match="administrator command"):
            count_leads(victim)
        assert count_leads(bystander) == ROWS[ACME]


@pytest.fixture
def admin_socket() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="pgtp-admin-"))  # short: a socket path has at most 107 bytes
    yield directory
    subprocess.run(["rm", "-rf", str(directory)], check=False)


def test_the_admin_socket_needs_no_token_and_every_command_is_audited(make_proxy: Any, admin_socket: Path) -> None:
    proxy = make_proxy({"admin": {"listen_unix": str(admin_socket)}, "": {"log_format": "json"}})
    assert (admin_socket / f".s.PGSQL.{proxy.port}").is_socket()
    with connect(proxy, ACME):
        pools = console(proxy, "SHOW POOLS", host=str(admin_socket))
        assert pools[0]["cl_active"] == "1"
    other = subprocess.run(["psql", "-X", "-w", f"host={admin_socket} port={proxy.port} user=ops dbname=app",
                            "-c", "SELECT 1"], capture_output=True, text=True, timeout=30, check=False)
    assert other.returncode == 2 and 'the admin socket serves only database "pgtenantproxy"' in other.stderr
    # With only the socket configured, no token opens the console over TCP.
    by_token = psql_console(proxy, "SHOW POOLS", admin_token(proxy))
    assert by_token.returncode == 2 and "the admin console accepts no token logins" in by_token.stderr
    assert "HINT:  this proxy opens its admin console only on the admin socket ([admin] listen_unix)" in by_token.stderr
    assert psql_console(proxy, "SHOW\tnothing\n", host=str(admin_socket)).returncode == 1
    lines = wait_until(lambda: (text := proxy.log()).count('"admin_command"') >= 2 and text)
    events = [json.loads(line) for line in lines.splitlines()]
    commands = [e for e in events if e.get("event") == "admin_command"]
    assert [(e["via"], e["command"], e["result"]) for e in commands] == [
        ("unix socket", "SHOW POOLS", "ok"),
        ("unix socket", "SHOW\tnothing\n", 'unknown admin console command "SHOW nothing"'),
    ]
    assert commands[0]["client"] == "unix" and commands[0]["sub"] is None
    assert '"command": "SHOW\\tnothing\\n"' in lines  # escaped: one line per event


def test_reload_signals_the_process_that_owns_the_configuration(make_proxy: Any) -> None:
    proxy = make_proxy({**ADMIN_CLAIMS, "": {"log_format": "json"}})
    result = psql_console(proxy, "RELOAD", admin_token(proxy, iss="https://idp.example"))
    assert result.returncode == 0, result.stderr
    wait_until(lambda: '"event": "reload"' in proxy.log())  # SIGHUP reached this process: it reloaded
    assert proxy.alive() and console(proxy, "SHOW POOLS")
    events = [json.loads(line) for line in proxy.log().splitlines()]
    assert next(e for e in events if e.get("event") == "reload")["result"] == "ok"
    reload = next(e for e in events if e.get("event") == "admin_command")
    assert (reload["via"], reload["sub"], reload["iss"], reload["command"], reload["result"]) == (
        "token", "ops-alice", "https://idp.example", "RELOAD", "ok")


def test_with_workers_each_console_shows_its_own_worker(make_proxy: Any, admin_socket: Path) -> None:
    """The admin socket is bound before the workers are forked and every worker accepts on it; a console
    session lists the clients of the worker it landed on, itself among them."""
    proxy = make_proxy({"admin": {"listen_unix": str(admin_socket)}, "": {"workers": 2}})
    for _ in range(4):
        clients = console(proxy, "SHOW CLIENTS", host=str(admin_socket))
        consoles = [c for c in clients if c["database"] == "pgtenantproxy"]
        assert len(consoles) == 1 and consoles[0]["addr"] == "unix" and consoles[0]["state"] == "idle"


def test_reload_with_workers_signals_the_supervisor(make_proxy: Any, admin_socket: Path) -> None:
    proxy = make_proxy({"admin": {"listen_unix": str(admin_socket)}, "": {"workers": 2}})
    result = psql_console(proxy, "RELOAD", host=str(admin_socket))
    assert result.returncode == 0, result.stderr
    assert proxy.process is not None
    # os.getppid() of the worker: the supervisor passes SIGHUP on to both workers, and each reloads
    wait_until(lambda: proxy.log().count("configuration reload") == 2)
    assert proxy.alive() and console(proxy, "SHOW POOLS", host=str(admin_socket))
