"""The Telnyx media-stream WebSocket endpoint: ``/api/media/telnyx``.

The handler only moves text between the socket and ``TelnyxStreamProtocol`` and hands decoded
audio to the call's ``CallPipeline``.  Every protocol error closes *this* socket with the error's
close code and a logged reason; no other stream shares any state that an error could touch.

``MediaStream`` is the sending side for bidirectional streams (``send_media``, ``send_mark``,
``send_clear``); live streams are registered in ``app[STREAMS]`` by stream id and by call id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

from api.inline_ws import InlineWebSocketResponse
from api.runtime import RUNTIME, Runtime
from api.speech import CallEvents
from api.telnyx_protocol import (
    AUTH_FIELD,
    Dtmf,
    Event,
    MarkPlayed,
    Media,
    Started,
    Stopped,
    StreamFailed,
    TelnyxStreamProtocol,
)
from engine.errors import InternalError, ProtocolError
from engine.frames import Track
from pipelines.call import CallPipeline
from pipelines.recording import CallRecorder

if TYPE_CHECKING:
    from api.persistence import CallRecord
    from pipelines.bridge import AgentBridge

log = logging.getLogger("switchboard.media")


class MediaStream:
    """One live Telnyx stream; the handle later features (the WebRTC bridge) send audio through."""

    def __init__(self, ws: web.WebSocketResponse, protocol: TelnyxStreamProtocol) -> None:
        self.ws = ws
        self.protocol = protocol
        self.pipeline: CallPipeline | None = None
        self.feed: Callable[[Track, bytes, int, int], None] | None = None  # pipeline.feed, once started
        self.rate = 0
        self.call_id = ""
        self.language = "en"  # spoken on the call (?language= on the stream URL)
        self.target: str | None = None  # translated into (?translate_to=, or the policy's default)
        self.events: CallEvents | None = None
        self.record: CallRecord | None = None  # the stored call, when persistence is on
        self.recorder: CallRecorder | None = None
        self.bridge: AgentBridge | None = None  # an agent's WebRTC session hears this call (api.webrtc)
        # Set when the stream must end: the stop reason, or the protocol error to close with.
        self.ending: str | ProtocolError | None = None
        # Frame-lag baseline: the earliest (arrival - audio time) seen; lag is measured against it.
        self._t0: float | None = None

    @property
    def stream_id(self) -> str:
        return self.protocol.stream_id

    async def send_media(self, pcm: bytes) -> None:
        await self.ws.send_str(self.protocol.media(pcm))

    async def send_mark(self, name: str) -> None:
        await self.ws.send_str(self.protocol.mark(name))

    async def send_clear(self) -> None:
        await self.ws.send_str(self.protocol.clear())

    def lag_ms(self, timestamp_ms: int, now: float) -> float:
        base = now - timestamp_ms / 1000.0
        if self._t0 is None or base < self._t0:
            self._t0 = base
        return (base - self._t0) * 1000.0


async def telnyx_media(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    s = rt.settings
    if len(rt.streams) >= s.max_streams:
        log.warning("stream.refused", extra={"reason": "max_streams", "limit": s.max_streams})
        raise web.HTTPServiceUnavailable(text="too many media streams", headers={"Retry-After": "1"})
    language, target = _languages(rt, request)
    token = s.telnyx_stream_token.get_secret_value() if s.telnyx_stream_token else None
    protocol = TelnyxStreamProtocol(
        expected_token=token,
        header_token=request.headers.get(AUTH_FIELD),
        reorder_window=s.reorder_window,
        max_message_bytes=s.max_message_bytes,
    )
    # decode_text=False: text frames arrive as bytes and orjson validates the UTF-8 itself (invalid
    # UTF-8 is then a 1007 from the protocol), sparing a decode per frame.  compress=False: deflate
    # buys nothing on base64 audio and costs CPU on every frame.  Messages are handled inline (see
    # api.inline_ws): the handler task below only wakes to close the socket.
    ws = InlineWebSocketResponse(on_message=lambda msg: _on_message(rt, stream, msg),
                                 max_msg_size=s.max_message_bytes, autoping=True, heartbeat=None,
                                 decode_text=False, compress=False)
    stream = MediaStream(ws, protocol)  # bound before prepare(), so before any message arrives
    stream.language, stream.target = language, target
    await ws.prepare(request)
    key = id(stream)
    rt.streams[key] = stream
    end_reason = "socket closed"
    try:
        end_reason = await _run(rt, stream)
    except ProtocolError as exc:
        end_reason = f"protocol error {exc.close_code}: {exc.reason}"
        log.warning(
            "stream.protocol_error",
            extra={"stream_id": stream.stream_id or None, "call_id": stream.call_id or None,
                   "close_code": exc.close_code, "reason": exc.reason, "remote": request.remote},
        )
        await ws.close(code=exc.close_code, message=exc.reason[:120].encode())
    finally:
        del rt.streams[key]
        await _end_call(rt, stream, end_reason)
    return ws


def _on_message(rt: Runtime, stream: MediaStream, msg: WSMessage) -> bool:
    """Inline path: handle one data message inside data_received.  ``False`` wakes ``_run``."""
    if stream.ending is not None:
        stream.protocol.stats.after_stop += 1  # the stream is closing: what still arrives is counted, dropped
        return True
    try:
        if msg.type is WSMsgType.TEXT:
            events = stream.protocol.receive_text(msg.data)
        else:
            events = stream.protocol.receive_binary(msg.data)
        stream.ending = _dispatch(rt, stream, events)
    except ProtocolError as exc:
        stream.ending = exc
    except Exception as exc:  # a bug must close this stream, not escape into aiohttp's transport
        log.exception("stream.internal_error", extra={"stream_id": stream.stream_id or None})
        stream.ending = InternalError(f"internal error: {type(exc).__name__}")
    return stream.ending is None


async def _run(rt: Runtime, stream: MediaStream) -> str:
    """Wait for the stream to end; data messages only reach here when inline handling is off."""
    ws, protocol = stream.ws, stream.protocol
    while stream.ending is None:
        msg = await ws.receive()
        if stream.ending is not None:
            break
        if msg.type is WSMsgType.TEXT:
            stream.ending = _dispatch(rt, stream, protocol.receive_text(msg.data))
        elif msg.type is WSMsgType.BINARY:
            stream.ending = _dispatch(rt, stream, protocol.receive_binary(msg.data))
        elif msg.type is WSMsgType.ERROR:
            exc = ws.exception()
            # aiohttp has already closed the socket with the error's own code (1009 for size).
            code = getattr(exc, "code", None) or ws.close_code or WSCloseCode.INTERNAL_ERROR
            log.warning("stream.ws_error", extra={"stream_id": stream.stream_id or None,
                                                  "close_code": int(code), "reason": str(exc)})
            return f"websocket error {int(code)}: {exc}"
        elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            for ev in protocol.eof():  # the socket ended without `stop`: deliver what was held back
                if isinstance(ev, Media) and stream.feed is not None:
                    stream.feed(ev.track, ev.pcm, stream.rate, ev.timestamp_ms)
                    if stream.recorder is not None:
                        stream.recorder.write(ev.track, ev.pcm)
            return "socket closed"
    if isinstance(stream.ending, ProtocolError):
        raise stream.ending
    await ws.close(code=WSCloseCode.OK, message=b"stopped")
    return stream.ending


def _dispatch(rt: Runtime, stream: MediaStream, events: list[Event]) -> str | None:
    """Act on protocol events; returns the end reason when the stream stopped."""
    for ev in events:
        if isinstance(ev, Media):
            if stream.feed is not None:
                stream.feed(ev.track, ev.pcm, stream.rate, ev.timestamp_ms)
                if stream.recorder is not None:
                    stream.recorder.write(ev.track, ev.pcm)
            if ev.track is Track.INBOUND:
                if stream.bridge is not None:
                    stream.bridge.consumer_in(ev.pcm)
                if not ev.sequence & 3:  # a 1-in-4 sample is plenty
                    rt.stats.frame_lag.record(stream.lag_ms(ev.timestamp_ms, time.monotonic()))
            rt.stats.frames += 1
        elif isinstance(ev, Started):
            _start_call(rt, stream, ev)
        elif isinstance(ev, Stopped):
            return f"stop: {ev.reason}"
        elif isinstance(ev, Dtmf):
            rt.hub.publish(stream.call_id, "call.dtmf", {"call_id": stream.call_id, "digit": ev.digit})
        elif isinstance(ev, StreamFailed):
            log.warning("stream.telnyx_error", extra={"stream_id": stream.stream_id or None,
                                                      "code": ev.code, "detail": ev.detail})
        elif isinstance(ev, MarkPlayed):
            log.debug("stream.mark", extra={"stream_id": stream.stream_id, "mark": ev.name})
    return None


def _languages(rt: Runtime, request: web.Request) -> tuple[str, str | None]:
    """The call's language and translation target from the stream URL, checked before the upgrade."""
    s = rt.settings
    language = request.query.get("language", s.languages[0])
    if language not in s.languages:
        raise web.HTTPBadRequest(text=f"language must be one of {s.languages}, got {language[:20]!r}")
    target = request.query.get("translate_to") or rt.speech.policy.translate_to.get(language)
    if target == "none":
        target = None
    if target is not None and (target not in s.languages or target == language):
        raise web.HTTPBadRequest(text=f"translate_to must be 'none' or another of {s.languages}, got {target[:20]!r}")
    if rt.translation is None:  # no translator configured: nothing will be translated
        target = None
    return language, target


