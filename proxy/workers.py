"""Several proxy processes on one port: fork `workers` children sharing it with SO_REUSEPORT, pass
SIGINT/SIGTERM on to them, and start again any child that dies."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from types import FrameType

from proxy.server import RELOAD_PENDING, Worker

log = logging.getLogger("pg_tenant_proxy")


def supervise(count: int, run_worker: Callable[[Worker], None]) -> int:
    """Run `count` workers until a signal stops them; returns the exit status."""
    peer_dir = tempfile.mkdtemp(prefix="pgtp-workers-")
    children: dict[int, int] = {}
    stopping = False

    def spawn(index: int) -> None:
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

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, lambda signum, frame: log.info("%s (supervisor pid %d)", RELOAD_PENDING, os.getpid()))
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
