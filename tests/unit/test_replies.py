"""ReplyQueue: server replies matched against what the server owes, driven by byte fixtures that read as
protocol traces ("Message Flow", 55.2.3 Extended Query, 55.2.6 COPY Operations; postgres.c)."""

from __future__ import annotations

import struct

import pytest

from relay_harness import complete, data_row, row_description

from proxy.protocol import errors, messages
from proxy.protocol.errors import ProtocolViolation
from proxy.protocol.framing import MessageScanner
from proxy.relay.replies import ABORTED, COPY_INTERRUPTED, CopyInterrupted, Outcome, Owner, ReplyQueue, Request


# -- server messages ---------------------------------------------------------------------------

def error(code: str = errors.SYNTAX_ERROR, text: str = "boom") -> bytes:
    return messages.error_response("ERROR", code, text)


T = row_description()
D1 = data_row(b"1")
D2 = data_row(b"2")
C_SELECT = complete("SELECT 1")
PARSE_COMPLETE = messages.message(b"1")
BIND_COMPLETE = messages.message(b"2")
CLOSE_COMPLETE = messages.message(b"3")
NO_DATA = messages.message(b"n")
PARAMETER_DESCRIPTION = messages.message(b"t", struct.pack("!hI", 1, 23))
EMPTY_QUERY = messages.message(b"I")
PORTAL_SUSPENDED = messages.message(b"s")
COPY_IN = messages.message(b"G", b"\0\0\0")
COPY_OUT = messages.message(b"H", b"\0\0\0")
COPY_DATA = messages.message(b"d", b"1\n")
COPY_DONE = messages.message(b"c")
NOTICE = messages.notice_response("01000", "careful")
NOTIFICATION = messages.message(b"A", struct.pack("!i", 42) + b"chan\0payload\0")
PARAMETER = messages.parameter_status("TimeZone", "UTC")
Z_IDLE = messages.ready_for_query(b"I")
Z_BLOCK = messages.ready_for_query(b"T")
Z_FAILED = messages.ready_for_query(b"E")


# -- fakes -------------------------------------------------------------------------------------

class Listener:
    def __init__(self) -> None:
        self.groups: list[tuple[bytes, bool]] = []
        self.parameters: list[tuple[str, str, bool]] = []
        self.pending = b""

    def group_ended(self, status: bytes, own: bool) -> None:
        self.groups.append((status, own))

    def copy_syncs_unknown(self) -> None:
        raise AssertionError("no COPY failed with Syncs among its data here (see Prober)")

    def parameter_status(self, name: str, value: str, forwarded: bool) -> bool:
        self.parameters.append((name, value, forwarded))
        return forwarded

    def pending_parameters(self) -> bytes:
        pending, self.pending = self.pending, b""
        return pending


class Watcher:
    def __init__(self) -> None:
        self.outcomes: list[tuple[Outcome, dict[str, str] | None]] = []
        self.rows: list[list[bytes | None]] = []

    def ended(self, outcome: Outcome, error: dict[str, str] | None) -> None:
        self.outcomes.append((outcome, error))

    def row(self, values: list[bytes | None]) -> None:
        self.rows.append(values)


def new_queue() -> tuple[ReplyQueue, Listener]:
    listener = Listener()
    return ReplyQueue(MessageScanner(b"ZE"), listener), listener


def expect_all(queue: ReplyQueue, *requests: Request) -> None:
    for request in requests:
        queue.expect(request)


def feed(queue: ReplyQueue, *replies: bytes) -> bytes:
    return bytes(queue.feed(b"".join(replies)))


def passes_whole(queue: ReplyQueue, trace: bytes) -> None:
    """The trace reaches the client as it came and settles everything owed."""
    assert feed(queue, trace) == trace
    assert queue.idle() and queue.client_group_ends == 0


P, B, D, E, S, Q = Request.PARSE, Request.BIND, Request.DESCRIBE, Request.EXECUTE, Request.SYNC, Request.QUERY


# -- simple and extended query -------------------------------------------------------------------

def test_query_rows_forwarded_and_group_ended() -> None:
    queue, listener = new_queue()
    queue.expect(Q)
    passes_whole(queue, T + D1 + D2 + C_SELECT + Z_IDLE)
    assert listener.groups == [(b"I", False)]


def test_fast_path_returns_the_read_itself() -> None:
    """The hot path: only client Queries owed, the read passes on as it came, not copied."""
    queue, _ = new_queue()
    queue.expect(Q)
    data = T + D1 + C_SELECT + Z_IDLE
    assert queue.feed(data) is data


def test_extended_happy_path() -> None:
    queue, listener = new_queue()
    expect_all(queue, P, B, D, E, S)
    passes_whole(queue, PARSE_COMPLETE + BIND_COMPLETE + T + D1 + C_SELECT + Z_IDLE)
    assert listener.groups == [(b"I", False)]


def test_describe_statement_then_no_data() -> None:
    queue, _ = new_queue()
    expect_all(queue, P, D, S)
    passes_whole(queue, PARSE_COMPLETE + PARAMETER_DESCRIPTION + NO_DATA + Z_IDLE)


