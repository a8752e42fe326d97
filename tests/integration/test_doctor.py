"""`pg-tenant-proxy doctor` finds each planted mistake, and passes a database set up as the README says."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from certificates import make_certificates, make_client_certificate
from proxy.config import ConfigError, load
from proxy.demo import TenantDatabase, prepare_database, write_config
from proxy.embedded import EmbeddedPostgres
from proxy.hardening import REVOCATIONS, ObjectKind, hardening_sql
from proxy.verifier import verifier_sql
from support import ACME, REPO, ROWS, ProxyProcess

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
-- What the old doctor prescribed for other sessions' activity: it leaves pg_stat_get_backend_activity.
REVOKE SELECT ON pg_catalog.pg_stat_activity FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION pg_catalog.pg_stat_get_activity(integer) FROM PUBLIC;
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
    assert findings["upstream role can read other sessions' activity and statistics"]["status"] == "ok"
    assert findings["upstream role logs in with a password it can change"]["status"] == "warn"


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
    assert objects("policies read the raw tenant setting", "fail") == ["raw on raw_setting"]
    assert objects("policies call an IMMUTABLE function", "fail") == ["frozen on immutable_helper calls frozen_tenant()"]
    assert "only_using on no_check" in objects("policies without WITH CHECK", "warn")
    assert objects("views over tenant tables without security_invoker", "warn") == ["definer_view"]
    assert objects("materialized views over tenant tables", "warn") == ["snapshot"]
    assert objects("upstream role can CREATE in a schema", "fail") == ["public"]
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


def test_plain_policies_pass_only_when_allowed(pg: EmbeddedPostgres, tenant_db: TenantDatabase, bad_database: str,
                                               tmp_path: Path) -> None:
    """A policy on the plain setting fails the audit; --allow-plain-policies turns it into a warning."""
    _, findings = doctor(config_for(pg, tenant_db, tmp_path, database=bad_database), "--allow-plain-policies")
    assert findings["policies read the raw tenant setting"]["status"] == "warn"
    assert "--allow-plain-policies" in findings["policies read the raw tenant setting"]["detail"]


def test_unhardened_role_fails_each_capability(pg: EmbeddedPostgres, tenant_db: TenantDatabase, bad_database: str,
                                               tmp_path: Path) -> None:
    """Without the hardening SQL every cross-tenant capability fails, pg_stat_get_backend_activity included
    although pg_stat_activity and pg_stat_get_activity were revoked (the old doctor said OK there)."""
    _, findings = doctor(config_for(pg, tenant_db, tmp_path, database=bad_database))
    for revocation in REVOCATIONS:
        finding = findings[f"upstream role can {revocation.capability}"]
        if revocation.kind is not ObjectKind.EXTENSION:  # none is installed in this database
            assert finding["status"] == "fail" and finding["detail"] == revocation.risk, finding
    activity = findings["upstream role can read other sessions' activity and statistics"]["objects"]
    assert "pg_catalog.pg_stat_get_backend_activity(integer)" in activity
    assert "pg_catalog.pg_stat_get_activity(integer)" not in activity
    assert findings["upstream role can use a procedural language"]["objects"] == ["plpgsql"]
    assert findings["upstream role can create TEMP objects or schemas"]["objects"] == ["TEMPORARY"]


@pytest.mark.parametrize("gap, check", [
    ("GRANT TEMPORARY ON DATABASE app TO tenant_app", "upstream role can create TEMP objects or schemas"),
    ("GRANT CREATE ON SCHEMA tenant_proxy TO tenant_app", "upstream role can CREATE in a schema"),
    ("GRANT USAGE ON LANGUAGE plpgsql TO tenant_app", "upstream role can use a procedural language"),
    ("GRANT TRUNCATE ON leads TO tenant_app", "upstream role holds privileges that bypass RLS"),
    ("GRANT pg_write_server_files TO tenant_app", "upstream role is a member of a privileged predefined role"),
    ("GRANT EXECUTE ON FUNCTION pg_stat_get_backend_activity(integer) TO tenant_app",
     "upstream role can read other sessions' activity and statistics"),
    ("GRANT EXECUTE ON FUNCTION pg_terminate_backend(integer, bigint) TO PUBLIC", "upstream role can signal other backends"),
    ("GRANT EXECUTE ON FUNCTION lo_get(oid) TO tenant_app", "upstream role can use large objects"),
    ("GRANT EXECUTE ON FUNCTION query_to_xml(text, boolean, boolean, text) TO PUBLIC",
     "upstream role can run SQL text the guard never sees"),
    ("GRANT EXECUTE ON FUNCTION pg_notify(text, text) TO tenant_app", "upstream role can send notifications"),
    ("GRANT EXECUTE ON FUNCTION setseed(double precision) TO tenant_app", "upstream role can seed the random generator"),
])
def test_each_gap_fails_and_its_fix_closes_it(pg: EmbeddedPostgres, tenant_db: TenantDatabase, tmp_path: Path,
                                               gap: str, check: str) -> None:
    """Reopen one capability on the hardened database: the doctor fails that check alone, and the SQL it
    prints, run as the admin, closes it again."""
    config = config_for(pg, tenant_db, tmp_path)
    pg.psql(gap, tenant_db.database)
    try:
        status, findings = doctor(config)
        assert status == 1
        assert [name for name, f in findings.items() if f["status"] == "fail"] == [check]
        pg.psql(findings[check]["fix"], tenant_db.database)
        status, findings = doctor(config)
        assert status == 0 and findings[check]["status"] == "ok", findings[check]
    finally:
        pg.psql(hardening_sql(tenant_db.app_role), tenant_db.database)


@pytest.fixture(scope="module")
def cert_pg() -> Iterator[tuple[EmbeddedPostgres, TenantDatabase, dict[str, Path]]]:
    """A cluster with TLS where the role cert_app (a member of tenant_app) logs in by client certificate only."""
    directory = Path(tempfile.mkdtemp(prefix="pgtp-certs-"))  # readable by the postgres user, unlike tmp_path
    directory.chmod(0o755)
    _, server_cert, server_key = make_certificates(directory)
    client_ca, client_cert, client_key = make_client_certificate(directory, "cert_app")
    if os.geteuid() == 0:
        for path in (server_cert, server_key, client_ca):
            shutil.chown(path, "postgres", "postgres")
    cluster = EmbeddedPostgres(
        settings={"ssl": "on", "ssl_cert_file": str(server_cert), "ssl_key_file": str(server_key),
                  "ssl_ca_file": str(client_ca)},
        hba=["hostssl all cert_app 127.0.0.1/32 cert", "host all cert_app 127.0.0.1/32 reject"],
    ).start()
    db = prepare_database(cluster)
    cluster.psql("CREATE ROLE cert_app LOGIN IN ROLE tenant_app")
    yield cluster, db, {"sslcert": client_cert, "sslkey": client_key, "other_key": server_key}
    cluster.stop()
    shutil.rmtree(directory, ignore_errors=True)


def test_client_certificate_login(cert_pg: tuple[EmbeddedPostgres, TenantDatabase, dict[str, Path]],
                                  tmp_path: Path) -> None:
    """The proxy and the doctor log in upstream with [upstream] sslcert / sslkey and no password: a
    password the role could change from SQL no longer opens the door, and the doctor has nothing to warn."""
    cluster, db, files = cert_pg
    upstream = {"user": "cert_app", "password": None, "sslmode": "require",
                "sslcert": str(files["sslcert"]), "sslkey": str(files["sslkey"])}
    proxy = ProxyProcess(cluster, db, tmp_path, {"upstream": upstream}).start()
    try:
        with psycopg.connect(proxy.dsn(), password=proxy.token(ACME)) as conn:
            assert conn.execute("SELECT current_user, count(*) FROM leads").fetchone() == ("cert_app", ROWS[ACME])
    finally:
        proxy.stop()
    status, findings = doctor(write_config(tmp_path / "cert.toml", cluster, db, 6432, {"upstream": upstream}))
    assert status == 0, {name: f for name, f in findings.items() if f["status"] != "ok"}
    assert findings["upstream role logs in with a password it can change"]["status"] == "ok"
    mismatched = write_config(tmp_path / "mismatched.toml", cluster, db, 6432,
                              {"upstream": {**upstream, "sslkey": str(files["other_key"])}})
    with pytest.raises(ConfigError, match="upstream.sslcert and upstream.sslkey: not a certificate"):
        load(mismatched)


def test_sql_command_hardens_a_fresh_database(pg: EmbeddedPostgres, tenant_db: TenantDatabase, tmp_path: Path) -> None:
    """`pg-tenant-proxy sql --config FILE`, piped to psql twice (it is idempotent), leaves the upstream
    role none of the capabilities the doctor looks for."""
    pg.psql(f"CREATE DATABASE doctor_fresh; GRANT CONNECT ON DATABASE doctor_fresh TO {tenant_db.app_role}")
    config = config_for(pg, tenant_db, tmp_path, database="doctor_fresh")
    script = subprocess.run([sys.executable, "-m", "proxy", "sql", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, cwd=REPO, check=True).stdout
    _, before = doctor(config)
    pg.psql(script, "doctor_fresh")
    pg.psql(script, "doctor_fresh")
    status, after = doctor(config)
    role_checks = [name for name in after if name.startswith("upstream role can")]
    assert len(role_checks) >= len(REVOCATIONS)
    assert [name for name in role_checks if before[name]["status"] == "fail"]
    assert {name: after[name]["objects"] for name in role_checks if after[name]["status"] != "ok"} == {}
    assert status == 0
