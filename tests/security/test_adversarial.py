"""Adversarial suite: a tenant with psql and a token tries to read, write or learn another tenant's rows.

Every case runs through the real proxy against a real Postgres with two tenants, and the cases that
use the `proxy` fixture run twice: in session mode and in transaction mode (a small pool shared by
both tenants). Each says what an attacker would try and which layer stops it:
- the guard (pglast) refuses with 42501 and a clear message;
- the verifier (signed context) returns NULL, so strict policies return no rows;
- RLS WITH CHECK refuses writes;
- the proxy's startup checks refuse the connection.
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import psycopg
import pytest

from support import ACME, GLOBEX, ROWS, ProxyProcess
from proxy.embedded import EmbeddedPostgres
from proxy.tenant import sign

FORGED_PROOF = "99999999999:" + "0" * 64


def count(conn: psycopg.Connection[Any], table: str = "leads") -> int:
    return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def other_tenant_rows(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute("SELECT count(*) FROM leads WHERE tenant_id <> %s", (ACME,)).fetchone()[0])


def assert_isolated(conn: psycopg.Connection[Any]) -> None:
    """The session still sees its own rows and none of the other tenant's."""
    assert other_tenant_rows(conn) == 0
    assert count(conn) == ROWS[ACME]


# -- 1. Every way of writing the tenant setting or the proof ------------------------------------

@pytest.mark.parametrize(
    "sql",
    [
        f"SET app.current_tenant = '{GLOBEX}'",
        f"SET SESSION app.current_tenant TO '{GLOBEX}'",
        f"SET tenant_proxy.proof = '{FORGED_PROOF}'",
        f"SELECT set_config('app.current_tenant', '{GLOBEX}', false)",
        f"WITH c AS (SELECT set_config('app.current_tenant', '{GLOBEX}', false)) SELECT * FROM c",
        f"SELECT count(*) FROM leads WHERE set_config('app.current_tenant', '{GLOBEX}', false) IS NOT NULL",
        "RESET app.current_tenant",
        f"SELECT 1; SET app.current_tenant = '{GLOBEX}'; SELECT 2",
        # A COLLATE clause leaves the constant the name it was (Postgres sets the setting).
        f"SELECT set_config('app.current_tenant' COLLATE \"C\", '{GLOBEX}', false)",
        f"SELECT set_config(('tenant_proxy.proof' COLLATE \"C\")::text, '{FORGED_PROOF}', false)",
        f"SELECT set_config(text('app.current_tenant'), '{GLOBEX}', false)",  # a function-style cast
    ],
)
def test_writing_the_context_is_refused_by_the_guard(conn: psycopg.Connection[Any], sql: str) -> None:
    """Attacker: switch the session to tenant B with SQL. Stopped by: the guard (42501)."""
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="protected"):
        conn.execute(sql)
    assert_isolated(conn)


def test_set_local_in_a_transaction_is_refused_and_fails_the_transaction(proxy: ProxyProcess) -> None:
    """Attacker: SET LOCAL inside a transaction. Stopped by: the guard; the transaction is aborted as
    Postgres would abort it, so a later COMMIT commits nothing."""
    with psycopg.connect(proxy.dsn(), password=proxy.token(ACME)) as conn:
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"SET LOCAL app.current_tenant = '{GLOBEX}'")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT count(*) FROM leads")
        conn.rollback()
        assert_isolated(conn)


@pytest.mark.parametrize(
    "sql",
    [
        f"SELECT set_config('app.' || 'current_tenant', '{GLOBEX}', false)",
        f"SELECT set_config(concat('app.', 'current_tenant'), '{GLOBEX}', false)",
        f"SELECT set_config('tenant_proxy.' || 'proof', '{FORGED_PROOF}', false)",
    ],
)
def test_writes_past_the_guard_are_worthless(proxy: ProxyProcess, conn: psycopg.Connection[Any], sql: str) -> None:
    """Attacker: hide the setting's name from the parser. Stopped by: the verifier (no valid proof).

    In session mode the broken context stays broken: no rows at all (fail closed). In transaction mode
    the proxy sets the context at the start of every transaction: the client's next transaction sees its
    own rows again, never another tenant's."""
    conn.execute(sql)
    assert other_tenant_rows(conn) == 0
    healed = 'mode = "transaction"' in proxy.config.read_text()
    assert count(conn) == (ROWS[ACME] if healed else 0)


