"""Providers for tests and benchmarks, obeying the same session contract as real ones.

* ``ScriptedProvider``: says what it is told.  For its n-th utterance a session emits a partial
  (the first half of the n-th scripted text) on the first frame and the n-th text as the final on
  ``finalize()``, with word timings spread evenly over the utterance's audio.  Utterances past the
  end of the script get an empty final.
* ``NullProvider``: the capacity benchmark's no-op recogniser.  It stores no audio; ``finalize()``
  emits an empty final carrying the utterance's span, so the SSE publish path still runs.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.errors import SessionClosed
from engine.frames import AudioFrame
from pipelines.stt.base import Emit, SessionOptions, SttProvider, SttSession, Transcript, Word


class _CountingSession(SttSession):
    """Tracks the open utterance's span; subclasses decide what to emit."""

    max_buffer_ms = 0  # nothing is buffered

    def __init__(self, emit: Emit, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self.frames = 0
        self.utterance = 0
        self._emit = emit
        self._start_ms: int | None = None
        self._end_ms = 0
        self._closed = False

    def push(self, frame: AudioFrame) -> None:
        if self._closed:
            raise SessionClosed("session closed")
        self.frames += 1
        if self._start_ms is None:
            self.utterance += 1
            self._start_ms = frame.timestamp_ms
            self.on_first_frame(frame)
        self._end_ms = frame.end_ms

    def on_first_frame(self, frame: AudioFrame) -> None:
        pass

    def finalize(self) -> None:
        if self._start_ms is None or self._closed:
            return
        start, self._start_ms = self._start_ms, None
        self._emit(self.final(start, self._end_ms))

    def final(self, start_ms: int, end_ms: int) -> Transcript:
        return Transcript("", True, start_ms, end_ms, utterance=self.utterance)

    async def aclose(self, drain_timeout: float = 5.0) -> None:
        if not self._closed:
            self.finalize()
            self._closed = True


class NullProvider(SttProvider):
    name = "null"

    def __init__(self, sample_rate: int = 8000) -> None:
        self.sample_rate = sample_rate

    async def open_session(self, options: SessionOptions, emit: Emit) -> SttSession:
        return _CountingSession(emit, self.sample_rate)


class _ScriptedSession(_CountingSession):
    def __init__(self, emit: Emit, sample_rate: int, script: Sequence[str]) -> None:
        super().__init__(emit, sample_rate)
        self._script = script

    def _text(self) -> str:
        n = self.utterance - 1
        return self._script[n] if n < len(self._script) else ""

    def on_first_frame(self, frame: AudioFrame) -> None:
        words = self._text().split()
        if words:
            partial = " ".join(words[: max(1, len(words) // 2)])
            self._emit(Transcript(partial, False, frame.timestamp_ms, frame.end_ms, utterance=self.utterance))

    def final(self, start_ms: int, end_ms: int) -> Transcript:
        words = self._text().split()
        step = (end_ms - start_ms) / max(1, len(words))
        timed = tuple(
            Word(w, start_ms + int(i * step), start_ms + int((i + 1) * step), 0.9) for i, w in enumerate(words)
        )
        return Transcript(" ".join(words), True, start_ms, end_ms, timed, 0.9 if words else 0.0, self.utterance)


class ScriptedProvider(SttProvider):
    name = "scripted"

    def __init__(self, script: Sequence[str], sample_rate: int = 16000) -> None:
        self.script = list(script)
        self.sample_rate = sample_rate
        self.sessions: list[SttSession] = []

    async def open_session(self, options: SessionOptions, emit: Emit) -> SttSession:
        session = _ScriptedSession(emit, self.sample_rate, self.script)
        self.sessions.append(session)
        return session
