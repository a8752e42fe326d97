"""Drivers' extended-query groups on the transaction-mode hot path (`TransactionMode.sync_group`) that
answered differently through the proxy than directly (found by a breaker session), each compared with
the direct Postgres run.

Replies cut right behind the proxy's context: Postgres sends its output when its 8 KiB send buffer is
full, so a context whose replies fill it exactly (claims of about 8 KB in the token) reaches the proxy in a
read of its own, 0.3 s before the rest when the client's statement sleeps. The whole-read path then
found the client's Parse (of the unnamed statement) at the head and took the group's ReadyForQuery for
its reply: the group's entry stayed owed and the next statement met XX000.
"""

from __future__ import annotations

import time
from typing import Any

from differential import Wire, connect_proxy, exchange_and_compare, exchange_directly
from proxy.auth.claims import canonical_json
from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres
from proxy.protocol import messages
from proxy.tenant import ContextBuilder
from support import ACME

POOL_OF_ONE = {"pool": {"mode": "transaction", "size": 1}}
SEND_BUFFER = 8192  # PQ_SEND_BUFFER_SIZE: Postgres sends its output when this much is buffered


def unnamed_group(sql: str, values: list[str | None] | None = None) -> bytes:
    """Parse of the unnamed statement, Bind, Describe of the portal, Execute, Sync: psycopg's and pg8000's
    group, in one write."""
    return (messages.parse("", sql) + messages.bind("", "", values or []) + messages.message(b"D", b"P\0")
            + messages.execute() + messages.sync())


def compare(pg: EmbeddedPostgres, db: TenantDatabase, proxy_wire: Wire, writes: list[bytes]) -> None:
    exchange_and_compare(proxy_wire, writes, exchange_directly(pg.port, db.app_role, db.app_password, db.database, writes))


def filling_sub() -> str:
    """A `sub` claim that makes the context's replies (BindComplete, the DataRow of the four values set,
    CommandComplete, CloseComplete) exactly fill Postgres's send buffer."""
    expires = int(time.time()) + 3600
    values = ContextBuilder("a", "b", "key").values(ACME, 1, expires, canonical_json({"sub": ""}))
    row = 1 + 4 + 2 + sum(4 + len(value.encode()) for value in values if value is not None)
    replies = len(messages.message(b"2")) + row + len(messages.message(b"C", b"SELECT 1\0")) + len(messages.message(b"3"))
    return "x" * (SEND_BUFFER - replies)


def test_a_group_whose_context_replies_fill_the_servers_send_buffer(make_proxy: Any, pg: EmbeddedPostgres,
                                                                    tenant_db: TenantDatabase) -> None:
    """Transaction mode, pool size 1, a token whose claims make the context's replies 8192 bytes. Write 1:
    Query SELECT 1 (the server connection prepares the context statement). Write 2: Parse of the unnamed
    statement `SELECT pg_sleep(0.3)::text, $1::int`, Bind, Describe of the portal, Execute, Sync (the hot
    path). Write 3: Query SELECT 2. Directly: the rows and ReadyForQuery of each. Through the proxy before
    the fix: writes 1 and 2 answered, then FATAL XX000 "lost track of the upstream server's replies: server
    sent message b'3' while it owes the reply to Parse, Bind, Describe, Execute, Sync" for write 3."""
    proxy = make_proxy({**POOL_OF_ONE, "tenant": {"max_claims_bytes": 65536}})
    writes = [messages.query("SELECT 1"), unnamed_group("SELECT pg_sleep(0.3)::text, $1::int", ["5"]),
              messages.query("SELECT 2"), unnamed_group("SELECT 3")]
    compare(pg, tenant_db, connect_proxy(proxy.port, proxy.token(ACME, sub=filling_sub())), writes)
