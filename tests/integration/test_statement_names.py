"""Prepared statement names, in both modes, against direct Postgres (found by a breaker helper). Postgres
keys prepared statements by the first 63 bytes of their name (NAMEDATALEN - 1), so two names that agree
on those are one statement, and refuses a name that is not valid in the client's encoding (22021). In
transaction mode the proxy keeps each client's statements itself under names of its own, so it must cut
names the same way and refuse the invalid ones itself; the error texts keep the name as the client sent
it.

Each case runs the same writes directly and through the proxy, with another tenant's client taking the
one server connection between them (transaction mode), and compares the whole reply streams.
"""

from __future__ import annotations

from typing import Any

import pytest

from differential import assert_same, close, connect_direct, connect_proxy
from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres
from proxy.protocol import messages
from support import GLOBEX, ProxyProcess

MODES = {"session": {"pool": {"mode": "session"}}, "transaction": {"pool": {"mode": "transaction", "size": 1}}}
LONG_1, LONG_2 = "s" * 63 + "1", "s" * 63 + "2"

CASES: dict[str, list[bytes]] = {
    "a second name that agrees on 63 bytes is the same statement": [
        messages.parse(LONG_1, "SELECT 1") + messages.sync(),
        messages.parse(LONG_2, "SELECT 2") + messages.sync(),  # 42P05, naming LONG_2
        messages.bind("", LONG_2, []) + messages.execute("") + messages.sync(),  # runs SELECT 1
        close("S", LONG_2) + messages.sync(),  # closes it
        messages.bind("", LONG_1, []) + messages.execute("") + messages.sync(),  # 26000
    ],
    "bind and describe by the first 63 bytes or by a longer name": [
        messages.parse("q" * 64, "SELECT 64") + messages.sync(),
        messages.bind("", "q" * 63, []) + messages.execute("") + messages.sync(),
        messages.bind("", "q" * 70, []) + messages.execute("") + messages.sync(),
        messages.message(b"D", b"S" + b"q" * 80 + b"\0") + messages.sync(),
    ],
    "a name that is not valid UTF-8 is refused for every message that names it (22021)": [
        messages.message(b"P", b"st\xe9\0SELECT 1\0\0\0") + messages.sync(),
        messages.message(b"B", b"\0st\xe9\0\0\0\0\0\0\0") + messages.execute("") + messages.sync(),
        messages.message(b"D", b"S\xe9ab\0") + messages.sync(),
        close("S", "x") + messages.message(b"C", b"Sst\xf0\x9f\0") + messages.sync(),
        messages.parse("caf\u00e9", "SELECT 2") + messages.bind("", "caf\u00e9", []) + messages.execute("")
        + messages.sync(),  # valid UTF-8 beyond ASCII is a name like any other
    ],
    "SQL DEALLOCATE of a long name": [
        messages.parse("r" * 70, "SELECT 70") + messages.sync(),
        messages.query("DEALLOCATE " + "r" * 70),
        messages.bind("", "r" * 70, []) + messages.execute("") + messages.sync(),
    ],
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(CASES))
def test_statement_names_answer_as_directly(make_proxy: Any, pg: EmbeddedPostgres, tenant_db: TenantDatabase,
                                                 mode: str, case: str) -> None:
    proxy: ProxyProcess = make_proxy(MODES[mode])
    direct = connect_direct(pg.port, tenant_db.app_role, tenant_db.app_password, tenant_db.database)
    proxied = connect_proxy(proxy.port, proxy.token())
    other = connect_proxy(proxy.port, proxy.token(GLOBEX), name="other")
    try:
        for write in CASES[case]:
            direct.send(write)
            expected = direct.read_ready()
            proxied.send(write)
            assert_same(expected, proxied.read_ready(), f"replies to {write[:40]!r}")
            other.send(messages.query("SELECT 1"))  # takes the one server connection in between
            other.read_ready()
    finally:
        for wire in (direct, proxied, other):
            wire.close()
    assert proxy.alive()


UNNAMED_STEPS: dict[str, list[tuple[bytes, int]]] = {  # each write, and the ReadyForQuery count that ends its replies
    "a failed Parse leaves no unnamed statement (Postgres drops the old one first)": [
        (messages.parse("", "SELECT 1") + messages.sync(), 1),
        (messages.parse("", "SELEC 1") + messages.message(b"D", b"S\0") + messages.message(b"H")
         + messages.bind("", "", []) + messages.sync() + close("P", "no such portal") + messages.sync(), 2),
        (messages.bind("", "", []) + messages.execute("") + messages.sync(), 1),  # 26000
    ],
    "a simple Query skipped in an error window does not drop the unnamed statement": [
        (messages.parse("", "SELECT generate_series(1, $1::int)") + messages.bind("p1", "", [None, "3"])
         + messages.query("SELECT 2") + messages.sync(), 1),  # the Bind fails: the Query is skipped
        (messages.message(b"D", b"S\0") + messages.sync(), 1),  # the unnamed statement is still there
    ],
    "a Parse skipped in an error window leaves the one before": [
        (messages.parse("", "SELECT 1") + messages.sync(), 1),
        (messages.bind("", "nonexistent", []) + messages.parse("", "SELECT 2") + messages.sync(), 1),
        (messages.bind("", "", []) + messages.execute("") + messages.sync(), 1),  # 1
    ],
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(UNNAMED_STEPS))
def test_the_unnamed_statement_after_a_parse_that_did_not_run(make_proxy: Any, pg: EmbeddedPostgres,
                                                              tenant_db: TenantDatabase, mode: str, case: str) -> None:
    """Found by a longer randomized comparison: the proxy kept the client's unnamed statement from a Parse
    that failed (and prepared it again for a later Bind, 42601 instead of 26000)."""
    proxy: ProxyProcess = make_proxy(MODES[mode])
    direct = connect_direct(pg.port, tenant_db.app_role, tenant_db.app_password, tenant_db.database)
    proxied = connect_proxy(proxy.port, proxy.token())
    other = connect_proxy(proxy.port, proxy.token(GLOBEX), name="other")
    try:
        for write, ready in UNNAMED_STEPS[case]:
            direct.send(write)
            expected = direct.read_ready(ready)
            proxied.send(write)
            assert_same(expected, proxied.read_ready(ready), f"replies to {write[:40]!r}")
            other.send(messages.query("SELECT 1"))
            other.read_ready()
    finally:
        for wire in (direct, proxied, other):
            wire.close()
