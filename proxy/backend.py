"""The upstream side: one asyncio.Protocol per server connection.

A BackendConnection first runs the startup exchange as a coroutine (TLS negotiation, StartupMessage,
trust / cleartext / md5 / SCRAM-SHA-256, ParameterStatus, BackendKeyData), can then run the proxy's own
messages (the tenant context), and is finally attached to a client, after which it forwards bytes and
only watches ReadyForQuery and ErrorResponse headers (and, under transaction pooling, ParseComplete
and CloseComplete, to swallow the replies to statements the proxy prepares on the client's behalf and to
tell the client's peer when the transaction is over).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from typing import TYPE_CHECKING, Protocol, cast

from proxy.config import UpstreamSettings
from proxy.protocol import errors, messages
from proxy.protocol.errors import ProtocolViolation
from proxy.protocol.framing import DEFAULT_MAX_MESSAGE, Message, MessageReader, MessageScanner, Segment
from proxy.protocol.upstream_auth import UpstreamAuth, UpstreamAuthError, tls_server_end_point
from proxy.transaction import Reply, ServerState, ServerStatements

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("pg_tenant_proxy")

_MAX_STARTUP_MESSAGE = 1 << 20


class Peer(Protocol):
    """The side a BackendConnection forwards to."""

    transport: asyncio.Transport | None

    def backend_lost(self, backend: BackendConnection) -> None: ...

    def context_failed(self, fields: dict[str, str]) -> None: ...

    def reassert_later(self) -> None: ...

    def transaction_idle(self) -> None: ...


class SyncGroup:
    """The server's replies up to one ReadyForQuery: to the client's Query/Sync, or to the proxy's own.

    A client group may carry refusals: statements the guard replaced by a marker that fails on the
    server, whose ErrorResponse is rewritten into the refusal on the way back. A client group may
    also end in a Sync the proxy added (`silent_end`): its replies go to the client, its
    ReadyForQuery does not.
    """

    __slots__ = ("own", "refusals", "silent_end")

    def __init__(self, own: bool, refusals: dict[str, bytes] | None = None, silent_end: bool = False) -> None:
        self.own = own
        self.refusals = refusals
        self.silent_end = silent_end


CLIENT_GROUP = SyncGroup(own=False)
OWN_GROUP = SyncGroup(own=True)


class UpstreamError(Exception):
    """The upstream server refused or failed; carries the fields to relay to the client."""

    def __init__(self, sqlstate: str, text: str, detail: str | None = None, hint: str | None = None) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate
        self.text = text
        self.detail = detail
        self.hint = hint

    @classmethod
    def from_fields(cls, fields: dict[str, str], prefix: str = "") -> UpstreamError:
        return cls(
            fields.get("C", errors.CONNECTION_FAILURE), prefix + fields.get("M", "unknown error"), fields.get("D"), fields.get("H")
        )


def ssl_context(settings: UpstreamSettings) -> ssl.SSLContext | None:
    """The TLS context for an sslmode, following libpq's meaning of each mode."""
    if settings.sslmode == "disable":
        return None
    context = ssl.create_default_context(cafile=settings.ca_file)
    context.check_hostname = settings.sslmode == "verify-full"
    if settings.sslmode in {"prefer", "require"} and not settings.ca_file:
        context.verify_mode = ssl.CERT_NONE
    return context


