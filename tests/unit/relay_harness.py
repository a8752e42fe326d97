"""A paired harness for the sans-IO relay, after h11's ConnectionPair: one `Relay` wired to scripted
in-memory server connections, with every hook recorded. No sockets, no loop, no clock."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from proxy.guard import Guard, Refusal
from proxy.parameters import ProtectedSettings
from proxy.protocol import messages
from proxy.protocol.framing import MessageScanner
from proxy.relay.relay import Relay, ServerState
from proxy.relay.replies import ReplyQueue
from proxy.relay.settings import ClientSettings
from proxy.relay.statements import ServerStatements
from proxy.tenant import ContextBuilder

PROTECTED = ProtectedSettings(["app.tenant", "app.tenant_proof"], ["app.", "request.jwt.", "tenant_proxy."])
CONTEXT = ContextBuilder("app.tenant", "app.tenant_proof", "not-a-real-key")
SETTINGS_LIMIT = 1 << 20  # [client] max_settings_bytes


@dataclass(frozen=True)
class Identity:
    tenant: str = "acme"
    expires_at: int = 2_000_000_000
    claims_json: str = '{"sub":"alice"}'


class Hooks:
    """The asyncio side, recorded: bytes each way, and every other hook as an event name."""

    def __init__(self) -> None:
        self.upstream: list[bytes] = []
        self.client: list[bytes] = []
        self.events: list[str] = []
        self.failures: list[tuple[str, str]] = []
        self.refusals: list[Refusal] = []
        self.ended = 0

    def send_upstream(self, data: bytes) -> None:
        self.upstream.append(bytes(data))

    def send_client(self, data: bytes | memoryview) -> None:
        self.client.append(bytes(data))

    def need_server(self) -> None:
        self.events.append("need_server")

    def release_server(self) -> None:
        self.events.append("release_server")

    def prepared(self) -> None:
        self.events.append("prepared")

    def fail(self, sqlstate: str, text: str, hint: str | None = None) -> None:
        self.failures.append((sqlstate, text))

    def terminated(self) -> None:
        self.events.append("terminated")

    def hold_client(self, held: bool) -> None:
        self.events.append(f"hold_client:{held}")

    def refused(self, refusal: Refusal) -> None:
        self.refusals.append(refusal)

    def cancel_server(self) -> None:
        self.events.append("cancel_server")

    def cancel_dropped(self) -> None:
        self.events.append("cancel_dropped")

    def server_ended(self) -> None:
        self.events.append("server_ended")

    def transactions_ended(self, count: int) -> None:
        self.ended += count


class Server:
    """A server connection as the relay sees it (`ServerLink`)."""

    def __init__(self, process_id: int) -> None:
        self.process_id = process_id
        self.queue = ReplyQueue(MessageScanner(b"ZE"))
        self.state = ServerState(ServerStatements(200))


class RelayPair:
    """One relay and its hooks. `client(...)` feeds client messages and returns what went upstream
    because of them; `server(...)` feeds server messages and returns what reached the client."""

    def __init__(self, transaction_mode: bool = True, startup: dict[str, str] | None = None, guarded: bool = True,
                 identity: Identity | None = None, allow_notifications: bool = False) -> None:
        self.hooks = Hooks()
        guard = Guard(PROTECTED, allow_do=False, transaction_mode=transaction_mode,
                      allow_notifications=allow_notifications) if guarded else None
        self.relay = Relay(self.hooks, guard, CONTEXT, identity or Identity(), ClientSettings(startup or {}, PROTECTED, SETTINGS_LIMIT),
                           transaction_mode, max_message=1 << 20, max_statement_bytes=1 << 20)

    def client(self, *data: bytes) -> list[bytes]:
        """Each argument is one read; returns the writes upstream."""
        start = len(self.hooks.upstream)
        for read in data:
            self.relay.client_data(read)
        return self.hooks.upstream[start:]

    def attach(self, server: Server, wait: bool = False) -> list[bytes]:
        start = len(self.hooks.upstream)
        self.relay.attach(server, wait)
        return self.hooks.upstream[start:]

    def server(self, *data: bytes) -> bytes:
        """Each argument is one read from the server; returns everything the client got, joined."""
        start = len(self.hooks.client)
        for read in data:
            self.relay.server_data(read)
        return b"".join(self.hooks.client[start:])

    def upstream_since(self, start: int) -> list[bytes]:
        return self.hooks.upstream[start:]


def checked_out(pair: RelayPair, server: Server, *reads: bytes) -> list[bytes]:
    """Client reads with no server connection held: the relay asks for one, then goes on when it comes."""
    assert pair.client(*reads) == []
    assert pair.hooks.events[-1] == "need_server"
    return pair.attach(server)


# -- server messages ---------------------------------------------------------------------------

def data_row(*values: bytes | None) -> bytes:
    parts = [struct.pack("!h", len(values))]
    for value in values:
        parts.append(struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value)
    return messages.message(b"D", b"".join(parts))


def complete(tag: str) -> bytes:
    return messages.message(b"C", messages.cstring(tag))


def row_description(name: str = "x") -> bytes:
    field = messages.cstring(name) + struct.pack("!IhIhih", 0, 0, 25, -1, -1, 0)
    return messages.message(b"T", struct.pack("!h", 1) + field)


PARSE_COMPLETE = messages.message(b"1")
BIND_COMPLETE = messages.message(b"2")
CLOSE_COMPLETE = messages.message(b"3")
Z_IDLE = messages.ready_for_query(b"I")
Z_BLOCK = messages.ready_for_query(b"T")
Z_FAILED = messages.ready_for_query(b"E")
