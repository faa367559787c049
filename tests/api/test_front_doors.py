"""The front doors against strangers and neighbours, on the real server with its storage tiers.

Two organisations: the bootstrap one (its media token and admin API key from the settings, plus an
``agent`` API key) and a second one made directly in the database with ``storage.accounts``.  Each
attack runs beside a healthy victim call of the bootstrap organisation (real-time media, an SSE
reader), and afterwards the victim's frames and events are counted (``Victim.finish``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import websockets
from aiortc import RTCSessionDescription
from argon2 import PasswordHasher

from api.auth import BOOTSTRAP_ORG_ID, Role
from storage.accounts import create_api_key, create_media_token, create_organization, create_user, set_tenant
from tests.api.test_http_doors import Victim
from tests.api.test_media_stream import SILENCE, close_code_after, j, media_msg, start_msg
from tests.api.test_webrtc import Agent, post_offer, unwrap
from tests.servers import API_KEY, MEDIA_TOKEN, METRICS_TOKEN, Server, get_json, running_server
from tests.sse_client import read_sse
from tests.storage.conftest import APP_PASSWORD, DbUrls, migrated_database

FIELD = "x-telnyx-streaming-auth-token"
OFFER_BURST = 3
SSE_PER_PRINCIPAL = 4


@dataclass(frozen=True)
class Tenants:
    agent_key: str  # an `agent` API key of the bootstrap organisation: a second principal there
    other_org: uuid.UUID
    other_media_token: str
    other_api_key: str  # the other organisation's admin


async def _make_tenants(admin_url: str) -> Tenants:
    conn = await asyncpg.connect(admin_url)
    try:
        other = uuid.uuid4()
        async with conn.transaction():
            await set_tenant(conn, other)
            await create_organization(conn, other, "Neighbour Ltd")
            token = await create_media_token(conn, other, name="neighbour telnyx")
            key = await create_api_key(conn, other, name="neighbour admin", role=Role.ADMIN)
        async with conn.transaction():
            # The bootstrap organisation's row is made by the server at start-up; its key can wait for it.
            await set_tenant(conn, BOOTSTRAP_ORG_ID)
            agent = await create_api_key(conn, BOOTSTRAP_ORG_ID, name="agent", role=Role.AGENT)
        return Tenants(agent.secret, other, token.secret, key.secret)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def db_urls(pg_admin_url: str) -> DbUrls:
    return asyncio.run(migrated_database(pg_admin_url))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, db_urls: DbUrls, redis_url: str) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("doors"), SWITCHBOARD_STT_PROVIDER="null",
                        SWITCHBOARD_SSE_HEARTBEAT_S="1", SWITCHBOARD_PERSIST="true",
                        SWITCHBOARD_RECORDING_ENABLED="false",
                        DATABASE_URL=db_urls.admin, SWITCHBOARD_DATABASE_APP_PASSWORD=APP_PASSWORD,
                        REDIS_URL=redis_url, SWITCHBOARD_WEBRTC_OFFERS_PER_S="0.1",
                        SWITCHBOARD_WEBRTC_OFFER_BURST=str(OFFER_BURST),
                        SWITCHBOARD_SSE_MAX_PER_PRINCIPAL=str(SSE_PER_PRINCIPAL)) as srv:
        srv.extra["tenants"] = asyncio.run(_make_tenants(db_urls.admin))
        srv.extra["admin_url"] = db_urls.admin
        yield srv


@pytest.fixture
def tenants(server: Server) -> Tenants:
    return server.extra["tenants"]  # type: ignore[no-any-return]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def answer(http: aiohttp.ClientSession, method: str, url: str, auth: str | None = None,
                 **kw: Any) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": auth} if auth else {}
    async with http.request(method, url, headers=headers, **kw) as r:
        body = await r.read()
        return r.status, (orjson.loads(body) if body else {})


def bearer(token: str) -> str:
    return f"Bearer {token}"


async def test_strangers_get_401_at_every_door_and_the_victim_gets_everything(
        server: Server, http: aiohttp.ClientSession, tenants: Tenants) -> None:
    base = server.http
    async with Victim(server, http, "strangers") as victim:
        events = f"{base}/api/calls/{victim.call_id}/events"
        strangers = [None, "Bearer wrong", bearer(MEDIA_TOKEN), bearer(tenants.other_media_token),
                     bearer(METRICS_TOKEN), "Basic " + API_KEY]
        for auth in strangers:
            doors = [("GET", events, None), ("GET", f"{base}/api/stats", None),
                     ("POST", f"{base}/api/stats/reset", {}),
                     ("POST", f"{base}/api/calls/{victim.call_id}/sse-token", {}),
                     ("POST", f"{base}/api/webrtc/offer", {"call_id": victim.call_id, "type": "offer", "sdp": "v=0"}),
                     ("DELETE", f"{base}/api/webrtc/sessions/{uuid.uuid4().hex}", None)]
            for method, url, body in doors:
                if auth == bearer(METRICS_TOKEN) and "/api/stats" in url:
                    continue  # the scraper's door (below)
                status, reply = await answer(http, method, url, auth, json=body)
                assert (status, reply["error"]["code"]) == (401, "unauthenticated"), (auth, method, url, reply)
        # An access_token that is not an SSE token of this call (a media token, an API key): 401, and the
        # header it replaces is not consulted.
        for token in (MEDIA_TOKEN, API_KEY, "sbs_" + "x" * 43):
            status, _ = await answer(http, "GET", f"{events}?access_token={token}", bearer(API_KEY))
            assert status == 401
        # The metrics token reads and resets the stats, and nothing else.
        assert (await answer(http, "GET", f"{base}/api/stats", bearer(METRICS_TOKEN)))[0] == 200
        assert (await answer(http, "POST", f"{base}/api/stats/reset", bearer(METRICS_TOKEN), json={}))[0] == 200
        # An agent may not read the node's stats.
        status, reply = await answer(http, "GET", f"{base}/api/stats", bearer(tenants.agent_key))
        assert (status, reply["error"]["code"]) == (403, "forbidden")
        await victim.finish()  # every frame it sent counted, call.started .. call.ended on its reader
    text = server.log_path.read_text()
    assert tenants.other_media_token not in text and tenants.other_api_key not in text


async def test_unknown_media_tokens_close_1008_before_a_slot_and_the_connected_field_works(
        server: Server, http: aiohttp.ClientSession, tenants: Tenants) -> None:
    async with Victim(server, http, "media-tokens") as victim:
        before = get_json(f"{server.http}/api/stats")
        attempts: list[tuple[dict[str, str], dict[str, object]]] = [
            ({FIELD: "sbm_unknown"}, {}),  # unknown header
            ({FIELD: "sbm_unknown"}, {FIELD: MEDIA_TOKEN}),  # the field does not rescue a wrong header
            ({}, {}),  # none at all
            ({}, {FIELD: "sbm_unknown"}),  # unknown field
            ({}, {FIELD: API_KEY}),  # an API key is not a media token
        ]
        for n, (headers, field) in enumerate(attempts):
            ws = await websockets.connect(server.ws, additional_headers=headers)
            code, reason = await close_code_after(ws, j(event="connected", version="1.0.0", **field),
                                                  start_msg(f"intruder-{n}", victim.call_id),
                                                  media_msg(f"intruder-{n}", 2, SILENCE))
            assert code == 1008 and "token" in reason, (headers, field, code, reason)
        after = get_json(f"{server.http}/api/stats")
        assert after["streams_total"] == before["streams_total"] and after["streams_active"] == 1
        assert after["streams_pending"] == 0
        # The token in `connected` (no header): the messages sent meanwhile are held, then delivered.
        call_id = f"v3:field-{uuid.uuid4().hex[:8]}"
        reader = asyncio.create_task(read_sse(http, f"{server.http}/api/calls/{call_id}/events"))
        await asyncio.sleep(0.2)
        ws = await websockets.connect(server.ws)
        await ws.send(j(event="connected", version="1.0.0", **{FIELD: MEDIA_TOKEN}))
        await ws.send(start_msg("field", call_id))
        for seq in range(2, 12):
            await ws.send(media_msg("field", seq, SILENCE))
        code, _ = await close_code_after(ws, j(event="stop", sequence_number="12", stream_id="field"))
        stream = await asyncio.wait_for(reader, 10)
        assert code == 1000 and [e.event for e in stream.events] == ["call.started", "call.ended"]
        assert stream.events[-1].json()["stats"]["frames"] == 10
        await victim.finish()
    assert MEDIA_TOKEN not in server.log_path.read_text()


async def test_sse_tokens_watch_one_call_and_expire(server: Server, http: aiohttp.ClientSession) -> None:
    base = server.http
    async with Victim(server, http, "sse-token") as victim:
        mint = f"{base}/api/calls/{victim.call_id}/sse-token"
        status, reply = await answer(http, "POST", mint, bearer(API_KEY), json={})
        assert status == 200 and reply["data"]["expires_in"] == 300
        token, url = reply["data"]["token"], reply["data"]["url"]
        assert token.startswith("sbs_") and url == f"/api/calls/{victim.call_id}/events?access_token={token}"
        watched = await read_sse(http, base + url, token=None, max_events=1)  # no header: the token alone
        assert watched.status == 200 and watched.events[0].event == "call.started"
        # For exactly this call: on another call id it is refused, not a subscription to that call.
        status, reply = await answer(http, "GET", f"{base}/api/calls/v3:another/events?access_token={token}")
        assert (status, reply["error"]["code"]) == (401, "unauthenticated")
        # Short-lived: a 1 s token is refused once it has expired.
        status, reply = await answer(http, "POST", mint, bearer(API_KEY), json={"ttl_s": 1})
        assert status == 200 and reply["data"]["expires_in"] == 1
        short = reply["data"]["url"]
        await asyncio.sleep(1.6)
        assert (await answer(http, "GET", base + short))[0] == 401
        for body in ({"ttl_s": 301}, {"ttl_s": 0}, {"ttl_s": "60"}, {"ttl_s": 1.5}, {"other": 1}, []):
            status, reply = await answer(http, "POST", mint, bearer(API_KEY), json=body)
            assert status == 400, (body, reply)
        status, _ = await answer(http, "POST", f"{base}/api/calls/bad%20id/sse-token", bearer(API_KEY), json={})
        assert status == 400
        await victim.finish()
    assert token not in server.log_path.read_text()


async def test_two_organisations_streaming_the_same_call_id_at_once_never_see_each_other(
        server: Server, http: aiohttp.ClientSession, tenants: Tenants) -> None:
    call_id = f"v3:shared-{uuid.uuid4().hex[:8]}"
    url = f"{server.http}/api/calls/{call_id}/events"
    readers = {org: asyncio.create_task(read_sse(http, url, token=key))
               for org, key in (("a", API_KEY), ("b", tenants.other_api_key))}
    await asyncio.sleep(0.3)
    sockets = {}
    for org, token, number, digit in (("a", MEDIA_TOKEN, "+15550001", "1"),
                                      ("b", tenants.other_media_token, "+15550002", "9")):
        ws = await websockets.connect(server.ws, additional_headers={FIELD: token})
        await ws.send(j(event="connected", version="1.0.0"))
        await ws.send(j(event="start", sequence_number="1", stream_id=f"s-{org}", start={
            "call_control_id": call_id, "from": number, "to": "+15559999",
            "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}}))
        sockets[org] = (ws, digit)
    assert get_json(f"{server.http}/api/stats")["streams_active"] == 2  # two calls, neither refused
    for seq in range(2, 22):
        for org, (ws, digit) in sockets.items():
            await ws.send(media_msg(f"s-{org}", seq, SILENCE))
            if seq == 10:
                await ws.send(j(event="dtmf", stream_id=f"s-{org}", dtmf={"digit": digit}))
        await asyncio.sleep(0.02)
    for org, (ws, _) in sockets.items():
        code, _ = await close_code_after(ws, j(event="stop", sequence_number="22", stream_id=f"s-{org}"))
        assert code == 1000
    seen = {org: await asyncio.wait_for(r, 10) for org, r in readers.items()}
    for org, number, digit, other_digit in (("a", "+15550001", "1", "9"), ("b", "+15550002", "9", "1")):
        events = [(e.event, e.json()) for e in seen[org].events]
        assert [name for name, _ in events] == ["call.started", "call.dtmf", "call.ended"], (org, events)
        assert events[0][1]["from"] == number and events[0][1]["stream_id"] == f"s-{org}"
        assert events[1][1]["digit"] == digit != other_digit
        assert events[2][1]["stats"]["frames"] == 20
    # Two calls are stored, one in each organisation.
    conn = await asyncpg.connect(server.extra["admin_url"])
    try:
        for _ in range(50):
            rows = await conn.fetch("SELECT org_id, status FROM calls WHERE call_control_id = $1", call_id)
            if len(rows) == 2 and all(r["status"] == "completed" for r in rows):
                break
            await asyncio.sleep(0.1)
        assert sorted(str(r["org_id"]) for r in rows) == sorted([str(BOOTSTRAP_ORG_ID), str(tenants.other_org)])
    finally:
        await conn.close()


async def test_webrtc_flood_replace_and_delete_by_other_principals_leave_the_victim_alone(
        server: Server, http: aiohttp.ClientSession, tenants: Tenants) -> None:
    base = server.http
    offer_url = f"{base}/api/webrtc/offer"
    call_id = f"v3:agents-{uuid.uuid4().hex[:8]}"
    # One principal floods: its burst is spent on junk, then 429 with Retry-After.
    statuses = []
    for _ in range(OFFER_BURST + 7):
        async with http.post(offer_url, json={"call_id": call_id}, headers={"Authorization": bearer(API_KEY)}) as r:
            statuses.append(r.status)
            if r.status == 429:
                assert int(r.headers["Retry-After"]) >= 1
                assert (await r.json())["error"]["code"] == "rate_limited"
    assert statuses == [400] * OFFER_BURST + [429] * 7
    # Another principal of the same organisation still gets in: the victim agent.
    victim = Agent()
    sdp = await victim.offer()
    async with http.post(offer_url, json={"call_id": call_id, "type": "offer", "sdp": sdp},
                         headers={"Authorization": bearer(tenants.agent_key)}) as r:
        assert r.status == 200, await r.text()
        joined = unwrap(await r.json())
    await victim.pc.setRemoteDescription(RTCSessionDescription(joined["sdp"], "answer"))
    session_id = joined["session_id"]
    intruder = Agent()
    try:
        # A neighbour's "replace" cannot reach the victim's session: it gets a session of its own.
        body = {"call_id": call_id, "type": "offer", "sdp": await intruder.offer(), "replace": True}
        status, reply = await answer(http, "POST", offer_url, bearer(tenants.other_api_key), json=body)
        assert status == 200 and reply["data"]["session_id"] != session_id
        theirs = reply["data"]["session_id"]
        # Its second offer is a 409 that names no session, neither its own nor anyone else's.
        status, reply = await answer(http, "POST", offer_url, bearer(tenants.other_api_key),
                                     json={**body, "replace": False})
        assert status == 409 and session_id not in orjson.dumps(reply).decode() and theirs not in str(reply)
        # Deleting someone else's session looks exactly like deleting one that does not exist.
        for key in (tenants.other_api_key, API_KEY):
            for sid in (session_id, uuid.uuid4().hex):
                status, reply = await answer(http, "DELETE", f"{base}/api/webrtc/sessions/{sid}", bearer(key))
                assert (status, reply["error"]) == (404, {"code": "not_found", "message": "session not found"})
        await victim.connected()
        stats = get_json(f"{base}/api/stats")["webrtc"]
        assert stats["sessions_live"] == 2 and stats["offers_limited"] >= 7
        assert (await answer(http, "DELETE", f"{base}/api/webrtc/sessions/{theirs}",
                             bearer(tenants.other_api_key)))[0] == 204
        assert (await answer(http, "DELETE", f"{base}/api/webrtc/sessions/{session_id}",
                             bearer(tenants.agent_key)))[0] == 204
    finally:
        await victim.close()
        await intruder.close()


async def _started_under(server: Server, http: aiohttp.ClientSession, media_token: str, api_key: str) -> dict[str, Any]:
    """Stream a short call with ``media_token`` and return its ``call.started`` as ``api_key`` reads it."""
    call_id = f"v3:policy-{uuid.uuid4().hex[:8]}"
    reader = asyncio.create_task(read_sse(http, f"{server.http}/api/calls/{call_id}/events", token=api_key))
    await asyncio.sleep(0.2)
    ws = await websockets.connect(server.ws, additional_headers={FIELD: media_token})
    await ws.send(j(event="connected", version="1.0.0"))
    await ws.send(start_msg("s-policy", call_id))
    for seq in range(2, 7):
        await ws.send(media_msg("s-policy", seq, SILENCE))
    code, _ = await close_code_after(ws, j(event="stop", sequence_number="7", stream_id="s-policy"))
    assert code == 1000
    stream = await asyncio.wait_for(reader, 10)
    assert stream.events and stream.events[0].event == "call.started", stream.events
    return stream.events[0].json()


async def test_each_call_runs_under_its_own_organisations_speech_policy(
        server: Server, http: aiohttp.ClientSession, tenants: Tenants) -> None:
    """PATCH /api/org settings apply to that organisation's next call on this node, to no other's; a
    chain this node cannot build (a cloud provider without its key) falls back to the node's, logged."""
    org_url, neighbour = f"{server.http}/api/org", bearer(tenants.other_api_key)
    try:
        chain = {"settings": {"stt_chain": {"*": ["null", "null"]}}}
        status, _ = await answer(http, "PATCH", org_url, neighbour, json=chain)
        assert status == 200
        theirs = await _started_under(server, http, tenants.other_media_token, tenants.other_api_key)
        ours = await _started_under(server, http, MEDIA_TOKEN, API_KEY)
        assert (theirs["stt_provider"], ours["stt_provider"]) == ("null+null", "null")
        keyless = {"settings": {"stt_chain": {"*": ["deepgram"]}}}  # no DEEPGRAM_API_KEY on this node
        status, _ = await answer(http, "PATCH", org_url, neighbour, json=keyless)
        assert status == 200
        fallback = await _started_under(server, http, tenants.other_media_token, tenants.other_api_key)
        assert fallback["stt_provider"] == "null"
        assert any(line.get("event") == "speech.chain_unavailable" and line.get("chain") == ["deepgram"]
                   for line in server.logs())
    finally:
        status, _ = await answer(http, "PATCH", org_url, neighbour, json={"settings": {"stt_chain": None}})
        assert status == 200