def test_error_skips_every_entry_to_sync_including_a_query() -> None:
    """An error at Bind: the server skips Describe, Execute and even a simple Query up to Sync."""
    queue, listener = new_queue()
    expect_all(queue, P, B, D, E, Q, S)
    assert queue.client_group_ends == 2
    passes_whole(queue, PARSE_COMPLETE + error() + Z_IDLE)
    assert listener.groups == [(b"I", False)]


def test_error_before_the_sync_is_sent_skips_what_follows() -> None:
    queue, _ = new_queue()
    expect_all(queue, P, B)
    assert feed(queue, error()) == error()
    expect_all(queue, E, Q)  # skipped by the server: nothing owed for them
    assert not queue.entries and not queue.idle()  # but the server skips until a Sync: not reusable yet
    queue.expect(S)
    assert feed(queue, Z_IDLE) == Z_IDLE
    assert queue.idle()


def test_query_after_unsynced_extended_messages_ends_the_group() -> None:
    """P B E then a Query with no Sync: the Query ends the implicit transaction, one ReadyForQuery."""
    queue, listener = new_queue()
    expect_all(queue, P, B, E, Q)
    trace = PARSE_COMPLETE + BIND_COMPLETE + D1 + C_SELECT + T + D2 + C_SELECT + Z_IDLE
    assert feed(queue, trace) == trace
    assert queue.idle()
    assert listener.groups == [(b"I", False)]


def test_query_error_is_followed_by_ready_for_query() -> None:
    queue, listener = new_queue()
    expect_all(queue, Q, Q)
    trace = error() + Z_IDLE + T + D1 + C_SELECT + Z_IDLE
    assert feed(queue, trace) == trace
    assert listener.groups == [(b"I", False), (b"I", False)]


def test_empty_query_response() -> None:
    queue, _ = new_queue()
    expect_all(queue, Q, P, B, E, S)
    passes_whole(queue, EMPTY_QUERY + Z_IDLE + PARSE_COMPLETE + BIND_COMPLETE + EMPTY_QUERY + Z_IDLE)


def test_portal_suspended_ends_execute() -> None:
    queue, _ = new_queue()
    expect_all(queue, P, B, E, E, S)
    trace = PARSE_COMPLETE + BIND_COMPLETE + D1 + PORTAL_SUSPENDED + D2 + C_SELECT + Z_BLOCK
    assert feed(queue, trace) == trace
    assert queue.idle() and queue.status == b"T"


# -- the proxy's own, refused and answered entries -------------------------------------------------

def test_own_entries_swallowed_rows_included() -> None:
    queue, listener = new_queue()
    watcher = Watcher()
    queue.expect(P, Owner.OWN)
    queue.expect(B, Owner.OWN)
    queue.expect(E, Owner.OWN, watcher=watcher, rows=True)
    queue.expect(S, Owner.OWN)
    queue.expect(Q)
    assert queue.client_group_ends == 1
    own = PARSE_COMPLETE + BIND_COMPLETE + data_row(b"a", None) + data_row(b"b", b"2") + C_SELECT + Z_IDLE
    client = T + D1 + C_SELECT + Z_IDLE
    assert feed(queue, own + client) == client
    assert watcher.rows == [[b"a", None], [b"b", b"2"]]
    assert watcher.outcomes == [(Outcome.COMPLETED, None)]
    assert listener.groups == [(b"I", True), (b"I", False)]


def test_own_error_with_prefix_tells_the_client() -> None:
    queue, _ = new_queue()
    queue.expect(B, Owner.OWN, reply=b"could not set the tenant context: ")
    queue.expect(E, Owner.OWN)
    queue.expect(Q)  # skipped: its ReadyForQuery comes from the Sync behind it
    queue.expect(S, Owner.OWN)
    out = feed(queue, error(errors.INSUFFICIENT_PRIVILEGE, "no") + Z_IDLE)
    fields = messages.parse_error_fields(out[5:len(out) - len(Z_IDLE)])
    assert fields["C"] == errors.INSUFFICIENT_PRIVILEGE
    assert fields["M"] == "could not set the tenant context: no"
    assert out.endswith(Z_IDLE)  # the skipped client Query's ReadyForQuery
    assert queue.idle() and queue.client_group_ends == 0


def test_a_client_query_in_the_clients_own_error_window_gets_no_ready_for_query() -> None:
    """Describe of a missing portal, a Query and a Flush, then the proxy's Sync: Postgres skips that Query
    with no reply at all; the proxy's Sync ends the window the client is still in, its ReadyForQuery the
    proxy's own (found by the random search: the client got one ReadyForQuery too many)."""
    queue, listener = new_queue()
    expect_all(queue, D, Q)
    sync = Watcher()
    queue.expect(S, Owner.OWN, watcher=sync)
    assert feed(queue, error("34000") + Z_IDLE) == error("34000")
    assert sync.outcomes[0][0] is Outcome.FAILED
    assert queue.idle() and queue.client_group_ends == 0
    assert listener.groups == [(b"I", True)]


