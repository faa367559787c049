"""Red team of the doors issue 12 added ("data over its whole life"), on the real server with storage on:
soft delete and restore, the retention policy, the tenant wipe, erasure of a person, evidence bundles,
report exports and their signed download URLs, and an account's restricted fields.

The attacks: no credential or the wrong role; another tenant's ids; signed URLs tampered with or expired;
hostile bodies; one tenant starting many heavy jobs at once; and races (two wipes, ten erasures of one
person, a restore against the retention job, a seal against a delete, an export against a wipe).  Every
refusal is checked by its status and body and by the database and the cold tier after it.

Each attack runs beside a healthy victim call of the bootstrap organisation (``Watched``, from the issue 11
red team): its ``call.ended`` must count every frame it sent, and the server's loop stalls and frame lag
must stay sane.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import asyncpg
import orjson
import pytest
import yarl

from api.auth import Role
from storage.blobs import LocalBlobStore
from storage.db import Database
from storage.retention import Retention
from tests.api.rest_world import Tenant, World, _tenant, bearer, build_world, login, sign_in_all, world_server
from tests.api.test_issue11_attacks import Rss, Watched, _off_loop
from tests.servers import Server

SIGNING_KEY = b"red-team-12-blob-signing-key-0123456789"
WINDOW_DAYS = 30  # SWITCHBOARD_RESTORE_WINDOW_DAYS, the default
EXPORTS_PER_ORG = 2  # api.exports: at most two of an organisation's exports queued or running
SEALS_PER_ORG = 2  # SWITCHBOARD_EVIDENCE_SEALS_PER_ORG
ERASURES_PER_ORG = 2  # SWITCHBOARD_ERASURES_PER_ORG
UNKNOWN = "00000000-0000-4000-8000-000000000000"
BULK_ROWS = 60_000  # accounts of the exporting tenant: each export runs a few seconds, the burst meets it
BIG_RECORDING = 24 << 20  # bytes of the recording each sealed call holds


@pytest.fixture(scope="module")
def world(pg_admin_url: str, redis_url: str) -> World:
    return asyncio.run(build_world(pg_admin_url, redis_url, 12))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("issue12-attacks")
    with world_server(tmp, world, SWITCHBOARD_BLOB_SIGNING_KEY=SIGNING_KEY.decode(),
                      SWITCHBOARD_RETENTION_INTERVAL_S="0") as srv:  # the tests run the retention job themselves
        asyncio.run(sign_in_all(srv, world))
        srv.extra["blobs"] = tmp / "data" / "blobs"
        yield srv


@pytest.fixture(scope="module")
def spares(world: World, server: Server) -> dict[str, Tenant]:
    """Three more organisations, signed in as owner and admin: the tenant wipe's targets."""
    async def make() -> dict[str, Tenant]:
        conn = await asyncpg.connect(world.db.admin)
        try:
            tenants = {label: await _tenant(conn, label, with_call=True) for label in ("c", "d", "e")}
        finally:
            await conn.close()
        async with aiohttp.ClientSession() as http:
            for t in tenants.values():
                t.sessions = {r: await login(http, server, t.emails[r]) for r in (Role.OWNER, Role.ADMIN)}
        return tenants
    return asyncio.run(make())


@pytest.fixture(autouse=True)
def no_errors(server: Server) -> Iterator[None]:
    """No request of a test was a 500, and no job failed on a bug: the server logs both as errors."""
    before = len(server.logs())
    yield
    errors = [line for line in server.logs()[before:] if line.get("level") == "error"]
    assert errors == [], errors[:3]


@pytest.fixture
async def admin_db(world: World) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(world.db.admin)  # the migrator: every tenant's rows, no RLS
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def blobs(server: Server) -> LocalBlobStore:
    store = LocalBlobStore(server.extra["blobs"], SIGNING_KEY)  # the server's own cold tier and key
    await store.start()
    return store


# -- helpers --------------------------------------------------------------------------------------


Answer = tuple[int, bytes, dict[str, str]]


async def _req(http: aiohttp.ClientSession, server: Server, method: str, path: str, token: str | None = None,
               body: Any = None, *, raw: bytes | None = None, headers: dict[str, str] | None = None) -> Answer:
    """One request; (status, body bytes, headers).  ``body`` is sent as JSON, ``raw`` as it is."""
    h = {**bearer(token), **(headers or {})}
    if raw is not None or body is not None or method in ("POST", "PUT", "PATCH", "DELETE"):
        h.setdefault("Content-Type", "application/json")
    data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
    async with http.request(method, server.http + path, data=data, headers=h) as r:
        return r.status, await r.read(), dict(r.headers)


def _code(answer: Answer) -> tuple[int, str | None]:
    status, body, _ = answer
    try:
        return status, orjson.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return status, None


def _data(answer: Answer) -> Any:
    assert 200 <= answer[0] < 300, answer[:2]
    return orjson.loads(answer[1])["data"]


async def _burst(server: Server, requests: list[tuple[str, str, str | None, Any]]) -> list[Answer]:
    """All of ``requests`` at once, from a client on a loop of its own (``_off_loop``)."""
    async def go() -> list[Answer]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as http:
            return await asyncio.gather(*(_req(http, server, m, p, t, b) for m, p, t, b in requests))
    return await _off_loop(go())


async def _ended_call(db: Database, blobs: LocalBlobStore, org: uuid.UUID, label: str, *,
                      recording: bytes = b"RIFF" + bytes(4092), to_number: str | None = None,
                      account_id: uuid.UUID | None = None, ccid: str | None = None) -> tuple[uuid.UUID, str, str]:
    """An ended call with a transcript line and a recording object; (id, call_control_id, object key)."""
    ccid = ccid or f"v3:rt12-{label}-{uuid.uuid4().hex[:8]}"
    async with db.tenant(org) as conn:
        cid = await conn.fetchval(
            "INSERT INTO calls (org_id, call_control_id, status, direction, started_at, ended_at, to_number, "
            "account_id) VALUES ($1, $2, 'completed', 'outbound', now() - interval '2 min', now(), $3, $4) "
            "RETURNING id", org, ccid, to_number, account_id)
        key = f"recordings/{org}/rt12/{cid}.wav"
        await blobs.put(key, recording, "audio/wav")
        await conn.execute("INSERT INTO recordings (org_id, call_id, storage_key, bytes, duration_ms, channels, "
                           "sample_rate, sha256) VALUES ($1, $2, $3, $4, 1000, 1, 8000, 'x')",
                           org, cid, key, len(recording))
        await conn.execute("INSERT INTO transcriptions (org_id, call_id, track, seq, text, start_ms) VALUES "
                           "($1, $2, 'inbound', 1, 'I will pay on Friday', 1200)", org, cid)
    return cid, ccid, key


async def _account(db: Database, org: uuid.UUID, label: str, phones: list[str]) -> uuid.UUID:
    async with db.tenant(org) as conn:
        return await conn.fetchval(  # type: ignore[no-any-return]
            "INSERT INTO collection_accounts (org_id, external_ref, debtor_name, phones, balance_cents, currency) "
            "VALUES ($1, $2, $3, $4, 500, 'USD') RETURNING id", org, f"RT12-{label}-{uuid.uuid4().hex[:6]}",
            f"Debtor {label}", phones)


