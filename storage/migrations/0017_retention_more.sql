-- Retention over the whole life of the data (storage/retention.py; README "Retention").
--
-- Archived lines (storage/archive.py, 0016): the transcripts and translations policies reach the
-- cold tier too.  A call's archive goes once the newest line in it is past the transcripts policy, and
-- loses its translations once that line is past the translations policy; the call row says when that
-- newest line was written (archive_lines_until; NULL for archives made before this migration, whose
-- archived_at is then the bound: never earlier than a line, so nothing goes before its time) and how
-- many translation lines the object still holds (archive_translations; NULL: not known, read it).
ALTER TABLE calls
    ADD COLUMN archive_lines_until timestamptz,
    ADD COLUMN archive_translations integer CHECK (archive_translations >= 0);

-- Evidence bundles (0013) are sealed until retain_until; after it, and only once their call is itself
-- deleted or past its retention, the job deletes the object and then the row.  The database holds the
-- first half of that rule whatever the application does: a DELETE reaches only rows whose
-- retain_until has passed (a restrictive policy: it narrows the tenant policy, never widens it).
-- UPDATE stays ungranted: a seal is never changed.
GRANT DELETE ON evidence_bundles TO switchboard_app;
CREATE POLICY evidence_sealed ON evidence_bundles AS RESTRICTIVE FOR DELETE TO switchboard_app
    USING (retain_until < now());

-- Provider redelivery bookkeeping (0001): kept long past any provider's redelivery, then deleted.
GRANT DELETE ON webhook_events TO switchboard_app;
CREATE INDEX webhook_events_received ON webhook_events (received_at);

-- The finished rows of the work queues, found by age without reading the live ones.
CREATE INDEX call_jobs_finished ON call_jobs (org_id, updated_at) WHERE status IN ('done', 'failed');
CREATE INDEX billing_outbox_sent ON billing_outbox (org_id, sent_at) WHERE sent_at IS NOT NULL;

-- retention_wiped_orgs(): a wiped organisation (0011) keeps its sealed evidence bundles until
-- retain_until; the job then deletes them too, so it needs those organisations' ids, which the app
-- role cannot list (RLS).  As retention_orgs() (0010), with its policy on organizations.
CREATE FUNCTION retention_wiped_orgs()
RETURNS SETOF uuid
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    PERFORM set_config('switchboard.retention', 'on', true);
    RETURN QUERY SELECT o.id FROM public.organizations o WHERE o.wiped_at IS NOT NULL ORDER BY o.id;
    PERFORM set_config('switchboard.retention', 'off', true);
END
$$;
REVOKE ALL ON FUNCTION retention_wiped_orgs() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION retention_wiped_orgs() TO switchboard_app;
