"""Framing, the jitter buffer and rate conversion: bounds hold, frames are exact, a tone keeps its pitch."""

from __future__ import annotations

import numpy as np

from engine.framing import Framer, JitterBuffer, RateConverter
from tests.audio import peak_hz, stereo_frame, tone

WEBRTC_FRAME = 960


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
