"""Attacks on the relay's hot paths with the paired harness (relay_harness.RelayPair) and the reply queue
alone: the whole-read settlement of plain-Query replies must settle every cut of a reply stream as the
scanner's walk does; the proxy's own follow-up messages must not ride behind a COPY FROM STDIN; a
read-back answered after its client left must be settled without it."""

from __future__ import annotations

import struct

import pytest

from relay_harness import (
    BIND_COMPLETE,
    CONTEXT,
    CLOSE_COMPLETE,
    PARSE_COMPLETE,
    Z_BLOCK,
    Z_IDLE,
    RelayPair,
    Server,
    checked_out,
    complete,
    data_row,
    row_description,
)

from proxy.guard import ALLOW, Decision
from proxy.protocol import errors, messages
from proxy.protocol.errors import ProtocolViolation
from proxy.protocol.framing import MessageScanner
from proxy.relay.relay import RESET_BIND, TransactionMode, may_end_transaction
from proxy.relay.replies import Outcome, Owed, Owner, ReplyQueue, Request
from proxy.relay.statements import statement_for

SELECT_1 = messages.query("SELECT 1")
ROWS = row_description() + data_row(b"1") + complete("SELECT 1")
CONTEXT_PREPARED = CLOSE_COMPLETE + PARSE_COMPLETE
CONTEXT_SET = BIND_COMPLETE + data_row(b"acme", b"p", b"{}", b"q") + complete("SELECT 1") + CLOSE_COMPLETE
NOTICE = messages.notice_response("01000", "careful")
NOTIFICATION = messages.message(b"A", struct.pack("!i", 42) + b"chan\0payload\0")
PARAMETER = messages.parameter_status("application_name", "renamed")
ERROR = messages.error_response("ERROR", errors.SYNTAX_ERROR, "boom")
COPY_OUT = messages.message(b"H", b"\0\0\0") + messages.message(b"d", b"1\n") + messages.message(b"c") + complete("COPY 1")
EMPTY = messages.message(b"I")
BIG = data_row(b"x" * 70_000)


class Listener:
    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def group_ended(self, status: bytes, own: bool) -> None:
        self.events.append(("group", status, own))

    def parameter_status(self, name: str, value: str, forwarded: bool) -> bool:
        self.events.append(("parameter", name, value, forwarded))
        return forwarded

    def pending_parameters(self) -> bytes:
        return b""


class Failed:
    """The context's watcher: it acts only on failure (the whole-read path settles a completed context
    without telling it), so only failures are compared."""

    def __init__(self) -> None:
        self.outcomes: list[object] = []

    def ended(self, outcome: Outcome, error: object) -> None:
        if outcome is not Outcome.COMPLETED:
            self.outcomes.append(outcome)

    def row(self, values: object) -> None:
        """No rows wanted."""


PARAMETERS = messages.message(b"t", struct.pack("!hI", 1, 25))
GROUP_ROWS = BIND_COMPLETE + ROWS
SUSPENDED = messages.message(b"s")

