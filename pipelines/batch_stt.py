"""Transcribing a stored recording after the call with a streaming recogniser (the local one).

A recording is not a live stream: nothing is late, so nothing needs dropping.  Each channel is cut
into utterances by the same VAD segmenter as the live path (``engine.segmenter``), resampled to the
provider's rate, and handed to one recogniser session one utterance at a time: push the utterance's
frames (when the session's buffer is full, wait and push again instead of dropping), ``finalize``,
then wait for that utterance's final (or its reported failure) before the next.  So the work queued
at the recogniser is at most one utterance per channel, whatever the recording's length, and a batch
never fills the queue that live calls' finals wait in.

Bounds: an utterance is cut at the segmenter's maximum length, as live; each final is awaited at
most ``final_timeout_s`` (then the utterance counts as failed and the channel goes on); the caller
bounds the whole run.

Output: per channel, the finals in order (``Transcript``, times relative to the recording's start),
and counts of utterances that got no final.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from engine.errors import Overflow
from engine.frames import FRAME_MS, AudioFrame, Track
from engine.resample import Resampler
from engine.segmenter import Segmenter, SegmenterConfig, SpeechStarted, UtteranceAudio, UtteranceEnded
from pipelines.stt.base import SessionOptions, SttProvider, SttSession, Transcript

PUSH_RETRY_S = 0.02  # a full session buffer is retried this often


@dataclass(slots=True)
class ChannelResult:
    finals: list[Transcript] = field(default_factory=list)
    utterances: int = 0
    failed: int = 0


async def transcribe_channel(provider: SttProvider, pcm: np.ndarray, rate: int, *, call_id: str, track: Track,
                             language: str, segmenter: SegmenterConfig | None = None, phrases: tuple[str, ...] = (),
                             final_timeout_s: float = 60.0) -> ChannelResult:
    """Finals of one channel (``pcm``: int16 samples at ``rate``)."""
    run = _Channel(final_timeout_s)
    run.session = await provider.open_session(SessionOptions(call_id, track, language, phrases), run.emit)
    run.session.on_utterance_failed = run.failed
    seg = Segmenter(segmenter or SegmenterConfig())
    run.resampler = Resampler(rate, provider.sample_rate)
    frame_len = rate * FRAME_MS // 1000
    samples = np.ascontiguousarray(pcm, dtype="<i2")
    try:
        for i in range(0, len(samples) - frame_len + 1, frame_len):
            frame = AudioFrame(samples[i:i + frame_len].tobytes(), rate, i * 1000 // rate, track)
            for ev in seg.process(frame):
                await run.handle(ev)
        for ev in seg.flush():
            await run.handle(ev)
    finally:
        await run.session.aclose(final_timeout_s)
    run.out.finals.sort(key=lambda t: t.start_ms)
    return run.out


class _Channel:
    """One channel's session, with at most one utterance outstanding at the recogniser."""

    def __init__(self, final_timeout_s: float) -> None:
        self.out = ChannelResult()
        self.timeout = final_timeout_s
        self.session: SttSession = None  # type: ignore[assignment]  # set right after construction
        self.resampler: Resampler = None  # type: ignore[assignment]
        self.pushed = 0  # frames pushed in the open utterance
        self.waiting: asyncio.Future[None] | None = None

    def _answered(self) -> None:
        if self.waiting is not None and not self.waiting.done():
            self.waiting.set_result(None)

    def emit(self, tr: Transcript) -> None:
        if tr.is_final:
            self.out.finals.append(tr)
            self._answered()

    def failed(self, _seq: int, _reason: str) -> None:
        self.out.failed += 1
        self._answered()

    async def handle(self, ev: object) -> None:
        if isinstance(ev, SpeechStarted):
            self.out.utterances += 1
            self.resampler.reset()
            self.pushed = 0
        elif isinstance(ev, UtteranceAudio):
            f = ev.frame
            s = self.session
            frame = f if self.resampler.identity else AudioFrame(self.resampler.process(f.pcm), s.sample_rate,
                                                                 f.timestamp_ms, f.track)
            while True:
                try:
                    s.push(frame)
                    break
                except Overflow:
                    await asyncio.sleep(PUSH_RETRY_S)
            self.pushed += 1
        elif isinstance(ev, UtteranceEnded) and self.pushed:
            self.waiting = asyncio.get_running_loop().create_future()
            self.session.finalize()
            try:
                await asyncio.wait_for(self.waiting, self.timeout)
            except TimeoutError:
                self.out.failed += 1
            self.waiting = None