def test_a_client_query_sent_into_the_clients_own_error_window_gets_no_ready_for_query() -> None:
    """The same with the Query sent once the error had come: skipped, and the proxy's Sync stays its own."""
    queue, listener = new_queue()
    queue.expect(D)
    assert feed(queue, error("34000")) == error("34000")
    queue.expect(Q)
    queue.expect(S, Owner.OWN)
    assert feed(queue, Z_IDLE) == b""
    assert queue.idle() and queue.client_group_ends == 0
    assert listener.groups == [(b"I", True)]


def test_a_client_query_behind_a_client_message_behind_a_failed_own_request_gets_no_ready_for_query() -> None:
    """The proxy's own Parse fails in front of a client's Bind, whose error it is; a Query behind the Bind
    is in the client's error window, as directly: only a Query that is the first client message behind the
    failed request is owed a ReadyForQuery."""
    queue, _ = new_queue()
    queue.expect(P, Owner.OWN, reply=b"could not prepare: ")
    expect_all(queue, B, Q)
    queue.expect(S, Owner.OWN)
    out = feed(queue, error() + Z_IDLE)
    assert out.startswith(b"E") and not out.endswith(Z_IDLE)
    assert queue.idle() and queue.client_group_ends == 0


def aborted_in(routine: str) -> bytes:
    """Postgres's 25P02 inside a failed block, raised in `routine`, as the server sends it (F, L, R)."""
    fields = b"SERROR\0VERROR\0C25P02\0Mcurrent transaction is aborted\0Fpostgres.c\0L1400\0R" + routine.encode()
    return messages.message(b"E", fields + b"\0\0")


AGAIN = b"could not prepare the statement again on this server connection: "


@pytest.mark.parametrize("behind, routine", [
    (B, "exec_bind_message"), (D, "exec_describe_statement_message"), (P, "exec_parse_message"),
])
@pytest.mark.parametrize("checked", [False, True], ids=["", "shape checked"])
def test_own_error_in_a_failed_block_reaches_the_client_as_postgres_answers_its_message(
        behind: Request, routine: str, checked: bool) -> None:
    """A statement prepared again inside a failed block: the server refuses its Parse with 25P02, as it
    would the client's message behind it (`checked`: that message still waits on the proxy's Describe of
    the statement's shape), which is what the client hears: without the proxy's prefix, and naming the
    routine the relay gave for that message (clients read R), the rest as the server sent it."""
    queue, _ = new_queue()
    queue.expect(Request.CLOSE, Owner.OWN)
    queue.expect(P, Owner.OWN, reply=AGAIN + b"\0" + routine.encode())
    if checked:
        queue.expect(D, Owner.GATE, watcher=Watcher(), rows=True)
    else:
        queue.expect(behind)
    queue.expect(S)
    assert feed(queue, CLOSE_COMPLETE + aborted_in("exec_parse_message") + Z_FAILED) == aborted_in(routine) + Z_FAILED
    assert queue.idle()


def test_own_error_naming_no_routine_reaches_the_client_as_the_server_sent_it() -> None:
    queue, _ = new_queue()
    queue.expect(P, Owner.OWN, reply=AGAIN)
    expect_all(queue, B, S)
    assert feed(queue, aborted_in("exec_parse_message") + Z_FAILED) == aborted_in("exec_parse_message") + Z_FAILED


def test_own_error_outside_a_failed_block_is_prefixed_without_the_routine() -> None:
    queue, _ = new_queue()
    queue.expect(P, Owner.OWN, reply=AGAIN + b"\0exec_bind_message")
    expect_all(queue, B, S)
    out = feed(queue, error(errors.UNDEFINED_OBJECT, 'relation "gone" does not exist') + Z_IDLE)
    fields = messages.parse_error_fields(out[5:out.index(Z_IDLE)])
    assert (fields["C"], fields["M"]) == (errors.UNDEFINED_OBJECT, AGAIN.decode() + 'relation "gone" does not exist')
    assert "R" not in fields


def test_refused_entry_replaced() -> None:
    queue, _ = new_queue()
    refusal = messages.error_response("ERROR", errors.INSUFFICIENT_PRIVILEGE, "refused by the proxy")
    queue.expect(Q, Owner.REFUSED, reply=refusal)
    assert feed(queue, error(errors.UNDEFINED_OBJECT, "pg_tenant_proxy_refused") + Z_IDLE) == refusal + Z_IDLE
    queue.expect(P, Owner.REFUSED, reply=refusal)
    expect_all(queue, B, E, S)
    assert feed(queue, error() + Z_IDLE) == refusal + Z_IDLE
    assert queue.idle()


def test_answered_at_the_head() -> None:
    queue, listener = new_queue()
    answer = complete("DEALLOCATE")
    queue.expect(Q)
    queue.expect(Q, Owner.ANSWERED, reply=answer)
    assert queue.answer_ready() == b""  # not at the head yet
    trace = T + C_SELECT + Z_IDLE
    assert feed(queue, trace) == trace + answer + Z_IDLE
    assert queue.idle()
    assert listener.groups == [(b"I", False), (b"I", False)]


