"""The relay wired to scripted server connections (relay_harness.RelayPair): exact bytes upstream for
client messages in both modes, what the client receives for scripted replies, and which hooks fire."""

from __future__ import annotations

import struct

import pytest

from relay_harness import (
    BIND_COMPLETE,
    CLOSE_COMPLETE,
    CONTEXT,
    PARSE_COMPLETE,
    SETTINGS_LIMIT,
    Z_BLOCK,
    Z_FAILED,
    Z_IDLE,
    Identity,
    RelayPair,
    Server,
    checked_out,
    complete,
    data_row,
    row_description,
)

from proxy.guard import ALLOW
from proxy.protocol import errors, messages
from proxy.protocol.errors import ProtocolViolation, UpstreamProtocolViolation
from proxy.relay.relay import (
    COPY_INTERRUPT, COPY_PROBE, LIFT_TIMEOUT, RESET_BIND, RESET_EXECUTE, RESET_SQL, RESET_STATEMENT, RESULT_CHANGED,
    BlockWatch, RelayStalled,
)
from proxy.relay.replies import COPY_INTERRUPTED, Outcome
from proxy.relay.settings import (
    APPLY_SQL, APPLY_STATEMENT, READ_SQL, READ_STATEMENT, REAPPLY_SQL, REAPPLY_STATEMENT, apply_bind, close_portal, read_bind,
)
from proxy.relay.statements import NEVER_PREPARED, NO_DATA, PARSE_CHECK, result_shape, statement_for

IDENTITY = Identity()
SELECT_1 = messages.query("SELECT 1")
ROWS = row_description() + data_row(b"1") + complete("SELECT 1")


def context_statement() -> bytes:
    """Close then Parse of the proxy's context statement, on a server connection that lacks it."""
    name = CONTEXT.statement_name
    return messages.close_statement(name) + messages.parse(name.decode(), CONTEXT.statement)


def context(server: Server) -> bytes:
    """Bind, Execute, Close of the context for one transaction."""
    return CONTEXT.transaction_messages(IDENTITY.tenant, server.process_id, IDENTITY.expires_at, IDENTITY.claims_json)


CONTEXT_PREPARED = CLOSE_COMPLETE + PARSE_COMPLETE
CONTEXT_SET = BIND_COMPLETE + data_row(b"acme", b"p", b"{}", b"q") + complete("SELECT 1") + CLOSE_COMPLETE


def own_statement(name: bytes, sql: str) -> bytes:
    return messages.close_statement(name) + messages.parse(name.decode(), sql)


def server_name(query: str, types: tuple[int, ...] = ()) -> bytes:
    definition = messages.parse("", query, types)[6:]
    return statement_for(definition, "", ALLOW).server_name


def renamed_parse(query: str) -> bytes:
    name = server_name(query)
    return messages.close_statement(name) + messages.parse(name.decode(), query)


# -- transaction mode ------------------------------------------------------------------------------

def test_query_gets_the_context_in_front_in_the_same_write() -> None:
    pair, server = RelayPair(), Server(101)
    assert checked_out(pair, server, SELECT_1) == [context_statement() + context(server) + SELECT_1]
    assert pair.server(CONTEXT_PREPARED + CONTEXT_SET + ROWS + Z_IDLE) == ROWS + Z_IDLE
    assert pair.hooks.events == ["need_server", "release_server"]  # never paused: nothing to resume
    assert pair.hooks.ended == 1
    assert pair.relay.server is None
    # the next transaction on the same connection: the context statement is there already
    assert checked_out(pair, server, SELECT_1) == [context(server) + SELECT_1]


def test_replies_split_across_reads() -> None:
    pair, server = RelayPair(), Server(101)
    checked_out(pair, server, SELECT_1)
    replies = CONTEXT_PREPARED + CONTEXT_SET + ROWS + Z_IDLE
    assert pair.server(*[replies[i:i + 3] for i in range(0, len(replies), 3)]) == ROWS + Z_IDLE
    assert pair.hooks.events[-1] == "release_server"


def test_no_release_inside_a_transaction_block() -> None:
    pair, server = RelayPair(), Server(101)
    begin = messages.query("BEGIN")
    assert checked_out(pair, server, begin) == [begin]  # BEGIN alone: the context goes after it (see below)
    assert pair.server(complete("BEGIN") + Z_BLOCK) == complete("BEGIN") + Z_BLOCK
    assert "release_server" not in pair.hooks.events
    assert pair.client(SELECT_1) == [context_statement() + context(server) + SELECT_1]  # the block's first statement
    assert pair.server(CONTEXT_PREPARED + CONTEXT_SET + ROWS + Z_BLOCK) == ROWS + Z_BLOCK
    assert pair.client(SELECT_1) == [SELECT_1]  # inside the block: the context is in force already
    assert pair.server(ROWS + Z_BLOCK) == ROWS + Z_BLOCK
    commit = messages.query("COMMIT")
    assert pair.client(commit) == [commit]
    assert "release_server" not in pair.hooks.events
    assert pair.server(complete("COMMIT") + Z_IDLE) == complete("COMMIT") + Z_IDLE
    assert pair.hooks.events[-1] == "release_server"
    assert pair.hooks.ended == 1


def test_second_group_held_until_the_first_ready_for_query() -> None:
    pair, server = RelayPair(), Server(101)
    second = messages.query("SELECT 2")
    checked_out(pair, server, SELECT_1)
    assert pair.client(second) == []  # the server's status after the first is not known yet
    start = len(pair.hooks.upstream)
    assert pair.server(CONTEXT_PREPARED + CONTEXT_SET + ROWS) == ROWS
    assert pair.upstream_since(start) == []
    assert pair.server(Z_IDLE) == Z_IDLE
    assert pair.upstream_since(start) == [context(server) + second]
    assert "release_server" not in pair.hooks.events
    assert pair.server(CONTEXT_SET + ROWS + Z_IDLE) == ROWS + Z_IDLE
    assert pair.hooks.events[-1] == "release_server"
    assert pair.hooks.ended == 2


def test_named_parse_renamed_and_closed_first() -> None:
    pair, server = RelayPair(), Server(101)
    sql = "SELECT $1::int"
    name = server_name(sql)
    reads = messages.parse("s1", sql) + messages.bind("", "s1", ["7"]) + messages.execute() + messages.sync()
    writes = checked_out(pair, server, reads)
    assert writes == [
        renamed_parse(sql)
        + messages.bind("", name.decode(), ["7"])
        + context_statement() + context(server)
        + messages.execute() + messages.sync()
    ]
    replies = CLOSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE + CONTEXT_PREPARED + CONTEXT_SET + data_row(b"7") + complete("SELECT 1")
    assert pair.server(replies + Z_IDLE) == PARSE_COMPLETE + BIND_COMPLETE + data_row(b"7") + complete("SELECT 1") + Z_IDLE
    assert pair.hooks.events[-1] == "release_server"


def test_error_naming_the_server_side_statement_renamed_for_the_client() -> None:
    pair, server = RelayPair(), Server(101)
    sql = "SELECT $1::int"
    name = server_name(sql).decode()
    checked_out(pair, server, messages.parse("s1", sql) + messages.sync())
    pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + Z_IDLE)
    writes = checked_out(pair, server, messages.parse("s1", sql) + messages.sync())  # a duplicate: Postgres answers 42P05
    assert writes == [messages.parse(name, sql) + messages.sync()]  # under the server-side name, which is there
    server_error = messages.error_response("ERROR", errors.DUPLICATE_PREPARED_STATEMENT, f'prepared statement "{name}" already exists')
    out = pair.server(server_error + Z_IDLE)
    assert out == messages.error_response("ERROR", errors.DUPLICATE_PREPARED_STATEMENT, 'prepared statement "s1" already exists') + Z_IDLE


def test_statement_names_are_cut_to_63_bytes_as_postgres_keys_them() -> None:
    """A Bind of a name that agrees with a held one on its first 63 bytes binds that statement; a Parse of
    such a name is the duplicate Postgres refuses, and the error names the statement as the client did."""
    pair, server = RelayPair(), Server(101)
    sql = "SELECT $1::int"
    name = server_name(sql).decode()
    held, other = "s" * 63 + "1", "s" * 63 + "2"
    checked_out(pair, server, messages.parse(held, sql) + messages.sync())
    pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + Z_IDLE)
    bind = messages.bind("", other, ["7"]) + messages.execute() + messages.sync()
    assert checked_out(pair, server, bind) == [
        messages.bind("", name, ["7"]) + context_statement() + context(server) + messages.execute() + messages.sync()
    ]
    pair.server(BIND_COMPLETE + CONTEXT_PREPARED + CONTEXT_SET + data_row(b"7") + complete("SELECT 1") + Z_IDLE)
    assert checked_out(pair, server, messages.parse(other, sql) + messages.sync()) == [messages.parse(name, sql) + messages.sync()]
    duplicate = messages.error_response("ERROR", errors.DUPLICATE_PREPARED_STATEMENT, f'prepared statement "{name}" already exists')
    assert pair.server(duplicate + Z_IDLE) == messages.error_response(
        "ERROR", errors.DUPLICATE_PREPARED_STATEMENT, f'prepared statement "{other}" already exists') + Z_IDLE


@pytest.mark.parametrize("name, shown", [(b"st\xe9", "0xe9"), (b"\xe9ab", "0xe9 0x61 0x62"), (b"s\xf0\x9f", "0xf0 0x9f")])
def test_a_statement_name_that_is_not_utf8_is_refused_as_postgres_refuses_it(name: bytes, shown: str) -> None:
    """The server reads the proxy's name for a client's statement, never the client's, so the proxy
    refuses a name Postgres would not read (22021, naming the bytes as report_invalid_encoding does)."""
    pair, server = RelayPair(), Server(101)
    parse = messages.message(b"P", name + b"\0SELECT 1\0\0\0") + messages.sync()
    writes = checked_out(pair, server, parse)
    assert len(writes) == 1 and writes[0].endswith(messages.sync())  # a failing Parse of the proxy's stands in
    assert pair.relay.mode.statements.lookup(name) is None
    refusal = pair.hooks.refusals[-1]
    assert (refusal.sqlstate, refusal.message) == ("22021", f'invalid byte sequence for encoding "UTF8": {shown}')


def test_bind_on_another_server_connection_prepares_the_statement_there() -> None:
    pair, first, second = RelayPair(), Server(101), Server(202)
    sql = "SELECT $1::int"
    name = server_name(sql).decode()
    checked_out(pair, first, messages.parse("s1", sql) + messages.sync())
    pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + Z_IDLE)
    assert pair.hooks.events[-1] == "release_server"
    writes = checked_out(pair, second, messages.bind("", "s1", ["8"]) + messages.execute() + messages.sync())
    assert writes == [
        renamed_parse(sql) + messages.bind("", name, ["8"]) + context_statement() + context(second)
        + messages.execute() + messages.sync()
    ]
    replies = CLOSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE + CONTEXT_PREPARED + CONTEXT_SET + data_row(b"8") + complete("SELECT 1")
    # the proxy's Parse is its own: the client sees no ParseComplete it did not ask for
    assert pair.server(replies + Z_IDLE) == BIND_COMPLETE + data_row(b"8") + complete("SELECT 1") + Z_IDLE
    # back on the first connection, which holds it: no Parse
    writes = checked_out(pair, first, messages.bind("", "s1", ["9"]) + messages.execute() + messages.sync())
    assert writes == [messages.bind("", name, ["9"]) + context_statement() + context(first) + messages.execute() + messages.sync()]


def test_unnamed_statement_prepared_again_on_a_new_server_connection() -> None:
    pair, first, second = RelayPair(), Server(101), Server(202)
    sql = "SELECT $1::text"
    parse = messages.parse("", sql)
    checked_out(pair, first, parse + messages.sync())
    assert pair.server(PARSE_COMPLETE + Z_IDLE) == PARSE_COMPLETE + Z_IDLE
    bind = messages.bind("", "", ["x"])
    writes = checked_out(pair, second, bind + messages.execute() + messages.sync())
    assert writes == [parse + bind + context_statement() + context(second) + messages.execute() + messages.sync()]
    replies = PARSE_COMPLETE + BIND_COMPLETE + CONTEXT_PREPARED + CONTEXT_SET + data_row(b"x") + complete("SELECT 1") + Z_IDLE
    assert pair.server(replies) == BIND_COMPLETE + data_row(b"x") + complete("SELECT 1") + Z_IDLE


