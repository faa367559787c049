"""Flow 3 on the real server with storage on, against the fake Stripe and the fake Resend: subscribe,
signed webhooks applied once (invoice.paid, invoice.payment_failed -> past_due and one dunning e-mail,
subscription updates), a call's minutes counted and reported to Stripe once even when its end is seen
twice and the first report fails, and the good-standing check a new call will use."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import aiohttp
import orjson
import pytest

from api.auth import Role
from api.billing import billing_in_good_standing
from api.stripe_signature import sign
from storage.db import Database
from storage.records import CallEnded, CallStarted
from tests.api.rest_world import World, build_world, call, sign_in_all, world_server
from tests.fakes.stripe import FakeResend, FakeStripe, event, signed_delivery
from tests.servers import Server, free_port

SECRET = "whsec_flow3"
PLANS = {"pro": {"price_id": "price_pro", "metered_price_id": "price_minutes", "included_minutes": 1000},
         "basic": {"price_id": "price_basic", "included_minutes": 100}}


@pytest.fixture(scope="module")
def world(pg_admin_url: str, redis_url: str) -> World:
    return asyncio.run(build_world(pg_admin_url, redis_url, 7))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Server]:
    stripe_port, resend_port = free_port(), free_port()
    with world_server(tmp_path_factory.mktemp("billing"), world, STRIPE_API_KEY="sk_test_fake",
                      STRIPE_WEBHOOK_SECRET=SECRET, RESEND_API_KEY="re_test_fake",
                      SWITCHBOARD_STRIPE_API_URL=f"http://127.0.0.1:{stripe_port}",
                      SWITCHBOARD_RESEND_API_URL=f"http://127.0.0.1:{resend_port}",
                      SWITCHBOARD_BILLING_PLANS=orjson.dumps(PLANS).decode(),
                      SWITCHBOARD_BILLING_OUTBOX_INTERVAL_S="0.2") as srv:
        asyncio.run(sign_in_all(srv, world))
        srv.extra["ports"] = (stripe_port, resend_port)
        yield srv


async def _deliver(http: aiohttp.ClientSession, server: Server, body: bytes, signature: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    async with http.post(f"{server.http}/api/webhooks/stripe", data=body, headers=headers) as r:
        return r.status, await r.json()


async def _until(predicate: Callable[[], bool], within_s: float = 20.0) -> None:
    async with asyncio.timeout(within_s):
        while not predicate():  # noqa: ASYNC110 - polls a fake, as the outbox worker polls its table
            await asyncio.sleep(0.1)


async def test_flow_3_subscribe_pay_fail_dun_and_report_minutes_once(server: Server, world: World) -> None:
    a, b = world.a, world.b
    stripe_port, resend_port = server.extra["ports"]
    db = Database(world.db.app, min_size=1, max_size=2)
    await db.open()
    try:
        async with FakeStripe(stripe_port) as stripe, FakeResend(resend_port) as resend, \
                aiohttp.ClientSession() as http:
            assert isinstance(stripe, FakeStripe) and isinstance(resend, FakeResend)
            # Without a valid signature nothing is read: missing, wrong secret, one byte changed, 301 s old.
            ev = event("invoice.paid", {"id": "in_x", "customer": "cus_nobody"})
            body, sig = signed_delivery(SECRET, ev)
            for bad_body, bad_sig in ((body, None), (body, signed_delivery("whsec_other", ev)[1]),
                                      (body + b" ", sig), (body, signed_delivery(SECRET, ev, time.time() - 301)[1])):
                status, reply = await _deliver(http, server, bad_body, bad_sig)
                assert (status, reply["error"]["code"]) == (401, "unauthenticated")
            status, reply = await _deliver(http, server, b"[1]", sign(SECRET, b"[1]", int(time.time())))
            assert (status, reply["error"]["code"]) == (400, "bad_request")

            # Subscribe: a viewer may not; the owner makes one customer and one subscription, keyed.
            status, _ = await call(http, server, "POST", "/api/billing/subscribe", a.sessions[Role.VIEWER],
                                   {"plan": "pro"})
            assert status == 403
            status, reply = await call(http, server, "POST", "/api/billing/subscribe", a.sessions[Role.OWNER],
                                       {"plan": "gold"})
            assert (status, reply["error"]["code"]) == (400, "validation_failed")
            status, reply = await call(http, server, "POST", "/api/billing/subscribe", a.sessions[Role.OWNER],
                                       {"plan": "pro"})
            assert status == 201, reply
            assert reply["data"]["plan"] == "pro" and reply["data"]["status"] == "active"
            assert reply["data"]["usage"]["included_minutes"] == 1000
            assert len(stripe.customers) == 1 and len(stripe.subscriptions) == 1
            assert all(k and k.startswith("sb-") for k in stripe.keys)
            (sub_id, sub), = stripe.subscriptions.items()
            assert stripe.prices(sub_id) == ["price_pro", "price_minutes"]
            customer = sub["customer"]
            # The same plan again changes nothing; another plan moves the subscription, once.
            sent = len(stripe.requests)
            status, reply = await call(http, server, "POST", "/api/billing/subscribe", a.sessions[Role.ADMIN],
                                       {"plan": "pro"})
            assert status == 200 and reply["data"]["plan"] == "pro" and len(stripe.requests) == sent
            for _ in range(2):
                status, reply = await call(http, server, "POST", "/api/billing/subscribe", a.sessions[Role.ADMIN],
                                           {"plan": "basic"}, headers={"Idempotency-Key": "plan-basic-1"})
                assert status == 200 and reply["data"]["plan"] == "basic", reply
                assert reply["data"]["usage"]["included_minutes"] == PLANS["basic"]["included_minutes"]
            assert stripe.prices(sub_id) == ["price_basic"] and sub["updates"] == 1  # metered item deleted
            status, reply = await call(http, server, "POST", "/api/billing/subscribe", a.sessions[Role.OWNER],
                                       {"plan": "pro"})
            assert status == 200 and stripe.prices(sub_id) == ["price_pro", "price_minutes"]
            assert sub["updates"] == 2 and len(stripe.subscriptions) == 1
            status, reply = await call(http, server, "GET", "/api/billing", a.keys[Role.ADMIN])
            assert status == 200 and reply["data"]["plan"] == "pro" and reply["data"]["in_good_standing"]

            # invoice.paid: one payment, applied once however often it is delivered.
            paid = event("invoice.paid", {"id": "in_1", "object": "invoice", "customer": customer,
                                          "subscription": sub_id, "amount_paid": 4900, "currency": "usd",
                                          "payment_intent": "pi_1"})
            body, sig = signed_delivery(SECRET, paid)
            assert (await _deliver(http, server, body, sig)) == (200, {"success": True, "data": {
                "received": True, "applied": True, "duplicate": False}})
            status, reply = await _deliver(http, server, body, sig)
            assert status == 200 and reply["data"]["duplicate"] is True

            # invoice.payment_failed: past_due, one e-mail to the owner (a replay sends no second one).
            failed = event("invoice.payment_failed", {"id": "in_2", "object": "invoice", "customer": customer,
                                                      "subscription": sub_id})
            body, sig = signed_delivery(SECRET, failed)
            resend.fail_next(1, 500)  # the first send fails: the outbox retries it
            for _ in range(2):
                assert (await _deliver(http, server, body, sig))[0] == 200
            await _until(lambda: len(resend.emails) == 1)
            status, reply = await call(http, server, "POST", "/api/billing/subscribe", a.sessions[Role.OWNER],
                                       {"plan": "basic"})
            assert (status, reply["error"]["code"]) == (402, "payment_required")  # pay first
            (mail,) = resend.emails.values()
            assert mail["to"] == [a.emails[Role.OWNER]]
            assert not await billing_in_good_standing(db, a.org_id)
            assert await billing_in_good_standing(db, b.org_id)
            status, reply = await call(http, server, "GET", "/api/billing", a.sessions[Role.OWNER])
            assert reply["data"]["status"] == "past_due" and reply["data"]["in_good_standing"] is False

            # An unknown type and an unknown customer: 200, nothing changes.
            for ev in (event("charge.refunded", {"id": "ch_1", "customer": customer}),
                       event("invoice.paid", {"id": "in_9", "customer": "cus_unknown", "amount_paid": 1})):
                status, reply = await _deliver(http, server, *signed_delivery(SECRET, ev))
                assert status == 200 and reply["data"]["applied"] is False

            # A call ends (twice): its 3 minutes are counted once and reported once, after a failed report.
            call_id = f"v3:bill-{uuid.uuid4().hex[:8]}"
            started = datetime.now(UTC) - timedelta(seconds=125)
            stripe.fail_next(1, 503)
            async with db.tenant(a.org_id) as conn:
                await CallStarted(a.org_id, uuid.uuid4(), call_id, None, None, None, None, "PCMU", 8000,
                                  started).apply(conn)
            for _ in range(2):
                async with db.tenant(a.org_id) as conn:
                    await CallEnded(a.org_id, call_id, "completed", "hangup", datetime.now(UTC)).apply(conn)
            await _until(lambda: len(stripe.meter_events) == 1, within_s=30)
            (ident, meter), = stripe.meter_events.items()
            assert meter["payload[value]"] == "3" and meter["payload[stripe_customer_id]"] == customer
            assert meter["event_name"] == "call_minutes" and ident.startswith("call-minutes-")
            assert sum(1 for p, _, _ in stripe.requests if p == "/v1/billing/meter_events") == 2  # 503, then ok
            status, reply = await call(http, server, "GET", "/api/billing", a.sessions[Role.OWNER])
            assert reply["data"]["usage"]["minutes"] == 3

            # The subscription recovers, then is deleted: the state follows.
            for etype, st in (("customer.subscription.updated", "active"),
                              ("customer.subscription.deleted", "canceled")):
                ev = event(etype, {"id": sub_id, "object": "subscription", "customer": customer, "status": st})
                assert (await _deliver(http, server, *signed_delivery(SECRET, ev)))[0] == 200
                status, reply = await call(http, server, "GET", "/api/billing", a.sessions[Role.OWNER])
                assert reply["data"]["status"] == st
            assert reply["data"]["plan"] == "free" and reply["data"]["in_good_standing"]
            await asyncio.sleep(0.5)
            assert len(resend.emails) == 1 and len(stripe.meter_events) == 1

        async with db.tenant(a.org_id) as conn:
            assert await conn.fetchval("SELECT count(*) FROM payments") == 1
            actions = [r["action"] for r in await conn.fetch(
                "SELECT action FROM audit_logs WHERE action LIKE 'billing.%' ORDER BY created_at")]
        assert actions == ["billing.subscribed", "billing.plan_changed", "billing.plan_changed",
                           "billing.invoice_paid", "billing.payment_failed",
                           "billing.subscription_updated", "billing.subscription_canceled"]
    finally:
        await db.aclose()
