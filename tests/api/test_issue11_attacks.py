"""Red team of the doors issue 11 added, on the real server with storage on, the fake Telnyx and the
fake Stripe: the two signed webhook doors (floods of forged, stale and oversized deliveries, slow
bodies, signed garbage, concurrent replays), placing and hanging up calls as an attacker (roles,
other tenants' ids, hostile bodies, bursts), and hostile CSV imports.

Each attack runs beside a healthy victim call of the bootstrap organisation (real-time media on the
Telnyx WebSocket and an SSE reader of its events, ``tests.api.test_http_doors.Victim``): afterwards
the victim's ``call.ended`` must count every frame it sent, and the server's own event-loop stall and
frame-lag histograms (``/api/stats``, reset when the victim starts) must stay sane.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

import aiohttp
import asyncpg
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from api.auth import Role
from api.stripe_signature import sign as stripe_sign
from api.telnyx_signature import public_b64
from api.telnyx_signature import sign as telnyx_sign
from tests.api.rest_world import World, bearer, build_world, call, sign_in_all, world_server
from tests.api.test_http_doors import Victim
from tests.fakes.stripe import event, signed_delivery
from tests.fakes.telnyx import FakeTelnyx, delivery
from tests.servers import AUTH, Server, free_port

T = TypeVar("T")
FAKE_KEY = Ed25519PrivateKey.generate()  # the fake Telnyx's key pair: the server trusts its public half
STRIPE_SECRET = "whsec_red_team"
CALLER = "+15550001000"
BODY_TIMEOUT_S = 1.0
PLACE_PER_MIN = 40  # SWITCHBOARD_CALLS_PLACE_PER_MIN for this module
WEBHOOK_MAX = 256 << 10  # api.voice_api.WEBHOOK_MAX_BODY (the Stripe door's is the same)
# What "sane" means for the victim on this shared 2-core machine while the attack runs beside it: the
# loop never stalls for long, and the frames' own lag stays well under one utterance.
MAX_LOOP_STALL_MS = 1000.0  # the longest single stall (this shared machine alone has shown 350 ms)
# Systematic blocking (an import holding the loop per read) shows in the p99; this machine, shared and at a
# load of 5-6 on its two cores, alone has shown 63 ms.
MAX_LOOP_STALL_P99_MS = 100.0
MAX_FRAME_LAG_P90_MS = 100.0  # p90: the test client shares two cores with the server and the attacker, and
# a frame it sends late (descheduled) counts as lag; the server's own stalls are the loop-stall figure


@pytest.fixture(scope="module")
def world(pg_admin_url: str, redis_url: str) -> World:
    return asyncio.run(build_world(pg_admin_url, redis_url, 13))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Server]:
    telnyx_port, stripe_port = free_port(), free_port()
    with world_server(tmp_path_factory.mktemp("issue11-attacks"), world, TELNYX_API_KEY="KEY_test_fake",
                      TELNYX_PUBLIC_KEY=public_b64(FAKE_KEY), TELNYX_CONNECTION_ID="conn-1",
                      SWITCHBOARD_TELNYX_API_URL=f"http://127.0.0.1:{telnyx_port}",
                      SWITCHBOARD_CALL_TOKEN_KEY="red-team-call-token-key",
                      STRIPE_API_KEY="sk_test_fake", STRIPE_WEBHOOK_SECRET=STRIPE_SECRET,
                      SWITCHBOARD_STRIPE_API_URL=f"http://127.0.0.1:{stripe_port}",
                      SWITCHBOARD_BILLING_PLANS=orjson.dumps({"pro": {"price_id": "price_pro",
                                                                      "included_minutes": 100}}).decode(),
                      SWITCHBOARD_HTTP_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
                      SWITCHBOARD_CALLS_PLACE_PER_MIN=str(PLACE_PER_MIN)) as srv:
        asyncio.run(sign_in_all(srv, world))
        srv.extra["telnyx_port"] = telnyx_port
        yield srv


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        yield session


@pytest.fixture
async def admin_db(world: World) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(world.db.admin)  # sees every tenant's rows: counts what the attack wrote
    try:
        yield conn
    finally:
        await conn.close()


class Watched:
    """A ``Victim`` call, plus the server's loop-stall and frame-lag histograms over its life."""

    def __init__(self, server: Server, name: str, stall_p99_ms: float = MAX_LOOP_STALL_P99_MS) -> None:
        self.server, self.name, self.stall_p99_ms = server, name, stall_p99_ms

    async def __aenter__(self) -> Watched:
        self.http = aiohttp.ClientSession(headers=AUTH)  # the bootstrap admin: the victim's organisation
        async with self.http.post(f"{self.server.http}/api/stats/reset", json={}) as r:
            assert r.status == 200, await r.text()
        self.victim = await Victim(self.server, self.http, self.name).__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.victim.__aexit__(*exc)
        await self.http.close()

    async def finish(self) -> dict[str, Any]:
        """The victim's call ends: every frame counted (``Victim.finish``), no stall, sane frame lag."""
        ended = await self.victim.finish()
        async with self.http.get(f"{self.server.http}/api/stats") as r:
            stats = await r.json()
        stall, lag = stats["loop_stall"], stats["frame_lag"]
        print(f"\n{self.name}: victim sent {self.victim.sent} frames, all counted; loop stall p99 "
              f"{stall['p99_ms']} ms, max {stall['max_ms']} ms, frame lag p90 {lag['p90_ms']} ms, "
              f"p99 {lag['p99_ms']} ms")
        assert stall["max_ms"] < MAX_LOOP_STALL_MS and stall["p99_ms"] < self.stall_p99_ms, stall
        assert lag["p90_ms"] < MAX_FRAME_LAG_P90_MS, lag
        return ended


