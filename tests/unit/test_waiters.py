"""Who is served next from a pool's queue (proxy.waiters): the tenant holding the fewest server
connections first, the earliest among equals, none at its limit, and waiters that left never chosen."""

from __future__ import annotations

from proxy.waiters import WaitQueue


def queue_of(*tenants: str) -> tuple[WaitQueue[str], list[list[str]]]:
    """A queue with one waiter per tenant named, in that order; each records what it is handed."""
    queue: WaitQueue[str] = WaitQueue()
    got: list[list[str]] = []
    for tenant in tenants:
        record: list[str] = []
        got.append(record)
        queue.add(record.append, 0.0, tenant)
    return queue, got


def serve(queue: WaitQueue[str], held: dict[str, int], limit: int = 10) -> str | None:
    waiter = queue.pop_next(held, limit)
    if waiter is None:
        return None
    waiter.finish("conn")
    return waiter.tenant


def test_the_oldest_waiter_goes_first_among_equals() -> None:
    queue, _ = queue_of("a", "b", "a", "c")
    assert [serve(queue, {}) for _ in range(5)] == ["a", "b", "a", "c", None]


def test_the_tenant_holding_fewest_goes_first() -> None:
    queue, _ = queue_of("a", "a", "b", "c")
    held = {"a": 3, "b": 1, "c": 1}
    assert serve(queue, held) == "b"  # b and c hold one each; b came first
    assert serve(queue, held) == "c"
    assert serve(queue, held) == "a"


def test_a_tenant_at_its_limit_waits_for_one_of_its_own() -> None:
    queue, _ = queue_of("a", "b")
    assert serve(queue, {"a": 2}, limit=2) == "b"
    assert serve(queue, {"a": 2}, limit=2) is None
    assert queue.may_take({"a": 2}, 2) is False
    assert serve(queue, {"a": 1}, limit=2) == "a"


def test_waiters_that_left_are_never_chosen() -> None:
    queue: WaitQueue[str] = WaitQueue()
    got: dict[str, list[str]] = {name: [] for name in ("a1", "b1", "a2")}
    first = queue.add(got["a1"].append, 0.0, "a")
    queue.add(got["b1"].append, 0.0, "b")
    queue.add(got["a2"].append, 0.0, "a")
    first.cancel()
    held = {"b": 1}
    # a1 left: the oldest still waiting is b1, but a (holding none) comes first: a2 is served
    assert serve(queue, held) == "a"
    assert got == {"a1": [], "b1": [], "a2": ["conn"]}
    assert serve(queue, held) == "b" and got["b1"] == ["conn"]
    assert serve(queue, held) is None and list(queue) == []


def test_the_oldest_waiter_is_served_past_a_tenant_queue_whose_head_left() -> None:
    queue: WaitQueue[str] = WaitQueue()
    got: list[str] = []
    gone = queue.add(got.append, 0.0, "a")
    queue.add(got.append, 0.0, "b")
    kept = queue.add(got.append, 0.0, "a")
    gone.cancel()
    assert serve(queue, {"b": 5}) == "a"
    assert kept.done and got == ["conn"]


def test_late_waiters_are_taken_out_at_their_deadline() -> None:
    queue: WaitQueue[str] = WaitQueue()
    early = queue.add(lambda _: None, 1.0, "a")
    late = queue.add(lambda _: None, 5.0, "a")
    gone = queue.add(lambda _: None, 0.5, "b")
    gone.cancel()
    assert queue.split_late(1.0) == [early]
    assert list(queue) == [late]
    assert queue.earliest_deadline() == 5.0


def test_one_waiting_tenant_gets_its_oldest_waiter_only_below_its_limit() -> None:
    queue, _ = queue_of("a", "a")
    assert serve(queue, {"a": 2}, limit=2) is None
    assert serve(queue, {"a": 1}, limit=2) == "a"
    assert len(list(queue)) == 1