class BackendConnection(asyncio.Protocol):
    """One server connection."""

    def __init__(self, max_prepared_statements: int = 0) -> None:
        self.transport: asyncio.Transport | None = None
        self.process_id = 0
        self.secret_key = 0
        self.parameters: dict[str, str] = {}
        self.transaction_status = b"I"
        self.bytes_forwarded = 0
        self.peer: Peer | None = None
        self.closed = False
        self._incoming = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._lost: Exception | None = None
        # Under transaction pooling (and only then, `state` is set): what the connection holds between
        # clients; and the ParseComplete / CloseComplete replies owed, in order, with a None at each
        # group's end (Sync, Query).
        self.state: ServerState | None = None
        if max_prepared_statements:
            self.state = ServerState(ServerStatements(max_prepared_statements))
        self._replies: deque[Reply | None] = deque()
        self._own_replies = 0  # replies in _replies to swallow
        self._scanner = MessageScanner(b"ZE13" if self.state is not None else b"ZE", DEFAULT_MAX_MESSAGE)
        self.groups: deque[SyncGroup] = deque()
        self._special_groups = 0  # groups in flight that are the proxy's own or carry refusals
        self._open_refusals: dict[str, bytes] | None = None  # refusals sent since the client's last Sync
        self._own_error: dict[str, str] | None = None
        self.on_close: Callable[[], None] | None = None
        self.pool_key: tuple[str, tuple[tuple[str, str], ...]] = ("", ())
        self.opened_at = 0.0  # loop time, set by the pool
        self.idle_since = 0.0

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            self._incoming += data
            self._wake()
            return
        try:
            self._forward(peer, data)
        except Exception as exc:
            if not isinstance(exc, ProtocolViolation):
                log.exception("internal error on data from the upstream server")
            self.close()

    def _forward(self, peer: Peer, data: bytes) -> None:
        scanner = self._scanner
        if peer.transport is None:
            scanner.scan(data)
            return
        if not self._special_groups and self._open_refusals is None and not self._own_replies and not scanner.holding():
            ended = False
            for message in scanner.watched_messages(data):
                kind = message.type
                if kind == b"Z":
                    self.transaction_status = message.raw[5:6]
                    if self.groups:
                        self.groups.popleft()
                    ended = True
                if self.state is not None:
                    self._track_reply(kind)
            held = scanner.holding()
            if held:
                data = data[:-held]
            self.bytes_forwarded += len(data)
            peer.transport.write(data)
        else:
            ended = self._forward_special(peer, scanner.scan(data))
        if ended and self.state is not None and not self.groups and self.transaction_status == b"I" and self.peer is peer:
            peer.transaction_idle()

    def _track_reply(self, kind: bytes) -> bool:
        """Account for a reply under transaction pooling; True when it answers the proxy's own Parse or
        Close and must be swallowed."""
        replies = self._replies
        assert self.state is not None
        if kind == b"Z":
            while replies and replies.popleft() is not None:
                pass
        elif kind == b"E":
            # The server skips the rest of the group: what was owed before its end will not come.
            while replies and replies[0] is not None:
                reply = replies.popleft()
                assert reply is not None
                self._own_replies -= reply.own
                self.state.statements.pending.discard(reply.statement)
        elif replies and replies[0] is not None:
            reply = replies.popleft()
            assert reply is not None
            if reply.statement and kind == b"1":
                self.state.statements.confirmed(reply.statement)
            if reply.own:
                self._own_replies -= 1
                return True
        return False

    def expect_reply(self, reply: Reply) -> None:
        """The client side sent a Parse or Close: its ParseComplete or CloseComplete is owed."""
        self._replies.append(reply)
        self._own_replies += reply.own

    def _forward_special(self, peer: Peer, segments: list[Segment]) -> bool:
        """Forward while a group in flight is the proxy's own (swallowed), carries refusals (rewritten),
        or holds replies to the proxy's own Parse or Close (swallowed); True when a group ended."""
        assert peer.transport is not None
        out: list[bytes | memoryview] = []
        ended = False
        for segment in segments:
            group = self.groups[0] if self.groups else SyncGroup(False, self._open_refusals)
            if not isinstance(segment, Message):
                if not group.own:
                    out.append(segment)
                continue
            raw = segment.raw
            if self.state is not None and not (group.own and segment.type in b"13"):
                if self._track_reply(segment.type):
                    continue
            if segment.type == b"E":
                if group.own:
                    self._own_error = self._own_error or messages.parse_error_fields(segment.body)
                elif group.refusals:
                    raw = self._rewrite_refusal(group.refusals, segment)
            elif segment.type == b"Z":
                ended = True
                self.transaction_status = raw[5:6]
                if self.groups:
                    self.groups.popleft()
                    if group is not CLIENT_GROUP:
                        self._special_groups -= 1
                if group.silent_end:
                    continue
                if group.own:
                    error, self._own_error = self._own_error, None
                    if error is not None:
                        if self.transaction_status != b"E":
                            self._write(peer, out)
                            peer.context_failed(error)
                            return False
                        peer.reassert_later()  # the rollback will restore the old values; try again after it
                    continue
            if not group.own:
                out.append(raw)
        self._write(peer, out)
        return ended

    def _write(self, peer: Peer, out: list[bytes | memoryview]) -> None:
        if out and peer.transport is not None:
            data = b"".join(out)
            self.bytes_forwarded += len(data)
            peer.transport.write(data)

    @staticmethod
    def _rewrite_refusal(refusals: dict[str, bytes], error: Message) -> bytes:
        text = messages.parse_error_fields(error.body).get("M", "")
        for marker, refusal in refusals.items():
            if marker in text:
                del refusals[marker]
                return refusal
        return error.raw

    def add_refusal(self, marker: str, refusal: bytes) -> None:
        """A refused statement was replaced by `marker`; its error will come back in the open group, to
        be replaced by `refusal` (an ErrorResponse)."""
        if self._open_refusals is None:
            self._open_refusals = {}
        self._open_refusals[marker] = refusal

    def expect_group(self, own: bool = False, silent_end: bool = False) -> None:
        """The client (or the proxy: `own` for its own messages, `silent_end` for a Sync it added to
        the client's) just sent a Query, Sync or FunctionCall: one more ReadyForQuery is due, closing
        the group of replies that includes any open refusals."""
        if self.state is not None:
            self._replies.append(None)
        if own:
            group = OWN_GROUP
        elif self._open_refusals is not None or silent_end:
            group = SyncGroup(False, self._open_refusals, silent_end)
            self._open_refusals = None
        else:
            self.groups.append(CLIENT_GROUP)
            return
        self.groups.append(group)
        self._special_groups += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._lost = exc or ConnectionResetError("upstream server closed the connection")
        self._wake()
        if self.on_close is not None:
            self.on_close()
            self.on_close = None
        if self.peer is not None:
            self.peer.backend_lost(self)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    # -- startup coroutines ----------------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        if self._lost is not None:
            raise UpstreamError(errors.CONNECTION_FAILURE, "upstream server closed the connection")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def _read_byte(self) -> int:
        while not self._incoming:
            await self._wait()
        byte = self._incoming[0]
        del self._incoming[0]
        return byte

    async def read_message(self) -> tuple[bytes, bytes]:
        """The next whole message from the server during startup or the proxy's own exchanges."""
        while True:
            if len(self._incoming) >= 5:
                length = int.from_bytes(self._incoming[1:5], "big", signed=True)
                if length < 4 or length > _MAX_STARTUP_MESSAGE:
                    raise UpstreamError(errors.PROTOCOL_VIOLATION, f"invalid message length {length} from upstream")
                if len(self._incoming) > length:
                    type_byte = bytes(self._incoming[:1])
                    body = bytes(self._incoming[5 : length + 1])
                    del self._incoming[: length + 1]
                    return type_byte, body
            await self._wait()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def negotiate_tls(self, settings: UpstreamSettings, context: ssl.SSLContext) -> None:
        """Send SSLRequest and, if the server agrees, switch the transport to TLS."""
        self.write(messages.ssl_request())
        answer = await self._read_byte()
        if answer == ord("N"):
            if settings.sslmode != "prefer":
                raise UpstreamError(
                    errors.CONNECTION_FAILURE, f"upstream server does not support SSL, but sslmode={settings.sslmode}"
                )
            return
        if answer != ord("S"):
            raise UpstreamError(errors.PROTOCOL_VIOLATION, "upstream server sent an invalid answer to SSLRequest")
        if self._incoming:
            raise UpstreamError(errors.PROTOCOL_VIOLATION, "upstream server sent unencrypted data after accepting SSL")
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        try:
            tls = await loop.start_tls(
                self.transport, self, context, server_hostname=settings.host if context.check_hostname else None
            )
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise UpstreamError(errors.CONNECTION_FAILURE, f"TLS handshake with upstream failed: {exc}") from exc
        tls = cast(asyncio.Transport, tls)
        self.transport = tls

    async def authenticate(self, settings: UpstreamSettings, parameters: dict[str, str]) -> None:
        """Send the StartupMessage and run authentication (proxy/protocol/upstream_auth.py) until ReadyForQuery."""
        self.write(messages.startup_message(parameters))
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        certificate = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        auth = UpstreamAuth(settings.user, settings.password, tls_server_end_point(certificate) if certificate else None,
                            settings.require_auth, settings.channel_binding)
        while True:
            type_byte, body = await self.read_message()
            if type_byte == b"E":
                raise UpstreamError.from_fields(messages.parse_error_fields(body), "upstream server: ")
            if type_byte == b"v":
                continue
            if type_byte != b"R":
                raise UpstreamError(errors.PROTOCOL_VIOLATION, "unexpected message from upstream during authentication")
            code, data = messages.parse_authentication(body)
            try:
                reply = auth.respond(code, data)
            except UpstreamAuthError as exc:
                raise UpstreamError(exc.sqlstate, f"upstream authentication failed: {exc}") from exc
            if reply is not None:
                self.write(reply)
            if code == messages.AUTH_OK:
                break
        while True:
            type_byte, body = await self.read_message()
            if type_byte == b"S":
                name, value = messages.parse_parameter_status(body)
                self.parameters[name] = value
            elif type_byte == b"K":
                self.process_id, self.secret_key = messages.parse_backend_key_data(body)
            elif type_byte == b"E":
                raise UpstreamError.from_fields(messages.parse_error_fields(body), "upstream server: ")
            elif type_byte == b"Z":
                self.transaction_status = body
                return

    async def run(
        self, request: bytes, groups: int = 1, rows: list[list[bytes | None]] | None = None
    ) -> dict[str, str] | None:
        """Send the proxy's own messages (`groups` groups, each ending in Sync or a Query); swallow the
        replies, collecting DataRows into `rows` when given.

        Returns the first ErrorResponse's fields, or None when everything succeeded.
        """
        self.write(request)
        failure: dict[str, str] | None = None
        while True:
            type_byte, body = await self.read_message()
            if type_byte == b"E" and failure is None:
                failure = messages.parse_error_fields(body)
            elif type_byte == b"D" and rows is not None:
                rows.append(messages.parse_data_row(body))
            elif type_byte == b"S":
                name, value = messages.parse_parameter_status(body)
                self.parameters[name] = value
            elif type_byte == b"Z":
                self.transaction_status = body
                groups -= 1
                if not groups:
                    return failure

    # -- forwarding ------------------------------------------------------------------------------

    def attach(self, peer: Peer) -> None:
        """From now on forward everything the server sends to `peer`.

        Whatever arrived while no client held the connection (a notification, a notice) is dropped,
        except ParameterStatus, which updates `parameters`.
        """
        if self._incoming:
            reader = MessageReader(_MAX_STARTUP_MESSAGE)
            reader.feed(bytes(self._incoming))
            self._incoming.clear()
            for type_byte, body in reader:
                if type_byte == b"S":
                    name, value = messages.parse_parameter_status(body)
                    self.parameters[name] = value
        self.peer = peer

    def reusable(self) -> bool:
        """True when the server is idle between messages with nothing in flight: it can be reset.

        Only an attached connection qualifies: one still in the proxy's own exchange (a client that
        left while its context was being set) has replies in flight that a reset would misread."""
        return (
            not self.closed
            and self.peer is not None
            and self.transaction_status == b"I"
            and not self.groups
            and self._open_refusals is None
            and not self._replies
            and self._scanner.at_boundary()
        )

    def detach(self) -> None:
        """Stop forwarding; the server's output is read by the proxy's own exchanges again."""
        self.peer = None
        if self.transport is not None and not self.transport.is_closing() and not self.transport.is_reading():
            self.transport.resume_reading()

    def at_message_boundary(self) -> bool:
        """True when everything forwarded to the peer so far ends with a whole message."""
        return self._scanner.at_boundary()

    def close(self) -> None:
        """Say Terminate if the session is up and idle (an open transaction is rolled back by the close), then close."""
        transport = self.transport
        if transport is not None and not self.closed and not transport.is_closing():
            if self.process_id and self.transaction_status == b"I":
                transport.write(messages.terminate())
            transport.close()
        self.closed = True