def test_deallocate_inside_a_longer_query_finds_a_stand_in_under_the_clients_name() -> None:
    """`SELECT 1; DEALLOCATE s1`: the server holds s1 under a digest name, so a statement of the proxy's
    is prepared under the name s1 just before; the client's statement is forgotten once the Query completes."""
    pair, server = RelayPair(), Server(101)
    checked_out(pair, server, messages.parse("s1", "SELECT 1") + messages.sync())
    pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + Z_IDLE)
    query = messages.query("SELECT 1; DEALLOCATE s1")
    (write,) = checked_out(pair, server, query)
    assert write.endswith(messages.close_statement(b"s1") + messages.parse("s1", "SELECT NULL") + query
                          + messages.close_statement(b"s1") + messages.sync())  # closed again behind it
    out = pair.server(CONTEXT_PREPARED + CONTEXT_SET + CLOSE_COMPLETE + PARSE_COMPLETE + ROWS + complete("DEALLOCATE") + Z_IDLE
                      + CLOSE_COMPLETE + Z_IDLE)
    assert out.endswith(complete("DEALLOCATE") + Z_IDLE)
    assert b"s1" not in pair.relay.mode.statements.by_name  # type: ignore[union-attr]


def test_a_stand_in_is_closed_again_behind_the_sync_of_a_group_that_executes_a_deallocate() -> None:
    """Execute of a portal whose statement is `DEALLOCATE s1`: the stand-in s1 is closed right behind the
    Execute and again behind the group's Sync, in a group of the proxy's own, since an Execute that fails
    skips the first Close with it; the stand-in left there answered a later Bind of s1 by any client of the
    server connection (found by the random search). Inside a block, where the portal lives on."""
    pair, server = RelayPair(), Server(101)
    checked_out(pair, server, messages.parse("s1", "DEALLOCATE s1") + messages.bind("p1", "s1", []) + messages.sync())
    pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE + Z_BLOCK)
    (write,) = pair.client(messages.execute("p1") + messages.sync())
    close = messages.close_statement(b"s1")
    assert write == (close + messages.parse("s1", "SELECT NULL") + messages.execute("p1") + close + messages.sync()
                     + close + messages.sync())
    failed = messages.error_response("ERROR", "57014", "canceling statement due to user request")
    assert pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + failed + Z_FAILED) == failed + Z_FAILED
    assert pair.server(CLOSE_COMPLETE + Z_FAILED) == b""  # the stand-in's Close of the proxy's own
    assert server.queue.idle()  # every reply accounted for; the failed block keeps its server connection


def test_a_stand_in_behind_a_query_inside_an_extended_group_is_closed_with_no_sync_of_the_proxys() -> None:
    """A failing Parse, then `DEALLOCATE s1; SELECT 1` and a Bind before the client's Sync: Postgres skips
    the Query and the Bind. The stand-in's Close goes behind the Query with no Sync (the proxy's Sync
    there ended the error window early, and the Bind ran: 26000 where Postgres answers nothing; found by
    the random search), and again behind the client's Sync."""
    pair, server = RelayPair(), Server(101)
    checked_out(pair, server, messages.parse("s1", "SELECT 1") + messages.sync())
    pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + Z_IDLE)
    query, bind = messages.query("DEALLOCATE s1; SELECT 1"), messages.bind("", "", [])
    (write,) = checked_out(pair, server, messages.parse("", "SELEC 1") + query + bind + messages.sync())
    close = messages.close_statement(b"s1")
    assert write.endswith(query + close + bind + messages.sync() + close + messages.sync())


def test_client_close_of_its_statement_stands_in_and_forgets_it() -> None:
    pair, server = RelayPair(), Server(101)
    sql = "SELECT $1::int"
    checked_out(pair, server, messages.parse("s1", sql) + messages.sync())
    pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + Z_IDLE)
    close = messages.close_statement(b"s1")
    writes = checked_out(pair, server, close + messages.sync())
    assert writes == [messages.close_statement(NEVER_PREPARED) + messages.sync()]  # the shared statement stays
    assert pair.server(CLOSE_COMPLETE + Z_IDLE) == CLOSE_COMPLETE + Z_IDLE
    assert b"s1" not in pair.relay.mode.statements.by_name  # type: ignore[union-attr]


def test_deallocate_of_own_statement_answered_by_the_proxy() -> None:
    pair, server = RelayPair(), Server(101)
    checked_out(pair, server, messages.parse("s1", "SELECT 1") + messages.sync())
    pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + Z_IDLE)
    start = len(pair.hooks.client)
    writes = checked_out(pair, server, messages.query("DEALLOCATE s1"))
    assert b"".join(writes) == b""  # nothing upstream: the statement may be shared
    assert b"".join(pair.hooks.client[start:]) == complete("DEALLOCATE") + Z_IDLE
    assert pair.hooks.events[-1] == "release_server"
    assert b"s1" not in pair.relay.mode.statements.by_name  # type: ignore[union-attr]


def test_a_deallocate_the_proxy_answers_drops_the_unnamed_statement_as_any_query_does() -> None:
    """`DEALLOCATE s1`, answered by the proxy, is a simple Query to the client: Postgres drops the unnamed
    statement with it, so the client's Bind of that statement behind it fails (26000) as directly; the
    server connection's is closed first, not used."""
    pair, server = RelayPair(), Server(101)
    checked_out(pair, server, messages.parse("s1", "SELECT 1") + messages.parse("", "SELECT 2") + messages.sync())
    pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + PARSE_COMPLETE + Z_IDLE)
    checked_out(pair, server, messages.query("DEALLOCATE s1"))
    assert pair.relay.mode.statements.unnamed is None  # type: ignore[union-attr]
    writes = b"".join(checked_out(pair, server, messages.bind("", "", []) + messages.execute() + messages.sync()))
    assert messages.message(b"C", b"S\0") in writes and messages.parse("", "SELECT 2") not in writes


def test_a_deallocated_name_is_free_for_a_parse_behind_it_in_the_same_write() -> None:
    """`DEALLOCATE s1` answered by the proxy, then Parse s1 before any reply: the name is free from the
    DEALLOCATE on, as in Postgres, so the Parse creates s1 anew (it was refused with 42P05)."""
    pair, server = RelayPair(), Server(101)
    checked_out(pair, server, messages.parse("s1", "SELECT 1") + messages.sync())
    pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + Z_IDLE)
    start = len(pair.hooks.client)
    writes = checked_out(pair, server, messages.query("DEALLOCATE s1") + messages.parse("s1", "SELECT 2") + messages.sync())
    assert b"".join(writes) == renamed_parse("SELECT 2") + messages.sync()
    assert pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + Z_IDLE) == PARSE_COMPLETE + Z_IDLE
    assert b"".join(pair.hooks.client[start:]) == complete("DEALLOCATE") + Z_IDLE + PARSE_COMPLETE + Z_IDLE
    assert pair.relay.mode.statements.by_name[b"s1"].server_name == server_name("SELECT 2")  # type: ignore[union-attr]


def test_a_deallocate_refused_in_a_failed_block_leaves_the_statement() -> None:
    """Inside a failed block the proxy answers `DEALLOCATE s1` with 25P02, and s1 stays, as in Postgres."""
    pair, server = RelayPair(), Server(101)
    checked_out(pair, server, messages.parse("s1", "SELECT 1") + messages.sync())
    pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + Z_IDLE)
    checked_out(pair, server, messages.query("BEGIN"))
    pair.server(complete("BEGIN") + Z_BLOCK)
    pair.client(messages.query("SELECT 1/0"))
    pair.server(CONTEXT_PREPARED + CONTEXT_SET + messages.error_response("ERROR", "22012", "division by zero") + Z_FAILED)
    start = len(pair.hooks.client)
    assert b"".join(pair.client(messages.query("DEALLOCATE s1"))) == b""  # answered by the proxy
    assert messages.parse_error_fields(pair.hooks.client[start][5:])["C"] == errors.IN_FAILED_TRANSACTION
    assert b"s1" in pair.relay.mode.statements.by_name  # type: ignore[union-attr]


def test_set_leads_to_a_settings_read_back_after_the_group() -> None:
    pair, server = RelayPair(), Server(101)
    set_query = messages.query("SET search_path TO app")
    writes = checked_out(pair, server, set_query)
    assert writes == [  # a SET takes no snapshot: the context goes in front of the transaction's next statement
        set_query
        + own_statement(READ_STATEMENT, READ_SQL) + read_bind({"search_path"}, SETTINGS_LIMIT)
        + messages.execute(READ_STATEMENT.decode()) + close_portal(READ_STATEMENT) + messages.sync()
    ]
    assert pair.server(complete("SET") + Z_IDLE) == complete("SET") + Z_IDLE
    assert "release_server" not in pair.hooks.events  # the read-back is still owed
    read = (CLOSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE + data_row(b"search_path", b"app") + complete("SELECT 1")
            + CLOSE_COMPLETE + Z_IDLE)
    assert pair.server(read) == b""
    assert pair.hooks.events[-1] == "release_server"
    assert pair.relay.settings.current == {"search_path": "app"}
    assert server.state.settings == {"search_path": "app"}
    # another connection gets the client's settings applied, pipelined, before its statement
    other = Server(202)
    writes = checked_out(pair, other, SELECT_1)
    assert writes == [
        own_statement(APPLY_STATEMENT, APPLY_SQL) + apply_bind({"search_path": "app"})
        + messages.execute(APPLY_STATEMENT.decode()) + close_portal(APPLY_STATEMENT) + messages.sync()
        + context_statement() + context(other) + SELECT_1
    ]


def test_a_read_back_that_a_late_cancel_hit_is_read_again() -> None:
    """The client's cancel raced the end of its SET and landed in the proxy's read-back behind it
    (57014): the read-back is sent again, so the value the SET left is not lost (a breaker helper saw
    the old value applied at the next checkout)."""
    pair, server = RelayPair(), Server(101)
    checked_out(pair, server, messages.query("SET search_path TO app"))
    pair.server(complete("SET") + Z_IDLE)
    start = len(pair.hooks.upstream)
    cancelled = messages.error_response("ERROR", "57014", "canceling statement due to user request")
    assert pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE + cancelled + Z_IDLE) == b""
    assert pair.upstream_since(start) == [
        read_bind({"search_path"}, SETTINGS_LIMIT) + messages.execute(READ_STATEMENT.decode()) + close_portal(READ_STATEMENT) + messages.sync()
    ]
    assert "release_server" not in pair.hooks.events
    read = BIND_COMPLETE + data_row(b"search_path", b"app") + complete("SELECT 1") + CLOSE_COMPLETE + Z_IDLE
    assert pair.server(read) == b""
    assert pair.hooks.events[-1] == "release_server"
    assert server.state.settings == {"search_path": "app"} and not server.state.unnamed_settings


def test_inside_a_block_the_settings_are_read_back_only_behind_a_group_that_may_end_it() -> None:
    """A read-back inside a block is thrown away (read again after it), and its failure (the client's
    statement_timeout, a cancel racing the end of a statement) would abort the client's block."""
    pair, server = RelayPair(), Server(101)
    checked_out(pair, server, messages.query("BEGIN"))
    pair.server(complete("BEGIN") + Z_BLOCK)
    set_query = messages.query("SET search_path TO app")
    assert pair.client(set_query) == [set_query]  # no read-back behind it (nor the context: SET takes no snapshot)
    pair.server(complete("SET") + Z_BLOCK)
    assert pair.client(SELECT_1) == [context_statement() + context(server) + SELECT_1]
    pair.server(CONTEXT_PREPARED + CONTEXT_SET + ROWS + Z_BLOCK)
    commit = messages.query("COMMIT")
    assert pair.client(commit) == [
        commit + own_statement(READ_STATEMENT, READ_SQL) + read_bind({"search_path"}, SETTINGS_LIMIT)
        + messages.execute(READ_STATEMENT.decode()) + close_portal(READ_STATEMENT) + messages.sync()
    ]
    pair.server(complete("COMMIT") + Z_IDLE)
    assert "release_server" not in pair.hooks.events  # the read-back is owed
    read = (CLOSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE + data_row(b"search_path", b"app") + complete("SELECT 1")
            + CLOSE_COMPLETE + Z_IDLE)
    pair.server(read)
    assert pair.hooks.events[-1] == "release_server" and server.state.settings == {"search_path": "app"}


