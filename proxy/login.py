"""The login of one client connection: from its first packet to its greeting or its refusal, and its
token's lifetime after that (expiry; renewal from `[client] token_file`).

- `StartupExchange` is the pure part: the bytes a client sends before its greeting (startup packets, the
  PasswordMessage carrying the token, whatever comes early) in; the packet, the token, or the bytes to
  hand on out. Malformed input raises ProtocolViolation (08P01). No asyncio, no clock.
- `Login` is the asyncio glue around it: it answers the packets, holds the login's deadlines, verifies
  the token, applies the limits a login must pass, sets up the first server connection of a pool,
  greets the client (or the admin console's client) or refuses it with one audit event, and ends the
  session when the token expires (or renews it from the token file). It reaches its connection only
  through `Client`, which `proxy.client.ClientConnection` implements.

Postgres documentation: "Message Flow: Start-up", "SSL Session Encryption". Nothing here puts a token,
or any part of one, in a log line or an error message.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from proxy import access, admin
from proxy.auth.token_file import FileLogin, TokenFileUnreadable, uses_token_file
from proxy.backend import UpstreamError
from proxy.logs import AUDIT
from proxy.parameters import ParameterRefused, StartupRequest
from proxy.protocol import errors, messages
from proxy.protocol.errors import ProtocolViolation
from proxy.protocol.framing import MessageReader, read_startup_packet
from proxy.relay.relay import Hooks, Relay
from proxy.relay.session import Event, SessionState, State
from proxy.relay.settings import ClientSettings
from proxy.tokens import Identity, TokenRejected

if TYPE_CHECKING:
    from proxy.pool import SessionPool, TransactionPool
    from proxy.server import ProxyServer

log = logging.getLogger("pg_tenant_proxy")

T = TypeVar("T")


class Door(enum.Enum):
    """The listener a client connection came through, which decides what it may ask for."""

    CLIENTS = "clients"  # listen and listen_unix: tenant logins, the console with a token, cancels
    ADMIN = "admin socket"  # [admin] listen_unix: only the console, without a token
    PEERS = "worker socket"  # a worker's private socket: only the CancelRequests other workers pass on


class Counted(enum.Enum):
    """In which of the server's connection counts a client connection is."""

    NOT_YET = "not yet"
    LOGGING_IN = "logging in"
    LOGGED_IN = "logged in"
    GONE = "gone"


class NotAToken(enum.Enum):
    """The client's answer to the password request, when it carries no token."""

    TERMINATE = "terminate"  # Terminate: the client leaves; close without an error
    MALFORMED = "malformed"  # a PasswordMessage that is not one C string: 28P01 "malformed token"


class StartupExchange:
    """The bytes a client sends before it is greeted, read in the order the protocol puts them
    ("Message Flow: Start-up"): startup packets up to a StartupMessage, then the answer to the password
    request, then whatever comes before the greeting, kept for the session. The caller says which of
    the three it expects (from the session's state). Every method raises ProtocolViolation (08P01) for
    input no client sends."""

    def __init__(self, door: Door) -> None:
        self.door = door
        self._pending = bytearray()  # read and not yet taken
        self._reader: MessageReader | None = None  # the messages after the StartupMessage

    def startup_packet(self, data: bytes, maximum: int) -> messages.StartupPacket | None:
        """`data` added to what is pending; the first whole startup packet (SSLRequest, GSSENCRequest,
        CancelRequest or StartupMessage, at most `maximum` bytes) taken off it, or None while there is
        none. Also raises for a packet other than CancelRequest at the workers' door, and for bytes sent
        after an encryption request before its answer (they would travel unencrypted)."""
        self._pending += data
        packet = read_startup_packet(self._pending, maximum)
        if packet is None:
            return None
        if self.door is Door.PEERS and not isinstance(packet, messages.CancelRequest):
            raise ProtocolViolation("this socket takes only cancel requests passed on between the proxy's workers")
        if isinstance(packet, (messages.SSLRequest, messages.GSSENCRequest)) and self._pending:
            raise ProtocolViolation("received unencrypted data after an encryption request")
        return packet

    def expect_password(self, maximum: int) -> None:
        """The StartupMessage was accepted: what follows is read as messages of at most `maximum` bytes."""
        self._reader = MessageReader(maximum)

    def password(self, data: bytes) -> str | NotAToken | None:
        """`data` read as the answer to the password request (after `expect_password`): the token the
        PasswordMessage carries, `NotAToken`, or None while the message is not whole. What follows a
        PasswordMessage is pending. Also raises for any other message, or one over the maximum."""
        reader = self._reader
        assert reader is not None
        reader.feed(data)
        if reader.peek_type() not in (None, b"p", b"X"):
            raise ProtocolViolation(f"expected a password message, got message type {reader.peek_type()!r}")
        for type_byte, body in reader:
            if type_byte == b"X":
                return NotAToken.TERMINATE
            try:
                token = messages.parse_cstring(body)
            except ProtocolViolation:
                return NotAToken.MALFORMED
            self._pending += reader.take_rest()
            return token
        return None

    def hold(self, data: bytes, maximum: int) -> None:
        """Keep `data`, sent before the greeting (during the TLS handshake or the token's verification),
        pending; also raises once more than `maximum` bytes are pending."""
        self._pending += data
        if len(self._pending) > maximum:
            raise ProtocolViolation("too much data sent before authentication completed")

    def take_pending(self) -> bytes:
        """The bytes read and not yet taken (b"" for none): after a StartupMessage, the start of the
        answer to the password request; at the greeting, the session's first bytes."""
        pending = bytes(self._pending)
        self._pending.clear()
        return pending