def test_dynamic_sql_in_a_string_is_revoked(conn: psycopg.Connection[Any]) -> None:
    """Attacker: hide set_config in SQL text the guard never parses (query_to_xml). Stopped by: the
    hardening SQL (EXECUTE on the query_to_xml family revoked), and behind it the verifier."""
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="query_to_xml"):
        conn.execute(f"SELECT query_to_xml('SELECT set_config(''app.current_tenant'', ''{GLOBEX}'', false)', false, false, '')")
    assert_isolated(conn)


def test_a_stolen_proof_from_another_backend_is_worthless(
    proxy: ProxyProcess, conn: psycopg.Connection[Any], tenant_db: Any
) -> None:
    """Attacker: learn B's proof (for B's backend) and present it. Stopped by: the pid binding.
    (The attacker cannot compute a proof for its own backend without the key.) In transaction mode the
    proxy's context for each transaction overrides the forged session value: the client sees its own rows."""
    proof = sign(tenant_db.signing_key.encode(), GLOBEX, 1, int(time.time()) + 600)
    conn.execute("SELECT set_config('app.' || 'current_tenant', %s, false), set_config('tenant_proxy.' || 'proof', %s, false)",
                 (GLOBEX, proof))
    assert other_tenant_rows(conn) == 0
    assert count(conn) == (ROWS[ACME] if 'mode = "transaction"' in proxy.config.read_text() else 0)


def test_an_expired_proof_is_worthless(pg: EmbeddedPostgres, tenant_db: Any) -> None:
    """Attacker: replay a proof after its expiry on the same backend. Stopped by: the verifier's
    expiry check (and the proxy ends the session when the token expires)."""
    with psycopg.connect(host="127.0.0.1", port=pg.port, user=tenant_db.app_role, password=tenant_db.app_password,
                         dbname=tenant_db.database, sslmode="disable", autocommit=True) as direct:
        pid = direct.info.backend_pid
        expired = sign(tenant_db.signing_key.encode(), ACME, pid, int(time.time()) - 1)
        direct.execute("SELECT set_config('app.current_tenant', %s, false), set_config('tenant_proxy.proof', %s, false)",
                       (ACME, expired))
        assert count(direct) == 0


# -- 2. RESET ALL / DISCARD ALL: allowed, and the context comes back --------------------------

@pytest.mark.parametrize("sql", ["RESET ALL", "DISCARD ALL"])
def test_reset_all_and_discard_all_keep_the_session_isolated(conn: psycopg.Connection[Any], sql: str) -> None:
    """Attacker: clear the context hoping policies fall back to all rows. Stopped by: strict policies
    (NULL sees nothing); the proxy re-asserts the context, so the session keeps working."""
    conn.execute(sql)
    assert_isolated(conn)
    assert conn.execute("SELECT tenant_proxy.current_tenant()").fetchone()[0] == ACME


def test_reset_all_then_query_in_one_message_fails_closed(conn: psycopg.Connection[Any]) -> None:
    """Attacker: clear the context and query in the same message, before the proxy can re-assert.
    Stopped by: strict policies (NULL context sees nothing)."""
    cursor = conn.execute("RESET ALL; SELECT count(*) FROM leads")
    assert cursor.nextset()
    assert cursor.fetchone()[0] == 0
    assert_isolated(conn)


def test_reset_all_inside_a_rolled_back_transaction(proxy: ProxyProcess) -> None:
    """Attacker: RESET ALL inside a transaction, then roll back, hoping the proxy's re-assert is undone
    while the reset survives. Both are transactional: the rollback restores the original context."""
    with psycopg.connect(proxy.dsn(), password=proxy.token(ACME)) as conn:
        conn.execute("RESET ALL")
        assert count(conn) == ROWS[ACME]
        conn.rollback()
        assert_isolated(conn)


