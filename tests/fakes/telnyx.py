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
* ``webhooks = False``: no webhook is sent by itself (Telnyx cannot reach us), only those a test ``send``s;
* ``stream(ccid, pcm, outbound=None)`` opens the call's media stream to the ``stream_url`` it was
  given, with its ``stream_auth_token`` in the upgrade header, and plays ``pcm`` (8 kHz, PCMU) on the
  inbound track (and ``outbound`` on the outbound track, as ``stream_track: both_tracks`` does) in
  real time, then ``stop``
  (tests/telnyx_client.py speaks the media protocol);
* ``fail_next(n, status)``: the next ``n`` requests answer ``status`` without effect;
* recordings (when the call asked ``record`` and the fake has a ``tls`` certificate): after the call's
  ``call.hangup`` it sends ``call.recording.saved`` with ``recording_urls.wav`` on its own HTTPS server
  (``https://<record_host>:<recordings_port>/recordings/<ccid>.wav``), serving a dual-channel 8 kHz WAV:
  channel 1 what it played on the inbound track (through G.711, as on the phone network), channel 2
  what it heard from us (the outbound media);
  ``recording_requests`` counts the downloads.

Webhooks carry the call's ``client_state`` back unchanged and are signed with the fake's own Ed25519
key (``public_key_b64`` is what the server under test is configured with).  ``deliveries`` keeps each
sent ``(body, headers, status)`` so a test can replay one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import time
import uuid
from types import TracebackType
from typing import Any

import aiohttp
import numpy as np
import orjson
import soundfile
import websockets
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from api.simulator import telnyx_messages
from api.telnyx_signature import public_b64, sign
from engine.codecs import get_codec
from tests.fakes.tls import Cert
from tests.telnyx_client import connect, send_paced


def delivery(key: Ed25519PrivateKey, event_type: str, payload: dict[str, Any], at: float | None = None,
             event_id: str | None = None) -> tuple[bytes, dict[str, str]]:
    """The body and headers Telnyx would POST for one event."""
    body = orjson.dumps({"data": {"id": event_id or str(uuid.uuid4()), "event_type": event_type,
                                  "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  "payload": payload, "record_type": "event"}, "meta": {"attempt": 1}})
    return body, {**sign(key, body, int(time.time() if at is None else at)), "Content-Type": "application/json"}


class FakeTelnyx:
    def __init__(self, port: int, webhook_url: str, api_key: str = "KEY_test_fake", *, tls: Cert | None = None,
                 recordings_port: int = 0, record_host: str = "localhost") -> None:
        self.port = port
        self.tls = tls
        self.recordings_port = recordings_port
        self.record_host = record_host
        self.recording_requests: list[str] = []
        self._recordings_runner: web.AppRunner | None = None
        self.webhook_url = webhook_url
        self.api_key = api_key
        self.key = Ed25519PrivateKey.generate()
        self.public_key_b64 = public_b64(self.key)
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.calls: dict[str, dict[str, Any]] = {}  # call_control_id -> create body + "ended"
        self.deliveries: list[tuple[bytes, dict[str, str], int]] = []
        self.outcome: str | None = None  # a hangup cause instead of answering
        self.auto = True  # send the progress webhooks by itself; False: the test sends them (``send``)
        self.webhooks = True  # False: the network loses them (an outage, a wrong webhook URL): none sent by itself
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
        if self.tls is not None:
            rec = web.Application()
            rec.router.add_get("/recordings/{name}", self._recording)
            self._recordings_runner = web.AppRunner(rec)
            await self._recordings_runner.setup()
            await web.TCPSite(self._recordings_runner, "127.0.0.1", self.recordings_port,
                              ssl_context=self.tls.server_context()).start()
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.settle()
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._recordings_runner is not None:
            await self._recordings_runner.cleanup()

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
            if self.auto and self.webhooks:
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
        if self.webhooks:
            self._spawn(self.end(request.match_info["ccid"], "normal_clearing", "caller"))
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

    async def end(self, ccid: str, cause: str, source: str) -> None:
        """``call.hangup``; the call's media stream (if one plays) stops; then, for a call that asked for a
        recording and streamed, ``call.recording.saved``."""
        await self.send(ccid, "call.hangup", hangup_cause=cause, hangup_source=source)
        call = self.calls[ccid]
        call.setdefault("hung_up", asyncio.Event()).set()
        if "stream_done" in call:
            await asyncio.wait_for(call["stream_done"].wait(), 15)
        if self.tls is not None and call.get("record") and (call.get("played") is not None or call.get("heard")):
            url = f"https://{self.record_host}:{self.recordings_port}/recordings/{ccid.replace(':', '_')}.wav"
            await self.send(ccid, "call.recording.saved", channels="dual", recording_urls={"wav": url, "mp3": None},
                            public_recording_urls={}, recording_started_at=call.get("answered_at"),
                            recording_ended_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def recording_wav(self, ccid: str) -> bytes:
        call = self.calls[ccid]
        played = call.get("played")
        codec = get_codec("PCMU", 8000)  # what went over the phone network, as Telnyx records it
        a = (np.zeros(0, np.int16) if played is None
             else np.frombuffer(codec.decode(codec.encode(played.astype("<i2").tobytes())), dtype="<i2"))
        b = np.frombuffer(bytes(call.get("heard", b"")), dtype="<i2")
        n = max(len(a), len(b))
        both = np.zeros((n, 2), np.int16)
        both[: len(a), 0] = a
        both[: len(b), 1] = b
        out = io.BytesIO()
        soundfile.write(out, both, 8000, subtype="PCM_16", format="WAV")
        return out.getvalue()

    async def _recording(self, request: web.Request) -> web.Response:
        self.recording_requests.append(request.path)
        name = request.match_info["name"].removesuffix(".wav").replace("_", ":")
        if name not in self.calls:
            return web.Response(status=404)
        return web.Response(body=self.recording_wav(name), content_type="audio/wav")

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

    async def stream(self, ccid: str, pcm: np.ndarray, outbound: np.ndarray | None = None) -> tuple[int | None, int]:
        """Play ``pcm`` (the callee's side; ``outbound``: ours) on the call's media stream as Telnyx would;
        returns (close code, media messages sent)."""
        call = self.calls[ccid]
        msgs = telnyx_messages(pcm, call_id=ccid, stream_id=f"st-{ccid[-12:]}", encoding="PCMU", sample_rate=8000,
                               token=None, outbound=outbound)
        call["played"] = pcm
        heard = call.setdefault("heard", bytearray())
        codec = get_codec("PCMU", 8000)

        async def listen(ws: websockets.ClientConnection) -> None:
            try:
                while True:
                    data = orjson.loads(await ws.recv())
                    if data.get("event") == "media":
                        heard.extend(codec.decode(base64.b64decode(data["media"]["payload"])))
            except websockets.ConnectionClosed:
                pass

        hung_up = call.setdefault("hung_up", asyncio.Event())
        done = call["stream_done"] = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            async with connect(call["stream_url"], token=call["stream_auth_token"]) as ws:
                listener = loop.create_task(listen(ws))
                sender = loop.create_task(send_paced(ws, msgs, per_frame=1 if outbound is None else 2))
                stop = loop.create_task(hung_up.wait())
                await asyncio.wait({sender, stop}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if not sender.done():  # hung up mid-stream: the stream stops, as Telnyx stops it
                    sender.cancel()
                    await asyncio.gather(sender, return_exceptions=True)
                    await ws.send(msgs[-1])  # stop
                # The server closes after `stop`.  Bounded from here, not per message: a stream plays
                # for longer than any wait between messages from the server (which may send nothing).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(listener, 15)
                sent = sender.result() if not sender.cancelled() else -1
                return ws.close_code, sent
        finally:
            done.set()
