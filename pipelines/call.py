"""The per-call pipeline: decoded audio in, transcript events out.

    Media (per track) -> 20 ms AudioFrames -> Segmenter (webrtcvad)
        -> utterance audio -> Resampler (to the provider's rate) -> SttSession.push
        -> utterance end   -> SttSession.finalize
    SttSession emit -> Publish(TranscriptEvent)   (and SttLagging, SttRecovered, SttFailed, SttFailover)

``feed`` runs synchronously on the event loop in the WebSocket reader: VAD and segmentation cost a
few microseconds per frame, and the only buffer on this path is the session's own, declared bound
(``SttSession.max_buffer_ms``).  When a session refuses a frame (its recogniser fell behind), the
frame is counted in ``stats.stt_dropped`` and the utterance goes on: the rule is "never block the
stream, never hide a loss".  The first refusal of a run publishes ``stt.lagging``; the first frame
accepted again publishes ``stt.recovered`` with how many frames were shed meanwhile.
Sessions are opened lazily per track on a task kept in ``_tasks``;
frames that arrive while a session is opening wait in a bounded backlog (``open_backlog_ms``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.errors import Overflow, ProviderError, SessionClosed, SwitchboardError
from engine.frames import FRAME_MS, AudioFrame, Track, frame_bytes
from engine.resample import Resampler
from engine.segmenter import Segmenter, SegmenterConfig, SpeechStarted, UtteranceAudio, UtteranceEnded
from pipelines.events import Event, SttFailed, SttFailover, SttLagging, SttRecovered, TranscriptEvent
from pipelines.stt.base import SessionOptions, SttProvider, SttSession, Transcript
from pipelines.stt.failover import FailoverProvider

log = logging.getLogger("switchboard.call")

Publish = Callable[[Event], None]
"""Takes a typed event (``pipelines.events``); must not block."""

ENDED_KEPT = 16  # utterance ends awaiting their finals, per track (older ones fall off: not measured)

@dataclass(slots=True)
class CallStats:
    frames: int = 0
    speech_frames: int = 0
    utterances: int = 0
    stt_dropped: int = 0
    partials: int = 0
    finals: int = 0
    stt_errors: int = 0
    stt_failovers: int = 0
    stt_failed_utterances: int = 0  # utterances the recogniser owed a final for and could not deliver


class _Track:
    """Segmenter, resampler and recogniser session of one track."""

    def __init__(self, track: Track, rate: int, seg: SegmenterConfig, provider_rate: int, backlog: int) -> None:
        self.track = track
        self.rate = rate
        self.frame_len = frame_bytes(rate)
        self.segmenter = Segmenter(seg)
        self.resampler = Resampler(rate, provider_rate)
        self.session: SttSession | None = None
        self.failed = False
        self.behind = 0  # frames refused in a row by a recogniser that fell behind (0 = keeping up)
        # Frames (or finalize markers, None) waiting while the session opens.
        self.backlog: deque[AudioFrame | None] = deque(maxlen=backlog)
        # When each utterance still owed a final ended (monotonic s), oldest first: finals come in order.
        self.ended_at: deque[float] = deque(maxlen=ENDED_KEPT)


class CallPipeline:
    def __init__(
        self,
        *,
        call_id: str,
        stream_id: str,
        provider: SttProvider,
        publish: Publish,
        segmenter: SegmenterConfig | None = None,
        phrases: tuple[str, ...] = (),
        language: str = "en",
        open_backlog_ms: int = 5000,
        on_final_latency: Callable[[str, float], None] | None = None,
    ) -> None:
        self.call_id = call_id
        self.stream_id = stream_id
        self.stats = CallStats()
        self._provider = provider
        self._publish = publish
        self._seg_config = segmenter or SegmenterConfig()
        self._phrases = phrases
        self._language = language
        self._backlog = max(1, open_backlog_ms // FRAME_MS)
        self._tracks: dict[Track, _Track] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        # (provider name, seconds from the end of an utterance to its final): api.metrics' time to final.
        self._on_final_latency = on_final_latency
        self.on_closed: Callable[[CallPipeline], None] | None = None  # once, when aclose is done

    def feed(self, track: Track, pcm: bytes, sample_rate: int, timestamp_ms: int) -> None:
        """Take decoded PCM (a whole number of 20 ms frames) of one track.  Never blocks."""
        t = self._tracks.get(track)
        if t is None:
            t = self._open_track(track, sample_rate)
        n = t.frame_len
        if len(pcm) == n:  # the usual single 20 ms frame
            self.stats.frames += 1
            events = t.segmenter.process(AudioFrame(pcm, sample_rate, timestamp_ms, track))
            if events:
                self._on_segments(t, events)
            return
        for off in range(0, len(pcm), n):
            frame = AudioFrame(pcm[off : off + n], sample_rate, timestamp_ms + off // n * FRAME_MS, track)
            self.stats.frames += 1
            events = t.segmenter.process(frame)
            if events:
                self._on_segments(t, events)

    async def aclose(self, drain_timeout: float = 5.0) -> None:
        """End open utterances, let sessions deliver their finals, and release everything."""
        if self._closed:
            return
        self._closed = True
        for t in self._tracks.values():
            self._on_segments(t, t.segmenter.flush())
        if self._tasks:  # sessions still opening: give them the drain time, then cancel
            _, pending = await asyncio.wait(self._tasks, timeout=drain_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        # Tracks drain together: their owed finals share the decoders, and their waits must not add up.
        sessions = [t.session for t in self._tracks.values() if t.session is not None]
        for t in self._tracks.values():
            t.session = None
        try:
            await asyncio.gather(*(s.aclose(drain_timeout) for s in sessions))
        finally:
            if self.on_closed is not None:
                self.on_closed(self)

    # -- internals -------------------------------------------------------------------------------

    def _open_track(self, track: Track, rate: int) -> _Track:
        t = _Track(track, rate, self._seg_config, self._provider.sample_rate, self._backlog)
        self._tracks[track] = t
        task = asyncio.get_running_loop().create_task(self._open_session(t), name=f"stt-open-{track}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return t

    async def _open_session(self, t: _Track) -> None:
        options = SessionOptions(self.call_id, t.track, self._language, self._phrases)
        emit = lambda tr: self._on_transcript(t, tr)  # noqa: E731
        try:
            if isinstance(self._provider, FailoverProvider):
                session: SttSession = await self._provider.open_session(
                    options, emit, on_switch=lambda a, b, why: self._on_switch(t, a, b, why))
            else:
                session = await self._provider.open_session(options, emit)
        except (SwitchboardError, OSError) as exc:
            t.failed = True
            self.stats.stt_errors += 1
            log.warning("stt.open_failed", extra={"call_id": self.call_id, "track": t.track.value,
                                                   "provider": self._provider.name, "error": str(exc)})
            return
        t.session = session
        session.on_failure = lambda exc: self._on_failure(t, exc)
        session.on_utterance_failed = lambda seq, reason: self._on_utterance_failed(t, seq, reason)
        while t.backlog:
            item = t.backlog.popleft()
            if item is None:
                session.finalize()
            else:
                self._push(t, item)

    def _on_switch(self, t: _Track, old: str, new: str, reason: str) -> None:
        self.stats.stt_failovers += 1
        self._publish(SttFailover(self.call_id, self.stream_id, t.track.value, old, new, reason[:200]))

    def _on_failure(self, t: _Track, exc: ProviderError) -> None:
        """The track's recogniser is gone for good: say so; its audio is counted as dropped from now."""
        t.failed = True
        self.stats.stt_errors += 1
        log.warning("stt.session_failed", extra={"call_id": self.call_id, "track": t.track.value,
                                                  "provider": self._provider.name, "error": str(exc)})
        self._publish(SttFailed(self.call_id, self.stream_id, t.track.value, str(exc)[:200]))

    def _on_utterance_failed(self, t: _Track, seq: int, reason: str) -> None:
        """One utterance got no final (the session logged why): say so; the session goes on."""
        self.stats.stt_failed_utterances += 1
        if t.ended_at:
            t.ended_at.popleft()
        self._publish(SttFailed(self.call_id, self.stream_id, t.track.value, reason[:200], seq))

    def _on_segments(self, t: _Track, events: Any) -> None:
        for ev in events:
            if isinstance(ev, UtteranceAudio):
                self.stats.speech_frames += 1
                self._push(t, ev.frame)
            elif isinstance(ev, UtteranceEnded):
                t.ended_at.append(time.monotonic())
                if t.session is not None:
                    t.session.finalize()
                elif not t.failed:
                    self._wait_in_backlog(t, None)
            elif isinstance(ev, SpeechStarted):
                self.stats.utterances += 1
                t.resampler.reset()  # utterances are not contiguous audio: no filter history across them

    def _push(self, t: _Track, frame: AudioFrame) -> None:
        session = t.session
        if session is None:
            if t.failed:
                self.stats.stt_dropped += 1
            else:
                self._wait_in_backlog(t, frame)
            return
        if t.resampler.identity:
            out = frame
        else:
            out = AudioFrame(t.resampler.process(frame.pcm), session.sample_rate, frame.timestamp_ms, frame.track)
        try:
            session.push(out)
        except SessionClosed:  # the session has ended (its failure was reported once): not lag
            self.stats.stt_dropped += 1
            return
        except Overflow as exc:
            self.stats.stt_dropped += 1
            if not t.behind and not t.failed:
                self._publish(SttLagging(self.call_id, self.stream_id, t.track.value, self._provider.name,
                                         str(exc)[:200]))
            t.behind += 1
            return
        if t.behind:
            self._publish(SttRecovered(self.call_id, self.stream_id, t.track.value, t.behind))
            t.behind = 0

    def _wait_in_backlog(self, t: _Track, item: AudioFrame | None) -> None:
        if len(t.backlog) == t.backlog.maxlen:
            self.stats.stt_dropped += 1  # the oldest waiting item falls off, counted
        t.backlog.append(item)

    def _on_transcript(self, t: _Track, tr: Transcript) -> None:
        if tr.is_final:
            self.stats.finals += 1
            if t.ended_at:
                ended = t.ended_at.popleft()
                if self._on_final_latency is not None:
                    self._on_final_latency(self._provider.name, time.monotonic() - ended)
        else:
            self.stats.partials += 1
        self._publish(TranscriptEvent(self.call_id, self.stream_id, t.track.value, tr.text, tr.words, tr.confidence,
                                      tr.utterance, tr.start_ms, tr.end_ms, tr.is_final, self._language))
