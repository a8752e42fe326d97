"""docker-compose.yml's scripts work, run outside Docker (there is none here) on a fresh cluster: the
`secrets` service's make-secrets.sh and the `db` service's init script build a database that the proxy,
with the compose configuration and without psycopg (as in the image), serves with each tenant isolated.

Only what Docker would provide is stood in for: the container paths become local ones, the `db` host
and the ports become the cluster's and free ones, and the `[http]` table is left out while proxy.config
does not know it yet (see OPERATIONS_KEYS in tests/examples.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from proxy import config
from proxy.demo import TENANTS, wait_for_port
from proxy.embedded import EmbeddedPostgres, free_port
from examples import WITHOUT_PSYCOPG, toml_text
from support import REPO

COMPOSE = REPO / "config" / "compose"


def compose_config(pg: EmbeddedPostgres, secrets: Path, port: int) -> str:
    """config/compose/pg-tenant-proxy.toml pointed at this cluster, the secrets directory and free ports."""
    raw = tomllib.loads((COMPOSE / "pg-tenant-proxy.toml").read_text())
    raw["listen"] = f"127.0.0.1:{port}"
    raw["http"]["listen"] = f"127.0.0.1:{free_port()}"
    raw["upstream"].update(host="127.0.0.1", port=pg.port)
    if ("http", "listen") not in config.SCHEMA:
        del raw["http"]
    return toml_text(raw).replace("/run/secrets/pgtp", str(secrets))


def run_script(script: Path, replacements: dict[str, str], env: dict[str, str], shell: str) -> None:
    text = script.read_text()
    for old, new in replacements.items():
        text = text.replace(old, new)
    result = subprocess.run([shell, "-c", text], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{script.name}:\n{result.stdout}\n{result.stderr}"


def test_compose_scripts_build_an_isolated_database(tmp_path: Path) -> None:
    pg = EmbeddedPostgres().start()
    proxy: subprocess.Popen[bytes] | None = None
    try:
        secrets, port = tmp_path / "secrets", free_port()
        secrets.mkdir()
        proxy_config = tmp_path / "pg-tenant-proxy.toml"
        proxy_config.write_text(compose_config(pg, secrets, port))
        env = {name: value for name, value in os.environ.items() if not name.startswith("PG")}
        env.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), str(pg.bindir), env["PATH"]]),
                   PGHOST=str(pg.socket_dir), PGPORT=str(pg.port), POSTGRES_USER="postgres")
        paths = {"/run/secrets/pgtp": str(secrets), "/etc/pg-tenant-proxy/pg-tenant-proxy.toml": str(proxy_config),
                 "/demo/demo.sql": str(REPO / "proxy" / "sql" / "demo.sql")}
        run_script(COMPOSE / "make-secrets.sh", paths, env, "sh")
        run_script(COMPOSE / "initdb.sh", paths, env, "bash")
        proxy = subprocess.Popen([sys.executable, "-c", WITHOUT_PSYCOPG, "run", "--config", str(proxy_config)],
                                 stderr=subprocess.DEVNULL, cwd=REPO)
        wait_for_port(port, proxy)
        for tenant in TENANTS.values():
            token = subprocess.run([sys.executable, "-m", "proxy", "token", "--config", str(proxy_config),
                                    "--tenant", str(tenant)], capture_output=True, text=True, check=True, cwd=REPO)
            seen = subprocess.run(["psql", "-X", "-A", "-t", f"postgresql://alice@127.0.0.1:{port}/app", "-c",
                                   "SELECT DISTINCT tenant_id FROM leads"],
                                  env={**env, "PGPASSWORD": token.stdout.strip()}, capture_output=True, text=True)
            assert seen.stdout.split() == [str(tenant)], seen.stderr
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
        pg.stop()
