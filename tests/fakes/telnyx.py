"""A protocol-faithful fake of Telnyx Call Control v2 (the parts calls use), on 127.0.0.1 and a port.

* ``Authorization: Bearer <api key>`` checked first: 401 with Telnyx's ``{"errors": [{"code", "title",
  "detail"}]}``; every request is recorded (``requests``);
* ``POST /v2/calls`` (``connection_id``, ``to``, ``from`` required, else 422) answers
  ``{"data": {call_control_id, call_leg_id, call_session_id, is_alive, record_type: "call"}}``; a second
  create with the same ``command_id`` answers the same call (Telnyx's idempotency).  Then, like the
  real network, it sends signed webhooks to ``webhook_url``: ``call.initiated``, and ``call.answered``
  unless ``outcome`` (set per test) names a hangup cause, in which case ``call.hangup`` with it;
* ``POST /v2/calls/{id}/actions/hangup``: 422 code 90018 when the call has ended, else 200 and a
  signed ``call.hangup`` with ``hangup_cause: normal_clearing``;
* ``stream(ccid, pcm)`` opens the call's media stream to the ``stream_url`` it was given, with its
  ``stream_auth_token`` in the upgrade header, and plays ``pcm`` (8 kHz, PCMU) in real time, then ``stop``
  (tests/telnyx_client.py speaks the media protocol);
* ``fail_next(n, status)``: the next ``n`` requests answer ``status`` without effect.

Webhooks carry the call's ``client_state`` back unchanged and are signed with the fake's own Ed25519
key (``public_key_b64`` is what the server under test is configured with).  ``deliveries`` keeps each
sent ``(body, headers, status)`` so a test can replay one.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from types import TracebackType
from typing import Any

import aiohttp
import numpy as np
import orjson
import websockets
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from api.simulator import telnyx_messages
from api.telnyx_signature import public_b64, sign
from tests.telnyx_client import connect, send_paced


def delivery(key: Ed25519PrivateKey, event_type: str, payload: dict[str, Any], at: float | None = None,
             event_id: str | None = None) -> tuple[bytes, dict[str, str]]:
    """The body and headers Telnyx would POST for one event."""
    body = orjson.dumps({"data": {"id": event_id or str(uuid.uuid4()), "event_type": event_type,
                                  "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  "payload": payload, "record_type": "event"}, "meta": {"attempt": 1}})
    return body, {**sign(key, body, int(time.time() if at is None else at)), "Content-Type": "application/json"}


class FakeTelnyx:
    def __init__(self, port: int, webhook_url: str, api_key: str = "KEY_test_fake") -> None:
        self.port = port
        self.webhook_url = webhook_url
        self.api_key = api_key
        self.key = Ed25519PrivateKey.generate()
        self.public_key_b64 = public_b64(self.key)
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.calls: dict[str, dict[str, Any]] = {}  # call_control_id -> create body + "ended"
        self.deliveries: list[tuple[bytes, dict[str, str], int]] = []
        self.outcome: str | None = None  # a hangup cause instead of answering
        self.auto = True  # send the progress webhooks by itself; False: the test sends them (``send``)
        self._by_command: dict[str, str] = {}
        self._failures: list[int] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    def fail_next(self, n: int, status: int = 500) -> None:
        self._failures.extend([status] * n)

    async def __aenter__(self) -> FakeTelnyx:
        app = web.Application()
        app.router.add_post("/v2/calls", self._create)
        app.router.add_post("/v2/calls/{ccid}/actions/hangup", self._hangup)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self._http = aiohttp.ClientSession()
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.settle()
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def settle(self) -> None:
        """Wait until every webhook sent so far has been answered."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    @staticmethod
    def _error(status: int, code: str, title: str) -> web.Response:
        return web.json_response({"errors": [{"code": code, "title": title, "detail": title}]}, status=status)

    async def _admit(self, request: web.Request) -> tuple[web.Response | None, dict[str, Any]]:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._error(401, "10009", "Authentication failed"), {}
        try:
            body = await request.json()
        except ValueError:
            body = None
        self.requests.append((request.path, body if isinstance(body, dict) else {}))
        if self._failures:
            status = self._failures.pop(0)
            return self._error(status, "10007", "injected failure"), {}
        if not isinstance(body, dict):
            return self._error(400, "10015", "Bad Request"), {}
        return None, body

    async def _create(self, request: web.Request) -> web.Response:
        refused, body = await self._admit(request)
        if refused is not None:
            return refused
        missing = [f for f in ("connection_id", "to", "from") if not body.get(f)]
        if missing:
            return self._error(422, "10005", f"missing {missing}")
        command = body.get("command_id")
        ccid = self._by_command.get(command) if isinstance(command, str) else None
        if ccid is None:
            ccid = f"v3:{uuid.uuid4().hex}"
            self.calls[ccid] = {**body, "ended": False, "leg": str(uuid.uuid4()), "session": str(uuid.uuid4())}
            if isinstance(command, str):
                self._by_command[command] = ccid
            if self.auto:
                self._spawn(self._progress(ccid))
        call = self.calls[ccid]
        return web.json_response({"data": {"call_control_id": ccid, "call_leg_id": call["leg"],
                                           "call_session_id": call["session"], "is_alive": True,
                                           "record_type": "call"}})

    async def _hangup(self, request: web.Request) -> web.Response:
        refused, _ = await self._admit(request)
        if refused is not None:
            return refused
        call = self.calls.get(request.match_info["ccid"])
        if call is None or call["ended"]:
            return self._error(422, "90018", "Call has already ended")
        call["ended"] = True
        self._spawn(self.send(request.match_info["ccid"], "call.hangup", hangup_cause="normal_clearing",
                              hangup_source="caller"))
        return web.json_response({"data": {"result": "ok"}})

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _progress(self, ccid: str) -> None:
        await asyncio.sleep(0.05)  # after the create-call answer, as on the real network (not guaranteed)
        await self.send(ccid, "call.initiated", state="parked")
        if self.outcome is None:
            await self.send(ccid, "call.answered", state="answered")
        else:
            self.calls[ccid]["ended"] = True
            await self.send(ccid, "call.hangup", hangup_cause=self.outcome, hangup_source="callee")

    def payload(self, ccid: str, **extra: Any) -> dict[str, Any]:
        call = self.calls[ccid]
        return {"call_control_id": ccid, "call_leg_id": call["leg"], "call_session_id": call["session"],
                "client_state": call.get("client_state"), "connection_id": call["connection_id"],
                "direction": "outgoing", "from": call["from"], "to": call["to"],
                "start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}

    async def send(self, ccid: str, event_type: str, **extra: Any) -> int:
        """Deliver one signed event for call ``ccid``; returns the webhook's status."""
        assert self._http is not None
        body, headers = delivery(self.key, event_type, self.payload(ccid, **extra))
        async with self._http.post(self.webhook_url, data=body, headers=headers) as r:
            self.deliveries.append((body, headers, r.status))
            return r.status

    async def stream(self, ccid: str, pcm: np.ndarray) -> tuple[int | None, int]:
        """Play ``pcm`` on the call's media stream as Telnyx would; returns (close code, media messages sent)."""
        call = self.calls[ccid]
        msgs = telnyx_messages(pcm, call_id=ccid, stream_id=f"st-{ccid[-12:]}", encoding="PCMU", sample_rate=8000,
                               token=None)
        async with connect(call["stream_url"], token=call["stream_auth_token"]) as ws:
            sent = await send_paced(ws, msgs)
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 15)
            except websockets.ConnectionClosed:
                pass
            return ws.close_code, sent
