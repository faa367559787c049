"""The agent <-> consumer media bridge of one WebRTC session.

::

    consumer (Telnyx, call rate) --consumer_in--> RateConverter(->48 kHz) -> Framer(960) -> JitterBuffer
        -> ConsumerTrack.recv (paced 20 ms, silence when empty) -> aiortc Opus -> agent's browser

    agent's browser -> aiortc Opus decode (48 kHz s16 stereo) --agent_in-->
        -> RateConverter(->stt rate) -> Framer(20 ms) -> on_agent_audio(pcm, ts)   (the agent's CallPipeline)
        -> RateConverter(->call rate) -> Framer(20 ms) -> barge-in check -> outbound queue
        -> sender task -> sink.send_clear() once per utterance, sink.send_media(pcm)   (only while attached)

Bounds (STYLE.md rule 4): the jitter buffer and the outbound queue each hold ``jitter_ms`` of audio;
on overflow the oldest frame is dropped and counted (``BridgeStats``).  A slow sink never blocks
``agent_in``, which runs on aiortc's receive path.

Attaching: the bridge exists for the whole WebRTC session; ``attach(sink)`` connects it to a live
consumer stream (anything with ``rate``, ``send_media`` and ``send_clear``: ``api.call_session.CallSession``)
and ``detach()`` disconnects it.  While detached the agent hears silence and its audio only reaches
``on_agent_audio``.  ``aclose()`` must be awaited once the session ends: it stops the track and the sender.

Barge-in: when the agent starts talking (``BARGE_FRAMES`` consecutive frames that webrtcvad calls
speech and that are above ``BARGE_RMS``), ``send_clear`` is sent once, before the onset frames, so
audio already queued for playback to the consumer (a prompt, hold audio) stops and the agent's first
syllable is not cleared with it.  The onset frames are held back meanwhile (at most
``BARGE_FRAMES - 1`` frames, 20 ms).  After ``hangover_ms`` without speech the next onset clears again.

No aiohttp here; asyncio only for the sender task and the track's pacing.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fractions
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import av
import numpy as np
import webrtcvad
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from engine.frames import FRAME_MS, frame_bytes
from engine.framing import Framer, JitterBuffer, RateConverter

log = logging.getLogger("switchboard.bridge")

WEBRTC_RATE = 48_000
WEBRTC_FRAME = WEBRTC_RATE * FRAME_MS // 1000  # 960 samples: what aiortc's Opus encoder takes whole
BARGE_FRAMES = 2
BARGE_RMS = 300.0  # about -40 dBFS: below it a "voiced" frame is line noise, not the agent talking


class ConsumerSink(Protocol):
    """Where the agent's audio goes: a live bidirectional consumer stream."""

    rate: int

    def send_media(self, pcm: bytes) -> Awaitable[None]: ...

    def send_clear(self) -> Awaitable[None]: ...


@dataclass(slots=True)
class BridgeStats:
    jitter_dropped: int = 0  # consumer frames dropped because the agent side fell behind (oldest first)
    jitter_underruns: int = 0  # 20 ms ticks the agent heard silence in the middle of consumer audio
    to_agent_frames: int = 0  # consumer frames played to the agent
    agent_frames: int = 0  # 20 ms frames of agent audio handed to the agent's pipeline
    to_consumer_sent: int = 0  # agent frames sent on the consumer stream
    to_consumer_dropped: int = 0  # agent frames dropped: queue overflow, or the sink failed
    clears: int = 0  # barge-ins: clear messages sent


class ConsumerTrack(MediaStreamTrack):
    """The audio track the agent hears: 48 kHz mono frames of 20 ms from ``buffer``, paced in real time."""

    kind = "audio"

    def __init__(self, buffer: JitterBuffer, stats: BridgeStats) -> None:
        super().__init__()
        self._buffer = buffer
        self._stats = stats
        self._silence = bytes(WEBRTC_FRAME * 2)
        self._start = 0.0
        self._n = -1

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        self._n += 1
        now = time.monotonic()
        if self._n == 0 or now - (self._start + self._n * FRAME_MS / 1000) > 0.2:
            # First frame, or the loop stalled past any use in catching up: restart the schedule.
            self._start, self._n = now, 0
        else:
            await asyncio.sleep(self._start + self._n * FRAME_MS / 1000 - now)
        pcm = self._buffer.pop()
        if pcm is None:
            self._stats.jitter_underruns = self._buffer.underruns
            pcm = self._silence
        else:
            self._stats.to_agent_frames += 1
        frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm, dtype="<i2").reshape(1, -1), format="s16",
                                           layout="mono")
        frame.sample_rate = WEBRTC_RATE
        frame.pts = self._n * WEBRTC_FRAME
        frame.time_base = fractions.Fraction(1, WEBRTC_RATE)
        return frame


class _Talk(enum.Enum):
    QUIET = "quiet"  # no agent speech: frames go straight out
    ONSET = "onset"  # voiced frames held back, not yet BARGE_FRAMES of them
    TALKING = "talking"  # barge-in sent; frames go straight out until hangover_ms of non-speech


