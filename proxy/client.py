"""The client side: asyncio glue for one client connection, from the first byte to the last.

It owns the client's transport and the checkout tasks. The login, from the first packet (TLS
included) to the greeting and the token's lifetime after it, is `proxy.login.Login`'s; this class implements the hooks it
needs (`proxy.login.Client`). Once the client is greeted it feeds everything else to the sans-IO core:
the session's state (`proxy.relay.session`), which only moves by its table, and the relay
(`proxy.relay.relay`), whose hooks this class implements. It never reads the server
connection's bookkeeping: it hands the server's bytes to the relay and writes what the relay says.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar, cast

from proxy import admin
from proxy.backend import BackendConnection, UpstreamError
from proxy.guard import Refusal
from proxy.http import ServerLifecycle
from proxy.lifecycle import SHUTDOWN_MESSAGE, at_idle_point
from proxy.login import Door, Login
from proxy.logs import AUDIT
from proxy.metrics import METRICS
from proxy.parameters import StartupRequest
from proxy.protocol import errors, messages
from proxy.protocol.errors import ProtocolViolation, UpstreamProtocolViolation
from proxy.relay.flow import FlowControl, Reason
from proxy.relay.relay import Relay, SessionMode
from proxy.relay.session import Event, IllegalMove, SessionState, State
from proxy.sockets import tune
from proxy.tokens import Identity

if TYPE_CHECKING:
    from proxy.config import PoolSettings
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


class ClientConnection(asyncio.Protocol):
    """One client connection (see the module docstring)."""

    def __init__(self, server: ProxyServer, door: Door = Door.CLIENTS) -> None:
        self.server = server
        self.id = server.next_client_id()  # SHOW CLIENTS / KILL CLIENT on the admin console
        self.console: admin.ConsoleSession | None = None
        self.connected_at = time.time()
        self.transactions = 0
        self.transport: asyncio.Transport | None = None
        self.session = SessionState()
        self.address = "?"
        self.request: StartupRequest | None = None
        # The upstream database the session uses, set by the login once the StartupMessage is read. A plain
        # attribute, not a cached_property: one writes into the instance's __dict__, and on Python 3.11 an
        # instance whose __dict__ was made that way loses the interpreter's specialised attribute access
        # (about 9% more instructions per transaction, bench/PROFILE.md).
        self.database = ""
        self.identity: Identity | None = None
        self.relay: Relay | None = None
        self.backend: BackendConnection | None = None
        self.flow = FlowControl()
        self.process_id = 0
        self.secret_key = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._started = time.monotonic()
        self._transaction_mode = server.settings.pool.mode == "transaction"
        self._task: asyncio.Task[None] | None = None  # checking out a server connection
        self._waiter: Waiter[Handover] | None = None  # a place in the pool's queue
        self._greeted = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._message_timer: asyncio.TimerHandle | None = None
        self._waiting_since: float | None = None  # loop time need_server() was called, for the checkout wait
        self.pool: SessionPool | TransactionPool = server.pool  # the login role's pool, chosen at login ([roles])
        self._login = Login(self, server, door)  # the login, and the token's lifetime after it

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.flow.client.transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        peer = transport.get_extra_info("peername")
        self.address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer) or "unix"  # PgBouncer's addr
        tune(transport.get_extra_info("socket"), self.server.settings.tcp)
        self._login.begin()

    def data_received(self, data: bytes) -> None:
        size = len(data)
        self.bytes_in += size
        METRICS.bytes_received += size
        relay = self.relay
        if relay is None or not self._greeted:
            self._guarded(self._login.data_received, data)
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        try:  # _guarded, inlined on the hot path
            whole = relay.client_data(data)
        except Exception as exc:
            self._step_failed(exc)
            whole = False
        if self._message_timer is not None or not whole:
            self._watch_partial_message(relay)
        pool = self.server.settings.pool
        if (pool.idle_transaction_timeout or pool.client_idle_timeout) and self._idle_timer is None:
            self._time_idleness(relay, pool)  # after replies the proxy gave itself (DEALLOCATE, a skipped Sync)

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
                       detail="the proxy's [pool] idle_transaction_timeout", routine=errors.INTERRUPTS)

    def _time_idleness(self, relay: Relay, pool: PoolSettings) -> None:
        """After the server's replies: time the client's silence inside a transaction block holding a server
        connection (`idle_transaction_timeout`), or between transactions (`client_idle_timeout`). The
        client's next bytes cancel it (`data_received`)."""
        if pool.idle_transaction_timeout and relay.queue is not None and relay.idle_in_transaction():
            self._idle_timer = asyncio.get_running_loop().call_later(pool.idle_transaction_timeout,
                                                                     self._idle_transaction_timed_out)
        elif pool.client_idle_timeout and relay.idle_between_transactions():
            self._idle_timer = asyncio.get_running_loop().call_later(pool.client_idle_timeout, self._client_idle_timed_out)

    def _client_idle_timed_out(self) -> None:
        self._idle_timer = None
        self.terminate(errors.IDLE_SESSION_TIMEOUT, "terminating connection due to idle-session timeout",
                       detail="the proxy's [pool] client_idle_timeout", routine=errors.INTERRUPTS)

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
            self.terminate(errors.PROTOCOL_VIOLATION, str(exc), routine=exc.routine)
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
        self._login.ended()
        for timer in (self._idle_timer, self._message_timer):
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
        pool = self.server.settings.pool
        if (pool.idle_transaction_timeout or pool.client_idle_timeout) and self._idle_timer is None:
            self._time_idleness(relay, pool)

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
            self._login.greet(parameters)
            pool = self.server.settings.pool
            if pool.client_idle_timeout and self._idle_timer is None and self.relay is not None:
                self._time_idleness(self.relay, pool)  # greeted and silent: idle from now on

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
        if self._login.file_login is not None and self.session.state is not State.CLOSED:
            self._login.renew_at_boundary()
        if self.server.readiness.lifecycle is _DRAINING:  # Readiness.draining, without its property call per transaction
            self.drain_point()

    def cancel_server(self) -> None:
        """The relay passes the client's cancel on to the server connection it holds."""
        if self.backend is None:
            self.server.cancel_settled(self)
        else:
            self.server.send_cancel(self.backend, self)

    def cancel_dropped(self) -> None:
        """The relay found nothing outstanding to cancel: nothing is sent, and the CancelRequests waiting
        for this session are done (their connections close)."""
        self.server.cancel_settled(self)

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
        statement still waits for a connection in transaction mode. Either way the relay says when it
        was sent (`cancel_server`) or found nothing to cancel (`cancel_dropped`)."""
        if self.relay is not None and self.session.state is not _CLOSED:
            self._guarded(Relay.cancel_requested, self.relay)
        elif self.backend is not None and self.backend.runs_client_request():
            # The session just ended (the client's Terminate was read, or the proxy ended it) and the close
            # is not through yet (connection_lost, which makes the key cancel its statement later, runs
            # on a later turn of the loop): the statement still runs there, as directly it would.
            self.server.send_cancel(self.backend, self)
        else:
            self.cancel_dropped()

    # -- ending ----------------------------------------------------------------------------------

    def terminate(self, sqlstate: str, text: str, detail: str | None = None, hint: str | None = None,
                  routine: str | None = None) -> None:
        """Send a FATAL ErrorResponse (when it cannot land inside a server message) and close; `routine`:
        the Postgres function whose FATAL this imitates (messages.error_response)."""
        if self.session.state is State.CLOSED or self.transport is None:
            return
        relay = self.relay
        backend = self.backend
        if relay is None or backend is None or backend.queue.scanner.at_boundary():
            self.transport.write(messages.error_response("FATAL", sqlstate, text, detail, hint, routine))
        if backend is not None and backend.runs_client_request():
            # The proxy ends the session mid-statement (token expired, a timeout, KILL): closing the server
            # connection alone leaves the statement running until Postgres next writes (a pg_sleep, a lock
            # wait, rows it still sends: for as long as it takes), and no client is left to cancel it.
            self.server.cancel_backend(backend)
        self._end()

    def server_ended(self) -> None:
        """The server's FATAL reached the client (the relay passed it on): its last word, after which a direct
        session is over. The session ends with nothing of the proxy's after it (no 08006 when the server
        then closes), and the server connection, closing, serves nobody again."""
        if self.session.state is not State.CLOSED and self.transport is not None:
            self._end()

    def _end(self) -> None:
        self._give_back_server(reuse=False)
        self.session.move(Event.CLOSED)
        assert self.transport is not None
        self.transport.close()

    def _give_back_server(self, reuse: bool = True) -> None:
        """Stop relaying and give up the server connection. It serves again only when `reuse` and both
        sides stopped between whole messages and groups; the pool checks the server is idle too."""
        backend, self.backend = self.backend, None
        if backend is None:
            return
        if backend.runs_client_request():
            self.server.statement_abandoned(self, backend)  # a CancelRequest sent after the session still reaches it
        self.flow.detach_server()
        relay = self.relay
        if relay is not None:
            relay.detach()
        if reuse and relay is not None and not relay.mid_group and relay.scanner.at_boundary() and not relay.preparing:
            self.pool.release(backend)
        else:
            backend.detach()
            backend.close()

    # -- the login's hooks (proxy.login.Client) ---------------------------------------------------

    def tls_established(self, transport: asyncio.Transport) -> None:
        """The login's TLS handshake succeeded: the client's bytes travel on `transport` from now on."""
        self.transport = transport
        self.flow.client.transport = transport

    async def attach_first_server(self) -> None:
        """The first client of a database and set of startup parameters: its server connection is
        checked out at login and set up as its session would be; `prepared` greets it."""
        backend = await self._acquire()
        if self.session.state is State.CLOSED:  # the session ended meanwhile: as in `_checkout_task`
            self.pool.release(backend)
            return
        self._guarded(self._attach_at_login, backend)

    def greeted(self) -> tuple[int, int]:
        """The login greets this tenant client now: its BackendKeyData (process id, secret key) is minted."""
        self.process_id, self.secret_key = self.server.register(self)
        self._greeted = True
        return self.process_id, self.secret_key

    # -- the admin console ---------------------------------------------------------------------

    @property
    def waiting_since(self) -> float | None:
        """Loop time this client began waiting for a server connection, while it waits."""
        return self._waiting_since

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
            self._checkout_failed(exc)
            return
        if self.session.state is State.CLOSED:
            self.pool.release(backend)
            return
        self._guarded(self._attach_checked_out, backend)

    def _attach_checked_out(self, backend: BackendConnection) -> None:
        self._attach(backend, Event.SERVER_TAKEN if self._transaction_mode else Event.SERVER_GRANTED)

    def _checkout_failed(self, exc: Exception) -> None:
        """No server connection for the logged-in client (`_checkout`): an upstream failure (53300 after
        `checkout_timeout`, 57P03 while paused, the upstream refusing a new connection) ends the session with
        its SQLSTATE and a `checkout_failed` audit event, not a login refusal (the login succeeded); any
        other exception is a bug (XX000)."""
        if self.session.state is _CLOSED:
            return
        if not isinstance(exc, UpstreamError):
            log.error("internal error while checking out a server connection for client=%s", self.address, exc_info=exc)
            self.terminate(errors.INTERNAL_ERROR, "internal error in the proxy")
            return
        AUDIT.checkout_failed(client=self.address, user=self.request.user if self.request else None,
                              database=self.database, identity=self.identity, reason=exc.text, sqlstate=exc.sqlstate)
        self.terminate(exc.sqlstate, exc.text, exc.detail, exc.hint)

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
            self._checkout_failed(result)
            return
        pool = cast("TransactionPool", self.pool)
        if self.session.state is not State.WAITING:
            if result is not None:
                pool.hand_back(result)
            return
        self._guarded(lambda _: self._checkout(), None)  # None: a slot was freed; look again
