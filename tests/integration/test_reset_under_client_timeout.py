"""Transaction mode: the reset that passes a server connection to another tenant does not run under the
`statement_timeout` the previous client left on it. A client that sets many placeholder settings (which
make the reset's RESET ALL slow) and a 1 ms statement_timeout must not end the next tenant's session
with "could not prepare a server connection ... canceling statement due to statement timeout": directly,
one session's settings never touch another's."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from support import ACME, GLOBEX, ProxyProcess
from proxy.embedded import EmbeddedPostgres

PLACEHOLDERS = "SELECT count(set_config('slow.p' || g, 'v', false)) FROM generate_series(1, 3000) AS g"


@pytest.fixture(scope="module")
def single(pg: EmbeddedPostgres, tenant_db: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    process = ProxyProcess(pg, tenant_db, tmp_path_factory.mktemp("reset_timeout"),
                           {"pool": {"mode": "transaction", "size": 1}}).start()
    yield process
    process.stop()


@pytest.mark.parametrize("timeout", ["SET statement_timeout = 1", "SELECT set_config(n, '1', false) FROM"
                                     " (VALUES ('statement' || '_timeout')) AS v(n)"])
def test_a_short_timeout_left_behind_ends_no_other_session(single: ProxyProcess, timeout: str) -> None:
    with psycopg.connect(single.dsn(), password=single.token(GLOBEX), autocommit=True) as victim:
        for _ in range(3):
            # A client of its own each time: its next statement would meet its own 1 ms timeout.
            with psycopg.connect(single.dsn(), password=single.token(ACME), autocommit=True) as attacker:
                attacker.execute(PLACEHOLDERS)
                attacker.execute(timeout)
                assert victim.execute("SELECT tenant_proxy.current_tenant()").fetchone() == (GLOBEX,)
                assert victim.execute("SHOW statement_timeout").fetchone() == ("0",)


def test_an_idle_session_timeout_left_behind_ends_no_other_session(single: ProxyProcess) -> None:
    """A client's `SET idle_session_timeout = '1ms'` stays on its server connection, where it ends the
    backend once the connection idles in the pool: the next client, of another tenant, got that backend's
    FATAL 57P05 when it took the connection just before the timer fired (2 in 300 handovers on the
    development machine). Such a connection is closed when its transaction ends instead of going back to
    the pool. The setting's own client may meet its own timeout (as directly, where any pause between its
    statements ends its session): it connects again."""
    with psycopg.connect(single.dsn(), password=single.token(GLOBEX), autocommit=True) as victim:
        setter = None
        for index in range(300):
            try:
                if setter is None or setter.closed:
                    setter = psycopg.connect(single.dsn(), password=single.token(ACME), autocommit=True)
                    setter.execute("SET idle_session_timeout = '1ms'")
                setter.execute("SELECT 1")
            except psycopg.OperationalError:
                pass  # its own timeout
            time.sleep(index % 4 * 0.0005)
            assert victim.execute("SELECT tenant_proxy.current_tenant()").fetchone() == (GLOBEX,)
        if setter is not None:
            setter.close()
