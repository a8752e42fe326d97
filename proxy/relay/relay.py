"""The client-to-server stream of one session: every client message, what goes upstream for it, and
what the server will owe (`ReplyQueue`), in session or transaction mode.

The relay does no I/O. Bytes from the client come in through `client_data`, bytes from the server
through `server_data`; what must happen goes out through the few hooks of `Hooks` (write to either
side, ask for a server connection, give it back, end the session). The mode is a strategy:

- **SessionMode**: the client keeps its server connection. The signed context is set for the whole
  session in a Sync group of the proxy's own before any client message (never pipelined, so no client
  rollback can undo it), and again right after a RESET ALL or DISCARD ALL.
- **TransactionMode**: the client holds a server connection for one transaction at a time. Before the
  first statement of each transaction the proxy's own Bind and Execute set the context with
  `set_config(..., true)`, in the same write and the same implicit transaction as the client's
  statement, with no Sync between: if it fails the server skips the client's messages, a rollback
  takes the context with it, and a server connection between transactions holds none. Named and
  unnamed prepared statements, settings and the unnamed statement follow the client
  (`statements`, `settings`).

Every message is read whole (the hot path: one simple Query per read is forwarded as it came, with
only its header looked at and the guard's pre-scan run on its text).
"""

from __future__ import annotations

import enum
import itertools
import re
import struct
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from proxy.guard import ALLOW, Decision, Refusal, classifier
from proxy.lexing import SQLSTATE as LEXING_SQLSTATE
from proxy.lexing import lexing_problem
from proxy.metrics import METRICS
from proxy.protocol import errors, messages
from proxy.protocol.errors import ProtocolViolation, UpstreamProtocolViolation
from proxy.protocol.framing import GROUP_MESSAGES, Message, MessageScanner, Segment
from proxy.relay.replies import (
    COPY_INTERRUPTED, SYNC_GROUP, CopyInterrupted, Outcome, Owed, Owner, ReplyQueue, Request, Watcher,
)
from proxy.relay.settings import (
    APPLY_SQL,
    APPLY_STATEMENT,
    READ_SQL,
    READ_STATEMENT,
    REAPPLY_SQL,
    REAPPLY_STATEMENT,
    RESEED,
    ClientSettings,
    apply_bind,
    close_portal,
    read_bind,
    reset_query,
)
from proxy.relay.statements import (
    NAME_BYTES,
    NEVER_PREPARED,
    PARSE_CHECK,
    PREFIX,
    UNCHANGED,
    Change,
    ClientStatements,
    ServerStatements,
    ShapeWatch,
    Statement,
    StatementBudget,
    statement_for,
    unnamed_statement,
)

if TYPE_CHECKING:
    from proxy.guard import Guard
    from proxy.tenant import ContextBuilder

CLIENT_WATCHED = b"QPBDESCHFXcf"  # everything but CopyData
CLIENT_PASSED = b"d"  # CopyData; any other type is no frontend message after login (postgres.c, SocketBackend)
COPY_IN_READS = frozenset(b"cfHS")  # what Postgres reads during COPY IN besides CopyData (postgres.c, CopyGetData)
HELD_HIGH_WATER = 256 * 1024  # bytes held from a client waiting for its server connection before reading pauses
RESERVED_HINT = "names starting with pg_tenant_proxy_ belong to the proxy; choose another name"
# What a tenant may leave on a server connection, reset when the next client is another tenant's:
# DISCARD ALL but for DEALLOCATE ALL and DISCARD PLANS, so the prepared statements the proxy shares
# (by digest, tenant-neutral) survive, and random()'s seed drawn anew (`RESEED`). With the guard on,
# tenant_proxy.reset_session() runs the same (the seed in the proxy's own call, so an install of the
# verifier older than this needs no upgrade for it); with it off, SQL-level PREPARE is possible too, and
# DEALLOCATE ALL is added.
TENANT_SWITCH_RESET = (
    "SET SESSION AUTHORIZATION DEFAULT; RESET ALL; CLOSE ALL; UNLISTEN *;"
    f" SELECT pg_catalog.pg_advisory_unlock_all(), {RESEED}; DISCARD TEMP; DISCARD SEQUENCES"
)
UNGUARDED_RESET = messages.query(TENANT_SWITCH_RESET + "; DEALLOCATE ALL")
RESET_STATEMENT = b"pg_tenant_proxy_reset"
RESET_SQL = f"SELECT tenant_proxy.reset_session(), {RESEED}"
RESET_BIND = messages.bind(RESET_STATEMENT.decode(), RESET_STATEMENT.decode(), [])
RESET_EXECUTE = messages.execute(RESET_STATEMENT.decode())
_MARKER = "pg_tenant_proxy_refused"
CONTEXT_FAILED = b"could not set the tenant context: "
PREPARED_AGAIN_FAILED = b"could not prepare the statement again on this server connection: "
# The routine Postgres names (field R) when, inside a failed block, it refuses the client's message that a
# statement prepared again goes in front of: the proxy's Parse meets that 25P02 first and answers for it.
IN_PARSE, IN_BIND, IN_DESCRIBE = b"exec_parse_message", b"exec_bind_message", b"exec_describe_statement_message"
_DEALLOCATE_COMPLETE = messages.message(b"C", b"DEALLOCATE\0")
# Postgres's answer to a Bind or Describe of a statement whose result shape changed, naming the routine that
# raises it: asyncpg knows it by that (InvalidCachedStatementError), drops its cache and prepares again.
RESULT_CHANGED = messages.error_response(
    "ERROR", errors.FEATURE_NOT_SUPPORTED, "cached plan must not change result type", routine="RevalidateCachedQuery"
)
FLUSH = messages.message(b"H")
# The probe behind Syncs the client sent among the data of a COPY that failed (`ReplyQueue._copy_syncs_probed`):
# a Sync, then a Close of a portal no one can name, whose CloseComplete the Flush brings at once.
COPY_PROBE = messages.sync() + messages.message(b"C", b"P" + NEVER_PREPARED + b"\0") + FLUSH
# The proxy's CopyFail in place of a client message Postgres does not read during COPY IN (`Relay._interrupt_copy`).
COPY_INTERRUPT = messages.message(b"f", messages.cstring(COPY_INTERRUPTED))
_SESSIONS = itertools.count(1)
STAND_IN = b"\0SELECT NULL\0\0\0"  # a Parse definition (text, no parameter types) that cannot fail
READ_RETRIES = 3  # a group of the proxy's own cancelled (57014) this many times in a row is not sent again
TIMEOUT = "statement_timeout"  # set to 0 in front of a reset or settings group (`_lift_timeout`)
LIFT_TIMEOUT = messages.query("SET statement_timeout = 0")


class CopyInput(enum.Enum):
    """Where the client is in sending COPY data, as far as the Syncs among it matter. During COPY IN the
    server ignores a Sync; after the COPY failed it reads one as a Sync: only the server's replies tell
    which (`ReplyQueue`), so a Sync the client sends after CopyData ends its group only once they have."""

    NONE = "none"
    DATA = "data"  # CopyData sent since the last CopyDone / CopyFail
    SYNCED = "synced"  # ... and Syncs after it whose fate is not known yet: what is not COPY data waits
    ENDED = "ended"  # ... and the CopyDone / CopyFail: everything the client sends next waits


class Forwarded(enum.Enum):
    """Where the client's bytes sent upstream end. A client read may end inside a CopyData, whose first
    part goes on as it came: the proxy's own messages must not go upstream until its rest has."""

    AT_BOUNDARY = "at a message boundary"
    INSIDE_COPY_DATA = "inside a CopyData"  # the next client read opens with its rest


# Compared against for every CopyData and client message: bound once (see proxy.relay.enums).
_NO_COPY_INPUT, _COPY_ENDED = CopyInput.NONE, CopyInput.ENDED
_INSIDE_COPY_DATA = Forwarded.INSIDE_COPY_DATA

class Hooks(Protocol):
    """What the relay needs from the asyncio side."""

    def send_upstream(self, data: bytes) -> None: ...

    def send_client(self, data: bytes | memoryview) -> None: ...

    def need_server(self) -> None: ...

    def release_server(self) -> None: ...

    def prepared(self) -> None: ...

    def fail(self, sqlstate: str, text: str, hint: str | None = None) -> None: ...

    def terminated(self) -> None: ...

    def hold_client(self, held: bool) -> None: ...

    def refused(self, refusal: Refusal) -> None: ...

    def transactions_ended(self, count: int) -> None: ...

    def cancel_server(self) -> None: ...

    def cancel_dropped(self) -> None: ...

    def server_ended(self) -> None: ...


@dataclass
class ServerState:
    """What one server connection holds between clients: the tenant it last served (under transaction
    pooling, the one whose session state it may carry), its session settings, its statements, the
    parameters it reported."""

    statements: ServerStatements
    tenant: str | None = None
    client: int = 0  # the serial number of the session it last served
    unnamed_settings: bool = False  # it may hold settings its last client set under names the proxy cannot read
    settings: dict[str, str] = field(default_factory=dict)
    parameters: dict[str, str] = field(default_factory=dict)


class ServerLink(Protocol):
    """A server connection as the relay sees it."""

    process_id: int
    queue: ReplyQueue
    state: ServerState


class Identity(Protocol):
    @property
    def tenant(self) -> str: ...

    @property
    def expires_at(self) -> int: ...

    @property
    def claims_json(self) -> str: ...


def refusal_error(refusal: Refusal) -> bytes:
    return messages.error_response("ERROR", refusal.sqlstate, refusal.message, hint=refusal.hint)


def reserved(kind: str, name: bytes) -> Refusal:
    return Refusal(
        errors.INSUFFICIENT_PRIVILEGE, f'{kind} name "{name.decode(errors="replace")}" is reserved for pg-tenant-proxy', RESERVED_HINT
    )


class OwnRequest:
    """A request of the proxy's own: its outcome goes to `on_end`, its DataRows to `rows`."""

    __slots__ = ("on_end", "rows")

    def __init__(self, on_end: object, rows: list[list[bytes | None]] | None = None) -> None:
        self.on_end = on_end
        self.rows = rows

    def ended(self, outcome: Outcome, error: dict[str, str] | None) -> None:
        self.on_end(outcome, error)  # type: ignore[operator]

    def row(self, values: list[bytes | None]) -> None:
        if self.rows is not None:
            self.rows.append(values)

    def described(self, raw: bytes) -> None:
        """The proxy's own Describes are watched by a `ShapeWatch`."""


