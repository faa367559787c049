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
