-- The seed example: one table of leads shared by all tenants, isolated by Row-Level Security.
-- Run as the database owner; @APP_ROLE@ is the role the proxy logs in as.
CREATE TABLE IF NOT EXISTS leads (
    id bigserial PRIMARY KEY,
    tenant_id uuid NOT NULL,
    name text NOT NULL,
    email text NOT NULL
);
CREATE INDEX IF NOT EXISTS leads_tenant_id ON leads (tenant_id);

ALTER TABLE leads ENABLE ROW LEVEL SECURITY;
ALTER TABLE leads FORCE ROW LEVEL SECURITY;

-- Permissive: who may use the table at all. Restrictive: the tenant boundary, ANDed with every
-- permissive policy, so a permissive policy added later cannot widen it.
DROP POLICY IF EXISTS app_access ON leads;
CREATE POLICY app_access ON leads USING (true) WITH CHECK (true);
DROP POLICY IF EXISTS tenant_isolation ON leads;
CREATE POLICY tenant_isolation ON leads AS RESTRICTIVE
    USING (tenant_id = (SELECT tenant_proxy.current_tenant())::uuid)
    WITH CHECK (tenant_id = (SELECT tenant_proxy.current_tenant())::uuid);

GRANT SELECT, INSERT, UPDATE, DELETE ON leads TO @APP_ROLE@;
GRANT USAGE ON SEQUENCE leads_id_seq TO @APP_ROLE@;
