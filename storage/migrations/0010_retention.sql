-- Retention (storage/retention.py; `switchboard retention run`, and the server on a schedule).
--
-- retention_policies (0001) holds an organisation's choices, one row per resource, in days.  The
-- seed's minimum keeps recordings (and whole calls, which carry their recordings) at least two years:
-- a policy may lengthen that, never shorten it.  audit_logs rows are never deleted, whatever a policy
-- says (the trail is immutable and outlives what it describes).
--
-- The API soft-deletes collection accounts and campaigns (0005 granted no DELETE); past the restore
-- window the retention job deletes them for good, so the application role may now DELETE them.  It is
-- the job's statement, run under the tenant like every other (RLS applies).
--
-- retention_orgs(): the job runs for every organisation, which the app role cannot list (RLS): the
-- migrator's SECURITY DEFINER function answers exactly that (live organisations' ids) and nothing else,
-- with a policy that lets the owner read organizations only while switchboard.retention is 'on', which
-- only this function sets (as 0004's auth look-ups and 0008's sweeps).
ALTER TABLE retention_policies ADD CONSTRAINT retention_recordings_minimum
    CHECK (resource NOT IN ('recordings', 'calls') OR days >= 730);

GRANT DELETE ON collection_accounts, campaigns TO switchboard_app;

CREATE POLICY retention_orgs ON organizations TO CURRENT_USER
    USING (current_setting('switchboard.retention', true) = 'on');

CREATE FUNCTION retention_orgs()
RETURNS SETOF uuid
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    PERFORM set_config('switchboard.retention', 'on', true);
    RETURN QUERY SELECT o.id FROM public.organizations o WHERE o.deleted_at IS NULL ORDER BY o.id;
    PERFORM set_config('switchboard.retention', 'off', true);
END
$$;
REVOKE ALL ON FUNCTION retention_orgs() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION retention_orgs() TO switchboard_app;
