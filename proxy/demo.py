"""The embedded demo: a throwaway Postgres, the seed's `leads` table under the strict policy and the
hardened upstream role, the proxy, and psql showing that each tenant sees only its rows and that
forging the setting gets nothing."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.config import ListenError
from proxy.embedded import EmbeddedPostgres
from proxy.hardening import hardening_sql
from proxy.listeners import probe_tcp
from proxy.tokens import mint
from proxy.verifier import demo_sql, verifier_sql

TENANTS = {
    "acme": uuid.UUID("11111111-1111-4111-8111-111111111111"),
    "globex": uuid.UUID("22222222-2222-4222-8222-222222222222"),
}
LEADS = {
    "acme": [("Ada Lovelace", "ada@acme.test"), ("Alan Turing", "alan@acme.test")],
    "globex": [("Grace Hopper", "grace@globex.test"), ("Edsger Dijkstra", "edsger@globex.test")],
}


@dataclass(frozen=True)
class TenantDatabase:
    """What `prepare_database` set up: the database and the role the proxy logs in as."""

    database: str
    app_role: str
    app_password: str
    signing_key: str
    jwt_secret: str


def prepare_database(pg: EmbeddedPostgres, database: str = "app", app_role: str = "tenant_app") -> TenantDatabase:
    """Create the application role and database, install the verifier and the seed schema with rows, and
    harden the role (proxy/sql/hardening.sql), so the demo and the tests run the setup the docs prescribe."""
    password = secrets.token_urlsafe(24)
    signing_key = secrets.token_urlsafe(32)
    pg.psql(
        f"CREATE ROLE {app_role} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE PASSWORD '{password}';\n"
        f"CREATE DATABASE {database};\n"
        f"REVOKE ALL ON DATABASE {database} FROM PUBLIC;\n"
        f"GRANT CONNECT ON DATABASE {database} TO {app_role};\n"
    )
    pg.psql(verifier_sql("app.current_tenant", "tenant_proxy.proof", signing_key), database)
    pg.psql(demo_sql(app_role), database)
    pg.psql(hardening_sql(app_role), database)
    rows = ",".join(
        f"('{TENANTS[tenant]}', '{name}', '{email}')" for tenant, leads in LEADS.items() for name, email in leads
    )
    pg.psql(f"INSERT INTO leads (tenant_id, name, email) VALUES {rows};", database)
    return TenantDatabase(database, app_role, password, signing_key, secrets.token_urlsafe(32))


def write_config(
    path: Path, pg: EmbeddedPostgres, db: TenantDatabase, port: int, overrides: dict[str, dict[str, Any]] | None = None
) -> Path:
    """A configuration file for the proxy in front of `pg`; `overrides` maps section ("" for top level) to keys."""
    sections: dict[str, dict[str, Any]] = {
        "": {"listen": f"127.0.0.1:{port}"},
        "upstream": {
            "host": "127.0.0.1",
            "port": pg.port,
            "user": db.app_role,
            "password": db.app_password,
            "database": db.database,
            "sslmode": "disable",
        },
        "jwt": {"secret": db.jwt_secret},
        "tenant": {"signing_key": db.signing_key},
    }
    for section, values in (overrides or {}).items():
        sections.setdefault(section, {}).update(values)
    lines: list[str] = []
    for section, values in sorted(sections.items()):
        if section:
            lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items() if value is not None]
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_for_port(port: int, process: subprocess.Popen[bytes] | None = None, deadline: float = 15.0) -> None:
    """Return once 127.0.0.1:port accepts connections; raise if the process dies or time runs out."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the proxy exited with status {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {deadline} s")


