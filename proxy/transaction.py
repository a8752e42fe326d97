"""Transaction pooling: the session state that follows a client from one server connection to the next.

Under transaction pooling a client holds a server connection only while a transaction is open. What
its session holds is kept here, without I/O, and put on whichever server connection it gets next:

- **Prepared statements** (protocol level). A client's named Parse is remembered by the client's name
  with its definition (text and parameter types). On the server the statement is named after a digest
  of the definition, so clients that prepare the same statement share it on a server connection. A
  Bind or Describe naming a statement the server connection lacks gets the statement prepared there,
  just before it, by a Parse whose reply the proxy swallows. Each server connection keeps a bounded
  number (least recently used first out, by Close). The unnamed statement is left alone: it lives
  within a Sync group, during which the client keeps its server connection.
- **Session settings.** The client's startup parameters, then whatever its SETs leave in force: after a
  transaction that may have changed them, the proxy reads them back from the server (`source =
  'session'` in pg_settings), so a SET rolled back with its transaction is not carried on.
- **What a server connection holds**: the tenant whose signed context it carries and until when, its
  session settings, its prepared statements. A checkout resets and re-applies only what differs.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from proxy.parameters import ProtectedSettings
from proxy.protocol import messages
from proxy.tenant import ContextBuilder

STATEMENT_PREFIX = b"pg_tenant_proxy_"
# A statement name never prepared: Close of it only yields CloseComplete, standing in for a client's Close.
NEVER_PREPARED = b"pg_tenant_proxy_none"
RESET_SERVER = messages.query("DISCARD ALL")
RESET_SETTINGS = messages.query("RESET ALL")
SET_CONFIG = "SELECT pg_catalog.set_config($1, $2, false)"
STATEMENT_OVERHEAD = 200  # about what Python spends on one remembered statement besides its bytes
SETTINGS_SNAPSHOT = messages.query(
    "SELECT name, pg_catalog.current_setting(name) FROM pg_catalog.pg_settings WHERE source = 'session'"
)


class Reply(NamedTuple):
    """A ParseComplete or CloseComplete the server owes: swallowed when `own`; `statement` is the
    server-side name a Parse prepares (empty for Close and the unnamed statement)."""

    own: bool
    statement: bytes = b""


CLIENT_REPLY = Reply(False)
OWN_CLOSE = Reply(True)


class Statement(NamedTuple):
    """A client's named prepared statement: the server-side name and the Parse definition."""

    server_name: bytes
    definition: bytes  # the Parse body after the name: query text, parameter count, type oids


def statement_for(definition: bytes) -> Statement:
    return Statement(STATEMENT_PREFIX + hashlib.sha256(definition).hexdigest()[:32].encode(), definition)


class ServerStatements:
    """The prepared statements one server connection holds, least recently used first.

    `ready` holds statements whose ParseComplete arrived; `pending` those whose Parse is in flight.
    A statement is believed present only when it truly is, so a wrong guess costs a re-prepare, never
    a "prepared statement does not exist"."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.ready: OrderedDict[bytes, None] = OrderedDict()
        self.pending: set[bytes] = set()
        self.in_use: set[bytes] = set()  # used since the current checkout: never evicted

    def has(self, name: bytes) -> bool:
        if name in self.ready:
            self.ready.move_to_end(name)
            return True
        return name in self.pending

    def confirmed(self, name: bytes) -> None:
        self.pending.discard(name)
        self.ready[name] = None
        self.ready.move_to_end(name)

    def clear(self) -> None:
        self.ready.clear()
        self.pending.clear()

    def evictions(self) -> Iterator[bytes]:
        """Statements to close so one more fits, oldest first, sparing those in use."""
        for name in list(self.ready):
            if len(self.ready) + len(self.pending) < self.limit:
                return
            if name not in self.in_use:
                del self.ready[name]
                yield name


Outgoing = list[tuple[bytes | memoryview, Reply | None]]


class ClientStatements:
    """One client's named prepared statements, and the rewriting of the messages that name them.

    The proxy keeps each one's definition to prepare it on other server connections, so what one
    client may keep is bounded: `limit` bytes, counting names, definitions and a fixed overhead each."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.by_name: dict[bytes, Statement] = {}

    @staticmethod
    def _size(name: bytes, definition_length: int) -> int:
        return len(name) + definition_length + STATEMENT_OVERHEAD

    def room_for(self, body: bytes) -> bool:
        """Whether this Parse fits: an unnamed one always does, a named one replaces its namesake."""
        name, end = messages.split_name(body)
        if not name:
            return True
        old = self.by_name.get(name)
        freed = self._size(name, len(old.definition)) if old is not None else 0
        return self.size - freed + self._size(name, len(body) - end) <= self.limit

    def parse(self, body: bytes, server: ServerStatements, out: Outgoing) -> None:
        """A client's Parse: remember a named one and prepare it under its server-side name."""
        name, end = messages.split_name(body)
        if not name:
            out.append((messages.message(b"P", body), CLIENT_REPLY))
            return
        statement = statement_for(body[end:])
        self._forget(name)
        self.by_name[name] = statement
        self.size += self._size(name, len(statement.definition))
        self._prepare(statement, server, out, own=False)

    def _forget(self, name: bytes) -> bool:
        statement = self.by_name.pop(name, None)
        if statement is None:
            return False
        self.size -= self._size(name, len(statement.definition))
        return True

    def bind(self, body: bytes, server: ServerStatements, out: Outgoing) -> None:
        """A Bind: name the server-side statement, preparing it first where it is missing."""
        portal, start = messages.split_name(body)
        name, end = messages.split_name(body, start)
        statement = self.by_name.get(name) if name else None
        if statement is None:
            out.append((messages.message(b"B", body), None))
            return
        self._ensure(statement, server, out)
        out.append((messages.message(b"B", portal + b"\0" + statement.server_name + b"\0" + body[end:]), None))

    def describe(self, body: bytes, server: ServerStatements, out: Outgoing) -> None:
        """A Describe of a statement ('S'), renamed like Bind; of a portal, unchanged."""
        statement = self.by_name.get(messages.split_name(body, 1)[0]) if body[:1] == b"S" else None
        if statement is None:
            out.append((messages.message(b"D", body), None))
            return
        self._ensure(statement, server, out)
        out.append((messages.message(b"D", b"S" + statement.server_name + b"\0"), None))

    def close(self, body: bytes, out: Outgoing) -> None:
        """A client's Close of its statement forgets it; the server-side statement may be shared, so
        a Close of a name never prepared stands in for it, keeping the CloseComplete in order."""
        name = messages.split_name(body, 1)[0] if body[:1] == b"S" else b""
        if name and self._forget(name):
            out.append((messages.close_statement(NEVER_PREPARED), CLIENT_REPLY))
        else:
            out.append((messages.message(b"C", body), CLIENT_REPLY))

    def _ensure(self, statement: Statement, server: ServerStatements, out: Outgoing) -> None:
        server.in_use.add(statement.server_name)
        if not server.has(statement.server_name):
            self._prepare(statement, server, out, own=True)

    @staticmethod
    def _prepare(statement: Statement, server: ServerStatements, out: Outgoing, own: bool) -> None:
        """Close the server-side name first (the statement may be there already, or half-known after a
        failed group), make room, then Parse it; `own`: the ParseComplete is swallowed."""
        server.ready.pop(statement.server_name, None)
        out.append((messages.close_statement(statement.server_name), OWN_CLOSE))
        for victim in server.evictions():
            out.append((messages.close_statement(victim), OWN_CLOSE))
        server.pending.add(statement.server_name)
        server.in_use.add(statement.server_name)
        out.append((messages.message(b"P", statement.server_name + b"\0" + statement.definition), Reply(own, statement.server_name)))


