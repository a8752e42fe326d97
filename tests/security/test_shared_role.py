"""The shared upstream role: what one tenant could do to another because all log in upstream as one role.

Every case runs through a real proxy process in both pool modes, against the database the fixtures
prepare with the hardening SQL (proxy/sql/hardening.sql). The guard refuses large objects, backend
signals and notifications by default too; here those switches are on, so what is shown is that the role
itself can no longer do them. Each docstring names the attack and the layer that stops it:
- the hardening SQL (Postgres answers 42501 "permission denied");
- the guard (42501 from the proxy, before Postgres sees the statement);
- the proxy's startup checks (the database allowlist, 3D000).
Where the expected value is Postgres's own answer, the same statement is also run directly as the
upstream role.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from proxy.embedded import EmbeddedPostgres
from support import ACME, GLOBEX, ROWS, ProxyProcess

ROLE_LAYER = {"allow_large_objects": True, "allow_backend_signals": True, "allow_notifications": True}


@pytest.fixture(scope="module", params=["session", "transaction"])
def proxy(
    request: pytest.FixtureRequest, pg: EmbeddedPostgres, tenant_db: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """The proxy under attack in each pool mode, with the guard's own refusals of what the hardening
    removes switched off, so the role layer answers."""
    pool = {"size": 150} if request.param == "session" else {"mode": "transaction", "size": 3}
    process = ProxyProcess(pg, tenant_db, tmp_path_factory.mktemp(request.param), {"pool": pool, "guard": ROLE_LAYER})
    yield process.start()
    process.stop()


@pytest.fixture
def attacker(proxy: ProxyProcess) -> Iterator[psycopg.Connection[Any]]:
    """Tenant ACME, autocommit."""
    with psycopg.connect(proxy.dsn(), password=proxy.token(ACME), autocommit=True) as connection:
        yield connection


@pytest.fixture
def victim(proxy: ProxyProcess) -> Iterator[psycopg.Connection[Any]]:
    """Tenant GLOBEX, inside an open transaction (so it holds its server connection in both modes)."""
    with psycopg.connect(proxy.dsn(user="victim"), password=proxy.token(GLOBEX)) as connection:
        connection.execute("SELECT 'globex-secret-marker', count(*) FROM leads").fetchone()
        yield connection
        connection.rollback()


def direct(pg: EmbeddedPostgres, tenant_db: Any) -> psycopg.Connection[Any]:
    """A connection straight to Postgres as the upstream role, bypassing the proxy."""
    return psycopg.connect(host="127.0.0.1", port=pg.port, user=tenant_db.app_role, password=tenant_db.app_password,
                           dbname=tenant_db.database, sslmode="disable", autocommit=True)


def assert_refused_by_postgres(pg: EmbeddedPostgres, tenant_db: Any, attacker: psycopg.Connection[Any], sql: str,
                               params: tuple[Any, ...] = ()) -> None:
    """The statement gets 42501 through the proxy, exactly as it does directly as the upstream role."""
    with direct(pg, tenant_db) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege) as expected:
        conn.execute(sql, params)
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as through_proxy:
        attacker.execute(sql, params)
    assert through_proxy.value.diag.message_primary == expected.value.diag.message_primary


# -- Other sessions' activity ------------------------------------------------------------------------

@pytest.mark.parametrize("sql", [
    "SELECT pg_stat_get_backend_activity(s) FROM pg_stat_get_backend_idset() s",
    "SELECT query, application_name FROM pg_stat_activity",
    "SELECT query FROM pg_stat_get_activity(NULL)",
    "SELECT pid, objid FROM pg_locks WHERE locktype = 'advisory'",
    "SELECT gid FROM pg_prepared_xacts",
    "SELECT pid, relid FROM pg_stat_progress_vacuum",
    "SELECT statement FROM pg_prepared_statements",
    "SELECT statement FROM pg_catalog.pg_prepared_statement()",
])
def test_other_tenants_sessions_are_not_visible(pg: EmbeddedPostgres, tenant_db: Any, attacker: psycopg.Connection[Any],
                                                victim: psycopg.Connection[Any], sql: str) -> None:
    """Attacker: read tenant B's query text, application_name or locks from the statistics functions and
    views, which show every backend of the shared role. Stopped by: the hardening SQL (EXECUTE and SELECT
    revoked from PUBLIC; the view pg_stat_activity alone was not enough)."""
    assert_refused_by_postgres(pg, tenant_db, attacker, sql)


# -- Signalling other backends ---------------------------------------------------------------------------

@pytest.mark.parametrize("function", ["pg_cancel_backend", "pg_terminate_backend"])
def test_another_tenants_backend_cannot_be_signalled(pg: EmbeddedPostgres, tenant_db: Any,
                                                     attacker: psycopg.Connection[Any],
                                                     victim: psycopg.Connection[Any], function: str) -> None:
    """Attacker: cancel or terminate tenant B's backend (pid learned any way), losing its open
    transaction. Stopped by: the hardening SQL (EXECUTE revoked; kept by pg_signal_backend). B's
    transaction goes on."""
    pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]
    assert_refused_by_postgres(pg, tenant_db, attacker, f"SELECT {function}(%s)", (pid,))
    assert victim.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[GLOBEX]
    assert victim.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS


# -- Large objects -----------------------------------------------------------------------------------

@pytest.fixture
def globex_large_object(pg: EmbeddedPostgres, tenant_db: Any) -> Iterator[int]:
    """A large object owned by the upstream role, as one a tenant created before the hardening would be."""
    oid = int(pg.psql("SELECT lo_from_bytea(0, 'globex secret')", tenant_db.database).strip())
    pg.psql(f"ALTER LARGE OBJECT {oid} OWNER TO {tenant_db.app_role}", tenant_db.database)
    yield oid
    pg.psql(f"SELECT lo_unlink({oid})", tenant_db.database)


@pytest.mark.parametrize("sql", [
    "SELECT lo_get(%s)",
    "SELECT lo_put(%s, 0, 'owned')",
    "SELECT lo_unlink(%s)",
    "SELECT lo_open(%s, 262144)",
    "SELECT lo_create(%s + 1)",
])
def test_another_tenants_large_object_is_out_of_reach(pg: EmbeddedPostgres, tenant_db: Any,
                                                      attacker: psycopg.Connection[Any], globex_large_object: int,
                                                      sql: str) -> None:
    """Attacker: read, overwrite, delete or open tenant B's large object; every large object belongs to
    the shared role and RLS does not cover them. Stopped by: the hardening SQL (the lo_* functions are
    revoked; kept by pg_database_owner). B's object is unchanged."""
    assert_refused_by_postgres(pg, tenant_db, attacker, sql, (globex_large_object,))
    assert pg.psql(f"SELECT convert_from(lo_get({globex_large_object}), 'UTF8')", tenant_db.database).strip() == "globex secret"


