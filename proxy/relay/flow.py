"""Flow control for one client and its server connection: the one owner of pausing and resuming reads.

Each side's reading is paused for a set of reasons and resumes only when none is left, so one cause
can never undo another's pause. When a server connection is attached, the reasons that concern it
(the client cannot take more bytes) are applied to it at once; when it is detached, its reading
resumes (it goes back to the pool) and the client keeps its own reasons.
"""

from __future__ import annotations

from typing import Protocol

from proxy.relay.enums import HotEnum


class Reason(HotEnum):
    PEER_FULL = "the other side's write buffer is over its high-water mark"
    HELD = "the relay holds this client's messages (no server connection yet, or waiting for the server)"


class Readable(Protocol):
    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def is_closing(self) -> bool: ...


class Side:
    """One transport's reading and why it is paused."""

    __slots__ = ("transport", "reasons")

    def __init__(self) -> None:
        self.transport: Readable | None = None
        self.reasons: set[Reason] = set()

    def pause(self, reason: Reason) -> None:
        if not self.reasons and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self.reasons.add(reason)

    def resume(self, reason: Reason) -> None:
        if reason not in self.reasons:
            return
        self.reasons.discard(reason)
        if not self.reasons and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def set(self, reason: Reason, paused: bool) -> None:
        if paused:
            self.pause(reason)
        else:
            self.resume(reason)


class FlowControl:
    """Pauses for one client and whichever server connection it holds."""

    __slots__ = ("client", "server", "_client_full")

    def __init__(self) -> None:
        self.client = Side()
        self.server = Side()
        self._client_full = False  # the client's write buffer is over its high-water mark

    def client_full(self, full: bool) -> None:
        """The client's transport asks (pause_writing / resume_writing): stop reading the server."""
        self._client_full = full
        self.server.set(Reason.PEER_FULL, full)

    def server_full(self, full: bool) -> None:
        """The server's transport asks: stop reading the client."""
        self.client.set(Reason.PEER_FULL, full)

    def attach_server(self, transport: Readable) -> None:
        """A server connection now serves this client: apply what holds for it."""
        self.server.transport = transport
        self.server.reasons.clear()
        if self._client_full:
            self.server.pause(Reason.PEER_FULL)

    def detach_server(self) -> None:
        """The server connection goes back to the pool: it reads again; the client stops waiting on it."""
        side = self.server
        if side.reasons and side.transport is not None and not side.transport.is_closing():
            side.transport.resume_reading()
        side.transport = None
        side.reasons.clear()
        if self.client.reasons:
            self.client.resume(Reason.PEER_FULL)