async def _snapshot(conn: asyncpg.Connection, org: uuid.UUID) -> dict[str, list[tuple[Any, ...]]]:
    """Everything of ``org`` the doors under attack could change, as the migrator reads it."""
    queries = {
        "org": "SELECT name, deleted_at, wiped_at FROM organizations WHERE id = $1",
        "accounts": "SELECT id, deleted_at, debtor_name, phones, external_ref, restricted, restricted_key_id "
                    "FROM collection_accounts WHERE org_id = $1 ORDER BY id",
        "campaigns": "SELECT id, deleted_at FROM campaigns WHERE org_id = $1 ORDER BY id",
        "contacts": "SELECT campaign_id, account_id FROM campaign_contacts WHERE org_id = $1 ORDER BY 1, 2",
        "calls": "SELECT id, deleted_at, to_number, from_number, account_id, archive_key FROM calls "
                 "WHERE org_id = $1 ORDER BY id",
        "recordings": "SELECT id, deleted_at FROM recordings WHERE org_id = $1 ORDER BY id",
        "transcriptions": "SELECT count(*) FROM transcriptions WHERE org_id = $1",
        "retention": "SELECT resource, days FROM retention_policies WHERE org_id = $1 ORDER BY resource",
        "users": "SELECT id, email, display_name, active, deleted_at FROM users WHERE org_id = $1 ORDER BY id",
        "exports": "SELECT id, status FROM export_jobs WHERE org_id = $1 ORDER BY id",
        "evidence": "SELECT id FROM evidence_bundles WHERE org_id = $1 ORDER BY id",
        "audit": "SELECT count(*) FROM audit_logs WHERE org_id = $1",
    }
    return {name: [tuple(r) for r in await conn.fetch(sql, org)] for name, sql in queries.items()}


async def _objects(root: Path, org: uuid.UUID, prefix: str = "") -> list[str]:
    """The cold tier's files of ``org`` (their keys), under ``prefix`` if given."""
    def walk() -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                      if p.is_file() and str(org) in str(p) and str(p.relative_to(root)).startswith(prefix))
    return await asyncio.to_thread(walk)


async def _export(http: aiohttp.ClientSession, server: Server, token: str, body: dict[str, Any]) -> dict[str, Any]:
    """Request an export and wait for it to finish; its job."""
    job = _data(await _req(http, server, "POST", "/api/exports", token, body))
    async with asyncio.timeout(60):
        while job["status"] not in ("done", "failed"):
            await asyncio.sleep(0.1)
            job = _data(await _req(http, server, "GET", f"/api/exports/{job['id']}", token))
    assert job["status"] == "done", job
    return job  # type: ignore[no-any-return]


async def _no_export_running(admin_db: asyncpg.Connection) -> None:
    async with asyncio.timeout(120):
        while await admin_db.fetchval(  # noqa: ASYNC110 - polls the jobs the server runs
                "SELECT count(*) FROM export_jobs WHERE status IN ('queued', 'running')"):
            await asyncio.sleep(0.1)


# -- 1. no credential, the wrong role -------------------------------------------------------------


async def test_without_a_credential_or_the_role_every_lifecycle_door_refuses_and_changes_nothing(
        server: Server, world: World, db: Database, blobs: LocalBlobStore, admin_db: asyncpg.Connection) -> None:
    a = world.a
    admin = a.sessions[Role.ADMIN]
    _, ccid, _ = await _ended_call(db, blobs, a.org_id, "roles")
    async with aiohttp.ClientSession() as http:
        bundle = _data(await _req(http, server, "POST", f"/api/calls/{ccid}/evidence", admin, {}))
        export = await _export(http, server, admin, {"kind": "accounts"})
        acct, camp = a.account_id, a.campaign_id
        admins_only: list[tuple[str, str, Any]] = [
            ("DELETE", f"/api/accounts/{acct}", None), ("POST", f"/api/accounts/{acct}/restore", None),
            ("DELETE", f"/api/campaigns/{camp}", None), ("POST", f"/api/campaigns/{camp}/restore", None),
            ("DELETE", f"/api/calls/{ccid}", None), ("POST", f"/api/calls/{ccid}/restore", None),
            ("GET", "/api/retention", None), ("PUT", "/api/retention", {"recordings": 3650, "transcriptions": 1}),
            ("POST", "/api/erasures", {"account_id": str(acct)}), ("POST", "/api/erasures", {"phone": "+15550000001"}),
            ("POST", "/api/erasures", {"user_id": str(a.users[Role.OWNER])}),
            ("POST", f"/api/calls/{ccid}/evidence", {}), ("GET", f"/api/calls/{ccid}/evidence", None),
            ("GET", f"/api/calls/{ccid}/evidence/{bundle['id']}/verify", None),
            ("GET", f"/api/calls/{ccid}/evidence/{bundle['id']}/url", None),
            ("POST", "/api/exports", {"kind": "accounts"}), ("GET", f"/api/exports/{export['id']}", None),
            ("GET", f"/api/exports/{export['id']}/url", None),
            ("GET", f"/api/accounts/{acct}/restricted?reveal=true", None),
        ]
        wipe = ("DELETE", "/api/org", {"confirm": a.name})
        restricted_put = ("PUT", f"/api/accounts/{acct}/restricted", {"ssn": "000-00-0000"})
        cases: list[tuple[str | None, dict[str, str], tuple[str, str, Any], tuple[int, str]]] = []
        for door in [*admins_only, wipe, restricted_put]:
            for headers in ({}, {"Authorization": "Bearer sbk_not_a_key"}, {"Authorization": "Basic YWRtaW46YWRtaW4="},
                            {"Authorization": f"Bearer {admin}x"}, {"Cookie": "session=forged"}):
                cases.append((None, headers, door, (401, "unauthenticated")))
        for door in [*admins_only, wipe]:
            for token in (a.sessions[Role.AGENT], a.sessions[Role.VIEWER], a.keys[Role.VIEWER]):
                cases.append((token, {}, door, (403, "forbidden")))
        for token in (a.sessions[Role.ADMIN], a.keys[Role.ADMIN]):  # the wipe is the owners' alone
            cases.append((token, {}, wipe, (403, "forbidden")))
        for token in (a.sessions[Role.VIEWER], a.keys[Role.VIEWER]):
            cases.append((token, {}, restricted_put, (403, "forbidden")))
        # An admin may erase people, not an owner, and not themselves.
        cases += [(admin, {}, ("POST", "/api/erasures", {"user_id": str(a.users[Role.OWNER])}), (403, "forbidden")),
                  (admin, {}, ("POST", "/api/erasures", {"user_id": str(a.users[Role.ADMIN])}), (409, "conflict"))]
        await _no_export_running(admin_db)
        before = await _snapshot(admin_db, a.org_id)
        objects = await _objects(server.extra["blobs"], a.org_id)
        async with Watched(server, "no-right") as watched:
            for token, headers, (method, path, body), expected in cases:
                answer = await _req(http, server, method, path, token, body, headers=headers)
                assert _code(answer) == expected, (method, path, headers, answer[:2])
                assert b"PK\x03\x04" not in answer[1] and b"/api/blobs/" not in answer[1]
            await watched.finish()
    print(f"\n{len(cases)} requests without the right, each refused")
    assert await _snapshot(admin_db, a.org_id) == before
    assert await _objects(server.extra["blobs"], a.org_id) == objects
    async with admin_db.transaction():
        assert await admin_db.fetchval("SELECT count(*) FROM export_jobs WHERE status IN ('queued', 'running')") == 0


# -- 2. another tenant's ids -----------------------------------------------------------------------


