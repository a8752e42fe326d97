"""The one queue of what the server owes, and the answer to the one question each server message asks.

Every message the relay sends upstream that the server answers appends an entry (`expect`); every
message from the server is matched against the entry at the head (`feed`): forward it to the client,
swallow it (a request of the proxy's own), replace it (a refused client message), or, at
ReadyForQuery, end a group. It follows Postgres's rules ("Message Flow", 55.2.3 Extended Query and
55.2.6 COPY Operations, and postgres.c):

- after an ErrorResponse to an extended-query message (Parse, Bind, Describe, Execute, Close) the server
  skips every message up to the next Sync, a simple Query or FunctionCall inside that window included;
- an ErrorResponse to a Query, FunctionCall or Sync (a commit that fails) is followed by ReadyForQuery;
- a Sync or Flush the server reads during COPY IN is ignored; CopyData, CopyDone and CopyFail that
  arrive after the COPY ended (or failed) are ignored too. So a Sync the client sent among its CopyData
  is ignored when the COPY succeeds, and when it fails, ends a group only if the server read it after
  the failure, which only the count of ReadyForQuery tells: the proxy then sends a probe of its own
  behind those Syncs (`Request.COPY_PROBE`: Sync, Close of a portal that never exists, Flush), and the
  ReadyForQuery that come before its CloseComplete, but its own, are those Syncs' (the last ones,
  read after the failure); the client's next messages wait for that (see the relay);
- any other message the server reads during COPY IN is a protocol violation: ERROR 08P01, then FATAL.
  A client message that waits for the server's replies while the server waits for COPY data is
  replaced by the proxy's CopyFail (`COPY_INTERRUPTED`): if it ends the COPY, the client gets the ERROR
  Postgres gives its message (`CopyInterrupted`), and the session ends; if the COPY failed first, the
  server ignores it;
- Describe of a statement answers ParameterDescription then RowDescription or NoData; Execute ends with
  CommandComplete, EmptyQueryResponse or PortalSuspended;
- NoticeResponse, NotificationResponse and ParameterStatus may come at any time.

A request of the proxy's own that a client message depends on (its context, a statement prepared again)
speaks to the client when it fails, its error prefixed with what the proxy was doing. One that does not
speak (the Close and Parse that prepare the proxy's statement in front of them) fails for the messages the
server skips with it: the first of them that speaks to the client, up to the Sync, tells the error as if it
had failed, and when the skip took a client Query or FunctionCall, which ended the client's group, the
proxy's Sync ends the skip (`Listener.query_skipped`). For 25P02,
which the server gives every message inside a failed block, the client's message included: that goes to
the client as Postgres would answer its message, naming the routine the relay gave for that message
(field R: exec_bind_message where the server's error named exec_parse_message, the proxy's Parse).
A FATAL is the server's last word before it closes: the client gets it as it is, whatever is owed.

A client Query the proxy answers itself (`Owner.ANSWERED`) is answered when it reaches the head, as
Postgres would at that point: skipped inside an error window, refused with 25P02 in a failed
transaction. A server message that fits no entry is a desync: `ProtocolViolation`, and the session ends.
"""

from __future__ import annotations

import enum
import itertools
import struct
from collections import deque
from typing import Protocol

from proxy.protocol import errors, messages
from proxy.protocol.errors import ProtocolViolation
from proxy.protocol.framing import Message, MessageScanner
from proxy.relay.enums import HotEnum


class Request(HotEnum):
    """What the relay sent upstream that the server owes something for."""

    PARSE = "Parse"
    BIND = "Bind"
    DESCRIBE = "Describe"
    EXECUTE = "Execute"
    CLOSE = "Close"
    SYNC = "Sync"
    QUERY = "Query"
    FUNCTION_CALL = "FunctionCall"
    COPY_END = "CopyDone/CopyFail"  # answered by the Execute or Query that started the COPY
    COPY_DATA = "CopyData"  # answered by nothing: marks where the client's data began
    COPY_PROBE = "Sync, Close, Flush"  # the proxy's probe behind Syncs among the data of a failed COPY
    CONTEXT = "Bind, Execute, Close"  # the proxy's context in front of a transaction: one entry for the three;
    # its watcher acts only on failure (the hot path settles a completed one without telling it)
    SYNC_GROUP = "Parse, Bind, Describe, Execute, Sync"  # a client's whole extended-query group, sent as it came
    # (the hot path of prepared statements): one entry, answered like a simple Query, up to its ReadyForQuery


EXTENDED = frozenset({Request.PARSE, Request.BIND, Request.DESCRIBE, Request.EXECUTE, Request.CLOSE, Request.CONTEXT})
GROUP_ENDS = frozenset({Request.SYNC, Request.QUERY, Request.FUNCTION_CALL, Request.SYNC_GROUP})
# Entries the server answers with nothing once no COPY runs: CopyData, and a CopyDone / CopyFail it ignores.
_COPY_MARKERS = frozenset({Request.COPY_DATA, Request.COPY_END})


