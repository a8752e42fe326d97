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

-- The verified claims of this backend's token as jsonb, or NULL. The proxy sets the claims (canonical
-- JSON, in @CLAIMS_SETTING@) and their proof (in @CLAIMS_PROOF_SETTING@): <expiry>:<hex HMAC> over
-- "<pid>:<expiry>:<tenant>:<claims>". NULL unless that proof checks for this backend, has not expired,
-- and current_tenant() is not NULL (so the tenant half of the signed text is the verified tenant).
-- The claims setting alone is forgeable like any custom setting: read claims only through this.
CREATE OR REPLACE FUNCTION tenant_proxy.claims() RETURNS jsonb
    LANGUAGE plpgsql STABLE SECURITY DEFINER PARALLEL RESTRICTED
    SET search_path = pg_catalog, pg_temp
AS $claims$
DECLARE
    claims text := current_setting(@CLAIMS_SETTING@, true);
    proof text := current_setting(@CLAIMS_PROOF_SETTING@, true);
    colon integer := strpos(proof, ':');
    expires text := left(proof, colon - 1);
    tenant text;
    valid boolean;
BEGIN
    IF claims IS NULL OR left(claims, 1) <> '{' OR proof IS NULL OR colon NOT BETWEEN 2 AND 16
       OR length(proof) <> colon + 64 OR ltrim(expires, '0123456789') <> '' THEN
        RETURN NULL;
    END IF;
    IF expires::bigint <= extract(epoch FROM statement_timestamp()) THEN
        RETURN NULL;
    END IF;
    tenant := tenant_proxy.current_tenant();
    IF tenant IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT encode(sha256(outer_pad || sha256(inner_pad
               || convert_to(pg_backend_pid()::text || ':' || expires || ':' || tenant || ':' || claims, 'UTF8'))), 'hex')
           = substr(proof, colon + 1)
      INTO valid
      FROM tenant_proxy.signing_key;
    IF valid THEN
        RETURN claims::jsonb;
    END IF;
    RETURN NULL;
END
$claims$;
REVOKE ALL ON FUNCTION tenant_proxy.claims() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenant_proxy.claims() TO PUBLIC;

-- One verified top-level claim as text (tenant_proxy.claim('sub')), or NULL. Policies call it in a
-- sub-select, (SELECT tenant_proxy.claim('sub')), so it runs once per statement.
CREATE OR REPLACE FUNCTION tenant_proxy.claim(name text) RETURNS text
    LANGUAGE sql STABLE SECURITY DEFINER PARALLEL RESTRICTED
    SET search_path = pg_catalog, pg_temp
AS $claim$
    SELECT tenant_proxy.claims() ->> name
$claim$;
REVOKE ALL ON FUNCTION tenant_proxy.claim(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenant_proxy.claim(text) TO PUBLIC;
