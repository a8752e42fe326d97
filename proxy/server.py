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
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from proxy.admin import Console
from proxy.auth.token_file import TokenFile
from proxy.backend import Lifecycle, send_cancel
from proxy.client import ClientConnection
from proxy.config import Settings
from proxy.guard import Guard
from proxy.http import Lifecycle as ServerLifecycle, Readiness, start_endpoint
from proxy.listeners import Listeners, bind_listeners, listen_error
from proxy.metrics import Gauges
from proxy.parameters import ParameterPolicy, ProtectedSettings
from proxy.relay.statements import StatementBudget
from proxy.pool import SessionPool, TransactionPool
from proxy.roles import LoginPools
from proxy.protocol import errors, messages
from proxy.tenant import ContextBuilder
from proxy.tokens import TokenVerifier

log = logging.getLogger("pg_tenant_proxy")
# Until configuration reload exists, SIGHUP (and the admin console's RELOAD) is only logged, so that its
# default action does not end the process.
RELOAD_PENDING = "SIGHUP received: configuration reload is not implemented yet"


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

    def __init__(self, settings: Settings, worker: Worker | None = None) -> None:
        self.settings = settings
        self.worker = worker
        self.verifier = TokenVerifier(settings.jwt)
        self.token_file = TokenFile(settings.client.token_file) if settings.client.token_file else None
        tenant = settings.tenant
        self.context = ContextBuilder(tenant.setting, tenant.proof_setting, tenant.signing_key, tenant.claims_setting,
                                      tenant.claims_proof_setting)
        protected = ProtectedSettings(
            [tenant.setting, tenant.proof_setting, tenant.claims_setting, tenant.claims_proof_setting],
            settings.guard.protected_prefixes,
        )
        self.policy = ParameterPolicy(settings.client.allowed_parameters, protected)
        transaction_mode = settings.pool.mode == "transaction"
        self.guard = Guard.from_settings(settings.guard, protected, transaction_mode) if settings.guard.enabled else None
        self.pool: SessionPool | TransactionPool = (
            TransactionPool(settings.upstream, settings.pool) if transaction_mode else SessionPool(settings.upstream, settings.pool)
        )
        self.pools = LoginPools(self.pool, settings.roles, settings.pool)  # [roles]: one pool per login role
        self.tls_context = server_tls_context(settings)
        self.clients: set[ClientConnection] = set()
        self.logging_in = 0  # connections not greeted yet (counted apart: [client] max_unauthenticated_connections)
        self.logged_in = 0  # greeted clients ([pool] max_client_connections)
        self.tenant_clients: dict[str, int] = {}  # greeted clients per tenant ([client] max_connections_per_tenant)
        self.statement_budget = StatementBudget(settings.client.max_total_prepared_statement_bytes)
        self._keys: dict[int, ClientConnection] = {}
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
        client = ClientConnection(self, admin_socket=True)
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

    def cancel(self, process_id: int, secret_key: int) -> None:
        """Forward a CancelRequest with a matching minted key to that client's server connection."""
        worker = self.worker
        if worker is not None and process_id % worker.count != worker.index:
            self._spawn(self._pass_cancel(worker.socket_path(process_id % worker.count), process_id, secret_key))
            return
        client = self._keys.get(process_id)
        if client is None or not hmac.compare_digest(
            client.secret_key.to_bytes(4, "big", signed=True), secret_key.to_bytes(4, "big", signed=True)
        ):
            log.info("cancel ignored: no session matches the key")
            return
        backend = client.backend
        if backend is None:
            return
        self._spawn(self._send_cancel(backend.process_id, backend.secret_key))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pass_cancel(self, path: str, process_id: int, secret_key: int) -> None:
        """Hand a CancelRequest to the worker that minted its key."""
        try:
            _, writer = await asyncio.open_unix_connection(path)
            writer.write(messages.cancel_request(process_id, secret_key))
            await writer.drain()
            writer.close()
        except OSError as exc:
            log.warning("cancel could not reach worker socket %s: %s", path, exc)

    async def _send_cancel(self, process_id: int, secret_key: int) -> None:
        try:
            await send_cancel(self.settings.upstream, process_id, secret_key)
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("cancel could not reach the upstream server: %s", exc)

    def shutdown(self) -> None:
        """Close every client connection with 57P01, as a server shutting down does."""
        for client in list(self.clients):
            client.terminate(errors.ADMIN_SHUTDOWN, "terminating connection because the proxy is shutting down")


async def serve(settings: Settings, worker: Worker | None = None, listeners: Listeners | None = None) -> None:
    """Listen and serve until SIGINT or SIGTERM.

    `listeners` are the Unix and HTTP sockets bound by `run` before forking (bound here when None);
    raises ListenError when an address cannot be used."""
    loop = asyncio.get_running_loop()
    own = listeners is None
    sockets = bind_listeners(settings) if listeners is None else listeners
    proxy = ProxyServer(settings, worker)
    readiness = Readiness()
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
    if worker is not None:
        servers.append(await loop.create_unix_server(proxy.connection, worker.socket_path(worker.index)))
    checks = await start_endpoint(settings, proxy, readiness, sockets.http, worker, servers)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if worker is None:
        loop.add_signal_handler(signal.SIGHUP, log.info, RELOAD_PENDING)
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
    await stop.wait()
    log.info("shutting down")
    readiness.draining = True
    if checks is not None:
        checks.cancel()
    for server in servers:
        server.close()
    proxy.shutdown()
    await listener.wait_closed()
    if own:
        sockets.close()
