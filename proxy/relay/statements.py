"""Prepared statements under transaction pooling: the client's, and what a server connection holds.

A client's named Parse is remembered by the client's name with its definition (query text, parameter
types) and the search_path it was parsed under. On the server it is named after a digest of all three,
so clients that prepare the same statement share it on a server connection, and a statement never
changes meaning under another client's search_path. A Bind or Describe naming a statement the server
connection lacks gets it prepared there just before, by a Parse whose reply the proxy swallows.

The client's unnamed statement belongs to the client too: it lives, as in Postgres, until the client's
next Parse of the unnamed statement or its next simple Query, across Syncs and server connections, and
is prepared again (as the unnamed statement) on a server connection that does not hold it.

A server connection believes a statement present only once its ParseComplete has arrived, or while its
Parse is in flight, in the current *generation*: DEALLOCATE ALL and DISCARD ALL start a new generation
when they are sent, so a ParseComplete from before them never marks a statement present again.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

from proxy.relay.replies import Outcome

if TYPE_CHECKING:
    from proxy.guard import Decision

PREFIX = b"pg_tenant_proxy_"
# A statement name never prepared: Close of it only yields CloseComplete, standing in for a client's Close.
NEVER_PREPARED = PREFIX + b"none"
# NAMEDATALEN - 1: Postgres keys prepared statements by the first 63 bytes of their protocol name
# (longer names are cut there, so two that agree on them are one statement).
NAME_BYTES = 63
STATEMENT_OVERHEAD = 200  # about what Python spends on one remembered statement besides its bytes


class Statement(NamedTuple):
    """A client's prepared statement: the server-side name, the Parse definition (the body after the
    name: text, parameter count, type oids) and the guard's decision on its text."""

    server_name: bytes
    definition: bytes
    decision: Decision


def statement_for(definition: bytes, search_path: str, decision: Decision) -> Statement:
    digest = hashlib.sha256(definition + b"\0" + search_path.encode()).hexdigest()[:32]
    return Statement(PREFIX + digest.encode(), definition, decision)


class ServerStatements:
    """The named statements one server connection holds, least recently used first (the proxy's own
    statements included, which are never evicted)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.generation = 0
        self.ready: OrderedDict[bytes, None] = OrderedDict()
        self.pending: dict[bytes, int] = {}  # name -> generation its Parse was sent in
        self.in_use: set[bytes] = set()  # used during the current checkout, or the proxy's own: not evicted
        self.unnamed: Statement | None = None  # the client statement the server's unnamed statement holds

    def has(self, name: bytes) -> bool:
        if name in self.ready:
            self.ready.move_to_end(name)
            return True
        return self.pending.get(name) == self.generation

    def dropped(self) -> None:
        """DEALLOCATE ALL or DISCARD ALL was sent: nothing prepared before it counts any more."""
        self.generation += 1
        self.ready.clear()
        self.pending.clear()
        self.unnamed = None

    def evictions(self) -> Iterator[bytes]:
        """Statements to close so one more fits, oldest first, sparing those in use."""
        for name in list(self.ready):
            if len(self.ready) + len(self.pending) < self.limit:
                return
            if name not in self.in_use:
                del self.ready[name]
                yield name

    def parse_sent(self, name: bytes) -> ParseWatch:
        """A Parse of `name` went upstream: present from now on, unless it fails."""
        self.ready.pop(name, None)
        self.pending[name] = self.generation
        return ParseWatch(self, name, self.generation)


class ParseWatch:
    """Marks a statement present when its ParseComplete arrives in the generation it was sent in."""

    __slots__ = ("server", "name", "generation")

    def __init__(self, server: ServerStatements, name: bytes, generation: int) -> None:
        self.server = server
        self.name = name
        self.generation = generation

    def ended(self, outcome: Outcome, error: dict[str, str] | None) -> None:
        server = self.server
        if server.pending.get(self.name) == self.generation:
            del server.pending[self.name]
            if outcome is Outcome.COMPLETED and self.generation == server.generation:
                server.ready[self.name] = None

    def row(self, values: list[bytes | None]) -> None:
        """Parse answers no rows."""


class StatementBudget:
    """What all clients of one proxy process keep in prepared statements, in bytes, against `limit`."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


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

    def forget_all(self) -> None:
        """DEALLOCATE ALL / DISCARD ALL, or the session's end: the named statements go (the unnamed one
        stays, as in Postgres; it is not counted)."""
        self.by_name.clear()
        self.budget.used -= self.size
        self.size = 0

    def lookup(self, name: bytes) -> Statement | None:
        return self.by_name.get(name) if name else self.unnamed
