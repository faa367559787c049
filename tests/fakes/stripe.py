"""Protocol-faithful fakes of Stripe's API (the parts billing uses) and of a Resend-compatible e-mail API.

``FakeStripe`` on 127.0.0.1 and a given port:

* ``Authorization: Bearer <api key>`` checked first: 401 with Stripe's ``{"error": {"type", "message"}}``;
* bodies are form-encoded, as Stripe's are;
* ``Idempotency-Key`` recorded for every POST (``keys``); a second POST with the same key replays the
  first answer (Stripe's rule), so ``customers``/``subscriptions`` count what was really made;
* ``POST /v1/customers`` -> ``{"id": "cus_...", "object": "customer"}``;
* ``POST /v1/subscriptions`` (``customer``, ``items[n][price]``) -> an ``active`` subscription;
* ``POST /v1/billing/meter_events`` (``event_name``, ``identifier``, ``payload[stripe_customer_id]``,
  ``payload[value]``, ``timestamp``): kept in ``meter_events``; a second one with the same
  ``identifier`` is refused (400, as Stripe does within its 24 h window);
* ``fail_next(n, status)``: the next ``n`` requests answer ``status`` without effect.

``signed_delivery(secret, event)`` gives the body and ``Stripe-Signature`` Stripe would send.

``FakeResend``: ``POST /emails`` with Bearer auth and a JSON ``{"from", "to", "subject", "text"|"html"}``
(422 otherwise) -> ``{"id"}``; sends kept in ``emails``, one per ``Idempotency-Key``.
"""

from __future__ import annotations

import time
import uuid
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web

from api.stripe_signature import sign


def signed_delivery(secret: str, event: dict[str, Any], at: float | None = None) -> tuple[bytes, str]:
    body = orjson.dumps(event)
    return body, sign(secret, body, int(time.time() if at is None else at))


def event(etype: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"evt_{uuid.uuid4().hex[:16]}", "object": "event", "type": etype, "created": int(time.time()),
            "data": {"object": obj}}


class _Fake:
    def __init__(self, port: int, api_key: str) -> None:
        self.port = port
        self.api_key = api_key
        self.base_url = f"http://127.0.0.1:{port}"
        self._failures: list[int] = []
        self._runner: web.AppRunner | None = None
        self.requests: list[tuple[str, dict[str, str], dict[str, str]]] = []  # path, headers, form

    def fail_next(self, n: int, status: int = 500) -> None:
        self._failures.extend([status] * n)

    def app(self) -> web.Application:
        raise NotImplementedError

    async def __aenter__(self) -> _Fake:
        self._runner = web.AppRunner(self.app())
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    def _failure(self) -> int | None:
        return self._failures.pop(0) if self._failures else None


