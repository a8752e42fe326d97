"""Real drivers through a real proxy: each tenant sees only its own rows, whatever the driver does."""

from __future__ import annotations

import re

import asyncpg
import psycopg
import psycopg2
import pytest

from support import ACME, GLOBEX, ROWS, ProxyProcess


@pytest.mark.parametrize("tenant", [ACME, GLOBEX])
def test_psql_sees_only_own_rows(proxy: ProxyProcess, tenant: str) -> None:
    result = proxy.psql(proxy.token(tenant), "SELECT DISTINCT tenant_id FROM leads; SELECT count(*) FROM leads")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [tenant, str(ROWS[tenant])]


@pytest.mark.parametrize("tenant", [ACME, GLOBEX])
async def test_asyncpg_prepared_statements(proxy: ProxyProcess, tenant: str) -> None:
    conn = await asyncpg.connect(
        host="127.0.0.1", port=proxy.port, user="alice", database="app", password=proxy.token(tenant), ssl=False
    )
    try:
        statement = await conn.prepare("SELECT tenant_id::text AS t FROM leads WHERE name <> $1")
        rows = await statement.fetch("nobody")
        assert {row["t"] for row in rows} == {tenant} and len(rows) == ROWS[tenant]
        assert await conn.fetchval("SELECT tenant_proxy.current_tenant()") == tenant
        async with conn.transaction():
            assert await conn.fetchval("SELECT count(*) FROM leads") == ROWS[tenant]
    finally:
        await conn.close()


def test_psycopg3_pipeline_and_prepare(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), password=proxy.token(GLOBEX), prepare_threshold=0) as conn:
        with conn.pipeline():
            cursors = [conn.execute("SELECT count(*) FROM leads WHERE tenant_id = %s", (t,)) for t in (ACME, GLOBEX)]
            cursors.append(conn.execute("SELECT tenant_proxy.current_tenant()"))
        assert [c.fetchone()[0] for c in cursors] == [0, ROWS[GLOBEX], GLOBEX]
        for _ in range(3):
            assert conn.execute("SELECT count(*) FROM leads", prepare=True).fetchone()[0] == ROWS[GLOBEX]


def test_psycopg2(proxy: ProxyProcess) -> None:
    conn = psycopg2.connect(proxy.dsn(), password=proxy.token(ACME))
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT name FROM leads ORDER BY id")
            assert len(cursor.fetchall()) == ROWS[ACME]
            cursor.execute("SELECT count(*) FROM leads WHERE tenant_id = %s", (GLOBEX,))
            assert cursor.fetchone() == (0,)
        conn.rollback()
    finally:
        conn.close()


def test_forged_set_config_gets_nothing(proxy: ProxyProcess) -> None:
    """Tenant A sets the plain setting to B's id: the guard refuses the literal form with 42501; a
    computed name gets past the guard, but the proof no longer matches and the verifier says NULL."""
    with psycopg.connect(proxy.dsn(), password=proxy.token(ACME), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="protected"):
            conn.execute("SELECT set_config('app.current_tenant', %s, false)", (GLOBEX,))
        conn.execute("SELECT set_config('app.' || 'current_tenant', %s, false)", (GLOBEX,))
        assert conn.execute("SELECT count(*) FROM leads").fetchone()[0] == 0
        assert conn.execute("SELECT tenant_proxy.current_tenant()").fetchone()[0] is None
        conn.execute("SELECT set_config('tenant_proxy.' || 'proof', %s, false)", ("99999999999:" + "0" * 64,))
        assert conn.execute("SELECT count(*) FROM leads").fetchone()[0] == 0


def test_write_of_other_tenant_row_is_refused(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), password=proxy.token(ACME)) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO leads (tenant_id, name, email) VALUES (%s, 'x', 'x@x')", (GLOBEX,))
        conn.rollback()
        assert conn.execute("UPDATE leads SET name = name WHERE tenant_id = %s", (GLOBEX,)).rowcount == 0


def test_context_values_are_not_in_pg_stat_activity(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), password=proxy.token(ACME), autocommit=True) as conn:
        conn.execute("SELECT count(*) FROM leads")
        # pg_stat_activity is revoked from the hardened upstream role: read it as the administrator
        queries = proxy.pg.psql("SELECT query FROM pg_stat_activity WHERE usename = 'tenant_app' AND query <> ''").splitlines()
        assert queries
        assert not [q for q in queries if ACME in q or re.search("[0-9a-f]{64}", q)]


@pytest.mark.parametrize(
    "options", [f"-c app.current_tenant={GLOBEX}", "-c tenant_proxy.proof=1:2", f"--app.current-tenant={GLOBEX}"]
)
async def test_startup_options_cannot_set_the_tenant(proxy: ProxyProcess, options: str) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="protected"):
        await asyncpg.connect(
            host="127.0.0.1", port=proxy.port, user="alice", database="app", password=proxy.token(ACME), ssl=False,
            server_settings={"options": options},
        )


def test_allowed_startup_parameters_reach_the_server(proxy: ProxyProcess) -> None:
    dsn = proxy.dsn(application_name="reporting", options="'-c statement_timeout=1234'")
    with psycopg.connect(dsn, password=proxy.token(ACME)) as conn:
        assert conn.execute("SHOW application_name").fetchone()[0] == "reporting"
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "1234ms"
        assert conn.info.parameter_status("application_name") == "reporting"


def test_unlisted_startup_parameter_is_refused(proxy: ProxyProcess) -> None:
    with pytest.raises(psycopg.OperationalError, match='"work_mem" is not allowed'):
        psycopg.connect(proxy.dsn(options="'-c work_mem=1GB'"), password=proxy.token(ACME))