class Relay:
    """One client session's stream. See the module docstring."""

    # Slots, not a __dict__: Python 3.11 keeps an instance's attributes inline (and specialises every
    # access to them) only while its class has fewer than 30 instance attribute names; from the 30th on,
    # each read of one takes a slower path, and method lookups on the relay are not specialised at all
    # (3,600 instructions per transaction when the 30th came; bench/PROFILE.md).
    __slots__ = (
        "hooks", "serial", "guard", "context", "identity", "settings", "scanner", "server", "queue", "held",
        "held_bytes", "preparing", "mid_group", "sync_owed", "describing", "client_view", "_pending_parameters",
        "_hidden_parameters", "terminated", "transactions_ended", "skip_group", "copy_input", "copy_syncs",
        "follow_ups_wait", "copying", "group_may_copy", "cancel_wanted", "mode", "pooled", "_out", "_held_group_read",
        "forwarded", "_own_behind",
    )

    def __init__(
        self,
        hooks: Hooks,
        guard: Guard | None,
        context: ContextBuilder,
        identity: Identity,
        settings: ClientSettings,
        transaction_mode: bool,
        max_message: int,
        max_statement_bytes: int,
        budget: StatementBudget | None = None,
    ) -> None:
        self.hooks = hooks
        self.serial = next(_SESSIONS)  # tells a server connection which session it last served
        self.guard = guard
        self.context = context
        self.identity = identity
        self.settings = settings
        self.scanner = MessageScanner(CLIENT_WATCHED, max_message, CLIENT_PASSED)
        self.server: ServerLink | None = None
        self.queue: ReplyQueue | None = None
        self.held: deque[Segment] = deque()
        self.held_bytes = 0
        # `held` was exactly one read that is one whole extended-query group: that read, where its messages
        # start (`MessageScanner.sync_group`), and its first message (while `held` still opens with it and
        # holds as many, it is that read), for the hot path when a server connection comes
        self._held_group_read: tuple[bytes, list[int], Segment] | None = None
        self.preparing = False  # the proxy's own exchange runs before the client's messages
        self.mid_group = False  # extended-query messages sent since the last Sync
        # The client's extended-query group is open although a Sync of the proxy's closed it upstream
        # (TransactionMode.read_done): the client still owes its Sync (or a Query).
        self.sync_owed = False
        self.describing = True  # ... and they were only Parse, Describe, Close and Flush
        self.client_view: dict[str, str] = {}  # ParameterStatus values the client has seen
        self._pending_parameters: dict[str, str] = {}
        self._hidden_parameters: frozenset[str] = frozenset()  # reported settings the client is not told now (`hide_parameters`)
        self.terminated = False  # the client sent Terminate
        self.transactions_ended = 0  # client transactions ended (ReadyForQuery 'I') since the hooks were told
        self.skip_group = False  # the server skipped to the proxy's Sync after an error: skip the client's messages to its Sync
        self.copy_input = CopyInput.NONE
        self.copy_syncs = 0  # Syncs sent among CopyData whose fate the server's replies have not told yet
        # The client's last Query may start COPY FROM STDIN, during which the server reads nothing but CopyData,
        # CopyDone, CopyFail, Flush and Sync: the proxy's own messages due behind it (and the client's next
        # messages but those) wait for its ReadyForQuery.
        self.follow_ups_wait = False
        self.copying: set[bytes] = set()  # statements and portals (b"P" + name) whose text may start COPY IN
        self.group_may_copy = False  # an Execute since the last Sync may have started COPY IN
        self.cancel_wanted = False  # the client sent a CancelRequest not passed on yet (`cancel_requested`)
        self.mode: SessionMode | TransactionMode = (
            TransactionMode(self, max_statement_bytes, budget) if transaction_mode else SessionMode(self)
        )
        self.pooled = transaction_mode  # the server connection may go back to the pool between transactions
        self._out: list[bytes | memoryview] = []
        self.forwarded = Forwarded.AT_BOUNDARY
        self._own_behind = b""  # the proxy's own messages due while `forwarded` is inside a CopyData: they go behind its rest

    # -- server connection -----------------------------------------------------------------------

    def attach(self, server: ServerLink, wait: bool = False) -> None:
        """Start relaying on `server`. The mode's own messages for it go first; with `wait` (or when the
        mode must), the client's messages wait until the server has answered them, and
        `hooks.prepared()` is called then."""
        self.server = server
        self.queue = server.queue
        server.queue.listener = self
        must_wait = self.mode.attached(server) or wait
        self.preparing = must_wait and not server.queue.idle()
        if self.preparing or not self.held:
            self._flush()
        else:
            self._resume()
        if must_wait and not self.preparing:
            self.hooks.prepared()
            self.mode.maybe_release()
        if self.cancel_wanted:
            self._cancel_due()

    def detach(self) -> None:
        self.server = None
        self.queue = None

    def session_ended(self) -> None:
        """The session ended: give back what it kept (prepared statements count against the proxy's total)."""
        self.mode.session_ended()

    def idle_in_transaction(self) -> bool:
        """The client holds a server connection inside a transaction block and owes it nothing: the
        proxy's own idle-transaction timeout runs (`[pool] idle_transaction_timeout`)."""
        queue = self.queue
        return queue is not None and queue.status != b"I" and queue.idle() and not self.held

    def idle_between_transactions(self) -> bool:
        """The client is outside any transaction block and neither side owes the other anything: nothing
        held, no group begun, every request answered (in transaction mode it holds no server
        connection). The proxy's client idle timeout runs (`[pool] client_idle_timeout`)."""
        if (self.held or self.preparing or self.terminated or self.mid_group or self.sync_owed
                or not self.scanner.at_boundary()):
            return False
        queue = self.queue
        if queue is None:
            return self.server is None
        return queue.status == b"I" and queue.idle()

    def server_data(self, data: bytes) -> None:
        """Bytes from the server: account for them and pass on what is the client's. Raises
        UpstreamProtocolViolation when the server sends what nothing owed explains (XX000 for the
        client), ProtocolViolation when a client message held until now is malformed, or was sent
        during COPY IN (`_interrupt_copy`; the client has Postgres's ERROR for it first) (08P01)."""
        queue = self.queue
        assert queue is not None
        try:
            out = queue.feed(data)
        except CopyInterrupted as exc:  # the client's message during COPY IN: Postgres's ERROR, then its FATAL 08P01
            self.hooks.send_client(exc.replies)
            raise ProtocolViolation(str(exc), routine="PostgresMain") from None
        except ProtocolViolation as exc:  # the server's bytes: the client did nothing wrong
            raise UpstreamProtocolViolation(str(exc)) from exc
        if out:
            self.hooks.send_client(out)
        if self.transactions_ended:
            ended, self.transactions_ended = self.transactions_ended, 0
            self.hooks.transactions_ended(ended)
        if queue.ended:  # the server's FATAL, passed on: its last word, after which a direct session is over
            self.terminated = True
            self.hooks.server_ended()
            return
        if self.server is None:
            return
        self._follow_ups_ready(queue)
        if self.preparing:
            if queue.idle():
                self.preparing = False
                self.hooks.prepared()
                self._resume()
                self.mode.maybe_release()
            return
        if self.held:
            if not queue.groups_owed():
                self._resume()
            else:
                self._interrupt_copy(self.held[0])
        if self.pooled and not self.terminated:
            self.mode.maybe_release()

    def cancel_requested(self) -> None:
        """The client sent a CancelRequest ("Canceling Requests in Progress"): what it sent last is
        cancelled on the server connection, now or, when it still waits for one (transaction mode) or
        behind a group of the proxy's own, once it goes there (`hooks.cancel_server`). A client with
        nothing outstanding cancels nothing, as a direct session that is idle (`hooks.cancel_dropped`,
        now or once what it waited behind ended the client's statement)."""
        if self.server is None and not self.held:
            self.hooks.cancel_dropped()  # between transactions, holding no server connection
            return
        self.cancel_wanted = True
        self._cancel_due()

    def _cancel_due(self) -> None:
        """Pass the client's cancel on when no Sync group or Query of the proxy's own (a reset, settings
        applied or reset, statement_timeout lifted, the session context) is ahead of the client's first
        group: a cancel landing in one of those would fail it and end the session. Their ReadyForQuery
        comes back flushed, so this is asked again then."""
        queue = self.queue
        if queue is None or self.server is None:
            return  # waiting for a server connection: asked again at attach
        for entry in queue.entries:
            if entry.owner is Owner.CLIENT:
                break
            if entry.request is Request.SYNC or entry.request is Request.QUERY:  # a Query of its own ends in one too
                return
        else:
            if not self.held:
                self.cancel_wanted = False  # nothing outstanding any more
                self.hooks.cancel_dropped()
            return
        self.cancel_wanted = False
        self.hooks.cancel_server()

    # -- ReplyQueue's listener -------------------------------------------------------------------

    def copy_syncs_unknown(self) -> None:
        """A COPY failed with Syncs of the client's among its data: the probe that tells how many the server
        read as Syncs goes behind them (the client's messages after its CopyDone / CopyFail wait for it)."""
        self.own(COPY_PROBE, Request.COPY_PROBE, OwnRequest(self._copy_probed))
        self.flush_own()

    def _copy_probed(self, outcome: Outcome, error: dict[str, str] | None) -> None:
        """FAILED: the server read none of the client's Syncs among the data as a Sync, and the probe's
        Sync ended the error window the failed COPY opened: the client's messages up to its next Sync
        are skipped here, as the server would have skipped them."""
        if outcome is Outcome.FAILED:
            self.skip_group = True

    def _copy_sync_ended(self, outcome: Outcome, error: dict[str, str] | None) -> None:
        """The fate of a Sync the client sent among CopyData: ignored during COPY IN (SKIPPED), or read as
        a Sync, which ended the client's group there."""
        self.copy_syncs -= 1
        if not self.copy_syncs:
            self.copy_input = CopyInput.NONE
        if outcome is not Outcome.SKIPPED:
            self._sync_read()
            self.flush_own()

    def query_skipped(self) -> None:
        """A request of the proxy's own (its context, or the Close or Parse preparing a statement there)
        failed in front of the client's Query or FunctionCall, and the server skipped that too: the proxy's
        Sync ends the skip, and its ReadyForQuery goes to the client behind the error."""
        self.own(messages.sync(), Request.SYNC)
        self.flush_own()

    def group_ended(self, status: bytes, own: bool) -> None:
        if not own and status == b"I":
            self.transactions_ended += 1
        if self.cancel_wanted:  # a group of the proxy's own ahead of the client's may have ended
            self._cancel_due()

    def parameter_status(self, name: str, value: str, forwarded: bool) -> bool:
        problem = lexing_problem(name, value) if self.guard is not None else None
        if problem is not None:  # changed where the guard could not see it (dynamic SQL): it can no longer read this session
            self.hooks.fail(LEXING_SQLSTATE, problem[0], problem[1])
            return forwarded
        if self.server is not None:
            self.server.state.parameters[name] = value
        if forwarded and self._hidden_parameters and name.lower() in self._hidden_parameters:
            # A value the proxy undoes before the client's next statement: the client is told, in its place, the
            # startup value that it resets to in a direct session (when its view has moved from it since).
            value = self.settings.reported.get(name.lower(), self.client_view.get(name, value))
            forwarded = False
        if forwarded:
            self.client_view[name] = value
            self._pending_parameters.pop(name, None)
        elif self.client_view.get(name) != value:
            self._pending_parameters[name] = value
        else:
            self._pending_parameters.pop(name, None)
        self._watch_parameters()
        return forwarded

    def greeted(self, parameters: dict[str, str]) -> None:
        """The client was greeted with `parameters` (ParameterStatus at login): its view from now on. What
        the proxy's own exchange before the greeting changed (the client's settings applied on the first
        server connection) is in the greeting, and is not told again."""
        self.client_view.update(parameters)
        self.settings.reported = {name.lower(): value for name, value in parameters.items()}
        for name, value in parameters.items():
            if self._pending_parameters.get(name) == value:
                del self._pending_parameters[name]
        self._watch_parameters()

    def hide_parameters(self, names: Iterable[str]) -> None:
        """Until `show_parameters`, ParameterStatus of `names` (any case, as setting names) answering the client's requests is not
        passed on: the values they report (a RESET to the server connection's own value) are replaced
        by the client's startup values before its next statement, so the client is told those, as a direct
        session tells them, before the ReadyForQuery of its reset (a client told another client_encoding
        would encode its next statement in it)."""
        self._hidden_parameters = self._hidden_parameters.union(name.lower() for name in names)
        self._watch_parameters()

    def show_parameters(self) -> None:
        self._hidden_parameters = frozenset()
        self._watch_parameters()

    def _watch_parameters(self) -> None:
        if self.queue is not None:
            self.queue.parameters_pending = bool(self._pending_parameters or self._hidden_parameters)

    def pending_parameters(self) -> bytes:
        """ParameterStatus for what the proxy's own requests changed, sent before the client's next
        ReadyForQuery so the client's view stays true."""
        if not self._pending_parameters:
            return b""
        pending, self._pending_parameters = self._pending_parameters, {}
        self.client_view.update(pending)
        self._watch_parameters()
        return b"".join(messages.parameter_status(name, value) for name, value in pending.items())

    # -- client bytes ----------------------------------------------------------------------------

    def client_data(self, data: bytes) -> bool:
        """Bytes from the client (logged in). Returns True when the read was one whole message, so the
        stream is at a message boundary (False: ask the scanner). Raises ProtocolViolation on a
        malformed stream."""
        if self.terminated:
            return False
        lone = self.scanner.lone(data)
        if self.server is None and not self.held:
            if lone == 88:  # 'X' alone: nothing to check out for
                self.terminated = True
                self.hooks.terminated()
                return True
            if not self.preparing:
                self.hooks.need_server()  # an idle server connection is attached at once when there is one
        if self.server is None or self.held or self.preparing:
            starts = self.scanner.sync_group(data) if lone < 0 and not self.held else None
            if starts is None:
                self._hold((Message(b"Q", data),) if lone == 81 else self.scanner.scan(data))
            else:  # cut where the scanner found the messages (it stays at the boundary it was at)
                self._hold([Message(data[start:start + 1], data[start:end]) for start, end in zip(starts, [*starts[1:], len(data)])])
                self._held_group_read = (data, starts, self.held[0])
        elif lone == 81:  # 'Q': the common read, one whole simple Query
            if self.mode.plain_query(data):
                METRICS.queries += 1
                return True
            self._run(deque((Message(b"Q", data),)))
        else:
            starts = self.scanner.sync_group(data) if lone < 0 else None
            if starts is not None and self.mode.sync_group(data, starts):
                METRICS.queries += 1
                return True
            self._run(deque(self.scanner.scan(data)))
        return lone >= 0

    def group_cleared(self, data: bytes, starts: list[int]) -> bool:
        """A whole extended-query group (`starts`: where each message starts, its Sync last, from
        `MessageScanner.sync_group`) may go upstream as it came: nothing in it holds the prefix of the
        proxy's names (so no statement or portal of the proxy's is named; the prefix anywhere, even in a
        parameter, sends it the general way), and each Parse's text is one the guard clears (`ALLOW`)
        that cannot start COPY IN. False too for a Parse whose name or text does not end within it."""
        if data.find(PREFIX) >= 0:
            return False
        for index in range(len(starts) - 1):
            start = starts[index]
            if data[start] != 80:  # 'P'
                continue
            end = starts[index + 1]
            name_end = data.find(b"\0", start + 5, end)
            text_end = data.find(b"\0", name_end + 1, end)
            if name_end < 0 or text_end < 0:
                return False
            text = data[name_end + 1:text_end]
            if self.decide(text) is not ALLOW or may_start_copy_in(text):
                return False
        return True

    def _hold(self, segments: Iterable[Segment]) -> None:
        self._held_group_read = None
        for segment in segments:
            self.held.append(segment)
            self.held_bytes += len(segment.raw) if type(segment) is Message else len(segment)  # type: ignore[union-attr,arg-type]
        if self.held_bytes > HELD_HIGH_WATER:
            self.hooks.hold_client(True)

    def _resume(self) -> None:
        """Go on with held client messages (a server connection arrived, or a group ended), taken from
        the front of `held` in place: a client that pipelined many transactions costs one pass over
        them, not one per transaction. One simple Query held alone (a transaction-mode client that waited
        for its checkout) takes the hot path. A cancel that waited for them goes once they are sent."""
        held = self.held
        if not held:
            return
        segment = held[0]
        if (len(held) == 1 and not self._out and type(segment) is Message and segment.type == b"Q"  # type: ignore[union-attr]
                and self.mode.plain_query(segment.raw)) or (len(held) > 1 and not self._out and self._held_group(held)):  # type: ignore[union-attr]
            held.clear()
            METRICS.queries += 1
            if self.held_bytes > HELD_HIGH_WATER:  # _held_drained, inlined on the hot path
                self.hooks.hold_client(False)
            self.held_bytes = 0
        else:
            self._run(held)
        if self.cancel_wanted:
            self._cancel_due()

    def _held_group(self, held: deque[Segment]) -> bool:
        """`held` is one whole extended-query group (what a transaction-mode client that waited for its
        checkout sent in one read, as drivers send a prepared statement): it takes the mode's hot path if
        it can (`sync_group`), with nothing cut again."""
        read, self._held_group_read = self._held_group_read, None
        if read is not None and held[0] is read[2] and len(held) == len(read[1]):
            return self.mode.sync_group(read[0], read[1])
        last = held[-1]
        if type(last) is not Message or last.type != b"S":  # type: ignore[union-attr]
            return False
        starts = []
        position = 0
        for segment in held:
            if type(segment) is not Message or (segment is not last and segment.type[0] not in GROUP_MESSAGES):  # type: ignore[union-attr]
                return False
            starts.append(position)
            position += len(segment.raw)  # type: ignore[union-attr]
        return self.mode.sync_group(b"".join(segment.raw for segment in held), starts)  # type: ignore[union-attr]

    def _held_drained(self) -> None:
        """Nothing is held any more: the client's reading resumes if holding paused it."""
        if not self.held:
            if self.held_bytes > HELD_HIGH_WATER:
                self.hooks.hold_client(False)
            self.held_bytes = 0

    def _run(self, segments: deque[Segment]) -> None:
        """Handle client messages in order, taking them from the front of `segments`, until one must
        wait; go on at once when what it waited for is already there (a ReadyForQuery the proxy answered
        itself). What is left is held (it is `held` itself when resuming)."""
        stalled = 0
        while True:
            head = segments[0] if segments else None
            done = self._process(segments)
            self._flush()
            if self.terminated:  # Terminate: not forwarded, so the server connection can serve again
                self.hooks.terminated()
                return
            queue = self.queue
            if done or queue is None or queue.groups_owed() or self.copy_syncs or self.mode.waiting():
                break
            # Nothing is owed, yet a message waits: one more pass goes on when the proxy's own answer ended
            # what it waited for. A message still stuck at the head after that waits for nothing that can
            # come, a bug: the session ends with XX000 rather than the event loop spinning here.
            stalled = stalled + 1 if segments and segments[0] is head else 0
            if stalled > 2:
                waiting = segments[0]
                kind = waiting.type if type(waiting) is Message else b"d"  # type: ignore[union-attr]
                raise RelayStalled(f"a client message {kind!r} waits with nothing owed by the server (follow_ups_wait="
                                   f"{self.follow_ups_wait}, copy_input={self.copy_input.name}, skip_group={self.skip_group})")
        if not done:
            self._interrupt_copy(segments[0])
        if segments is self.held:
            self._held_drained()
        elif not done:
            self._hold(segments)
        self.mode.maybe_release()

    def _interrupt_copy(self, waiting: Segment) -> None:
        """`waiting`, the client's next message, waits for the server's replies. When it is one Postgres
        does not read during COPY IN while the server is in COPY IN with no CopyDone or CopyFail sent for
        it, those replies never come: the server waits for the client's data, and the client waits for an
        answer (directly, Postgres would read the message and end the session with 08P01). The proxy's
        CopyFail goes where the message would have been read: if the server is still in COPY IN then, it
        ends the COPY and the queue raises `CopyInterrupted` (the client gets the ERROR Postgres gives the
        message, then the FATAL, and the server connection is closed, not reused); if the COPY failed
        first, the server ignores it and the message goes on once the COPY's replies are in."""
        queue = self.queue
        if queue is None or not queue.awaiting_copy_end() or type(waiting) is not Message:
            return
        kind = waiting.type[0]
        if kind in COPY_IN_READS:
            return
        error = b"unexpected message type 0x%02X during COPY from stdin" % kind
        self.own(COPY_INTERRUPT, Request.COPY_END, speaks=error)
        self.flush_own()

    def _process(self, segments: deque[Segment]) -> bool:
        """Handle segments from the front of `segments`; False when a message must wait (it stays at the
        front), True when all were handled (or the client sent Terminate)."""
        out = self._out
        while segments:
            segment = segments[0]
            if type(segment) is not Message:
                if self.copy_input is _COPY_ENDED:
                    return False  # behind the client's CopyDone / CopyFail, until the Syncs among its data are settled
                if self.copy_input is _NO_COPY_INPUT:
                    self.copy_input = CopyInput.DATA
                out.append(segment)  # type: ignore[arg-type]  # CopyData
                assert self.queue is not None
                self.queue.expect(Request.COPY_DATA)
                if len(segments) == 1 and self.scanner.passing():  # the read's last bytes, inside a CopyData
                    self.forwarded = _INSIDE_COPY_DATA
                elif self.forwarded is _INSIDE_COPY_DATA:  # the rest of it
                    self.forwarded = Forwarded.AT_BOUNDARY
                    if self._own_behind:
                        out.append(self._own_behind)
                        self._own_behind = b""
            elif not self._message(segment):  # type: ignore[arg-type]
                if self.terminated:
                    segments.clear()
                    return True
                return False
            segments.popleft()
        self.mode.read_done()
        return True

    def _flush(self) -> None:
        if self._out:
            data = b"".join(self._out)
            self._out = []
            self.hooks.send_upstream(data)
        queue = self.queue
        if queue is not None and queue.entries and queue.entries[0].owner is Owner.ANSWERED:
            answer = queue.answer_ready()
            if answer:
                self.hooks.send_client(answer)
                self._follow_ups_ready(queue)  # a group the proxy answered itself ended: no server reply will say so

    def _follow_ups_ready(self, queue: ReplyQueue) -> None:
        """What waited for the ReadyForQuery of a group that may start COPY IN or begin a block
        (`follow_ups_wait`) goes once the server reads messages again, whether the server's reply or the
        proxy's own answer ended the group."""
        if self.follow_ups_wait and queue.reading_messages():
            self.follow_ups_wait = False
            self.mode.follow_up()
            self.flush_own()

    def _message(self, message: Message) -> bool:
        """Handle one client message; False when it must wait (the mode needs the server's status)."""
        kind = message.type
        mode = self.mode
        if mode.waiting():
            return False
        if self.follow_ups_wait and kind[0] not in COPY_IN_READS and not (self.queue is not None and self.queue.skipping()):
            # Behind a Query that may start COPY IN. In an error window the server skips that Query and this
            # message alike, up to the client's Sync, which must not wait behind it (the follow-ups go after
            # that Sync's ReadyForQuery).
            return False
        if self.copy_syncs and (self.copy_input is _COPY_ENDED or kind[0] not in COPY_IN_READS):
            return False  # Syncs among the client's CopyData are not settled: its group may go on or not
        if kind == b"S" or kind == b"Q":
            self.sync_owed = False
        if self.copy_input is not _NO_COPY_INPUT and kind[0] not in COPY_IN_READS:
            # A message Postgres does not read during COPY IN: the client's COPY data is over (the COPY
            # failed, with no CopyDone owed after it), and a Sync from here on is no Sync among CopyData.
            self.copy_input = CopyInput.NONE
        if self.skip_group and kind != b"X":
            if kind == b"S":  # the window the client is in ends here: the proxy answers its Sync
                self.skip_group = False
                assert self.queue is not None
                self.queue.expect(Request.SYNC, Owner.ANSWERED)
                self.mid_group = False
            return True
        if kind == b"Q":
            return _counted(mode.query(message))
        if kind == b"B":
            return mode.bind(message)
        elif kind == b"E":
            return mode.execute(message)
        elif kind == b"S":
            METRICS.queries += 1
            if self.copy_input is _NO_COPY_INPUT:
                self.send(message.raw, Request.SYNC)
                self._sync_read()
            else:  # among CopyData: it ends the group only if the server reads it as a Sync
                self.copy_syncs += 1
                self.copy_input = CopyInput.SYNCED
                self.send(message.raw, Request.SYNC, watcher=OwnRequest(self._copy_sync_ended))
        elif kind == b"P":
            return mode.parse(message)
        elif kind == b"D":
            return mode.describe(message)
        elif kind == b"C":
            mode.close(message)
        elif kind == b"H":
            self._out.append(message.raw)
        elif kind == b"F":
            return self._function_call(message)
        elif kind == b"X":
            self.terminated = True
            return False
        else:  # CopyDone, CopyFail
            self.send(message.raw, Request.COPY_END)
            if self.copy_syncs:  # what follows waits for the COPY's outcome, which a Flush brings
                self._out.append(FLUSH)
                self.copy_input = CopyInput.ENDED
            else:
                self.copy_input = CopyInput.NONE
        return True

    def _sync_read(self) -> None:
        """A Sync of the client's ended its group on the server."""
        self.mid_group = False
        self.describing = True
        self.mode.group_sent()

    def _function_call(self, message: Message) -> bool:
        """FunctionCall ('F'): refused by the guard unless configured; otherwise like a Query."""
        if self.guard is not None:
            (oid,) = struct.unpack_from("!I", message.body) if len(message.body) >= 4 else (0,)
            refusal = self.guard.function_call(oid)
            if refusal is not None:
                self.refuse_group(refusal)
                return True
            return _counted(self.mode.function_call(message, self.guard.function_call_decision(oid)))
        return _counted(self.mode.function_call(message))

    # -- what goes upstream ----------------------------------------------------------------------

    def send(self, raw: bytes | memoryview, request: Request, owner: Owner = Owner.CLIENT, watcher: Watcher | None = None,
             reply: bytes = b"", rows: bool = False) -> None:
        assert self.queue is not None
        self._out.append(raw)
        self.queue.expect(request, owner, reply, watcher, rows)
        if request in EXTENDED_REQUESTS:
            self.mid_group = True
            if request is Request.BIND or request is Request.EXECUTE:
                self.describing = False

    def own(self, raw: bytes, request: Request, watcher: Watcher | None = None, rows: bool = False,
            speaks: bytes = b"", routine: bytes = b"") -> None:
        """A message of the proxy's own; `speaks`: on failure, the client gets an error with this prefix, or
        for a 25P02 the server's error as it is, naming `routine` (IN_BIND, ...) when given (the proxy's
        CopyFail: the text of the client's error when it ends the COPY)."""
        assert self.queue is not None
        self._out.append(raw)
        self.queue.expect(request, Owner.OWN, speaks + b"\0" + routine if routine else speaks, watcher, rows)

    def flush_own(self) -> None:
        """Send what the proxy added while handling the server's replies. Never inside a client's CopyData
        (`forwarded`): then right behind its rest, which the next client read brings; inside it, the server
        would read them as COPY data, and the rest of it as messages (a COPY that failed while the client
        was sending its data, then the probe of the Syncs among them or the settings read-back due behind
        the COPY)."""
        if not self._out:
            return
        data = b"".join(self._out)
        self._out = []
        if self.forwarded is _INSIDE_COPY_DATA:
            self._own_behind += data
        else:
            self.hooks.send_upstream(data)

    def refuse_group(self, refusal: Refusal, watcher: Watcher | None = None) -> None:
        """Refuse a Query or FunctionCall: a Query that fails on the server takes its place (`watcher` is
        told how it ended). Being a simple Query, it drops the server connection's unnamed statement."""
        self.hooks.refused(refusal)
        assert self.server is not None
        self.server.state.statements.unnamed_gone()
        self.send(messages.query(_MARKER), Request.QUERY, Owner.REFUSED, reply=refusal_error(refusal), watcher=watcher)
        self.mode.group_sent()

    def refuse_extended(self, refusal: Refusal) -> None:
        """Refuse an extended-query message (the guard, or a reserved name): audited, then `fail_extended`."""
        self.hooks.refused(refusal)
        self.fail_extended(refusal_error(refusal))

    def fail_extended(self, error: bytes) -> None:
        """Answer an extended-query message with the ErrorResponse `error`: a Parse that fails takes its
        place (the server then skips to Sync, as for any failing extended message)."""
        self.send(messages.parse(_MARKER, _MARKER), Request.PARSE, Owner.REFUSED, reply=error)

    def note_copying(self, name: bytes, text: bytes) -> None:
        """A client Parse of `name`: remember whether its text may start COPY IN (`may_start_copy_in`)."""
        if may_start_copy_in(text):
            self.copying.add(name)
        else:
            self.copying.discard(name)

    def note_bound(self, portal: bytes, statement: bytes) -> None:
        """A client Bind of `portal` to `statement`: the portal may start COPY IN when the statement may."""
        if statement in self.copying:
            self.copying.add(b"P" + portal)
        else:
            self.copying.discard(b"P" + portal)

    def note_executed(self, portal: bytes) -> None:
        """A client Execute of `portal`: if it may start COPY IN, the proxy's follow-ups due behind the
        group's Sync wait for its ReadyForQuery (`follow_ups_wait`)."""
        if b"P" + portal in self.copying:
            self.group_may_copy = True

    def group_copy_checked(self) -> None:
        """A client group ended (the client between groups): when an Execute in it may have started COPY
        IN and the mode has follow-ups due, they wait (`follow_ups_wait`)."""
        if self.group_may_copy:
            self.group_may_copy = False
            self.follow_ups_wait = self.follow_ups_wait or self.mode.follow_ups_due()

    def checked_parse(self, message: Message) -> tuple[bytes, bytes, bytes, Decision] | None:
        """A client's Parse: its statement name, query text, definition (the body after the name) and
        the guard's decision; None when it is refused (a reserved name, or the guard), a failing Parse
        taking its place."""
        name, text, definition = split_parse(message.body)
        if name.startswith(PREFIX):
            self.refuse_extended(reserved("statement", name))
            return None
        decision = self.decide(text)
        if decision.refusal is not None:
            self.refuse_extended(decision.refusal)
            return None
        return name, text, definition, decision

    def decide(self, text: bytes) -> Decision:
        """The guard's decision on a Query's or Parse's text (NUL terminator excluded), refusing SQL that
        deallocates or prepares under a name of the proxy's (its own statements, or those it shares
        between clients). With the guard off, the classifier's reading (`proxy.guard.Classifier`): what
        the text does to the session, never a refusal of its own."""
        sql = text.decode("utf-8", "replace")
        return self._decided(text, sql, sql.lower())

    def clears(self, text: bytes) -> bool:
        """True when a Query's or Parse's text (NUL terminator excluded) may take a hot path: the guard
        clears it (`decide` gives ALLOW) and no word in it may end a transaction (`may_end_transaction`).
        One decode and one lowering serve both."""
        sql = text.decode("utf-8", "replace")
        lowered = sql.lower()
        return self._decided(text, sql, lowered) is ALLOW and not may_end_transaction(text, 0, lowered)

    def _decided(self, text: bytes, sql: str, lowered: str) -> Decision:
        """`decide`, given the text decoded (`sql`) and lowered."""
        guard = self.guard if self.guard is not None else classifier(isinstance(self.mode, TransactionMode))
        decision = guard.check(sql, lowered)
        if decision.refusal is None and (
            (decision is not ALLOW and any(name.lower().startswith(RESERVED) for name in decision.deallocates))
            or (RESERVED in lowered and _PREPARE_RESERVED.search(text) is not None)  # ASCII survives the decode
        ):
            return RESERVED_SQL
        return decision