def test_answered_alone_answered_at_once() -> None:
    queue, _ = new_queue()
    answer = complete("DEALLOCATE")
    queue.expect(Q, Owner.ANSWERED, reply=answer)
    assert queue.answer_ready() == answer + Z_IDLE
    assert queue.idle()


def test_answered_in_failed_transaction_is_25p02() -> None:
    queue, _ = new_queue()
    queue.expect(Q)
    queue.expect(Q, Owner.ANSWERED, reply=complete("DEALLOCATE"))
    out = feed(queue, error() + Z_FAILED)
    assert out == error() + Z_FAILED + ABORTED + Z_FAILED
    fields = messages.parse_error_fields(ABORTED[5:])
    assert (fields["C"], fields["R"]) == (errors.IN_FAILED_TRANSACTION, "exec_simple_query")  # as Postgres names it


def test_answered_inside_error_window_is_skipped() -> None:
    """Postgres ignores a Query between a failed extended message and Sync: no reply at all."""
    queue, _ = new_queue()
    watcher = Watcher()
    expect_all(queue, P, B)
    queue.expect(Q, Owner.ANSWERED, reply=complete("DEALLOCATE"), watcher=watcher)
    queue.expect(S)
    assert feed(queue, error() + Z_IDLE) == error() + Z_IDLE
    assert watcher.outcomes == [(Outcome.SKIPPED, None)]


# -- COPY ------------------------------------------------------------------------------------------

def test_copy_in_via_query() -> None:
    queue, _ = new_queue()
    queue.expect(Q)
    assert feed(queue, COPY_IN) == COPY_IN
    queue.expect(Request.COPY_DATA)
    queue.expect(Request.COPY_DATA)
    queue.expect(Request.COPY_END)
    trace = complete("COPY 2") + Z_IDLE
    assert feed(queue, trace) == trace
    assert queue.idle()


def test_copy_in_via_execute_sync_before_copydata_ignored() -> None:
    """libpq pipelines Sync after Execute; the server ignores a Sync read during COPY IN, and the
    client's Sync after CopyDone is the real one."""
    queue, listener = new_queue()
    expect_all(queue, P, B, E, S)
    assert feed(queue, PARSE_COMPLETE + BIND_COMPLETE + COPY_IN) == PARSE_COMPLETE + BIND_COMPLETE + COPY_IN
    queue.expect(S)  # another Sync sent after CopyInResponse, still before any CopyData: ignored too
    queue.expect(Request.COPY_DATA)
    queue.expect(Request.COPY_END)
    queue.expect(S)
    passes_whole(queue, complete("COPY 1") + Z_IDLE)
    assert listener.groups == [(b"I", False)]


def test_copydata_after_the_server_failed_the_copy_is_ignored() -> None:
    queue, _ = new_queue()
    queue.expect(Q)
    feed(queue, COPY_IN)
    queue.expect(Request.COPY_DATA)
    failure = error("22P02", "bad input")
    assert feed(queue, failure + Z_IDLE) == failure + Z_IDLE
    queue.expect(Request.COPY_DATA)
    queue.expect(Request.COPY_END)
    assert queue.idle()
    queue.expect(Q)  # the next group works as usual
    trace = T + D1 + C_SELECT + Z_IDLE
    assert feed(queue, trace) == trace
    assert queue.idle()


def test_copy_fail() -> None:
    queue, _ = new_queue()
    queue.expect(Q)
    feed(queue, COPY_IN)
    queue.expect(Request.COPY_DATA)
    queue.expect(Request.COPY_END)  # CopyFail
    failure = error(errors.QUERY_CANCELED, "COPY from stdin failed: client gave up")
    assert feed(queue, failure + Z_IDLE) == failure + Z_IDLE
    assert queue.idle() and queue.copy.value == "none"


def test_copy_in_twice_after_a_failed_copy_with_late_copydone() -> None:
    """A COPY that fails, the client's CopyDone arriving after it, then a second COPY: still in step."""
    queue, _ = new_queue()
    for _ in range(3):
        queue.expect(Q)
        feed(queue, COPY_IN)
        queue.expect(Request.COPY_DATA)
        assert feed(queue, error("22P02") + Z_IDLE) == error("22P02") + Z_IDLE
        queue.expect(Request.COPY_END)
    expect_all(queue, P, B, E, S)
    feed(queue, PARSE_COMPLETE + BIND_COMPLETE + COPY_IN)
    queue.expect(Request.COPY_DATA)
    queue.expect(Request.COPY_END)
    queue.expect(S)
    trace = complete("COPY 1") + Z_IDLE
    assert feed(queue, trace) == trace
    assert queue.idle()


