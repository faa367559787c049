"""Placing and ending calls through Telnyx Call Control, on the real server with storage on, against the
fake Telnyx: the call's states in the database and on its event stream as signed webhooks arrive,
audit entries for each step, replays and forged deliveries without effect, do-not-call and billing
refusals, roles, and another tenant's call answering like an unknown one."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from api.auth import Authenticator, Role
from api.settings import Settings
from api.simulator import telnyx_messages
from api.telnyx_calls import parse_client_state
from pipelines.translate.markers import markers
from storage.db import Database
from tests.api.rest_world import World, build_world, call, sign_in_all, world_server
from tests.fakes.deepgram import FakeDeepgram
from tests.fakes.telnyx import FakeTelnyx, delivery
from tests.servers import Server, free_port
from tests.speech import utterances_with_pauses
from tests.sse_client import read_sse
from tests.telnyx_client import connect

FAKE_KEY = Ed25519PrivateKey.generate()  # the fake's key pair: the server trusts its public half
CALLER = "+15550001000"


@pytest.fixture(scope="module")
def world(pg_admin_url: str, redis_url: str) -> World:
    return asyncio.run(build_world(pg_admin_url, redis_url, 10))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Server]:
    from api.telnyx_signature import public_b64

    port = free_port()
    with world_server(tmp_path_factory.mktemp("voice"), world, TELNYX_API_KEY="KEY_test_fake",
                      TELNYX_PUBLIC_KEY=public_b64(FAKE_KEY), TELNYX_CONNECTION_ID="conn-1",
                      SWITCHBOARD_TELNYX_API_URL=f"http://127.0.0.1:{port}",
                      SWITCHBOARD_CALL_TOKEN_KEY="test-call-token-key") as srv:
        asyncio.run(sign_in_all(srv, world))
        srv.extra["port"] = port
        yield srv


def _fake(server: Server) -> FakeTelnyx:
    fake = FakeTelnyx(server.extra["port"], f"{server.http}/api/webhooks/telnyx")
    fake.key = FAKE_KEY
    return fake


async def _until(predicate: Callable[[], object], within_s: float = 10.0) -> None:
    async with asyncio.timeout(within_s):
        while not await predicate():  # type: ignore[misc]  # noqa: ASYNC110 - polls the table the webhook writes
            await asyncio.sleep(0.05)


async def _row(db: Database, org: uuid.UUID, call_id: uuid.UUID) -> dict:  # type: ignore[type-arg]
    async with db.tenant(org) as conn:
        row = await conn.fetchrow("SELECT status, call_control_id, end_reason, direction, to_number, from_number, "
                                  "node_id "
                                  "FROM calls WHERE id = $1", call_id)
    return dict(row) if row else {}


async def _audit(db: Database, org: uuid.UUID) -> list[tuple[str, str, str | None]]:
    async with db.tenant(org) as conn:
        rows = await conn.fetch("SELECT action, actor_type, actor_id FROM audit_logs WHERE resource_type = 'call' "
                                "ORDER BY created_at, action")
    return [(r["action"], r["actor_type"], r["actor_id"]) for r in rows]


async def test_a_placed_call_rings_answers_and_ends_by_signed_webhooks_with_audit_and_sse(
        server: Server, world: World, db: Database) -> None:
    a = world.a
    async with _fake(server) as fake, aiohttp.ClientSession() as http:
        fake.auto = False
        status, reply = await call(http, server, "POST", "/api/voice/call", a.sessions[Role.AGENT],
                                   {"to": "+15551234567", "from": CALLER, "translate": True,
                                    "target_language": "es"})
        assert status == 201, reply
        placed = reply["data"]
        cid, ccid = uuid.UUID(placed["id"]), placed["call_id"]
        assert placed["status"] == "initiating" and ccid in fake.calls
        (path, sent), = fake.requests
        assert path == "/v2/calls"
        assert sent["connection_id"] == "conn-1" and sent["to"] == "+15551234567" and sent["from"] == CALLER
        assert sent["command_id"] == str(cid) and parse_client_state(sent["client_state"]) == (a.org_id, cid)
        assert sent["stream_url"].endswith("/api/media/telnyx?language=en&consumer_language=es&translate_to=es")
        assert sent["stream_track"] == "both_tracks" and sent["stream_bidirectional_mode"] == "rtp"
        assert (sent["record"], sent["record_channels"], sent["record_format"]) == ("record-from-answer", "dual",
                                                                                    "wav")
        # The per-call media credential names the organisation, and only with this server's key.
        token = sent["stream_auth_token"]
        assert token.startswith("sbc_")
        settings = Settings(call_token_key="test-call-token-key")  # type: ignore[arg-type]
        auth = Authenticator(settings, None)
        assert await auth.media_org(token) == a.org_id
        assert await auth.media_org(token[:-2] + ("AA" if token[-2:] != "AA" else "AB")) is None
        other = Authenticator(Settings(call_token_key="another-key"), None)  # type: ignore[arg-type]
        assert await other.media_org(token) is None
        row = await _row(db, a.org_id, cid)
        assert row["status"] == "initiating" and row["call_control_id"] == ccid and row["direction"] == "outbound"
        assert row["node_id"] is None  # owned by no node until its media stream reaches one

        events: list[dict] = []  # type: ignore[type-arg]
        reader = asyncio.create_task(read_sse(http, f"{server.http}/api/calls/{ccid}/events",
                                              token=a.sessions[Role.VIEWER], until="none",
                                              max_events=3, on_event=lambda e: events.append(e.json())))
        await asyncio.sleep(0.3)  # the reader waits for the call's channel
        assert await fake.send(ccid, "call.initiated", state="parked") == 200
        assert (await _row(db, a.org_id, cid))["status"] == "ringing"
        assert await fake.send(ccid, "call.answered", state="answered") == 200
        assert (await _row(db, a.org_id, cid))["status"] == "active"
        # A late call.initiated does not move the call back.
        assert await fake.send(ccid, "call.initiated", state="parked") == 200
        assert (await _row(db, a.org_id, cid))["status"] == "active"
        # A replayed delivery changes nothing.
        body, headers, _ = fake.deliveries[1]
        async with http.post(f"{server.http}/api/webhooks/telnyx", data=body, headers=headers) as r:
            assert r.status == 200 and (await r.json())["data"]["duplicate"] is True

        # A viewer may not hang up; another tenant's call is unknown to b; the agent hangs up.
        status, _ = await call(http, server, "POST", "/api/voice/hangup", a.sessions[Role.VIEWER], {"call_id": ccid})
        assert status == 403
        status, reply_b = await call(http, server, "POST", "/api/voice/hangup", world.b.sessions[Role.OWNER],
                                     {"call_id": ccid})
        status_u, reply_u = await call(http, server, "POST", "/api/voice/hangup", world.b.sessions[Role.OWNER],
                                       {"call_id": "v3:unknown"})
        assert (status, reply_b) == (status_u, reply_u) and status == 404
        status, reply = await call(http, server, "POST", "/api/voice/hangup", a.sessions[Role.AGENT],
                                   {"call_id": ccid})
        assert status == 202 and reply["data"]["status"] == "ending", reply
        await fake.settle()
        row = await _row(db, a.org_id, cid)
        assert row["status"] == "completed" and row["end_reason"] == "normal_clearing"
        # Hanging up again: Telnyx says 90018 (already ended); we say the call has ended.
        status, reply = await call(http, server, "POST", "/api/voice/hangup", a.sessions[Role.AGENT],
                                   {"call_id": ccid})
        assert (status, reply["error"]["code"]) == (409, "conflict")
        async with asyncio.timeout(10):
            await reader
        assert [(e["call_id"], e["state"], e["cause"]) for e in events] == [
            (ccid, "ringing", None), (ccid, "active", None), (ccid, "completed", "normal_clearing")]

    async with db.tenant(a.org_id) as conn:  # answered, no media stream: Telnyx's times make its minutes
        assert await conn.fetchval("SELECT minutes FROM call_usage WHERE call_id = $1", cid) == 1
    trail = await _audit(db, a.org_id)
    agent = str(a.users[Role.AGENT])
    assert ("call.placed", "user", agent) in trail
    assert [t[0] for t in trail if t[1] == "provider"] == ["call.ringing", "call.active", "call.completed"]
    assert all(t[2] == "telnyx" for t in trail if t[1] == "provider")
    assert ("call.hangup_requested", "user", agent) in trail


async def test_a_busy_callee_ends_the_call_busy_without_answering(
        server: Server, world: World, db: Database) -> None:
    a = world.a
    async with _fake(server) as fake, aiohttp.ClientSession() as http:
        fake.outcome = "user_busy"
        status, reply = await call(http, server, "POST", "/api/voice/call", a.keys[Role.ADMIN],
                                   {"to": "+15551234568", "from": CALLER})
        assert status == 201, reply
        cid = uuid.UUID(reply["data"]["id"])
        await fake.settle()
        row = await _row(db, a.org_id, cid)
        assert row["status"] == "busy" and row["end_reason"] == "user_busy"
        async with db.tenant(a.org_id) as conn:  # never answered: no minutes
            assert await conn.fetchval("SELECT count(*) FROM call_usage WHERE call_id = $1", cid) == 0


async def test_the_media_stream_with_the_per_call_credential_lands_on_the_placed_calls_row(
        server: Server, world: World, db: Database) -> None:
    a = world.a
    async with _fake(server) as fake, aiohttp.ClientSession() as http:
        fake.auto = False
        status, reply = await call(http, server, "POST", "/api/voice/call", a.sessions[Role.AGENT],
                                   {"to": "+15551234570", "from": CALLER})
        assert status == 201, reply
        cid, ccid = uuid.UUID(reply["data"]["id"]), reply["data"]["call_id"]
        assert await fake.send(ccid, "call.initiated") == 200
        assert await fake.send(ccid, "call.answered") == 200
        events: list[str] = []
        reader = asyncio.create_task(read_sse(http, f"{server.http}/api/calls/{ccid}/events",
                                              token=a.sessions[Role.VIEWER], on_event=lambda e: events.append(e.event)))
        await asyncio.sleep(0.2)
        code, sent = await fake.stream(ccid, np.zeros(8000, dtype=np.int16))  # one second of silence
        assert code == 1000 and sent == 50
        async with asyncio.timeout(15):
            await reader
        assert "call.started" in events and events[-1] == "call.ended"

        async def ended() -> bool:
            row = await _row(db, a.org_id, cid)
            return row.get("status") == "completed"
        await _until(ended)
        assert (await _row(db, a.org_id, cid))["node_id"]  # the node its stream reached
        async with db.tenant(a.org_id) as conn:
            assert await conn.fetchval("SELECT count(*) FROM calls WHERE to_number = '+15551234570' OR "
                                       "call_control_id = $1", ccid) == 1
        # While a call is open its credential streams that call only: another call id is refused.
        other = telnyx_messages(np.zeros(800, dtype=np.int16), call_id="v3:another-call", stream_id="st-x",
                                encoding="PCMU", sample_rate=8000, token=None)
        status, reply = await call(http, server, "POST", "/api/voice/call", a.sessions[Role.AGENT],
                                   {"to": "+15551234571", "from": CALLER})
        assert status == 201, reply
        ccid2 = reply["data"]["call_id"]
        async with connect(fake.calls[ccid2]["stream_url"], token=fake.calls[ccid2]["stream_auth_token"]) as ws:
            with pytest.raises(websockets.ConnectionClosed):
                for msg in other:
                    await ws.send(msg)
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1008 and "another call" in (ws.close_reason or "")
        async with db.tenant(a.org_id) as conn:
            assert await conn.fetchval("SELECT count(*) FROM calls WHERE call_control_id = 'v3:another-call'") == 0
        # A forged credential, and the genuine one once its call has ended, are refused before a start.
        genuine = fake.calls[ccid]["stream_auth_token"]
        for token in (genuine[:-4] + ("AAAA" if not genuine.endswith("AAAA") else "BBBB"), genuine):
            async with connect(fake.calls[ccid]["stream_url"], token=token) as ws:
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.send(orjson.dumps({"event": "connected", "version": "1.0.0"}).decode())
                    await asyncio.wait_for(ws.recv(), 10)
                assert ws.close_code == 1008


async def test_forged_stale_and_malformed_deliveries_change_nothing(server: Server, world: World,
                                                                    db: Database) -> None:
    a = world.a
    async with _fake(server) as fake, aiohttp.ClientSession() as http:
        fake.auto = False
        status, reply = await call(http, server, "POST", "/api/voice/call", a.sessions[Role.OWNER],
                                   {"to": "+15551234569", "from": CALLER})
        cid, ccid = uuid.UUID(reply["data"]["id"]), reply["data"]["call_id"]
        payload = fake.payload(ccid, state="answered")
        url = f"{server.http}/api/webhooks/telnyx"
        body, headers = delivery(FAKE_KEY, "call.answered", payload)
        bad: list[tuple[bytes, dict[str, str]]] = [
            (body, {"Content-Type": "application/json"}),  # no signature
            delivery(Ed25519PrivateKey.generate(), "call.answered", payload),  # another key
            (body + b" ", headers),  # one byte more
            delivery(FAKE_KEY, "call.answered", payload, at=time.time() - 301),  # 301 s old
            delivery(FAKE_KEY, "call.answered", payload, at=time.time() + 301),  # 301 s ahead
            (body, {**headers, "telnyx-timestamp": "garbage"}),
        ]
        for b, h in bad:
            async with http.post(url, data=b, headers=h) as r:
                assert (r.status, (await r.json())["error"]["code"]) == (401, "unauthenticated")
        for b in (b"[1]", b'{"data": {"id": "x"}}', b"not json"):
            async with http.post(url, data=b, headers={"Content-Type": "application/json", **_signed(b)}) as r:
                assert (r.status, (await r.json())["error"]["code"]) == (400, "bad_request")
        # An unknown type and a call that is not ours: 200, nothing changes.
        for etype, p in (("call.speak.ended", payload), ("call.answered", {**payload, "client_state": "bm9wZQ=="})):
            b, h = delivery(FAKE_KEY, etype, p)
            async with http.post(url, data=b, headers=h) as r:
                assert r.status == 200 and (await r.json())["data"]["applied"] is False
        assert (await _row(db, a.org_id, cid))["status"] == "initiating"
        # The genuine delivery applies.
        async with http.post(url, data=body, headers=headers) as r:
            assert r.status == 200 and (await r.json())["data"]["applied"] is True
        assert (await _row(db, a.org_id, cid))["status"] == "active"


def _signed(body: bytes) -> dict[str, str]:
    from api.telnyx_signature import sign

    return sign(FAKE_KEY, body, int(time.time()))


async def test_refusals_do_not_call_bad_standing_bad_numbers_provider_errors_and_roles(
        server: Server, world: World, db: Database) -> None:
    a, b = world.a, world.b
    async with _fake(server) as fake, aiohttp.ClientSession() as http:
        fake.auto = False
        owner = a.sessions[Role.OWNER]
        status, reply = await call(http, server, "POST", "/api/accounts", owner, {
            "external_ref": "dnc-1", "debtor_name": "Do Not", "phones": ["+15557770000"], "balance_cents": 100,
            "currency": "USD", "do_not_call": True})
        assert status == 201, reply
        dnc = reply["data"]["id"]
        for body in ({"account_id": dnc, "from": CALLER}, {"to": "+15557770000", "from": CALLER}):
            status, reply = await call(http, server, "POST", "/api/voice/call", owner, body)
            assert (status, reply["error"]["code"]) == (409, "conflict") and "do-not-call" in reply["error"]["message"]
        status, reply = await call(http, server, "POST", "/api/voice/call", owner,
                                   {"account_id": str(uuid.uuid4()), "from": CALLER})
        assert status == 404
        for body in ({"to": "5551234567", "from": CALLER}, {"to": "+15551234567", "from": "+0123"},
                     {"from": CALLER}, {"to": "+15551234567", "account_id": dnc, "from": CALLER},
                     {"to": "+15551234567", "from": CALLER, "translate": True, "target_language": "en"},
                     {"to": "+15551234567", "from": CALLER, "extra": 1}):
            status, reply = await call(http, server, "POST", "/api/voice/call", owner, body)
            assert (status, reply["error"]["code"]) == (400, "validation_failed"), body
        status, reply = await call(http, server, "POST", "/api/voice/call", owner, {"to": "+15551234567"})
        assert (status, reply["error"]["code"]) == (400, "validation_failed")  # no from, no caller_id
        status, _ = await call(http, server, "POST", "/api/voice/call", a.sessions[Role.VIEWER],
                               {"to": "+15551234567", "from": CALLER})
        assert status == 403
        assert fake.requests == []

        # Telnyx refuses: the call is stored failed with the reason, the caller gets 503.
        fake.fail_next(1, 500)
        status, reply = await call(http, server, "POST", "/api/voice/call", owner, {"to": "+15551230000",
                                                                                    "from": CALLER})
        assert (status, reply["error"]["code"]) == (503, "unavailable")
        async with db.tenant(a.org_id) as conn:
            row = await conn.fetchrow("SELECT status, end_reason FROM calls WHERE to_number = '+15551230000'")
        assert row["status"] == "failed" and row["end_reason"].startswith("provider_error: 500")

        # Not in good standing: 402, and Telnyx is not asked.
        async with db.tenant(b.org_id) as conn:
            await conn.execute("INSERT INTO subscriptions (org_id, stripe_customer_id, stripe_subscription_id, plan, "
                               "status) VALUES ($1, 'cus_b', 'sub_b', 'pro', 'past_due')", b.org_id)
        asked = len(fake.requests)
        status, reply = await call(http, server, "POST", "/api/voice/call", b.sessions[Role.OWNER],
                                   {"to": "+15551234567", "from": CALLER})
        assert (status, reply["error"]["code"]) == (402, "payment_required")
        assert len(fake.requests) == asked


# -- a call translated both ways ---------------------------------------------------------------------

# What the fake Deepgram hears, utterance by utterance across both legs: the consumer speaks first (the
# inbound track, in Spanish), then the agent (the outbound track, in English; lower case, as a recogniser
# without formatting writes it, so the translator gets it truecased).
CONSUMER_SAYS = ["mi tarjeta es 4111 1111 1111 1111 gracias", "mi teléfono es 555-212-3456"]
AGENT_SAYS = ["i would like to call you at 555-867-5309", "i'm sure we can help you today"]
# Whole, as tests/test_provider_fanout.py checks its canaries: a partial transcript may show the first
# digits of a number the redactor cannot know yet to be one ("mi tarjeta es 4111 1111").
RAW_PII = ["4111 1111 1111 1111", "4111111111111111", "555-212-3456", "5552123456", "555-867-5309", "5558675309"]


@contextlib.asynccontextmanager
async def _bilingual_server(tmp: Path, world: World, deepgram_url: str) -> AsyncIterator[Server]:
    """The real server with the fake Deepgram for both languages (a chain per language), the real
    Apertium, and Telnyx pointed at a fake on its own port."""
    from api.telnyx_signature import public_b64

    port = free_port()
    cm = world_server(tmp, world, TELNYX_API_KEY="KEY_test_fake", TELNYX_PUBLIC_KEY=public_b64(FAKE_KEY),
                      TELNYX_CONNECTION_ID="conn-1", SWITCHBOARD_TELNYX_API_URL=f"http://127.0.0.1:{port}",
                      SWITCHBOARD_CALL_TOKEN_KEY="test-call-token-key",
                      SWITCHBOARD_STT_CHAIN='{"en": ["deepgram"], "es": ["deepgram"]}', DEEPGRAM_API_KEY="test-key",
                      SWITCHBOARD_DEEPGRAM_URL=deepgram_url, SWITCHBOARD_TRANSLATION_PROVIDER="apertium")
    srv = await asyncio.to_thread(cm.__enter__)  # the fakes share this event loop: never block it
    srv.extra["port"] = port
    try:
        yield srv
    finally:
        await asyncio.to_thread(cm.__exit__, None, None, None)


@pytest.mark.skipif(shutil.which("apertium") is None or not Path("/usr/share/apertium/modes/eng-spa.mode").exists(),
                    reason="Debian apertium with the eng-spa pair is not installed")
async def test_a_translated_call_is_translated_both_ways_with_redaction_markers_intact(
        tmp_path: Path, world: World, db: Database) -> None:
    a = world.a
    dg = FakeDeepgram(CONSUMER_SAYS + AGENT_SAYS, word_ms=60)
    await dg.start()
    try:
        async with _bilingual_server(tmp_path, world, dg.url) as server, _fake(server) as fake, \
                aiohttp.ClientSession() as http:
            status, reply = await call(http, server, "POST", "/api/voice/call", a.keys[Role.ADMIN],
                                       {"to": "+15551234571", "from": CALLER, "language": "en", "translate": True,
                                        "target_language": "es"})
            assert status == 201, reply
            cid, ccid = uuid.UUID(reply["data"]["id"]), reply["data"]["call_id"]
            assert fake.calls[ccid]["stream_url"].endswith("?language=en&consumer_language=es&translate_to=es")
            await fake.settle()  # ringing, answered
            reader = asyncio.create_task(read_sse(http, f"{server.http}/api/calls/{ccid}/events",
                                                  token=a.keys[Role.VIEWER]))
            await asyncio.sleep(0.3)
            consumer = utterances_with_pauses(["hola buenas tardes a todos", "adios muchas gracias"], pause_ms=900)
            agent = np.concatenate([np.zeros(len(consumer) + 8000, dtype=np.int16),  # after the consumer
                                    utterances_with_pauses(["please confirm your account number for me",
                                                            "thank you very much for your time"], pause_ms=900)])
            code, _ = await fake.stream(ccid, consumer, outbound=agent)
            assert code == 1000
            stream = await asyncio.wait_for(reader, 60)
    finally:
        await dg.stop()

    events = [(e.event, e.json()) for e in stream.events]
    started = next(data for name, data in events if name == "call.started")
    assert started["tracks"] == {
        "inbound": {"language": "es", "translate_to": "en", "stt_provider": "deepgram"},
        "outbound": {"language": "en", "translate_to": "es", "stt_provider": "deepgram"}}
    assert sorted(c.query["language"] for c in dg.connections) == ["en", "es"]  # one session per leg
    finals = [data for name, data in events if name == "transcript.final"]
    by_track = {t: [f for f in finals if f["track"] == t] for t in ("inbound", "outbound")}
    assert [f["text"] for f in by_track["inbound"]] == ["mi tarjeta es [REDACTED:card] gracias",
                                                         "mi teléfono es [REDACTED:phone]"]
    assert all(f["language"] == "es" for f in by_track["inbound"])
    assert [(f["text"], f["language"]) for f in by_track["outbound"]] == [
        ("i would like to call you at [REDACTED:phone]", "en"), ("i'm sure we can help you today", "en")]

    translations = [data for name, data in events if name == "translation.final"]
    assert not [data for name, data in events if name == "translation.failed"]
    es_en = [t for t in translations if (t["source_lang"], t["target_lang"]) == ("es", "en")]
    en_es = [t for t in translations if (t["source_lang"], t["target_lang"]) == ("en", "es")]
    assert {t["track"] for t in es_en} == {"inbound"} and {t["track"] for t in en_es} == {"outbound"}
    assert len(es_en) == len(by_track["inbound"]) and len(en_es) == len(by_track["outbound"])
    for t in translations:
        print(f"\n{t['track']} {t['source_lang']}->{t['target_lang']}: {t['original']!r} -> {t['translated']!r}")
    for t in translations:  # every marker byte for byte and in order, none translated
        assert markers(t["translated"]) == markers(t["original"]), t
        assert t["provider"] == "apertium" and "tarjeta]" not in t["translated"] and "teléfono]" not in t["translated"]
    card = next(t for t in es_en if "[REDACTED:card]" in t["original"])
    assert card["original"] == "Mi tarjeta es [REDACTED:card] gracias"  # truecased for the translator
    assert "[REDACTED:card]" in card["translated"] and "card" in card["translated"].replace("[REDACTED:card]", "")
    phone = next(t for t in en_es if "[REDACTED:phone]" in t["original"])
    assert phone["original"] == "I would like to call you at [REDACTED:phone]"  # truecased
    assert phone["translated"].endswith("[REDACTED:phone]") and "gustar" in phone["translated"].lower()
    sure = next(t for t in en_es if "sure" in t["original"])
    assert sure["original"] == "I'm sure we can help you today" and "seguro" in sure["translated"].lower()

    sse_text = orjson.dumps([e.data for e in stream.events]).decode()
    for raw in RAW_PII:
        assert raw not in sse_text, [(e.event, e.json()["text"]) for e in stream.events if raw in e.data]
    async with db.tenant(a.org_id) as conn:
        for _ in range(50):
            stored = await conn.fetch("SELECT track, language, text FROM transcriptions WHERE call_id = $1", cid)
            stored_tr = await conn.fetch("SELECT source_lang, target_lang, translated_text FROM translations "
                                         "WHERE call_id = $1", cid)
            if len(stored) == len(finals) and len(stored_tr) == len(translations):
                break
            await asyncio.sleep(0.1)
    assert sorted((r["track"], r["language"]) for r in stored) == sorted(
        (f["track"], f["language"]) for f in finals)
    assert sorted((r["source_lang"], r["target_lang"]) for r in stored_tr) == sorted(
        (t["source_lang"], t["target_lang"]) for t in translations)
    stored_text = orjson.dumps([dict(r) for r in stored] + [dict(r) for r in stored_tr]).decode()
    for raw in RAW_PII:
        assert raw not in stored_text, raw