def test_reset_all_in_a_failed_transaction(proxy: ProxyProcess) -> None:
    """Attacker: RESET ALL and fail the transaction so the proxy's re-assert fails too. Stopped by: the
    rollback restoring the context, and the proxy re-asserting again after the next message."""
    with psycopg.connect(proxy.dsn(), password=proxy.token(ACME)) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("RESET ALL; SELECT 1/0")
        conn.rollback()
        assert_isolated(conn)


# -- 3. Dynamic SQL --------------------------------------------------------------------------

def test_do_blocks_are_refused(conn: psycopg.Connection[Any]) -> None:
    """Attacker: EXECUTE inside a DO block. Stopped by: the guard (DO off by default)."""
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="DO blocks"):
        conn.execute(f"DO $$ BEGIN EXECUTE 'SET app.current_tenant = ''{GLOBEX}'''; END $$")
    assert_isolated(conn)


def test_do_blocks_when_allowed_still_cannot_cross(make_proxy: Any, pg: EmbeddedPostgres, tenant_db: Any) -> None:
    """With [guard] allow_do = true, a DO block reaches Postgres: the hardened role has no USAGE on
    plpgsql (42501). Where a DBA grants it back, the DO block can change the setting: the verifier stops it."""
    permissive = make_proxy({"guard": {"allow_do": True}})
    do_block = f"DO $$ BEGIN EXECUTE 'SET app.current_tenant = ''{GLOBEX}'''; END $$"
    with psycopg.connect(permissive.dsn(), password=permissive.token(ACME), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="language plpgsql"):
            conn.execute(do_block)
    pg.psql(f"GRANT USAGE ON LANGUAGE plpgsql TO {tenant_db.app_role}", tenant_db.database)
    try:
        with psycopg.connect(permissive.dsn(), password=permissive.token(ACME), autocommit=True) as conn:
            conn.execute(do_block)
            assert other_tenant_rows(conn) == 0 and count(conn) == 0
    finally:
        pg.psql(f"REVOKE USAGE ON LANGUAGE plpgsql FROM {tenant_db.app_role}", tenant_db.database)


def test_functions_cannot_be_created_to_hide_sql(conn: psycopg.Connection[Any]) -> None:
    """Attacker: create a function that sets the context. Stopped by: the guard for SET clauses, and
    by Postgres for the body (the application role has no CREATE on any schema)."""
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="protected"):
        conn.execute("CREATE FUNCTION f() RETURNS int LANGUAGE sql SET app.current_tenant = 'x' AS $$ SELECT 1 $$")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$")


# -- 4. Role and identity changes --------------------------------------------------------------

@pytest.mark.parametrize(
    "sql, match",
    [
        ("SET ROLE postgres", "SET ROLE"),
        ("RESET ROLE", "SET ROLE"),
        ("SET SESSION AUTHORIZATION postgres", "SESSION AUTHORIZATION"),
        ("SELECT set_config('role', 'postgres', false)", "set_config"),
        (f"ALTER ROLE CURRENT_USER SET app.current_tenant = '{GLOBEX}'", "ALTER ROLE"),
        ("ALTER ROLE CURRENT_USER BYPASSRLS", "ALTER ROLE"),
        (f"ALTER DATABASE app SET app.current_tenant = '{GLOBEX}'", "ALTER DATABASE"),
        ("ALTER SYSTEM SET row_security = off", "ALTER SYSTEM"),
        ("LOAD 'plpgsql'", "LOAD"),
    ],
)
def test_identity_changes_are_refused(conn: psycopg.Connection[Any], sql: str, match: str) -> None:
    """Attacker: become another role, or make every future session start as tenant B. Stopped by: the guard."""
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match=match):
        conn.execute(sql)
    assert_isolated(conn)