# Reply streams for entries the hot paths owe: `context` queries in transaction mode (the context's
# four replies open the stream), else `queries` plain Queries pipelined (session mode), or one whole
# extended-query group sent as it came (`groups`, session mode: a driver's prepared statement).
STREAMS = {
    "context-rows": (True, 1, CONTEXT_SET + ROWS + Z_IDLE),
    "context-notice-notification": (True, 1, CONTEXT_SET + NOTICE + ROWS + NOTIFICATION + Z_IDLE),
    "context-parameter-status": (True, 1, CONTEXT_SET + complete("SET") + PARAMETER + Z_IDLE),
    "context-error": (True, 1, CONTEXT_SET + ERROR + Z_IDLE),
    "context-begin": (True, 1, CONTEXT_SET + complete("BEGIN") + Z_BLOCK),
    "context-copy-out": (True, 1, CONTEXT_SET + COPY_OUT + Z_IDLE),
    "context-large-row": (True, 1, CONTEXT_SET + row_description() + BIG + BIG + complete("SELECT 2") + Z_IDLE),
    "pipelined-three": (False, 3, ROWS + Z_IDLE + NOTICE + ERROR + Z_IDLE + EMPTY + PARAMETER + Z_IDLE),
    "pipelined-copy-out": (False, 2, COPY_OUT + Z_IDLE + NOTIFICATION + ROWS + Z_IDLE),
    "group-prepared": (False, "group", GROUP_ROWS + Z_IDLE),
    "group-parse-describe": (False, "group", PARSE_COMPLETE + PARAMETERS + row_description() + GROUP_ROWS + Z_IDLE),
    "group-error-skips-to-sync": (False, "group", PARSE_COMPLETE + NOTICE + ERROR + Z_IDLE),
    "group-suspended": (False, "group", BIND_COMPLETE + data_row(b"1") + SUSPENDED + Z_BLOCK),
    "group-empty-no-data": (False, "group", PARSE_COMPLETE + BIND_COMPLETE + messages.message(b"n") + EMPTY + Z_IDLE),
    "group-copy-out-parameter-status": (False, "group", BIND_COMPLETE + COPY_OUT + PARAMETER + Z_IDLE),
}


def settle(context: bool, queries: int | str, reads: list[bytes]) -> tuple[bytes, list[tuple[object, ...]], list[object], tuple[object, ...]]:
    """Feed `reads` to a queue owing the hot path's entries: what the client got, what the listener and
    the context's watcher heard, and the queue's state after."""
    listener, watcher = Listener(), Failed()
    queue = ReplyQueue(MessageScanner(b"ZE"), listener)
    if queries == "group":
        queue.expect_sync_group()
    else:
        if context:
            queue.expect_context_query(Owed(Request.CONTEXT, Owner.OWN, b"context: ", watcher, False))
        for _ in range(int(queries) - context):
            queue.expect_query()
    out = b"".join(bytes(queue.feed(read)) for read in reads)
    return out, listener.events, watcher.outcomes, (queue.idle(), queue.status, queue.client_group_ends, queue._special)


