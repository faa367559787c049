"""Tenant wipe on the real server with storage on: ``DELETE /api/org`` (owner, with the name as
confirmation) stops every credential of the organisation at once and purges every tenant table and
every cold-tier object of it; a wipe cut short midway (the cold tier failing) resumes with 0 rows and
0 objects of the tenant left; the other tenant is untouched; the audit trail stays, with the wipe in it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from api.auth import Role
from storage.blobs import LocalBlobStore
from storage.db import Database
from storage.wipe import STEPS, Wipe
from tests.api.rest_world import World, build_world, call, sign_in_all, world_server
from tests.fakes.blobs import FailingBlobs
from tests.servers import Server

TENANT_TABLES = [t for t, _ in STEPS] + ["transcriptions", "translations", "campaign_contacts"]


@pytest.fixture(scope="module")
def world(pg_admin_url: str, redis_url: str) -> World:
    return asyncio.run(build_world(pg_admin_url, redis_url, 6))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("wipe")
    with world_server(tmp, world) as srv:
        asyncio.run(sign_in_all(srv, world))
        srv.extra["blobs"] = tmp / "data" / "blobs"
        yield srv


async def _counts(db: Database, org: uuid.UUID) -> dict[str, int]:
    async with db.tenant(org) as conn:
        return {t: await conn.fetchval(f"SELECT count(*) FROM {t} WHERE org_id = $1", org) for t in TENANT_TABLES}


async def _objects(root: Path, org: uuid.UUID) -> list[Path]:
    return await asyncio.to_thread(lambda: [p for p in root.rglob("*") if p.is_file() and str(org) in str(p)])


async def test_deleting_an_organisation_stops_its_credentials_and_a_resumed_wipe_leaves_nothing_of_it(
        server: Server, world: World, db: Database) -> None:
    a, b = world.a, world.b
    root: Path = server.extra["blobs"]
    blobs = LocalBlobStore(root, b"k" * 32)
    await blobs.start()
    # Tenant A gets a few more calls with real recording objects; B the same, to stay untouched.
    for t in (a, b):
        async with db.tenant(t.org_id) as conn:
            for i in range(3):
                cid = await conn.fetchval("INSERT INTO calls (org_id, call_control_id, status) VALUES ($1, $2, "
                                          "'completed') RETURNING id", t.org_id, f"v3:wipe-{i}-{uuid.uuid4().hex}")
                key = f"recordings/{t.org_id}/wipe/{cid}.wav"
                await blobs.put(key, b"RIFF", "audio/wav")
                await conn.execute("INSERT INTO recordings (org_id, call_id, storage_key, bytes, duration_ms, "
                                   "channels, sample_rate, sha256) VALUES ($1, $2, $3, 4, 10, 1, 8000, 'x')",
                                   t.org_id, cid, key)
    before_b = await _counts(db, b.org_id)
    objects_b = await _objects(root, b.org_id)
    assert len(await _objects(root, a.org_id)) == 3 and len(objects_b) == 3

    async with aiohttp.ClientSession() as http:
        status, reply = await call(http, server, "DELETE", "/api/org", a.sessions[Role.ADMIN], {"confirm": "Org a"})
        assert status == 403  # owners only
        status, reply = await call(http, server, "DELETE", "/api/org", a.sessions[Role.OWNER], {"confirm": "org a"})
        assert (status, reply["error"]["code"]) == (400, "validation_failed")
        # A wipe cut short first (run here, with a cold tier that fails after one delete), then the real one.
        async with db.tenant(a.org_id) as conn:
            await conn.execute("UPDATE organizations SET deleted_at = now() WHERE id = $1", a.org_id)
        with pytest.raises(OSError):
            await Wipe(db, FailingBlobs(root, ok=1), batch=1).wipe(a.org_id)
        left = await _counts(db, a.org_id)
        assert left["calls"] > 0  # cut short
        assert len(await _objects(root, a.org_id)) >= 1
        async with db.tenant(a.org_id) as conn:  # undo the mark: the REST door does it for real below
            await conn.execute("UPDATE organizations SET deleted_at = NULL WHERE id = $1", a.org_id)
        status, reply = await call(http, server, "DELETE", "/api/org", a.sessions[Role.OWNER], {"confirm": "Org a"})
        assert status == 202 and reply["data"]["wipe"] == "started", reply
        for token in (a.sessions[Role.OWNER], a.sessions[Role.AGENT], a.keys[Role.ADMIN]):
            assert (await call(http, server, "GET", "/api/accounts", token))[0] == 401

        async def wiped() -> bool:
            async with db.no_tenant() as conn:
                return bool(await conn.fetchval("SELECT count(*) FROM wipe_pending_orgs()") == 0)
        async with asyncio.timeout(30):
            while not await wiped():  # noqa: ASYNC110 - polls the job the server runs
                await asyncio.sleep(0.2)
        assert (await call(http, server, "GET", "/api/accounts", b.sessions[Role.VIEWER]))[0] == 200

    assert await _counts(db, a.org_id) == dict.fromkeys(TENANT_TABLES, 0)
    assert await _objects(root, a.org_id) == []
    assert await _counts(db, b.org_id) == before_b and await _objects(root, b.org_id) == objects_b
    async with db.tenant(a.org_id) as conn:
        org = await conn.fetchrow("SELECT name, wiped_at, deleted_at FROM organizations WHERE id = $1", a.org_id)
        actions = [r["action"] for r in await conn.fetch("SELECT action FROM audit_logs ORDER BY created_at")]
    assert org["name"] == "wiped organisation" and org["wiped_at"] and org["deleted_at"]
    assert actions[-2:] == ["org.deleted", "org.wiped"] and "user.created" not in actions[-2:]
    assert len(actions) > 2  # the trail from before the wipe stays
