"""The per-call pipeline with the scripted recogniser: events, numbering, backlog while opening."""

from __future__ import annotations

import asyncio
from typing import Any

from engine.errors import Overflow
from engine.frames import AudioFrame, Track
from pipelines.call import CallPipeline
from pipelines.events import Event
from pipelines.stt.base import Emit, SessionOptions, SttProvider, SttSession
from pipelines.stt.scripted import ScriptedProvider
from tests.speech import utterances_with_pauses


def as_tuple(ev: Event) -> tuple[str, dict[str, Any], bool, str]:
    """What the hub takes from an event: its wire name, JSON object, delivery class and key."""
    return ev.name, ev.payload(), ev.droppable, ev.key

TEXTS = ["please confirm your account number", "can you call me back tomorrow morning"]


async def test_two_utterances_give_partials_and_finals_in_order_with_resampled_audio() -> None:
    published: list[tuple[str, dict[str, Any], bool, str]] = []
    provider = ScriptedProvider(["first one", "second one here"], sample_rate=16000)
    pipe = CallPipeline(call_id="c", stream_id="s", provider=provider,
                        publish=lambda ev: published.append(as_tuple(ev)))
    pcm = utterances_with_pauses(TEXTS, pause_ms=900, rate=8000)
    pcm = pcm[: len(pcm) // 160 * 160].astype("<i2").tobytes()
    for i in range(0, len(pcm), 320):
        pipe.feed(Track.INBOUND, pcm[i : i + 320], 8000, i // 16)
        await asyncio.sleep(0)  # as the event loop runs between frames: the session opens at once
    await pipe.aclose()
    finals = [p for e, p, d, _ in published if e == "transcript.final"]
    partials = [(p, d) for e, p, d, _ in published if e == "transcript.partial"]
    assert [f["text"] for f in finals] == ["first one", "second one here"]
    assert [f["seq"] for f in finals] == [1, 2] and all(f["track"] == "inbound" for f in finals)
    assert partials and all(droppable for _, droppable in partials)
    assert pipe.stats.stt_dropped == 0 and pipe.stats.utterances == 2
    assert provider.sessions[0].sample_rate == 16000  # 8 kHz audio was upsampled for it
    assert finals[0]["end"] < finals[1]["start"]


async def test_frames_beyond_the_open_backlog_are_dropped_and_counted() -> None:
    published: list[Any] = []
    pipe = CallPipeline(call_id="c", stream_id="s", provider=ScriptedProvider(["a", "b"]),
                        publish=lambda ev: published.append(as_tuple(ev)), open_backlog_ms=1000)
    pcm = utterances_with_pauses(TEXTS, pause_ms=900, rate=8000)
    pcm = pcm[: len(pcm) // 160 * 160].astype("<i2").tobytes()
    for i in range(0, len(pcm), 320):  # no yield: the session cannot open while this runs
        pipe.feed(Track.INBOUND, pcm[i : i + 320], 8000, i // 16)
    # Everything waiting (speech frames and 2 utterance-end markers) beyond 1 s (50 items) is counted.
    assert pipe.stats.stt_dropped == pipe.stats.speech_frames + 2 - 50
    await pipe.aclose()


class _BehindSession(SttSession):
    """A recogniser whose send buffer is full for ``refuse`` frames once it has taken ``after``."""

    sample_rate = 8000
    max_buffer_ms = 200

    def __init__(self, after: int, refuse: int) -> None:
        self.taken = 0
        self.refused = 0
        self._after, self._refuse = after, refuse

    def push(self, frame: AudioFrame) -> None:
        if self.taken >= self._after and self.refused < self._refuse:
            self.refused += 1
            raise Overflow("send buffer full (200 ms)")
        self.taken += 1

    def finalize(self) -> None:
        pass

    async def aclose(self, drain_timeout: float = 5.0) -> None:
        pass


class _BehindProvider(SttProvider):
    name = "behind"
    sample_rate = 8000

    async def open_session(self, options: SessionOptions, emit: Emit) -> SttSession:
        return _BehindSession(after=10, refuse=30)


async def speak_and_close(pipe: CallPipeline) -> None:
    """The TEXTS as 8 kHz speech in 40 ms chunks, letting the loop run between them, then close."""
    pcm = utterances_with_pauses(TEXTS, pause_ms=900, rate=8000)
    pcm = pcm[: len(pcm) // 160 * 160].astype("<i2").tobytes()
    for i in range(0, len(pcm), 320):
        pipe.feed(Track.INBOUND, pcm[i : i + 320], 8000, i // 16)
        await asyncio.sleep(0)
    await pipe.aclose()


async def test_a_recogniser_that_falls_behind_is_reported_once_then_recovery_with_the_count() -> None:
    published: list[tuple[str, dict[str, Any], bool, str]] = []
    pipe = CallPipeline(call_id="c", stream_id="s", provider=_BehindProvider(),
                        publish=lambda ev: published.append(as_tuple(ev)))
    await speak_and_close(pipe)
    names = [e for e, *_ in published]
    assert names.count("stt.lagging") == 1 and names.count("stt.recovered") == 1
    assert names.index("stt.lagging") < names.index("stt.recovered")
    lagging = next(p for e, p, *_ in published if e == "stt.lagging")
    recovered = next(p for e, p, *_ in published if e == "stt.recovered")
    assert (lagging["provider"], lagging["track"]) == ("behind", "inbound") and "buffer full" in lagging["reason"]
    assert recovered["dropped_frames"] == 30 == pipe.stats.stt_dropped


class _RefusingSession(_BehindSession):
    """Takes every frame, and reports every utterance as failed at its end (a full decode queue)."""

    def __init__(self) -> None:
        super().__init__(after=0, refuse=0)
        self.seq = 0

    def finalize(self) -> None:
        self.seq += 1
        self.utterance_failed(self.seq, "speech-to-text queue full")


class _RefusingProvider(_BehindProvider):
    async def open_session(self, options: SessionOptions, emit: Emit) -> SttSession:
        return _RefusingSession()


async def test_a_failed_utterance_is_published_as_stt_failed_with_its_seq_and_counted() -> None:
    published: list[tuple[str, dict[str, Any], bool, str]] = []
    pipe = CallPipeline(call_id="c", stream_id="s", provider=_RefusingProvider(),
                        publish=lambda ev: published.append(as_tuple(ev)))
    await speak_and_close(pipe)
    failed = [(p, droppable) for e, p, droppable, _ in published if e == "stt.failed"]
    assert [p for p, _ in failed] == [
        {"call_id": "c", "stream_id": "s", "track": "inbound", "seq": n, "reason": "speech-to-text queue full"}
        for n in (1, 2)]
    assert not any(droppable for _, droppable in failed)
    assert pipe.stats.stt_failed_utterances == 2 and pipe.stats.stt_errors == 0
