-- Sweeps: nothing stays open forever after a crash or a silent provider (api/sweeper.py says when).
--
-- 1. Placed calls that no node streams (calls.node_id IS NULL) wait in 'initiating', 'ringing' or
--    'ending' for Telnyx's webhooks.  When those never come (an outage, a wrong webhook URL, a node
--    that died between the insert and the create-call request), sweep_stalled_calls closes the ones with
--    no progress (updated_at) for the state's time as 'failed', end_reason 'no_webhook', one audit entry
--    each (actor 'system').  A call a node streams (node_id set) is that node's: its stream's end, or
--    its restart recovery (0003), closes it; the sweeper never touches it.
-- 2. Account imports run inline in their request (api/account_import.py).  A running import beats its
--    heartbeat (import_jobs.heartbeat_at) while its request lives; one whose heartbeat is older than the
--    given time, or (at a node's start) one the starting node itself ran, was left by a dead process:
--    sweep_interrupted_imports marks it 'failed' with a message saying what to do, audited.
--
-- Both run across organisations, which the app role cannot see (0002, RLS): SECURITY DEFINER functions
-- owned by the migrator, as in 0003, doing exactly this and taking no status, reason or organisation.
-- Any number of nodes may run them at once: rows are claimed FOR UPDATE SKIP LOCKED and updated only
-- while still in the state and as old as selected (the conditional UPDATE), so a row is closed once,
-- and a webhook or an import batch that commits first wins (it moved updated_at or heartbeat_at).
-- Each call takes at most p_limit rows (the caller loops, bounded).
--
-- When the owner is not a superuser, FORCE ROW LEVEL SECURITY filters it too: the policies below let
-- the owner, and only the owner, see and write these tables while switchboard.sweep is 'on', which only
-- these functions set, for their own duration (as 0003's node_recovery).

ALTER TABLE import_jobs
    ADD COLUMN heartbeat_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN node_id text CHECK (node_id IS NULL OR length(node_id) BETWEEN 1 AND 64);

CREATE INDEX import_jobs_running ON import_jobs (heartbeat_at) WHERE status = 'running';
CREATE INDEX calls_awaiting_webhooks ON calls (updated_at)
    WHERE status IN ('initiating', 'ringing', 'ending') AND node_id IS NULL;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['calls', 'audit_logs', 'import_jobs']
    LOOP
        EXECUTE format(
            'CREATE POLICY sweep ON %I TO %I '
            'USING (current_setting(''switchboard.sweep'', true) = ''on'') '
            'WITH CHECK (current_setting(''switchboard.sweep'', true) = ''on'')', t, current_user);
    END LOOP;
END
$$;

CREATE FUNCTION sweep_stalled_calls(p_initiating_s double precision, p_ringing_s double precision,
                                    p_ending_s double precision, p_limit integer, p_actor text)
RETURNS TABLE (org_id uuid, call_id uuid, call_control_id text, previous_status text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM set_config('switchboard.sweep', 'on', true);
    RETURN QUERY
    WITH due AS (
        SELECT c.id, c.status, c.updated_at FROM public.calls c
         WHERE c.node_id IS NULL
           AND ((c.status = 'initiating' AND c.updated_at < now() - make_interval(secs => p_initiating_s))
             OR (c.status = 'ringing' AND c.updated_at < now() - make_interval(secs => p_ringing_s))
             OR (c.status = 'ending' AND c.updated_at < now() - make_interval(secs => p_ending_s)))
         ORDER BY c.updated_at
         LIMIT greatest(p_limit, 0)
           FOR UPDATE SKIP LOCKED
    ), closed AS (
        UPDATE public.calls c
           SET status = 'failed', end_reason = 'no_webhook', ended_at = now(), updated_at = now()
          FROM due d
         WHERE c.id = d.id AND c.status = d.status AND c.updated_at = d.updated_at AND c.node_id IS NULL
        RETURNING c.org_id, c.id, c.call_control_id, d.status AS previous_status
    ), audited AS (
        INSERT INTO public.audit_logs (org_id, actor_type, actor_id, action, resource_type, resource_id,
                                       old_value, new_value)
        SELECT closed.org_id, 'system', left(p_actor, 64), 'call.failed', 'call', closed.id::text,
               jsonb_build_object('status', closed.previous_status),
               jsonb_build_object('status', 'failed', 'reason', 'no_webhook')
          FROM closed
    )
    SELECT closed.org_id, closed.id, closed.call_control_id, closed.previous_status FROM closed;
    PERFORM set_config('switchboard.sweep', 'off', true);
END
$$;

CREATE FUNCTION sweep_interrupted_imports(p_stale_s double precision, p_node_id text, p_limit integer,
                                          p_failure text, p_actor text)
RETURNS TABLE (org_id uuid, import_id uuid)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM set_config('switchboard.sweep', 'on', true);
    RETURN QUERY
    WITH due AS (
        SELECT j.id, j.heartbeat_at FROM public.import_jobs j
         WHERE j.status = 'running'
           AND (j.heartbeat_at < now() - make_interval(secs => p_stale_s)
                OR (p_node_id IS NOT NULL AND j.node_id = p_node_id))
         ORDER BY j.heartbeat_at
         LIMIT greatest(p_limit, 0)
           FOR UPDATE SKIP LOCKED
    ), failed AS (
        UPDATE public.import_jobs j
           SET status = 'failed', failure = left(p_failure, 500), updated_at = now(), finished_at = now()
          FROM due d
         WHERE j.id = d.id AND j.status = 'running' AND j.heartbeat_at = d.heartbeat_at
        RETURNING j.org_id, j.id, j.rows_total, j.rows_ok, j.rows_failed, j.rows_inserted, j.rows_updated
    ), audited AS (
        INSERT INTO public.audit_logs (org_id, actor_type, actor_id, action, resource_type, resource_id,
                                       old_value, new_value)
        SELECT failed.org_id, 'system', left(p_actor, 64), 'accounts.imported', 'import_job', failed.id::text,
               jsonb_build_object('status', 'running'),
               jsonb_build_object('status', 'failed', 'reason', 'interrupted', 'rows_total', failed.rows_total,
                                  'rows_ok', failed.rows_ok, 'rows_failed', failed.rows_failed,
                                  'rows_inserted', failed.rows_inserted, 'rows_updated', failed.rows_updated)
          FROM failed
    )
    SELECT failed.org_id, failed.id FROM failed;
    PERFORM set_config('switchboard.sweep', 'off', true);
END
$$;

REVOKE ALL ON FUNCTION sweep_stalled_calls(double precision, double precision, double precision, integer, text)
    FROM PUBLIC;
REVOKE ALL ON FUNCTION sweep_interrupted_imports(double precision, text, integer, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sweep_stalled_calls(double precision, double precision, double precision, integer, text)
    TO switchboard_app;
GRANT EXECUTE ON FUNCTION sweep_interrupted_imports(double precision, text, integer, text, text) TO switchboard_app;
