"""The Go drivers pgx (v4) and lib/pq through a real proxy in both pool modes, each program compared step by
step with the same program run directly against Postgres as the application role.

The programs (tests/integration/clients/go_pgx.go, go_pq.go) print one JSON object per step; they are
compiled once per test session in GOPATH mode against Debian's packages (golang-go,
golang-github-jackc-pgx-v4-dev, golang-github-lib-pq-dev; .ci/run installs them: there is no Go module
proxy to fetch them from). Direct runs set each connection's signed tenant context themselves (the proof
the proxy would set, from the signing key), so Row-Level Security gives both runs the same rows. Each
run creates its own tables through a superuser connection straight to Postgres (`admin`), which also
alters a table under pgx's cached statements. Transaction mode has two server connections, so the
programs' transactions held open on one connection move the others' statements between server
connections.

The one difference README and docs/guard.md document: LISTEN is refused by the proxy (42501 in session
mode, 0A000 in transaction mode), with a clear error, and the connection goes on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import driver_scripts
from driver_scripts import LISTEN_REFUSED, MODES, assert_same_steps, without_listen
from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres
from support import ACME, ProxyProcess, pool_mode_fixtures, wait_until

CLIENTS = Path(__file__).parent / "clients"
GOPATH = Path("/usr/share/gocode")
PACKAGES = "golang-go golang-github-jackc-pgx-v4-dev golang-github-lib-pq-dev"

mode, pooled = pool_mode_fixtures(MODES)


@pytest.fixture(scope="session")
def go_programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """go_pgx.go and go_pq.go, built once per session. Without Go or the drivers the tests fail: .ci/run
    installs them."""
    go = shutil.which("go")
    assert go, f"`go` is missing: install Debian's {PACKAGES} (.ci/run does)"
    for package in ("github.com/jackc/pgx/v4", "github.com/lib/pq"):
        assert (GOPATH / "src" / package).is_dir(), f"{package} is missing from {GOPATH}: install Debian's {PACKAGES} (.ci/run does)"
    out = tmp_path_factory.mktemp("go")
    environment = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{out / 'gopath'}:{GOPATH}", "GOCACHE": str(out / "cache"),
                   "GOFLAGS": "", "CGO_ENABLED": "0"}
    built = {}
    for name in ("go_pgx", "go_pq"):
        result = subprocess.run([go, "build", "-o", str(out / name), f"{name}.go", "go_common.go"], cwd=CLIENTS, env=environment,
                                capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, f"go build {name}.go go_common.go:\n{result.stdout}{result.stderr}"
        built[name] = out / name
    return built


LONG = "pg_sleep(30)"  # in the statements the programs cancel: 30 s a row for 100 rows if nothing cancels them


def assert_nothing_left_running(pg: EmbeddedPostgres) -> None:
    """After a program ended, none of the statements it cancelled still runs on the server (the cancels
    reached them, also those lib/pq sends while it closes its connection); left running, they are ended
    here, as they would hold their snapshots against every later test's CREATE INDEX CONCURRENTLY."""
    probe = (f"FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%{LONG}%'"
             " AND query NOT LIKE '%pg_stat_activity%'")
    try:
        wait_until(lambda: pg.psql(f"SELECT count(*) {probe}").strip() == "0", deadline=10.0)
    except AssertionError:
        pg.psql(f"SELECT pg_terminate_backend(pid) {probe}")
        raise AssertionError("a statement the program cancelled still ran on the server 10 s after it ended") from None


def direct_run(program: Path, pg: EmbeddedPostgres, db: TenantDatabase) -> list[dict[str, Any]]:
    steps = driver_scripts.direct_run([str(program)], pg, db, timeout=90.0, admin=pg.admin_dsn(db.database),
                                      app_role=db.app_role)
    assert_nothing_left_running(pg)
    return steps


def proxy_run(program: Path, proxy: ProxyProcess, pg: EmbeddedPostgres, db: TenantDatabase) -> list[dict[str, Any]]:
    steps = driver_scripts.proxy_run([str(program)], proxy, timeout=90.0, admin=pg.admin_dsn(db.database),
                                     app_role=db.app_role)
    assert_nothing_left_running(pg)
    return steps


def assert_as_directly(program: Path, mode: str, pooled: ProxyProcess, pg: EmbeddedPostgres,
                       tenant_db: TenantDatabase) -> None:
    """The program's steps through the proxy are those of its direct run, but LISTEN, refused as documented
    with the connection going on (the Ping after it)."""
    expected, direct_listen = without_listen(direct_run(program, pg, tenant_db))
    assert direct_listen["result"] is None
    assert expected[1]["result"]["rows"] == [[2, ACME]]  # the context held directly
    got, listen = without_listen(proxy_run(program, pooled, pg, tenant_db))
    assert_same_steps(expected, got)
    code, message = LISTEN_REFUSED[mode]
    assert (listen["error"]["code"], listen["error"]["message"]) == (code, message)
    assert listen["partial"] is None  # Ping after the refusal: the connection goes on


def test_pgx_as_directly(mode: str, pooled: ProxyProcess, go_programs: dict[str, Path], pg: EmbeddedPostgres,
                         tenant_db: TenantDatabase) -> None:
    """pgx's statement cache (named), its describe-only cache, no cache, pgconn's ExecParams and the simple
    protocol; Batch, CopyFrom, transactions, savepoints, errors inside batches and transactions; a cached
    statement whose result shape changes (0A000, then prepared again); PgConn.CancelRequest and a cancelled
    context; DEALLOCATE ALL and DISCARD ALL by the application; SET, set_config, RuntimeParams; pgxpool
    with more goroutines than connections for two tenants: the same results through the proxy as directly."""
    assert_as_directly(go_programs["go_pgx"], mode, pooled, pg, tenant_db)


def test_lib_pq_as_directly(mode: str, pooled: ProxyProcess, go_programs: dict[str, Path], pg: EmbeddedPostgres,
                            tenant_db: TenantDatabase) -> None:
    """database/sql with lib/pq: the unnamed statement parsed and described in one Sync group and bound in
    the next (binary_parameters=yes: one group), simple Queries with several results, db.Prepare on
    pooled connections, transactions with options, pq.CopyIn, a prepared statement whose result shape
    changes, startup parameters from the DSN, a cancelled context, pools with more goroutines than
    connections for two tenants: the same results through the proxy as directly."""
    assert_as_directly(go_programs["go_pq"], mode, pooled, pg, tenant_db)
