"""Prepared statements under transaction pooling: the client's, and what a server connection holds.

A client's named Parse is remembered by the client's name with its definition (query text, parameter
types) and the search_path it was parsed under. On the server it is named after a digest of all three,
so clients that prepare the same statement share it on a server connection, and a statement never
changes meaning under another client's search_path. A Bind or Describe naming a statement the server
connection lacks gets it prepared there just before, by a Parse whose reply the proxy swallows.

The client's unnamed statement belongs to the client too: it lives, as in Postgres, until the client's
next Parse of the unnamed statement or its next simple Query, across Syncs and server connections, and
is prepared again (as the unnamed statement) on a server connection that does not hold it.

The proxy acts on a client's Parse, Close, simple Query or SQL that drops statements (DEALLOCATE,
DEALLOCATE ALL, DISCARD ALL) as it goes upstream, as if it will run, so a message behind it in the same
write sees the names as Postgres will; the server's answers settle each name (`Change`). Until they have, a message of a later Sync group that
depends on whether the name is there waits (a Parse or Close skipped in an error window changed
nothing in Postgres); inside one group the assumption holds, as an error skips the rest of it.

A server connection believes a statement present only once its ParseComplete has arrived, or while its
Parse is in flight, in the current *generation*: DEALLOCATE ALL and DISCARD ALL start a new generation
when they are sent, so a ParseComplete from before them never marks a statement present again.

A prepared statement's result is fixed in Postgres: once its plan would return another row type (a
column dropped, added, or its type changed), every Bind or Describe of it fails with 0A000 "cached plan
must not change result type" until the client closes it (or the schema gives the old shape back), and
drivers that cache descriptions (asyncpg, pgjdbc, npgsql) rely on that to prepare again. A statement the
proxy prepares again (on another server connection, or for another client that Parses the same text)
takes the schema of the moment instead. So the proxy remembers the result shape (`result_shape`) each
client statement was described with (`Statement.shape`, from the reply to the client's own Describe) and
the shape of each statement a server connection holds, when known (`ServerStatements.shapes`, from any
Describe of it there, unknown after each Parse); the relay compares the two before it lets a Bind or
Describe of a described statement through.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy.relay.replies import Outcome

if TYPE_CHECKING:
    from proxy.guard import Decision

PREFIX = b"pg_tenant_proxy_"
# A statement name never prepared: Close of it only yields CloseComplete, standing in for a client's Close.
NEVER_PREPARED = PREFIX + b"none"
# Where a client's Parse of a statement the server connection holds already is checked (and closed again).
PARSE_CHECK = PREFIX + b"parse_check"
# NAMEDATALEN - 1: Postgres keys prepared statements by the first 63 bytes of their protocol name
# (longer names are cut there, so two that agree on them are one statement).
NAME_BYTES = 63
STATEMENT_OVERHEAD = 200  # about what Python spends on one remembered statement besides its bytes


@dataclass(slots=True)
class Statement:
    """A client's prepared statement: the server-side name, the Parse definition (the body after the
    name: text, parameter count, type oids), the guard's decision on its text, and the result shape the
    client was told for it (`result_shape` of the reply to its first Describe since the Parse; None while
    it has described none, when it cannot have kept a description)."""

    server_name: bytes
    definition: bytes
    decision: Decision
    shape: bytes | None = field(default=None, compare=False)


def statement_for(definition: bytes, search_path: str, decision: Decision) -> Statement:
    """A client's named statement, named on the server after a digest of its definition and the search_path."""
    digest = hashlib.sha256(definition + b"\0" + search_path.encode()).hexdigest()[:32]
    return Statement(PREFIX + digest.encode(), definition, decision)


def unnamed_statement(definition: bytes, decision: Decision) -> Statement:
    """A client's unnamed statement: prepared on a server connection as its unnamed statement (again where
    needed), so it has no server-side name."""
    return Statement(b"", definition, decision)


_FIELD_TAIL = struct.Struct("!IhIhih")  # table oid, column number, type oid, type size, type modifier, format code
NO_DATA = b"n"  # the shape of a statement that returns no rows (never a digest's length)


