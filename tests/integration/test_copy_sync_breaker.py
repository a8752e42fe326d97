"""Raw-protocol COPY FROM STDIN sequences that answered differently through the proxy than directly
(found by a breaker session), each with the direct Postgres run as the expected value.

The proxy's reply queue of a server connection counted a COPY that failed before the client's CopyDone /
CopyFail (`_copy_end_ignored`, gone), expecting the client to send one later that the server would
ignore. A client need not: after a failed simple-Query COPY it has its ErrorResponse and ReadyForQuery
(libpq no longer sends CopyDone once it has read the error). The count then stayed on the server
connection, across clients and tenants, and swallowed the CopyDone of the next COPY run there; an
extended-query COPY behind it (asyncpg's copy_records_to_table) had its Sync taken for a Sync among COPY
data and the session ended with XX000 "lost track of the upstream server's replies".
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from differential import (
    COPY_DONE,
    SYNC,
    IncompleteReply,
    Transcript,
    Wire,
    Write,
    assert_same,
    connect_direct,
    connect_proxy,
    render,
    run_and_compare,
    run_direct,
    step_bind,
    step_copy_data,
    step_execute,
    step_parse,
    step_query,
)
from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres
from proxy.protocol import messages
from support import ACME, GLOBEX, ProxyProcess, unprotected_table

TABLE = "breaker_scratch"
COPY = f"COPY {TABLE} FROM STDIN"
SELECT_ALL = f"SELECT n, t FROM {TABLE} ORDER BY n"
MODES = {"session": {"pool": {"mode": "session", "size": 1}}, "transaction": {"pool": {"mode": "transaction", "size": 1}}}

# A simple-Query COPY whose first row is bad: ErrorResponse, ReadyForQuery; the client sends no CopyDone
# (nothing obliges it to: the COPY is over).
FAILED_COPY_WITHOUT_COPYDONE = Write((step_query(COPY), step_copy_data(b"x\tbad\n")))
# The plainest extended-query COPY: Parse, Bind, Execute, CopyData, CopyDone, Sync.
EXTENDED_COPY = Write((step_parse("", COPY), step_bind("", "", []), step_execute(""), step_copy_data(b"6\tsix\n"),
                       COPY_DONE, SYNC))
READ_BACK = Write((step_query(SELECT_ALL),))


@pytest.fixture(scope="module")
def scratch(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> Iterator[psycopg.Connection[Any]]:
    """A table without Row-Level Security, granted to the application role, and a superuser connection
    that empties it before each run."""
    with unprotected_table(pg, tenant_db, TABLE, "n int PRIMARY KEY, t text NOT NULL", "SELECT, INSERT, UPDATE, DELETE"):
        admin = psycopg.connect(pg.admin_dsn(tenant_db.database), autocommit=True)
        admin.execute("SET lock_timeout = '10s'")
        yield admin
        admin.close()


def refill(admin: psycopg.Connection[Any]) -> None:
    admin.execute(f"TRUNCATE {TABLE}")
    admin.execute(f"INSERT INTO {TABLE} VALUES (1, 'one'), (2, 'two')")


def direct(pg: EmbeddedPostgres, db: TenantDatabase, name: str = "direct") -> Wire:
    return connect_direct(pg.port, db.app_role, db.app_password, db.database, name)


def expected(pg: EmbeddedPostgres, db: TenantDatabase, admin: psycopg.Connection[Any], scenario: list[Write]) -> list[list[Any]]:
    refill(admin)
    wire = direct(pg, db)
    try:
        return run_direct(wire, scenario)
    finally:
        wire.close()


def through_proxy(proxy: ProxyProcess, admin: psycopg.Connection[Any], scenario: list[Write], mode: str,
                  expected_replies: list[list[Any]], tenant: str = ACME, refill_first: bool = True) -> None:
    if refill_first:
        refill(admin)
    wire = connect_proxy(proxy.port, proxy.token(tenant), f"proxy ({mode})")
    try:
        run_and_compare(wire, scenario, expected_replies, Transcript(mode))
    finally:
        wire.close()


def another_tenant_is_served(proxy: ProxyProcess) -> None:
    wire = connect_proxy(proxy.port, proxy.token(GLOBEX), "another tenant")
    try:
        replies = wire.run(Write((step_query("SELECT 1"),)))
    finally:
        wire.close()
    assert [render(reply) for reply in replies][:4] == [
        "RowDescription(['?column?'])", "DataRow([b'1'])", "CommandComplete('SELECT 1')", "ReadyForQuery(I)"
    ]


@pytest.mark.parametrize("mode", list(MODES))
def test_extended_copy_after_a_simple_copy_that_failed_before_its_copydone(
    mode: str, make_proxy: Any, pg: EmbeddedPostgres, tenant_db: TenantDatabase, scratch: psycopg.Connection[Any]
) -> None:
    """One client. Write 1: Query COPY ... FROM STDIN, CopyData with a bad row (ErrorResponse 22P02,
    ReadyForQuery; no CopyDone). Write 2: Parse/Bind/Execute of the COPY, CopyData, CopyDone, Sync.
    Directly: ParseComplete, BindComplete, CopyInResponse, CommandComplete COPY 1, ReadyForQuery.
    Through the proxy before the fix (both modes): FATAL XX000 "lost track of the upstream server's replies: server
    sent ReadyForQuery while it owes the reply to Close" in place of the ParseComplete; the session ends."""
    proxy = make_proxy(MODES[mode])
    scenario = [FAILED_COPY_WITHOUT_COPYDONE, EXTENDED_COPY, READ_BACK]
    through_proxy(proxy, scratch, scenario, mode, expected(pg, tenant_db, scratch, scenario))
    another_tenant_is_served(proxy)


