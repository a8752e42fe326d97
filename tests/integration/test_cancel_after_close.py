"""A CancelRequest that arrives after its session ended (found when CI hung on a lib/pq step).

Directly, Postgres delivers a CancelRequest to the backend its key names, whatever became of the
client's connection; lib/pq, on a cancelled context, sends Terminate and closes while its cancel is on
the way. The proxy ended the session and ignored the late cancel, and closed the server connection, which
Postgres notices only when it next writes: the statement slept on, holding its snapshot, and a later test's
CREATE INDEX CONCURRENTLY waited for it. Each test runs the same steps directly and through the proxy:
a statement that runs long, the connection closed (with or without Terminate), then the cancel; the
statement must end within the deadline.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from differential import Wire, connect_direct, connect_proxy, send_cancel
from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres
from proxy.protocol import messages
from support import ACME, wait_until

DEADLINE = 10.0  # seconds for the cancelled statement to end; it sleeps six times as long if nothing cancels it


def running(pg: EmbeddedPostgres, marker: str) -> int:
    """Statements holding `marker` that run now (not the probe's own query)."""
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%{marker}%'"
                       " AND query NOT LIKE '%pg_stat_activity%'").strip() or 0)



@pytest.fixture
def marker(pg: EmbeddedPostgres) -> Iterator[str]:
    """A text unique to the test; a statement holding it left running by a failure is ended after it."""
    text = f"abandoned_{uuid.uuid4().hex[:12]}"
    yield text
    pg.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%{text}%'"
            " AND query NOT LIKE '%pg_stat_activity%'")


def abandon_and_cancel(wire: Wire, port: int, pg: EmbeddedPostgres, marker: str, terminate: bool) -> None:
    """Start a statement that sleeps 60 s, close the connection (after a Terminate, or without one), then
    cancel with the connection's key: the statement must end."""
    assert wire.key is not None
    wire.send(messages.query(f"SELECT pg_sleep(60) AS {marker}"))
    wait_until(lambda: running(pg, marker) == 1, deadline=20.0)
    if terminate:
        wire.send(messages.terminate())
    wire.sock.close()
    send_cancel(port, wire.key, DEADLINE)
    wait_until(lambda: running(pg, marker) == 0, deadline=DEADLINE)


@pytest.mark.parametrize("terminate", [True, False], ids=["terminate", "dropped"])
def test_directly_a_cancel_after_the_close_ends_the_statement(
    terminate: bool, marker: str, pg: EmbeddedPostgres, tenant_db: TenantDatabase
) -> None:
    wire = connect_direct(pg.port, tenant_db.app_role, tenant_db.app_password, tenant_db.database)
    abandon_and_cancel(wire, pg.port, pg, marker, terminate)


@pytest.mark.parametrize("terminate", [True, False], ids=["terminate", "dropped"])
@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_through_the_proxy_a_cancel_after_the_close_ends_the_statement(
    mode: str, terminate: bool, marker: str, make_proxy: Any, pg: EmbeddedPostgres
) -> None:
    proxy = make_proxy({"pool": {"mode": mode, "size": 2}})
    wire = connect_proxy(proxy.port, proxy.token(ACME))
    abandon_and_cancel(wire, proxy.port, pg, marker, terminate)
    assert proxy.alive()