def result_shape(raw: bytes) -> bytes:
    """The shape of a statement Describe's answer, RowDescription or NoData (`raw`, the whole message):
    what Postgres compares when it checks a cached plan's result type (equalTupleDescs), each column's
    name, type oid, type size and type modifier, as a 16-byte digest (kept for every described statement,
    it costs as little for a result of a thousand columns). A column's table and number are left out: a
    table dropped and created again with the same columns changes them, and Postgres runs the statement
    as before."""
    if raw[:1] != b"T":
        return NO_DATA
    (count,) = struct.unpack_from("!h", raw, 5)
    pos = 7
    parts = [raw[5:7]]
    for _ in range(count):
        end = raw.index(b"\0", pos) + 1
        parts.append(raw[pos:end])
        parts.append(raw[end + 6:end + 16])  # type oid, size, modifier
        pos = end + _FIELD_TAIL.size
    return hashlib.blake2b(b"".join(parts), digest_size=16).digest()


class ServerStatements:
    """The named statements one server connection holds, least recently used first (the proxy's own
    statements included, which are never evicted)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.generation = 0
        self.ready: OrderedDict[bytes, None] = OrderedDict()
        self.pending: dict[bytes, int] = {}  # name -> generation its Parse was sent in
        self.in_use: set[bytes] = set()  # used during the current checkout, or the proxy's own: not evicted
        # The client statement the server's unnamed statement holds once every request in flight that
        # changes it (a Parse of it, a simple Query) runs; what it holds by the replies so far; how many of
        # those requests are unanswered; and whether the proxy gave up knowing while some were.
        self.unnamed: Statement | None = None
        self._unnamed_answered: Statement | None = None
        self._unnamed_in_flight = 0
        self._unnamed_lost = False
        # The result shape of a statement held here (b"" the unnamed one), once a Describe of it has told it;
        # while a Describe is in flight, its watch. A statement's result is fixed at its Parse (a later
        # change of schema makes the server refuse it with 0A000), so a shape holds until the next Parse.
        self.shapes: dict[bytes, bytes | ShapeWatch] = {}

    def has(self, name: bytes) -> bool:
        if name in self.ready:
            self.ready.move_to_end(name)
            return True
        return self.pending.get(name) == self.generation

    def holds(self, name: bytes) -> bool:
        """`name` is there for certain: its ParseComplete came in the current generation (`has` counts a
        Parse in flight too)."""
        if name not in self.ready:
            return False
        self.ready.move_to_end(name)
        return True

    def dropped(self) -> None:
        """DEALLOCATE ALL or DISCARD ALL was sent: nothing prepared before it counts any more."""
        self.generation += 1
        self.ready.clear()
        self.pending.clear()
        self.shapes.clear()
        self.unnamed_gone()

    def evictions(self) -> Iterator[bytes]:
        """Statements to close so one more fits, oldest first, sparing those in use."""
        for name in list(self.ready):
            if len(self.ready) + len(self.pending) < self.limit:
                return
            if name not in self.in_use:
                del self.ready[name]
                self.shapes.pop(name, None)
                yield name

    def parse_sent(self, name: bytes) -> ParseWatch:
        """A Close and a Parse of `name` went upstream: present from now on, unless the Parse fails. Both
        skipped (an error earlier in their window), a statement held under `name` is there as it was, with
        the shape it had."""
        shape = self.shapes.pop(name, None)
        watch = ParseWatch(self, name, self.generation)
        if name in self.ready:
            del self.ready[name]
            watch.kept = shape if isinstance(shape, bytes) else b""
        self.pending[name] = self.generation
        return watch

    def unnamed_sent(self, statement: Statement) -> None:
        """A Parse of the unnamed statement went upstream for the client's `statement`: its shape is not
        known. Its outcome goes to `unnamed_parsed`."""
        self._unnamed_in_flight += 1
        self.unnamed = statement
        self.shapes.pop(b"", None)

    def unnamed_parsed(self, statement: Statement, outcome: Outcome) -> None:
        """The Parse of `unnamed_sent` was answered. Completed, the server's unnamed statement holds
        `statement`; failed, nothing (Postgres drops the old one before it parses); skipped in an error
        window, what it held."""
        if outcome is Outcome.COMPLETED:
            self._unnamed_answered = statement
        elif outcome is Outcome.FAILED:
            self._unnamed_answered = None
        self._unnamed_settle()

    def query_sent(self) -> None:
        """A simple Query went upstream: Postgres drops the unnamed statement as it begins one
        (exec_simple_query), unless it is skipped in an error window. Its outcome goes to `query_answered`."""
        self._unnamed_in_flight += 1
        self.unnamed = None

    def query_answered(self, outcome: Outcome) -> None:
        if outcome is not Outcome.SKIPPED:
            self._unnamed_answered = None
        self._unnamed_settle()

    def unnamed_gone(self) -> None:
        """The server's unnamed statement is dropped, or no longer known (a Query whose outcome is not
        followed): none from now on, whatever the requests in flight turn out to do."""
        self.unnamed = self._unnamed_answered = None
        self._unnamed_lost = self._unnamed_in_flight > 0

    def _unnamed_settle(self) -> None:
        """One request that changes the unnamed statement was answered; once none is in flight, the
        replies say what it holds."""
        self._unnamed_in_flight -= 1
        if not self._unnamed_in_flight:
            if self._unnamed_lost:
                self._unnamed_answered = None
                self._unnamed_lost = False
            self.unnamed = self._unnamed_answered


class ParseWatch:
    """Marks a statement present when its ParseComplete arrives in the generation it was sent in."""

    __slots__ = ("server", "name", "generation", "kept")

    def __init__(self, server: ServerStatements, name: bytes, generation: int) -> None:
        self.server = server
        self.name = name
        self.generation = generation
        # Parsed again while held (`ServerStatements.parse_sent`): its shape then (b"" unknown); None when it
        # was not held.
        self.kept: bytes | None = None

    def ended(self, outcome: Outcome, error: dict[str, str] | None) -> None:
        server = self.server
        if server.pending.get(self.name) == self.generation:
            del server.pending[self.name]
            if self.generation != server.generation:
                return
            if outcome is Outcome.COMPLETED:
                server.ready[self.name] = None
            elif outcome is Outcome.SKIPPED and self.kept is not None:  # the Close was skipped too: still there
                server.ready[self.name] = None
                if self.kept and self.name not in server.shapes:
                    server.shapes[self.name] = self.kept

    def row(self, values: list[bytes | None]) -> None:
        """Parse answers no rows."""

    def described(self, raw: bytes) -> None:
        """Parse answers no description."""


class ShapeWatch:
    """A Describe of a statement (`key`: its server-side name, b"" the unnamed one) sent on one server
    connection: its RowDescription or NoData gives the statement's shape there, unless a Parse of the
    name went after it (`shapes` then no longer holds this watch), and the client's `statement`, when
    this is the client's Describe, the shape it was told, if it had none. `answered` is called when it
    is answered, whatever the outcome (a client message waits on it)."""

    __slots__ = ("server", "key", "statement", "answered")

    def __init__(self, server: ServerStatements, key: bytes, statement: Statement | None) -> None:
        self.server = server
        self.key = key
        self.statement = statement
        self.answered: Callable[[], None] | None = None

    def described(self, raw: bytes) -> None:
        shape = result_shape(raw)
        if self.statement is not None and self.statement.shape is None:
            self.statement.shape = shape
        if self.server.shapes.get(self.key) is self:
            self.server.shapes[self.key] = shape

    def ended(self, outcome: Outcome, error: dict[str, str] | None) -> None:
        if self.server.shapes.get(self.key) is self:  # failed or skipped: the shape stays unknown
            del self.server.shapes[self.key]
        if self.answered is not None:
            self.answered()

    def row(self, values: list[bytes | None]) -> None:
        """Describe answers no rows."""


class StatementBudget:
    """What all clients of one proxy process keep in prepared statements, in bytes, against `limit`."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class Unchanged:
    """What a request that did not run leaves under a name: what was there."""


