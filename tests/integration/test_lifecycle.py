"""The lifecycle of a real proxy process: SIGTERM drains (each client ends at its next idle point with
57P01, /readyz answers 503, shutdown_timeout closes the rest), SIGINT stops at once, SIGHUP reloads the
configuration (a broken one is refused and counted), and the signing key rotates with live sessions in
both pool modes without any of them seeing empty results; with one process and with workers = 2."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from support import ACME, GLOBEX, REPO, ROWS, ProxyProcess, RawClient, get, login, wait_until
from proxy.demo import TenantDatabase, prepare_database, write_config
from proxy.embedded import EmbeddedPostgres, free_port
from proxy.protocol import errors, messages

SHUTTING_DOWN = "terminating connection because the proxy is shutting down"


def reloads_counted(port: int, result: str) -> float:
    for line in get(port, "/metrics")[1].splitlines():
        if line.startswith(f'pgtp_config_reloads_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


def query(client: RawClient, sql: str) -> list[tuple[bytes, bytes]]:
    """Send one simple Query; the messages up to its ReadyForQuery (or an ErrorResponse)."""
    client.send(messages.query(sql))
    return client.read_until(b"Z")


def shutdown_error(client: RawClient) -> dict[str, str]:
    """The FATAL ErrorResponse that ends a session when the proxy shuts down, then the end of the stream."""
    type_byte, body = client.read_message()
    assert type_byte == b"E", (type_byte, body)
    fields = messages.parse_error_fields(body)
    assert client.closed()
    return fields


def committed(pg: EmbeddedPostgres, db: TenantDatabase, name: str) -> str:
    return pg.psql(f"SELECT count(*) FROM leads WHERE name = '{name}'", db.database).strip()


def insert(name: str) -> str:
    return f"INSERT INTO leads (tenant_id, name, email) VALUES ('{ACME}', '{name}', 'x@acme.test')"


class Reloader:
    """Rewrites a proxy's configuration file and sends it SIGHUP, waiting for every process to log the
    reload (`processes` audit events)."""

    def __init__(self, proxy: ProxyProcess, overrides: dict[str, dict[str, Any]], processes: int = 1) -> None:
        self.proxy = proxy
        self.overrides = overrides
        self.processes = processes

    def __call__(self, changes: dict[str, dict[str, Any]]) -> str:
        for section, values in changes.items():
            self.overrides.setdefault(section, {}).update(values)
        proxy = self.proxy
        write_config(proxy.config, proxy.pg, proxy.db, proxy.port, self.overrides)
        before = proxy.log().count("configuration reload")
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGHUP)
        wait_until(lambda: proxy.log().count("configuration reload") >= before + self.processes)
        return "\n".join(line for line in proxy.log().splitlines() if "configuration reload" in line)


def start(pg: EmbeddedPostgres, db: TenantDatabase, tmp_path: Path, overrides: dict[str, dict[str, Any]]) -> ProxyProcess:
    return ProxyProcess(pg, db, tmp_path, overrides).start()


# -- SIGTERM and SIGINT -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_sigterm_lets_an_open_transaction_commit_then_ends_every_client(
        pg: EmbeddedPostgres, tenant_db: TenantDatabase, tmp_path: Path, mode: str) -> None:
    http = free_port()
    proxy = start(pg, tenant_db, tmp_path, {"pool": {"mode": mode}, "http": {"listen": f"127.0.0.1:{http}"}})
    try:
        wait_until(lambda: get(http, "/readyz")[0] == 200)
        busy, idle = RawClient(proxy.port), RawClient(proxy.port)
        login(busy, proxy.token(ACME))
        login(idle, proxy.token(GLOBEX))
        assert query(idle, "SELECT count(*) FROM leads")[-1] == (b"Z", b"I")
        name = f"drain-{mode}"
        assert query(busy, "BEGIN")[-1] == (b"Z", b"T")
        assert query(busy, insert(name))[-1] == (b"Z", b"T")
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGTERM)
        # The idle client ends at once, while the other is still inside its transaction.
        fields = shutdown_error(idle)
        assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", errors.ADMIN_SHUTDOWN, SHUTTING_DOWN)
        status, reason = get(http, "/readyz")
        assert (status, reason) == (503, "draining: the proxy is shutting down\n")
        with pytest.raises(OSError):
            RawClient(proxy.port)  # no longer accepting
        # The transaction goes on and commits; then its client ends too.
        assert query(busy, "SELECT count(*) FROM leads")[-1] == (b"Z", b"T")
        assert query(busy, "COMMIT")[-2:] == [(b"C", b"COMMIT\0"), (b"Z", b"I")]
        fields = shutdown_error(busy)
        assert (fields["C"], fields["M"]) == (errors.ADMIN_SHUTDOWN, SHUTTING_DOWN)
        assert committed(pg, tenant_db, name) == "1"
        assert proxy.process.wait(10) == 0
    finally:
        proxy.stop()
        pg.psql("DELETE FROM leads WHERE name LIKE 'drain-%'", tenant_db.database)


def test_shutdown_timeout_closes_a_client_that_stays_in_its_transaction(
        pg: EmbeddedPostgres, tenant_db: TenantDatabase, tmp_path: Path) -> None:
    proxy = start(pg, tenant_db, tmp_path, {"": {"shutdown_timeout": 0.5}})
    try:
        client = RawClient(proxy.port)
        login(client, proxy.token(ACME))
        assert query(client, "BEGIN")[-1] == (b"Z", b"T")
        assert query(client, insert("drain-timeout"))[-1] == (b"Z", b"T")
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGTERM)
        fields = shutdown_error(client)  # after shutdown_timeout: the socket's own timeout is 10 s
        assert (fields["C"], fields["M"]) == (errors.ADMIN_SHUTDOWN, SHUTTING_DOWN)
        assert proxy.process.wait(10) == 0
        assert "drain ended with 1 client(s) left" in proxy.log()
        wait_until(lambda: committed(pg, tenant_db, "drain-timeout") == "0")  # rolled back with its connection
    finally:
        proxy.stop()


def test_sigint_stops_at_once_even_inside_a_transaction(pg: EmbeddedPostgres, tenant_db: TenantDatabase,
                                                        tmp_path: Path) -> None:
    proxy = start(pg, tenant_db, tmp_path, {})
    try:
        client = RawClient(proxy.port)
        login(client, proxy.token(ACME))
        assert query(client, "BEGIN")[-1] == (b"Z", b"T")
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGINT)
        assert shutdown_error(client)["C"] == errors.ADMIN_SHUTDOWN
        assert proxy.process.wait(10) == 0
    finally:
        proxy.stop()


# -- SIGHUP ---------------------------------------------------------------------------------------

def test_sighup_with_a_new_jwt_secret_keeps_live_sessions(pg: EmbeddedPostgres, tenant_db: TenantDatabase,
                                                           tmp_path: Path) -> None:
    overrides: dict[str, dict[str, Any]] = {"pool": {"size": 5}}
    proxy = start(pg, tenant_db, tmp_path, overrides)
    try:
        old_token = proxy.token(ACME)
        with psycopg.connect(proxy.dsn(), password=old_token, autocommit=True) as live:
            assert live.execute("SELECT count(*) FROM leads").fetchone() == (ROWS[ACME],)
            secret = "a-new-secret-for-the-reload-" + "n" * 16
            lines = Reloader(proxy, overrides)({"jwt": {"secret": secret}, "pool": {"size": 6, "mode": "transaction"}})
            assert "result=ok" in lines and "restart_needed=pool.mode" in lines
            assert secret not in proxy.log()
            new = proxy.psql(proxy.token(GLOBEX, secret=secret), "SELECT count(*) FROM leads")
            assert new.returncode == 0 and new.stdout.split() == [str(ROWS[GLOBEX])], new.stderr
            old = proxy.psql(old_token, "SELECT 1")
            assert old.returncode != 0 and "signature" in old.stderr
            assert live.execute("SELECT count(*) FROM leads").fetchone() == (ROWS[ACME],)  # the live session goes on
        assert proxy.alive()
    finally:
        proxy.stop()


def test_a_reload_that_sets_admin_required_claims_opens_the_console(pg: EmbeddedPostgres, tenant_db: TenantDatabase,
                                                                   tmp_path: Path) -> None:
    """Started without [admin], the console does not exist (3D000); a reload that sets required_claims
    (result=ok, nothing named for a restart) opens it to a token carrying them, and a later reload's
    max_tenants applies to it."""
    overrides: dict[str, dict[str, Any]] = {}
    proxy = start(pg, tenant_db, tmp_path, overrides)
    try:
        admin_token = proxy.token(ACME, role="proxy-admin")
        before = proxy.psql(admin_token, "SHOW STATS", database="pgtenantproxy")
        assert before.returncode != 0 and 'database "pgtenantproxy" is not available' in before.stderr
        lines = Reloader(proxy, overrides)({"admin.required_claims": {"role": "proxy-admin"}})
        assert "result=ok" in lines and "restart_needed=-" in lines
        after = proxy.psql(admin_token, "SHOW STATS", database="pgtenantproxy")
        assert after.returncode == 0 and after.stdout.startswith("*|"), after.stderr
        refused = proxy.psql(proxy.token(ACME, role="reader"), "SHOW STATS", database="pgtenantproxy")
        assert refused.returncode != 0 and 'token claim "role" does not grant access' in refused.stderr
        # A later reload's max_tenants bounds the console's ledger of ended sessions.
        assert "result=ok" in Reloader(proxy, overrides)({"admin": {"max_tenants": 1}})
        for tenant in (ACME, GLOBEX):
            assert proxy.psql(proxy.token(tenant), "SELECT 1").returncode == 0
        tenants = wait_until(lambda: (rows := proxy.psql(admin_token, "SHOW TENANTS", database="pgtenantproxy")
                                      .stdout.split()) and len(rows) == 2 and rows)
        assert sorted(row.split("|")[0] for row in tenants) == sorted([ACME, "_other"])
    finally:
        proxy.stop()


def test_a_reload_with_a_broken_configuration_keeps_the_running_one(pg: EmbeddedPostgres, tenant_db: TenantDatabase,
                                                                    tmp_path: Path) -> None:
    http = free_port()
    overrides: dict[str, dict[str, Any]] = {"http": {"listen": f"127.0.0.1:{http}"}}
    proxy = start(pg, tenant_db, tmp_path, overrides)
    try:
        wait_until(lambda: get(http, "/readyz")[0] == 200)
        lines = Reloader(proxy, overrides)({"jwt": {"secret": "too short"}, "pool": {"size": 0}})
        assert "result=error" in lines
        assert "jwt.secret: must be at least 32 bytes" in lines and "pool.size: must be between 1" in lines
        assert "too short" not in proxy.log()
        assert reloads_counted(http, "error") == 1 and reloads_counted(http, "ok") == 0
        works = proxy.psql(proxy.token(ACME), "SELECT count(*) FROM leads")  # the old secret still signs
        assert works.returncode == 0 and works.stdout.split() == [str(ROWS[ACME])], works.stderr
        assert get(http, "/readyz")[0] == 200
    finally:
        proxy.stop()


def test_a_reload_with_a_new_upstream_password_retires_the_pooled_connections(pg: EmbeddedPostgres,
                                                                              tmp_path: Path) -> None:
    db = prepare_database(pg, "reload_upstream", "reload_upstream_app")
    overrides: dict[str, dict[str, Any]] = {"pool": {"mode": "transaction"}}
    proxy = start(pg, db, tmp_path, overrides)
    try:
        with psycopg.connect(proxy.dsn(database=db.database), password=proxy.token(ACME), autocommit=True) as live:
            before = live.execute("SELECT pg_backend_pid()").fetchone()
            pg.psql(f"ALTER ROLE {db.app_role} PASSWORD 'the-new-upstream-password'")
            assert "result=ok" in Reloader(proxy, overrides)({"upstream": {"password": "the-new-upstream-password"}})
            after = live.execute("SELECT pg_backend_pid(), count(*) FROM leads").fetchone()
            assert after is not None and before is not None
            assert after[0] != before[0] and after[1] == ROWS[ACME]  # a new connection, with the new password
    finally:
        proxy.stop()
        pg.psql("DROP DATABASE IF EXISTS reload_upstream WITH (FORCE)")


# -- signing key rotation -------------------------------------------------------------------------

def install(config: Path, database: str, pg: EmbeddedPostgres) -> None:
    """`pg-tenant-proxy sql --config` run into the database, as an operator would."""
    script = subprocess.run([sys.executable, "-m", "proxy", "sql", "--config", str(config)], capture_output=True,
                            text=True, check=True, cwd=REPO).stdout
    pg.psql(script, database)


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_signing_key_rotation_with_live_sessions(pg: EmbeddedPostgres, tmp_path: Path, mode: str) -> None:
    """The two-step rotation of docs/operations.md; at each step every live session (one idle, one
    inside a transaction block at the reload) and a new one see their tenant's rows, never none."""
    db = prepare_database(pg, f"rotation_{mode}", f"rotation_app_{mode}")
    old_key, new_key = db.signing_key, "the-new-signing-key-" + mode + "-" * 24
    overrides: dict[str, dict[str, Any]] = {"pool": {"mode": mode}}
    proxy = start(pg, db, tmp_path, overrides)
    reload = Reloader(proxy, overrides)
    try:
        with psycopg.connect(proxy.dsn(database=db.database), password=proxy.token(ACME), autocommit=True) as idle, \
                psycopg.connect(proxy.dsn(database=db.database), password=proxy.token(GLOBEX)) as busy:

            def every_session_sees_its_rows() -> None:
                assert idle.execute("SELECT count(*) FROM leads").fetchone() == (ROWS[ACME],)
                assert busy.execute("SELECT count(*) FROM leads").fetchone() == (ROWS[GLOBEX],)
                fresh = proxy.psql(proxy.token(ACME), "SELECT count(*) FROM leads", db.database)
                assert fresh.stdout.split() == [str(ROWS[ACME])], fresh.stderr

            every_session_sees_its_rows()  # busy is now inside a transaction block
            # Step 1: install the new key beside the old one, and reload the proxy onto it.
            rotating = {"tenant": {"signing_key": new_key, "previous_signing_key": old_key}}
            write_config(tmp_path / "rotating.toml", pg, db, proxy.port, {**overrides, **rotating})
            install(tmp_path / "rotating.toml", db.database, pg)
            every_session_sees_its_rows()
            assert "result=ok" in reload(rotating)
            every_session_sees_its_rows()
            busy.commit()
            every_session_sees_its_rows()
            # Step 2: drop the previous key. Only contexts signed with the new one verify now.
            done = {"tenant": {"signing_key": new_key, "previous_signing_key": None}}
            write_config(tmp_path / "done.toml", pg, db, proxy.port, {**overrides, **done})
            install(tmp_path / "done.toml", db.database, pg)
            assert pg.psql("SELECT count(*) FROM tenant_proxy.signing_key", db.database).strip() == "1"
            every_session_sees_its_rows()
            busy.commit()
            every_session_sees_its_rows()
        assert "result=ok" in reload(done)  # the configuration file now matches what is installed
    finally:
        proxy.stop()
        pg.psql(f"DROP DATABASE IF EXISTS rotation_{mode} WITH (FORCE)")


