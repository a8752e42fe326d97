"""node-postgres (`pg`) and Perl DBI with DBD::Pg through a real proxy in both pool modes, each script
compared step by step with the same script run directly against Postgres as the application role.

The scripts (tests/integration/clients/node_pg.js, dbd_pg.pl) print one JSON object per step. Direct
runs set each connection's signed tenant context themselves (the proof the proxy would set, from the
signing key), so Row-Level Security gives both runs the same rows. Transaction mode has two server
connections: the scripts hold a transaction open on one client while another runs statements, so a named
statement moves between server connections (with one, the clients would wait for each other).

The one difference README and docs/guard.md document: LISTEN is refused by the proxy (42501 in session
mode, where the guard refuses notifications by default; 0A000 in transaction mode), with a clear error,
and the connection goes on. node-postgres comes from the npm registry (tests/integration/clients/package.json),
DBD::Pg from Debian's `libdbd-pg-perl`; .ci/run installs both.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from driver_scripts import LISTEN_REFUSED, MODES, assert_same_steps, direct_run, proxy_run, without_listen
from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres
from support import ACME, ProxyProcess, pool_mode_fixtures

CLIENTS = Path(__file__).parent / "clients"

mode, pooled = pool_mode_fixtures(MODES)


@pytest.fixture(scope="module")
def node_pg() -> list[str]:
    found = subprocess.run(["node", "-e", "require('pg'); require('pg-cursor')"], cwd=CLIENTS,
                           capture_output=True, text=True, check=False)
    assert found.returncode == 0, ("node-postgres: `npm install` in tests/integration/clients (.ci/run does it): "
                                   + found.stderr)
    return ["node", str(CLIENTS / "node_pg.js")]


@pytest.fixture(scope="module")
def dbd_pg() -> list[str]:
    found = subprocess.run(["perl", "-MDBD::Pg", "-e1"], capture_output=True, text=True, check=False)
    assert found.returncode == 0, "DBD::Pg comes from the Debian package libdbd-pg-perl (.ci/run installs it): " + found.stderr
    return ["perl", str(CLIENTS / "dbd_pg.pl")]







def test_node_pg_as_directly(mode: str, pooled: ProxyProcess, node_pg: list[str], pg: EmbeddedPostgres,
                             tenant_db: TenantDatabase, drivers_scratch: str) -> None:
    """The unnamed statement (Parse/Bind/Describe/Execute/Sync in one write), named statements across
    transactions and server connections, rowMode 'array', multi-statement Queries and errors among
    them, transactions, pg-cursor's row-limited Executes with Flush, COPY through client.query, a
    pg.Pool of 8 clients with 40 concurrent queries, Client.cancel, startup parameters
    (statement_timeout, application_name, idle_in_transaction_session_timeout and its FATAL) and the
    client-side query_timeout: the same results through the proxy as directly."""
    expected, direct_listen = without_listen(direct_run(node_pg, pg, tenant_db))
    assert direct_listen["result"] == "LISTEN"
    assert {"step": "unnamed count", "result": [{"n": 2, "tenant": ACME}]} in expected  # the context held directly
    got, listen = without_listen(proxy_run(node_pg, pooled))
    assert_same_steps(expected, got)
    code, message = LISTEN_REFUSED[mode]
    assert (listen["error"]["code"], listen["error"]["message"]) == (code, message)


def test_dbd_pg_as_directly(mode: str, pooled: ProxyProcess, dbd_pg: list[str], pg: EmbeddedPostgres,
                            tenant_db: TenantDatabase, drivers_scratch: str) -> None:
    """Server-side prepares (dbdpg_p<pid>_<n>) and the SQL DEALLOCATE DBD::Pg sends when a handle goes,
    inside transactions with AutoCommit off and after the ROLLBACK (TO SAVEPOINT) it sends first in a
    failed one; pg_placeholder_dollaronly, do with binds, begin_work/commit/rollback, savepoints,
    pg_async with pg_cancel, ping, COPY with pg_putcopydata/pg_putcopyend and pg_getcopydata: the same
    results through the proxy as directly."""
    expected, direct_listen = without_listen(direct_run(dbd_pg, pg, tenant_db))
    assert direct_listen["result"] == ["0E0", 1]
    got, listen = without_listen(proxy_run(dbd_pg, pooled))
    assert_same_steps(expected, got)
    code, message = LISTEN_REFUSED[mode]
    refused, ping = listen["result"]
    assert refused["state"] == code and refused["message"].startswith(f"ERROR:  {message}\nHINT:  ")
    assert ping == 1  # idle, the session goes on


def test_dbd_pg_cancel_right_behind_its_query(pooled: ProxyProcess) -> None:
    """pg_async then pg_cancel at once: the cancel races the query, as it does directly (Postgres ignores a
    cancel that arrives while the backend reads its next message), so each round is cancelled or
    completes. Before the fix, a cancel landing on the Parse of the proxy's context statement (on a new
    server connection, in transaction mode) left the client a bare ReadyForQuery, which DBD::Pg reports
    as 08000 "Failed to get a result after PQcancel"."""
    config = {"host": "127.0.0.1", "port": pooled.port, "database": "app", "user": "alice",
              "password": pooled.token(ACME), "rounds": 80}
    result = subprocess.run(["perl", str(CLIENTS / "dbd_pg_cancel.pl")], env={**os.environ, "DRIVER_CONFIG": json.dumps(config)},
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    outcomes = Counter(result.stdout.splitlines())
    assert set(outcomes) <= {"cancelled", "completed"} and outcomes["cancelled"], outcomes