def test_large_objects_cannot_be_listed(pg: EmbeddedPostgres, tenant_db: Any, attacker: psycopg.Connection[Any],
                                        globex_large_object: int) -> None:
    """Attacker: list every tenant's large-object OIDs. Stopped by: the hardening SQL (SELECT on
    pg_largeobject_metadata revoked)."""
    assert_refused_by_postgres(pg, tenant_db, attacker, "SELECT oid FROM pg_largeobject_metadata")


def test_large_objects_through_function_calls_are_refused(pg: EmbeddedPostgres, tenant_db: Any,
                                                          proxy: ProxyProcess) -> None:
    """Attacker: reach the large-object functions through FunctionCall messages, as psql's \\lo_import
    does (libpq's fast path), instead of SQL. Stopped by: the hardening SQL (Postgres checks EXECUTE on
    a FunctionCall too), or earlier by the proxy refusing FunctionCall. No large object is created."""
    count = "SELECT count(*) FROM pg_largeobject_metadata"
    before = pg.psql(count, tenant_db.database)
    result = proxy.psql(proxy.token(ACME), f"\\lo_import {pg.logfile}")
    assert result.returncode != 0 and "ERROR" in result.stderr, result
    assert pg.psql(count, tenant_db.database) == before


# -- Notifications, random state, dynamic SQL --------------------------------------------------------------

@pytest.mark.parametrize("sql", [
    "SELECT pg_notify('orders', 'forged')",
    "SELECT setseed(0.5)",
    "SELECT pg_logical_emit_message(true, 'cdc', 'forged')",
    "SELECT query_to_xml('SELECT 1', false, false, '')",
    "SELECT ts_stat('SELECT to_tsvector(name) FROM leads')",
])
def test_builtin_reach_is_revoked(pg: EmbeddedPostgres, tenant_db: Any, attacker: psycopg.Connection[Any],
                                  sql: str) -> None:
    """Attacker: forge a notification on B's channel, seed random() for the next tenant on the server
    connection, write a change-data-capture message, or run SQL given as text. Stopped by: the hardening
    SQL (EXECUTE revoked)."""
    assert_refused_by_postgres(pg, tenant_db, attacker, sql)


def test_listen_notify_never_crosses_tenants(make_proxy: Any) -> None:
    """Attacker (session mode): NOTIFY on the channel tenant B listens to, to forge its events. LISTEN
    and NOTIFY need no privilege at all, so the hardening SQL cannot stop them. Stopped by: the guard,
    which refuses them or scopes each channel to the tenant. B, listening, receives only its own
    notification, sent after the attacker's."""
    session = make_proxy({"pool": {"size": 5}})
    with psycopg.connect(session.dsn(), password=session.token(GLOBEX), autocommit=True) as b, \
            psycopg.connect(session.dsn(), password=session.token(ACME), autocommit=True) as a:
        try:
            b.execute("LISTEN orders")
        except psycopg.errors.InsufficientPrivilege:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                a.execute("NOTIFY orders, 'forged'")
            return
        try:
            a.execute("NOTIFY orders, 'forged'")
        except psycopg.errors.InsufficientPrivilege:
            pass
        b.execute("NOTIFY orders, 'control'")
        received = [n.payload for n in b.notifies(timeout=10, stop_after=1)]
        assert received == ["control"]


