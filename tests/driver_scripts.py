"""Driver client scripts (tests/integration/clients/) run directly against Postgres and through the proxy.

Each script reads DRIVER_CONFIG (JSON: where to connect, the two clients' logins, and for direct runs the
signing key and tenants with which it sets each connection's context itself, as the proxy would) and
prints one JSON object per step: {"step": name, ...its result or error}. The two runs are compared step by
step.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from typing import Any

from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres
from support import ACME, GLOBEX, ProxyProcess

Steps = list[dict[str, Any]]

# The pool modes the driver scripts run in: transaction mode over two server connections, so one client's
# open transaction moves the other's statements between server connections.
MODES = {"session": {"pool": {"mode": "session"}}, "transaction": {"pool": {"mode": "transaction", "size": 2}}}
# The one documented difference: LISTEN is refused by the proxy, (SQLSTATE, message) by pool mode.
LISTEN_REFUSED = {
    "session": ("42501", "LISTEN is not allowed through pg-tenant-proxy: notification channels are shared by every tenant"),
    "transaction": ("0A000", "LISTEN is not available with transaction pooling: the server connection is shared after each transaction"),
}


def run_script(command: list[str], config: dict[str, Any], timeout: float = 240.0) -> Steps:
    """Run a client script with DRIVER_CONFIG (a fresh run number) and return its steps; fails the test
    when it exits with an error or runs past `timeout` seconds (naming its last steps)."""
    environment = {**os.environ, "DRIVER_CONFIG": json.dumps({**config, "run": secrets.randbelow(1 << 28)})}
    try:
        result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as expired:
        steps = (expired.stdout or b"").decode(errors="replace").splitlines()
        raise AssertionError(f"{command[-1]} did not finish within {timeout:.0f} s; its last steps: {steps[-2:]}") from None
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def direct_run(command: list[str], pg: EmbeddedPostgres, db: TenantDatabase, timeout: float = 240.0, **extra: Any) -> Steps:
    """The script straight against Postgres as the application role, both clients with the tenants' context
    set by the script itself (`context`)."""
    role = {"user": db.app_role, "password": db.app_password}
    return run_script(command, {"host": "127.0.0.1", "port": pg.port, "database": db.database, "clients": {"a": role, "b": role},
                                "context": {"key": db.signing_key, "tenants": {"a": ACME, "b": GLOBEX}}, **extra}, timeout)


def proxy_run(command: list[str], proxy: ProxyProcess, timeout: float = 240.0, **extra: Any) -> Steps:
    """The script through the proxy: client a with an ACME token, client b with a GLOBEX one."""
    return run_script(command, {"host": "127.0.0.1", "port": proxy.port, "database": "app", "context": None,
                                "clients": {"a": {"user": "alice", "password": proxy.token(ACME)},
                                            "b": {"user": "bob", "password": proxy.token(GLOBEX)}}, **extra}, timeout)


def without_listen(steps: Steps) -> tuple[Steps, dict[str, Any]]:
    """The steps but LISTEN (which the proxy refuses, as documented), and the LISTEN step."""
    (listen,) = [step for step in steps if step["step"] == "listen"]
    return [step for step in steps if step is not listen], listen


def assert_same_steps(expected: Steps, got: Steps) -> None:
    """The same steps with the same results, each step that differs named with both runs' results."""
    assert [step["step"] for step in got] == [step["step"] for step in expected]
    differing = [f"step {direct['step']!r}:\n  direct: {json.dumps(direct)}\n  proxied: {json.dumps(proxied)}"
                 for direct, proxied in zip(expected, got) if proxied != direct]
    assert not differing, "\n".join(differing)
