"""TCP keepalive on the proxy's client and server sockets, as `tcp_keepalive`, `tcp_keepidle`,
`tcp_keepintvl` and `tcp_keepcnt` (PgBouncer's names) configure it: read from the kernel with `ss`, whose
keepalive timer counts down from `tcp_keepidle` seconds on an idle connection (7200 by default)."""

from __future__ import annotations

import re
import subprocess
import time
from typing import Any

import psycopg
import pytest

from proxy.embedded import EmbeddedPostgres
from support import ACME, ProxyProcess

TIMER = re.compile(r"timer:\((\w+),(\d+)(ms|sec|min)")


def timers(pid: int, local: int | None = None, peer: int | None = None) -> list[tuple[str, float]]:
    """The timers of `pid`'s established TCP sockets with that local or peer port: (kind, seconds left)."""
    out = subprocess.run(["ss", "-tnoHp", "state", "established"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        if f"pid={pid}," not in line or len(fields) < 4:
            continue
        if (local is not None and fields[2].endswith(f":{local}")) or (peer is not None and fields[3].endswith(f":{peer}")):
            match = TIMER.search(line)
            if match:
                scale = {"ms": 0.001, "sec": 1.0, "min": 60.0}[match.group(3)]
                found.append((match.group(1), int(match.group(2)) * scale))
    return found


def keepalive_timers(pid: int, local: int | None = None, peer: int | None = None) -> list[float]:
    """The keepalive timers once no data is in flight (the retransmit timer shows while it is), waiting up
    to 10 s for that."""
    deadline = time.monotonic() + 10
    while True:
        seen = timers(pid, local, peer)
        if seen and all(kind == "keepalive" for kind, _ in seen):
            return [left for _, left in seen]
        assert time.monotonic() < deadline, seen
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_client_and_server_sockets_carry_the_configured_keepalive(mode: str, make_proxy: Any, pg: EmbeddedPostgres) -> None:
    proxy: ProxyProcess = make_proxy({"": {"tcp_keepidle": 17, "tcp_keepintvl": 5, "tcp_keepcnt": 3},
                                      "pool": {"mode": mode, "size": 2}})
    assert proxy.process is not None
    with psycopg.connect(proxy.dsn(), password=proxy.token(ACME)) as conn:
        conn.execute("SELECT 1")
        client_side = keepalive_timers(proxy.process.pid, local=proxy.port)
        server_side = keepalive_timers(proxy.process.pid, peer=pg.port)
    assert len(client_side) == 1 and 0 < client_side[0] <= 17
    assert server_side and all(0 < left <= 17 for left in server_side)


def test_keepalive_off(make_proxy: Any, pg: EmbeddedPostgres) -> None:
    proxy: ProxyProcess = make_proxy({"": {"tcp_keepalive": False, "tcp_keepidle": 17}})
    assert proxy.process is not None
    with psycopg.connect(proxy.dsn(), password=proxy.token(ACME)) as conn:
        conn.execute("SELECT 1")
        deadline = time.monotonic() + 10
        while timers(proxy.process.pid, local=proxy.port) or timers(proxy.process.pid, peer=pg.port):
            assert time.monotonic() < deadline, "a timer (keepalive or retransmit) still runs"
            time.sleep(0.05)
