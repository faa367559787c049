"""The tenant wipe (``storage/wipe.py``) on tables without an ``id`` column (deleted by ``ctid``), in
batches of one, against real PostgreSQL: every such row of the organisation goes, another's stays."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg

from storage.accounts import create_organization, set_tenant
from storage.blobs import LocalBlobStore
from storage.db import Database
from storage.wipe import Wipe

TABLES = ("voice_configs", "usage_stats", "retention_policies")


async def _org(conn: asyncpg.Connection, name: str) -> uuid.UUID:
    org = uuid.uuid4()
    async with conn.transaction():
        await set_tenant(conn, org)
        await create_organization(conn, org, name)
        await conn.execute("INSERT INTO voice_configs (org_id, caller_id) VALUES ($1, '+15550001111')", org)
        for day in range(3):
            await conn.execute("INSERT INTO usage_stats (org_id, day, metric, quantity) VALUES "
                               "($1, current_date - $2::int, 'call_minutes', 3)", org, day)
        for resource in ("transcriptions", "translations"):
            await conn.execute("INSERT INTO retention_policies (org_id, resource, days) VALUES ($1, $2, 10)",
                               org, resource)
    return org


async def test_rows_of_tables_without_an_id_are_wiped_one_by_one(db: Database, admin_conn: asyncpg.Connection,
                                                                 tmp_path: Path) -> None:
    gone, kept = await _org(admin_conn, f"Wiped {uuid.uuid4().hex[:6]}"), await _org(admin_conn, "Kept")
    await admin_conn.execute("UPDATE organizations SET deleted_at = now() WHERE id = $1", gone)
    blobs = LocalBlobStore(tmp_path / "blobs", b"k" * 32)
    await blobs.start()
    report = await Wipe(db, blobs, batch=1).wipe(gone)
    assert report.rows == {"voice_configs": 1, "usage_stats": 3, "retention_policies": 2} and report.done
    for table in TABLES:
        assert await admin_conn.fetchval(f"SELECT count(*) FROM {table} WHERE org_id = $1", gone) == 0, table
        assert await admin_conn.fetchval(f"SELECT count(*) FROM {table} WHERE org_id = $1", kept) > 0, table
