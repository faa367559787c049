-- The collections domain, thin: the accounts an organisation collects on, its campaigns and who is in
-- them, its voice settings, and the CSV import jobs that fill collection_accounts.
--
-- Tenant tables like the rest (0002_rls.sql): RLS enabled and FORCEd, one tenant_isolation policy,
-- GRANTs to switchboard_app.  deleted_at is the soft delete the lifecycle issue will build on: the API
-- hides a row once it is set, and a live row's external_ref may then be reused.
--
-- debtor_name and phones are restricted personal data, stored as they are for now (encryption at rest
-- is a later issue); the API never copies them into audit_logs.
--
-- campaign_contacts refers to its campaign and account through (org_id, id), so a contact can only
-- join a campaign and an account of its own organisation, whatever the application does.

CREATE TABLE collection_accounts (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id         uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    external_ref   text NOT NULL CHECK (external_ref ~ '^[!-~]{1,100}$'),
    debtor_name    text NOT NULL CHECK (length(debtor_name) BETWEEN 1 AND 200),
    phones         text[] NOT NULL DEFAULT '{}'
                   CHECK (cardinality(phones) <= 5 AND array_to_string(phones, ',') ~ '^(\+[1-9][0-9]{6,14}(,|$))*$'),
    balance_cents  bigint NOT NULL CHECK (balance_cents BETWEEN 0 AND 10000000000000),
    currency       char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    status         text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'promised', 'paid', 'disputed', 'closed')),
    consent        boolean NOT NULL DEFAULT false,
    do_not_call    boolean NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    deleted_at     timestamptz,
    UNIQUE (org_id, id)
);
CREATE UNIQUE INDEX collection_accounts_ref_live ON collection_accounts (org_id, external_ref) WHERE deleted_at IS NULL;
CREATE INDEX collection_accounts_org_created ON collection_accounts (org_id, created_at DESC, id DESC);

CREATE TABLE campaigns (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id      uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    status      text NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'active', 'paused', 'done')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    deleted_at  timestamptz,
    UNIQUE (org_id, id)
);
CREATE INDEX campaigns_org_created ON campaigns (org_id, created_at DESC, id DESC);

CREATE TABLE campaign_contacts (
    org_id       uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    campaign_id  uuid NOT NULL,
    account_id   uuid NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (campaign_id, account_id),
    FOREIGN KEY (org_id, campaign_id) REFERENCES campaigns (org_id, id) ON DELETE CASCADE,
    FOREIGN KEY (org_id, account_id) REFERENCES collection_accounts (org_id, id) ON DELETE CASCADE
);
CREATE INDEX campaign_contacts_account ON campaign_contacts (account_id);

-- One per organisation; absent means the defaults (no caller id, no recording, no translation).
CREATE TABLE voice_configs (
    org_id             uuid PRIMARY KEY REFERENCES organizations (id) ON DELETE CASCADE,
    caller_id          text CHECK (caller_id ~ '^\+[1-9][0-9]{6,14}$'),
    recording          boolean NOT NULL DEFAULT false,
    translate_default  text CHECK (translate_default ~ '^[a-z]{2,3}$'),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- errors: the first 1000 bad rows, each {"line", "reason"} (reasons name a field, never its value);
-- rows_failed counts them all.
CREATE TABLE import_jobs (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id          uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    kind            text NOT NULL DEFAULT 'collection_accounts' CHECK (kind IN ('collection_accounts')),
    status          text NOT NULL DEFAULT 'running' CHECK (status IN ('queued', 'running', 'done', 'failed')),
    rows_total      integer NOT NULL DEFAULT 0 CHECK (rows_total >= 0),
    rows_ok         integer NOT NULL DEFAULT 0 CHECK (rows_ok >= 0),
    rows_failed     integer NOT NULL DEFAULT 0 CHECK (rows_failed >= 0),
    rows_inserted   integer NOT NULL DEFAULT 0 CHECK (rows_inserted >= 0),
    rows_updated    integer NOT NULL DEFAULT 0 CHECK (rows_updated >= 0),
    errors          jsonb NOT NULL DEFAULT '[]'::jsonb
                    CHECK (jsonb_typeof(errors) = 'array' AND jsonb_array_length(errors) <= 1000),
    failure         text CHECK (length(failure) <= 500),
    created_by      uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);
CREATE INDEX import_jobs_org_created ON import_jobs (org_id, created_at DESC, id DESC);

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['collection_accounts', 'campaigns', 'campaign_contacts', 'voice_configs', 'import_jobs']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I '
            'USING (org_id = nullif(current_setting(''app.org_id'', true), '''')::uuid) '
            'WITH CHECK (org_id = nullif(current_setting(''app.org_id'', true), '''')::uuid)', t);
    END LOOP;
END
$$;

-- No DELETE: rows are soft-deleted (deleted_at) or, for contacts, removed with their campaign's
-- organisation; the lifecycle issue decides when rows really go.
GRANT SELECT, INSERT, UPDATE ON collection_accounts, campaigns, voice_configs, import_jobs TO switchboard_app;
GRANT SELECT, INSERT, DELETE ON campaign_contacts TO switchboard_app;