def _off_loop(coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
    """Run ``coro`` (which makes its own client session) on an event loop of its own in a thread: the
    server measures a frame's lag from its media timestamp, so an attacker sharing the victim's loop
    would make the victim's own sends late and blame the server for it."""
    return asyncio.to_thread(asyncio.run, coro)


async def _count(conn: asyncpg.Connection, sql: str, *args: Any) -> int:
    return int(await conn.fetchval(sql, *args))


async def _post(http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    async with http.post(url, data=body, headers={"Content-Type": "application/json", **headers}) as r:
        return r.status, await r.read()


def _fake(server: Server) -> FakeTelnyx:
    fake = FakeTelnyx(server.extra["telnyx_port"], f"{server.http}/api/webhooks/telnyx")
    fake.key = FAKE_KEY
    fake.auto = False  # the tests send the webhooks they mean to
    return fake


# -- 1. webhook floods -------------------------------------------------------------------------------


def _forged_deliveries() -> list[tuple[str, bytes, dict[str, str]]]:
    """(door, body, headers) that must each be refused 401 without a byte of the body being parsed."""
    now = time.time()
    payload = {"call_control_id": "v3:forged", "client_state": "bm9wZQ=="}
    t_body, t_headers = delivery(FAKE_KEY, "call.answered", payload)
    s_event = event("invoice.paid", {"id": "in_forged", "customer": "cus_forged", "amount_paid": 1})
    s_body, s_sig = signed_delivery(STRIPE_SECRET, s_event)
    return [
        ("telnyx", t_body, {}),  # unsigned
        ("telnyx", *delivery(Ed25519PrivateKey.generate(), "call.answered", payload)),  # another key
        ("telnyx", *delivery(FAKE_KEY, "call.answered", payload, at=now - 301)),  # stale
        ("telnyx", *delivery(FAKE_KEY, "call.answered", payload, at=now + 3600)),  # from the future
        ("telnyx", t_body + b" ", t_headers),  # one byte more than was signed
        ("telnyx", t_body, {**t_headers, "telnyx-signature-ed25519": "A" * 88}),  # 64 zero-ish bytes
        ("telnyx", t_body, {**t_headers, "telnyx-signature-ed25519": "%" * 5000}),  # not base64, long
        ("stripe", s_body, {}),
        ("stripe", *_stripe(signed_delivery("whsec_other", s_event))),
        ("stripe", *_stripe(signed_delivery(STRIPE_SECRET, s_event, at=now - 301))),
        ("stripe", s_body + b" ", {"Stripe-Signature": s_sig}),
        ("stripe", s_body, {"Stripe-Signature": s_sig.replace("v1=", "v0=")}),
        ("stripe", s_body, {"Stripe-Signature": "t=1," + ",".join(["v1=" + "0" * 64] * 100)}),  # 6.8 KB
    ]


def _stripe(d: tuple[bytes, str]) -> tuple[bytes, dict[str, str]]:
    return d[0], {"Stripe-Signature": d[1]}


def _flood(base: str, deliveries: list[tuple[str, bytes, dict[str, str]]]) -> tuple[list[int], list[float], float]:
    """In a process of its own: POST every delivery, 48 at a time; (statuses, seconds each, seconds in all)."""
    took: list[float] = []

    async def flood() -> list[int]:
        sem = asyncio.Semaphore(48)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as attacker:
            async def one(door: str, body: bytes, headers: dict[str, str]) -> int:
                async with sem:
                    t0 = time.monotonic()
                    status, reply = await _post(attacker, f"{base}/api/webhooks/{door}", body, headers)
                    took.append(time.monotonic() - t0)
                    assert orjson.loads(reply)["error"]["code"] == "unauthenticated", reply
                    return status
            return await asyncio.gather(*(one(*d) for d in deliveries))

    t0 = time.monotonic()
    statuses = asyncio.run(flood())
    return statuses, took, time.monotonic() - t0


async def test_a_flood_of_forged_and_stale_webhooks_is_refused_401_quickly_and_writes_nothing(
        server: Server, admin_db: asyncpg.Connection, world: World) -> None:
    forged = _forged_deliveries()
    rounds = 8000 // len(forged) + 1  # about 8,000 deliveries, both doors
    before = await _count(admin_db, "SELECT count(*) FROM webhook_events")
    audit = "SELECT count(*) FROM audit_logs WHERE org_id = ANY($1::uuid[])"  # not the victim's own
    audit_before = await _count(admin_db, audit, [world.a.org_id, world.b.org_id])
    # As fast as one client can send: ~3,000 a second at ~170 us of server CPU each keep the server's core
    # about half busy on this shared machine, so its loop is allowed a longer tail here (see README, Known
    # limits: a flood is for the proxy to cut).
    async with Watched(server, "webhook-flood", stall_p99_ms=200.0) as watched:
        async with watched.http.get(f"{server.http}/api/stats") as r:
            cpu0 = (await r.json())["cpu_seconds"]
        # The attacker is a process of its own: a thread would hold the GIL the victim's sender needs.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            statuses, took, elapsed = await asyncio.get_running_loop().run_in_executor(
                pool, _flood, server.http, [f for _ in range(rounds) for f in forged])
        async with watched.http.get(f"{server.http}/api/stats") as r:
            cpu = (await r.json())["cpu_seconds"] - cpu0
        await watched.finish()
    took.sort()
    n = len(statuses)
    print(f"{n} forged deliveries in {elapsed:.1f} s ({n / elapsed:,.0f}/s), p50 {took[n // 2] * 1000:.1f} ms, "
          f"p99 {took[int(n * 0.99)] * 1000:.1f} ms, server CPU {cpu / n * 1e6:.0f} us each")
    assert set(statuses) == {401}
    assert cpu / n < 0.005  # cheap: a signature check, no parsing, no query (the victim's frames are in it too)
    assert await _count(admin_db, "SELECT count(*) FROM webhook_events") == before
    assert await _count(admin_db, audit, [world.a.org_id, world.b.org_id]) == audit_before
    assert not [line for line in server.logs() if line.get("level") == "error"]


async def test_oversized_webhook_bodies_get_413_before_the_body_is_read(server: Server) -> None:
    async with Watched(server, "webhook-413") as watched:
        for door in ("telnyx", "stripe"):
            # A declared length over the limit: refused at once, with none of the body sent.
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"POST /api/webhooks/{door} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {64 << 20}\r\n\r\n".encode())
            await writer.drain()
            t0 = time.monotonic()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 413"), head
            assert time.monotonic() - t0 < BODY_TIMEOUT_S  # not after waiting for a body that never comes
            writer.close()

            # Chunked, no length: reading stops at the limit (the client may go on sending into a closed door).
            sent = 0

            async def chunks() -> AsyncIterator[bytes]:
                nonlocal sent
                for _ in range(64):  # 16 MiB offered
                    sent += 256 << 10
                    yield b"x" * (256 << 10)

            async with aiohttp.ClientSession() as http:
                try:
                    async with http.post(f"{server.http}/api/webhooks/{door}", data=chunks(),
                                         headers={"Content-Type": "application/json"}) as r:
                        assert r.status == 413 and (await r.json())["error"]["code"] == "payload_too_large"
                except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                    pass  # the server closed the door mid-upload: the same refusal, seen by the writer
            assert sent < 16 << 20, "the server read the whole oversized body"

            # Header lines past the HTTP parser's limit (8 KiB): refused by the parser itself, and the log
            # says so as a warning, without quoting the line (it may be a credential).
            for huge in ({"Stripe-Signature": "t=1," + ",".join(["v1=" + "0" * 64] * 500)},
                         {"telnyx-signature-ed25519": "A" * 40_000, "telnyx-timestamp": "1"},
                         {"Authorization": "Bearer sbk_CANARYsecret" + "x" * 9000}):
                async with aiohttp.ClientSession() as http:
                    async with http.post(f"{server.http}/api/webhooks/{door}", data=b"{}", headers=huge) as r:
                        assert r.status == 400
        text = server.log_path.read_text()
        assert "CANARY" not in text and "v1=0000000000" not in text and "A" * 64 not in text
        assert any(line.get("event") == "http.malformed_request" and line.get("level") == "warning"
                   for line in server.logs())
        await watched.finish()