async def test_another_tenants_ids_and_malformed_ids_answer_byte_for_byte_as_unknown_ones(
        server: Server, world: World, db: Database, blobs: LocalBlobStore, admin_db: asyncpg.Connection) -> None:
    a, b = world.a, world.b
    b_admin, admin = b.sessions[Role.ADMIN], a.sessions[Role.ADMIN]
    b_phone = "+15557770001"
    b_person = await _account(db, b.org_id, "b-person", [b_phone])
    _, b_call, _ = await _ended_call(db, blobs, b.org_id, "theirs", to_number=b_phone, account_id=b_person)
    _, b_gone_call, _ = await _ended_call(db, blobs, b.org_id, "theirs-deleted")
    b_gone_acct = await _account(db, b.org_id, "b-deleted", [])
    async with db.tenant(b.org_id) as conn:
        b_gone_camp = await conn.fetchval("INSERT INTO campaigns (org_id, name) VALUES ($1, 'gone') RETURNING id",
                                          b.org_id)
    async with aiohttp.ClientSession() as http:
        for path in (f"/api/calls/{b_gone_call}", f"/api/accounts/{b_gone_acct}", f"/api/campaigns/{b_gone_camp}"):
            assert (await _req(http, server, "DELETE", path, b_admin))[0] == 200
        bundle = _data(await _req(http, server, "POST", f"/api/calls/{b_call}/evidence", b_admin, {}))
        export = await _export(http, server, b_admin, {"kind": "calls"})
        _, a_call, _ = await _ended_call(db, blobs, a.org_id, "mine")
        # (method, B's path or body, an unknown one's): each pair must answer the same bytes to A.
        u, unknown_call = UNKNOWN, "v3:unknown-call"
        pairs: list[tuple[str, str, str, Any, Any]] = [
            ("DELETE", f"/api/accounts/{b.account_id}", f"/api/accounts/{u}", None, None),
            ("POST", f"/api/accounts/{b_gone_acct}/restore", f"/api/accounts/{u}/restore", None, None),
            ("DELETE", f"/api/campaigns/{b.campaign_id}", f"/api/campaigns/{u}", None, None),
            ("POST", f"/api/campaigns/{b_gone_camp}/restore", f"/api/campaigns/{u}/restore", None, None),
            ("DELETE", f"/api/calls/{b_call}", f"/api/calls/{unknown_call}", None, None),
            ("POST", f"/api/calls/{b_gone_call}/restore", f"/api/calls/{unknown_call}/restore", None, None),
            ("POST", f"/api/calls/{b_call}/evidence", f"/api/calls/{unknown_call}/evidence", {}, {}),
            ("GET", f"/api/calls/{b_call}/evidence", f"/api/calls/{unknown_call}/evidence", None, None),
            ("GET", f"/api/calls/{b_call}/evidence/{bundle['id']}/verify",
             f"/api/calls/{unknown_call}/evidence/{u}/verify", None, None),
            ("GET", f"/api/calls/{a_call}/evidence/{bundle['id']}/verify",  # A's call, B's bundle
             f"/api/calls/{a_call}/evidence/{u}/verify", None, None),
            ("GET", f"/api/calls/{b_call}/evidence/{bundle['id']}/url",
             f"/api/calls/{unknown_call}/evidence/{u}/url", None, None),
            ("GET", f"/api/exports/{export['id']}", f"/api/exports/{u}", None, None),
            ("GET", f"/api/exports/{export['id']}/url", f"/api/exports/{u}/url", None, None),
            ("GET", f"/api/accounts/{b.account_id}/restricted", f"/api/accounts/{u}/restricted", None, None),
            ("GET", f"/api/accounts/{b.account_id}/restricted?reveal=true", f"/api/accounts/{u}/restricted?reveal=true",
             None, None),
            ("PUT", f"/api/accounts/{b.account_id}/restricted", f"/api/accounts/{u}/restricted",
             {"ssn": "123-45-6789"}, {"ssn": "123-45-6789"}),
            ("POST", "/api/erasures", "/api/erasures", {"account_id": str(b_person)}, {"account_id": u}),
            ("POST", "/api/erasures", "/api/erasures", {"user_id": str(b.users[Role.AGENT])}, {"user_id": u}),
        ]
        # Malformed ids: the same answer as an unknown id of the kind (api.rest: step 5).
        malformed = ["not-a-uuid", u[:-1], u + "0", "urn:uuid:" + u, " " + u[1:], u.replace("-", ""), "%00",
                     "' OR 1=1", "x" * 36]
        for bad in malformed:
            q = quote(bad, safe="")
            pairs += [
                ("DELETE", f"/api/accounts/{q}", f"/api/accounts/{u}", None, None),
                ("POST", f"/api/campaigns/{q}/restore", f"/api/campaigns/{u}/restore", None, None),
                ("GET", f"/api/exports/{q}", f"/api/exports/{u}", None, None),
                ("GET", f"/api/exports/{q}/url", f"/api/exports/{u}/url", None, None),
                ("GET", f"/api/calls/{unknown_call}/evidence/{q}/verify",
                 f"/api/calls/{unknown_call}/evidence/{u}/verify", None, None),
                ("GET", f"/api/calls/{a_call}/evidence/{q}/url", f"/api/calls/{a_call}/evidence/{u}/url", None, None),
                ("GET", f"/api/accounts/{q}/restricted", f"/api/accounts/{u}/restricted", None, None),
                ("DELETE", f"/api/calls/v3:{q}", f"/api/calls/{unknown_call}", None, None),
            ]
        before_b = await _snapshot(admin_db, b.org_id)
        b_objects = await _objects(server.extra["blobs"], b.org_id)
        async with Watched(server, "other-tenant") as watched:
            for method, theirs, unknown, body_theirs, body_unknown in pairs:
                mine = await _req(http, server, method, theirs, admin, body_theirs)
                ref = await _req(http, server, method, unknown, admin, body_unknown)
                assert (mine[0], mine[1]) == (ref[0], ref[1]), (method, theirs, mine[:2], ref[:2])
                assert mine[0] == 404 or (method, mine[0], orjson.loads(mine[1])["data"]["items"]) == ("GET", 200, [])
            # By B's phone: A's erasure finds no one of A's, and touches nothing of B's.
            report = _data(await _req(http, server, "POST", "/api/erasures", admin, {"phone": b_phone}))
            assert report == dict.fromkeys(report, 0)
            await watched.finish()
    print(f"\n{len(pairs)} pairs of another tenant's (or a malformed) id and an unknown one, answered alike")
    assert await _snapshot(admin_db, b.org_id) == before_b
    assert await _objects(server.extra["blobs"], b.org_id) == b_objects


# -- 3. signed download URLs -----------------------------------------------------------------------


def _parts(url: str) -> tuple[str, int, str]:
    """(key, expires, sig) of a local signed URL (/api/blobs/<key>?expires=&sig=)."""
    u = urlsplit(url)
    q = parse_qs(u.query)
    assert u.path.startswith("/api/blobs/"), url
    return u.path.removeprefix("/api/blobs/"), int(q["expires"][0]), q["sig"][0]


