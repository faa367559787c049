"""A fake Deepgram live server (``/v1/listen``) on 127.0.0.1, for tests of ``pipelines/stt/deepgram.py``.

What it emulates (PROTOCOLS.md): the handshake checks ``Authorization: Token <key>`` (HTTP 401 if wrong)
and the query (``encoding`` mulaw/linear16, ``sample_rate``, ``interim_results=true``; HTTP 400 otherwise);
binary audio; ``KeepAlive``; ``Finalize``; ``CloseStream`` (the last results, ``Metadata``, close 1000);
and the idle close: nothing received for ``idle_timeout`` (Deepgram: 10 s) closes with 1011 "NET-0001".

Transcripts are scripted but depend on every byte of audio: the n-th utterance (audio between two
Finalize messages, counted across connections) says ``script[n]``; its word i is recognised once the
utterance holds (i + 1) * ``word_ms`` of audio and spans ``i * word_ms`` to ``(i + 1) * word_ms`` after the
utterance's first byte on this connection.  Each new word brings an interim ``Results``
(``is_final=false``) for the open segment; every ``segment_words`` words the segment is committed
(``is_final=true``, as Deepgram's endpointing would); ``Finalize`` commits the rest with
``from_finalize=true``.  ``start``/``duration`` are seconds from the connection's first audio byte.

Records per connection: query, headers, audio bytes, every message (text as parsed JSON, binary as its
length).  Faults: ``refuse_next`` (HTTP 503 for the next K handshakes), one-shot ``drop_after`` (after N
audio bytes: close with a code, or abort TCP) and ``stall_after`` (stop reading).
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web


@dataclass
class Connection:
    query: dict[str, str]
    headers: dict[str, str]
    query_list: list[tuple[str, str]]
    audio: bytearray = field(default_factory=bytearray)
    messages: list[Any] = field(default_factory=list)  # dict for text (parsed JSON), int (length) for binary
    close_code: int | None = None  # the code the fake closed with, else the client's

    def sent(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if isinstance(m, dict) and m.get("type") == kind]


class FakeDeepgram:
    def __init__(self, script: list[str], *, api_key: str = "test-key", word_ms: int = 400,
                 segment_words: int = 2, idle_timeout: float = 10.0) -> None:
        self.script = script
        self.api_key = api_key
        self.word_ms = word_ms
        self.segment_words = segment_words
        self.idle_timeout = idle_timeout
        self.connections: list[Connection] = []
        self.attempts = 0
        self.refuse_next = 0
        self.utterances = 0  # utterances finalized so far, over all connections: indexes the script
        self._fault: tuple[str, int, int | None] | None = None
        self._unstall = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    def drop_after(self, nbytes: int, code: int | None = None) -> None:
        """After ``nbytes`` audio bytes on a connection, close it with ``code`` (None: abort TCP)."""
        self._fault = ("drop", nbytes, code)

    def stall_after(self, nbytes: int) -> None:
        self._fault = ("stall", nbytes, None)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/v1/listen", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # so a stall blocks the client soon
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock).start()
        self.url = f"ws://127.0.0.1:{sock.getsockname()[1]}/v1/listen"
        return self.url

    async def stop(self) -> None:
        self._unstall.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.attempts += 1
        if self.refuse_next > 0:
            self.refuse_next -= 1
            return web.Response(status=503, text="refused by test")
        if request.headers.get("Authorization") != f"Token {self.api_key}":
            return web.Response(status=401, text='{"err_code":"INVALID_AUTH","err_msg":"Invalid credentials."}')
        q = request.query
        if q.get("encoding") not in ("mulaw", "linear16") or not q.get("sample_rate", "").isdigit() \
                or q.get("interim_results") != "true":
            return web.Response(status=400, text='{"err_code":"Bad Request"}')
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        conn = Connection(dict(q), dict(request.headers), list(q.items()))
        self.connections.append(conn)
        self._bytes_per_ms = int(q["sample_rate"]) // 1000 * (1 if q["encoding"] == "mulaw" else 2)
        utt_start, committed, revealed = 0, 0, 0  # byte offset; words committed; words recognised
        while True:
            try:
                msg = await ws.receive(timeout=self.idle_timeout)
            except TimeoutError:
                conn.close_code = 1011
                await ws.close(code=1011, message=b"NET-0001")
                break
            if msg.type is WSMsgType.BINARY:
                conn.audio += msg.data
                conn.messages.append(len(msg.data))
                if await self._faulted(ws, request, conn):
                    break
                words = self._words()
                heard = min(len(words), (len(conn.audio) - utt_start) // self._bytes_per_ms // self.word_ms)
                if heard > revealed:
                    revealed = heard
                    final = revealed - committed >= self.segment_words
                    end = utt_start / self._bytes_per_ms + revealed * self.word_ms
                    await ws.send_json(self._results(words, committed, revealed, utt_start, end, final, False))
                    committed = revealed if final else committed
            elif msg.type is WSMsgType.TEXT:
                data = json.loads(msg.data)
                conn.messages.append(data)
                if data.get("type") in ("Finalize", "CloseStream") and len(conn.audio) > utt_start:
                    end = len(conn.audio) / self._bytes_per_ms
                    await ws.send_json(self._results(self._words(), committed, revealed, utt_start, end, True,
                                                     data["type"] == "Finalize"))
                    self.utterances += 1
                    utt_start, committed, revealed = len(conn.audio), 0, 0
                if data.get("type") == "CloseStream":
                    await ws.send_json({"type": "Metadata", "request_id": str(uuid.uuid4()), "channels": 1,
                                        "duration": len(conn.audio) / self._bytes_per_ms / 1000})
                    await ws.close(code=1000)
                    break
            else:
                break
        conn.close_code = conn.close_code or ws.close_code
        return ws

    def _words(self) -> list[str]:
        return self.script[self.utterances].split() if self.utterances < len(self.script) else []

    def _results(self, words: list[str], first: int, last: int, utt_start: int, end_ms: float, is_final: bool,
                 from_finalize: bool) -> dict[str, Any]:
        base = utt_start / self._bytes_per_ms
        start = base + first * self.word_ms
        timed = [{"word": w, "punctuated_word": w, "confidence": 0.9,
                  "start": (base + i * self.word_ms) / 1000, "end": (base + (i + 1) * self.word_ms) / 1000}
                 for i, w in enumerate(words[first:last], first)]
        return {
            "type": "Results", "channel_index": [0, 1], "start": start / 1000, "duration": (end_ms - start) / 1000,
            "is_final": is_final, "speech_final": from_finalize, "from_finalize": from_finalize,
            "channel": {"alternatives": [{"transcript": " ".join(words[first:last]), "confidence": 0.9,
                                          "words": timed}]},
        }

    async def _faulted(self, ws: web.WebSocketResponse, request: web.Request, conn: Connection) -> bool:
        if self._fault is None or len(conn.audio) < self._fault[1]:
            return False
        kind, _, code = self._fault
        self._fault = None
        if kind == "stall":
            await self._unstall.wait()
        elif code is None:
            assert request.transport is not None
            request.transport.abort()
        else:
            await ws.close(code=code, message=b"injected by test")
        return True