def test_reset_all_applies_startup_values_again() -> None:
    pair, server = RelayPair(startup={"DateStyle": "ISO, DMY"}), Server(101)
    applied = apply_bind({"datestyle": "ISO, DMY"}) + messages.execute(APPLY_STATEMENT.decode()) + close_portal(APPLY_STATEMENT) + messages.sync()
    apply_replies = BIND_COMPLETE + data_row(b"ISO, DMY") + complete("SELECT 1") + CLOSE_COMPLETE + Z_IDLE
    writes = checked_out(pair, server, SELECT_1)
    assert writes == [own_statement(APPLY_STATEMENT, APPLY_SQL) + applied + context_statement() + context(server) + SELECT_1]
    assert pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + apply_replies + CONTEXT_PREPARED + CONTEXT_SET + ROWS + Z_IDLE) == ROWS + Z_IDLE
    assert pair.hooks.events[-1] == "release_server"
    reset = messages.query("RESET ALL")
    writes = checked_out(pair, server, reset)
    read_back = (read_bind({"datestyle"}, SETTINGS_LIMIT) + messages.execute(READ_STATEMENT.decode()) + close_portal(READ_STATEMENT)
                 + messages.sync())
    assert writes == [context(server) + reset + applied + own_statement(READ_STATEMENT, READ_SQL) + read_back]
    assert pair.server(CONTEXT_SET + complete("RESET") + Z_IDLE) == complete("RESET") + Z_IDLE
    read = (BIND_COMPLETE + data_row(b"datestyle", b"ISO, DMY") + complete("SELECT 1") + CLOSE_COMPLETE + Z_IDLE)
    assert pair.server(apply_replies + CLOSE_COMPLETE + PARSE_COMPLETE + read) == b""
    assert pair.hooks.events[-1] == "release_server"
    assert pair.relay.settings.current == {"datestyle": "ISO, DMY"}
    # a statement after the reset in the same Query: only settings still at the server's reset value
    reset_then = messages.query("RESET ALL; SET extra_float_digits = 3")
    writes = checked_out(pair, server, reset_then)
    reapplied = (own_statement(REAPPLY_STATEMENT, REAPPLY_SQL) + apply_bind({"datestyle": "ISO, DMY"}, REAPPLY_STATEMENT)
                 + messages.execute(REAPPLY_STATEMENT.decode()) + close_portal(REAPPLY_STATEMENT) + messages.sync())
    assert writes[0].startswith(context(server) + reset_then + reapplied)


def test_startup_values_applied_again_are_sent_again_when_a_late_cancel_hit_them() -> None:
    """A cancel racing the end of RESET ALL landed in the group that applies the startup values again
    (57014, outside a block, nothing of the client's behind it): the group goes again, and a read-back
    behind it, instead of the session ending."""
    pair, server = RelayPair(startup={"DateStyle": "ISO, DMY"}), Server(101)
    applied = apply_bind({"datestyle": "ISO, DMY"}) + messages.execute(APPLY_STATEMENT.decode()) + close_portal(APPLY_STATEMENT) + messages.sync()
    apply_replies = BIND_COMPLETE + data_row(b"ISO, DMY") + complete("SELECT 1") + CLOSE_COMPLETE + Z_IDLE
    checked_out(pair, server, SELECT_1)
    pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + apply_replies + CONTEXT_PREPARED + CONTEXT_SET + ROWS + Z_IDLE)
    checked_out(pair, server, messages.query("RESET ALL"))
    assert pair.server(CONTEXT_SET + complete("RESET") + Z_IDLE) == complete("RESET") + Z_IDLE
    start = len(pair.hooks.upstream)
    cancelled = messages.error_response("ERROR", "57014", "canceling statement due to user request")
    read = BIND_COMPLETE + data_row(b"datestyle", b"") + complete("SELECT 1") + CLOSE_COMPLETE + Z_IDLE
    assert pair.server(BIND_COMPLETE + cancelled + Z_IDLE + CLOSE_COMPLETE + PARSE_COMPLETE + read) == b""
    read_back = read_bind({"datestyle"}, SETTINGS_LIMIT) + messages.execute(READ_STATEMENT.decode()) + close_portal(READ_STATEMENT) + messages.sync()
    assert b"".join(pair.upstream_since(start)) == applied + read_back
    assert pair.hooks.failures == []
    pair.server(apply_replies + BIND_COMPLETE + data_row(b"datestyle", b"ISO, DMY") + complete("SELECT 1") + CLOSE_COMPLETE + Z_IDLE)
    assert pair.hooks.events[-1] == "release_server"
    assert pair.relay.settings.current == {"datestyle": "ISO, DMY"}


def test_connection_of_another_tenant_is_reset_first() -> None:
    pair, server = RelayPair(), Server(101)
    server.state.tenant = "other"
    writes = checked_out(pair, server, SELECT_1)
    reset = (messages.close_statement(RESET_STATEMENT) + messages.parse(RESET_STATEMENT.decode(), RESET_SQL) + RESET_BIND
             + RESET_EXECUTE + messages.sync())
    assert writes == [reset + context_statement() + context(server) + SELECT_1]
    reset_replies = CLOSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE + data_row(b"") + complete("SELECT 1") + Z_IDLE
    assert pair.server(reset_replies + CONTEXT_PREPARED + CONTEXT_SET + ROWS + Z_IDLE) == ROWS + Z_IDLE
    assert server.state.tenant == IDENTITY.tenant


def test_another_clients_statement_timeout_is_lifted_before_the_reset() -> None:
    """A connection holding another client's statement_timeout (1 ms) gets `SET statement_timeout = 0`
    first, in a Query of its own, so the reset and the settings behind it do not run under that timeout
    (one whose settings are not known gets it too: test_connection_with_settings_the_proxy_cannot_name_...).
    The client's own value is applied behind the reset."""
    pair, server = RelayPair(startup={"statement_timeout": "5s"}), Server(101)
    server.state.tenant = "other"
    server.state.settings = {"statement_timeout": "1ms"}
    writes = checked_out(pair, server, SELECT_1)
    reset = (messages.close_statement(RESET_STATEMENT) + messages.parse(RESET_STATEMENT.decode(), RESET_SQL) + RESET_BIND
             + RESET_EXECUTE)
    applied = (own_statement(APPLY_STATEMENT, APPLY_SQL) + apply_bind({"statement_timeout": "5s"})
               + messages.execute(APPLY_STATEMENT.decode()) + close_portal(APPLY_STATEMENT) + messages.sync())
    assert writes == [LIFT_TIMEOUT + reset + applied + context_statement() + context(server) + SELECT_1]
    assert server.state.settings == {"statement_timeout": "5s"}
    same = RelayPair(startup={"statement_timeout": "1ms"}), Server(103)  # its own value, nothing to reset or apply
    same[1].state.tenant, same[1].state.settings = IDENTITY.tenant, {"statement_timeout": "1ms"}
    assert checked_out(*same, SELECT_1) == [context_statement() + context(same[1]) + SELECT_1]


def test_a_cancel_while_waiting_for_a_connection_goes_once_the_statement_is_sent() -> None:
    """Directly, a cancel of an outstanding statement cancels it (57014); through transaction pooling the
    statement may still wait for a server connection: the cancel is passed on when it is sent there."""
    pair, server = RelayPair(), Server(101)
    assert pair.client(SELECT_1) == []
    pair.relay.cancel_requested()
    assert "cancel_server" not in pair.hooks.events  # nothing runs yet
    assert pair.attach(server) == [context_statement() + context(server) + SELECT_1]
    assert pair.hooks.events[-1] == "cancel_server"
    cancelled = messages.error_response("ERROR", "57014", "canceling statement due to user request")
    assert pair.server(CONTEXT_PREPARED + CONTEXT_SET + cancelled + Z_IDLE) == cancelled + Z_IDLE
    assert pair.hooks.events.count("cancel_server") == 1


def test_a_cancel_waits_for_the_proxys_own_reset_ahead_of_the_statement() -> None:
    """A cancel landing in the reset for another tenant would fail it and end the session: it goes once
    the reset's ReadyForQuery is back (the server flushes it; the context and the statement follow)."""
    pair, server = RelayPair(), Server(101)
    server.state.tenant = "other"
    checked_out(pair, server, SELECT_1)
    pair.relay.cancel_requested()
    assert "cancel_server" not in pair.hooks.events
    reset_replies = CLOSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE + data_row(b"") + complete("SELECT 1") + Z_IDLE
    assert pair.server(reset_replies) == b""
    assert pair.hooks.events[-1] == "cancel_server"


def test_a_cancel_with_nothing_outstanding_cancels_nothing() -> None:
    pair, server = RelayPair(), Server(101)
    checked_out(pair, server, SELECT_1)
    pair.server(CONTEXT_PREPARED + CONTEXT_SET + ROWS + Z_IDLE)
    assert pair.hooks.events[-1] == "release_server"
    pair.relay.cancel_requested()
    assert pair.hooks.events[-1] == "cancel_dropped"  # its CancelRequest's connection may close now
    assert checked_out(pair, server, SELECT_1) == [context(server) + SELECT_1]  # a later statement is not cancelled
    assert "cancel_server" not in pair.hooks.events


def test_connection_with_settings_the_proxy_cannot_name_is_reset_for_another_client_of_the_tenant() -> None:
    """A client set a setting under a computed name (the guard cannot name it, so no diff can undo it):
    the next client of the same tenant gets the connection reset first; the same client does not."""
    pair, server = RelayPair(), Server(101)
    server.state.tenant, server.state.unnamed_settings, server.state.client = IDENTITY.tenant, True, pair.relay.serial
    assert checked_out(pair, server, SELECT_1) == [context_statement() + context(server) + SELECT_1]
    other = RelayPair()
    server.queue.status = b"I"
    writes = checked_out(other, server, SELECT_1)
    # statement_timeout is not known either: lifted first (test_another_clients_statement_timeout_is_lifted_before_the_reset)
    assert writes[0].startswith(
        LIFT_TIMEOUT + messages.close_statement(RESET_STATEMENT) + messages.parse(RESET_STATEMENT.decode(), RESET_SQL)
    )
    assert not server.state.unnamed_settings and server.state.client == other.relay.serial


def test_context_failure_in_front_of_a_query_ends_with_ready_for_query() -> None:
    """The context's Execute fails: the server skips the client's Query and waits for a Sync, which the
    proxy sends; the client gets the error and a ReadyForQuery, as for a failed Query."""
    pair, server = RelayPair(), Server(101)
    checked_out(pair, server, SELECT_1)
    start = len(pair.hooks.upstream)
    failure = messages.error_response("ERROR", errors.INSUFFICIENT_PRIVILEGE, "permission denied")
    out = pair.server(CONTEXT_PREPARED + BIND_COMPLETE + failure)
    assert pair.upstream_since(start) == [messages.sync()]
    fields = messages.parse_error_fields(out[5:])
    assert fields["C"] == errors.INSUFFICIENT_PRIVILEGE
    assert fields["M"] == "could not set the tenant context: permission denied"
    assert "release_server" not in pair.hooks.events
    assert pair.server(Z_IDLE) == Z_IDLE
    assert pair.hooks.events[-1] == "release_server"


def test_context_bind_failure_in_front_of_a_query_ends_with_ready_for_query() -> None:
    """Same, when the context's Bind fails (a late CancelRequest landing on it: 57014): the Execute
    behind it is skipped, and the server still waits for a Sync before the client's ReadyForQuery."""
    pair, server = RelayPair(), Server(101)
    checked_out(pair, server, SELECT_1)
    start = len(pair.hooks.upstream)
    failure = messages.error_response("ERROR", errors.QUERY_CANCELED, "canceling statement due to user request")
    out = pair.server(CONTEXT_PREPARED + failure)
    assert pair.upstream_since(start) == [messages.sync()]
    assert messages.parse_error_fields(out[5:])["C"] == errors.QUERY_CANCELED
    assert "release_server" not in pair.hooks.events  # the server is still skipping to a Sync
    assert pair.server(Z_IDLE) == Z_IDLE
    assert pair.hooks.events[-1] == "release_server"


CANCELLED = messages.error_response("ERROR", errors.QUERY_CANCELED, "canceling statement due to user request")


