"""Server connections in session mode: one per client, at most `size` per upstream database.

A server connection is opened for a client and closed when that client leaves; it never passes to
another client, so nothing of one session can be seen by the next. A client that finds the pool full
waits up to `checkout_timeout_seconds` for a slot, then gets 53300 naming the pool.
"""

from __future__ import annotations

import asyncio

from proxy.backend import BackendConnection, UpstreamError, connect
from proxy.config import PoolSettings, UpstreamSettings
from proxy.protocol import errors


class SessionPool:
    """Counts server connections per database and opens them on checkout."""

    def __init__(self, upstream: UpstreamSettings, settings: PoolSettings) -> None:
        self.upstream = upstream
        self.settings = settings
        self._slots: dict[str, asyncio.Semaphore] = {}

    async def acquire(self, database: str, parameters: dict[str, str]) -> BackendConnection:
        """A new authenticated server connection for one client; raises UpstreamError."""
        slots = self._slots.setdefault(database, asyncio.Semaphore(self.settings.size))
        try:
            await asyncio.wait_for(slots.acquire(), self.settings.checkout_timeout_seconds)
        except asyncio.TimeoutError:
            raise UpstreamError(
                errors.TOO_MANY_CONNECTIONS,
                f'pool for database "{database}" is full ({self.settings.size} server connections)',
                hint="raise [pool] size, or wait for other sessions to end",
            ) from None
        try:
            backend = await connect(self.upstream, database, parameters)
        except BaseException:
            slots.release()
            raise
        backend.on_close = slots.release
        return backend
