"""tenant_proxy.claims() and claim() in a real database: the settings are set directly, as the proxy's
context statement sets them, so the claims proof's bindings are tested without the proxy."""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg
import pytest

from support import ACME, GLOBEX
from proxy.auth.claims import canonical_json, sign_claims
from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres
from proxy.tenant import sign
from test_verifier import direct

CLAIMS = {"sub": "alice", "role": "editor", "name": "Zoë 🚀"}


def set_claims(conn: psycopg.Connection[Any], tenant: str, claims: str, tenant_proof: str, claims_proof: str) -> Any:
    """Set the four values the proxy sets, then read claims() in a later statement."""
    conn.execute(
        "SELECT set_config('app.current_tenant', %s, false), set_config('tenant_proxy.proof', %s, false),"
        " set_config('request.jwt.claims', %s, false), set_config('tenant_proxy.claims_proof', %s, false)",
        (tenant, tenant_proof, claims, claims_proof),
    )
    return conn.execute("SELECT tenant_proxy.claims()").fetchone()[0]


def proofs(key: bytes, tenant: str, pid: int, expires: int, claims: str) -> tuple[str, str]:
    return sign(key, tenant, pid, expires), sign_claims(key, tenant, pid, expires, claims)


def test_claims_are_returned_only_when_the_proof_checks(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    key = tenant_db.signing_key.encode()
    later = int(time.time()) + 600
    text = canonical_json(CLAIMS)
    with direct(pg, tenant_db) as conn, direct(pg, tenant_db) as other:
        pid = conn.info.backend_pid
        tenant_proof, claims_proof = proofs(key, ACME, pid, later, text)
        assert set_claims(conn, ACME, text, tenant_proof, claims_proof) == CLAIMS
        assert conn.execute("SELECT tenant_proxy.claim('sub'), tenant_proxy.claim('name'),"
                            " tenant_proxy.claim('absent')").fetchone() == ("alice", "Zoë 🚀", None)
        # A forged request.jwt.claims under a valid proof for other claims: NULL.
        forged = canonical_json({**CLAIMS, "role": "admin"})
        assert set_claims(conn, ACME, forged, tenant_proof, claims_proof) is None
        assert conn.execute("SELECT tenant_proxy.claim('role')").fetchone()[0] is None
        # The claims setting alone, with no proof at all: NULL (yet current_setting() reads it).
        conn.execute("SELECT set_config('tenant_proxy.claims_proof', '', false)")
        assert conn.execute("SELECT tenant_proxy.claims(), current_setting('request.jwt.claims')").fetchone() == (
            None, forged)
        # Replayed on another backend: NULL.
        assert set_claims(other, ACME, text, tenant_proof, claims_proof) is None
        # Claims signed for one tenant do not vouch for another's context, even with a valid tenant proof.
        globex_proof = sign(key, GLOBEX, pid, later)
        assert set_claims(conn, GLOBEX, text, globex_proof, claims_proof) is None
        # No verified tenant, no claims: the tenant proof must check too.
        assert set_claims(conn, ACME, text, sign(b"x" * 40, ACME, pid, later), claims_proof) is None
        # Expired, another key, or the tenant proof passed off as the claims proof: NULL.
        assert set_claims(conn, ACME, text, *proofs(key, ACME, pid, int(time.time()) - 1, text)) is None
        assert set_claims(conn, ACME, text, tenant_proof, sign_claims(b"x" * 40, ACME, pid, later, text)) is None
        assert set_claims(conn, ACME, text, tenant_proof, tenant_proof) is None
        assert set_claims(conn, ACME, text, tenant_proof, claims_proof) == CLAIMS


def test_a_different_split_of_the_signed_text_is_refused(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    """The signed text is "<pid>:<expiry>:<tenant>:<claims>"; moving a ':' between tenant and claims keeps
    the claims HMAC but not the tenant proof, so claims() is NULL."""
    key = tenant_db.signing_key.encode()
    later = int(time.time()) + 600
    with direct(pg, tenant_db) as conn:
        pid = conn.info.backend_pid
        tenant_proof, claims_proof = proofs(key, "a:{}", pid, later, "{}")
        assert set_claims(conn, "a:{}", "{}", tenant_proof, claims_proof) == {}
        assert set_claims(conn, "a", "{}:{}", tenant_proof, claims_proof) is None


@pytest.mark.parametrize("claims_proof", ["", "abc", "1:2", ":" + "0" * 64, "9" * 30 + ":" + "0" * 64, "x" * 200])
def test_garbage_never_raises(pg: EmbeddedPostgres, tenant_db: TenantDatabase, claims_proof: str) -> None:
    key = tenant_db.signing_key.encode()
    later = int(time.time()) + 600
    with direct(pg, tenant_db) as conn:
        tenant_proof = sign(key, ACME, conn.info.backend_pid, later)
        for claims in ("", "not json", "[1]", "{", '{"a":1}'):
            assert set_claims(conn, ACME, claims, tenant_proof, claims_proof) is None


def test_per_user_policy(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    """The policy docs/identity.md shows: rows owned by the token's subject, within its tenant."""
    pg.psql(
        "CREATE TABLE IF NOT EXISTS notes (tenant_id uuid, owner text, body text);"
        "ALTER TABLE notes ENABLE ROW LEVEL SECURITY; ALTER TABLE notes FORCE ROW LEVEL SECURITY;"
        "DROP POLICY IF EXISTS own_notes ON notes;"
        "CREATE POLICY own_notes ON notes USING (tenant_id = (SELECT tenant_proxy.current_tenant())::uuid"
        " AND owner = (SELECT tenant_proxy.claim('sub')));"
        f"TRUNCATE notes; INSERT INTO notes VALUES ('{ACME}', 'alice', 'a1'), ('{ACME}', 'alice', 'a2'),"
        f" ('{ACME}', 'bob', 'b1'), ('{GLOBEX}', 'alice', 'g1');"
        f"GRANT SELECT ON notes TO {tenant_db.app_role};",
        tenant_db.database,
    )
    key = tenant_db.signing_key.encode()
    later = int(time.time()) + 600
    with direct(pg, tenant_db) as conn:
        pid = conn.info.backend_pid
        for subject, expected in (("alice", ["a1", "a2"]), ("bob", ["b1"])):
            text = canonical_json({"sub": subject})
            set_claims(conn, ACME, text, *proofs(key, ACME, pid, later, text))
            assert [row[0] for row in conn.execute("SELECT body FROM notes ORDER BY body")] == expected
        # Forging the plain claims setting as bob, with alice's proof, shows nothing.
        text = canonical_json({"sub": "alice"})
        tenant_proof, claims_proof = proofs(key, ACME, pid, later, text)
        set_claims(conn, ACME, json.dumps({"sub": "bob"}), tenant_proof, claims_proof)
        assert conn.execute("SELECT count(*) FROM notes").fetchone()[0] == 0


def test_claims_function_attributes(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    rows = pg.psql(
        "SELECT provolatile, prosecdef, proparallel, proconfig IS NULL FROM pg_proc"
        " WHERE oid IN ('tenant_proxy.claims()'::regprocedure, 'tenant_proxy.claim(text)'::regprocedure)",
        tenant_db.database,
    ).split()
    assert rows == ["s|t|r|t"] * 2  # no SET clause: schema-qualified (test_verifier.py, shadowing)


def test_supabase_style_helpers_read_the_verified_claims(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    """The auth.uid() / auth.role() / auth.jwt() definitions docs/identity.md gives."""
    pg.psql(
        "CREATE SCHEMA IF NOT EXISTS auth;"
        "CREATE OR REPLACE FUNCTION auth.jwt() RETURNS jsonb LANGUAGE sql STABLE SET search_path = pg_catalog"
        " AS $$ SELECT tenant_proxy.claims() $$;"
        "CREATE OR REPLACE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE SET search_path = pg_catalog"
        " AS $$ SELECT nullif(tenant_proxy.claim('sub'), '')::uuid $$;"
        "CREATE OR REPLACE FUNCTION auth.role() RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog"
        " AS $$ SELECT tenant_proxy.claim('role') $$;"
        f"GRANT USAGE ON SCHEMA auth TO {tenant_db.app_role};",
        tenant_db.database,
    )
    key = tenant_db.signing_key.encode()
    later = int(time.time()) + 600
    user = "33333333-3333-4333-8333-333333333333"
    text = canonical_json({"sub": user, "role": "authenticated"})
    with direct(pg, tenant_db) as conn:
        pid = conn.info.backend_pid
        tenant_proof, claims_proof = proofs(key, ACME, pid, later, text)
        set_claims(conn, ACME, text, tenant_proof, claims_proof)
        assert conn.execute("SELECT auth.uid()::text, auth.role(), auth.jwt() ->> 'sub'").fetchone() == (
            user, "authenticated", user)
        set_claims(conn, ACME, canonical_json({"sub": GLOBEX, "role": "authenticated"}), tenant_proof, claims_proof)
        assert conn.execute("SELECT auth.uid(), auth.role(), auth.jwt()").fetchone() == (None, None, None)