@pytest.mark.parametrize("landed", ["Close", "Parse"])
def test_a_cancel_landing_where_the_context_statement_is_prepared_is_the_clients_error(landed: str) -> None:
    """A CancelRequest sent right behind a Query (DBD::Pg's pg_async then pg_cancel) may land on the
    Close or Parse of the proxy's context statement in front of it, on a server connection that lacks
    it: the server skips the context and the client's Query up to a Sync. The client gets the error, as
    a failed context, and the ReadyForQuery of the proxy's Sync; before, it got a bare ReadyForQuery
    (its Query silently skipped) after a failed Parse, and no answer at all after a failed Close."""
    pair, server = RelayPair(), Server(101)
    assert checked_out(pair, server, SELECT_1) == [context_statement() + context(server) + SELECT_1]
    start = len(pair.hooks.upstream)
    out = pair.server((CLOSE_COMPLETE if landed == "Parse" else b"") + CANCELLED)
    assert pair.upstream_since(start) == [messages.sync()]
    fields = messages.parse_error_fields(out[5:])
    assert (fields["C"], fields["M"]) == (errors.QUERY_CANCELED, "could not set the tenant context: canceling statement due to user request")
    assert "release_server" not in pair.hooks.events
    assert pair.server(Z_IDLE) == Z_IDLE
    assert pair.hooks.events[-1] == "release_server"
    assert checked_out(pair, server, SELECT_1) == [context_statement() + context(server) + SELECT_1]  # not held there


def test_a_cancel_landing_on_the_close_in_front_of_a_statement_prepared_again_is_the_clients_error() -> None:
    """The same for the Close in front of a client's statement prepared again on another server
    connection: the server skips the client's Bind and Execute up to its Sync; the client hears why."""
    pair, first, second = RelayPair(), Server(101), Server(202)
    sql = "SELECT $1::int"
    checked_out(pair, first, messages.parse("s1", sql) + messages.sync())
    pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + Z_IDLE)
    (write,) = checked_out(pair, second, messages.bind("", "s1", ["8"]) + messages.execute() + messages.sync())
    assert write.startswith(renamed_parse(sql))
    out = pair.server(CANCELLED + Z_IDLE)
    fields = messages.parse_error_fields(out[5:-6])
    assert fields["C"] == errors.QUERY_CANCELED
    assert fields["M"] == "could not prepare the statement again on this server connection: canceling statement due to user request"
    assert out.endswith(Z_IDLE) and pair.hooks.events[-1] == "release_server"


@pytest.mark.parametrize("setup", [
    "BEGIN ISOLATION LEVEL SERIALIZABLE", "START TRANSACTION READ ONLY, DEFERRABLE", "begin; set transaction isolation level repeatable read",
    # statements Postgres runs without a snapshot (psql's AUTOCOMMIT off sends BEGIN, then the SET)
    "BEGIN; SET LOCAL work_mem = '1MB'", "BEGIN; SET work_mem = '1MB'", "BEGIN ISOLATION LEVEL REPEATABLE READ; LOCK TABLE t IN ROW EXCLUSIVE MODE",
])
def test_a_transaction_setup_goes_before_the_context(setup: str) -> None:
    """Postgres takes an isolation level, DEFERRABLE or a snapshot only before the transaction's first
    query, and the context is a query (25001 otherwise): a Query that only begins the transaction or
    sets its characteristics goes alone, and the context goes in front of the next statement."""
    pair, server = RelayPair(), Server(101)
    first = messages.query(setup)
    assert checked_out(pair, server, first) == [first]
    assert pair.server(complete("BEGIN") + Z_BLOCK) == complete("BEGIN") + Z_BLOCK
    set_transaction = messages.query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
    assert pair.client(set_transaction) == [set_transaction]  # still before the first query
    assert pair.server(complete("SET") + Z_BLOCK) == complete("SET") + Z_BLOCK
    assert pair.client(SELECT_1) == [context_statement() + context(server) + SELECT_1]
    assert pair.server(CONTEXT_PREPARED + CONTEXT_SET + ROWS + Z_BLOCK) == ROWS + Z_BLOCK


def test_failed_transaction_keeps_the_connection_until_rollback() -> None:
    pair, server = RelayPair(), Server(101)
    checked_out(pair, server, messages.query("BEGIN"))
    pair.server(complete("BEGIN") + Z_BLOCK)
    pair.client(SELECT_1)
    failure = messages.error_response("ERROR", "22012", "division by zero")
    assert pair.server(CONTEXT_PREPARED + CONTEXT_SET + failure + Z_FAILED) == failure + Z_FAILED
    assert "release_server" not in pair.hooks.events
    rollback = messages.query("ROLLBACK")
    assert pair.client(rollback) == [rollback]
    pair.server(complete("ROLLBACK") + Z_IDLE)
    assert pair.hooks.events[-1] == "release_server"


def test_terminate_with_no_server_connection_asks_for_none() -> None:
    pair = RelayPair()
    assert pair.client(messages.terminate()) == []
    assert pair.hooks.events == ["terminated"]


# -- session mode ----------------------------------------------------------------------------------

def session_context(server: Server) -> bytes:
    return b"".join(raw for raw, _ in CONTEXT.session_messages(IDENTITY.tenant, server.process_id, IDENTITY.expires_at,
                                                               IDENTITY.claims_json))


SESSION_CONTEXT_SET = (PARSE_COMPLETE + BIND_COMPLETE + data_row(b"acme", b"p", b"{}", b"q") + complete("SELECT 1")
                       + CLOSE_COMPLETE + CLOSE_COMPLETE + Z_IDLE)


def test_session_mode_context_first_and_client_held_until_answered() -> None:
    pair, server = RelayPair(transaction_mode=False), Server(101)
    assert pair.client(SELECT_1) == []
    assert pair.attach(server) == [session_context(server)]  # the client's Query waits
    assert "prepared" not in pair.hooks.events
    start = len(pair.hooks.upstream)
    assert pair.server(SESSION_CONTEXT_SET[:-len(Z_IDLE)]) == b""
    assert pair.upstream_since(start) == []
    assert pair.server(Z_IDLE) == b""
    assert "prepared" in pair.hooks.events
    assert pair.upstream_since(start) == [SELECT_1]
    assert pair.server(ROWS + Z_IDLE) == ROWS + Z_IDLE
    assert "release_server" not in pair.hooks.events  # session mode keeps its connection


def test_session_mode_attach_at_login_with_nothing_held() -> None:
    pair, server = RelayPair(transaction_mode=False), Server(101)
    assert pair.attach(server) == [session_context(server)]
    pair.server(SESSION_CONTEXT_SET)
    assert pair.hooks.events == ["prepared"]
    assert pair.client(SELECT_1) == [SELECT_1]


def test_session_mode_a_cancel_goes_while_the_statement_runs_and_is_dropped_after_it() -> None:
    """Each cancel ends in one of `cancel_server` (sent: its CancelRequest's connection closes once the
    server has acted on it) and `cancel_dropped` (nothing to cancel: it closes now)."""
    pair, server = RelayPair(transaction_mode=False), Server(101)
    pair.attach(server)
    pair.server(SESSION_CONTEXT_SET)
    assert pair.client(SELECT_1) == [SELECT_1]
    pair.relay.cancel_requested()
    assert pair.hooks.events[-1] == "cancel_server"
    cancelled = messages.error_response("ERROR", "57014", "canceling statement due to user request")
    assert pair.server(cancelled + Z_IDLE) == cancelled + Z_IDLE
    pair.relay.cancel_requested()
    assert pair.hooks.events[-1] == "cancel_dropped"
    assert pair.hooks.events.count("cancel_server") == 1 and pair.hooks.events.count("cancel_dropped") == 1


def test_session_mode_reasserts_the_context_after_reset_all() -> None:
    pair, server = RelayPair(transaction_mode=False), Server(101)
    pair.attach(server)
    pair.server(SESSION_CONTEXT_SET)
    reset = messages.query("RESET ALL")
    assert pair.client(reset) == [reset + session_context(server)]
    assert pair.server(complete("RESET") + Z_IDLE + SESSION_CONTEXT_SET) == complete("RESET") + Z_IDLE
    discard = messages.query("DISCARD ALL")
    assert pair.client(discard) == [discard + session_context(server)]


def test_session_mode_context_cancelled_by_a_late_cancel_is_set_again() -> None:
    """A cancel racing the end of RESET ALL landed in the context set again behind it (57014, after its
    Parse, so the statement is still there): the context goes again, its statement closed first."""
    pair, server = RelayPair(transaction_mode=False), Server(101)
    pair.attach(server)
    pair.server(SESSION_CONTEXT_SET)
    reset = messages.query("RESET ALL")
    pair.client(reset)
    start = len(pair.hooks.upstream)
    cancelled = messages.error_response("ERROR", "57014", "canceling statement due to user request")
    assert pair.server(complete("RESET") + Z_IDLE + PARSE_COMPLETE + BIND_COMPLETE + cancelled + Z_IDLE) == complete("RESET") + Z_IDLE
    assert pair.upstream_since(start) == [CONTEXT.session_statement_close() + session_context(server)]
    assert pair.server(CLOSE_COMPLETE + SESSION_CONTEXT_SET) == b""
    assert pair.hooks.failures == []
    assert pair.client(SELECT_1) == [SELECT_1]


def test_session_mode_context_failure_ends_the_session() -> None:
    pair, server = RelayPair(transaction_mode=False), Server(101)
    pair.attach(server)
    failure = messages.error_response("ERROR", errors.INSUFFICIENT_PRIVILEGE, "permission denied for set_config")
    assert pair.server(PARSE_COMPLETE + BIND_COMPLETE + failure + Z_IDLE) == b""
    assert pair.hooks.failures == [(errors.INSUFFICIENT_PRIVILEGE, "could not set the tenant context: permission denied for set_config")]


def test_reserved_statement_name_refused() -> None:
    pair, server = RelayPair(transaction_mode=False), Server(101)
    pair.attach(server)
    pair.server(SESSION_CONTEXT_SET)
    writes = pair.client(messages.parse("pg_tenant_proxy_context", "SELECT 1") + messages.sync())
    assert writes == [messages.parse("pg_tenant_proxy_refused", "pg_tenant_proxy_refused") + messages.sync()]
    out = pair.server(messages.error_response("ERROR", errors.SYNTAX_ERROR, "syntax error") + Z_IDLE)
    assert messages.parse_error_fields(out[5:-len(Z_IDLE)])["C"] == errors.INSUFFICIENT_PRIVILEGE
    assert [r.sqlstate for r in pair.hooks.refusals] == [errors.INSUFFICIENT_PRIVILEGE]


def _extended_copy_started(pair: RelayPair, server: Server) -> None:
    copy = messages.parse("", "COPY t FROM STDIN") + messages.bind("", "", []) + messages.execute()
    checked_out(pair, server, copy + FLUSH)
    copy_in = messages.message(b"G", b"\0\0\0")
    assert pair.server(PARSE_COMPLETE + BIND_COMPLETE + CONTEXT_PREPARED + CONTEXT_SET + copy_in) == (
        PARSE_COMPLETE + BIND_COMPLETE + copy_in)


COPY_ROW = messages.message(b"d", b"1\n")
COPY_DONE = messages.message(b"c")


def test_messages_behind_a_copy_with_a_sync_among_its_data_wait_for_its_outcome() -> None:
    """Extended COPY IN, CopyData, Sync, CopyData, CopyDone, then Bind, Execute, Sync. Postgres ignores
    the Sync during COPY IN, so the Bind and Execute run in the COPY's group; the server holds the COPY's
    CommandComplete until a Flush or Sync. The proxy waited forever for that Sync's ReadyForQuery before
    the Execute (its context needs the status); now a Flush behind the CopyDone brings the outcome, and
    the rest goes on in the same group, without the context again."""
    pair, server = RelayPair(), Server(101)
    _extended_copy_started(pair, server)
    rest = messages.bind("", "s0", []) + messages.execute() + messages.sync()
    writes = pair.client(COPY_ROW + messages.sync() + COPY_ROW + COPY_DONE + rest)
    assert writes == [COPY_ROW + messages.sync() + COPY_ROW + COPY_DONE + FLUSH]
    assert pair.server(complete("COPY 2")) == complete("COPY 2")
    assert pair.hooks.upstream[-1] == rest
    replies = BIND_COMPLETE + data_row(b"1") + complete("SELECT 1") + Z_IDLE
    assert pair.server(replies) == replies
    assert pair.hooks.events[-1] == "release_server"


