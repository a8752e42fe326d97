"""The verifier SQL in a real database: installation by the CLI, the proof's bindings, key rotation."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from support import ACME, GLOBEX, ROWS, REPO, ProxyProcess
from proxy.demo import TenantDatabase, write_config
from proxy.embedded import EmbeddedPostgres
from proxy.auth.claims import canonical_json, sign_claims
from proxy.tenant import hmac_pads, sign
from proxy.verifier import verifier_sql


def direct(pg: EmbeddedPostgres, db: TenantDatabase) -> psycopg.Connection[Any]:
    """A connection straight to Postgres as the application role, bypassing the proxy."""
    return psycopg.connect(
        host="127.0.0.1", port=pg.port, user=db.app_role, password=db.app_password, dbname=db.database,
        sslmode="disable", autocommit=True,
    )


def set_context(conn: psycopg.Connection[Any], tenant: str, proof: str) -> str | None:
    conn.execute("SELECT set_config('app.current_tenant', %s, false), set_config('tenant_proxy.proof', %s, false)",
                 (tenant, proof))
    return conn.execute("SELECT tenant_proxy.current_tenant()").fetchone()[0]


def test_proof_is_bound_to_backend_tenant_and_expiry(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    key = tenant_db.signing_key.encode()
    later = int(time.time()) + 600
    with direct(pg, tenant_db) as conn, direct(pg, tenant_db) as other:
        pid = conn.info.backend_pid
        assert set_context(conn, ACME, sign(key, ACME, pid, later)) == ACME
        assert conn.execute("SELECT count(*) FROM leads").fetchone()[0] == ROWS[ACME]
        # The same proof replayed on another backend is worthless.
        assert set_context(other, ACME, sign(key, ACME, pid, later)) is None
        assert other.execute("SELECT count(*) FROM leads").fetchone()[0] == 0
        # A proof for one tenant does not vouch for another.
        assert set_context(conn, GLOBEX, sign(key, ACME, pid, later)) is None
        # An expired proof is worthless, and so is one signed with another key.
        assert set_context(conn, ACME, sign(key, ACME, pid, int(time.time()) - 1)) is None
        assert set_context(conn, ACME, sign(b"x" * 40, ACME, pid, later)) is None
        # Garbage never raises; it reads as no tenant. So do near misses of a valid proof.
        valid = sign(key, ACME, pid, later)
        expiry, mac = valid.split(":")
        for proof in ("", "abc", "1:2", f"{later}:" + "g" * 64, "9" * 30 + ":" + "0" * 64, ":" + mac,
                      "9" * 16 + ":" + mac, f"+{expiry}:{mac}", f" {expiry}:{mac}", f"-{expiry}:{mac}",
                      f"0{expiry}:{mac}", f"{expiry}:{mac.upper()}", f"{valid}0", f"{valid[:-1]}", f"{expiry}:{mac[:-1]}é",
                      f"{expiry}::{mac[1:]}", f"{expiry}:{mac}".replace(":", ";")):
            assert set_context(conn, ACME, proof) is None, proof
        assert set_context(conn, "", valid) is None
        assert set_context(conn, ACME, valid) == ACME


def test_application_role_cannot_read_the_key(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    with direct(pg, tenant_db) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM tenant_proxy.signing_key")


def test_verifier_function_attributes(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    """STABLE, SECURITY DEFINER, PARALLEL RESTRICTED, and no SET clause (test_no_client_object_changes_the_result
    shows why none is needed)."""
    row = pg.psql(
        "SELECT provolatile, prosecdef, proparallel, proconfig IS NULL FROM pg_proc"
        " WHERE oid = 'tenant_proxy.current_tenant()'::regprocedure",
        tenant_db.database,
    ).strip()
    assert row == "s|t|r|t"


def test_sql_command_installs_and_rotates(pg: EmbeddedPostgres, tenant_db: TenantDatabase, make_proxy: Any,
                                          tmp_path: Path) -> None:
    pg.psql(f"CREATE DATABASE rotation; GRANT CONNECT ON DATABASE rotation TO {tenant_db.app_role}")
    for number, key in enumerate(("first-key-" + "a" * 32, "second-key-" + "b" * 32)):
        overrides = {"upstream": {"database": "rotation"}, "tenant": {"signing_key": key}}
        config = write_config(tmp_path / "rotation.toml", pg, tenant_db, 6432, overrides)
        script = subprocess.run([sys.executable, "-m", "proxy", "sql", "--config", str(config)],
                                capture_output=True, text=True, check=True, cwd=REPO).stdout
        pg.psql(script, "rotation")
        pg.psql(script, "rotation")  # idempotent
        if number == 0:
            pg.psql("CREATE TABLE t (tenant_id uuid); ALTER TABLE t ENABLE ROW LEVEL SECURITY; "
                    "ALTER TABLE t FORCE ROW LEVEL SECURITY; "
                    "CREATE POLICY p ON t USING (tenant_id = (SELECT tenant_proxy.current_tenant())::uuid);"
                    f"INSERT INTO t VALUES ('{ACME}'), ('{GLOBEX}'); GRANT SELECT ON t TO {tenant_db.app_role};",
                    "rotation")
        current = make_proxy(overrides)
        assert current.psql(current.token(GLOBEX), "SELECT tenant_id FROM t", "rotation").stdout.split() == [GLOBEX]
    stale = make_proxy({"upstream": {"database": "rotation"}, "tenant": {"signing_key": "first-key-" + "a" * 32}})
    assert stale.psql(stale.token(GLOBEX), "SELECT count(*) FROM t", "rotation").stdout.split() == ["0"]


def test_sql_command_without_config_has_no_key() -> None:
    script = subprocess.run([sys.executable, "-m", "proxy", "sql"], capture_output=True, text=True, check=True,
                            cwd=REPO).stdout
    assert "CREATE OR REPLACE FUNCTION tenant_proxy.current_tenant()" in script
    assert "INSERT INTO tenant_proxy.signing_key" not in script


def test_plain_policy_is_not_tamper_proof_but_strict_is(proxy: ProxyProcess, pg: EmbeddedPostgres,
                                                         tenant_db: TenantDatabase) -> None:
    """Why the README insists on the verifier: a plain current_setting() policy trusts a forged SET."""
    pg.psql("CREATE TABLE IF NOT EXISTS plain_notes (tenant_id uuid, note text);"
            "ALTER TABLE plain_notes ENABLE ROW LEVEL SECURITY; ALTER TABLE plain_notes FORCE ROW LEVEL SECURITY;"
            "DROP POLICY IF EXISTS plain ON plain_notes;"
            "CREATE POLICY plain ON plain_notes USING (tenant_id = current_setting('app.current_tenant')::uuid);"
            f"TRUNCATE plain_notes; INSERT INTO plain_notes VALUES ('{ACME}', 'a'), ('{GLOBEX}', 'g');"
            f"GRANT SELECT ON plain_notes TO {tenant_db.app_role};", tenant_db.database)
    forged = f"SELECT set_config('app.' || 'current_tenant', '{GLOBEX}', false)"  # past the guard
    plain = proxy.psql(proxy.token(ACME), f"{forged}; SELECT note FROM plain_notes").stdout.split()
    strict = proxy.psql(proxy.token(ACME), f"{forged}; SELECT count(*) FROM leads").stdout.split()
    assert plain[-1] == "g"  # the documented weakness of the plain form
    assert strict[-1] == "0"


# What a client that may create objects puts in front of pg_catalog: every function, operator, type and
# table name the verifier functions use, each returning a wrong answer, most of them a forging one
# (= always true, <> always false, encode() returning the proof's own HMAC, an expired proof "in the future").
SHADOWS = """
CREATE FUNCTION {s}.current_setting(text, boolean) RETURNS text LANGUAGE sql AS $$ SELECT 'x' $$;
CREATE FUNCTION {s}.strpos(text, text) RETURNS integer LANGUAGE sql AS $$ SELECT 0 $$;
CREATE FUNCTION {s}."left"(text, integer) RETURNS text LANGUAGE sql AS $$ SELECT '' $$;
CREATE FUNCTION {s}.length(text) RETURNS integer LANGUAGE sql AS $$ SELECT 0 $$;
CREATE FUNCTION {s}.ltrim(text, text) RETURNS text LANGUAGE sql AS $$ SELECT 'x' $$;
CREATE FUNCTION {s}.substr(text, integer) RETURNS text LANGUAGE sql AS $$ SELECT 'x' $$;
CREATE FUNCTION {s}.encode(bytea, text) RETURNS text LANGUAGE sql
    AS $$ SELECT pg_catalog.split_part(pg_catalog.current_setting('tenant_proxy.proof'), ':', 2) $$;