RESERVED = PREFIX.decode()
# Text that may end a transaction (and may start another, AND CHAIN; PREPARE TRANSACTION ends it too): the
# context is sent again before the next statement, and a settings read-back due goes behind it. Matching
# more than that costs only a context sent twice in one transaction.
_MAY_END_TRANSACTION = re.compile(rb"\b(?:commit|rollback|end|abort|prepare)\b", re.IGNORECASE)


def may_begin_transaction(text: bytes) -> bool:
    """`text` may hold BEGIN or START TRANSACTION (a false match only delays a settings read-back to the
    group's ReadyForQuery)."""
    lowered = text.lower()
    return lowered.find(b"begin") >= 0 or lowered.find(b"start") >= 0


def may_start_copy_in(text: bytes) -> bool:
    """`text` may hold COPY ... FROM STDIN, the one statement that puts the server in COPY IN mode (its
    text names STDIN; a false match only makes the proxy's own follow-ups wait for the ReadyForQuery)."""
    return text.lower().find(b"stdin") >= 0


def may_end_transaction(text: bytes, start: int = 0, lowered: str | None = None) -> bool:
    """`text` from `start` holds a word that may end a transaction (`_MAY_END_TRANSACTION`); the regex
    runs only when one of the words appears anywhere in `text` (the common statement holds none).
    `lowered`: `text` decoded and lowered, when the caller has it already."""
    # The words are looked for in a str: on Python 3.11 `bytes in bytes` raises and clears a TypeError
    # first, and bytes.find() parses its arguments with a format string; str `in` does neither (a third
    # of the time). Latin-1 maps each byte to one character, and lowercases no other byte to ASCII. The
    # words are ASCII, so any decoding holds them where `text` does (the regex has the last word).
    if lowered is None:
        lowered = text.decode("latin-1").lower()
    if not ("end" in lowered or "commit" in lowered or "rollback" in lowered or "abort" in lowered
            or "prepare" in lowered):
        return False
    return _MAY_END_TRANSACTION.search(text, start) is not None


