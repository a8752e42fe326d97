"""Transaction mode with `[guard] enabled = false`: statements that refuse transaction blocks (DISCARD ALL,
VACUUM, CREATE INDEX CONCURRENTLY) run as they do directly against Postgres, although no guard classifies
them for the relay; and a client's DISCARD ALL / DEALLOCATE ALL does not break the proxy's own prepared
statements for the next client on that server connection."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from support import ACME, ProxyProcess
from proxy.embedded import EmbeddedPostgres

NO_BLOCK = ["DISCARD ALL", "VACUUM leads", "CREATE INDEX CONCURRENTLY IF NOT EXISTS leads_unguarded ON leads (id)",
            "DROP INDEX CONCURRENTLY IF EXISTS leads_unguarded"]


@pytest.fixture(scope="module")
def unguarded(pg: EmbeddedPostgres, tenant_db: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    process = ProxyProcess(pg, tenant_db, tmp_path_factory.mktemp("unguarded"),
                           {"pool": {"mode": "transaction", "size": 1}, "guard": {"enabled": False}}).start()
    yield process
    process.stop()


def direct(pg: EmbeddedPostgres, tenant_db: Any, sql: str) -> str:
    """The outcome of `sql` as one autocommit Query straight to Postgres, as the proxy's upstream role."""
    with psycopg.connect(host="127.0.0.1", port=pg.port, dbname=tenant_db.database, user=tenant_db.app_role,
                         password=tenant_db.app_password, autocommit=True) as conn:
        return _outcome(conn, sql)


def _outcome(conn: psycopg.Connection[Any], sql: str) -> str:
    try:
        conn.execute(sql)
    except psycopg.Error as exc:
        return f"error {exc.sqlstate}"
    return "ok"


@pytest.mark.parametrize("sql", NO_BLOCK)
def test_statements_that_refuse_a_block_run_as_directly(unguarded: ProxyProcess, pg: EmbeddedPostgres,
                                                       tenant_db: Any, sql: str) -> None:
    expected = direct(pg, tenant_db, sql)
    with psycopg.connect(unguarded.dsn(), password=unguarded.token(ACME), autocommit=True) as conn:
        assert _outcome(conn, sql) == expected
        assert conn.execute("SELECT tenant_proxy.current_tenant()").fetchone() == (ACME,)


@pytest.mark.parametrize("sql", ["DISCARD ALL", "DEALLOCATE ALL"])
def test_another_clients_discard_leaves_my_prepared_statement(unguarded: ProxyProcess, sql: str) -> None:
    """One server connection, two clients of one tenant: the second's DISCARD ALL / DEALLOCATE ALL drops
    the statements on the server connection; the first client's statement still works, as it does
    directly (where it lives in the first client's own session)."""
    token = unguarded.token(ACME)
    with psycopg.connect(unguarded.dsn(), password=token, autocommit=True) as mine, \
            psycopg.connect(unguarded.dsn(), password=token, autocommit=True) as other:
        query = "SELECT count(*) FROM leads WHERE id > %s"
        first = mine.execute(query, (0,), prepare=True).fetchone()
        other.execute(sql)
        assert mine.execute(query, (0,), prepare=True).fetchone() == first


def test_another_clients_setting_is_not_mine(unguarded: ProxyProcess) -> None:
    """A SET of one client is not visible to another client of the same tenant on the same connection."""
    token = unguarded.token(ACME)
    with psycopg.connect(unguarded.dsn(), password=token, autocommit=True) as mine, \
            psycopg.connect(unguarded.dsn(), password=token, autocommit=True) as other:
        before = mine.execute("SHOW statement_timeout").fetchone()
        other.execute("SET statement_timeout = '1234s'")
        assert mine.execute("SHOW statement_timeout").fetchone() == before
        assert other.execute("SHOW statement_timeout").fetchone() == ("1234s",)