def _psql(port: int, token: str, sql: str) -> str:
    env = {**os.environ, "PGPASSWORD": token, "PGSSLMODE": "disable"}
    result = subprocess.run(
        ["psql", "-X", "-h", "127.0.0.1", "-p", str(port), "-U", "demo", "-d", "app", "-c", sql],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    return (result.stdout + result.stderr).rstrip()


def _verify_own_proxy(proxy: subprocess.Popen[bytes], port: int, token: str, logfile: Path) -> None:
    """Raise RuntimeError unless the server on `port` is the proxy just started: it must be alive and
    log tenant acme in with the demo's token, with acme's context set."""
    wait_for_port(port, proxy)
    answer = _psql(port, token, "SELECT current_setting('app.current_tenant')")
    if proxy.poll() is not None:
        log = logfile.read_text(errors="replace").strip().splitlines()
        raise RuntimeError(f"the demo's proxy exited: {log[-1] if log else 'no log'}")
    if str(TENANTS["acme"]) not in answer:
        raise RuntimeError(f"the server on port {port} is not the demo's proxy; it answered: {answer.splitlines()[0:1]}")


def run_demo(port: int = 6432, serve: bool = True) -> int:
    if shutil.which("psql") is None:
        print("the demo needs psql (the Postgres client) on PATH", file=sys.stderr)
        return 1
    try:
        probe_tcp("127.0.0.1", port, "--port", False)
    except ListenError:
        print(f"pg-tenant-proxy demo: port {port} is already in use (PgBouncer or another proxy?); "
              "choose a free one with --port", file=sys.stderr)
        return 1
    print("Starting a throwaway Postgres ...")
    pg = EmbeddedPostgres().start()
    proxy: subprocess.Popen[bytes] | None = None
    try:
        db = prepare_database(pg)
        config = write_config(pg.root / "proxy.toml", pg, db, port)
        logfile = open(pg.root / "proxy.log", "wb")
        proxy = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(config)], stderr=logfile)
        tokens = {
            name: mint(db.jwt_secret, {"tenant_id": str(tenant), "sub": f"{name}-user", "exp": int(time.time()) + 8 * 3600})
            for name, tenant in TENANTS.items()
        }
        try:
            _verify_own_proxy(proxy, port, tokens["acme"], pg.root / "proxy.log")
        except RuntimeError as exc:
            print(f"pg-tenant-proxy demo: {exc}", file=sys.stderr)
            return 1
        print(f"Postgres on port {pg.port}, pg-tenant-proxy on port {port} (log: {pg.root / 'proxy.log'}).\n")
        for name, token in tokens.items():
            print(f"== Tenant {name} ({TENANTS[name]}): SELECT * FROM leads, with no WHERE clause")
            print(_psql(port, token, "SELECT id, name, email FROM leads ORDER BY id"), "\n")
        globex = TENANTS["globex"]
        print("== Tenant acme tries to switch to globex's tenant id")
        print(_psql(port, tokens["acme"], f"SET app.current_tenant = '{globex}'"), "\n")
        print("   The SQL guard refuses it. Now past the guard, with a name it cannot see as a literal:")
        sneaky = (
            f"SELECT set_config('app.' || 'current_tenant', '{globex}', false);"
            " SELECT count(*) AS globex_rows_seen FROM leads"
        )
        print(_psql(port, tokens["acme"], sneaky), "\n")
        print("   The proof no longer matches, so tenant_proxy.current_tenant() is NULL: no rows.\n")
        print("== Tenant acme tries to read the other sessions of the shared upstream role")
        print(_psql(port, tokens["acme"], "SELECT pg_stat_get_backend_activity(s) FROM pg_stat_get_backend_idset() s"))
        print("   The hardening SQL (pg-tenant-proxy sql) took that from the role, with every other way to\n"
              "   reach another tenant's sessions, backends or large objects (docs/security.md).\n")
        print("== Try it yourself:")
        for name, token in tokens.items():
            print(f"PGPASSWORD='{token}' \\\n  psql 'postgresql://{name}@127.0.0.1:{port}/app?sslmode=disable'\n")
        if not serve:
            return 0
        print("Serving until Ctrl-C ...")
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            proxy.wait()
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
        pg.stop()
        print("Stopped and cleaned up.")
