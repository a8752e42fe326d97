"""The verifier SQL in a real database: installation by the CLI, the proof's bindings, key rotation."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from support import ACME, GLOBEX, ROWS, REPO, ProxyProcess
from proxy.demo import TenantDatabase, write_config
from proxy.embedded import EmbeddedPostgres
from proxy.tenant import sign


def direct(pg: EmbeddedPostgres, db: TenantDatabase) -> psycopg.Connection[Any]:
    """A connection straight to Postgres as the application role, bypassing the proxy."""
    return psycopg.connect(
        host="127.0.0.1", port=pg.port, user=db.app_role, password=db.app_password, dbname=db.database,
        sslmode="disable", autocommit=True,
    )


def set_context(conn: psycopg.Connection[Any], tenant: str, proof: str) -> str | None:
    conn.execute("SELECT set_config('app.current_tenant', %s, false), set_config('tenant_proxy.proof', %s, false)",
                 (tenant, proof))
    return conn.execute("SELECT tenant_proxy.current_tenant()").fetchone()[0]


def test_proof_is_bound_to_backend_tenant_and_expiry(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    key = tenant_db.signing_key.encode()
    later = int(time.time()) + 600
    with direct(pg, tenant_db) as conn, direct(pg, tenant_db) as other:
        pid = conn.info.backend_pid
        assert set_context(conn, ACME, sign(key, ACME, pid, later)) == ACME
        assert conn.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[ACME]
        # The same proof replayed on another backend is worthless.
        assert set_context(other, ACME, sign(key, ACME, pid, later)) is None
        assert other.execute("SELECT count(*) FROM leads").fetchone()[0] == 0
        # A proof for one tenant does not vouch for another.
        assert set_context(conn, GLOBEX, sign(key, ACME, pid, later)) is None
        # An expired proof is worthless, and so is one signed with another key.
        assert set_context(conn, ACME, sign(key, ACME, pid, int(time.time()) - 1)) is None
        assert set_context(conn, ACME, sign(b"x" * 40, ACME, pid, later)) is None
        # Garbage never raises; it reads as no tenant. So do near misses of a valid proof.
        valid = sign(key, ACME, pid, later)
        expiry, mac = valid.split(":")
        for proof in ("", "abc", "1:2", f"{later}:" + "g" * 64, "9" * 30 + ":" + "0" * 64, ":" + mac,
                      "9" * 16 + ":" + mac, f"+{expiry}:{mac}", f" {expiry}:{mac}", f"-{expiry}:{mac}",
                      f"0{expiry}:{mac}", f"{expiry}:{mac.upper()}", f"{valid}0", f"{valid[:-1]}", f"{expiry}:{mac[:-1]}é",
                      f"{expiry}::{mac[1:]}", f"{expiry}:{mac}".replace(":", ";")):
            assert set_context(conn, ACME, proof) is None, proof
        assert set_context(conn, "", valid) is None
        assert set_context(conn, ACME, valid) == ACME


def test_application_role_cannot_read_the_key(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    with direct(pg, tenant_db) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM tenant_proxy.signing_key")


def test_verifier_function_attributes(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    row = pg.psql(
        "SELECT provolatile, prosecdef, proconfig FROM pg_proc WHERE oid = 'tenant_proxy.current_tenant()'::regprocedure",
        tenant_db.database,
    ).strip()
    assert row == "s|t|{\"search_path=pg_catalog, pg_temp\"}"


def test_sql_command_installs_and_rotates(pg: EmbeddedPostgres, tenant_db: TenantDatabase, make_proxy: Any,
                                          tmp_path: Path) -> None:
    pg.psql(f"CREATE DATABASE rotation; GRANT CONNECT ON DATABASE rotation TO {tenant_db.app_role}")
    for number, key in enumerate(("first-key-" + "a" * 32, "second-key-" + "b" * 32)):
        overrides = {"upstream": {"database": "rotation"}, "tenant": {"signing_key": key}}
        config = write_config(tmp_path / "rotation.toml", pg, tenant_db, 6432, overrides)
        script = subprocess.run([sys.executable, "-m", "proxy", "sql", "--config", str(config)],
                                capture_output=True, text=True, check=True, cwd=REPO).stdout
        pg.psql(script, "rotation")
        pg.psql(script, "rotation")  # idempotent
        if number == 0:
            pg.psql("CREATE TABLE t (tenant_id uuid); ALTER TABLE t ENABLE ROW LEVEL SECURITY; "
                    "ALTER TABLE t FORCE ROW LEVEL SECURITY; "
                    "CREATE POLICY p ON t USING (tenant_id = (SELECT tenant_proxy.current_tenant())::uuid);"
                    f"INSERT INTO t VALUES ('{ACME}'), ('{GLOBEX}'); GRANT SELECT ON t TO {tenant_db.app_role};",
                    "rotation")
        current = make_proxy(overrides)
        assert current.psql(current.token(GLOBEX), "SELECT tenant_id FROM t", "rotation").stdout.split() == [GLOBEX]
    stale = make_proxy({"upstream": {"database": "rotation"}, "tenant": {"signing_key": "first-key-" + "a" * 32}})
    assert stale.psql(stale.token(GLOBEX), "SELECT count(*) FROM t", "rotation").stdout.split() == ["0"]


def test_sql_command_without_config_has_no_key() -> None:
    script = subprocess.run([sys.executable, "-m", "proxy", "sql"], capture_output=True, text=True, check=True,
                            cwd=REPO).stdout
    assert "CREATE OR REPLACE FUNCTION tenant_proxy.current_tenant()" in script
    assert "INSERT INTO tenant_proxy.signing_key" not in script


def test_plain_policy_is_not_tamper_proof_but_strict_is(proxy: ProxyProcess, pg: EmbeddedPostgres,
                                                         tenant_db: TenantDatabase) -> None:
    """Why the README insists on the verifier: a plain current_setting() policy trusts a forged SET."""
    pg.psql("CREATE TABLE IF NOT EXISTS plain_notes (tenant_id uuid, note text);"
            "ALTER TABLE plain_notes ENABLE ROW LEVEL SECURITY; ALTER TABLE plain_notes FORCE ROW LEVEL SECURITY;"
            "DROP POLICY IF EXISTS plain ON plain_notes;"
            "CREATE POLICY plain ON plain_notes USING (tenant_id = current_setting('app.current_tenant')::uuid);"
            f"TRUNCATE plain_notes; INSERT INTO plain_notes VALUES ('{ACME}', 'a'), ('{GLOBEX}', 'g');"
            f"GRANT SELECT ON plain_notes TO {tenant_db.app_role};", tenant_db.database)
    forged = f"SELECT set_config('app.' || 'current_tenant', '{GLOBEX}', false)"  # past the guard
    plain = proxy.psql(proxy.token(ACME), f"{forged}; SELECT note FROM plain_notes").stdout.split()
    strict = proxy.psql(proxy.token(ACME), f"{forged}; SELECT count(*) FROM leads").stdout.split()
    assert plain[-1] == "g"  # the documented weakness of the plain form
    assert strict[-1] == "0"
