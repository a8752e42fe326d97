"""Transaction pooling end to end: many clients of many tenants over a few server connections, real
drivers with their prepared-statement caches, pgbench, session settings, cancel, and the pool's limits."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import threading
import time
import uuid
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres, free_port
from proxy.protocol import messages
from support import ACME, GLOBEX, ROWS, ProxyProcess, RawClient, cancel_when_running, get, login, wait_until

TENANT_COUNT = 50
TRANSACTION = {"mode": "transaction"}


def tenant_rows(index: int) -> int:
    return 1 + index % 4


@pytest.fixture(scope="module")
def many_tenants(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> list[str]:
    """Fifty tenants with 1 to 4 leads each, named after their tenant."""
    tenants = [str(uuid.UUID(int=0x5000_0000_0000_4000_8000_0000_0000_0000 + index)) for index in range(TENANT_COUNT)]
    values = ", ".join(
        f"('{tenant}', 'lead {row} of {tenant}', 'x@example.com')"
        for index, tenant in enumerate(tenants)
        for row in range(tenant_rows(index))
    )
    pg.psql(f"INSERT INTO leads (tenant_id, name, email) VALUES {values}", database=tenant_db.database)
    return tenants


@pytest.fixture(scope="module")
def pooled(pg: EmbeddedPostgres, tenant_db: TenantDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """A transaction-mode proxy: 10 server connections for everyone."""
    process = ProxyProcess(pg, tenant_db, tmp_path_factory.mktemp("pooled"), {"pool": {**TRANSACTION, "size": 10}}).start()
    yield process
    process.stop()


def server_connections(pg: EmbeddedPostgres, db: TenantDatabase, since: str) -> int:
    """Server connections of the application role opened since `since` (a server timestamp)."""
    return int(
        pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{db.app_role}' AND backend_start >= '{since}'").strip()
    )


async def connect(proxy: ProxyProcess, tenant: str = ACME, **kwargs: Any) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1", port=proxy.port, user="app", database="app", password=proxy.token(tenant), ssl=False, **kwargs
    )


async def test_500_clients_of_50_tenants_over_10_connections(
    pooled: ProxyProcess, many_tenants: list[str], pg: EmbeddedPostgres, tenant_db: TenantDatabase
) -> None:
    """Every client sees exactly its own tenant's rows, through prepared and simple statements alike,
    while 500 clients share 10 server connections."""

    server_pids: set[int] = set()

    async def client(index: int) -> None:
        tenant_index = index % TENANT_COUNT
        tenant = many_tenants[tenant_index]
        conn = await connect(pooled, tenant)
        try:
            for round_ in range(3):
                rows = await conn.fetch("SELECT tenant_id::text, name FROM leads ORDER BY id")
                assert len(rows) == tenant_rows(tenant_index)
                assert {row["tenant_id"] for row in rows} == {tenant}
                assert all(tenant in row["name"] for row in rows)
                async with conn.transaction():
                    count = await conn.fetchval("SELECT count(*) FROM leads WHERE name LIKE $1", f"%{tenant}%")
                    assert count == tenant_rows(tenant_index)
                    assert await conn.fetchval("SELECT tenant_proxy.current_tenant()") == tenant
                    server_pids.add(await conn.fetchval("SELECT pg_backend_pid()"))
                await asyncio.sleep(random.random() / 100)
        finally:
            await conn.close()

    results = await asyncio.gather(*(client(index) for index in range(500)), return_exceptions=True)
    failures = [result for result in results if isinstance(result, BaseException)]
    assert failures == []
    assert 1 < len(server_pids) <= 10


async def test_asyncpg_statement_cache_survives_changing_server_connections(pooled: ProxyProcess, many_tenants: list[str]) -> None:
    """asyncpg prepares every query under its own name once per connection and reuses it; the proxy
    prepares it on whichever server connection the client gets, and explicit prepared statements
    keep working."""
    conns = [await connect(pooled, many_tenants[index % 5]) for index in range(20)]
    try:
        statements = [await conn.prepare("SELECT count(*) FROM leads WHERE id > $1") for conn in conns]

        async def work(index: int) -> None:
            conn, statement = conns[index], statements[index]
            expected = tenant_rows(index % 5)
            for value in range(10):
                assert await conn.fetchval("SELECT $1::int * 2 + count(*) FROM leads", value) == value * 2 + expected
                assert await statement.fetchval(0) == expected

        await asyncio.gather(*(work(index) for index in range(20)))
    finally:
        for conn in conns:
            await conn.close()


async def test_asyncpg_without_a_statement_cache_uses_the_unnamed_statement(make_proxy: Any, many_tenants: list[str]) -> None:
    """With statement_cache_size=0 asyncpg parses the unnamed statement, waits for its description, and
    binds it later in the same group: the client keeps its server connection in between, even when
    other clients wait for the only one."""
    pooled = make_proxy({"pool": {**TRANSACTION, "size": 1}})
    conns = [await connect(pooled, many_tenants[index], statement_cache_size=0) for index in range(6)]
    try:

        async def work(index: int) -> None:
            for value in range(10):
                total = await conns[index].fetchval(f"SELECT $1::int + count(*) + {index} FROM leads", value)
                assert total == value + tenant_rows(index) + index

        await asyncio.gather(*(work(index) for index in range(6)))
    finally:
        for conn in conns:
            await conn.close()


def test_psycopg_with_forced_prepared_statements(pooled: ProxyProcess, many_tenants: list[str],
                                                  prepared_statements_readable: None) -> None:
    """psycopg 3 with prepare_threshold=0 prepares every statement by name; interleaved clients of
    different tenants keep their own statements and rows."""
    conns = [
        psycopg.connect(pooled.dsn(), password=pooled.token(many_tenants[index]), prepare_threshold=0, autocommit=True)
        for index in range(6)
    ]
    try:
        for round_ in range(5):
            for index, conn in enumerate(conns):
                count = conn.execute("SELECT count(*) FROM leads WHERE id > %s", (round_ - 10,)).fetchone()[0]
                assert count == tenant_rows(index)
                with conn.transaction():
                    names = conn.execute("SELECT name FROM leads WHERE name LIKE %s", (f"%{many_tenants[index]}%",)).fetchall()
                    assert len(names) == tenant_rows(index)
        with conns[0].pipeline():
            cursors = [conns[0].execute("SELECT %s::int + count(*) FROM leads", (value,)) for value in range(5)]
        assert [cursor.fetchone()[0] for cursor in cursors] == [value + tenant_rows(0) for value in range(5)]
        closed = conns[1].execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0]
        assert closed >= 1  # the server connection holds the shared statements
    finally:
        for conn in conns:
            conn.close()


@pytest.fixture(scope="module")
def pgbench_tables(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    subprocess.run(
        [str(pg.bindir / "pgbench"), "-i", "-q", "-s", "1", "-h", str(pg.socket_dir), "-p", str(pg.port), "-U", "postgres", tenant_db.database],
        check=True,
        capture_output=True,
    )
    pg.psql(
        "GRANT SELECT, INSERT, UPDATE ON pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history"
        f" TO {tenant_db.app_role}",
        database=tenant_db.database,
    )


@pytest.mark.parametrize("protocol", ["simple", "extended", "prepared"])
@pytest.mark.parametrize("script", ["-S", "-b tpcb-like"])
def test_pgbench_through_the_pool(pooled: ProxyProcess, pgbench_tables: None, pg: EmbeddedPostgres, protocol: str, script: str) -> None:
    """pgbench with 12 clients over the pool of 10, in each query mode, select-only and read-write.

    One thread per client: pgbench 15 prepares each statement the first time a client runs it, with a
    blocking PQprepare that stalls every other client of its thread. A client's Parse outside a block
    waits for a server connection; with several clients per thread, the clients of the stalled threads
    that are inside a transaction block (tpcb-like, prepared) can hold all ten meanwhile, and neither
    side moves until the checkout timeout (53300): a deadlock in pgbench, not in the proxy."""
    result = subprocess.run(
        [str(pg.bindir / "pgbench"), "-n", *script.split(), "-M", protocol, "-c", "12", "-j", "12", "-t", "40",
         "-h", "127.0.0.1", "-p", str(pooled.port), "-U", "bench", "app"],
        capture_output=True,
        text=True,
        env={**os.environ, "PGPASSWORD": pooled.token()},
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "number of transactions actually processed: 480/480" in result.stdout
    assert "number of failed transactions: 0" in result.stdout


@pytest.fixture(scope="module")
def temp_allowed(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> Iterator[None]:
    """The application role may create temporary tables (the demo database does not allow it)."""
    pg.psql(f"GRANT TEMP ON DATABASE {tenant_db.database} TO {tenant_db.app_role}")
    yield
    pg.psql(f"REVOKE TEMP ON DATABASE {tenant_db.database} FROM {tenant_db.app_role}")


def test_guard_refuses_session_features_with_a_hint(pooled: ProxyProcess, temp_allowed: None) -> None:
    token = pooled.token()
    for sql, feature in [
        ("LISTEN news", "LISTEN"),
        ("BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT 1; COMMIT", "WITH HOLD"),
        ("PREPARE p AS SELECT 1", "PREPARE"),
        ("EXECUTE p", "EXECUTE"),
        ("SELECT pg_advisory_lock(7)", "pg_advisory_lock"),
        ("CREATE TEMP TABLE scratch (a int)", "CREATE TEMP TABLE"),
        # in the temporary schema by name: a temporary table all the same, which would shadow
        # public.leads for the next client of the tenant on the server connection
        ("CREATE TABLE pg_temp.leads AS SELECT * FROM public.leads", "CREATE TEMP TABLE ... AS"),
        ("CREATE TABLE pg_temp.scratch (a int)", "CREATE TEMP TABLE"),
        # other objects there stay for the next client too, and a type there shadows pg_catalog's
        # ('abcdef'::text would read 'abc' for it)
        ("CREATE DOMAIN pg_temp.text AS varchar(3)", "temporary schema"),
        ("CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'", "temporary schema"),
    ]:
        result = pooled.psql(token, sql)
        assert result.returncode != 0
        assert feature in result.stderr and "transaction pooling" in result.stderr and 'mode = "session"' in result.stderr
    ok = pooled.psql(
        token, "BEGIN; CREATE TEMP TABLE scratch (a int) ON COMMIT DROP; SELECT pg_advisory_xact_lock(7); SELECT 1; COMMIT"
    )
    assert ok.returncode == 0, ok.stderr


# -- one server connection: leftovers ------------------------------------------------------------


@pytest.fixture(scope="module")
def single(
    pg: EmbeddedPostgres, tenant_db: TenantDatabase, tmp_path_factory: pytest.TempPathFactory, temp_allowed: None
) -> Iterator[ProxyProcess]:
    """One server connection and no guard: every session lands on the same backend, and only the
    reset on a change of tenant stands between them."""
    pg.psql(
        "CREATE OR REPLACE FUNCTION public.sneak(sql text) RETURNS void LANGUAGE plpgsql AS $$ BEGIN EXECUTE sql; END $$;"
        f" GRANT EXECUTE ON FUNCTION public.sneak(text) TO {tenant_db.app_role};",
        database=tenant_db.database,
    )
    process = ProxyProcess(
        pg, tenant_db, tmp_path_factory.mktemp("single"), {"pool": {**TRANSACTION, "size": 1}, "guard": {"enabled": False}}
    ).start()
    yield process
    process.stop()


TENANTS_SEEN = "SELECT string_agg(DISTINCT tenant_id::text, ',') FROM leads"


@pytest.mark.parametrize(
    ("attack", "probe", "clean"),
    [
        ("CREATE TEMP TABLE leads AS SELECT * FROM public.leads", TENANTS_SEEN, ACME),
        ("SELECT public.sneak('CREATE TEMP TABLE leads (id int, tenant_id uuid, name text, email text)')", TENANTS_SEEN, ACME),
        ("PREPARE stolen AS SELECT name FROM leads", "SELECT count(*) FROM pg_prepared_statements WHERE from_sql", "0"),
        ("BEGIN; DECLARE held CURSOR WITH HOLD FOR SELECT name FROM leads; COMMIT", "SELECT count(*) FROM pg_cursors", "0"),
        ("LISTEN globex_news", "SELECT count(*) FROM pg_listening_channels()", "0"),
        # pg_locks is revoked from the hardened role; releasing the lock tells whether this session holds it
        ("SELECT pg_advisory_lock(4242)", "SELECT pg_advisory_unlock(4242)::int", "0"),
        ("SET search_path = pg_temp, public", "SHOW search_path", '"$user", public'),
        ("SET myapp.note = 'globex was here'", "SELECT coalesce(current_setting('myapp.note', true), '')", ""),
    ],
)
def test_leftovers_do_not_reach_the_next_tenant(single: ProxyProcess, attack: str, probe: str, clean: str,
                                                prepared_statements_readable: None) -> None:
    """GLOBEX leaves something on the only server connection; ACME, next on it, sees none of it."""
    globex = single.psql(single.token(GLOBEX), f"{attack}; SELECT pg_backend_pid()")
    assert globex.returncode == 0, globex.stderr
    acme = single.psql(single.token(ACME), f"{probe}; SELECT pg_backend_pid()")
    assert acme.returncode == 0, acme.stderr
    value, acme_pid = acme.stdout.rstrip("\n").split("\n")[-2:]
    if not attack.startswith("SET "):
        assert acme_pid == globex.stdout.strip().splitlines()[-1]  # the same server connection
    # A SET: when psql leaves while the proxy still reads the setting back, the proxy closes that
    # connection rather than reuse it (it cannot know what the connection holds); reused or not,
    # ACME must not see the value.
    assert value == clean


def test_execute_of_a_previous_tenants_statement_fails(single: ProxyProcess) -> None:
    globex = single.psql(single.token(GLOBEX), "PREPARE stolen AS SELECT name FROM leads")
    assert globex.returncode == 0, globex.stderr
    acme = single.psql(single.token(ACME), "EXECUTE stolen")
    assert acme.returncode != 0 and 'prepared statement "stolen" does not exist' in acme.stderr


async def test_session_settings_follow_the_client(make_proxy: Any) -> None:
    """SET, RESET and startup parameters stay with the client across server connections; a SET rolled
    back with its transaction is not carried on; SET LOCAL lasts one transaction."""
    pooled = make_proxy({"pool": {**TRANSACTION, "size": 1}})
    first = await connect(pooled, ACME, server_settings={"application_name": "first", "DateStyle": "SQL, DMY"})
    second = await connect(pooled, GLOBEX)
    try:
        await first.execute("SET statement_timeout = '4s'")
        await first.execute("SET search_path = pg_catalog, public")
        assert await second.fetchval("SHOW statement_timeout") == "0"
        assert await second.fetchval("SHOW search_path") == '"$user", public'
        assert await first.fetchval("SHOW statement_timeout") == "4s"
        assert await first.fetchval("SHOW search_path") == "pg_catalog, public"
        assert await first.fetchval("SHOW application_name") == "first"
        assert await first.fetchval("SHOW DateStyle") == "SQL, DMY"
        assert await second.fetchval("SHOW application_name") != "first"
        assert first.get_settings().application_name == "first"

        await first.execute("RESET statement_timeout")
        assert await second.fetchval("SELECT 1") == 1
        assert await first.fetchval("SHOW statement_timeout") == "0"

        async with first.transaction():
            await first.execute("SET LOCAL statement_timeout = '7s'")
            assert await first.fetchval("SHOW statement_timeout") == "7s"
        assert await first.fetchval("SHOW statement_timeout") == "0"

        default_work_mem = await second.fetchval("SHOW work_mem")
        tx = first.transaction()
        await tx.start()
        await first.execute("SET work_mem = '7MB'")
        await tx.rollback()
        assert await second.fetchval("SELECT 1") == 1
        assert await first.fetchval("SHOW work_mem") == default_work_mem

        await first.execute("SET application_name = 'renamed'")
        assert first.get_settings().application_name == "renamed"
        assert await second.fetchval("SELECT 1") == 1
        assert await first.fetchval("SHOW application_name") == "renamed"
        await first.execute("RESET ALL")
        assert await first.fetchval("SELECT count(*) FROM leads") == ROWS[ACME]
    finally:
        await first.close()
        await second.close()


def test_client_disconnect_mid_transaction_leaves_nothing_open(pooled: ProxyProcess, pg: EmbeddedPostgres) -> None:
    conn = psycopg.connect(pooled.dsn(), password=pooled.token())
    server_pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    conn.execute("UPDATE leads SET name = 'never committed' WHERE true")
    assert pg.psql(f"SELECT state FROM pg_stat_activity WHERE pid = {server_pid}").strip() == "idle in transaction"
    conn.pgconn.finish()  # drop the socket without ROLLBACK or Terminate
    wait_until(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'").strip() == "0")
    assert pg.psql("SELECT count(*) FROM leads WHERE name = 'never committed'", database="app").strip() == "0"


def test_checkout_timeout_names_the_pool(make_proxy: Any) -> None:
    pooled = make_proxy({"pool": {**TRANSACTION, "size": 1, "checkout_timeout": 0.5}})
    holder = psycopg.connect(pooled.dsn(), password=pooled.token())
    waiter = psycopg.connect(pooled.dsn(), password=pooled.token(GLOBEX), autocommit=True)
    try:
        holder.execute("SELECT 1")  # psycopg opens a transaction: the only server connection is held
        start = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as raised:
            waiter.execute("SELECT 1")
        assert 0.4 < time.monotonic() - start < 10
        assert 'pool for database "app" is full' in str(raised.value)
        assert raised.value.sqlstate == "53300"
        holder.rollback()
        with psycopg.connect(pooled.dsn(), password=pooled.token(GLOBEX)) as again:
            assert again.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[GLOBEX]
    finally:
        holder.close()
        waiter.close()


def test_each_queued_client_times_out_at_its_own_deadline(make_proxy: Any) -> None:
    """The pool keeps one timer per queue: a client queued later must neither be refused with the
    first one nor wait past its own checkout_timeout, and one served in time gets no late error."""
    pooled = make_proxy({"pool": {**TRANSACTION, "size": 1, "checkout_timeout": 1.0}})
    holder = psycopg.connect(pooled.dsn(), password=pooled.token())
    waiters = [psycopg.connect(pooled.dsn(), password=pooled.token(GLOBEX), autocommit=True) for _ in range(2)]
    waited: dict[int, float] = {}

    def wait_in_queue(index: int) -> None:
        start = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as raised:
            waiters[index].execute("SELECT 1")
        assert raised.value.sqlstate == "53300"
        waited[index] = time.monotonic() - start

    try:
        holder.execute("SELECT 1")  # holds the only server connection
        first = threading.Thread(target=wait_in_queue, args=(0,))
        second = threading.Timer(0.5, wait_in_queue, args=(1,))
        first.start()
        second.start()
        first.join(30)
        second.join(30)
        assert sorted(waited) == [0, 1]
        for index in (0, 1):
            assert 0.9 < waited[index] < 1.8, waited
        holder.rollback()
        with psycopg.connect(pooled.dsn(), password=pooled.token(GLOBEX), autocommit=True) as served:
            assert served.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[GLOBEX]
            holder.execute("SELECT 1")  # the connection is held again: the next client queues ...
            late = threading.Timer(0.3, holder.rollback)  # ... and is served well before its deadline
            late.start()
            assert served.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[GLOBEX]
            late.join(30)
            served.execute("SELECT pg_sleep(1.2)")  # past the deadline it had while queued
            assert served.execute("SELECT 1").fetchone()[0] == 1  # and no error came with it
    finally:
        holder.close()
        for conn in waiters:
            conn.close()


def test_max_client_connections(make_proxy: Any) -> None:
    pooled = make_proxy({"pool": {**TRANSACTION, "max_client_connections": 3}})
    held = [psycopg.connect(pooled.dsn(), password=pooled.token()) for _ in range(3)]
    try:
        with pytest.raises(psycopg.OperationalError) as raised:
            psycopg.connect(pooled.dsn(), password=pooled.token())
        assert "too many clients" in str(raised.value)
    finally:
        for conn in held:
            conn.close()
    with psycopg.connect(pooled.dsn(), password=pooled.token()) as conn:
        assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_cancel_reaches_only_the_query_the_client_runs(make_proxy: Any, pg: EmbeddedPostgres) -> None:
    """A cancel reaches the server connection running the client's query; from a client holding no
    server connection it reaches nothing, even when its last server connection now runs someone else's."""
    pooled = make_proxy({"pool": {**TRANSACTION, "size": 1}})
    idle = psycopg.connect(pooled.dsn(), password=pooled.token(), autocommit=True)
    busy = psycopg.connect(pooled.dsn(), password=pooled.token(GLOBEX), autocommit=True)
    try:
        assert idle.execute("SELECT 1").fetchone()[0] == 1
        watcher = cancel_when_running(pg, idle.cancel, "cancel_elsewhere")
        assert busy.execute("SELECT 2 FROM pg_sleep(1) /* cancel_elsewhere */").fetchone()[0] == 2
        watcher.join()
        watcher = cancel_when_running(pg, busy.cancel, "mine")
        with pytest.raises(psycopg.errors.QueryCanceled):
            busy.execute("SELECT pg_sleep(20) /* mine */")
        watcher.join()
        assert busy.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[GLOBEX]
    finally:
        idle.close()
        busy.close()


