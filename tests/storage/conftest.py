"""A freshly migrated database per test module, on the session's PostgreSQL server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from storage.db import APP_ROLE, Database, ensure_database, migrate, with_database, with_user


@dataclass(frozen=True)
class DbUrls:
    admin: str  # superuser: set-up and checks only
    app: str  # switchboard_app: what the application uses


APP_PASSWORD = "app-test-password"


async def migrated_database(pg_admin_url: str) -> DbUrls:
    name = f"sb_test_{uuid.uuid4().hex[:10]}"
    await ensure_database(pg_admin_url, name)
    admin = with_database(pg_admin_url, name)
    await migrate(admin, app_password=APP_PASSWORD)
    return DbUrls(admin, with_user(admin, APP_ROLE, APP_PASSWORD))


async def owned_database(pg_admin_url: str) -> DbUrls:
    """A managed database: the migrator owns the tables but is no superuser, so FORCE ROW LEVEL
    SECURITY applies to it too; migrated by running the migration files as that owner.  ``admin`` is
    the owner's URL here, ``app`` the app role's."""
    from storage.db import MIGRATIONS

    name = f"sb_owner_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_admin_url)
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", APP_ROLE):
            await admin.execute(f"CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS")
        await admin.execute(f"ALTER ROLE {APP_ROLE} PASSWORD '{APP_PASSWORD}'")
        await admin.execute(f"CREATE ROLE {name} LOGIN NOSUPERUSER NOBYPASSRLS CREATEROLE PASSWORD 'owner'")
        await admin.execute(f"CREATE DATABASE {name} OWNER {name}")
    finally:
        await admin.close()
    owner_url = with_user(with_database(pg_admin_url, name), name, "owner")
    owner = await asyncpg.connect(owner_url)
    try:
        assert not await owner.fetchval("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user")
        for path in sorted(MIGRATIONS.glob("*.sql")):  # the migration files themselves, as this owner
            await owner.execute(path.read_text())
    finally:
        await owner.close()
    return DbUrls(owner_url, with_user(with_database(pg_admin_url, name), APP_ROLE, APP_PASSWORD))


@pytest.fixture
async def db_urls(pg_admin_url: str) -> DbUrls:
    return await migrated_database(pg_admin_url)


@pytest.fixture
async def db(db_urls: DbUrls) -> AsyncIterator[Database]:
    database = Database(db_urls.app, min_size=1, max_size=4)
    await database.open()
    yield database
    await database.aclose()


@pytest.fixture
async def admin_conn(db_urls: DbUrls) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(db_urls.admin)
    yield conn
    await conn.close()