@pytest.mark.parametrize("started_by", ["query", "execute"])
def test_a_copy_that_failed_before_its_copydone_leaves_nothing_for_the_next_copy(started_by: str) -> None:
    """A COPY fails at its first CopyData and the client never sends CopyDone (libpq stops at the error;
    after an Execute the client's Sync ends the group). The next COPY on the connection, by whichever
    client, has its own CopyDone answered by its CommandComplete: nothing of the failed COPY waits to
    swallow it (the Sync behind it is no Sync among CopyData)."""
    queue, _ = new_queue()
    if started_by == "query":
        queue.expect(Q)
        feed(queue, COPY_IN)
    else:
        expect_all(queue, P, B, E)
        feed(queue, PARSE_COMPLETE + BIND_COMPLETE + COPY_IN)
    queue.expect(Request.COPY_DATA)
    failure = error("22P02", "bad input")
    if started_by == "query":
        assert feed(queue, failure + Z_IDLE) == failure + Z_IDLE
    else:
        assert feed(queue, failure) == failure
        queue.expect(S)
        assert feed(queue, Z_IDLE) == Z_IDLE
    assert queue.idle()
    expect_all(queue, P, B, E, Request.COPY_DATA, Request.COPY_END, S)  # one write, as asyncpg sends it
    passes_whole(queue, PARSE_COMPLETE + BIND_COMPLETE + COPY_IN + complete("COPY 1") + Z_IDLE)


VIOLATION_TEXT = b"unexpected message type 0x51 during COPY from stdin"


def _copy_waiting_for_the_client(queue: ReplyQueue) -> None:
    """COPY FROM STDIN by Query, CopyData; then, in place of the client's Query (which Postgres does not
    read during COPY IN), the proxy's CopyFail, carrying the text of the error Postgres gives that Query."""
    queue.expect(Q)
    feed(queue, COPY_IN)
    assert queue.awaiting_copy_end()  # no CopyDone / CopyFail sent: the server reads only COPY data
    queue.expect(Request.COPY_DATA)
    assert queue.awaiting_copy_end()
    queue.expect(Request.COPY_END, Owner.OWN, reply=VIOLATION_TEXT)
    assert not queue.awaiting_copy_end()


def test_the_proxys_copyfail_ending_the_copy_gives_the_error_postgres_gives_the_clients_message() -> None:
    """The server was still in COPY IN: the proxy's CopyFail ended the COPY where the client's message
    would have been read. The client gets what came before and Postgres's error for its message (the same
    fields as the server's, the COPY's line included, but 08P01 and the text); the queue stops there."""
    queue, _ = new_queue()
    _copy_waiting_for_the_client(queue)
    where = b"WCOPY t, line 2\0Fcopyfromparse.c\0L315\0RCopyGetData\0"
    failed = messages.message(b"E", b"SERROR\0VERROR\0C57014\0MCOPY from stdin failed: " + COPY_INTERRUPTED.encode()
                              + b"\0" + where + b"\0")
    with pytest.raises(CopyInterrupted) as raised:
        queue.feed(NOTICE + failed + Z_IDLE)
    violation = messages.message(b"E", b"SERROR\0VERROR\0C08P01\0M" + VIOLATION_TEXT + b"\0" + where + b"\0")
    assert raised.value.replies == NOTICE + violation


def test_the_proxys_copyfail_after_the_copy_failed_is_ignored() -> None:
    """The COPY had failed on the client's data before the server read the proxy's CopyFail, which it then
    ignores: the client gets the COPY's error and ReadyForQuery, and its message goes on after them."""
    queue, _ = new_queue()
    _copy_waiting_for_the_client(queue)
    failure = error("22P02", "invalid input syntax for type integer")
    assert feed(queue, failure + Z_IDLE) == failure + Z_IDLE
    assert queue.idle() and queue.groups_owed() == 0
    queue.expect(Q)
    passes_whole(queue, T + D1 + C_SELECT + Z_IDLE)


def test_copy_out() -> None:
    queue, _ = new_queue()
    expect_all(queue, Q, P, B, E, S)
    trace = COPY_OUT + COPY_DATA + COPY_DATA + COPY_DONE + complete("COPY 2") + Z_IDLE
    extended = PARSE_COMPLETE + BIND_COMPLETE + COPY_OUT + COPY_DATA + COPY_DONE + complete("COPY 1") + Z_IDLE
    assert feed(queue, trace + extended) == trace + extended
    assert queue.idle()


# -- asynchronous messages -------------------------------------------------------------------------

@pytest.mark.parametrize("asynchronous", [NOTICE, NOTIFICATION, PARAMETER], ids=["notice", "notification", "parameter"])
def test_asynchronous_messages_anywhere(asynchronous: bytes) -> None:
    queue, _ = new_queue()
    expect_all(queue, P, B, E, S)
    parts = [PARSE_COMPLETE, BIND_COMPLETE, D1, C_SELECT, Z_IDLE]
    for at in range(len(parts) + 1):
        expect_all(queue, P, B, E, S)
        trace = b"".join(parts[:at]) + asynchronous + b"".join(parts[at:])
        assert feed(queue, trace) == trace
    assert feed(queue, PARSE_COMPLETE + BIND_COMPLETE + C_SELECT + Z_IDLE)
    assert queue.idle()
    assert feed(queue, asynchronous) == asynchronous  # with nothing owed


def test_parameter_status_told_to_the_listener() -> None:
    queue, listener = new_queue()
    queue.expect(Q)
    assert feed(queue, PARAMETER + C_SELECT + Z_IDLE) == PARAMETER + C_SELECT + Z_IDLE
    queue.expect(S, Owner.OWN)
    assert feed(queue, PARAMETER + Z_IDLE) == b""
    assert listener.parameters == [("TimeZone", "UTC", True), ("TimeZone", "UTC", False)]


