"""Bug reports filed against other poolers (PgBouncer, PgDog, pgcat, Supavisor) and against drivers
behind them, replayed as raw protocol steps directly against Postgres and through the proxy in both pool
modes; the replies must be the same, message by message. Each scenario names the report it replays.

Transaction mode runs twice: with one server connection, so clients of both tenants take turns on it,
and with one prepared statement kept per server connection as well, so a client's statement is
prepared again before nearly every use. Direct sessions have no tenant context; the steps read nothing
that Row-Level Security decides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from differential import (
    Reply, Wire, assert_same, close, connect_direct, connect_proxy, copy_data, copy_done, describe, flush, send_cancel,
)
from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres
from proxy.protocol import messages
from support import ACME, GLOBEX, ProxyProcess, unprotected_table

TIMEOUT_ROUNDS = 150

MODES: dict[str, dict[str, Any]] = {
    "session": {"pool": {"mode": "session", "size": 5}},
    "transaction": {"pool": {"mode": "transaction", "size": 1}},
    "transaction, one statement kept": {"pool": {"mode": "transaction", "size": 1, "max_prepared_statements": 1}},
}
SCRATCH = "pooler_reports_scratch"

Connect = Callable[..., Wire]
Transcript = list[list[Reply]]


@pytest.fixture(scope="module")
def proxies(pg: EmbeddedPostgres, tenant_db: TenantDatabase, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, ProxyProcess]]:
    started = {mode: ProxyProcess(pg, tenant_db, tmp_path_factory.mktemp("reports"), overrides).start()
               for mode, overrides in MODES.items()}
    yield started
    for process in started.values():
        process.stop()


@pytest.fixture(scope="module")
def scratch(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> Iterator[str]:
    with unprotected_table(pg, tenant_db, SCRATCH, "n int NOT NULL") as name:
        yield name


def ready(wire: Wire, *frontend: bytes, count: int = 1) -> list[Reply]:
    """Send the messages as one write and read up to the `count`th ReadyForQuery."""
    wire.send(b"".join(frontend))
    return wire.read_ready(count)


def replies_of(wire: Wire, *frontend: bytes, count: int) -> list[Reply]:
    """Send the messages as one write and read `count` messages (a group that ends with a Flush)."""
    wire.send(b"".join(frontend))
    return wire.read_until(lambda replies: len(replies) >= count)


def run_query(sql: str) -> bytes:
    """Bind and Execute of the unnamed statement parsed from `sql`, and a Sync: an extended-protocol query."""
    return messages.parse("", sql) + messages.bind("", "", []) + messages.execute("") + messages.sync()


# ---------------------------------------------------------------------------------------------
# The scenarios: each takes a way to open a client connection, connect(name, tenant, **startup
# parameters), and returns the replies its client got, write by write.


def set_then_extended_query_in_one_write(connect: Connect) -> Transcript:
    """https://github.com/pgbouncer/pgbouncer/issues/52 (Npgsql): a simple Query that SETs a setting
    and an extended-protocol query in the same packet, Q/P/D/B/E/S; the pooler lost sync."""
    client = connect("npgsql", ACME)
    return [
        ready(client, messages.query("SET statement_timeout = 30000"), messages.parse("", "SELECT $1::int AS n"),
              describe("S", ""), messages.bind("", "", ["7"]), messages.execute(""), messages.sync(), count=2),
        ready(client, messages.query("SHOW statement_timeout")),
    ]


def failed_group_then_parse_flush_before_ready(connect: Connect) -> Transcript:
    """https://github.com/pgbouncer/pgbouncer/issues/759 (PHP PDO): Bind/Execute/Sync that fails, and
    right behind it, before its ReadyForQuery, Parse/Describe/Flush of the next statement."""
    client = connect("pdo", ACME)
    other = connect("other", GLOBEX)
    result = [ready(client, messages.parse("", "SELECT 1/$1::int"), messages.sync())]
    client.send(messages.bind("", "", ["0"]) + messages.execute("") + messages.sync()
                + messages.parse("", "SELECT $1::text AS t") + describe("S", "") + flush())
    result.append(client.read_ready() + client.read_until(lambda replies: len(replies) >= 3))
    result.append(ready(other, messages.query("SELECT 1")))
    result.append(ready(client, messages.bind("", "", ["x"]), messages.execute(""), messages.sync()))
    return result


def application_name_reported_to_each_client(connect: Connect) -> Transcript:
    """https://github.com/pgbouncer/pgbouncer/issues/993: two clients with an empty application_name at
    startup SET the same application_name; the second was not told (no ParameterStatus), because the
    server connection it got already held the value and Postgres reports only changes."""
    first = connect("first", ACME, application_name="")
    result = [ready(first, messages.query("SET application_name = 'MyApp'"))]
    second = connect("second", ACME, application_name="")
    result.append(ready(second, messages.query("SET application_name = 'MyApp'")))
    result.append(ready(second, messages.query("SHOW application_name")))
    result.append(ready(first, messages.query("SHOW application_name")))
    return result


def read_only_setting_stays_with_its_client(connect: Connect) -> Transcript:
    """https://github.com/akhileshrangani4/teachanything/pull/450 (Supavisor, transaction mode):
    `SET default_transaction_read_only = on` in front of a query stayed on the shared server connection
    and other clients' writes failed with 25006. Postgres reports this setting (ParameterStatus) too."""
    writer = connect("writer", GLOBEX)
    diagnostic = connect("diagnostic", ACME)
    result = [ready(diagnostic, messages.query("SET default_transaction_read_only = on; SELECT 1"))]
    result.append(ready(writer, messages.query(f"INSERT INTO {SCRATCH} VALUES (1)")))
    result.append(ready(writer, messages.query("SHOW default_transaction_read_only")))
    result.append(ready(diagnostic, messages.query(f"INSERT INTO {SCRATCH} VALUES (2)")))
    return result


