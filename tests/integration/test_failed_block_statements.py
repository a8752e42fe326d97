"""A client's prepared statement used inside a failed transaction block on a server connection that never
held it, against direct Postgres, in both pool modes.

In Postgres, inside a failed block (25P02 "current transaction is aborted, commands ignored until end of
transaction block" until the block ends), a Bind of a statement fails with that 25P02 (the rest of the
group is skipped up to Sync), a Describe of a statement that returns rows too, and a statement that ends
the block (ROLLBACK) binds and runs. In transaction mode the proxy prepares the client's statement on
whichever server connection the client's block landed on, just before the Bind or Describe; there that
Parse fails with the same 25P02 (or, for ROLLBACK, runs), and the client must get what Postgres gives
for its own message: the plain 25P02, not an error about preparing the statement again.

Pool size 2: the client's first group prepares its statements on one server connection and reads that
connection's pid; another tenant's client then holds that connection in a transaction block, so the
client's block lands on the other one, which never held them (session mode: one connection throughout).
"""

from __future__ import annotations

from typing import Any

import pytest

from differential import Reply, Wire, assert_same, connect_direct, connect_proxy, describe
from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres
from proxy.protocol import messages
from support import ACME, GLOBEX, ProxyProcess

MODES = {"session": {"pool": {"mode": "session"}}, "transaction": {"pool": {"mode": "transaction", "size": 2}}}

PREPARE = (
    messages.parse("s1", "SELECT $1::int + 1") + describe("S", "s1") + messages.parse("rollback_s", "ROLLBACK")
    + messages.parse("pid", "SELECT pg_backend_pid()") + messages.bind("", "pid", []) + messages.execute("")
    + messages.sync()
)
# Each write, answered by one ReadyForQuery, sent directly and through the proxy after PREPARE.
STEPS = [
    messages.query("BEGIN"),
    messages.query("SELECT 1/0"),  # 22012: the block has failed
    messages.bind("", "s1", ["1"]) + messages.execute("") + messages.sync(),  # 25P02, Execute skipped
    describe("S", "s1") + messages.sync(),  # 25P02 (the statement returns rows)
    messages.bind("", "rollback_s", []) + messages.execute("") + messages.sync(),  # ROLLBACK runs
    messages.bind("", "s1", ["1"]) + messages.execute("") + messages.sync(),  # 2
]


def backend_pid(replies: list[Reply]) -> int:
    assert not any(kind == b"E" for kind, _ in replies), replies
    (value,) = next(messages.parse_data_row(body) for kind, body in replies if kind == b"D")
    assert value is not None
    return int(value)


def query_pid(wire: Wire, sql: str) -> int:
    wire.send(messages.query(sql))
    return backend_pid(wire.read_ready())


@pytest.mark.parametrize("mode", list(MODES))
def test_statements_in_a_failed_block_on_a_connection_that_never_held_them(
    make_proxy: Any, pg: EmbeddedPostgres, tenant_db: TenantDatabase, mode: str
) -> None:
    proxy: ProxyProcess = make_proxy(MODES[mode])
    direct = connect_direct(pg.port, tenant_db.app_role, tenant_db.app_password, tenant_db.database)
    proxied = connect_proxy(proxy.port, proxy.token(ACME))
    others: list[Wire] = []
    try:
        for wire in (direct, proxied):
            wire.send(PREPARE)
            held_by = backend_pid(wire.read_ready())
        if mode == "transaction":  # another tenant's client holds the connection that holds s1
            holder = connect_proxy(proxy.port, proxy.token(GLOBEX), name="holder")
            others.append(holder)
            holder.send(messages.query("BEGIN"))
            holder.read_ready()
            if query_pid(holder, "SELECT pg_backend_pid()") != held_by:
                spare = connect_proxy(proxy.port, proxy.token(GLOBEX), name="spare")
                others.append(spare)
                spare.send(messages.query("BEGIN"))
                spare.read_ready()
                assert query_pid(spare, "SELECT pg_backend_pid()") == held_by
                holder.send(messages.query("ROLLBACK"))
                holder.read_ready()
        for step in STEPS:
            direct.send(step)
            expected = direct.read_ready()
            proxied.send(step)
            assert_same(expected, proxied.read_ready(), f"replies to {step[:40]!r}")
        if mode == "transaction":  # the client's block did run on the other server connection
            assert query_pid(proxied, "SELECT pg_backend_pid()") != held_by
    finally:
        for wire in (direct, proxied, *others):
            wire.close()
    assert proxy.alive()