def clients_waiting(http_port: int) -> float:
    """The proxy's pgtp_clients_waiting gauge, summed over databases."""
    status, body = get(http_port, "/metrics")
    assert status == 200
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith(("pgtp_clients_waiting{", "pgtp_clients_waiting ")))


def sleep_outcome(conn: psycopg.Connection[Any], sql: str, result: dict[str, Any]) -> threading.Thread:
    """Run `sql` on `conn` in a thread; `result["outcome"]` is "completed" or the SQLSTATE of its error."""

    def run() -> None:
        try:
            conn.execute(sql)
            result["outcome"] = "completed"
        except psycopg.Error as exc:
            result["outcome"] = exc.sqlstate

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_cancel_while_the_statement_waits_for_a_connection_cancels_it(make_proxy: Any, pg: EmbeddedPostgres,
                                                                      tenant_db: TenantDatabase) -> None:
    """Directly, a cancel of an outstanding statement fails it with 57014. Through transaction pooling the
    statement may still wait for the one server connection (found by a breaker helper: the cancel was
    dropped and the statement ran in full later); it is cancelled once it gets one, and the client that
    held the connection is not."""
    direct = psycopg.connect(f"host=127.0.0.1 port={pg.port} user={tenant_db.app_role} dbname={tenant_db.database}"
                             f" password={tenant_db.app_password} sslmode=disable", autocommit=True)
    expected: dict[str, Any] = {}
    try:
        watcher = cancel_when_running(pg, direct.cancel, "cancelled_directly")
        sleep_outcome(direct, "SELECT pg_sleep(30) /* cancelled_directly */", expected).join(25)
        watcher.join()
    finally:
        direct.close()
    http = free_port()
    pooled = make_proxy({"pool": {**TRANSACTION, "size": 1}, "http": {"listen": f"127.0.0.1:{http}"}})
    holder = psycopg.connect(pooled.dsn(), password=pooled.token(GLOBEX))
    waiter = psycopg.connect(pooled.dsn(), password=pooled.token(), autocommit=True)
    got: dict[str, Any] = {}
    try:
        assert holder.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[GLOBEX]  # holds the connection
        thread = sleep_outcome(waiter, "SELECT pg_sleep(30) /* queued */", got)
        wait_until(lambda: clients_waiting(http) >= 1)
        waiter.cancel()
        holder.commit()
        thread.join(25)
        assert got == expected == {"outcome": "57014"}
        assert holder.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[GLOBEX]
        holder.commit()
        assert waiter.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[ACME]
    finally:
        holder.close()
        waiter.close()


