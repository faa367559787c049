"""The sweeps of migration 0008 against real PostgreSQL: stalled placed calls and interrupted imports are
closed once, in every organisation, whoever runs them at the same time; nothing else is touched."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from storage.db import Database
from storage.records import ensure_organization
from storage.sweeps import IMPORT_INTERRUPTED, sweep_interrupted_imports, sweep_stalled_calls
from tests.storage.conftest import owned_database

TIMES = {"initiating_s": 120.0, "ringing_s": 660.0, "ending_s": 120.0}


async def org(db: Database) -> uuid.UUID:
    o = uuid.uuid4()
    async with db.tenant(o) as conn:
        await ensure_organization(conn, o, "Org", f"org-{o.hex[:8]}")
    return o


async def add_call(db: Database, o: uuid.UUID, ccid: str, status: str, age_s: float, node: str | None = None) -> None:
    async with db.tenant(o) as conn:
        await conn.execute(
            "INSERT INTO calls (org_id, call_control_id, direction, status, node_id, updated_at) "
            "VALUES ($1, $2, 'outbound', $3, $4, now() - make_interval(secs => $5))", o, ccid, status, node, age_s)


async def add_import(db: Database, o: uuid.UUID, status: str, age_s: float, node: str | None) -> uuid.UUID:
    async with db.tenant(o) as conn:
        return await conn.fetchval(  # type: ignore[no-any-return]
            "INSERT INTO import_jobs (org_id, status, node_id, rows_ok, heartbeat_at) "
            "VALUES ($1, $2, $3, 500, now() - make_interval(secs => $4)) RETURNING id", o, status, node, age_s)


async def statuses(db: Database, o: uuid.UUID) -> dict[str, tuple[str, str | None]]:
    async with db.tenant(o) as conn:
        rows = await conn.fetch("SELECT call_control_id, status, end_reason FROM calls")
    return {r["call_control_id"]: (r["status"], r["end_reason"]) for r in rows}


async def sweep(db: Database, limit: int = 100) -> list[tuple[uuid.UUID, str, str]]:
    async with db.no_tenant() as conn:
        closed = await sweep_stalled_calls(conn, **TIMES, limit=limit, actor="node-x")
    return sorted((c.org_id, c.call_control_id, c.previous_status) for c in closed)


async def scenario(db: Database) -> None:
    a, b = await org(db), await org(db)
    await add_call(db, a, "init-old", "initiating", 200)
    await add_call(db, a, "init-new", "initiating", 10)
    await add_call(db, b, "ring-old", "ringing", 700)
    await add_call(db, b, "ring-mid", "ringing", 200)  # Telnyx may still be ringing it
    await add_call(db, a, "end-old", "ending", 200)
    await add_call(db, a, "end-streamed", "ending", 200, node="n1")  # a node streams it: that node's
    await add_call(db, a, "active-old", "active", 5000)
    await add_call(db, b, "active-streamed", "active", 5000, node="n1")
    await add_call(db, b, "done", "completed", 5000)

    assert await sweep(db) == sorted([(a, "init-old", "initiating"), (b, "ring-old", "ringing"),
                                      (a, "end-old", "ending")])
    assert await statuses(db, a) == {
        "init-old": ("failed", "no_webhook"), "init-new": ("initiating", None), "end-old": ("failed", "no_webhook"),
        "end-streamed": ("ending", None), "active-old": ("active", None)}
    assert await statuses(db, b) == {"ring-old": ("failed", "no_webhook"), "ring-mid": ("ringing", None),
                                     "active-streamed": ("active", None), "done": ("completed", None)}
    async with db.tenant(b) as conn:
        audit = await conn.fetch("SELECT action, actor_type, actor_id, resource_id, old_value, new_value "
                                 "FROM audit_logs")
        ring_old = await conn.fetchval("SELECT id::text FROM calls WHERE call_control_id = 'ring-old'")
    assert [dict(r) for r in audit] == [{"action": "call.failed", "actor_type": "system", "actor_id": "node-x",
                                         "resource_id": ring_old, "old_value": {"status": "ringing"},
                                         "new_value": {"status": "failed", "reason": "no_webhook"}}]
    assert await sweep(db) == []  # nothing twice

    # Imports: a stale heartbeat is a dead import, a fresh one a live import; at a node's start, its own.
    dead = await add_import(db, a, "running", 300, "n2")
    alive = await add_import(db, a, "running", 10, "n2")
    mine = await add_import(db, b, "running", 10, "n1")
    finished = await add_import(db, b, "done", 300, "n2")
    async with db.no_tenant() as conn:
        assert await sweep_interrupted_imports(conn, stale_s=120, limit=100, actor="n3") == [(a, dead)]
        assert await sweep_interrupted_imports(conn, stale_s=120, limit=100, actor="n1", node_id="n1") == [
            (b, mine)]
        assert await sweep_interrupted_imports(conn, stale_s=120, limit=100, actor="n1", node_id="n1") == []
        assert await conn.fetchval("SELECT count(*) FROM import_jobs") == 0  # RLS intact for the app role
    for o, job, status in ((a, dead, "failed"), (a, alive, "running"), (b, mine, "failed"), (b, finished, "done")):
        async with db.tenant(o) as conn:
            row = await conn.fetchrow("SELECT status, failure, finished_at, rows_ok FROM import_jobs WHERE id = $1",
                                      job)
        assert row["status"] == status
        assert row["rows_ok"] == 500  # what was imported stays
        if job in (dead, mine):
            assert row["failure"] == IMPORT_INTERRUPTED and row["finished_at"] is not None
            assert row["failure"].startswith("interrupted: ") and "re-upload" in row["failure"]
    async with db.tenant(a) as conn:
        entry = await conn.fetchrow("SELECT actor_type, actor_id, new_value FROM audit_logs WHERE resource_id = $1",
                                    str(dead))
    assert (entry["actor_type"], entry["actor_id"], entry["new_value"]["status"]) == ("system", "n3", "failed")


async def test_stalled_placed_calls_and_dead_imports_are_closed_once_and_nothing_else(db: Database) -> None:
    await scenario(db)


async def test_sweepers_on_many_nodes_at_once_close_each_call_once_in_bounded_batches(db: Database) -> None:
    o = await org(db)
    for i in range(30):
        await add_call(db, o, f"stuck-{i}", "initiating", 300)
    assert len(await sweep(db, limit=4)) == 4  # the batch bound
    results = await asyncio.gather(*(sweep(db, limit=100) for _ in range(4)))
    closed = [c for r in results for c in r]
    assert len(closed) == 26 and len({c[1] for c in closed}) == 26
    async with db.tenant(o) as conn:
        assert await conn.fetchval("SELECT count(*) FROM audit_logs WHERE action = 'call.failed'") == 30
        assert await conn.fetchval("SELECT count(*) FROM calls WHERE status = 'failed'") == 30


async def test_a_webhook_that_commits_first_wins_over_the_sweep(db: Database) -> None:
    o = await org(db)
    await add_call(db, o, "late", "initiating", 300)
    async with db.tenant(o) as conn:  # the webhook's transaction holds the row while a sweep runs
        await conn.execute("SELECT 1 FROM calls WHERE call_control_id = 'late' FOR UPDATE")
        assert await sweep(db) == []  # skipped, not waited for
        await conn.execute("UPDATE calls SET status = 'ringing', updated_at = now() WHERE call_control_id = 'late'")
    assert await sweep(db) == []  # it made progress: not stalled any more
    assert await statuses(db, o) == {"late": ("ringing", None)}


async def test_the_sweeps_also_work_when_the_tables_owner_is_not_a_superuser(pg_admin_url: str) -> None:
    """A managed database: the migrator owns the tables but is subject to FORCE ROW LEVEL SECURITY."""
    urls = await owned_database(pg_admin_url)
    owner = await asyncpg.connect(urls.admin)
    try:  # the owner outside the functions is still filtered by the tenant policy
        assert await owner.fetchval("SELECT count(*) FROM import_jobs") == 0
    finally:
        await owner.close()
    db = Database(urls.app)
    await db.open()
    try:
        await scenario(db)
    finally:
        await db.aclose()