def test_notification_during_own_group_reaches_the_client() -> None:
    """NotificationResponse belongs to the client whatever the server is answering (55.2.7
    Asynchronous Operations): one sent while the head is the proxy's own request must not be lost."""
    queue, _ = new_queue()
    queue.expect(Q, Owner.OWN)
    assert feed(queue, NOTIFICATION + C_SELECT + Z_IDLE) == NOTIFICATION


# -- fast path and full walk -----------------------------------------------------------------------

def test_fast_path_switches_to_full_walk() -> None:
    queue, listener = new_queue()
    queue.expect(Q)
    first = T + D1
    assert queue.feed(first) is first  # fast path
    expect_all(queue, P, B, E, S)  # pipelined behind: the rest needs the full walk
    rest = C_SELECT + Z_IDLE + PARSE_COMPLETE + BIND_COMPLETE + D2 + C_SELECT + Z_BLOCK
    assert feed(queue, rest) == rest
    assert queue.idle() and queue.status == b"T"
    queue.expect(Q)
    back = C_SELECT + Z_IDLE
    assert queue.feed(back) is back  # fast again
    assert listener.groups == [(b"I", False), (b"T", False), (b"I", False)]


def test_fast_path_copy_in_switches_to_full_walk() -> None:
    queue, _ = new_queue()
    queue.expect(Q)
    queue.feed(COPY_IN)
    queue.expect(Request.COPY_DATA)
    queue.expect(Request.COPY_END)
    queue.expect(Q)
    trace = complete("COPY 1") + Z_IDLE + T + C_SELECT + Z_IDLE
    assert feed(queue, trace) == trace
    assert queue.idle()


# -- reads cut anywhere ----------------------------------------------------------------------------

def _traces() -> list[tuple[list[tuple[Request, Owner]], bytes]]:
    client = Owner.CLIENT
    own = Owner.OWN
    return [
        ([(Q, client), (Q, client)], T + D1 + D2 + C_SELECT + NOTICE + Z_IDLE + error() + Z_IDLE),
        (
            [(B, own), (E, own), (Request.CLOSE, own), (P, client), (B, client), (E, client), (S, client), (Q, client)],
            BIND_COMPLETE + D1 + C_SELECT + CLOSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE + PARAMETER + D2
            + C_SELECT + Z_IDLE + T + D1 + C_SELECT + Z_IDLE,
        ),
        ([(P, client), (B, client), (E, client), (Q, client), (S, client)], PARSE_COMPLETE + error() + Z_IDLE),
    ]


@pytest.mark.parametrize("case", range(3))
def test_every_cut_gives_the_same_stream(case: int) -> None:
    entries, stream = _traces()[case]

    def run(reads: list[bytes]) -> tuple[bytes, list[tuple[bytes, bool]]]:
        queue, listener = new_queue()
        for request, owner in entries:
            queue.expect(request, owner)
        out = b"".join(bytes(queue.feed(read)) for read in reads)
        assert queue.idle()
        return out, listener.groups

    whole = run([stream])
    for cut in range(1, len(stream)):
        assert run([stream[:cut], stream[cut:]]) == whole, f"cut at {cut}"
    assert run([stream[i:i + 1] for i in range(len(stream))]) == whole


# -- desync ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "owed, reply",
    [
        ((), Z_IDLE),
        ((Q, P), PARSE_COMPLETE),
        ((P,), BIND_COMPLETE),
        ((P, S), PARSE_COMPLETE + Z_IDLE + Z_IDLE),
        ((B,), Z_IDLE),
    ],
    ids=["ready-nothing-owed", "parse-complete-for-query", "bind-for-parse",
         "extra-ready", "ready-while-bind-owed"],
)
def test_reply_that_fits_nothing_is_a_violation(owed: tuple[Request, ...], reply: bytes) -> None:
    """In the full walk (and for ReadyForQuery on the fast path, which looks at nothing else)."""
    queue, _ = new_queue()
    expect_all(queue, *owed)
    with pytest.raises(ProtocolViolation):
        queue.feed(reply)


def test_fatal_with_nothing_owed_forwarded() -> None:
    queue, _ = new_queue()
    fatal = messages.error_response("FATAL", errors.ADMIN_SHUTDOWN, "terminating connection")
    assert feed(queue, fatal) == fatal


SYNC_LOST = messages.error_response("FATAL", errors.PROTOCOL_VIOLATION, "terminating connection because protocol synchronization was lost")


@pytest.mark.parametrize("owner", [Owner.CLIENT, Owner.OWN, Owner.REFUSED])
def test_fatal_in_place_of_what_is_owed_forwarded_as_it_is(owner: Owner) -> None:
    """Whatever the head (the client's request, the proxy's own with a prefix for its errors, a refused
    one), a FATAL is the server's last word before it closes: the client gets it as Postgres sent it."""
    queue, _ = new_queue()
    queue.expect(Q, owner, reply=b"could not set the tenant context: " if owner is Owner.OWN else error())
    fatal = messages.error_response("FATAL", errors.ADMIN_SHUTDOWN, "terminating connection due to administrator command")
    assert feed(queue, fatal) == fatal


