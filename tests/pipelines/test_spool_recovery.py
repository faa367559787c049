"""What a killed process leaves in the recording spool becomes a WAV again, or is set aside intact."""

from __future__ import annotations

import asyncio
import os
import struct
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile

from engine.frames import Track
from pipelines.recording import CallRecorder, Spooler
from pipelines.spool_recovery import UNRECOVERABLE, find_leftovers, rebuild, remove, repair_wav, set_aside
from tests.pipelines.test_recording import tone


def wav_with_header_of_a_dead_writer(path: Path, pcm: bytes, rate: int = 8000) -> None:
    """What ``wave`` leaves when its process dies before ``close``: sizes 0 in the header."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    raw = bytearray(path.read_bytes())
    raw[4:8] = struct.pack("<I", 36)
    raw[40:44] = struct.pack("<I", 0)
    path.write_bytes(bytes(raw) + b"\x01")  # and half a frame at the end


async def test_the_sidecar_is_written_before_the_audio_and_removed_when_nothing_was_recorded(tmp_path: Path) -> None:
    spooler = Spooler()
    try:
        rec = CallRecorder(spooler, tmp_path, "r1", 8000, chunk_bytes=1000, sidecar=b'{"v":1}')
        rec.write(Track.INBOUND, tone(440, 200))
        await spooler.close([])
        assert (tmp_path / "r1.json").read_bytes() == b'{"v":1}'
        empty = CallRecorder(spooler, tmp_path, "r2", 8000, sidecar=b"{}")
        assert await empty.finish() is None
        assert sorted(await asyncio.to_thread(os.listdir, tmp_path)) == ["r1.inbound.pcm", "r1.json"]
    finally:
        spooler.shutdown()


def test_pcm_spools_of_a_call_cut_short_are_rebuilt_into_a_stereo_wav(tmp_path: Path) -> None:
    inbound, outbound = tone(440, 2048), tone(1000, 1024)
    (tmp_path / "abc.json").write_text("{}")
    (tmp_path / "abc.inbound.pcm").write_bytes(inbound + b"\x07")  # the writer died mid-sample
    (tmp_path / "abc.outbound.pcm").write_bytes(outbound)
    (tmp_path / "abc.wav").write_bytes(b"RIFF\0\0\0\0WAVE")  # a build that was cut short
    [left] = find_leftovers(tmp_path)
    assert left.name == "abc" and set(left.pcm) == {Track.INBOUND, Track.OUTBOUND} and left.sidecar
    built = rebuild(left, 8000)
    assert built is not None
    rec, how = built
    assert how == "rebuilt from PCM spools" and rec.path == tmp_path / "abc.wav"
    data, rate = soundfile.read(rec.path, dtype="int16")
    assert rate == 8000 and data.shape == (len(inbound) // 2, 2) and rec.duration_ms == 2048
    assert np.array_equal(data[:, 0], np.frombuffer(inbound, "<i2"))
    assert np.array_equal(data[: len(outbound) // 2, 1], np.frombuffer(outbound, "<i2"))
    remove(left)
    assert list(tmp_path.iterdir()) == []


def test_a_wav_whose_writer_died_gets_its_header_repaired_from_the_file_size(tmp_path: Path) -> None:
    pcm = np.stack([np.frombuffer(tone(440, 1500), "<i2")] * 2, axis=1).tobytes()
    path = tmp_path / "abc.wav"
    wav_with_header_of_a_dead_writer(path, pcm)
    with pytest.raises(Exception):  # noqa: B017 - what a reader makes of it: anything but the audio
        assert len(soundfile.read(path)[0]) == len(pcm) // 4
    rec, changed = repair_wav(path)
    assert changed and rec.duration_ms == 1500 and rec.bytes == 44 + len(pcm) == path.stat().st_size
    data, rate = soundfile.read(path, dtype="int16")
    assert rate == 8000 and data.tobytes() == pcm
    assert repair_wav(path)[1] is False  # an intact file is left as it is


def test_what_cannot_be_repaired_is_refused_and_set_aside_untouched(tmp_path: Path) -> None:
    (tmp_path / "x.wav").write_bytes(b"not a wav at all")
    (tmp_path / "x.json").write_text("{}")
    (tmp_path / UNRECOVERABLE).mkdir()
    (tmp_path / UNRECOVERABLE / "x.wav").write_bytes(b"an earlier one")
    [left] = find_leftovers(tmp_path)
    with pytest.raises(ValueError, match="not a RIFF/WAVE"):
        rebuild(left, 8000)
    moved = set_aside(left, tmp_path)
    assert sorted(p.name for p in moved) == ["x.json", "x.wav.1"]
    assert (tmp_path / UNRECOVERABLE / "x.wav.1").read_bytes() == b"not a wav at all"
    assert (tmp_path / UNRECOVERABLE / "x.wav").read_bytes() == b"an earlier one"
    assert find_leftovers(tmp_path) == []  # the subdirectory is not looked into again