async def test_signed_download_urls_refuse_every_tampering_give_no_bytes_and_expire(
        server: Server, world: World, db: Database, blobs: LocalBlobStore) -> None:
    a, b = world.a, world.b
    admin = a.sessions[Role.ADMIN]
    _, ccid, rec_key = await _ended_call(db, blobs, a.org_id, "signed")
    _, b_ccid, _ = await _ended_call(db, blobs, b.org_id, "signed-b")
    async with aiohttp.ClientSession() as http:
        bundle = _data(await _req(http, server, "POST", f"/api/calls/{ccid}/evidence", admin, {}))
        b_bundle = _data(await _req(http, server, "POST", f"/api/calls/{b_ccid}/evidence", b.sessions[Role.ADMIN], {}))
        export = await _export(http, server, admin, {"kind": "accounts", "format": "xlsx"})
        b_export = await _export(http, server, b.sessions[Role.ADMIN], {"kind": "accounts"})
        now = int(time.time())
        urls = {
            "evidence": _data(await _req(http, server, "GET", f"/api/calls/{ccid}/evidence/{bundle['id']}/url",
                                         admin))["url"],
            "export": _data(await _req(http, server, "GET", f"/api/exports/{export['id']}/url", admin))["url"],
        }
        b_url = _data(await _req(http, server, "GET", f"/api/exports/{b_export['id']}/url", b.sessions[Role.ADMIN]))
        b_key = _parts(b_url["url"])[0]
        b_evidence_key = f"evidence/{b.org_id}/{b_bundle['id']}.zip"
        secret = (await blobs.get(_parts(urls["evidence"])[0]))[:64]  # the first bytes of A's bundle
        async with Watched(server, "signed-urls") as watched:
            for what, url in urls.items():
                key, expires, sig = _parts(url)
                assert now + 800 <= expires <= now + 905, (what, expires - now)  # 15 minutes, no more
                async with http.get(server.http + url) as r:
                    assert r.status == 200 and r.headers["Cache-Control"] == "private, no-store"
                    data = await r.read()
                if what == "evidence":
                    assert hashlib.sha256(data).hexdigest() == bundle["sha256"]
                flipped = sig[:10] + ("0" if sig[10] != "0" else "1") + sig[11:]
                forged = hashlib.sha256(f"{key}\n{expires}".encode()).hexdigest()  # unkeyed: not our HMAC
                tampered: list[tuple[str, str, str, int]] = [
                    # another tenant's object, another object of ours, a sibling path: with this signature
                    (b_key, str(expires), sig, 403), (b_evidence_key, str(expires), sig, 403),
                    (rec_key, str(expires), sig, 403), (key + ".bak", str(expires), sig, 403),
                    (key.replace(str(a.org_id), str(b.org_id)), str(expires), sig, 403),
                    # the expiry moved either way, or made absurd
                    (key, str(expires + 1), sig, 403), (key, str(expires - 1), sig, 403),
                    (key, str(expires + 10 * 365 * 86400), sig, 403), (key, "0", sig, 403), (key, "-1", sig, 403),
                    (key, str(2**64), sig, 403), (key, "9" * 400, sig, 403),
                    (key, "1e10", sig, 400), (key, "abc", sig, 400), (key, "", sig, 400), (key, "0x10", sig, 400),
                    # the signature changed, cut, cased, emptied, padded, replaced
                    (key, str(expires), flipped, 403), (key, str(expires), sig.upper(), 403),
                    (key, str(expires), sig[:-1], 403), (key, str(expires), sig + "0", 403),
                    (key, str(expires), "", 400), (key, str(expires), "0" * 64, 403),
                    (key, str(expires), forged, 403), (key, str(expires), "é" * 64, 403),
                    (key, str(expires), sig + "\x00", 403), (key, str(expires), "%", 403),
                    (key, str(expires), "x" * 5000, 403),
                    # out of the store
                    ("../" + key, str(expires), sig, 400), (key + "/../../secrets", str(expires), sig, 400),
                    ("/etc/passwd", str(expires), sig, 400), ("%2e%2e/" + key, str(expires), sig, 400),
                ]
                for t_key, t_expires, t_sig, status in tampered:
                    # As sent: the client must not normalise the path or re-quote an escape.
                    url = yarl.URL(f"{server.http}/api/blobs/{quote(t_key, safe='/%')}?expires="
                                   f"{quote(t_expires, safe='')}&sig={quote(t_sig, safe='')}", encoded=True)
                    async with http.get(url) as r:
                        body = await r.read()
                    assert r.status in (status, 404) and r.headers["Content-Type"].startswith("application/json"), (
                        what, t_key[:60], t_expires[:20], t_sig[:20], r.status, body[:80])
                    assert secret not in body and b"PK\x03\x04" not in body and len(body) < 200
                # A signature made with the server's own key but an expiry in the past: refused.
                past = now - 1
                async with http.get(f"{server.http}/api/blobs/{key}", params={
                        "expires": str(past), "sig": blobs._sign(key, past)}) as r:
                    assert r.status == 403 and secret not in await r.read()
            # A URL that lives two seconds works, then expires.
            key = _parts(urls["evidence"])[0]
            short = await blobs.presign_get(key, expires_s=2)
            async with http.get(server.http + short) as r:
                assert r.status == 200
            await asyncio.sleep(_parts(short)[1] - time.time() + 1.1)  # the expiry is whole seconds
            async with http.get(server.http + short) as r:
                assert r.status == 403 and secret not in await r.read()
            await watched.finish()


# -- 4. hostile bodies -----------------------------------------------------------------------------

DEEP = b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}"
JSON_ERRORS = {(400, "validation_failed"), (400, "bad_request")}


def _hostile(door: str, phone: str, account: str) -> list[tuple[Any, set[tuple[int, str]]]]:
    """(body, the answers it may get) for one door: a dict is sent as JSON, bytes as they are."""
    common: list[tuple[Any, set[tuple[int, str]]]] = [
        (b"", JSON_ERRORS), (b"[]", JSON_ERRORS), (b"null", JSON_ERRORS), (b'"x"', JSON_ERRORS), (b"{", JSON_ERRORS),
        (b"\xff\xfe{}", JSON_ERRORS), (DEEP[:1000] + b"}", JSON_ERRORS), (DEEP, {(413, "payload_too_large")}),
        ({"pad": "x" * 5000}, {(413, "payload_too_large")}), ({"unknown": 1}, JSON_ERRORS),
        ({"__proto__": {"admin": True}}, JSON_ERRORS),
    ]
    if door == "retention":
        bad: list[Any] = [
            {"recordings": -1}, {"recordings": 0}, {"recordings": 729}, {"calls": 729}, {"calls": -730},
            {"recordings": 36501}, {"transcriptions": 0}, {"translations": -5}, {"transcriptions": 36501},
            b'{"recordings": 99999999999999999999999999}', b'{"recordings": 1e400}', b'{"recordings": NaN}',
            b'{"recordings": Infinity}', b'{"recordings": -Infinity}', {"recordings": 730.5},
            {"transcriptions": True}, {"translations": False}, {"recordings": True}, {"transcriptions": "30"},
            {"recordings": "730"}, {"recordings": "730; DELETE FROM retention_policies"}, {"recordings": [730]},
            {"recordings": {"$gt": 0}}, {"recordings": 730, "org_id": UNKNOWN}, {"archive": 1},
            {"transcriptions": "1e3"}, {"transcriptions": " 30"}, {"recordings": 730.0001},
        ]
    elif door == "exports":
        bad = [
            {}, {"kind": "users"}, {"kind": "CALLS"}, {"kind": "calls "}, {"kind": ["calls"]}, {"kind": None},
            {"kind": "calls", "format": "xls"}, {"kind": "calls", "format": "csv\n"},
            {"kind": "calls", "format": "pdf"},
            {"kind": "calls", "since": "2020-01-01"}, {"kind": "calls", "since": "2020-01-01T00:00:00"},
            {"kind": "calls", "since": "yesterday"}, {"kind": "calls", "since": 1e20},
            {"kind": "calls", "since": "2024-06-01T00:00:00Z", "until": "2024-01-01T00:00:00Z"},  # reversed
            {"kind": "calls", "since": "2024-01-01T00:00:00Z", "until": "2024-01-01T00:00:00Z"},  # empty
            {"kind": "calls", "since": "0001-01-01T00:00:00+14:00"},
            {"kind": "calls", "until": "9999-12-31T23:59:59-14:00"},
            {"kind": "calls", "since": "0001-01-01T00:00:00Z", "until": "9999-12-31T00:00:00Z"},
            {"kind": "calls", "since": "1000-01-01T00:00:00Z"}, {"kind": "calls", "until": "3000-01-01T00:00:00Z"},
            {"kind": "calls", "org_id": UNKNOWN}, {"kind": "calls", "sql": "SELECT 1"},
        ]
    elif door == "erasures":
        bad = [
            {}, {"phone": "%"}, {"phone": "_"}, {"phone": "*"}, {"phone": "+%"}, {"phone": "+1555%"},
            {"phone": phone + "%"}, {"phone": phone[:-1] + "_"}, {"phone": phone[:-1] + "*"}, {"phone": ".*"},
            {"phone": "+1555.*"}, {"phone": "+[0-9]*"}, {"phone": phone + " OR 1=1"}, {"phone": "' OR ''='"},
            {"phone": ""}, {"phone": " " + phone}, {"phone": phone + "\n"}, {"phone": phone + "\u0000"},
            {"phone": "+1 555 000 0001"}, {"phone": phone[1:]}, {"phone": "+１５５５０００００１"},
            {"phone": phone[:-1] + "١"}, {"phone": None}, {"phone": [phone]}, {"phone": int(phone[1:])},
            {"phone": {"$ne": ""}}, {"phone": phone, "account_id": account}, {"phone": phone, "user_id": account},
            {"account_id": "not-a-uuid"}, {"account_id": 1}, {"account_id": ""}, {"user_id": True},
            {"account_id": account, "org_id": UNKNOWN},
        ]
    elif door == "restricted":
        bad = [
            {"ssn": "123456789012"}, {"ssn": "%"}, {"ssn": "123-45-6789\n"}, {"ssn": 123456789},
            {"card_reference": "4111 1111 1111 1111"}, {"card_reference": "4111111111111111"},
            {"card_reference": "5500-0000-0000-0004"}, {"card_reference": "378282246310005"},
            {"card_reference": "tok"}, {"card_reference": "x" * 65}, {"card_reference": "tok_\u0000abcd"},
            {"date_of_birth": "1985-02-30"}, {"date_of_birth": "yesterday"}, {"date_of_birth": "14/03/1985"},
            {"date_of_birth": 0}, {"date_of_birth": "1985-03-14T00:00:00"}, {"date_of_birth": "１９８５-03-14"},
            {"ssn": ["123-45-6789"]}, {"key_id": "k0"},
        ]
    else:  # the wipe's confirm, of an organisation that is not this one's or not exactly its name
        bad = [{}, {"confirm": ""}, {"confirm": None}, {"confirm": ["Org a"]}, {"confirm": 1}, {"confirm": True},
               {"confirm": "x" * 201}, {"confirm": "Org a", "org_id": UNKNOWN}]
    return common + [(body, JSON_ERRORS) for body in bad]


