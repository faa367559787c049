"""Billing over REST: ``POST /api/billing/subscribe``, ``GET /api/billing``, and Stripe's webhook door
``POST /api/webhooks/stripe`` (public: its credential is the ``Stripe-Signature`` header, checked by
``api.stripe_signature`` before the body is parsed; the work is ``api.billing.Billing.apply_event``).

Webhook answers: 200 ``{"received": true, "applied", "duplicate"}`` for every verified event (a replay,
an unknown type and a customer no organisation has change nothing and still answer 200, so Stripe stops
retrying); 401 ``unauthenticated`` for a missing, malformed, wrong or stale signature; 400 ``bad_request``
for a signed body that is not an event; 503 ``unavailable`` when ``STRIPE_WEBHOOK_SECRET`` is not set.
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, Field, StringConstraints

from api.billing import NOT_IN_GOOD_STANDING, ProviderError
from api.envelope import ApiError
from api.rest import Reply, Req, Route, Strict, WebhookOut, nul_fields
from api.settings import PlanConfig
from api.stripe_signature import SignatureError, verify

PlanName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")]
WEBHOOK_MAX_BODY = 256 << 10


class SubscribeIn(Strict):
    plan: PlanName = Field(description="a plan name of the server's SWITCHBOARD_BILLING_PLANS")


class UsageOut(BaseModel):
    period_start: date
    minutes: int
    included_minutes: int


class PlanOut(BaseModel):
    name: str
    included_minutes: int
    metered: bool = Field(description="minutes past the included ones are billed")


class BillingOut(BaseModel):
    plan: str
    status: str | None = Field(description="the subscription's Stripe status; null on the free plan")
    current_period_end: datetime | None
    in_good_standing: bool
    usage: UsageOut
    plans: list[PlanOut] = Field(description="the plans this server offers (SWITCHBOARD_BILLING_PLANS)")


def _billing(req: Req) -> Any:
    if req.rt.billing is None:
        raise ApiError("unavailable", "billing needs storage", headers={"Retry-After": "60"})
    return req.rt.billing


async def _state(req: Req) -> dict[str, Any]:
    assert req.rt.tiers is not None
    start = datetime.now(UTC).date().replace(day=1)
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        plan = await conn.fetchval("SELECT plan FROM organizations WHERE id = $1", req.p.org_id)
        sub = await conn.fetchrow("SELECT status, current_period_end FROM subscriptions "
                                  "ORDER BY created_at DESC LIMIT 1")
        minutes = await conn.fetchval("SELECT coalesce(sum(quantity), 0) FROM usage_stats "
                                      "WHERE metric = 'call_minutes' AND day >= $1", start)
    cfg = req.rt.settings.billing_plans.get(plan or "")
    status = sub["status"] if sub else None
    return BillingOut(plan=plan or "free", status=status,
                      current_period_end=sub["current_period_end"] if sub else None,
                      in_good_standing=status not in NOT_IN_GOOD_STANDING,
                      usage=UsageOut(period_start=start, minutes=int(minutes),
                                     included_minutes=cfg.included_minutes if cfg else 0),
                      plans=[PlanOut(name=n, included_minutes=c.included_minutes,
                                     metered=c.metered_price_id is not None)
                             for n, c in sorted(req.rt.settings.billing_plans.items())]).model_dump(mode="json")


async def get_billing(req: Req) -> Reply:
    return Reply(await _state(req))


async def subscribe(req: Req) -> Reply:
    body: SubscribeIn = req.body
    billing = _billing(req)
    plan = req.rt.settings.billing_plans.get(body.plan)
    if plan is None:
        raise ApiError("validation_failed", "no such plan",
                       [{"field": "plan", "message": f"not one of {sorted(req.rt.settings.billing_plans)}",
                         "type": "plan"}])
    stripe = billing.stripe()
    if stripe is None:
        raise ApiError("unavailable", "billing is not configured on this server (STRIPE_API_KEY)",
                       headers={"Retry-After": "60"})
    org = req.p.org_id
    assert req.rt.tiers is not None
    db = req.rt.tiers.db
    async with db.tenant(org) as conn:
        live = await conn.fetchval("SELECT count(*) FROM subscriptions "
                                   "WHERE status NOT IN ('canceled', 'incomplete_expired')")
        made = await conn.fetchval("SELECT count(*) FROM subscriptions")
        customer = await conn.fetchval("SELECT stripe_customer_id FROM subscriptions "
                                       "WHERE stripe_customer_id IS NOT NULL ORDER BY created_at DESC LIMIT 1")
        name = await conn.fetchval("SELECT name FROM organizations WHERE id = $1", org)
    if live:
        return await _change_plan(req, stripe, body.plan)
    # Keys derived from what the request is for: a retry after a lost answer (or two racing requests)
    # makes one customer and one subscription; the n-th subscription of an organisation has its own key.
    try:
        if customer is None:
            created = await stripe.post("/v1/customers", {"name": name, "metadata[org_id]": org},
                                        idempotency_key=f"sb-customer-{org}")
            customer = str(created["id"])
        items: dict[str, Any] = {"items[0][price]": plan.price_id}
        if plan.metered_price_id:
            items["items[1][price]"] = plan.metered_price_id
        sub = await stripe.post("/v1/subscriptions", {"customer": customer, **items, "metadata[org_id]": org,
                                                      "metadata[plan]": body.plan},
                                idempotency_key=f"sb-subscription-{org}-{made}")
    except (ProviderError, KeyError) as exc:
        raise ApiError("unavailable", "the payment provider did not accept the request; retry later",
                       headers={"Retry-After": "5"}) from exc
    status = sub.get("status")
    if status not in {"incomplete", "trialing", "active", "past_due"}:
        status = "incomplete"
    period_end = sub.get("current_period_end")
    end = datetime.fromtimestamp(period_end, UTC) if isinstance(period_end, int) and period_end > 0 else None
    async with db.tenant(org) as conn:
        old_plan = await conn.fetchval("SELECT plan FROM organizations WHERE id = $1", org)
        sub_row = await conn.fetchval(
            "INSERT INTO subscriptions (org_id, stripe_customer_id, stripe_subscription_id, plan, status, "
            "current_period_end) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (stripe_subscription_id) DO NOTHING "
            "RETURNING id", org, customer, str(sub["id"]), body.plan, status, end)
        if sub_row is not None:
            await conn.execute("UPDATE organizations SET plan = $2, updated_at = now() WHERE id = $1", org, body.plan)
            await req.audit("billing.subscribed", "subscription", sub["id"], {"plan": old_plan},
                            {"plan": body.plan, "status": status, "stripe_customer_id": customer}).apply(conn)
    return Reply(await _state(req), status=201)


KNOWN_STATUSES = frozenset({"incomplete", "incomplete_expired", "trialing", "active", "past_due", "canceled",
                            "unpaid", "paused"})  # subscriptions_status_form in 0006_billing.sql


def plan_items(items: list[dict[str, Any]], old: PlanConfig | None, new: PlanConfig) -> dict[str, str]:
    """The ``items[...]`` form of a plan change (Stripe's subscription update): the licensed item takes
    the new plan's price; the metered item takes the new metered price, or is deleted when the new plan
    has none; a metered price the old plan lacked is added."""
    form: dict[str, str] = {}
    metered_seen = False
    for i, item in enumerate(items):
        price = (item.get("price") or {}).get("id")
        form[f"items[{i}][id]"] = str(item["id"])
        if old is not None and old.metered_price_id is not None and price == old.metered_price_id:
            metered_seen = True
            if new.metered_price_id:
                form[f"items[{i}][price]"] = new.metered_price_id
            else:
                form[f"items[{i}][deleted]"] = "true"
        else:
            form[f"items[{i}][price]"] = new.price_id
    if new.metered_price_id and not metered_seen:
        form[f"items[{len(items)}][price]"] = new.metered_price_id
    return form


async def _change_plan(req: Req, stripe: Any, plan_name: str) -> Reply:
    """Move the live subscription to ``plan_name`` (200; the same plan: 200, nothing sent).  The
    Idempotency-Key names the subscription, its last change and the plan, so a retried request (or two
    racing) changes it once; the row moves only from the plan it was read with."""
    org = req.p.org_id
    assert req.rt.tiers is not None
    db = req.rt.tiers.db
    plans = req.rt.settings.billing_plans
    async with db.tenant(org) as conn:
        row = await conn.fetchrow("SELECT stripe_subscription_id, plan, status, updated_at FROM subscriptions "
                                  "WHERE status NOT IN ('canceled', 'incomplete_expired') "
                                  "ORDER BY created_at DESC LIMIT 1")
    assert row is not None
    if row["plan"] == plan_name:
        return Reply(await _state(req))
    if row["status"] in NOT_IN_GOOD_STANDING:
        raise ApiError("payment_required", "the subscription is past due or unpaid; pay it before changing plan")
    sid = row["stripe_subscription_id"]
    try:
        current = await stripe.get(f"/v1/subscriptions/{sid}")
        items = [i for i in (current.get("items") or {}).get("data") or [] if isinstance(i, dict) and "id" in i]
        form = plan_items(items, plans.get(row["plan"]), plans[plan_name])
        changed = await stripe.post(
            f"/v1/subscriptions/{sid}",
            {**form, "proration_behavior": "create_prorations", "metadata[plan]": plan_name},
            idempotency_key=f"sb-plan-{sid}-{row['updated_at'].timestamp():.6f}-{plan_name}")
    except (ProviderError, KeyError, TypeError) as exc:
        raise ApiError("unavailable", "the payment provider did not accept the request; retry later",
                       headers={"Retry-After": "5"}) from exc
    status = changed.get("status") if changed.get("status") in KNOWN_STATUSES else row["status"]
    async with db.tenant(org) as conn:
        moved = await conn.fetchval(
            "UPDATE subscriptions SET plan = $2, status = $3, updated_at = now() "
            "WHERE stripe_subscription_id = $1 AND plan = $4 RETURNING 1", sid, plan_name, status, row["plan"])
        if moved:
            await conn.execute("UPDATE organizations SET plan = $2, updated_at = now() WHERE id = $1", org, plan_name)
            await req.audit("billing.plan_changed", "subscription", sid, {"plan": row["plan"]},
                            {"plan": plan_name, "status": status}).apply(conn)
    return Reply(await _state(req))


async def stripe_webhook(req: Req) -> Reply:
    billing = _billing(req)
    secret = req.rt.settings.stripe_webhook_secret
    if secret is None:
        raise ApiError("unavailable", "Stripe webhooks are not configured on this server (STRIPE_WEBHOOK_SECRET)",
                       headers={"Retry-After": "60"})
    raw = await req.request.read()
    try:
        verify(req.request.headers.get("Stripe-Signature"), raw, secret.get_secret_value(), time.time(),
               req.rt.settings.stripe_webhook_tolerance_s)
    except SignatureError as exc:
        raise ApiError("unauthenticated", f"not a valid Stripe delivery: {exc}") from None
    try:
        event = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError("bad_request", "the body is not JSON") from None
    if not (isinstance(event, dict) and isinstance(event.get("id"), str) and 0 < len(event["id"]) <= 255
            and isinstance(event.get("type"), str) and isinstance(event.get("data"), dict)
            and isinstance(event["data"].get("object"), dict) and not nul_fields(event, "body")):
        raise ApiError("bad_request", "the body is not a Stripe event (id, type, data.object)")
    return Reply(await billing.apply_event(event))


ROUTES = [
    Route("GET", "/api/billing", "get_billing", "The organisation's plan, subscription status and usage", "billing",
          "action", "billing.read", get_billing, response=BillingOut),
    Route("POST", "/api/billing/subscribe", "subscribe", "Subscribe the organisation to a plan, or change plan",
          "billing", "action", "billing.write", subscribe, body=SubscribeIn, response=BillingOut, status=201,
          errors=("payment_required",), max_body=1024,
          description="Without a live subscription: creates the Stripe customer (once) and subscription, 201.  "
                      "With one: moves it to the plan (prorated), 200; the same plan changes nothing, 200.  "
                      "A past-due subscription cannot change plan (402)."),
    Route("POST", "/api/webhooks/stripe", "stripe_webhook", "Stripe's webhook (signed deliveries)", "billing",
          "public", None, stripe_webhook, response=WebhookOut, raw_body=True, max_body=WEBHOOK_MAX_BODY,
          errors=("unauthenticated", "bad_request", "payload_too_large", "unsupported_media_type"),
          description="Credential: the Stripe-Signature header (HMAC-SHA256 of `t.body` with "
                      "STRIPE_WEBHOOK_SECRET, 300 s tolerance, any of several v1 values).  Each event is applied "
                      "once; a replay, an unknown type or an unknown customer answers 200 and changes nothing."),
]