UNCHANGED = Unchanged()


class Unsettled:
    """A client name with requests in flight that change it: how many, the client group (a count of the
    client's Syncs) the last went in, and the statement the server's answers so far leave under it."""

    __slots__ = ("count", "group", "answered")

    def __init__(self, answered: Statement | None, group: int) -> None:
        self.count = 0
        self.group = group
        self.answered = answered


class Change:
    """One request in flight that changes a client name: what the name holds if it runs (`ran`) and if
    it fails (`failed`); skipped, it holds what it held."""

    __slots__ = ("statements", "name", "ran", "failed")

    def __init__(self, statements: ClientStatements, name: bytes, ran: Statement | None,
                 failed: Statement | None | Unchanged) -> None:
        self.statements = statements
        self.name = name
        self.ran = ran
        self.failed = failed

    def ended(self, outcome: Outcome, error: dict[str, str] | None) -> None:
        after = self.ran if outcome is Outcome.COMPLETED else self.failed if outcome is Outcome.FAILED else UNCHANGED
        self.statements.settle(self.name, after)

    def row(self, values: list[bytes | None]) -> None:
        """Parse, Close and a Query's effect on the unnamed statement answer no rows."""

    def described(self, raw: bytes) -> None:
        """Parse, Close and Query answer no description."""


