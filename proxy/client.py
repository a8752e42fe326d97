"""The client side: one asyncio.Protocol per client connection, from the first byte to the last.

Phases: STARTUP (SSLRequest / GSSENCRequest / CancelRequest / StartupMessage), AUTH (waiting for the
PasswordMessage that carries the token), CONNECTING (token verified, server connection being opened
and given the tenant context), READY (bytes forwarded, only message headers read), CLOSED.

In session mode a client keeps its server connection until it leaves. In transaction mode it holds
one from the first message of a transaction until the server is idle again (ReadyForQuery 'I' with
nothing in flight); each checkout first puts the client's context and session state on it
(`proxy.transaction`), and its named prepared statements are renamed to the server-side ones.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import socket
import time
from typing import TYPE_CHECKING, cast

from proxy.backend import BackendConnection, UpstreamError
from proxy.guard import ALLOW, Decision
from proxy.parameters import ParameterRefused, StartupRequest
from proxy.protocol import errors, messages
from proxy.protocol.errors import ProtocolViolation
from proxy.protocol.framing import Message, MessageReader, MessageScanner, read_startup_packet
from proxy.tokens import Identity, TokenRejected
from proxy.transaction import (
    CLIENT_REPLY,
    SETTINGS_SNAPSHOT,
    Checkout,
    ClientStatements,
    Outgoing,
    ServerStatements,
    checkout_messages,
    context_intact,
    session_settings,
)

if TYPE_CHECKING:
    from proxy.pool import Handover, SessionPool, TransactionPool, Waiter
    from proxy.server import ProxyServer

log = logging.getLogger("pg_tenant_proxy")

WRITE_BUFFER_HIGH = 256 * 1024
REFUSAL_HINT = "pg-tenant-proxy's SQL guard refuses statements that could change the tenant context or the session's identity"
_QUERY = ord("Q")


class Phase(enum.Enum):
    STARTUP = "startup"
    TLS = "tls"
    AUTH = "auth"
    CONNECTING = "connecting"
    READY = "ready"
    CLOSED = "closed"


class ClientConnection(asyncio.Protocol):
    """One client connection. In session mode its server connection is held from its first message
    (or its login, for the first client of a pool) until it leaves; in transaction mode, for one
    transaction at a time."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.phase = Phase.STARTUP
        self.address = "?"
        self.request: StartupRequest | None = None
        self.identity: Identity | None = None
        self.backend: BackendConnection | None = None
        self.process_id = 0
        self.secret_key = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._session_started = False
        self._started = time.monotonic()
        self._buffer = bytearray()
        self._tls_done = False
        self._reader: MessageReader | None = None
        self._transaction_mode = server.settings.pool.mode == "transaction"
        if self._transaction_mode:
            watched = b"QSFPXBEDCH"
        else:
            watched = b"QSFPX" if server.guard else b"QSFX"
        self._scanner = MessageScanner(watched, server.settings.client.max_message)
        # Transaction mode: the session state that follows the client between server connections.
        self._statements = ClientStatements(server.settings.client.max_prepared_statement_bytes)
        self._settings: dict[str, str] = {}
        self._settings_stale = False  # a SET may have changed them: read them back before release
        self._unsynced = False  # extended-protocol messages sent since the last Sync
        self._describing = True  # and those were only Parse, Describe, Close and Flush
        self._reassert_due = False
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._checkout_task: asyncio.Task[None] | Waiter | None = None  # a checkout task, or a place in the pool's queue

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        peer = transport.get_extra_info("peername")
        self.address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.server.settings.client.auth_timeout_seconds, self._auth_timed_out)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Handle bytes from the client; malformed input or an internal error ends only this session."""
        try:
            if self.phase is Phase.READY:
                self._forward(data)
            else:
                self._startup_data(data)
        except ProtocolViolation as exc:
            self.terminate(errors.PROTOCOL_VIOLATION, str(exc))
        except Exception:
            log.exception("internal error on data from client=%s", self.address)
            self.terminate(errors.INTERNAL_ERROR, "internal error in the proxy")

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = Phase.CLOSED
        if self._timer is not None:
            self._timer.cancel()
        for task in (self._task, self._checkout_task):
            if task is not None and not task.done():
                task.cancel()
        self.server.forget(self)
        self._detach_backend(reuse=True)
        if self._session_started:
            log.info(
                "session end client=%s user=%s tenant=%s sub=%s duration=%.3fs bytes_in=%d bytes_out=%d",
                self.address,
                self.request.user if self.request else "-",
                self.identity.tenant if self.identity else "-",
                (self.identity.subject if self.identity else None) or "-",
                time.monotonic() - self._started,
                self.bytes_in,
                self.bytes_out,
            )

    def pause_writing(self) -> None:
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.resume_reading()

    # -- refusing --------------------------------------------------------------------------------

    def terminate(
        self, sqlstate: str, text: str, detail: str | None = None, hint: str | None = None, at_boundary: bool = False
    ) -> None:
        """Send a FATAL ErrorResponse (when it cannot land inside a server message) and close."""
        if self.phase is Phase.CLOSED or self.transport is None:
            return
        backend = self._detach_backend()
        if at_boundary or backend is None or backend.at_message_boundary():
            self.transport.write(messages.error_response("FATAL", sqlstate, text, detail, hint))
        self.phase = Phase.CLOSED
        self.transport.close()

    def _detach_backend(self, reuse: bool = False) -> BackendConnection | None:
        """Stop forwarding and give up the server connection, keeping its byte count. It goes back to
        the pool only when `reuse` and the client stopped between two whole messages, after a Query or
        Sync; the pool checks that the server is idle too."""
        backend, self.backend = self.backend, None
        if backend is not None:
            self.bytes_out += backend.bytes_forwarded
            if reuse and self._session_started and self._scanner.at_boundary() and not self._unsynced:
                self.server.pool.release(backend)
            else:
                backend.peer = None
                backend.close()
        return backend

    def refuse(self, sqlstate: str, reason: str, detail: str | None = None, hint: str | None = None) -> None:
        """Refuse a client during startup, with one log line."""
        user = self.request.user if self.request else "-"
        log.warning("refused client=%s user=%s reason=%s", self.address, user, reason)
        self.terminate(sqlstate, reason, detail, hint)

    def _auth_timed_out(self) -> None:
        self._timer = None
        if self.phase is not Phase.READY:
            self.refuse(errors.CANNOT_CONNECT_NOW, "authentication timed out")

    def _token_expired(self) -> None:
        self._timer = None
        log.info("token expired client=%s tenant=%s", self.address, self.identity.tenant if self.identity else "-")
        self.terminate(errors.INVALID_PASSWORD, "token expired", hint="reconnect with a fresh token")

    def backend_lost(self, backend: BackendConnection) -> None:
        """The server connection closed under an active session."""
        if backend is self.backend:
            self.terminate(errors.CONNECTION_FAILURE, "upstream server closed the connection")

    # -- startup ---------------------------------------------------------------------------------

    def _startup_data(self, data: bytes) -> None:
        assert self.transport is not None
        if self.phase is Phase.STARTUP:
            self._buffer += data
            packet = read_startup_packet(self._buffer, self.server.settings.client.max_startup_packet)
            if packet is not None:
                self._startup_packet(packet)
        elif self.phase is Phase.AUTH:
            self._password_data(data)
        elif self.phase is Phase.CONNECTING:
            self._buffer += data
            if len(self._buffer) > self.server.settings.client.max_auth_message:
                raise ProtocolViolation("too much data sent before authentication completed")

    def _startup_packet(self, packet: messages.StartupPacket) -> None:
        assert self.transport is not None
        if isinstance(packet, (messages.SSLRequest, messages.GSSENCRequest)):
            if self._buffer:
                raise ProtocolViolation("received unencrypted data after an encryption request")
            if isinstance(packet, messages.GSSENCRequest):
                self.transport.write(b"N")
            elif self._tls_done:
                raise ProtocolViolation("SSLRequest repeated after TLS was established")
            elif self.server.tls_context is None:
                self.transport.write(b"N")
            else:
                self.transport.write(b"S")
                self.phase = Phase.TLS
                self._task = asyncio.get_running_loop().create_task(self._start_tls())
        elif isinstance(packet, messages.CancelRequest):
            self.server.cancel(packet.process_id, packet.secret_key)
            self.phase = Phase.CLOSED
            self.transport.close()
        else:
            self._startup_message(packet)

    async def _start_tls(self) -> None:
        assert self.transport is not None and self.server.tls_context is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(self.transport, self, self.server.tls_context, server_side=True)
        except (OSError, ConnectionError) as exc:
            log.warning("refused client=%s reason=TLS handshake failed: %s", self.address, exc)
            self.transport.abort()
            return
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self._tls_done = True
        self.phase = Phase.STARTUP

    def _startup_message(self, packet: messages.StartupMessage) -> None:
        assert self.transport is not None
        limit = self.server.settings.pool.max_client_connections
        if len(self.server.clients) > limit:
            self.refuse(
                errors.TOO_MANY_CONNECTIONS,
                "sorry, too many clients already",
                detail=f"the proxy accepts at most {limit} client connections ([pool] max_client_connections)",
            )
            return
        try:
            self.request = self.server.policy.evaluate(packet.parameters)
        except ParameterRefused as exc:
            self.refuse(exc.sqlstate, str(exc))
            return
        if packet.minor > 0 or self.request.unrecognized_protocol_options:
            self.transport.write(messages.negotiate_protocol_version(0, self.request.unrecognized_protocol_options))
        self.phase = Phase.AUTH
        self._reader = MessageReader(self.server.settings.client.max_auth_message)
        self.transport.write(messages.authentication(messages.AUTH_CLEARTEXT_PASSWORD))
        if self._buffer:
            rest = bytes(self._buffer)
            self._buffer.clear()
            self._password_data(rest)

    def _password_data(self, data: bytes) -> None:
        assert self._reader is not None
        self._reader.feed(data)
        if self._reader.peek_type() not in (None, b"p", b"X"):
            raise ProtocolViolation(f"expected a password message, got message type {self._reader.peek_type()!r}")
        for type_byte, body in self._reader:
            if type_byte == b"X":
                self.phase = Phase.CLOSED
                assert self.transport is not None
                self.transport.close()
                return
            try:
                token = messages.parse_cstring(body)
            except ProtocolViolation:
                self.refuse(errors.INVALID_PASSWORD, "malformed token")
                return
            self._buffer += self._reader.take_rest()
            self.phase = Phase.CONNECTING
            self._task = asyncio.get_running_loop().create_task(self._establish(token))
            return

    async def _establish(self, token: str) -> None:
        """Verify the token and greet the client. The first client of a database and set of startup
        parameters also gets its server connection now, so the parameters the server reports are known;
        later ones get theirs at their first message."""
        assert self.request is not None and self.transport is not None
        server = self.server
        try:
            if server.verifier.needs_io:
                loop = asyncio.get_running_loop()
                identity = await loop.run_in_executor(None, server.verifier.verify, token, time.time())
            else:
                identity = server.verifier.verify(token, time.time())
            self.identity = identity
            self._settings = {name.lower(): value for name, value in self.request.forwarded.items()}
            parameters = server.pool.known_parameters(self._database(), self.request.forwarded)
            if parameters is None:
                await self._checkout()
                assert self.backend is not None
                parameters = dict(self.backend.parameters)
                server.pool.learn_parameters(self._database(), self.request.forwarded, parameters)
                if self._transaction_mode:
                    self.backend.attach(self)
                    self._release()
        except Exception as exc:
            self._setup_failed(exc)
            return
        if self.phase is not Phase.CLOSED:
            self._ready(identity, parameters)

    def _setup_failed(self, exc: Exception) -> None:
        """Refuse the client for a failure while setting up its session (called in an except block)."""
        if isinstance(exc, TokenRejected):
            self.refuse(errors.INVALID_PASSWORD, str(exc))
        elif isinstance(exc, UpstreamError):
            self.refuse(exc.sqlstate, exc.text, exc.detail, exc.hint)
        else:
            log.exception("internal error while setting up the session of client=%s", self.address)
            self.terminate(errors.INTERNAL_ERROR, "internal error in the proxy while setting up the session")

    def _database(self) -> str:
        assert self.request is not None
        return self.server.settings.upstream.database or self.request.database or self.request.user

    async def _checkout(self) -> None:
        """Get a server connection and put this client's signed context (in transaction mode: and its
        session state) on it; raises UpstreamError."""
        assert self.request is not None and self.identity is not None
        identity = self.identity
        if self._transaction_mode:
            pool = cast("TransactionPool", self.server.pool)
            self.backend = await pool.acquire(self._database(), identity.tenant)
            await self._run_checkout(self._plan_checkout())
            return
        backend = await cast("SessionPool", self.server.pool).acquire(self._database(), self.request.forwarded)
        self.backend = backend
        failure = await backend.run(
            self.server.context.session_messages(identity.tenant, backend.process_id, identity.expires_at)
        )
        if failure is not None:
            raise UpstreamError.from_fields(failure, "could not set the tenant context: ")

    def _plan_checkout(self) -> Checkout:
        """Transaction mode: what the server connection just taken needs before this client's messages."""
        backend, identity = self.backend, self.identity
        assert backend is not None and backend.state is not None and identity is not None
        backend.state.statements.in_use.clear()
        return checkout_messages(
            backend.state, self.server.context, backend.process_id, identity.tenant, identity.expires_at, self._settings
        )

    async def _run_checkout(self, plan: Checkout) -> None:
        """Send the checkout messages and wait for them: the client's messages are held until the
        context is in force (fail closed)."""
        backend = self.backend
        assert backend is not None
        if not plan.groups:
            return
        try:
            failure = await asyncio.wait_for(backend.run(plan.request, plan.groups), self.server.settings.upstream.connect_timeout_seconds)
        except asyncio.TimeoutError:
            backend.close()
            raise UpstreamError(errors.CONNECTION_FAILURE, "the upstream server did not answer while a server connection was prepared") from None
        if failure is not None:
            backend.close()  # what it holds is unknown now
            raise UpstreamError.from_fields(failure, "could not prepare a server connection for this session: ")

    async def _checkout_then_forward(self, plan: Checkout | None = None) -> None:
        """At the client's first message (of a transaction): get a server connection (or finish
        preparing the one taken, `plan`), then pass on what the client sent."""
        assert self.transport is not None
        try:
            if plan is None:
                await self._checkout()
            else:
                await self._run_checkout(plan)
        except Exception as exc:
            self._setup_failed(exc)
            return
        finally:
            if self._transaction_mode:
                self._checkout_task = None
        if self.phase is Phase.CLOSED:
            return
        self._attach()
        self.transport.resume_reading()

    def _attach(self) -> None:
        """Start forwarding between this client and its server connection."""
        assert self.backend is not None
        self.backend.attach(self)
        if self._buffer:
            pending = bytes(self._buffer)
            self._buffer.clear()
            self._feed(pending)

    def _ready(self, identity: Identity, parameters: dict[str, str]) -> None:
        assert self.transport is not None and self.request is not None
        self.process_id, self.secret_key = self.server.register(self)
        greeting = [messages.authentication(messages.AUTH_OK)]
        greeting += [messages.parameter_status(name, value) for name, value in parameters.items()]
        greeting.append(messages.backend_key_data(self.process_id, self.secret_key))
        greeting.append(messages.ready_for_query(b"I"))
        self.transport.write(b"".join(greeting))
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + identity.expires_at - time.time(), self._token_expired)
        self.phase = Phase.READY
        self._session_started = True
        log.info(
            "session start client=%s user=%s tenant=%s sub=%s database=%s",
            self.address,
            self.request.user,
            identity.tenant,
            identity.subject or "-",
            self._database(),
        )
        if self.backend is not None:
            self._attach()
        elif self._buffer:
            self._wait_for_server()

    def _wait_for_server(self) -> None:
        """Hold the client's bytes (and stop reading more) until its server connection is ready.

        In transaction mode an idle server connection is taken at once when there is one, and used at
        once when it already holds what this client needs."""
        assert self.transport is not None
        if self._checkout_task is not None or self.phase is not Phase.READY:
            return
        if self._transaction_mode and self.backend is None:
            assert self.identity is not None
            pool = cast("TransactionPool", self.server.pool)
            self.backend = pool.take(self._database(), self.identity.tenant)
            if self.backend is not None:
                self._start_on_server()
                return
            if pool.full(self._database()):
                self.transport.pause_reading()
                deadline = pool.loop.time() + self.server.settings.pool.checkout_timeout
                self._checkout_task = pool.queue(self._database(), deadline, self._handed_over)
                return
        elif self.backend is not None:
            self.transport.pause_reading()  # the server connection is busy with the proxy's own exchange
            return
        self.transport.pause_reading()
        self._checkout_task = asyncio.get_running_loop().create_task(self._checkout_then_forward())

    def _handed_over(self, result: Handover) -> None:
        """Transaction mode: the pool's answer to this client's place in its queue."""
        self._checkout_task = None
        if isinstance(result, Exception):
            self._setup_failed(result)
            return
        backend = result
        if self.phase is not Phase.READY:
            if backend is not None:
                cast("TransactionPool", self.server.pool).hand_back(backend)
            return
        if backend is None:
            self._wait_for_server()  # a slot was freed: look again
            return
        self.backend = backend
        self._start_on_server()

    def _start_on_server(self) -> None:
        """Transaction mode: forward at once on the server connection just taken when it holds what this
        client needs, else prepare it first (the client's bytes wait)."""
        assert self.transport is not None
        plan = self._plan_checkout()
        if plan.groups:
            self.transport.pause_reading()
            self._checkout_task = asyncio.get_running_loop().create_task(self._checkout_then_forward(plan))
            return
        self._attach()
        self.transport.resume_reading()

    # -- forwarding ------------------------------------------------------------------------------

    def _forward(self, data: bytes) -> None:
        backend = self.backend
        if backend is None or backend.peer is not self:
            self._buffer += data
            self._wait_for_server()
            return
        if backend.transport is None:
            return
        if self._scanner.lone(data) == _QUERY and not self._unsynced:  # the common read: one simple Query
            query = self._checked_query(data)
            reassertion = self._group_sent(backend)
            backend.transport.write(query + reassertion if reassertion else query)
            return
        if self._transaction_mode:
            self._forward_transaction(backend, data)
            return
        segments = self._scanner.scan(data)
        if len(segments) == 1 and type(segments[0]) is not Message:
            backend.transport.write(data)
            return
        out: list[bytes | memoryview] = []
        terminated = False
        for segment in segments:
            if not isinstance(segment, Message):
                out.append(segment)
                continue
            kind = segment.type
            if kind == b"X":
                terminated = True  # not forwarded, so the server connection can be reset and reused
                break
            if kind == b"P":
                out.append(self._checked_parse(segment))
                continue
            out.append(self._checked_query(segment.raw) if kind == b"Q" else segment.raw)
            out.append(self._group_sent(backend))
        backend.transport.write(b"".join(out))
        if terminated and self.transport is not None:
            self.transport.close()

    def _forward_transaction(self, backend: BackendConnection, data: bytes) -> None:
        """Transaction mode: forward, renaming named prepared statements to the server-side ones and
        preparing them where missing, and note whether the client stopped right after a Query or Sync.

        A client that prepares with Parse / Describe / Flush and no Sync (asyncpg does) leaves the
        server inside an implicit transaction; the proxy ends it with a Sync of its own, whose
        ReadyForQuery it keeps, so the server connection can go back to the pool meanwhile."""
        assert backend.transport is not None and backend.state is not None
        statements = backend.state.statements
        out: Outgoing = []
        flushed = False
        for segment in self._scanner.scan(data):
            if not isinstance(segment, Message):
                out.append((segment, None))  # CopyData, CopyDone, CopyFail
                flushed = False
                continue
            kind = segment.type
            flushed = kind == b"H"
            if kind in b"BEPDCH":
                self._unsynced = True
            if kind in b"BE":
                self._describing = False  # a portal exists: only the client's Sync may end this
            if kind == b"B":
                self._statements.bind(segment.body, statements, out)
            elif kind in b"EH":
                out.append((segment.raw, None))
            elif kind == b"P":
                self._transaction_parse(segment, statements, out)
            elif kind == b"D":
                self._statements.describe(segment.body, statements, out)
            elif kind == b"C":
                self._statements.close(segment.body, out)
            elif kind == b"X":
                self._send(backend, out)
                assert self.transport is not None
                self.transport.close()
                return
            else:  # Query, Sync, FunctionCall: each ends a group of replies with one ReadyForQuery
                out.append((self._checked_query(segment.raw) if kind == b"Q" else segment.raw, None))
                self._send(backend, out)
                reassertion = self._group_sent(backend)
                out = [(reassertion, None)] if reassertion else []
                self._unsynced = False
                self._describing = True
        if flushed and self._describing and self._scanner.at_boundary():
            out.append((messages.sync(), None))
            self._send(backend, out)
            backend.expect_group(silent_end=True)
            self._unsynced = False
            return
        self._send(backend, out)

    def _group_sent(self, backend: BackendConnection) -> bytes:
        """A Query, Sync or FunctionCall went upstream: each ends a group of replies with one
        ReadyForQuery. After RESET ALL or DISCARD ALL, the context messages to send next (a group of
        the proxy's own), else nothing."""
        backend.expect_group()
        if not self._reassert_due:
            return b""
        self._reassert_due = False
        assert self.identity is not None
        backend.expect_group(own=True)
        return self.server.context.session_messages(self.identity.tenant, backend.process_id, self.identity.expires_at)

    @staticmethod
    def _send(backend: BackendConnection, out: Outgoing) -> None:
        """Write what goes upstream, owing the client's and the proxy's Parse / Close replies in order."""
        if not out:
            return
        assert backend.transport is not None
        for _, reply in out:
            if reply is not None:
                backend.expect_reply(reply)
        backend.transport.write(b"".join([raw for raw, _ in out]))

    def _transaction_parse(self, message: Message, statements: ServerStatements, out: Outgoing) -> None:
        """A client's Parse in transaction mode: refused as in session mode, or when the client keeps
        too much in prepared statements already, else named and prepared."""
        if message.body[:1] == b"\0":
            self._describing = False  # the unnamed statement lives until the client's own Sync
        refused = self._checked_parse(message)
        if refused is not message.raw:
            out.append((refused, CLIENT_REPLY))
        elif not self._statements.room_for(message.body):
            refused = self._refused_parse(
                message.body,
                f"too much kept in prepared statements: this client may keep {self._statements.limit} bytes of them",
                errors.CONFIGURATION_LIMIT_EXCEEDED,
                "close (deallocate) prepared statements the client no longer uses, or raise [client]"
                " max_prepared_statement_bytes",
            )
            out.append((refused, CLIENT_REPLY))
        else:
            self._statements.parse(message.body, statements, out)

    def transaction_idle(self) -> None:
        """Transaction mode: the server is idle with nothing in flight; give the connection back, after
        reading back the session settings when a statement may have changed them."""
        if self._unsynced or self.phase is not Phase.READY or not self._scanner.at_boundary():
            return
        if self._settings_stale:
            backend = self.backend
            assert backend is not None
            backend.detach()
            self._task = asyncio.get_running_loop().create_task(self._read_settings(backend))
            return
        self._release()

    async def _read_settings(self, backend: BackendConnection) -> None:
        """Read the session settings in force back from the server, then release it (or, when the client
        sent more meanwhile, carry on with it)."""
        rows: list[list[bytes | None]] = []
        try:
            failure = await backend.run(SETTINGS_SNAPSHOT, rows=rows)
        except UpstreamError:
            failure = {}
        if self.phase is Phase.CLOSED or self.backend is not backend:
            return
        if failure is not None:
            self.terminate(errors.CONNECTION_FAILURE, "could not read back the session settings from the upstream server")
            return
        state = backend.state
        assert state is not None and self.identity is not None
        self._settings = session_settings(rows, self.server.policy.protected)
        state.settings = dict(self._settings)
        if not context_intact(rows, self.server.context, self.identity.tenant, backend.process_id, state.context_expires_at):
            state.context_expires_at = 0
        self._settings_stale = False
        assert self.transport is not None
        if self._buffer:
            self._attach()
            self.transport.resume_reading()
        else:
            self._release()

    def _release(self) -> None:
        """Transaction mode: give the server connection back to the pool."""
        backend, self.backend = self.backend, None
        if backend is not None:
            self.bytes_out += backend.bytes_forwarded
            backend.bytes_forwarded = 0
            cast("TransactionPool", self.server.pool).release(backend)
        if self.transport is not None and self.phase is Phase.READY:
            self.transport.resume_reading()

    def _refusal_marker(self, refusal: str, sqlstate: str = errors.INSUFFICIENT_PRIVILEGE, hint: str = REFUSAL_HINT) -> str:
        """SQL that fails on the server with a syntax error naming a fresh marker, whose error is
        rewritten into the refusal on the way back (so it lands where the statement's would)."""
        marker = f"pg_tenant_proxy_refused_{secrets.token_hex(8)}"
        assert self.backend is not None
        self.backend.add_refusal(marker, messages.error_response("ERROR", sqlstate, refusal, hint=hint))
        log.info("refused statement client=%s tenant=%s reason=%s", self.address,
                 self.identity.tenant if self.identity else "-", refusal)
        return marker

    def _refused_parse(self, body: bytes, refusal: str, sqlstate: str = errors.INSUFFICIENT_PRIVILEGE,
                       hint: str = REFUSAL_HINT) -> bytes:
        """A Parse, in place of one whose body (name NUL-terminated) is refused, that fails where it
        would have run; its error comes back as the refusal."""
        name = body[: body.find(b"\0")].decode(errors="replace")
        return messages.parse(name, self._refusal_marker(refusal, sqlstate, hint))

    def _checked_query(self, query: bytes) -> bytes:
        """A Query (whole, header included) as it goes upstream: unchanged, or replaced by a marker that
        fails in its place."""
        guard = self.server.guard
        if guard is None:
            return query
        decision = guard.check(query[5:-1].decode("utf-8", "replace"))
        if decision is ALLOW:
            return query
        if decision.refusal is not None:
            refusal = decision.refusal
            return messages.query(self._refusal_marker(refusal.message, refusal.sqlstate, refusal.hint))
        self._note(decision)
        return query

    def _checked_parse(self, message: Message) -> bytes:
        """A Parse as it goes upstream; a refused one is replaced by a Parse that fails at the same point."""
        guard = self.server.guard
        if guard is None:
            return message.raw
        body = message.body
        name_end = body.find(b"\0")
        query_end = body.find(b"\0", name_end + 1)
        if name_end < 0 or query_end < 0:
            return message.raw  # malformed: the server reports it
        decision = guard.check(body[name_end + 1 : query_end].decode(errors="replace"))
        if decision.refusal is not None:
            refusal = decision.refusal
            return self._refused_parse(body, refusal.message, refusal.sqlstate, refusal.hint)
        self._note(decision)
        return message.raw

    def _note(self, decision: Decision) -> None:
        """Act on an allowed statement's side effects: re-assert the context after RESET ALL or DISCARD
        ALL; in transaction mode, read the settings back and forget the server's prepared statements."""
        if decision.resets_all:
            self._reassert_due = True
        if self._transaction_mode:
            settings = decision.resets_all or decision.reset_names or decision.set_names or decision.unknown_settings
            self._settings_stale = self._settings_stale or bool(settings)
            dropped = decision.drops_statements or decision.deallocates
            if dropped and self.backend is not None and self.backend.state is not None:
                self.backend.state.statements.clear()

    def context_failed(self, fields: dict[str, str]) -> None:
        """Re-asserting the context failed outside a failed transaction: stop the session (fail closed)."""
        log.warning("context lost client=%s reason=%s", self.address, fields.get("M", "?"))
        self.terminate(
            fields.get("C", errors.INTERNAL_ERROR),
            "could not re-assert the tenant context: " + fields.get("M", "unknown error"),
            at_boundary=True,
        )

    def reassert_later(self) -> None:
        """Re-assert the context again after the client's next Query or Sync."""
        self._reassert_due = True
