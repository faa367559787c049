-- Billing (Stripe): the organisation's plan, per-call usage counted once, a durable outbox of the
-- calls to Stripe and Resend that must happen exactly once, and the look-up a webhook needs.
--
-- An organisation's plan is a column of its own ('free' until a subscription is made).
--
-- call_usage: one row per call, written when the call's end is seen (ON CONFLICT DO NOTHING keyed by
-- the call), so a second end of the same call adds nothing to usage_stats.
--
-- billing_outbox: what must reach Stripe (meter events) or Resend (dunning e-mails) exactly once,
-- written in the transaction that decided it; a worker sends each row with its idempotency_key as the
-- provider's Idempotency-Key / meter event identifier, so a retry after an ambiguous failure is never
-- doubled, and a failed send stays for the next attempt (never lost).  Like webhook_events it is not
-- reached through a tenant: the worker drains every organisation's rows, so it carries org_id but no
-- RLS; the application may insert, read and mark rows, not delete them.
--
-- billing_customer_org: a webhook names a Stripe customer, not an organisation, and the application
-- role sees one tenant per transaction (0002_rls.sql).  As in 0004, the migrator (the owner) provides
-- one function that answers exactly that question and nothing else, with a policy that lets the
-- owner read subscriptions only while switchboard.billing_lookup is 'on', which only it sets.

ALTER TABLE organizations ADD COLUMN plan text NOT NULL DEFAULT 'free'
    CHECK (plan ~ '^[a-z0-9][a-z0-9_-]{0,39}$');

ALTER TABLE subscriptions
    ADD CONSTRAINT subscriptions_status_form
        CHECK (status IN ('incomplete', 'incomplete_expired', 'trialing', 'active', 'past_due', 'canceled',
                          'unpaid', 'paused'));
CREATE INDEX subscriptions_customer ON subscriptions (stripe_customer_id);

ALTER TABLE payments ADD COLUMN stripe_invoice_id text UNIQUE;

CREATE TABLE call_usage (
    call_id     uuid PRIMARY KEY REFERENCES calls (id) ON DELETE CASCADE,
    org_id      uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    day         date NOT NULL,
    minutes     integer NOT NULL CHECK (minutes >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE call_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE call_usage FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON call_usage
    USING (org_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (org_id = nullif(current_setting('app.org_id', true), '')::uuid);
GRANT SELECT, INSERT ON call_usage TO switchboard_app;

CREATE TABLE billing_outbox (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id           uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    kind             text NOT NULL CHECK (kind IN ('meter_event', 'email')),
    idempotency_key  text NOT NULL UNIQUE CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    payload          jsonb NOT NULL,
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    sent_at          timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_outbox_due ON billing_outbox (next_attempt_at) WHERE sent_at IS NULL;
GRANT SELECT, INSERT, UPDATE ON billing_outbox TO switchboard_app;

CREATE POLICY billing_lookup ON subscriptions TO CURRENT_USER
    USING (current_setting('switchboard.billing_lookup', true) = 'on');

-- The organisation whose subscription names this Stripe customer (at most one: a customer is made per
-- organisation), if that organisation is live.
CREATE FUNCTION billing_customer_org(p_customer text)
RETURNS uuid
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    found uuid;
BEGIN
    PERFORM set_config('switchboard.billing_lookup', 'on', true);
    SELECT s.org_id INTO found FROM public.subscriptions s
     WHERE s.stripe_customer_id = p_customer ORDER BY s.created_at DESC LIMIT 1;
    PERFORM set_config('switchboard.billing_lookup', 'off', true);
    RETURN found;
END
$$;
REVOKE ALL ON FUNCTION billing_customer_org(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION billing_customer_org(text) TO switchboard_app;