def test_min_size_opens_connections_and_broken_ones_are_replaced(make_proxy: Any, pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    since = pg.psql("SELECT now()").strip()
    pooled = make_proxy({"pool": {**TRANSACTION, "size": 4, "min_size": 2}})
    with psycopg.connect(pooled.dsn(), password=pooled.token(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone()[0] == 1
        wait_until(lambda: server_connections(pg, tenant_db, since) == 2)
        again = pg.psql("SELECT now()").strip()
        pg.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE usename = '{tenant_db.app_role}' AND backend_start >= '{since}'"
        )
        wait_until(lambda: server_connections(pg, tenant_db, again) == 2)
        for _ in range(3):
            assert conn.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[ACME]


def test_prepared_statements_beyond_the_bound_are_evicted_and_prepared_again(make_proxy: Any, prepared_statements_readable: None) -> None:
    """With room for 3 statements per server connection, two clients cycling through 8 statements each
    on one connection never see "prepared statement does not exist", and errors leave the session usable."""
    pooled = make_proxy({"pool": {**TRANSACTION, "size": 1, "max_prepared_statements": 3}})
    conns = [
        psycopg.connect(pooled.dsn(), password=pooled.token(tenant), prepare_threshold=0, autocommit=True)
        for tenant in (ACME, GLOBEX)
    ]
    try:
        for round_ in range(3):
            for offset in range(8):
                for conn, tenant in zip(conns, (ACME, GLOBEX)):
                    sql = f"SELECT count(*) + {offset} FROM leads WHERE id > %s"
                    assert conn.execute(sql, (-round_,)).fetchone()[0] == ROWS[tenant] + offset
            with pytest.raises(psycopg.errors.DivisionByZero):
                conns[0].execute("SELECT 1 / %s::int FROM leads", (0,))
        held = conns[1].execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0]
        assert held <= 4  # the bound, plus the statement running this query
    finally:
        for conn in conns:
            conn.close()


def test_copy_in_and_out_release_the_connection(make_proxy: Any, temp_allowed: None) -> None:
    pooled = make_proxy({"pool": {**TRANSACTION, "size": 1, "checkout_timeout": 5}})
    with psycopg.connect(pooled.dsn(), password=pooled.token(), autocommit=True) as conn, psycopg.connect(
        pooled.dsn(), password=pooled.token(GLOBEX), autocommit=True
    ) as other:
        with conn.cursor().copy("COPY (SELECT name FROM leads ORDER BY id) TO STDOUT") as copy:
            names = [bytes(row).decode().strip() for row in copy]
        assert len(names) == ROWS[ACME]
        assert other.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[GLOBEX]
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE scratch (name text) ON COMMIT DROP")
            with conn.cursor().copy("COPY scratch FROM STDIN") as copy:
                copy.write_row(("copied",))
            assert conn.execute("SELECT count(*) FROM scratch").fetchone()[0] == 1
        assert other.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[GLOBEX]


def test_a_context_broken_by_its_client_is_set_again_for_the_next(make_proxy: Any) -> None:
    """A client that overwrites its own context with a computed set_config() sees no rows (the
    verifier), and the next client of the same tenant on that server connection gets a fresh context."""
    pooled = make_proxy({"pool": {**TRANSACTION, "size": 1}})
    breaker = pooled.psql(
        pooled.token(), f"SELECT set_config('app.' || 'current_tenant', '{GLOBEX}', false); SELECT count(*) FROM leads"
    )
    assert breaker.returncode == 0, breaker.stderr
    assert breaker.stdout.split()[-1] == "0"
    after = pooled.psql(pooled.token(), "SELECT count(*) FROM leads")
    assert after.stdout.strip() == str(ROWS[ACME])


def test_unnamed_statement_survives_across_server_connections(make_proxy: Any) -> None:
    """Parse of the unnamed statement, Describe, Flush, then Bind in a later write: the server connection
    goes back to the pool in between (another client of another tenant uses it), and the Bind still finds
    the statement the client parsed, as Postgres keeps it until the client's next unnamed Parse."""
    pooled = make_proxy({"pool": {**TRANSACTION, "size": 1, "checkout_timeout": 1}})
    first, second = RawClient(pooled.port), RawClient(pooled.port)
    try:
        login(first, pooled.token(ACME))
        login(second, pooled.token(GLOBEX))
        first.send(messages.parse("", "SELECT 41 + $1::int") + messages.message(b"D", b"S\0") + messages.message(b"H"))
        assert [kind for kind, _ in first.read_until(b"T")] == [b"1", b"t", b"T"]
        second.send(messages.parse("", "SELECT 'other'") + messages.bind("", "", []) + messages.execute() + messages.sync())
        assert [kind for kind, _ in second.read_until(b"Z")] == [b"1", b"2", b"D", b"C", b"Z"]
        first.send(messages.bind("", "", ["1"]) + messages.execute() + messages.sync())
        replies = first.read_until(b"Z")
        assert [kind for kind, _ in replies] == [b"2", b"D", b"C", b"Z"]
        assert messages.parse_data_row(replies[1][1]) == [b"42"]
    finally:
        first.close()
        second.close()


def test_prepared_statements_kept_for_a_client_are_bounded(make_proxy: Any) -> None:
    """The proxy keeps each named statement's text to prepare it on other server connections, so a
    client that never closes them is refused with 53400 once it keeps too much; it can go on, and a
    Close makes room again."""
    pooled = make_proxy({"pool": TRANSACTION, "client": {"max_prepared_statement_bytes": 2000}})
    client = RawClient(pooled.port)
    try:
        login(client, pooled.token(ACME))
        kept = 0
        while True:
            client.send(messages.parse(f"s{kept}", f"SELECT {kept} AS number_{kept}") + messages.sync())
            replies = client.read_until(b"Z")
            if replies[0][0] != b"1":
                break
            kept += 1
            assert kept < 50, "no limit"
        error = messages.parse_error_fields(replies[0][1])
        assert error["C"] == "53400" and "2000 bytes" in error["M"] and "max_prepared_statement_bytes" in error["H"]
        assert 5 <= kept  # 2000 bytes hold several small statements
        assert client.read_until(b"Z")[-1] == (b"Z", b"I")
        client.send(messages.bind("", f"s{kept}", []) + messages.execute() + messages.sync())
        assert messages.parse_error_fields(client.read_until(b"Z")[0][1])["C"] == "26000"  # never prepared
        client.read_until(b"Z")
        client.send(messages.close_statement(b"s0") + messages.sync())
        assert [kind for kind, _ in client.read_until(b"Z")] == [b"3", b"Z"]
        client.send(messages.parse("again", "SELECT 7") + messages.bind("", "again", []) + messages.execute() + messages.sync())
        replies = client.read_until(b"Z")
        assert [kind for kind, _ in replies] == [b"1", b"2", b"D", b"C", b"Z"]
        client.send(messages.bind("", f"s{kept - 1}", []) + messages.execute() + messages.sync())
        assert messages.parse_data_row(client.read_until(b"D")[-1][1]) == [str(kept - 1).encode()]
        client.read_until(b"Z")
    finally:
        client.close()


JDBC_JAR = Path("/usr/share/java/postgresql.jar")


def test_pgjdbc_with_server_side_prepared_statements(make_proxy: Any, tmp_path: Path) -> None:
    """pgjdbc with prepareThreshold=1 (named server-side statements from the first execution), two
    tenants taking turns on one server connection, in autocommit and in a transaction."""
    assert JDBC_JAR.exists(), "pgjdbc comes from the Debian package libpostgresql-jdbc-java (.ci/run installs it)"
    pooled = make_proxy({"pool": {**TRANSACTION, "size": 1}})
    source = Path(__file__).parent / "clients" / "JdbcTenants.java"
    result = subprocess.run(
        ["java", "-cp", str(JDBC_JAR), str(source), f"jdbc:postgresql://127.0.0.1:{pooled.port}/app",
         pooled.token(ACME), str(ROWS[ACME]), pooled.token(GLOBEX), str(ROWS[GLOBEX])],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


def test_old_and_idle_server_connections_are_closed(make_proxy: Any, pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    """A connection past server_lifetime is replaced at its next release; idle ones past
    server_idle_timeout are closed."""
    since = pg.psql("SELECT now()").strip()
    pooled = make_proxy({"pool": {**TRANSACTION, "size": 2, "server_lifetime": 0.3, "server_idle_timeout": 0.4}})
    with psycopg.connect(pooled.dsn(), password=pooled.token(), autocommit=True) as conn:
        first = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        wait_until(lambda: conn.execute("SELECT pg_backend_pid()").fetchone()[0] != first)
        assert conn.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[ACME]
        wait_until(lambda: server_connections(pg, tenant_db, since) == 0)
        assert conn.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[ACME]


def test_each_transaction_carries_its_own_clients_context(make_proxy: Any) -> None:
    """The context is set per transaction: two clients of one tenant with different token expiries take
    turns on one server connection, and each statement sees its own client's proof."""
    pooled = make_proxy({"pool": {**TRANSACTION, "size": 1}})
    proof_expiry = "SELECT split_part(current_setting('tenant_proxy.proof'), ':', 1)"
    sooner, later = int(time.time()) + 600, int(time.time()) + 1200
    with psycopg.connect(pooled.dsn(), password=pooled.token(exp=sooner), autocommit=True) as first, psycopg.connect(
        pooled.dsn(), password=pooled.token(exp=later), autocommit=True
    ) as second:
        assert first.execute(proof_expiry).fetchone()[0] == str(sooner)
        assert second.execute(proof_expiry).fetchone()[0] == str(later)
        assert first.execute(proof_expiry).fetchone()[0] == str(sooner)
        assert first.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[ACME]
