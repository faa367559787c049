"""The retention job (``storage/retention.py``) against real PostgreSQL and a real cold tier (files):
a dry run counts and deletes nothing; a run deletes what aged out (soft-deleted calls with their
recordings' objects, accounts and campaigns past the 30-day window; recordings past the two-year
minimum; transcripts past the organisation's policy) and nothing else, in the other organisation
nothing at all; a run stopped by a cold-tier failure midway leaves no object without its row and the
next run finishes with 0 left; a second run finds nothing; policies cannot go under two years.

Migration 0017's rules, each on both sides of its bound: soft-deleted users (their call, key and audit
entries stay), report exports (objects first, a failed upload's object too), sealed evidence bundles
(never before retain_until, nor while their call is kept; the database refuses it too; a wiped
organisation's go after retain_until), the finished rows of the work queues and webhook deliveries,
and archived lines (the archive deleted, or rewritten without its translations).  One node at a time:
two nodes' runs at once, of retention and of the tenant wipe: one runs, the other skips."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
import orjson
import pytest

from storage.accounts import create_organization, set_tenant
from storage.blobs import LocalBlobStore
from storage.db import Database
from storage.retention import SKIPPED, Retention
from tests.fakes.blobs import FailingBlobs
from tests.storage.conftest import DbUrls

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
    configured database (``DATABASE_URL``), Valkey and cold tier (here the data directory's); while a
    node holds the job's lock it reports itself skipped and deletes nothing."""
    import asyncio
    import os
    import subprocess
    import sys

    from storage.db import ADVISORY_LOCKS, with_database
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
    assert orjson.loads(first.stdout) == {"dry_run": True, "skipped": None, "totals": {}, "organizations": {}}
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
    holder = await asyncpg.connect(url)  # a server node in the middle of its own run
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCKS["retention"])
        busy = await asyncio.to_thread(cli)
        assert busy.returncode == 0, busy.stderr
        assert orjson.loads(busy.stdout) == {"dry_run": False, "skipped": SKIPPED, "totals": {}, "organizations": {}}
    finally:
        await holder.close()
    done = await asyncio.to_thread(cli, "--batch", "10")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == {"dry_run": False, "skipped": None, "totals": {"accounts_deleted": 1},
                                         "organizations": {str(org): {"accounts_deleted": 1}}}
    again = await asyncio.to_thread(cli)
    assert orjson.loads(again.stdout)["totals"] == {}


# -- the rules of migration 0017: users, exports, evidence, the bookkeeping tables, archives --------------

SHA = "ab" * 32


def _ago(param: str) -> str:
    """SQL for ``param`` days (float) before now."""
    return f"now() - {param}::float8 * interval '1 day'"


