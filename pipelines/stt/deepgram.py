"""Deepgram live streaming (``wss://api.deepgram.com/v1/listen``), as Deepgram documents it.

One WebSocket per session, authenticated with ``Authorization: Token <key>``; query ``encoding``
(``mulaw``: our PCM frames encoded back to mu-law, bit-exact for G.711 mu-law calls; or ``linear16``),
``sample_rate``, ``channels=1``, ``interim_results=true``, ``endpointing=300``, ``utterance_end_ms=1000``,
``vad_events=true``, ``language`` (from SessionOptions), ``model`` if given, and the session's phrases as
``keyterm`` (nova-3 models) or ``keywords`` (older models).

Results and our utterances
    At ``finalize()`` we send ``Finalize``.  Deepgram answers with ``Results`` segments: ``is_final=false``
    ones are revisable (a partial shows the utterance's final segments so far plus the current interim),
    ``is_final=true`` ones are committed.  The utterance ends at the ``Results`` with ``from_finalize: true``,
    or at an ``is_final`` + ``speech_final`` one that reaches the end of its audio once Finalize went out;
    our final's text is the concatenation of the utterance's ``is_final`` segments.  A segment belongs to
    the utterance its end falls in (Deepgram hears our utterances back to back; Finalize cuts its
    segments at their boundaries); one for an utterance already finished is dropped.  If Finalize brings
    nothing, the final comes after ``final_timeout_s`` with the committed text.

Keep-alive and closes
    ``KeepAlive`` goes out every ``keepalive_s`` while no audio flows: Deepgram closes a socket that
    hears nothing for 10 s (NET-0001, close 1011), after which we reconnect anyway.  ``CloseStream`` at
    ``aclose`` flushes the last results; ``Metadata`` is the last message.  Handshake 400/401/402/403 and
    close 1008 (DATA-0000, audio it cannot decode) fail the session at once; other closes, and handshake
    429/5xx, are retried with backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

import aiohttp

from pipelines.stt.base import Emit, SessionOptions, SttSession
from pipelines.stt.cloud import Action, CloudProvider, CloudSession

log = logging.getLogger(__name__)

CLOSE_ACTIONS: Mapping[int, Action] = {1008: Action.FAIL, 1011: Action.RETRY}


class DeepgramSession(CloudSession):
    provider = "deepgram"
    close_actions = CLOSE_ACTIONS
    keepalive_message = '{"type":"KeepAlive"}'
    finalize_message = '{"type":"Finalize"}'
    terminate_message = '{"type":"CloseStream"}'

    def on_message(self, msg: dict[str, Any]) -> bool:
        kind = msg.get("type")
        if kind == "Results":
            self._results(msg)
        elif kind == "Metadata":
            return self._closing  # after CloseStream, the last message
        elif kind == "Error":
            log.warning("stt.provider_error", extra={"provider": self.provider, "error": msg.get("description")})
        return False  # SpeechStarted, UtteranceEnd: our own VAD decides utterances

    def _results(self, msg: dict[str, Any]) -> None:
        start = float(msg.get("start", 0.0)) * 1000
        end = start + float(msg.get("duration", 0.0)) * 1000
        utt = self.utterance_at(max(start, end - 1))
        if utt is None:
            alternatives = msg.get("channel", {}).get("alternatives") or [{}]
            if alternatives[0].get("transcript"):
                log.info("stt.late_results", extra={"provider": self.provider, "start_ms": start})
            return
        alt = (msg["channel"].get("alternatives") or [{}])[0]
        words = tuple(
            self.word(utt, str(w.get("punctuated_word") or w.get("word", "")), float(w["start"]) * 1000,
                      float(w["end"]) * 1000, float(w.get("confidence", 1.0)))
            for w in alt.get("words") or ()
        )
        is_final = bool(msg.get("is_final"))
        self.update(utt, str(alt.get("transcript", "")), words, committed=is_final)
        done = msg.get("from_finalize") or (is_final and msg.get("speech_final") and end >= utt.sent_to - 1)
        if done and utt.finalize_sent:
            self.finish(utt)


class DeepgramProvider(CloudProvider):
    """Opens one Deepgram live session per call track.

    ``session``: an aiohttp client session to share (else the provider owns one, closed in ``aclose``).
    ``keyterms``: send the session's phrases as ``keyterm``/``keywords``.  The other knobs are those of
    ``cloud.CloudConfig``.
    """

    name = "deepgram"

    def __init__(self, api_key: str, *, url: str = "wss://api.deepgram.com/v1/listen", sample_rate: int = 8000,
                 encoding: str = "mulaw", model: str | None = None, language: str | None = None,
                 keepalive_s: float = 4.0, max_buffer_ms: int = 10000, chunk_ms: int = 50,
                 connect_timeout: float = 5.0, session: aiohttp.ClientSession | None = None,
                 keyterms: bool = True, endpointing_ms: int = 300, max_reconnects: int = 5,
                 backoff_s: tuple[float, float] = (0.25, 4.0), final_timeout_s: float = 3.0) -> None:
        if encoding not in ("mulaw", "linear16"):
            raise ValueError(f"Deepgram encoding must be mulaw or linear16, not {encoding!r}")
        self.api_key = api_key
        self.url = url
        self.encoding = encoding
        self.model = model
        self.language = language
        self.keyterms = keyterms
        self.endpointing_ms = endpointing_ms
        super().__init__(sample_rate=sample_rate, mulaw=encoding == "mulaw", session=session,
                         chunk_ms=chunk_ms, max_buffer_ms=max_buffer_ms, keepalive_s=keepalive_s,
                         connect_timeout=connect_timeout, max_reconnects=max_reconnects, backoff_s=backoff_s,
                         final_timeout_s=final_timeout_s)

    def session_url(self, options: SessionOptions) -> str:
        params: list[tuple[str, str]] = [
            ("encoding", self.encoding), ("sample_rate", str(self.sample_rate)), ("channels", "1"),
            ("interim_results", "true"), ("endpointing", str(self.endpointing_ms)), ("utterance_end_ms", "1000"),
            ("vad_events", "true"), ("language", self.language or options.language),
        ]
        if self.model:
            params.append(("model", self.model))
        if self.keyterms:
            key = "keyterm" if (self.model or "").startswith("nova-3") else "keywords"
            params.extend((key, p) for p in options.phrases)
        return f"{self.url}?{urlencode(params)}"

    async def open_session(self, options: SessionOptions, emit: Emit) -> SttSession:
        """A connected session; ``ProviderUnavailable`` if the handshake was refused (401: bad key) or no
        connection could be made within ``connect_timeout``."""
        session = DeepgramSession(emit, self._client(), self.session_url(options),
                                  {"Authorization": f"Token {self.api_key}"}, self.config, self._encode)
        await session.start()
        return session
