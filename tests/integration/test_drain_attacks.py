"""SIGTERM drains at idle points only, also for the awkward ones: a client in the middle of COPY FROM
STDIN finishes it and commits before it is ended; a client whose transaction block failed can still
roll back; a client waiting in the pool's queue (its statement not run) ends at once, while the client
holding the connection finishes its transaction."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres, free_port
from proxy.protocol import errors, messages
from support import ACME, GLOBEX, ProxyProcess, RawClient, get, login, wait_until

TABLE = "drain_copy"


def query(client: RawClient, sql: str) -> list[tuple[bytes, bytes]]:
    client.send(messages.query(sql))
    return client.read_until(b"Z")


def ended_by_shutdown(client: RawClient) -> None:
    kind, body = client.read_message()
    assert kind == b"E", (kind, body)
    assert messages.parse_error_fields(body)["C"] == errors.ADMIN_SHUTDOWN
    assert client.closed()


@pytest.fixture(scope="module")
def copy_table(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> str:
    pg.psql(f"CREATE TABLE IF NOT EXISTS {TABLE} (x int); GRANT SELECT, INSERT ON {TABLE} TO {tenant_db.app_role};",
            tenant_db.database)
    return TABLE


def draining(proxy: ProxyProcess, http: int) -> None:
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGTERM)
    wait_until(lambda: get(http, "/readyz")[0] == 503)


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_drain_during_copy_failed_block_and_queue(pg: EmbeddedPostgres, tenant_db: TenantDatabase, tmp_path: Path,
                                                  copy_table: str, mode: str) -> None:
    http = free_port()
    proxy = ProxyProcess(pg, tenant_db, tmp_path, {"pool": {"mode": mode, "size": 2},
                                                    "http": {"listen": f"127.0.0.1:{http}"}}).start()
    copying, failed = RawClient(proxy.port), RawClient(proxy.port)
    waiting = RawClient(proxy.port) if mode == "transaction" else None
    try:
        login(copying, proxy.token(ACME))
        login(failed, proxy.token(GLOBEX))
        copying.send(messages.query(f"COPY {copy_table} FROM STDIN"))
        assert copying.read_message()[0] == b"G"
        copying.send(messages.message(b"d", f"{mode == 'session' and 1 or 2}\n".encode()))
        assert query(failed, "BEGIN")[-1] == (b"Z", b"T")
        assert query(failed, "SELECT 1/0")[-1][0] == b"E"
        assert failed.read_message() == (b"Z", b"E")
        if waiting is not None:  # both connections are held: a third client queues
            login(waiting, proxy.token(ACME))
            waiting.send(messages.query("SELECT tenant_proxy.current_tenant()"))
        draining(proxy, http)
        if waiting is not None:
            ended_by_shutdown(waiting)  # its statement never ran
        copying.send(messages.message(b"d", b"3\n") + messages.message(b"c"))
        assert [kind for kind, _ in copying.read_until(b"Z")] == [b"C", b"Z"]
        ended_by_shutdown(copying)
        assert query(failed, "ROLLBACK")[-2:] == [(b"C", b"ROLLBACK\0"), (b"Z", b"I")]
        ended_by_shutdown(failed)
        assert proxy.process is not None and proxy.process.wait(10) == 0
        expected = "1\n3" if mode == "session" else "2\n3"
        assert pg.psql(f"SELECT x FROM {copy_table} WHERE x IN (1, 2, 3) ORDER BY x", tenant_db.database).strip() == expected
    finally:
        for client in (copying, failed, waiting):
            if client is not None:
                client.close()
        proxy.stop()
        pg.psql(f"DELETE FROM {copy_table}", tenant_db.database)
