"""Accounts in the database: the look-ups that run before a tenant is known, and what RLS still hides."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from api.auth import Role, secret_hash
from storage.accounts import create_api_key, create_media_token, create_organization, create_user, set_tenant
from storage.db import Database


async def _org(admin_conn: asyncpg.Connection, name: str, email: str) -> tuple[uuid.UUID, str, str]:
    org = uuid.uuid4()
    async with admin_conn.transaction():
        await set_tenant(admin_conn, org)
        await create_organization(admin_conn, org, name)
        await create_user(admin_conn, org, email=email, password_hash="$argon2id$x", role=Role.OWNER)
        key = await create_api_key(admin_conn, org, name="k", role=Role.AGENT)
        tok = await create_media_token(admin_conn, org, name="t")
    return org, key.secret, tok.secret


async def test_lookups_find_each_tenant_by_secret_and_nothing_else(db: Database,
                                                                   admin_conn: asyncpg.Connection) -> None:
    a, key_a, tok_a = await _org(admin_conn, "A", "Owner@A.example")
    b, key_b, tok_b = await _org(admin_conn, "B", "owner@b.example")
    async with db.no_tenant() as conn:
        # As the app role with no tenant: the tables show nothing ...
        assert await conn.fetchval("SELECT count(*) FROM users") == 0
        assert await conn.fetchval("SELECT count(*) FROM media_tokens") == 0
        # ... and each look-up answers exactly its question.
        row = await conn.fetchrow("SELECT * FROM auth_login_lookup($1)", "OWNER@a.example")
        assert row["org_id"] == a and row["role"] == "owner" and row["password_hash"] == "$argon2id$x"
        assert await conn.fetchrow("SELECT * FROM auth_login_lookup($1)", "nobody@a.example") is None
        assert (await conn.fetchrow("SELECT * FROM auth_api_key($1)", secret_hash(key_b)))["org_id"] == b
        assert (await conn.fetchrow("SELECT * FROM auth_api_key($1)", secret_hash(key_a)))["role"] == "agent"
        assert (await conn.fetchrow("SELECT * FROM auth_media_token($1)", secret_hash(tok_a)))["org_id"] == a
        assert await conn.fetchrow("SELECT * FROM auth_media_token($1)", secret_hash(key_a)) is None
        # The look-ups leave no widened view behind them in the transaction.
        assert await conn.fetchval("SELECT count(*) FROM api_keys") == 0
    async with db.tenant(a) as conn:
        await conn.execute("UPDATE api_keys SET revoked_at = now()")
        await conn.execute("UPDATE users SET active = false")
    async with db.no_tenant() as conn:
        assert await conn.fetchrow("SELECT * FROM auth_api_key($1)", secret_hash(key_a)) is None
        assert await conn.fetchrow("SELECT * FROM auth_login_lookup($1)", "owner@a.example") is None
        assert await conn.fetchval("SELECT count(*) FROM auth_api_key($1)", secret_hash(key_b)) == 1


async def test_an_address_names_one_live_user_system_wide(admin_conn: asyncpg.Connection) -> None:
    await _org(admin_conn, "C", "same@c.example")
    with pytest.raises(asyncpg.UniqueViolationError):
        await _org(admin_conn, "D", "SAME@c.example")


async def test_last_use_is_recorded(db: Database, admin_conn: asyncpg.Connection) -> None:
    org, key, tok = await _org(admin_conn, "E", "e@e.example")
    async with db.no_tenant() as conn:
        await conn.fetchrow("SELECT * FROM auth_api_key($1)", secret_hash(key))
        await conn.fetchrow("SELECT * FROM auth_media_token($1)", secret_hash(tok))
    async with db.tenant(org) as conn:
        assert await conn.fetchval("SELECT last_used_at FROM api_keys") is not None
        assert await conn.fetchval("SELECT last_used_at FROM media_tokens") is not None
