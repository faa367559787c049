"""Call recording: each track's PCM spooled to disk as it arrives, a stereo WAV built at the end.

``write`` runs on the event loop for every frame, so it only appends to a buffered file (64 KiB
buffer: one real ``write`` syscall every ~2 s of 16 kHz audio).  ``finish`` does the heavy part
(interleave, WAV header, SHA-256) and blocks: run it in a thread.

Channels: 0 = the consumer (Telnyx ``inbound``), 1 = what the consumer hears (``outbound``, and the
agent's track once the WebRTC bridge feeds it, mixed with saturation).  Tracks are aligned at their
first frame, which is the same instant for every track of a Telnyx stream.

Bound: ``max_ms`` of audio per track (default 4 h).  Audio past it is not written and is counted in
``truncated_ms`` (reported with the call), so a stuck stream cannot fill the disk.
"""

from __future__ import annotations

import hashlib
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from engine.frames import Track

CHANNEL = {Track.INBOUND: 0, Track.OUTBOUND: 1, Track.AGENT: 1}
_CHUNK_SAMPLES = 1 << 16


@dataclass(frozen=True, slots=True)
class RecordingFile:
    path: Path
    bytes: int
    duration_ms: int
    channels: int
    sample_rate: int
    sha256: str


class CallRecorder:
    def __init__(self, spool_dir: Path, name: str, sample_rate: int, *, max_ms: int = 4 * 3600 * 1000) -> None:
        spool_dir.mkdir(parents=True, exist_ok=True)
        self._dir = spool_dir
        self._name = name
        self.sample_rate = sample_rate
        self._max_bytes = max_ms * sample_rate // 1000 * 2
        self._files: dict[Track, BinaryIO] = {}
        self._written: dict[Track, int] = {}
        self.truncated_ms = 0
        self.closed = False

    def _spool(self, track: Track) -> Path:
        return self._dir / f"{self._name}.{track.value}.pcm"

    def write(self, track: Track, pcm: bytes) -> None:
        """Append one track's 16-bit PCM.  Never blocks beyond a buffered file write."""
        if self.closed:
            return
        f = self._files.get(track)
        if f is None:
            f = self._files[track] = open(self._spool(track), "wb", buffering=1 << 16)
            self._written[track] = 0
        room = self._max_bytes - self._written[track]
        if len(pcm) > room:
            self.truncated_ms += (len(pcm) - max(room, 0)) * 1000 // (2 * self.sample_rate)
            pcm = pcm[: max(room, 0)]
        if pcm:
            f.write(pcm)
            self._written[track] += len(pcm)

    def close_spools(self) -> None:
        """Stop accepting audio and flush the spools (cheap: call on the loop, then ``finish`` in a thread)."""
        self.closed = True
        for f in self._files.values():
            f.close()

    def finish(self) -> RecordingFile | None:
        """Build ``<name>.wav`` from the spools and delete them; None when no audio was recorded.

        Blocking (file I/O, numpy): run in a thread after ``close_spools``.
        """
        self.close_spools()
        if not self._written or not any(self._written.values()):
            self.discard()
            return None
        frames = max(self._written.values()) // 2
        out = self._dir / f"{self._name}.wav"
        sources = {t: open(self._spool(t), "rb") for t in self._files}
        try:
            with wave.open(str(out), "wb") as w:
                w.setnchannels(2)
                w.setsampwidth(2)
                w.setframerate(self.sample_rate)
                for start in range(0, frames, _CHUNK_SAMPLES):
                    n = min(_CHUNK_SAMPLES, frames - start)
                    mix = np.zeros((n, 2), dtype=np.int32)
                    for track, src in sources.items():
                        data = np.frombuffer(src.read(n * 2), dtype="<i2")
                        mix[: len(data), CHANNEL[track]] += data
                    w.writeframes(np.clip(mix, -32768, 32767).astype("<i2").tobytes())
        finally:
            for src in sources.values():
                src.close()
        self.discard()
        digest = hashlib.sha256()
        with open(out, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return RecordingFile(out, out.stat().st_size, frames * 1000 // self.sample_rate, 2, self.sample_rate,
                             digest.hexdigest())

    def discard(self) -> None:
        """Delete the spools (not a built WAV)."""
        self.close_spools()
        for track in self._files:
            self._spool(track).unlink(missing_ok=True)
