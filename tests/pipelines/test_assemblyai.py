"""The real AssemblyAI client against ``tests/fakes/assemblyai.py`` (no patching)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from engine.errors import Overflow, ProviderUnavailable, SessionClosed
from pipelines.stt.assemblyai import AssemblyAIProvider
from pipelines.stt.base import SessionOptions
from tests.fakes.assemblyai import FakeAssemblyAI
from tests.pipelines.cloud_harness import MULAW, Harness, client_tasks, frames, speech, until

KEY = "test-key"
SCRIPT = ["hello there agent", "my card is blocked", "thank you"]
@pytest.fixture
async def fake() -> AsyncIterator[FakeAssemblyAI]:
    server = FakeAssemblyAI(SCRIPT, api_key=KEY)
    await server.start()
    yield server
    await server.stop()


def harness(fake: FakeAssemblyAI, api_key: str = KEY, **kwargs: Any) -> Harness:
    opts: dict[str, Any] = {"keepalive_s": 5.0, "backoff_s": (0.01, 0.05), "connect_timeout": 2.0} | kwargs
    return Harness(AssemblyAIProvider(api_key, url=fake.url, **opts), SessionOptions("call-1"))


async def test_partials_then_one_final_per_utterance_with_stream_relative_word_times(fake: FakeAssemblyAI) -> None:
    h = harness(fake)
    await h.open()
    h.say(speech(1200, 1), 0)
    await until(lambda: len(h.finals()) == 1)
    h.say(speech(1600, 2), 5000)  # the provider hears it right after utterance 1, at its 1200 ms
    await until(lambda: len(h.finals()) == 2)
    await asyncio.sleep(0.1)
    await h.close()

    first, second = h.finals()
    assert (first.text, first.utterance, first.start_ms, first.end_ms) == ("Hello there agent.", 1, 0, 1200)
    assert (second.text, second.utterance, second.start_ms, second.end_ms) == ("My card is blocked.", 2, 5000, 6600)
    assert [(w.start_ms, w.end_ms) for w in first.words] == [(0, 400), (400, 800), (800, 1200)]
    assert [w.start_ms for w in second.words] == [5000, 5400, 5800, 6200]
    for n in (1, 2):
        mine = [t for t in h.out if t.utterance == n]
        assert [t.is_final for t in mine][-1] and sum(t.is_final for t in mine) == 1
        assert len(mine) >= 3 and not any(t.is_final for t in mine[:-1])  # partials first
    assert len(fake.connections) == 1


async def test_mulaw_passthrough_in_50ms_chunks_with_auth_and_query(fake: FakeAssemblyAI) -> None:
    h = harness(fake)
    await h.open(phrases=("card blocked", "Switchboard"))
    pcm = speech(1000, 3)
    h.say(pcm, 0)
    await until(lambda: h.finals())
    await h.close()

    conn = fake.connections[0]
    assert bytes(conn.audio) == MULAW.encode(pcm)  # 1000 ms: whole 50 ms chunks, no padding
    assert set(conn.chunks) == {400}
    assert conn.headers["Authorization"] == KEY
    assert conn.query["sample_rate"] == "8000" and conn.query["encoding"] == "pcm_mulaw"
    assert conn.query["format_turns"] == "true"
    assert json.loads(conn.query["keyterms_prompt"]) == ["card blocked", "Switchboard"]
    assert [m["type"] for m in conn.messages if isinstance(m, dict)] == ["ForceEndpoint", "Terminate"]


async def test_short_last_chunk_is_padded_to_50ms(fake: FakeAssemblyAI) -> None:
    h = harness(fake)
    await h.open()
    h.say(speech(420, 4), 0)  # 8 chunks of 50 ms + 20 ms left
    await until(lambda: h.finals())
    await h.close()
    assert fake.connections[0].chunks == [400] * 9


async def test_keepalives_flow_during_an_idle_gap_without_reconnecting(fake: FakeAssemblyAI) -> None:
    h = harness(fake, keepalive_s=0.2)
    await h.open()
    h.say(speech(400, 5), 0)
    await asyncio.sleep(1.1)
    await h.close()
    assert len(fake.connections[0].sent("KeepAlive")) >= 4
    assert len(fake.connections) == 1


@pytest.mark.parametrize("code", [None, 1011, 3005, 3008])
async def test_drop_mid_utterance_reconnects_and_replays_it(fake: FakeAssemblyAI, code: int | None) -> None:
    h = harness(fake)
    await h.open()
    h.say(speech(1200, 6), 0)
    await until(lambda: h.finals())
    fake.drop_after(len(fake.connections[0].audio) + 4800, code)  # 600 ms into utterance 2
    pcm = speech(1600, 7)
    h.say(pcm, 5000)
    await until(lambda: len(h.finals()) == 2)
    await h.close()

    second = h.finals()[1]
    assert second.text == "My card is blocked."  # every word needs its audio: nothing was lost
    assert [w.start_ms for w in second.words] == [5000, 5400, 5800, 6200]
    assert len(fake.connections) == 2 and not h.failures
    assert bytes(fake.connections[1].audio).startswith(MULAW.encode(pcm))  # replayed from its start
    assert sum(t.is_final and t.utterance == 2 for t in h.out) == 1


async def test_wrong_api_key_makes_open_session_raise_without_retrying(fake: FakeAssemblyAI) -> None:
    h = harness(fake, api_key="wrong")
    with pytest.raises(ProviderUnavailable, match="4001"):
        await h.open()
    await h.close()
    assert fake.attempts == 1


async def test_input_validation_error_3006_fails_the_session_at_once(fake: FakeAssemblyAI) -> None:
    h = harness(fake)
    session = await h.open()
    fake.error_after(800, 3006)
    h.say(speech(400, 8), 0)
    await until(lambda: h.failures)
    await asyncio.sleep(0.1)
    assert len(h.failures) == 1 and isinstance(h.failures[0], ProviderUnavailable)
    assert fake.attempts == 1 and session.failed_utterances == 1
    with pytest.raises(SessionClosed):
        session.push(frames(speech(20, 9), 2000)[0])
    await h.close()


async def test_refused_reconnects_beyond_max_reconnects_fail_once_then_push_overflows(fake: FakeAssemblyAI) -> None:
    h = harness(fake, max_reconnects=2)
    session = await h.open()
    fake.refuse_next = 10
    fake.drop_after(800, 1011)
    h.say(speech(400, 10), 0)
    await until(lambda: h.failures)
    await asyncio.sleep(0.2)
    assert len(h.failures) == 1 and isinstance(session.failure, ProviderUnavailable)
    assert fake.attempts == 1 + 2  # the first connection, then max_reconnects refused attempts
    assert session.failed_utterances == 1 and not h.finals()
    with pytest.raises(SessionClosed):
        session.push(frames(speech(20, 11), 3000)[0])
    session.finalize()  # emits nothing
    await h.close()
    assert not h.finals()


async def test_stalled_provider_bounds_the_buffer_and_never_blocks_the_loop(fake: FakeAssemblyAI) -> None:
    h = harness(fake, sample_rate=16000, encoding="pcm_s16le", max_buffer_ms=2000)
    session = await h.open()
    fake.stall_after(0)
    lag = 0.0

    async def ticker() -> None:
        nonlocal lag
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.005)
            lag = max(lag, loop.time() - t - 0.005)

    tick = asyncio.create_task(ticker())
    pcm = speech(1000, 12, rate=16000)
    overflowed_at = None
    for second in range(600):
        try:
            for f in frames(pcm, second * 1000, rate=16000):
                session.push(f)
        except Overflow:
            overflowed_at = second
            break
        await asyncio.sleep(0.002)
    assert overflowed_at is not None, "the send buffer never filled"
    assert session._pending_ms <= 2000  # type: ignore[attr-defined]
    started = time.monotonic()
    await session.aclose(drain_timeout=0.5)
    assert time.monotonic() - started < 0.7
    tick.cancel()
    await asyncio.gather(tick, return_exceptions=True)
    assert lag < 0.1
    await h.provider.aclose()


async def test_aclose_terminates_within_drain_timeout_and_leaves_no_tasks(fake: FakeAssemblyAI) -> None:
    before = client_tasks()
    h = harness(fake)
    session = await h.open()
    for f in frames(speech(800, 13), 0):
        session.push(f)
    started = time.monotonic()
    await session.aclose(drain_timeout=1.0)  # finalizes the open utterance first
    assert time.monotonic() - started < 1.0
    await session.aclose()  # idempotent
    await h.provider.aclose()
    assert client_tasks() == before
    conn = fake.connections[0]
    assert [m["type"] for m in conn.messages if isinstance(m, dict)] == ["ForceEndpoint", "Terminate"]
    assert [(t.text, t.utterance) for t in h.finals()] == [("Hello there.", 1)]
