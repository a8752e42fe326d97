"""Server connections in session mode: one client at a time, at most `size` per upstream database.

A client holds its server connection from its first message (the pool's first client for a database
and set of startup parameters: from its login) until it leaves. When it leaves cleanly (idle, nothing in
flight), the connection is reset with DISCARD ALL — temp tables, prepared statements, cursors, LISTEN,
advisory locks, settings and the tenant context all go — and kept for the next client that asks for
the same database with the same startup parameters (their values are the session defaults, which
DISCARD ALL restores, so they must match). A connection that is not idle when its client leaves, or
whose reset fails, is closed, and so is one older than `server_lifetime` or idle for longer than
`server_idle_timeout`. A client that finds the pool full waits up to `checkout_timeout` for a slot,
then gets 53300 naming the pool.
"""

from __future__ import annotations

import asyncio
from collections import deque

from proxy.backend import BackendConnection, UpstreamError, connect
from proxy.config import PoolSettings, UpstreamSettings
from proxy.protocol import errors, messages


PoolKey = tuple[str, tuple[tuple[str, str], ...]]
RESET = messages.query("DISCARD ALL")


def pool_key(database: str, parameters: dict[str, str]) -> PoolKey:
    """Connections are shared only between clients of one database with the same startup parameters."""
    return database, tuple(sorted(parameters.items()))


class SessionPool:
    """Server connections per database: reset ones kept idle, new ones opened up to `size`."""

    def __init__(self, upstream: UpstreamSettings, settings: PoolSettings) -> None:
        self.upstream = upstream
        self.settings = settings
        self._open: dict[str, int] = {}
        self._idle: dict[PoolKey, list[BackendConnection]] = {}
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._parameters: dict[PoolKey, dict[str, str]] = {}

    def known_parameters(self, database: str, parameters: dict[str, str]) -> dict[str, str] | None:
        """What the server reported (ParameterStatus) for sessions opened with these startup parameters,
        once a connection for them has been opened; clients are greeted with it before they get one."""
        return self._parameters.get(pool_key(database, parameters))

    async def acquire(self, database: str, parameters: dict[str, str]) -> BackendConnection:
        """An authenticated server connection, reset if it served someone before; raises UpstreamError."""
        key = pool_key(database, parameters)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.checkout_timeout
        while True:
            idle = self._idle.get(key)
            while idle:
                backend = idle.pop()
                if not backend.closed:
                    return backend
            if self._open.get(database, 0) < self.settings.size:
                return await self._open_new(database, key, parameters)
            self._close_one_idle(database)
            waiter: asyncio.Future[None] = loop.create_future()
            waiters = self._waiters.setdefault(database, deque())
            waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise UpstreamError(
                    errors.TOO_MANY_CONNECTIONS,
                    f'pool for database "{database}" is full ({self.settings.size} server connections)',
                    hint="raise [pool] size, or wait for other sessions to end",
                ) from None
            finally:
                if waiter in waiters:
                    waiters.remove(waiter)

    async def _open_new(self, database: str, key: PoolKey, parameters: dict[str, str]) -> BackendConnection:
        self._open[database] = self._open.get(database, 0) + 1
        try:
            backend = await connect(self.upstream, database, parameters)
        except BaseException:
            self._closed(database)
            raise
        backend.on_close = lambda: self._closed(database)
        backend.pool_key = key
        backend.opened_at = asyncio.get_running_loop().time()
        self._parameters[key] = dict(backend.parameters)
        return backend

    def _closed(self, database: str) -> None:
        self._open[database] -= 1
        self._wake(database)

    def _wake(self, database: str) -> None:
        """Let one client waiting for this database look again."""
        waiters = self._waiters.get(database)
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _close_one_idle(self, database: str) -> None:
        """Free a slot held by an idle connection kept for other startup parameters."""
        for key, idle in self._idle.items():
            if key[0] == database and idle:
                idle.pop(0).close()
                return

    def release(self, backend: BackendConnection) -> None:
        """Take back a connection whose client left: reset and keep it, or close it."""
        loop = asyncio.get_running_loop()
        if not backend.reusable() or loop.time() - backend.opened_at > self.settings.server_lifetime:
            backend.close()
            return
        backend.detach()
        task = loop.create_task(self._reset(backend))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reset(self, backend: BackendConnection) -> None:
        try:
            failure = await asyncio.wait_for(backend.run(RESET), self.upstream.connect_timeout_seconds)
        except (UpstreamError, asyncio.TimeoutError):
            failure = {}
        if failure is not None or backend.closed or backend.transaction_status != b"I":
            backend.close()
            return
        loop = asyncio.get_running_loop()
        backend.idle_since = loop.time()
        self._idle.setdefault(backend.pool_key, []).append(backend)
        self._wake(backend.pool_key[0])
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.settings.server_idle_timeout / 4, self._sweep)

    def _sweep(self) -> None:
        """Close idle connections unused for `server_idle_timeout`; look again while any are left."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for idle in self._idle.values():
            for backend in [b for b in idle if b.closed or now - b.idle_since > self.settings.server_idle_timeout]:
                idle.remove(backend)
                backend.close()
        self._sweeper = None
        if any(self._idle.values()):
            self._sweeper = loop.call_later(self.settings.server_idle_timeout / 4, self._sweep)