def test_role_change_past_the_guard_is_refused_by_postgres(conn: psycopg.Connection[Any]) -> None:
    """Attacker: SET ROLE with a computed name. Stopped by: Postgres (the role is not a member)."""
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT set_config('ro' || 'le', 'postgres', false)")
    assert_isolated(conn)


def test_a_role_default_for_the_setting_does_not_cross(proxy: ProxyProcess, pg: EmbeddedPostgres,
                                                        tenant_db: Any) -> None:
    """Suppose ALTER ROLE ... SET app.current_tenant got through (say, an admin's mistake): every
    new session still gets the proxy's own context, and the strict policy still isolates."""
    pg.psql(f"ALTER ROLE {tenant_db.app_role} SET app.current_tenant = '{GLOBEX}'")
    try:
        with psycopg.connect(proxy.dsn(), password=proxy.token(ACME), autocommit=True) as conn:
            assert conn.execute("SHOW app.current_tenant").fetchone()[0] == ACME
            assert_isolated(conn)
    finally:
        pg.psql(f"ALTER ROLE {tenant_db.app_role} RESET app.current_tenant")


# -- 5. Startup packet parameters and options ----------------------------------------------------

@pytest.mark.parametrize(
    "server_settings",
    [
        {"app.current_tenant": GLOBEX},
        {"options": f"-c app.current_tenant={GLOBEX}"},
        {"options": f"-c tenant_proxy.proof={FORGED_PROOF}"},
        {"options": "-c role=postgres"},
        {"options": "-c session_authorization=postgres"},
        {"options": "-c row_security=off"},
        {"options": "-c default_transaction_read_only=off --app.current-tenant=x"},
    ],
)
async def test_startup_parameters_cannot_carry_a_context(proxy: ProxyProcess, server_settings: dict[str, str]) -> None:
    """Attacker: put the tenant, a role or a GUC into the startup packet. Stopped by: the startup
    allowlist and protected settings (42501, connection refused)."""
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="postgres", database="app",
                              password=proxy.token(ACME), ssl=False, server_settings=server_settings)


async def test_client_user_is_never_the_upstream_role(proxy: ProxyProcess) -> None:
    """Attacker: log in as user "postgres". The proxy records the name and logs in as its own role."""
    conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="postgres", database="app",
                                 password=proxy.token(ACME), ssl=False)
    try:
        assert await conn.fetchval("SELECT current_user") == "tenant_app"
        assert await conn.fetchval("SELECT count(*) FROM leads WHERE tenant_id <> $1", ACME) == 0
    finally:
        await conn.close()


# -- 6. Writes of another tenant's rows --------------------------------------------------------------

@pytest.mark.parametrize(
    "sql",
    [
        f"INSERT INTO leads (tenant_id, name, email) VALUES ('{GLOBEX}', 'x', 'x@x')",
        f"UPDATE leads SET tenant_id = '{GLOBEX}'",
        f"INSERT INTO leads (tenant_id, name, email) SELECT '{GLOBEX}', name, email FROM leads",
    ],
)
def test_writing_rows_for_another_tenant_is_refused(conn: psycopg.Connection[Any], sql: str) -> None:
    """Attacker: plant or move rows into tenant B. Stopped by: the policy's WITH CHECK."""
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        conn.execute(sql)
    assert_isolated(conn)


def test_updates_and_deletes_never_touch_other_tenants(conn: psycopg.Connection[Any]) -> None:
    """Attacker: UPDATE or DELETE B's rows by id. Stopped by: the policy's USING (rows are invisible)."""
    assert conn.execute("UPDATE leads SET name = name WHERE tenant_id = %s", (GLOBEX,)).rowcount == 0
    assert conn.execute("DELETE FROM leads WHERE tenant_id = %s", (GLOBEX,)).rowcount == 0


# -- 7. COPY in both directions -----------------------------------------------------------------------

def test_copy_out_returns_only_own_rows(conn: psycopg.Connection[Any]) -> None:
    """Attacker: dump the table with COPY TO. Stopped by: RLS, which applies to COPY TO."""
    with conn.cursor().copy("COPY leads (tenant_id) TO STDOUT") as copy:
        tenants = {bytes(row).decode().strip() for row in copy}
    assert tenants == {ACME}


