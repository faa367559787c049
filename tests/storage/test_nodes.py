"""Node liveness in the database (migration 0019) against real PostgreSQL: a node whose heartbeat is older
than the bound has its open calls closed once as node_lost, audited once, in every organisation, and is
forgotten; a live node and other nodes' calls are untouched; a lost node that comes back is told so, and
its own late end does not reopen or rename what the sweep closed."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from storage.db import Database
from storage.records import CallEnded, CallStarted, ensure_organization
from storage.sweeps import NODE_LOST, beat_node, sweep_lost_nodes
from tests.storage.conftest import DbUrls, owned_database

DEAD_S = 30.0


async def open_call(db: Database, org: uuid.UUID, ccid: str, node: str | None) -> None:
    async with db.tenant(org) as conn:
        await ensure_organization(conn, org, "Org", f"org-{org.hex[:8]}")
        await CallStarted(org, uuid.uuid5(org, ccid), ccid, None, "s", None, None, "PCMU", 8000, datetime.now(UTC),
                          node).apply(conn)


async def calls_of(db: Database, org: uuid.UUID) -> dict[str, tuple[str, str | None]]:
    async with db.tenant(org) as conn:
        rows = await conn.fetch("SELECT call_control_id, status, end_reason FROM calls")
    return {r["call_control_id"]: (r["status"], r["end_reason"]) for r in rows}


async def beat(db: Database, node: str) -> bool:
    async with db.no_tenant() as conn:
        return await beat_node(conn, node)


async def age(admin_url: str, node: str, seconds: float) -> None:
    """Make ``node``'s last beat ``seconds`` old, as if it had stopped beating then (the migrator's view)."""
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute("UPDATE nodes SET heartbeat_at = now() - make_interval(secs => $2) WHERE node_id = $1",
                           node, seconds)
    finally:
        await conn.close()


async def sweep(db: Database, limit: int = 100, actor: str = "sweeper-node") -> tuple[list[tuple[str, str]], list[str]]:
    async with db.no_tenant() as conn:
        lost = await sweep_lost_nodes(conn, dead_s=DEAD_S, limit=limit, actor=actor)
    return sorted((node, c.call_control_id) for node, c in lost.calls), sorted(lost.forgotten)


async def scenario(db: Database, admin_url: str) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    assert await beat(db, "dead") is True  # never seen: inserted
    assert await beat(db, "dead") is False
    assert await beat(db, "alive") is True
    await open_call(db, a, "a-dead", "dead")
    await open_call(db, b, "b-dead", "dead")
    await open_call(db, a, "a-dead-done", "dead")
    async with db.tenant(a) as conn:
        await CallEnded(a, "a-dead-done", "completed", "stop", datetime.now(UTC)).apply(conn)
    await open_call(db, a, "a-alive", "alive")
    await open_call(db, b, "b-unbeaten", "never-beat")  # a node with no row (older than 0019): its restart's
    await open_call(db, b, "b-placed", None)  # a placed call no node streams: the webhook sweep's

    await age(admin_url, "dead", DEAD_S - 5)
    assert await sweep(db) == ([], [])  # not yet: within the bound
    await age(admin_url, "dead", DEAD_S + 5)
    await age(admin_url, "alive", DEAD_S + 5)
    assert await beat(db, "alive") is False  # it beat just before the sweep: alive
    assert await sweep(db) == ([("dead", "a-dead"), ("dead", "b-dead")], ["dead"])
    assert await calls_of(db, a) == {"a-dead": ("failed", NODE_LOST), "a-dead-done": ("completed", "stop"),
                                     "a-alive": ("active", None)}
    assert await calls_of(db, b) == {"b-dead": ("failed", NODE_LOST), "b-unbeaten": ("active", None),
                                     "b-placed": ("active", None)}
    for org, ccid in ((a, "a-dead"), (b, "b-dead")):
        async with db.tenant(org) as conn:
            audit = await conn.fetch("SELECT action, actor_type, actor_id, old_value, new_value FROM audit_logs "
                                     "WHERE resource_id = $1", str(uuid.uuid5(org, ccid)))
        assert [dict(r) for r in audit] == [{
            "action": "call.ended", "actor_type": "system", "actor_id": "sweeper-node",
            "old_value": {"status": "active"},
            "new_value": {"status": "failed", "reason": NODE_LOST, "node_id": "dead"}}]
    assert await sweep(db) == ([], [])  # nothing twice

    # The lost node comes back (it was paused, or cut off): its beat says it was declared lost, and its own
    # end of the call, written late, keeps the sweep's final outcome.
    assert await beat(db, "dead") is True
    assert await beat(db, "dead") is False
    async with db.tenant(a) as conn:
        await CallEnded(a, "a-dead", "completed", "stop", datetime.now(UTC)).apply(conn)
    assert (await calls_of(db, a))["a-dead"] == ("failed", NODE_LOST)
    async with db.no_tenant() as conn:  # RLS intact for the app role: no tenant, no rows; no table access
        assert await conn.fetchval("SELECT count(*) FROM calls") == 0
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetchval("SELECT count(*) FROM nodes")


async def test_a_lost_nodes_open_calls_are_closed_once_and_it_is_forgotten(db: Database, db_urls: DbUrls) -> None:
    await scenario(db, db_urls.admin)


async def test_sweepers_on_many_nodes_at_once_close_each_call_once_in_bounded_batches(
        db: Database, db_urls: DbUrls) -> None:
    o = uuid.uuid4()
    await beat(db, "gone")
    for i in range(30):
        await open_call(db, o, f"c-{i}", "gone")
    await age(db_urls.admin, "gone", DEAD_S * 2)
    first, forgotten = await sweep(db, limit=4)
    assert len(first) == 4 and forgotten == []  # the batch bound; calls left open: the node is kept
    results = await asyncio.gather(*(sweep(db, limit=100, actor=f"n{i}") for i in range(4)))
    closed = [c for calls, _ in results for c in calls]
    assert len(closed) == 26 and len({c for _, c in closed}) == 26
    assert [n for _, nodes in results for n in nodes] == ["gone"]  # forgotten once
    async with db.tenant(o) as conn:
        assert await conn.fetchval("SELECT count(*) FROM audit_logs WHERE action = 'call.ended'") == 30
        assert await conn.fetchval("SELECT count(*) FROM calls WHERE end_reason = 'node_lost'") == 30


async def test_a_call_whose_row_is_held_is_left_to_the_next_sweep_and_its_node_kept(
        db: Database, db_urls: DbUrls) -> None:
    o = uuid.uuid4()
    await beat(db, "held")
    await open_call(db, o, "held-call", "held")
    await age(db_urls.admin, "held", DEAD_S * 2)
    async with db.tenant(o) as conn:  # the owner's last write still holds the row
        await conn.execute("SELECT 1 FROM calls WHERE call_control_id = 'held-call' FOR UPDATE")
        assert await sweep(db) == ([], [])  # skipped, not waited for; the node not forgotten
    assert await sweep(db) == ([("held", "held-call")], ["held"])


async def test_the_functions_also_work_when_the_tables_owner_is_not_a_superuser(pg_admin_url: str) -> None:
    """A managed database: the migrator owns the tables but is subject to FORCE ROW LEVEL SECURITY."""
    urls = await owned_database(pg_admin_url)
    owner_url = urls.admin
    db = Database(urls.app)
    await db.open()
    try:
        await scenario(db, owner_url)
    finally:
        await db.aclose()
