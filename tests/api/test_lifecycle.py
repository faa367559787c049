"""Soft delete and restore (``api/lifecycle.py``) on the real server with storage on: a deleted account,
campaign, call or user leaves every list, read and link at once; a restore within the window brings it
back (day 29), after it answers 410 (day 31; the row's age is set in the database, PostgreSQL's clock
being the one the rule reads); both ways audited; a live one, an unknown one and another tenant's one
answer as documented; a restore that would break a uniqueness rule changes nothing.  A deleted user is
signed out everywhere at once and cannot sign in; restored, they sign in again and their old sessions
stay dead; nobody deletes themselves or the last active owner, and an erased user stays erased."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import aiohttp
import pytest

from api.auth import Role
from storage.db import Database
from tests.api.rest_world import PASSWORD, World, build_world, call, login, sign_in_all, world_server
from tests.servers import Server


@pytest.fixture(scope="module")
def world(pg_admin_url: str, redis_url: str) -> World:
    return asyncio.run(build_world(pg_admin_url, redis_url, 15))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Server]:
    with world_server(tmp_path_factory.mktemp("lifecycle"), world) as srv:
        asyncio.run(sign_in_all(srv, world))
        yield srv


async def _age(db: Database, org: uuid.UUID, table: str, key: str, value: object, days: float) -> None:
    """As if the row had been deleted ``days`` ago."""
    async with db.tenant(org) as conn:
        done = await conn.execute(f"UPDATE {table} SET deleted_at = now() - make_interval(secs => $2) "
                                  f"WHERE {key} = $1", value, days * 86400)
    assert done == "UPDATE 1"


async def _audit(db: Database, org: uuid.UUID, resource_id: str) -> list[str]:
    async with db.tenant(org) as conn:
        return [r["action"] for r in await conn.fetch(
            "SELECT action FROM audit_logs WHERE resource_id = $1 ORDER BY created_at", resource_id)]


async def _account(http: aiohttp.ClientSession, server: Server, token: str, ref: str) -> str:
    status, reply = await call(http, server, "POST", "/api/accounts", token,
                               {"external_ref": ref, "debtor_name": f"Debtor {ref}", "balance_cents": 100,
                                "currency": "USD"})
    assert status == 201, reply
    return str(reply["data"]["id"])


async def test_a_deleted_account_leaves_lists_and_reads_and_comes_back_within_the_window_only(
        server: Server, world: World, db: Database) -> None:
    a, b = world.a, world.b
    admin, agent = a.sessions[Role.ADMIN], a.sessions[Role.AGENT]
    async with aiohttp.ClientSession() as http:
        young, old = await _account(http, server, admin, "LC-29"), await _account(http, server, admin, "LC-31")
        for acct in (young, old):
            assert (await call(http, server, "DELETE", f"/api/accounts/{acct}", admin))[0] == 200
        status, listed = await call(http, server, "GET", "/api/accounts?q=LC-", admin)
        assert status == 200 and listed["data"]["items"] == []
        assert (await call(http, server, "GET", f"/api/accounts/{young}", admin))[0] == 404
        # An agent may not restore; another tenant's admin sees an unknown id; a live account: 409.
        assert (await call(http, server, "POST", f"/api/accounts/{young}/restore", agent, {}))[0] == 403
        theirs = await call(http, server, "POST", f"/api/accounts/{young}/restore", b.sessions[Role.ADMIN], {})
        unknown = await call(http, server, "POST", f"/api/accounts/{uuid.uuid4()}/restore",
                             b.sessions[Role.ADMIN], {})
        assert theirs == unknown and theirs[0] == 404
        status, reply = await call(http, server, "POST", f"/api/accounts/{a.account_id}/restore", admin, {})
        assert (status, reply["error"]["code"]) == (409, "conflict")

        await _age(db, a.org_id, "collection_accounts", "id", uuid.UUID(young), 29)
        await _age(db, a.org_id, "collection_accounts", "id", uuid.UUID(old), 31)
        status, reply = await call(http, server, "POST", f"/api/accounts/{young}/restore", admin, {})
        assert status == 200 and reply["data"]["deleted_at"] is None and reply["data"]["external_ref"] == "LC-29"
        status, reply = await call(http, server, "POST", f"/api/accounts/{old}/restore", admin, {})
        assert (status, reply["error"]["code"]) == (410, "gone")
        status, listed = await call(http, server, "GET", "/api/accounts?q=LC-", admin)
        assert [i["id"] for i in listed["data"]["items"]] == [young]
        assert (await call(http, server, "GET", f"/api/accounts/{young}", agent))[0] == 200

        # A live account took the deleted one's reference meanwhile: the restore changes nothing.
        taken = await _account(http, server, admin, "LC-DUP")
        assert (await call(http, server, "DELETE", f"/api/accounts/{taken}", admin))[0] == 200
        await _account(http, server, admin, "LC-DUP")
        status, reply = await call(http, server, "POST", f"/api/accounts/{taken}/restore", admin, {})
        assert (status, reply["error"]["code"]) == (409, "already_exists")
        assert (await call(http, server, "GET", f"/api/accounts/{taken}", admin))[0] == 404
    assert await _audit(db, a.org_id, young) == ["account.created", "account.deleted", "account.restored"]
    assert await _audit(db, a.org_id, old) == ["account.created", "account.deleted"]


async def test_a_deleted_campaign_and_a_deleted_call_come_back_and_an_open_call_cannot_be_deleted(
        server: Server, world: World, db: Database) -> None:
    a = world.a
    admin = a.sessions[Role.ADMIN]
    async with aiohttp.ClientSession() as http:
        status, made = await call(http, server, "POST", "/api/campaigns", admin, {"name": "Lifecycle"})
        cid = made["data"]["id"]
        assert (await call(http, server, "DELETE", f"/api/campaigns/{cid}", admin))[0] == 200
        assert (await call(http, server, "GET", f"/api/campaigns/{cid}", admin))[0] == 404
        status, reply = await call(http, server, "POST", f"/api/campaigns/{cid}/restore", admin, {})
        assert status == 200 and reply["data"]["name"] == "Lifecycle" and reply["data"]["deleted_at"] is None

        # An ended call: deleted, gone from the list, its detail and its recording's link; restored.
        ccid = a.call_id
        recording = f"/api/calls/{ccid}/recordings/{a.recording_id}/url"
        assert (await call(http, server, "DELETE", f"/api/calls/{ccid}", a.sessions[Role.AGENT]))[0] == 403
        status, reply = await call(http, server, "DELETE", f"/api/calls/{ccid}", admin)
        assert status == 200 and reply["data"]["call_id"] == ccid
        status, listed = await call(http, server, "GET", "/api/calls", admin)
        assert ccid not in [c["call_id"] for c in listed["data"]["items"]]
        assert (await call(http, server, "GET", f"/api/calls/{ccid}", admin))[0] == 404
        assert (await call(http, server, "GET", recording, admin))[0] == 404
        assert (await call(http, server, "DELETE", f"/api/calls/{ccid}", admin))[0] == 404  # already deleted
        status, reply = await call(http, server, "POST", f"/api/calls/{ccid}/restore", admin, {})
        assert status == 200 and reply["data"]["call_id"] == ccid
        assert (await call(http, server, "GET", recording, admin))[0] == 200
        status, detail = await call(http, server, "GET", f"/api/calls/{ccid}", admin)
        assert status == 200 and detail["data"]["transcripts"]

        # Past the window a call stays deleted; a live call cannot be deleted at all.
        assert (await call(http, server, "DELETE", f"/api/calls/{ccid}", admin))[0] == 200
        await _age(db, a.org_id, "calls", "call_control_id", ccid, 30.01)
        status, reply = await call(http, server, "POST", f"/api/calls/{ccid}/restore", admin, {})
        assert (status, reply["error"]["code"]) == (410, "gone")
        async with db.tenant(a.org_id) as conn:
            live = f"v3:live-{uuid.uuid4().hex[:8]}"
            await conn.execute("INSERT INTO calls (org_id, call_control_id, status) VALUES ($1, $2, 'active')",
                               a.org_id, live)
        status, reply = await call(http, server, "DELETE", f"/api/calls/{live}", admin)
        assert (status, reply["error"]["code"]) == (409, "conflict")
    trail = await _audit(db, a.org_id, str(await _call_uuid(db, a.org_id, ccid)))
    assert trail.count("call.deleted") == 2 and trail.count("call.restored") == 1
    assert await _audit(db, a.org_id, cid) == ["campaign.created", "campaign.deleted", "campaign.restored"]


async def _call_uuid(db: Database, org: uuid.UUID, ccid: str) -> uuid.UUID:
    async with db.tenant(org) as conn:
        return await conn.fetchval("SELECT id FROM calls WHERE call_control_id = $1", ccid)  # type: ignore[no-any-return]


async def test_the_retention_policy_is_the_organisations_own_and_never_under_two_years(
        server: Server, world: World, db: Database) -> None:
    a, b = world.a, world.b
    admin = a.sessions[Role.ADMIN]
    async with aiohttp.ClientSession() as http:
        status, reply = await call(http, server, "GET", "/api/retention", admin)
        assert status == 200 and reply["data"] == {"recordings": 730, "calls": None, "transcriptions": None,
                                                   "translations": None, "restore_window_days": 30}
        assert (await call(http, server, "GET", "/api/retention", a.sessions[Role.AGENT]))[0] == 403
        for bad in ({"recordings": 729}, {"calls": 100}, {"transcriptions": 0}, {"audit_logs": 1}):
            status, reply = await call(http, server, "PUT", "/api/retention", admin, bad)
            assert (status, reply["error"]["code"]) == (400, "validation_failed"), bad
        status, reply = await call(http, server, "PUT", "/api/retention", admin,
                                   {"recordings": 1095, "transcriptions": 365})
        assert status == 200 and (reply["data"]["recordings"], reply["data"]["transcriptions"]) == (1095, 365)
        status, other = await call(http, server, "GET", "/api/retention", b.sessions[Role.ADMIN])
        assert other["data"]["recordings"] == 730 and other["data"]["transcriptions"] is None
        status, reply = await call(http, server, "PUT", "/api/retention", admin, {})
        assert status == 200 and reply["data"]["recordings"] == 730  # back to the defaults
    async with db.tenant(a.org_id) as conn:
        assert await conn.fetchval("SELECT count(*) FROM retention_policies") == 0
        assert await conn.fetchval("SELECT count(*) FROM audit_logs WHERE action = 'retention.updated'") == 2


async def test_old_calls_lines_move_to_the_cold_tier_and_read_back_the_same(
        server: Server, world: World, db: Database, tmp_path_factory: pytest.TempPathFactory) -> None:
    from storage.blobs import LocalBlobStore
    from storage.retention import Retention

    a = world.a
    ccid = f"v3:archive-{uuid.uuid4().hex[:8]}"
    async with db.tenant(a.org_id) as conn:
        cid = await conn.fetchval("INSERT INTO calls (org_id, call_control_id, status, ended_at) VALUES "
                                  "($1, $2, 'completed', now() - interval '100 days') RETURNING id", a.org_id, ccid)
        for seq, text in enumerate(("hello there", "I can pay on Friday", "thank you"), 1):
            tid = await conn.fetchval("INSERT INTO transcriptions (org_id, call_id, track, seq, text, start_ms) "
                                      "VALUES ($1, $2, 'inbound', $3, $4, $5) RETURNING id",
                                      a.org_id, cid, seq, text, seq * 1000)
            await conn.execute("INSERT INTO translations (org_id, call_id, transcription_id, source_lang, target_lang, "
                               "original_text, translated_text) VALUES ($1, $2, $3, 'en', 'es', $4, $4)",
                               a.org_id, cid, tid, text)
    admin = a.sessions[Role.ADMIN]
    async with aiohttp.ClientSession() as http:
        status, before = await call(http, server, "GET", f"/api/calls/{ccid}", admin)
        assert status == 200 and before["data"]["archived"] is False and len(before["data"]["transcripts"]) == 3
        root = server.log_path.parent / "data" / "blobs"
        blobs = LocalBlobStore(root, b"k" * 32)
        await blobs.start()
        job = Retention(db, blobs, window_days=30, archive_after_days=90)
        dry = await job.run_org(a.org_id, dry_run=True)
        assert dry.counts.get("calls_archived") == 1
        done = await job.run_org(a.org_id)
        assert done.counts.get("calls_archived") == 1
        assert (await job.run_org(a.org_id)).counts.get("calls_archived") is None  # once
        status, after = await call(http, server, "GET", f"/api/calls/{ccid}", admin)
        status_e, sealed = await call(http, server, "POST", f"/api/calls/{ccid}/evidence", admin, {})
        assert status_e == 201, sealed
        status_e, link = await call(http, server, "GET", f"/api/calls/{ccid}/evidence/{sealed['data']['id']}/url",
                                    admin)
        async with http.get(server.http + link["data"]["url"]) as r:
            bundle = await r.read()
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(bundle)) as z:  # the sealed bundle holds the archived lines
        assert "I can pay on Friday" in z.read("transcript.txt").decode()
    assert status == 200 and after["data"]["archived"] is True
    for part in ("transcripts", "translations"):
        assert [(t["id"], t.get("text") or t.get("translated_text")) for t in after["data"][part]] == [
            (t["id"], t.get("text") or t.get("translated_text")) for t in before["data"][part]]
    async with db.tenant(a.org_id) as conn:
        assert await conn.fetchval("SELECT count(*) FROM transcriptions WHERE call_id = $1", cid) == 0
        key = await conn.fetchval("SELECT archive_key FROM calls WHERE id = $1", cid)
    assert key == f"archive/{a.org_id}/{cid}.jsonl.gz" and (root / key).read_bytes()[:2] == b"\x1f\x8b"


async def _user(http: aiohttp.ClientSession, server: Server, token: str, role: str = "agent") -> tuple[str, str]:
    """A new user of the token's organisation, with the world's password; (id, e-mail)."""
    email = f"{role}-{uuid.uuid4().hex[:8]}@example.com"
    status, made = await call(http, server, "POST", "/api/users", token,
                              {"email": email, "role": role, "password": PASSWORD})
    assert status == 201, made
    return str(made["data"]["user"]["id"]), email


async def test_a_deleted_user_is_signed_out_and_comes_back_within_the_window_without_old_sessions(
        server: Server, world: World, db: Database) -> None:
    a, b = world.a, world.b
    admin, owner = a.sessions[Role.ADMIN], a.sessions[Role.OWNER]
    async with aiohttp.ClientSession() as http:
        uid, email = await _user(http, server, admin)
        first, second = await login(http, server, email), await login(http, server, email)
        assert (await call(http, server, "GET", "/api/auth/me", first))[0] == 200

        status, reply = await call(http, server, "DELETE", f"/api/users/{uid}", admin)
        assert status == 200 and reply["data"]["id"] == uid
        for token in (first, second):  # every session of theirs, at once
            assert (await call(http, server, "GET", "/api/auth/me", token))[0] == 401
        status, reply = await call(http, server, "POST", "/api/auth/login", None,
                                   {"email": email, "password": PASSWORD})
        assert (status, reply["error"]["code"]) == (401, "unauthenticated")
        assert (await call(http, server, "GET", f"/api/users/{uid}", admin))[0] == 404
        assert (await call(http, server, "PATCH", f"/api/users/{uid}", admin, {"display_name": "x"}))[0] == 404
        assert (await call(http, server, "DELETE", f"/api/users/{uid}", admin))[0] == 404  # already deleted
        status, listed = await call(http, server, "GET", "/api/users?limit=200", admin)
        assert uid not in [u["id"] for u in listed["data"]["items"]]

        # An agent may not restore; another tenant's admin sees an unknown id; a live user: 409.
        assert (await call(http, server, "POST", f"/api/users/{uid}/restore", a.sessions[Role.AGENT], {}))[0] == 403
        theirs = await call(http, server, "POST", f"/api/users/{uid}/restore", b.sessions[Role.ADMIN], {})
        unknown = await call(http, server, "POST", f"/api/users/{uuid.uuid4()}/restore", b.sessions[Role.ADMIN], {})
        assert theirs == unknown and theirs[0] == 404
        status, reply = await call(http, server, "POST", f"/api/users/{a.users[Role.VIEWER]}/restore", admin, {})
        assert (status, reply["error"]["code"]) == (409, "conflict")

        await _age(db, a.org_id, "users", "id", uuid.UUID(uid), 29)
        status, reply = await call(http, server, "POST", f"/api/users/{uid}/restore", admin, {})
        assert status == 200 and reply["data"]["id"] == uid and reply["data"]["active"] is True
        assert (await call(http, server, "GET", f"/api/users/{uid}", admin))[0] == 200
        for token in (first, second):  # a restore brings the user back, not the sessions
            assert (await call(http, server, "GET", "/api/auth/me", token))[0] == 401
        third = await login(http, server, email)
        status, me = await call(http, server, "GET", "/api/auth/me", third)
        assert status == 200 and me["data"]["user"]["id"] == uid

        # Past the window: 410, and the user stays deleted.
        assert (await call(http, server, "DELETE", f"/api/users/{uid}", owner))[0] == 200
        assert (await call(http, server, "GET", "/api/auth/me", third))[0] == 401
        await _age(db, a.org_id, "users", "id", uuid.UUID(uid), 31)
        status, reply = await call(http, server, "POST", f"/api/users/{uid}/restore", admin, {})
        assert (status, reply["error"]["code"]) == (410, "gone")
        assert (await call(http, server, "GET", f"/api/users/{uid}", admin))[0] == 404

        # Deleted, its address reused by a new user: the restore changes nothing.
        other, other_email = await _user(http, server, admin)
        assert (await call(http, server, "DELETE", f"/api/users/{other}", admin))[0] == 200
        status, made = await call(http, server, "POST", "/api/users", admin,
                                  {"email": other_email, "role": "viewer", "password": PASSWORD})
        assert status == 201
        status, reply = await call(http, server, "POST", f"/api/users/{other}/restore", admin, {})
        assert (status, reply["error"]["code"]) == (409, "already_exists")
        assert (await call(http, server, "GET", f"/api/users/{other}", admin))[0] == 404
    trail = await _audit(db, a.org_id, uid)
    assert [x for x in trail if x.startswith("user.")] == ["user.created", "user.deleted", "user.restored",
                                                            "user.deleted"]
    # Three sign-ins; the one refused while deleted found no user (as an unknown address: logged, not audited).
    assert trail.count("auth.login") == 3 and "auth.login_failed" not in trail


async def test_nobody_deletes_themselves_or_the_last_owner_and_an_erased_user_stays_erased(
        server: Server, world: World, db: Database) -> None:
    a = world.a
    admin, owner = a.sessions[Role.ADMIN], a.sessions[Role.OWNER]
    owner_id = a.users[Role.OWNER]
    async with aiohttp.ClientSession() as http:
        status, reply = await call(http, server, "DELETE", f"/api/users/{a.users[Role.ADMIN]}", admin)
        assert (status, reply["error"]["code"]) == (409, "conflict")  # oneself
        status, reply = await call(http, server, "DELETE", f"/api/users/{owner_id}", owner)
        assert (status, reply["error"]["code"]) == (409, "conflict")  # oneself, and the last owner
        status, reply = await call(http, server, "DELETE", f"/api/users/{owner_id}", admin)
        assert (status, reply["error"]["code"]) == (403, "forbidden")  # an owner, by an admin
        # An owner-role API key is not the owner: the last-owner rule is what refuses it.
        status, key = await call(http, server, "POST", "/api/api-keys", owner, {"name": "owner key", "role": "owner"})
        assert status == 201
        status, reply = await call(http, server, "DELETE", f"/api/users/{owner_id}", key["data"]["key"])
        assert (status, reply["error"]["code"]) == (409, "conflict")
        assert "last active owner" in reply["error"]["message"]
        assert (await call(http, server, "GET", "/api/auth/me", owner))[0] == 200  # nothing happened to them
        # With a second owner, the first may be deleted (and restored) by them.
        second_id, second_email = await _user(http, server, owner, "owner")
        second = await login(http, server, second_email)
        assert (await call(http, server, "DELETE", f"/api/users/{owner_id}", second))[0] == 200
        assert (await call(http, server, "GET", "/api/auth/me", owner))[0] == 401
        status, reply = await call(http, server, "POST", f"/api/users/{owner_id}/restore", admin, {})
        assert (status, reply["error"]["code"]) == (403, "forbidden")  # an owner comes back by an owner only
        assert (await call(http, server, "POST", f"/api/users/{owner_id}/restore", second, {}))[0] == 200
        a.sessions[Role.OWNER] = owner = await login(http, server, a.emails[Role.OWNER])  # for the later tests
        assert (await call(http, server, "DELETE", f"/api/users/{second_id}", owner))[0] == 200
        assert (await call(http, server, "DELETE", f"/api/api-keys/{key['data']['api_key']['id']}", owner))[0] == 200

        # Erased (POST /api/erasures): deleted, and no restore brings the shell back.
        erased, _ = await _user(http, server, admin)
        assert (await call(http, server, "POST", "/api/erasures", admin, {"user_id": erased}))[0] == 200
        status, reply = await call(http, server, "POST", f"/api/users/{erased}/restore", admin, {})
        assert (status, reply["error"]["code"]) == (410, "gone") and "erased" in reply["error"]["message"]
        # Plain deactivation is not a delete: the user stays listed, inactive.
        kept, _ = await _user(http, server, admin)
        status, reply = await call(http, server, "PATCH", f"/api/users/{kept}", admin, {"active": False})
        assert status == 200 and reply["data"]["active"] is False
        status, listed = await call(http, server, "GET", "/api/users?active=false&limit=200", admin)
        assert kept in [u["id"] for u in listed["data"]["items"]]
    async with db.tenant(a.org_id) as conn:
        assert await conn.fetchval("SELECT count(*) FROM users WHERE role = 'owner' AND active "
                                   "AND deleted_at IS NULL") == 1
