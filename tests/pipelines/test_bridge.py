"""The media bridge without a network: bounds, framing, rate conversion, barge-in, the paced track."""

from __future__ import annotations

import asyncio
import fractions
import time

import av
import numpy as np

from pipelines.bridge import WEBRTC_FRAME, AgentBridge, Framer, JitterBuffer, RateConverter


def tone(hz: float, rate: int, seconds: float, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.rint(amp * 32767 * np.sin(2 * np.pi * hz * t)).astype("<i2")


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def stereo_frame(mono: np.ndarray, pts: int) -> av.AudioFrame:
    """What aiortc's Opus decoder hands us: 48 kHz s16 interleaved stereo, 960 samples."""
    frame = av.AudioFrame.from_ndarray(np.repeat(mono, 2).reshape(1, -1), format="s16", layout="stereo")
    frame.sample_rate, frame.pts, frame.time_base = 48000, pts, fractions.Fraction(1, 48000)
    return frame


def test_jitter_buffer_holds_at_most_its_capacity_and_counts_each_dropped_frame() -> None:
    jb = JitterBuffer(capacity=3, prefill=2)
    for i in range(5):
        jb.push(bytes([i]))
    assert len(jb) == 3 and jb.dropped == 2
    assert [jb.pop(), jb.pop(), jb.pop()] == [b"\x02", b"\x03", b"\x04"]  # the oldest went first


def test_jitter_buffer_waits_for_prefill_and_counts_an_underrun_only_mid_stream() -> None:
    jb = JitterBuffer(capacity=5, prefill=2)
    assert jb.pop() is None and jb.underruns == 0  # nothing has played yet: not an underrun
    jb.push(b"a")
    assert jb.pop() is None and jb.underruns == 0  # still filling
    jb.push(b"b")
    assert jb.pop() == b"a" and jb.pop() == b"b"
    assert jb.pop() is None and jb.underruns == 1  # ran dry while playing
    assert jb.pop() is None and jb.underruns == 1  # back in prefill: silence is not counted again
    jb.push(b"c")
    assert jb.pop() is None  # one frame is below the prefill again
    jb.push(b"d")
    assert jb.pop() == b"c"


def test_framer_cuts_exact_frames_from_chunks_of_any_size() -> None:
    data = bytes(range(256)) * 20
    framer = Framer(320)
    out: list[bytes] = []
    for size in (1, 7, 319, 321, 640, 1000, 3):
        chunk, data = data[:size], data[size:]
        out += framer.push(chunk)
    rest = framer.push(data)
    assert all(len(f) == 320 for f in out + rest)
    assert b"".join(out + rest) == (bytes(range(256)) * 20)[: 320 * len(out + rest)]


def test_48k_to_8k_and_back_keeps_a_1khz_tone_at_1khz_with_exact_20ms_frames() -> None:
    src = tone(1000, 48000, 1.0)
    down, up = RateConverter(48000, 8000), RateConverter(8000, 48000)
    f8, f48 = Framer(320), Framer(WEBRTC_FRAME * 2)
    frames8: list[bytes] = []
    frames48: list[bytes] = []
    for i in range(0, len(src), WEBRTC_FRAME):
        for f in f8.push(down.convert_frame(stereo_frame(src[i : i + WEBRTC_FRAME], i))):
            frames8.append(f)
            frames48 += f48.push(up.convert(f))
    assert all(len(f) == 320 for f in frames8) and all(len(f) == 1920 for f in frames48)
    assert len(frames8) >= 49 and len(frames48) >= 48  # a few ms of filter delay, no more
    x8 = np.frombuffer(b"".join(frames8), dtype="<i2")
    x48 = np.frombuffer(b"".join(frames48), dtype="<i2")
    assert abs(peak_hz(x8[800:], 8000) - 1000) <= 8000 / len(x8[800:])
    assert abs(peak_hz(x48[4800:], 48000) - 1000) <= 48000 / len(x48[4800:])
    rms_in = np.sqrt(np.mean(src.astype(np.float64) ** 2))
    assert 0.9 < np.sqrt(np.mean(x48[4800:].astype(np.float64) ** 2)) / rms_in < 1.1  # level kept


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