def test_the_verifier_sql_upgrades_a_key_table_from_before_rotation(pg: EmbeddedPostgres, tenant_db: TenantDatabase,
                                                                     tmp_path: Path) -> None:
    pg.psql("DROP DATABASE IF EXISTS key_upgrade WITH (FORCE); CREATE DATABASE key_upgrade")
    pg.psql("CREATE SCHEMA tenant_proxy; CREATE TABLE tenant_proxy.signing_key ("
            " id integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),"
            " inner_pad bytea NOT NULL CHECK (length(inner_pad) = 64),"
            " outer_pad bytea NOT NULL CHECK (length(outer_pad) = 64),"
            " installed_at timestamptz NOT NULL DEFAULT now())", "key_upgrade")
    config = write_config(tmp_path / "upgrade.toml", pg, tenant_db, 6432, {
        "upstream": {"database": "key_upgrade"},
        "tenant": {"signing_key": "current-" + "c" * 32, "previous_signing_key": "previous-" + "p" * 32}})
    install(config, "key_upgrade", pg)
    install(config, "key_upgrade", pg)  # idempotent
    assert pg.psql("SELECT id FROM tenant_proxy.signing_key ORDER BY id", "key_upgrade").split() == ["1", "2"]
    check = pg.psql("SELECT conname FROM pg_constraint WHERE conrelid = 'tenant_proxy.signing_key'::regclass"
                    " AND contype = 'c' AND conname LIKE 'signing_key_%' ORDER BY 1", "key_upgrade")
    assert check.split() == ["signing_key_inner_pad_check", "signing_key_outer_pad_check", "signing_key_rows_check"]
    pg.psql("DROP DATABASE key_upgrade WITH (FORCE)")