class ClientStatements:
    """One client's prepared statements, bounded: `limit` bytes, counting names, definitions and a fixed
    overhead each (the proxy keeps each definition to prepare it on other server connections), and all
    clients together by the shared `budget`."""

    def __init__(self, limit: int, budget: StatementBudget | None = None) -> None:
        self.limit = limit
        self.budget = budget or StatementBudget(1 << 62)
        self.size = 0
        self.by_name: dict[bytes, Statement] = {}
        self.unnamed: Statement | None = None
        self.unsettled: dict[bytes, Unsettled] = {}

    @staticmethod
    def _size(name: bytes, definition_length: int) -> int:
        return len(name) + definition_length + STATEMENT_OVERHEAD

    def room_for(self, name: bytes, definition: bytes) -> str | None:
        """None when this Parse fits (an unnamed one always does, a named one replaces its namesake), else
        which bound it would pass: "client" or "proxy"."""
        if not name:
            return None
        old = self.by_name.get(name)
        grows = self._size(name, len(definition)) - (self._size(name, len(old.definition)) if old is not None else 0)
        if self.size + grows > self.limit:
            return "client"
        if self.budget.used + grows > self.budget.limit:
            return "proxy"
        return None

    def remember(self, name: bytes, statement: Statement) -> None:
        if not name:
            self.unnamed = statement
            return
        self.forget(name)
        self.by_name[name] = statement
        size = self._size(name, len(statement.definition))
        self.size += size
        self.budget.used += size

    def forget(self, name: bytes) -> bool:
        statement = self.by_name.pop(name, None)
        if statement is None:
            return False
        size = self._size(name, len(statement.definition))
        self.size -= size
        self.budget.used -= size
        return True

    def named(self) -> list[bytes]:
        """Every name a named statement is or may be under: those held, and those a request in flight may
        leave one under (what DEALLOCATE ALL and DISCARD ALL drop; the unnamed statement stays, as in
        Postgres)."""
        return list(self.by_name) + [name for name in self.unsettled if name and name not in self.by_name]

    def drop_sent(self, names: list[bytes], group: int) -> list[Change]:
        """SQL that drops the client's statements `names` (DEALLOCATE, DEALLOCATE ALL, DISCARD ALL) goes
        upstream in client group `group`: they are gone from now on, so a Parse of one of those names
        behind it creates it anew, as in Postgres; each `Change`, told the outcome, puts the statement
        back if the SQL did not run."""
        changes = []
        for name in names:
            changes.append(self.change_sent(name, group, None))
            self.forget(name)
        return changes

    def session_ended(self) -> None:
        """The session ended: everything goes, answered or not (the budget is shared)."""
        self.by_name.clear()
        self.budget.used -= self.size
        self.size = 0
        self.unsettled.clear()

    def lookup(self, name: bytes) -> Statement | None:
        return self.by_name.get(name) if name else self.unnamed

    def change_sent(self, name: bytes, group: int, ran: Statement | None, failed: Statement | None | Unchanged = UNCHANGED
                    ) -> Change:
        """A request that changes `name` (b"" for the unnamed statement) goes upstream in client group
        `group`; called before the name is changed here. Its `Change` is told the outcome."""
        entry = self.unsettled.get(name)
        if entry is None:
            entry = self.unsettled[name] = Unsettled(self.lookup(name), group)
        entry.count += 1
        entry.group = group
        return Change(self, name, ran, failed)

    def settle(self, name: bytes, after: Statement | None | Unchanged) -> None:
        """One change of `name` was answered; once all are, the name holds what the answers say."""
        entry = self.unsettled.get(name)
        if entry is None:
            return  # the session ended meanwhile
        if not isinstance(after, Unchanged):
            entry.answered = after
        entry.count -= 1
        if entry.count:
            return
        del self.unsettled[name]
        statement = entry.answered
        if not name:
            self.unnamed = statement
        elif statement is None:
            self.forget(name)
        elif self.by_name.get(name) is not statement:
            self.remember(name, statement)

    def waits(self, name: bytes, group: int) -> bool:
        """`name` was changed in a client group before `group` whose answer has not settled it."""
        entry = self.unsettled.get(name)
        return entry is not None and entry.group < group
