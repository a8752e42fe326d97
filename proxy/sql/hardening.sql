-- pg-tenant-proxy hardening of the shared upstream role. Idempotent: run it again after adding schemas,
-- tables, languages or extensions. Run it in each database the proxy serves, after the verifier, as the
-- database owner or a superuser; `pg-tenant-proxy doctor` then proves each capability is gone.
--
-- All tenants log in upstream as one role, so what that role may do, every tenant may do to every other.
-- This script takes from PUBLIC and from that role every capability that reaches across tenants or lets
-- SQL escape the guard. Beware: REVOKE ... FROM PUBLIC on pg_catalog objects applies to EVERY role of
-- this database, not only the upstream role. Each revoked object is granted back to the predefined
-- role that keeps its legitimate use (pg_read_all_stats for monitoring, pg_signal_backend for
-- signalling, pg_database_owner for the database owner); superusers keep everything.
--
-- Managed Postgres (RDS, Cloud SQL, Azure): nothing here needs a superuser-only feature. The pg_catalog
-- objects and the plpgsql language belong to the provider's bootstrap role; where your administrator
-- role may not revoke on them, Postgres answers "WARNING: no privileges could be revoked" instead of an
-- error, and `pg-tenant-proxy doctor` lists what is left. Two settings need the provider's parameter
-- group (they are superuser-only): lo_compat_privileges = off and max_prepared_transactions = 0.
@ROLE_GUARD@
BEGIN;

SET LOCAL pg_tenant_proxy.upstream_role = @UPSTREAM_ROLE@;

DO $check$
BEGIN
    IF to_regrole(quote_ident(current_setting('pg_tenant_proxy.upstream_role'))) IS NULL THEN
        RAISE EXCEPTION 'pg-tenant-proxy hardening: role "%" does not exist',
            current_setting('pg_tenant_proxy.upstream_role')
            USING HINT = 'Name the role the proxy logs in as ([upstream] user).';
    END IF;
END
$check$;

-- The helper for the built-in objects below: revoke EXECUTE (functions, every overload) or SELECT
-- (views) from PUBLIC and the upstream role, and grant it back to the predefined role that keeps it.
CREATE OR REPLACE PROCEDURE pg_temp.pgtp_revoke(kind text, patterns text[], kept_by name)
    LANGUAGE plpgsql
AS $helper$
DECLARE
    upstream name := current_setting('pg_tenant_proxy.upstream_role');
    target record;
BEGIN
    FOR target IN
        SELECT 'FUNCTION' AS object_type, 'EXECUTE' AS privilege, p.oid::regprocedure::text AS object_name
        FROM pg_catalog.pg_proc p
        WHERE (kind = 'function' AND p.pronamespace = 'pg_catalog'::regnamespace AND p.proname LIKE ANY (patterns))
           OR (kind = 'extension' AND p.oid IN (
                SELECT d.objid FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid
                WHERE d.classid = 'pg_catalog.pg_proc'::regclass AND d.refclassid = 'pg_catalog.pg_extension'::regclass
                  AND d.deptype = 'e' AND e.extname LIKE ANY (patterns)))
        UNION ALL
        SELECT 'TABLE', 'SELECT', c.oid::regclass::text
        FROM pg_catalog.pg_class c
        WHERE c.relkind IN ('r', 'v', 'm')
          AND ((kind = 'relation' AND c.relnamespace = 'pg_catalog'::regnamespace AND c.relname LIKE ANY (patterns))
            OR (kind = 'extension' AND c.oid IN (
                SELECT d.objid FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid
                WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.refclassid = 'pg_catalog.pg_extension'::regclass
                  AND d.deptype = 'e' AND e.extname LIKE ANY (patterns))))
    LOOP
        EXECUTE format('REVOKE %s ON %s %s FROM PUBLIC, %I', target.privilege, target.object_type,
                       target.object_name, upstream);
        IF kept_by IS NOT NULL THEN
            EXECUTE format('GRANT %s ON %s %s TO %I', target.privilege, target.object_type, target.object_name,
                           kept_by);
        END IF;
    END LOOP;
