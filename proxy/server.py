"""The listener: shared state of one proxy process, and serving until a signal stops it.

ProxyServer holds what all client connections share (settings, token verifier, context builder,
parameter policy, pool, TLS context) and the table of minted BackendKeyData used to route
CancelRequests to the right server connection.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
import secrets
import signal
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from proxy.admin import Console
from proxy.auth.token_file import TokenFile
from proxy.backend import BackendConnection, Lifecycle, send_cancel
from proxy.cancels import Abandoned, AbandonedStatements
from proxy import logs
from proxy.client import ClientConnection
from proxy.config import ConfigError, Settings, load
from proxy.guard import Guard
from proxy.http import Readiness, ServerLifecycle, start_endpoint
from proxy.lifecycle import (
    SHUTDOWN_MESSAGE, Shutdown, Stop, connection_changed, keep_restart_only, restart_needed,
)
from proxy.login import Door
from proxy.listeners import Listeners, bind_listeners, listen_error
from proxy.logs import AUDIT
from proxy.metrics import METRICS, Gauges
from proxy.parameters import ParameterPolicy, ProtectedSettings
from proxy.relay.statements import StatementBudget
from proxy.pool import SessionPool, TransactionPool
from proxy.roles import LoginPools
from proxy.protocol import errors, messages
from proxy.tenant import ContextBuilder
from proxy.tokens import TokenVerifier

log = logging.getLogger("pg_tenant_proxy")


def server_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context offered to clients, when a certificate is configured and `[tls] client_sslmode`
    is not "disable". With `client_ca_file` the proxy asks for a client certificate and verifies one
    that is sent (CERT_OPTIONAL); `proxy.access.check_transport` refuses a login without one under
    "verify-ca" with an ErrorResponse, which a failed handshake could not send."""
    tls = settings.tls
    if not tls.cert_file or not tls.key_file or tls.client_sslmode == "disable":
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file:
        context.load_verify_locations(cafile=tls.client_ca_file)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


SessionParts = tuple[TokenVerifier, ParameterPolicy, Guard | None, ssl.SSLContext | None]


def session_parts(settings: Settings, protected: ProtectedSettings) -> SessionParts:
    """What new sessions are built from and a reload replaces: the token verifier, the startup
    parameter policy, the SQL guard (None when off) and the TLS context offered to clients."""
    policy = ParameterPolicy(settings.client.allowed_parameters, protected)
    transaction_mode = settings.pool.mode == "transaction"
    guard = Guard.from_settings(settings.guard, protected, transaction_mode) if settings.guard.enabled else None
    return TokenVerifier(settings.jwt), policy, guard, server_tls_context(settings)


def protected_settings(settings: Settings) -> ProtectedSettings:
    """The settings no client may write: the tenant context's four and `[guard] protected_prefixes`."""
    tenant = settings.tenant
    return ProtectedSettings(
        [tenant.setting, tenant.proof_setting, tenant.claims_setting, tenant.claims_proof_setting],
        settings.guard.protected_prefixes,
    )


@dataclass(frozen=True)
class Worker:
    """This process's place among `workers` processes sharing the listen port (SO_REUSEPORT).

    Each worker mints BackendKeyData whose process id is its index modulo the count, and listens on a
    private Unix socket in `peer_dir`, so a CancelRequest that lands on another worker is passed on.
    """

    index: int
    count: int
    peer_dir: str

    def socket_path(self, index: int) -> str:
        return os.path.join(self.peer_dir, f"worker-{index}.sock")


