"""AssemblyAI Universal-Streaming v3 (``wss://streaming.assemblyai.com/v3/ws``), as AssemblyAI documents it.

One WebSocket per session, authenticated with ``Authorization: <key>``; query ``sample_rate``,
``encoding`` (``pcm_mulaw``: our PCM frames are encoded back to mu-law, bit-exact for audio that came
in as G.711 mu-law; else ``pcm_s16le``), ``format_turns`` and ``keyterms_prompt`` (JSON list of the
session's phrases).  Audio goes out in ``chunk_ms`` (50 ms) binary messages; the last chunk of an
utterance is padded with silence to 50 ms because AssemblyAI refuses shorter chunks (close 3007).

Turns and our utterances
    Our VAD cuts utterances; at ``finalize()`` we send ``ForceEndpoint``, which ends AssemblyAI's turn.
    A ``Turn`` with ``end_of_turn=false`` is a partial.  An ended turn commits its text to the utterance
    its first word falls in; with ``format_turns`` AssemblyAI sends the end of a turn twice (unformatted,
    then ``turn_is_formatted=true``): only the formatted one commits, the unformatted one is a partial,
    and a turn is committed once (by ``turn_order``), so an utterance never gets two finals.
    Our final for an utterance is emitted when a turn is committed *after* its ForceEndpoint went out:
    its text is every turn committed for the utterance (AssemblyAI may end turns on its own mid-utterance).
    If ForceEndpoint brings no turn (nothing left to transcribe), the final comes after
    ``final_timeout_s`` with the text committed so far.  A turn AssemblyAI ends on its own while our
    ForceEndpoint is in flight finishes the utterance early; a later turn for the same audio is dropped
    (logged).

Close codes (after an ``Error{error_code, error}`` or alone), as ``cloud.Action``:
    3005 server error, 3009 too many sessions, 4029 audio too fast: retry with backoff;
    3008 max session duration: reconnect at once (replay keeps the open utterance whole);
    3006 input validation, 3007 chunk duration, 4001 unauthorized, 4002 insufficient funds, 1008:
    fail at once (retrying would send the same request).  Anything else: retry with backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson

from pipelines.stt.base import Emit, SessionOptions, SttSession
from pipelines.stt.cloud import Action, CloudConfig, CloudProvider, CloudSession, Refused, Utterance

log = logging.getLogger(__name__)

CLOSE_ACTIONS: Mapping[int, Action] = {
    1008: Action.FAIL,
    3005: Action.RETRY,
    3006: Action.FAIL,
    3007: Action.FAIL,
    3008: Action.RECONNECT,
    3009: Action.RETRY,
    4001: Action.FAIL,
    4002: Action.FAIL,
    4029: Action.RETRY,
}


class AssemblyAISession(CloudSession):
    provider = "assemblyai"
    close_actions = CLOSE_ACTIONS
    keepalive_message = '{"type":"KeepAlive"}'
    finalize_message = '{"type":"ForceEndpoint"}'
    terminate_message = '{"type":"Terminate"}'
    pad_last_chunk = True

    def __init__(self, emit: Emit, http: aiohttp.ClientSession, url: str, headers: Mapping[str, str],
                 config: CloudConfig, encode: Callable[[bytes], bytes], *, format_turns: bool) -> None:
        super().__init__(emit, http, url, headers, config, encode)
        self._format_turns = format_turns
        self._last_turn = -1  # turn_order of the last committed turn on this connection
        self.session_id: str | None = None

    async def _ready(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            data = orjson.loads(msg.data)
            if data.get("type") == "Begin":
                self.session_id = data.get("id")
                return
            self.on_message(data)
        code = ws.close_code
        raise Refused(self.classify(code), f"closed with code {code} before Begin")

    def on_connection(self) -> None:
        self._last_turn = -1

    def on_message(self, msg: dict[str, Any]) -> bool:
        kind = msg.get("type")
        if kind == "Turn":
            self._turn(msg)
        elif kind == "Termination":
            return True
        elif kind == "Error":
            self.error_code = int(msg.get("error_code") or 0) or None
            log.warning("stt.provider_error", extra={"provider": self.provider, "code": self.error_code,
                                                     "error": msg.get("error")})
        elif kind == "Begin":
            self.session_id = msg.get("id")
        return False  # SpeechStarted and anything new: nothing to do

    def _turn(self, msg: dict[str, Any]) -> None:
        order = int(msg.get("turn_order", 0))
        if order <= self._last_turn:
            return  # this turn is already committed
        words = msg.get("words") or []
        ended = bool(msg.get("end_of_turn"))
        commit = ended and (bool(msg.get("turn_is_formatted")) or not self._format_turns)
        utt: Utterance | None
        if words:
            utt = self.utterance_at(float(words[0]["start"]))
        else:
            oldest = self.oldest()
            utt = oldest if oldest is not None and oldest.finalize_sent else None
        if utt is None:
            if msg.get("transcript"):
                log.info("stt.late_turn", extra={"provider": self.provider, "turn_order": order})
            return
        mapped = tuple(self.word(utt, str(w.get("text", "")), float(w["start"]), float(w["end"]),
                                 float(w.get("confidence", 1.0))) for w in words)
        self.update(utt, str(msg.get("transcript", "")), mapped, committed=commit)
        if commit:
            self._last_turn = order
            if utt.finalize_sent:
                self.finish(utt)


class AssemblyAIProvider(CloudProvider):
    """Opens one AssemblyAI streaming session per call track.

    ``session``: an aiohttp client session to share (the provider creates, and in ``aclose`` closes,
    its own otherwise).  ``keepalive_s``: KeepAlive interval while no audio flows.  ``max_reconnects``
    consecutive failed reconnects (``backoff_s``: first and largest delay) fail the session.
    """

    name = "assemblyai"

    def __init__(self, api_key: str, *, url: str = "wss://streaming.assemblyai.com/v3/ws", sample_rate: int = 8000,
                 encoding: str = "pcm_mulaw", keyterms: bool = True, chunk_ms: int = 50, max_buffer_ms: int = 10000,
                 connect_timeout: float = 5.0, session: aiohttp.ClientSession | None = None,
                 format_turns: bool = True, keepalive_s: float = 5.0, max_reconnects: int = 5,
                 backoff_s: tuple[float, float] = (0.25, 4.0), final_timeout_s: float = 3.0) -> None:
        if encoding not in ("pcm_mulaw", "pcm_s16le"):
            raise ValueError(f"AssemblyAI encoding must be pcm_mulaw or pcm_s16le, not {encoding!r}")
        self.api_key = api_key
        self.url = url
        self.encoding = encoding
        self.keyterms = keyterms
        self.format_turns = format_turns
        super().__init__(sample_rate=sample_rate, mulaw=encoding == "pcm_mulaw", session=session,
                         chunk_ms=chunk_ms, max_buffer_ms=max_buffer_ms, keepalive_s=keepalive_s,
                         connect_timeout=connect_timeout, max_reconnects=max_reconnects, backoff_s=backoff_s,
                         final_timeout_s=final_timeout_s)

    def session_url(self, options: SessionOptions) -> str:
        params = {"sample_rate": str(self.sample_rate), "encoding": self.encoding,
                  "format_turns": "true" if self.format_turns else "false"}
        if self.keyterms and options.phrases:
            params["keyterms_prompt"] = orjson.dumps(list(options.phrases)).decode()
        return f"{self.url}?{urlencode(params)}"

    async def open_session(self, options: SessionOptions, emit: Emit) -> SttSession:
        """A connected session (``Begin`` received); ``ProviderUnavailable`` if none could be opened
        within ``connect_timeout`` or the key was refused (close 4001)."""
        session = AssemblyAISession(emit, self._client(), self.session_url(options), {"Authorization": self.api_key},
                                    self.config, self._encode, format_turns=self.format_turns)
        await session.start()
        return session
