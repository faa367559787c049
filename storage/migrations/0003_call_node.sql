-- Each call records the node that owns its media stream, so a node that restarts after a crash can
-- close the calls it left open (storage.records.close_calls_of_restarted_node).
--
-- Why a SECURITY DEFINER function: the application connects as switchboard_app, which sees one
-- tenant per transaction (0002_rls.sql) and cannot even list the organisations.  A node's calls
-- belong to any number of organisations, and the node must close them all before it accepts
-- streams.  Iterating organisations is impossible without seeing them, and weakening RLS for the
-- app role would weaken it everywhere.  So the migrator (the tables' owner) provides one function
-- that does exactly this and nothing else: calls of the given node in an open state become
-- 'failed' with end_reason 'node_restart', each with an audit entry, in one statement.  It takes
-- no reason, no status, no organisation: the caller chooses only the node.  (The app role could
-- already update any tenant's calls by setting that tenant, so naming another node's id gives it
-- nothing new.)
--
-- When the owner is a superuser (the embedded server, most set-ups) RLS does not apply to it.
-- When the owner is an ordinary role with CREATEROLE (a managed database), FORCE ROW LEVEL
-- SECURITY filters even the owner, so the policies below let the owner, and only the owner, see
-- and write all calls and audit entries while switchboard.node_recovery is 'on', which only this
-- function does, for its own duration.  The tenant policies stay as they are for everyone else.

ALTER TABLE calls ADD COLUMN node_id text CHECK (node_id IS NULL OR length(node_id) BETWEEN 1 AND 64);

-- Room for an explicit call state machine: ringing and ending are open states; no_answer and busy
-- are final, like completed and failed.
ALTER TABLE calls DROP CONSTRAINT calls_status_check,
    ADD CONSTRAINT calls_status_check
        CHECK (status IN ('initiating', 'ringing', 'active', 'ending', 'completed', 'failed', 'no_answer', 'busy'));

CREATE INDEX calls_node_open ON calls (node_id) WHERE status IN ('initiating', 'ringing', 'active', 'ending');

DO $$
BEGIN
    EXECUTE format(
        'CREATE POLICY node_recovery ON calls TO %I '
        'USING (current_setting(''switchboard.node_recovery'', true) = ''on'') '
        'WITH CHECK (current_setting(''switchboard.node_recovery'', true) = ''on'')', current_user);
    EXECUTE format(
        'CREATE POLICY node_recovery ON audit_logs TO %I '
        'USING (current_setting(''switchboard.node_recovery'', true) = ''on'') '
        'WITH CHECK (current_setting(''switchboard.node_recovery'', true) = ''on'')', current_user);
END
$$;

CREATE FUNCTION close_calls_of_restarted_node(p_node_id text)
RETURNS TABLE (org_id uuid, call_id uuid, call_control_id text, previous_status text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    -- Set at run time, not in a SET clause: only a superuser may put a custom parameter there.
    PERFORM set_config('switchboard.node_recovery', 'on', true);
    RETURN QUERY
    WITH open AS (
        SELECT c.id, c.status FROM public.calls c
         WHERE c.node_id = p_node_id AND c.status IN ('initiating', 'ringing', 'active', 'ending')
           FOR UPDATE
    ), closed AS (
        UPDATE public.calls c
           SET status = 'failed', end_reason = 'node_restart', ended_at = now(), updated_at = now()
          FROM open o
         WHERE c.id = o.id
        RETURNING c.org_id, c.id, c.call_control_id, o.status AS previous_status
    ), audited AS (
        INSERT INTO public.audit_logs (org_id, actor_type, actor_id, action, resource_type, resource_id,
                                       old_value, new_value)
        SELECT closed.org_id, 'system', p_node_id, 'call.ended', 'call', closed.id::text,
               jsonb_build_object('status', closed.previous_status),
               jsonb_build_object('status', 'failed', 'reason', 'node_restart')
          FROM closed
    )
    SELECT closed.org_id, closed.id, closed.call_control_id, closed.previous_status FROM closed;
    PERFORM set_config('switchboard.node_recovery', 'off', true);
END
$$;

REVOKE ALL ON FUNCTION close_calls_of_restarted_node(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION close_calls_of_restarted_node(text) TO switchboard_app;