def test_a_copy_with_a_sync_among_its_data_keeps_its_connection_until_the_real_sync() -> None:
    """The COPY's outcome, brought by the proxy's Flush, leaves nothing owed, but the server ignored the
    Sync among the data: its implicit transaction (the COPY's rows) stays open until the client's next
    Sync, and the server connection must not serve another client meanwhile."""
    pair, server = RelayPair(), Server(101)
    _extended_copy_started(pair, server)
    pair.client(COPY_ROW + messages.sync() + COPY_ROW + COPY_DONE)
    assert pair.server(complete("COPY 2")) == complete("COPY 2")
    assert "release_server" not in pair.hooks.events
    assert pair.client(messages.sync()) == [messages.sync()]
    assert pair.server(Z_IDLE) == Z_IDLE
    assert pair.hooks.events[-1] == "release_server"


def test_query_after_a_copy_failed_at_copydone_with_a_sync_among_the_data() -> None:
    """Extended COPY IN with a Sync among the CopyData, failing at CopyDone (a unique violation): the
    server ignored that Sync while copying (postgres.c: CopyGetData ignores Sync and Flush; the error then
    skips to the next Sync). The proxy's probe behind it tells so (only its own ReadyForQuery comes), the
    client's last Sync is answered by the proxy, and its next Query reaches the server."""
    pair, server = RelayPair(), Server(101)
    _extended_copy_started(pair, server)
    writes = pair.client(COPY_ROW + messages.sync() + COPY_ROW + COPY_DONE + messages.sync())
    assert writes == [COPY_ROW + messages.sync() + COPY_ROW + COPY_DONE + FLUSH]  # the last Sync waits
    failure = messages.error_response("ERROR", "23505", "duplicate key value violates unique constraint")
    assert pair.server(failure) == failure
    assert pair.hooks.upstream[-1] == COPY_PROBE
    assert pair.server(Z_IDLE + CLOSE_COMPLETE) == Z_IDLE  # the client's last Sync, answered by the proxy
    assert pair.hooks.events[-1] == "release_server"
    writes = checked_out(pair, server, SELECT_1)
    assert SELECT_1 in b"".join(writes)


def test_after_a_copy_that_failed_before_its_copydone_a_sync_is_a_sync() -> None:
    """Session mode: COPY FROM STDIN by Query, a bad row, ErrorResponse and ReadyForQuery; the client sends
    no CopyDone (libpq stops at the error). Its next extended group's Sync is no Sync among CopyData:
    the Query pipelined behind it goes upstream at once, not after that Sync's ReadyForQuery."""
    pair, server = RelayPair(transaction_mode=False), Server(101)
    pair.attach(server)
    pair.server(SESSION_CONTEXT_SET)
    copy = messages.query("COPY t FROM STDIN")
    pair.client(copy)
    copy_in = messages.message(b"G", b"\0\0\0")
    assert pair.server(copy_in) == copy_in
    assert pair.client(COPY_ROW) == [COPY_ROW]
    failure = messages.error_response("ERROR", "22P02", "invalid input syntax for type integer")
    assert pair.server(failure + Z_IDLE) == failure + Z_IDLE
    group = messages.parse("", "SELECT 1") + messages.bind("", "", []) + messages.execute() + messages.sync()
    assert pair.client(group + SELECT_1) == [group + SELECT_1]
    replies = PARSE_COMPLETE + BIND_COMPLETE + data_row(b"1") + complete("SELECT 1") + Z_IDLE
    assert pair.server(replies + ROWS + Z_IDLE) == replies + ROWS + Z_IDLE


COPY_IN = messages.message(b"G", b"\0\0\0")
INTERRUPTED = messages.message(b"E", b"SERROR\0VERROR\0C57014\0MCOPY from stdin failed: " + COPY_INTERRUPTED.encode()
                               + b"\0WCOPY t, line 2\0\0")


def _simple_copy_started(pair: RelayPair, server: Server) -> None:
    """Transaction mode: COPY FROM STDIN by Query (behind the context), CopyInResponse, one row."""
    copy = messages.query("COPY t FROM STDIN")
    checked_out(pair, server, copy)
    assert pair.server(CONTEXT_PREPARED + CONTEXT_SET + COPY_IN) == COPY_IN
    assert pair.client(COPY_ROW) == [COPY_ROW]


def test_a_query_during_copy_in_gets_the_error_and_end_postgres_gives_it() -> None:
    """Transaction mode, a protocol violation: a Query during COPY IN, no CopyDone. The Query waits for the
    COPY's ReadyForQuery (its context needs the status), which the server, waiting for data, never sends:
    the proxy's CopyFail goes in its place. It ends the COPY: the client gets Postgres's ERROR 08P01 for a
    Query during COPY IN, and the session ends with 08P01 (the glue closes the server connection)."""
    pair, server = RelayPair(), Server(101)
    _simple_copy_started(pair, server)
    assert pair.client(SELECT_1) == [COPY_INTERRUPT]
    with pytest.raises(ProtocolViolation, match="protocol synchronization was lost"):
        pair.server(INTERRUPTED + Z_IDLE)
    (error,) = pair.hooks.client[-1:]
    fields = messages.parse_error_fields(error[5:])
    assert (fields["S"], fields["C"], fields["M"], fields["W"]) == (
        "ERROR", errors.PROTOCOL_VIOLATION, "unexpected message type 0x51 during COPY from stdin", "COPY t, line 2")
    assert SELECT_1 not in b"".join(pair.hooks.upstream)


def test_a_query_behind_a_copy_that_failed_on_its_data_goes_on() -> None:
    """The same, but the COPY had failed on the row before the server read the proxy's CopyFail, which
    it ignores: the client gets the COPY's error and ReadyForQuery, then its Query runs as directly."""
    pair, server = RelayPair(), Server(101)
    _simple_copy_started(pair, server)
    pair.client(SELECT_1)
    failure = messages.error_response("ERROR", "22P02", "invalid input syntax for type integer")
    start = len(pair.hooks.upstream)
    assert pair.server(failure + Z_IDLE) == failure + Z_IDLE
    assert pair.upstream_since(start) == [context(server) + SELECT_1]
    assert pair.server(CONTEXT_SET + ROWS + Z_IDLE) == ROWS + Z_IDLE
    assert pair.hooks.events[-1] == "release_server"


def test_a_query_pipelined_behind_copy_data_is_settled_once_the_copy_starts() -> None:
    """Query COPY, CopyData and a Query in one write: the Query waits for the COPY's ReadyForQuery; the
    CopyInResponse says the server reads COPY data, and the proxy's CopyFail goes behind the row."""
    pair, server = RelayPair(), Server(101)
    copy = messages.query("COPY t FROM STDIN")
    writes = checked_out(pair, server, copy + COPY_ROW + SELECT_1)
    assert b"".join(writes).endswith(copy + COPY_ROW)
    start = len(pair.hooks.upstream)
    assert pair.server(CONTEXT_PREPARED + CONTEXT_SET + COPY_IN) == COPY_IN
    assert pair.upstream_since(start) == [COPY_INTERRUPT]
    with pytest.raises(ProtocolViolation):
        pair.server(INTERRUPTED + Z_IDLE)


def test_prepare_with_flush_and_no_sync_gets_a_sync_of_the_proxys_own() -> None:
    """asyncpg prepares with Parse, Describe, Flush: the proxy ends the implicit transaction with a Sync
    whose ReadyForQuery it swallows, so the connection goes back to the pool meanwhile."""
    pair, server = RelayPair(), Server(101)
    sql = "SELECT $1::int"
    name = server_name(sql)
    flush = messages.message(b"H")
    writes = checked_out(pair, server, messages.parse("s1", sql) + messages.message(b"D", b"Ss1\0") + flush)
    assert writes == [renamed_parse(sql) + messages.message(b"D", b"S" + name + b"\0") + flush + messages.sync()]
    described = messages.message(b"t", b"\0\1\0\0\0\x17") + row_description("int4")
    assert pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + described + Z_IDLE) == PARSE_COMPLETE + described
    assert pair.hooks.events[-1] == "release_server"
    assert pair.hooks.ended == 0  # no client transaction ended: the ReadyForQuery was the proxy's


def test_a_cancel_for_messages_held_behind_the_proxys_sync_goes_when_they_are_sent() -> None:
    """The client's Bind, Execute, Sync wait behind the proxy's Sync after its Flush; a cancel then waits
    too, and goes as soon as they are sent (not at the end of their group, too late to cancel anything)."""
    pair, server = RelayPair(), Server(101)
    sql = "SELECT $1::int"
    checked_out(pair, server, messages.parse("s1", sql) + messages.message(b"D", b"Ss1\0") + messages.message(b"H"))
    described = messages.message(b"t", b"\0\1\0\0\0\x17") + row_description("int4")
    pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + described)
    assert pair.client(messages.bind("", "s1", ["7"]) + messages.execute() + messages.sync()) == []
    pair.relay.cancel_requested()
    assert "cancel_server" not in pair.hooks.events
    start = len(pair.hooks.upstream)
    assert pair.server(Z_IDLE) == b""
    assert pair.upstream_since(start) != []  # the held messages went
    assert pair.hooks.events[-1] == "cancel_server"


def test_parameter_status_from_the_proxys_own_group_reaches_the_client_before_its_ready_for_query() -> None:
    """Applying the client's DateStyle on a fresh connection makes the server report it; the client,
    which never saw it, hears it before its next ReadyForQuery; a value it already saw is not repeated."""
    pair, server = RelayPair(startup={"DateStyle": "ISO, DMY"}), Server(101)
    pair.relay.client_view["TimeZone"] = "UTC"
    checked_out(pair, server, SELECT_1)
    reported = messages.parameter_status("DateStyle", "ISO, DMY")
    applied = (CLOSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE + reported + messages.parameter_status("TimeZone", "UTC")
               + data_row(b"ISO, DMY") + complete("SELECT 1") + CLOSE_COMPLETE + Z_IDLE)
    assert pair.server(applied) == b""
    assert pair.server(CONTEXT_PREPARED + CONTEXT_SET + ROWS + Z_IDLE) == ROWS + reported + Z_IDLE
    assert server.state.parameters == {"DateStyle": "ISO, DMY", "TimeZone": "UTC"}
    assert pair.relay.client_view["DateStyle"] == "ISO, DMY"


def _upstream_for_reads(transaction_mode: bool, reads: list[bytes]) -> bytes:
    pair, server = RelayPair(transaction_mode=transaction_mode), Server(101)
    pair.attach(server)
    if not transaction_mode:
        pair.server(SESSION_CONTEXT_SET)
    start = len(pair.hooks.upstream)
    pair.client(*reads)
    return b"".join(pair.upstream_since(start))


def test_client_stream_cut_at_every_byte_gives_the_same_upstream() -> None:
    extended = (messages.parse("s1", "SELECT $1::int") + messages.bind("", "s1", ["1"]) + messages.message(b"D", b"P\0")
                + messages.execute() + messages.sync())
    for transaction_mode, stream in ((False, extended + SELECT_1 + messages.query("SELECT 2")), (True, extended)):
        whole = _upstream_for_reads(transaction_mode, [stream])
        if not transaction_mode:
            assert whole == stream
        for cut in range(1, len(stream)):
            assert _upstream_for_reads(transaction_mode, [stream[:cut], stream[cut:]]) == whole, (transaction_mode, cut)


def test_session_mode_notification_during_the_reasserted_context_reaches_the_client() -> None:
    """A client that LISTENs, then RESET ALL (which keeps its LISTEN): a NOTIFY from elsewhere may be
    delivered while the proxy's context group runs; Postgres sends it before that group's ReadyForQuery
    (55.2.7 Asynchronous Operations). It is the client's and must reach it."""
    pair, server = RelayPair(transaction_mode=False, allow_notifications=True), Server(101)
    pair.attach(server)
    pair.server(SESSION_CONTEXT_SET)
    listen = messages.query("LISTEN jobs")
    assert pair.client(listen) == [listen]
    assert pair.server(complete("LISTEN") + Z_IDLE) == complete("LISTEN") + Z_IDLE
    pair.client(messages.query("RESET ALL"))
    notification = messages.message(b"A", b"\0\0\0\x2ajobs\0run\0")
    out = pair.server(complete("RESET") + Z_IDLE + SESSION_CONTEXT_SET[:-len(Z_IDLE)] + notification + Z_IDLE)
    assert out == complete("RESET") + Z_IDLE + notification


def test_simple_query_drops_the_unnamed_statement() -> None:
    """As in Postgres (exec_simple_query drops the unnamed statement), a Bind of it after a Query fails
    on the server with 26000, and the proxy prepares nothing in its place."""
    pair, server = RelayPair(), Server(101)
    checked_out(pair, server, messages.parse("", "SELECT $1::text") + messages.sync())
    pair.server(PARSE_COMPLETE + Z_IDLE)
    checked_out(pair, server, SELECT_1)
    pair.server(CONTEXT_PREPARED + CONTEXT_SET + ROWS + Z_IDLE)
    bind = messages.bind("", "", ["x"])
    assert checked_out(pair, server, bind + messages.sync()) == [bind + messages.sync()]