class FakeStripe(_Fake):
    def __init__(self, port: int, api_key: str = "sk_test_fake") -> None:
        super().__init__(port, api_key)
        self.customers: dict[str, dict[str, Any]] = {}
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.meter_events: dict[str, dict[str, str]] = {}
        self.keys: list[str | None] = []
        self._replies: dict[str, tuple[int, bytes]] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/{path:.+}", self._post)
        app.router.add_get("/v1/subscriptions/{sid}", self._get)
        return app

    @staticmethod
    def _item(price: str) -> dict[str, Any]:
        return {"id": f"si_{uuid.uuid4().hex[:14]}", "object": "subscription_item", "price": {"id": price}}

    def prices(self, sid: str) -> list[str]:
        return [i["price"]["id"] for i in self.subscriptions[sid]["items"]["data"]]

    def _update(self, sid: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """Stripe's subscription update: ``items[n][id]`` with ``[price]`` or ``[deleted]``, or a new
        ``items[n][price]``; an item id not on the subscription is an error."""
        sub = self.subscriptions.get(sid)
        if sub is None:
            return 404, {"error": {"type": "invalid_request_error", "message": f"No such subscription: '{sid}'"}}
        items = {i["id"]: i for i in sub["items"]["data"]}
        out = list(sub["items"]["data"])
        for n in range(20):
            iid, price = form.get(f"items[{n}][id]"), form.get(f"items[{n}][price]")
            if iid is None and price is None:
                continue
            if iid is not None and iid not in items:
                return 400, {"error": {"type": "invalid_request_error", "message": f"No such item: '{iid}'"}}
            if iid is not None and form.get(f"items[{n}][deleted]") == "true":
                out = [i for i in out if i["id"] != iid]
            elif iid is not None and price is not None:
                items[iid]["price"] = {"id": price}
            elif price is not None:
                out.append(self._item(price))
        sub["items"]["data"] = out
        if "metadata[plan]" in form:
            sub["metadata"]["plan"] = form["metadata[plan]"]
        sub["updates"] = sub.get("updates", 0) + 1
        return 200, sub

    async def _get(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Invalid API Key provided", "authentication_error")
        self.requests.append((request.path, dict(request.headers), {}))
        sid = request.match_info["sid"]
        if sid not in self.subscriptions:
            return self._error(404, f"No such subscription: '{sid}'")
        return web.json_response(self.subscriptions[sid])

    @staticmethod
    def _error(status: int, message: str, etype: str = "invalid_request_error") -> web.Response:
        return web.json_response({"error": {"type": etype, "message": message}}, status=status)

    async def _post(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Invalid API Key provided", "authentication_error")
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        key = request.headers.get("Idempotency-Key")
        self.requests.append((request.path, dict(request.headers), form))
        self.keys.append(key)
        failure = self._failure()
        if failure is not None:
            return self._error(failure, "injected failure", "api_error")
        if key is not None and key in self._replies:
            status, body = self._replies[key]
            return web.Response(status=status, body=body, content_type="application/json",
                                headers={"Idempotent-Replayed": "true"})
        status, data = self._handle(request.match_info["path"], form)
        body = orjson.dumps(data)
        if key is not None:
            self._replies[key] = (status, body)
        return web.Response(status=status, body=body, content_type="application/json")

    def _handle(self, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if path == "customers":
            cid = f"cus_{uuid.uuid4().hex[:14]}"
            self.customers[cid] = {"id": cid, "object": "customer", "name": form.get("name"),
                                   "metadata": {"org_id": form.get("metadata[org_id]")}}
            return 200, self.customers[cid]
        if path == "subscriptions":
            if form.get("customer") not in self.customers or "items[0][price]" not in form:
                return 400, {"error": {"type": "invalid_request_error", "message": "No such customer or no items"}}
            sid = f"sub_{uuid.uuid4().hex[:14]}"
            prices = [form[f"items[{i}][price]"] for i in range(20) if f"items[{i}][price]" in form]
            self.subscriptions[sid] = {
                "id": sid, "object": "subscription", "customer": form["customer"], "status": "active",
                "current_period_end": int(time.time()) + 30 * 86400, "metadata": {"plan": form.get("metadata[plan]")},
                "items": {"object": "list", "data": [self._item(p) for p in prices]}}
            return 200, self.subscriptions[sid]
        if path.startswith("subscriptions/"):
            return self._update(path.split("/", 1)[1], form)
        if path == "billing/meter_events":
            ident = form.get("identifier", "")
            missing = [f for f in ("event_name", "payload[stripe_customer_id]", "payload[value]") if not form.get(f)]
            if missing:
                return 400, {"error": {"type": "invalid_request_error", "message": f"Missing {missing}"}}
            if ident in self.meter_events:
                return 400, {"error": {"type": "invalid_request_error",
                                       "message": "An event already exists with this identifier"}}
            self.meter_events[ident or uuid.uuid4().hex] = form
            return 200, {"object": "billing.meter_event", "identifier": ident, **form}
        return 404, {"error": {"type": "invalid_request_error", "message": f"Unrecognized request URL /v1/{path}"}}


class FakeResend(_Fake):
    def __init__(self, port: int, api_key: str = "re_test_fake") -> None:
        super().__init__(port, api_key)
        self.emails: dict[str, dict[str, Any]] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/emails", self._emails)
        return app

    async def _emails(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"statusCode": 401, "name": "missing_api_key", "message": "bad key"}, status=401)
        body = await request.json()
        key = request.headers.get("Idempotency-Key") or uuid.uuid4().hex
        self.requests.append((request.path, dict(request.headers), body))
        failure = self._failure()
        if failure is not None:
            return web.json_response({"statusCode": failure, "name": "application_error"}, status=failure)
        if not (isinstance(body, dict) and body.get("from") and isinstance(body.get("to"), list) and body["to"]
                and body.get("subject") and (body.get("text") or body.get("html"))):
            return web.json_response({"statusCode": 422, "name": "validation_error"}, status=422)
        self.emails.setdefault(key, body)
        return web.json_response({"id": str(uuid.uuid5(uuid.NAMESPACE_URL, key))})