def _start_call(rt: Runtime, stream: MediaStream, ev: Started) -> None:
    stream.call_id = ev.call_control_id
    rt.calls[stream.call_id] = stream
    rt.stats.streams_total += 1
    rt.hub.start(stream.call_id)
    if rt.persistence is not None:
        stream.record = rt.persistence.call_started(
            call_control_id=ev.call_control_id, call_session_id=ev.call_session_id or None,
            stream_id=ev.stream_id, from_number=ev.from_ or None, to_number=ev.to or None,
            encoding=ev.encoding, sample_rate=ev.sample_rate)
        stream.recorder = stream.record.recorder
    provider = rt.speech.for_language(stream.language)
    stream.events = CallEvents(
        call_id=stream.call_id, stream_id=ev.stream_id, language=stream.language, target=stream.target,
        hub=rt.hub, redactor=rt.redactor, sse_redacted=rt.speech.policy.sse_redacted, provider=provider.name,
        stage=rt.translation, persistence=rt.persistence, record=stream.record)
    stream.rate = ev.sample_rate
    stream.pipeline = CallPipeline(
        call_id=stream.call_id,
        stream_id=ev.stream_id,
        provider=provider,
        publish=stream.events.publish,
        segmenter=rt.segmenter,
        phrases=rt.phrases,
        language=stream.language,
    )
    stream.feed = stream.pipeline.feed
    rt.hub.publish(stream.call_id, "call.started", {
        "call_id": stream.call_id,
        "stream_id": ev.stream_id,
        "call_session_id": ev.call_session_id,
        "encoding": ev.encoding,
        "sample_rate": ev.sample_rate,
        "from": ev.from_,
        "to": ev.to,
        "language": stream.language,
        "translate_to": stream.target,
        "stt_provider": provider.name,
    })
    log.info("stream.started", extra={"stream_id": ev.stream_id, "call_id": stream.call_id,
                                      "encoding": ev.encoding, "sample_rate": ev.sample_rate})
    if rt.agents is not None:
        rt.agents.stream_started(stream)  # an agent who joined the call first is bridged now


