-- Tenant wipe (storage/wipe.py): deleting an organisation (DELETE /api/org) marks it deleted at once
-- (every credential of it is refused from then: the look-ups of 0004 check organizations.deleted_at),
-- then a job purges every tenant table and every cold-tier object of it in bounded, committed
-- batches, resumable after a restart, and finally sets wiped_at and scrubs the organisation's name.
-- What remains: the organizations row (id, deleted_at, wiped_at; name and slug scrubbed, settings
-- emptied) and the audit trail, which is immutable and never holds restricted PII (README).
ALTER TABLE organizations ADD COLUMN wiped_at timestamptz;

-- The job deletes under the tenant (RLS) as the application; these tables had no DELETE grant.
GRANT DELETE ON voice_configs, import_jobs, call_usage, call_jobs, billing_outbox TO switchboard_app;

CREATE FUNCTION wipe_pending_orgs()
RETURNS SETOF uuid
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    PERFORM set_config('switchboard.retention', 'on', true);  -- 0010's policy: the owner reads organizations
    RETURN QUERY SELECT o.id FROM public.organizations o
                  WHERE o.deleted_at IS NOT NULL AND o.wiped_at IS NULL ORDER BY o.deleted_at;
    PERFORM set_config('switchboard.retention', 'off', true);
END
$$;
REVOKE ALL ON FUNCTION wipe_pending_orgs() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION wipe_pending_orgs() TO switchboard_app;