async def test_slow_webhook_bodies_get_408_at_the_body_deadline_and_free_their_connection(
        server: Server, http: aiohttp.ClientSession) -> None:
    async with Watched(server, "webhook-408") as watched:
        async def trickle(door: str) -> tuple[float, bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"POST /api/webhooks/{door} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n".encode())
            t0 = time.monotonic()
            try:
                while not reader.at_eof():  # a byte every 0.1 s: busy, but never done
                    writer.write(b" ")
                    await writer.drain()
                    try:
                        data = await asyncio.wait_for(reader.read(), 0.1)
                        return time.monotonic() - t0, data
                    except TimeoutError:
                        assert time.monotonic() - t0 < 10 * BODY_TIMEOUT_S, "never cut"
                return time.monotonic() - t0, b""
            except ConnectionError:
                return time.monotonic() - t0, b""
            finally:
                writer.close()

        results = await asyncio.gather(*(trickle(door) for door in ("telnyx", "stripe") for _ in range(25)))
        for waited, data in results:
            assert waited < BODY_TIMEOUT_S + 2.0, waited
            assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:80]
        assert any(data.startswith(b"HTTP/1.1 408") for _, data in results)
        # The slots are free: a genuine delivery is answered at once.
        body, headers = delivery(FAKE_KEY, "call.speak.ended", {"client_state": None})
        status, _ = await _post(http, f"{server.http}/api/webhooks/telnyx", body, headers)
        assert status == 200
        await watched.finish()