async def test_one_key_holds_a_bounded_number_of_event_streams_and_others_still_get_theirs(
        server: Server, tenants: Tenants) -> None:
    url = f"{server.http}/api/calls/v3:held-{uuid.uuid4().hex[:8]}/events"  # a call that has not started: they wait
    async with aiohttp.ClientSession() as http:
        held = [await http.get(url, headers={"Authorization": bearer(tenants.agent_key)})
                for _ in range(SSE_PER_PRINCIPAL)]
        try:
            assert [r.status for r in held] == [200] * SSE_PER_PRINCIPAL
            # The same key once more, also through an SSE token it minted: refused.
            status, reply = await answer(http, "GET", url, bearer(tenants.agent_key))
            assert (status, reply["error"]["code"]) == (429, "rate_limited")
            status, minted = await answer(http, "POST", url.replace("/events", "/sse-token"),
                                          bearer(tenants.agent_key), json={})
            assert status == 200
            status, _ = await answer(http, "GET", f"{url}?access_token={minted['data']['token']}")
            assert status == 429
            # Another principal of the same organisation is not affected.
            async with http.get(url, headers={"Authorization": bearer(API_KEY)}) as other:
                assert other.status == 200
        finally:
            for r in held[1:]:
                r.close()
        for _ in range(50):  # the server notices the departures at its next write (at most a second)
            async with http.get(url, headers={"Authorization": bearer(tenants.agent_key)}) as again:
                if again.status == 200:
                    break
            await asyncio.sleep(0.1)
        assert again.status == 200
        held[0].close()