# -- workers = 2 ------------------------------------------------------------------------------------

def test_workers_reload_and_drain_on_the_supervisors_signals(pg: EmbeddedPostgres, tenant_db: TenantDatabase,
                                                             tmp_path: Path) -> None:
    overrides: dict[str, dict[str, Any]] = {"": {"workers": 2}}
    proxy = start(pg, tenant_db, tmp_path, overrides)
    try:
        old_token = proxy.token(ACME)
        secret = "the-workers-new-secret-" + "w" * 16
        lines = Reloader(proxy, overrides, processes=2)({"jwt": {"secret": secret}})
        assert lines.count("result=ok") == 2, proxy.log()
        new_token = proxy.token(ACME, secret=secret)
        for _ in range(6):  # SO_REUSEPORT spreads them over both workers
            client = RawClient(proxy.port)
            login(client, new_token)
            client.close()
            refused = RawClient(proxy.port)
            refused.send(messages.startup_message({"user": "alice", "database": "app"}))
            refused.read_message()
            refused.send(messages.password_message(old_token))
            assert refused.error()["C"] == "28P01"
            refused.close()
        busy, idle = RawClient(proxy.port), RawClient(proxy.port)
        login(busy, new_token)
        login(idle, new_token)
        assert query(busy, "BEGIN")[-1] == (b"Z", b"T")
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGTERM)
        assert shutdown_error(idle)["C"] == errors.ADMIN_SHUTDOWN
        assert query(busy, "SELECT count(*) FROM leads")[-1] == (b"Z", b"T")
        assert query(busy, "COMMIT")[-1] == (b"Z", b"I")
        assert shutdown_error(busy)["C"] == errors.ADMIN_SHUTDOWN
        assert proxy.process.wait(15) == 0
        assert "starting it again" not in proxy.log()
    finally:
        proxy.stop()
