-- After the call: what Telnyx records, what is transcribed from it, and the live partials kept.
--
-- transcriptions.kind: 'final' (the live path's finals, as before), 'partial' (the last partial of an
-- utterance that never got a final: the call or its provider ended first; see README "What is kept"),
-- 'batch' (transcribed from the stored recording after the call; stream_id 'batch:<recording id>', one
-- track per channel of the dual-channel file).
--
-- recordings.source: 'stream' (built by this server from the media stream) or 'telnyx' (Telnyx's own
-- dual-channel recording, fetched after the call.recording.saved webhook).
--
-- call_jobs: work after a call that must survive a restart: fetching Telnyx's recording
-- ('recording_fetch') and transcribing a stored recording ('batch_transcribe').  A row is written in
-- the transaction that decides the work (the webhook's, the recording's), so an answered webhook is
-- never forgotten; any node's worker claims due rows (FOR UPDATE SKIP LOCKED) under a lease, so a node
-- that dies mid-job leaves a row another node takes after lease_until.  dedupe_key makes the decision
-- idempotent.  Like billing_outbox it is drained across organisations: it carries org_id but no RLS;
-- the application may insert, read and update rows, never delete them.
ALTER TABLE transcriptions ADD COLUMN kind text NOT NULL DEFAULT 'final'
    CHECK (kind IN ('final', 'partial', 'batch'));
ALTER TABLE recordings ADD COLUMN source text NOT NULL DEFAULT 'stream'
    CHECK (source IN ('stream', 'telnyx'));

CREATE TABLE call_jobs (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id           uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    call_id          uuid NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
    kind             text NOT NULL CHECK (kind IN ('recording_fetch', 'batch_transcribe')),
    dedupe_key       text NOT NULL UNIQUE CHECK (length(dedupe_key) BETWEEN 1 AND 300),
    payload          jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_until      timestamptz,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX call_jobs_due ON call_jobs (next_attempt_at) WHERE status IN ('pending', 'running');
CREATE INDEX call_jobs_call ON call_jobs (call_id);
GRANT SELECT, INSERT, UPDATE ON call_jobs TO switchboard_app;