def _telnyx_signed(body: bytes) -> dict[str, str]:
    return telnyx_sign(FAKE_KEY, body, int(time.time()))


def _stripe_signed(body: bytes) -> dict[str, str]:
    return {"Stripe-Signature": stripe_sign(STRIPE_SECRET, body, int(time.time()))}


async def test_signed_bodies_that_are_not_events_get_400_and_change_nothing(
        server: Server, http: aiohttp.ClientSession, admin_db: asyncpg.Connection, world: World) -> None:
    a = world.a
    async with _fake(server) as fake:
        status, reply = await call(http, server, "POST", "/api/voice/call", a.sessions[Role.OWNER],
                                   {"to": "+15551230001", "from": CALLER})
        assert status == 201, reply
        ccid = reply["data"]["call_id"]
        payload = fake.payload(ccid)
    deep = b"[" * 100_000 + b"]" * 100_000
    not_events = [b"", b"not json", b"[1]", b"null", b"\xff\xfe{}", b'{"data": ' + b"1" * 5000 + b"}", deep,
                  b'{"data": {"id": "x", "event_type": "call.answered"}}',  # no payload
                  b'{"data": {"id": 1, "event_type": "call.answered", "payload": {}}}',
                  b'{"data": {"id": "", "event_type": "call.answered", "payload": {}}}',
                  b'{"data": {"id": "e\\u0000", "event_type": "call.answered", "payload": {}}}',
                  b'{"id": "evt_1", "type": "invoice.paid", "data": {"object": []}}',
                  b'{"id": "evt_\\u0000", "type": "invoice.paid", "data": {"object": {"customer": "cus_x"}}}',
                  b'{"id": "evt_2", "type": "invoice.paid", "data": {"object": {"customer": "cus_\\u0000"}}}',
                  # Our own call, with a NUL where a value will be stored.
                  orjson.dumps({"data": {"id": str(uuid.uuid4()), "event_type": "call.hangup",
                                         "payload": {**payload, "hangup_cause": "x\u0000y"}}}),
                  orjson.dumps({"data": {"id": str(uuid.uuid4()), "event_type": "call.answered",
                                         "payload": {**payload, "call_control_id": "v3:\u0000"}}})]
    events_before = await _count(admin_db, "SELECT count(*) FROM webhook_events")
    async with Watched(server, "signed-garbage") as watched:
        for body in not_events:
            for door, signed in (("telnyx", _telnyx_signed), ("stripe", _stripe_signed)):
                status, reply = await _post(http, f"{server.http}/api/webhooks/{door}", body, signed(body))
                assert (status, orjson.loads(reply)["error"]["code"]) == (400, "bad_request"), (door, body[:120],
                                                                                                 reply)
        await watched.finish()
    assert await _count(admin_db, "SELECT count(*) FROM webhook_events") == events_before
    assert await _count(admin_db, "SELECT count(*) FROM calls WHERE call_control_id = $1 AND status = 'initiating'",
                        ccid) == 1
    assert not [line for line in server.logs() if line.get("level") == "error"]