async def _end_call(rt: Runtime, stream: MediaStream, reason: str) -> None:
    if not stream.call_id:
        return
    if rt.agents is not None:
        await rt.agents.stream_ended(stream)  # first: the bridge must stop sending on a closing socket
    pipeline = stream.pipeline
    stats: dict[str, int] = {}
    if pipeline is not None:
        try:
            await asyncio.shield(pipeline.aclose())
        except asyncio.CancelledError:
            pass  # the server is shutting down; aclose goes on under the shield
        stats = {k: getattr(pipeline.stats, k) for k in pipeline.stats.__slots__}  # type: ignore[attr-defined]
    if stream.events is not None:
        # Translations of the last finals, so live clients see them before call.ended.
        if not await stream.events.drain(rt.settings.translation_deadline_s + 1.0):
            log.warning("stream.translations_pending", extra={"call_id": stream.call_id})
        stats["redactions"] = stream.events.redactions
    p = stream.protocol.stats
    stats.update(late_frames=p.late, lost_frames=p.lost, unknown_track=p.unknown_track)
    rt.hub.publish(stream.call_id, "call.ended", {"call_id": stream.call_id, "stream_id": stream.stream_id,
                                                  "reason": reason, "stats": stats})
    rt.hub.end(stream.call_id)
    if rt.persistence is not None and stream.record is not None:
        failed = not (reason.startswith("stop") or reason == "socket closed")
        rt.persistence.call_ended(stream.record, reason=reason, failed=failed, stats=stats)
    if rt.calls.get(stream.call_id) is stream:
        del rt.calls[stream.call_id]
    log.info("stream.ended", extra={"stream_id": stream.stream_id, "call_id": stream.call_id,
                                    "reason": reason, **stats})
