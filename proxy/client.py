"""The client side: asyncio glue for one client connection, from the first byte to the last.

It owns the client's transport, TLS, the login timer and the checkout tasks, and feeds everything
else to the sans-IO core: the session's state (`proxy.relay.session`), which only moves by its table,
and the relay (`proxy.relay.relay`), whose hooks this class implements. It never reads the server
connection's bookkeeping: it hands the server's bytes to the relay and writes what the relay says.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar, cast

from proxy import access, admin
from proxy.auth.token_file import FileLogin, TokenFileUnreadable, uses_token_file
from proxy.backend import BackendConnection, UpstreamError
from proxy.guard import Refusal
from proxy.http import ServerLifecycle
from proxy.lifecycle import SHUTDOWN_MESSAGE, at_idle_point
from proxy.logs import AUDIT
from proxy.metrics import METRICS
from proxy.parameters import ParameterRefused, StartupRequest
from proxy.protocol import errors, messages
from proxy.protocol.errors import ProtocolViolation, UpstreamProtocolViolation
from proxy.protocol.framing import MessageReader, read_startup_packet
from proxy.relay.flow import FlowControl, Reason
from proxy.relay.relay import Relay, SessionMode
from proxy.relay.session import Event, IllegalMove, SessionState, State
from proxy.relay.settings import ClientSettings
from proxy.tokens import Identity, TokenRejected

if TYPE_CHECKING:
    from proxy.pool import Handover, SessionPool, TransactionPool
    from proxy.waiters import Waiter
    from proxy.server import ProxyServer

log = logging.getLogger("pg_tenant_proxy")

WRITE_BUFFER_HIGH = 256 * 1024
T = TypeVar("T")

# Compared against on every transaction: bound once (see proxy.relay.enums on Python 3.11's enum lookups).
_CLOSED, _IDLE, _WAITING = State.CLOSED, State.IDLE, State.WAITING
_CLIENT_DATA, _SERVER_TAKEN, _RELEASED = Event.CLIENT_DATA, Event.SERVER_TAKEN, Event.RELEASED
_DRAINING = ServerLifecycle.DRAINING


class Counted(enum.Enum):
    """In which of the server's connection counts a client connection is."""

    NOT_YET = "not yet"
    LOGGING_IN = "logging in"
    LOGGED_IN = "logged in"
    GONE = "gone"


class Door(enum.Enum):
    """The listener a client connection came through, which decides what it may ask for."""

    CLIENTS = "clients"  # listen and listen_unix: tenant logins, the console with a token, cancels
    ADMIN = "admin socket"  # [admin] listen_unix: only the console, without a token
    PEERS = "worker socket"  # a worker's private socket: only the CancelRequests other workers pass on