async def connect(
    settings: UpstreamSettings, database: str, parameters: dict[str, str], max_prepared_statements: int = 0
) -> BackendConnection:
    """Open, secure and authenticate a server connection; raise UpstreamError on any failure.

    `max_prepared_statements` > 0 makes it a connection for transaction pooling."""
    loop = asyncio.get_running_loop()
    try:
        _, backend = await asyncio.wait_for(
            loop.create_connection(lambda: BackendConnection(max_prepared_statements), settings.host, settings.port),
            settings.connect_timeout_seconds,
        )
    except (OSError, asyncio.TimeoutError) as exc:
        reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else (exc.strerror or str(exc))
        raise UpstreamError(
            errors.CONNECTION_FAILURE, f"could not connect to upstream server {settings.host}:{settings.port}: {reason}"
        ) from exc
    try:
        async with asyncio.timeout(settings.connect_timeout_seconds):
            context = ssl_context(settings)
            if context is not None:
                await backend.negotiate_tls(settings, context)
            await backend.authenticate(settings, {"user": settings.user, "database": database, **parameters})
    except BaseException as exc:
        backend.close()
        if isinstance(exc, TimeoutError):
            raise UpstreamError(errors.CONNECTION_FAILURE, "upstream server did not complete startup in time") from exc
        if isinstance(exc, ProtocolViolation):
            raise UpstreamError(errors.PROTOCOL_VIOLATION, f"upstream authentication failed: {exc}") from exc
        raise
    return backend


async def send_cancel(settings: UpstreamSettings, process_id: int, secret_key: int) -> None:
    """Deliver a CancelRequest for a real backend key to the upstream server."""
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(settings.host, settings.port), settings.connect_timeout_seconds
    )
    try:
        writer.write(messages.cancel_request(process_id, secret_key))
        await writer.drain()
    finally:
        writer.close()
