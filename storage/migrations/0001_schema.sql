-- Switchboard system of record.  Every tenant table carries org_id (a foreign key to organizations)
-- and is protected by row-level security in 0002_rls.sql.  UUID keys come from gen_random_uuid()
-- (built in since PostgreSQL 13) or from the application, which lets a retried batch write the same
-- rows again without duplicating them (ON CONFLICT DO NOTHING on the key).

CREATE TABLE organizations (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    slug        text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    settings    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    deleted_at  timestamptz
);

CREATE TABLE users (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id         uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    email          text NOT NULL CHECK (length(email) BETWEEN 3 AND 320),
    display_name   text NOT NULL DEFAULT '',
    role           text NOT NULL CHECK (role IN ('owner', 'admin', 'supervisor', 'agent', 'analyst')),
    password_hash  text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    deleted_at     timestamptz
);
CREATE UNIQUE INDEX users_org_email ON users (org_id, lower(email)) WHERE deleted_at IS NULL;

-- Interactive sessions live in Redis (7-day TTL); API keys are durable and live here, hashed.
CREATE TABLE api_keys (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id        uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    user_id       uuid REFERENCES users (id) ON DELETE CASCADE,
    name          text NOT NULL,
    prefix        text NOT NULL,                 -- the first characters, shown to tell keys apart
    key_hash      bytea NOT NULL UNIQUE,         -- sha256 of the key; the key itself is never stored
    scopes        text[] NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    expires_at    timestamptz,
    revoked_at    timestamptz
);
CREATE INDEX api_keys_org ON api_keys (org_id);

CREATE TABLE calls (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id           uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    call_control_id  text NOT NULL,
    call_session_id  text,
    stream_id        text,
    direction        text CHECK (direction IN ('inbound', 'outbound')),
    from_number      text,
    to_number        text,
    agent_id         uuid REFERENCES users (id) ON DELETE SET NULL,
    status           text NOT NULL DEFAULT 'initiating'
                     CHECK (status IN ('initiating', 'active', 'completed', 'failed')),
    codec            text,
    sample_rate      integer CHECK (sample_rate > 0),
    started_at       timestamptz,
    ended_at         timestamptz,
    end_reason       text,
    stats            jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    deleted_at       timestamptz,
    UNIQUE (org_id, call_control_id)
);
CREATE INDEX calls_org_started ON calls (org_id, started_at DESC);

-- Final transcripts only; partials are not stored.  (call_id, stream_id, track, seq) makes a retried
-- write a no-op; stream_id is part of it because a call's media stream may restart (seq starts again).
CREATE TABLE transcriptions (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id       uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    call_id      uuid NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
    stream_id    text NOT NULL DEFAULT '',
    track        text NOT NULL CHECK (track IN ('inbound', 'outbound', 'agent')),
    seq          integer NOT NULL CHECK (seq >= 0),
    text         text NOT NULL,
    language     text NOT NULL DEFAULT 'en',
    confidence   real,
    words        jsonb NOT NULL DEFAULT '[]'::jsonb,
    start_ms     integer,
    end_ms       integer,
    provider     text,
    redacted     boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now(),
    deleted_at   timestamptz,
    UNIQUE (call_id, stream_id, track, seq)
);
CREATE INDEX transcriptions_org ON transcriptions (org_id, created_at);

CREATE TABLE translations (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id            uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    call_id           uuid NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
    transcription_id  uuid REFERENCES transcriptions (id) ON DELETE CASCADE,
    source_lang       text NOT NULL,
    target_lang       text NOT NULL,
    original_text     text NOT NULL,
    translated_text   text NOT NULL,
    provider          text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    deleted_at        timestamptz
);
CREATE INDEX translations_call ON translations (call_id);

CREATE TABLE recordings (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id        uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    call_id       uuid NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
    storage_key   text NOT NULL UNIQUE,
    content_type  text NOT NULL DEFAULT 'audio/wav',
    bytes         bigint NOT NULL CHECK (bytes >= 0),
    duration_ms   bigint NOT NULL CHECK (duration_ms >= 0),
    channels      smallint NOT NULL CHECK (channels > 0),
    sample_rate   integer NOT NULL CHECK (sample_rate > 0),
    sha256        text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    deleted_at    timestamptz
);
CREATE INDEX recordings_call ON recordings (call_id);

-- Append-only for the application role (0002 grants no UPDATE or DELETE).
CREATE TABLE audit_logs (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id         uuid NOT NULL REFERENCES organizations (id) ON DELETE RESTRICT,
    actor_type     text NOT NULL CHECK (actor_type IN ('user', 'api_key', 'system', 'provider')),
    actor_id       text,
    action         text NOT NULL,
    resource_type  text NOT NULL,
    resource_id    text,
    old_value      jsonb,
    new_value      jsonb,
    ip             inet,
    request_id     text,
    -- The moment of the insert, not of its transaction's start: entries written in one batch keep their order.
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX audit_logs_org_time ON audit_logs (org_id, created_at DESC);

CREATE TABLE subscriptions (
    id                      uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id                  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    stripe_customer_id      text,
    stripe_subscription_id  text UNIQUE,
    plan                    text NOT NULL,
    status                  text NOT NULL,
    current_period_end      timestamptz,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscriptions_org ON subscriptions (org_id);

CREATE TABLE payments (
    id                        uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id                    uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    subscription_id           uuid REFERENCES subscriptions (id) ON DELETE SET NULL,
    stripe_payment_intent_id  text UNIQUE,
    amount_cents              bigint NOT NULL CHECK (amount_cents >= 0),
    currency                  text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    status                    text NOT NULL,
    created_at                timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payments_org ON payments (org_id);

CREATE TABLE usage_stats (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id     uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    day        date NOT NULL,
    metric     text NOT NULL,
    quantity   bigint NOT NULL DEFAULT 0 CHECK (quantity >= 0),
    UNIQUE (org_id, day, metric)
);

-- Retention per organisation and resource, for the data-lifecycle work.
CREATE TABLE retention_policies (
    org_id     uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    resource   text NOT NULL CHECK (resource IN ('calls', 'transcriptions', 'translations', 'recordings', 'audit_logs')),
    days       integer NOT NULL CHECK (days > 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, resource)
);

-- Webhook deliveries seen (Telnyx, Stripe), so a redelivery is recognised.  Not tenant data: the
-- tenant is only known after the payload is verified and parsed.
CREATE TABLE webhook_events (
    provider     text NOT NULL CHECK (provider IN ('telnyx', 'stripe')),
    event_id     text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, event_id)
);