async def test_a_signed_in_agent_bridged_to_a_live_call_becomes_its_agent(
        server: Server, http: aiohttp.ClientSession) -> None:
    """calls.agent_id (the filter GET /api/calls?agent_id= and the call's detail) and an audit entry."""
    email, password = f"agent-{uuid.uuid4().hex[:8]}@example.test", "correct horse battery staple"
    conn = await asyncpg.connect(server.extra["admin_url"])
    try:
        async with conn.transaction():
            await set_tenant(conn, BOOTSTRAP_ORG_ID)
            user_id = await create_user(conn, BOOTSTRAP_ORG_ID, email=email, role=Role.AGENT,
                                        password_hash=PasswordHasher().hash(password))
    finally:
        await conn.close()
    status, signed_in = await answer(http, "POST", f"{server.http}/api/auth/login",
                                     json={"email": email, "password": password})
    assert status == 200
    session = signed_in["data"]["token"]
    agent = Agent()
    try:
        async with Victim(server, http, "agented") as victim:
            status, joined = await post_offer(http, server, {"call_id": victim.call_id, "type": "offer",
                                                             "sdp": await agent.offer()}, token=session)
            assert status == 200, joined
            await agent.pc.setRemoteDescription(RTCSessionDescription(joined["sdp"], "answer"))
            await victim.finish()
    finally:
        await agent.pc.close()
    listed: list[dict[str, Any]] = []
    for _ in range(50):  # the writer batches
        status, page = await answer(http, "GET", f"{server.http}/api/calls?agent_id={user_id}", bearer(API_KEY))
        listed = page["data"]["items"]
        if listed:
            break
        await asyncio.sleep(0.1)
    assert [c["call_id"] for c in listed] == [victim.call_id]
    status, detail = await answer(http, "GET", f"{server.http}/api/calls/{victim.call_id}", bearer(API_KEY))
    assert status == 200 and detail["data"]["agent_id"] == str(user_id)
    status, trail = await answer(http, "GET", f"{server.http}/api/audit?action=call.agent_joined&actor_id={user_id}",
                                 bearer(API_KEY))
    assert [e["new_value"] for e in trail["data"]["items"]] == [{"session_id": joined["session_id"]}]
