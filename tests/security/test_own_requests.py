"""The proxy's own requests (the settings read-back, the re-apply after a reset) never abort a client's
transaction. A client may name settings it may not read: a `SET hba_file = ...` fails, but the read-back
of that name must not then fail inside the client's next transaction block (current_setting() raises
42501 for settings that need pg_read_all_settings, even with missing_ok). Each client's steps are run
directly against Postgres as the proxy's role too, and must end the same way."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from proxy.embedded import EmbeddedPostgres
from support import ACME, ProxyProcess

UNREADABLE = [
    "SET hba_file = 'x'", "RESET config_file", "SET data_directory TO DEFAULT",
    "SELECT set_config('config_file', 'x', false)", "SET log_directory = 'x'",
    "SET session_preload_libraries = 'x'", "BEGIN; SET LOCAL ident_file = 'x'",
    "SET myapp.x = '1'; SET hba_file = 'x'",
]
BLOCK = ["BEGIN", "SELECT 1", "SAVEPOINT a", "SHOW application_name", "RELEASE a", "COMMIT"]


def steps(conn: psycopg.Connection[Any], first: str, extended: bool) -> list[str]:
    """The outcome of `first` (as a simple Query, or through Parse/Bind/Execute), then of a transaction
    block (psycopg's BEGIN, two statements, COMMIT), then of each statement of one sent as simple Queries."""
    outcomes = []

    def run(step: Any) -> None:
        try:
            step()
            outcomes.append("ok")
        except psycopg.Error as exc:
            outcomes.append(str(exc.sqlstate))

    def block() -> None:
        with conn.transaction():
            conn.execute("SELECT 1")
            conn.execute("SELECT 2")

    run(lambda: (conn if extended and ";" not in first else psycopg.ClientCursor(conn)).execute(first))
    if first.startswith("BEGIN"):
        run(lambda: conn.execute("ROLLBACK"))
    run(block)
    for sql in BLOCK:
        run(lambda: psycopg.ClientCursor(conn).execute(sql))
    run(block)
    return outcomes


@pytest.mark.parametrize("extended", [False, True], ids=["simple", "extended"])
@pytest.mark.parametrize("first", UNREADABLE)
def test_a_setting_the_role_may_not_read_never_aborts_a_later_transaction(
        make_proxy: Any, pg: EmbeddedPostgres, tenant_db: Any, first: str, extended: bool) -> None:
    proxy: ProxyProcess = make_proxy({"pool": {"mode": "transaction", "size": 1}})  # a fresh server connection
    with psycopg.connect(host="127.0.0.1", port=pg.port, dbname=tenant_db.database, user=tenant_db.app_role,
                         password=tenant_db.app_password, autocommit=True) as direct:
        expected = steps(direct, first, extended)
    with psycopg.connect(proxy.dsn(), password=proxy.token(ACME), autocommit=True) as conn:
        assert steps(conn, first, extended) == expected
        assert conn.execute("SELECT tenant_proxy.current_tenant()").fetchone() == (ACME,)