# -- 2. replays and races ----------------------------------------------------------------------------


async def test_one_signed_telnyx_event_delivered_20_times_at_once_is_applied_once(
        server: Server, http: aiohttp.ClientSession, admin_db: asyncpg.Connection, world: World) -> None:
    a = world.a
    async with _fake(server) as fake, Watched(server, "telnyx-replays") as watched:
        status, reply = await call(http, server, "POST", "/api/voice/call", a.sessions[Role.OWNER],
                                   {"to": "+15551230002", "from": CALLER})
        assert status == 201, reply
        cid, ccid = uuid.UUID(reply["data"]["id"]), reply["data"]["call_id"]
        body, headers = delivery(FAKE_KEY, "call.answered", fake.payload(ccid, state="answered"))
        replies = await asyncio.gather(*(_post(http, f"{server.http}/api/webhooks/telnyx", body, headers)
                                         for _ in range(20)))
        assert {s for s, _ in replies} == {200}
        data = [orjson.loads(r)["data"] for _, r in replies]
        assert sum(d["applied"] for d in data) == 1 and sum(d["duplicate"] for d in data) == 19
        # The same transition under 20 different event ids (Telnyx retries with new ids after a timeout):
        # one state change still.
        hangups = [delivery(FAKE_KEY, "call.hangup", fake.payload(ccid, hangup_cause="normal_clearing"))
                   for _ in range(20)]
        replies = await asyncio.gather(*(_post(http, f"{server.http}/api/webhooks/telnyx", b, h)
                                         for b, h in hangups))
        assert {s for s, _ in replies} == {200}
        assert sum(orjson.loads(r)["data"]["applied"] for _, r in replies) == 1
        await watched.finish()
    rows = await admin_db.fetch("SELECT action FROM audit_logs WHERE resource_type = 'call' AND resource_id = $1 "
                                "AND actor_type = 'provider' ORDER BY created_at", ccid)
    assert [r["action"] for r in rows] == ["call.active", "call.completed"]
    assert await admin_db.fetchval("SELECT status FROM calls WHERE id = $1", cid) == "completed"


async def test_one_signed_stripe_invoice_paid_delivered_20_times_at_once_makes_one_payment(
        server: Server, http: aiohttp.ClientSession, admin_db: asyncpg.Connection, world: World) -> None:
    b = world.b
    customer, sub_id = f"cus_{uuid.uuid4().hex[:10]}", f"sub_{uuid.uuid4().hex[:10]}"
    async with admin_db.transaction():
        await admin_db.execute("SELECT set_config('app.org_id', $1, true)", str(b.org_id))
        await admin_db.execute("INSERT INTO subscriptions (org_id, stripe_customer_id, stripe_subscription_id, "
                               "plan, status) VALUES ($1, $2, $3, 'pro', 'active')", b.org_id, customer, sub_id)
    invoice = f"in_{uuid.uuid4().hex[:10]}"
    paid = event("invoice.paid", {"id": invoice, "object": "invoice", "customer": customer, "subscription": sub_id,
                                  "amount_paid": 4900, "currency": "usd", "payment_intent": f"pi_{invoice}"})
    body, sig = signed_delivery(STRIPE_SECRET, paid)
    async with Watched(server, "stripe-replays") as watched:
        replies = await asyncio.gather(*(_post(http, f"{server.http}/api/webhooks/stripe", body,
                                               {"Stripe-Signature": sig}) for _ in range(20)))
        assert {s for s, _ in replies} == {200}
        data = [orjson.loads(r)["data"] for _, r in replies]
        assert sum(d["applied"] for d in data) == 1 and sum(d["duplicate"] for d in data) == 19
        # The same invoice under other event ids (Stripe's own retries keep the id; a resend does not).
        again = [signed_delivery(STRIPE_SECRET, {**paid, "id": f"evt_{uuid.uuid4().hex[:16]}"}) for _ in range(20)]
        replies = await asyncio.gather(*(_post(http, f"{server.http}/api/webhooks/stripe", bb,
                                               {"Stripe-Signature": s}) for bb, s in again))
        assert {s for s, _ in replies} == {200}
        await watched.finish()
    assert await _count(admin_db, "SELECT count(*) FROM payments WHERE stripe_invoice_id = $1", invoice) == 1
    assert await _count(admin_db, "SELECT count(*) FROM audit_logs WHERE action = 'billing.invoice_paid' "
                        "AND resource_id = $1", invoice) == 1
    assert await _count(admin_db, "SELECT count(*) FROM webhook_events WHERE provider = 'stripe' AND event_id = $1",
                        paid["id"]) == 1