def empty_search_path_from_set_config(connect: Connect) -> Transcript:
    """https://github.com/pgdogdev/pgdog/issues/677 (pg_dump): `SELECT pg_catalog.set_config('search_path',
    '', false)` failed with 42601 "zero-length delimited identifier" once the pooler carried the
    setting to the server connection as an identifier."""
    dump = connect("pg_dump", ACME)
    other = connect("other", GLOBEX)
    result = [ready(dump, messages.query("SELECT pg_catalog.set_config('search_path', '', false)"))]
    result.append(ready(other, messages.query("SHOW search_path")))
    result.append(ready(dump, messages.query("SHOW search_path")))
    result.append(ready(dump, run_query("SELECT count(*) FROM pg_catalog.pg_class WHERE relname = 'pg_class'")))
    result.append(ready(dump, messages.query("SET search_path = ''")))
    result.append(ready(other, messages.query("SELECT 1")))
    result.append(ready(dump, messages.query("SHOW search_path")))
    return result


def failed_sets_leave_no_setting_behind(connect: Connect) -> Transcript:
    """https://github.com/npgsql/npgsql/issues/3333: behind PgBouncer, pg_settings showed a setting at
    source 'session' that the client never set. Here the client's SETs fail (commit_delay is for
    superusers, 42501; a bad value, 22023): the server connections it gets next must not carry either at
    session level (the proxy had taken the server's value for the client's and, resetting it for the next
    client, ended that client's session with FATAL 42501)."""
    client = connect("npgsql", ACME)
    other = connect("other", GLOBEX)
    same_tenant = connect("same tenant", ACME)
    sources = ("SELECT name, setting, source FROM pg_catalog.pg_settings"
               " WHERE name IN ('commit_delay', 'work_mem') ORDER BY name")
    result = [ready(client, messages.query("SET commit_delay = 0"))]
    result.append(ready(client, run_query("SET work_mem = 'plenty'")))
    result.append(ready(client, messages.query(sources)))
    result.append(ready(same_tenant, messages.query(sources)))
    result.append(ready(other, messages.query(sources)))
    result.append(ready(client, messages.query(sources)))
    return result


def settings_through_the_extended_protocol(connect: Connect) -> Transcript:
    """https://github.com/pgbouncer/pgbouncer/issues/1288 (Diesel): `SET TIME ZONE 'UTC'` sent as
    Parse/Bind/Execute of the unnamed statement; the setting and its ParameterStatus must follow the
    client to its next transaction."""
    diesel = connect("diesel", ACME, TimeZone="Europe/Helsinki")
    other = connect("other", GLOBEX)
    result = [ready(diesel, run_query("SET TIME ZONE 'UTC'"))]
    result.append(ready(other, messages.query("SHOW TimeZone")))
    result.append(ready(diesel, messages.query("SHOW TimeZone")))
    return result


def parse_refused_in_a_failed_block_then_again(connect: Connect) -> Transcript:
    """https://github.com/supabase/supavisor/issues/1175: a named Parse refused with 25P02 inside a
    failed block; after ROLLBACK the same name is parsed and executed (Supavisor had kept the name and
    closed the connection with 42P05)."""
    client = connect("asyncpg", ACME)
    return [
        ready(client, messages.query("BEGIN")),
        ready(client, messages.query("SELECT 1/0")),
        ready(client, messages.parse("s1", "SELECT 1 AS one"), describe("S", "s1"), messages.sync()),
        ready(client, messages.query("ROLLBACK")),
        ready(client, messages.parse("s1", "SELECT 1 AS one"), describe("S", "s1"), messages.bind("", "s1", []),
              messages.execute(""), messages.sync()),
    ]