async def test_hostile_bodies_on_the_lifecycle_doors_are_400_or_413_and_write_nothing(
        server: Server, world: World, db: Database, blobs: LocalBlobStore, admin_db: asyncpg.Connection) -> None:
    a, b = world.a, world.b
    owner, admin = a.sessions[Role.OWNER], a.sessions[Role.ADMIN]
    phone = "+15550000001"  # A's account's number (and B's: erasure must not reach B)
    account = str(a.account_id)
    await _ended_call(db, blobs, a.org_id, "hostile", to_number=phone, account_id=a.account_id)
    doors = {"retention": ("PUT", "/api/retention"), "exports": ("POST", "/api/exports"),
             "erasures": ("POST", "/api/erasures"), "restricted": ("PUT", f"/api/accounts/{account}/restricted"),
             "wipe": ("DELETE", "/api/org")}
    async with aiohttp.ClientSession() as http:
        await _no_export_running(admin_db)
        before = {t.org_id: await _snapshot(admin_db, t.org_id) for t in (a, b)}
        objects = await _objects(server.extra["blobs"], a.org_id)
        n, wrong = 0, []
        async with Watched(server, "hostile-bodies") as watched:
            for door, (method, path) in doors.items():
                for body, allowed in _hostile(door, phone, account):
                    token = owner if door == "wipe" else admin
                    if isinstance(body, bytes):
                        answer = await _req(http, server, method, path, token, raw=body)
                    else:
                        answer = await _req(http, server, method, path, token, body)
                    if _code(answer) not in allowed:
                        wrong.append((door, body if isinstance(body, dict) else body[:40], answer[:2]))
                    n += 1
            # Not JSON at all: 415.
            answer = await _req(http, server, "PUT", "/api/retention", admin, raw=b"recordings=1",
                                headers={"Content-Type": "application/x-www-form-urlencoded"})
            assert _code(answer) == (415, "unsupported_media_type")
            await watched.finish()
    print(f"\n{n} hostile bodies, {n - len(wrong)} refused")
    for w in wrong:
        print("NOT REFUSED:", w)
    assert wrong == []
    for t in (a, b):
        assert await _snapshot(admin_db, t.org_id) == before[t.org_id]
    assert await _objects(server.extra["blobs"], a.org_id) == objects


async def test_erasure_by_phone_takes_exactly_the_people_with_that_number(
        server: Server, world: World, db: Database, blobs: LocalBlobStore, admin_db: asyncpg.Connection) -> None:
    a = world.a
    admin = a.sessions[Role.ADMIN]
    # Numbers that a pattern (LIKE, a regex, a prefix) would confuse: one differs in the last digit, one is
    # a prefix of it, one has it as a prefix.
    target, near = "+15556660001", ["+15556660002", "+1555666000", "+155566600011", "+15556660011"]
    person = await _account(db, a.org_id, "exact", [target])
    others = [await _account(db, a.org_id, f"near-{i}", [p]) for i, p in enumerate(near)]
    calls = [await _ended_call(db, blobs, a.org_id, "exact", to_number=target, account_id=person)]
    kept = [await _ended_call(db, blobs, a.org_id, f"near-{i}", to_number=p) for i, p in enumerate(near)]
    async with aiohttp.ClientSession() as http, Watched(server, "erase-exact") as watched:
        report = _data(await _req(http, server, "POST", "/api/erasures", admin, {"phone": target}))
        await watched.finish()
    assert (report["calls"], report["recordings"], report["objects"], report["accounts"]) == (1, 1, 1, 1), report
    gone = await admin_db.fetchrow("SELECT debtor_name, phones, deleted_at FROM collection_accounts WHERE id = $1",
                                   person)
    assert (gone["debtor_name"], gone["phones"]) == ("[erased]", []) and gone["deleted_at"] is not None
    assert not await blobs.list_keys(f"recordings/{a.org_id}/rt12/{calls[0][0]}.wav")  # the object is gone
    for acct, phone in zip(others, near, strict=True):
        row = await admin_db.fetchrow("SELECT debtor_name, phones, deleted_at FROM collection_accounts WHERE id = $1",
                                      acct)
        assert row["phones"] == [phone] and row["deleted_at"] is None and row["debtor_name"] != "[erased]"
    for cid, _, key in kept:
        assert await admin_db.fetchval("SELECT to_number FROM calls WHERE id = $1", cid) in near
        assert await blobs.get(key)


# -- 5. one tenant's heavy jobs, many at once ------------------------------------------------------


async def _fill(world: World, org: uuid.UUID, rows: int) -> None:
    conn = await asyncpg.connect(world.db.admin)  # the migrator: a bulk insert past the app's statement timeout
    try:
        await conn.execute(
            "INSERT INTO collection_accounts (org_id, external_ref, debtor_name, balance_cents, currency) "
            "SELECT $1, 'BULK-' || g, 'Debtor ' || g, g, 'USD' FROM generate_series(1, $2) g", org, rows, timeout=120)
    finally:
        await conn.close()


