"""A restarted node closes the calls it left open, in every organisation, without weakening RLS."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from storage.db import Database
from storage.records import CallEnded, CallStarted, close_calls_of_restarted_node, ensure_organization
from tests.storage.conftest import owned_database


async def open_call(db: Database, org: uuid.UUID, ccid: str, node: str | None) -> None:
    async with db.tenant(org) as conn:
        await ensure_organization(conn, org, "Org", f"org-{org.hex[:8]}")
        await CallStarted(org, uuid.uuid4(), ccid, None, "s", None, None, "PCMU", 8000, datetime.now(UTC),
                          node).apply(conn)


async def calls_of(db: Database, org: uuid.UUID) -> dict[str, tuple[str, str | None]]:
    async with db.tenant(org) as conn:
        rows = await conn.fetch("SELECT call_control_id, status, end_reason FROM calls")
    return {r["call_control_id"]: (r["status"], r["end_reason"]) for r in rows}


async def scenario(db: Database) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    await open_call(db, a, "a-mine", "node-1")
    await open_call(db, b, "b-mine", "node-1")
    await open_call(db, a, "a-other-node", "node-2")
    await open_call(db, b, "b-no-node", None)
    await open_call(db, a, "a-mine-done", "node-1")
    async with db.tenant(a) as conn:
        await CallEnded(a, "a-mine-done", "completed", "stop", datetime.now(UTC)).apply(conn)

    async with db.no_tenant() as conn:
        closed = await close_calls_of_restarted_node(conn, "node-1")
    assert sorted((c.org_id, c.call_control_id, c.previous_status) for c in closed) == sorted(
        [(a, "a-mine", "active"), (b, "b-mine", "active")])
    assert await calls_of(db, a) == {"a-mine": ("failed", "node_restart"), "a-other-node": ("active", None),
                                     "a-mine-done": ("completed", "stop")}
    assert await calls_of(db, b) == {"b-mine": ("failed", "node_restart"), "b-no-node": ("active", None)}
    for org, ccid in ((a, "a-mine"), (b, "b-mine")):
        async with db.tenant(org) as conn:
            audit = await conn.fetch(
                "SELECT action, actor_id, old_value, new_value FROM audit_logs WHERE resource_id = "
                "(SELECT id::text FROM calls WHERE call_control_id = $1)", ccid)
        assert [dict(r) for r in audit] == [{"action": "call.ended", "actor_id": "node-1",
                                             "old_value": {"status": "active"},
                                             "new_value": {"status": "failed", "reason": "node_restart"}}]
    async with db.no_tenant() as conn:  # a second start of the same node finds nothing left
        assert await close_calls_of_restarted_node(conn, "node-1") == []
        # RLS is intact for the app role: no tenant, no rows, function or not.
        assert await conn.fetchval("SELECT count(*) FROM calls") == 0


async def test_a_restarted_node_closes_its_open_calls_in_every_organisation(db: Database) -> None:
    await scenario(db)


async def test_the_new_statuses_are_accepted_and_others_refused(db: Database) -> None:
    org = uuid.uuid4()
    await open_call(db, org, "c", "n")
    for status in ("ringing", "ending", "no_answer", "busy"):
        async with db.tenant(org) as conn:
            await conn.execute("UPDATE calls SET status = $1", status)
    with pytest.raises(asyncpg.CheckViolationError):
        async with db.tenant(org) as conn:
            await conn.execute("UPDATE calls SET status = 'streaming'")
    with pytest.raises(asyncpg.CheckViolationError):
        async with db.tenant(org) as conn:
            await conn.execute("UPDATE calls SET node_id = $1", "x" * 65)


async def test_the_function_also_works_when_the_tables_owner_is_not_a_superuser(pg_admin_url: str) -> None:
    """A managed database: the migrator owns the tables but is subject to FORCE ROW LEVEL SECURITY."""
    urls = await owned_database(pg_admin_url)
    owner = await asyncpg.connect(urls.admin)
    try:  # the owner outside the functions is still filtered by the tenant policy
        assert await owner.fetchval("SELECT count(*) FROM calls") == 0
    finally:
        await owner.close()
    db = Database(urls.app)
    await db.open()
    try:
        await scenario(db)
    finally:
        await db.aclose()