def describe_alone_on_another_connection(connect: Connect) -> Transcript:
    """https://github.com/supabase/supavisor/issues/1174 (pgJDBC `getMetaData()`): a standalone Describe
    of a named statement, after another client took the server connection, got 26000."""
    jdbc = connect("jdbc", ACME)
    other = connect("other", GLOBEX)
    result = [ready(jdbc, messages.parse("S_1", "SELECT $1::int AS n, 'x'::text AS t"), messages.sync())]
    result.append(ready(other, messages.parse("S_1", "SELECT 2 AS other"), messages.bind("", "S_1", []),
                        messages.execute(""), messages.sync()))
    result.append(ready(jdbc, describe("S", "S_1"), messages.sync()))
    result.append(ready(jdbc, messages.bind("", "S_1", ["7"]), messages.execute(""), messages.sync()))
    return result


def deallocate_all_then_parse_in_one_pipeline(connect: Connect) -> Transcript:
    """https://github.com/pgbouncer/pgbouncer/issues/1535: `DEALLOCATE ALL` and, in the same pipeline
    before its answer, a named Parse; PgBouncer dropped the later statement when DEALLOCATE ALL's
    CommandComplete arrived."""
    client = connect("psycopg", ACME)
    other = connect("other", GLOBEX)
    result = [ready(client, messages.parse("old", "SELECT 0"), messages.sync())]
    result.append(ready(client, messages.query("DEALLOCATE ALL"), messages.parse("s1", "SELECT 1 AS one"),
                        messages.bind("", "s1", []), messages.execute(""), messages.sync(), count=2))
    result.append(ready(other, messages.query("SELECT 1")))
    result.append(ready(client, messages.bind("", "s1", []), messages.execute(""), messages.sync()))
    result.append(ready(client, messages.bind("", "old", []), messages.execute(""), messages.sync()))
    return result


def deallocate_all_inside_a_transaction(connect: Connect) -> Transcript:
    """https://github.com/pgbouncer/pgbouncer/issues/974 (Prisma): `DEALLOCATE ALL` at the start of a
    transaction, then named statements; the pooler's own statements were gone and it answered 26000."""
    prisma = connect("prisma", ACME)
    result = [ready(prisma, messages.parse("s0", "SELECT 0 AS zero"), messages.sync())]
    result.append(ready(prisma, messages.query("BEGIN")))
    result.append(ready(prisma, messages.query("DEALLOCATE ALL")))
    result.append(ready(prisma, messages.parse("s0", "SELECT $1::int AS n"), messages.bind("", "s0", ["5"]),
                        messages.execute(""), messages.sync()))
    result.append(ready(prisma, messages.query("COMMIT")))
    result.append(ready(prisma, messages.bind("", "s0", ["6"]), messages.execute(""), messages.sync()))
    return result


def close_and_parse_of_one_name_in_one_request(connect: Connect) -> Transcript:
    """https://github.com/pgdogdev/pgdog/pull/463: a client closes a prepared statement and parses one
    of the same name in the same request; PgDog handled the Close out of order."""
    client = connect("client", ACME)
    result = [ready(client, messages.parse("s1", "SELECT 1 AS one"), messages.sync())]
    result.append(ready(client, close("S", "s1"), messages.parse("s1", "SELECT 2 AS two"), describe("S", "s1"),
                        messages.bind("", "s1", []), messages.execute(""), messages.sync()))
    result.append(ready(client, messages.bind("", "s1", []), messages.execute(""), close("S", "s1"),
                        messages.parse("s1", "SELECT 3 AS three"), messages.bind("", "s1", []), messages.execute(""),
                        messages.sync()))
    return result


def extended_copy_in_with_sync_behind_execute(connect: Connect) -> Transcript:
    """https://github.com/pgbouncer/pgbouncer/pull/1025 (issues 1023, 1024): COPY FROM STDIN through the
    extended protocol with a Sync right behind the Execute, which the server ignores during COPY IN."""
    client = connect("copier", ACME)
    client.send(messages.parse("", f"COPY {SCRATCH} FROM STDIN") + messages.bind("", "", []) + messages.execute("")
                + messages.sync())
    result = [client.read_until(lambda replies: replies[-1:] and replies[-1][0] in (b"G", b"E"))]
    result.append(ready(client, copy_data(b"41\n42\n"), copy_done(), messages.sync()))
    result.append(ready(client, messages.query("SELECT 1")))
    return result


def copy_that_fails_early_in_a_block(connect: Connect) -> Transcript:
    """https://github.com/pgbouncer/pgbouncer/pull/1470: COPY FROM STDIN inside a transaction block fails
    on an early row while the client is still sending data; the pooler kept the server connection
    "active" for ever, and the next client waited."""
    client = connect("copier", ACME)
    other = connect("other", GLOBEX)
    result = [ready(client, messages.query("BEGIN"))]
    client.send(messages.query(f"COPY {SCRATCH} FROM STDIN"))
    result.append(client.read_until(lambda replies: replies[-1:] and replies[-1][0] in (b"G", b"E")))
    rows = b"".join(copy_data(b"%d\n" % n) for n in range(2000))
    result.append(ready(client, copy_data(b"not a number\n"), rows, copy_done()))
    result.append(ready(client, messages.query("COMMIT")))
    result.append(ready(other, messages.query("SELECT 1")))
    return result


