"""The call recorder: per-track spools become one stereo WAV, bounded in length."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import soundfile

from engine.frames import Track
from pipelines.recording import CallRecorder


def tone(freq: float, ms: int, rate: int = 8000, amp: int = 8000) -> bytes:
    t = np.arange(rate * ms // 1000) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def test_two_tracks_become_two_channels_of_one_wav(tmp_path: Path) -> None:
    rec = CallRecorder(tmp_path, "call", 8000)
    inbound, outbound = tone(440, 1000), tone(1000, 600)
    for off in range(0, len(inbound), 320):  # 20 ms frames, interleaved as they arrive
        rec.write(Track.INBOUND, inbound[off:off + 320])
        if off < len(outbound):
            rec.write(Track.OUTBOUND, outbound[off:off + 320])
    out = rec.finish()
    assert out is not None
    data, rate = soundfile.read(out.path, dtype="int16")
    assert rate == 8000 and data.shape == (8000, 2) and out.duration_ms == 1000 and out.channels == 2
    assert data[:, 0].tobytes() == inbound
    assert data[:4800, 1].tobytes() == outbound and not data[4800:, 1].any()  # the shorter track is padded
    assert out.sha256 == hashlib.sha256(out.path.read_bytes()).hexdigest() and out.bytes == out.path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["call.wav"]  # spools removed


def test_agent_and_outbound_are_mixed_with_saturation(tmp_path: Path) -> None:
    rec = CallRecorder(tmp_path, "mix", 8000)
    loud = np.full(160, 30000, dtype="<i2").tobytes()
    rec.write(Track.OUTBOUND, loud)
    rec.write(Track.AGENT, loud)
    out = rec.finish()
    assert out is not None
    data, _ = soundfile.read(out.path, dtype="int16")
    assert (data[:, 1] == 32767).all() and not data[:, 0].any()


def test_audio_past_the_bound_is_counted_not_written(tmp_path: Path) -> None:
    rec = CallRecorder(tmp_path, "long", 8000, max_ms=100)
    for _ in range(10):
        rec.write(Track.INBOUND, tone(300, 20))
    out = rec.finish()
    assert out is not None and out.duration_ms == 100 and rec.truncated_ms == 100


def test_a_call_without_audio_leaves_nothing(tmp_path: Path) -> None:
    rec = CallRecorder(tmp_path, "empty", 8000)
    assert rec.finish() is None
    rec2 = CallRecorder(tmp_path, "silent-track", 8000)
    rec2.write(Track.INBOUND, b"")
    assert rec2.finish() is None
    assert list(tmp_path.iterdir()) == []
