"""The pool's checkout deadlines on a fake clock: one timer per queue, each waiter refused with 53300 at
its own deadline, a waiter served in time never hears of it, an earlier deadline re-arms the timer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from proxy.backend import BackendConnection, Lifecycle, UpstreamError
from proxy.config import PoolSettings
from proxy.pool import Handover, Pool, TransactionPool
from proxy.protocol import errors, messages
from proxy.relay.replies import Owner, Request


class Handle:
    def __init__(self, when: float, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        self._when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def when(self) -> float:
        return self._when

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """time() and call_at(), advanced by hand; handles run in deadline order."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.handles: list[Handle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., None], *args: Any) -> Handle:
        handle = Handle(when, callback, args)
        self.handles.append(handle)
        return handle

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> Handle:
        return self.call_at(self.now + delay, callback, *args)

    def armed(self) -> list[float]:
        return sorted(h.when() for h in self.handles if not h.cancelled)

    def advance(self, to: float) -> None:
        while True:
            due = [h for h in self.handles if not h.cancelled and h.when() <= to]
            if not due:
                break
            handle = min(due, key=Handle.when)
            self.handles.remove(handle)
            self.now = handle.when()
            handle.callback(*handle.args)
        self.now = to


def new_pool(checkout_timeout: float = 2.0, kind: type[Pool] = Pool) -> tuple[Pool, FakeLoop]:
    settings = PoolSettings(mode="transaction", size=1, min_size=0, max_client_connections=10, max_prepared_statements=10,
                            max_server_connections_per_tenant=0, idle_transaction_timeout=0.0, client_idle_timeout=0.0,
                            checkout_timeout=checkout_timeout, server_idle_timeout=60.0, server_lifetime=3600.0)
    loop = FakeLoop()
    pool = kind(None, settings, loop)  # type: ignore[arg-type]  # no connection is opened here; the fake clock
    return pool, loop


class Record:
    def __init__(self, loop: FakeLoop) -> None:
        self.loop = loop
        self.results: list[tuple[float, Handover]] = []

    def __call__(self, result: Handover) -> None:
        self.results.append((self.loop.time(), result))


def refused_at(record: Record) -> list[float]:
    assert all(isinstance(result, UpstreamError) and result.sqlstate == errors.TOO_MANY_CONNECTIONS
               for _, result in record.results)
    return [when for when, _ in record.results]


def test_two_waiters_time_out_each_at_its_own_deadline() -> None:
    pool, loop = new_pool()
    first, second = Record(loop), Record(loop)
    pool.queue("app", loop.time() + 2.0, first, "tenant")
    loop.advance(1000.5)
    pool.queue("app", loop.time() + 2.0, second, "tenant")
    assert loop.armed() == [1002.0]  # one timer per queue
    loop.advance(1001.999)
    assert first.results == [] and second.results == []
    loop.advance(1002.0)
    assert refused_at(first) == [1002.0] and second.results == []
    assert loop.armed() == [1002.5]
    loop.advance(1002.5)
    assert refused_at(second) == [1002.5]
    assert refused_at(first) == [1002.0]  # once only
    assert loop.armed() == []


def test_refusal_names_the_pool_and_what_to_change() -> None:
    pool, loop = new_pool(checkout_timeout=2.0)
    record = Record(loop)
    pool.queue("app", loop.time() + 2.0, record, "tenant")
    loop.advance(1010.0)
    (_, result), = record.results
    assert isinstance(result, UpstreamError)
    assert 'pool for database "app" is full' in result.text
    assert result.hint is not None and "checkout_timeout" in result.hint


def test_waiter_served_in_time_gets_no_late_error() -> None:
    pool, loop = new_pool()
    served, late = Record(loop), Record(loop)
    pool.queue("app", loop.time() + 2.0, served, "tenant")
    pool.queue("app", loop.time() + 3.0, late, "tenant")
    loop.advance(1001.0)
    assert pool._wake("app")  # a connection came back: the first waiter looks again
    assert served.results == [(1001.0, None)]
    loop.advance(1010.0)
    assert served.results == [(1001.0, None)]  # no 53300 after it was served
    assert refused_at(late) == [1003.0]


