"""Several proxy processes on one port: fork `workers` children sharing it with SO_REUSEPORT, pass
SIGINT, SIGTERM and SIGHUP on to them, and start again any child that dies, unless it is stopping."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from types import FrameType

from proxy.server import Worker

log = logging.getLogger("pg_tenant_proxy")


def supervise(count: int, run_worker: Callable[[Worker], None]) -> int:
    """Run `count` workers until a signal stops them; returns the exit status."""
    peer_dir = tempfile.mkdtemp(prefix="pgtp-workers-")
    children: dict[int, int] = {}
    stopping = False

    def spawn(index: int) -> None:
        # SIGHUP stays blocked across the fork: in the supervisor until it is forked, in the child until
        # serve() has installed the event loop's handler and takes a signal that came meanwhile
        # (`take_held_sighup`): reloaded once, neither lost (the worker would keep its old configuration)
        # nor run by the supervisor's `forward`, which the child inherits and serve() replaces.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            status = 0
            try:
                run_worker(Worker(index, count, peer_dir))
            except BaseException:
                log.exception("worker %d failed", index)
                status = 1
            os._exit(status)
        children[pid] = index
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

    def stop(signum: int, frame: FrameType | None) -> None:
        """SIGTERM (drain) or SIGINT (at once): the same signal to every worker; none is started again."""
        nonlocal stopping
        stopping = True
        forward(signum, frame)

    def forward(signum: int, frame: FrameType | None) -> None:
        """SIGHUP: every worker reloads its configuration."""
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass  # exited; os.wait() will collect it

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, forward)
    for index in range(count):
        spawn(index)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue
        index = children.pop(pid)
        if not stopping:
            log.warning("worker %d exited with status %d; starting it again", index, os.waitstatus_to_exitcode(status))
            spawn(index)
    shutil.rmtree(peer_dir, ignore_errors=True)
    return 0