# -- 3. placing calls as an attacker -------------------------------------------------------------------


async def test_placing_calls_without_the_right_or_with_hostile_bodies_never_reaches_telnyx(
        server: Server, http: aiohttp.ClientSession, world: World) -> None:
    a, b = world.a, world.b
    url = "/api/voice/call"
    async with _fake(server) as fake, Watched(server, "place-hostile") as watched:
        for token in (a.sessions[Role.VIEWER], a.keys[Role.VIEWER]):
            status, reply = await call(http, server, "POST", url, token, {"to": "+15551230003", "from": CALLER})
            assert (status, reply["error"]["code"]) == (403, "forbidden")
        # Another tenant's account and an unknown one: the same bytes.
        answers = []
        for account in (b.account_id, uuid.uuid4()):
            async with http.post(server.http + url, json={"account_id": str(account), "from": CALLER},
                                 headers=bearer(a.keys[Role.ADMIN])) as r:
                answers.append((r.status, await r.read()))
        assert answers[0] == answers[1] and answers[0][0] == 404, answers
        admin = a.keys[Role.ADMIN]
        bad_bodies: list[Any] = [
            {"to": "15551234567"}, {"to": "+1"}, {"to": "+1555123456789012"}, {"to": "+1555 123 4567"},
            {"to": "+15551234567\n"}, {"to": "+15551234567", "from": "anonymous"}, {"to": "+1555١٢٣٤٥٦٧"},
            {"to": "'; DROP TABLE calls; --"}, {"to": "+15551234567' OR '1'='1"},
            {"account_id": "1 OR 1=1"}, {"account_id": "../../etc/passwd"}, {"to": ["+15551234567"]},
            {"to": "+15551234567", "account_id": str(a.account_id)}, {},
            {"to": "+15551234567", "org_id": str(b.org_id)}, {"to": "+15551234567", "connection_id": "theirs"},
            {"to": "+15551234567", "stream_url": "wss://evil.example/"}, {"to": "+15551234567", "language": "x" * 100},
            {"to": "+15551234567", "translate": "yes"}, {"to": "+15551234567", "translate": True},
            {"to": "+15551234567\u0000"}, {"to": 15551234567},
        ]
        for body in bad_bodies:
            status, reply = await call(http, server, "POST", url, admin, body)
            assert (status, reply["error"]["code"]) in ((400, "validation_failed"), (400, "bad_request")), (body,
                                                                                                           reply)
        for raw in (b"[]", b'"+15551234567"', b"{", b'{"to": "+15551234567", "to": "+15551234568"}'[:10]):
            async with http.post(server.http + url, data=raw,
                                 headers={**bearer(admin), "Content-Type": "application/json"}) as r:
                assert r.status == 400, raw
        huge = orjson.dumps({"to": "+15551234567", "from": CALLER, "pad": "x" * 100_000})
        async with http.post(server.http + url, data=huge,
                             headers={**bearer(admin), "Content-Type": "application/json"}) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (413, "payload_too_large")
        assert fake.requests == []  # not one of them reached the provider
        await watched.finish()


async def test_a_burst_of_placements_from_one_agent_is_rate_limited_and_another_agent_still_places_calls(
        server: Server, http: aiohttp.ClientSession, world: World) -> None:
    a = world.a
    agent = a.sessions[Role.AGENT]
    status, reply = await call(http, server, "POST", "/api/api-keys", a.sessions[Role.OWNER],
                               {"name": "dialer agent", "role": "agent"})
    assert status == 201, reply
    other_agent = reply["data"]["key"]
    async with _fake(server) as fake, Watched(server, "place-burst") as watched:
        body = {"to": "+15551230004", "from": CALLER}
        replies = await asyncio.gather(*(call(http, server, "POST", "/api/voice/call", agent, body)
                                         for _ in range(PLACE_PER_MIN + 10)))
        statuses = [s for s, _ in replies]
        assert statuses.count(201) == PLACE_PER_MIN and statuses.count(429) == 10, statuses
        limited = next(r for s, r in replies if s == 429)
        assert limited["error"]["code"] == "rate_limited"
        assert len([p for p, _ in fake.requests if p == "/v2/calls"]) == PLACE_PER_MIN
        status, reply = await call(http, server, "POST", "/api/voice/call", other_agent, body)
        assert status == 201, reply
        await watched.finish()