def test_cancelled_waiter_gets_nothing() -> None:
    pool, loop = new_pool()
    record = Record(loop)
    waiter = pool.queue("app", loop.time() + 2.0, record, "tenant")
    waiter.cancel()
    loop.advance(1010.0)
    assert record.results == []


def test_earlier_deadline_rearms_the_queue_timer() -> None:
    """A coroutine that waited before (SessionPool.acquire loops) may join with a deadline earlier than
    the one the queue's timer is set for."""
    pool, loop = new_pool()
    later, earlier = Record(loop), Record(loop)
    pool.queue("app", 1005.0, later, "tenant")
    pool.queue("app", 1001.0, earlier, "tenant")
    assert loop.armed() == [1001.0]
    loop.advance(1001.0)
    assert refused_at(earlier) == [1001.0] and later.results == []
    loop.advance(1005.0)
    assert refused_at(later) == [1005.0]


def test_timer_a_little_early_still_refuses() -> None:
    """The loop may run a timer slightly before its time; a waiter within a millisecond is refused."""
    pool, loop = new_pool()
    record = Record(loop)
    pool.queue("app", 1002.0, record, "tenant")
    (handle,) = [h for h in loop.handles if not h.cancelled]
    loop.handles.remove(handle)
    loop.now = 1001.9995
    handle.callback(*handle.args)
    assert refused_at(record) == [1001.9995]


def test_queues_per_database_are_independent() -> None:
    pool, loop = new_pool()
    a, b = Record(loop), Record(loop)
    pool.queue("a", 1001.0, a, "tenant")
    pool.queue("b", 1003.0, b, "tenant")
    assert loop.armed() == [1001.0, 1003.0]
    loop.advance(1001.0)
    assert refused_at(a) == [1001.0] and b.results == []
    loop.advance(1003.0)
    assert refused_at(b) == [1003.0]


def pooled_backend(pool: Pool, loop: FakeLoop) -> BackendConnection:
    """A server connection (no transport) the pool opened now and a client holds."""
    backend = BackendConnection(10)
    backend.pool_key = ("app", ())
    backend.opened_at = loop.time()
    backend.lifecycle = Lifecycle.ACTIVE
    pool._open["app"] = 1
    return backend


def test_connection_past_its_lifetime_closed_when_it_comes_back() -> None:
    pool, loop = new_pool(kind=TransactionPool)
    assert isinstance(pool, TransactionPool)
    backend = pooled_backend(pool, loop)
    loop.advance(1000.0 + 3599.0)
    pool.release(backend)
    assert backend.lifecycle is Lifecycle.IDLE  # younger than server_lifetime: kept
    assert pool.take("app", "acme") is backend
    loop.advance(1000.0 + 3600.5)
    pool.release(backend)
    assert backend.lifecycle is Lifecycle.CLOSED


def test_connection_with_a_cancel_in_flight_is_closed_not_reused() -> None:
    """A CancelRequest the server has not acted on yet would cancel the next client's statement."""
    pool, loop = new_pool(kind=TransactionPool)
    assert isinstance(pool, TransactionPool)
    backend = pooled_backend(pool, loop)
    backend.cancels_in_flight = 1
    pool.release(backend)
    assert backend.lifecycle is Lifecycle.CLOSED and pool.take("app", "acme") is None


def test_idle_connection_swept_after_the_idle_timeout() -> None:
    pool, loop = new_pool(kind=TransactionPool)
    backend = pooled_backend(pool, loop)
    pool.release(backend)
    assert backend.lifecycle is Lifecycle.IDLE
    loop.advance(1000.0 + 59.0)
    assert backend.lifecycle is Lifecycle.IDLE
    loop.advance(1000.0 + 76.0)  # the sweeper looks every server_idle_timeout / 4
    assert backend.lifecycle is Lifecycle.CLOSED
    assert loop.armed() == []  # nothing idle left: no sweeper


