-- Accounts: users with one of four roles, API keys with a role, media stream tokens per
-- organisation, and the three look-ups a request needs before its tenant is known.
--
-- A user belongs to exactly one organisation (users.org_id and users.role are the membership), and
-- an e-mail address names at most one live user in the whole system, so that login by e-mail is
-- unambiguous.  A person who works for two organisations has two addresses.
--
-- Why SECURITY DEFINER look-ups: the application role sees one tenant per transaction
-- (0002_rls.sql), but a login names an e-mail, a request names an API key and a media stream names
-- a token, and none of them says its organisation.  Weakening RLS for the app role would weaken it
-- everywhere; instead the migrator (the tables' owner) provides three functions that each answer
-- exactly one question, from a hash or an address, and nothing else.  As in 0003, when the owner
-- is not a superuser FORCE ROW LEVEL SECURITY filters it too, so a policy lets the owner, and only
-- the owner, read these tables while switchboard.auth_lookup is 'on', which only these functions
-- set, for their own duration.

UPDATE users SET role = 'admin' WHERE role = 'supervisor';
UPDATE users SET role = 'viewer' WHERE role = 'analyst';
ALTER TABLE users DROP CONSTRAINT users_role_check,
    ADD CONSTRAINT users_role_check CHECK (role IN ('owner', 'admin', 'agent', 'viewer')),
    ADD COLUMN active boolean NOT NULL DEFAULT true,
    ADD COLUMN last_login_at timestamptz,
    ADD CONSTRAINT users_email_form CHECK (email = lower(email) AND email ~ '^[^@\s]+@[^@\s]+$');
CREATE UNIQUE INDEX users_email_live ON users (email) WHERE deleted_at IS NULL;

ALTER TABLE api_keys
    ADD COLUMN role text NOT NULL DEFAULT 'viewer' CHECK (role IN ('owner', 'admin', 'agent', 'viewer')),
    ADD COLUMN created_by uuid REFERENCES users (id) ON DELETE SET NULL,
    ADD CONSTRAINT api_keys_name_len CHECK (length(name) BETWEEN 1 AND 100);

-- The token Telnyx sends with each media stream (stream_auth_token): it decides the call's organisation.
CREATE TABLE media_tokens (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id        uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    prefix        text NOT NULL,
    token_hash    bytea NOT NULL UNIQUE,         -- sha256 of the token; the token itself is never stored
    created_by    uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz
);
CREATE INDEX media_tokens_org ON media_tokens (org_id);
ALTER TABLE media_tokens ENABLE ROW LEVEL SECURITY;
ALTER TABLE media_tokens FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON media_tokens
    USING (org_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (org_id = nullif(current_setting('app.org_id', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE, DELETE ON media_tokens TO switchboard_app;

CREATE INDEX calls_org_created ON calls (org_id, created_at DESC, id DESC);
CREATE INDEX audit_logs_org_id ON audit_logs (org_id, created_at DESC, id DESC);

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['users', 'api_keys', 'media_tokens', 'organizations'] LOOP
        EXECUTE format(
            'CREATE POLICY auth_lookup ON %I TO %I '
            'USING (current_setting(''switchboard.auth_lookup'', true) = ''on'') '
            'WITH CHECK (current_setting(''switchboard.auth_lookup'', true) = ''on'')', t, current_user);
    END LOOP;
END
$$;

-- Login: the live, active user with this address (at most one), with what verifying needs.
CREATE FUNCTION auth_login_lookup(p_email text)
RETURNS TABLE (user_id uuid, org_id uuid, password_hash text, role text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM set_config('switchboard.auth_lookup', 'on', true);
    RETURN QUERY
    SELECT u.id, u.org_id, u.password_hash, u.role
      FROM public.users u JOIN public.organizations o ON o.id = u.org_id
     WHERE u.email = lower(p_email) AND u.deleted_at IS NULL AND u.active AND o.deleted_at IS NULL;
    PERFORM set_config('switchboard.auth_lookup', 'off', true);
END
$$;

-- An API key by the sha256 of its text: its organisation and role, if it is live.  Its last use is
-- recorded, at most once a minute (a write per request would cost more than the request).
CREATE FUNCTION auth_api_key(p_hash bytea)
RETURNS TABLE (key_id uuid, org_id uuid, role text, user_id uuid)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM set_config('switchboard.auth_lookup', 'on', true);
    RETURN QUERY
    WITH k AS (
        SELECT k.id, k.org_id, k.role, k.user_id, k.last_used_at
          FROM public.api_keys k JOIN public.organizations o ON o.id = k.org_id
         WHERE k.key_hash = p_hash AND k.revoked_at IS NULL AND o.deleted_at IS NULL
           AND (k.expires_at IS NULL OR k.expires_at > now())
    ), touched AS (
        UPDATE public.api_keys a SET last_used_at = now()
          FROM k WHERE a.id = k.id AND (k.last_used_at IS NULL OR k.last_used_at < now() - interval '60 seconds')
    )
    SELECT k.id, k.org_id, k.role, k.user_id FROM k;
    PERFORM set_config('switchboard.auth_lookup', 'off', true);
END
$$;

-- A media stream token by the sha256 of its text: its organisation, if it is live.
CREATE FUNCTION auth_media_token(p_hash bytea)
RETURNS TABLE (token_id uuid, org_id uuid)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM set_config('switchboard.auth_lookup', 'on', true);
    RETURN QUERY
    WITH t AS (
        SELECT t.id, t.org_id, t.last_used_at
          FROM public.media_tokens t JOIN public.organizations o ON o.id = t.org_id
         WHERE t.token_hash = p_hash AND t.revoked_at IS NULL AND o.deleted_at IS NULL
    ), touched AS (
        UPDATE public.media_tokens m SET last_used_at = now()
          FROM t WHERE m.id = t.id AND (t.last_used_at IS NULL OR t.last_used_at < now() - interval '60 seconds')
    )
    SELECT t.id, t.org_id FROM t;
    PERFORM set_config('switchboard.auth_lookup', 'off', true);
END
$$;

REVOKE ALL ON FUNCTION auth_login_lookup(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION auth_api_key(bytea) FROM PUBLIC;
REVOKE ALL ON FUNCTION auth_media_token(bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION auth_login_lookup(text) TO switchboard_app;
GRANT EXECUTE ON FUNCTION auth_api_key(bytea) TO switchboard_app;
GRANT EXECUTE ON FUNCTION auth_media_token(bytea) TO switchboard_app;
