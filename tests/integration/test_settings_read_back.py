"""Transaction mode: what a client's settings read-back records must be settings the client really holds
at session level, and that the proxy can apply again. A `SET` that Postgres refuses (a superuser-only
setting, 42501) or one that lasts a single transaction (`SET transaction_deferrable = on` outside a
block) leaves the session as it was, directly; through the proxy it must not end the client's session
later, nor the session of the next client that gets the server connection."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from support import ACME, ProxyProcess
from proxy.embedded import EmbeddedPostgres

# Statements Postgres refuses or keeps for one transaction only: none leaves a session setting.
NO_SESSION_SETTING = [
    "SET max_stack_depth = '100kB'",
    "SET session_replication_role = replica",
    "SELECT set_config('log_statement', 'all', false)",
    "SET transaction_deferrable = on",
    "SET transaction_read_only = on",
    "SET transaction_isolation = 'serializable'",
]
STEPS = ["SELECT 1", "SHOW transaction_read_only", "SHOW transaction_deferrable", "SHOW max_stack_depth",
         "SHOW session_replication_role"]


@pytest.fixture(scope="module")
def single(pg: EmbeddedPostgres, tenant_db: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    process = ProxyProcess(pg, tenant_db, tmp_path_factory.mktemp("read_back"),
                           {"pool": {"mode": "transaction", "size": 1}}).start()
    yield process
    process.stop()


def _outcome(conn: psycopg.Connection[Any], sql: str) -> str:
    try:
        cursor = conn.execute(sql)
    except psycopg.Error as exc:
        return f"error {exc.sqlstate}"
    return repr(cursor.fetchall()) if cursor.description else "ok"


def _direct(pg: EmbeddedPostgres, tenant_db: Any, sql: str) -> list[str]:
    """`sql` then STEPS, each an autocommit Query straight to Postgres as the proxy's upstream role."""
    with psycopg.connect(host="127.0.0.1", port=pg.port, dbname=tenant_db.database, user=tenant_db.app_role,
                         password=tenant_db.app_password, autocommit=True) as conn:
        return [_outcome(conn, step) for step in [sql, *STEPS]]


@pytest.mark.parametrize("sql", NO_SESSION_SETTING)
def test_a_setting_that_does_not_stay_costs_no_session(single: ProxyProcess, pg: EmbeddedPostgres, tenant_db: Any,
                                                      sql: str) -> None:
    """One server connection. The client sends `sql`, another client of the same tenant takes the
    connection, then the first goes on: both get what Postgres gives directly, no session ends."""
    expected = _direct(pg, tenant_db, sql)
    token = single.token(ACME)
    with psycopg.connect(single.dsn(), password=token, autocommit=True) as mine, \
            psycopg.connect(single.dsn(), password=token, autocommit=True) as other:
        assert _outcome(other, "SELECT 1") == "[(1,)]"  # the other client has held the connection before
        assert _outcome(mine, sql) == expected[0]
        assert [_outcome(other, step) for step in STEPS] == expected[1:]
        assert [_outcome(mine, step) for step in STEPS] == expected[1:]
        assert [_outcome(other, step) for step in STEPS] == expected[1:]


def test_settings_beyond_the_limit_end_the_session_not_the_proxy(single: ProxyProcess) -> None:
    """What the proxy keeps of a client's settings is bounded ([client] max_settings_bytes, 1 MiB): a
    client that leaves 2 MB in a placeholder setting gets 53400 and its session ends; without the bound
    each client made the proxy hold whatever its settings held (80 MB for two 40 MB values). The next
    client of the tenant on that server connection does not see the value."""
    token = single.token(ACME)
    with psycopg.connect(single.dsn(), password=token, autocommit=True) as big:
        big.execute("SELECT set_config('big.value', repeat('x', 2000000), false)")
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded, match=r"max_settings_bytes = 1048576"):
            big.execute("SELECT 1")
    with psycopg.connect(single.dsn(), password=token, autocommit=True) as other:
        assert other.execute("SELECT coalesce(current_setting('big.value', true), '')").fetchone() == ("",)
        other.execute("SELECT set_config('small.value', repeat('x', 1000), false)")
        assert other.execute("SELECT length(current_setting('small.value'))").fetchone() == (1000,)
    assert single.alive()
