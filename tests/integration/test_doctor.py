"""`pg-tenant-proxy doctor` finds each planted mistake, and passes a database set up as the README says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.demo import TenantDatabase, write_config
from proxy.embedded import EmbeddedPostgres
from proxy.verifier import verifier_sql
from support import REPO

MISTAKES = """
CREATE TABLE no_rls (tenant_id uuid, body text);
CREATE INDEX ON no_rls (tenant_id);
CREATE TABLE no_force (tenant_id uuid, body text);
ALTER TABLE no_force ENABLE ROW LEVEL SECURITY;
CREATE POLICY strict ON no_force USING (tenant_id = (SELECT tenant_proxy.current_tenant())::uuid);
CREATE TABLE raw_setting (tenant_id uuid, body text);
ALTER TABLE raw_setting ENABLE ROW LEVEL SECURITY; ALTER TABLE raw_setting FORCE ROW LEVEL SECURITY;
CREATE POLICY raw ON raw_setting USING (tenant_id = current_setting('app.current_tenant')::uuid)
    WITH CHECK (tenant_id = current_setting('app.current_tenant')::uuid);
CREATE INDEX ON raw_setting (tenant_id);
CREATE FUNCTION public.frozen_tenant() RETURNS uuid LANGUAGE sql IMMUTABLE
    AS $$ SELECT current_setting('app.current_tenant')::uuid $$;
CREATE TABLE immutable_helper (tenant_id uuid PRIMARY KEY);
ALTER TABLE immutable_helper ENABLE ROW LEVEL SECURITY; ALTER TABLE immutable_helper FORCE ROW LEVEL SECURITY;
CREATE POLICY frozen ON immutable_helper USING (tenant_id = public.frozen_tenant()) WITH CHECK (true);
CREATE TABLE no_check (tenant_id uuid PRIMARY KEY);
ALTER TABLE no_check ENABLE ROW LEVEL SECURITY; ALTER TABLE no_check FORCE ROW LEVEL SECURITY;
CREATE POLICY only_using ON no_check USING (tenant_id = (SELECT tenant_proxy.current_tenant())::uuid);
CREATE VIEW definer_view AS SELECT * FROM no_check;
CREATE VIEW invoker_view WITH (security_invoker = true) AS SELECT * FROM no_check;
CREATE MATERIALIZED VIEW snapshot AS SELECT * FROM no_check;
GRANT CREATE ON SCHEMA public TO tenant_app;
CREATE TABLE owned_by_app (tenant_id uuid PRIMARY KEY);
ALTER TABLE owned_by_app ENABLE ROW LEVEL SECURITY; ALTER TABLE owned_by_app FORCE ROW LEVEL SECURITY;
CREATE POLICY strict ON owned_by_app USING (tenant_id = (SELECT tenant_proxy.current_tenant())::uuid)
    WITH CHECK (tenant_id = (SELECT tenant_proxy.current_tenant())::uuid);
