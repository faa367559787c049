-- Node liveness across nodes (api/heartbeat.py, api/sweeper.py).
--
-- A node (each server process: `serve --workers N` runs N of them, <node>-w<i>) beats its row in
-- `nodes` every NODE_HEARTBEAT_S with beat_node(); the database's clock stamps it, so the nodes'
-- clocks play no part.  Before this, only a node's own restart closed the calls it left open
-- (0003): a node that died and never came back (a deleted pod, a host lost) left them open forever.
-- Now any live node's sweeper calls sweep_lost_nodes(): the open calls of every node whose beat is
-- older than NODE_DEAD_S become 'failed' with end_reason 'node_lost', one audit entry each, and the
-- node's row goes once none of its calls is open.
--
-- Exactly once, whoever sweeps at the same time: node rows and call rows are claimed FOR UPDATE SKIP
-- LOCKED and a call is updated only while it is still open and still that node's (the conditional
-- UPDATE); a sweep that finds them locked leaves them to the next one.
--
-- A node that comes back after being declared lost (a long pause, a partition) finds its row gone:
-- beat_node() inserts it again and says so (true), and the node knows its calls of before were closed
-- by others.  Those stay closed: a final state is never reopened by the media path's own end
-- (storage.records.CallEnded keeps a final status), so the late node does not fight over them.
--
-- The table holds no tenant data, and the app role gets no privilege on it: only these two
-- SECURITY DEFINER functions (owned by the migrator, as in 0003 and 0008) read and write it.  They
-- work across organisations through 0008's `sweep` policies (calls, audit_logs), set on for their own
-- duration only; a beat takes no reason, status or organisation, a sweep only its times and actor.

CREATE TABLE nodes (
    node_id text PRIMARY KEY CHECK (length(node_id) BETWEEN 1 AND 64),
    started_at timestamptz NOT NULL DEFAULT now(),  -- this row's first beat (a re-insert starts it again)
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX nodes_heartbeat ON nodes (heartbeat_at);

-- Beat: the row is stamped now(); true when it had to be inserted (the first beat of a node never seen,
-- or of one whose row a sweep removed: declared lost).
CREATE FUNCTION beat_node(p_node_id text)
RETURNS boolean
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
AS $$
    INSERT INTO public.nodes AS n (node_id) VALUES (p_node_id)
    ON CONFLICT (node_id) DO UPDATE SET heartbeat_at = now()
    RETURNING (n.xmax = 0);
$$;

-- Rows: one per closed call (org_id set), and one per node row removed (org_id NULL), at most p_limit
-- calls per call of the function; the caller loops (bounded) while it gets p_limit calls.
CREATE FUNCTION sweep_lost_nodes(p_dead_s double precision, p_limit integer, p_actor text)
RETURNS TABLE (node_id text, org_id uuid, call_id uuid, call_control_id text, previous_status text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM set_config('switchboard.sweep', 'on', true);
    RETURN QUERY
    WITH lost AS (
        SELECT n.node_id FROM public.nodes n
         WHERE n.heartbeat_at < now() - make_interval(secs => p_dead_s)
           FOR UPDATE SKIP LOCKED
    ), due AS (
        SELECT c.id, c.status, c.node_id FROM public.calls c
         WHERE c.node_id IN (SELECT lost.node_id FROM lost)
           AND c.status IN ('initiating', 'ringing', 'active', 'ending')
         ORDER BY c.updated_at
         LIMIT greatest(p_limit, 0)
           FOR UPDATE SKIP LOCKED
    ), closed AS (
        UPDATE public.calls c
           SET status = 'failed', end_reason = 'node_lost', ended_at = now(), updated_at = now()
          FROM due d
         WHERE c.id = d.id AND c.node_id = d.node_id AND c.status IN ('initiating', 'ringing', 'active', 'ending')
        RETURNING c.node_id, c.org_id, c.id, c.call_control_id, d.status AS previous_status
    ), audited AS (
        INSERT INTO public.audit_logs (org_id, actor_type, actor_id, action, resource_type, resource_id,
                                       old_value, new_value)
        SELECT closed.org_id, 'system', left(p_actor, 64), 'call.ended', 'call', closed.id::text,
               jsonb_build_object('status', closed.previous_status),
               jsonb_build_object('status', 'failed', 'reason', 'node_lost', 'node_id', closed.node_id)
          FROM closed
    )
    SELECT closed.node_id, closed.org_id, closed.id, closed.call_control_id, closed.previous_status FROM closed;
    -- A later statement sees the calls just closed: a lost node none of whose calls is open any more is
    -- forgotten (its beat, should it come back, inserts it again).  Still old when deleted: a node that
    -- beat meanwhile is alive.
    RETURN QUERY
    DELETE FROM public.nodes n
     WHERE n.heartbeat_at < now() - make_interval(secs => p_dead_s)
       AND NOT EXISTS (SELECT 1 FROM public.calls c
                        WHERE c.node_id = n.node_id AND c.status IN ('initiating', 'ringing', 'active', 'ending'))
    RETURNING n.node_id, NULL::uuid, NULL::uuid, NULL::text, NULL::text;
    PERFORM set_config('switchboard.sweep', 'off', true);
END
$$;

REVOKE ALL ON TABLE nodes FROM PUBLIC;
REVOKE ALL ON FUNCTION beat_node(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION sweep_lost_nodes(double precision, integer, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION beat_node(text) TO switchboard_app;
GRANT EXECUTE ON FUNCTION sweep_lost_nodes(double precision, integer, text) TO switchboard_app;