END
$helper$;

-- TEMP on the database: functions created in pg_temp run dynamic SQL (plpgsql EXECUTE) past the guard,
-- and temporary objects shadow names on search_path.
-- CREATE on the database: CREATE SCHEMA (and so functions and views), publications, trusted extensions.
DO $database$
BEGIN
    EXECUTE format('REVOKE TEMPORARY, CREATE ON DATABASE %I FROM PUBLIC, %I', current_database(),
                   current_setting('pg_tenant_proxy.upstream_role'));
END
$database$;

-- CREATE on every schema, public and tenant_proxy included: a function hides any SQL from the guard,
-- and a function, operator or view in a schema on search_path changes what other queries mean.
DO $schemas$
DECLARE
    schema_name name;
BEGIN
    FOR schema_name IN
        SELECT nspname FROM pg_catalog.pg_namespace
        WHERE nspname NOT IN ('pg_catalog', 'information_schema') AND nspname !~ '^pg_(toast|temp_|toast_temp_)'
    LOOP
        EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM PUBLIC, %I', schema_name,
                       current_setting('pg_tenant_proxy.upstream_role'));
    END LOOP;
END
$schemas$;

-- USAGE on every trusted procedural language (plpgsql, plperl, pltcl, plv8, ...): DO blocks run
-- dynamic SQL, so EXECUTE 'ALTER ROLE CURRENT_USER PASSWORD ...' would get past the guard. The database
-- owner keeps it, to install the verifier where it is not a superuser.
DO $languages$
DECLARE
    language_name name;
BEGIN
    FOR language_name IN SELECT lanname FROM pg_catalog.pg_language WHERE lanpltrusted AND lanname <> 'sql' LOOP
        EXECUTE format('REVOKE USAGE ON LANGUAGE %I FROM PUBLIC, %I', language_name,
                       current_setting('pg_tenant_proxy.upstream_role'));
        EXECUTE format('GRANT USAGE ON LANGUAGE %I TO pg_database_owner', language_name);
    END LOOP;
END
$languages$;

-- On every table under row-level security: TRUNCATE empties every tenant's rows (RLS does not apply to
-- it); TRIGGER runs a function on every tenant's writes; REFERENCES lets a foreign key test the
-- existence of other tenants' keys (referential checks bypass RLS).
DO $tables$
DECLARE
    table_name regclass;
BEGIN
    FOR table_name IN
        SELECT c.oid::regclass FROM pg_catalog.pg_class c
        WHERE c.relrowsecurity AND c.relkind IN ('r', 'p')
    LOOP
        EXECUTE format('REVOKE TRUNCATE, TRIGGER, REFERENCES ON TABLE %s FROM PUBLIC, %I', table_name,
                       current_setting('pg_tenant_proxy.upstream_role'));
    END LOOP;
END
$tables$;

-- Membership in a predefined role that gives back what this script takes (reading all data or all
-- statistics, signalling any backend, server files). Revoking a membership needs ADMIN OPTION on the
-- role (or a superuser); a membership through another role is reported by the doctor.
DO $memberships$
DECLARE
    granted name;
BEGIN
    FOR granted IN
        SELECT r.rolname FROM pg_catalog.pg_auth_members m JOIN pg_catalog.pg_roles r ON r.oid = m.roleid
        WHERE m.member = to_regrole(quote_ident(current_setting('pg_tenant_proxy.upstream_role')))
          AND r.rolname = ANY (@PRIVILEGED_ROLES@)
    LOOP
        EXECUTE format('REVOKE %I FROM %I', granted, current_setting('pg_tenant_proxy.upstream_role'));
    END LOOP;
END
$memberships$;

@REVOCATIONS@
COMMIT;