class Client(Hooks, Protocol):
    """What the login needs of its client connection (`proxy.client.ClientConnection`): the relay's
    hooks (the login starts the client's relay on them), and these."""

    address: str  # for log lines and audit events
    session: SessionState
    transport: asyncio.Transport | None
    request: StartupRequest | None  # the login sets the rest
    identity: Identity | None
    pool: SessionPool | TransactionPool
    relay: Relay | None
    console: admin.ConsoleSession | None

    database: str  # the upstream database the session uses, set by the login

    def terminate(self, sqlstate: str, text: str, detail: str | None = None, hint: str | None = None) -> None: ...

    def tls_established(self, transport: asyncio.Transport) -> None:
        """The TLS handshake succeeded: the client's bytes travel on `transport` from now on."""

    async def attach_first_server(self) -> None:
        """Get the session's first server connection and attach it; `prepared` follows, then `Login.greet`."""

    def greeted(self) -> tuple[int, int]:
        """The tenant client is being greeted: its BackendKeyData (process id, secret key), minted now."""

    def sign_again(self) -> None: ...

    def _guarded(self, step: Callable[[T], None], argument: T) -> None:
        """Run one step of the session: malformed client input ends it with 08P01, a bug with XX000."""


class Login:
    """The login of one client connection and its token's lifetime (see the module docstring). The
    connection hands it every byte until the greeting (`data_received`), tells it when the connection
    was made (`begin`) and lost (`ended`), and asks it to `greet` once the first server connection of a
    pool is set up."""

    def __init__(self, client: Client, server: ProxyServer, door: Door) -> None:
        self._client = client
        self._server = server
        self._session = client.session
        self._exchange = StartupExchange(door)
        self._transaction_mode = server.settings.pool.mode == "transaction"  # as the connection reads it
        self._counted = Counted.NOT_YET  # in which of the server's counts this connection is
        self._timer: asyncio.TimerHandle | None = None  # the login's deadline, then the token's expiry
        # Every task of this login, until it is done: the TLS handshake, the token's verification, its
        # renewal from the token file. `ended` cancels them, so none outlives the connection.
        self._tasks: set[asyncio.Task[None]] = set()
        self._token: str | None = None  # the password sent, until the session_start audit event names its kid
        self.file_login: FileLogin | None = None  # logged in with `[client] token_file` (proxy.auth.token_file)

    # -- the connection's start and end ------------------------------------------------------------

    def begin(self) -> None:
        """The connection was made: it counts as logging in, refused (53300) past `[client]
        max_unauthenticated_connections`, and its startup packet must come within `[client]
        startup_timeout_seconds` (57P03)."""
        server = self._server
        server.logging_in += 1
        self._counted = Counted.LOGGING_IN
        if server.logging_in > server.settings.client.max_unauthenticated_connections:
            self.refuse(errors.TOO_MANY_CONNECTIONS, "too many connections are logging in",
                        detail="at most [client] max_unauthenticated_connections connections may be logging in at once")
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(server.settings.client.startup_timeout_seconds, self._auth_timed_out)

    def ended(self) -> None:
        """The connection was lost: it leaves the server's counts, and the login's timer and every task of
        it stop (a renewal from the token file included)."""
        self._count(Counted.GONE)
        if self._timer is not None:
            self._timer.cancel()
        for task in self._tasks:
            task.cancel()

    def _start(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run `coroutine` as a task of this login, which `ended` cancels."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count(self, to: Counted) -> None:
        """Move this connection between the server's counts: logging in, logged in (per tenant), gone."""
        server, was, identity = self._server, self._counted, self._client.identity
        if was is to or was is Counted.GONE:
            return
        if was is Counted.LOGGING_IN:
            server.logging_in -= 1
        elif was is Counted.LOGGED_IN and identity is not None:
            server.logged_in -= 1
            tenant = identity.tenant
            server.tenant_clients[tenant] -= 1
            if not server.tenant_clients[tenant]:
                del server.tenant_clients[tenant]
        if to is Counted.LOGGED_IN and identity is not None:
            server.logged_in += 1
            server.tenant_clients[identity.tenant] = server.tenant_clients.get(identity.tenant, 0) + 1
        self._counted = to

    def refuse(self, sqlstate: str, reason: str, detail: str | None = None, hint: str | None = None,
               token: str | None = None) -> None:
        """Refuse a client during startup, with one audit event (the token's facts, never the token)."""
        client = self._client
        request = client.request
        AUDIT.login_refused(client=client.address, user=request.user if request else None, reason=reason,
                            sqlstate=sqlstate, token=token, database=request.database if request else None)
        client.terminate(sqlstate, reason, detail, hint)

    def _setup_failed(self, exc: Exception, token: str | None = None) -> None:
        """Refuse the client for a failure while setting up its session (called in an except block):
        a refused token with its SQLSTATE, an upstream failure with the upstream's, a bug with XX000.
        `token` is the password sent, whose facts (alg, kid, iss, aud) the audit event names."""
        if isinstance(exc, TokenRejected):
            self.refuse(exc.sqlstate, str(exc), token=token)
        elif isinstance(exc, UpstreamError):
            self.refuse(exc.sqlstate, exc.text, exc.detail, exc.hint)
        else:
            log.exception("internal error while setting up the session of client=%s", self._client.address)
            self._client.terminate(errors.INTERNAL_ERROR, "internal error in the proxy while setting up the session")

    def _auth_timed_out(self) -> None:
        self._timer = None
        if self._session.state is State.CANCELLING:
            self._client.terminated()  # a cancel not acted on by now: its connection closes (it has no reply)
        elif self._counted is Counted.LOGGING_IN:
            self.refuse(errors.CANNOT_CONNECT_NOW, "authentication timed out")

    # -- startup -----------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Bytes from a client not greeted yet, or from a console client. Raises ProtocolViolation (08P01)
        for malformed input; the connection's guard ends the session."""
        console = self._client.console
        if console is not None:
            console.data_received(data)
            return
        state, settings = self._session.state, self._server.settings.client
        if state is State.STARTUP:
            packet = self._exchange.startup_packet(data, settings.max_startup_packet)
            if packet is not None:
                self._startup_packet(packet)
        elif state is State.AUTHENTICATING:
            self._password_data(data)
        elif state is not State.CLOSED and state is not State.CANCELLING:  # after a CancelRequest nothing more is read
            self._exchange.hold(data, settings.max_auth_message)

    def _startup_packet(self, packet: messages.StartupPacket) -> None:
        client = self._client
        transport = client.transport
        assert transport is not None
        if isinstance(packet, (messages.SSLRequest, messages.GSSENCRequest)):
            if isinstance(packet, messages.GSSENCRequest):
                transport.write(b"N")
            elif transport.get_extra_info("ssl_object") is not None:  # TLS is established
                raise ProtocolViolation("SSLRequest repeated after TLS was established")
            elif self._server.tls_context is None:
                transport.write(b"N")
            else:
                transport.write(b"S")
                self._session.move(Event.TLS_REQUESTED)
                self._start(self._start_tls())
        elif isinstance(packet, messages.CancelRequest):
            # Open until the cancel was acted on (`ProxyServer.cancel`), as Postgres closes it only once it
            # has signalled the backend; the login's deadline bounds the wait.
            self._session.move(Event.CANCEL_REQUESTED)
            self._server.cancel(packet.process_id, packet.secret_key, client.terminated)
        else:
            self._startup_message(packet)

    async def _start_tls(self) -> None:
        """The TLS handshake the client asked for ("SSL Session Encryption"), on the connection's own
        protocol; a failed one aborts the connection."""
        client, tls_context = self._client, self._server.tls_context
        transport = client.transport
        assert transport is not None and tls_context is not None
        loop = asyncio.get_running_loop()
        try:
            encrypted = await loop.start_tls(transport, transport.get_protocol(), tls_context, server_side=True)
        except (OSError, ConnectionError) as exc:
            log.warning("refused client=%s reason=TLS handshake failed: %s", client.address, exc)
            transport.abort()
            return
        client.tls_established(cast(asyncio.Transport, encrypted))
        self._session.move(Event.TLS_DONE)

    def _startup_message(self, packet: messages.StartupMessage) -> None:
        client, server = self._client, self._server
        transport = client.transport
        assert transport is not None
        refusal = access.check_transport(transport, server.settings)
        if refusal is not None:
            self.refuse(*refusal)
            return
        if self._exchange.door is Door.ADMIN:
            self._admin_socket_login(packet.parameters)
            return
        limit = server.settings.pool.max_client_connections
        if server.logged_in >= limit:
            self.refuse(
                errors.TOO_MANY_CONNECTIONS,
                "sorry, too many clients already",
                detail=f"the proxy accepts at most {limit} client connections ([pool] max_client_connections)",
            )
            return
        try:
            request = client.request = server.policy.evaluate(packet.parameters)
            # Read once, so a session stays in the database it logged in to when a reload changes
            # `[upstream] database`.
            client.database = server.settings.upstream.database or request.database or request.user
        except ParameterRefused as exc:
            self.refuse(exc.sqlstate, str(exc))
            return
        if packet.minor > 0 or request.unrecognized_protocol_options:
            transport.write(messages.negotiate_protocol_version(0, request.unrecognized_protocol_options))
        self._session.move(Event.STARTUP_ACCEPTED)
        if self._timer is not None:  # the startup packet came: the rest of the login has auth_timeout_seconds
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(server.settings.client.auth_timeout_seconds,
                                                            self._auth_timed_out)
        self._exchange.expect_password(server.settings.client.max_auth_message)
        if self._log_in_with_token_file():
            return
        transport.write(messages.authentication(messages.AUTH_CLEARTEXT_PASSWORD))
        pending = self._exchange.take_pending()
        if pending:
            self._password_data(pending)

    def _password_data(self, data: bytes) -> None:
        token = self._exchange.password(data)
        if token is NotAToken.TERMINATE:
            self._client.terminated()
        elif token is NotAToken.MALFORMED:
            self.refuse(errors.INVALID_PASSWORD, "malformed token")
        elif token is not None:
            self._session.move(Event.PASSWORD_RECEIVED)
            self._start(self._establish(token))

    async def _establish(self, token: str) -> None:
        """Verify the token and greet the client. The first client of a database and set of startup
        parameters also gets a server connection now, set up as its session would be, so the
        parameters the server reports are known; later ones get theirs at their first message."""
        client, server = self._client, self._server
        request = client.request
        assert request is not None and client.transport is not None
        self._token = token
        try:
            identity = await server.verifier.verify_async(token)
            if server.console is not None and (request.database or request.user) == admin.ADMIN_DATABASE:
                self._console_login(identity)
                return
            client.identity = identity
            pool = client.pool = server.pools.for_identity(identity)
            per_tenant = server.settings.client.max_connections_per_tenant
            if server.tenant_clients.get(identity.tenant, 0) >= per_tenant:
                self.refuse(errors.TOO_MANY_CONNECTIONS, "too many connections for this tenant",
                            detail=f"a tenant may have at most {per_tenant} client connections"
                            " ([client] max_connections_per_tenant)", token=token)
                return
            requested = request.database or request.user
            if not server.settings.upstream.allowed(requested):
                self.refuse(errors.INVALID_CATALOG_NAME, f'database "{requested}" is not available through this proxy',
                            token=token)
                return
            client.relay = Relay(
                client,
                server.guard,
                server.context,
                identity,
                ClientSettings(request.forwarded, server.policy.protected, server.settings.client.max_settings_bytes),
                self._transaction_mode,
                server.settings.client.max_message,
                server.settings.client.max_prepared_statement_bytes,
                server.statement_budget,
            )
            parameters = pool.known_parameters(client.database, request.forwarded)
            if parameters is None:
                await client.attach_first_server()
                return
        except Exception as exc:
            self._setup_failed(exc, token)
            return
        if self._session.state is not State.CLOSED:
            self._session.move(Event.LOGGED_IN)
            self.greet(parameters)

    def greet(self, parameters: dict[str, str]) -> None:
        """Greet a tenant client ("Message Flow: Start-up"): AuthenticationOk, a ParameterStatus for each
        of `parameters` (name -> value, as the server reports them for the session), BackendKeyData with
        the key minted for it, ReadyForQuery 'I'. Then the token's expiry is timed, and what the client
        sent early goes to its relay."""
        client = self._client
        transport, request, identity, relay = client.transport, client.request, client.identity, client.relay
        assert transport is not None and request is not None and identity is not None and relay is not None
        process_id, secret_key = client.greeted()
        greeting = [messages.authentication(messages.AUTH_OK)]
        greeting += [messages.parameter_status(name, value) for name, value in parameters.items()]
        greeting.append(messages.backend_key_data(process_id, secret_key))
        greeting.append(messages.ready_for_query(b"I"))
        transport.write(b"".join(greeting))
        relay.greeted(parameters)
        self._count(Counted.LOGGED_IN)
        self._expire_at(identity.expires_at)
        AUDIT.session_start(client=client.address, user=request.user, database=client.database, identity=identity,
                            token=self._token, login_role=client.pool.upstream.user)
        self._token = None
        pending = self._exchange.take_pending()
        if pending:
            relay.client_data(pending)

    # -- the admin console ---------------------------------------------------------------------------

    def _admin_socket_login(self, parameters: dict[str, str]) -> None:
        """A client of the admin socket reaches the console without a token, and nothing else."""
        user = parameters.get("user", "")
        database = parameters.get("database") or user
        request = self._client.request = StartupRequest(user=user, database=database)
        self._client.database = database
        if request.database != admin.ADMIN_DATABASE or self._server.console is None:
            self.refuse(errors.INVALID_CATALOG_NAME, f'the admin socket serves only database "{admin.ADMIN_DATABASE}"')
            return
        self._session.move(Event.STARTUP_ACCEPTED)
        self._session.move(Event.PASSWORD_RECEIVED)
        self._open_console(admin.LOCAL_OPERATOR, None)

    def _console_login(self, identity: Identity) -> None:
        """A verified token asks for the console: it enters only with every `[admin] required_claims`, and
        only with a token it sent itself (the token file is the application's identity, not an operator's)."""
        if self.file_login is not None:
            self.refuse(errors.INVALID_AUTHORIZATION, "the admin console does not accept the token file ([client] token_file)",
                        hint="send an admin token as the password, or use [admin] listen_unix")
            return
        required = self._server.settings.admin.required_claims
        refusal = admin.authorize(identity.claims, required)
        if refusal is not None:
            self.refuse(errors.INVALID_AUTHORIZATION, refusal, token=self._token, hint=admin.refusal_hint(required))
            return
        self._open_console(admin.Operator.from_identity(identity), identity.expires_at)

    def _open_console(self, operator: admin.Operator, expires_at: int | None) -> None:
        """Greet a console client; it counts in no tenant's connections and ends when its token expires."""
        client, console = self._client, self._server.console
        assert client.transport is not None and client.request is not None and console is not None
        self._token = None
        session = client.console = admin.ConsoleSession(console, operator, client.address, client.request.user,
                                                        client.send_client, client.terminated,
                                                        self._server.settings.client.max_auth_message)
        self._session.move(Event.LOGGED_IN)
        self._count(Counted.LOGGED_IN)
        if expires_at is not None:
            self._expire_at(expires_at)
        elif self._timer is not None:
            self._timer.cancel()
            self._timer = None
        client.send_client(session.greeting())
        pending = self._exchange.take_pending()
        if pending:
            client._guarded(session.data_received, pending)

    # -- the token's lifetime: expiry, and [client] token_file (proxy.auth.token_file) ---------------

    def _expire_at(self, expires_at: int) -> None:
        """Replace the login's timer with one at the token's expiry (seconds since the epoch)."""
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + expires_at - time.time(), self._token_expired)

    def _token_expired(self) -> None:
        self._timer = None
        if self.file_login is not None:
            self._start(self._renew_at_expiry())
            return
        client = self._client
        log.info("token expired client=%s tenant=%s", client.address, client.identity.tenant if client.identity else "-")
        client.terminate(errors.INVALID_PASSWORD, "token expired", hint="reconnect with a fresh token")

    def _log_in_with_token_file(self) -> bool:
        """A local client, with `[client] token_file` set, is asked for no password: the file's token is
        verified as if it had sent it. False when the client must send its own token."""
        source = self._server.token_file
        transport = self._client.transport
        assert transport is not None
        if source is None or not uses_token_file(transport, self._server.settings.client.token_file_networks):
            return False
        self._session.move(Event.PASSWORD_RECEIVED)
        self.file_login = FileLogin(source)
        try:
            token = self.file_login.first_token(time.time())
        except TokenFileUnreadable as exc:
            self.refuse(exc.sqlstate, str(exc), hint="the platform writes [client] token_file; try again later")
            return True
        self._start(self._establish(token))
        return True

    def renew_at_boundary(self) -> None:
        """A transaction ended, in a session logged in with the token file (`file_login` is set): go on
        with the file's newer token, if it holds one; a refused one ends the session with its SQLSTATE
        (28000 for another tenant)."""
        client = self._client
        assert self.file_login is not None and client.identity is not None
        try:
            identity = self.file_login.at_boundary(self._server.verifier, client.identity, time.time())
        except TokenRejected as exc:
            log.warning("session ended client=%s tenant=%s: %s", client.address, client.identity.tenant, exc)
            client.terminate(exc.sqlstate, str(exc))
            return
        if identity is not None:
            self._take_identity(identity)

    async def _renew_at_expiry(self) -> None:
        """The token expired: go on with the token file's newer token, or end the session."""
        client = self._client
        assert self.file_login is not None and client.identity is not None
        try:
            identity = await self.file_login.at_expiry(self._server.verifier, client.identity, time.time())
        except TokenRejected as exc:
            log.info("token expired client=%s tenant=%s and the token file gave no newer token: %s",
                     client.address, client.identity.tenant, exc)
            client.terminate(exc.sqlstate, str(exc), hint="the token file ([client] token_file) held no newer valid token"
                             " for this tenant when the session's token expired; reconnect")
            return
        except Exception:
            log.exception("internal error while renewing the token of client=%s", client.address)
            client.terminate(errors.INTERNAL_ERROR, "internal error in the proxy")
            return
        client._guarded(self._take_identity, identity)

    def _take_identity(self, identity: Identity) -> None:
        """Go on with the token file's newer token (same tenant): the next transaction carries its
        expiry and claims; in session mode the context is set again now when the server connection is
        idle, else right after the client's next group (and again after a rollback that could undo it)."""
        client = self._client
        relay = client.relay
        if relay is None or self._session.state is State.CLOSED or not self._same_login_role(identity):
            return
        client.identity = relay.identity = identity
        log.info("token renewed from the token file client=%s tenant=%s", client.address, identity.tenant)
        client.sign_again()  # the new identity's context, signed
        self._expire_at(identity.expires_at)

    def _same_login_role(self, identity: Identity) -> bool:
        """Whether a renewed identity maps to the login role ([roles]) the session runs as; if not, the
        session ends (28000): its server connections are that role's, and a session never changes role."""
        client = self._client
        try:
            same = self._server.pools.for_identity(identity) is client.pool
        except TokenRejected as exc:  # RoleRefused: the renewed token's role is not mapped at all
            client.terminate(exc.sqlstate, str(exc))
            return False
        if not same:
            log.warning("session ended client=%s tenant=%s: the token file names another role", client.address,
                        identity.tenant)
            client.terminate(errors.INVALID_AUTHORIZATION, "the token file now names another database role; a session "
                             "never changes its login role: reconnect")
        return same