class Owner(HotEnum):
    """Whose the replies are."""

    CLIENT = "client"  # forwarded
    OWN = "own"  # the proxy's own request: swallowed, its outcome told to its watcher
    REFUSED = "refused"  # a client message replaced by one that fails: the error becomes the refusal
    ANSWERED = "answered"  # a client Query the proxy answers itself, in order
    GATE = "gate"  # the proxy's own request a client message waits on: swallowed, but its error is the client's


class CopyInterrupted(Exception):
    """The proxy's CopyFail (`COPY_INTERRUPTED`, sent in place of a client message Postgres does not read
    during COPY IN) ended the COPY: the server was in COPY IN when it read it, where it would have read the
    client's message, a protocol violation. `replies` go to the client (what came before, and the ERROR
    Postgres gives that message); then the session ends with 08P01, as Postgres ends it."""

    def __init__(self, replies: bytes) -> None:
        super().__init__("terminating connection because protocol synchronization was lost")
        self.replies = replies


class Outcome(enum.Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"  # inside an error window: the server never ran it


class Watcher(Protocol):
    """Told how one request of the proxy's own (or a client Parse it keeps track of) ended."""

    def ended(self, outcome: Outcome, error: dict[str, str] | None) -> None: ...

    def row(self, values: list[bytes | None]) -> None: ...

    def described(self, raw: bytes) -> None: ...


class Listener(Protocol):
    """The relay's side of the queue: what it must know as replies arrive."""

    def group_ended(self, status: bytes, own: bool) -> None: ...

    def copy_syncs_unknown(self) -> None:
        """A COPY IN failed with Syncs of the client's among its data: send the probe behind them
        (`Request.COPY_PROBE`), whose watcher is told FAILED, with the COPY's error, when the client is
        still in the error window the COPY's failure opened."""

    def parameter_status(self, name: str, value: str, forwarded: bool) -> bool:
        """A ParameterStatus arrived, `forwarded` when it answers the client's request; True when the
        client is told it (the listener may hide one the proxy is about to undo)."""

    def pending_parameters(self) -> bytes: ...

    def query_skipped(self) -> None:
        """A request of the proxy's own failed in front of the client's Query or FunctionCall, which the
        server skipped with it: the server waits for a Sync the client will not send (its Query ended its
        group). The relay sends one; its ReadyForQuery is the client's."""


class Owed:
    """One entry: the request, whose replies they are, and for REFUSED / ANSWERED the bytes to send."""

    __slots__ = ("request", "owner", "reply", "watcher", "rows", "failed", "in_copy", "ends", "continues", "extended",
                 "group_end", "counts_as_client_group", "special", "whole")

    def __init__(self, request: Request, owner: Owner, reply: bytes, watcher: Watcher | None, rows: bool) -> None:
        self.request = request
        self.owner = owner
        self.reply = reply  # REFUSED: the ErrorResponse; ANSWERED: the reply; OWN: a prefix for the client's error,
        # then NUL and the routine Postgres names when it refuses the client's message behind it in a failed block
        # (25P02, which the client then gets without the prefix), if the relay gave one;
        # (OWN COPY_END, the proxy's CopyFail: the text of the client's error when it ends the COPY, `CopyInterrupted`);
        # CLIENT, GATE: for a message naming a statement by its server name, that name, NUL, the client's name
        self.watcher = watcher
        self.rows = rows  # the watcher collects DataRows (an Execute) or the RowDescription / NoData (a Describe)
        self.failed: dict[str, str] | None = None
        self.in_copy = False  # a Sync sent among CopyData: ignored if the COPY succeeds; a probe settles it if not
        # Looked up once here rather than per server message (an enum's hash is Python code):
        self.ends = _ENDS.get(request, _NONE)  # reply types that complete it
        self.continues = _CONTINUES.get(request, _NONE)  # reply types that may come before that
        self.extended = request in EXTENDED  # an error skips to Sync
        self.group_end = request in GROUP_ENDS  # answered with ReadyForQuery
        self.counts_as_client_group = self.group_end and owner is not Owner.OWN
        # The fast path (ReadyForQuery only) may settle it: a client Query or whole group nobody waits on,
        # whose errors go to the client as they are (a group naming a statement the proxy renamed does not).
        self.special = (owner is not Owner.CLIENT or (request is not Request.QUERY and request is not Request.SYNC_GROUP)
                        or watcher is not None or bool(reply))
        self.whole = False  # special, but the whole-read path settles it all the same (`expect_context_group`)

    def client_group_end(self) -> bool:
        return self.counts_as_client_group

    def become_clients(self) -> None:
        """An own Sync whose ReadyForQuery the client gets (its Query was skipped before it)."""
        self.owner = Owner.CLIENT
        self.counts_as_client_group = self.group_end

    def __repr__(self) -> str:
        return f"Owed({self.request.name}, {self.owner.name})"


class CopyState(enum.Enum):
    NONE = "none"
    IN = "in"  # the server reads CopyData; Sync and Flush are ignored until CopyDone / CopyFail


class ErrorWindow(enum.Enum):
    """Whose failure opened the window in which the server skips to the next Sync, as the client sees it.
    Directly, a Query or FunctionCall inside an error window is skipped with no reply at all: only one
    that is itself the message that failed (a request of the proxy's own in front of it failed) is owed
    its ReadyForQuery, which the next Sync (the proxy's) brings."""

    CLIENTS = "client's"  # a client message failed (or was told the error): a client Query skipped here gets nothing
    OWN = "own"  # a request of the proxy's own failed, and no client message was skipped behind it yet
    QUERY_FAILED = "query failed"  # ... and the first skipped behind it was a client Query or FunctionCall


class CopySyncs(enum.Enum):
    """What a Sync the client sends while the server is in COPY IN (before its CopyDone) will be."""

    REAL = "real"  # not inside a COPY IN
    IGNORED = "ignored"  # no CopyData sent yet: the server reads and ignores it before any data
    AMBIGUOUS = "ambiguous"  # after some CopyData: ignored if the COPY succeeds, real if it failed first


# Server messages by their role. The fast path, while every entry is a client Query, needs only three.
FAST_WATCHED = frozenset(b"ZEGS")
FULL_WATCHED = frozenset(b"ZE123tTnCIsGHVNAS")
ROWS_WATCHED = FULL_WATCHED | frozenset(b"D")
_ASYNC = frozenset(b"NAS")
_SESSION_ENDS = frozenset({"FATAL", "PANIC"})  # error severities after which the server closes the connection
# The text of the proxy's CopyFail in place of a client message Postgres does not read during COPY IN, and
# the server's error when that CopyFail ends the COPY (copyfromparse.c).
COPY_INTERRUPTED = "pg-tenant-proxy: the client sent a message other than COPY data"
_INTERRUPTED_ERROR = "COPY from stdin failed: " + COPY_INTERRUPTED
_NONE: frozenset[int] = frozenset()
_HEADER = struct.Struct("!Bi")
_CONTEXT_HEAD = messages.message(b"2") + b"D"  # BindComplete, and the DataRow's type
_CONTEXT_TAIL = messages.message(b"C", b"SELECT 1\0") + messages.message(b"3")  # CommandComplete, CloseComplete
_ENDS = {
    Request.CONTEXT: frozenset(b"3"),
    Request.PARSE: frozenset(b"1"),
    Request.BIND: frozenset(b"2"),
    Request.DESCRIBE: frozenset(b"Tn"),
    Request.EXECUTE: frozenset(b"CIs"),
    Request.CLOSE: frozenset(b"3"),
}
_CONTINUES = {
    Request.CONTEXT: frozenset(b"2DC"),
    Request.DESCRIBE: frozenset(b"t"),
    Request.EXECUTE: frozenset(b"DHdc"),
    Request.QUERY: frozenset(b"TDCIHdcs"),
    Request.SYNC_GROUP: frozenset(b"12ntTDCIsHdc"),  # what Parse, Bind, Describe and Execute answer; no COPY IN
    Request.FUNCTION_CALL: frozenset(b"V"),
    Request.SYNC: frozenset(),
}
# Compared against for every read: bound once (see proxy.relay.enums).
_CONTEXT, _DESCRIBE, _NO_COPY, _PARSE, _SYNC_GROUP_REQUEST = (Request.CONTEXT, Request.DESCRIBE, CopyState.NONE, Request.PARSE,
                                                               Request.SYNC_GROUP)
_PARSE_COMPLETE = messages.message(b"1")
ABORTED = messages.error_response(
    "ERROR", errors.IN_FAILED_TRANSACTION,
    "current transaction is aborted, commands ignored until end of transaction block", routine="exec_simple_query",
)


class ReplyQueue:
    """What one server connection owes, in order, for the relay currently attached to it."""

    def __init__(self, scanner: MessageScanner, listener: Listener | None = None) -> None:
        self.scanner = scanner
        self.listener: Listener = listener or _NO_LISTENER
        self.entries: deque[Owed] = deque()
        self.status = b"I"  # transaction status of the last ReadyForQuery
        self.ended = False  # the server sent its last word (FATAL or PANIC): it closes, nothing more comes
        self.copy = CopyState.NONE
        self._special = 0  # entries that are not a client Query: the fast path needs none
        self._copy_syncs = CopySyncs.REAL  # COPY IN started and no CopyDone / CopyFail sent yet
        self._probe_ready: list[bytes] = []  # ReadyForQuery read while Syncs among the data of a failed COPY are settled
        self._copy_window: dict[str, str] | None = None  # the error of a failed COPY begun by an Execute: the server skips to Sync
        self._skipping = False  # the server skips to the next Sync, and none is owed yet
        self._window = ErrorWindow.CLIENTS  # ... and whose failure opened that window
        self._rows = 0  # entries whose DataRows a watcher collects
        self._whole = 0  # special entries the whole-read path settles all the same (`Owed.whole`)
        self.client_group_ends = 0  # client Queries, Syncs and FunctionCalls owed: the status is not known
        # The listener has ParameterStatus to send before the next ReadyForQuery, or hides some of the
        # client's: every ParameterStatus takes the full walk, where the listener decides.
        self.parameters_pending = False

    # -- what is owed ----------------------------------------------------------------------------

    def expect(self, request: Request, owner: Owner = Owner.CLIENT, reply: bytes = b"", watcher: Watcher | None = None,
               rows: bool = False) -> None:
        """The relay sent `request` upstream (or, ANSWERED, will answer it itself in order)."""
        if self._skipping:
            if request is not Request.SYNC:
                if self._window is ErrorWindow.OWN and owner is not Owner.OWN:  # the client message that failed
                    self._window = ErrorWindow.QUERY_FAILED if request in GROUP_ENDS else ErrorWindow.CLIENTS
                if watcher is not None:
                    watcher.ended(Outcome.SKIPPED, None)
                return
            self._skipping = False
            if self._window is ErrorWindow.QUERY_FAILED and owner is Owner.OWN:
                owner = Owner.CLIENT  # the client's Query failed with the proxy's request: this Sync's ReadyForQuery is its
        if request is Request.SYNC and self._copy_syncs is CopySyncs.IGNORED:
            if watcher is not None:
                watcher.ended(Outcome.SKIPPED, None)
            return
        if request is Request.COPY_DATA or request is Request.COPY_END:
            if not self.entries:
                return  # nothing pending: the server ignores CopyData, CopyDone and CopyFail
            if request is Request.COPY_DATA:
                if self._copy_syncs is CopySyncs.IGNORED:
                    self._copy_syncs = CopySyncs.AMBIGUOUS
                if self.entries[-1].request is Request.COPY_DATA:
                    return
            else:
                self._copy_syncs = CopySyncs.REAL
        entry = Owed(request, owner, reply, watcher, rows)
        entry.in_copy = request is Request.SYNC and self._copy_syncs is CopySyncs.AMBIGUOUS
        self._special += entry.special
        self._rows += rows
        self.client_group_ends += entry.client_group_end()
        self.entries.append(entry)

    def expect_query(self) -> None:
        """A client's simple Query whose replies are all forwarded (the hot path's one entry, shared)."""
        self.client_group_ends += 1
        self.entries.append(_PLAIN_QUERY)

    def expect_context_query(self, context: Owed) -> None:
        """The transaction-mode hot path's two entries: the proxy's context (`context`, an OWN CONTEXT
        entry the session keeps and reuses) and the client's simple Query behind it, whose replies are
        all forwarded. Only when the server is not skipping and no COPY runs (a new transaction)."""
        self._special += 1
        self.client_group_ends += 1
        self.entries.extend((context, _PLAIN_QUERY))

    def expect_sync_group(self) -> None:
        """A client's whole extended-query group, up to its Sync, sent as it came (the hot path of prepared
        statements): one entry, shared, whose replies all go to the client, up to its ReadyForQuery. Only
        when the server is not skipping and the group cannot start COPY IN."""
        self.client_group_ends += 1
        self.entries.append(SYNC_GROUP)

    def expect_context_group(self, context: Owed, group: Owed, parse: Owed | None = None) -> None:
        """The transaction-mode hot path of drivers' extended-query groups, sent as one write: the proxy's
        context (`context`, an OWN CONTEXT entry with no watcher, reused), then maybe a client's Parse of
        the unnamed statement (`parse`, a PARSE entry whose watcher is told how it ended), then the client's
        whole group (`group`: the rest of it, a SYNC_GROUP entry; with `reply` when its errors name a
        statement the proxy renamed). Only when the server is not skipping, no COPY runs, and the group
        cannot start one. The whole-read path settles them all when the replies come whole."""
        self.client_group_ends += 1
        if parse is None:
            self.entries.extend((context, group))
        else:
            parse.whole = True
            self._special += 1
            self._whole += 1
            self.entries.extend((context, parse, group))
        self._special += 1
        if group.special:
            group.whole = True
            self._special += 1
            self._whole += 1

    def idle(self) -> bool:
        """Nothing is owed: every request sent has been answered, and the server is not skipping to a
        Sync not sent yet."""
        return not self.entries and not self._skipping

    def awaiting_copy_end(self) -> bool:
        """The server is in COPY IN and no CopyDone or CopyFail has been sent for it: it reads nothing but
        CopyData, Flush and Sync until one comes."""
        return self.copy is not _NO_COPY and self._copy_syncs is not CopySyncs.REAL

    def reading_messages(self) -> bool:
        """No client group is owed and no COPY runs: the server reads the next message as a message (during
        COPY IN it reads only CopyData, CopyDone, CopyFail, Flush and Sync)."""
        return not self.groups_owed() and self.copy is _NO_COPY

    def skipping(self) -> bool:
        """The server skips to a Sync not sent yet (an error inside the client's group)."""
        return self._skipping

    def groups_owed(self) -> int:
        """Client Queries, Syncs and FunctionCalls whose ReadyForQuery has not come: while any is owed the
        transaction status is not known. A Sync the client sent among CopyData counts until the COPY's
        outcome (or the probe after a failure) says whether the server read it as a Sync."""
        return self.client_group_ends

    def answer_ready(self) -> bytes:
        """Replies the proxy owes the client now, for ANSWERED entries at the head (sent when the
        queue was otherwise idle)."""
        out: list[bytes | memoryview] = []
        self._answer_heads(out)
        return b"".join(out)

    # -- replies ---------------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes | memoryview:
        """Account for bytes from the server; return what goes to the client.

        Raises ProtocolViolation when the server sends a message no entry can explain."""
        scanner = self.scanner
        entries = self.entries
        no_copy = self.copy is _NO_COPY
        if entries and no_copy and not self.parameters_pending and scanner.at_boundary():
            special = self._special - self._whole
            if not special or (special == 1 and entries[0].request is _CONTEXT):
                whole = self._whole_read(data, special)
                if whole is not None:
                    return whole
            if entries[0].request is _CONTEXT:
                data = self._context_answered(data)
        if not self._special and no_copy and not self.parameters_pending and not scanner.holding():
            scanner.watched = FAST_WATCHED
            for message in scanner.watched_messages(data):
                self._fast(message)
            held = scanner.holding()
            return data[:-held] if held else data
        scanner.watched = ROWS_WATCHED if self._rows else FULL_WATCHED
        out: list[bytes | memoryview] = []
        for segment in scanner.scan(data):
            if type(segment) is Message:
                self._message(segment, out)
            elif not self.entries or self.entries[0].owner is Owner.CLIENT:
                out.append(segment)  # type: ignore[arg-type]  # DataRow, CopyData: where the head's replies go
        return b"".join(out)

    def _whole_read(self, data: bytes, context: int) -> bytes | None:
        """The hot path: a read of whole messages answering client simple Queries or whole groups (behind
        the proxy's context, `context` = 1, whose four replies open the read), the ParseComplete of a
        client's Parse of the unnamed statement next when one is owed there (behind the context, or at the
        head when the context's replies came in a read of their own), holding at most one ReadyForQuery and
        no CopyInResponse, ParameterStatus or ErrorResponse. Settled with one header read per message; returns what
        goes to the client. None, with nothing changed, for any other read: the scanner's walk takes it."""
        unpack = _HEADER.unpack_from
        maximum = self.scanner.maximum
        end = len(data)
        pos = 0
        parse = None
        entries = self.entries
        if context:
            pos = _context_end(data)
            if pos < 0:
                return None
        if len(entries) > context and entries[context].request is _PARSE:
            if data[pos:pos + 5] != _PARSE_COMPLETE:
                return None
            parse = entries[context]
        start = pos
        ready = -1
        while pos < end:
            if end - pos < 5:
                return None
            code, length = unpack(data, pos)
            if length < 4 or length > maximum or code == 71 or code == 83 or code == 69:  # 'G', 'S', 'E'
                return None
            if code == 90:  # 'Z'
                if ready >= 0:
                    return None
                ready = pos
            pos += 1 + length
        if pos != end:
            return None
        if context:  # _context_completed, inlined on the hot path (no CopyData marker can follow: special was 1)
            entries.popleft()
            self._special -= 1
        if parse is not None:
            entries.popleft()
            self._special -= 1
            self._whole -= 1
            parse.watcher.ended(Outcome.COMPLETED, None)  # type: ignore[union-attr]
        if ready >= 0:
            if not entries:
                raise ProtocolViolation("server sent ReadyForQuery with nothing owed")
            if entries.popleft().whole:  # a renamed group
                self._special -= 1
                self._whole -= 1
            self.client_group_ends -= 1
            self.status = data[ready + 5:ready + 6]
            self.listener.group_ended(self.status, False)
        return data[start:] if start else data

    def _context_answered(self, data: bytes) -> bytes:
        """The proxy's context at the head, answered as it is nearly always, whole at the start of the
        read (`_context_end`): settled, and the rest of the read is what follows. Anything else is left
        to the full walk."""
        pos = _context_end(data)
        if pos < 0:
            return data
        self._context_completed()
        return data[pos:]

    def _context_completed(self) -> None:
        """The CONTEXT entry at the head completed: taken out without telling its watcher, which acts only
        on failure."""
        self.entries.popleft()
        self._special -= 1
        self._drop_markers()

    def _fast(self, message: Message) -> None:
        """While every entry is a client Query: only ReadyForQuery and the start of a COPY matter."""
        kind = message.type
        if kind == b"Z":
            if not self.entries:
                raise ProtocolViolation("server sent ReadyForQuery with nothing owed")
            self.entries.popleft()
            self.client_group_ends -= 1
            self.status = message.raw[5:6]
            self.listener.group_ended(self.status, False)
        elif kind == b"G" and self.entries:
            self._copy_started()
        elif kind == b"S":
            self.listener.parameter_status(*messages.parse_parameter_status(message.body), True)
        elif kind == b"E" and _last_word(messages.parse_error_fields(message.body)):
            self.ended = True

    def _message(self, message: Message, out: list[bytes | memoryview]) -> None:
        kind = message.type
        entries = self.entries
        head = entries[0] if entries else None
        if kind[0] in _ASYNC:
            forwarded = head is None or head.owner is not Owner.OWN or kind == b"A"  # a notification is the client's
            if kind == b"S":
                forwarded = self.listener.parameter_status(*messages.parse_parameter_status(message.body), forwarded)
            if forwarded:
                out.append(message.raw)
            return
        if kind == b"E":
            fields = messages.parse_error_fields(message.body)
            last = _last_word(fields)
            if head is None or last:
                # The server's FATAL, sent on its own (shutdown, idle timeout) or in place of what it owes (a
                # protocol violation by the client, such as a Parse during COPY IN): its last word before it
                # closes the connection, which the client gets as it is, as from Postgres directly.
                out.append(message.raw)
                self.ended = self.ended or last
                return
        elif head is None:
            raise ProtocolViolation(f"server sent message {kind!r} with nothing owed")
        if head.in_copy:  # Syncs among the data of a failed COPY, with the proxy's probe behind them
            self._copy_syncs_probed(message, out)
        elif kind == b"E":
            self._error(head, fields, message, out)
        elif kind == b"Z":
            self._ready(head, message, out)
        else:
            self._progress(head, message, out)
        self._answer_heads(out)

    def _copy_syncs_probed(self, message: Message, out: list[bytes | memoryview]) -> None:
        """A reply while Syncs the client sent among the data of a failed COPY are at the head: each
        ReadyForQuery is kept until the CloseComplete of the proxy's probe behind them. All but the last
        (the probe's own) answered the last of those Syncs, which the server read after the failure; it
        ignored the others, read during COPY IN. When it read none after a failure that an Execute
        began (the server skipping to a Sync), the probe's watcher is told FAILED: its Sync ended the
        error window that the client's messages are still in, up to the client's next Sync."""
        if message.type == b"Z":
            self._probe_ready.append(message.raw)
            return
        if message.type != b"3":
            raise ProtocolViolation(f"server sent message {message.type!r} while it owes the proxy's probe after a failed COPY")
        entries = self.entries
        syncs = sum(1 for entry in itertools.takewhile(lambda entry: entry.request is not Request.COPY_PROBE, entries)
                    if entry.in_copy)
        ready, self._probe_ready = self._probe_ready, []
        read = len(ready) - 1
        if not 0 <= read <= syncs:
            raise ProtocolViolation(f"server sent {len(ready)} ReadyForQuery for {syncs} Syncs among COPY data and a probe")
        for index in range(syncs):
            if index < syncs - read:
                self._pop(Outcome.SKIPPED, None)
                continue
            raw = ready[index - (syncs - read)]
            out.append(self.listener.pending_parameters())
            out.append(raw)
            self.status = raw[5:6]
            self._pop(Outcome.COMPLETED, None)
            self.listener.group_ended(self.status, False)
        if not entries or entries[0].request is not Request.COPY_PROBE:
            raise ProtocolViolation("server answered a probe the proxy did not send")
        self.status = ready[-1][5:6]
        follower = next((entry for entry in itertools.islice(entries, 1, None) if entry.request not in _COPY_MARKERS), None)
        window = self._copy_window if read == 0 and (follower is None or follower.request is not Request.SYNC) else None
        self._copy_window = None
        self._pop(Outcome.FAILED if window else Outcome.COMPLETED, window)
        self.listener.group_ended(self.status, True)

    def _progress(self, head: Owed, message: Message, out: list[bytes | memoryview]) -> None:
        kind = message.type
        code = kind[0]
        if code == 67 and self.copy is CopyState.IN:  # 'C'
            self._copy_ended(succeeded=True)
        if code in head.ends:
            if head.rows and head.request is _DESCRIBE:
                head.watcher.described(message.raw)  # type: ignore[union-attr]
            self._pop(Outcome.COMPLETED, None)
        elif code == 71 and head.request in (Request.EXECUTE, Request.QUERY):  # 'G'
            self._copy_started()
        elif code not in head.continues:
            raise ProtocolViolation(f"server sent message {kind!r} while it owes the reply to {head.request.value}")
        elif code == ord("D") and head.rows:
            head.watcher.row(messages.parse_data_row(message.body))  # type: ignore[union-attr]
        if head.owner is Owner.CLIENT:
            out.append(message.raw)

    def _error(self, head: Owed, fields: dict[str, str], message: Message, out: list[bytes | memoryview]) -> None:
        if self.copy is CopyState.IN and fields.get("M") == _INTERRUPTED_ERROR:
            end = next((entry for entry in self.entries if entry.request is Request.COPY_END), None)
            if end is not None and end.owner is Owner.OWN:  # read before any CopyDone / CopyFail of the client's
                out.append(_violation(message.raw, end.reply))
                raise CopyInterrupted(b"".join(out))
        own = head.owner is Owner.OWN
        speaker = self._speaker() if own and head.extended and not head.reply else head
        if speaker.owner is Owner.CLIENT or speaker.owner is Owner.GATE:
            out.append(_renamed(message.raw, speaker.reply) if speaker.reply else message.raw)
        elif speaker.owner is Owner.REFUSED:
            out.append(speaker.reply)
        elif speaker.reply and fields.get("C") == errors.IN_FAILED_TRANSACTION:
            # The proxy's own request, refused only because the client's block had failed: the client's
            # message behind it would have met the same refusal, which is what Postgres tells it.
            routine = speaker.reply.partition(b"\0")[2]
            out.append(_with_routine(message.raw, routine) if routine else message.raw)
        elif speaker.reply:  # the proxy's own request, whose failure the client must hear of
            prefix = speaker.reply.partition(b"\0")[0].decode()
            out.append(messages.error_response(
                "ERROR", fields.get("C", errors.INTERNAL_ERROR), prefix + fields.get("M", ""), hint=fields.get("H")
            ))
        if self.copy is CopyState.IN:
            self._copy_ended(succeeded=False, window=fields if head.extended else None)
        if head.extended:
            self._pop(Outcome.FAILED, fields)
            self._skip_to_sync(fields, own)
        elif head.watcher is not None:  # a Query, FunctionCall or Sync someone waits on: its end says it failed
            head.failed = head.failed or fields

    def _speaker(self) -> Owed:
        """The entry that tells the client the error of a request of the proxy's own that does not speak
        (the head): the first behind it, up to the next Sync, that the client hears from, whose message
        the server skips for that error; the head itself when there is none (the proxy's own group)."""
        for entry in itertools.islice(self.entries, 1, None):
            if entry.request is Request.SYNC:
                break
            if entry.owner is not Owner.OWN or entry.reply:
                return entry
        return self.entries[0]

    def _skip_to_sync(self, fields: dict[str, str], own: bool) -> None:
        """Drop what the server skips after an error in extended-query mode (`own`: of a request of the
        proxy's own). The first client message skipped behind a request of the proxy's own is the one that
        failed, as the client sees it (`ErrorWindow`): when that is a Query or FunctionCall, it gets its
        ReadyForQuery from the proxy's own Sync behind it, asked of the listener when none is owed yet. A
        client Query or FunctionCall skipped in the client's own error window gets nothing, as directly."""
        window = ErrorWindow.OWN if own else ErrorWindow.CLIENTS
        while self.entries and self.entries[0].request is not Request.SYNC and self.entries[0].request is not _SYNC_GROUP_REQUEST:
            # (a whole group holds its own Sync: the server skips only to the end of it)
            if window is ErrorWindow.OWN and self.entries[0].owner is not Owner.OWN:
                window = ErrorWindow.QUERY_FAILED if self.entries[0].client_group_end() else ErrorWindow.CLIENTS
            self._pop(Outcome.SKIPPED, None)
        if not self.entries:
            self._skipping = True  # the Sync that ends it is not sent yet
            self._window = window
            if window is ErrorWindow.QUERY_FAILED:
                self.listener.query_skipped()
        elif self.entries[0].owner is Owner.OWN:
            if window is ErrorWindow.QUERY_FAILED:
                self.entries[0].become_clients()
                self.client_group_ends += 1
            else:
                self.entries[0].failed = fields  # the proxy's Sync ends a window its client is still in

    def _ready(self, head: Owed, message: Message, out: list[bytes | memoryview]) -> None:
        if not head.group_end:
            raise ProtocolViolation(f"server sent ReadyForQuery while it owes the reply to {head.request.value}")
        if head.owner is not Owner.OWN:
            out.append(self.listener.pending_parameters())
            out.append(message.raw)
        self.status = message.raw[5:6]
        self._pop(Outcome.FAILED if head.failed else Outcome.COMPLETED, head.failed)
        self.listener.group_ended(self.status, head.owner is Owner.OWN)

    def _pop(self, outcome: Outcome, error: dict[str, str] | None) -> None:
        entry = self.entries.popleft()
        if entry.special:
            self._special -= 1
            if entry.whole:
                self._whole -= 1
        self._rows -= entry.rows
        self.client_group_ends -= entry.client_group_end()
        if entry.watcher is not None:
            entry.watcher.ended(outcome, error)
        self._drop_markers()

    def _drop_markers(self) -> None:
        """Entries nothing answers, once at the head: CopyData markers, and a CopyDone / CopyFail the
        server ignores because no COPY is running."""
        entries = self.entries
        while entries and (
            entries[0].request is Request.COPY_DATA or (entries[0].request is Request.COPY_END and self.copy is CopyState.NONE)
        ):
            entries.popleft()
            self._special -= 1

    def _answer_heads(self, out: list[bytes | memoryview]) -> None:
        """Send what the proxy answers itself for the client Queries now at the head."""
        while self.entries and self.entries[0].owner is Owner.ANSWERED:
            entry = self.entries[0]
            if entry.request is Request.QUERY:
                out.append(ABORTED if self.status == b"E" else entry.reply)
            out.append(self.listener.pending_parameters())
            out.append(messages.ready_for_query(self.status))
            self._pop(Outcome.COMPLETED, None)
            self.listener.group_ended(self.status, False)

    # -- COPY ------------------------------------------------------------------------------------

    def _copy_started(self) -> None:
        """CopyInResponse. The server ignores the Syncs it reads before the client's CopyDone / CopyFail:
        those sent before any CopyData for certain; those sent among CopyData unless the COPY fails
        before the server reads them (the server reads CopyData one message at a time)."""
        if self.entries[0].request is Request.SYNC_GROUP:
            raise ProtocolViolation("server started COPY IN for a group sent as one, with its Sync")
        self.copy = CopyState.IN
        self._special += 1  # the full walk, until the COPY ends
        kept: deque[Owed] = deque([self.entries.popleft()])
        state = CopySyncs.IGNORED
        while self.entries:
            entry = self.entries.popleft()
            if state is not CopySyncs.REAL:
                if entry.request is Request.COPY_DATA:
                    state = CopySyncs.AMBIGUOUS
                elif entry.request is Request.COPY_END:
                    state = CopySyncs.REAL
                elif entry.request is Request.SYNC:
                    if state is CopySyncs.IGNORED:
                        self._special -= 1
                        self.client_group_ends -= entry.client_group_end()
                        if entry.watcher is not None:
                            entry.watcher.ended(Outcome.SKIPPED, None)
                        continue
                    entry.in_copy = True
            kept.append(entry)
        self.entries = kept
        self._copy_syncs = state

    def _copy_ended(self, succeeded: bool, window: dict[str, str] | None = None) -> None:
        """CommandComplete (`succeeded`) or ErrorResponse of the COPY (`window`: its error, when an Execute
        began it and the server now skips to a Sync). Its CopyDone / CopyFail is answered; one not sent
        yet is ignored by the server when it comes (the client need not send it after a failure), and
        its entry is dropped once at the head (`_drop_markers`): nothing of this COPY is left to meet a
        later COPY's CopyDone. Syncs sent among the CopyData were ignored if the COPY
        succeeded; after a failure, the listener sends the probe that settles them
        (`_copy_syncs_probed`)."""
        self.copy = CopyState.NONE
        self._special -= 1
        self._copy_syncs = CopySyncs.REAL
        kept: deque[Owed] = deque()
        end_found = probe_due = False
        for entry in self.entries:
            if not end_found:
                if entry.request is Request.COPY_END:
                    end_found = True
                    self._special -= 1
                    continue
                if entry.in_copy and succeeded:
                    self._special -= 1
                    self.client_group_ends -= entry.client_group_end()
                    if entry.watcher is not None:
                        entry.watcher.ended(Outcome.SKIPPED, None)
                    continue
                probe_due = probe_due or entry.in_copy
            kept.append(entry)
        self.entries = kept
        if probe_due:
            self._copy_window = window
            self.listener.copy_syncs_unknown()


def _last_word(fields: dict[str, str]) -> bool:
    """An ErrorResponse's `fields` are a FATAL or PANIC: the server closes the connection after it."""
    return fields.get("V", fields.get("S")) in _SESSION_ENDS


def _context_end(data: bytes) -> int:
    """Where the replies to the proxy's context end when `data` opens with them whole: BindComplete, the
    DataRow, then CommandComplete and CloseComplete, always the same bytes but for the DataRow; -1
    otherwise."""
    if len(data) < 10 or not data.startswith(_CONTEXT_HEAD):
        return -1
    _, length = _HEADER.unpack_from(data, 5)
    end = 6 + length
    if length < 4 or not data.startswith(_CONTEXT_TAIL, end):
        return -1
    return end + len(_CONTEXT_TAIL)


def _with_routine(raw: bytes, routine: bytes) -> bytes:
    """The ErrorResponse `raw` with its routine (field R) replaced by `routine`; the other fields (F and L
    included) as they were."""
    fields = b"".join(field + b"\0" for field in raw[5:].split(b"\0") if field and field[:1] != b"R")
    return messages.message(b"E", fields + b"R" + routine + b"\0\0")


def _violation(raw: bytes, text: bytes) -> bytes:
    """The server's ErrorResponse to the proxy's CopyFail made the one Postgres gives a client message it
    does not read during COPY IN: read at the same point, it has the same fields (severity, the COPY's
    line as context, where it was raised) but for the SQLSTATE, 08P01, and the text."""
    fields = [field for field in raw[5:].split(b"\0") if field]
    code = b"C" + errors.PROTOCOL_VIOLATION.encode()
    body = [code if field[:1] == b"C" else b"M" + text if field[:1] == b"M" else field for field in fields]
    return messages.message(b"E", b"\0".join(body) + b"\0\0")


def _renamed(raw: bytes, rename: bytes) -> bytes:
    """An ErrorResponse naming the server-side name of a client's statement, with the client's name:
    `rename` is the server name, NUL, the client name."""
    server_name, _, client_name = rename.partition(b"\0")
    return messages.message(b"E", raw[5:].replace(server_name, client_name))


_PLAIN_QUERY = Owed(Request.QUERY, Owner.CLIENT, b"", None, False)
SYNC_GROUP = Owed(Request.SYNC_GROUP, Owner.CLIENT, b"", None, False)  # shared: nothing in it changes


class _NoListener:
    """Stands in before a relay attaches (replies then are the proxy's own)."""

    def group_ended(self, status: bytes, own: bool) -> None:
        """Nobody to tell."""

    def copy_syncs_unknown(self) -> None:
        """Nobody sends a probe: the Syncs stay owed, and the server connection is not reused."""

    def parameter_status(self, name: str, value: str, forwarded: bool) -> bool:
        """Nobody to tell."""
        return forwarded

    def pending_parameters(self) -> bytes:
        return b""

    def query_skipped(self) -> None:
        """Nobody sends the Sync: the server connection stays skipping, and is not reused."""


_NO_LISTENER = _NoListener()