class ProxyServer:
    """State shared by the client connections of one proxy process."""

    def __init__(self, settings: Settings, worker: Worker | None = None,
                 load_settings: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self.worker = worker
        self.verifier = TokenVerifier(settings.jwt)
        self.token_file = TokenFile(settings.client.token_file) if settings.client.token_file else None
        # How a reload reads the configuration again (`run` passes its own, with its --listen flag).
        self.load_settings = load_settings or (lambda: load(None if settings.source == "<environment>" else settings.source))
        tenant = settings.tenant
        self.context = ContextBuilder(tenant.setting, tenant.proof_setting, tenant.signing_key, tenant.claims_setting,
                                      tenant.claims_proof_setting)
        self.verifier, self.policy, self.guard, self.tls_context = session_parts(settings, protected_settings(settings))
        transaction_mode = settings.pool.mode == "transaction"
        self.pool: SessionPool | TransactionPool = (
            TransactionPool(settings.upstream, settings.pool) if transaction_mode else SessionPool(settings.upstream, settings.pool)
        )
        self.pools = LoginPools(self.pool, settings.roles, settings.pool)  # [roles]: one pool per login role
        self.tls_context = server_tls_context(settings)
        self.readiness = Readiness()
        self._drained: asyncio.Event | None = None  # set when the last client leaves during a drain
        self.clients: set[ClientConnection] = set()
        self.logging_in = 0  # connections not greeted yet (counted apart: [client] max_unauthenticated_connections)
        self.logged_in = 0  # greeted clients ([pool] max_client_connections)
        self.tenant_clients: dict[str, int] = {}  # greeted clients per tenant ([client] max_connections_per_tenant)
        self.statement_budget = StatementBudget(settings.client.max_total_prepared_statement_bytes)
        self._keys: dict[int, ClientConnection] = {}
        self._abandoned = AbandonedStatements()  # keys of sessions that ended mid-statement (proxy.cancels)
        # Per client, the `done` of each CancelRequest for it that the relay has neither sent nor dropped yet.
        self._cancels_waiting: dict[ClientConnection, list[Callable[[], None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._client_ids = itertools.count(1)
        self.console = Console(self) if settings.admin.enabled else None  # the admin console, when [admin] is set

    def gauges(self) -> Gauges:
        """The gauges of /metrics, read at scrape time: clients by session state; server connections by
        database and lifecycle (those held by clients by their own, the pool's idle ones "idle", the
        rest of the open ones "login": being opened, authenticated or reset); clients waiting in the
        pool's queue by database."""
        gauges = Gauges()
        open_, idle, gauges.waiting = self.pools.counts()
        for database, count in idle.items():
            gauges.servers[(database, Lifecycle.IDLE.value)] = count
        held: dict[str, int] = {}
        for client in list(self.clients):
            state = client.session.state.value
            gauges.clients[state] = gauges.clients.get(state, 0) + 1
            backend = client.backend
            if backend is not None and client.request is not None:
                key = (client.database, backend.lifecycle.value)
                gauges.servers[key] = gauges.servers.get(key, 0) + 1
                held[client.database] = held.get(client.database, 0) + 1
        for database, count in open_.items():
            rest = count - idle.get(database, 0) - held.get(database, 0)
            if rest > 0:
                key = (database, Lifecycle.LOGIN.value)
                gauges.servers[key] = gauges.servers.get(key, 0) + rest
        return gauges

    def connection(self) -> ClientConnection:
        client = ClientConnection(self)
        self.clients.add(client)
        return client

    def admin_connection(self) -> ClientConnection:
        """A client of the `[admin] listen_unix` socket: the console only, without a token."""
        client = ClientConnection(self, Door.ADMIN)
        self.clients.add(client)
        return client

    def peer_connection(self) -> ClientConnection:
        """A connection to this worker's private socket: another worker passing on a CancelRequest."""
        client = ClientConnection(self, Door.PEERS)
        self.clients.add(client)
        return client

    def next_client_id(self) -> int:
        """The id SHOW CLIENTS shows and KILL CLIENT takes: 1, 2, ... in this process."""
        return next(self._client_ids)

    def register(self, client: ClientConnection) -> tuple[int, int]:
        """Mint a random BackendKeyData for a client (never the server's own)."""
        count, index = (self.worker.count, self.worker.index) if self.worker else (1, 0)
        while True:
            process_id = (secrets.randbelow(2**31 // count - 1) + 1) * count + index
            if process_id not in self._keys:
                break
        self._keys[process_id] = client
        return process_id, secrets.randbits(32) - 2**31

    def forget(self, client: ClientConnection) -> None:
        self.clients.discard(client)
        if self.console is not None and client.process_id:
            self.console.session_ended(client)
        if self._keys.get(client.process_id) is client:
            del self._keys[client.process_id]
        self.cancel_settled(client)  # a session that ended has nothing left to cancel
        if self._drained is not None and not self.clients:
            self._drained.set()

    def cancel(self, process_id: int, secret_key: int, done: Callable[[], None]) -> None:
        """A CancelRequest with a matching minted key goes to that client (`ClientConnection.cancel`), or
        to the worker that minted the key. `done` is called once the cancel was acted on: the upstream
        server closed the connection that carried it (after signalling the backend), or there was
        nothing to cancel. Only then is the CancelRequest's connection closed, as Postgres closes it:
        a client that waits for that (libpq's PQcancel does) sends its next statement only when the
        cancel can no longer land on it. Postgres 15 signals the backend twice (`kill(pid)`, then its
        process group); closed earlier, the second signal could cancel the client's next statement."""
        worker = self.worker
        if worker is not None and process_id % worker.count != worker.index:
            self._spawn(self._pass_cancel(worker.socket_path(process_id % worker.count), process_id, secret_key, done))
            return
        client = self._keys.get(process_id)
        if client is not None and hmac.compare_digest(
            client.secret_key.to_bytes(4, "big", signed=True), secret_key.to_bytes(4, "big", signed=True)
        ):
            self._cancels_waiting.setdefault(client, []).append(done)
            client.cancel()
            return
        abandoned = self._abandoned.find(process_id, secret_key, asyncio.get_running_loop().time())
        if abandoned is None:
            log.info("cancel ignored: no session matches the key")
            done()
            return
        self._spawn(self._cancel_abandoned(abandoned, done))

    def statement_abandoned(self, client: ClientConnection, backend: BackendConnection) -> None:
        """`client`'s session ended while `backend`, which is closing, ran a request of the client's: for a
        while a CancelRequest with the client's key still cancels it there (`proxy.cancels`)."""
        self._abandoned.remember(client.process_id, client.secret_key, backend.process_id, backend.secret_key,
                                 asyncio.get_running_loop().time())

    def send_cancel(self, backend: BackendConnection, client: ClientConnection) -> None:
        """Send a CancelRequest for what `backend` runs (`client`'s cancel, passed on by its relay); the
        CancelRequests waiting for it are done when the server has acted on it."""
        # Counted now, not when the task starts: a ReadyForQuery read in between would otherwise release
        # the connection to another client, whose statement the cancel would then hit.
        backend.cancels_in_flight += 1
        self._spawn(self._send_cancel(backend, self._cancels_waiting.pop(client, [])))

    def cancel_settled(self, client: ClientConnection) -> None:
        """The CancelRequests waiting for `client` are done: its relay found nothing to cancel, or the
        session ended."""
        for done in self._cancels_waiting.pop(client, []):
            done()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pass_cancel(self, path: str, process_id: int, secret_key: int, done: Callable[[], None]) -> None:
        """Hand a CancelRequest to the worker that minted its key, and call `done` when that worker has
        closed the connection (it has acted on the cancel), at the latest after `[client]
        startup_timeout_seconds` (the longest that worker keeps it open)."""
        try:
            async with asyncio.timeout(self.settings.client.startup_timeout_seconds):
                reader, writer = await asyncio.open_unix_connection(path)
                try:
                    writer.write(messages.cancel_request(process_id, secret_key))
                    await writer.drain()
                    await reader.read()
                finally:
                    writer.close()
        except TimeoutError:
            log.warning("cancel passed to worker socket %s not acted on in time", path)
        except OSError as exc:
            log.warning("cancel could not reach worker socket %s: %s", path, exc)
        finally:
            done()

    async def _send_cancel(self, backend: BackendConnection, waiting: list[Callable[[], None]]) -> None:
        """Cancel what `backend` runs (the caller counted it in `cancels_in_flight`); until the server has
        acted on it the connection is not reused (`BackendConnection.reusable`): the pool closes it rather
        than give a late cancel to another client. Then the CancelRequests `waiting` for it are done."""
        try:
            await self._deliver_cancel(backend.process_id, backend.secret_key)
        finally:
            backend.cancels_in_flight -= 1
            for done in waiting:
                done()

    def cancel_backend(self, backend: BackendConnection) -> None:
        """Cancel what `backend`, which is closing, runs for a session the proxy itself ended."""
        self._spawn(self._deliver_cancel(backend.process_id, backend.secret_key))

    async def _cancel_abandoned(self, abandoned: Abandoned, done: Callable[[], None]) -> None:
        """Cancel what the backend of a session that ended mid-statement runs; then the CancelRequest is done."""
        try:
            await self._deliver_cancel(abandoned.process_id, abandoned.secret_key)
        finally:
            done()

    async def _deliver_cancel(self, process_id: int, secret_key: int) -> None:
        """A CancelRequest for an upstream backend, acted on by the server when this returns (a failure to
        reach the server is logged)."""
        try:
            await send_cancel(self.settings.upstream, process_id, secret_key)
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("cancel could not reach the upstream server: %s", exc)

    def shutdown(self) -> None:
        """Close every client connection with 57P01, as a server shutting down does."""
        for client in list(self.clients):
            client.terminate(errors.ADMIN_SHUTDOWN, SHUTDOWN_MESSAGE)

    # -- lifecycle: drain (SIGTERM) and reload (SIGHUP) --------------------------------------------

    async def drain(self, timeout: float, interrupted: asyncio.Event) -> None:
        """SIGTERM: /readyz answers 503 from now; each client ends at its next idle point with 57P01
        (those at one now, at once; the others at their next ReadyForQuery 'I', see
        `ClientConnection.drain_point`). Returns when none is left, after `timeout` seconds, or when
        `interrupted` is set (SIGINT); the caller closes the rest."""
        self.readiness.draining = True
        self._drained = asyncio.Event()
        for client in list(self.clients):
            client.drain_point()
        if not self.clients:
            return
        log.info("draining: waiting up to %g s for %d client(s) to finish their transactions", timeout, len(self.clients))
        waits = [asyncio.ensure_future(self._drained.wait()), asyncio.ensure_future(interrupted.wait())]
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        if self.clients:
            log.warning("drain ended with %d client(s) left: closing them", len(self.clients))

    def reload(self) -> bool:
        """SIGHUP (and the admin console's RELOAD): read the configuration and every file it names again,
        checked as `run` checks it. On success new sessions use the new values and live ones go on (see
        `_apply`); keys that need a restart keep their running values and are named in the audit event.
        On failure the running configuration stays and the event says why. Never raises; returns whether
        the new configuration is in force. Counted in pgtp_config_reloads_total{result}."""
        try:
            loaded = self.load_settings()
            settings = keep_restart_only(self.settings, loaded)
            parts = session_parts(settings, protected_settings(settings))
            restart = restart_needed(self.settings, loaded)
            self._apply(settings, parts)
        except ConfigError as exc:
            AUDIT.reload(result="error", reason="; ".join(exc.problems))
            return False
        except Exception as exc:  # a bug or an unreadable file must not take the proxy down
            log.exception("reload failed")
            AUDIT.reload(result="error", reason=f"internal error while reloading: {type(exc).__name__}")
            return False
        AUDIT.reload(result="ok", restart_needed=restart)
        return True

    def _follow_admin(self, settings: Settings) -> None:
        """[admin] on reload: `required_claims` that turn the console on create it (its `SHOW TENANTS`
        totals start then), and its ledger keeps the new `max_tenants`. `[admin] listen_unix` needs a
        restart, like every listener."""
        if self.console is None and settings.admin.enabled:
            self.console = Console(self)
        elif self.console is not None:
            self.console.ledger.max_tenants = settings.admin.max_tenants

    def _apply(self, settings: Settings, parts: SessionParts) -> None:
        """Put a checked configuration in force. The pool takes its new limits in place; when the
        upstream connection settings changed, idle server connections close and ones in use close when
        they come back. A new signing key signs every context from now on; live session-mode sessions
        sign theirs again at once or after their current group."""
        running = self.settings
        self.settings = settings
        self.verifier, self.policy, self.guard, self.tls_context = parts
        self.statement_budget.limit = settings.client.max_total_prepared_statement_bytes
        retire = connection_changed(running.upstream, settings.upstream)
        self.pool.reconfigure(settings.upstream, settings.pool, retire)
        for pool in self.pools.by_role.values():  # [roles] needs a restart; their sizes follow
            pool.reconfigure(pool.upstream, settings.pool, False)
        self._follow_admin(settings)
        if settings.client.token_file != running.client.token_file:
            self.token_file = TokenFile(settings.client.token_file) if settings.client.token_file else None
        rotated = settings.tenant.signing_key != running.tenant.signing_key
        if rotated:
            self.context.rotate(settings.tenant.signing_key)
        for client in list(self.clients):
            if retire and client.backend is not None and client.pool is self.pool:
                self.pool.retire(client.backend)
            if rotated:
                client.sign_again()
        logs.setup(settings.log_level, settings.log_format)
        METRICS.tenant_metrics = settings.http.tenant_metrics
        METRICS.max_tenant_series = settings.http.max_tenant_series


def take_held_sighup() -> bool:
    """For a worker, which holds SIGHUP blocked from its fork until `serve` has installed the event loop's
    handler (see `proxy.workers`): whether one came meanwhile, taken off the pending signals so that the
    caller reloads once for it; then SIGHUP is unblocked, for the loop's handler.

    Blocked rather than caught by a Python handler until then: uvloop sets the signal wakeup fd as its
    loop starts, so a signal caught between then and `add_signal_handler` also left a byte on the loop's
    self-pipe, which the loop's handler took for a second SIGHUP (two reloads and two audit events for
    one signal). A blocked signal runs no handler and writes nothing until `sigwait` takes it here."""
    came = signal.SIGHUP in signal.sigpending()
    if came:
        signal.sigwait({signal.SIGHUP})  # pending, so it returns at once
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    return came


async def serve(settings: Settings, worker: Worker | None = None, listeners: Listeners | None = None,
                load_settings: Callable[[], Settings] | None = None) -> None:
    """Listen and serve until SIGINT (stop at once) or SIGTERM (drain, see `ProxyServer.drain`); SIGHUP
    reloads the configuration (`ProxyServer.reload`, reading it with `load_settings`).

    `listeners` are the Unix and HTTP sockets bound by `run` before forking (bound here when None);
    raises ListenError when an address cannot be used."""
    loop = asyncio.get_running_loop()
    own = listeners is None
    sockets = bind_listeners(settings) if listeners is None else listeners
    proxy = ProxyServer(settings, worker, load_settings)
    readiness = proxy.readiness
    # Reload on SIGHUP before listening: a connection accepted while the next awaits run must not be
    # checked against a configuration (an old JWT secret) that a signal already replaced.
    loop.add_signal_handler(signal.SIGHUP, proxy.reload)
    if worker is not None and take_held_sighup():  # a worker signalled before it served: reload now, once
        proxy.reload()
    try:
        listener = await loop.create_server(
            proxy.connection, settings.listen_host, settings.listen_port, reuse_address=True, backlog=1024,
            reuse_port=worker is not None,
        )
    except OSError as exc:
        if own:
            sockets.close()
        raise listen_error("listen", f"{settings.listen_host}:{settings.listen_port}", exc) from None
    # Keep references: a server object that is garbage-collected stops listening.
    servers: list[asyncio.AbstractServer] = [listener]
    if sockets.unix is not None:
        servers.append(await loop.create_unix_server(proxy.connection, sock=sockets.unix))
    if sockets.admin is not None:
        servers.append(await loop.create_unix_server(proxy.admin_connection, sock=sockets.admin))
    accepting = list(servers)  # closed first when draining; the rest serve cancels and /readyz until the end
    if worker is not None:
        servers.append(await loop.create_unix_server(proxy.peer_connection, worker.socket_path(worker.index)))
    checks = await start_endpoint(settings, proxy, readiness, sockets.http, worker, servers)
    shutdown = Shutdown()
    loop.add_signal_handler(signal.SIGINT, shutdown.request, Stop.IMMEDIATE)
    loop.add_signal_handler(signal.SIGTERM, shutdown.request, Stop.DRAIN)
    readiness.lifecycle = ServerLifecycle.SERVING
    log.info(
        "%slistening on %s:%d%s upstream=%s:%d pool=%s size=%d tls=%s http=%s",
        f"worker {worker.index}/{worker.count} " if worker else "",
        settings.listen_host,
        settings.listen_port,
        f" and {settings.unix_socket_path}" if settings.unix_socket_path else "",
        settings.upstream.host,
        settings.upstream.port,
        settings.pool.mode,
        settings.pool.size,
        settings.tls.client_sslmode if proxy.tls_context else "off",
        settings.http.listen or "off",
    )
    await shutdown.requested.wait()
    log.info("shutting down (%s)", "SIGINT: at once" if shutdown.stop is Stop.IMMEDIATE else "SIGTERM: draining")
    readiness.draining = True
    for server in accepting:
        server.close()
    if shutdown.stop is Stop.DRAIN:
        await proxy.drain(proxy.settings.shutdown_timeout, shutdown.immediate)
    if checks is not None:
        checks.cancel()
    for server in servers:
        server.close()
    proxy.shutdown()
    await listener.wait_closed()
    if own:
        sockets.close()