ALTER TABLE owned_by_app OWNER TO tenant_app;
"""


def doctor(config: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "doctor", "--config", str(config), "--json", *extra],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    return result.returncode, {f["check"]: f for f in report["findings"]}


@pytest.fixture(scope="module")
def bad_database(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> str:
    pg.psql(f"CREATE DATABASE doctor_bad; GRANT CONNECT ON DATABASE doctor_bad TO {tenant_db.app_role}")
    pg.psql(verifier_sql("app.current_tenant", "tenant_proxy.proof", tenant_db.signing_key), "doctor_bad")
    pg.psql(MISTAKES, "doctor_bad")
    return "doctor_bad"


def config_for(pg: EmbeddedPostgres, db: TenantDatabase, tmp_path: Path, **upstream: Any) -> Path:
    return write_config(tmp_path / "doctor.toml", pg, db, 6432, {"upstream": upstream} if upstream else None)


def test_good_database_passes(pg: EmbeddedPostgres, tenant_db: TenantDatabase, tmp_path: Path) -> None:
    status, findings = doctor(config_for(pg, tenant_db, tmp_path), "--admin-dsn", pg.admin_dsn())
    failed = {name: f for name, f in findings.items() if f["status"] == "fail"}
    assert status == 0 and not failed, failed
    assert findings["verifier installed and key matches"]["status"] == "ok"
    assert findings["tenant tables (tenant_id) without RLS"]["status"] == "ok"
    assert findings["other sessions of the upstream role are visible"]["status"] == "warn"


def test_planted_mistakes_are_found(pg: EmbeddedPostgres, tenant_db: TenantDatabase, bad_database: str,
                                    tmp_path: Path) -> None:
    status, findings = doctor(config_for(pg, tenant_db, tmp_path, database=bad_database))
    assert status == 1

    def objects(check: str, status: str) -> list[str]:
        assert findings[check]["status"] == status, findings[check]
        assert findings[check]["fix"], findings[check]
        return findings[check]["objects"]

    assert objects("tenant tables (tenant_id) without RLS", "fail") == ["no_rls"]
    assert objects("tenant tables (tenant_id) without FORCE RLS", "fail") == ["no_force"]
    assert objects("upstream role owns tenant tables", "fail") == ["owned_by_app"]
    assert objects("policies read the raw tenant setting", "warn") == ["raw on raw_setting"]
    assert objects("policies call an IMMUTABLE function", "fail") == ["frozen on immutable_helper calls frozen_tenant()"]
    assert "only_using on no_check" in objects("policies without WITH CHECK", "warn")
    assert objects("views over tenant tables without security_invoker", "warn") == ["definer_view"]
    assert objects("materialized views over tenant tables", "warn") == ["snapshot"]
    assert objects("upstream role can CREATE in a schema", "warn") == ["public"]
    assert "no_force" in objects("tenant tables without an index leading with tenant_id", "warn")
    assert findings["verifier installed and key matches"]["status"] == "ok"


def test_key_mismatch_and_missing_verifier(pg: EmbeddedPostgres, tenant_db: TenantDatabase, tmp_path: Path) -> None:
    wrong_key = write_config(tmp_path / "wrong.toml", pg, tenant_db, 6432, {"tenant": {"signing_key": "w" * 40}})
    status, findings = doctor(wrong_key)
    assert status == 1
    assert "key mismatch" in " ".join(findings["verifier installed and key matches"]["objects"])
    pg.psql(f"CREATE DATABASE doctor_empty; GRANT CONNECT ON DATABASE doctor_empty TO {tenant_db.app_role}")
    status, findings = doctor(config_for(pg, tenant_db, tmp_path, database="doctor_empty"))
    assert status == 1
    assert findings["verifier installed and key matches"]["detail"] == "the verifier is not installed"


def test_privileged_upstream_role_fails(pg: EmbeddedPostgres, tenant_db: TenantDatabase, tmp_path: Path) -> None:
    pg.psql("CREATE ROLE doctor_bypass LOGIN BYPASSRLS PASSWORD 'bypass-secret'")
    pg.psql("GRANT CONNECT ON DATABASE app TO doctor_bypass")
    status, findings = doctor(config_for(pg, tenant_db, tmp_path, user="doctor_bypass", password="bypass-secret"))
    assert status == 1
    assert findings["upstream role bypasses RLS"]["objects"] == ["doctor_bypass (BYPASSRLS)"]


def test_terminal_table(pg: EmbeddedPostgres, tenant_db: TenantDatabase, bad_database: str, tmp_path: Path) -> None:
    config = config_for(pg, tenant_db, tmp_path, database=bad_database)
    result = subprocess.run([sys.executable, "-m", "proxy", "doctor", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 1
    assert "FAIL  tenant tables (tenant_id) without RLS" in result.stdout
    assert "fix: ALTER TABLE no_rls ENABLE ROW LEVEL SECURITY;" in result.stdout
    assert tenant_db.app_password not in result.stdout + result.stderr
