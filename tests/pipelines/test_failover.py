"""The provider chain: failover at open and mid-call with the utterance replayed, circuit breakers."""

from __future__ import annotations

import asyncio

import pytest

from engine.errors import Overflow, ProviderError, ProviderUnavailable, SessionClosed
from engine.frames import AudioFrame, Track
from pipelines.stt.base import Emit, SessionOptions, SttProvider, SttSession, Transcript
from pipelines.stt.failover import Breaker, Circuit, FailoverProvider, FailoverSession


class RecordingSession(SttSession):
    """Says how many frames (and which first timestamp) each utterance had: replay is visible."""

    max_buffer_ms = 10_000

    def __init__(self, emit: Emit, rate: int) -> None:
        self.sample_rate = rate
        self.frames: list[AudioFrame] = []
        self.closed = False
        self._emit = emit
        self._n = 0

    def push(self, frame: AudioFrame) -> None:
        if self.failure is not None:
            raise Overflow("dead")
        self.frames.append(frame)

    def finalize(self) -> None:
        self._n += 1
        f = self.frames
        self._emit(Transcript(f"{len(f)} frames from {f[0].timestamp_ms} at {f[0].sample_rate} x{len(f[0].pcm)}", True,
                              f[0].timestamp_ms, f[-1].end_ms, utterance=self._n))
        self.frames = []

    async def aclose(self, drain_timeout: float = 5.0) -> None:
        self.closed = True


class Provider(SttProvider):
    def __init__(self, name: str, rate: int = 8000, refuse: int = 0) -> None:
        self.name = name
        self.sample_rate = rate
        self.refuse = refuse  # open_session fails this many times
        self.sessions: list[RecordingSession] = []

    async def open_session(self, options: SessionOptions, emit: Emit) -> SttSession:
        if self.refuse:
            self.refuse -= 1
            raise ProviderUnavailable(f"{self.name} refused")
        s = RecordingSession(emit, self.sample_rate)
        self.sessions.append(s)
        return s


def frame(i: int, rate: int = 8000) -> AudioFrame:
    return AudioFrame(b"\x01\x00" * (rate // 50), rate, i * 20, Track.INBOUND)


async def open_chain(*providers: Provider, **kw: float) -> tuple[FailoverSession, list[Transcript], list[tuple]]:
    chain = FailoverProvider(providers, **kw)  # type: ignore[arg-type]
    out: list[Transcript] = []
    switches: list[tuple] = []
    session = await chain.open_session(SessionOptions("c1"), out.append,
                                       on_switch=lambda a, b, r: switches.append((a, b, r)))
    return session, out, switches


async def test_open_skips_a_provider_that_refuses() -> None:
    a, b = Provider("a", refuse=1), Provider("b")
    session, _, switches = await open_chain(a, b)
    assert session.provider == "b" and switches == []  # nothing was switched mid-call


async def test_a_provider_dying_mid_utterance_hands_the_whole_utterance_to_the_next() -> None:
    a, b = Provider("a"), Provider("b")
    session, out, switches = await open_chain(a, b)
    for i in range(10):
        session.push(frame(i))
    a.sessions[0].fail(ProviderUnavailable("connection lost after 5 reconnects"))
    session.push(frame(10))  # arrives while the switch is under way: kept for the replay
    session.finalize()
    for _ in range(50):
        if out:
            break
        await asyncio.sleep(0.01)
    assert switches == [("a", "b", "connection lost after 5 reconnects")]
    assert [t.text for t in out] == ["11 frames from 0 at 8000 x320"]  # replayed from the utterance's start
    assert a.sessions[0].closed and session.switches == 1
    await session.aclose()


async def test_a_fallback_at_another_rate_gets_resampled_audio() -> None:
    a, b = Provider("a", rate=8000), Provider("b", rate=16000)
    session, out, _ = await open_chain(a, b)
    a.sessions[0].fail(ProviderError("quota"))
    await asyncio.sleep(0.01)
    for i in range(5):
        session.push(frame(i))
    session.finalize()
    assert out[0].text == "5 frames from 0 at 16000 x640"  # 20 ms at 16 kHz


async def test_when_every_provider_is_gone_the_session_fails_once_and_refuses_audio() -> None:
    a, b = Provider("a"), Provider("b", refuse=99)
    chain = FailoverProvider([a, b])
    failures: list[ProviderError] = []
    session = await chain.open_session(SessionOptions("c1"), lambda t: None)
    session.on_failure = failures.append
    a.sessions[0].fail(ProviderUnavailable("down"))
    await asyncio.sleep(0.05)
    assert len(failures) == 1 and isinstance(failures[0], ProviderUnavailable)
    with pytest.raises(SessionClosed):
        session.push(frame(0))


async def test_no_provider_at_open_raises_provider_unavailable() -> None:
    with pytest.raises(ProviderUnavailable):
        await open_chain(Provider("a", refuse=1), Provider("b", refuse=1))


def test_breaker_opens_after_threshold_then_lets_one_trial_through_after_cooldown() -> None:
    now = [0.0]
    br = Breaker(threshold=2, cooldown_s=10, clock=lambda: now[0])
    br.failure()
    assert br.state is Circuit.CLOSED and br.allow()
    br.failure()
    assert br.state is Circuit.OPEN and not br.allow()
    now[0] = 10.0
    assert br.allow() and br.state is Circuit.HALF_OPEN
    assert not br.allow()  # one trial at a time
    br.failure()
    assert br.state is Circuit.OPEN
    now[0] = 20.0
    assert br.allow()
    br.success()
    assert br.state is Circuit.CLOSED and br.allow()


async def test_an_open_circuit_sends_new_calls_straight_to_the_next_provider() -> None:
    a, b = Provider("a", refuse=2), Provider("b")
    chain = FailoverProvider([a, b], threshold=2, cooldown_s=60)
    for _ in range(2):
        await chain.open_session(SessionOptions("c"), lambda t: None)
    assert chain.breakers["a"].state is Circuit.OPEN
    a.refuse = 0
    session = await chain.open_session(SessionOptions("c"), lambda t: None)
    assert session.provider == "b" and a.sessions == []  # "a" was not even asked