class AgentBridge:
    """One session's bridge (see the module docstring for the contract)."""

    def __init__(self, *, stt_rate: int, on_agent_audio: Callable[[bytes, int], None], jitter_ms: int = 100,
                 vad_aggressiveness: int = 2, hangover_ms: int = 500) -> None:
        self.stats = BridgeStats()
        self.capacity = max(1, jitter_ms // FRAME_MS)
        self.to_agent = JitterBuffer(self.capacity)
        self.player = ConsumerTrack(self.to_agent, self.stats)
        self.sink: ConsumerSink | None = None
        self._stt = RateConverter(WEBRTC_RATE, stt_rate)
        self._stt_framer = Framer(frame_bytes(stt_rate))
        self._stt_rate = stt_rate
        self._on_agent_audio = on_agent_audio
        self._agent_ts = 0
        self._in: RateConverter | None = None  # consumer audio -> 48 kHz, per attached stream
        self._in_framer = Framer(WEBRTC_FRAME * 2)
        self._out: RateConverter | None = None  # agent audio -> the call's rate
        self._out_framer: Framer | None = None
        self._queue: deque[bytes] = deque()
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._vad = webrtcvad.Vad(vad_aggressiveness)
        self._hangover = max(1, hangover_ms // FRAME_MS)
        self._talk = _Talk.QUIET
        self._held: list[bytes] = []
        self._quiet_run = 0
        self._clear_pending = False

    @property
    def attached(self) -> bool:
        return self.sink is not None

    def attach(self, sink: ConsumerSink) -> None:
        """Start bridging with a live consumer stream; ``ValueError`` if already attached."""
        if self.sink is not None:
            raise ValueError("bridge is already attached")
        self.sink = sink
        self._in = RateConverter(sink.rate, WEBRTC_RATE)
        self._out = RateConverter(WEBRTC_RATE, sink.rate)
        self._out_framer = Framer(frame_bytes(sink.rate))
        self._sender = asyncio.get_running_loop().create_task(self._send_loop(sink), name="bridge-sender")

    async def detach(self) -> None:
        """Stop bridging: cancel the sender, forget queued audio both ways.  Safe when detached."""
        sender, self._sender = self._sender, None
        self.sink = None
        self._in = self._out = self._out_framer = None  # before the await: agent_in may run meanwhile
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        self.stats.to_consumer_dropped += len(self._queue) + len(self._held)
        self._queue.clear()
        self._held.clear()
        self._talk = _Talk.QUIET
        self._in_framer.reset()
        self.to_agent.clear()

    async def aclose(self) -> None:
        """Detach and end the agent's track.  After this the bridge takes no audio."""
        await self.detach()
        self.player.stop()

    # -- consumer -> agent -----------------------------------------------------------------------

    def consumer_in(self, pcm: bytes) -> None:
        """Inbound consumer PCM at the attached stream's rate (whole 20 ms frames).  Never blocks."""
        conv = self._in
        if conv is None:
            return
        for frame in self._in_framer.push(conv.convert(pcm)):
            self.to_agent.push(frame)
        self.stats.jitter_dropped = self.to_agent.dropped

    # -- agent -> pipeline, consumer -------------------------------------------------------------

    def agent_in(self, frame: av.AudioFrame) -> None:
        """One decoded frame of the agent's microphone (aiortc: 48 kHz s16 stereo).  Never blocks."""
        for pcm in self._stt_framer.push(self._stt.convert_frame(frame)):
            self.stats.agent_frames += 1
            self._on_agent_audio(pcm, self._agent_ts)
            self._agent_ts += FRAME_MS
        if self._out is None or self._out_framer is None:
            return
        for pcm in self._out_framer.push(self._out.convert_frame(frame)):
            self._barge(pcm)

    def _voiced(self, pcm: bytes) -> bool:
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float32)
        if float(np.sqrt(np.mean(x * x))) < BARGE_RMS:
            return False
        assert self.sink is not None
        return self._vad.is_speech(pcm, self.sink.rate)

    def _barge(self, pcm: bytes) -> None:
        voiced = self._voiced(pcm)
        if self._talk is _Talk.TALKING:
            self._quiet_run = 0 if voiced else self._quiet_run + 1
            if self._quiet_run >= self._hangover:
                self._talk = _Talk.QUIET
            self._enqueue(pcm)
        elif voiced:
            self._held.append(pcm)
            self._talk = _Talk.ONSET
            if len(self._held) >= BARGE_FRAMES:
                self._talk, self._quiet_run, self._clear_pending = _Talk.TALKING, 0, True
                self._release_held()
        else:
            self._talk = _Talk.QUIET
            self._release_held()
            self._enqueue(pcm)

    def _release_held(self) -> None:
        for held in self._held:
            self._enqueue(held)
        self._held.clear()

    def _enqueue(self, pcm: bytes) -> None:
        if len(self._queue) >= self.capacity:
            self._queue.popleft()
            self.stats.to_consumer_dropped += 1
        self._queue.append(pcm)
        self._wake.set()

    async def _send_loop(self, sink: ConsumerSink) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    if self._clear_pending:
                        self._clear_pending = False
                        await sink.send_clear()
                        self.stats.clears += 1
                    pcm = self._queue.popleft()
                    await sink.send_media(pcm)
                    self.stats.to_consumer_sent += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream is closing under us: stop sending, the session goes on
            log.info("bridge.sink_failed", extra={"error": f"{type(exc).__name__}: {exc}"})
            self.stats.to_consumer_dropped += len(self._queue)
            self._queue.clear()