def test_copy_in_cannot_write_another_tenant(conn: psycopg.Connection[Any]) -> None:
    """Attacker: bulk-load rows for tenant B. Stopped by: Postgres (COPY FROM is refused under RLS)."""
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="row-level security"):
        with conn.cursor().copy("COPY leads (tenant_id, name, email) FROM STDIN") as copy:
            copy.write_row((GLOBEX, "x", "x@x"))
    assert_isolated(conn)


# -- 8. System views -----------------------------------------------------------------------------------

def test_pg_stat_activity_never_shows_a_context(proxy: ProxyProcess, conn: psycopg.Connection[Any],
                                                pg: EmbeddedPostgres) -> None:
    """Attacker: read other sessions' query text to learn their tenant or proof. Stopped by: the
    hardening SQL (pg_stat_activity is revoked, see tests/security/test_shared_role.py); and even an
    administrator who can read it finds no context there, since it travels as Bind parameters."""
    with psycopg.connect(proxy.dsn(), password=proxy.token(GLOBEX), autocommit=True) as other:
        other.execute("SELECT 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT query FROM pg_stat_activity")
        texts = pg.psql("SELECT coalesce(query, '') FROM pg_stat_activity WHERE usename = 'tenant_app'").splitlines()
    assert texts and not [t for t in texts if GLOBEX in t or "0" * 10 in t]


def test_pg_settings_shows_only_own_context(conn: psycopg.Connection[Any]) -> None:
    """Attacker: read settings views for other sessions' tenants. pg_settings shows only this session."""
    rows = conn.execute("SELECT name, setting FROM pg_settings WHERE name LIKE 'app.%' OR name LIKE 'tenant_proxy.%'")
    assert all(GLOBEX not in setting for _, setting in rows)


# -- 9. Messages pipelined around the proxy's own -----------------------------------------------

def test_refusal_inside_a_pipeline_leaves_the_rest_working(proxy: ProxyProcess) -> None:
    """A refused Parse in a pipeline fails its own sync group only, at the right place in the stream."""
    with psycopg.connect(proxy.dsn(), password=proxy.token(ACME), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            with conn.pipeline() as pipeline:
                first = conn.execute("SELECT count(*) FROM leads WHERE name <> %s", ("x",))
                pipeline.sync()
                conn.execute("SELECT set_config('app.current_tenant', %s, false)", (GLOBEX,))
                pipeline.sync()
        assert first.fetchone()[0] == ROWS[ACME]
        assert_isolated(conn)


def test_reset_all_pipelined_with_queries(proxy: ProxyProcess) -> None:
    """RESET ALL in a pipeline: statements after it in the same sync group see nothing (fail closed);
    after the Sync the proxy has re-asserted the context."""
    with psycopg.connect(proxy.dsn(), password=proxy.token(ACME), autocommit=True) as conn:
        with conn.pipeline():
            conn.execute("RESET ALL", prepare=False)
            during = conn.execute("SELECT count(*) FROM leads WHERE tenant_id <> %s", (ACME,))
        assert during.fetchone()[0] == 0
        assert_isolated(conn)


async def test_asyncpg_extended_protocol_refusal(proxy: ProxyProcess) -> None:
    """Attacker: the same write through Parse/Describe/Flush (asyncpg's prepare). Stopped by: the guard,
    whose refusal arrives in place of the Parse's own reply."""
    conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="alice", database="app",
                                 password=proxy.token(ACME), ssl=False)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="protected"):
            await conn.fetchval("SELECT set_config('app.current_tenant', $1, false)", GLOBEX)
        assert await conn.fetchval("SELECT count(*) FROM leads WHERE tenant_id <> $1", ACME) == 0
        assert await conn.fetchval("SELECT count(*) FROM leads") == ROWS[ACME]
    finally:
        await conn.close()


