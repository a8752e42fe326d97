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
    expires bigint;
    pads record;
BEGIN
    IF tenant IS NULL OR tenant = '' OR proof IS NULL OR proof !~ '^[0-9]{1,15}:[0-9a-f]{64}$' THEN
        RETURN NULL;
    END IF;
    expires := split_part(proof, ':', 1)::bigint;
    IF expires <= extract(epoch FROM statement_timestamp()) THEN
        RETURN NULL;
    END IF;
    SELECT inner_pad, outer_pad INTO pads FROM tenant_proxy.signing_key WHERE id = 1;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF encode(sha256(pads.outer_pad || sha256(pads.inner_pad
            || convert_to(pg_backend_pid() || ':' || expires || ':' || tenant, 'UTF8'))), 'hex')
       = split_part(proof, ':', 2) THEN
        RETURN tenant;
    END IF;
    RETURN NULL;
END
$verifier$;
REVOKE ALL ON FUNCTION tenant_proxy.current_tenant() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenant_proxy.current_tenant() TO PUBLIC;
