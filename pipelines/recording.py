"""Call recording: each track's PCM spooled to disk off the event loop, a stereo WAV built at the end.

``CallRecorder.write`` runs on the event loop for every frame.  It only appends to an in-memory
chunk (``chunk_bytes``, 16 KiB = 1 s of 8 kHz audio); full chunks go to the ``Spooler``, one
thread that appends them to the track's spool file.  The event loop never touches the disk: with
blocking writes on the loop (a buffered file per track) the capacity benchmark measured p99 frame
lag of 95 ms at 900 streams, from writes that stalled in the kernel; with the spooler thread it
stays at the level of the real-time path alone (README, Benchmarks).

``finish`` (async) hands over the last chunks, waits until the spooler has written them, then
builds the WAV (interleave, header, SHA-256) in a worker thread.

Files in the spool directory, per recording ``<name>``: ``<name>.json`` (the caller's sidecar,
written before any audio: what the recording belongs to), ``<name>.<track>.pcm`` (raw 16-bit
little-endian PCM, appended while the call runs), ``<name>.wav`` (built after the call, deleted
once stored).  If the process dies, these are what is left; ``pipelines.spool_recovery`` turns them
into a WAV again: from the PCM when any is left, else by repairing the WAV's header.

Channels: 0 = the consumer (Telnyx ``inbound``), 1 = what the consumer hears (``outbound``, and the
agent's track once the WebRTC bridge feeds it, mixed with saturation).  Tracks are aligned at their
first frame, which is the same instant for every track of a Telnyx stream.

Bounds:
- ``max_ms`` of audio per track (default 4 h).  Audio past it is not written and is counted in
  ``truncated_ms`` (reported with the call), so a stuck stream cannot fill the disk.
- ``Spooler.max_pending_bytes`` (64 MiB) handed over but not yet written, across all calls.  When
  the disk falls that far behind, a chunk is refused and counted in ``truncated_ms`` too (the rest
  of that track then runs early by the refused chunk).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import wave
from concurrent.futures import ThreadPoolExecutor
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


class Spooler:
    """One thread that owns the spool files: opens, appends, writes and closes them in submission order."""

    def __init__(self, max_pending_bytes: int = 64 << 20) -> None:
        self.max_pending_bytes = max_pending_bytes
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="recording-spool")
        self._lock = threading.Lock()
        self._pending = 0
        self._files: dict[Path, BinaryIO] = {}  # touched only by the spool thread
        self.errors = 0

    @property
    def pending_bytes(self) -> int:
        return self._pending

    def append(self, path: Path, data: bytes) -> bool:
        """Queue ``data`` for the end of ``path``.  Never blocks; False when over the bound."""
        with self._lock:
            if self._pending + len(data) > self.max_pending_bytes:
                return False
            self._pending += len(data)
        self._pool.submit(self._append, path, data)
        return True

    def write_small(self, path: Path, data: bytes) -> None:
        """Queue writing ``data`` as the whole of ``path`` (atomically: a new name, then a rename).
        For a few bytes (a sidecar); not counted against the bound.  Never blocks."""
        self._pool.submit(self._write_small, path, data)

    def _write_small(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_bytes(data)
            tmp.replace(path)
        except OSError:
            self.errors += 1

    def _append(self, path: Path, data: bytes) -> None:
        try:
            f = self._files.get(path)
            if f is None:
                f = self._files[path] = open(path, "ab", buffering=0)
            f.write(data)
        except OSError:
            self.errors += 1  # the build will find the file short; the call's stats report the truncation
        finally:
            with self._lock:
                self._pending -= len(data)

    async def close(self, paths: list[Path]) -> None:
        """Wait until everything queued for ``paths`` is written, and close them."""
        await asyncio.wrap_future(self._pool.submit(self._close, paths))

    def _close(self, paths: list[Path]) -> None:
        for p in paths:
            f = self._files.pop(p, None)
            if f is not None:
                f.close()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
        for f in self._files.values():
            f.close()
        self._files.clear()


class CallRecorder:
    def __init__(self, spooler: Spooler, spool_dir: Path, name: str, sample_rate: int, *,
                 max_ms: int = 4 * 3600 * 1000, chunk_bytes: int = 16 << 10, sidecar: bytes | None = None) -> None:
        """``sidecar``: written to ``<name>.json`` before any audio, so that what a crash leaves behind
        can be attributed; the caller deletes it once the recording is stored (``sidecar_path``)."""
        self._spooler = spooler  # spool_dir must exist: no file-system call here, on the event loop
        self._dir = spool_dir
        self._name = name
        self.sidecar_path: Path | None = None
        if sidecar is not None:
            self.sidecar_path = spool_dir / f"{name}.json"
            spooler.write_small(self.sidecar_path, sidecar)
        self.sample_rate = sample_rate
        self._max_bytes = max_ms * sample_rate // 1000 * 2
        self._chunk = chunk_bytes
        self._buffers: dict[Track, bytearray] = {}
        self._written: dict[Track, int] = {}  # bytes accepted per track (handed over or buffered)
        self.truncated_ms = 0
        self.closed = False

    def _spool(self, track: Track) -> Path:
        return self._dir / f"{self._name}.{track.value}.pcm"

    def write(self, track: Track, pcm: bytes) -> None:
        """Append one track's 16-bit PCM.  Never blocks."""
        if self.closed:
            return
        buf = self._buffers.get(track)
        if buf is None:
            buf = self._buffers[track] = bytearray()
            self._written[track] = 0
        room = self._max_bytes - self._written[track]
        if len(pcm) > room:
            self._truncate(len(pcm) - max(room, 0))
            pcm = pcm[: max(room, 0)]
        buf += pcm
        self._written[track] += len(pcm)
        if len(buf) >= self._chunk:
            self._hand_over(track, buf)

    def _hand_over(self, track: Track, buf: bytearray) -> None:
        if not self._spooler.append(self._spool(track), bytes(buf)):
            self._truncate(len(buf))
            self._written[track] -= len(buf)
        buf.clear()

    def _truncate(self, nbytes: int) -> None:
        self.truncated_ms += nbytes * 1000 // (2 * self.sample_rate)

    def stop(self) -> None:
        """Accept no more audio (the call ended); ``finish`` writes out what was accepted."""
        self.closed = True

    async def finish(self) -> RecordingFile | None:
        """Build ``<name>.wav`` from the spools and delete them; None when no audio was recorded."""
        self.stop()
        for track, buf in self._buffers.items():
            if buf:
                self._hand_over(track, buf)
        await self._spooler.close([self._spool(t) for t in self._buffers])
        if not any(self._written.values()):
            self.discard()
            if self.sidecar_path is not None:  # written by now: its write was queued ahead of the close
                await asyncio.to_thread(self.sidecar_path.unlink, missing_ok=True)
            return None
        return await asyncio.to_thread(self._build)

    def _build(self) -> RecordingFile:
        """Blocking: interleave the spools into a WAV, hash it, delete the spools."""
        rec = build_wav({t: self._spool(t) for t in self._buffers}, self._dir / f"{self._name}.wav", self.sample_rate)
        self.discard()
        return rec

    def discard(self) -> None:
        """Delete the spools (not a built WAV).  Call after ``finish``, or instead of it once stopped."""
        self.closed = True
        for track in self._buffers:
            self._spool(track).unlink(missing_ok=True)


