"""A Query the guard refuses, through transaction pooling, and the unnamed statement (found by a breaker
session): each compared with the direct Postgres run.

The proxy sends a Query that fails in place of a refused one, and a simple Query drops the server
connection's unnamed statement. The proxy went on believing the connection held the unnamed statement a
client had parsed there: that client, served on it again, had its Describe or Bind of the unnamed
statement sent without the statement parsed again, and got 26000 where Postgres answers it. A refused
Query of the client's own drops its unnamed statement, as the Query would have directly; so does a
DEALLOCATE the proxy answers itself.
"""

from __future__ import annotations

from typing import Any

from differential import Reply, assert_same, connect_proxy, describe, exchange, exchange_and_compare, exchange_directly
from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres
from proxy.protocol import messages
from support import ACME

REFUSED = messages.query("SET ROLE postgres")  # the guard refuses it; directly, Postgres refuses it with 42501
PARSE = messages.parse("", "SELECT 1") + messages.sync()
USE = [describe("S", "") + messages.sync(), messages.bind("", "", []) + messages.execute() + messages.sync()]


def direct_replies(pg: EmbeddedPostgres, db: TenantDatabase, writes: list[bytes]) -> list[list[Reply]]:
    return exchange_directly(pg.port, db.app_role, db.app_password, db.database, writes)


def test_another_clients_refused_query_on_the_connection(make_proxy: Any, pg: EmbeddedPostgres,
                                                         tenant_db: TenantDatabase) -> None:
    """Transaction mode, pool size 1. Client A: Parse of the unnamed statement `SELECT 1`, Sync. Client B
    (same tenant): Query `SET ROLE postgres` (refused). Client A: Describe of the unnamed statement, Sync;
    Bind, Execute, Sync. Directly: ParameterDescription, RowDescription, then the row. Through the proxy
    before the fix: ErrorResponse 26000 "unnamed prepared statement does not exist" for both."""
    expected = direct_replies(pg, tenant_db, [PARSE, *USE])
    proxy = make_proxy({"pool": {"mode": "transaction", "size": 1}})
    client = connect_proxy(proxy.port, proxy.token(ACME), "a")
    other = connect_proxy(proxy.port, proxy.token(ACME), "b")
    try:
        got = exchange(client, [PARSE])
        assert [kind for kind, _ in exchange(other, [REFUSED])[0]] == [b"E", b"Z"]
        got += exchange(client, USE)
    finally:
        client.close()
        other.close()
    for index, (direct, proxied) in enumerate(zip(expected, got)):
        assert_same(direct, proxied, f"the replies to client A's write {index + 1}")


def test_the_clients_own_refused_query_drops_its_unnamed_statement(make_proxy: Any, pg: EmbeddedPostgres,
                                                                   tenant_db: TenantDatabase) -> None:
    """Transaction mode, pool size 1: Parse of the unnamed statement, Sync; Query `SET ROLE postgres`; Describe
    of the unnamed statement, Sync; Bind, Execute, Sync. Directly, the Query (refused by Postgres) dropped
    the unnamed statement: 26000 for the Describe and the Bind. The refusals' texts differ and are not
    compared."""
    expected = direct_replies(pg, tenant_db, [PARSE, REFUSED, *USE])
    proxy = make_proxy({"pool": {"mode": "transaction", "size": 1}})
    client = connect_proxy(proxy.port, proxy.token(ACME))
    try:
        got = exchange(client, [PARSE, REFUSED, *USE])
    finally:
        client.close()
    assert [kind for kind, _ in got[1]] == [kind for kind, _ in expected[1]] == [b"E", b"Z"]
    for index in (0, 2, 3):
        assert_same(expected[index], got[index], f"the replies to write {index + 1}")


def test_a_deallocate_the_proxy_answers_drops_the_unnamed_statement(make_proxy: Any, pg: EmbeddedPostgres,
                                                                    tenant_db: TenantDatabase) -> None:
    """Transaction mode: Parse of `s1` and of the unnamed statement, Sync; Query `DEALLOCATE s1` (the proxy
    answers it: the server-side statement may be shared); Describe of the unnamed statement, Sync; Bind,
    Execute, Sync. Directly the Query dropped the unnamed statement: 26000 for the Describe and the Bind.
    Before the fix the proxy kept it, and both were answered."""
    writes = [messages.parse("s1", "SELECT 2") + PARSE, messages.query("DEALLOCATE s1"), *USE]
    expected = direct_replies(pg, tenant_db, writes)
    proxy = make_proxy({"pool": {"mode": "transaction", "size": 1}})
    exchange_and_compare(connect_proxy(proxy.port, proxy.token(ACME)), writes, expected)
