"""SIGHUP in the middle of traffic: many reloads in a row, some of them of a broken file and some that
shrink `[pool] size` while every server connection is busy, while clients of two tenants run
transactions. No client gets an error, every transaction sees its own tenant's context and rows, and
no client's setting shows in another's session. A SIGHUP that comes while the workers start is not lost."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.demo import TenantDatabase, wait_for_port, write_config
from proxy.embedded import EmbeddedPostgres
from support import ACME, GLOBEX, REPO, ROWS, ProxyProcess, wait_until

CLIENTS = 4
ROUNDS = 40


def client_loop(proxy: ProxyProcess, index: int, stop: threading.Event, problems: list[str]) -> None:
    tenant = (ACME, GLOBEX)[index % 2]
    name = f"client-{index}"
    try:
        with psycopg.connect(proxy.dsn(), password=proxy.token(tenant), autocommit=True) as conn:
            conn.execute(f"SET application_name = '{name}'")
            while not stop.is_set():
                with conn.transaction():
                    row = conn.execute("SELECT tenant_proxy.current_tenant(), count(*), current_setting('application_name')"
                                       " FROM leads").fetchone()
                if row != (tenant, ROWS[tenant], name):
                    problems.append(f"{name}: {row}")
                row = conn.execute("SELECT tenant_proxy.current_tenant(), count(*) FROM leads").fetchone()
                if row != (tenant, ROWS[tenant]):
                    problems.append(f"{name} (autocommit): {row}")
    except psycopg.Error as exc:
        problems.append(f"{name}: {exc.sqlstate} {exc}")


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_reloads_in_a_row_under_traffic(pg: EmbeddedPostgres, tenant_db: TenantDatabase, tmp_path: Path,
                                        mode: str) -> None:
    size = CLIENTS if mode == "session" else 2
    overrides: dict[str, dict[str, Any]] = {"pool": {"mode": mode, "size": size}}
    proxy = ProxyProcess(pg, tenant_db, tmp_path, overrides).start()
    assert proxy.process is not None
    stop, problems = threading.Event(), []
    threads = [threading.Thread(target=client_loop, args=(proxy, index, stop, problems)) for index in range(CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        for round_ in range(ROUNDS):
            if round_ % 4 == 3:
                proxy.config.write_text("[pool\nsize = = 3\n")  # broken: the running configuration stays
            else:
                smaller = {"size": max(1, size - round_ % 3)} if mode == "transaction" else {}
                write_config(proxy.config, pg, tenant_db, proxy.port, {"pool": {"mode": mode, "size": size, **smaller}})
            before = proxy.log().count("configuration reload")
            for _ in range(1 + 5 * (round_ % 10 == 9)):  # now and then a burst, which may count as one reload
                proxy.process.send_signal(signal.SIGHUP)
            wait_until(lambda: proxy.log().count("configuration reload") > before, deadline=30)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        proxy.stop()
    assert problems == []
    log = proxy.log()
    assert "Traceback" not in log
    assert log.count("configuration reload result=error") >= ROUNDS // 4  # every broken file was refused


def catches_sighup(pid: int) -> bool:
    """Whether process `pid` has a handler for SIGHUP (SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return False


def test_a_sighup_while_the_workers_start_reaches_every_worker(pg: EmbeddedPostgres, tenant_db: TenantDatabase,
                                                              tmp_path: Path) -> None:
    """With workers = N, a new JWT secret and a SIGHUP while the workers are still starting: whether the
    signal reaches a worker before it serves (remembered, reloaded once it serves) or before it is
    forked (it reads the file as it starts), every worker ends up with the new secret."""
    overrides: dict[str, dict[str, Any]] = {"": {"workers": 2}}
    proxy = ProxyProcess(pg, tenant_db, tmp_path, overrides)
    old_token = proxy.token(ACME)
    secret = "the-early-reload-secret-" + "e" * 16
    with open(proxy.logfile, "wb") as log:
        proxy.process = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(proxy.config)],
                                         stderr=log, cwd=REPO)
    try:
        wait_until(lambda: catches_sighup(proxy.process.pid))  # the supervisor forwards it from here on
        write_config(proxy.config, pg, tenant_db, proxy.port, {**overrides, "jwt": {"secret": secret}})
        proxy.process.send_signal(signal.SIGHUP)
        wait_for_port(proxy.port, proxy.process)
        new_token = proxy.token(ACME, secret=secret)
        for _ in range(8):  # SO_REUSEPORT spreads them over both workers
            with psycopg.connect(proxy.dsn(), password=new_token) as conn:
                assert conn.execute("SELECT tenant_proxy.current_tenant()").fetchone() == (ACME,)
            with pytest.raises(psycopg.OperationalError, match="signature"):
                psycopg.connect(proxy.dsn(), password=old_token)
        # One signal, one reload per worker at most (none for a worker forked after it): a worker that took
        # it both as held and from its loop's self-pipe logged two audit events for it.
        assert proxy.log().count("configuration reload") <= 2, proxy.log()
        assert proxy.alive()
    finally:
        proxy.stop()
