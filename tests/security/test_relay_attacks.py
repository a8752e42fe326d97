"""Attacks on the relay core (issues 12 and 13) by a hostile tenant speaking raw protocol: odd message
orders, the proxy's reserved names, the per-transaction context, settings and statements that could
outlive their client, and resource bounds. Each runs against a real proxy process in both pool modes
(transaction mode with one server connection, so the tenants share it) and, where the expected value
does not depend on the tenant context, against Postgres directly as the application role.

Tests here that fail expose a bug: they are findings, not flakes.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Iterator
from typing import Any
import pytest

from differential import Reply, Wire, assert_same, close, connect_direct, connect_proxy, copy_data, copy_done, copy_fail, describe, flush
from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres
from proxy.protocol import messages
from support import ACME, GLOBEX, ROWS, ProxyProcess, wait_until

MODES = {"session": {"pool": {"mode": "session", "size": 4}}, "transaction": {"pool": {"mode": "transaction", "size": 1}}}


@pytest.fixture(scope="module", params=list(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def target(mode: str, pg: EmbeddedPostgres, tenant_db: TenantDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """The proxy under attack; in transaction mode one server connection shared by every tenant."""
    process = ProxyProcess(pg, tenant_db, tmp_path_factory.mktemp(f"relay-{mode}"), MODES[mode]).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def scratch(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> Iterator[str]:
    """A table without Row-Level Security that the application role may write (for COPY)."""
    pg.psql(
        "CREATE TABLE relay_scratch (n int, t text);\n"
        f"GRANT SELECT, INSERT, DELETE ON relay_scratch TO {tenant_db.app_role};\n",
        database=tenant_db.database,
    )
    yield "relay_scratch"
    pg.psql("DROP TABLE relay_scratch", database=tenant_db.database)


def direct_wire(pg: EmbeddedPostgres, db: TenantDatabase, name: str = "direct", **parameters: str) -> Wire:
    return connect_direct(pg.port, db.app_role, db.app_password, db.database, name, **parameters)


def exchange(wire: Wire, *frontend: bytes, ready: int = 1) -> list[Reply]:
    """Send the messages as one write and read up to the `ready`th ReadyForQuery."""
    wire.send(b"".join(frontend))
    return wire.read_ready(ready)


def rows(replies: list[Reply]) -> list[list[bytes | None]]:
    return [messages.parse_data_row(body) for type_byte, body in replies if type_byte == b"D"]


def errors_in(replies: list[Reply]) -> list[dict[str, str]]:
    return [messages.parse_error_fields(body) for type_byte, body in replies if type_byte == b"E"]


def scalar(wire: Wire, sql: str) -> bytes | None:
    replies = exchange(wire, messages.query(sql))
    assert not errors_in(replies), errors_in(replies)
    (row,) = rows(replies)
    return row[0]


def both(target: ProxyProcess, pg: EmbeddedPostgres, db: TenantDatabase, *frontend: bytes, ready: int = 1) -> tuple[list[Reply], list[Reply]]:
    """The same write directly and through the proxy (as ACME); both reply streams."""
    direct = direct_wire(pg, db)
    proxied = connect_proxy(target.port, target.token(ACME))
    try:
        return exchange(direct, *frontend, ready=ready), exchange(proxied, *frontend, ready=ready)
    finally:
        direct.close()
        proxied.close()


def still_serves(target: ProxyProcess, tenant: str = ACME) -> None:
    """The proxy is alive and a fresh client of `tenant` sees exactly its own rows."""
    assert target.alive(), target.log()[-2000:]
    wire = connect_proxy(target.port, target.token(tenant))
    try:
        assert scalar(wire, "SELECT count(*) FROM leads") == str(ROWS[tenant]).encode()
        assert scalar(wire, "SELECT tenant_proxy.current_tenant()") == tenant.encode()
    finally:
        wire.close()


# ---------------------------------------------------------------------------------------------
# Odd message orders, compared with Postgres directly.


def test_flush_only_writes_then_a_query(target: ProxyProcess, pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    """Attack: Flush with nothing before it, three times, then a Query. Postgres answers nothing to the
    Flushes; the proxy must not invent or lose a reply."""
    direct, proxied = both(target, pg, tenant_db, flush(), flush(), flush(), messages.query("SELECT 1"))
    assert_same(direct, proxied, "replies to bare Flushes and a Query")
    still_serves(target)


def test_sync_storm(target: ProxyProcess, pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    """Attack: 500 Syncs in one write, each answered with ReadyForQuery by Postgres."""
    direct, proxied = both(target, pg, tenant_db, messages.sync() * 500, ready=500)
    assert_same(direct, proxied, "replies to a Sync storm")
    still_serves(target)


def test_describe_and_close_of_what_does_not_exist(target: ProxyProcess, pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    """Attack: Close of a statement and a portal that do not exist (CloseComplete in Postgres), then
    Describe of each (26000 / 34000, and the rest of the group is skipped)."""
    frontend = (
        close("S", "nope"), close("P", "nope"), messages.sync(),
        describe("P", "nope"), describe("S", "nope"), messages.sync(),
        describe("S", "nope"), messages.sync(),
    )
    direct, proxied = both(target, pg, tenant_db, *frontend, ready=3)
    assert_same(direct, proxied, "replies to Describe and Close of nothing")
    still_serves(target)


def test_portal_suspended_across_groups_in_a_transaction(target: ProxyProcess, pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    """Attack: Execute with max_rows, the portal suspended over several Sync groups of one transaction
    block, while (in transaction mode) the server connection must stay with this client."""
    frontend = (
        messages.query("BEGIN"),
        messages.parse("", "SELECT generate_series(1, 7)"), messages.bind("p1", "", []),
        messages.execute("p1", 2), messages.sync(),
        messages.execute("p1", 2), flush(), messages.sync(),
        messages.execute("p1", 0), messages.sync(),
        messages.execute("p1", 1), messages.sync(),
        messages.query("COMMIT"),
    )
    direct, proxied = both(target, pg, tenant_db, *frontend, ready=6)
    assert_same(direct, proxied, "replies to a portal suspended across groups")
    still_serves(target)


def test_copy_in_with_sync_and_flush_inside(target: ProxyProcess, pg: EmbeddedPostgres, tenant_db: TenantDatabase, scratch: str) -> None:
    """Attack: Sync and Flush among the CopyData of a COPY FROM STDIN (Postgres ignores both), then a
    second CopyDone and a CopyFail after the COPY ended (ignored too), then a Query."""
    marker = secrets.randbelow(10**6) + 10**6
    frontend = (
        messages.query(f"COPY {scratch} (n, t) FROM STDIN"),
        copy_data(f"{marker}\tone\n".encode()), messages.sync(), flush(),
        copy_data(f"{marker}\ttwo\n".encode()), messages.sync(),
        copy_done(), copy_done(), copy_fail("late"), copy_fail("later"),
        messages.query(f"SELECT count(*) FROM {scratch} WHERE n = {marker}"),
    )
    direct, proxied = both(target, pg, tenant_db, *frontend, ready=2)
    assert (b"D", b"\x00\x01\x00\x00\x00\x012") in direct, direct
    # the proxy's run inserts the same two rows again: the count differs by design, compare the rest
    assert [t for t, _ in direct] == [t for t, _ in proxied], (direct, proxied)
    assert rows(proxied) == [[b"4"]], proxied
    still_serves(target)


def test_copy_data_outside_any_copy_is_ignored(target: ProxyProcess, pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    """Attack: CopyData, CopyDone and CopyFail (twice) with no COPY running, between Queries. Postgres
    ignores them; the proxy must not count a reply for them or lose the stream."""
    frontend = (
        messages.query("SELECT 1"), copy_data(b"junk\n"), copy_done(), copy_fail("one"), copy_fail("two"),
        messages.query("SELECT 2"),
    )
    direct, proxied = both(target, pg, tenant_db, *frontend, ready=2)
    assert_same(direct, proxied, "replies around stray COPY messages")
    still_serves(target)


def test_copy_fail_twice(target: ProxyProcess, pg: EmbeddedPostgres, tenant_db: TenantDatabase, scratch: str) -> None:
    """Attack: CopyFail twice in one COPY FROM STDIN, then a Query."""
    frontend = (
        messages.query(f"COPY {scratch} (n, t) FROM STDIN"), copy_fail("first"), copy_fail("second"),
        messages.query("SELECT 3"),
    )
    direct, proxied = both(target, pg, tenant_db, *frontend, ready=2)
    assert_same(direct, proxied, "replies to CopyFail twice")
    still_serves(target)


def test_copy_in_over_extended_protocol_with_sync_inside(target: ProxyProcess, pg: EmbeddedPostgres, tenant_db: TenantDatabase, scratch: str) -> None:
    """Attack: COPY FROM STDIN started by Execute of an extended-protocol group; a Sync among the
    CopyData (ignored inside COPY), CopyDone, then the group's own Sync."""
    marker = secrets.randbelow(10**6) + 2 * 10**6
    frontend = (
        messages.parse("", f"COPY {scratch} (n, t) FROM STDIN"), messages.bind("", "", []), messages.execute(""),
        messages.sync(), copy_data(f"{marker}\tx\n".encode()), messages.sync(), copy_done(), messages.sync(),
        messages.query(f"SELECT count(*) > 0 FROM {scratch} WHERE n = {marker}"),
    )
    direct, proxied = both(target, pg, tenant_db, *frontend, ready=2)
    assert_same(direct, proxied, "replies to an extended COPY with Syncs inside")
    still_serves(target)