# -- Syncs among CopyData --------------------------------------------------------------------------

class Prober(Listener):
    """The relay's part when a COPY fails with Syncs among its data: the probe goes behind them."""

    def __init__(self) -> None:
        super().__init__()
        self.queue = ReplyQueue(MessageScanner(b"ZE"), self)
        self.watcher = Watcher()

    def copy_syncs_unknown(self) -> None:
        self.queue.expect(Request.COPY_PROBE, Owner.OWN, watcher=self.watcher)


def probed_queue() -> tuple[ReplyQueue, Prober]:
    prober = Prober()
    return prober.queue, prober


PROBE_ANSWERED = Z_IDLE + CLOSE_COMPLETE  # the probe's Sync, and its Close of a portal that never exists


def _extended_copy_with_sync_among_data(queue: ReplyQueue) -> None:
    """Parse, Bind, Execute of COPY FROM STDIN, CopyData, Sync, CopyData, CopyDone (the client's next
    Sync waits for the COPY's outcome, in the relay)."""
    expect_all(queue, P, B, E)
    feed(queue, PARSE_COMPLETE + BIND_COMPLETE + COPY_IN)
    queue.expect(Request.COPY_DATA)
    queue.expect(S)  # among CopyData: ignored if the COPY succeeds
    queue.expect(Request.COPY_DATA)
    queue.expect(Request.COPY_END)


def test_sync_among_copydata_ignored_when_the_copy_succeeds() -> None:
    queue, prober = probed_queue()
    _extended_copy_with_sync_among_data(queue)
    queue.expect(S)
    passes_whole(queue, complete("COPY 2") + Z_IDLE)
    assert prober.watcher.outcomes == []  # no probe


def test_sync_among_copydata_read_after_the_copy_failed() -> None:
    """The COPY fails on the first CopyData, before the server reads the Sync after it: that Sync ends
    the error window (its ReadyForQuery comes before the probe's own, which is swallowed)."""
    queue, prober = probed_queue()
    _extended_copy_with_sync_among_data(queue)
    failure = error("22P02")
    assert feed(queue, failure) == failure
    assert queue.groups_owed() == 1 and not queue.idle()
    assert feed(queue, Z_IDLE + PROBE_ANSWERED) == Z_IDLE
    assert prober.watcher.outcomes == [(Outcome.COMPLETED, None)]
    queue.expect(S)  # the client's next Sync, sent once the probe is answered
    passes_whole(queue, Z_IDLE)


def test_sync_among_copydata_read_before_the_copy_failed() -> None:
    """The COPY fails at CopyDone (a unique violation), after the server ignored the Sync among the data:
    the only ReadyForQuery is the probe's. The client is still in the error window, which the probe's
    Sync ended on the server: its watcher is told so."""
    queue, prober = probed_queue()
    _extended_copy_with_sync_among_data(queue)
    failure = error("23505")
    assert feed(queue, failure + PROBE_ANSWERED) == failure
    ((outcome, fields),) = prober.watcher.outcomes
    assert outcome is Outcome.FAILED and fields is not None and fields["C"] == "23505"
    assert queue.idle() and queue.groups_owed() == 0
    queue.expect(Q)
    passes_whole(queue, T + D1 + C_SELECT + Z_IDLE)


def test_a_sync_behind_the_probe_ends_the_window_itself() -> None:
    """Sent before the probe was answered, the client's next Sync ends the error window on the server
    (the probe's Sync ended it first): its ReadyForQuery is the client's, and the watcher is not told
    the window is open."""
    queue, prober = probed_queue()
    _extended_copy_with_sync_among_data(queue)
    feed(queue, error("23505"))
    queue.expect(Request.COPY_DATA)
    queue.expect(S)
    assert feed(queue, PROBE_ANSWERED + Z_IDLE) == Z_IDLE
    assert prober.watcher.outcomes == [(Outcome.COMPLETED, None)]
    assert queue.idle()


@pytest.mark.parametrize("sync_behind", [False, True], ids=["copydone", "copydone and sync"])
def test_a_copydone_sent_after_the_failure_is_answered_by_nothing(sync_behind: bool) -> None:
    """The COPY fails at the CopyData behind the Sync among its data (the server ignored that Sync); the
    client's CopyDone comes after the failure, and the server ignores it. Alone behind the probe, the
    probe's Sync ended the error window the client is still in, and its watcher is told so; with the
    client's Sync behind it, that Sync ends the window itself and gets its ReadyForQuery."""
    queue, prober = probed_queue()
    expect_all(queue, P, B, E)
    feed(queue, PARSE_COMPLETE + BIND_COMPLETE + COPY_IN)
    expect_all(queue, Request.COPY_DATA, S, Request.COPY_DATA)
    failure = error("22P02")
    assert feed(queue, failure) == failure
    queue.expect(Request.COPY_END)
    if sync_behind:
        queue.expect(S)
        assert feed(queue, PROBE_ANSWERED + Z_IDLE) == Z_IDLE
        assert prober.watcher.outcomes == [(Outcome.COMPLETED, None)]
    else:
        assert feed(queue, PROBE_ANSWERED) == b""
        ((outcome, fields),) = prober.watcher.outcomes
        assert outcome is Outcome.FAILED and fields is not None and fields["C"] == "22P02"
    assert queue.idle()


