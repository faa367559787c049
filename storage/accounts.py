"""Organisations, users, API keys and media tokens: the writes every entry point shares.

Each function runs on a connection inside ``Database.tenant(org_id)`` (or, for the command line, on
the migrator's connection with the tenant set the same way), so RLS checks every row it writes.
Secrets are generated here (``api.auth.new_secret``), returned once, and stored only as SHA-256.
No audit entries are written here: the caller writes them in the same transaction, with its actor.
"""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass

import asyncpg

from api.auth import (
    API_KEY_PREFIX,
    BOOTSTRAP_ORG_ID,
    MEDIA_TOKEN_PREFIX,
    PREFIX_CHARS,
    Role,
    new_secret,
    secret_hash,
)
from storage.db import ADVISORY_LOCKS

_SLUG_CHARS = re.compile(r"[^a-z0-9]+")


def slug_for(name: str) -> str:
    """A slug from a display name, with a random suffix so two organisations never collide."""
    base = _SLUG_CHARS.sub("-", name.lower()).strip("-")[:40] or "org"
    return f"{base}-{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True)
class IssuedSecret:
    id: uuid.UUID
    prefix: str
    secret: str  # shown once


async def set_tenant(conn: asyncpg.Connection, org_id: uuid.UUID) -> None:
    await conn.execute("SELECT set_config('app.org_id', $1, true)", str(org_id))


async def create_organization(conn: asyncpg.Connection, org_id: uuid.UUID, name: str, *,
                              slug: str | None = None) -> None:
    await conn.execute("INSERT INTO organizations (id, name, slug) VALUES ($1, $2, $3)",
                       org_id, name, slug or slug_for(name))


async def create_user(conn: asyncpg.Connection, org_id: uuid.UUID, *, email: str, password_hash: str | None,
                      role: Role, display_name: str = "") -> uuid.UUID:
    """Raises ``asyncpg.UniqueViolationError`` when a live user has this address."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        "INSERT INTO users (org_id, email, display_name, role, password_hash) VALUES ($1, $2, $3, $4, $5) "
        "RETURNING id", org_id, email.lower(), display_name, role.value, password_hash)


async def create_api_key(conn: asyncpg.Connection, org_id: uuid.UUID, *, name: str, role: Role,
                         created_by: uuid.UUID | None = None, secret: str | None = None) -> IssuedSecret:
    secret = secret or new_secret(API_KEY_PREFIX)
    key_id = await conn.fetchval(
        "INSERT INTO api_keys (org_id, name, prefix, key_hash, role, created_by) VALUES ($1, $2, $3, $4, $5, $6) "
        "RETURNING id", org_id, name, secret[:PREFIX_CHARS], secret_hash(secret), role.value, created_by)
    return IssuedSecret(key_id, secret[:PREFIX_CHARS], secret)


async def create_media_token(conn: asyncpg.Connection, org_id: uuid.UUID, *, name: str,
                             created_by: uuid.UUID | None = None, secret: str | None = None) -> IssuedSecret:
    secret = secret or new_secret(MEDIA_TOKEN_PREFIX)
    token_id = await conn.fetchval(
        "INSERT INTO media_tokens (org_id, name, prefix, token_hash, created_by) VALUES ($1, $2, $3, $4, $5) "
        "RETURNING id", org_id, name, secret[:PREFIX_CHARS], secret_hash(secret), created_by)
    return IssuedSecret(token_id, secret[:PREFIX_CHARS], secret)


async def register_bootstrap_credentials(conn: asyncpg.Connection, *, media_token: str | None,
                                         api_key: str | None) -> list[str]:
    """Make the configured bootstrap media token and admin API key live in the bootstrap organisation
    (inside ``Database.tenant(BOOTSTRAP_ORG_ID)``), unless a row with their hash exists already (then
    it is left alone: a revoked one stays revoked).  Returns what was registered, for the log.

    Serialised by a transaction-level advisory lock: the workers of ``serve --workers`` (and nodes)
    start together, and two of them checking then inserting at once on a fresh database raced (one
    start failed on the organisation's unique slug; a secret could have been registered twice)."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCKS["bootstrap"])
    await conn.execute("INSERT INTO organizations (id, name, slug) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
                       BOOTSTRAP_ORG_ID, "Default organisation", f"default-{BOOTSTRAP_ORG_ID.hex[:8]}")
    done = []
    if media_token and not await conn.fetchval("SELECT 1 FROM media_tokens WHERE token_hash = $1",
                                               secret_hash(media_token)):
        await create_media_token(conn, BOOTSTRAP_ORG_ID, name="bootstrap (SWITCHBOARD_TELNYX_STREAM_TOKEN)",
                                 secret=media_token)
        done.append("media_token")
    if api_key and not await conn.fetchval("SELECT 1 FROM api_keys WHERE key_hash = $1", secret_hash(api_key)):
        await create_api_key(conn, BOOTSTRAP_ORG_ID, name="bootstrap (SWITCHBOARD_BOOTSTRAP_API_KEY)",
                             role=Role.ADMIN, secret=api_key)
        done.append("api_key")
    return done