async def _more(admin: asyncpg.Connection, blobs: LocalBlobStore, org: uuid.UUID, *,
                label: str) -> dict[str, list[object]]:
    """One organisation with a row on each side of every 0017 rule; returns what must go and what must stay
    ({"gone": [(table, id)], "kept": [(table, id)], "objects_gone": [key], "objects_kept": [key]})."""
    out: dict[str, list[object]] = {"gone": [], "kept": [], "objects_gone": [], "objects_kept": []}
    async with admin.transaction():
        await set_tenant(admin, org)
        await create_organization(admin, org, f"More {label} {org.hex[:6]}")
        await admin.execute("INSERT INTO retention_policies (org_id, resource, days) VALUES ($1, 'calls', 730)", org)

        async def user(deleted_days: float | None) -> uuid.UUID:
            return await admin.fetchval(  # type: ignore[no-any-return]
                "INSERT INTO users (org_id, email, role, deleted_at) VALUES ($1, $2, 'agent', "
                f"CASE WHEN $3::float8 IS NULL THEN NULL ELSE {_ago('$3')} END) RETURNING id",
                org, f"u-{uuid.uuid4().hex[:10]}@example.com", deleted_days)

        async def call_row(ended_days: float, deleted_days: float | None = None,
                           agent: uuid.UUID | None = None) -> uuid.UUID:
            return await admin.fetchval(  # type: ignore[no-any-return]
                "INSERT INTO calls (org_id, call_control_id, status, ended_at, agent_id, deleted_at) VALUES "
                f"($1, $2, 'completed', {_ago('$3')}, $4, "
                f"CASE WHEN $5::float8 IS NULL THEN NULL ELSE {_ago('$5')} END) RETURNING id",
                org, f"v3:{uuid.uuid4().hex}", ended_days, agent, deleted_days)

        # Users: deleted 31 days ago (goes; its call, key and audit entries stay), 29 days ago, live.
        u_gone, u_kept, u_live = await user(31), await user(29), await user(None)
        out["gone"].append(("users", u_gone))
        out["kept"] += [("users", u_kept), ("users", u_live)]
        agent_call = await call_row(1, agent=u_gone)
        out["kept"].append(("calls", agent_call))
        out["user_gone"] = [u_gone, agent_call]
        key_id = await admin.fetchval("INSERT INTO api_keys (org_id, name, prefix, key_hash, role, created_by) "
                                      "VALUES ($1, 'k', 'sbk_x', $2, 'admin', $3) RETURNING id",
                                      org, uuid.uuid4().bytes, u_gone)
        out["kept"].append(("api_keys", key_id))
        await admin.execute("INSERT INTO audit_logs (org_id, actor_type, actor_id, action, resource_type, "
                            "resource_id) VALUES ($1, 'user', $2, 'user.deleted', 'user', $2)", org, str(u_gone))

        # Report exports: done 8 days ago (goes with its object), 6 days ago (stays); failed after its
        # upload, 8 days ago (no storage_key, the object at the key exports.py writes: both go); running
        # since a request 8 days ago (orphaned: goes); queued an hour ago (stays).
        for days, status, finished, with_key, gone in ((8, "done", True, True, True), (6, "done", True, True, False),
                                                       (8, "failed", True, False, True),
                                                       (8, "running", False, False, True),
                                                       (1 / 24, "queued", False, False, False)):
            job = uuid.uuid4()
            key = f"exports/{org}/{job}.csv"
            if status in ("done", "failed"):
                await blobs.put(key, b"a,b\n", "text/csv")
                out["objects_gone" if gone else "objects_kept"].append(key)
            await admin.execute(
                "INSERT INTO export_jobs (id, org_id, kind, format, status, storage_key, created_at, finished_at) "
                f"VALUES ($1, $2, 'calls', 'csv', $3, $4, {_ago('$5')} - interval '1 minute', "
                f"CASE WHEN $6 THEN {_ago('$5')} END)", job, org, status, key if with_key else None, days, finished)
            out["gone" if gone else "kept"].append(("export_jobs", job))

        # Evidence bundles: past retain_until, of a deleted call (goes), of a call gone (goes), of a call past
        # the calls policy (goes, the call too), of a live call (stays); before retain_until, of the
        # deleted call (stays, whatever else).
        deleted_call, live_call, old_call = await call_row(2, deleted_days=1), await call_row(1), await call_row(800)
        out["gone"].append(("calls", old_call))
        out["kept"] += [("calls", deleted_call), ("calls", live_call)]
        for call_id, retain_days, gone in ((deleted_call, -1, True), (uuid.uuid4(), -1, True), (old_call, -1, True),
                                           (live_call, -1, False), (deleted_call, 1, False)):
            bundle = uuid.uuid4()
            key = f"evidence/{org}/{call_id}/{bundle}.zip"
            await blobs.put(key, b"PK-sealed", "application/zip")
            await admin.execute(
                "INSERT INTO evidence_bundles (id, org_id, call_id, call_control_id, storage_key, bytes, sha256, "
                "manifest_sha256, files, retain_until) VALUES ($1, $2, $3, 'v3:x', $4, 9, $5, $5, 7, "
                "now() + $6::float8 * interval '1 day')", bundle, org, call_id, key, SHA, retain_days)
            out["gone" if gone else "kept"].append(("evidence_bundles", bundle))
            out["objects_gone" if gone else "objects_kept"].append(key)

        # The bookkeeping of the work queues: finished and old (goes), finished and young or not finished (stays).
        for status, days, gone in (("done", 91, True), ("failed", 91, True), ("pending", 200, False),
                                   ("running", 200, False), ("done", 10, False)):
            job = await admin.fetchval(
                "INSERT INTO call_jobs (org_id, call_id, kind, dedupe_key, payload, status, created_at, updated_at) "
                f"VALUES ($1, $2, 'recording_fetch', $3, '{{}}', $4, {_ago('$5')}, {_ago('$5')}) RETURNING id",
                org, live_call, f"job-{uuid.uuid4().hex}", status, days)
            out["gone" if gone else "kept"].append(("call_jobs", job))
        for sent_days, created_days, gone in ((91, 92, True), (10, 11, False), (None, 200, False)):
            row = await admin.fetchval(
                "INSERT INTO billing_outbox (org_id, kind, idempotency_key, payload, sent_at, created_at) VALUES "
                f"($1, 'email', $2, '{{}}', CASE WHEN $3::float8 IS NULL THEN NULL ELSE {_ago('$3')} END, "
                f"{_ago('$4')}) RETURNING id", org, f"out-{uuid.uuid4().hex}", sent_days, created_days)
            out["gone" if gone else "kept"].append(("billing_outbox", row))
        for status, days, gone in (("done", 91, True), ("failed", 91, True), ("running", 200, False),
                                   ("done", 10, False)):
            row = await admin.fetchval(
                "INSERT INTO import_jobs (org_id, status, created_at, updated_at, finished_at) VALUES "
                f"($1, $2, {_ago('$3')}, {_ago('$3')}, CASE WHEN $2 IN ('done', 'failed') THEN {_ago('$3')} END) "
                "RETURNING id", org, status, days)
            out["gone" if gone else "kept"].append(("import_jobs", row))
    return out