async def test_a_burst_of_exports_from_one_tenant_is_capped_429_and_another_tenant_still_exports(
        server: Server, world: World, spares: dict[str, Tenant], admin_db: asyncpg.Connection) -> None:
    e, b = spares["e"], world.b
    await _fill(world, e.org_id, BULK_ROWS)  # each export takes a while: the burst meets the running ones
    await _no_export_running(admin_db)
    tokens = [e.sessions[Role.OWNER], e.sessions[Role.ADMIN]]
    burst: list[tuple[str, str, str | None, Any]] = [
        ("POST", "/api/exports", tokens[i % 2], {"kind": "accounts", "format": "csv"})
        for i in range(16)]
    theirs: list[tuple[str, str, str | None, Any]] = [
        ("POST", "/api/exports", b.sessions[Role.ADMIN], {"kind": "accounts"}),
        ("GET", "/api/accounts?limit=5", b.sessions[Role.VIEWER], None)]
    async with Watched(server, "export-burst") as watched:
        t0 = time.monotonic()
        answers = await _burst(server, burst + theirs)
        took = time.monotonic() - t0
        mine, other = answers[:len(burst)], answers[len(burst):]
        statuses = [a[0] for a in mine]
        print(f"\n{len(burst)} exports asked at once by one tenant: {statuses.count(202)} accepted, "
              f"{statuses.count(429)} refused 429 ({statuses.count(409)} 409, "
              f"{sum(s >= 500 for s in statuses)} 5xx); the burst took {took:.2f} s")
        running = await admin_db.fetchval("SELECT count(*) FROM export_jobs WHERE org_id = $1", e.org_id)
        assert statuses.count(202) == EXPORTS_PER_ORG and running == EXPORTS_PER_ORG, (statuses, running)
        for answer in mine:
            if answer[0] != 202:
                assert _code(answer) == (429, "rate_limited") and int(answer[2]["Retry-After"]) > 0, answer[:2]
        assert [a[0] for a in other] == [202, 200], other  # the other tenant is not held back
        await _no_export_running(admin_db)
        await watched.finish()
    rows = await admin_db.fetch("SELECT status, rows FROM export_jobs WHERE org_id = $1", e.org_id)
    assert [(r["status"], r["rows"]) for r in rows] == [("done", BULK_ROWS + 1)] * EXPORTS_PER_ORG


async def test_a_burst_of_evidence_seals_and_verifies_is_capped_429_in_bounded_memory(
        server: Server, world: World, spares: dict[str, Tenant], db: Database, blobs: LocalBlobStore,
        admin_db: asyncpg.Connection) -> None:
    e, b = spares["e"], world.b
    recording = b"RIFF" + bytes(range(256)) * (BIG_RECORDING >> 8)
    shared = f"recordings/{e.org_id}/rt12/shared.wav"
    await blobs.put(shared, recording, "audio/wav")
    calls = []
    async with db.tenant(e.org_id) as conn:
        for i in range(10):
            ccid = f"v3:rt12-seal-{i}-{uuid.uuid4().hex[:8]}"
            cid = await conn.fetchval("INSERT INTO calls (org_id, call_control_id, status, started_at, ended_at) "
                                      "VALUES ($1, $2, 'completed', now(), now()) RETURNING id", e.org_id, ccid)
            key = f"recordings/{e.org_id}/rt12/{cid}.wav"
            os.link(blobs.path_for(shared), blobs.path_for(key))  # each call's own object, one file on disk
            await conn.execute("INSERT INTO recordings (org_id, call_id, storage_key, bytes, duration_ms, channels, "
                               "sample_rate, sha256) VALUES ($1, $2, $3, $4, 1000, 1, 8000, 'x')",
                               e.org_id, cid, key, len(recording))
            calls.append(ccid)
    _, b_call, _ = await _ended_call(db, blobs, b.org_id, "seal-beside")
    tokens = [e.sessions[Role.OWNER], e.sessions[Role.ADMIN]]
    theirs: list[tuple[str, str, str | None, Any]] = [
        ("POST", f"/api/calls/{b_call}/evidence", b.sessions[Role.ADMIN], {}),
        ("GET", "/api/calls?limit=5", b.sessions[Role.VIEWER], None)]
    rss = Rss(server)
    async with Watched(server, "seal-burst") as watched:
        burst: list[tuple[str, str, str | None, Any]] = [
            ("POST", f"/api/calls/{ccid}/evidence", tokens[i % 2], {}) for i, ccid in enumerate(calls)]
        answers = await _burst(server, burst + theirs)
        mine, other = answers[:len(burst)], answers[len(burst):]
        statuses = [a[0] for a in mine]
        print(f"\n{len(burst)} seals of {len(recording) >> 20} MiB calls asked at once by one tenant: "
              f"{statuses.count(201)} sealed, {statuses.count(429)} refused 429, {sum(s >= 500 for s in statuses)} "
              f"5xx; server RSS growth {rss.growth_mib():.0f} MiB")
        assert statuses.count(201) == SEALS_PER_ORG, statuses
        for answer in mine:
            if answer[0] != 201:
                assert _code(answer) == (429, "rate_limited") and int(answer[2]["Retry-After"]) > 0, answer[:2]
        assert [a[0] for a in other] == [201, 200], other
        sealed = [(ccid, _data(a)) for ccid, a in zip(calls, mine, strict=True) if a[0] == 201]
        # Verifying re-reads the whole bundle: the same cap.
        ccid, bundle = sealed[0]
        verify = f"/api/calls/{ccid}/evidence/{bundle['id']}/verify"
        answers = await _burst(server, [("GET", verify, tokens[i % 2], None) for i in range(10)])
        statuses = [a[0] for a in answers]
        print(f"10 verifies of a {bundle['bytes'] >> 20} MiB bundle at once: {statuses.count(200)} done, "
              f"{statuses.count(429)} refused 429; server RSS growth {rss.growth_mib():.0f} MiB")
        assert SEALS_PER_ORG <= statuses.count(200) < 10 and statuses.count(200) + statuses.count(429) == 10
        assert all(_data(a)["intact"] for a in answers if a[0] == 200)
        await watched.finish()
    assert rss.growth_mib() < 2 * len(recording) / 2**20, "a seal or a verify holds a whole recording in memory"
    assert await admin_db.fetchval("SELECT count(*) FROM evidence_bundles WHERE org_id = $1", e.org_id) == SEALS_PER_ORG
    assert len(await _objects(server.extra["blobs"], e.org_id, "evidence/")) == SEALS_PER_ORG


async def _person_with_calls(db: Database, blobs: LocalBlobStore, org: uuid.UUID, label: str, phone: str,
                             n: int) -> tuple[uuid.UUID, list[str]]:
    """An account of ``phone`` with ``n`` ended calls to it, each with a recording object; (account, keys)."""
    account = await _account(db, org, label, [phone])
    seed = f"recordings/{org}/rt12/{label}-seed.wav"
    await blobs.put(seed, b"RIFF" + bytes(60), "audio/wav")
    async with db.tenant(org) as conn:
        ids = [r["id"] for r in await conn.fetch(
            "INSERT INTO calls (org_id, call_control_id, status, direction, ended_at, to_number, account_id) "
            "SELECT $1, 'v3:rt12-' || $2 || '-' || g, 'completed', 'outbound', now(), $3, $4 "
            "FROM generate_series(1, $5) g RETURNING id", org, label, phone, account, n)]
        keys = [f"recordings/{org}/rt12/{label}/{cid}.wav" for cid in ids]
        await conn.execute("INSERT INTO recordings (org_id, call_id, storage_key, bytes, duration_ms, channels, "
                           "sample_rate, sha256) SELECT $1, unnest($2::uuid[]), unnest($3::text[]), 64, 10, 1, 8000, "
                           "'x'", org, ids, keys)
    await blobs.delete(seed)
    blobs.path_for(keys[0]).parent.mkdir(parents=True, exist_ok=True)
    await blobs.put(keys[0], b"RIFF" + bytes(60), "audio/wav")
    for key in keys[1:]:
        os.link(blobs.path_for(keys[0]), blobs.path_for(key))
    return account, keys


