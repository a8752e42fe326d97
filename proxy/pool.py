"""Server connections, per upstream database, in session or transaction mode.

Both modes open at most `size` connections per database. A client that finds the pool full waits up
to `checkout_timeout` for one, then gets 53300 naming the pool. A connection older than
`server_lifetime` is closed when it comes back, one idle for longer than `server_idle_timeout` is
closed by a sweeper (down to `min_size`), and a broken one is dropped when it closes and replaced
while the pool is below `min_size`.

- **Session mode** (SessionPool): a client holds its server connection from its first message (the
  pool's first client for a database and set of startup parameters: from its login) until it leaves.
  When it leaves cleanly (idle, nothing in flight), the connection is reset with DISCARD ALL — temp
  tables, prepared statements, cursors, LISTEN, advisory locks, settings and the tenant context all
  go — and kept for the next client that asks for the same database with the same startup parameters
  (their values are the session defaults, which DISCARD ALL restores, so they must match). A
  connection that is not idle when its client leaves, or whose reset fails, is closed.
- **Transaction mode** (TransactionPool): a client holds a server connection from the first message
  of a transaction until ReadyForQuery 'I'. Connections are shared by all tenants and opened with no
  client startup parameters; the client side resets and re-applies what a connection holds
  (`proxy.transaction`). A returning connection goes back as it is, and a checkout prefers one that
  last served the same tenant, so its context, settings and prepared statements are reused.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Coroutine, Mapping
from types import MappingProxyType
from typing import Any, Union

from proxy.backend import BackendConnection, Lifecycle, UpstreamError, connect
from proxy.config import PoolSettings, UpstreamSettings
from proxy.protocol import errors, messages
from proxy.protocol.errors import ProtocolViolation
from proxy.relay.replies import Owner
from proxy.relay.settings import RESEED
from proxy.waiters import WaitQueue, Waiter

# Two Queries in one write (DISCARD ALL refuses to share a Query with another statement): the session's
# state, then random()'s seed, which DISCARD ALL keeps.
RESET_SERVER = messages.query("DISCARD ALL") + messages.query(f"SELECT {RESEED}")


PoolKey = tuple[str, tuple[tuple[str, str], ...]]
EVERY_DATABASE = ""  # in Pool.paused: every database is paused (no database has an empty name)


log = logging.getLogger("pg_tenant_proxy")
Handover = Union[BackendConnection, UpstreamError, None]
# Compared against on every checkout and release: bound once (see proxy.relay.enums).
_IDLE, _ACTIVE, _CLOSED = Lifecycle.IDLE, Lifecycle.ACTIVE, Lifecycle.CLOSED
_NONE_HELD: Mapping[str, int] = MappingProxyType({})  # a database none of whose connections is held


def pool_key(database: str, parameters: dict[str, str]) -> PoolKey:
    """Session connections are shared only between clients of one database with the same startup parameters."""
    return database, tuple(sorted(parameters.items()))


class Pool:
    """What both modes share: counting open connections per database, waiting for a slot, sweeping."""

    def __init__(self, upstream: UpstreamSettings, settings: PoolSettings, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.upstream = upstream
        self.settings = settings
        # The loop (by default the running one), looked up once: on Python 3.11 each lookup costs a getpid()
        # system call. A plain attribute, not a cached_property, whose write into the instance's __dict__
        # costs the interpreter's specialised attribute access on the pool (bench/PROFILE.md).
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self._open: dict[str, int] = {}
        self._waiters: dict[str, WaitQueue[Handover]] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}  # per queue: at its earliest deadline
        self._tasks: set[asyncio.Task[None]] = set()
        self._held: dict[str, dict[str, int]] = {}  # database -> tenant -> server connections held (never 0)
        self._sweeper: asyncio.TimerHandle | None = None
        self._parameters: dict[PoolKey, dict[str, str]] = {}
        self.servers: set[BackendConnection] = set()  # every open server connection (the admin console lists them)
        self.paused: set[str] = set()  # databases PAUSEd by the admin console (EVERY_DATABASE: all of them)


    def known_parameters(self, database: str, parameters: dict[str, str]) -> dict[str, str] | None:
        """What the server reported (ParameterStatus) for sessions with these startup parameters, once
        one has been set up; clients are greeted with it before they get a connection."""
        return self._parameters.get(pool_key(database, parameters))

    def learn_parameters(self, database: str, parameters: dict[str, str], reported: dict[str, str]) -> None:
        self._parameters[pool_key(database, parameters)] = dict(reported)

    def holds(self, database: str, tenant: str) -> int:
        """Server connections of `database` that clients of `tenant` hold now."""
        held = self._held.get(database)
        return held.get(tenant, 0) if held is not None else 0

    def at_limit(self, database: str, tenant: str) -> bool:
        """`tenant` holds as many server connections of `database` as one tenant may
        (`[pool] max_server_connections_per_tenant`): its clients wait for one of its own to come back."""
        return self.holds(database, tenant) >= self.settings.tenant_limit

    def _hold(self, backend: BackendConnection, tenant: str) -> None:
        """`backend` now serves a client of `tenant`."""
        backend.holder = tenant
        database = backend.pool_key[0]
        held = self._held.get(database)  # _hold_slot, inlined: once per checkout
        if held is None:
            held = self._held[database] = {}
        held[tenant] = held.get(tenant, 0) + 1

    def _unhold(self, backend: BackendConnection) -> None:
        """`backend`'s client is done with it (idempotent)."""
        tenant, backend.holder = backend.holder, None
        if tenant is not None:
            held = self._held[backend.pool_key[0]]  # _release_slot, inlined: once per release
            held[tenant] -= 1
            if not held[tenant]:
                del held[tenant]

    def _hold_slot(self, database: str, tenant: str) -> None:
        """One more server connection counts toward `tenant`'s limit (held, or being opened for it)."""
        held = self._held.get(database)
        if held is None:
            held = self._held[database] = {}
        held[tenant] = held.get(tenant, 0) + 1

    def _release_slot(self, database: str, tenant: str) -> None:
        held = self._held[database]
        held[tenant] -= 1
        if not held[tenant]:
            del held[tenant]

    def queue(self, database: str, deadline: float, callback: Callable[[Handover], None], tenant: str) -> Waiter[Handover]:
        """Join the clients waiting for a connection of `database`: `callback` is called, at once and only
        once, with a connection handed over, with None when one is kept idle or closed (look again), or
        with UpstreamError 53300 at the deadline. Waiters are served fairly across tenants (see `_wake`)."""
        waiters = self._waiters.get(database)
        if waiters is None:
            waiters = self._waiters[database] = WaitQueue()
        waiter = waiters.add(callback, deadline, tenant)
        timer = self._expiry.get(database)
        if timer is None or deadline < timer.when():  # a coroutine's deadline may predate the queue's
            if timer is not None:
                timer.cancel()
            self._expiry[database] = self.loop.call_at(deadline, self._expire, database)
        return waiter

    def _expire(self, database: str) -> None:
        """Refuse the waiters whose deadline has passed, and look again at the earliest one left: one
        timer per queue rather than one per waiter, so a checkout served in time costs no timer."""
        del self._expiry[database]
        waiters = self._waiters.get(database)
        if waiters is None:
            return
        late = waiters.split_late(self.loop.time() + 0.001)  # a timer may fire a little before its time
        earliest = waiters.earliest_deadline()
        if earliest is not None:
            self._expiry[database] = self.loop.call_at(earliest, self._expire, database)
        for waiter in late:
            waiter.finish(self._timed_out(database))

    def _timed_out(self, database: str) -> UpstreamError:
        """The error for a client that waited `checkout_timeout` in vain: 57P03 while the database is
        paused, else 53300."""
        if self.is_paused(database):
            return UpstreamError(
                errors.CANNOT_CONNECT_NOW,
                f'database "{database}" is paused and was not resumed within {self.settings.checkout_timeout:g} s',
                hint="an operator paused it on the admin console (PAUSE); try again after RESUME",
            )
        return UpstreamError(
            errors.TOO_MANY_CONNECTIONS,
            f'pool for database "{database}" is full ({self.settings.size} server connections in use'
            f" for {self.settings.checkout_timeout:g} s)",
            hint="raise [pool] size or [pool] checkout_timeout, or make transactions shorter",
        )

    async def _wait(self, database: str, deadline: float, tenant: str) -> BackendConnection | None:
        """Wait in the queue (see `queue`) from a coroutine."""
        future: asyncio.Future[Handover] = self.loop.create_future()

        def deliver(result: Handover) -> None:
            if not future.done():
                future.set_result(result)
            elif isinstance(result, BackendConnection):
                self.hand_back(result)  # the waiting coroutine was cancelled meanwhile

        waiter = self.queue(database, deadline, deliver, tenant)
        try:
            result = await future
        except asyncio.CancelledError:
            # Cancelled after a connection was handed over but before this coroutine resumed (the client
            # left in between): it goes back, instead of being lost with the task.
            handed = future.result() if future.done() and not future.cancelled() else None
            if isinstance(handed, BackendConnection):
                self.hand_back(handed)
            raise
        finally:
            waiter.cancel()
        if isinstance(result, Exception):
            raise result
        return result

    async def _open_new(self, database: str, parameters: dict[str, str], max_prepared_statements: int = 0) -> BackendConnection:
        self._open[database] = self._open.get(database, 0) + 1
        upstream = self.upstream
        try:
            backend = await connect(upstream, database, parameters, max_prepared_statements)
        except BaseException:
            self._closed(database)
            raise
        backend.on_close = lambda: self._lost(backend)
        backend.pool_key = pool_key(database, parameters)
        backend.opened_at = self.loop.time()
        self.servers.add(backend)
        if self.upstream is not upstream:
            self.retire(backend)  # a reload changed the upstream while it was being opened
        return backend

    def _closed(self, database: str) -> None:
        self._open[database] -= 1
        self._wake(database)

    def _lost(self, backend: BackendConnection) -> None:
        """A server connection closed, whoever closed it: its slot and its tenant's count are free, and it
        leaves the idle list at once (closed there by the server, it would count as idle on the console and
        in the gauges until the next checkout passed over it)."""
        self.servers.discard(backend)
        idle = self._idle_list(backend)
        if backend in idle:
            idle.remove(backend)
        self._unhold(backend)
        self._closed(backend.pool_key[0])

    def move(self, backend: BackendConnection, to: Lifecycle) -> None:
        """The one place a server connection changes lifecycle state; keeps the idle lists true."""
        if backend.lifecycle is _IDLE:
            idle = self._idle_list(backend)
            if backend in idle:
                idle.remove(backend)
        if to is _CLOSED:
            backend.close()
            return
        if backend.lifecycle is _CLOSED:
            return
        backend.lifecycle = to
        if to is _IDLE:
            backend.idle_since = self.loop.time()
            self._idle_list(backend).append(backend)
            if self._sweeper is None:
                self._sweeper = self.loop.call_later(self.settings.server_idle_timeout / 4, self._sweep)
    def _wake(self, database: str, backend: BackendConnection | None = None) -> bool:
        """Hand `backend` to a client waiting for this database, or (None) let it look again; False when
        nobody who may take one waits. Fair across tenants (`proxy.waiters`): one tenant's queue delays
        another's checkout by at most one transaction."""
        waiters = self._waiters.get(database)
        if waiters is None or (self.paused and self.is_paused(database)):
            return False
        chosen = waiters.pop_next(self._held.get(database, _NONE_HELD), self.settings.tenant_limit)
        if chosen is None:
            return False
        if backend is not None:
            if backend.lifecycle is not _ACTIVE:
                self.move(backend, _ACTIVE)
            self._hold(backend, chosen.tenant)
        chosen.finish(backend)
        return True

    def is_paused(self, database: str) -> bool:
        paused = self.paused
        return bool(paused) and (EVERY_DATABASE in paused or database in paused)

    def pause(self, database: str = EVERY_DATABASE) -> None:
        """PAUSE (the admin console): hand out no server connection of `database` (by default of every
        database) until `resume`; clients that need one wait in the queue, up to `checkout_timeout`.
        Connections already held serve on: transactions in flight (and sessions, in session mode) finish."""
        self.paused.add(database)

    def resume(self, database: str = EVERY_DATABASE) -> None:
        """RESUME `database` (by default every one): hand out connections again, and let every client
        queued meanwhile look again."""
        if database == EVERY_DATABASE:
            self.paused.clear()
        else:
            self.paused.discard(database)
        for name in list(self._waiters):
            if not self.is_paused(name):
                self._unpaused(name)

    def _unpaused(self, database: str) -> None:
        """Every client waiting for `database` looks again (a client that still finds none queues anew)."""
        waiters = self._waiters.pop(database, None)
        for waiter in list(waiters or ()):
            waiter.finish(None)

    def oldest_wait(self, database: str) -> float:
        """Seconds the longest-waiting client in `database`'s queue has waited (0 when none waits)."""
        waiters = self._waiters.get(database)
        earliest = waiters.earliest_deadline() if waiters is not None else None
        if earliest is None:
            return 0.0
        return max(0.0, self.loop.time() - (earliest - self.settings.checkout_timeout))

    def _someone_may_take(self, database: str) -> bool:
        """A client waits for `database` whose tenant is below its limit."""
        waiters = self._waiters.get(database)
        return waiters is not None and waiters.may_take(self._held.get(database, _NONE_HELD), self.settings.tenant_limit)

    def _take_back(self, backend: BackendConnection) -> bool:
        """A connection its client is done with: True when it may serve again (detached from the
        client), else it is closed (busy, broken, or older than `server_lifetime`)."""
        self._unhold(backend)
        backend.detach()
        if (not backend.reusable() or self.loop.time() - backend.opened_at > self.settings.server_lifetime
                or backend.state.settings.get("idle_session_timeout", "0") != "0"):
            # A client's idle_session_timeout (transaction mode records it) would end the backend while it
            # idles in the pool, or just after the next client, of any tenant, took it (its FATAL 57P05
            # then ends that client's session): it can never serve its own client, who holds no
            # connection between transactions.
            self.move(backend, Lifecycle.CLOSED)
            return False
        return True

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


    def _idle_lists(self) -> list[tuple[str, list[BackendConnection]]]:
        raise NotImplementedError

    def reconfigure(self, upstream: UpstreamSettings, settings: PoolSettings, retire: bool) -> None:
        """A configuration reload: the new limits apply from the next checkout, and idle connections above
        a smaller `size` close. With `retire` (the address, role, password or TLS settings changed) new
        connections use `upstream`, the idle ones close now and the caller retires those in use."""
        self.upstream, self.settings = upstream, settings
        for database, idle in self._idle_lists():
            excess = len(idle) if retire else self._open.get(database, 0) - settings.size
            for backend in list(idle)[:max(excess, 0)]:
                self.move(backend, Lifecycle.CLOSED)

    @staticmethod
    def retire(backend: BackendConnection) -> None:
        """Close `backend` when its client is done with it instead of keeping it: it counts as older than
        `server_lifetime`."""
        backend.opened_at = -math.inf

    def counts(self) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        """For the gauges, by database: server connections open (any lifecycle but CLOSED), idle in the
        pool, and clients waiting in its queue."""
        idle: dict[str, int] = {}
        for database, backends in self._idle_lists():
            idle[database] = idle.get(database, 0) + len(backends)
        waiting = {database: sum(1 for _ in waiters) for database, waiters in self._waiters.items()}
        return dict(self._open), idle, waiting

    def _idle_list(self, backend: BackendConnection) -> list[BackendConnection]:
        """Where `backend` waits while idle."""
        raise NotImplementedError

    def hand_back(self, backend: BackendConnection) -> None:
        """Return an idle connection handed over to a client that left before using it."""
        self._unhold(backend)
        self._offer(backend)

    def _offer(self, backend: BackendConnection) -> None:
        """A connection free to serve (held by nobody): to a waiting client, else idle in the pool."""
        if not self._wake(backend.pool_key[0], backend):
            self.move(backend, _IDLE)

    def _sweep(self) -> None:
        """Close idle connections unused for `server_idle_timeout`, keeping `min_size` per database;
        look again while any are left."""
        loop = self.loop
        now = loop.time()
        for database, idle in self._idle_lists():
            for backend in [b for b in idle if b.closed]:
                idle.remove(backend)
            for backend in [b for b in idle if now - b.idle_since > self.settings.server_idle_timeout]:
                if self._open.get(database, 0) <= self.settings.min_size:
                    break
                self.move(backend, Lifecycle.CLOSED)
        self._sweeper = None
        if any(idle for _, idle in self._idle_lists()):
            self._sweeper = loop.call_later(self.settings.server_idle_timeout / 4, self._sweep)


