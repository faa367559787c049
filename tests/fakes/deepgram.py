"""A fake Deepgram live server (``/v1/listen``) on 127.0.0.1, for tests of ``pipelines/stt/deepgram.py``.

Emulated (Deepgram's docs): the handshake checks ``Authorization: Token <key>`` (HTTP 401 if wrong)
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
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes.ws_server import Connection, ScriptedWsFake


class FakeDeepgram(ScriptedWsFake):
    path = "/v1/listen"

    def __init__(self, script: list[str], *, api_key: str = "test-key", word_ms: int = 400,
                 segment_words: int = 2, idle_timeout: float = 10.0, final_delay_s: float = 0.0,
                 final_text: Callable[[], str] | None = None, on_final: Callable[[str], None] | None = None) -> None:
        super().__init__(script, api_key=api_key, word_ms=word_ms)
        self.segment_words = segment_words
        self.idle_timeout = idle_timeout
        # For bench/latency.py: Finalize is answered final_delay_s later (the connection's later messages
        # wait meanwhile, as behind a busy recogniser); final_text, when given, is what that final says
        # (the whole utterance, one segment); on_final gets it just before it is sent.
        self.final_delay_s = final_delay_s
        self.final_text = final_text
        self.on_final = on_final
        self.utterances = 0  # utterances finalized so far, over all connections: indexes the script

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if (refusal := self._refused()) is not None:
            return refusal
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
                    if self.final_text is not None:
                        said = self.final_text().split()
                        committed, revealed = 0, len(said)
                    else:
                        said = self._words()
                    results = self._results(said, committed, revealed, utt_start, end, True,
                                            data["type"] == "Finalize")
                    if self.final_delay_s:
                        await asyncio.sleep(self.final_delay_s)
                    if self.on_final is not None:
                        self.on_final(results["channel"]["alternatives"][0]["transcript"])
                    await ws.send_json(results)
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
        return self._script_words(self.utterances)

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

