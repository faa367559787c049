"""The real Deepgram client against ``tests/fakes/deepgram.py`` (no patching)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from engine.errors import Overflow, ProviderUnavailable, SessionClosed
from pipelines.stt.base import SessionOptions
from pipelines.stt.deepgram import DeepgramProvider
from tests.fakes.deepgram import FakeDeepgram
from tests.pipelines.cloud_harness import MULAW, Harness, client_tasks, frames, speech, until

KEY = "test-key"
SCRIPT = ["hello there agent", "my card is blocked", "thank you"]


@pytest.fixture
async def fake() -> AsyncIterator[FakeDeepgram]:
    server = FakeDeepgram(SCRIPT, api_key=KEY)
    await server.start()
    yield server
    await server.stop()


def harness(fake: FakeDeepgram, api_key: str = KEY, **kwargs: Any) -> Harness:
    opts: dict[str, Any] = {"backoff_s": (0.01, 0.05), "connect_timeout": 2.0} | kwargs
    return Harness(DeepgramProvider(api_key, url=fake.url, **opts), SessionOptions("call-1", language="en-GB"))


async def test_final_concatenates_is_final_segments_with_stream_relative_word_times(fake: FakeDeepgram) -> None:
    h = harness(fake)
    await h.open()
    h.say(speech(1200, 1), 0)
    await until(lambda: len(h.finals()) == 1)
    h.say(speech(1600, 2), 5000)  # the provider hears it right after utterance 1, at its 1.2 s
    await until(lambda: len(h.finals()) == 2)
    await asyncio.sleep(0.1)
    await h.close()

    first, second = h.finals()
    assert (first.text, first.utterance, first.start_ms, first.end_ms) == ("hello there agent", 1, 0, 1200)
    assert (second.text, second.utterance, second.start_ms, second.end_ms) == ("my card is blocked", 2, 5000, 6600)
    assert [(w.start_ms, w.end_ms) for w in first.words] == [(0, 400), (400, 800), (800, 1200)]
    assert [w.start_ms for w in second.words] == [5000, 5400, 5800, 6200]
    partials = [t.text for t in h.out if t.utterance == 1 and not t.is_final]
    assert partials == ["hello", "hello there", "hello there agent"]  # committed segment + interim
    for n in (1, 2):
        mine = [t for t in h.out if t.utterance == n]
        assert mine[-1].is_final and sum(t.is_final for t in mine) == 1
    assert len(fake.connections) == 1


async def test_mulaw_passthrough_with_auth_and_query(fake: FakeDeepgram) -> None:
    h = harness(fake, model="nova-3")
    await h.open(phrases=("card blocked",))
    pcm = speech(1000, 3)
    h.say(pcm, 0)
    await until(lambda: h.finals())
    await h.close()

    conn = fake.connections[0]
    assert bytes(conn.audio) == MULAW.encode(pcm)
    assert conn.headers["Authorization"] == f"Token {KEY}"
    assert {k: conn.query[k] for k in ("encoding", "sample_rate", "interim_results", "endpointing",
                                       "utterance_end_ms", "vad_events", "language", "model", "keyterm")} == {
        "encoding": "mulaw", "sample_rate": "8000", "interim_results": "true", "endpointing": "300",
        "utterance_end_ms": "1000", "vad_events": "true", "language": "en-GB", "model": "nova-3",
        "keyterm": "card blocked"}
    assert [m["type"] for m in conn.messages if isinstance(m, dict)] == ["Finalize", "CloseStream"]


async def test_keepalives_keep_an_idle_socket_open(fake: FakeDeepgram) -> None:
    fake.idle_timeout = 0.5
    h = harness(fake, keepalive_s=0.1)
    await h.open()
    h.say(speech(400, 4), 0)
    await asyncio.sleep(1.5)
    h.say(speech(800, 5), 3000)
    await until(lambda: len(h.finals()) == 2)
    await h.close()
    assert len(fake.connections) == 1
    assert len(fake.connections[0].sent("KeepAlive")) >= 8


async def test_idle_close_net0001_reconnects_and_the_next_utterance_works(fake: FakeDeepgram) -> None:
    fake.idle_timeout = 0.3
    h = harness(fake, keepalive_s=30.0)
    await h.open()
    await until(lambda: len(fake.connections) >= 2)
    assert fake.connections[0].close_code == 1011
    h.say(speech(1200, 6), 0)
    await until(lambda: h.finals())
    await h.close()
    assert h.finals()[0].text == "hello there agent" and not h.failures


@pytest.mark.parametrize("code", [None, 1011])
async def test_dropped_connection_mid_utterance_reconnects_and_replays_it(fake: FakeDeepgram, code: int | None) -> None:
    h = harness(fake)
    await h.open()
    h.say(speech(1200, 7), 0)
    await until(lambda: h.finals())
    fake.drop_after(len(fake.connections[0].audio) + 4800, code)  # 600 ms into utterance 2
    pcm = speech(1600, 8)
    h.say(pcm, 5000)
    await until(lambda: len(h.finals()) == 2)
    await h.close()

    second = h.finals()[1]
    assert second.text == "my card is blocked"  # no word lost, none doubled
    assert [w.start_ms for w in second.words] == [5000, 5400, 5800, 6200]
    assert len(fake.connections) == 2 and not h.failures
    assert bytes(fake.connections[1].audio).startswith(MULAW.encode(pcm))
    assert sum(t.is_final and t.utterance == 2 for t in h.out) == 1


async def test_wrong_api_key_401_makes_open_session_raise_without_retrying(fake: FakeDeepgram) -> None:
    h = harness(fake, api_key="wrong")
    with pytest.raises(ProviderUnavailable, match="401"):
        await h.open()
    await h.close()
    assert fake.attempts == 1


async def test_refused_reconnects_beyond_max_reconnects_fail_once_then_push_overflows(fake: FakeDeepgram) -> None:
    h = harness(fake, max_reconnects=3)
    session = await h.open()
    fake.refuse_next = 10
    fake.drop_after(800, 1011)
    h.say(speech(400, 9), 0)
    await until(lambda: h.failures)
    await asyncio.sleep(0.2)
    assert len(h.failures) == 1 and isinstance(session.failure, ProviderUnavailable)
    assert fake.attempts == 1 + 3
    assert session.failed_utterances == 1 and not h.finals()
    with pytest.raises(SessionClosed):
        session.push(frames(speech(20, 10), 3000)[0])
    await h.close()


async def test_stalled_provider_bounds_the_buffer_and_aclose_still_returns(fake: FakeDeepgram) -> None:
    h = harness(fake, sample_rate=16000, encoding="linear16", max_buffer_ms=1000)
    session = await h.open()
    fake.stall_after(0)
    pcm = speech(1000, 11, rate=16000)
    overflowed = False
    for second in range(600):
        try:
            for f in frames(pcm, second * 1000, rate=16000):
                session.push(f)
        except Overflow:
            overflowed = True
            break
        await asyncio.sleep(0.002)
    assert overflowed and session._pending_ms <= 1000  # type: ignore[attr-defined]
    started = time.monotonic()
    await session.aclose(drain_timeout=0.3)
    assert time.monotonic() - started < 0.5
    await h.provider.aclose()


async def test_aclose_sends_closestream_within_drain_timeout_and_leaves_no_tasks(fake: FakeDeepgram) -> None:
    before = client_tasks()
    h = harness(fake)
    session = await h.open()
    for f in frames(speech(800, 12), 0):
        session.push(f)
    started = time.monotonic()
    await session.aclose(drain_timeout=1.0)
    assert time.monotonic() - started < 1.0
    await h.provider.aclose()
    assert client_tasks() == before
    assert [m["type"] for m in fake.connections[0].messages if isinstance(m, dict)] == ["Finalize", "CloseStream"]
    assert [(t.text, t.utterance) for t in h.finals()] == [("hello there", 1)]