class SessionPool(Pool):
    """Session mode: reset connections kept idle per database and startup parameters."""

    def __init__(self, upstream: UpstreamSettings, settings: PoolSettings, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(upstream, settings, loop)
        self._idle_by_key: dict[PoolKey, list[BackendConnection]] = {}

    def _idle_lists(self) -> list[tuple[str, list[BackendConnection]]]:
        return [(key[0], idle) for key, idle in self._idle_by_key.items()]

    def _idle_list(self, backend: BackendConnection) -> list[BackendConnection]:
        return self._idle_by_key.setdefault(backend.pool_key, [])

    async def acquire(self, database: str, parameters: dict[str, str], tenant: str) -> BackendConnection:
        """An authenticated server connection for a client of `tenant`, reset if it served someone before;
        raises UpstreamError (53300 when none comes within `checkout_timeout`)."""
        key = pool_key(database, parameters)
        deadline = self.loop.time() + self.settings.checkout_timeout
        while True:
            if not self.at_limit(database, tenant) and not self.is_paused(database):
                idle = self._idle_by_key.get(key)
                while idle:
                    backend = idle[-1]
                    if not backend.closed:
                        self.move(backend, Lifecycle.ACTIVE)
                        self._hold(backend, tenant)
                        return backend
                    idle.pop()
                if self._open.get(database, 0) < self.settings.size:
                    self._hold_slot(database, tenant)
                    try:
                        backend = await self._open_new(database, parameters)
                    finally:
                        self._release_slot(database, tenant)
                    self.move(backend, Lifecycle.ACTIVE)
                    self._hold(backend, tenant)
                    return backend
                self._close_one_idle(database)
            await self._wait(database, deadline, tenant)

    def _close_one_idle(self, database: str) -> None:
        """Free a slot held by an idle connection kept for other startup parameters."""
        for key, idle in self._idle_by_key.items():
            if key[0] == database and idle:
                self.move(idle[0], Lifecycle.CLOSED)
                return

    def release(self, backend: BackendConnection) -> None:
        """Take back a connection whose client left: reset and keep it, or close it."""
        if self._take_back(backend):
            self.move(backend, Lifecycle.RESETTING)
            self._spawn(self._reset(backend))

    async def _reset(self, backend: BackendConnection) -> None:
        try:
            failure = await asyncio.wait_for(backend.run(RESET_SERVER, groups=2), self.upstream.connect_timeout_seconds)
        except (UpstreamError, asyncio.TimeoutError):
            failure = {}
        if failure is not None or backend.closed or backend.queue.status != b"I":
            self.move(backend, Lifecycle.CLOSED)
            return
        backend.state.statements.dropped()
        self.move(backend, Lifecycle.IDLE)
        self._wake(backend.pool_key[0])  # a waiting client may take it, if its parameters match


class TransactionPool(Pool):
    """Transaction mode: connections per database shared by all tenants, with tenant affinity."""

    def __init__(self, upstream: UpstreamSettings, settings: PoolSettings, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(upstream, settings, loop)
        self._idle_by_database: dict[str, list[BackendConnection]] = {}
        self._filling: set[str] = set()

    def _idle_lists(self) -> list[tuple[str, list[BackendConnection]]]:
        return list(self._idle_by_database.items())

    def _idle_list(self, backend: BackendConnection) -> list[BackendConnection]:
        return self._idle_by_database.setdefault(backend.pool_key[0], [])

    def _closed(self, database: str) -> None:
        super()._closed(database)
        self._fill(database)

    async def acquire(self, database: str, tenant: str) -> BackendConnection:
        """A server connection for a client of `tenant`, preferably one that last served it; raises
        UpstreamError (53300 when none comes within `checkout_timeout`)."""
        deadline = self.loop.time() + self.settings.checkout_timeout
        self._fill(database)
        while True:
            backend = self.take(database, tenant)
            if backend is not None:
                return backend
            if not self.full(database, tenant):
                self._hold_slot(database, tenant)
                try:
                    backend = await self._open_new(database, {}, self.settings.max_prepared_statements)
                finally:
                    self._release_slot(database, tenant)
                self.move(backend, Lifecycle.ACTIVE)
                self._hold(backend, tenant)
                return backend
            backend = await self._wait(database, deadline, tenant)
            if backend is not None:
                return backend

    def take(self, database: str, tenant: str) -> BackendConnection | None:
        """Without waiting: the most recently used idle connection of `tenant`, else a fresh one, else
        the least recently used one; None when none is idle."""
        idle = self._idle_by_database.get(database)
        if not idle or self.at_limit(database, tenant) or self._someone_may_take(database):
            return None  # a tenant at its limit waits; clients already waiting that may take one come first
        if self.paused and self.is_paused(database):
            return None
        chosen = self._choose(idle, tenant)
        if chosen is not None:
            self.move(chosen, Lifecycle.ACTIVE)
            self._hold(chosen, tenant)
        return chosen

    @staticmethod
    def _choose(idle: list[BackendConnection], tenant: str) -> BackendConnection | None:
        last = idle[-1]
        if last.state.tenant == tenant and not last.closed:
            return last  # the common case: the connection this tenant used last
        for backend in [b for b in idle if b.closed]:
            idle.remove(backend)
        for index in range(len(idle) - 1, -1, -1):
            if idle[index].state.tenant == tenant:
                return idle[index]
        for backend in idle:
            if backend.state.tenant is None:
                return backend
        return idle[0] if idle else None

    def full(self, database: str, tenant: str) -> bool:
        """True when a client of `tenant` must wait: `database` has `size` connections open, the
        tenant holds as many as it may, or the database is paused."""
        return (self._open.get(database, 0) >= self.settings.size or self.at_limit(database, tenant)
                or bool(self.paused) and self.is_paused(database))

    def _unpaused(self, database: str) -> None:
        """Idle connections go to waiting clients first, then the rest look again."""
        idle = self._idle_by_database.get(database, [])
        while idle and not idle[-1].closed and self._wake(database, idle[-1]):
            pass
        super()._unpaused(database)

    def release(self, backend: BackendConnection) -> None:
        """Take back a connection at the end of a transaction: keep it as it is, or close it. One whose
        client left while only the proxy's own requests were in flight is kept once they are answered."""
        entries = backend.queue.entries
        if entries and backend.lifecycle is not _CLOSED and all(entry.owner is Owner.OWN for entry in entries):
            self._unhold(backend)
            backend.attach(_Drain(self, backend))
            return
        if self._take_back(backend) and not self._wake(backend.pool_key[0], backend):  # _offer, inlined
            self.move(backend, _IDLE)


    def _fill(self, database: str) -> None:
        """Open connections in the background while the database has fewer than `min_size`."""
        if self._open.get(database, 0) >= self.settings.min_size or database in self._filling:
            return
        self._filling.add(database)
        self._spawn(self._fill_up(database))

    async def _fill_up(self, database: str) -> None:
        try:
            while self._open.get(database, 0) < self.settings.min_size:
                backend = await self._open_new(database, {}, self.settings.max_prepared_statements)
                self.hand_back(backend)
        except UpstreamError:
            pass  # the next checkout reports the failure to its client
        finally:
            self._filling.discard(database)


class _Drain:
    """Holds a server connection until the proxy's own requests in flight are answered, then releases it."""

    def __init__(self, pool: TransactionPool, backend: BackendConnection) -> None:
        self.pool = pool
        self.backend = backend

    def server_data(self, data: bytes) -> None:
        """Replies the connection still owes. Any failure to account for them (a desync, or a bug in what
        the departed client's requests wait for) closes the connection rather than reuse it."""
        queue = self.backend.queue
        try:
            queue.feed(data)
        except ProtocolViolation:
            self.pool.move(self.backend, Lifecycle.CLOSED)
            return
        except Exception:
            log.exception("closing a server connection whose replies could not be accounted for after its client left")
            self.pool.move(self.backend, Lifecycle.CLOSED)
            return
        if queue.idle():
            self.pool.release(self.backend)

    def server_lost(self) -> None:
        """Closed while draining: the pool's close callback counts it."""

    def server_backpressure(self, paused: bool) -> None:
        """Nothing reads from a drained connection's client."""
