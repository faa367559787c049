"""Billing with Stripe: the outbound clients, the webhook's event handlers, the outbox worker, and the
good-standing check that placing a call will use.

Exactly once, end to end:

* a webhook event is applied once: its id goes into ``webhook_events`` in the transaction of its effect
  (a replay finds it there and changes nothing; a failure rolls both back and Stripe retries);
* what must leave for Stripe (meter events) or Resend (dunning e-mails) is a ``billing_outbox`` row
  written in the transaction that decided it; ``Outbox`` sends due rows with the row's key as the
  provider's ``Idempotency-Key`` (and a meter event's ``identifier``), marks them sent, and on failure
  backs off (``OUTBOX_BACKOFF_S`` doubling up to an hour) and tries again: never lost, never doubled;
* every Stripe POST carries an ``Idempotency-Key`` derived from what it is for (the organisation, and
  how many subscriptions it had), so a subscribe retried after a lost answer makes nothing twice.

Why not the official ``stripe`` package: it is not a dependency of this project, and its async client
brings its own HTTP stack (httpx) beside aiohttp; the three calls needed here are a small form-encoded
aiohttp client (``StripeClient``) with a configurable base URL, which the tests point at a fake.

Errors: ``ProviderError`` (any non-2xx answer, a timeout, a connection failure) from both clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import orjson

from api.settings import Settings
from storage.db import Database
from storage.records import AuditEntry

log = logging.getLogger("switchboard.billing")

HTTP_TIMEOUT_S = 10.0
OUTBOX_BATCH = 20
OUTBOX_BACKOFF_S = 5.0
OUTBOX_BACKOFF_MAX_S = 3600.0
# Subscription statuses that stop new calls (billing_in_good_standing).
NOT_IN_GOOD_STANDING = frozenset({"past_due", "unpaid"})
STATUSES = frozenset({"incomplete", "incomplete_expired", "trialing", "active", "past_due", "canceled", "unpaid",
                      "paused"})
HANDLED = frozenset({"invoice.paid", "invoice.payment_failed", "customer.subscription.created",
                     "customer.subscription.updated", "customer.subscription.deleted"})


class ProviderError(Exception):
    """Stripe or Resend did not accept a request (status, or 0 for no answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def _form(data: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in data.items() if v is not None}


class StripeClient:
    """``POST`` form-encoded requests to Stripe's API with a Bearer key and an Idempotency-Key."""

    def __init__(self, base_url: str, api_key: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = api_key
        self._session = session

    async def post(self, path: str, data: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        return await self._request("POST", path, data, {"Idempotency-Key": idempotency_key})

    async def get(self, path: str) -> dict[str, Any]:
        return await self._request("GET", path, None, {})

    async def _request(self, method: str, path: str, data: dict[str, Any] | None,
                       headers: dict[str, str]) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self._key}", **headers}
        try:
            async with self._session.request(method, self.base_url + path, headers=headers,
                                             data=_form(data) if data is not None else None,
                                             timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)) as r:
                body = await r.read()
                if r.status >= 300:
                    raise ProviderError(r.status, body[:200].decode(errors="replace"))
                out = orjson.loads(body)
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            raise ProviderError(0, type(exc).__name__) from None
        if not isinstance(out, dict):
            raise ProviderError(0, "not a JSON object")
        return out


class ResendClient:
    """``POST /emails`` of a Resend-compatible API."""

    def __init__(self, base_url: str, api_key: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = api_key
        self._session = session

    async def send(self, message: dict[str, Any], idempotency_key: str) -> None:
        headers = {"Authorization": f"Bearer {self._key}", "Idempotency-Key": idempotency_key}
        try:
            async with self._session.post(self.base_url + "/emails", json=message, headers=headers,
                                          timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)) as r:
                if r.status >= 300:
                    raise ProviderError(r.status, (await r.read())[:200].decode(errors="replace"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderError(0, type(exc).__name__) from None


@dataclass(slots=True)
class BillingCounters:
    events_applied: int = 0
    events_duplicate: int = 0
    events_ignored: int = 0  # unknown types, or a customer no organisation has
    outbox_sent: int = 0
    outbox_failed: int = 0
    ignored_types: dict[str, int] = field(default_factory=dict)


class Billing:
    """The node's billing service: clients, the webhook's handlers, the outbox worker.  ``start`` on the
    running loop, ``aclose`` at shutdown."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.counters = BillingCounters()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def stripe(self) -> StripeClient | None:
        key = self.settings.stripe_api_key
        return StripeClient(self.settings.stripe_api_url, key.get_secret_value(), self.session) if key else None

    def resend(self) -> ResendClient | None:
        key = self.settings.resend_api_key
        return ResendClient(self.settings.resend_api_url, key.get_secret_value(), self.session) if key else None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="billing-outbox")

    def wake(self) -> None:
        self._wake.set()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # -- the outbox -------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.billing_outbox_interval_s)
            self._wake.clear()
            try:
                while await self.drain_once() == OUTBOX_BATCH:
                    pass
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                log.warning("billing.outbox_unavailable", extra={"error": type(exc).__name__})

    async def drain_once(self) -> int:
        """Send the due rows (at most ``OUTBOX_BATCH``), each row locked while it is sent so that two
        nodes never send it at once; returns how many were tried."""
        async with self.db.no_tenant() as conn:
            rows = await conn.fetch(
                "SELECT id, kind, idempotency_key, payload, attempts FROM billing_outbox "
                "WHERE sent_at IS NULL AND next_attempt_at <= now() ORDER BY next_attempt_at LIMIT $1 "
                "FOR UPDATE SKIP LOCKED", OUTBOX_BATCH)
            for row in rows:
                try:
                    await self._send(row["kind"], row["idempotency_key"], row["payload"])
                except ProviderError as exc:
                    self.counters.outbox_failed += 1
                    delay = min(OUTBOX_BACKOFF_S * 2 ** row["attempts"], OUTBOX_BACKOFF_MAX_S)
                    await conn.execute(
                        "UPDATE billing_outbox SET attempts = attempts + 1, last_error = $2, "
                        "next_attempt_at = now() + make_interval(secs => $3) WHERE id = $1",
                        row["id"], str(exc)[:500], delay)
                    log.warning("billing.outbox_send_failed", extra={"kind": row["kind"], "error": str(exc)[:200],
                                                                     "retry_in_s": delay})
                else:
                    self.counters.outbox_sent += 1
                    await conn.execute("UPDATE billing_outbox SET sent_at = now(), attempts = attempts + 1 "
                                       "WHERE id = $1", row["id"])
        return len(rows)

    async def _send(self, kind: str, key: str, payload: dict[str, Any]) -> None:
        if kind == "meter_event":
            stripe = self.stripe()
            if stripe is None:
                raise ProviderError(0, "STRIPE_API_KEY is not set")
            await stripe.post("/v1/billing/meter_events", {
                "event_name": payload["event_name"], "identifier": key,
                "payload[stripe_customer_id]": payload["stripe_customer_id"], "payload[value]": payload["value"],
                "timestamp": payload["timestamp"]}, idempotency_key=key)
        else:
            resend = self.resend()
            if resend is None:
                raise ProviderError(0, "RESEND_API_KEY is not set")
            await resend.send({**payload, "from": self.settings.billing_email_from}, idempotency_key=key)

    # -- webhook events ---------------------------------------------------------------------------

    async def apply_event(self, event: dict[str, Any]) -> dict[str, Any]:
        """Apply one verified Stripe event once.  Returns what happened (the webhook's answer)."""
        event_id, etype = event["id"], event["type"]
        obj = event["data"]["object"]
        customer = obj.get("customer") if etype.startswith(("invoice.", "customer.subscription.")) else None
        org: uuid.UUID | None = None
        if etype in HANDLED and isinstance(customer, str):
            async with self.db.no_tenant() as conn:
                org = await conn.fetchval("SELECT billing_customer_org($1)", customer)
        if org is None:
            async with self.db.no_tenant() as conn:
                fresh = await _record_event(conn, event_id)
            if fresh:
                self.counters.events_ignored += 1
                self.counters.ignored_types[etype[:60]] = self.counters.ignored_types.get(etype[:60], 0) + 1
                log.info("billing.event_ignored", extra={"event_type": etype[:60], "event_id": event_id[:80]})
            return {"received": True, "applied": False, "duplicate": not fresh}
        emailed = False
        async with self.db.tenant(org) as conn:
            if not await _record_event(conn, event_id):
                self.counters.events_duplicate += 1
                return {"received": True, "applied": False, "duplicate": True}
            emailed = await _HANDLERS[etype](conn, org, event_id, obj)
        self.counters.events_applied += 1
        if emailed:
            self.wake()
        return {"received": True, "applied": True, "duplicate": False}


async def _record_event(conn: asyncpg.Connection, event_id: str) -> bool:
    return bool(await conn.fetchval(
        "INSERT INTO webhook_events (provider, event_id) VALUES ('stripe', $1) ON CONFLICT DO NOTHING RETURNING 1",
        event_id))


def _audit(org: uuid.UUID, action: str, resource_id: str | None, old: dict[str, Any] | None,
           new: dict[str, Any] | None) -> AuditEntry:
    return AuditEntry(org, action, "subscription", resource_id, actor_type="provider", actor_id="stripe",
                      old_value=old, new_value=new)


async def _subscription(conn: asyncpg.Connection, obj: dict[str, Any], sub_key: str) -> asyncpg.Record | None:
    """The subscription an invoice (``sub_key="subscription"``) or a subscription (``"id"``) names, else the
    organisation's latest."""
    sub_id = obj.get(sub_key)
    if isinstance(sub_id, str):
        row = await conn.fetchrow("SELECT id, status, plan, stripe_subscription_id FROM subscriptions "
                                  "WHERE stripe_subscription_id = $1", sub_id)
        if row is not None:
            return row
    return await conn.fetchrow("SELECT id, status, plan, stripe_subscription_id FROM subscriptions "
                               "ORDER BY created_at DESC LIMIT 1")


async def _invoice_paid(conn: asyncpg.Connection, org: uuid.UUID, event_id: str, obj: dict[str, Any]) -> bool:
    sub = await _subscription(conn, obj, "subscription")
    amount = obj.get("amount_paid")
    currency = obj.get("currency")
    invoice = obj.get("id")
    pi = obj.get("payment_intent")
    recorded = await conn.fetchval(
        "INSERT INTO payments (org_id, subscription_id, stripe_payment_intent_id, stripe_invoice_id, amount_cents, "
        "currency, status) VALUES ($1, $2, $3, $4, $5, $6, 'succeeded') ON CONFLICT DO NOTHING RETURNING 1",
        org, sub["id"] if sub else None, pi if isinstance(pi, str) else None,
        invoice if isinstance(invoice, str) else None,
        amount if isinstance(amount, int) and amount >= 0 else 0,
        currency.lower() if isinstance(currency, str) and len(currency) == 3 and currency.isalpha() else "usd")
    if sub is not None and sub["status"] in NOT_IN_GOOD_STANDING:
        await conn.execute("UPDATE subscriptions SET status = 'active', updated_at = now() WHERE id = $1", sub["id"])
    if recorded is None:  # the same invoice under another event id (a resend): paid once, audited once
        return False
    await _audit(org, "billing.invoice_paid", str(invoice)[:200],
                 {"status": sub["status"]} if sub else None,
                 {"amount_cents": amount, "currency": currency, "event_id": event_id}).apply(conn)
    return False


async def _payment_failed(conn: asyncpg.Connection, org: uuid.UUID, event_id: str, obj: dict[str, Any]) -> bool:
    sub = await _subscription(conn, obj, "subscription")
    if sub is not None:
        await conn.execute("UPDATE subscriptions SET status = 'past_due', updated_at = now() WHERE id = $1",
                           sub["id"])
    await _audit(org, "billing.payment_failed", sub["stripe_subscription_id"] if sub else None,
                 {"status": sub["status"]} if sub else None,
                 {"status": "past_due", "invoice": str(obj.get("id"))[:200], "event_id": event_id}).apply(conn)
    to = [r["email"] for r in await conn.fetch(
        "SELECT email FROM users WHERE role = 'owner' AND active AND deleted_at IS NULL ORDER BY created_at LIMIT 5")]
    if not to:
        return False
    message = {"to": to, "subject": "Your Switchboard payment failed",
               "text": "We could not take your last payment. Please update your payment method; until then "
                       "new calls cannot be placed."}
    await conn.execute(
        "INSERT INTO billing_outbox (org_id, kind, idempotency_key, payload) VALUES ($1, 'email', $2, $3) "
        "ON CONFLICT (idempotency_key) DO NOTHING", org, f"dunning-{event_id}"[:255], message)
    return True


async def _subscription_changed(conn: asyncpg.Connection, org: uuid.UUID, event_id: str,
                                obj: dict[str, Any]) -> bool:
    sub = await _subscription(conn, obj, "id")
    status = obj.get("status")
    if sub is None or status not in STATUSES:
        return False
    period_end = obj.get("current_period_end")
    end = datetime.fromtimestamp(period_end, UTC) if isinstance(period_end, int) and period_end > 0 else None
    await conn.execute("UPDATE subscriptions SET status = $2, current_period_end = coalesce($3, current_period_end), "
                       "updated_at = now() WHERE id = $1", sub["id"], status, end)
    if status == "canceled":
        await conn.execute("UPDATE organizations SET plan = 'free', updated_at = now() WHERE id = $1", org)
    if status != sub["status"]:
        await _audit(org, "billing.subscription_" + ("canceled" if status == "canceled" else "updated"),
                     sub["stripe_subscription_id"], {"status": sub["status"]},
                     {"status": status, "event_id": event_id}).apply(conn)
    return False


async def _subscription_deleted(conn: asyncpg.Connection, org: uuid.UUID, event_id: str,
                                obj: dict[str, Any]) -> bool:
    return await _subscription_changed(conn, org, event_id, {**obj, "status": "canceled"})


_HANDLERS = {"invoice.paid": _invoice_paid, "invoice.payment_failed": _payment_failed,
             "customer.subscription.created": _subscription_changed,
             "customer.subscription.updated": _subscription_changed,
             "customer.subscription.deleted": _subscription_deleted}


async def billing_in_good_standing(db: Database, org_id: uuid.UUID) -> bool:
    """May this organisation place a call?  No when its latest subscription is ``past_due`` or ``unpaid``;
    an organisation without a subscription (the free plan) may."""
    async with db.tenant(org_id) as conn:
        status = await conn.fetchval("SELECT status FROM subscriptions ORDER BY created_at DESC LIMIT 1")
    return status not in NOT_IN_GOOD_STANDING
