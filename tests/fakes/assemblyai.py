"""A fake AssemblyAI Universal-Streaming v3 server on 127.0.0.1, for tests of ``pipelines/stt/assemblyai.py``.

Emulated (AssemblyAI's docs): the handshake checks ``Authorization: <key>`` (a wrong key is accepted
and closed with 4001, as AssemblyAI's legacy code says) and the query (``sample_rate``, ``encoding``
``pcm_s16le``/``pcm_mulaw``, ``format_turns``; anything else invalid gets ``Error`` 3006 and close 3006);
then ``Begin``; binary audio; ``KeepAlive``, ``ForceEndpoint``, ``Terminate`` (answered by ``Termination``
and close 1000).

Transcripts are scripted but depend on every byte of audio: the n-th turn (across connections) says
``script[n]``; its word i is recognised once the turn holds (i + 1) * ``word_ms`` of audio, starting at
``i * word_ms`` after the turn's first byte on this connection (times in ms from the connection's first
audio byte, at the query's rate and encoding).  Each newly recognised word brings a partial ``Turn``;
``ForceEndpoint`` ends the turn: an unformatted end-of-turn ``Turn``, then (``format_turns=true``) the
formatted one ("Hello there." for "hello there").  ForceEndpoint with no audio in the turn sends nothing.

Records per connection: query, headers, audio bytes, every message (text as parsed JSON, binary as its
length).  Faults: ``refuse_next`` (HTTP 503 at the handshake for the next K attempts), and one-shot
``drop_after`` (after N audio bytes: close with a code, or abort the TCP connection), ``error_after``
(send ``Error`` then close with its code), ``stall_after`` (stop reading; the socket's small receive buffer
then fills, so the client's writes block).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes.ws_server import Connection, ScriptedWsFake


class FakeAssemblyAI(ScriptedWsFake):
    path = "/v3/ws"

    def __init__(self, script: list[str], *, api_key: str = "test-key", word_ms: int = 400) -> None:
        super().__init__(script, api_key=api_key, word_ms=word_ms)
        self.turns = 0  # turns ended so far, over all connections: indexes the script

    def error_after(self, nbytes: int, code: int) -> None:
        self._fault = ("error", nbytes, code)

    # -- the protocol --------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if (refusal := self._refused()) is not None:
            return refusal
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        conn = Connection(dict(request.query), dict(request.headers))
        self.connections.append(conn)
        if request.headers.get("Authorization") != self.api_key:
            await ws.close(code=4001, message=b"Not authorized")
            return ws
        q = request.query
        if not q.get("sample_rate", "").isdigit() or q.get("encoding", "pcm_s16le") not in ("pcm_s16le", "pcm_mulaw") \
                or q.get("format_turns", "false") not in ("true", "false"):
            await self._error(ws, 3006, "Invalid query parameters")
            return ws
        bytes_per_ms = int(q["sample_rate"]) // 1000 * (1 if q.get("encoding") == "pcm_mulaw" else 2)
        formatted = q.get("format_turns") == "true"
        await ws.send_json({"type": "Begin", "id": str(uuid.uuid4()), "expires_at": 2_000_000_000})
        turn_start, revealed, order = 0, 0, 0
        async for msg in ws:
            if msg.type is WSMsgType.BINARY:
                conn.audio += msg.data
                conn.messages.append(len(msg.data))
                if await self._faulted(ws, request, conn):
                    return ws
                heard = (len(conn.audio) - turn_start) // bytes_per_ms // self.word_ms
                words = self._words()
                if min(heard, len(words)) > revealed:
                    revealed = min(heard, len(words))
                    await ws.send_json(self._turn(order, words[:revealed], turn_start / bytes_per_ms, False, False))
            elif msg.type is WSMsgType.TEXT:
                data = json.loads(msg.data)
                conn.messages.append(data)
                if data.get("type") == "ForceEndpoint" and len(conn.audio) > turn_start:
                    words = self._words()[:revealed]
                    start = turn_start / bytes_per_ms
                    await ws.send_json(self._turn(order, words, start, True, False))
                    if formatted:
                        await ws.send_json(self._turn(order, words, start, True, True))
                    self.turns += 1
                    turn_start, revealed, order = len(conn.audio), 0, order + 1
                elif data.get("type") == "Terminate":
                    seconds = len(conn.audio) / bytes_per_ms / 1000
                    await ws.send_json({"type": "Termination", "audio_duration_seconds": seconds,
                                        "session_duration_seconds": seconds})
                    await ws.close(code=1000)
        return ws

    def _words(self) -> list[str]:
        return self._script_words(self.turns)

    def _turn(self, order: int, words: list[str], start_ms: float, end: bool, formatted: bool) -> dict[str, Any]:
        text = " ".join(words)
        if formatted and text:
            text = text[0].upper() + text[1:] + "."
        return {
            "type": "Turn", "turn_order": order, "turn_is_formatted": formatted, "end_of_turn": end,
            "transcript": text, "end_of_turn_confidence": 0.9 if end else 0.1,
            "words": [{"text": w, "start": round(start_ms + i * self.word_ms),
                       "end": round(start_ms + (i + 1) * self.word_ms), "confidence": 0.9, "word_is_final": True}
                      for i, w in enumerate(words)],
        }

    async def _inject(self, kind: str, ws: web.WebSocketResponse, request: web.Request, code: int | None) -> None:
        if kind == "error":
            assert code is not None
            await self._error(ws, code, "injected by test")
        else:
            await super()._inject(kind, ws, request, code)

    async def _error(self, ws: web.WebSocketResponse, code: int, text: str) -> None:
        with contextlib.suppress(ConnectionError):
            await ws.send_json({"type": "Error", "error_code": code, "error": text})
            await ws.close(code=code, message=text.encode())
