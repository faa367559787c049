"""The pocketsphinx provider on real espeak speech: partials then finals, timings, pool bounds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from engine.errors import Overflow, ProviderUnavailable
from engine.frames import AudioFrame
from pipelines.stt.base import SessionOptions, Transcript
from pipelines.stt.pocketsphinx import PocketsphinxProvider
from tests.speech import synthesize, word_error_rate

SENTENCES = ["please confirm your account number", "can you call me back tomorrow morning"]


@pytest.fixture
async def provider() -> AsyncIterator[PocketsphinxProvider]:
    p = PocketsphinxProvider(max_decoders=1, max_workers=2, acquire_timeout=30)
    yield p
    await p.aclose()


def frames_of(pcm: np.ndarray, start_ms: int = 0) -> list[AudioFrame]:
    pcm = pcm[: len(pcm) // 320 * 320].astype("<i2")
    return [AudioFrame(pcm[i : i + 320].tobytes(), 16000, start_ms + i // 16) for i in range(0, len(pcm), 320)]


async def speak(session, frames: list[AudioFrame]) -> None:  # type: ignore[no-untyped-def]
    for f in frames:
        session.push(f)
        await asyncio.sleep(0)  # let the worker run, as the event loop does between frames
    session.finalize()


class Results(list[Transcript]):
    """The session's emit callback: collects transcripts and wakes whoever waits for finals."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def append(self, item: Transcript) -> None:
        super().append(item)
        self.changed.set()


async def wait_finals(results: Results, n: int, deadline_s: float = 30) -> list[Transcript]:
    async with asyncio.timeout(deadline_s):
        while sum(r.is_final for r in results) < n:
            results.changed.clear()
            await results.changed.wait()
    return [r for r in results if r.is_final]


async def test_partials_then_a_final_with_stream_relative_word_timings(provider: PocketsphinxProvider) -> None:
    results = Results()
    session = await provider.open_session(SessionOptions("c1", phrases=SENTENCES), results.append)
    frames = frames_of(synthesize(SENTENCES[0], rate=16000), start_ms=5000)
    await speak(session, frames)
    (final,) = await wait_finals(results, 1)
    assert any(not r.is_final for r in results[: results.index(final)]), "no partial before the final"
    assert word_error_rate(SENTENCES[0], final.text) <= 0.5, final.text
    assert final.start_ms == 5000 and final.end_ms == frames[-1].end_ms
    starts = [w.start_ms for w in final.words]
    assert starts == sorted(starts)
    assert all(final.start_ms <= w.start_ms < w.end_ms <= final.end_ms for w in final.words)
    assert 0.0 < final.confidence <= 1.0 and final.utterance == 1
    await session.aclose()


async def test_one_decoder_serves_two_sessions_in_turn(provider: PocketsphinxProvider) -> None:
    results = {"a": Results(), "b": Results()}
    a = await provider.open_session(SessionOptions("a", phrases=SENTENCES), results["a"].append)
    b = await provider.open_session(SessionOptions("b", phrases=SENTENCES), results["b"].append)
    await asyncio.gather(speak(a, frames_of(synthesize(SENTENCES[0], rate=16000))),
                         speak(b, frames_of(synthesize(SENTENCES[1], rate=16000))))
    fa, fb = await wait_finals(results["a"], 1), await wait_finals(results["b"], 1)
    pool = await provider.pool(SENTENCES)
    assert pool.created == 1  # the bound held: the second utterance waited for the decoder
    assert word_error_rate(SENTENCES[0], fa[0].text) <= 0.5 and word_error_rate(SENTENCES[1], fb[0].text) <= 0.5
    await a.aclose()
    await b.aclose()


async def test_acquire_times_out_with_provider_unavailable_when_the_pool_is_exhausted() -> None:
    p = PocketsphinxProvider(max_decoders=1, acquire_timeout=0.2)
    try:
        pool = await p.pool(SENTENCES)
        held = await pool.acquire()
        with pytest.raises(ProviderUnavailable, match="no free pocketsphinx decoder"):
            await pool.acquire()
        await pool.release(held)
        assert await pool.acquire() is held  # released decoders are reused, not recreated
    finally:
        await p.aclose()


async def test_push_past_the_buffer_bound_raises_overflow() -> None:
    p = PocketsphinxProvider(max_buffer_ms=1000)
    try:
        session = await p.open_session(SessionOptions("c"), lambda t: None)
        frame = AudioFrame(bytes(640), 16000, 0)
        with pytest.raises(Overflow):
            for _ in range(51):  # 51 x 20 ms > 1000 ms, pushed without yielding to the worker
                session.push(frame)
        await session.aclose()
    finally:
        await p.aclose()


async def test_aclose_delivers_the_open_utterance_and_leaves_no_task(provider: PocketsphinxProvider) -> None:
    before = {t for t in asyncio.all_tasks() if not t.done()}
    results = Results()
    session = await provider.open_session(SessionOptions("c2", phrases=SENTENCES), results.append)
    for f in frames_of(synthesize(SENTENCES[1], rate=16000)):
        session.push(f)
    await session.aclose()  # no finalize(): closing ends the utterance
    assert [r.is_final for r in results].count(True) == 1
    assert {t for t in asyncio.all_tasks() if not t.done()} <= before
    with pytest.raises(Overflow):
        session.push(AudioFrame(bytes(640), 16000, 0))