def build_wav(spools: dict[Track, Path], out: Path, sample_rate: int) -> RecordingFile:
    """Blocking: interleave per-track spools (missing or empty ones are silence) into a stereo WAV at
    ``out``, and hash it.  The spools are left in place.  Tracks are aligned at their first sample;
    a spool cut in the middle of a sample (the writer died) loses that half sample."""
    sizes = {t: p.stat().st_size if p.exists() else 0 for t, p in spools.items()}
    frames = max(sizes.values(), default=0) // 2
    sources = {t: open(spools[t], "rb") for t in spools if sizes[t]}
    try:
        with wave.open(str(out), "wb") as w:
            w.setnchannels(2)
            w.setsampwidth(2)
            w.setframerate(sample_rate)
            for start in range(0, frames, _CHUNK_SAMPLES):
                n = min(_CHUNK_SAMPLES, frames - start)
                mix = np.zeros((n, 2), dtype=np.int32)
                for track, src in sources.items():
                    raw = src.read(n * 2)
                    data = np.frombuffer(raw[: len(raw) // 2 * 2], dtype="<i2")
                    mix[: len(data), CHANNEL[track]] += data
                w.writeframes(np.clip(mix, -32768, 32767).astype("<i2").tobytes())
    finally:
        for src in sources.values():
            src.close()
    return RecordingFile(out, out.stat().st_size, frames * 1000 // sample_rate, 2, sample_rate, sha256_of(out))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