# -- 10. A server connection passed to the next client ---------------------------------------------

def test_nothing_survives_when_a_server_connection_passes_to_another_tenant(
    make_proxy: Any, pg: EmbeddedPostgres, tenant_db: Any, prepared_statements_readable: None
) -> None:
    """Attacker (tenant A) leaves state behind on its server connection for the next client to find or
    trip over. Stopped by: the pool's DISCARD ALL before the connection serves anyone else. (The guard is
    off here: it would refuse the LISTEN, and this test is about what the handoff leaves behind.)"""
    single = make_proxy({"pool": {"size": 1}, "guard": {"enabled": False}})
    pg.psql(f"GRANT TEMP ON DATABASE {tenant_db.database} TO {tenant_db.app_role}")
    try:
        with psycopg.connect(single.dsn(), password=single.token(ACME), autocommit=True) as a:
            pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
            a.execute("CREATE TEMP TABLE leads (id int, tenant_id uuid, name text, email text)")
            a.execute(f"INSERT INTO leads VALUES (1, '{GLOBEX}', 'planted', 'x')")
            a.execute("SET statement_timeout = '1234ms'")
            a.execute("PREPARE planted AS SELECT 1")
            a.execute("LISTEN planted")
            a.execute("SELECT pg_advisory_lock(42)")
            a.execute("BEGIN")
            a.execute("DECLARE held CURSOR WITH HOLD FOR SELECT 1")
            a.execute("COMMIT")
        with psycopg.connect(single.dsn(), password=single.token(GLOBEX), autocommit=True) as b:
            assert b.execute("SELECT pg_backend_pid()").fetchone()[0] == pid  # the same server connection
            assert b.execute("SELECT count(*) FROM pg_tables WHERE schemaname LIKE 'pg_temp%'").fetchone()[0] == 0
            assert b.execute("SELECT count(*) FROM leads WHERE name = 'planted'").fetchone()[0] == 0
            assert b.execute("SHOW statement_timeout").fetchone()[0] == "0"
            assert b.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0] == 0
            assert b.execute("SELECT count(*) FROM pg_listening_channels()").fetchone()[0] == 0
            assert pg.psql(f"SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = {pid}").strip() == "0"

            assert b.execute("SELECT count(*) FROM pg_cursors").fetchone()[0] == 0
            assert b.execute("SELECT tenant_proxy.current_tenant()").fetchone()[0] == GLOBEX
            assert b.execute("SELECT count(*) FROM leads WHERE tenant_id <> %s", (GLOBEX,)).fetchone()[0] == 0
    finally:
        pg.psql(f"REVOKE TEMP ON DATABASE {tenant_db.database} FROM {tenant_db.app_role}")


def test_a_connection_left_mid_transaction_is_never_reused(make_proxy: Any) -> None:
    """A client that vanishes inside a transaction leaves a connection nobody else gets."""
    single = make_proxy({"pool": {"size": 1}})
    a = psycopg.connect(single.dsn(), password=single.token(ACME))
    pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
    a.pgconn.finish()
    with psycopg.connect(single.dsn(), password=single.token(GLOBEX), autocommit=True) as b:
        assert b.execute("SELECT pg_backend_pid()").fetchone()[0] != pid
        assert b.execute("SELECT count(*) FROM leads WHERE tenant_id <> %s", (GLOBEX,)).fetchone()[0] == 0


def test_startup_parameters_never_pass_to_another_client(make_proxy: Any) -> None:
    """Startup parameters are the session's defaults, which DISCARD ALL restores: a connection opened
    with one client's parameters serves only clients with the same ones."""
    single = make_proxy({"pool": {"size": 1}})
    with psycopg.connect(single.dsn(application_name="first"), password=single.token(ACME)) as a:
        pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
    with psycopg.connect(single.dsn(application_name="second"), password=single.token(GLOBEX)) as b:
        assert b.execute("SHOW application_name").fetchone()[0] == "second"
        assert b.execute("SELECT pg_backend_pid()").fetchone()[0] != pid