def test_a_refused_query_drops_the_server_connections_unnamed_statement() -> None:
    """The Query the proxy sends in place of a refused one drops the server connection's unnamed statement:
    another client's, parsed there before, is prepared again when that client binds it there."""
    pair, other, server = RelayPair(), RelayPair(), Server(101)
    parse = messages.parse("", "SELECT $1::text")
    checked_out(pair, server, parse + messages.sync())
    pair.server(PARSE_COMPLETE + Z_IDLE)
    checked_out(other, server, messages.query("SET ROLE postgres"))
    other.server(messages.error_response("ERROR", errors.SYNTAX_ERROR, "refused") + Z_IDLE)
    bind = messages.bind("", "", ["x"])
    (write,) = checked_out(pair, server, bind + messages.execute() + messages.sync())
    assert write.startswith(parse + bind)


def test_settings_reset_at_checkout_drop_the_server_connections_unnamed_statement() -> None:
    """The RESET of settings another client left (`_apply`) is a simple Query, which drops the server
    connection's unnamed statement: the client's, parsed there before, is prepared again behind it (found
    under load: pg8000's Describe and Bind of its unnamed statement got 26000)."""
    pair, server = RelayPair(), Server(101)
    parse = messages.parse("", "SELECT $1::text")
    checked_out(pair, server, parse + messages.sync())
    pair.server(PARSE_COMPLETE + Z_IDLE)
    server.state.settings = {"search_path": "other"}  # another client's, applied since
    bind = messages.bind("", "", ["x"])
    (write,) = checked_out(pair, server, bind + messages.execute() + messages.sync())
    assert write.startswith(messages.query('RESET "search_path"') + parse + bind)


def test_a_refused_query_drops_the_clients_unnamed_statement() -> None:
    """Directly, the refused Query would have dropped the client's unnamed statement: a Bind of it after the
    refusal fails on the server with 26000, and the proxy prepares nothing in its place."""
    pair, server = RelayPair(), Server(101)
    checked_out(pair, server, messages.parse("", "SELECT $1::text") + messages.sync())
    pair.server(PARSE_COMPLETE + Z_IDLE)
    checked_out(pair, server, messages.query("SET ROLE postgres"))
    pair.server(messages.error_response("ERROR", errors.SYNTAX_ERROR, "refused") + Z_IDLE)
    bind = messages.bind("", "", ["x"])
    assert checked_out(pair, server, bind + messages.sync()) == [bind + messages.sync()]


@pytest.mark.parametrize(("before", "outcome", "after", "failed_itself", "aborted_block"), [
    (b"T", Outcome.FAILED, b"E", True, True),  # the proxy's own request aborted the client's block
    (b"E", Outcome.FAILED, b"E", False, False),  # the block had failed already (25P02, or 26000 from a Bind)
    (b"I", Outcome.FAILED, b"I", True, False),  # outside a block: nothing of the client's was aborted
    (b"T", Outcome.COMPLETED, b"T", False, False),
])
def test_block_watch_tells_who_failed_a_block(before: bytes, outcome: Outcome, after: bytes, failed_itself: bool,
                                              aborted_block: bool) -> None:
    queue = Server(101).queue
    watch = BlockWatch(queue)
    queue.status = before
    watch.ended(Outcome.SKIPPED, None)  # its first request's reply (or skip) arrives
    queue.status = after  # ... then its Sync's ReadyForQuery
    watch.ended(Outcome.COMPLETED, None)  # a later report does not move what it saw first
    assert (watch.failed_itself(outcome), watch.aborted_block(outcome)) == (failed_itself, aborted_block)


def test_a_query_behind_an_unsynced_failed_parse_is_skipped_as_in_postgres() -> None:
    """Parse (failing) and Flush, then a Query in a later read: in Postgres the error skips the Query up
    to the client's Sync. The proxy's own Sync after the Flush ends the server's window early, so the
    Query waits for that Sync's answer and is then skipped, never run."""
    pair, server = RelayPair(), Server(101)
    checked_out(pair, server, SELECT_1)
    pair.server(CONTEXT_PREPARED + CONTEXT_SET + ROWS + Z_IDLE)  # the connection holds the context statement now
    start = len(pair.hooks.upstream)
    writes = checked_out(pair, server, messages.parse("", "SELEC 1") + messages.message(b"H"))
    assert writes[-1].endswith(messages.sync())
    assert pair.client(SELECT_1) == []  # held: whether the Parse failed is not known yet
    error = messages.error_response("ERROR", "42601", 'syntax error at or near "SELEC"')
    assert pair.server(error + Z_IDLE) == error
    assert SELECT_1 not in b"".join(pair.upstream_since(start))
    assert pair.client(messages.sync()) == []
    assert pair.hooks.client[-1] == Z_IDLE


def test_a_client_over_the_high_water_mark_while_waiting_is_paused_until_attached() -> None:
    pair, server = RelayPair(), Server(101)
    big = messages.query("SELECT '" + "x" * 300_000 + "'")
    assert pair.client(big) == []
    assert pair.hooks.events[-2:] == ["need_server", "hold_client:True"]
    pair.attach(server)
    assert "hold_client:False" in pair.hooks.events
    assert big in b"".join(pair.hooks.upstream)


def test_a_malformed_client_message_held_behind_the_server_is_the_clients_fault() -> None:
    """A client message that waited (here behind the proxy's Sync after a Flush) is read when the
    server's reply arrives: if it is malformed, that is the client's protocol violation (08P01), not
    the server's; a reply nothing explains is the server's (the session ends with XX000)."""
    pair, server = RelayPair(), Server(101)
    flush = messages.message(b"H")
    malformed = messages.message(b"P", b"no terminator")
    checked_out(pair, server, messages.parse("", "SELECT 1") + flush)
    assert pair.client(malformed) == []  # held: the proxy's Sync is not answered yet
    with pytest.raises(ProtocolViolation):
        pair.server(PARSE_COMPLETE + Z_IDLE)
    other, server = RelayPair(), Server(102)
    checked_out(other, server, SELECT_1)
    with pytest.raises(UpstreamProtocolViolation):
        other.server(CONTEXT_PREPARED + CONTEXT_SET + ROWS + Z_IDLE + Z_IDLE)


def test_session_mode_context_after_reset_all_waits_out_a_copy_in() -> None:
    """`RESET ALL; COPY t FROM STDIN`: during COPY IN Postgres reads only CopyData, CopyDone, CopyFail,
    Flush and Sync (postgres.c, CopyGetData), so the context set again goes after the Query's
    ReadyForQuery, not right behind it; the client's CopyData and CopyDone pass, its next Query waits
    for the context."""
    pair, server = RelayPair(transaction_mode=False), Server(101)
    pair.attach(server)
    pair.server(SESSION_CONTEXT_SET)
    copy = messages.query("RESET ALL; COPY t FROM STDIN")
    assert pair.client(copy) == [copy]
    copy_in = messages.message(b"G", b"\0\0\0")
    assert pair.server(complete("RESET") + copy_in) == complete("RESET") + copy_in
    data, done = messages.message(b"d", b"1\n"), messages.message(b"c")
    assert pair.client(data + done + SELECT_1) == [data + done]  # the Query waits for the context
    start = len(pair.hooks.upstream)
    assert pair.server(complete("COPY 1") + Z_IDLE) == complete("COPY 1") + Z_IDLE
    assert pair.upstream_since(start) == [session_context(server), SELECT_1]  # the context first
    assert pair.server(SESSION_CONTEXT_SET + ROWS + Z_IDLE) == ROWS + Z_IDLE


def test_transaction_mode_follow_ups_wait_out_a_copy_in() -> None:
    """`SET ...; COPY t FROM STDIN` in transaction mode: the read-back of the SET goes after the Query's
    ReadyForQuery, and the connection is not released before it is answered."""
    pair, server = RelayPair(), Server(101)
    copy = messages.query("SET application_name = 'x'; COPY t FROM STDIN")
    writes = checked_out(pair, server, copy)
    assert b"".join(writes).endswith(copy)
    copy_in = messages.message(b"G", b"\0\0\0")
    pair.server(CONTEXT_PREPARED + CONTEXT_SET + complete("SET") + copy_in)
    start = len(pair.hooks.upstream)
    assert pair.client(messages.message(b"d", b"1\n") + messages.message(b"c")) != []
    pair.server(complete("COPY 1") + Z_IDLE)
    assert READ_STATEMENT in b"".join(pair.upstream_since(start))  # the read-back, now
    assert pair.hooks.events[-1] != "release_server"  # held until the read-back is answered


def test_follow_ups_never_go_inside_a_copy_data_the_client_is_still_sending() -> None:
    """`SET ...; COPY t FROM STDIN`, the COPY failing while a client read has ended inside a CopyData whose
    first part went upstream: the read-back due after the Query's ReadyForQuery goes right behind the rest
    of that CopyData (which the server ignores after the failure), not inside it, where the server read it
    as COPY data and the rest as a message (FATAL 08P01 "invalid frontend message type"; found by the
    random search sending writes in pieces)."""
    pair, server = RelayPair(), Server(101)
    checked_out(pair, server, messages.query("SET application_name = 'x'; COPY t FROM STDIN"))
    copy_in = messages.message(b"G", b"\0\0\0")
    pair.server(CONTEXT_PREPARED + CONTEXT_SET + complete("SET") + copy_in)
    first, second = messages.message(b"d", b"x\tnot a number\n"), messages.message(b"d", b"7\tseven\n")
    start = len(pair.hooks.upstream)
    assert pair.client(first + second[:8]) == [first + second[:8]]
    failure = messages.error_response("ERROR", "22P02", 'invalid input syntax for type integer: "x"')
    assert pair.server(failure + Z_IDLE) == failure + Z_IDLE
    assert pair.upstream_since(start) == [first + second[:8]]  # the read-back waits for the rest
    sent = pair.client(second[8:] + messages.message(b"c"))
    assert len(sent) == 1 and sent[0].startswith(second[8:]) and READ_STATEMENT in sent[0]
    assert sent[0].endswith(messages.message(b"c"))  # the client's CopyDone behind the proxy's messages


def test_follow_ups_wait_out_a_copy_in_started_by_execute() -> None:
    """Extended protocol: SET by Execute, then Execute of COPY FROM STDIN, and Sync, in one write. The
    read-back of the SET would land inside COPY IN behind the Sync (which the server ignores there): it
    waits for the ReadyForQuery of the client's Sync after its CopyDone."""
    pair, server = RelayPair(), Server(101)
    group = (messages.parse("", "SET application_name = 'x'") + messages.bind("", "", []) + messages.execute("")
             + messages.parse("", "COPY t FROM STDIN") + messages.bind("", "", []) + messages.execute("") + messages.sync())
    writes = checked_out(pair, server, group)
    assert b"".join(writes).endswith(messages.execute("") + messages.sync())
    copy_in = messages.message(b"G", b"\0\0\0")
    pair.server(PARSE_COMPLETE + BIND_COMPLETE + complete("SET")
                + PARSE_COMPLETE + BIND_COMPLETE + CONTEXT_PREPARED + CONTEXT_SET + copy_in)
    start = len(pair.hooks.upstream)
    rows = messages.message(b"d", b"1\n") + messages.message(b"c") + messages.sync()
    assert pair.client(rows) == [rows]  # what Postgres reads during COPY IN passes
    assert READ_STATEMENT not in b"".join(pair.upstream_since(start))
    pair.server(complete("COPY 1") + Z_IDLE)
    assert READ_STATEMENT in b"".join(pair.upstream_since(start))  # now, after the ReadyForQuery


def test_a_parse_of_a_name_whose_parse_an_earlier_group_skipped_waits_and_prepares_it_anew() -> None:
    """In Postgres a Parse skipped in an error window creates nothing: the same Parse after the Sync
    creates the statement (ParseComplete, not 42P05, even where the server connection holds the text
    under the proxy's name). The second Parse waits for the first group's answer."""
    pair, server = RelayPair(), Server(101)
    sql = "SELECT n FROM t"
    checked_out(pair, server, SELECT_1)
    pair.server(CONTEXT_PREPARED + CONTEXT_SET + ROWS + Z_IDLE)  # the connection holds the context statement now
    start = len(pair.hooks.upstream)
    second = messages.parse("s1", sql) + messages.sync()
    writes = checked_out(pair, server, messages.execute("p1") + messages.parse("s1", sql) + messages.sync() + second)
    assert writes == [context(server) + messages.execute("p1") + renamed_parse(sql) + messages.sync()]
    error = messages.error_response("ERROR", "34000", 'portal "p1" does not exist')
    assert pair.server(CONTEXT_SET + error + Z_IDLE) == error + Z_IDLE
    assert pair.upstream_since(start)[1:] == [renamed_parse(sql) + messages.sync()]  # closed first, parsed anew
    assert pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + Z_IDLE) == PARSE_COMPLETE + Z_IDLE


