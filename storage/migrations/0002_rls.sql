-- Tenant isolation in the database itself.
--
-- The application connects as switchboard_app: LOGIN, not superuser, not the owner of any table,
-- no BYPASSRLS (the migrator creates it so).  Every tenant table has RLS enabled and FORCEd (so even
-- the owner is filtered), and one policy: the row's org_id must equal the transaction's tenant,
-- set with set_config('app.org_id', <uuid>, true).  nullif(..., '') makes an unset or reset tenant
-- NULL, and "org_id = NULL" is never true: no tenant set, no rows.

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['users', 'api_keys', 'calls', 'transcriptions', 'translations', 'recordings',
                             'audit_logs', 'subscriptions', 'payments', 'usage_stats', 'retention_policies']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I '
            'USING (org_id = nullif(current_setting(''app.org_id'', true), '''')::uuid) '
            'WITH CHECK (org_id = nullif(current_setting(''app.org_id'', true), '''')::uuid)', t);
    END LOOP;
END
$$;

ALTER TABLE organizations ENABLE ROW LEVEL SECURITY;
ALTER TABLE organizations FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON organizations
    USING (id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (id = nullif(current_setting('app.org_id', true), '')::uuid);

GRANT USAGE ON SCHEMA public TO switchboard_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON
    organizations, users, api_keys, calls, transcriptions, translations, recordings,
    subscriptions, payments, usage_stats, retention_policies
    TO switchboard_app;
-- The audit trail is append-only for the application: no UPDATE, no DELETE, no TRUNCATE.
GRANT SELECT, INSERT ON audit_logs TO switchboard_app;
-- Redelivery bookkeeping: insert and look up, nothing else.
GRANT SELECT, INSERT ON webhook_events TO switchboard_app;