@pytest.mark.parametrize("mode", list(MODES))
def test_extended_copy_on_a_server_connection_where_another_tenant_left_a_failed_copy(
    mode: str, make_proxy: Any, pg: EmbeddedPostgres, tenant_db: TenantDatabase, scratch: psycopg.Connection[Any]
) -> None:
    """Pool size 1. A client of tenant globex sends Query COPY ... FROM STDIN and a bad row (ErrorResponse,
    ReadyForQuery; no CopyDone), then leaves. A client of tenant acme then gets that server connection
    and runs a plain extended-query COPY (Parse/Bind/Execute, CopyData, CopyDone, Sync).
    Directly (any session): ParseComplete, BindComplete, CopyInResponse, CommandComplete COPY 1,
    ReadyForQuery. Through the proxy before the fix: FATAL XX000 "lost track of the upstream server's replies", the acme
    session ends: one tenant's failed COPY breaks another tenant's next COPY."""
    proxy = make_proxy(MODES[mode])
    scenario = [EXTENDED_COPY, READ_BACK]
    wanted = expected(pg, tenant_db, scratch, scenario)
    refill(scratch)
    other = connect_proxy(proxy.port, proxy.token(GLOBEX), "globex client")
    other_direct = direct(pg, tenant_db, "globex, direct")
    try:
        assert_same(other_direct.run(FAILED_COPY_WITHOUT_COPYDONE), other.run(FAILED_COPY_WITHOUT_COPYDONE),
                    "the globex client's replies")
    finally:
        other.close()
        other_direct.close()
    refill(scratch)
    through_proxy(proxy, scratch, scenario, mode, wanted, refill_first=False)
    another_tenant_is_served(proxy)


def violate(wire: Wire, start: bytes, message: bytes, first: int) -> tuple[list[Any], str]:
    """`start` (a COPY FROM STDIN begun, with data) and its `first` replies, then `message` during COPY IN:
    every reply up to the end of the connection, and how reading ended ("closed", or "open" after 5 s)."""
    wire.send(start)
    replies = wire.read_until(lambda got: len(got) >= first)
    wire.send(message)
    rest, end = wire.read_to_end(5.0)
    return replies + rest, end


@pytest.mark.parametrize("mode", list(MODES))
def test_parse_during_extended_copy_in_ends_the_session_with_postgres_08p01(
    mode: str, make_proxy: Any, pg: EmbeddedPostgres, tenant_db: TenantDatabase, scratch: psycopg.Connection[Any]
) -> None:
    """A protocol violation by the client, no Sync among the data: Parse/Bind/Execute of COPY ... FROM
    STDIN, CopyData (write 1); then Parse of 'SELECT 1' and Sync (write 2) while the server is in COPY IN.
    Directly: ErrorResponse ERROR 08P01 "unexpected message type 0x50 during COPY from stdin", then FATAL
    08P01 "terminating connection because protocol synchronization was lost", connection closed.
    Through the proxy before the fix: FATAL XX000 "lost track of the upstream server's replies: server sent message b'E'
    while it owes the proxy's probe after a failed COPY" (session mode instead of the ERROR; transaction
    mode instead of the FATAL 08P01)."""
    proxy = make_proxy(MODES[mode])
    start = (messages.parse("c", COPY) + messages.bind("", "c", []) + messages.execute("")
             + messages.message(b"d", b"6\tsix\n"))
    violation = messages.parse("", "SELECT 1") + messages.sync()
    streams = []
    for wire in (direct(pg, tenant_db), connect_proxy(proxy.port, proxy.token(ACME), f"proxy ({mode})")):
        try:
            streams.append(violate(wire, start, violation, 3))
        finally:
            wire.close()
    (direct_replies, direct_end), (proxied, proxy_end) = streams
    # After the server's FATAL, the proxy may add its own FATAL 08006 for the closed upstream: compare
    # the messages direct Postgres sends.
    assert_same(direct_replies, proxied[: len(direct_replies)], "replies to a Parse during COPY IN")
    assert (direct_end, proxy_end) == ("closed", "closed")


def test_query_during_simple_copy_in_is_answered_in_transaction_mode(
    make_proxy: Any, pg: EmbeddedPostgres, tenant_db: TenantDatabase, scratch: psycopg.Connection[Any]
) -> None:
    """A protocol violation by the client, no Sync among the data, transaction mode (pool size 1):
    Query COPY ... FROM STDIN, CopyData (write 1), then Query 'SELECT 1' (write 2) during COPY IN.
    Directly: ERROR 08P01 "unexpected message type 0x51 during COPY from stdin", FATAL 08P01, connection
    closed (the backend is freed). Through the proxy before the fix: nothing at all; the Query waits for the COPY's
    ReadyForQuery, which never comes, and the client keeps the pool's only server connection, so a client of
    another tenant waits too."""
    proxy = make_proxy(MODES["transaction"])
    start = messages.query(COPY) + messages.message(b"d", b"6\tsix\n")
    wire = direct(pg, tenant_db)
    try:
        direct_replies, direct_end = violate(wire, start, messages.query("SELECT 1"), 1)
    finally:
        wire.close()
    wire = connect_proxy(proxy.port, proxy.token(ACME), "proxy (transaction)")
    try:
        proxied, proxy_end = violate(wire, start, messages.query("SELECT 1"), 1)
        other_tenant = "served"
        if proxy_end != "closed":
            try:
                another_tenant_is_served(proxy)
            except IncompleteReply as exc:
                other_tenant = f"waits for the server connection ({exc.reason})"
    finally:
        wire.close()
    assert (proxy_end, other_tenant) == (direct_end, "served"), f"{proxy_end}; another tenant: {other_tenant}"
    assert_same(direct_replies, proxied[: len(direct_replies)], "replies to a Query during COPY IN")