def test_a_query_split_at_every_byte(target: ProxyProcess, pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    """Attack: Parse, Bind, Execute, Sync and a Query, each byte in its own write."""
    data = b"".join((messages.parse("", "SELECT $1::int + 1"), messages.bind("", "", ["41"]), messages.execute(""),
                     messages.sync(), messages.query("SELECT tenant_proxy.current_tenant() IS NOT NULL")))
    direct = direct_wire(pg, tenant_db)
    expected = exchange(direct, data, ready=2)
    direct.close()
    wire = connect_proxy(target.port, target.token(ACME))
    wire.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for index in range(len(data)):
            wire.send(data[index:index + 1])
        got = wire.read_ready(2)
    finally:
        wire.close()
    assert rows(got)[0] == [b"42"]
    assert rows(got)[1] == [b"t"], "the split Query ran without the tenant context"
    assert [t for t, _ in expected] == [t for t, _ in got]
    still_serves(target)


def test_ten_thousand_queries_in_one_write(target: ProxyProcess) -> None:
    """Attack: 10,000 simple Queries in one write; each must be answered, in order, with the context."""
    wire = connect_proxy(target.port, target.token(ACME))
    try:
        wire.send(b"".join(messages.query(f"SELECT {n}, tenant_proxy.current_tenant()") for n in range(10_000)))
        replies = wire.read_ready(10_000, timeout=120)
    finally:
        wire.close()
    got = rows(replies)
    assert [row[0] for row in got] == [str(n).encode() for n in range(10_000)]
    assert {row[1] for row in got} == {ACME.encode()}
    still_serves(target)


def test_terminate_in_the_middle_of_a_group(target: ProxyProcess, pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    """Attack: Bind and Execute of `BEGIN` and a write, no Sync, then Terminate. The server connection
    is inside a transaction holding ACME's context; it must never serve GLOBEX like that."""
    wire = connect_proxy(target.port, target.token(ACME))
    wire.send(messages.parse("", "BEGIN") + messages.bind("", "", []) + messages.execute("")
              + messages.parse("", "SELECT pg_advisory_xact_lock(4242)") + messages.bind("", "", []) + messages.execute("")
              + flush())
    wire.read_until(lambda replies: sum(t == b"C" for t, _ in replies) >= 2 or any(t == b"E" for t, _ in replies))
    wire.sock.sendall(messages.terminate())
    wire.sock.close()
    other = connect_proxy(target.port, target.token(GLOBEX), "globex")
    try:
        assert scalar(other, "SELECT tenant_proxy.current_tenant()") == GLOBEX.encode()
        assert scalar(other, "SELECT count(*) FROM leads") == str(ROWS[GLOBEX]).encode()
    finally:
        other.close()
    wait_until(lambda: pg.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242").strip() == "0")
    still_serves(target)


def test_function_call_is_answered_in_protocol(target: ProxyProcess) -> None:
    """Attack: FunctionCall ('F') of pg_backend_pid() and of set_config(); each gets an ErrorResponse
    (or a result) and a ReadyForQuery, and the session goes on with its context."""
    oids = {"pg_backend_pid": 2026, "set_config": 2078}
    wire = connect_proxy(target.port, target.token(ACME))
    try:
        for oid in oids.values():
            body = oid.to_bytes(4, "big") + b"\x00\x00" + b"\x00\x00" + b"\x00\x00"
            replies = exchange(wire, messages.message(b"F", body))
            assert replies[-1][0] == b"Z", replies
        assert scalar(wire, "SELECT tenant_proxy.current_tenant()") == ACME.encode()
    finally:
        wire.close()
    still_serves(target)


# ---------------------------------------------------------------------------------------------
# The proxy's reserved names.


@pytest.mark.parametrize("message", [
    messages.parse("pg_tenant_proxy_context", "SELECT 1"),
    messages.bind("", "pg_tenant_proxy_context", []),
    messages.bind("pg_tenant_proxy_portal", "", []),
    describe("S", "pg_tenant_proxy_context"),
    describe("P", "pg_tenant_proxy_portal"),
    close("S", "pg_tenant_proxy_context"),
    close("P", "pg_tenant_proxy_portal"),
    messages.execute("pg_tenant_proxy_context"),
], ids=["parse", "bind-statement", "bind-portal", "describe-S", "describe-P", "close-S", "close-P", "execute"])
def test_reserved_names_are_refused(target: ProxyProcess, message: bytes) -> None:
    """Attack: every extended-protocol message naming a statement or portal of the proxy's own
    (`pg_tenant_proxy_...`) is refused with 42501 before it reaches the server."""
    wire = connect_proxy(target.port, target.token(ACME))
    try:
        if message[:1] in (b"E",):
            exchange(wire, messages.parse("", "SELECT 1"), messages.bind("", "", []), messages.sync())
        replies = exchange(wire, message, messages.sync())
        assert [fields["C"] for fields in errors_in(replies)] == ["42501"], replies
        assert scalar(wire, "SELECT tenant_proxy.current_tenant()") == ACME.encode()
    finally:
        wire.close()


def settles(wire: Wire, sql: str, timeout: float = 10.0) -> list[Reply]:
    """Send a Query and read its replies up to ReadyForQuery, failing (not hanging) at the deadline."""
    wire.send(messages.query(sql))
    return wire.read_ready(1, timeout=timeout)


def test_deallocate_of_the_proxys_context_statement(make_proxy: Any) -> None:
    """Attack (transaction mode, one server connection): `DEALLOCATE pg_tenant_proxy_context` in SQL
    drops the proxy's own context statement from the shared server connection. It must be refused
    (42501, like the protocol messages naming it) or be harmless: afterwards every client, of this
    tenant and of another, must still get its answers with its own context."""
    target = make_proxy(MODES["transaction"])
    attacker = connect_proxy(target.port, target.token(ACME), "acme")
    try:
        exchange(attacker, messages.query("SELECT 1"))
        replies = settles(attacker, "DEALLOCATE pg_tenant_proxy_context")
        assert [f["C"] for f in errors_in(replies)] == ["42501"], replies
        assert rows(settles(attacker, "SELECT tenant_proxy.current_tenant()")) == [[ACME.encode()]]
    finally:
        attacker.close()
    victim = connect_proxy(target.port, target.token(GLOBEX), "globex")
    try:
        assert rows(settles(victim, "SELECT tenant_proxy.current_tenant(), count(*) FROM leads")) == [
            [GLOBEX.encode(), str(ROWS[GLOBEX]).encode()]]
    finally:
        victim.close()


def test_deallocate_of_another_clients_shared_statement(make_proxy: Any) -> None:
    """Attack (transaction mode, one server connection): GLOBEX prepares a named statement; ACME reads
    its server-side name from pg_prepared_statements and runs `DEALLOCATE <that name>`. Issue 12:
    statement management in SQL acts on the client's own statements and never disturbs another
    client. GLOBEX's next Bind must still work, as in a direct session."""
    target = make_proxy(MODES["transaction"])
    victim = connect_proxy(target.port, target.token(GLOBEX), "globex")
    attacker = connect_proxy(target.port, target.token(ACME), "acme")
    try:
        sql = "SELECT count(*) FROM leads"
        assert rows(exchange(victim, messages.parse("mine", sql), messages.bind("", "mine", []), messages.execute(""),
                             messages.sync())) == [[str(ROWS[GLOBEX]).encode()]]
        names = rows(settles(attacker, f"SELECT name FROM pg_prepared_statements WHERE statement = '{sql}'"))
        for (name,) in names:
            assert name is not None
            settles(attacker, f'DEALLOCATE "{name.decode()}"')
        replies = exchange(victim, messages.bind("", "mine", []), messages.execute(""), messages.sync())
        assert not errors_in(replies), errors_in(replies)
        assert rows(replies) == [[str(ROWS[GLOBEX]).encode()]]
    finally:
        victim.close()
        attacker.close()


def test_sql_prepare_of_the_proxys_session_statement(make_proxy: Any) -> None:
    """Attack (session mode): SQL `PREPARE pg_tenant_proxy_session_context` takes the name of the
    statement the proxy parses to set the context again after RESET ALL. The PREPARE must be refused
    (the name is the proxy's), or the context must still be set: never a session that hangs or loses
    its context."""
    target = make_proxy(MODES["session"])
    wire = connect_proxy(target.port, target.token(ACME))
    try:
        settles(wire, "PREPARE pg_tenant_proxy_session_context AS SELECT 1")
        settles(wire, "RESET ALL")
        assert rows(settles(wire, "SELECT tenant_proxy.current_tenant(), count(*) FROM leads")) == [
            [ACME.encode(), str(ROWS[ACME]).encode()]]
    finally:
        wire.close()


# ---------------------------------------------------------------------------------------------
# What one client leaves on a server connection.








# ---------------------------------------------------------------------------------------------
# The per-transaction context.


@pytest.mark.parametrize("chain", ["COMMIT AND CHAIN", "ROLLBACK AND CHAIN"])
def test_a_chained_transaction_keeps_the_context(target: ProxyProcess, chain: str) -> None:
    """Attack: `COMMIT AND CHAIN` / `ROLLBACK AND CHAIN` start the next transaction at once (status
    stays 'T'). Its statements must run with the client's own context, as in a direct session with
    the context set: the own rows, current_tenant() = ACME."""
    wire = connect_proxy(target.port, target.token(ACME))
    try:
        exchange(wire, messages.query("BEGIN"))
        exchange(wire, messages.query("SELECT count(*) FROM leads"))
        exchange(wire, messages.query(chain))
        tenant = scalar(wire, "SELECT tenant_proxy.current_tenant()")
        count = scalar(wire, "SELECT count(*) FROM leads")
        exchange(wire, messages.query("COMMIT"))
        assert (tenant, count) == (ACME.encode(), str(ROWS[ACME]).encode())
    finally:
        wire.close()


def test_commit_inside_an_extended_group_never_runs_without_a_context_silently(target: ProxyProcess) -> None:
    """Attack: in one extended-protocol group (no Sync between), Execute of COMMIT and then of a
    SELECT on leads. COMMIT ends the implicit transaction the context was set in; the SELECT runs in a
    new one. It must see the own rows (context set again) or fail; never another tenant's rows."""
    wire = connect_proxy(target.port, target.token(ACME))
    try:
        replies = exchange(
            wire,
            messages.parse("", "SELECT 1"), messages.bind("", "", []), messages.execute(""),
            messages.parse("c", "COMMIT"), messages.bind("", "c", []), messages.execute(""),
            messages.parse("s", "SELECT count(*), tenant_proxy.current_tenant() FROM leads"), messages.bind("", "s", []),
            messages.execute(""), messages.sync(),
        )
        got = rows(replies)
        assert got[-1] in ([str(ROWS[ACME]).encode(), ACME.encode()],), f"SELECT after COMMIT in one group: {got[-1]}"
    finally:
        wire.close()






# ---------------------------------------------------------------------------------------------
# Bounded resources.


def proxy_rss_kib(target: ProxyProcess) -> int:
    assert target.process is not None
    with open(f"/proc/{target.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_client_that_never_reads_does_not_grow_the_proxy(target: ProxyProcess) -> None:
    """Attack: a client sends Queries with 1 MB results and never reads. Backpressure must stop the
    proxy from buffering them: its RSS may not grow by more than 64 MiB after 400 MB of results."""
    before = proxy_rss_kib(target)
    sock = socket.create_connection(("127.0.0.1", target.port))
    wire = Wire(sock, "sink")
    from differential import _login  # the login helper with the socket we keep
    _login(wire, messages.startup_message({"user": "alice", "database": "app"}),
           lambda code, _: messages.password_message(target.token(ACME)) if code == messages.AUTH_CLEARTEXT_PASSWORD else None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    query = messages.query("SELECT repeat('x', 1000000)")
    sock.setblocking(False)
    sent, deadline = 0, time.monotonic() + 20
    while sent < 400 and time.monotonic() < deadline:
        try:
            sock.send(query)
            sent += 1
        except BlockingIOError:
            time.sleep(0.05)
    peak = max(proxy_rss_kib(target) for _ in range(20) if not time.sleep(0.05))
    sock.close()
    assert peak - before < 64 * 1024, f"proxy RSS grew by {(peak - before) // 1024} MiB ({sent} queries sent)"
    wait_until(lambda: target.alive())
    still_serves(target)


def test_a_huge_message_is_refused_with_an_error(make_proxy: Any, mode: str) -> None:
    """Attack: a Query announced as 300 MB (only its header and a few bytes sent) to a proxy whose
    [client] max_message is 1 MiB: the proxy must answer at once with an ErrorResponse (54000 or
    08P01) rather than wait for or buffer the body, and keep serving. (With the default of 1 GiB a
    client may make the proxy buffer up to 1 GiB each.)"""
    target = make_proxy({**MODES[mode], "client": {"max_message": 1 << 20}})
    wire = connect_proxy(target.port, target.token(ACME))
    try:
        wire.send(b"Q" + (300 * 1024 * 1024).to_bytes(4, "big") + b"SELECT 1")
        replies = wire.read_until(lambda replies: any(t == b"E" for t, _ in replies))
        assert errors_in(replies)[0]["C"] in ("54000", "08P01"), replies
    finally:
        wire.sock.close()
    still_serves(target)


def test_unnamed_statement_of_another_client_never_runs_for_me(target: ProxyProcess) -> None:
    """Attack (transaction mode, one server connection): GLOBEX parses the unnamed statement; ACME,
    which never parsed one, binds the unnamed statement. Postgres directly: 26000. It must never run
    GLOBEX's statement."""
    globex = connect_proxy(target.port, target.token(GLOBEX), "globex")
    acme = connect_proxy(target.port, target.token(ACME), "acme")
    try:
        exchange(globex, messages.parse("", "SELECT 'globex-text'::text"), messages.sync())
        replies = exchange(acme, messages.bind("", "", []), messages.execute(""), messages.sync())
        assert [f["C"] for f in errors_in(replies)] == ["26000"], replies
        assert b"globex-text" not in b"".join(body for _, body in replies)
    finally:
        globex.close()
        acme.close()



def test_reset_all_then_savepoint_rollback_keeps_the_context(target: ProxyProcess) -> None:
    """Attack: inside a transaction block, `RESET ALL; SAVEPOINT a` in one Query (the context is
    wiped and set again after the savepoint), then ROLLBACK TO a, which undoes the re-set context.
    The next statement must still run with the client's context."""
    wire = connect_proxy(target.port, target.token(ACME))
    try:
        exchange(wire, messages.query("BEGIN"))
        exchange(wire, messages.query("RESET ALL; SAVEPOINT a"))
        exchange(wire, messages.query("SELECT 1"))
        exchange(wire, messages.query("ROLLBACK TO a"))
        tenant = scalar(wire, "SELECT tenant_proxy.current_tenant()")
        count = scalar(wire, "SELECT count(*) FROM leads")
        committed = exchange(wire, messages.query("COMMIT"))
        assert (tenant, count) == (ACME.encode(), str(ROWS[ACME]).encode())
        assert (b"C", b"COMMIT\0") in committed, f"COMMIT answered {committed}: the transaction was rolled back"
        assert rows(exchange(wire, messages.query("SELECT tenant_proxy.current_tenant()"))) == [[ACME.encode()]]
    finally:
        wire.close()


IN_BLOCK = (
    "BEGIN", "SET search_path TO public", "SET work_mem TO '9MB'", "RESET ALL", "RESET ALL", "RESET ALL; SAVEPOINT a",
    "SELECT 1", "ROLLBACK TO a", "SET LOCAL work_mem TO '10MB'", "SAVEPOINT b", "RESET work_mem", "RELEASE b",
)


def test_the_proxys_own_requests_never_abort_the_clients_block(target: ProxyProcess, pg: EmbeddedPostgres,
                                                              tenant_db: TenantDatabase, scratch: str) -> None:
    """Attack (the kind behind the RESET ALL / SAVEPOINT / ROLLBACK TO finding): inside one transaction
    block, every statement after which the proxy sends requests of its own into the block (settings read
    back after SET, startup values applied again after RESET ALL, the context set again after RESET ALL
    and ROLLBACK TO), each more than once, then a write that needs the context, then COMMIT. Directly,
    the block goes on and commits; through the proxy the replies must be the same, and the row written
    must carry the client's tenant (the context was there when the statement ran)."""
    marker = secrets.randbelow(10**6) + 3 * 10**6
    steps = (*IN_BLOCK, f"INSERT INTO {scratch} (n, t) SELECT {{}}, tenant_proxy.current_tenant()", "COMMIT")
    direct = direct_wire(pg, tenant_db, extra_float_digits="2")
    proxied = connect_proxy(target.port, target.token(ACME), extra_float_digits="2")
    try:
        for sql in steps:  # the direct run writes under -marker
            assert_same(exchange(direct, messages.query(sql.format(-marker))), exchange(proxied, messages.query(sql.format(marker))), sql)
        assert scalar(proxied, f"SELECT string_agg(coalesce(t, 'NULL'), ',') FROM {scratch} WHERE n = {marker}") == ACME.encode()
        for setting in ("extra_float_digits", "work_mem", "search_path"):  # the startup value after RESET ALL; SAVEPOINT; ROLLBACK TO
            assert scalar(proxied, f"SHOW {setting}") == scalar(direct, f"SHOW {setting}"), setting
    finally:
        direct.close()
        proxied.close()
    still_serves(target)


def test_reset_all_in_a_failed_block_is_answered_as_postgres_does(target: ProxyProcess, pg: EmbeddedPostgres,
                                                                 tenant_db: TenantDatabase) -> None:
    """Attack: RESET ALL and SET inside a block that already failed (the proxy's own requests behind
    them fail there with 25P02 too), then ROLLBACK. Directly: 25P02 for each, then the session goes on;
    through the proxy the same, and the session keeps its context and startup settings."""
    steps = ("BEGIN", "SELECT 1/0", "RESET ALL", "SET work_mem TO '9MB'", "ROLLBACK", "SELECT 1")
    direct = direct_wire(pg, tenant_db)
    proxied = connect_proxy(target.port, target.token(ACME), extra_float_digits="2")
    try:
        for sql in steps:
            assert_same(exchange(direct, messages.query(sql)), exchange(proxied, messages.query(sql)), sql)
        assert scalar(proxied, "SELECT current_setting('extra_float_digits')") == b"2"
        assert scalar(proxied, "SELECT tenant_proxy.current_tenant()") == ACME.encode()
    finally:
        direct.close()
        proxied.close()

def test_startup_values_after_a_reset_as_postgres_gives_them_through_later_sets_and_savepoints(
        target: ProxyProcess, pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    """Input: a startup value (extra_float_digits=2), then in one Query a RESET followed by a SET of the
    same setting, and the other way round; RESET before a SAVEPOINT that is then rolled back to; SETs
    after a reset kept or undone by ROLLBACK TO. Directly: RESET returns to the startup value, a SET after
    it stands, a rollback restores what was. Through the proxy, which applies startup values again behind
    a reset (and behind a rollback after one), the same after every statement."""
    direct = direct_wire(pg, tenant_db, extra_float_digits="2")
    proxied = connect_proxy(target.port, target.token(ACME), extra_float_digits="2")
    try:
        for sql in ("RESET ALL; SET extra_float_digits = 3", "RESET extra_float_digits; SET extra_float_digits = 1",
                    "SET extra_float_digits = 0; RESET ALL", "SET extra_float_digits = 3; RESET extra_float_digits",
                    "BEGIN", "RESET ALL; SAVEPOINT a", "ROLLBACK TO a", "COMMIT",
                    "BEGIN", "RESET ALL; SET extra_float_digits = 1", "SAVEPOINT b", "ROLLBACK TO b", "COMMIT",
                    "BEGIN", "SET extra_float_digits = 0; SAVEPOINT c; RESET extra_float_digits", "ROLLBACK TO c", "COMMIT",
                    "BEGIN", "SELECT set_config('extra_float_digits', '3', false); RESET ALL", "ROLLBACK",
                    "RESET ALL; SELECT set_config('extra_float_digits', '3', false)"):
            assert_same(exchange(direct, messages.query(sql)), exchange(proxied, messages.query(sql)), sql)
            assert scalar(proxied, "SHOW extra_float_digits") == scalar(direct, "SHOW extra_float_digits"), sql
    finally:
        direct.close()
        proxied.close()

def test_context_in_many_positions(target: ProxyProcess) -> None:
    """Attack: read current_setting and current_tenant() as the first statement, after a failed
    statement and ROLLBACK, after SAVEPOINT / ROLLBACK TO, in a Query behind a Parse/Describe/Flush
    group left without Sync (asyncpg and pg8000 prepare that way), and after DISCARD ALL sent behind
    it; always ACME."""
    wire = connect_proxy(target.port, target.token(ACME))
    probe = "SELECT tenant_proxy.current_tenant(), current_setting('app.current_tenant', true)"
    expected = [ACME.encode(), ACME.encode()]
    try:
        assert rows(exchange(wire, messages.query(probe))) == [expected]
        exchange(wire, messages.query("BEGIN; SELECT 1/0"))
        exchange(wire, messages.query("ROLLBACK"))
        assert rows(exchange(wire, messages.query(probe))) == [expected]
        exchange(wire, messages.query("BEGIN"))
        exchange(wire, messages.query("SAVEPOINT s"))
        exchange(wire, messages.query("SELECT 1/0"))
        exchange(wire, messages.query("ROLLBACK TO s"))
        assert rows(exchange(wire, messages.query(probe))) == [expected]
        exchange(wire, messages.query("COMMIT"))
        wire.send(messages.parse("", "SELECT 1") + describe("S", "") + flush())
        wire.read_until(lambda replies: len(replies) >= 3)
        assert rows(exchange(wire, messages.query(probe))) == [expected]
        exchange(wire, messages.query("DISCARD ALL"))
        assert rows(exchange(wire, messages.query(probe))) == [expected]
    finally:
        wire.close()


@pytest.mark.parametrize("text", ["SELECT 1", "SELEC 1"])
def test_discard_all_inside_an_unsynced_extended_group(target: ProxyProcess, pg: EmbeddedPostgres, tenant_db: TenantDatabase,
                                                       text: str) -> None:
    """Attack: Parse / Describe / Flush without Sync (the Parse succeeding, or failing so the server skips
    to Sync), then DISCARD ALL as a simple Query and a Sync. The replies are Postgres's; the next
    statement runs with the client's context (the reset Query ended the server's implicit transaction,
    or was skipped and reset nothing), with no hang."""
    group = messages.parse("", text) + describe("S", "") + flush()
    direct, proxied = direct_wire(pg, tenant_db), connect_proxy(target.port, target.token(ACME))
    try:
        for wire in (direct, proxied):
            wire.send(group)
        expected = direct.read_until(lambda got: bool(got) and got[-1][0] in (b"E", b"T", b"n"))
        assert_same(expected, proxied.read_until(lambda got: len(got) >= len(expected)), "replies to the group")
        ready = 2 if text == "SELECT 1" else 1  # a Query skipped in the error window gets no ReadyForQuery
        assert_same(exchange(direct, messages.query("DISCARD ALL"), messages.sync(), ready=ready),
                    exchange(proxied, messages.query("DISCARD ALL"), messages.sync(), ready=ready), "DISCARD ALL and Sync")
        assert scalar(proxied, "SELECT tenant_proxy.current_tenant()") == ACME.encode()
    finally:
        direct.close()
        proxied.close()

def test_another_tenants_prepared_statement_text_is_not_visible(target: ProxyProcess) -> None:
    """Attack: GLOBEX prepares a named statement whose text holds a secret literal; ACME then reads
    `pg_prepared_statements` on (in transaction mode) the same server connection. In a direct session
    a client sees only its own statements; the proxy's sharing of statements by text must not show
    GLOBEX's SQL to ACME. Stopped by: the hardening SQL (the view and pg_prepared_statement() are
    revoked from the shared role, which holds against dynamic SQL too): 42501, in both modes."""
    secret = f"globex-secret-{secrets.token_hex(6)}"
    globex = connect_proxy(target.port, target.token(GLOBEX), "globex")
    try:
        exchange(globex, messages.parse("mine", f"SELECT '{secret}'::text"), messages.bind("", "mine", []),
                 messages.execute(""), messages.sync())
        acme = connect_proxy(target.port, target.token(ACME), "acme")
        try:
            for sql in ("SELECT string_agg(statement, ' | ') FROM pg_prepared_statements",
                        "SELECT string_agg(statement, ' | ') FROM pg_catalog.pg_prepared_statement()"):
                replies = exchange(acme, messages.query(sql))
                seen = b" ".join(value or b"" for row in rows(replies) for value in row)
                assert secret.encode() not in seen, f"ACME reads GLOBEX's statement text: {seen[:300]!r}"
                assert [error["C"] for error in errors_in(replies)] == ["42501"], replies
        finally:
            acme.close()
    finally:
        globex.close()


def test_dynamic_set_config_of_a_placeholder_does_not_reach_another_client(target: ProxyProcess, pg: EmbeddedPostgres,
                                                                            tenant_db: TenantDatabase) -> None:
    """Attack: set_config() of a custom placeholder whose name is not a constant (the guard cannot read
    it), at session level. In a direct session it stays with that session: another client of the same
    tenant must read NULL, and the client itself keeps reading its value."""
    sql = "SELECT set_config(n, 'leaked', false) FROM (VALUES ('myapp.user_id')) AS v(n)"
    probe = "SELECT current_setting('myapp.user_id', true)"
    direct_a, direct_b = direct_wire(pg, tenant_db, "direct A"), direct_wire(pg, tenant_db, "direct B")
    exchange(direct_a, messages.query(sql))
    expected_other, expected_own = scalar(direct_b, probe), scalar(direct_a, probe)
    direct_a.close()
    direct_b.close()
    assert (expected_other, expected_own) == (None, b"leaked")

    first = connect_proxy(target.port, target.token(ACME), "acme 1")
    second = connect_proxy(target.port, target.token(ACME), "acme 2")
    try:
        assert not errors_in(exchange(first, messages.query(sql)))
        # a fresh session reads NULL; one whose placeholder was reset reads '' (docs/pool-modes.md): never the value
        assert scalar(second, probe) in (expected_other, b""), "another client of the same tenant reads the setting"
        assert scalar(first, probe) == expected_own
    finally:
        first.close()
        second.close()


def test_dynamic_set_config_follows_its_client_past_another_tenant(target: ProxyProcess) -> None:
    """Attack (settings lost): a placeholder set with a non-constant name, then another tenant uses the
    server connection (transaction mode: the tenant switch resets it). The client's own setting must
    still be there, as in a direct session."""
    sql = "SELECT set_config(n, 'mine', false) FROM (VALUES ('myapp.flag')) AS v(n)"
    first = connect_proxy(target.port, target.token(ACME), "acme")
    other = connect_proxy(target.port, target.token(GLOBEX), "globex")
    try:
        assert not errors_in(exchange(first, messages.query(sql)))
        assert scalar(other, "SELECT current_setting('myapp.flag', true)") in (None, b"")  # never 'mine'; see above
        assert scalar(first, "SELECT current_setting('myapp.flag', true)") == b"mine"
    finally:
        first.close()
        other.close()


@pytest.mark.parametrize("other_tenant", [ACME, GLOBEX])
def test_a_setting_under_a_name_built_at_run_time_never_reaches_another_client(target: ProxyProcess, other_tenant: str) -> None:
    """Attack: set_config() at session level of a placeholder whose name is built at run time (no
    constant holds it, so neither the guard nor the read-back can name it). In a direct session it
    stays with that session: no other client, of the same tenant or not, reads it (transaction mode:
    the connection is reset before it serves another client)."""
    first = connect_proxy(target.port, target.token(ACME), "acme")
    other = connect_proxy(target.port, target.token(other_tenant), "other")
    try:
        assert not errors_in(exchange(first, messages.query("SELECT set_config('myapp.' || 'built', 'secret', false)")))
        assert scalar(other, "SELECT current_setting('myapp.built', true)") in (None, b"")
    finally:
        first.close()
        other.close()


def test_deallocate_inside_a_longer_query_or_through_the_extended_protocol(target: ProxyProcess, pg: EmbeddedPostgres,
                                                                            tenant_db: TenantDatabase) -> None:
    """Input: SQL DEALLOCATE of the client's own statement sent through Parse / Bind / Execute, or inside a
    multi-statement Query, in and out of a transaction block; then a Bind of the deallocated name, and
    DEALLOCATE of a name the client never prepared. The replies are Postgres's, message by message: the
    client's statement is gone, nothing is aborted that Postgres would not abort."""
    writes = [
        (messages.parse("s1", "SELECT 1"), messages.parse("s2", "SELECT 2"), messages.parse("s3", "SELECT 3"),
         messages.parse("s4", "SELECT 4"), messages.sync()),
        (messages.parse("", "DEALLOCATE s1"), messages.bind("", "", []), messages.execute(""), messages.sync()),
        (messages.bind("", "s1", []), messages.execute(""), messages.sync()),
        (messages.query("SELECT 1; DEALLOCATE s2; SELECT 3"),),
        (messages.bind("", "s2", []), messages.execute(""), messages.sync()),
        (messages.query("BEGIN"),),
        (messages.parse("d", "DEALLOCATE PREPARE s3"), messages.bind("p", "d", []), messages.execute("p"), messages.sync()),
        (messages.query("DEALLOCATE nothing_here; SELECT 1"),),
        (messages.query("ROLLBACK"),),
        (messages.bind("", "s3", []), messages.execute(""), messages.sync()),
        (messages.query("BEGIN; SELECT 1/0"),),
        (messages.query("DEALLOCATE s4; SELECT 1"),),  # 25P02: s4 stays
        (messages.query("ROLLBACK"),),
        (messages.bind("", "s4", []), messages.execute(""), messages.sync()),
    ]
    direct, proxied = direct_wire(pg, tenant_db), connect_proxy(target.port, target.token(ACME))
    other = connect_proxy(target.port, target.token(ACME), "other")
    try:
        for write in writes:
            assert_same(exchange(direct, *write), exchange(proxied, *write), f"replies to {write!r}")
        # no stand-in is left for another client on the shared server connection to bind
        replies = exchange(other, messages.bind("", "s4", []), messages.execute(""), messages.sync())
        assert [error["C"] for error in errors_in(replies)] == ["26000"], replies
    finally:
        direct.close()
        proxied.close()
        other.close()
    still_serves(target)


def test_a_statement_that_can_no_longer_be_prepared_fails_with_an_error(target: ProxyProcess, pg: EmbeddedPostgres,
                                                                       tenant_db: TenantDatabase) -> None:
    """Input: the client's unnamed statement reads a table that is dropped before the client binds it,
    after another client used the server connection (transaction mode: the proxy prepares the statement
    again there, and that Parse fails). Directly: the Bind fails with 42P01. Through the proxy the client
    gets that error too, never a bare ReadyForQuery with its statement silently skipped."""
    table = f"relay_dropped_{secrets.token_hex(4)}"
    pg.psql(f"CREATE TABLE {table} (n int); GRANT SELECT ON {table} TO {tenant_db.app_role}", database=tenant_db.database)
    direct, proxied = direct_wire(pg, tenant_db), connect_proxy(target.port, target.token(ACME))
    other = connect_proxy(target.port, target.token(GLOBEX), "globex")
    try:
        for wire in (direct, proxied):
            exchange(wire, messages.parse("", f"SELECT n FROM {table}"), messages.sync())
        scalar(other, "SELECT 1")
        pg.psql(f"DROP TABLE {table}", database=tenant_db.database)
        bound = messages.bind("", "", []), messages.execute(""), messages.sync()
        expected, replies = exchange(direct, *bound), exchange(proxied, *bound)
        assert [error["C"] for error in errors_in(expected)] == ["42P01"], expected
        assert [error["C"] for error in errors_in(replies)] == ["42P01"], replies
        assert [kind for kind, _ in replies] == [kind for kind, _ in expected]
    finally:
        direct.close()
        proxied.close()
        other.close()
