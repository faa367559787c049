-- Hot to cold (storage/archive.py): the transcripts and translations of a call older than the
-- archive age move to the cold tier as one gzip of JSON lines (archive/<org>/<call>.jsonl.gz); the
-- call row names it, and the call's detail reads it back.  Per organisation: a retention_policies row
-- with resource 'archive' (days); default SWITCHBOARD_ARCHIVE_AFTER_DAYS.
ALTER TABLE calls
    ADD COLUMN archive_key text,
    ADD COLUMN archived_at timestamptz;
ALTER TABLE retention_policies DROP CONSTRAINT retention_policies_resource_check;
ALTER TABLE retention_policies ADD CONSTRAINT retention_policies_resource_check
    CHECK (resource IN ('calls', 'transcriptions', 'translations', 'recordings', 'audit_logs', 'archive'));