MORE_COUNTS = {"users_deleted": 1, "exports_expired": 3, "evidence_expired": 3, "calls_expired": 1,
               "call_jobs_finished": 2, "billing_outbox_sent": 1, "imports_finished": 2}


async def _present(admin: asyncpg.Connection, rows: list[object]) -> list[object]:
    found = []
    for table, row_id in rows:  # type: ignore[misc]
        if await admin.fetchval(f"SELECT count(*) FROM {table} WHERE id = $1", row_id):
            found.append((table, row_id))
    return found


async def _webhooks(admin: asyncpg.Connection) -> None:
    for event, days in (("evt_old", 91), ("evt_young", 89)):
        await admin.execute("INSERT INTO webhook_events (provider, event_id, received_at) VALUES "
                            f"('stripe', $1, {_ago('$2')})", event, days)


async def test_users_exports_evidence_and_the_queues_bookkeeping_age_out_and_nothing_else(
        db: Database, admin_conn: asyncpg.Connection, tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs", b"k" * 32)
    await blobs.start()
    m, n = uuid.uuid4(), uuid.uuid4()
    world, other = await _more(admin_conn, blobs, m, label="m"), await _more(admin_conn, blobs, n, label="n")
    await _webhooks(admin_conn)
    job = Retention(db, blobs, window_days=30, batch=2)

    dry = await job.run(dry_run=True)
    assert {o.org_id: o.counts for o in dry.orgs} == {m: MORE_COUNTS, n: MORE_COUNTS}
    assert dry.system == {"webhook_events_expired": 1}
    assert await _present(admin_conn, world["gone"]) == world["gone"]  # counted, not deleted
    assert all(blobs.path_for(k).exists() for k in world["objects_gone"])  # type: ignore[arg-type]

    done = await job.run()
    # Per organisation, as counted: billing_outbox and call_jobs have no RLS, and m's run took none of n's rows.
    assert done.skipped is None and {o.org_id: o.counts for o in done.orgs} == {m: MORE_COUNTS, n: MORE_COUNTS}
    assert done.system == {"webhook_events_expired": 1}
    for w in (world, other):
        assert await _present(admin_conn, w["gone"]) == []
        assert await _present(admin_conn, w["kept"]) == w["kept"]
        assert not any(blobs.path_for(k).exists() for k in w["objects_gone"])  # type: ignore[arg-type]
        assert all(blobs.path_for(k).exists() for k in w["objects_kept"])  # type: ignore[arg-type]
    assert [r[0] for r in await admin_conn.fetch("SELECT event_id FROM webhook_events")] == ["evt_young"]
    # The purged user: its call and the key it made stay, unlinked; its audit entries stay as written.
    u_gone, agent_call = world["user_gone"]
    assert await admin_conn.fetchval("SELECT agent_id FROM calls WHERE id = $1", agent_call) is None
    assert await admin_conn.fetchval("SELECT count(*) FROM api_keys WHERE org_id = $1 AND created_by IS NULL "
                                     "AND revoked_at IS NULL", m) == 1
    assert await admin_conn.fetchval("SELECT count(*) FROM audit_logs WHERE actor_id = $1 AND resource_id = $1",
                                     str(u_gone)) == 1
    purged = await admin_conn.fetchval("SELECT new_value FROM audit_logs WHERE action = 'retention.purged' "
                                       "AND org_id = $1", m)
    assert orjson.loads(purged) == MORE_COUNTS

    again = await job.run()
    assert again.totals() == {} and again.skipped is None  # idempotent
    assert (await job.run(dry_run=True)).totals() == {}


async def test_the_database_refuses_to_delete_a_sealed_bundle_before_retain_until(
        db: Database, admin_conn: asyncpg.Connection, tmp_path: Path) -> None:
    """Migration 0017's policy: whatever the application asks, a DELETE reaches only expired bundles."""
    blobs = LocalBlobStore(tmp_path / "blobs", b"k" * 32)
    await blobs.start()
    org = uuid.uuid4()
    await _more(admin_conn, blobs, org, label="sealed")
    sealed = await admin_conn.fetchval("SELECT id FROM evidence_bundles WHERE retain_until > now()")
    async with db.tenant(org) as conn:
        # The four past retain_until (the call's state is the job's rule, not the database's), not the fifth.
        assert await conn.execute("DELETE FROM evidence_bundles") == "DELETE 4"
        assert await conn.execute("DELETE FROM evidence_bundles WHERE id = $1", sealed) == "DELETE 0"
        assert await conn.fetchval("SELECT id FROM evidence_bundles") == sealed
    async with db.tenant(org) as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # and a seal is never changed
            await conn.execute("UPDATE evidence_bundles SET retain_until = now() - interval '1 day'")


async def test_a_run_cut_short_by_the_cold_tier_leaves_no_export_or_bundle_object_without_its_row(
        db: Database, admin_conn: asyncpg.Connection, tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    blobs = LocalBlobStore(root, b"k" * 32)
    await blobs.start()
    org = uuid.uuid4()
    world = await _more(admin_conn, blobs, org, label="cut")

    async def orphans() -> list[str]:
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        rows = {r[0] for r in await admin_conn.fetch(
            "SELECT storage_key FROM evidence_bundles UNION ALL SELECT coalesce(storage_key, "
            "'exports/' || org_id || '/' || id || '.' || format) FROM export_jobs")}
        return [f for f in files if f not in rows]

    for ok in (0, 1, 1, 1):  # the cold tier fails after `ok` deletes, four times (of six objects to delete)
        failing = FailingBlobs(root, ok=ok)
        await failing.start()
        with pytest.raises(OSError, match="unreachable"):
            await Retention(db, failing, window_days=30, batch=1).run()
        assert await orphans() == []
    await Retention(db, blobs, window_days=30, batch=1).run()
    assert await orphans() == [] and await _present(admin_conn, world["gone"]) == []
    assert not any(blobs.path_for(k).exists() for k in world["objects_gone"])  # type: ignore[arg-type]
    assert (await Retention(db, blobs, window_days=30).run()).totals() == {}


async def test_a_wiped_organisations_evidence_goes_after_retain_until_and_not_before(
        db: Database, admin_conn: asyncpg.Connection, tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs", b"k" * 32)
    await blobs.start()
    org = uuid.uuid4()
    async with admin_conn.transaction():
        await set_tenant(admin_conn, org)
        await create_organization(admin_conn, org, "Wiped")
        keys = {}
        for label, retain_days in (("expired", -1), ("sealed", 365)):
            keys[label] = f"evidence/{org}/{uuid.uuid4()}/{label}.zip"
            await blobs.put(keys[label], b"PK", "application/zip")
            await admin_conn.execute(
                "INSERT INTO evidence_bundles (org_id, call_id, call_control_id, storage_key, bytes, sha256, "
                "manifest_sha256, files, retain_until) VALUES ($1, $2, 'v3:x', $3, 2, $4, $4, 1, "
                "now() + $5::float8 * interval '1 day')", org, uuid.uuid4(), keys[label], SHA, retain_days)
        await admin_conn.execute("UPDATE organizations SET deleted_at = now(), wiped_at = now() WHERE id = $1", org)
    job = Retention(db, blobs, window_days=30)
    assert (await job.run(dry_run=True)).totals() == {"evidence_expired": 1}
    report = await job.run()
    assert [(o.org_id, o.counts) for o in report.orgs] == [(org, {"evidence_expired": 1})]
    assert not blobs.path_for(keys["expired"]).exists() and blobs.path_for(keys["sealed"]).exists()
    assert await admin_conn.fetchval("SELECT count(*) FROM evidence_bundles WHERE org_id = $1", org) == 1
    assert (await job.run()).totals() == {}


async def test_archived_lines_follow_the_transcripts_and_translations_policies(
        db: Database, admin_conn: asyncpg.Connection, tmp_path: Path) -> None:
    """Transcripts 365 days, translations 30: an archive whose newest line is 400 days old goes (object,
    then the row forgets it); one 100 days old loses its translations (rewritten, same key); one 10 days
    old stays whole.  Archives made before 0017 (no newest-line time) are aged by when they were made."""
    from storage.archive import archive_call, read_archive

    blobs = LocalBlobStore(tmp_path / "blobs", b"k" * 32)
    await blobs.start()
    org = uuid.uuid4()
    calls: dict[str, uuid.UUID] = {}
    async with admin_conn.transaction():
        await set_tenant(admin_conn, org)
        await create_organization(admin_conn, org, "Archives")
        for resource, days in (("transcriptions", 365), ("translations", 30)):
            await admin_conn.execute("INSERT INTO retention_policies (org_id, resource, days) VALUES ($1, $2, $3)",
                                     org, resource, days)
        for label, line_days, archived_days in (("old", 400, None), ("mid", 100, None), ("new", 10, None),
                                                ("legacy_old", 1, 400), ("legacy_mid", 1, 100)):
            cid = await admin_conn.fetchval("INSERT INTO calls (org_id, call_control_id, status, ended_at) VALUES "
                                            "($1, $2, 'completed', now()) RETURNING id", org, f"v3:{label}")
            calls[label] = cid
            for seq in (1, 2):
                tid = await admin_conn.fetchval(
                    "INSERT INTO transcriptions (org_id, call_id, track, seq, text, created_at) VALUES "
                    f"($1, $2, 'inbound', $3, $4, {_ago('$5')}) RETURNING id",
                    org, cid, seq, f"{label} line {seq}", line_days + 0.01 * (2 - seq))
                await admin_conn.execute(
                    "INSERT INTO translations (org_id, call_id, transcription_id, source_lang, target_lang, "
                    f"original_text, translated_text, created_at) VALUES ($1, $2, $3, 'en', 'es', 'x', 'y', "
                    f"{_ago('$4')})", org, cid, tid, line_days)
            assert await archive_call(admin_conn, blobs, org, cid) == 4
            if archived_days is not None:  # as archived before 0017
                await admin_conn.execute("UPDATE calls SET archive_lines_until = NULL, archive_translations = NULL, "
                                         f"archived_at = {_ago('$2')} WHERE id = $1", cid, archived_days)
    keys = {label: f"archive/{org}/{cid}.jsonl.gz" for label, cid in calls.items()}
    state = await admin_conn.fetchrow("SELECT archive_translations, archive_lines_until < now() - interval '399 days' "
                                      "AS old FROM calls WHERE id = $1", calls["old"])
    assert (state["archive_translations"], state["old"]) == (2, True)  # the newest line's time, not the archiving's

    job = Retention(db, blobs, window_days=30, batch=1)
    expected = {"archives_expired": 2, "archived_translations_expired": 2}
    # A dry run counts each rule on what is there now: the two archives that go whole also hold translations.
    assert (await job.run_org(org, dry_run=True)).counts == {**expected, "archived_translations_expired": 4}
    assert (await job.run()).totals() == expected
    for label in ("old", "legacy_old"):  # gone, and the call no longer names it
        assert not blobs.path_for(keys[label]).exists()
        assert await admin_conn.fetchval("SELECT archive_key FROM calls WHERE id = $1", calls[label]) is None
    for label in ("mid", "legacy_mid"):  # transcripts kept, translations gone, the row says so
        transcripts, translations = await read_archive(blobs, keys[label])
        assert [t["text"] for t in transcripts] == [f"{label} line 1", f"{label} line 2"] and translations == []
        assert await admin_conn.fetchval("SELECT archive_translations FROM calls WHERE id = $1", calls[label]) == 0
    transcripts, translations = await read_archive(blobs, keys["new"])
    assert len(transcripts) == 2 and len(translations) == 2
    assert (await job.run()).totals() == {}  # idempotent
    # Nothing orphaned either way: every archive object is named by its call, every named one exists.
    named = {r[0] for r in await admin_conn.fetch("SELECT archive_key FROM calls WHERE archive_key IS NOT NULL")}
    on_disk = {p.relative_to(tmp_path / "blobs").as_posix() for p in (tmp_path / "blobs").rglob("*.gz")}
    assert named == on_disk == {keys["mid"], keys["new"], keys["legacy_mid"]}


# -- one node at a time -------------------------------------------------------------------------------


async def test_two_nodes_running_retention_at_once_run_it_once(db_urls: DbUrls, admin_conn: asyncpg.Connection,
                                                               tmp_path: Path) -> None:
    """Two nodes (two pools) on one database: the run that takes the advisory lock runs; the other, tried
    while the first is held mid-run, returns at once as skipped; the totals are one run's."""
    from tests.fakes.blobs import GatedBlobs

    root = tmp_path / "blobs"
    blobs = LocalBlobStore(root, b"k" * 32)
    await blobs.start()
    await _world(admin_conn, blobs)
    nodes = [Database(db_urls.app, min_size=1, max_size=3) for _ in range(2)]
    for node in nodes:
        await node.open()
    try:
        expected = (await Retention(nodes[0], blobs, window_days=30).run(dry_run=True)).totals()
        assert expected
        gated = GatedBlobs(root)
        await gated.start()
        first = asyncio.create_task(Retention(nodes[0], gated, window_days=30, batch=1).run())
        await asyncio.wait_for(gated.entered.wait(), 10)  # the first node is inside its run, holding the lock
        second = await asyncio.wait_for(Retention(nodes[1], blobs, window_days=30, batch=1).run(), 10)
        assert second.skipped == SKIPPED and second.totals() == {} and second.orgs == []
        gated.gate.set()
        ran = await asyncio.wait_for(first, 30)
        assert ran.skipped is None and ran.totals() == expected
        # The lock went with the run: the other node's next round runs (and finds nothing).
        after = await Retention(nodes[1], blobs, window_days=30).run()
        assert after.skipped is None and after.totals() == {}
    finally:
        for node in nodes:
            await node.aclose()


async def test_a_wipe_runs_on_one_node_at_a_time_and_its_holder_takes_organisations_deleted_meanwhile(
        db_urls: DbUrls, admin_conn: asyncpg.Connection, tmp_path: Path) -> None:
    from storage.wipe import Wipe
    from tests.fakes.blobs import GatedBlobs

    root = tmp_path / "blobs"
    blobs = LocalBlobStore(root, b"k" * 32)
    await blobs.start()
    orgs = []
    for label in ("first", "later"):
        org = uuid.uuid4()
        orgs.append(org)
        async with admin_conn.transaction():
            await set_tenant(admin_conn, org)
            await create_organization(admin_conn, org, f"Wipe {label}")
            cid = await admin_conn.fetchval("INSERT INTO calls (org_id, call_control_id, status) VALUES ($1, $2, "
                                            "'completed') RETURNING id", org, f"v3:{label}")
            key = f"recordings/{org}/{cid}.wav"
            await blobs.put(key, b"RIFF", "audio/wav")
            await admin_conn.execute("INSERT INTO recordings (org_id, call_id, storage_key, bytes, duration_ms, "
                                     "channels, sample_rate, sha256) VALUES ($1, $2, $3, 4, 10, 1, 8000, 'x')",
                                     org, cid, key)
    await admin_conn.execute("UPDATE organizations SET deleted_at = now() WHERE id = $1", orgs[0])
    nodes = [Database(db_urls.app, min_size=1, max_size=3) for _ in range(2)]
    for node in nodes:
        await node.open()
    try:
        gated = GatedBlobs(root)
        await gated.start()
        first = asyncio.create_task(Wipe(nodes[0], gated, batch=1).run())
        await asyncio.wait_for(gated.entered.wait(), 10)
        # Another organisation is deleted while the first node wipes; the second node's run skips.
        await admin_conn.execute("UPDATE organizations SET deleted_at = now() WHERE id = $1", orgs[1])
        second = await asyncio.wait_for(Wipe(nodes[1], blobs, batch=1).run(), 10)
        assert second.skipped is not None and second.reports == []
        gated.gate.set()
        ran = await asyncio.wait_for(first, 30)
        assert ran.skipped is None and [r.org_id for r in ran.reports] == orgs and all(r.done for r in ran.reports)
        assert [r.objects for r in ran.reports] == [1, 1]
    finally:
        for node in nodes:
            await node.aclose()
    assert not [p for p in root.rglob("*") if p.is_file()]
    assert await admin_conn.fetchval("SELECT count(*) FROM organizations WHERE wiped_at IS NULL "
                                     "AND id = ANY($1)", orgs) == 0


async def test_a_restore_racing_the_purge_of_its_row_waits_and_finds_it_gone(
        db: Database, admin_conn: asyncpg.Connection, tmp_path: Path) -> None:
    """The batch's rows stay locked from the select to their delete: a restore arriving while the purge
    deletes the call's objects cannot bring the row back without them (it waits, then finds nothing)."""
    from tests.fakes.blobs import GatedBlobs

    root = tmp_path / "blobs"
    blobs = LocalBlobStore(root, b"k" * 32)
    await blobs.start()
    w = await _world(admin_conn, blobs)
    gone_call, org = w["gone_call"], w["a"]
    assert isinstance(org, uuid.UUID) and isinstance(w["keys_gone"], list)
    target = w["keys_gone"][0]  # the 31-day call's recording

    class HeldOnTarget(GatedBlobs):
        async def delete(self, key: str) -> None:
            if key == target:
                self.entered.set()
                await self.gate.wait()
            await LocalBlobStore.delete(self, key)

    gated = HeldOnTarget(root)
    await gated.start()
    run = asyncio.create_task(Retention(db, gated, window_days=30, batch=1).run())
    try:
        await asyncio.wait_for(gated.entered.wait(), 10)  # the purge of that call holds its row
        async with db.tenant(org) as conn:
            await conn.execute("SET LOCAL lock_timeout = '300ms'")
            with pytest.raises(asyncpg.LockNotAvailableError):
                await conn.execute("UPDATE calls SET deleted_at = NULL WHERE id = $1", gone_call)
    finally:
        gated.gate.set()
        await asyncio.wait_for(run, 30)
    async with db.tenant(org) as conn:
        assert await conn.execute("UPDATE calls SET deleted_at = NULL WHERE id = $1", gone_call) == "UPDATE 0"
    assert await admin_conn.fetchval("SELECT count(*) FROM calls WHERE id = $1", gone_call) == 0
