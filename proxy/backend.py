"""The upstream side: one asyncio.Protocol per server connection, glue between a socket and a relay.

A BackendConnection first runs the startup exchange as a coroutine (TLS negotiation, StartupMessage,
trust / cleartext / md5 / SCRAM-SHA-256, ParameterStatus, BackendKeyData). Then a client's relay
(proxy/relay) holds it and every byte from the server goes to that relay, which keeps the queue of
what the server owes. Between clients it sits in the pool, reading only to notice a close and to drop,
within a bound, what the server sends on its own.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Protocol, cast

from proxy.config import UpstreamSettings
from proxy.protocol import errors, messages
from proxy.protocol.errors import ProtocolViolation
from proxy.protocol.framing import DEFAULT_MAX_MESSAGE, MessageScanner
from proxy.protocol.upstream_auth import UpstreamAuth, UpstreamAuthError, tls_server_end_point
from proxy.sockets import tune
from proxy.relay.enums import HotEnum
from proxy.relay.relay import ServerState
from proxy.relay.replies import Owner as RequestOwner, ReplyQueue
from proxy.relay.statements import ServerStatements

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("pg_tenant_proxy")

_MAX_STARTUP_MESSAGE = 1 << 20
IDLE_INPUT_LIMIT = 64 * 1024  # bytes an idle server connection may send (notifications, notices) before it is closed


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


class Lifecycle(HotEnum):
    """Where a server connection is; only the pool's `move` changes it (see proxy/pool.py)."""

    LOGIN = "login"  # connecting and authenticating
    IDLE = "idle"  # in the pool, held by no client
    ACTIVE = "active"  # held by a client
    RESETTING = "resetting"  # the pool's own reset runs (session mode)
    CLOSED = "closed"


_CLOSED = Lifecycle.CLOSED  # compared against on every write (see proxy.relay.enums)


class Owner(Protocol):
    """The client side holding a server connection."""

    def server_data(self, data: bytes) -> None: ...

    def server_lost(self) -> None: ...

    def server_backpressure(self, paused: bool) -> None: ...


def ssl_context(settings: UpstreamSettings) -> ssl.SSLContext | None:
    """The TLS context for an sslmode, following libpq's meaning of each mode, with the client
    certificate `sslcert` / `sslkey` (PEM, key unencrypted) when set, for `cert` authentication
    (Postgres docs, "Certificate Authentication"). Raises ssl.SSLError when the pair does not load."""
    if settings.sslmode == "disable":
        return None
    context = ssl.create_default_context(cafile=settings.ca_file)
    context.check_hostname = settings.sslmode == "verify-full"
    if settings.sslmode in {"prefer", "require"} and not settings.ca_file:
        context.verify_mode = ssl.CERT_NONE
    if settings.sslcert and settings.sslkey:
        context.load_cert_chain(settings.sslcert, settings.sslkey, password="")
    return context