@pytest.mark.parametrize("name", list(STREAMS))
def test_every_cut_of_a_hot_path_stream_settles_as_byte_by_byte(name: str) -> None:
    """Reads split at every byte boundary (and one byte at a time, which the whole-read path never
    takes) must give the client the same bytes, tell the listener the same, and leave the same state as
    the stream in one read."""
    context, queries, stream = STREAMS[name]
    byte_by_byte = settle(context, queries, [stream[i:i + 1] for i in range(len(stream))])
    whole = settle(context, queries, [stream])
    assert whole == byte_by_byte
    assert whole[0] == stream[len(CONTEXT_SET):] if context else stream
    assert whole[3][:3] == (True, stream[-1:], 0)
    step = max(1, len(stream) // 400)  # the large row: every 1/400th of the stream, and around each message
    cuts = set(range(1, len(stream), step)) | {i + d for i in _boundaries(stream) for d in (-1, 0, 1) if 0 < i + d < len(stream)}
    for cut in sorted(cuts):
        assert settle(context, queries, [stream[:cut], stream[cut:]]) == byte_by_byte, f"cut at {cut}"


def _boundaries(stream: bytes) -> list[int]:
    positions, pos = [], 0
    while pos < len(stream):
        positions.append(pos)
        pos += 1 + struct.unpack_from("!i", stream, pos + 1)[0]
    return positions


@pytest.mark.parametrize("sql", ["SET application_name = 'x'; COPY t FROM STDIN", "RESET ALL; COPY t FROM STDIN"])
def test_nothing_of_the_proxys_follows_a_query_that_may_start_copy_in(sql: str) -> None:
    """Postgres reads only CopyData, CopyDone, CopyFail, Flush and Sync during COPY IN (postgres.c,
    CopyGetData): a message of the proxy's own behind such a Query ends the connection (08P01)."""
    pair, server = RelayPair(startup={"application_name": "app"}), Server(101)
    query = messages.query(sql)
    pair.client(query)
    writes = pair.attach(server)
    assert b"".join(writes).endswith(query)


def test_a_read_back_answered_after_its_client_left_is_settled() -> None:
    """A client sets a setting and leaves before the proxy's read-back of it is answered (psql -c does:
    it sends Terminate at the SET's ReadyForQuery). The pool drains the read-back (pool._Drain feeds the
    queue): it must settle without the client, and the next client of the tenant must not inherit the
    setting."""
    pair, server = RelayPair(), Server(101)
    pair.client(messages.query("SET application_name = 'leak'"))
    pair.attach(server)
    pair.server(complete("SET") + Z_IDLE)  # a SET takes no snapshot: no context in front of it
    pair.relay.detach()  # the client left: ClientConnection._give_back_server, then TransactionPool.release
    read_back = (CLOSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE + data_row(b"application_name", b"leak")
                 + complete("SELECT 1") + CLOSE_COMPLETE + Z_IDLE)
    server.queue.feed(read_back)  # what _Drain.server_data does
    assert server.queue.idle()
    following = RelayPair()  # another client of the same tenant
    following.client(SELECT_1)
    writes = b"".join(following.attach(server))
    assert b"application_name" in writes or RESET_BIND in writes  # reset by name, or the whole session reset


def test_a_group_sent_as_one_that_starts_copy_in_is_a_desync() -> None:
    """A group the relay sends as it came cannot start COPY IN (its texts are checked): a CopyInResponse
    for it means the proxy lost track, and the session ends rather than guess."""
    for reads in ([BIND_COMPLETE + messages.message(b"G", b"\0\0\0")], [BIND_COMPLETE, messages.message(b"G", b"\0\0\0")]):
        queue = ReplyQueue(MessageScanner(b"ZE"), Listener())
        queue.expect_sync_group()
        with pytest.raises(ProtocolViolation):
            for read in reads:
                queue.feed(read)


def session_relay() -> tuple[RelayPair, Server]:
    """A session-mode relay whose context is set."""
    pair, server = RelayPair(transaction_mode=False), Server(101)
    pair.attach(server)
    pair.server(PARSE_COMPLETE + BIND_COMPLETE + data_row(b"acme", b"p", b"{}", b"q") + complete("SELECT 1")
                + CLOSE_COMPLETE + CLOSE_COMPLETE + Z_IDLE)
    assert server.queue.idle()
    return pair, server


BIND_DESCRIBE_EXECUTE = messages.bind("", "s", ["1"]) + messages.message(b"D", b"P\0") + messages.execute("")
EXECUTED = data_row(b"1") + complete("SELECT 1")
# Groups a driver sends in one write, each with the server's replies to it, and whether the relay may send
# it as it came.
GROUPS = {
    "prepared statement": (BIND_DESCRIBE_EXECUTE, BIND_COMPLETE + ROWS, True),
    "parse, bind, execute": (messages.parse("", "SELECT $1::int") + messages.bind("", "", ["1"]) + messages.execute(""),
                             PARSE_COMPLETE + BIND_COMPLETE + EXECUTED, True),
    "an error skips to the Sync": (messages.parse("", "SELEC 1") + messages.bind("", "", []) + messages.execute(""),
                                   ERROR, True),
    "text the guard refuses": (messages.parse("", "SELECT set_config('app.tenant', 'globex', false)")
                               + messages.bind("", "", []) + messages.execute(""), ERROR, False),
    "text that resets the session": (messages.parse("r", "RESET ALL") + messages.bind("", "r", []) + messages.execute(""),
                                     PARSE_COMPLETE + BIND_COMPLETE + complete("RESET"), False),
    "text that may start COPY IN": (messages.parse("", "COPY t FROM STDIN") + messages.bind("", "", [])
                                    + messages.execute(""), PARSE_COMPLETE + BIND_COMPLETE + ERROR, False),
    "a statement name of the proxy's": (messages.bind("", "pg_tenant_proxy_context", []) + messages.execute(""), ERROR, False),
    "a portal name of the proxy's": (messages.bind("pg_tenant_proxy_x", "s", []) + messages.execute("pg_tenant_proxy_x"),
                                     ERROR, False),
    "a describe of the proxy's": (messages.message(b"D", b"Spg_tenant_proxy_context\0"), ERROR, False),
    "the prefix in a parameter": (messages.bind("", "s", ["pg_tenant_proxy_x"]) + messages.execute(""),
                                  BIND_COMPLETE + EXECUTED, False),
    "a Parse whose text does not end in it": (messages.message(b"P", b"\0SELECT 1") + messages.execute(""), ERROR, False),
}


@pytest.mark.parametrize("name", list(GROUPS))
def test_a_group_in_one_read_is_relayed_as_its_messages_one_read_each(name: str) -> None:
    """Session mode. A whole extended-query group in one read (the hot path of prepared statements, when
    the relay clears it: one entry owed) must send upstream, answer the client and leave the session as
    the same messages in a read each, which take the general path: refusals, reserved names, malformed
    messages and texts that need the relay's attention included."""
    group, replies, sent_as_it_came = GROUPS[name]
    results = []
    for reads in ([group + messages.sync()], [*_messages(group), messages.sync()]):
        pair, server = session_relay()
        try:
            upstream = b"".join(pair.client(*reads))
        except ProtocolViolation as exc:
            results.append(("violation", str(exc)))
            continue
        if len(reads) == 1:
            assert ([entry.request for entry in server.queue.entries] == [Request.SYNC_GROUP]) is sent_as_it_came
        answered = pair.server(replies + Z_IDLE)
        results.append((upstream, answered, server.queue.idle(), pair.relay.mid_group, [r.sqlstate for r in pair.hooks.refusals],
                        pair.hooks.failures, pair.relay.mode.reassert_due, pair.relay.sync_owed))
    assert results[0] == results[1]


def test_a_malformed_message_in_a_group_sent_as_it_came_is_refused_by_the_server() -> None:
    """Session mode: an Execute whose portal name does not end within it goes upstream with its group, and
    the server answers it as directly, ERROR 08P01 "invalid string in message" and ReadyForQuery; the
    session goes on (alone in its read, the general path ends the session with 08P01)."""
    pair, server = session_relay()
    group = messages.message(b"E", b"portal") + messages.sync()
    assert pair.client(group) == [group]
    invalid = messages.error_response("ERROR", errors.PROTOCOL_VIOLATION, "invalid string in message")
    assert pair.server(invalid + Z_IDLE) == invalid + Z_IDLE
    assert server.queue.idle() and pair.hooks.failures == []


def _messages(stream: bytes) -> list[bytes]:
    positions = _boundaries(stream) + [len(stream)]
    return [stream[start:end] for start, end in zip(positions, positions[1:])]


# -- transaction mode: a prepared statement's group in one write behind the context ---------------

PREPARED_SQL = "SELECT $1::int"
PREPARED_NAME = statement_for(messages.parse("", PREPARED_SQL)[6:], "", ALLOW).server_name
CONTEXT_FIRST = (messages.close_statement(CONTEXT.statement_name)
                 + messages.parse(CONTEXT.statement_name.decode(), CONTEXT.statement))
RUN_S1 = messages.bind("", "s1", ["7"]) + messages.message(b"D", b"P\0") + messages.execute() + messages.sync()
RUN_S1_RENAMED = (messages.bind("", PREPARED_NAME.decode(), ["7"]) + messages.message(b"D", b"P\0") + messages.execute()
                  + messages.sync())
RAN = BIND_COMPLETE + ROWS + Z_IDLE

CONTEXT_FLOW = CONTEXT.transaction_messages("acme", 101, 2_000_000_000, '{"sub":"alice"}')  # the harness's identity, server 101


def prepared_on(server: Server) -> RelayPair:
    """A transaction-mode client that prepared s1 and ran it once on `server` (the general path: the
    server connection lacked the context statement), which now holds both."""
    pair = RelayPair()
    checked_out(pair, server, messages.parse("s1", PREPARED_SQL) + messages.sync())
    assert pair.server(CLOSE_COMPLETE + PARSE_COMPLETE + Z_IDLE) == PARSE_COMPLETE + Z_IDLE
    first = checked_out(pair, server, RUN_S1)
    assert first == [messages.bind("", PREPARED_NAME.decode(), ["7"]) + messages.message(b"D", b"P\0") + CONTEXT_FIRST
                     + CONTEXT_FLOW + messages.execute() + messages.sync()]
    assert pair.server(BIND_COMPLETE + row_description() + CLOSE_COMPLETE + PARSE_COMPLETE + CONTEXT_SET
                       + data_row(b"1") + complete("SELECT 1") + Z_IDLE) == RAN
    assert pair.relay.server is None  # released
    return pair


def test_a_prepared_statement_runs_in_one_write_behind_the_context() -> None:
    """Bind of a statement the server connection holds, Describe of the portal, Execute, Sync, at the start
    of a transaction (held while the client waited for its checkout): one write, the context first and
    the Bind naming the server's statement; the client gets its replies without the context's."""
    server = Server(101)
    pair = prepared_on(server)
    assert checked_out(pair, server, RUN_S1) == [CONTEXT_FLOW + RUN_S1_RENAMED]
    assert [entry.request for entry in server.queue.entries] == [Request.CONTEXT, Request.SYNC_GROUP]
    assert pair.server(CONTEXT_SET + RAN) == RAN
    assert pair.relay.server is None and server.queue.idle() and pair.hooks.ended == 3


def test_the_portals_of_an_ended_transaction_are_forgotten_at_release() -> None:
    """Postgres drops a transaction's portals when it ends: what the relay remembers of portals bound to
    statements with effects goes with the release, so a client binding many portal names never grows it."""
    server = Server(101)
    pair = prepared_on(server)
    mode = pair.relay.mode
    assert isinstance(mode, TransactionMode)
    mode.portals[b"left"] = Decision(set_names=frozenset({"work_mem"}))
    mode.ending_portals.add(b"left")
    checked_out(pair, server, RUN_S1)
    assert pair.server(CONTEXT_SET + RAN) == RAN
    assert pair.relay.server is None and not mode.portals and not mode.ending_portals


def test_an_error_in_a_prepared_statements_group_names_the_clients_statement() -> None:
    """The server's error names its statement; the client is told its own name, as Postgres tells it."""
    server = Server(101)
    pair = prepared_on(server)
    checked_out(pair, server, RUN_S1)
    error = messages.error_response("ERROR", errors.PROTOCOL_VIOLATION,
                                    f'bind message supplies 1 parameters, but prepared statement "{PREPARED_NAME.decode()}" requires 2')
    out = pair.server(CONTEXT_SET + error + Z_IDLE)
    assert out == messages.error_response("ERROR", errors.PROTOCOL_VIOLATION,
                                          'bind message supplies 1 parameters, but prepared statement "s1" requires 2') + Z_IDLE
    assert pair.relay.server is None and server.queue.idle()


def test_a_context_that_fails_in_front_of_a_whole_group_is_the_clients_error() -> None:
    """The context fails (its Execute): the server skips the client's messages up to the group's own Sync.
    The client gets the error, prefixed, and the ReadyForQuery; the proxy sends no Sync of its own."""
    server = Server(101)
    pair = prepared_on(server)
    checked_out(pair, server, RUN_S1)
    start = len(pair.hooks.upstream)
    failure = messages.error_response("ERROR", "57014", "canceling statement due to user request")
    out = pair.server(BIND_COMPLETE + failure + Z_IDLE)
    fields = messages.parse_error_fields(out[5:-len(Z_IDLE)])
    assert (fields["C"], fields["M"]) == ("57014", "could not set the tenant context: canceling statement due to user request")
    assert out.endswith(Z_IDLE) and pair.upstream_since(start) == []
    assert pair.relay.server is None and server.queue.idle()


@pytest.mark.parametrize("case", ["statement not held", "shape not known", "portals differ", "a Flush, no Sync",
                                  "a statement that ends a transaction"])
def test_a_group_the_hot_path_cannot_take_goes_the_general_way(case: str) -> None:
    """What needs the relay's attention takes the general path: the context goes in front of the Execute,
    after the client's Bind."""
    server = Server(101)
    pair = prepared_on(server)
    group = RUN_S1
    if case == "statement not held":
        server.state.statements.ready.pop(PREPARED_NAME)
    elif case == "shape not known":
        pair.relay.mode.statements.by_name[b"s1"].shape = b"0123456789abcdef"
    elif case == "portals differ":
        group = messages.bind("p", "s1", ["7"]) + messages.execute("q") + messages.sync()
    elif case == "a Flush, no Sync":
        group = messages.bind("", "s1", ["7"]) + messages.execute() + messages.message(b"H")
    else:
        pair.relay.mode.ending.add(b"s1")
    writes = b"".join(checked_out(pair, server, group))
    assert not writes.startswith(CONTEXT_FLOW)
    assert [entry.request for entry in server.queue.entries] != [Request.CONTEXT, Request.SYNC_GROUP]


UNNAMED = messages.parse("", PREPARED_SQL) + messages.bind("", "", ["7"]) + messages.message(b"D", b"P\0") + messages.execute()
SYNTAX_ERROR = messages.error_response("ERROR", errors.SYNTAX_ERROR, "syntax error at or near \"SELEC\"")


@pytest.mark.parametrize("outcome", ["ran", "the Parse failed", "the Bind failed", "split reads"])
def test_a_group_parsing_the_unnamed_statement_runs_in_one_write_behind_the_context(outcome: str) -> None:
    """Parse of the unnamed statement, Bind, Describe, Execute, Sync (pg8000, psycopg, node-postgres): one
    write, context first, the messages as they came. The client's unnamed statement and the server
    connection's follow the Parse's outcome, as with the general path: there after a ParseComplete (a
    later failure does not drop it), gone after the Parse failed."""
    server = Server(101)
    pair = prepared_on(server)
    assert checked_out(pair, server, UNNAMED + messages.sync()) == [CONTEXT_FLOW + UNNAMED + messages.sync()]
    assert [entry.request for entry in server.queue.entries] == [Request.CONTEXT, Request.PARSE, Request.SYNC_GROUP]
    replies = {
        "ran": PARSE_COMPLETE + RAN,
        "the Parse failed": SYNTAX_ERROR + Z_IDLE,
        "the Bind failed": PARSE_COMPLETE + ERROR + Z_IDLE,
        "split reads": PARSE_COMPLETE + RAN,
    }[outcome]
    reads = [CONTEXT_SET + replies] if outcome != "split reads" else [CONTEXT_SET[:7], CONTEXT_SET[7:] + replies[:3], replies[3:]]
    assert pair.server(*reads) == replies
    assert pair.relay.server is None and server.queue.idle() and server.queue._special == server.queue._whole == 0
    statements = pair.relay.mode.statements
    assert not statements.unsettled
    if outcome == "the Parse failed":
        assert statements.unnamed is None and server.state.statements.unnamed is None
    else:
        assert statements.unnamed is not None and server.state.statements.unnamed is statements.unnamed
    # the client binds its unnamed statement again, on another server connection: prepared again there
    # when Postgres would still have it, or the Bind fails as in Postgres
    other = Server(202)
    writes = b"".join(checked_out(pair, other, messages.bind("", "", ["8"]) + messages.execute() + messages.sync()))
    assert (messages.parse("", PREPARED_SQL) in writes) is (outcome != "the Parse failed")


@pytest.mark.parametrize("text", ["SELECT set_config('app.tenant', 'globex', false)", "COMMIT", "COPY t FROM STDIN",
                                  "SET search_path = x"])
def test_a_group_parsing_text_the_relay_must_read_goes_the_general_way(text: str) -> None:
    server = Server(101)
    pair = prepared_on(server)
    group = messages.parse("", text) + messages.bind("", "", []) + messages.execute() + messages.sync()
    checked_out(pair, server, group)
    assert [entry.request for entry in server.queue.entries][:2] != [Request.CONTEXT, Request.PARSE]


@pytest.mark.parametrize("text", [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 1;", "COMMIT", "select 1; end", "SELECT 'weekend'",
    "UPDATE t SET x = 1", "SELECT set_config('a.b', 'c', false)", "PREPARE pg_tenant_proxy_x AS SELECT 1",
    "DEALLOCATE pg_tenant_proxy_x", "SELECT 'ROLLBACK'", "SELECT 'Straße' AS \"ÉND\"", "rollback", "SELECT 1 /* abort */",
])
@pytest.mark.parametrize("transaction_mode", [False, True])
def test_clears_is_the_decision_and_the_transaction_end_words(text: str, transaction_mode: bool) -> None:
    """`Relay.clears`, which shares one decoding between the guard and the word search, answers as the two
    checks it stands for."""
    relay = RelayPair(transaction_mode=transaction_mode).relay
    raw = text.encode()
    assert relay.clears(raw) is (relay.decide(raw) is ALLOW and not may_end_transaction(raw))


CONTEXT_GROUPS = {
    "unnamed, ran": (UNNAMED + messages.sync(), PARSE_COMPLETE + RAN),
    "unnamed, the Parse failed": (UNNAMED + messages.sync(), SYNTAX_ERROR + Z_IDLE),
    "unnamed, the Bind failed": (UNNAMED + messages.sync(), PARSE_COMPLETE + ERROR + Z_IDLE),
    "unnamed, suspended": (UNNAMED + messages.sync(), PARSE_COMPLETE + BIND_COMPLETE + row_description() + data_row(b"1")
                           + SUSPENDED + Z_IDLE),
    "named, ran": (RUN_S1, RAN),
    "named, the Bind failed": (RUN_S1, messages.error_response("ERROR", errors.PROTOCOL_VIOLATION,
                                                               f'prepared statement "{PREPARED_NAME.decode()}" requires 2') + Z_IDLE),
}
RENAMED = {"named, the Bind failed": messages.error_response("ERROR", errors.PROTOCOL_VIOLATION, 'prepared statement "s1" requires 2')
           + Z_IDLE}


def _context_group_settled(group: bytes, reads: list[bytes]) -> tuple[object, ...]:
    server = Server(101)
    pair = prepared_on(server)
    assert checked_out(pair, server, group)[0].startswith(CONTEXT_FLOW)
    out = pair.server(*reads)
    queue, statements = server.queue, pair.relay.mode.statements
    return (out, pair.relay.server is None, queue.idle(), queue.client_group_ends, queue._special, queue._whole,
            statements.unnamed, dict(statements.unsettled), server.state.statements.unnamed)


@pytest.mark.parametrize("name", list(CONTEXT_GROUPS))
def test_every_cut_of_a_context_groups_replies_settles_as_byte_by_byte(name: str) -> None:
    """Transaction mode, a group in one write behind the context (`TransactionMode.sync_group`): its replies
    cut in two at every byte settle as they do one byte a read. The cut right behind the context's four
    replies (the server flushes there when they fill its 8 KiB send buffer: claims of about 8 KB) left the
    client's Parse at the head, and the whole-read path took the group's ReadyForQuery for it: the group's
    entry stayed owed, the server connection was never released, and the client's next statement ended
    the session with XX000 "lost track of the upstream server's replies"."""
    group, replies = CONTEXT_GROUPS[name]
    stream = CONTEXT_SET + replies
    byte_by_byte = _context_group_settled(group, [stream[i:i + 1] for i in range(len(stream))])
    assert byte_by_byte[:6] == (RENAMED.get(name, replies), True, True, 0, 0, 0)
    for cut in range(1, len(stream)):
        assert _context_group_settled(group, [stream[:cut], stream[cut:]]) == byte_by_byte, cut