_PREPARE_RESERVED = re.compile(rb'\bprepare\s+"?pg_tenant_proxy_', re.IGNORECASE)
RESERVED_SQL = Decision(refusal=Refusal(
    errors.INSUFFICIENT_PRIVILEGE, "prepared statement names starting with pg_tenant_proxy_ are reserved for pg-tenant-proxy",
    RESERVED_HINT,
))
EXTENDED_REQUESTS = frozenset({Request.PARSE, Request.BIND, Request.DESCRIBE, Request.EXECUTE, Request.CLOSE})


PROXY_ABORTED = "a request of pg-tenant-proxy's own failed inside this transaction block, which is aborted: "


class RelayStalled(RuntimeError):
    """A client message waits for nothing the server owes: a bug, which ends the session (XX000)."""


class BlockWatch:
    """Watches the first request of a Sync group of the proxy's own sent behind a client's group: the
    transaction status when its reply (or its skip) arrives is the one the group ran in. With the group's
    outcome, that tells whether the group itself failed, or only met a block the client had failed."""

    __slots__ = ("queue", "before")

    def __init__(self, queue: ReplyQueue) -> None:
        self.queue = queue
        self.before = b""

    def ended(self, outcome: Outcome, error: dict[str, str] | None) -> None:
        self.before = self.before or self.queue.status

    def row(self, values: list[bytes | None]) -> None:
        """Its requests answer no rows the watch needs."""

    def described(self, raw: bytes) -> None:
        """Its requests describe nothing."""

    def failed_itself(self, outcome: Outcome) -> bool:
        """The group failed, and not because the client's block had failed before it."""
        return outcome is Outcome.FAILED and self.before != b"E"

    def aborted_block(self, outcome: Outcome) -> bool:
        """The group failed inside a client's block that had not failed: the proxy aborted the client's
        transaction, and must say so rather than let the client's next statement meet 25P02."""
        return self.failed_itself(outcome) and self.before == b"T" and self.queue.status == b"E"


def split_parse(body: bytes) -> tuple[bytes, bytes, bytes]:
    """Name, query text and the definition (everything after the name) of a Parse body."""
    name, end = messages.split_name(body)
    text, _ = messages.split_name(body, end)
    return name, text, body[end:]


def split_bind(body: bytes) -> tuple[bytes, bytes, int]:
    """Portal, statement and the offset of the rest of a Bind body."""
    portal, start = messages.split_name(body)
    statement, end = messages.split_name(body, start)
    return portal, statement, end


def _shown(text: bytes, start: int) -> str:
    """The bytes of the invalid UTF-8 character at `start` as Postgres names them in 22021 (report_invalid_encoding):
    as many as the lead byte says, at most to the end, each as 0x.. ."""
    lead = text[start]
    length = 2 if lead & 0xE0 == 0xC0 else 3 if lead & 0xF0 == 0xE0 else 4 if lead & 0xF8 == 0xF0 else 1
    return " ".join(f"0x{byte:02x}" for byte in text[start:start + length])


def cancelled_outside_a_block(watch: BlockWatch, error: dict[str, str] | None, tries: int) -> bool:
    """A Sync group of the proxy's own failed with 57014 outside a transaction block, with no group of the
    client's behind it (sent again, it would run after that group, perhaps inside a block the group
    began), at most READ_RETRIES times in a row: a client's cancel that raced the end of its statement
    landed there (or a statement_timeout shorter than the group), and the group can simply be sent again."""
    queue = watch.queue
    return ((error or {}).get("C") == errors.QUERY_CANCELED and queue.status == b"I" and not queue.groups_owed()
            and tries < READ_RETRIES)


def _counted(handled: bool) -> bool:
    """Count a client Query or FunctionCall once it is handled (False: it waits and comes back)."""
    METRICS.queries += handled
    return handled


class SessionMode:
    """Session pooling: the client keeps its server connection; the context is set once, in its own
    Sync group before any client message, and again after RESET ALL or DISCARD ALL."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.reassert_due = False
        self.reset_in_block = False  # a re-assert after RESET ALL may sit inside a block a ROLLBACK TO can undo
        self.resetting: set[bytes] = set()  # statements and portals (b"P" + name) whose text resets all settings
        self.reset_mid_group = False  # a resetting Query sent inside an extended group is not answered yet
        self.context_retries = 0  # context groups cancelled in a row (57014) and sent again

    def attached(self, server: ServerLink) -> bool:
        self._send_context()
        return True

    def _send_context(self) -> None:
        relay = self.relay
        assert relay.server is not None
        identity = relay.identity
        assert relay.queue is not None
        watch = BlockWatch(relay.queue)
        request = OwnRequest(lambda outcome, error: self._context_ended(watch, outcome, error))
        for raw, kind in relay.context.session_messages(identity.tenant, relay.server.process_id, identity.expires_at,
                                                    identity.claims_json):
            relay.own(raw, kind, request if kind is Request.SYNC else watch if kind is Request.PARSE else None)
        METRICS.context_sets += 1

    def _context_ended(self, watch: BlockWatch, outcome: Outcome, error: dict[str, str] | None) -> None:
        relay = self.relay
        if outcome is Outcome.COMPLETED:
            assert relay.queue is not None
            self.context_retries = 0
            if relay.queue.status == b"I":
                self.reset_in_block = False  # set outside any block: no rollback can undo it
            return
        assert relay.queue is not None
        if relay.server is not None and cancelled_outside_a_block(watch, error, self.context_retries):
            self.context_retries += 1
            relay.own(relay.context.session_statement_close(), Request.CLOSE)
            self._send_context()
            relay.flush_own()
            return
        if relay.queue.status == b"E" and not watch.aborted_block(outcome):
            self.reassert_due = True  # inside a failed block: the rollback restores the context; set it again after
            return
        fields = error or {}
        relay.hooks.fail(
            fields.get("C", errors.INTERNAL_ERROR), "could not set the tenant context: " + fields.get("M", "unknown error")
        )

    def plain_query(self, data: bytes) -> bool:
        """The hot path: a read holding one whole simple Query that the guard clears goes upstream as it
        came, owing one plain group. False when it needs the general path."""
        relay = self.relay
        if relay.skip_group or self.reassert_due or self.reset_in_block or relay.mid_group or relay.copy_syncs or (
            relay.decide(data[5:-1]) is not ALLOW
        ):
            return False
        assert relay.queue is not None
        relay.hooks.send_upstream(data)
        relay.queue.expect_query()
        return True

    def sync_group(self, data: bytes, starts: list[int]) -> bool:
        """The hot path of a driver's prepared statements: a read that is one whole extended-query group
        (`MessageScanner.sync_group`) the relay clears (`Relay.group_cleared`) goes upstream as it came,
        owing one entry for the group. False when it needs the general path: the session has statements
        or portals whose text resets settings or may start COPY IN, or anything pending."""
        relay = self.relay
        queue = relay.queue
        assert queue is not None
        if (relay.skip_group or self.reassert_due or self.reset_in_block or self.reset_mid_group or relay.mid_group
                or relay.copy_syncs or relay.follow_ups_wait or relay.copy_input is not _NO_COPY_INPUT
                or self.resetting or relay.copying or queue.skipping() or not relay.group_cleared(data, starts)):
            return False
        relay.hooks.send_upstream(data)
        queue.expect_sync_group()
        relay.sync_owed = False
        relay.describing = True
        return True

    def query(self, message: Message) -> bool:
        relay = self.relay
        decision = relay.decide(message.body[:-1])
        if decision.refusal is not None:
            relay.refuse_group(decision.refusal)
            return True
        reassert = decision.resets_all or (  # ROLLBACK (TO) may undo the context set again after a RESET ALL
            self.reset_in_block and may_end_transaction(message.raw, 5)
        )
        self.reset_in_block = self.reset_in_block or decision.resets_all
        if reassert and relay.mid_group:
            self.reset_mid_group = True
            relay.send(message.raw, Request.QUERY, watcher=OwnRequest(self._reset_mid_group_ended))
            return True
        relay.send(message.raw, Request.QUERY)
        self.reassert_due = self.reassert_due or reassert
        relay.follow_ups_wait = self.follow_ups_due() and may_start_copy_in(message.raw)
        self.group_sent()
        return True

    def _reset_mid_group_ended(self, outcome: Outcome, error: dict[str, str] | None) -> None:
        """A resetting Query the client sent inside an extended group (no Sync yet) is answered. If it ran,
        it ended the server's implicit transaction: the context is set again now, before the client's
        next messages, which waited; the client's Sync may never come. Skipped in the client's error
        window, it reset nothing."""
        self.reset_mid_group = False
        if outcome is not Outcome.SKIPPED:
            self._send_context()
            self.relay.flush_own()

    def parse(self, message: Message) -> bool:
        relay = self.relay
        checked = relay.checked_parse(message)
        if checked is None:
            return True
        name, text, _, decision = checked
        if decision.resets_all:
            self.resetting.add(name)
        else:
            self.resetting.discard(name)
        relay.note_copying(name, text)
        relay.send(message.raw, Request.PARSE)
        return True

    def bind(self, message: Message) -> bool:
        relay = self.relay
        portal, statement, _ = split_bind(message.body)
        if statement.startswith(PREFIX) or portal.startswith(PREFIX):
            relay.refuse_extended(reserved("statement or portal", statement if statement.startswith(PREFIX) else portal))
            return True
        if statement in self.resetting:
            self.resetting.add(b"P" + portal)
        else:
            self.resetting.discard(b"P" + portal)
        relay.note_bound(portal, statement)
        relay.send(message.raw, Request.BIND)
        return True

    def execute(self, message: Message) -> bool:
        portal, _ = messages.split_name(message.body)
        if portal.startswith(PREFIX):
            self.relay.refuse_extended(reserved("portal", portal))
            return True
        if b"P" + portal in self.resetting:
            self.reassert_due = True
        self.relay.note_executed(portal)
        self.relay.send(message.raw, Request.EXECUTE)
        return True

    def describe(self, message: Message) -> bool:
        self._named(message, Request.DESCRIBE)
        return True

    def close(self, message: Message) -> None:
        self._named(message, Request.CLOSE)

    def _named(self, message: Message, request: Request) -> None:
        relay = self.relay
        name, _ = messages.split_name(message.body, 1)
        if name.startswith(PREFIX):
            relay.refuse_extended(reserved("statement or portal", name))
            return
        relay.send(message.raw, request)

    def function_call(self, message: Message, decision: Decision = ALLOW) -> bool:
        self.relay.send(message.raw, Request.FUNCTION_CALL)
        self.group_sent()
        return True

    def group_sent(self) -> None:
        """A Query, Sync or FunctionCall went upstream: set the context again now if it was reset (after
        its ReadyForQuery when it may start COPY IN, `follow_up`)."""
        relay = self.relay
        if not relay.mid_group:
            relay.group_copy_checked()
        if self.reassert_due and not relay.mid_group and not relay.follow_ups_wait:
            self.reassert_due = False
            self._send_context()

    def follow_up(self) -> None:
        """The ReadyForQuery of a Query that may have started COPY IN came: what group_sent held back."""
        self.group_sent()

    def follow_ups_due(self) -> bool:
        """The context is to be set again behind the client's group."""
        return self.reassert_due

    def read_done(self) -> None:
        """Nothing to add at the end of a client read in session mode."""

    def waiting(self) -> bool:
        """The client's messages wait only behind a resetting Query sent inside an extended group, until
        it is answered (the context is set again in between)."""
        return self.reset_mid_group

    def session_ended(self) -> None:
        """Session mode keeps nothing of the client's."""

    def maybe_release(self) -> None:
        """The connection is released when the client leaves, not here."""

    def sign_again(self) -> None:
        """The signing key changed (a configuration reload) or the identity was renewed (the token
        file; called by the glue): sign this session's context again, as after a RESET ALL. When the server owes nothing, now, in a
        Sync group of its own ahead of the client's next message; else right after the client's next
        group (the old proof still verifies meanwhile: the verifier accepts the previous key). Until it
        completes outside a transaction block, a ROLLBACK sets it again (`reset_in_block`)."""
        relay = self.relay
        if relay.server is None or relay.queue is None:
            return  # the context is set when a server connection is attached, with the new key
        self.reassert_due = self.reset_in_block = True
        if relay.queue.idle():
            self.group_sent()
            relay.flush_own()


