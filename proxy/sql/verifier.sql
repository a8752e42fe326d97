-- pg-tenant-proxy verifier. Idempotent: run it again to upgrade it or (with a key) to rotate the key.
-- Run it as a database owner or superuser, never as the role the proxy logs in as: the owner of
-- tenant_proxy.signing_key can read the key and forge any tenant's context.
BEGIN;

CREATE SCHEMA IF NOT EXISTS tenant_proxy;
REVOKE CREATE ON SCHEMA tenant_proxy FROM PUBLIC;
GRANT USAGE ON SCHEMA tenant_proxy TO PUBLIC;

-- The HMAC-SHA256 keys as their inner and outer pads, so the verifier needs only the built-in sha256().
-- Row 1 is the key the proxy signs with; row 2, while a rotation is under way, the previous key, which
-- still verifies the contexts of sessions signed before the proxy reloaded (docs/operations.md).
CREATE TABLE IF NOT EXISTS tenant_proxy.signing_key (
    id integer PRIMARY KEY DEFAULT 1 CONSTRAINT signing_key_rows_check CHECK (id IN (1, 2)),
    inner_pad bytea NOT NULL CHECK (length(inner_pad) = 64),
    outer_pad bytea NOT NULL CHECK (length(outer_pad) = 64),
    installed_at timestamptz NOT NULL DEFAULT now()
);
-- Upgrade a table from before key rotation, whose check allowed row 1 only; only then, because ALTER TABLE
-- waits for every open transaction that verified a context and holds up every verification behind it.
DO $upgrade$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_constraint
                WHERE conrelid = 'tenant_proxy.signing_key'::pg_catalog.regclass
                  AND conname OPERATOR(pg_catalog.=) 'signing_key_id_check') THEN
        ALTER TABLE tenant_proxy.signing_key DROP CONSTRAINT signing_key_id_check,
            ADD CONSTRAINT signing_key_rows_check CHECK (id IN (1, 2));
    END IF;
END
$upgrade$;
REVOKE ALL ON tenant_proxy.signing_key FROM PUBLIC;

-- The verified tenant of this backend, or NULL. STABLE (never IMMUTABLE: a cached plan would freeze
-- one tenant's value), SECURITY DEFINER so it can read the key. PARALLEL RESTRICTED because
-- pg_backend_pid() differs in a parallel worker.
--
-- No SET search_path clause: it cost about half of each call. Instead every function, operator, type
-- and table below is schema-qualified, so the caller's search_path and pg_temp name nothing here
-- (tests/integration/test_verifier.py shadows each of them). Keep it so when editing: no bare
-- operator, no BETWEEN/LIKE/IN (they expand to operators looked up by search_path), no bare type name;
-- and parenthesise: OPERATOR(...) has one precedence, left-associative, whatever the operator.
CREATE OR REPLACE FUNCTION tenant_proxy.current_tenant() RETURNS pg_catalog.text
    LANGUAGE plpgsql STABLE SECURITY DEFINER PARALLEL RESTRICTED
AS $verifier$
DECLARE
    tenant pg_catalog.text := pg_catalog.current_setting(@SETTING@, true);
    proof pg_catalog.text := pg_catalog.current_setting(@PROOF_SETTING@, true);
    colon pg_catalog.int4 := pg_catalog.strpos(proof, ':');
    expires pg_catalog.text := pg_catalog.left(proof, colon OPERATOR(pg_catalog.-) 1);
    valid pg_catalog.bool;
BEGIN
    -- The proof is <expiry: 1 to 15 digits>:<64 characters of hex HMAC>. Cheap string tests instead of a
    -- regular expression: this runs once per statement, so every microsecond counts.
    IF tenant IS NULL OR tenant OPERATOR(pg_catalog.=) '' OR proof IS NULL
       OR colon OPERATOR(pg_catalog.<) 2 OR colon OPERATOR(pg_catalog.>) 16
       OR pg_catalog.length(proof) OPERATOR(pg_catalog.<>) (colon OPERATOR(pg_catalog.+) 64)
       OR pg_catalog.ltrim(expires, '0123456789') OPERATOR(pg_catalog.<>) '' THEN
        RETURN NULL;
    END IF;
    -- EXTRACT is grammar: the parser calls pg_catalog.extract (pg_catalog.date_part before 14) itself.
    IF expires::pg_catalog.int8 OPERATOR(pg_catalog.<=) EXTRACT(epoch FROM pg_catalog.statement_timestamp()) THEN
        RETURN NULL;
    END IF;
    -- One query reads the keys and compares the HMAC: valid when the current key (row 1) or, during a
    -- rotation, the previous one (row 2) signed it; no row, no tenant.
    valid := EXISTS (
        SELECT FROM tenant_proxy.signing_key AS k
         WHERE pg_catalog.encode(pg_catalog.sha256(k.outer_pad OPERATOR(pg_catalog.||) pg_catalog.sha256(k.inner_pad
                   OPERATOR(pg_catalog.||) pg_catalog.convert_to(pg_catalog.pg_backend_pid()::pg_catalog.text
                       OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) expires OPERATOR(pg_catalog.||) ':'
                       OPERATOR(pg_catalog.||) tenant, 'UTF8'))), 'hex')
               OPERATOR(pg_catalog.=) pg_catalog.substr(proof, colon OPERATOR(pg_catalog.+) 1));
    IF valid THEN
        RETURN tenant;
    END IF;
    RETURN NULL;
