"""Accounts in the database: the look-ups that run before a tenant is known, and what RLS still hides."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from api.auth import Role, secret_hash
from storage.accounts import create_api_key, create_media_token, create_organization, create_user, set_tenant
from storage.db import Database
from tests.storage.conftest import DbUrls


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


async def test_bootstrap_credentials_are_registered_one_process_at_a_time(db_urls: DbUrls) -> None:
    """``serve --workers`` starts its workers together on a fresh database and each registers the
    configured credentials: checking then inserting at once raced (a start failed on the organisation's
    unique slug in CI).  Registration is serialised: while another holds the lock it waits; then exactly
    one of several registers and none fails."""
    from api.auth import BOOTSTRAP_ORG_ID
    from storage.accounts import register_bootstrap_credentials
    from storage.db import ADVISORY_LOCKS

    pools = [Database(db_urls.app, min_size=1, max_size=1) for _ in range(4)]
    for pool in pools:
        await pool.open()
    try:
        async def register(pool: Database, lock_timeout: str | None = None) -> list[str]:
            async with pool.tenant(BOOTSTRAP_ORG_ID) as conn:
                if lock_timeout:
                    await conn.execute(f"SET LOCAL lock_timeout = '{lock_timeout}'")
                return await register_bootstrap_credentials(conn, media_token="sbm_race_token_0123456789abcdef",
                                                            api_key="sbk_race_key_0123456789abcdef")

        async with pools[0].tenant(BOOTSTRAP_ORG_ID) as holder:
            await holder.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCKS["bootstrap"])
            with pytest.raises(asyncpg.LockNotAvailableError):
                await register(pools[1], lock_timeout="300ms")
        done = await asyncio.gather(*(register(p) for p in pools))
        assert sorted(map(tuple, done)) == [(), (), (), ("media_token", "api_key")]
        async with pools[0].tenant(BOOTSTRAP_ORG_ID) as conn:
            assert await conn.fetchval("SELECT count(*) FROM media_tokens") == 1
            assert await conn.fetchval("SELECT count(*) FROM api_keys") == 1
    finally:
        for pool in pools:
            await pool.aclose()