def cancel_after_each_statement(connect: Connect) -> Transcript:
    """https://github.com/pgbouncer/pgbouncer/issues/223 (Npgsql 1636): a cancel sent right after each
    statement's reply, when nothing runs; PgBouncer answered it with a ReadyForQuery on the client's
    connection and the client read the previous statement's results for its next one."""
    npgsql = connect("npgsql", ACME)
    assert npgsql.key is not None
    port = npgsql.sock.getpeername()[1]
    result = []
    for number in range(5):
        result.append(ready(npgsql, messages.parse("", f"-- command {number}\n SELECT {number}"),
                            messages.bind("", "", []), describe("P", ""), messages.execute(""), messages.sync()))
        send_cancel(port, npgsql.key)
    return result


SCENARIOS = [
    set_then_extended_query_in_one_write,
    failed_group_then_parse_flush_before_ready,
    application_name_reported_to_each_client,
    read_only_setting_stays_with_its_client,
    empty_search_path_from_set_config,
    failed_sets_leave_no_setting_behind,
    settings_through_the_extended_protocol,
    parse_refused_in_a_failed_block_then_again,
    describe_alone_on_another_connection,
    deallocate_all_then_parse_in_one_pipeline,
    deallocate_all_inside_a_transaction,
    close_and_parse_of_one_name_in_one_request,
    extended_copy_in_with_sync_behind_execute,
    copy_that_fails_early_in_a_block,
    cancel_after_each_statement,
]


def run(scenario: Callable[[Connect], Transcript], connect: Connect) -> Transcript:
    """Run `scenario` with connections from `connect`, closed afterwards."""
    opened: list[Wire] = []

    def tracked(name: str, tenant: str, **parameters: str) -> Wire:
        wire = connect(name, tenant, **parameters)
        opened.append(wire)
        return wire

    try:
        return scenario(tracked)
    finally:
        for wire in opened:
            wire.close()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[scenario.__name__ for scenario in SCENARIOS])
def test_reported_steps_answer_as_directly(scenario: Callable[[Connect], Transcript], mode: str, scratch: str,
                                           proxies: dict[str, ProxyProcess], pg: EmbeddedPostgres,
                                           tenant_db: TenantDatabase) -> None:
    def direct(name: str, tenant: str, **parameters: str) -> Wire:
        return connect_direct(pg.port, tenant_db.app_role, tenant_db.app_password, tenant_db.database,
                              f"direct {name}", **parameters)

    proxy = proxies[mode]

    def proxied(name: str, tenant: str, **parameters: str) -> Wire:
        return connect_proxy(proxy.port, proxy.token(tenant), f"proxy {name}", **parameters)

    expected = run(scenario, direct)
    got = run(scenario, proxied)
    for index, (want, have) in enumerate(zip(expected, got, strict=True), 1):
        assert_same(want, have, f"the replies to write {index}")
    assert proxy.alive()


@pytest.mark.parametrize("mode", [mode for mode in MODES if mode != "session"])
def test_another_clients_statement_timeout_is_not_mine(mode: str, proxies: dict[str, ProxyProcess]) -> None:
    """https://github.com/keygen-sh/keygen-api/pull/1029: a `SET statement_timeout` behind PgBouncer in
    transaction mode landed on whichever server connection the client had, and timed other clients out.
    Here one client sets 1 ms and takes turns on the one server connection with a client of another
    tenant and one of its own: they never see its value, and the proxy's reset and settings groups in
    front of their statements, which ran under it, no longer end their sessions with 57014."""
    proxy = proxies[mode]
    hasty = connect_proxy(proxy.port, proxy.token(ACME), "hasty")
    others = [connect_proxy(proxy.port, proxy.token(GLOBEX), "other tenant"),
              connect_proxy(proxy.port, proxy.token(ACME), "same tenant")]
    try:
        assert ready(hasty, messages.query("SET statement_timeout = 1"))[-1] == (b"Z", b"I")
        for _ in range(TIMEOUT_ROUNDS):
            for other in others:
                ready(hasty, messages.query("SELECT 1"))  # may time out, as directly; it takes the connection
                replies = ready(other, messages.query("SHOW statement_timeout"))
                assert [messages.parse_data_row(body) for kind, body in replies if kind in b"DE"] == [[b"0"]], replies
    finally:
        for wire in (hasty, *others):
            wire.close()
    assert proxy.alive()
