"""The hardening script: one list renders the SQL and the doctor's checks, and the docs name every item."""

from __future__ import annotations

from pathlib import Path

from proxy.hardening import PRIVILEGED_ROLES, REVOCATIONS, hardening_sql

SECURITY_DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"


def test_each_revocation_has_its_reason_and_call() -> None:
    script = hardening_sql("app_rls")
    for revocation in REVOCATIONS:
        assert f"-- {revocation.capability}: {revocation.risk}.\n" in script
    assert script.count("CALL pg_temp.pgtp_revoke(") == len(REVOCATIONS)
    assert "SET LOCAL pg_tenant_proxy.upstream_role = 'app_rls';" in script
    assert all(f"'{role}'" in script for role in PRIVILEGED_ROLES)
    assert "@" not in script  # every placeholder filled


def test_role_names_are_quoted_literals() -> None:
    assert "SET LOCAL pg_tenant_proxy.upstream_role = 'o''brien';" in hardening_sql("o'brien")


def test_without_a_role_the_script_needs_the_psql_variable() -> None:
    script = hardening_sql(None)
    assert "\\if :{?upstream_role}" in script
    assert "SET LOCAL pg_tenant_proxy.upstream_role = :'upstream_role';" in script


def test_the_security_doc_names_every_revoked_object() -> None:
    doc = SECURITY_DOC.read_text()
    for revocation in REVOCATIONS:
        for pattern in revocation.patterns:
            assert pattern.replace("\\", "").strip("%") in doc, pattern
    assert all(role in doc for role in PRIVILEGED_ROLES)
