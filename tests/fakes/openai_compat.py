"""A protocol-faithful fake of an OpenAI-compatible chat-completions server (Groq, OpenAI).

Speaks what the real one speaks, on 127.0.0.1 and a free port:

* ``POST /v1/chat/completions`` only; ``Authorization: Bearer <key>`` checked first (401 with an
  OpenAI error body ``{"error": {"message", "type", "code"}}``), then the JSON body (400 for a
  missing/invalid ``model``, ``messages``, ``stream``, ``max_tokens``, ``response_format``, or an
  unknown field, as OpenAI does; ``response_format: {"type": "json_object"}`` also needs the word
  "json" somewhere in the messages, OpenAI's and Groq's rule);
* ``stream: true`` answers ``text/event-stream`` with ``chat.completion.chunk`` events: a first
  delta with the role, the answer cut into several content deltas, a last delta with
  ``finish_reason: "stop"``, then ``data: [DONE]``;
* ``stream: false`` (or absent) answers one ``chat.completion`` JSON object: ``choices[0].message``
  ``{"role": "assistant", "content": <answer>}``, ``finish_reason: "stop"``, and ``usage``.

The answer is ``translations[user message]`` when given, else ``transform(user message)``
(default: upper case).  Every request body that reached the server after auth is recorded in
``requests`` (and its headers in ``headers``); ``max_in_flight`` is the most requests it was serving
at once.  Faults are queued and each applies to one request, in order:

* ``fail_next(n, status, retry_after=..., retry_after_ms=...)``: an error status (429, 500, 503...)
* ``stall_next(n, seconds)``: wait before answering (ended early by ``aclose``)
* ``error_mid_stream_next(n)``: a ``data: {"error": {...}}`` after the first content delta
* ``malformed_next(n, kind="json" | "shape")``: a chunk (or, not streamed, a body) that is not JSON /
  has no ``choices`` list
* ``truncate_next(n)``: the answer cut at half its length with ``finish_reason: "length"``, as when
  ``max_tokens`` runs out (not streamed)
* ``mangle_markers_next(n, how="translate" | "drop" | "swap" | "invent")``: the answer's redaction
  markers ``[REDACTED:<kind>]`` are translated (``[REDACTED:teléfono]``), dropped, swapped pairwise, or
  one is added, as a careless model would

Use as ``async with FakeOpenAI(...) as fake: fake.base_url``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web

ALLOWED_FIELDS = frozenset(
    {"model", "messages", "stream", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed",
     "response_format"}
)


@dataclass
class _Fault:
    kind: str  # "status", "stall", "mid_error", "malformed", "markers", "truncate"
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    malformed: str = "json"
    mangle: str = ""


_MARKER = re.compile(r"\[REDACTED:(ssn|card|dob|email|phone|number)\]", re.IGNORECASE)
_SPANISH_KINDS = {"ssn": "nss", "card": "tarjeta", "dob": "nacimiento", "email": "correo", "phone": "teléfono"}


def mangle_markers(answer: str, how: str) -> str:
    """``answer`` with its redaction markers spoiled the way ``how`` names."""
    if how == "translate":
        return _MARKER.sub(lambda m: f"[REDACTED:{_SPANISH_KINDS[m.group(1).lower()]}]", answer)
    if how == "drop":
        return " ".join(_MARKER.sub("", answer).split())
    if how == "swap":
        found = [m.group() for m in _MARKER.finditer(answer)]
        swapped = iter(found[1::2] + found[0::2] if len(found) > 1 else found)
        return _MARKER.sub(lambda m: next(swapped), answer)
    if how == "invent":
        return answer + " [REDACTED:ssn]"
    raise ValueError(how)


def _error(
    status: int, message: str, kind: str, code: str | None = None, headers: Mapping[str, str] | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


class FakeOpenAI:
    def __init__(
        self,
        translations: Mapping[str, str] | None = None,
        *,
        api_key: str = "test-key",
        transform: Callable[[str], str] = str.upper,
        delta_chars: int = 4,
        delta_delay_s: float = 0.0,
        echo_key_in_401: bool = False,
    ) -> None:
        """``echo_key_in_401`` puts the presented key in the 401 message (the worst a provider
        could do), so tests can prove the client never repeats it."""
        self.translations = dict(translations or {})
        self.api_key = api_key
        self.transform = transform
        self.delta_chars = delta_chars
        self.delta_delay_s = delta_delay_s
        self.echo_key_in_401 = echo_key_in_401
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self.attempts = 0  # every POST, refused ones included
        self.request_times: list[float] = []  # monotonic time of each POST
        self.in_flight = 0
        self.max_in_flight = 0
        self._faults: deque[_Fault] = deque()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # -- fault injection -------------------------------------------------------------------------

    def fail_next(
        self, n: int, status: int, *, retry_after: str | None = None, retry_after_ms: str | None = None
    ) -> None:
        headers = {}
        if retry_after is not None:
            headers["retry-after"] = retry_after
        if retry_after_ms is not None:
            headers["retry-after-ms"] = retry_after_ms
        self._faults.extend(_Fault("status", status=status, headers=headers) for _ in range(n))

    def stall_next(self, n: int, seconds: float) -> None:
        self._faults.extend(_Fault("stall", seconds=seconds) for _ in range(n))

    def error_mid_stream_next(self, n: int = 1) -> None:
        self._faults.extend(_Fault("mid_error") for _ in range(n))

    def malformed_next(self, n: int = 1, kind: str = "json") -> None:
        self._faults.extend(_Fault("malformed", malformed=kind) for _ in range(n))

    def mangle_markers_next(self, n: int = 1, how: str = "translate") -> None:
        self._faults.extend(_Fault("markers", mangle=how) for _ in range(n))

    def truncate_next(self, n: int = 1) -> None:
        self._faults.extend(_Fault("truncate") for _ in range(n))

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        # handler_cancellation: a client that hangs up mid-stall stops its handler.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self.base_url

    async def aclose(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeOpenAI:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- the endpoint ----------------------------------------------------------------------------

    def answer_for(self, text: str) -> str:
        return self.translations[text] if text in self.translations else self.transform(text)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        self.attempts += 1
        self.request_times.append(time.monotonic())
        auth = request.headers.get("Authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme != "Bearer" or key != self.api_key:
            shown = key if self.echo_key_in_401 else (key[:3] + "***" + key[-4:] if len(key) > 8 else "***")
            return _error(401, f"Invalid API Key: {shown}", "invalid_request_error", "invalid_api_key")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
        problem = _validate(body)
        if problem:
            return _error(400, problem, "invalid_request_error")
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        self.paths.append(request.path)

        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            fault = self._faults.popleft() if self._faults else None
            if fault is not None and fault.kind == "status":
                kind = "rate_limit_exceeded" if fault.status == 429 else "server_error"
                return _error(fault.status, f"fake {fault.status}", kind, kind, fault.headers)
            if fault is not None and fault.kind == "stall":
                try:
                    await asyncio.wait_for(self._closing.wait(), fault.seconds)
                except TimeoutError:
                    pass
            user = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
            answer = self.answer_for(user)
            if fault is not None and fault.kind == "markers":
                answer = mangle_markers(answer, fault.mangle)
            if body.get("stream") is True:
                return await self._stream(request, body["model"], answer, fault)
            return self._completion(body["model"], answer, fault)
        finally:
            self.in_flight -= 1

    def _completion(self, model: str, answer: str, fault: _Fault | None) -> web.Response:
        if fault is not None and fault.kind == "malformed":
            raw = b'{"id": "chatcmpl-x", "choices": [{"message": ' if fault.malformed == "json" else (
                b'{"id": "chatcmpl-x", "object": "chat.completion", "choices": {}}')
            return web.Response(body=raw, content_type="application/json")
        finish = "stop"
        if fault is not None and fault.kind == "truncate":
            answer, finish = answer[: len(answer) // 2], "length"
        prompt_tokens = sum(len(str(m["content"]).split()) for m in self.requests[-1]["messages"])
        payload = {
            "id": f"chatcmpl-{len(self.requests):06d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(answer.split()),
                      "total_tokens": prompt_tokens + len(answer.split())},
        }
        return web.Response(body=orjson.dumps(payload), content_type="application/json")

    async def _stream(self, request: web.Request, model: str, answer: str, fault: _Fault | None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        ident = f"chatcmpl-{len(self.requests):06d}"
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            payload = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            return b"data: " + orjson.dumps(payload) + b"\n\n"

        await resp.write(chunk({"role": "assistant", "content": ""}))
        pieces = [answer[i : i + self.delta_chars] for i in range(0, len(answer), self.delta_chars)] or [""]
        for i, piece in enumerate(pieces):
            if self.delta_delay_s:
                await asyncio.sleep(self.delta_delay_s)
            await resp.write(chunk({"content": piece}))
            if i == 0 and fault is not None and fault.kind == "mid_error":
                error = {"error": {"message": "fake upstream failure", "type": "internal_server_error"}}
                await resp.write(b"data: " + orjson.dumps(error) + b"\n\n")
                return resp
            if i == 0 and fault is not None and fault.kind == "malformed":
                if fault.malformed == "json":
                    await resp.write(b'data: {"id": "' + ident.encode() + b'", "choices": [{"delta": \n\n')
                else:
                    await resp.write(b'data: {"id": "x", "object": "chat.completion.chunk", "choices": {}}\n\n')
        await resp.write(chunk({}, "stop"))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _validate(body: object) -> str | None:
    if not isinstance(body, dict):
        return "The request body must be a JSON object."
    unknown = sorted(set(body) - ALLOWED_FIELDS)
    if unknown:
        return f"Unrecognized request argument supplied: {', '.join(unknown)}"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "'model' is a required property"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in {"system", "user", "assistant"}:
            return f"'messages.{i}.role' must be one of system, user, assistant"
        if not isinstance(m.get("content"), str):
            return f"'messages.{i}.content' must be a string"
    if not any(m["role"] == "user" for m in messages):
        return "'messages' must contain a user message"
    if not isinstance(body.get("stream", False), bool):
        return "'stream' must be a boolean"
    max_tokens = body.get("max_tokens", 1)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "'max_tokens' must be an integer of at least 1"
    if "response_format" in body:
        problem = _response_format(body["response_format"], messages)
        if problem:
            return problem
    temperature = body.get("temperature", 1)
    if not isinstance(temperature, int | float) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        return "'temperature' must be a number between 0 and 2"
    return None


def _response_format(fmt: object, messages: list[dict[str, Any]]) -> str | None:
    if not isinstance(fmt, dict) or fmt.get("type") not in {"text", "json_object", "json_schema"}:
        return "'response_format.type' must be one of text, json_object, json_schema"
    if fmt["type"] == "json_object" and not any("json" in m["content"].lower() for m in messages):
        return "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'."
    if fmt["type"] == "json_schema":
        schema = fmt.get("json_schema")
        if not isinstance(schema, dict) or not isinstance(schema.get("name"), str) or not isinstance(
                schema.get("schema"), dict):
            return "'response_format.json_schema' must have a 'name' and a 'schema' object"
    return None