def test_explain_analyze_row_counts_are_refused(attacker: psycopg.Connection[Any]) -> None:
    """Attacker: learn tenant B's values from EXPLAIN ANALYZE row counts ("Rows Removed by Filter" counts
    rows RLS hides). No privilege governs EXPLAIN, so the hardening SQL cannot stop it. Stopped by: the
    guard, which refuses EXPLAIN ANALYZE."""
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        attacker.execute("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT * FROM leads WHERE name > 'G'")


# -- The upstream role's own password ---------------------------------------------------------------------

NESTED = "SELECT " + "1+(" * 1000 + "1" + ")" * 1000

PASSWORD_ROUTES = [
    "ALTER ROLE CURRENT_USER PASSWORD 'pwned'",
    "ALTER USER CURRENT_USER WITH PASSWORD 'pwned'",
    "ALTER ROLE SESSION_USER PASSWORD 'pwned'",
    "ALTER ROLE tenant_app PASSWORD 'pwned'",
    "SELECT 1; ALTER ROLE CURRENT_USER PASSWORD 'pwned'",
    f"ALTER ROLE CURRENT_USER PASSWORD 'pwned'; {NESTED}",
    "DO $$ BEGIN EXECUTE 'ALTER ROLE CURRENT_USER PASSWORD ''pwned'''; END $$",
    "SELECT query_to_xml('ALTER ROLE CURRENT_USER PASSWORD ''pwned''', false, false, '')",
    "CREATE FUNCTION pg_temp.pwn() RETURNS void LANGUAGE plpgsql"
    " AS $$ BEGIN EXECUTE 'ALTER ROLE CURRENT_USER PASSWORD ''pwned'''; END $$",
    "CREATE FUNCTION public.pwn() RETURNS void LANGUAGE sql AS $$ ALTER ROLE CURRENT_USER PASSWORD 'pwned' $$",
    "CREATE PROCEDURE public.pwn() LANGUAGE sql AS $$ ALTER ROLE CURRENT_USER PASSWORD 'pwned' $$",
]


@pytest.fixture
def password_kept(pg: EmbeddedPostgres, tenant_db: Any) -> Iterator[None]:
    """After the test, the upstream role's password still logs in; whatever happened, it is restored."""
    try:
        yield
        with direct(pg, tenant_db) as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == tenant_db.app_role
    finally:
        pg.psql(f"ALTER ROLE {tenant_db.app_role} PASSWORD '{tenant_db.app_password}'")


@pytest.mark.parametrize("sql", PASSWORD_ROUTES)
def test_the_upstream_password_is_out_of_reach(request: pytest.FixtureRequest, attacker: psycopg.Connection[Any],
                                               password_kept: None, sql: str) -> None:
    """Attacker: change the shared role's password (then terminate its backends: every tenant is locked
    out and the attacker logs in directly). Postgres lets any role change its own password. Stopped by:
    the guard (ALTER ROLE, failing closed on what it cannot parse), and by the hardening SQL for every
    route that would hide the statement from it (no plpgsql, no TEMP, no CREATE, no query_to_xml). Under
    transaction pooling the guard refuses a function created in pg_temp itself (0A000), first."""
    temporary = "pg_temp." in sql and request.node.callspec.params["proxy"] == "transaction"
    with pytest.raises(psycopg.errors.FeatureNotSupported if temporary else psycopg.errors.InsufficientPrivilege):
        attacker.execute(sql)


def test_do_blocks_allowed_by_the_guard_still_cannot_alter_the_role(make_proxy: Any, password_kept: None) -> None:
    """With [guard] allow_do = true, a DO block reaches Postgres. Stopped by: the hardening SQL (no USAGE
    on plpgsql), so EXECUTE 'ALTER ROLE ...' never runs."""
    permissive = make_proxy({"guard": {"allow_do": True}})
    with psycopg.connect(permissive.dsn(), password=permissive.token(ACME), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="language plpgsql"):
            conn.execute("DO $$ BEGIN EXECUTE 'ALTER ROLE CURRENT_USER PASSWORD ''pwned'''; END $$")


# -- Databases ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("database", ["postgres", "template1", "nowhere"])
def test_only_the_configured_database_is_reachable(proxy: ProxyProcess, database: str) -> None:
    """Attacker: log into postgres or template1 (a full pool in each), or probe which databases exist.
    Stopped by: the proxy's startup check ([upstream] databases allowlist, UpstreamSettings.allowed),
    with one message for existing and missing databases."""
    with pytest.raises(psycopg.OperationalError, match=f'FATAL:  database "{database}" is not available through this proxy'):
        psycopg.connect(proxy.dsn(database=database), password=proxy.token(ACME))
