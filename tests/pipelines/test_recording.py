"""The call recorder: per-track spools written off the loop become one stereo WAV, bounded in length."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from engine.frames import Track
from pipelines.recording import CallRecorder, Spooler


def tone(freq: float, ms: int, rate: int = 8000, amp: int = 8000) -> bytes:
    t = np.arange(rate * ms // 1000) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


@pytest.fixture
def spooler() -> Iterator[Spooler]:
    s = Spooler()
    yield s
    s.shutdown()


async def test_two_tracks_become_two_channels_of_one_wav(tmp_path: Path, spooler: Spooler) -> None:
    rec = CallRecorder(spooler, tmp_path, "call", 8000, chunk_bytes=1000)
    inbound, outbound = tone(440, 3000), tone(1000, 1800)
    for off in range(0, len(inbound), 320):  # 20 ms frames, interleaved as they arrive
        rec.write(Track.INBOUND, inbound[off:off + 320])
        if off < len(outbound):
            rec.write(Track.OUTBOUND, outbound[off:off + 320])
    out = await rec.finish()
    assert out is not None
    data, rate = soundfile.read(out.path, dtype="int16")
    assert rate == 8000 and data.shape == (24000, 2) and out.duration_ms == 3000 and out.channels == 2
    assert data[:, 0].tobytes() == inbound
    assert data[:14400, 1].tobytes() == outbound and not data[14400:, 1].any()  # the shorter track is padded
    assert out.sha256 == hashlib.sha256(out.path.read_bytes()).hexdigest() and out.bytes == out.path.stat().st_size
    assert sorted(os.listdir(tmp_path)) == ["call.wav"]  # spools removed


async def test_agent_and_outbound_are_mixed_with_saturation(tmp_path: Path, spooler: Spooler) -> None:
    rec = CallRecorder(spooler, tmp_path, "mix", 8000)
    loud = np.full(160, 30000, dtype="<i2").tobytes()
    rec.write(Track.OUTBOUND, loud)
    rec.write(Track.AGENT, loud)
    out = await rec.finish()
    assert out is not None
    data, _ = soundfile.read(out.path, dtype="int16")
    assert (data[:, 1] == 32767).all() and not data[:, 0].any()


async def test_audio_past_the_bound_is_counted_not_written(tmp_path: Path, spooler: Spooler) -> None:
    rec = CallRecorder(spooler, tmp_path, "long", 8000, max_ms=100)
    for _ in range(10):
        rec.write(Track.INBOUND, tone(300, 20))
    out = await rec.finish()
    assert out is not None and out.duration_ms == 100 and rec.truncated_ms == 100


async def test_a_stalled_disk_refuses_chunks_past_the_bound_and_counts_them(tmp_path: Path) -> None:
    spooler = Spooler(max_pending_bytes=4000)
    gate = threading.Event()
    spooler._pool.submit(gate.wait)  # the spool thread is stuck, as on a disk that stopped answering
    rec = CallRecorder(spooler, tmp_path, "stall", 8000, chunk_bytes=1600)
    for _ in range(20):  # 20 frames of 20 ms = 400 ms = 6400 bytes; only 2 chunks fit the bound
        rec.write(Track.INBOUND, tone(300, 20))
    assert spooler.pending_bytes == 3200 and rec.truncated_ms == 200
    gate.set()
    out = await rec.finish()
    assert out is not None and out.duration_ms == 200
    spooler.shutdown()


async def test_a_call_without_audio_leaves_nothing(tmp_path: Path, spooler: Spooler) -> None:
    rec = CallRecorder(spooler, tmp_path, "empty", 8000)
    assert await rec.finish() is None
    rec2 = CallRecorder(spooler, tmp_path, "silent-track", 8000)
    rec2.write(Track.INBOUND, b"")
    assert await rec2.finish() is None
    assert os.listdir(tmp_path) == []