# -- 4. hanging up what is not yours ------------------------------------------------------------------


async def test_hanging_up_another_tenants_call_a_pending_id_or_a_malformed_id_answers_as_an_unknown_call(
        server: Server, http: aiohttp.ClientSession, world: World, admin_db: asyncpg.Connection) -> None:
    a, b = world.a, world.b
    async with _fake(server) as fake, Watched(server, "hangup") as watched:
        status, reply = await call(http, server, "POST", "/api/voice/call", a.sessions[Role.OWNER],
                                   {"to": "+15551230005", "from": CALLER})
        assert status == 201, reply
        cid, ccid = reply["data"]["id"], reply["data"]["call_id"]
        ids = [ccid, world.a.call_id, f"pending-{cid}", f"pending-{uuid.uuid4()}", "v3:unknown", "../../etc/passwd",
               "v3:x\r\nX-Injected: 1", "x" * 129, "", "v3:\u202e", "v3:😀"]
        answers = []
        for call_id in ids:
            async with http.post(f"{server.http}/api/voice/hangup", json={"call_id": call_id},
                                 headers=bearer(b.sessions[Role.OWNER])) as r:
                answers.append((r.status, await r.read()))
        assert all(ans == answers[0] for ans in answers), list(zip(ids, answers, strict=True))
        assert answers[0][0] == 404 and orjson.loads(answers[0][1])["error"]["code"] == "not_found"
        # A NUL is refused in any body before a handler sees it (api.rest: PostgreSQL text cannot hold one).
        status, reply = await call(http, server, "POST", "/api/voice/hangup", b.sessions[Role.OWNER],
                                   {"call_id": "v3:x\u0000"})
        assert (status, reply["error"]["code"]) == (400, "validation_failed")
        # A's own pending id is unknown to A too (it is not a call id anyone was given).
        async with admin_db.transaction():
            await admin_db.execute("UPDATE calls SET call_control_id = $2 WHERE id = $1", uuid.UUID(cid),
                                   f"pending-{cid}")
        async with http.post(f"{server.http}/api/voice/hangup", json={"call_id": f"pending-{cid}"},
                             headers=bearer(a.sessions[Role.OWNER])) as r:
            assert (r.status, await r.read()) == answers[0]
        assert [p for p, _ in fake.requests if "hangup" in p] == []
        await watched.finish()


# -- 5. hostile CSV imports ---------------------------------------------------------------------------

HEADER = b"external_ref,debtor_name,phones,balance,currency,status,consent,do_not_call\n"


async def _upload(server: Server, token: str, data: bytes, chunk: int = 64 << 10) -> tuple[int, dict[str, Any]]:
    """Upload ``data`` as a CSV import, from a client on a loop of its own (``_off_loop``)."""
    async def upload() -> tuple[int, dict[str, Any]]:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(data), chunk):
                yield data[i:i + chunk]

        async with aiohttp.ClientSession() as http, \
                http.post(f"{server.http}/api/accounts/import", data=chunks(),
                          headers={**bearer(token), "Content-Type": "text/csv"},
                          timeout=aiohttp.ClientTimeout(total=300)) as r:
            return r.status, await r.json()
    return await _off_loop(upload())


