"""psqlodbc (through pyodbc and unixODBC) and Ruby's `pg` gem (libpq) through a real proxy in both pool
modes, each script compared step by step with the same script run directly against Postgres as the
application role.

The scripts (tests/integration/clients/odbc_pyodbc.py, ruby_pg.rb) print one JSON object per step, with
the result or the error (SQLSTATE and message). Direct runs set each connection's signed tenant context
themselves (the proof the proxy would set, from the signing key), so Row-Level Security gives both runs
the same rows; each script is run directly once per module. Transaction mode has two server connections
for two tenants' clients: the scripts hold a transaction open on one client while the other runs
statements, so server connections move between clients and tenants.

The one difference that README and docs/pool-modes.md document: psqlodbc's UseDeclareFetch=1 reads
every result through `DECLARE ... CURSOR WITH HOLD` (with autocommit on or off), which transaction
pooling refuses (0A000, the session goes on); those variants are compared in session mode only, and
in transaction mode the refusal is checked.

psqlodbc is Debian's `odbc-postgresql` (with `unixodbc`), pyodbc comes from PyPI (the test extra), and
the gem is Debian's `ruby-pg`; .ci/run installs them. A missing one fails the test, it does not skip.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from driver_scripts import MODES, assert_same_steps, direct_run, proxy_run
from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres
from support import ACME, ProxyProcess, pool_mode_fixtures

CLIENTS = Path(__file__).parent / "clients"
DECLARE_FETCH = ("[declare fetch]", "[declare fetch, statement rollback]", "[no server prepare, declare fetch]")
WITH_HOLD_REFUSED = "DECLARE ... WITH HOLD is not available with transaction pooling"

mode, pooled = pool_mode_fixtures(MODES)


@pytest.fixture(scope="module")
def odbc() -> list[str]:
    check = ("import pyodbc, sys; drivers = pyodbc.drivers();"
             " sys.exit(0 if 'PostgreSQL Unicode' in drivers else 'no ODBC driver PostgreSQL Unicode in %s' % drivers)")
    found = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=False)
    assert found.returncode == 0, ("psqlodbc: pyodbc from PyPI (the test extra) and Debian's odbc-postgresql and unixodbc"
                                   " (.ci/run installs them): " + found.stderr)
    return [sys.executable, str(CLIENTS / "odbc_pyodbc.py")]


@pytest.fixture(scope="module")
def ruby_pg() -> list[str]:
    found = subprocess.run(["ruby", "-rpg", "-e", "exit(PG::Connection.method_defined?(:enter_pipeline_mode) ? 0 : 3)"],
                           capture_output=True, text=True, check=False)
    assert found.returncode == 0, ("Ruby's pg gem (with pipeline mode, libpq 14+) comes from Debian's ruby-pg"
                                   " (.ci/run installs it): " + found.stderr)
    return ["ruby", str(CLIENTS / "ruby_pg.rb")]





@pytest.fixture(scope="module")
def odbc_directly(odbc: list[str], pg: EmbeddedPostgres, tenant_db: TenantDatabase, drivers_scratch: str) -> list[dict[str, Any]]:
    steps = direct_run(odbc, pg, tenant_db)
    assert {"step": "[defaults] tenant", "result": [[2, ACME]]} in steps  # the context held directly
    return steps


@pytest.fixture(scope="module")
def ruby_directly(ruby_pg: list[str], pg: EmbeddedPostgres, tenant_db: TenantDatabase, drivers_scratch: str) -> list[dict[str, Any]]:
    steps = direct_run(ruby_pg, pg, tenant_db)
    assert steps[0]["result"]["rows"] == [["2", ACME]]  # the context held directly
    return steps



def test_psqlodbc_as_directly(mode: str, pooled: ProxyProcess, odbc: list[str], odbc_directly: list[dict[str, Any]]) -> None:
    """psqlodbc's connect-time SETs, UseServerSidePrepare=0/1, Protocol=7.4-0/1/2 (no rollback,
    transaction rollback, statement rollback with its SAVEPOINTs), UseDeclareFetch (session mode),
    parameters of many types, a statement reused while another client holds a server connection,
    executemany (with and without parameter arrays, and with an error), large results read in pieces and
    abandoned, errors with autocommit on and in transactions with autocommit off, savepoints,
    SET TRANSACTION, settings that follow the client, catalog functions, SQLCancel, ConnSettings,
    SSLmode=prefer, SQL_ATTR_TXN_ISOLATION, large parameters, and clients that leave with a transaction
    open: the same results through the proxy as directly."""
    if mode == "session":
        expected, got = odbc_directly, proxy_run(odbc, pooled)
    else:
        expected = [step for step in odbc_directly if not step["step"].startswith(DECLARE_FETCH)]
        variants = sorted({step["step"].split("]")[0][1:] for step in expected if step["step"].startswith("[")})
        got = proxy_run(odbc, pooled, variants=variants + ["cancel", "extra"])
    assert_same_steps(expected, got)


def test_psqlodbc_declare_fetch_refused_in_transaction_mode(make_proxy: Any, odbc: list[str], drivers_scratch: str) -> None:
    """UseDeclareFetch=1 declares its cursors WITH HOLD, which transaction pooling refuses with a clear
    error (docs/pool-modes.md); statements without a result set still run and the session goes on."""
    proxy = make_proxy(MODES["transaction"])
    steps = {step["step"]: step for step in proxy_run(odbc, proxy, variants=["declare fetch"])}
    refused = steps["[declare fetch] tenant"]["error"]
    assert refused["state"] == "0A000" and WITH_HOLD_REFUSED in refused["message"], refused
    assert steps["[declare fetch] executemany"]["result"][0] == -1  # the INSERTs ran
    assert isinstance(steps["[declare fetch] cleanup"]["result"], int)


def test_ruby_pg_as_directly(mode: str, pooled: ProxyProcess, ruby_pg: list[str], ruby_directly: list[dict[str, Any]]) -> None:
    """exec (several statements, errors), exec_params (text and binary), prepare/exec_prepared with
    describe_prepared and describe_portal while another client holds a server connection, DEALLOCATE,
    the transaction block, errors in a transaction, savepoints, async_exec and sync_exec, send_query +
    get_result, single-row mode, large results and parameters, copy_data in (with bad data and an
    application error) and out, pipeline mode (errors, a transaction across Sync groups, a flush
    request, two clients' pipelines interleaved), cancel, the basic type maps, parameter_status after
    SETs, startup options, sslmode=prefer and target_session_attrs, client_encoding LATIN1, search_path
    and a prepared statement, reset, notices and empty queries, and clients that leave mid-way: the same
    results through the proxy as directly."""
    assert_same_steps(ruby_directly, proxy_run(ruby_pg, pooled))
