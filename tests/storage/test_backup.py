"""``switchboard backup`` and ``switchboard restore`` as an operator runs them: their own processes, the
configured database (``DATABASE_URL``) and cold tier (the data directory's, here).  Three backups with
``--keep 2`` leave the newest two; the newest, restored into a fresh database, has the same rows in
every table as the original."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import orjson

from storage.accounts import create_organization, set_tenant
from storage.db import ensure_database, with_database
from tests.storage.conftest import APP_PASSWORD


async def _counts(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        tables = [r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")]
        return {t: await conn.fetchval(f'SELECT count(*) FROM "{t}"') for t in tables}
    finally:
        await conn.close()


async def test_backups_are_kept_by_count_and_one_restores_into_a_fresh_database_with_equal_counts(
        pg_admin_url: str, tmp_path: Path) -> None:
    source = with_database(pg_admin_url, f"sb_bak_{uuid.uuid4().hex[:8]}")
    data = tmp_path / "data"
    env = {**os.environ, "DATABASE_URL": source, "SWITCHBOARD_DATABASE_APP_PASSWORD": APP_PASSWORD,
           "SWITCHBOARD_DATA_DIR": str(data)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "api.cli", *args], env=env, capture_output=True, text=True,
                              timeout=180)

    first = await asyncio.to_thread(cli, "backup", "--keep", "2")  # migrates the empty database first
    assert first.returncode == 0, first.stderr
    conn = await asyncpg.connect(source)
    try:
        for i in range(3):
            org = uuid.uuid4()
            async with conn.transaction():
                await set_tenant(conn, org)
                await create_organization(conn, org, f"Backed up {i}")
                await conn.execute("INSERT INTO collection_accounts (org_id, external_ref, debtor_name, balance_cents, "
                                   "currency) SELECT $1, 'R' || g, 'Debtor ' || g, g, 'USD' "
                                   "FROM generate_series(1, 200) g", org)
                await conn.execute("INSERT INTO calls (org_id, call_control_id, status) VALUES ($1, 'v3:b', "
                                   "'completed')", org)
    finally:
        await conn.close()
    runs = [orjson.loads(first.stdout)]
    for _ in range(2):
        done = await asyncio.to_thread(cli, "backup", "--keep", "2")
        assert done.returncode == 0, done.stderr
        runs.append(orjson.loads(done.stdout))
    assert runs[2]["removed"] == [runs[0]["key"]]  # the oldest goes, the newest two stay
    kept = sorted(p.relative_to(data / "blobs").as_posix() for p in (data / "blobs" / "backups").iterdir())
    assert kept == sorted([runs[1]["key"], runs[2]["key"]])

    target = with_database(pg_admin_url, f"sb_res_{uuid.uuid4().hex[:8]}")
    await ensure_database(pg_admin_url, target.rsplit("/", 1)[-1].split("?")[0])
    restored = await asyncio.to_thread(cli, "restore", runs[2]["key"], "--database-url", target)
    assert restored.returncode == 0, restored.stderr
    want, got = await _counts(source), await _counts(target)
    assert got == want and want["collection_accounts"] == 600 and want["organizations"] == 3
    bad = await asyncio.to_thread(cli, "restore", "recordings/not-a-backup.wav", "--database-url", target)
    assert bad.returncode == 1 and "not a backup key" in bad.stderr
