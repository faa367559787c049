-- Post-call summary and score (pipelines/summary.py, api/post_call.py 'summarize' jobs): one row per
-- call, written from the call's redacted transcript after it ends, and again once its recording is
-- transcribed.  Quotes only redacted text; erased with the person (api/erasure_api.py).
CREATE TABLE call_summaries (
    call_id     uuid PRIMARY KEY REFERENCES calls (id) ON DELETE CASCADE,
    org_id      uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    summary     text NOT NULL CHECK (length(summary) <= 4000),
    score       jsonb NOT NULL,
    provider    text NOT NULL,
    source      text NOT NULL CHECK (source IN ('live', 'batch')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE call_summaries ENABLE ROW LEVEL SECURITY;
ALTER TABLE call_summaries FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON call_summaries
    USING (org_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (org_id = nullif(current_setting('app.org_id', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE, DELETE ON call_summaries TO switchboard_app;

ALTER TABLE call_jobs DROP CONSTRAINT call_jobs_kind_check;
ALTER TABLE call_jobs ADD CONSTRAINT call_jobs_kind_check
    CHECK (kind IN ('recording_fetch', 'batch_transcribe', 'summarize'));