def test_a_parse_during_copy_in_ends_with_the_servers_error_and_fatal() -> None:
    """A protocol violation: Parse, Bind, Execute of COPY FROM STDIN, CopyData, then Parse and Sync, with no
    CopyDone. Postgres reads the Parse during COPY IN: ERROR 08P01, which fails the COPY (the Sync among
    the data asks for the probe), then FATAL 08P01 and the close. Both reach the client as they are, the
    FATAL while the probe is owed included."""
    queue, _ = probed_queue()
    expect_all(queue, P, B, E)
    feed(queue, PARSE_COMPLETE + BIND_COMPLETE + COPY_IN)
    expect_all(queue, Request.COPY_DATA, P, S)
    violation = messages.error_response("ERROR", errors.PROTOCOL_VIOLATION, "unexpected message type 0x50 during COPY from stdin")
    assert feed(queue, violation + SYNC_LOST) == violation + SYNC_LOST
    assert queue.entries[0].in_copy  # the Sync among the data, then the probe: never answered


def _simple_copy_failed_with_sync_among_data(queue: ReplyQueue, end: Request) -> bytes:
    """COPY FROM STDIN by Query, CopyData, Sync, CopyData, then CopyDone or CopyFail; the COPY failed."""
    queue.expect(Q)
    assert feed(queue, COPY_IN) == COPY_IN
    queue.expect(Request.COPY_DATA)
    queue.expect(S)
    queue.expect(Request.COPY_DATA)
    queue.expect(end)
    failure = error(errors.QUERY_CANCELED, "COPY from stdin failed: stop")
    assert feed(queue, failure + Z_IDLE) == failure + Z_IDLE
    return failure


@pytest.mark.parametrize("sync_read", [False, True], ids=["ignored", "read after the failure"])
def test_syncs_among_the_data_of_a_failed_copy_by_query(sync_read: bool) -> None:
    """After the COPY's ReadyForQuery, the Sync among its data was ignored (CopyFail behind it) or read
    after the failure: the probe's ReadyForQuery is the last before its CloseComplete, either way. A
    Query's failure opens no error window; the next Query's replies are its own."""
    queue, prober = probed_queue()
    _simple_copy_failed_with_sync_among_data(queue, Request.COPY_END)
    assert queue.groups_owed() == 1 and not queue.idle()
    assert feed(queue, (Z_IDLE if sync_read else b"") + PROBE_ANSWERED) == (Z_IDLE if sync_read else b"")
    assert prober.watcher.outcomes == [(Outcome.COMPLETED, None)]
    assert queue.idle() and queue.groups_owed() == 0
    queue.expect(Q)
    passes_whole(queue, COPY_OUT + COPY_DATA + COPY_DONE + complete("COPY 1") + Z_IDLE)


def test_more_ready_for_query_than_syncs_among_copy_data_is_a_violation() -> None:
    queue, _ = probed_queue()
    _simple_copy_failed_with_sync_among_data(queue, Request.COPY_END)
    with pytest.raises(ProtocolViolation):
        feed(queue, Z_IDLE + Z_IDLE + PROBE_ANSWERED)


# -- the server's last word ----------------------------------------------------------------------

FATAL_TERMINATED = messages.error_response("FATAL", errors.ADMIN_SHUTDOWN, "terminating connection due to administrator command")


def test_a_fatal_with_nothing_owed_is_passed_on_and_ends_the_server() -> None:
    """pg_terminate_backend() of an idle connection: the FATAL reaches the client as it is, and the
    queue says the server is done (nothing more comes; the connection serves nobody again)."""
    queue, _ = new_queue()
    assert feed(queue, FATAL_TERMINATED) == FATAL_TERMINATED
    assert queue.ended


@pytest.mark.parametrize("behind", [b"", NOTICE])
def test_a_fatal_read_with_the_ready_for_query_before_it_ends_the_server(behind: bytes) -> None:
    """A read holding a whole answer to the client's Query and then the server's FATAL (the proxy had
    stopped reading while the client did not read): the plain walk of whole reads leaves it to the
    scanner, the answer and the FATAL pass on, and the server is done."""
    queue, listener = new_queue()
    queue.expect(Q)
    trace = T + D1 + C_SELECT + Z_IDLE + behind + FATAL_TERMINATED
    assert feed(queue, trace) == trace
    assert listener.groups == [(b"I", False)] and queue.ended


def test_an_error_is_no_last_word() -> None:
    """An ERROR answering the client's Query leaves the server serving."""
    queue, _ = new_queue()
    queue.expect(Q)
    feed(queue, error() + Z_IDLE)
    assert not queue.ended and queue.idle()