CREATE FUNCTION {s}.sha256(bytea) RETURNS bytea LANGUAGE sql AS $$ SELECT '\\x00'::bytea $$;
CREATE FUNCTION {s}.convert_to(text, name) RETURNS bytea LANGUAGE sql AS $$ SELECT '\\x00'::bytea $$;
CREATE FUNCTION {s}.pg_backend_pid() RETURNS integer LANGUAGE sql AS $$ SELECT 1 $$;
CREATE FUNCTION {s}.statement_timestamp() RETURNS timestamptz LANGUAGE sql AS $$ SELECT 'epoch'::timestamptz $$;
CREATE FUNCTION {s}.extract(text, timestamptz) RETURNS numeric LANGUAGE sql AS $$ SELECT 0::numeric $$;
CREATE FUNCTION {s}.date_part(text, timestamptz) RETURNS double precision LANGUAGE sql AS $$ SELECT 0::float8 $$;
CREATE FUNCTION {s}.text_eq(text, text) RETURNS boolean LANGUAGE sql AS $$ SELECT true $$;
CREATE OPERATOR {s}.= (FUNCTION = {s}.text_eq, LEFTARG = text, RIGHTARG = text);
CREATE FUNCTION {s}.text_ne(text, text) RETURNS boolean LANGUAGE sql AS $$ SELECT false $$;
CREATE OPERATOR {s}.<> (FUNCTION = {s}.text_ne, LEFTARG = text, RIGHTARG = text);
CREATE FUNCTION {s}.int_false(integer, integer) RETURNS boolean LANGUAGE sql AS $$ SELECT false $$;
CREATE OPERATOR {s}.< (FUNCTION = {s}.int_false, LEFTARG = integer, RIGHTARG = integer);
CREATE OPERATOR {s}.> (FUNCTION = {s}.int_false, LEFTARG = integer, RIGHTARG = integer);
CREATE FUNCTION {s}.int_zero(integer, integer) RETURNS integer LANGUAGE sql AS $$ SELECT 0 $$;
CREATE OPERATOR {s}.+ (FUNCTION = {s}.int_zero, LEFTARG = integer, RIGHTARG = integer);
CREATE OPERATOR {s}.- (FUNCTION = {s}.int_zero, LEFTARG = integer, RIGHTARG = integer);
CREATE FUNCTION {s}.never_expired(bigint, numeric) RETURNS boolean LANGUAGE sql AS $$ SELECT false $$;
CREATE OPERATOR {s}.<= (FUNCTION = {s}.never_expired, LEFTARG = bigint, RIGHTARG = numeric);
CREATE FUNCTION {s}.text_first(text, text) RETURNS text LANGUAGE sql AS $$ SELECT $1 $$;
CREATE OPERATOR {s}.|| (FUNCTION = {s}.text_first, LEFTARG = text, RIGHTARG = text);
CREATE FUNCTION {s}.bytea_first(bytea, bytea) RETURNS bytea LANGUAGE sql AS $$ SELECT $1 $$;
CREATE OPERATOR {s}.|| (FUNCTION = {s}.bytea_first, LEFTARG = bytea, RIGHTARG = bytea);
CREATE FUNCTION {s}.forged_claim(jsonb, text) RETURNS text LANGUAGE sql AS $$ SELECT 'forged' $$;
CREATE OPERATOR {s}.->> (FUNCTION = {s}.forged_claim, LEFTARG = jsonb, RIGHTARG = text);
CREATE DOMAIN {s}.text AS pg_catalog.int4;
CREATE DOMAIN {s}.int4 AS pg_catalog.int2;
CREATE DOMAIN {s}.int8 AS pg_catalog.int2;
CREATE DOMAIN {s}.bool AS pg_catalog.int2;
CREATE DOMAIN {s}.jsonb AS pg_catalog.int2;
CREATE TABLE {s}.signing_key (id integer, inner_pad bytea, outer_pad bytea);
INSERT INTO {s}.signing_key VALUES (1, decode('{inner}', 'hex'), decode('{outer}', 'hex'));
"""
ATTACKER_KEY = b"the attacker's own key, " * 2


def test_no_client_object_changes_the_result(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> None:
    """The verifier functions have no SET search_path clause (it was half their cost), so every name in
    them is schema-qualified. A client that may create objects in pg_temp and in a schema of its
    search_path, ahead of pg_catalog, shadows every name they use, and still: a valid context verifies,
    forged, replayed, expired and attacker-keyed ones do not."""
    pg.psql(f"DROP DATABASE IF EXISTS shadowing WITH (FORCE); CREATE DATABASE shadowing;"
            f" REVOKE ALL ON DATABASE shadowing FROM PUBLIC;"
            f" GRANT CONNECT, TEMPORARY ON DATABASE shadowing TO {tenant_db.app_role}")
    pg.psql(verifier_sql("app.current_tenant", "tenant_proxy.proof", tenant_db.signing_key), "shadowing")
    pg.psql(f"GRANT CREATE ON SCHEMA public TO {tenant_db.app_role}", "shadowing")
    key, later = tenant_db.signing_key.encode(), int(time.time()) + 600
    claims = canonical_json({"sub": "alice"})
    inner, outer = hmac_pads(ATTACKER_KEY)
    with psycopg.connect(host="127.0.0.1", port=pg.port, user=tenant_db.app_role, password=tenant_db.app_password,
                         dbname="shadowing", sslmode="disable", autocommit=True) as conn:
        pid = conn.info.backend_pid

        def verified(tenant: str, proof: str, claims_proof: str = "") -> tuple[Any, ...]:
            conn.execute("SELECT pg_catalog.set_config('app.current_tenant', %s, false),"
                         " pg_catalog.set_config('tenant_proxy.proof', %s, false),"
                         " pg_catalog.set_config('request.jwt.claims', %s, false),"
                         " pg_catalog.set_config('tenant_proxy.claims_proof', %s, false)",
                         (tenant, proof, claims, claims_proof))
            return tuple(conn.execute("SELECT tenant_proxy.current_tenant(), tenant_proxy.claims(),"
                                      " tenant_proxy.claim('sub')").fetchone())

        valid = (ACME, sign(key, ACME, pid, later), sign_claims(key, ACME, pid, later, claims))
        assert verified(*valid) == (ACME, {"sub": "alice"}, "alice")  # plans cached before the shadows exist
        conn.execute("SET search_path = pg_catalog, pg_temp")  # the shadows' own type names: the real ones
        for schema in ("pg_temp", "public"):
            conn.execute(SHADOWS.format(s=schema, inner=inner.hex(), outer=outer.hex()))
        # pg_catalog comes first unless the path names it later; pg_temp comes first for types and tables.
        for search_path, ahead in (("public, pg_catalog", True), ("pg_temp, public, pg_catalog", True),
                                   ("public", False), ("pg_catalog, public", False)):
            conn.execute(f"SET search_path = {search_path}")
            if ahead:
                # The shadows are live: unqualified SQL of this session resolves to them.
                assert conn.execute("SELECT 'a'::pg_catalog.text = 'b', strpos('abc', 'c'),"
                                    " (SELECT count(*) FROM signing_key)").fetchone() == (True, 0, 1), search_path
            assert verified(*valid) == (ACME, {"sub": "alice"}, "alice"), search_path
            forgeries = [
                (GLOBEX, valid[1], valid[2]),  # another tenant with ACME's proofs
                (ACME, sign(key, ACME, pid + 1, later), sign_claims(key, ACME, pid + 1, later, claims)),  # replayed
                (ACME, sign(key, ACME, pid, int(time.time()) - 1),
                 sign_claims(key, ACME, pid, int(time.time()) - 1, claims)),  # expired
                (ACME, sign(ATTACKER_KEY, ACME, pid, later), sign_claims(ATTACKER_KEY, ACME, pid, later, claims)),
                (ACME, f"{later}:" + "0" * 64, f"{later}:" + "0" * 64),
                (ACME, "x", "x"),
            ]
            for forgery in forgeries:
                assert verified(*forgery) == (None, None, None), (search_path, forgery)
            # A valid tenant with forged claims: the tenant verifies, the claims do not.
            assert verified(ACME, valid[1], f"{later}:" + "0" * 64) == (ACME, None, None), search_path
    pg.psql("DROP DATABASE shadowing WITH (FORCE)")