END
$verifier$;
REVOKE ALL ON FUNCTION tenant_proxy.current_tenant() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenant_proxy.current_tenant() TO PUBLIC;

-- The verified claims of this backend's token as jsonb, or NULL. The proxy sets the claims (canonical
-- JSON, in @CLAIMS_SETTING@) and their proof (in @CLAIMS_PROOF_SETTING@): <expiry>:<hex HMAC> over
-- "<pid>:<expiry>:<tenant>:<claims>". NULL unless that proof checks for this backend, has not expired,
-- and current_tenant() is not NULL (so the tenant half of the signed text is the verified tenant).
-- The claims setting alone is forgeable like any custom setting: read claims only through this.
-- Schema-qualified throughout, like current_tenant(), instead of a SET search_path clause.
CREATE OR REPLACE FUNCTION tenant_proxy.claims() RETURNS pg_catalog.jsonb
    LANGUAGE plpgsql STABLE SECURITY DEFINER PARALLEL RESTRICTED
AS $claims$
DECLARE
    claims pg_catalog.text := pg_catalog.current_setting(@CLAIMS_SETTING@, true);
    proof pg_catalog.text := pg_catalog.current_setting(@CLAIMS_PROOF_SETTING@, true);
    colon pg_catalog.int4 := pg_catalog.strpos(proof, ':');
    expires pg_catalog.text := pg_catalog.left(proof, colon OPERATOR(pg_catalog.-) 1);
    tenant pg_catalog.text;
    valid pg_catalog.bool;
BEGIN
    IF claims IS NULL OR pg_catalog.left(claims, 1) OPERATOR(pg_catalog.<>) '{' OR proof IS NULL
       OR colon OPERATOR(pg_catalog.<) 2 OR colon OPERATOR(pg_catalog.>) 16
       OR pg_catalog.length(proof) OPERATOR(pg_catalog.<>) (colon OPERATOR(pg_catalog.+) 64)
       OR pg_catalog.ltrim(expires, '0123456789') OPERATOR(pg_catalog.<>) '' THEN
        RETURN NULL;
    END IF;
    -- EXTRACT is grammar: the parser calls pg_catalog.extract (pg_catalog.date_part before 14) itself.
    IF expires::pg_catalog.int8 OPERATOR(pg_catalog.<=) EXTRACT(epoch FROM pg_catalog.statement_timestamp()) THEN
        RETURN NULL;
    END IF;
    tenant := tenant_proxy.current_tenant();
    IF tenant IS NULL THEN
        RETURN NULL;
    END IF;
    -- Either installed key (current or previous) may have signed it, as in current_tenant().
    valid := EXISTS (
        SELECT FROM tenant_proxy.signing_key AS k
         WHERE pg_catalog.encode(pg_catalog.sha256(k.outer_pad OPERATOR(pg_catalog.||) pg_catalog.sha256(k.inner_pad
                   OPERATOR(pg_catalog.||) pg_catalog.convert_to(pg_catalog.pg_backend_pid()::pg_catalog.text
                       OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) expires OPERATOR(pg_catalog.||) ':'
                       OPERATOR(pg_catalog.||) tenant OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) claims,
                       'UTF8'))), 'hex')
               OPERATOR(pg_catalog.=) pg_catalog.substr(proof, colon OPERATOR(pg_catalog.+) 1));
    IF valid THEN
        RETURN claims::pg_catalog.jsonb;
    END IF;
    RETURN NULL;
END
$claims$;
REVOKE ALL ON FUNCTION tenant_proxy.claims() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenant_proxy.claims() TO PUBLIC;

-- One verified top-level claim as text (tenant_proxy.claim('sub')), or NULL. Policies call it in a
-- sub-select, (SELECT tenant_proxy.claim('sub')), so it runs once per statement. Schema-qualified.
CREATE OR REPLACE FUNCTION tenant_proxy.claim(name pg_catalog.text) RETURNS pg_catalog.text
    LANGUAGE sql STABLE SECURITY DEFINER PARALLEL RESTRICTED
AS $claim$
    SELECT tenant_proxy.claims() OPERATOR(pg_catalog.->>) name
$claim$;
REVOKE ALL ON FUNCTION tenant_proxy.claim(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenant_proxy.claim(text) TO PUBLIC;

-- What a tenant may leave on a server connection, reset in one call when the proxy (in transaction
-- mode) passes the connection to another tenant: DISCARD ALL but for DEALLOCATE ALL and DISCARD PLANS,
-- so the prepared statements the proxy shares (tenant-neutral, by digest) survive. SECURITY INVOKER: it
-- resets the caller's own session. No SET search_path clause: its restore at exit would undo the reset
-- of search_path; the one name it calls is schema-qualified, the rest are utility statements.
CREATE OR REPLACE FUNCTION tenant_proxy.reset_session() RETURNS void
    LANGUAGE plpgsql VOLATILE
AS $reset$
BEGIN
    EXECUTE 'SET SESSION AUTHORIZATION DEFAULT';
    EXECUTE 'RESET ALL';
    EXECUTE 'CLOSE ALL';
    EXECUTE 'UNLISTEN *';
    PERFORM pg_catalog.pg_advisory_unlock_all();
    EXECUTE 'DISCARD TEMP';
    EXECUTE 'DISCARD SEQUENCES';
END
$reset$;
REVOKE ALL ON FUNCTION tenant_proxy.reset_session() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenant_proxy.reset_session() TO PUBLIC;
