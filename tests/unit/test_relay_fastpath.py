"""Attacks on the relay's hot paths with the paired harness (relay_harness.RelayPair) and the reply queue
alone: the whole-read settlement of plain-Query replies must settle every cut of a reply stream as the
scanner's walk does; the proxy's own follow-up messages must not ride behind a COPY FROM STDIN; a
read-back answered after its client left must be settled without it."""

from __future__ import annotations

import struct

import pytest

from relay_harness import (
    BIND_COMPLETE,
    CLOSE_COMPLETE,
    PARSE_COMPLETE,
    Z_BLOCK,
    Z_IDLE,
    RelayPair,
    Server,
    complete,
    data_row,
    row_description,
)

from proxy.protocol import errors, messages
from proxy.protocol.errors import ProtocolViolation
from proxy.protocol.framing import MessageScanner
from proxy.relay.relay import RESET_BIND
from proxy.relay.replies import Outcome, Owed, Owner, ReplyQueue, Request

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
    pair.server(CONTEXT_PREPARED + CONTEXT_SET + complete("SET") + Z_IDLE)
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
    "a name not ended in its message": (messages.message(b"E", b"portal"), ERROR, False),
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


def _messages(stream: bytes) -> list[bytes]:
    positions = _boundaries(stream) + [len(stream)]
    return [stream[start:end] for start, end in zip(positions, positions[1:])]