async def test_ten_erasures_of_one_person_at_once_erase_once_count_once_and_other_tenants_go_on(
        server: Server, world: World, spares: dict[str, Tenant], db: Database, blobs: LocalBlobStore,
        admin_db: asyncpg.Connection) -> None:
    e, b = spares["e"], world.b
    n = 200
    phone = "+15554440001"
    person, keys = await _person_with_calls(db, blobs, e.org_id, "erase10", phone, n)
    b_person, b_keys = await _person_with_calls(db, blobs, b.org_id, "erase-beside", "+15554440002", 3)
    tokens = [e.sessions[Role.OWNER], e.sessions[Role.ADMIN]]
    bodies = [{"account_id": str(person)}, {"phone": phone}]
    audits = "SELECT new_value FROM audit_logs WHERE org_id = $1 AND action = 'person.erased' ORDER BY created_at"
    before = len(await admin_db.fetch(audits, e.org_id))
    async with Watched(server, "erase-10x") as watched:
        answers = await _burst(server, [("POST", "/api/erasures", tokens[i % 2], bodies[i % 2]) for i in range(10)]
                               + [("POST", "/api/erasures", b.sessions[Role.ADMIN], {"account_id": str(b_person)})])
        mine, theirs = answers[:10], answers[10]
        statuses = [a[0] for a in mine]
        reports = [_data(a) for a in mine if a[0] == 200]
        print(f"\n10 erasures of one person ({n} calls) at once: {statuses.count(200)} answered 200 (calls "
              f"{[r['calls'] for r in reports]}), {statuses.count(429)} refused 429, "
              f"{sum(s >= 500 for s in statuses)} 5xx")
        for answer in mine:
            if answer[0] != 200:
                assert _code(answer) == (429, "rate_limited") and int(answer[2]["Retry-After"]) > 0, answer[:2]
        assert statuses.count(429) >= 1  # they met the first one running
        # Erased once: one report counts the calls and objects, any later one (after the first ended) finds none.
        assert sorted(r["calls"] for r in reports)[-1] == n and sum(r["calls"] for r in reports) == n, reports
        assert sum(r["objects"] for r in reports) == n and sum(r["recordings"] for r in reports) == n, reports
        assert theirs[0] == 200 and _data(theirs)["calls"] == 3  # the other tenant's erasure went on
        await watched.finish()
    logged = [orjson.loads(r["new_value"]) for r in (await admin_db.fetch(audits, e.org_id))[before:]]
    assert len(logged) == len(reports) and sum(v["calls"] for v in logged) == n, logged
    row = await admin_db.fetchrow("SELECT debtor_name, phones, deleted_at FROM collection_accounts WHERE id = $1",
                                  person)
    assert (row["debtor_name"], row["phones"]) == ("[erased]", []) and row["deleted_at"] is not None
    assert await admin_db.fetchval("SELECT count(*) FROM calls WHERE org_id = $1 AND (to_number = $2 OR "
                                   "account_id = $3)", e.org_id, phone, person) == 0
    assert await admin_db.fetchval("SELECT count(*) FROM recordings WHERE storage_key = ANY($1)", keys) == 0
    assert await _objects(server.extra["blobs"], e.org_id, f"recordings/{e.org_id}/rt12/erase10") == []
    assert await _objects(server.extra["blobs"], b.org_id, f"recordings/{b.org_id}/rt12/erase-beside") == []
    assert b_keys


# -- 6. races --------------------------------------------------------------------------------------


async def _actions(conn: asyncpg.Connection, org: uuid.UUID, resource_id: Any) -> list[str]:
    return [r["action"] for r in await conn.fetch(
        "SELECT action FROM audit_logs WHERE org_id = $1 AND resource_id = $2 ORDER BY created_at", org,
        str(resource_id))]


async def test_ten_deletes_then_ten_restores_at_once_apply_once_each_and_are_audited_once(
        server: Server, world: World, db: Database, blobs: LocalBlobStore, admin_db: asyncpg.Connection) -> None:
    a = world.a
    tokens = [a.sessions[Role.OWNER], a.sessions[Role.ADMIN], a.keys[Role.ADMIN]]
    acct = await _account(db, a.org_id, "race", ["+15553330001"])
    async with db.tenant(a.org_id) as conn:
        camp = await conn.fetchval("INSERT INTO campaigns (org_id, name) VALUES ($1, 'race') RETURNING id", a.org_id)
    cid, ccid, key = await _ended_call(db, blobs, a.org_id, "race")
    paths = {"account": (f"/api/accounts/{acct}", acct), "campaign": (f"/api/campaigns/{camp}", camp),
             "call": (f"/api/calls/{ccid}", cid)}
    async with Watched(server, "delete-restore-races") as watched:
        for step, method, suffix, ok, others in (("deleted", "DELETE", "", 200, (404, "not_found")),
                                                 ("restored", "POST", "/restore", 200, (409, "conflict"))):
            burst = [(method, path + suffix, tokens[i % 3], None) for path, _ in paths.values() for i in range(10)]
            answers = await _burst(server, burst)
            for i, kind in enumerate(paths):
                mine = answers[i * 10:(i + 1) * 10]
                assert [a[0] for a in mine].count(ok) == 1, (kind, step, [a[:2] for a in mine])
                assert all(_code(a) == others for a in mine if a[0] != ok), (kind, step, [a[:2] for a in mine])
        await watched.finish()
    for kind, (_, resource) in paths.items():
        assert await _actions(admin_db, a.org_id, resource) == [f"{kind}.deleted", f"{kind}.restored"]
    assert await admin_db.fetchval("SELECT deleted_at FROM calls WHERE id = $1", cid) is None
    assert await blobs.get(key)


async def test_a_seal_racing_the_calls_delete_ends_consistent_and_a_twin_call_id_of_another_tenant_is_not_held(
        server: Server, world: World, db: Database, blobs: LocalBlobStore, admin_db: asyncpg.Connection) -> None:
    a, b = world.a, world.b
    admin = a.sessions[Role.ADMIN]
    big = b"RIFF" + bytes(range(256)) * (BIG_RECORDING >> 8)
    async with aiohttp.ClientSession() as http, Watched(server, "seal-delete") as watched:
        for i in range(3):
            cid, ccid, _ = await _ended_call(db, blobs, a.org_id, f"seal-del-{i}")
            burst: list[tuple[str, str, str | None, Any]] = [("POST", f"/api/calls/{ccid}/evidence", admin, {}),
                                                            ("DELETE", f"/api/calls/{ccid}", a.keys[Role.ADMIN], None)]
            if i % 2:  # either sent first
                seal, delete = await _burst(server, burst)
            else:
                delete, seal = await _burst(server, burst[::-1])
            assert delete[0] == 200, delete[:2]
            assert seal[0] in (201, 404), seal[:2]  # sealed from the live call, or after it was deleted: unknown
            actions = await _actions(admin_db, a.org_id, cid)
            assert actions.count("call.deleted") == 1 and actions.count("evidence.sealed") == (seal[0] == 201)
            bundles = await admin_db.fetch("SELECT id FROM evidence_bundles WHERE call_id = $1", cid)
            assert len(bundles) == (seal[0] == 201)
            for row in bundles:  # the bundle of a call deleted meanwhile is whole and stays verifiable
                verdict = _data(await _req(http, server, "GET", f"/api/calls/{ccid}/evidence/{row['id']}/verify",
                                           admin))
                assert verdict["intact"], verdict
            assert (await _req(http, server, "POST", f"/api/calls/{ccid}/restore", admin))[0] == 200
            assert (await _req(http, server, "POST", f"/api/calls/{ccid}/evidence", admin, {}))[0] == 201
        # One call id in two organisations (call ids are unique per organisation): sealed at the same time,
        # neither waits for the other.
        twin = f"v3:rt12-twin-{uuid.uuid4().hex[:8]}"
        for t in (a, b):
            await _ended_call(db, blobs, t.org_id, "twin", ccid=twin, recording=big)
        answers = await _burst(server, [("POST", f"/api/calls/{twin}/evidence", t.sessions[Role.ADMIN], {})
                                        for t in (a, b)])
        assert [x[0] for x in answers] == [201, 201], [x[:2] for x in answers]
        await watched.finish()


