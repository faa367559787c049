"""Erasure of one person on the real server with storage on: a debtor's canary strings (name, phone
number) planted in every place the platform keeps call data (the account, call rows, transcripts,
translations, a recording object, the call's Redis Stream) are in 0 places afterwards (every table of
the database read as the migrator, every Redis key, every cold-tier file, the server's log), another
person's call is untouched, and the report says what went where.  A user's erasure removes their
name and address and their sessions; another tenant's ids answer as unknown ones."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from api.auth import Role
from api.call_session import call_key
from storage.blobs import LocalBlobStore
from storage.db import Database
from storage.warm import EventBus
from tests.api.rest_world import World, build_world, call, redis_db, sign_in_all, world_server
from tests.servers import Server

NAME, PHONE = "Zqxcanary", "+15559990123"
CANARIES = (NAME.lower(), PHONE[1:])


@pytest.fixture(scope="module")
def world(pg_admin_url: str, redis_url: str) -> World:
    return asyncio.run(build_world(pg_admin_url, redis_url, 8))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("erasure")
    with world_server(tmp, world) as srv:
        asyncio.run(sign_in_all(srv, world))
        srv.extra["blobs"] = tmp / "data" / "blobs"
        yield srv


async def _plant(db: Database, blobs: LocalBlobStore, bus: EventBus, org: uuid.UUID) -> dict[str, object]:
    async with db.tenant(org) as conn:
        acct = await conn.fetchval(
            "INSERT INTO collection_accounts (org_id, external_ref, debtor_name, phones, balance_cents, currency) "
            "VALUES ($1, 'ERASE-1', $2, $3, 100, 'USD') RETURNING id", org, f"{NAME} Debtor", [PHONE])
        placed = await conn.fetchrow(
            "INSERT INTO calls (org_id, call_control_id, status, direction, to_number, account_id) VALUES "
            "($1, $2, 'completed', 'outbound', $3, $4) RETURNING id, call_control_id",
            org, f"v3:erase-{uuid.uuid4().hex[:8]}", PHONE, acct)
        inbound = await conn.fetchrow(
            "INSERT INTO calls (org_id, call_control_id, status, direction, from_number) VALUES "
            "($1, $2, 'completed', 'inbound', $3) RETURNING id, call_control_id",
            org, f"v3:erase-{uuid.uuid4().hex[:8]}", PHONE)
        other = await conn.fetchrow(
            "INSERT INTO calls (org_id, call_control_id, status, to_number) VALUES ($1, $2, 'completed', "
            "'+15550000777') RETURNING id, call_control_id", org, f"v3:keep-{uuid.uuid4().hex[:8]}")
        for c, text in ((placed, f"hello this is {NAME}"), (inbound, f"{NAME} calling back"),
                        (other, "Keepme is fine")):
            tid = await conn.fetchval("INSERT INTO transcriptions (org_id, call_id, track, seq, text) VALUES "
                                      "($1, $2, 'inbound', 1, $3) RETURNING id", org, c["id"], text)
            await conn.execute("INSERT INTO translations (org_id, call_id, transcription_id, source_lang, "
                               "target_lang, original_text, translated_text) VALUES ($1, $2, $3, 'en', 'es', $4, $4)",
                               org, c["id"], tid, text)
        key = f"recordings/{org}/erase/{placed['id']}.wav"
        await blobs.put(key, f"RIFF....{NAME}....".encode(), "audio/wav")
        await conn.execute("INSERT INTO recordings (org_id, call_id, storage_key, bytes, duration_ms, channels, "
                           "sample_rate, sha256) VALUES ($1, $2, $3, 20, 10, 1, 8000, 'x')", org, placed["id"], key)
    await bus.publish(call_key(org, placed["call_control_id"]), "transcript.final", {"text": f"hi {NAME}"})
    return {"account": acct, "placed": placed, "inbound": inbound, "other": other}


async def _leaks(admin_url: str, redis_url: str, blob_root: Path, log_path: Path) -> list[str]:
    found: list[str] = []
    conn = await asyncpg.connect(admin_url)  # the migrator: no RLS, every organisation's rows
    try:
        for (table,) in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"):
            for canary in CANARIES:
                n = await conn.fetchval(f'SELECT count(*) FROM "{table}" t WHERE lower(t::text) LIKE $1',
                                        f"%{canary}%")
                if n:
                    found.append(f"db:{table}:{n}")
    finally:
        await conn.close()
    r = aioredis.from_url(redis_url)
    try:
        async for key in r.scan_iter(count=500):
            kind = (await r.type(key)).decode()
            if kind == "stream":
                blob = repr(await r.xrange(key))
            elif kind == "string":
                blob = repr(await r.get(key))
            elif kind == "hash":
                blob = repr(await r.hgetall(key))
            elif kind == "zset":
                blob = repr(await r.zrange(key, 0, -1))
            else:
                blob = ""
            if any(c in blob.lower() for c in CANARIES):
                found.append(f"redis:{key!r}")
    finally:
        await r.aclose()
    for path in await asyncio.to_thread(lambda: [p for p in blob_root.rglob("*") if p.is_file()]):
        data = (await asyncio.to_thread(path.read_bytes)).lower()
        if any(c.encode() in data for c in CANARIES):
            found.append(f"blob:{path.name}")
    log = (await asyncio.to_thread(log_path.read_text, errors="replace")).lower()
    found += [f"log:{c}" for c in CANARIES if c in log]
    return found


async def test_a_debtors_erasure_leaves_their_canaries_in_no_place_and_reports_where(
        server: Server, world: World, db: Database) -> None:
    a, b = world.a, world.b
    root: Path = server.extra["blobs"]
    blobs = LocalBlobStore(root, b"k" * 32)
    await blobs.start()
    url = redis_db(world.redis_url, 8)
    client = aioredis.from_url(url)
    try:
        planted = await _plant(db, blobs, EventBus(client), a.org_id)
    finally:
        await client.aclose()
    assert await _leaks(world.db.admin, url, root, server.log_path)  # the canaries are there to be found

    async with aiohttp.ClientSession() as http:
        account = str(planted["account"])
        status, reply = await call(http, server, "POST", "/api/erasures", a.sessions[Role.AGENT],
                                   {"account_id": account})
        assert status == 403
        theirs = await call(http, server, "POST", "/api/erasures", b.sessions[Role.ADMIN], {"account_id": account})
        unknown = await call(http, server, "POST", "/api/erasures", b.sessions[Role.ADMIN],
                             {"account_id": str(uuid.uuid4())})
        assert theirs == unknown and theirs[0] == 404
        status, reply = await call(http, server, "POST", "/api/erasures", a.sessions[Role.ADMIN],
                                   {"account_id": account, "phone": PHONE})
        assert (status, reply["error"]["code"]) == (400, "validation_failed")
        status, reply = await call(http, server, "POST", "/api/erasures", a.sessions[Role.ADMIN],
                                   {"account_id": account})
        assert status == 200, reply
        assert reply["data"] == {"calls": 2, "recordings": 1, "objects": 1, "transcriptions": 2, "translations": 2,
                                 "event_streams": 1, "sse_events": 0, "accounts": 1, "users": 0, "evidence_kept": 0}
        # The other person's call keeps its words; the erased calls are still listed, without numbers.
        status, other = await call(http, server, "GET", f"/api/calls/{planted['other']['call_control_id']}",  # type: ignore[index]
                                   a.sessions[Role.ADMIN])
        assert status == 200 and other["data"]["transcripts"][0]["text"] == "Keepme is fine"
        status, erased = await call(http, server, "GET", f"/api/calls/{planted['placed']['call_control_id']}",  # type: ignore[index]
                                    a.sessions[Role.ADMIN])
        assert status == 200 and erased["data"]["to_number"] is None and erased["data"]["transcripts"] == []
    assert await _leaks(world.db.admin, url, root, server.log_path) == []


async def test_a_users_erasure_removes_their_name_address_and_sessions(server: Server, world: World,
                                                                        db: Database) -> None:
    a = world.a
    viewer = a.users[Role.VIEWER]
    async with aiohttp.ClientSession() as http:
        assert (await call(http, server, "GET", "/api/auth/me", a.sessions[Role.VIEWER]))[0] == 200
        status, reply = await call(http, server, "POST", "/api/erasures", a.sessions[Role.ADMIN],
                                   {"user_id": str(viewer)})
        assert status == 200 and reply["data"]["users"] == 1
        assert (await call(http, server, "GET", "/api/auth/me", a.sessions[Role.VIEWER]))[0] == 401
        status, reply = await call(http, server, "POST", "/api/erasures", a.sessions[Role.ADMIN],
                                   {"user_id": str(a.users[Role.OWNER])})
        assert (status, reply["error"]["code"]) == (403, "forbidden")  # an admin may not erase an owner
    async with db.tenant(a.org_id) as conn:
        row = await conn.fetchrow("SELECT email, display_name, active, password_hash FROM users WHERE id = $1", viewer)
    assert row["email"].endswith("@erased.invalid") and row["display_name"] == "" and not row["active"]
    assert row["password_hash"] is None
    assert a.emails[Role.VIEWER].split("@")[0] not in row["email"]