class TransactionMode:
    """Transaction pooling; see the module docstring."""

    def __init__(self, relay: Relay, max_statement_bytes: int, budget: StatementBudget | None) -> None:
        self.relay = relay
        self.statements = ClientStatements(max_statement_bytes, budget)
        self.portals: dict[bytes, Decision] = {}  # portals of statements with effects, by portal name
        self.context_set = False  # the context is in force for the transaction the client is in
        self.context_reset = False  # a RESET ALL / DISCARD ALL went upstream: set it again before the next statement
        # Only a BEGIN (or transaction characteristics) has run since the server connection was taken at ReadyForQuery
        # 'I': the session's sequence state (lastval(), currval()) is still what earlier clients left there.
        self.only_setup_since_idle = False
        self.reapply: dict[str, str] = {}  # startup values to apply again behind the current group
        self.reset_in_block = False  # a reset since the last read-back outside a block: a ROLLBACK (TO) may undo the reapply
        self.reapply_where_reset = False  # ... apply them only where a setting is still at the server's reset value
        self.flush_sync_pending = False  # the proxy's Sync after a client's Flush is not answered yet
        self.shape_wait: ShapeWatch | None = None  # the Describe a client's Bind or Describe waits on (`_result_changed`)
        self.group = 0  # the client's groups sent (Syncs, and Queries outside an extended group)
        self.ending: set[bytes] = set()  # client statements whose text may end a transaction
        self.ending_portals: set[bytes] = set()  # portals bound to those
        self.stand_ins: list[bytes] = []  # client names the server holds a stand-in under, until closed again
        self.read_retries = 0  # settings read-backs cancelled in a row (57014) and sent again
        # The group being sent may end a transaction block / may begin one (where a settings read-back
        # behind it would run): cleared once what follows the group is decided (`_after_group`).
        self.group_may_end = False
        self.group_may_begin = False
        self.reapply_retries = 0  # ... and groups applying the startup values again
        # The hot path's context entry, reused for every transaction (an OWN CONTEXT entry never changes):
        self.plain_context = Owed(Request.CONTEXT, Owner.OWN, CONTEXT_FAILED, None, False)
        # The prepared-statement hot path's entries for whole groups, one per client statement (their errors
        # name the server's statement, renamed for the client):
        self._group_entries: dict[bytes, Owed] = {}

    # -- checkout --------------------------------------------------------------------------------

    def attached(self, server: ServerLink) -> bool:
        """Reset what the previous tenant left, apply the client's settings: pipelined, no waiting."""
        relay = self.relay
        state = server.state
        state.statements.in_use.clear()
        tenant = relay.identity.tenant
        switched = state.tenant is not None and state.tenant != tenant
        unnamed = state.unnamed_settings and state.client != relay.serial  # settings no diff can undo: reset them all
        sync_owed = False
        timeout = state.settings.get(TIMEOUT, "0") != "0"
        if unnamed or (timeout and (switched or state.settings != relay.settings.current)):
            self._lift_timeout()
        if switched:
            METRICS.tenant_switches += 1
        if switched or unnamed:
            sync_owed = self._reset_for_another_tenant()
        state.tenant = tenant
        state.client = relay.serial
        self.context_set = False
        self.reset_in_block = False
        wanted = relay.settings.current
        if sync_owed or state.settings != wanted:
            self._apply(wanted, sync_owed)
        return False

    def _lift_timeout(self) -> None:
        """The server connection holds a statement_timeout (a client's, perhaps another's), or settings
        not known (a read-back that failed, perhaps timed out under it): set it to 0 first, in a simple
        Query (no planning: the least time under that timeout), in front of the reset and the settings to
        apply, which would otherwise run under it and end this client's session with 57014 where they took
        longer (tenant_proxy.reset_session() under another client's 1 ms). `_apply` sets the client's own
        value again."""
        relay = self.relay
        assert relay.server is not None
        relay.own(LIFT_TIMEOUT, Request.QUERY, OwnRequest(self._prelude_ended))
        relay.server.state.statements.unnamed_gone()
        relay.server.state.settings[TIMEOUT] = "0"

    def _reset_for_another_tenant(self) -> bool:
        """Reset what the previous tenant (or a client that set settings the proxy cannot name) may have
        left, pipelined ahead of the client's messages. With the guard on, one call of
        tenant_proxy.reset_session() (the verifier SQL installs it), whose Sync is
        owed by the caller: the settings to apply go in the same group. With the guard off, SQL-level
        prepared statements may be left too: a Query that also deallocates them. True when a Sync is owed."""
        relay = self.relay
        assert relay.server is not None
        state = relay.server.state
        state.settings = {}
        state.unnamed_settings = False
        if relay.guard is None:
            relay.own(UNGUARDED_RESET, Request.QUERY, OwnRequest(self._prelude_ended))
            state.statements.dropped()
            return False
        self._own_statement(RESET_STATEMENT, RESET_SQL)
        relay.own(RESET_BIND, Request.BIND, OwnRequest(self._prelude_ended))
        relay.own(RESET_EXECUTE, Request.EXECUTE, OwnRequest(self._prelude_ended))
        return True

    def _apply(self, wanted: dict[str, str], sync_owed: bool = False) -> None:
        """Bring the server connection's settings to `wanted`: reset what it has beyond them, set what
        differs; in a group of the proxy's own (after a Query for the names to reset, when there are
        any). `sync_owed`: the group is open already (a reset), and ends here."""
        relay = self.relay
        assert relay.server is not None
        state = relay.server.state
        if state.settings != wanted:
            stale = [name for name in state.settings if name not in wanted]
            changed = {name: value for name, value in wanted.items() if state.settings.get(name) != value}
            if stale:  # a simple Query: it drops the server connection's unnamed statement
                relay.own(reset_query(stale), Request.QUERY, OwnRequest(self._prelude_ended))
                state.statements.unnamed_gone()
            if changed:
                self._own_statement(APPLY_STATEMENT, APPLY_SQL)
                relay.own(apply_bind(changed), Request.BIND, OwnRequest(self._prelude_ended))
                relay.own(messages.execute(APPLY_STATEMENT.decode()), Request.EXECUTE, OwnRequest(self._prelude_ended))
                relay.own(close_portal(APPLY_STATEMENT), Request.CLOSE)
                sync_owed = True
            state.settings = dict(wanted)
        if sync_owed:
            relay.own(messages.sync(), Request.SYNC)

    def _prelude_ended(self, outcome: Outcome, error: dict[str, str] | None) -> None:
        if outcome is Outcome.FAILED:
            fields = error or {}
            self.relay.hooks.fail(
                fields.get("C", errors.CONNECTION_FAILURE),
                "could not prepare a server connection for this session: " + fields.get("M", "unknown error"),
            )

    def _own_statement(self, name: bytes, sql: str) -> None:
        """Prepare one of the proxy's own statements on this server connection unless it holds it (a
        failure in front of a client's message is the client's: `ReplyQueue._speaker`)."""
        relay = self.relay
        assert relay.server is not None
        statements = relay.server.state.statements
        statements.in_use.add(name)
        if statements.has(name):
            return
        relay.own(messages.close_statement(name), Request.CLOSE)
        relay.own(messages.parse(name.decode(), sql), Request.PARSE, OwnRequest(statements.parse_sent(name).ended))

    # -- the context -----------------------------------------------------------------------------

    def _context(self, decision: Decision) -> bool:
        """Before a statement-running message: put the context in front of it when a transaction starts
        here. False: the server's status is not known yet (a group is in flight), so the message waits.
        If the context fails, the server skips the message too; behind a Query or FunctionCall, a Sync of
        the proxy's own then ends that skip (`query_skipped`), and its ReadyForQuery is the client's."""
        starts = self._transaction_starts(decision)
        if not starts:
            return starts is not None
        relay = self.relay
        assert relay.server is not None
        if decision.takes_no_snapshot:  # BEGIN ISOLATION LEVEL, SET, LOCK: the context would take the snapshot first
            self.context_reset = True  # so it goes in front of the transaction's next statement
            self.only_setup_since_idle = self.only_setup_since_idle or relay.queue is not None and relay.queue.status == b"I"
            return True
        self.context_reset = False
        self.only_setup_since_idle = False
        identity = relay.identity
        self._own_statement(relay.context.statement_name, relay.context.statement)
        context = relay.context.transaction_messages(identity.tenant, relay.server.process_id, identity.expires_at,
                                                     identity.claims_json)
        relay.own(context, Request.CONTEXT, speaks=CONTEXT_FAILED)
        METRICS.context_sets += 1
        self.context_set = True
        return True

    def _transaction_starts(self, decision: Decision) -> bool | None:
        """Whether a statement-running message with the guard's `decision` starts a transaction here, so
        that the context goes in front of it (one that only begins it, `transaction_setup`, included).
        None while the server's status is not known yet (a group is in flight). False when the context is
        in force already, when the server will skip the message (an error window, up to its Sync), and for
        a statement that refuses transaction blocks."""
        if self.context_set and not self.context_reset:
            return False
        queue = self.relay.queue
        assert queue is not None
        if queue.groups_owed():
            return None
        return not (queue.skipping() or decision.no_transaction_block) and (
            queue.status == b"I" or (self.context_reset and queue.status == b"T"))

    def _reads_others_sequences(self, decision: Decision) -> bool | None:
        """Whether a message whose text reads lastval() or currval() first (`refusal_at_transaction_start`)
        would read what earlier clients left on the server connection: it starts a transaction on a
        connection taken at ReadyForQuery 'I', or follows only a BEGIN there. Not behind a statement that
        may have ended the transaction, a RESET ALL or a ROLLBACK TO inside a block the client holds
        (`context_reset` alone): the connection has been the client's since. None while a group is in flight."""
        starts = self._transaction_starts(decision)
        if not starts:
            return starts
        queue = self.relay.queue
        assert queue is not None
        return queue.status == b"I" or self.only_setup_since_idle

    # -- client messages -------------------------------------------------------------------------

    def query(self, message: Message) -> bool:
        relay = self.relay
        decision = relay.decide(message.body[:-1])
        refusal = decision.refusal
        if refusal is None and decision.refusal_at_transaction_start is not None:  # lastval(), currval()
            starts = self._reads_others_sequences(decision)
            if starts is None:
                return False
            refusal = decision.refusal_at_transaction_start if starts else None
        if refusal is not None:  # directly, the Query would have dropped the unnamed statement all the same
            dropped = self._unnamed_dropped()
            relay.refuse_group(refusal, None if dropped is None else OwnRequest(dropped.ended))
            return True
        if decision.deallocates and any(self._settling(name.encode()[:NAME_BYTES]) for name in decision.deallocates):
            return False
        answered = self._deallocate(decision)
        if answered is not None:  # a Query all the same: the client's unnamed statement goes, as in Postgres
            dropped = self._unnamed_dropped()
            relay.send(b"", Request.QUERY, Owner.ANSWERED, reply=_DEALLOCATE_COMPLETE,
                       watcher=answered if dropped is None else OwnRequest(self._query_ended(dropped, answered)))
            self.group_sent()
            return True
        if not self._context(decision):
            return False
        dropped = self._unnamed_dropped()
        assert relay.server is not None
        server = relay.server.state.statements
        server.query_sent()
        self._behind_reset()
        effects = OwnRequest(self._query_ended(dropped, self._effects(decision), server))
        relay.send(message.raw, Request.QUERY, watcher=effects)
        if may_end_transaction(message.raw, 5):
            self.context_reset = True  # COMMIT AND CHAIN leaves a block open without the context
            self.group_may_end = True
            self._rolled_back()
        self.group_may_begin = decision.transaction_setup or may_begin_transaction(message.raw)
        relay.follow_ups_wait = self.follow_ups_due() and may_start_copy_in(message.raw)
        # Inside an extended-query group no Sync of the proxy's: in an error window (the server skips this
        # Query) it would end the window before the client's Sync, and the client's messages behind run
        self._close_stand_ins(group_end=not relay.mid_group)
        self.group_sent()
        return True

    def _behind_reset(self) -> None:
        """A client statement goes upstream behind a reset in the same group (an Execute, or a Query inside
        an extended-query group, behind the reset's) whose startup values are not applied again yet: it
        may set one of them, as a statement later in the reset's own Query may, so they go only where a
        setting is still at the server's reset value (applied as they were, they undid the client's SET)."""
        if self.reapply:
            self.reapply_where_reset = True

    def _unnamed_dropped(self) -> Change | None:
        """A simple Query of the client's goes upstream: it drops the client's unnamed statement, whether it
        fails or not (unless skipped in an error window); the change, when there is one to settle."""
        if self.statements.unnamed is None and b"" not in self.statements.unsettled:
            return None
        dropped = self.statements.change_sent(b"", self.group, None, None)
        self.statements.unnamed = None
        return dropped

    @staticmethod
    def _query_ended(dropped: Change | None, effects: OwnRequest | None, server: ServerStatements | None = None
                     ) -> Callable[[Outcome, dict[str, str] | None], None]:
        """A Query that drops the client's unnamed statement (`dropped`) and the server connection's
        (`server`, when the Query went upstream) is answered: skipped in an error window it did not run,
        and Postgres keeps the unnamed statement (found by randomized comparisons)."""

        def ended(outcome: Outcome, error: dict[str, str] | None) -> None:
            if effects is not None:
                effects.ended(outcome, error)
            if dropped is not None:
                dropped.ended(outcome, error)
            if server is not None:
                server.query_answered(outcome)

        return ended

    def _settling(self, name: bytes) -> bool:
        """A Parse, Bind or Describe naming `name`, or a DEALLOCATE of it, waits while a Parse or Close of
        it (or, the unnamed statement, a simple Query) in an earlier group of the client's is unanswered:
        whether the name is there depends on it, as one skipped in an error window changed nothing. Inside
        one group no wait is needed: an error there skips the rest of it."""
        queue = self.relay.queue
        return self.statements.waits(name, self.group) and queue is not None and queue.groups_owed() > 0

    def _deallocate(self, decision: Decision) -> OwnRequest | None:
        """A Query that is one `DEALLOCATE name` of the client's own statement: the proxy answers it (in
        order: 25P02 in a failed block, when the statement stays)."""
        if len(decision.deallocates) != 1 or decision.statement_count != 1:
            return None
        (name,) = decision.deallocates
        encoded = name.encode()
        if encoded not in self.statements.by_name or len(encoded) >= NAME_BYTES:
            return None  # a name cut to 63 bytes: the server runs it (stand-ins), with its NOTICE 42622
        queue = self.relay.queue
        assert queue is not None
        (change,) = self.statements.drop_sent([encoded], self.group)

        def ended(outcome: Outcome, error: dict[str, str] | None) -> None:
            refused = outcome is Outcome.COMPLETED and queue.status == b"E"  # answered with 25P02
            change.ended(Outcome.FAILED if refused else outcome, error)

        return OwnRequest(ended)

    def _effects(self, decision: Decision) -> OwnRequest | None:
        """Act on what a statement does to session state as it goes upstream: statements dropped on the
        server or deallocated by the client's name, settings to read back (and startup values to apply
        again after a reset)."""
        if decision is ALLOW:
            return None
        relay = self.relay
        watcher: OwnRequest | None = None
        self.context_reset = self.context_reset or decision.resets_all
        deallocated = self._stand_ins(decision.deallocates)
        if decision.drops_statements or deallocated:
            assert relay.server is not None
            if decision.drops_statements:
                relay.server.state.statements.dropped()
            changes = self.statements.drop_sent(self.statements.named() if decision.drops_statements else deallocated,
                                                self.group)

            def ended(outcome: Outcome, error: dict[str, str] | None) -> None:
                for change in changes:
                    change.ended(outcome, error)

            watcher = OwnRequest(ended)
        if decision.set_names or decision.reset_names or decision.resets_all or decision.unknown_settings:
            assert relay.server is not None
            relay.server.state.unnamed_settings = relay.server.state.unnamed_settings or decision.unknown_settings
            held = relay.server.state.settings
            if decision.resets_all:
                held.clear()  # the server's defaults from here on (a read-back corrects a rollback)
            for name in decision.reset_names:
                held.pop(name, None)
            reapply = relay.settings.changed(decision.set_names, decision.reset_names, decision.resets_all, decision.unknown_settings)
            self.reapply.update(reapply)
            self.reset_in_block = self.reset_in_block or bool(decision.resets_all or decision.reset_names)
            self.reapply_where_reset = self.reapply_where_reset or decision.statement_after_reset
        return watcher

    def _stand_ins(self, names: frozenset[str]) -> list[bytes]:
        """The client's statements that a DEALLOCATE inside a longer Query or an Execute names: on the
        server they live under other names, so just before the client's message the server gets a
        statement of the proxy's under each client name (closed first, as one may be left from a
        DEALLOCATE that did not run), and the DEALLOCATE runs there as Postgres runs it: in order, with
        its own errors, never another client's statement. None in a failed transaction block: the Parse
        would fail there too (25P02), and the DEALLOCATE fails with it as in Postgres."""
        assert self.relay.queue is not None
        if self.relay.queue.status == b"E":
            return []
        held = [name.encode() for name in sorted(names) if name.encode() in self.statements.by_name]
        for name in held:
            self.relay.own(messages.close_statement(name), Request.CLOSE)
            self.relay.own(messages.message(b"P", name + STAND_IN), Request.PARSE)
        self.stand_ins += [name for name in held if name not in self.stand_ins]
        return held

    def _close_stand_ins(self, group_end: bool) -> None:
        """Close the stand-ins again right behind the client's message (one a DEALLOCATE did not reach
        would answer a later Bind of that name, of any client of the server connection); behind a Query,
        and behind the Sync of a group that Executes one, in a Sync group of the proxy's own (after its
        ReadyForQuery when it may start COPY IN, `follow_up`): a client's Execute that failed (a portal
        gone with its transaction) skipped the Close right behind it with it."""
        if not self.stand_ins or (group_end and self.relay.follow_ups_wait):
            return
        for name in self.stand_ins:
            self.relay.own(messages.close_statement(name), Request.CLOSE)
        if group_end:
            self.relay.own(messages.sync(), Request.SYNC)
            self.stand_ins = []

    def parse(self, message: Message) -> bool:
        relay = self.relay
        checked = relay.checked_parse(message)
        if checked is None:
            return True
        client_name, text, definition, decision = checked
        if self._unreadable_name(client_name):
            return True
        name = client_name[:NAME_BYTES]
        if self._settling(name):
            return False
        bound = self.statements.room_for(name, definition)
        if bound is not None:
            relay.refuse_extended(Refusal(
                errors.CONFIGURATION_LIMIT_EXCEEDED,
                f"too much kept in prepared statements: this client may keep {self.statements.limit} bytes of them"
                if bound == "client" else
                f"too much kept in prepared statements: all clients together may keep {self.statements.budget.limit} bytes",
                "close (deallocate) prepared statements the client no longer uses, or raise [client] "
                + ("max_prepared_statement_bytes" if bound == "client" else "max_total_prepared_statement_bytes"),
            ))
            return True
        if name and name in self.statements.by_name:
            self._parse_again(name, definition, client_name)
            return True
        assert relay.server is not None
        server = relay.server.state.statements
        statement = (statement_for(definition, relay.settings.current.get("search_path", ""), decision) if name
                     else unnamed_statement(definition, decision))
        # As in Postgres, a failed Parse creates nothing, and one of the unnamed statement drops the old one
        # before it parses.
        change = self.statements.change_sent(name, self.group, statement, UNCHANGED if name else None)
        self.statements.remember(name, statement)
        if may_end_transaction(text):
            self.ending.add(name)
        else:
            self.ending.discard(name)
        relay.note_copying(name, text)
        # Held, or being parsed for another name (a Parse in flight): checked under a name of the proxy's first.
        # `_prepare` would close it first, and its Parse failing (25P02 in a block the client failed) would take
        # it from the names that use it.
        if name and server.has(statement.server_name):
            self._parse_held(statement, server, client_name, change)
            return True
        if name:
            self._prepare(statement, server, Owner.CLIENT, client_name, change)
            return True
        server.unnamed_sent(statement)
        relay.send(message.raw, Request.PARSE, watcher=OwnRequest(self._client_unnamed_parsed(server, statement, change)))
        return True

    def _client_unnamed_parsed(self, server: ServerStatements, statement: Statement, change: Change
                               ) -> Callable[[Outcome, dict[str, str] | None], None]:
        """The client's Parse of the unnamed statement is answered: what the server connection and the
        client hold follows the outcome."""
        server_ended = self._unnamed_parsed(server, statement)

        def ended(outcome: Outcome, error: dict[str, str] | None) -> None:
            server_ended(outcome, error)
            change.ended(outcome, error)

        return ended

    def _parse_again(self, name: bytes, definition: bytes, client_name: bytes) -> None:
        """A Parse of a name the client already holds: Postgres checks the text first, then refuses the
        name (42P05). Parsing the text under the server-side name of the client's statement, which the
        server connection is made to hold, fails the same way, and the error is renamed on the way back
        (to `client_name`, the name as the client sent it; `name` is cut to NAME_BYTES)."""
        relay = self.relay
        existing = self._ensure(name, IN_PARSE)
        assert existing is not None and relay.server is not None
        server = relay.server.state.statements

        def ended(outcome: Outcome, error: dict[str, str] | None) -> None:
            if outcome is Outcome.COMPLETED:  # it was not there after all: whatever holds the name now is unknown
                server.dropped()

        relay.send(messages.message(b"P", existing.server_name + b"\0" + definition), Request.PARSE,
                   watcher=OwnRequest(ended), reply=existing.server_name + b"\0" + client_name)

    @staticmethod
    def _unnamed_parsed(server: ServerStatements, statement: Statement) -> Callable[[Outcome, dict[str, str] | None], None]:
        def ended(outcome: Outcome, error: dict[str, str] | None) -> None:
            server.unnamed_parsed(statement, outcome)

        return ended

    def _parse_held(self, statement: Statement, server: ServerStatements, client_name: bytes, change: Change) -> None:
        """A client's Parse of a statement the server connection holds already (for another of the client's
        names, or another client): Postgres still answers it (25P02 in a failed block, an error when what
        the text names has changed), so it is parsed under a name of the proxy's and closed again, then
        under its own name. Closed and parsed under its own name first, a failure would take it from the
        names that use it."""
        server.in_use.add(statement.server_name)
        relay = self.relay
        relay.send(messages.message(b"P", PARSE_CHECK + b"\0" + statement.definition), Request.PARSE, watcher=change,
                   reply=PARSE_CHECK + b"\0" + client_name)
        relay.own(messages.close_statement(PARSE_CHECK), Request.CLOSE)
        # Parsed there, the text is parsed again under the held name too, so it returns the shape it has now,
        # as a Parse does in Postgres after a change of schema (other clients' statements described with
        # another shape are then refused by the shape check, `_result_changed`; kept as it was, the held
        # statement would answer this client 0A000 for good). Skipped behind a failed check, it stays.
        watch = server.parse_sent(statement.server_name)
        relay.own(messages.close_statement(statement.server_name), Request.CLOSE)
        relay.own(messages.message(b"P", statement.server_name + b"\0" + statement.definition), Request.PARSE,
                  OwnRequest(watch.ended), speaks=PREPARED_AGAIN_FAILED)

    def _prepare(self, statement: Statement, server: ServerStatements, owner: Owner, client_name: bytes = b"",
                 change: Change | None = None, routine: bytes = b"") -> None:
        """Close the server-side name first (it may be there, or half-known after a failed group), make
        room, then Parse it; OWN: its ParseComplete is swallowed, and it answers for the client's message
        behind it, read in `routine`. CLIENT: the client's Parse of `client_name`, whose `change` is told
        the outcome."""
        relay = self.relay
        relay.own(messages.close_statement(statement.server_name), Request.CLOSE)
        for victim in server.evictions():
            relay.own(messages.close_statement(victim), Request.CLOSE)
        server.in_use.add(statement.server_name)
        parsed = server.parse_sent(statement.server_name).ended
        raw = messages.message(b"P", statement.server_name + b"\0" + statement.definition)
        if owner is Owner.OWN:  # the client's statement, prepared again: its failure is the client's error
            relay.own(raw, Request.PARSE, OwnRequest(parsed), speaks=PREPARED_AGAIN_FAILED, routine=routine)
            return

        assert change is not None

        def client_parse_ended(outcome: Outcome, error: dict[str, str] | None) -> None:
            parsed(outcome, error)
            change.ended(outcome, error)

        relay.send(raw, Request.PARSE, watcher=OwnRequest(client_parse_ended), reply=statement.server_name + b"\0" + client_name)

    def _unreadable_name(self, name: bytes) -> bool:
        """Refuse (22021, as Postgres refuses the message) a statement name that is not valid UTF-8 when
        the client's encoding is UTF8: the server reads the proxy's name for the statement, never the
        client's, so it cannot. Names in other client encodings are not read."""
        if name.isascii() or self.relay.client_view.get("client_encoding", "UTF8").upper() not in ("UTF8", "UNICODE"):
            return False
        try:
            name.decode()
        except UnicodeDecodeError as exc:
            self.relay.refuse_extended(Refusal(
                errors.CHARACTER_NOT_IN_REPERTOIRE, f'invalid byte sequence for encoding "UTF8": {_shown(name, exc.start)}', ""))
            return True
        return False

    def _ensure(self, name: bytes, routine: bytes) -> Statement | None:
        """Make sure the server connection holds the client's statement `name` (b"" for the unnamed), for the
        client's message that Postgres reads in `routine` (IN_BIND, ...); None when the client has no such
        statement (the server then reports it, as Postgres would)."""
        relay = self.relay
        assert relay.server is not None
        server = relay.server.state.statements
        statement = self.statements.lookup(name)
        if statement is None:
            if not name and server.unnamed is not None:
                relay.own(messages.message(b"C", b"S\0"), Request.CLOSE)  # another client's: gone, as for this client
                server.unnamed_gone()
            return None
        if not name:
            if server.unnamed is not statement:
                server.unnamed_sent(statement)
                relay.own(messages.message(b"P", b"\0" + statement.definition), Request.PARSE,
                          OwnRequest(self._unnamed_parsed(server, statement)), speaks=PREPARED_AGAIN_FAILED,
                          routine=routine)
            return statement
        server.in_use.add(statement.server_name)
        if not server.has(statement.server_name):
            self._prepare(statement, server, Owner.OWN, routine=routine)
        return statement

    def bind(self, message: Message) -> bool:
        relay = self.relay
        body = message.body
        portal, client_name, end = split_bind(body)
        if client_name.startswith(PREFIX) or portal.startswith(PREFIX):
            relay.refuse_extended(reserved("statement or portal", client_name if client_name.startswith(PREFIX) else portal))
            return True
        if self._unreadable_name(client_name):
            return True
        name = client_name[:NAME_BYTES]
        if self._settling(name):
            return False
        statement = self._ensure(name, IN_BIND)
        if statement is not None and statement.shape is not None:
            changed = self._result_changed(statement, name, client_name)
            if changed is None:
                return False
            if changed:
                relay.fail_extended(RESULT_CHANGED)
                return True
        if statement is not None and statement.decision is not ALLOW:
            self.portals[portal] = statement.decision
        else:
            self.portals.pop(portal, None)
        if statement is not None and name in self.ending:
            self.ending_portals.add(portal)
        else:
            self.ending_portals.discard(portal)
        relay.note_bound(portal, name)
        if statement is None or not name:
            relay.send(message.raw, Request.BIND)
            return True
        relay.send(messages.message(b"B", portal + b"\0" + statement.server_name + b"\0" + body[end:]), Request.BIND,
                   reply=statement.server_name + b"\0" + client_name)
        return True

    def describe(self, message: Message) -> bool:
        relay = self.relay
        body = message.body
        name, _ = messages.split_name(body, 1)
        if name.startswith(PREFIX):
            relay.refuse_extended(reserved("statement or portal", name))
            return True
        if body[:1] != b"S":
            relay.send(message.raw, Request.DESCRIBE)
            return True
        if self._unreadable_name(name):
            return True
        if self._settling(name[:NAME_BYTES]):
            return False
        statement = self._ensure(name[:NAME_BYTES], IN_DESCRIBE)
        if statement is None:
            relay.send(message.raw, Request.DESCRIBE)
            return True
        watch = None
        if statement.shape is not None:
            changed = self._result_changed(statement, name[:NAME_BYTES], name)
            if changed is None:
                return False
            if changed:
                relay.fail_extended(RESULT_CHANGED)
                return True
        else:  # the client is told the shape now: remember it, and the server connection's
            assert relay.server is not None
            server = relay.server.state.statements
            key = statement.server_name if name else b""
            watch = ShapeWatch(server, key, statement)
            if not isinstance(server.shapes.get(key), bytes):
                server.shapes[key] = watch
        if not name:
            relay.send(message.raw, Request.DESCRIBE, watcher=watch, rows=watch is not None)
            return True
        relay.send(messages.message(b"D", b"S" + statement.server_name + b"\0"), Request.DESCRIBE, watcher=watch,
                   reply=statement.server_name + b"\0" + name, rows=watch is not None)
        return True

    def _result_changed(self, statement: Statement, name: bytes, client_name: bytes) -> bool | None:
        """Whether the server connection's statement for the client's described `statement` (named `name`,
        b"" the unnamed one) returns another shape than the client was told: Postgres then answers each
        Bind and Describe of it with 0A000 (`RESULT_CHANGED`), until the client closes it or the schema
        gives the old shape back. None when that is not known yet (the proxy just prepared it there, or
        another client parsed it again): the proxy's own Describe of it goes first, with a Flush, and the
        client's messages wait for its answer (`waiting`), so the message never runs unchecked."""
        relay = self.relay
        assert relay.server is not None and relay.queue is not None
        server = relay.server.state.statements
        key = statement.server_name if name else b""
        known = server.shapes.get(key)
        if isinstance(known, bytes):
            return known != statement.shape
        if relay.queue.skipping():
            return False  # the server skips the message, as every one up to the client's Sync
        if known is None:
            known = server.shapes[key] = ShapeWatch(server, key, None)
            relay.send(messages.message(b"D", b"S" + key + b"\0"), Request.DESCRIBE, Owner.GATE, known,
                       reply=key + b"\0" + client_name if name else b"", rows=True)
        # else a Describe of it is in flight (the client's, for another of its names with the same text)
        known.answered = self._shape_answered
        self.shape_wait = known
        relay._out.append(FLUSH)  # the server answers now, not at the client's Sync, which waits behind
        return None

    def _shape_answered(self) -> None:
        self.shape_wait = None

    def close(self, message: Message) -> None:
        """A client's Close of its statement forgets it (skipped in an error window, it closed nothing, as
        in Postgres); the server-side statement may be shared, so a Close of a name never prepared
        stands in for it, keeping the CloseComplete in order."""
        relay = self.relay
        body = message.body
        name, _ = messages.split_name(body, 1)
        if name.startswith(PREFIX):
            relay.refuse_extended(reserved("statement or portal", name))
            return
        if body[:1] != b"S":
            self.portals.pop(name, None)
            relay.send(message.raw, Request.CLOSE)
            return
        if self._unreadable_name(name):
            return
        key = name[:NAME_BYTES]
        statement = self.statements.lookup(key)
        change = None
        if statement is not None or key in self.statements.unsettled:
            change = self.statements.change_sent(key, self.group, None)
        if not key:
            self.statements.unnamed = None
        elif statement is not None:
            self.statements.forget(key)
            relay.send(messages.close_statement(NEVER_PREPARED), Request.CLOSE, watcher=change)
            return
        relay.send(message.raw, Request.CLOSE, watcher=change)

    def execute(self, message: Message) -> bool:
        relay = self.relay
        portal, _ = messages.split_name(message.body)
        if portal.startswith(PREFIX):
            relay.refuse_extended(reserved("portal", portal))
            return True
        decision = self.portals.get(portal, ALLOW)
        if decision.refusal_at_transaction_start is not None:  # lastval(), currval()
            starts = self._reads_others_sequences(decision)
            if starts is None:
                return False
            if starts:
                relay.refuse_extended(decision.refusal_at_transaction_start)
                return True
        if not self._context(decision):
            return False
        self._behind_reset()
        watcher = self._effects(decision)
        relay.note_executed(portal)
        relay.send(message.raw, Request.EXECUTE, watcher=watcher)
        self._close_stand_ins(group_end=False)
        if portal in self.ending_portals:  # a COMMIT inside the group: what follows starts a transaction
            self.context_set = False
            self.context_reset = True
            self.group_may_end = True
            self._rolled_back()
        self.group_may_begin = self.group_may_begin or decision.transaction_setup
        return True

    def function_call(self, message: Message, decision: Decision = ALLOW) -> bool:
        if decision.refusal_at_transaction_start is not None:  # lastval(), currval()
            starts = self._reads_others_sequences(decision)
            if starts is None:
                return False
            if starts:
                self.relay.refuse_group(decision.refusal_at_transaction_start)
                return True
        if not self._context(ALLOW):
            return False
        self._behind_reset()
        self.relay.send(message.raw, Request.FUNCTION_CALL)
        self.group_sent()
        return True

    # -- group ends ------------------------------------------------------------------------------

    def group_sent(self) -> None:
        """A Query, Sync or FunctionCall went upstream: what follows a group (`_after_group`) goes behind it
        now, or after its ReadyForQuery when it may start COPY IN (`follow_up`)."""
        relay = self.relay
        self.context_set = False
        if relay.mid_group:
            return
        self.group += 1
        relay.group_copy_checked()
        if relay.follow_ups_wait:
            return
        self._after_group()

    def follow_ups_due(self) -> bool:
        """The proxy has messages of its own to send behind the client's group: stand-ins to close,
        startup values to apply again, or settings to read back."""
        return bool(self.stand_ins or self.reapply or self.relay.settings.stale)

    def follow_up(self) -> None:
        """The ReadyForQuery of a Query that may have started COPY IN (or begun a block) came: what it held
        back. The status now says whether a block is open, whatever the group's text suggested."""
        self._close_stand_ins(group_end=not self.relay.mid_group)
        self.group_may_end = self.group_may_begin = False
        if not self.relay.mid_group:
            self._after_group()

    def _after_group(self) -> None:
        """Behind a group, the client between groups: the stand-ins an Execute left closed, its startup
        values again after a reset, then a read-back of its settings if they may have changed."""
        relay = self.relay
        self._close_stand_ins(group_end=True)
        if self.reapply:
            self._reapply(self.reapply, self.reapply_where_reset)
            self.reapply, self.reapply_where_reset = {}, False
        if relay.settings.stale:
            # Never where it would run inside a transaction block: a read there is thrown away (read again
            # after the block), and its failure (the client's statement_timeout, a cancel racing the end of
            # the client's statement) would abort the client's block. So behind a group that may end the
            # block, or that starts outside one and cannot begin one; behind one that may begin a block,
            # after its ReadyForQuery, if that says no block is open (`follow_up`).
            status = relay.queue.status if relay.queue is not None else b"I"
            if self.group_may_end or (status == b"I" and not self.group_may_begin):
                self._read_settings()
            elif status == b"I":
                relay.follow_ups_wait = True
        self.group_may_end = self.group_may_begin = False

    def _rolled_back(self) -> None:
        """A statement that may roll back (to a savepoint) went upstream after a reset: the startup values
        applied behind the reset may sit in a savepoint it undoes, while the reset before the savepoint
        stands. They go again behind it, where the settings are at the server's reset value."""
        if self.reset_in_block:
            self.reapply.update(self.relay.settings.startup)
            self.reapply_where_reset = True

    def _reapply(self, values: dict[str, str], where_reset: bool) -> None:
        """The client's startup values again behind a group that reset settings (RESET returns to them in
        a direct session); with `where_reset` (a statement followed the reset, or a rollback may have
        undone the values but not the reset) only where a setting is still at the server's reset value,
        which costs a read of pg_settings. In a Sync group of the proxy's own; the read-back that follows
        says what the connection holds."""
        relay = self.relay
        assert relay.server is not None and relay.queue is not None
        watch = BlockWatch(relay.queue)
        if not where_reset:  # they are the client's again before its next statement: it is not told otherwise
            relay.hide_parameters(values)
        name, sql = (REAPPLY_STATEMENT, REAPPLY_SQL) if where_reset else (APPLY_STATEMENT, APPLY_SQL)
        self._own_statement(name, sql)
        relay.own(apply_bind(values, name), Request.BIND, watch)
        relay.own(messages.execute(name.decode()), Request.EXECUTE)
        relay.own(close_portal(name), Request.CLOSE)
        relay.own(messages.sync(), Request.SYNC,
                  OwnRequest(lambda outcome, error: self._reapplied(watch, outcome, error, values, where_reset)))
        relay.server.state.settings.update(values)

    def _reapplied(self, watch: BlockWatch, outcome: Outcome, error: dict[str, str] | None, values: dict[str, str],
                   where_reset: bool) -> None:
        """The startup values could not be applied again: the session ends with the error. Not when the
        client's block had failed before (nothing ran, nor did the client's reset; the read-back after
        the block says what the connection holds), and not when a cancel outside a block landed there:
        they are applied again, and read back behind."""
        self.relay.show_parameters()
        if outcome is not Outcome.FAILED:
            self.reapply_retries = 0
            return
        relay = self.relay
        if relay.server is not None and cancelled_outside_a_block(watch, error, self.reapply_retries):
            self.reapply_retries += 1
            self._reapply(values, where_reset)
            relay.settings.stale = True
            self._read_settings()
            relay.flush_own()
            return
        if watch.failed_itself(outcome):
            self._prelude_ended(outcome, error)

    def _read_settings(self) -> None:
        relay = self.relay
        assert relay.queue is not None and relay.server is not None
        state = relay.server.state
        rows: list[list[bytes | None]] = []
        watch = BlockWatch(relay.queue)
        self._own_statement(READ_STATEMENT, READ_SQL)
        relay.own(read_bind(relay.settings.names_to_read(), relay.settings.max_bytes), Request.BIND, watch)
        relay.own(messages.execute(READ_STATEMENT.decode()), Request.EXECUTE, OwnRequest(lambda o, e: None, rows), rows=True)
        relay.own(close_portal(READ_STATEMENT), Request.CLOSE)
        relay.own(messages.sync(), Request.SYNC,
                  OwnRequest(lambda outcome, error: self._settings_read(watch, state, outcome, error, rows)))

    def _settings_read(self, watch: BlockWatch, state: ServerState, outcome: Outcome, error: dict[str, str] | None,
                       rows: list[list[bytes | None]]) -> None:
        """The read-back is answered. Its client may have left meanwhile (psql -c sends Terminate at the
        SET's ReadyForQuery; the pool then drains what the connection owes): what it read is still what
        the server connection (`state`) holds, and is recorded there. A read-back that failed leaves the
        connection's settings unknown: it is reset before it serves any other client."""
        relay = self.relay
        if watch.aborted_block(outcome):
            fields = error or {}
            relay.hooks.fail(fields.get("C", errors.INTERNAL_ERROR), PROXY_ABORTED + fields.get("M", "unknown error"))
            return
        if watch.queue.status != b"I":
            return  # read inside a transaction block: read again at the next group end
        self.reset_in_block = False
        oversized = next((row[1] for row in rows if len(row) == 2 and row[0] is None and row[1] is not None), None)
        if outcome is Outcome.COMPLETED and oversized is not None:
            # The values stayed on the server: the connection is reset before it serves any other client.
            relay.settings.stale = False
            state.unnamed_settings = True
            relay.hooks.fail(
                errors.CONFIGURATION_LIMIT_EXCEEDED,
                f"session settings of {oversized.decode(errors='replace')} bytes are more than pg-tenant-proxy keeps"
                f" for a client ([client] max_settings_bytes = {relay.settings.max_bytes})",
                "keep large values in a table rather than in settings, or raise [client] max_settings_bytes",
            )
        elif outcome is Outcome.COMPLETED:
            values = [
                (row[0].decode(errors="replace"), row[1].decode(errors="replace"))
                for row in rows
                if len(row) == 2 and row[0] is not None and row[1] is not None
            ]
            relay.settings.read(values)
            state.settings = dict(relay.settings.current)
            self.read_retries = 0
        elif relay.server is not None and relay.server.state is state and cancelled_outside_a_block(watch, error, self.read_retries):
            # The client's cancel raced the end of its statement and landed here (or its statement_timeout
            # is shorter than the read): read again, rather than lose what the statement set.
            self.read_retries += 1
            self._read_settings()
            relay.flush_own()
            return
        else:
            relay.settings.stale = False  # keep what is known rather than hold the connection forever
            state.unnamed_settings = True
            self.read_retries = 0

    def read_done(self) -> None:
        """The client's read is used up. A client that prepares with Parse / Describe / Flush and no Sync
        (asyncpg does) leaves the server inside an implicit transaction; a Sync of the proxy's own, whose
        ReadyForQuery is swallowed, ends it so the connection can go back to the pool meanwhile."""
        relay = self.relay
        out = relay._out
        if (
            relay.mid_group
            and relay.describing
            and out
            and bytes(out[-1][:1]) == b"H"
            and relay.scanner.at_boundary()
        ):
            # An error that came before it (the client's messages waited on a Describe of the proxy's and
            # were sent behind the error) counts as the group's: its ReadyForQuery alone does not tell.
            failed = relay.queue is not None and relay.queue.skipping()
            relay.own(messages.sync(), Request.SYNC, OwnRequest(lambda outcome, error: self._flush_sync_ended(outcome, failed)))
            relay.mid_group = False
            relay.sync_owed = True
            self.flush_sync_pending = True

    def _flush_sync_ended(self, outcome: Outcome, failed_before: bool) -> None:
        """The proxy's Sync after a Flush is answered. If the client's messages before it failed (while it
        was owed, or `failed_before` it was sent), the client is still inside the error window Postgres
        would keep until the client's own Sync."""
        self.flush_sync_pending = False
        if outcome is Outcome.FAILED or failed_before:
            self.relay.skip_group = True

    def waiting(self) -> bool:
        """The client's messages wait while the proxy's Sync after a Flush is unanswered (the server's
        error window, if any, is not known yet), or the Describe that tells whether a statement's result
        shape changed (`_result_changed`)."""
        return self.flush_sync_pending or self.shape_wait is not None

    def plain_query(self, data: bytes) -> bool:
        """The hot path in transaction mode: a read holding one simple Query that the guard clears, at
        the start of a transaction on a connection that holds the context statement, goes upstream in
        one write behind the context, owing one entry for each. False when it needs the general path."""
        relay = self.relay
        queue, server = relay.queue, relay.server
        if (
            queue is None or server is None or queue.status != b"I" or queue.client_group_ends or queue.skipping()
            or self.context_set or self.reapply or self.flush_sync_pending or relay.follow_ups_wait
            or relay.skip_group or relay.mid_group or relay.settings.stale
        ):
            return False
        context = relay.context
        statements = server.state.statements
        if (
            not statements.has(context.statement_name)
            or not relay.clears(data[5:-1])
        ):
            return False
        identity = relay.identity
        statements.in_use.add(context.statement_name)
        relay.sync_owed = False  # a Query ends the client's open group, as Postgres takes it
        self.context_reset = False
        self.only_setup_since_idle = False
        self.statements.unnamed = None  # a simple Query drops the unnamed statement
        statements.unnamed_gone()
        relay.hooks.send_upstream(
            context.transaction_messages(identity.tenant, server.process_id, identity.expires_at, identity.claims_json) + data
        )
        queue.expect_context_query(self.plain_context)
        METRICS.context_sets += 1
        return True

    def sync_group(self, data: bytes, starts: list[int]) -> bool:
        """The hot path of drivers' extended-query groups in transaction mode, at the start of a transaction:
        a read that is a Bind of a statement to a portal, maybe a Describe of that portal, its Execute and
        Sync (`starts`: where each begins); the statement either one the client prepared that the server
        connection holds (with the result shape the client was told, if it was told one: a driver's prepared
        statement), or the unnamed statement, parsed by a Parse that opens the read (`_unnamed_parse`). The
        statement must do nothing the relay acts on (the guard's `ALLOW`). It goes upstream in one write
        behind the context, a named statement's Bind naming the server's statement
        (`ReplyQueue.expect_context_group`). False when it needs the general path."""
        count = len(starts)
        relay = self.relay
        queue, server = relay.queue, relay.server
        if (
            count < 3 or count > 5 or queue is None or server is None or queue.status != b"I" or queue.client_group_ends
            or queue.skipping() or self.context_set or self.reapply or self.stand_ins or self.flush_sync_pending
            or self.shape_wait is not None or relay.follow_ups_wait or relay.skip_group or relay.mid_group
            or relay.settings.stale or relay.copying or relay.copy_syncs or relay.copy_input is not _NO_COPY_INPUT
            or data[starts[-2]] != 69  # 'E'
        ):
            return False
        parsed = data[0] == 80  # 'P'
        bind, bind_end, execute = starts[parsed], starts[parsed + 1], starts[-2]
        portal_end = data.find(b"\0", bind + 5, bind_end)
        name_end = data.find(b"\0", portal_end + 1, bind_end)
        portal = data[bind + 5:portal_end]
        client_name = data[portal_end + 1:name_end]
        if (
            (count - parsed != 3 and count - parsed != 4) or data[bind] != 66 or portal_end < 0 or name_end < 0
            or bool(client_name) == parsed
            or len(client_name) > NAME_BYTES or not client_name.isascii()
            or data[execute + 5:execute + 6 + len(portal)] != portal + b"\0"
            or (count - parsed == 4 and data[bind_end + 5:execute] != b"P" + portal + b"\0")
            or portal.startswith(PREFIX) or client_name in self.ending
        ):
            return False
        held = server.state.statements
        context = relay.context
        if not held.has(context.statement_name):
            return False
        parse = None
        if parsed:
            parse = self._unnamed_parse(data, bind, held)
            if parse is None:
                return False
            entry = SYNC_GROUP
        else:
            statement = self.statements.by_name.get(client_name)
            if statement is None or statement.decision is not ALLOW:
                return False
            name = statement.server_name
            if not held.has(name) or (statement.shape is not None and held.shapes.get(name) != statement.shape):
                return False
            held.in_use.add(name)
            entry = self._group_entries.get(client_name)  # type: ignore[assignment]
            if entry is None or not entry.reply.startswith(name):
                if len(self._group_entries) > len(self.statements.by_name):  # names closed since: at most one per name held
                    self._group_entries.clear()
                entry = self._group_entries[client_name] = Owed(Request.SYNC_GROUP, Owner.CLIENT,
                                                                name + b"\0" + client_name, None, False)
            data = b"".join((messages.message(b"B", portal + b"\0" + name + data[name_end:bind_end]), data[bind_end:]))
        held.in_use.add(context.statement_name)
        if self.portals:
            self.portals.pop(portal, None)
        self.ending_portals.discard(portal)
        identity = relay.identity
        relay.hooks.send_upstream(
            context.transaction_messages(identity.tenant, server.process_id, identity.expires_at, identity.claims_json) + data
        )
        queue.expect_context_group(self.plain_context, entry, parse)
        METRICS.context_sets += 1
        relay.sync_owed = False
        relay.describing = True
        self.context_reset = False
        self.only_setup_since_idle = False
        self.group += 1
        return True

    def _unnamed_parse(self, data: bytes, end: int, held: ServerStatements) -> Owed | None:
        """The client's Parse of the unnamed statement opening a group the hot path takes (`data` up to
        `end`): its text one the guard clears (`ALLOW`) that neither ends a transaction nor starts COPY IN.
        Remembered as the general path does (`parse`); returns its entry, whose watcher settles the client's
        and the server connection's unnamed statement by how it ended. None for a named Parse, or text the
        general path must read (nothing changed then)."""
        relay = self.relay
        text_end = data.find(b"\0", 6, end)
        if data[5] != 0 or text_end < 0:
            return None
        text = data[6:text_end]
        if not relay.clears(text) or may_start_copy_in(text):
            return None
        statement = unnamed_statement(data[6:end], ALLOW)
        change = self.statements.change_sent(b"", self.group, statement, None)
        self.statements.remember(b"", statement)
        self.ending.discard(b"")
        held.unnamed_sent(statement)
        return Owed(Request.PARSE, Owner.CLIENT, b"", OwnRequest(self._client_unnamed_parsed(held, statement, change)), False)

    def session_ended(self) -> None:
        self.statements.session_ended()

    def maybe_release(self) -> None:
        """At ReadyForQuery 'I' with nothing owed, nothing held and the client between groups, the server
        connection goes back to the pool. The one place that decides it."""
        relay = self.relay
        queue = relay.queue
        if (
            queue is None
            or not queue.idle()
            or queue.status != b"I"
            or relay.mid_group
            or relay.held
            or relay.skip_group
            or relay.preparing
            or relay.settings.stale
            or not relay.scanner.at_boundary()
        ):
            return
        if self.portals or self.ending_portals:  # the transaction ended: Postgres dropped its portals
            self.portals.clear()
            self.ending_portals.clear()
        relay.server = relay.queue = None  # detach(), inlined on the hot path
        relay.hooks.release_server()
