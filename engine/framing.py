"""Generic pieces for moving live audio between clocks: exact frames, a bounded jitter buffer, and a
streaming rate converter.  No I/O; used by the agent bridge (``pipelines.bridge``).

Bounds: ``Framer`` holds less than one frame; ``JitterBuffer`` at most ``capacity`` frames (the oldest
goes first, counted); ``RateConverter`` only libswresample's filter state.
"""

from __future__ import annotations

import fractions
from collections import deque

import av
import numpy as np


class Framer:
    """Cuts a stream of int16 bytes into frames of exactly ``size`` bytes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._buf = bytearray()

    def push(self, pcm: bytes) -> list[bytes]:
        """Append ``pcm``; return every whole frame now available, oldest first."""
        self._buf += pcm
        n = len(self._buf) // self.size * self.size
        if not n:
            return []
        out = [bytes(self._buf[i : i + self.size]) for i in range(0, n, self.size)]
        del self._buf[:n]
        return out

    def reset(self) -> None:
        self._buf.clear()


class RateConverter:
    """int16 audio (bytes at ``src_rate`` mono, or any ``av.AudioFrame``) to int16 mono at ``dst_rate``.

    Streaming and stateful (libswresample): one per direction per session.  Output lags input by the
    filter delay (about 2 ms), so the first call returns that much less audio than it was given.
    """

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        self.src_rate = src_rate
        self.dst_rate = dst_rate
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=dst_rate)
        self._pts = 0

    def convert(self, pcm: bytes) -> bytes:
        x = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(x, format="s16", layout="mono")
        frame.sample_rate = self.src_rate
        return self.convert_frame(frame)

    def convert_frame(self, frame: av.AudioFrame) -> bytes:
        frame.pts = self._pts  # libswresample wants monotonic pts; decoded frames may not carry ours
        frame.time_base = fractions.Fraction(1, frame.sample_rate)
        self._pts += frame.samples
        # to_ndarray, not the plane buffer: planes are padded past the last sample.
        return b"".join(out.to_ndarray().tobytes() for out in self._resampler.resample(frame))


class JitterBuffer:
    """Bounded FIFO of equal frames between a bursty producer and a paced reader.

    ``pop`` returns ``None`` (play silence) until ``prefill`` frames are buffered, then a frame per
    call until the buffer runs dry; running dry while playing counts one underrun and re-enters
    prefill.  ``push`` past ``capacity`` drops the oldest frame, counted in ``dropped``: latency stays
    bounded by ``capacity`` frames whichever clock runs faster.
    """

    def __init__(self, capacity: int, prefill: int = 2) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least one frame")
        self.capacity = capacity
        self.prefill = max(1, min(prefill, capacity))
        self._frames: deque[bytes] = deque()
        self._playing = False
        self.dropped = 0
        self.underruns = 0

    def __len__(self) -> int:
        return len(self._frames)

    def push(self, frame: bytes) -> None:
        if len(self._frames) >= self.capacity:
            self._frames.popleft()
            self.dropped += 1
        self._frames.append(frame)

    def pop(self) -> bytes | None:
        if not self._playing:
            if len(self._frames) < self.prefill:
                return None
            self._playing = True
        if self._frames:
            return self._frames.popleft()
        self._playing = False
        self.underruns += 1
        return None

    def clear(self) -> None:
        self._frames.clear()
        self._playing = False
