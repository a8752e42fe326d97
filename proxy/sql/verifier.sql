-- pg-tenant-proxy verifier. Idempotent: run it again to upgrade it or (with a key) to rotate the key.
-- Run it as a database owner or superuser, never as the role the proxy logs in as: the owner of
-- tenant_proxy.signing_key can read the key and forge any tenant's context.
BEGIN;

CREATE SCHEMA IF NOT EXISTS tenant_proxy;
REVOKE CREATE ON SCHEMA tenant_proxy FROM PUBLIC;
GRANT USAGE ON SCHEMA tenant_proxy TO PUBLIC;

-- The HMAC-SHA256 key as its inner and outer pads, so the verifier needs only the built-in sha256().
CREATE TABLE IF NOT EXISTS tenant_proxy.signing_key (
    id integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    inner_pad bytea NOT NULL CHECK (length(inner_pad) = 64),
    outer_pad bytea NOT NULL CHECK (length(outer_pad) = 64),
    installed_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON tenant_proxy.signing_key FROM PUBLIC;

-- The verified tenant of this backend, or NULL. STABLE (never IMMUTABLE: a cached plan would freeze
-- one tenant's value), SECURITY DEFINER so it can read the key, with a fixed search_path.
-- PARALLEL RESTRICTED because pg_backend_pid() differs in a parallel worker.
CREATE OR REPLACE FUNCTION tenant_proxy.current_tenant() RETURNS text
    LANGUAGE plpgsql STABLE SECURITY DEFINER PARALLEL RESTRICTED
    SET search_path = pg_catalog, pg_temp
AS $verifier$
DECLARE
    tenant text := current_setting(@SETTING@, true);
    proof text := current_setting(@PROOF_SETTING@, true);
    colon integer := strpos(proof, ':');
    expires text := left(proof, colon - 1);
    valid boolean;
BEGIN
    -- The proof is <expiry: 1 to 15 digits>:<64 characters of hex HMAC>. Cheap string tests instead of a
    -- regular expression: this runs once per statement, so every microsecond counts.
    IF tenant IS NULL OR tenant = '' OR proof IS NULL OR colon NOT BETWEEN 2 AND 16
       OR length(proof) <> colon + 64 OR ltrim(expires, '0123456789') <> '' THEN
        RETURN NULL;
    END IF;
    IF expires::bigint <= extract(epoch FROM statement_timestamp()) THEN
        RETURN NULL;
    END IF;
    -- One query reads the key and compares the HMAC (the table holds at most one row): no row, no tenant.
    SELECT encode(sha256(outer_pad || sha256(inner_pad
               || convert_to(pg_backend_pid()::text || ':' || expires || ':' || tenant, 'UTF8'))), 'hex')
           = substr(proof, colon + 1)
      INTO valid
      FROM tenant_proxy.signing_key;
    IF valid THEN
        RETURN tenant;
    END IF;
    RETURN NULL;
END
$verifier$;
REVOKE ALL ON FUNCTION tenant_proxy.current_tenant() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenant_proxy.current_tenant() TO PUBLIC;