def test_statements_closed_and_parsed_again_in_a_skipped_window_are_as_before() -> None:
    """Close, Parse, Close, Parse of s1 and two Parses of the unnamed statement, all skipped after an
    error: s1 is the statement it was, and there is no unnamed statement, as in Postgres."""
    pair, server = RelayPair(), Server(101)
    first, second, third = "SELECT $1::int + 1", "SELECT $1::text", "SELECT generate_series(1, $1::int)"
    checked_out(pair, server, messages.parse("s1", first) + messages.sync())
    pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + Z_IDLE)
    close_s1 = messages.close_statement(b"s1")
    checked_out(pair, server, messages.execute("p1") + close_s1 + messages.parse("s1", second) + close_s1
                + messages.parse("s1", third) + messages.parse("", second) + messages.parse("", third) + messages.sync())
    error = messages.error_response("ERROR", "34000", 'portal "p1" does not exist')
    assert pair.server(CONTEXT_PREPARED + CONTEXT_SET + error + Z_IDLE) == error + Z_IDLE
    statements = pair.relay.mode.statements  # type: ignore[union-attr]
    assert statements.by_name == {b"s1": statement_for(messages.parse("", first)[6:], "", ALLOW)}
    assert statements.unnamed is None and not statements.unsettled


def test_a_parse_of_a_text_the_connection_holds_is_checked_under_a_name_of_the_proxys() -> None:
    """s2 has the text of s1, which the server connection holds: the Parse is answered by a Parse under
    the proxy's check name (closed again), then the held statement is parsed again behind it, so that a
    failure (25P02 in a failed block) skips that and leaves s1's as it was."""
    pair, server = RelayPair(), Server(101)
    sql = "INSERT INTO t VALUES ($1::int)"
    checked_out(pair, server, messages.parse("s1", sql) + messages.sync())
    pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + Z_IDLE)
    writes = checked_out(pair, server, messages.parse("s2", sql) + messages.sync())
    assert writes == [messages.parse(PARSE_CHECK.decode(), sql) + messages.close_statement(PARSE_CHECK)
                      + messages.close_statement(server_name(sql)) + messages.parse(server_name(sql).decode(), sql) + messages.sync()]
    aborted = messages.error_response("ERROR", errors.IN_FAILED_TRANSACTION, "current transaction is aborted")
    assert pair.server(aborted + Z_FAILED) == aborted + Z_FAILED
    assert server.state.statements.holds(server_name(sql))
    assert pair.relay.mode.statements.by_name.keys() == {b"s1"}  # type: ignore[union-attr]


def paris_client() -> tuple[RelayPair, Server, bytes]:
    """A transaction-mode client that started with TimeZone=Europe/Paris, on a server connection whose own
    value the proxy has just set to it; with the ParameterStatus that tells it."""
    pair, server = RelayPair(startup={"TimeZone": "Europe/Paris"}), Server(101)
    pair.relay.greeted({"TimeZone": "Europe/Paris"})
    checked_out(pair, server, SELECT_1)
    paris = messages.parameter_status("TimeZone", "Europe/Paris")
    applied = (CLOSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE + paris + data_row(b"Europe/Paris") + complete("SELECT 1")
               + CLOSE_COMPLETE + Z_IDLE)
    assert pair.server(applied) == b""
    return pair, server, paris


def test_a_reset_of_a_startup_setting_is_not_told_to_the_client() -> None:
    """`RESET TimeZone` of a client that started with TimeZone=Europe/Paris: the server connection's
    RESET reports its own value, which the proxy replaces by the startup value right behind the Query.
    A direct session reports nothing (the value does not move), so the client is not told the server's
    value in between: a client told another client_encoding would encode its next statement in it."""
    pair, server, paris = paris_client()
    assert pair.server(CONTEXT_PREPARED + CONTEXT_SET + ROWS + Z_IDLE) == ROWS + Z_IDLE  # told at the greeting
    checked_out(pair, server, messages.query("RESET TimeZone"))
    utc = messages.parameter_status("TimeZone", "Etc/UTC")
    assert pair.server(CONTEXT_SET + complete("RESET") + utc + Z_IDLE) == complete("RESET") + Z_IDLE
    assert pair.relay.client_view["TimeZone"] == "Europe/Paris"
    assert server.state.parameters["TimeZone"] == "Etc/UTC"
    reapplied = BIND_COMPLETE + paris + data_row(b"Europe/Paris") + complete("SELECT 1") + CLOSE_COMPLETE + Z_IDLE
    assert pair.server(reapplied) == b""  # the startup value again: the client's view, nothing to tell
    assert pair.relay.client_view["TimeZone"] == "Europe/Paris"
    assert server.state.parameters["TimeZone"] == "Europe/Paris"


def test_a_reset_of_a_startup_setting_the_client_changed_tells_it_the_startup_value() -> None:
    """The same after the client's `SET TimeZone = 'UTC'`: a direct session's RESET reports the startup value
    before its ReadyForQuery, and so does the proxy, in place of the server connection's own value (it
    told it only before the client's next ReadyForQuery, after the reset's: found by the random search)."""
    pair, server, paris = paris_client()
    assert pair.server(CONTEXT_PREPARED + CONTEXT_SET + ROWS + Z_IDLE) == ROWS + Z_IDLE
    pair.relay.parameter_status("TimeZone", "UTC", True)  # the client's SET, reported to it
    checked_out(pair, server, messages.query("RESET TimeZone"))
    utc = messages.parameter_status("TimeZone", "Etc/UTC")
    assert pair.server(CONTEXT_SET + complete("RESET") + utc + Z_IDLE) == complete("RESET") + paris + Z_IDLE
    assert pair.relay.client_view["TimeZone"] == "Europe/Paris"
    reapplied = BIND_COMPLETE + paris + data_row(b"Europe/Paris") + complete("SELECT 1") + CLOSE_COMPLETE + Z_IDLE
    assert pair.server(reapplied) == b""  # told already


@pytest.mark.parametrize("group, reset_answer", [
    (messages.parse("", "RESET ALL") + messages.bind("", "", []) + messages.execute()
     + messages.parse("", "SET application_name = 'y'") + messages.bind("", "", []) + messages.execute() + messages.sync(), b""),
    (messages.message(b"C", b"Pp1\0") + messages.query("RESET ALL") + messages.query("SET application_name = 'y'")
     + messages.sync(), CLOSE_COMPLETE + CONTEXT_SET + complete("RESET") + Z_IDLE),  # the SET waits for the status
], ids=["executes", "queries inside a group"])
def test_a_set_behind_a_reset_in_the_same_group_is_not_undone_by_the_startup_values(group: bytes, reset_answer: bytes) -> None:
    """RESET ALL, then a SET of a startup setting in the same group: the startup values go behind the group
    only where a setting is still at the server's reset value (REAPPLY), as for a SET later in the reset's
    own Query; applied as they were (APPLY), they undid the client's SET (found by the random search)."""
    pair, server = RelayPair(startup={"application_name": "app"}), Server(101)
    pair.relay.greeted({"application_name": "app"})
    checked_out(pair, server, SELECT_1)
    applied = (CLOSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE + data_row(b"app") + complete("SELECT 1") + CLOSE_COMPLETE
               + Z_IDLE)
    assert pair.server(applied) == b""
    assert pair.server(CONTEXT_PREPARED + CONTEXT_SET + ROWS + Z_IDLE) == ROWS + Z_IDLE
    sent = b"".join(checked_out(pair, server, group))
    start = len(pair.hooks.upstream)
    pair.server(reset_answer)
    sent += b"".join(pair.upstream_since(start))
    assert apply_bind({"application_name": "app"}, REAPPLY_STATEMENT) in sent
    assert apply_bind({"application_name": "app"}) not in sent


# -- a statement's result shape (transaction mode) ---------------------------------------------------

NO_PARAMETERS = messages.message(b"t", b"\0\0")
FLUSH = messages.message(b"H")
REFUSAL_PARSE = messages.parse("pg_tenant_proxy_refused", "pg_tenant_proxy_refused")
SYNTAX_ERROR = messages.error_response("ERROR", errors.SYNTAX_ERROR, 'syntax error at or near "pg_tenant_proxy_refused"')


def columns(*fields: tuple[str, int], table: int = 16384) -> bytes:
    """A RowDescription: each column's name and type oid, read from `table`."""
    body = struct.pack("!h", len(fields))
    for number, (name, oid) in enumerate(fields, 1):
        body += messages.cstring(name) + struct.pack("!IhIhih", table, number, oid, 4 if oid == 23 else 8, -1, 0)
    return messages.message(b"T", body)


INT4, INT8 = columns(("a", 23)), columns(("a", 20))


def described_on(pair: RelayPair, server: Server, sql: str, shape: bytes, held: bool = False) -> None:
    """The client prepares `sql` as s1 the way asyncpg does (Parse, Describe, Flush) and is told `shape`;
    the proxy's Sync after the Flush ends the group and the connection goes back to the pool. `held`: the
    server connection holds the text already (the proxy's check Parse, then the statement parsed again)."""
    checked_out(pair, server, messages.parse("s1", sql) + messages.message(b"D", b"Ss1\0") + FLUSH)
    parsed = PARSE_COMPLETE + CLOSE_COMPLETE + CLOSE_COMPLETE + PARSE_COMPLETE if held else CLOSE_COMPLETE + PARSE_COMPLETE
    assert pair.server(parsed + NO_PARAMETERS + shape + Z_IDLE) == PARSE_COMPLETE + NO_PARAMETERS + shape
    assert pair.hooks.events[-1] == "release_server"


BIND_S1 = messages.bind("", "s1", []) + messages.execute() + messages.sync()


def test_a_described_statement_prepared_again_is_described_before_the_clients_bind_goes() -> None:
    """On a server connection that never held it, the proxy prepares the client's statement, describes
    it with a Flush, and holds the Bind until the answer: the same shape, and the Bind goes on (the
    client never sees the proxy's Describe)."""
    pair, first, second = RelayPair(), Server(101), Server(202)
    sql = "SELECT a FROM t"
    name = server_name(sql)
    described_on(pair, first, sql, INT4)
    writes = checked_out(pair, second, BIND_S1)
    assert writes == [renamed_parse(sql) + messages.message(b"D", b"S" + name + b"\0") + FLUSH]
    start = len(pair.hooks.upstream)
    assert pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + NO_PARAMETERS + columns(("a", 23), table=16999)) == b""
    assert pair.upstream_since(start) == [
        messages.bind("", name.decode(), []) + context_statement() + context(second) + messages.execute() + messages.sync()
    ]
    replies = BIND_COMPLETE + CONTEXT_PREPARED + CONTEXT_SET + data_row(b"7") + complete("SELECT 1") + Z_IDLE
    assert pair.server(replies) == BIND_COMPLETE + data_row(b"7") + complete("SELECT 1") + Z_IDLE
    # the shape is known there now: the next Bind goes at once (the hot path: the context in front of the group)
    assert checked_out(pair, second, BIND_S1) == [
        context(second) + messages.bind("", name.decode(), []) + messages.execute() + messages.sync()
    ]