async def test_restores_racing_the_retention_job_leave_the_young_restored_and_the_old_purged(
        server: Server, world: World, db: Database, blobs: LocalBlobStore, admin_db: asyncpg.Connection) -> None:
    a = world.a
    admin = a.sessions[Role.ADMIN]
    items: dict[str, dict[str, Any]] = {}
    for age in ("old", "young"):
        cid, ccid, key = await _ended_call(db, blobs, a.org_id, f"ret-{age}")
        acct = await _account(db, a.org_id, f"ret-{age}", [])
        async with db.tenant(a.org_id) as conn:
            camp = await conn.fetchval("INSERT INTO campaigns (org_id, name) VALUES ($1, $2) RETURNING id",
                                       a.org_id, f"ret-{age}")
        days = WINDOW_DAYS + 1 if age == "old" else WINDOW_DAYS - 1
        for table, rid in (("calls", cid), ("collection_accounts", acct), ("campaigns", camp)):
            await admin_db.execute(f"UPDATE {table} SET deleted_at = now() - make_interval(days => $2) "
                                   "WHERE id = $1", rid, days)
        items[age] = {"call": (cid, f"/api/calls/{ccid}/restore", key),
                      "account": (acct, f"/api/accounts/{acct}/restore"),
                      "campaign": (camp, f"/api/campaigns/{camp}/restore")}
    burst = [("POST", item[1], admin if i % 2 else a.keys[Role.ADMIN], None)
             for age in items for item in items[age].values() for i in range(3)]
    job = Retention(db, blobs, window_days=WINDOW_DAYS, batch=1, actor="red-team")
    async with Watched(server, "restore-retention") as watched:
        answers, report = await asyncio.gather(_burst(server, burst), job.run_org(a.org_id))
        await watched.finish()
    print(f"\nretention beside 18 restores: {report.counts}")
    by_path: dict[str, list[tuple[int, str | None]]] = {}
    for (_, path, _, _), answer in zip(burst, answers, strict=True):
        by_path.setdefault(path, []).append(_code(answer))
    for kind, item in items["young"].items():
        assert sorted(by_path[item[1]]) == [(200, None), (409, "conflict"), (409, "conflict")], (kind, by_path)
    for kind, item in items["old"].items():
        assert set(by_path[item[1]]) <= {(410, "gone"), (404, "not_found")}, (kind, by_path)
    assert report.counts == {"calls_deleted": 1, "accounts_deleted": 1, "campaigns_deleted": 1}
    young, old = items["young"], items["old"]
    assert await admin_db.fetchval("SELECT deleted_at IS NULL FROM calls WHERE id = $1", young["call"][0])
    assert await blobs.get(young["call"][2])
    assert await admin_db.fetchval("SELECT count(*) FROM collection_accounts WHERE id = $1 AND deleted_at IS NULL",
                                   young["account"][0]) == 1
    assert await admin_db.fetchval("SELECT count(*) FROM calls WHERE id = $1", old["call"][0]) == 0
    assert not await blobs.list_keys(old["call"][2])
    assert await admin_db.fetchval("SELECT count(*) FROM collection_accounts WHERE id = $1", old["account"][0]) == 0
    assert await admin_db.fetchval("SELECT count(*) FROM campaigns WHERE id = $1", old["campaign"][0]) == 0


# -- 7. the tenant wipe ----------------------------------------------------------------------------


async def test_the_wipe_refuses_any_confirm_but_the_exact_name_of_ones_own_organisation_and_deletes_nothing(
        server: Server, world: World, spares: dict[str, Tenant], admin_db: asyncpg.Connection) -> None:
    c, d = spares["c"], spares["d"]
    owner = d.sessions[Role.OWNER]
    wrong = ["org d", "ORG D", "Org d ", " Org d", "Org  d", "Org d\n", "Org\u00a0d", "Ｏrg d", "Org d\u200b",
             "Org\td", "Org", "Org d Org d", str(d.org_id), d.name.replace("d", "c"), world.a.name,
             "wiped organisation", "*", "%", ".*", "Org _", "Org %", "' OR '1'='1", "x" * 200, "Org d\u0301"]
    before = {t.org_id: await _snapshot(admin_db, t.org_id) for t in (c, d)}
    async with aiohttp.ClientSession() as http, Watched(server, "wipe-confirm") as watched:
        for confirm in wrong:
            answer = await _req(http, server, "DELETE", "/api/org", owner, {"confirm": confirm})
            assert _code(answer) == (400, "validation_failed"), (confirm, answer[:2])
            assert orjson.loads(answer[1])["error"]["details"][0]["field"] == "confirm"
        # Another organisation's owner naming this one, and this one's admin naming it exactly: refused.
        assert _code(await _req(http, server, "DELETE", "/api/org", c.sessions[Role.OWNER], {"confirm": d.name})) == (
            400, "validation_failed")
        assert _code(await _req(http, server, "DELETE", "/api/org", d.sessions[Role.ADMIN], {"confirm": d.name})) == (
            403, "forbidden")
        for t in (c, d):
            assert (await _req(http, server, "GET", "/api/org", t.sessions[Role.OWNER]))[0] == 200
        await watched.finish()
    for t in (c, d):
        assert await _snapshot(admin_db, t.org_id) == before[t.org_id]


TENANT_TABLES = ("calls", "recordings", "transcriptions", "collection_accounts", "campaigns", "campaign_contacts",
                 "import_jobs", "api_keys", "media_tokens", "users", "export_jobs", "retention_policies")


async def test_five_wipes_at_once_with_an_export_running_wipe_once_and_leave_no_object_behind(
        server: Server, world: World, spares: dict[str, Tenant], db: Database, admin_db: asyncpg.Connection) -> None:
    c, d = spares["c"], spares["d"]
    root: Path = server.extra["blobs"]
    await _fill(world, c.org_id, BULK_ROWS // 2)  # an XLSX export of them outlives the wipe
    others = {t.org_id: await _snapshot(admin_db, t.org_id) for t in (d, world.b)}
    async with aiohttp.ClientSession() as http, Watched(server, "wipe-5x") as watched:
        export = _data(await _req(http, server, "POST", "/api/exports", c.sessions[Role.ADMIN],
                                      {"kind": "accounts", "format": "xlsx"}))  # xlsx: slow, outlives the wipe
        answers = await _burst(server, [("DELETE", "/api/org", c.sessions[Role.OWNER], {"confirm": c.name})] * 5)
        codes = [_code(a) for a in answers]
        print(f"\n5 wipes of one organisation at once: {codes}")
        assert [s for s, _ in codes].count(202) == 1 and all(
            code in ((202, None), (404, "not_found"), (401, "unauthenticated")) for code in codes), codes
        for token in (c.sessions[Role.OWNER], c.sessions[Role.ADMIN]):
            assert _code(await _req(http, server, "GET", "/api/org", token)) == (401, "unauthenticated")

        async def settled() -> list[str]:
            wiped = await admin_db.fetchval("SELECT wiped_at IS NOT NULL FROM organizations WHERE id = $1", c.org_id)
            ended = [str(line["event"]) for line in server.logs() if line.get("export_id") == export["id"]
                     and line.get("event") in ("export.done", "export.failed", "export.abandoned")]
            return ended if wiped else []
        async with asyncio.timeout(60):
            while not (ended := await settled()):  # noqa: ASYNC110 - polls the jobs the server runs
                await asyncio.sleep(0.2)
        # The export outlived the wipe (the race under test), found its organisation deleted and dropped its file.
        assert ended == ["export.abandoned"], ended
        await watched.finish()
    counts = {t: await admin_db.fetchval(f"SELECT count(*) FROM {t} WHERE org_id = $1", c.org_id)
              for t in TENANT_TABLES}
    assert counts == dict.fromkeys(TENANT_TABLES, 0), counts
    left = await _objects(root, c.org_id)
    assert left == [], f"the wiped organisation's objects are still in the cold tier: {left}"
    actions = await admin_db.fetch("SELECT action FROM audit_logs WHERE org_id = $1 AND action LIKE 'org.%'",
                                   c.org_id)
    assert sorted(r["action"] for r in actions) == ["org.deleted", "org.wiped"]
    for org, snapshot in others.items():
        assert await _snapshot(admin_db, org) == snapshot