@dataclass
class ServerState:
    """What one server connection holds that a checkout may have to change."""

    statements: ServerStatements
    tenant: str | None = None  # whose context (or session state) it carries; None when fresh or reset
    context_expires_at: int = 0  # 0: no valid context
    settings: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Checkout:
    """The proxy's own messages that prepare a server connection for a client, and how many
    ReadyForQuery they end with. Empty when the connection already holds what the client needs."""

    request: bytes = b""
    groups: int = 0


NOTHING_TO_DO = Checkout()


def checkout_messages(
    state: ServerState, context: ContextBuilder, process_id: int, tenant: str, expires_at: int, settings: dict[str, str]
) -> Checkout:
    """Reset what must not cross tenants, apply the client's settings and its signed context, each only
    when the server connection does not already hold it; update `state` to what it will hold."""
    if state.tenant == tenant and state.context_expires_at >= expires_at and state.settings == settings:
        return NOTHING_TO_DO
    parts: list[bytes] = []
    groups = 0
    if state.tenant is not None and state.tenant != tenant:
        parts.append(RESET_SERVER)  # temp tables, cursors, prepared statements, LISTEN, locks, settings
        groups += 1
        state.statements.clear()
        state.settings = {}
        state.context_expires_at = 0
    state.tenant = tenant
    extended: list[bytes] = []
    if state.settings != settings:
        if any(name not in settings for name in state.settings):  # only RESET takes a setting back to its default
            parts.append(RESET_SETTINGS)
            groups += 1
            state.context_expires_at = 0
            state.settings = {}
        changed = [(name, value) for name, value in settings.items() if state.settings.get(name) != value]
        if changed:
            extended.append(messages.parse("", SET_CONFIG))
            for name, value in changed:
                extended += (messages.bind("", "", [name, value]), messages.execute())
        state.settings = dict(settings)
    if state.context_expires_at < expires_at:
        extended.append(context.context_messages(tenant, process_id, expires_at))
        state.context_expires_at = expires_at
    if extended:
        parts += extended
        parts.append(messages.sync())
        groups += 1
    return Checkout(b"".join(parts), groups)


def session_settings(rows: list[list[bytes | None]], protected: ProtectedSettings) -> dict[str, str]:
    """The settings snapshot (rows of name, value) minus the settings the proxy owns."""
    settings: dict[str, str] = {}
    for row in rows:
        if len(row) == 2 and row[0] is not None and row[1] is not None:
            name = row[0].decode(errors="replace").lower()
            if name not in protected:
                settings[name] = row[1].decode(errors="replace")
    return settings


def context_intact(rows: list[list[bytes | None]], context: ContextBuilder, tenant: str, process_id: int, expires_at: int) -> bool:
    """Whether the settings snapshot still shows the context the proxy set: a client may have broken
    its own through dynamic SQL, and the next client of its tenant must then get a fresh one."""
    values = {row[0].lower(): row[1] for row in rows if len(row) == 2 and row[0] is not None}
    proof = context.proof(tenant, process_id, expires_at).encode()
    return values.get(context.setting.lower().encode()) == tenant.encode() and values.get(
        context.proof_setting.lower().encode()
    ) == proof