async def test_hostile_csv_imports_are_bounded_reported_per_row_and_never_a_500(
        server: Server, http: aiohttp.ClientSession, world: World, admin_db: asyncpg.Connection) -> None:
    admin = world.a.keys[Role.ADMIN]
    good = b"RT-GOOD-1,Good Debtor,+15550009999,10.00,USD,open,yes,no\n"
    rss = Rss(server)
    async with Watched(server, "csv-abuse") as watched:
        # One line of 10 MiB between two good rows: skipped unread, reported, the rest imported.
        status, reply = await _upload(server, admin, HEADER + b"A" * (10 << 20) + b"\n" + good)
        assert status == 200, reply
        job = reply["data"]
        assert (job["status"], job["rows_total"], job["rows_ok"], job["rows_failed"]) == ("done", 2, 1, 1)
        assert job["errors"] == [{"line": 2, "reason": "the line is longer than 4096 bytes"}]
        # The same line as the header: the file is refused, no job.
        status, reply = await _upload(server, admin, b"B" * (10 << 20))
        assert (status, reply["error"]["code"]) == (400, "validation_failed")

        # Binary garbage: as the header, refused; after a good header, one error per line, no 500.
        garbage = os.urandom(2 << 20)
        status, reply = await _upload(server, admin, garbage)
        assert (status, reply["error"]["code"]) == (400, "validation_failed")
        status, reply = await _upload(server, admin, HEADER + garbage + b"\n" + good)
        assert status == 200, reply
        job = reply["data"]
        assert job["status"] == "done" and job["rows_ok"] == 1 and job["rows_failed"] == job["rows_total"] - 1
        assert len(job["errors"]) <= 1000 and job["errors_truncated"] == (job["rows_failed"] > 1000)

        # Formula-injection cells: stored as the text they are (the API is JSON, nothing evaluates them),
        # refused where the field's rule refuses them, and no reason echoes the cell.
        formulas = (HEADER
                    + b'RT-F1,"=cmd|\' /C calc\'!A0",+15550001111,1.00,USD,open,,\n'
                    + b"RT-F2,@SUM(1+1)*cmd|' /C calc'!A0,,1.00,USD,,,\n"
                    + b"RT-F3,Plain Name,=1+2,1.00,USD,,,\n"  # phones
                    + b"RT-F4,Plain Name,,=HYPERLINK(\"http://evil\"),USD,,,\n"  # balance
                    + b"=cmd|' /C calc'!A0,Plain Name,,1.00,USD,,,\n"  # external_ref with spaces
                    + b"RT-SQL,\"Robert'); DROP TABLE collection_accounts;--\",,1.00,USD,,,\n"
                    + b"RT-SQL2' OR '1'='1,Name,,1.00,USD,,,\n")  # a ref with spaces: refused
        status, reply = await _upload(server, admin, formulas)
        assert status == 200, reply
        job = reply["data"]
        assert (job["rows_ok"], job["rows_failed"]) == (3, 4), job
        assert not [e for e in job["errors"] if "cmd" in e["reason"] or "HYPERLINK" in e["reason"]]
        status, page = await call(http, server, "GET", "/api/accounts?q=RT-F1", admin)
        assert page["data"]["items"][0]["debtor_name"] == "=cmd|' /C calc'!A0"
        status, page = await call(http, server, "GET", "/api/accounts?q=RT-SQL", admin)
        assert [i["debtor_name"] for i in page["data"]["items"]] == ["Robert'); DROP TABLE collection_accounts;--"]

        # A zip-bomb-like file at the size cap: 50 MiB (less one byte) of the same tiny blank record.
        cap = (50 << 20) - 1
        bomb = HEADER + b"\n" * (cap - len(HEADER))
        t0 = time.monotonic()
        status, reply = await _upload(server, admin, bomb, chunk=1 << 20)
        took = time.monotonic() - t0
        print(f"\n50 MiB of blank lines imported in {took:.1f} s")
        assert status == 200 and reply["data"]["rows_total"] == 0, reply
        # And one row repeated: one upsert, a bounded report.
        repeated = HEADER + b"RT-REP,R,,1,USD,,,\n" * 200_000
        t0 = time.monotonic()
        status, reply = await _upload(server, admin, repeated)
        print(f"{len(repeated) / 2**20:.1f} MiB of one repeated row imported in {time.monotonic() - t0:.1f} s")
        assert status == 200 and reply["data"]["rows_ok"] == 200_000, reply
        assert reply["data"]["rows_inserted"] + reply["data"]["rows_updated"] <= 1
        # Over the cap: 413 from the import, the job failed (not left running).
        status, reply = await _upload(server, admin, bomb + b"\n\n", chunk=1 << 20)
        assert (status, reply["error"]["code"]) == (413, "payload_too_large")
        assert reply["error"]["details"]["import"]["status"] == "failed"
        await watched.finish()
    print(f"server RSS growth over the imports: {rss.growth_mib():.1f} MiB")
    assert rss.growth_mib() < 64
    assert await _count(admin_db, "SELECT count(*) FROM import_jobs WHERE status = 'running'") == 0
    assert not [line for line in server.logs() if line.get("level") == "error"]


class Rss:
    """The server process's resident memory, now and at its peak (VmHWM) since this was made."""

    def __init__(self, server: Server) -> None:
        self.pid = server.proc.pid
        self.start = self._kib("VmRSS")
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS now
        except OSError:
            pass

    def _kib(self, field: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    def growth_mib(self) -> float:
        return (max(self._kib("VmHWM"), self._kib("VmRSS")) - self.start) / 1024