def test_a_drained_connection_whose_replies_cannot_be_settled_is_closed() -> None:
    """A client left while only the proxy's own requests were in flight: the pool drains them. If
    settling a reply raises (a bug in what waited for it), the connection is closed, never kept, and
    the exception does not escape into the event loop's data_received."""
    pool, loop = new_pool(kind=TransactionPool)
    assert isinstance(pool, TransactionPool)
    backend = pooled_backend(pool, loop)

    class Broken:
        def ended(self, outcome: object, error: object) -> None:
            raise RuntimeError("a bug in a watcher")

        def row(self, values: object) -> None:
            """Not reached."""

    backend.queue.expect(Request.SYNC, Owner.OWN, watcher=Broken())
    pool.release(backend)
    assert backend.lifecycle is Lifecycle.ACTIVE  # draining: not idle, not closed yet
    backend.data_received(messages.ready_for_query(b"I"))
    assert backend.lifecycle is Lifecycle.CLOSED and pool.take("app", "acme") is None


def test_a_cancel_counts_against_the_connection_before_its_task_runs() -> None:
    """ProxyServer.send_cancel marks the server connection at once: a ReadyForQuery read before the
    task that sends the CancelRequest starts must not release the connection to another client."""
    from types import SimpleNamespace

    from proxy.server import ProxyServer

    pool, loop = new_pool(kind=TransactionPool)
    backend = pooled_backend(pool, loop)
    spawned: list[Any] = []
    server = SimpleNamespace(_spawn=spawned.append, _cancels_waiting={},
                             _send_cancel=lambda target, waiting: ("send cancel to", target))
    ProxyServer.send_cancel(server, backend, object())  # type: ignore[arg-type]
    assert spawned == [("send cancel to", backend)]  # not started yet
    pool.release(backend)
    assert backend.lifecycle is Lifecycle.CLOSED


def test_a_connection_handed_to_a_checkout_cancelled_before_it_resumed_goes_back() -> None:
    """A client's checkout waits in the queue; a connection is handed to it, and its task is cancelled (the
    client left) before the coroutine resumed: the connection goes back to the pool, where it was lost
    with the task (still counted as open and held: a pool of one refused everyone after that)."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pool, _ = new_pool(kind=TransactionPool)
        pool.loop = loop
        backend = BackendConnection(10)
        backend.pool_key = ("app", ())
        backend.opened_at = loop.time()
        backend.lifecycle = Lifecycle.ACTIVE
        pool._open["app"] = 1
        checkout = loop.create_task(pool._wait("app", loop.time() + 60.0, "acme"))
        while not any(pool._waiters.get("app", ())):
            await asyncio.sleep(0)  # let the checkout join the queue (a yield, not a wait on the clock)
        pool.release(backend)  # handed to the waiting checkout, which has not resumed yet
        checkout.cancel()
        try:
            await checkout
        except asyncio.CancelledError:
            pass
        assert backend.lifecycle is Lifecycle.IDLE and pool.holds("app", "acme") == 0
        assert pool.take("app", "globex") is backend

    asyncio.run(scenario())


def test_an_idle_connection_the_server_closes_no_longer_counts_as_idle() -> None:
    """The server ends an idle connection (idle_session_timeout, FATAL for a client's message that went
    upstream, a restart): it leaves the idle list at once, not at the next checkout."""
    pool, loop = new_pool(kind=TransactionPool)
    backend = pooled_backend(pool, loop)
    backend.on_close = lambda: pool._lost(backend)
    pool.servers.add(backend)
    pool.release(backend)
    assert pool.counts() == ({"app": 1}, {"app": 1}, {})
    backend.connection_lost(None)
    assert pool.counts() == ({"app": 0}, {"app": 0}, {})
