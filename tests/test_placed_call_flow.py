"""Flow 1 end to end: an agent calls a debtor's account, and everything after.

The real server (storage on: PostgreSQL, Valkey, an S3 server; the local recogniser) against the fake
Telnyx (signed webhooks, a media stream playing espeak speech in real time, a dual-channel recording
served over HTTPS with its own certificate):

the agent's ``POST /api/voice/call`` for an account -> ``initiating`` -> webhooks ``ringing``, ``active``
(in the database and as ``call.state`` on the call's event stream) -> the stream's finals on SSE ->
the agent hangs up -> ``completed`` -> ``call.recording.saved`` -> the recording fetched into the cold
tier (an S3 bucket) with its ``recordings`` row -> transcribed after the call, both channels, redacted
-> the call's detail shows live and batch transcripts -> each step audited.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Iterator

import aiohttp
import boto3
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from api.auth import Role
from api.telnyx_signature import public_b64
from storage.db import Database
from tests.api.rest_world import World, build_world, call, sign_in_all, world_server
from tests.conftest import S3Endpoint
from tests.fakes.telnyx import FakeTelnyx
from tests.fakes.tls import self_signed
from tests.servers import Server, free_port
from tests.speech import utterances_with_pauses, word_error_rate
from tests.sse_client import read_sse

FAKE_KEY = Ed25519PrivateKey.generate()
CALLER = "+15550001000"
SENTENCES = ["please confirm your account number", "i would like to make a payment today",
             "can you call me back tomorrow morning"]
MAX_WER = 0.5  # pocketsphinx with the phrase list's domain LM: 0.35-0.46 measured on these sentences
BUCKET = "flow1-recordings"


@pytest.fixture(scope="module")
def world(pg_admin_url: str, redis_url: str) -> World:
    return asyncio.run(build_world(pg_admin_url, redis_url, 11))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, world: World, s3_endpoint: S3Endpoint) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("flow1")
    cert = self_signed(tmp / "tls", ["localhost"])
    phrases = tmp / "phrases.txt"
    phrases.write_text("\n".join(SENTENCES) + "\n")
    port, rport = free_port(), free_port()
    with world_server(tmp, world, TELNYX_API_KEY="KEY_test_fake", TELNYX_PUBLIC_KEY=public_b64(FAKE_KEY),
                      TELNYX_CONNECTION_ID="conn-1", SWITCHBOARD_TELNYX_API_URL=f"http://127.0.0.1:{port}",
                      SWITCHBOARD_CALL_TOKEN_KEY="flow1-call-token-key", SWITCHBOARD_STT_PROVIDER="pocketsphinx",
                      SWITCHBOARD_STT_PHRASES_FILE=str(phrases),
                      SWITCHBOARD_RECORDING_FETCH_HOSTS='["localhost"]',
                      SWITCHBOARD_RECORDING_FETCH_ALLOW_NETWORKS='["127.0.0.1/32"]',
                      SWITCHBOARD_RECORDING_FETCH_CA_FILE=str(cert.cert_file), SWITCHBOARD_BATCH_STT="local",
                      SWITCHBOARD_POST_CALL_INTERVAL_S="0.5", SWITCHBOARD_TRANSLATION_PROVIDER="none",
                      S3_ENDPOINT_URL=s3_endpoint.endpoint, S3_ACCESS_KEY_ID=s3_endpoint.access_key,
                      S3_SECRET_ACCESS_KEY=s3_endpoint.secret_key, SWITCHBOARD_S3_BUCKET=BUCKET) as srv:
        asyncio.run(sign_in_all(srv, world))
        srv.extra.update(port=port, rport=rport, cert=cert, s3=s3_endpoint)
        yield srv


async def _until(check, within_s: float = 60.0):  # type: ignore[no-untyped-def]
    async with asyncio.timeout(within_s):
        while not (got := await check()):  # noqa: ASYNC110 - polls tables the server writes
            await asyncio.sleep(0.2)
        return got


async def test_an_agent_calls_an_account_and_gets_states_finals_recording_and_batch_transcript(
        server: Server, world: World, db: Database) -> None:
    a = world.a
    agent = a.sessions[Role.AGENT]
    fake = FakeTelnyx(server.extra["port"], f"{server.http}/api/webhooks/telnyx", tls=server.extra["cert"],
                      recordings_port=server.extra["rport"])
    fake.key = FAKE_KEY
    # The speech, then silence: the line stays open until the agent hangs up.
    speech = np.concatenate([utterances_with_pauses(SENTENCES), np.zeros(8000 * 30, dtype=np.int16)])
    async with fake, aiohttp.ClientSession() as http:
        status, acct = await call(http, server, "POST", "/api/accounts", a.sessions[Role.ADMIN],
                                  {"external_ref": "flow1-001", "debtor_name": "Dana Debtor",
                                   "phones": ["+15557654321"], "balance_cents": 12_345, "currency": "USD"})
        assert status == 201, acct
        fake.auto = False  # the test paces the webhooks, so the event stream can be read from the start
        status, placed = await call(http, server, "POST", "/api/voice/call", agent,
                                    {"account_id": acct["data"]["id"], "from": CALLER})
        assert status == 201, placed
        cid, ccid = uuid.UUID(placed["data"]["id"]), placed["data"]["call_id"]
        assert placed["data"]["status"] == "initiating" and placed["data"]["to"] == "+15557654321"

        events: list[tuple[str, dict]] = []  # type: ignore[type-arg]
        reader = asyncio.create_task(read_sse(http, f"{server.http}/api/calls/{ccid}/events", token=agent,
                                              on_event=lambda e: events.append((e.event, e.json()))))
        await asyncio.sleep(0.3)
        assert await fake.send(ccid, "call.initiated", state="parked") == 200
        assert await fake.send(ccid, "call.answered", state="answered") == 200
        streaming = asyncio.create_task(fake.stream(ccid, speech))

        def finals() -> list[str]:
            return [d["text"] for e, d in events if e == "transcript.final" and d["text"].strip()]

        async def both_finals() -> bool:
            return len(finals()) >= len(SENTENCES)
        await _until(both_finals, 60)
        status, reply = await call(http, server, "POST", "/api/voice/hangup", agent, {"call_id": ccid})
        assert status == 202 and reply["data"]["status"] == "ending", reply
        await fake.settle()  # Telnyx: call.hangup, the stream stops, call.recording.saved
        code, sent = await streaming
        assert sent == -1  # cut short by the hangup
        async with asyncio.timeout(30):
            await reader

        states = [d["state"] for e, d in events if e == "call.state"]
        assert states == ["ringing", "active", "completed"], states
        assert events[-1][0] == "call.ended"
        wer = word_error_rate(" ".join(SENTENCES), " ".join(finals()))
        assert wer <= MAX_WER, (wer, finals())

        # The recording: fetched from the fake's HTTPS server once, into the S3 bucket, with its row.
        async def stored() -> object:
            async with db.tenant(a.org_id) as conn:
                return await conn.fetchrow("SELECT id, storage_key, bytes, channels, sample_rate, sha256, duration_ms "
                                           "FROM recordings WHERE call_id = $1 AND source = 'telnyx'", cid)
        rec = await _until(stored, 30)
        wav = fake.recording_wav(ccid)
        assert len(fake.recording_requests) == 1
        assert (rec["bytes"], rec["channels"], rec["sample_rate"]) == (len(wav), 2, 8000)
        assert rec["sha256"] == hashlib.sha256(wav).hexdigest()
        s3 = server.extra["s3"]
        client = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key,
                              aws_secret_access_key=s3.secret_key, region_name="us-east-1")
        body = await asyncio.to_thread(lambda: client.get_object(Bucket=BUCKET, Key=rec["storage_key"])["Body"].read())
        assert hashlib.sha256(body).hexdigest() == rec["sha256"]

        # Transcribed after the call: the consumer's channel holds the speech.
        async def transcribed() -> object:
            async with db.tenant(a.org_id) as conn:
                done = await conn.fetchval("SELECT count(*) FROM audit_logs WHERE action = 'call.transcribed' "
                                           "AND resource_id = $1", str(cid))
                return done and await conn.fetch("SELECT track, text, provider, redacted FROM transcriptions "
                                                 "WHERE call_id = $1 AND kind = 'batch' ORDER BY track, seq", cid)
        batch = await _until(transcribed, 90)
        inbound = " ".join(r["text"] for r in batch if r["track"] == "inbound")
        assert word_error_rate(" ".join(SENTENCES), inbound) <= MAX_WER, inbound
        assert all(r["provider"] == "local-batch" and r["redacted"] for r in batch)

        # The account's calls list this one; the call's detail shows live and batch lines and the recording.
        status, listed = await call(http, server, "GET", f"/api/calls?account_id={acct['data']['id']}", agent)
        assert status == 200 and [c["call_id"] for c in listed["data"]["items"]] == [ccid]
        assert listed["data"]["items"][0]["account_id"] == acct["data"]["id"]
        status, detail = await call(http, server, "GET", f"/api/calls/{ccid}", agent)
        assert status == 200, detail
        # The summary: from the live lines at once, then from the recording's.
        async def summarized() -> object:
            status, d = await call(http, server, "GET", f"/api/calls/{ccid}", agent)
            summary = d["data"]["summary"]
            return summary if summary and summary["source"] == "batch" else None
        summary = await _until(summarized, 30)
        assert summary["score"]["consumer_lines"] >= 2 and summary["provider"] == "rules"
        status, detail = await call(http, server, "GET", f"/api/calls/{ccid}", agent)
        kinds = {t.get("kind") for t in detail["data"]["transcripts"]}
        assert {"final", "batch"} <= kinds, kinds
        assert any(r["id"] == str(rec["id"]) for r in detail["data"]["recordings"])

    async with db.tenant(a.org_id) as conn:
        row = await conn.fetchrow("SELECT status, end_reason FROM calls WHERE id = $1", cid)
        trail = [r["action"] for r in await conn.fetch(
            "SELECT action FROM audit_logs WHERE resource_id IN ($1, $2) OR new_value->>'call_id' = $1 "
            "ORDER BY created_at", str(cid), ccid)]
    assert row["status"] == "completed" and row["end_reason"] == "normal_clearing"
    for action in ("call.placed", "call.ringing", "call.active", "call.hangup_requested", "call.completed",
                   "call.recording_saved", "recording.stored", "call.transcribed"):
        assert action in trail, (action, trail)


async def test_recording_urls_into_our_network_or_off_the_list_open_no_connection(
        server: Server, world: World, db: Database) -> None:
    a = world.a
    rport = server.extra["rport"]
    fake = FakeTelnyx(server.extra["port"], f"{server.http}/api/webhooks/telnyx", tls=server.extra["cert"],
                      recordings_port=rport)
    fake.key = FAKE_KEY
    hostile = {
        f"https://127.0.0.1:{rport}/recordings/x.wav": "host_is_an_address",
        "https://169.254.169.254/latest/meta-data/iam/security-credentials/": "host_is_an_address",
        "https://[fd00:ec2::254]/latest/meta-data/": "host_is_an_address",
        "https://10.0.0.7/recording.wav": "host_is_an_address",
        f"http://localhost:{rport}/recordings/x.wav": "scheme_not_https",
        "https://recordings.evil.example/x.wav": "host_not_allowed",
        "https://localhost.evil.example/x.wav": "host_not_allowed",
        f"https://user@localhost:{rport}/recordings/x.wav": "url_userinfo",
    }
    async with fake, aiohttp.ClientSession() as http:
        fake.auto = False
        status, placed = await call(http, server, "POST", "/api/voice/call", a.sessions[Role.AGENT],
                                    {"to": "+15557654322", "from": CALLER})
        assert status == 201, placed
        cid, ccid = uuid.UUID(placed["data"]["id"]), placed["data"]["call_id"]
        before = (await _stats(http, server))["post_call"]
        for url in hostile:
            assert await fake.send(ccid, "call.recording.saved", channels="dual",
                                   recording_urls={"wav": url, "mp3": None}) == 200
        # A replayed delivery adds no second job.
        body, headers, _ = fake.deliveries[0]
        async with http.post(f"{server.http}/api/webhooks/telnyx", data=body, headers=headers) as r:
            assert r.status == 200 and (await r.json())["data"]["duplicate"] is True

        async def settled() -> object:
            async with db.no_tenant() as conn:
                rows = await conn.fetch("SELECT status, last_error, attempts, payload->>'url' AS url FROM call_jobs "
                                        "WHERE call_id = $1", cid)
            return len(rows) == len(hostile) and all(r["status"] == "failed" for r in rows) and rows
        rows = await _until(settled, 30)
        assert {r["url"]: r["last_error"] for r in rows} == {u: f"refused: {why}" for u, why in hostile.items()}
        assert all(r["attempts"] == 1 for r in rows)  # a refusal is final: never retried
        after = (await _stats(http, server))["post_call"]
        assert fake.recording_requests == []
        assert after["fetch_connections"] == before["fetch_connections"]  # not one TCP connection opened
        assert sum(after["fetch_refused"].values()) - sum(before["fetch_refused"].values()) == len(hostile)
    async with db.tenant(a.org_id) as conn:
        assert await conn.fetchval("SELECT count(*) FROM recordings WHERE call_id = $1", cid) == 0
        assert await conn.fetchval("SELECT count(*) FROM audit_logs WHERE action = 'recording_fetch.failed' "
                                   "AND resource_id = $1", str(cid)) == len(hostile)


async def _stats(http: aiohttp.ClientSession, server: Server) -> dict:  # type: ignore[type-arg]
    from tests.servers import METRICS_TOKEN

    async with http.get(f"{server.http}/api/stats", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}) as r:
        assert r.status == 200
        return await r.json()  # type: ignore[no-any-return]
