"""The clients waiting for one database's server connections, and which of them is served next.

Fair across tenants: the waiter whose tenant holds the fewest server connections goes first, the
earliest among equals, and a tenant at its limit (`[pool] max_server_connections_per_tenant`) waits
for one of its own. The queue is kept by tenant as well as in arrival order, so choosing costs one look
at the oldest waiter in the common cases (its tenant holds nothing, or there is one tenant) and one
look per waiting tenant otherwise, never one per waiting client. Waiters that left (cancelled, served)
are dropped lazily when they reach the head of a deque, or when the queue is swept at a deadline.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

R = TypeVar("R")


class Waiter(Generic[R]):
    """A client's place in a queue: `callback` is called at most once, with what it is handed."""

    __slots__ = ("callback", "deadline", "tenant", "order", "done")

    def __init__(self, callback: Callable[[R], None], deadline: float, tenant: str, order: int) -> None:
        self.callback = callback
        self.deadline = deadline  # loop time, seconds
        self.tenant = tenant
        self.order = order  # arrival number within its queue
        self.done = False  # served or cancelled: it left the queue (an attribute: read for every checkout)

    def cancel(self) -> None:
        """Leave the queue: the callback will not be called."""
        self.done = True

    def finish(self, result: R) -> None:
        if not self.done:
            self.done = True
            self.callback(result)


def _drop_left(waiters: deque[Waiter[R]]) -> None:
    while waiters and waiters[0].done:
        waiters.popleft()


class WaitQueue(Generic[R]):
    """Waiters of one database, in arrival order and by tenant."""

    __slots__ = ("_arrivals", "_by_tenant", "_numbers")

    def __init__(self) -> None:
        self._arrivals: deque[Waiter[R]] = deque()
        self._by_tenant: dict[str, deque[Waiter[R]]] = {}
        self._numbers = itertools.count()

    def add(self, callback: Callable[[R], None], deadline: float, tenant: str) -> Waiter[R]:
        waiter = Waiter(callback, deadline, tenant, next(self._numbers))
        self._arrivals.append(waiter)
        waiters = self._by_tenant.get(tenant)
        if waiters is None:
            waiters = self._by_tenant[tenant] = deque()
        waiters.append(waiter)
        return waiter

    def __iter__(self) -> Iterator[Waiter[R]]:
        """The waiters still waiting, oldest first."""
        return (waiter for waiter in self._arrivals if not waiter.done)

    def _heads(self) -> Iterator[Waiter[R]]:
        """Each waiting tenant's oldest waiter; tenants with nobody left are forgotten."""
        for tenant in list(self._by_tenant):
            waiters = self._by_tenant[tenant]
            _drop_left(waiters)
            if waiters:
                yield waiters[0]
            else:
                del self._by_tenant[tenant]

    def may_take(self, held: Mapping[str, int], limit: int) -> bool:
        """Someone waits whose tenant holds fewer than `limit` server connections (`held`: connections
        by tenant, absent for none)."""
        return any(held.get(head.tenant, 0) < limit for head in self._heads())

    def pop_next(self, held: Mapping[str, int], limit: int) -> Waiter[R] | None:
        """Take out the waiter to serve next (see the module docstring), or None when every waiting
        tenant holds `limit` connections or nobody waits. `held` counts each tenant's connections
        (absent for none)."""
        arrivals = self._arrivals
        while arrivals and arrivals[0].done:  # _drop_left, inlined: once per hand-over
            arrivals.popleft()
        if not arrivals:
            self._by_tenant.clear()
            return None
        oldest = arrivals[0]
        if len(self._by_tenant) == 1:  # one tenant waits: its oldest waiter, if it is below its limit
            return self._take(oldest) if held.get(oldest.tenant, 0) < limit else None
        if limit > 0 and not held.get(oldest.tenant, 0):
            return self._take(oldest)  # nobody can hold fewer, nobody came earlier
        chosen: Waiter[R] | None = None
        fewest = 0
        for head in self._heads():
            holds = held.get(head.tenant, 0)
            if holds >= limit:
                continue
            if chosen is None or holds < fewest or (holds == fewest and head.order < chosen.order):
                chosen, fewest = head, holds
        return None if chosen is None else self._take(chosen)

    def _take(self, waiter: Waiter[R]) -> Waiter[R]:
        """Remove `waiter`, the head of its tenant's deque (the arrivals deque drops it once it is done)."""
        waiters = self._by_tenant[waiter.tenant]
        while waiters[0] is not waiter:  # waiters that left before it are still queued here
            waiters.popleft()
        waiters.popleft()
        if not waiters:
            del self._by_tenant[waiter.tenant]
        if self._arrivals[0] is waiter:
            self._arrivals.popleft()
        return waiter

    def split_late(self, now: float) -> list[Waiter[R]]:
        """Take out and return the waiters whose deadline is `now` or earlier; drop those that left."""
        late = [w for w in self._arrivals if w.deadline <= now and not w.done]
        kept = [w for w in self._arrivals if w.deadline > now and not w.done]
        self._arrivals = deque(kept)
        self._by_tenant = {}
        for waiter in kept:
            self._by_tenant.setdefault(waiter.tenant, deque()).append(waiter)
        return late

    def earliest_deadline(self) -> float | None:
        """The earliest deadline of the waiters still waiting (loop time, seconds), None when none waits."""
        return min((w.deadline for w in self), default=None)
