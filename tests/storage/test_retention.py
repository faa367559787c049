"""The retention job (``storage/retention.py``) against real PostgreSQL and a real cold tier (files):
a dry run counts and deletes nothing; a run deletes what aged out (soft-deleted calls with their
recordings' objects, accounts and campaigns past the 30-day window; recordings past the two-year
minimum; transcripts past the organisation's policy) and nothing else, in the other organisation
nothing at all; a run stopped by a cold-tier failure midway leaves no object without its row and the
next run finishes with 0 left; a second run finds nothing; policies cannot go under two years."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import orjson
import pytest

from storage.accounts import create_organization, set_tenant
from storage.blobs import LocalBlobStore
from storage.db import Database
from storage.retention import Retention
from tests.fakes.blobs import FailingBlobs

DAY = 86400


async def _world(admin: asyncpg.Connection, blobs: LocalBlobStore) -> dict[str, object]:
    """Two organisations with data of every age; returns what each rule should and should not take."""
    out: dict[str, object] = {"keys_gone": [], "keys_kept": []}
    for label in ("a", "b"):
        org = uuid.uuid4()
        out[label] = org
        async with admin.transaction():
            await set_tenant(admin, org)
            await create_organization(admin, org, f"Retention {label} {org.hex[:6]}")

            async def call(deleted_days: float | None, ended_days: float = 1, rec_days: float = 1,
                           org: uuid.UUID = org) -> tuple[uuid.UUID, str]:
                cid = await admin.fetchval(
                    "INSERT INTO calls (org_id, call_control_id, status, ended_at, deleted_at) VALUES "
                    "($1, $2, 'completed', now() - make_interval(secs => $3), "
                    "CASE WHEN $4::float8 IS NULL THEN NULL ELSE now() - make_interval(secs => $4) END) "
                    "RETURNING id", org, f"v3:{uuid.uuid4().hex}", ended_days * DAY,
                    None if deleted_days is None else deleted_days * DAY)
                key = f"recordings/{org}/{cid}.wav"
                await blobs.put(key, b"RIFF-recording", "audio/wav")
                await admin.execute(
                    "INSERT INTO recordings (org_id, call_id, storage_key, bytes, duration_ms, channels, sample_rate, "
                    "sha256, created_at) VALUES ($1, $2, $3, 14, 1000, 1, 8000, 'x', "
                    "now() - make_interval(secs => $4))",
                    org, cid, key, rec_days * DAY)
                await admin.execute(
                    "INSERT INTO transcriptions (org_id, call_id, track, seq, text, created_at) VALUES "
                    "($1, $2, 'inbound', 1, 'hello', now() - make_interval(secs => $3))", org, cid, ended_days * DAY)
                return cid, key

            gone_call, gone_key = await call(31)  # soft-deleted 31 days ago: goes, object first
            kept_call, kept_key = await call(29)  # 29 days: may still be restored
            old_rec_call, old_key = await call(None, ended_days=800, rec_days=800)  # recording past 2 years
            young_rec_call, young_key = await call(None, ended_days=400, rec_days=400)  # transcripts 400 d old
            for days, ref in ((31, "GONE"), (29, "KEPT")):
                await admin.execute(
                    "INSERT INTO collection_accounts (org_id, external_ref, debtor_name, balance_cents, currency, "
                    "deleted_at) VALUES ($1, $2, 'x', 0, 'USD', now() - make_interval(secs => $3))",
                    org, ref, days * DAY)
            if label == "a":
                await admin.execute("INSERT INTO retention_policies (org_id, resource, days) VALUES "
                                    "($1, 'transcriptions', 365)", org)
                out.update(gone_call=gone_call, kept_call=kept_call, old_rec_call=old_rec_call,
                           young_rec_call=young_rec_call)
                out["keys_gone"] = [gone_key, old_key]
                out["keys_kept"] = [kept_key, young_key]
            else:
                out["keys_b"] = [gone_key, kept_key, old_key, young_key]
    return out


async def _counts(admin: asyncpg.Connection, org: uuid.UUID) -> dict[str, int]:
    """As the migrator (not subject to RLS here): filtered by organisation explicitly."""
    return {t: await admin.fetchval(f"SELECT count(*) FROM {t} WHERE org_id = $1", org)
            for t in ("calls", "recordings", "transcriptions", "collection_accounts")}


async def test_a_dry_run_counts_a_run_deletes_what_aged_out_and_nothing_else(
        db: Database, admin_conn: asyncpg.Connection, tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs", b"k" * 32)
    await blobs.start()
    w = await _world(admin_conn, blobs)
    a, b = w["a"], w["b"]
    assert isinstance(a, uuid.UUID) and isinstance(b, uuid.UUID)
    before_a, before_b = await _counts(admin_conn, a), await _counts(admin_conn, b)
    job = Retention(db, blobs, window_days=30, batch=1)

    dry = await job.run(dry_run=True)
    mine = next(o for o in dry.orgs if o.org_id == a)
    assert mine.counts == {"calls_deleted": 1, "recordings_expired": 1, "accounts_deleted": 1,
                           "transcriptions_expired": 2}  # the 800- and the 400-day-old calls' lines
    assert await _counts(admin_conn, a) == before_a
    assert all(blobs.path_for(k).exists() for k in [*w["keys_gone"], *w["keys_kept"]])  # type: ignore[misc]

    done = await job.run()
    mine = next(o for o in done.orgs if o.org_id == a)
    assert mine.counts == {"calls_deleted": 1, "recordings_expired": 1, "accounts_deleted": 1,
                           "transcriptions_expired": 2}
    after = await _counts(admin_conn, a)
    assert after == {"calls": before_a["calls"] - 1, "recordings": before_a["recordings"] - 2,
                     "transcriptions": before_a["transcriptions"] - 3, "collection_accounts": 1}
    assert not any(blobs.path_for(k).exists() for k in w["keys_gone"])  # type: ignore[attr-defined]
    assert all(blobs.path_for(k).exists() for k in w["keys_kept"])  # type: ignore[attr-defined]
    # The other organisation had no transcript policy: only its window-expired rows and old recording went.
    b_counts = await _counts(admin_conn, b)
    assert b_counts["transcriptions"] == before_b["transcriptions"] - 1  # the deleted call's, by cascade
    again = await job.run()
    assert again.totals() == {}  # idempotent
    audit = await admin_conn.fetch("SELECT actor_type, new_value FROM audit_logs WHERE action = 'retention.purged' "
                                   "AND org_id = $1", a)
    assert [(r["actor_type"], orjson.loads(r["new_value"])["calls_deleted"]) for r in audit] == [("system", 1)]


async def test_a_run_stopped_by_the_cold_tier_leaves_no_object_without_its_row_and_the_next_finishes(
        db: Database, admin_conn: asyncpg.Connection, tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    blobs = LocalBlobStore(root, b"k" * 32)
    await blobs.start()
    w = await _world(admin_conn, blobs)
    failing = FailingBlobs(root, ok=1)
    await failing.start()
    with pytest.raises(OSError, match="unreachable"):
        await Retention(db, failing, window_days=30, batch=1).run()

    async def orphans() -> list[str]:
        """Objects whose recordings row is gone: never allowed."""
        files = [str(p.relative_to(root)) for p in root.rglob("*.wav")]
        async with admin_conn.transaction():
            rows = {r["storage_key"] for r in await admin_conn.fetch("SELECT storage_key FROM recordings")}
        return [f for f in files if f not in rows]

    assert await orphans() == []
    await Retention(db, blobs, window_days=30, batch=1).run()
    assert await orphans() == []
    assert not any(blobs.path_for(k).exists() for k in w["keys_gone"])  # type: ignore[attr-defined]
    assert (await Retention(db, blobs, window_days=30).run()).totals() == {}


async def test_a_policy_cannot_keep_recordings_or_calls_less_than_two_years(admin_conn: asyncpg.Connection) -> None:
    org = uuid.uuid4()
    async with admin_conn.transaction():
        await set_tenant(admin_conn, org)
        await create_organization(admin_conn, org, f"Policy {org.hex[:6]}")
    for resource in ("recordings", "calls"):
        with pytest.raises(asyncpg.CheckViolationError):
            async with admin_conn.transaction():
                await set_tenant(admin_conn, org)
                await admin_conn.execute("INSERT INTO retention_policies (org_id, resource, days) VALUES ($1, $2, 729)",
                                         org, resource)


async def test_the_command_line_dry_runs_runs_and_reruns_to_nothing(pg_admin_url: str, redis_url: str,
                                                                    tmp_path: Path) -> None:
    """``switchboard retention run`` as a deployment's scheduler starts it: its own process, the
    configured database (``DATABASE_URL``), Valkey and cold tier (here the data directory's)."""
    import asyncio
    import os
    import subprocess
    import sys

    from storage.db import with_database
    from tests.storage.conftest import APP_PASSWORD

    name = f"sb_ret_{uuid.uuid4().hex[:8]}"
    url = with_database(pg_admin_url, name)
    env = {**os.environ, "DATABASE_URL": url, "SWITCHBOARD_DATABASE_APP_PASSWORD": APP_PASSWORD,
           "REDIS_URL": redis_url, "SWITCHBOARD_DATA_DIR": str(tmp_path / "data")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "api.cli", "retention", "run", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    first = await asyncio.to_thread(cli, "--dry-run")  # migrates an empty database on the way
    assert first.returncode == 0, first.stderr
    assert orjson.loads(first.stdout) == {"dry_run": True, "totals": {}, "organizations": {}}
    conn = await asyncpg.connect(url)
    try:
        org = uuid.uuid4()
        async with conn.transaction():
            await set_tenant(conn, org)
            await create_organization(conn, org, "Via the command line")
            await conn.execute("INSERT INTO collection_accounts (org_id, external_ref, debtor_name, balance_cents, "
                               "currency, deleted_at) VALUES ($1, 'OLD', 'x', 0, 'USD', now() - interval '40 days')",
                               org)
    finally:
        await conn.close()
    dry = await asyncio.to_thread(cli, "--dry-run")
    assert orjson.loads(dry.stdout)["totals"] == {"accounts_deleted": 1}
    done = await asyncio.to_thread(cli, "--batch", "10")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == {"dry_run": False, "totals": {"accounts_deleted": 1},
                                         "organizations": {str(org): {"accounts_deleted": 1}}}
    again = await asyncio.to_thread(cli)
    assert orjson.loads(again.stdout)["totals"] == {}
