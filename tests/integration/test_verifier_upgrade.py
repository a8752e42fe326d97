"""A verifier installed by an older release lacks functions the proxy calls (tenant_proxy.reset_session()
came later): `check --connect` and `doctor` say so in one line with the command that fixes it, and that
command does fix it. Against a real Postgres, in a database of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.demo import TenantDatabase, write_config
from proxy.embedded import EmbeddedPostgres, free_port
from proxy.verifier import verifier_sql
from support import REPO

DATABASE = "verifier_old"
CHECK = "verifier has every function the proxy calls"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.fixture(scope="module")
def old_database(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> str:
    pg.psql(f"CREATE DATABASE {DATABASE}; GRANT CONNECT ON DATABASE {DATABASE} TO {tenant_db.app_role}")
    pg.psql(verifier_sql("app.current_tenant", "tenant_proxy.proof", tenant_db.signing_key), DATABASE)
    return DATABASE


def doctor_finding(config: Path) -> tuple[int, dict[str, object]]:
    result = cli("doctor", "--config", str(config), "--json")
    assert result.returncode in (0, 1), result.stderr
    findings = {finding["check"]: finding for finding in json.loads(result.stdout)["findings"]}
    return result.returncode, findings[CHECK]


@pytest.mark.parametrize("drop", [
    "DROP FUNCTION tenant_proxy.reset_session()",
    "REVOKE EXECUTE ON FUNCTION tenant_proxy.reset_session() FROM PUBLIC",
], ids=["dropped", "not-executable"])
def test_check_and_doctor_name_a_missing_function_and_the_fix(
        pg: EmbeddedPostgres, tenant_db: TenantDatabase, old_database: str, tmp_path: Path, drop: str) -> None:
    config = write_config(tmp_path / "old.toml", pg, tenant_db, free_port(), {"upstream": {"database": old_database}})
    assert cli("check", "--config", str(config), "--connect").returncode == 0
    pg.psql(drop, old_database)
    result = cli("check", "--config", str(config), "--connect")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"pg-tenant-proxy: upstream: the verifier in database {old_database} lacks tenant_proxy.reset_session(),"
        f" which the proxy calls; install the current one: pg-tenant-proxy sql --config {config} | psql -f - ADMIN_DSN"
    ]
    status, finding = doctor_finding(config)
    assert status == 1 and finding["status"] == "fail" and finding["objects"] == ["tenant_proxy.reset_session()"]
    assert finding["fix"] == f"-- install the current verifier: pg-tenant-proxy sql --config {config} | psql -f - ADMIN_DSN"
    fix = cli("sql", "--config", str(config))  # what the line says to run
    assert fix.returncode == 0, fix.stderr
    pg.psql(fix.stdout, old_database)
    assert cli("check", "--config", str(config), "--connect").returncode == 0
    assert doctor_finding(config)[1]["status"] == "ok"
