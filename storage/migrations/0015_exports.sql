-- Report exports (api/exports.py): a background job per request, its file in the cold tier
-- (exports/<org>/<job>.<csv|xlsx>), downloaded through a signed URL.
CREATE TABLE export_jobs (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id       uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    kind         text NOT NULL CHECK (kind IN ('calls', 'accounts', 'payments')),
    format       text NOT NULL CHECK (format IN ('csv', 'xlsx')),
    since        timestamptz,
    until        timestamptz,
    status       text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'running', 'done', 'failed')),
    rows         bigint NOT NULL DEFAULT 0,
    bytes        bigint,
    storage_key  text,
    error        text,
    node_id      text,
    created_by   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE INDEX export_jobs_org ON export_jobs (org_id, created_at DESC);
ALTER TABLE export_jobs ENABLE ROW LEVEL SECURITY;
ALTER TABLE export_jobs FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON export_jobs
    USING (org_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (org_id = nullif(current_setting('app.org_id', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE, DELETE ON export_jobs TO switchboard_app;
