"""The media bridge without a network: barge-in, a stalled consumer, the paced track."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from pipelines.bridge import WEBRTC_FRAME, AgentBridge
from tests.audio import peak_hz, stereo_frame, tone


class FakeSink:
    def __init__(self, rate: int = 8000, delay: float = 0.0) -> None:
        self.rate = rate
        self.delay = delay
        self.sent: list[str | bytes] = []

    async def send_media(self, pcm: bytes) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.sent.append(pcm)

    async def send_clear(self) -> None:
        self.sent.append("clear")


async def test_agent_audio_feeds_the_pipeline_at_its_rate_and_reaches_the_consumer_with_one_clear() -> None:
    fed: list[tuple[int, int]] = []
    bridge = AgentBridge(stt_rate=16000, on_agent_audio=lambda pcm, ts: fed.append((len(pcm), ts)), jitter_ms=1000)
    sink = FakeSink()
    bridge.attach(sink)
    audio = np.concatenate([np.zeros(48000 // 2, dtype="<i2"), tone(1000, 48000, 0.5), np.zeros(48000, dtype="<i2"),
                            tone(1000, 48000, 0.5)])
    for i in range(0, len(audio), WEBRTC_FRAME):
        bridge.agent_in(stereo_frame(audio[i : i + WEBRTC_FRAME], i))
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)
    assert all(n == 640 for n, _ in fed) and [ts for _, ts in fed] == list(range(0, 20 * len(fed), 20))
    assert len(fed) >= len(audio) // WEBRTC_FRAME - 1
    # One clear per utterance (the 1 s pause is past the hangover), each before that utterance's audio.
    assert sink.sent.count("clear") == 2 and bridge.stats.clears == 2
    first = sink.sent.index("clear")
    loud = [i for i, m in enumerate(sink.sent) if m != "clear" and np.abs(np.frombuffer(m, "<i2")).max() > 3000]
    assert first < loud[0] and all(len(m) == 320 for m in sink.sent if m != "clear")
    await bridge.aclose()
    assert bridge.player.readyState == "ended"


async def test_a_stalled_consumer_costs_counted_drops_not_memory_or_blocking() -> None:
    bridge = AgentBridge(stt_rate=16000, on_agent_audio=lambda pcm, ts: None, jitter_ms=100)
    sink = FakeSink(delay=10.0)  # never finishes sending
    bridge.attach(sink)
    t0 = time.perf_counter()
    for i in range(100):
        bridge.agent_in(stereo_frame(np.zeros(WEBRTC_FRAME, dtype="<i2"), i * WEBRTC_FRAME))
    await asyncio.sleep(0.01)
    assert time.perf_counter() - t0 < 0.5
    assert len(bridge._queue) <= bridge.capacity and bridge.stats.to_consumer_dropped >= 90
    await bridge.aclose()


async def test_consumer_audio_plays_to_the_agent_paced_with_silence_when_there_is_none() -> None:
    bridge = AgentBridge(stt_rate=16000, on_agent_audio=lambda pcm, ts: None, jitter_ms=100)
    bridge.attach(FakeSink(rate=8000))
    burst = tone(1000, 8000, 0.1)
    for i in range(0, len(burst), 160):
        bridge.consumer_in(burst[i : i + 160].tobytes())
    t0 = time.monotonic()
    frames = [await bridge.player.recv() for _ in range(10)]
    elapsed = time.monotonic() - t0
    assert 0.15 <= elapsed <= 0.3  # 10 frames of 20 ms, the first at once
    assert all(f.samples == WEBRTC_FRAME and f.sample_rate == 48000 for f in frames)
    assert [f.pts for f in frames] == [i * WEBRTC_FRAME for i in range(10)]
    x = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
    assert abs(peak_hz(x[: 4 * WEBRTC_FRAME], 48000) - 1000) < 50
    assert np.abs(x[-2 * WEBRTC_FRAME :]).max() == 0  # the burst is over: silence
    assert bridge.stats.to_agent_frames == 4 and bridge.stats.jitter_underruns == 1
    await bridge.aclose()