class BackendConnection(asyncio.Protocol):
    """One server connection: its transport, what it reported at startup, the queue of what it owes
    (`queue`) and what it holds between clients (`state`). While a client holds it (`owner`), bytes go
    to that client's relay; while it is idle in the pool, at most `IDLE_INPUT_LIMIT` bytes of
    notifications or notices are taken in and dropped before the connection is closed."""

    def __init__(self, max_prepared_statements: int = 0) -> None:
        self.transport: asyncio.Transport | None = None
        self.process_id = 0
        self.secret_key = 0
        self.parameters: dict[str, str] = {}
        self.owner: Owner | None = None
        self.lifecycle = Lifecycle.LOGIN
        self.queue = ReplyQueue(MessageScanner(b"ZE", DEFAULT_MAX_MESSAGE))
        self.state = ServerState(ServerStatements(max_prepared_statements or 1))
        self._incoming = bytearray()
        self._idle_input = 0
        self._waiter: asyncio.Future[None] | None = None
        self._lost: Exception | None = None
        self.on_close: Callable[[], None] | None = None
        self.pool_key: tuple[str, tuple[tuple[str, str], ...]] = ("", ())
        self.opened_at = 0.0  # loop time, set by the pool
        self.idle_since = 0.0
        self.holder: str | None = None  # the tenant whose client holds it (the pool's accounting)
        self.cancels_in_flight = 0  # CancelRequests for it sent upstream and not yet acted on by the server

    @property
    def closed(self) -> bool:
        return self.lifecycle is _CLOSED

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is not None:
            owner.server_data(data)
            return
        if self.lifecycle is Lifecycle.IDLE:
            if not self._idle_input and data[:1] == b"E":
                # The server's FATAL on its own (57P01 at a shutdown or pg_terminate_backend, 57P05): its last
                # word, the close follows. Out of the pool now, so no checkout hands it to a client meanwhile.
                self.close()
                return
            self._idle_input += len(data)
            if self._idle_input > IDLE_INPUT_LIMIT:
                log.warning("closing an idle server connection that sent %d bytes while no client held it", self._idle_input)
                self.close()
            return
        self._incoming += data
        self._wake()

    def eof_received(self) -> None:
        """The server closed its side. An idle connection is closed now: `connection_lost` (which takes it out
        of the pool) comes a turn of the event loop later, and a checkout in between would hand a client a
        dead connection (08006 for a transaction a fresh one would have served)."""
        if self.lifecycle is Lifecycle.IDLE:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lifecycle = Lifecycle.CLOSED
        self._lost = exc or ConnectionResetError("upstream server closed the connection")
        self._wake()
        if self.on_close is not None:
            self.on_close()
            self.on_close = None
        if self.owner is not None:
            self.owner.server_lost()

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.server_backpressure(True)

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.server_backpressure(False)

    def send(self, data: bytes) -> None:
        """Write to the server (the relay's hook)."""
        if self.transport is not None and self.lifecycle is not _CLOSED:
            self.transport.write(data)

    def attach(self, owner: Owner) -> None:
        """From now on, what the server sends goes to `owner`."""
        self._idle_input = 0
        self.owner = owner

    def detach(self) -> None:
        """Stop forwarding; the connection reads again (it may be idle in the pool, or run the pool's own
        reset)."""
        self.owner = None
        if self.transport is not None and not self.transport.is_closing() and not self.transport.is_reading():
            self.transport.resume_reading()

    def reusable(self) -> bool:
        """True when the server is idle between messages with nothing owed, and no cancel is on its way to
        it (one arriving later would cancel the next client's statement): it can serve again."""
        queue = self.queue
        return (self.lifecycle is not _CLOSED and not self.cancels_in_flight and queue.idle()
                and queue.status == b"I" and queue.scanner.at_boundary())

    def runs_client_request(self) -> bool:
        """A client's request sent here is not answered yet: a statement of the client's may be running."""
        return any(entry.owner is RequestOwner.CLIENT for entry in self.queue.entries)

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
                self.queue.status = body
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
                self.queue.status = body
                groups -= 1
                if not groups:
                    return failure

    def close(self) -> None:
        """Say Terminate if the session is up and idle (an open transaction is rolled back by the close), then close."""
        transport = self.transport
        if transport is not None and not self.closed and not transport.is_closing():
            if self.process_id and self.queue.idle() and self.queue.status == b"I":
                transport.write(messages.terminate())
            transport.close()
        self.lifecycle = Lifecycle.CLOSED


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
        tune(backend.transport.get_extra_info("socket") if backend.transport is not None else None, settings.tcp)
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
    """Deliver a CancelRequest for a real backend key to the upstream server, and wait (up to
    `connect_timeout_seconds`) until the server closes the connection, which it does once it has
    signalled the backend (Postgres documentation, 55.2.9 Canceling Requests in Progress)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(settings.host, settings.port), settings.connect_timeout_seconds
    )
    try:
        writer.write(messages.cancel_request(process_id, secret_key))
        await writer.drain()
        await asyncio.wait_for(reader.read(), settings.connect_timeout_seconds)
    finally:
        writer.close()