class ClientConnection(asyncio.Protocol):
    """One client connection (see the module docstring)."""

    def __init__(self, server: ProxyServer, door: Door = Door.CLIENTS) -> None:
        self.server = server
        self.id = server.next_client_id()  # SHOW CLIENTS / KILL CLIENT on the admin console
        self.door = door
        self.console: admin.ConsoleSession | None = None
        self.connected_at = time.time()
        self.transactions = 0
        self.transport: asyncio.Transport | None = None
        self.session = SessionState()
        self.address = "?"
        self.request: StartupRequest | None = None
        self.identity: Identity | None = None
        self.relay: Relay | None = None
        self.backend: BackendConnection | None = None
        self.flow = FlowControl()
        self.process_id = 0
        self.secret_key = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._started = time.monotonic()
        self._buffer = bytearray()
        self._tls_done = False
        self._reader: MessageReader | None = None
        self._transaction_mode = server.settings.pool.mode == "transaction"
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._waiter: Waiter[Handover] | None = None  # a place in the pool's queue
        self._greeted = False
        self._counted = Counted.NOT_YET  # in which of the server's counts this connection is
        self._idle_timer: asyncio.TimerHandle | None = None
        self._message_timer: asyncio.TimerHandle | None = None
        self._token: str | None = None  # the password sent, until the session_start audit event names its kid
        self._waiting_since: float | None = None  # loop time need_server() was called, for the checkout wait
        self.pool: SessionPool | TransactionPool = server.pool  # the login role's pool, chosen at login ([roles])
        self._file_login: FileLogin | None = None  # logged in with `[client] token_file` (proxy.auth.token_file)
        self._renewal: asyncio.Task[None] | None = None  # renewing from the token file at the token's expiry

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.flow.client.transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        peer = transport.get_extra_info("peername")
        self.address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer) or "unix"  # PgBouncer's addr
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server = self.server
        server.logging_in += 1
        self._counted = Counted.LOGGING_IN
        if server.logging_in > server.settings.client.max_unauthenticated_connections:
            self.refuse(errors.TOO_MANY_CONNECTIONS, "too many connections are logging in",
                        detail="at most [client] max_unauthenticated_connections connections may be logging in at once")
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(server.settings.client.startup_timeout_seconds, self._auth_timed_out)

    def data_received(self, data: bytes) -> None:
        size = len(data)
        self.bytes_in += size
        METRICS.bytes_received += size
        relay = self.relay
        if relay is None or not self._greeted:
            self._guarded(self._startup_data, data)
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        try:  # _guarded, inlined on the hot path
            relay.client_data(data)
        except Exception as exc:
            self._step_failed(exc)
        if self._message_timer is not None or not relay.scanner.at_boundary():
            self._watch_partial_message(relay)

    def _watch_partial_message(self, relay: Relay) -> None:
        """A message begun must be completed within `[client] message_timeout_seconds` (08P01)."""
        if relay.scanner.at_boundary():
            if self._message_timer is not None:
                self._message_timer.cancel()
                self._message_timer = None
        elif self._message_timer is None and self.session.state is not State.CLOSED:
            self._message_timer = asyncio.get_running_loop().call_later(
                self.server.settings.client.message_timeout_seconds, self._message_timed_out)

    def _message_timed_out(self) -> None:
        self._message_timer = None
        self.terminate(errors.PROTOCOL_VIOLATION, "message not completed in time",
                       detail="a message must arrive whole within [client] message_timeout_seconds")

    def _idle_transaction_timed_out(self) -> None:
        self._idle_timer = None
        self.terminate(errors.IDLE_IN_TRANSACTION_TIMEOUT, "terminating connection due to idle-in-transaction timeout",
                       detail="the proxy's [pool] idle_transaction_timeout")

    def _guarded(self, step: Callable[[T], None], argument: T) -> None:
        """Run one step of the session; malformed client input or a bug ends only this session."""
        try:
            step(argument)
        except Exception as exc:
            self._step_failed(exc)

    def _step_failed(self, exc: Exception) -> None:
        """A step raised: malformed client input ends the session with 08P01; a server the proxy lost
        track of, an illegal state move or any other bug with XX000."""
        if isinstance(exc, ProtocolViolation):
            self.terminate(errors.PROTOCOL_VIOLATION, str(exc))
        elif isinstance(exc, UpstreamProtocolViolation):
            log.error("upstream protocol error client=%s: %s", self.address, exc)
            self.terminate(errors.INTERNAL_ERROR, f"lost track of the upstream server's replies: {exc}")
        elif isinstance(exc, IllegalMove):
            log.error("session state error client=%s: %s", self.address, exc)
            self.terminate(errors.INTERNAL_ERROR, "internal error in the proxy")
        else:
            log.error("internal error in the session of client=%s", self.address, exc_info=exc)
            self.terminate(errors.INTERNAL_ERROR, "internal error in the proxy")

    def connection_lost(self, exc: Exception | None) -> None:
        logged_in = self._greeted
        self.session.move(Event.CLOSED)
        self._count(Counted.GONE)
        for timer in (self._timer, self._idle_timer, self._message_timer):
            if timer is not None:
                timer.cancel()
        if self.relay is not None:
            self.relay.session_ended()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._waiter is not None:
            self._waiter.cancel()
        self.server.forget(self)
        self._give_back_server()
        if logged_in:
            AUDIT.session_end(client=self.address, user=self.request.user if self.request else None,
                              database=self.database, identity=self.identity,
                              duration=time.monotonic() - self._started, bytes_received=self.bytes_in,
                              bytes_sent=self.bytes_out)

    def pause_writing(self) -> None:
        self.flow.client_full(True)

    def resume_writing(self) -> None:
        self.flow.client_full(False)

    # -- the server connection's side (BackendConnection.Owner) ----------------------------------

    def server_data(self, data: bytes) -> None:
        relay = self.relay
        assert relay is not None
        try:  # _guarded, inlined on the hot path
            relay.server_data(data)
        except Exception as exc:
            self._step_failed(exc)
            return
        timeout = self.server.settings.pool.idle_transaction_timeout
        if timeout and self._idle_timer is None and relay.queue is not None and relay.idle_in_transaction():
            self._idle_timer = asyncio.get_running_loop().call_later(timeout, self._idle_transaction_timed_out)

    def server_lost(self) -> None:
        self.terminate(errors.CONNECTION_FAILURE, "upstream server closed the connection")

    def server_backpressure(self, paused: bool) -> None:
        self.flow.server_full(paused)

    # -- the relay's hooks -----------------------------------------------------------------------

    def send_upstream(self, data: bytes) -> None:
        if self.backend is not None:
            self.backend.send(data)

    def send_client(self, data: bytes | memoryview) -> None:
        if self.transport is not None and self.session.state is not _CLOSED:
            self.bytes_out += len(data)
            METRICS.bytes_sent += len(data)
            self.transport.write(data)

    def need_server(self) -> None:
        """The client sent something and holds no server connection: get one."""
        if self.session.state is _IDLE:
            self.session.move(_CLIENT_DATA)
            self._waiting_since = self.pool.loop.time()
            self._checkout()

    def release_server(self) -> None:
        """Transaction mode, at ReadyForQuery 'I' with nothing owed: the connection goes back."""
        if self.session.state is _CLOSED:
            return  # connection_lost gives it back
        backend, self.backend = self.backend, None
        assert backend is not None
        self.flow.detach_server()
        self.pool.release(backend)
        self.session.move(_RELEASED)

    def prepared(self) -> None:
        """The proxy's own exchange on a new server connection is over: greet (at login) or go on."""
        self.session.move(Event.PREPARED)
        if not self._greeted:
            backend = self.backend
            assert backend is not None and self.request is not None
            parameters = {**backend.parameters, **backend.state.parameters}
            self.pool.learn_parameters(self.database, self.request.forwarded, parameters)
            self._greet(parameters)

    def fail(self, sqlstate: str, text: str, hint: str | None = None) -> None:
        log.warning("session failed client=%s reason=%s", self.address, text)
        self.terminate(sqlstate, text, hint=hint)

    def terminated(self) -> None:
        """The client sent Terminate: it is not forwarded, so the server connection can serve again."""
        self.session.move(Event.CLOSED)
        if self.transport is not None:
            self.transport.close()

    def hold_client(self, held: bool) -> None:
        self.flow.client.set(Reason.HELD, held)

    def transactions_ended(self, count: int) -> None:
        """Client transactions ended (ReadyForQuery 'I'): counted, and a session whose token was revoked
        ends here."""
        METRICS.transactions += count
        self.transactions += count
        if METRICS.tenant_metrics and self.identity is not None:
            for _ in range(count):
                METRICS.tenant_transaction(self.identity.tenant)
        verifier = self.server.verifier
        if verifier.revocable and self.identity is not None and verifier.revoked(self.identity, time.time()):
            log.warning("token revoked client=%s tenant=%s", self.address, self.identity.tenant)
            self.terminate(errors.INVALID_PASSWORD, "token revoked", hint="log in again with a token that is not revoked")
        if self._file_login is not None and self.session.state is not State.CLOSED:
            self._renew_at_boundary()
        if self.server.readiness.lifecycle is _DRAINING:  # Readiness.draining, without its property call per transaction
            self.drain_point()

    def cancel_server(self) -> None:
        """The relay passes the client's cancel on to the server connection it holds."""
        if self.backend is not None:
            self.server.send_cancel(self.backend)

    def refused(self, refusal: Refusal) -> None:
        """The guard refused a statement: one audit event (never the statement's text)."""
        AUDIT.statement_refused(client=self.address, tenant=self.identity.tenant if self.identity else None,
                                reason=refusal.message)

    # -- the lifecycle: drain and reload (proxy.lifecycle, ProxyServer.drain and reload) ---------------

    def drain_point(self) -> None:
        """The proxy is draining (SIGTERM): end this session with 57P01 when it is at an idle point
        (`proxy.lifecycle.at_idle_point`); called for every client when the drain starts, and at each
        ReadyForQuery 'I' after."""
        if at_idle_point(self.session.state, self._greeted, self.relay):
            self.terminate(errors.ADMIN_SHUTDOWN, SHUTDOWN_MESSAGE)

    def sign_again(self) -> None:
        """The signing key changed (a reload) or the identity was renewed (the token file): a session-mode
        session signs its context again (a transaction-mode one signs each transaction's context, with
        the new key and identity from the next one)."""
        relay = self.relay
        if relay is not None and isinstance(relay.mode, SessionMode) and self.session.state is not State.CLOSED:
            self._guarded(SessionMode.sign_again, relay.mode)

    def cancel(self) -> None:
        """A CancelRequest with this session's key (ProxyServer.cancel): the relay passes it to the server
        connection once the client's statement runs there (`Relay.cancel_requested`), also when the
        statement still waits for a connection in transaction mode."""
        if self.relay is not None and self.session.state is not _CLOSED:
            self._guarded(Relay.cancel_requested, self.relay)

    # -- ending ----------------------------------------------------------------------------------

    def terminate(self, sqlstate: str, text: str, detail: str | None = None, hint: str | None = None) -> None:
        """Send a FATAL ErrorResponse (when it cannot land inside a server message) and close."""
        if self.session.state is State.CLOSED or self.transport is None:
            return
        relay = self.relay
        backend = self.backend
        if relay is None or backend is None or backend.queue.scanner.at_boundary():
            self.transport.write(messages.error_response("FATAL", sqlstate, text, detail, hint))
        self._give_back_server(reuse=False)
        self.session.move(Event.CLOSED)
        self.transport.close()

    def _give_back_server(self, reuse: bool = True) -> None:
        """Stop relaying and give up the server connection. It serves again only when `reuse` and both
        sides stopped between whole messages and groups; the pool checks the server is idle too."""
        backend, self.backend = self.backend, None
        if backend is None:
            return
        self.flow.detach_server()
        relay = self.relay
        if relay is not None:
            relay.detach()
        if reuse and relay is not None and not relay.mid_group and relay.scanner.at_boundary() and not relay.preparing:
            self.pool.release(backend)
        else:
            backend.detach()
            backend.close()

    def refuse(self, sqlstate: str, reason: str, detail: str | None = None, hint: str | None = None,
               token: str | None = None) -> None:
        """Refuse a client during startup, with one audit event (the token's facts, never the token)."""
        AUDIT.login_refused(client=self.address, user=self.request.user if self.request else None, reason=reason,
                            sqlstate=sqlstate, token=token, database=self.request.database if self.request else None)
        self.terminate(sqlstate, reason, detail, hint)

    def _auth_timed_out(self) -> None:
        self._timer = None
        if not self._greeted:
            self.refuse(errors.CANNOT_CONNECT_NOW, "authentication timed out")

    def _token_expired(self) -> None:
        self._timer = None
        if self._file_login is not None:
            self._renewal = asyncio.get_running_loop().create_task(self._renew_at_expiry())
            return
        log.info("token expired client=%s tenant=%s", self.address, self.identity.tenant if self.identity else "-")
        self.terminate(errors.INVALID_PASSWORD, "token expired", hint="reconnect with a fresh token")

    # -- startup ---------------------------------------------------------------------------------

    def _startup_data(self, data: bytes) -> None:
        assert self.transport is not None
        if self.console is not None:
            self.console.data_received(data)
            return
        state = self.session.state
        if state is State.STARTUP:
            self._buffer += data
            packet = read_startup_packet(self._buffer, self.server.settings.client.max_startup_packet)
            if packet is not None:
                self._startup_packet(packet)
        elif state is State.AUTHENTICATING:
            self._password_data(data)
        elif state is not State.CLOSED:
            self._buffer += data
            if len(self._buffer) > self.server.settings.client.max_auth_message:
                raise ProtocolViolation("too much data sent before authentication completed")

    def _startup_packet(self, packet: messages.StartupPacket) -> None:
        assert self.transport is not None
        if self.door is Door.PEERS and not isinstance(packet, messages.CancelRequest):
            raise ProtocolViolation("this socket takes only cancel requests passed on between the proxy's workers")
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
                self.session.move(Event.TLS_REQUESTED)
                self._task = asyncio.get_running_loop().create_task(self._start_tls())
        elif isinstance(packet, messages.CancelRequest):
            self.server.cancel(packet.process_id, packet.secret_key)
            self.session.move(Event.CLOSED)
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
        self.flow.client.transport = transport
        self._tls_done = True
        self.session.move(Event.TLS_DONE)

    def _startup_message(self, packet: messages.StartupMessage) -> None:
        assert self.transport is not None
        refusal = access.check_transport(self.transport, self.server.settings)
        if refusal is not None:
            self.refuse(*refusal)
            return
        if self.door is Door.ADMIN:
            self._admin_socket_login(packet.parameters)
            return
        limit = self.server.settings.pool.max_client_connections
        if self.server.logged_in >= limit:
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
        self.session.move(Event.STARTUP_ACCEPTED)
        if self._timer is not None:  # the startup packet came: the rest of the login has auth_timeout_seconds
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.server.settings.client.auth_timeout_seconds,
                                                            self._auth_timed_out)
        self._reader = MessageReader(self.server.settings.client.max_auth_message)
        if self._log_in_with_token_file():
            return
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
                self.session.move(Event.CLOSED)
                assert self.transport is not None
                self.transport.close()
                return
            try:
                token = messages.parse_cstring(body)
            except ProtocolViolation:
                self.refuse(errors.INVALID_PASSWORD, "malformed token")
                return
            self._buffer += self._reader.take_rest()
            self.session.move(Event.PASSWORD_RECEIVED)
            self._task = asyncio.get_running_loop().create_task(self._establish(token))
            return

    async def _establish(self, token: str) -> None:
        """Verify the token and greet the client. The first client of a database and set of startup
        parameters also gets a server connection now, set up as its session would be, so the
        parameters the server reports are known; later ones get theirs at their first message."""
        assert self.request is not None and self.transport is not None
        server = self.server
        self._token = token
        try:
            identity = await server.verifier.verify_async(token)
            if server.console is not None and (self.request.database or self.request.user) == admin.ADMIN_DATABASE:
                self._console_login(identity)
                return
            self.identity = identity
            self.pool = server.pools.for_identity(identity)
            per_tenant = server.settings.client.max_connections_per_tenant
            if server.tenant_clients.get(identity.tenant, 0) >= per_tenant:
                self.refuse(errors.TOO_MANY_CONNECTIONS, "too many connections for this tenant",
                            detail=f"a tenant may have at most {per_tenant} client connections"
                            " ([client] max_connections_per_tenant)", token=token)
                return
            requested = self.request.database or self.request.user
            if not server.settings.upstream.allowed(requested):
                self.refuse(errors.INVALID_CATALOG_NAME, f'database "{requested}" is not available through this proxy',
                            token=token)
                return
            self.relay = Relay(
                self,
                server.guard,
                server.context,
                identity,
                ClientSettings(self.request.forwarded, server.policy.protected),
                self._transaction_mode,
                server.settings.client.max_message,
                server.settings.client.max_prepared_statement_bytes,
                server.statement_budget,
            )
            parameters = self.pool.known_parameters(self.database, self.request.forwarded)
            if parameters is None:
                backend = await self._acquire()
                if self.session.state is State.CLOSED:
                    return
                self._guarded(self._attach_at_login, backend)
                return
        except Exception as exc:
            self._setup_failed(exc, token)
            return
        if self.session.state is not State.CLOSED:
            self.session.move(Event.LOGGED_IN)
            self._greet(parameters)

    # -- [client] token_file (proxy.auth.token_file) ---------------------------------------------

    def _log_in_with_token_file(self) -> bool:
        """A local client, with `[client] token_file` set, is asked for no password: the file's token is
        verified as if it had sent it. False when the client must send its own token."""
        source = self.server.token_file
        assert self.transport is not None
        if source is None or not uses_token_file(self.transport, self.server.settings.client.token_file_networks):
            return False
        self.session.move(Event.PASSWORD_RECEIVED)
        self._file_login = FileLogin(source)
        try:
            token = self._file_login.first_token(time.time())
        except TokenFileUnreadable as exc:
            self.refuse(exc.sqlstate, str(exc), hint="the platform writes [client] token_file; try again later")
            return True
        self._task = asyncio.get_running_loop().create_task(self._establish(token))
        return True

    def _renew_at_boundary(self) -> None:
        """A transaction ended: go on with the token file's newer token, if it holds one."""
        assert self._file_login is not None and self.identity is not None
        try:
            identity = self._file_login.at_boundary(self.server.verifier, self.identity, time.time())
        except TokenRejected as exc:
            log.warning("session ended client=%s tenant=%s: %s", self.address, self.identity.tenant, exc)
            self.terminate(exc.sqlstate, str(exc))
            return
        if identity is not None:
            self._take_identity(identity)

    async def _renew_at_expiry(self) -> None:
        """The token expired: go on with the token file's newer token, or end the session."""
        assert self._file_login is not None and self.identity is not None
        try:
            identity = await self._file_login.at_expiry(self.server.verifier, self.identity, time.time())
        except TokenRejected as exc:
            log.info("token expired client=%s tenant=%s and the token file gave no newer token: %s",
                     self.address, self.identity.tenant, exc)
            self.terminate(exc.sqlstate, str(exc), hint="the token file ([client] token_file) held no newer valid token"
                           " for this tenant when the session's token expired; reconnect")
            return
        except Exception:
            log.exception("internal error while renewing the token of client=%s", self.address)
            self.terminate(errors.INTERNAL_ERROR, "internal error in the proxy")
            return
        self._guarded(self._take_identity, identity)

    def _take_identity(self, identity: Identity) -> None:
        """Go on with the token file's newer token (same tenant): the next transaction carries its
        expiry and claims; in session mode the context is set again now when the server connection is
        idle, else right after the client's next group (and again after a rollback that could undo it)."""
        relay = self.relay
        if relay is None or self.session.state is State.CLOSED or not self._same_login_role(identity):
            return
        self.identity = relay.identity = identity
        log.info("token renewed from the token file client=%s tenant=%s", self.address, identity.tenant)
        self.sign_again()  # the new identity's context, signed
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + identity.expires_at - time.time(), self._token_expired)

    def _same_login_role(self, identity: Identity) -> bool:
        """Whether a renewed identity maps to the login role ([roles]) the session runs as; if not, the
        session ends (28000): its server connections are that role's, and a session never changes role."""
        try:
            same = self.server.pools.for_identity(identity) is self.pool
        except TokenRejected as exc:  # RoleRefused: the renewed token's role is not mapped at all
            self.terminate(exc.sqlstate, str(exc))
            return False
        if not same:
            log.warning("session ended client=%s tenant=%s: the token file names another role", self.address,
                        identity.tenant)
            self.terminate(errors.INVALID_AUTHORIZATION, "the token file now names another database role; a session "
                           "never changes its login role: reconnect")
        return same

    def _setup_failed(self, exc: Exception, token: str | None = None) -> None:
        """Refuse the client for a failure while setting up its session (called in an except block);
        `token` is the password sent, whose facts (alg, kid, iss, aud) the audit event names."""
        if isinstance(exc, TokenRejected):
            self.refuse(exc.sqlstate, str(exc), token=token)
        elif isinstance(exc, UpstreamError):
            self.refuse(exc.sqlstate, exc.text, exc.detail, exc.hint)
        else:
            log.exception("internal error while setting up the session of client=%s", self.address)
            self.terminate(errors.INTERNAL_ERROR, "internal error in the proxy while setting up the session")

    def _count(self, to: Counted) -> None:
        """Move this connection between the server's counts: logging in, logged in (per tenant), gone."""
        server, was = self.server, self._counted
        if was is to or was is Counted.GONE:
            return
        if was is Counted.LOGGING_IN:
            server.logging_in -= 1
        elif was is Counted.LOGGED_IN and self.identity is not None:
            server.logged_in -= 1
            tenant = self.identity.tenant
            server.tenant_clients[tenant] -= 1
            if not server.tenant_clients[tenant]:
                del server.tenant_clients[tenant]
        if to is Counted.LOGGED_IN and self.identity is not None:
            server.logged_in += 1
            server.tenant_clients[self.identity.tenant] = server.tenant_clients.get(self.identity.tenant, 0) + 1
        self._counted = to

    @functools.cached_property
    def database(self) -> str:
        """The upstream database this client's session uses (the request must be read): read once, so a
        session stays in the database it logged in to when a reload changes `[upstream] database`."""
        assert self.request is not None
        return self.server.settings.upstream.database or self.request.database or self.request.user

    def _greet(self, parameters: dict[str, str]) -> None:
        assert self.transport is not None and self.request is not None and self.identity is not None
        assert self.relay is not None
        identity = self.identity
        self.process_id, self.secret_key = self.server.register(self)
        greeting = [messages.authentication(messages.AUTH_OK)]
        greeting += [messages.parameter_status(name, value) for name, value in parameters.items()]
        greeting.append(messages.backend_key_data(self.process_id, self.secret_key))
        greeting.append(messages.ready_for_query(b"I"))
        self.transport.write(b"".join(greeting))
        self.relay.greeted(parameters)
        self._greeted = True
        self._count(Counted.LOGGED_IN)
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + identity.expires_at - time.time(), self._token_expired)
        AUDIT.session_start(client=self.address, user=self.request.user, database=self.database, identity=identity,
                            token=self._token, login_role=self.pool.upstream.user)
        self._token = None
        if self._buffer:
            pending = bytes(self._buffer)
            self._buffer.clear()
            self.relay.client_data(pending)

    # -- the admin console ---------------------------------------------------------------------

    @property
    def waiting_since(self) -> float | None:
        """Loop time this client began waiting for a server connection, while it waits."""
        return self._waiting_since

    def _admin_socket_login(self, parameters: dict[str, str]) -> None:
        """A client of the admin socket reaches the console without a token, and nothing else."""
        user = parameters.get("user", "")
        self.request = StartupRequest(user=user, database=parameters.get("database") or user)
        if self.request.database != admin.ADMIN_DATABASE or self.server.console is None:
            self.refuse(errors.INVALID_CATALOG_NAME, f'the admin socket serves only database "{admin.ADMIN_DATABASE}"')
            return
        self.session.move(Event.STARTUP_ACCEPTED)
        self.session.move(Event.PASSWORD_RECEIVED)
        self._open_console(admin.LOCAL_OPERATOR, None)

    def _console_login(self, identity: Identity) -> None:
        """A verified token asks for the console: it enters only with every `[admin] required_claims`, and
        only with a token it sent itself (the token file is the application's identity, not an operator's)."""
        if self._file_login is not None:
            self.refuse(errors.INVALID_AUTHORIZATION, "the admin console does not accept the token file ([client] token_file)",
                        hint="send an admin token as the password, or use [admin] listen_unix")
            return
        required = self.server.settings.admin.required_claims
        refusal = admin.authorize(identity.claims, required)
        if refusal is not None:
            self.refuse(errors.INVALID_AUTHORIZATION, refusal, token=self._token, hint=admin.refusal_hint(required))
            return
        self._open_console(admin.Operator.from_identity(identity), identity.expires_at)

    def _open_console(self, operator: admin.Operator, expires_at: int | None) -> None:
        """Greet a console client; it counts in no tenant's connections and ends when its token expires."""
        assert self.transport is not None and self.request is not None and self.server.console is not None
        self._token = None
        self.console = admin.ConsoleSession(self.server.console, operator, self.address, self.request.user,
                                            self.send_client, self.terminated, self.server.settings.client.max_auth_message)
        self.session.move(Event.LOGGED_IN)
        self._count(Counted.LOGGED_IN)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if expires_at is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + expires_at - time.time(), self._token_expired)
        self.send_client(self.console.greeting())
        if self._buffer:
            pending = bytes(self._buffer)
            self._buffer.clear()
            self._guarded(self.console.data_received, pending)

    # -- checkout --------------------------------------------------------------------------------

    async def _acquire(self) -> BackendConnection:
        assert self.request is not None and self.identity is not None
        pool = self.pool
        if self._transaction_mode:
            return await cast("TransactionPool", pool).acquire(self.database, self.identity.tenant)
        return await cast("SessionPool", pool).acquire(self.database, self.request.forwarded, self.identity.tenant)

    def _attach_at_login(self, backend: BackendConnection) -> None:
        self._attach(backend, Event.SERVER_GRANTED, wait=True)

    def _attach(self, backend: BackendConnection, event: Event, wait: bool = False) -> None:
        """Hold `backend` and start relaying on it."""
        assert self.relay is not None and backend.transport is not None
        if self._waiting_since is not None:
            METRICS.checkout_wait(self.pool.loop.time() - self._waiting_since)
            self._waiting_since = None
        self.backend = backend
        backend.attach(self)
        self.flow.attach_server(backend.transport)
        self.session.move(event)
        self.relay.attach(backend, wait=wait)

    def _checkout(self) -> None:
        """Get a server connection for the client's first message (of a transaction). In transaction
        mode an idle one is taken at once when there is one; otherwise the client waits in the pool's
        queue, or for a new connection."""
        assert self.identity is not None
        if self._transaction_mode:
            pool: TransactionPool = self.pool  # type: ignore[assignment]  # not cast(): a call per checkout
            database, tenant = self.database, self.identity.tenant
            backend = pool.take(database, tenant)
            if backend is not None:
                self._attach_checked_out(backend)
                return
            if pool.full(database, tenant):
                deadline = pool.loop.time() + self.server.settings.pool.checkout_timeout
                self._waiter = pool.queue(database, deadline, self._handed_over, tenant)
                return
        self._task = asyncio.get_running_loop().create_task(self._checkout_task())

    async def _checkout_task(self) -> None:
        try:
            backend = await self._acquire()
        except Exception as exc:
            self._setup_failed(exc)
            return
        if self.session.state is State.CLOSED:
            self.pool.release(backend)
            return
        self._guarded(self._attach_checked_out, backend)

    def _attach_checked_out(self, backend: BackendConnection) -> None:
        self._attach(backend, Event.SERVER_TAKEN if self._transaction_mode else Event.SERVER_GRANTED)

    def _handed_over(self, result: Handover) -> None:
        """Transaction mode: the pool's answer to this client's place in its queue."""
        self._waiter = None
        if type(result) is BackendConnection and self.session.state is _WAITING:  # the common case
            try:  # _guarded, inlined on the hot path
                self._attach(result, _SERVER_TAKEN)
            except Exception as exc:
                self._step_failed(exc)
            return
        if isinstance(result, Exception):
            self._setup_failed(result)
            return
        pool = cast("TransactionPool", self.pool)
        if self.session.state is not State.WAITING:
            if result is not None:
                pool.hand_back(result)
            return
        self._guarded(lambda _: self._checkout(), None)  # None: a slot was freed; look again
