-- Evidence bundles (api/evidence.py): a sealed zip of one call (recordings, transcripts, translations,
-- audit trail, a summary page, manifest.json with every file's SHA-256) in the cold tier under
-- evidence/<org>/<call>/<bundle>.zip.  Sealed: the bundle's and the manifest's SHA-256 are recorded
-- here, and the application may insert and read these rows, never change or delete them; no code path
-- deletes an evidence object before retain_until (retention, erasure and wipe leave them).
CREATE TABLE evidence_bundles (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id           uuid NOT NULL REFERENCES organizations (id) ON DELETE RESTRICT,
    call_id          uuid NOT NULL,  -- no foreign key: the bundle outlives the call's rows
    call_control_id  text NOT NULL,
    storage_key      text NOT NULL UNIQUE,
    bytes            bigint NOT NULL CHECK (bytes > 0),
    sha256           text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    manifest_sha256  text NOT NULL CHECK (manifest_sha256 ~ '^[0-9a-f]{64}$'),
    files            integer NOT NULL CHECK (files > 0),
    retain_until     timestamptz NOT NULL,
    created_by       text,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX evidence_bundles_call ON evidence_bundles (org_id, call_id, created_at DESC);
ALTER TABLE evidence_bundles ENABLE ROW LEVEL SECURITY;
ALTER TABLE evidence_bundles FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON evidence_bundles
    USING (org_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (org_id = nullif(current_setting('app.org_id', true), '')::uuid);
GRANT SELECT, INSERT ON evidence_bundles TO switchboard_app;
