"""A worker's SIGHUP before it serves: held blocked from the fork, taken once by serve() (take_held_sighup),
and not seen a second time by the event loop's handler. In this process, with its signal mask and SIGHUP
handler put back afterwards. The signals go to this thread only (pthread_kill): sent to the process, one
could reach a thread another test left running, where SIGHUP is not blocked and ends the test run."""

from __future__ import annotations

import asyncio
import signal
import threading

import pytest

from proxy.server import take_held_sighup


def test_a_sighup_that_came_before_the_worker_served_reloads_it_once() -> None:
    """uvloop sets the signal wakeup fd as its loop starts: a SIGHUP caught by a Python handler before
    serve() installed the loop's handler also left a byte on the loop's self-pipe, and the worker
    reloaded twice for it. The loop reads the bytes of both signals sent here in one batch, so a stale
    byte would show as a third reload before the wait below ends."""
    uvloop = pytest.importorskip("uvloop")
    reloads: list[str] = []
    handler = signal.getsignal(signal.SIGHUP)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})  # as a worker holds it from its fork

    async def worker() -> None:
        loop = asyncio.get_running_loop()
        signal.pthread_kill(threading.get_ident(), signal.SIGHUP)  # forwarded by the supervisor before serve()
        reloaded = asyncio.Event()

        def reload(source: str) -> None:
            reloads.append(source)
            reloaded.set()

        loop.add_signal_handler(signal.SIGHUP, reload, "loop")
        if take_held_sighup():
            reloads.append("held")
        assert signal.SIGHUP not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
        signal.pthread_kill(threading.get_ident(), signal.SIGHUP)  # the next one: the loop's handler's first
        await asyncio.wait_for(reloaded.wait(), 10)

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(worker())
    finally:
        loop.close()  # removes the loop's handler (SIGHUP back to SIG_DFL)
        signal.signal(signal.SIGHUP, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    assert reloads == ["held", "loop"]