def test_a_statement_whose_shape_changed_where_it_was_prepared_again_is_refused_with_0a000() -> None:
    """int became bigint: Postgres refuses the Bind of the client's statement with 0A000, and so does the
    proxy, whose failing Parse makes the server skip the Execute (it never runs) up to the client's Sync.
    Every later Bind is refused the same way, without asking the server again."""
    pair, first, second = RelayPair(), Server(101), Server(202)
    sql = "SELECT a FROM t"
    described_on(pair, first, sql, INT4)
    checked_out(pair, second, BIND_S1)
    start = len(pair.hooks.upstream)
    assert pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + NO_PARAMETERS + INT8) == b""
    (write,) = pair.upstream_since(start)
    assert write.startswith(REFUSAL_PARSE) and write.endswith(messages.execute() + messages.sync())
    assert pair.server(SYNTAX_ERROR + Z_IDLE) == RESULT_CHANGED + Z_IDLE
    assert b"RRevalidateCachedQuery\0" in RESULT_CHANGED  # how asyncpg knows it must prepare again
    (write,) = checked_out(pair, second, BIND_S1)
    assert write.startswith(REFUSAL_PARSE)
    assert pair.server(SYNTAX_ERROR + Z_IDLE) == RESULT_CHANGED + Z_IDLE
    # a Parse of a new name (asyncpg after 0A000) parses the held text anew, and its own Describe tells its shape
    parse = messages.parse("s2", sql) + messages.message(b"D", b"Ss2\0") + FLUSH
    assert checked_out(pair, second, parse)[0].startswith(messages.parse(PARSE_CHECK.decode(), sql))
    pair.server(PARSE_COMPLETE + CLOSE_COMPLETE + CLOSE_COMPLETE + PARSE_COMPLETE + NO_PARAMETERS + INT8 + Z_IDLE)
    bind = messages.bind("", "s2", []) + messages.execute() + messages.sync()
    assert checked_out(pair, second, bind)[0].startswith(messages.bind("", server_name(sql).decode(), []))


def test_another_clients_parse_of_the_same_text_makes_the_shape_unknown_until_described() -> None:
    """One server connection: another client parses the same text after the change (the proxy parses the
    shared statement again behind its check) and describes it; the first client's Bind is then refused at once,
    with no Describe of the proxy's."""
    first, other, server = RelayPair(), RelayPair(), Server(101)
    sql = "SELECT * FROM t"
    described_on(first, server, sql, columns(("a", 23), ("b", 25)))
    described_on(other, server, sql, columns(("a", 23), ("n", 25)), held=True)
    (write,) = checked_out(first, server, BIND_S1)
    assert write.startswith(REFUSAL_PARSE)
    assert first.server(SYNTAX_ERROR + Z_IDLE) == RESULT_CHANGED + Z_IDLE


def test_the_proxys_describe_failing_gives_the_client_the_servers_error() -> None:
    """A server-side statement prepared before the change answers the proxy's Describe with Postgres's own
    0A000: the client gets it as its Bind's error, and its Bind and Execute are skipped."""
    pair, first, second = RelayPair(), Server(101), Server(202)
    sql = "SELECT a FROM t"
    described_on(pair, first, sql, INT4)
    second.state.statements.parse_sent(server_name(sql)).ended(Outcome.COMPLETED, None)  # held, shape unknown
    assert checked_out(pair, second, BIND_S1) == [messages.message(b"D", b"S" + server_name(sql) + b"\0") + FLUSH]
    stale = messages.error_response("ERROR", errors.FEATURE_NOT_SUPPORTED, "cached plan must not change result type")
    start = len(pair.hooks.upstream)
    assert pair.server(NO_PARAMETERS + stale) == stale
    assert pair.upstream_since(start) == [messages.bind("", server_name(sql).decode(), []) + messages.execute() + messages.sync()]
    assert pair.server(Z_IDLE) == Z_IDLE


def test_a_statement_never_described_is_not_checked() -> None:
    """A client that never described its statement cannot have kept a description: its Bind goes as before."""
    pair, first, second = RelayPair(), Server(101), Server(202)
    sql = "SELECT a FROM t"
    checked_out(pair, first, messages.parse("s1", sql) + messages.sync())
    pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + Z_IDLE)
    (write,) = checked_out(pair, second, BIND_S1)
    assert write.startswith(renamed_parse(sql) + messages.bind("", server_name(sql).decode(), []))


def test_the_unnamed_statement_described_then_bound_on_another_connection_is_checked() -> None:
    """pg8000: Parse and Describe of the unnamed statement in one group, Bind in a later one, here on
    another server connection, where the proxy parses it again and describes it before the Bind."""
    pair, first, second = RelayPair(), Server(101), Server(202)
    sql = "SELECT a FROM t"
    checked_out(pair, first, messages.parse("", sql) + messages.message(b"D", b"S\0") + messages.sync())
    pair.server(PARSE_COMPLETE + NO_PARAMETERS + INT4 + Z_IDLE)
    bind = messages.bind("", "", []) + messages.execute() + messages.sync()
    assert checked_out(pair, second, bind) == [messages.parse("", sql) + messages.message(b"D", b"S\0") + FLUSH]
    start = len(pair.hooks.upstream)
    assert pair.server(PARSE_COMPLETE + NO_PARAMETERS + INT8) == b""
    assert pair.upstream_since(start)[0].startswith(REFUSAL_PARSE)


def test_result_shape_is_what_postgres_compares() -> None:
    """Names, types, sizes and modifiers; not the table a column comes from (created again, a table keeps
    its statements running in Postgres)."""
    assert result_shape(columns(("a", 23), table=1)) == result_shape(columns(("a", 23), table=2))
    assert result_shape(INT4) != result_shape(INT8)
    assert result_shape(columns(("a", 23))) != result_shape(columns(("b", 23)))
    assert result_shape(columns(("a", 23))) != result_shape(columns(("a", 23), ("b", 23)))
    assert result_shape(messages.message(b"n")) == NO_DATA != result_shape(columns())


def test_a_describe_of_a_statement_whose_shape_changed_is_refused_too() -> None:
    """Postgres checks the plan at Describe as at Bind: the client is not told the new shape."""
    pair, first, second = RelayPair(), Server(101), Server(202)
    sql = "SELECT a FROM t"
    described_on(pair, first, sql, INT4)
    describe = messages.message(b"D", b"Ss1\0") + messages.sync()
    assert checked_out(pair, second, describe) == [renamed_parse(sql) + messages.message(b"D", b"S" + server_name(sql) + b"\0")
                                                   + FLUSH]
    start = len(pair.hooks.upstream)
    assert pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + NO_PARAMETERS + INT8) == b""
    assert pair.upstream_since(start) == [REFUSAL_PARSE + messages.sync()]
    assert pair.server(SYNTAX_ERROR + Z_IDLE) == RESULT_CHANGED + Z_IDLE


def test_a_bind_waits_for_the_clients_own_describe_in_flight_of_the_same_server_statement() -> None:
    """The client parses and describes s2, of the same text as its described s1, and binds s1 in the same
    write: the Bind waits for the answer to the client's Describe (a Flush makes the server send it)."""
    pair, first, second = RelayPair(), Server(101), Server(202)
    sql = "SELECT a FROM t"
    name = server_name(sql)
    described_on(pair, first, sql, INT4)
    reads = messages.parse("s2", sql) + messages.message(b"D", b"Ss2\0") + BIND_S1
    assert checked_out(pair, second, reads) == [renamed_parse(sql) + messages.message(b"D", b"S" + name + b"\0") + FLUSH]
    start = len(pair.hooks.upstream)
    assert pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + NO_PARAMETERS + INT4) == PARSE_COMPLETE + NO_PARAMETERS + INT4
    assert pair.upstream_since(start)[0].startswith(messages.bind("", name.decode(), []))


def test_a_fatal_behind_the_ready_for_query_ends_the_session_and_keeps_the_connection() -> None:
    """The server's FATAL in the same read as the ReadyForQuery 'I' that would release the connection (the
    proxy had stopped reading while the client did not): the client gets both, the session ends
    (`server_ended`), and the connection is not released to the pool for another client."""
    pair, server = RelayPair(), Server(101)
    checked_out(pair, server, SELECT_1)
    fatal = messages.error_response("FATAL", "57P01", "terminating connection due to administrator command")
    replies = CONTEXT_PREPARED + CONTEXT_SET + ROWS + Z_IDLE + fatal
    assert pair.server(replies) == ROWS + Z_IDLE + fatal
    assert pair.hooks.events[-1] == "server_ended" and "release_server" not in pair.hooks.events
    assert pair.client(SELECT_1) == []  # nothing after the server's last word


def test_client_idle_timeout_waits_for_the_sync_the_proxy_stood_in_for() -> None:
    """Parse / Describe / Flush: the proxy's own Sync closes the group upstream and the connection goes
    back, but the client owes its Sync: not idle between transactions until it comes."""
    pair, server = RelayPair(), Server(101)
    described_on(pair, server, "SELECT a FROM t", INT4)
    assert pair.relay.server is None and not pair.relay.idle_between_transactions()
    checked_out(pair, server, BIND_S1)
    pair.server(BIND_COMPLETE + CONTEXT_PREPARED + CONTEXT_SET + data_row(b"7") + complete("SELECT 1") + Z_IDLE)
    assert pair.relay.server is None and pair.relay.idle_between_transactions()


LASTVAL = messages.query("SELECT lastval()")


def test_lastval_at_a_transactions_start_is_refused_and_inside_one_forwarded() -> None:
    """lastval() as a transaction's first statement would read what another client left on the server
    connection: refused (0A000), no context sent. In the block that called nextval() it goes as it came."""
    pair, server = RelayPair(), Server(101)
    (write,) = checked_out(pair, server, LASTVAL)
    assert b"lastval" not in write and CONTEXT.statement_name not in write
    out = pair.server(messages.error_response("ERROR", errors.SYNTAX_ERROR, "syntax error") + Z_IDLE)
    assert messages.parse_error_fields(out[5:-len(Z_IDLE)])["C"] == errors.FEATURE_NOT_SUPPORTED
    assert pair.hooks.events[-1] == "release_server"
    begin = messages.query("BEGIN")
    assert checked_out(pair, server, begin) == [begin]
    pair.server(complete("BEGIN") + Z_BLOCK)
    (write,) = pair.client(LASTVAL)  # the block's first statement: refused all the same
    assert b"lastval" not in write and CONTEXT.statement_name not in write
    pair.server(messages.error_response("ERROR", errors.SYNTAX_ERROR, "syntax error") + Z_FAILED)
    rollback = messages.query("ROLLBACK")
    pair.client(rollback)
    pair.server(complete("ROLLBACK") + Z_IDLE)
    nextval = messages.query("BEGIN; SELECT nextval('s')")
    assert checked_out(pair, server, nextval) == [context_statement() + context(server) + nextval]
    pair.server(CONTEXT_PREPARED + CONTEXT_SET + complete("BEGIN") + ROWS + Z_BLOCK)
    assert pair.client(LASTVAL) == [LASTVAL]


def test_lastval_executed_at_a_transactions_start_is_refused_at_its_execute() -> None:
    """Through Parse, Bind and Execute the refusal comes for the Execute, the Parse and Bind having gone."""
    pair, server = RelayPair(), Server(101)
    parse, bind = messages.parse("", "SELECT lastval()"), messages.bind("", "", [])
    writes = checked_out(pair, server, parse + bind + messages.execute() + messages.sync())
    assert b"".join(writes).startswith(parse + bind) and CONTEXT.statement_name not in b"".join(writes)
    assert [r.sqlstate for r in pair.hooks.refusals] == [errors.FEATURE_NOT_SUPPORTED]


def test_a_parse_of_a_text_in_flight_for_another_name_is_checked_before_the_server_statement_is_touched() -> None:
    """The client parses the same text under two names in one read: the first Parse is not answered yet
    when the second goes, so the server statement is in flight, not held. The second is checked under
    the proxy's own name first; closed and parsed again at once, its failure (25P02 in a block the client
    failed) would take the statement from the first name."""
    pair, server = RelayPair(), Server(101)
    read = messages.parse("s1", "BEGIN") + messages.sync() + messages.parse("s2", "BEGIN") + messages.sync()
    (write,) = checked_out(pair, server, read)
    second = write[write.index(messages.sync()) + len(messages.sync()):]
    assert second.startswith(messages.message(b"P", PARSE_CHECK + b"\0BEGIN\0\0\0"))


def test_a_message_that_waits_for_nothing_owed_ends_the_session_instead_of_spinning() -> None:
    """A client message that waits while the server owes nothing would wait for ever: the relay's loop
    raises (the session ends with XX000) rather than spin the event loop for every client (found as a
    proxy at full CPU after a random comparison). Reached here by forcing the wait."""
    pair, server = RelayPair(transaction_mode=False), Server(101)
    pair.attach(server)
    pair.server(SESSION_CONTEXT_SET)
    pair.relay.follow_ups_wait = True  # waiting for a ReadyForQuery, with nothing owed that could bring one
    with pytest.raises(RelayStalled, match="waits with nothing owed"):
        pair.client(SELECT_1 + SELECT_1)  # two messages: the general path, not the one-Query read
