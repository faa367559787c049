"""Audio frames: the one unit of audio that moves through the engine.

Inside the engine, audio is always signed 16-bit little-endian mono PCM (``bytes``), tagged with its
sample rate, a stream-relative timestamp and the track it came from.  Codecs convert wire payloads
to and from this form at the edge; nothing past the edge sees mu-law, A-law or big-endian samples.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

FRAME_MS = 20
"""Telnyx, webrtcvad and the segmenter all work in 20 ms frames."""


class Track(enum.StrEnum):
    """Which side of a call the audio belongs to."""

    INBOUND = "inbound"  # the consumer on the phone, as Telnyx delivers it
    OUTBOUND = "outbound"  # audio played to the consumer (the agent's side on the PSTN leg)
    AGENT = "agent"  # an agent's browser microphone (WebRTC)


class AudioFrame(NamedTuple):
    """A slice of PCM audio.

    ``pcm`` holds ``len(pcm) // 2`` int16 little-endian samples at ``sample_rate``;
    ``timestamp_ms`` is where the slice starts, in milliseconds from the start of its stream.
    Immutable like the engine's other events, but a NamedTuple: 50 are built per second per track,
    and a frozen dataclass's ``__init__`` costs several times a tuple's.
    """

    pcm: bytes
    sample_rate: int
    timestamp_ms: int
    track: Track = Track.INBOUND

    @property
    def samples(self) -> int:
        return len(self.pcm) // 2

    @property
    def duration_ms(self) -> int:
        return self.samples * 1000 // self.sample_rate

    @property
    def end_ms(self) -> int:
        return self.timestamp_ms + self.duration_ms


def frame_bytes(sample_rate: int, ms: int = FRAME_MS) -> int:
    """Bytes of int16 mono PCM in ``ms`` milliseconds at ``sample_rate``."""
    return sample_rate * ms // 1000 * 2
