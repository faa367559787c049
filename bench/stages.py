"""Where a media frame's CPU goes: each stage of the real-time path timed alone, in this process.

    python -m bench.stages [--frames 50000]

``bench/capacity.py`` measures the whole server (CPU per frame against a bare aiohttp server that
receives and discards the same WebSocket messages); this one splits Switchboard's own share into its
stages, on the same kind of audio (espeak-free: shaped noise bursts with pauses, mu-law 8 kHz, so
about half the frames are speech), each stage fed what the previous one produced::

    stage        what                                                    module
    json         orjson.loads of the Telnyx ``media`` message             (inside protocol)
    protocol     TelnyxStreamProtocol.receive_text: JSON, validation,     api/telnyx_protocol.py
                 base64, G.711 decode, sequence and sample counters
    vad          the segmenter's per-frame VAD and state machine          engine/segmenter.py
    pipeline     CallPipeline.feed: segmenter + utterance audio pushed    pipelines/call.py
                 to the recogniser session (the null one)
    recorder     CallRecorder.write (buffer; a 16 KiB chunk to the         pipelines/recording.py
                 spool thread about once a second)
    dispatch     what the media handler adds around them (counters, the   api/media_stream.py,
                 1-in-4 frame-lag sample)                                 api/call_session.py

Each stage runs ``--frames`` frames ``--repeat`` times; the best run is kept (the least disturbed by
this shared machine).  Figures are microseconds per frame.  What the server spends on top of the
sum (WebSocket frame parsing in aiohttp, the socket reads, the event loop) is what the bare server
spends too: the capacity benchmark's baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson

from api.telnyx_protocol import TelnyxStreamProtocol
from engine.codecs import get_codec
from engine.frames import AudioFrame, Track
from engine.metrics import LagHistogram
from engine.segmenter import Segmenter, SegmenterConfig
from pipelines.call import CallPipeline
from pipelines.recording import CallRecorder, Spooler
from pipelines.stt.scripted import NullProvider

RATE = 8000
N = RATE // 50


def audio(frames: int, seed: int = 7) -> np.ndarray:
    """Speech-like bursts (noise shaped by a 4 Hz syllable envelope) of 2 s, then 1 s pauses."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames * N) / RATE
    envelope = (np.sin(2 * np.pi * 4 * t) ** 2) * ((t % 3.0) < 2.0)
    voiced = np.convolve(rng.standard_normal(len(t)), np.ones(4) / 4, mode="same")
    return np.clip(voiced * envelope * 8000, -32768, 32767).astype(np.int16)


def messages(pcm: np.ndarray, stream_id: str = "bench") -> list[bytes]:
    codec = get_codec("PCMU", RATE)
    out = []
    for i in range(len(pcm) // N):
        payload = base64.b64encode(codec.encode(pcm[i * N:(i + 1) * N].tobytes())).decode()
        out.append(orjson.dumps({"event": "media", "sequence_number": str(i + 2), "stream_id": stream_id,
                                 "media": {"track": "inbound", "chunk": str(i + 1), "timestamp": str(i * 20),
                                           "payload": payload}}))
    return out


def started_protocol() -> TelnyxStreamProtocol:
    p = TelnyxStreamProtocol()
    p.receive_text(orjson.dumps({"event": "connected", "version": "1.0.0"}))
    p.receive_text(orjson.dumps({"event": "start", "sequence_number": "1", "stream_id": "bench", "start": {
        "call_control_id": "v3:bench", "call_session_id": "s", "from": "+15550000001", "to": "+15550000002",
        "media_format": {"encoding": "PCMU", "sample_rate": RATE, "channels": 1}}}))
    return p


def best(fn: Callable[[], int], repeat: int) -> float:
    """Microseconds per frame of the fastest of ``repeat`` runs (``fn`` returns its frame count)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        n = fn()
        times.append((time.perf_counter_ns() - t0) / 1000 / n)
    return min(times)


async def measure(frames: int, repeat: int) -> dict[str, float]:
    pcm = audio(frames)
    msgs = messages(pcm)
    chunks = [pcm[i * N:(i + 1) * N].tobytes() for i in range(frames)]
    out: dict[str, float] = {}

    def json_only() -> int:
        for m in msgs:
            orjson.loads(m)
        return len(msgs)

    def protocol() -> int:
        p = started_protocol()
        for m in msgs:
            p.receive_text(m)
        return len(msgs)

    def vad() -> int:
        seg = Segmenter(SegmenterConfig())
        for i, c in enumerate(chunks):
            seg.process(AudioFrame(c, RATE, i * 20, Track.INBOUND))
        return len(chunks)

    pipelines: list[CallPipeline] = []

    def pipeline() -> int:
        cp = CallPipeline(call_id="v3:bench", stream_id="bench", provider=NullProvider(), publish=lambda e: None)
        pipelines.append(cp)
        for i, c in enumerate(chunks):
            cp.feed(Track.INBOUND, c, RATE, i * 20)
        return len(chunks)

    with tempfile.TemporaryDirectory() as tmp:
        spooler = Spooler()

        def recorder() -> int:
            rec = CallRecorder(spooler, Path(tmp), f"r{time.perf_counter_ns()}", RATE)
            for c in chunks:
                rec.write(Track.INBOUND, c)
            rec.stop()
            return len(chunks)

        lag = LagHistogram()
        counters = {"frames": 0, "media": 0}

        def dispatch() -> int:  # what _dispatch and CallSession.media do besides the stages above
            now = time.monotonic()
            for i in range(len(chunks)):
                counters["media"] += 1
                counters["frames"] += 1
                if not i & 3:
                    lag.record((now - i * 0.02) % 5)
            return len(chunks)

        out["json"] = best(json_only, repeat)
        out["protocol"] = best(protocol, repeat)
        out["vad"] = best(vad, repeat)
        # The pipeline opens its recogniser session in a task: let it open before timing.
        warm = CallPipeline(call_id="v3:warm", stream_id="warm", provider=NullProvider(), publish=lambda e: None)
        warm.feed(Track.INBOUND, chunks[0], RATE, 0)
        await asyncio.sleep(0)
        out["pipeline"] = best(pipeline, repeat)
        out["recorder"] = best(recorder, repeat)
        out["dispatch"] = best(dispatch, repeat)
        await warm.aclose()
        for cp in pipelines:
            await cp.aclose()
        spooler.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--frames", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    out = asyncio.run(measure(args.frames, args.repeat))
    own = out["protocol"] + out["pipeline"] + out["recorder"] + out["dispatch"]
    for name, us in out.items():
        note = " (inside protocol)" if name == "json" else " (inside pipeline)" if name == "vad" else ""
        print(f"{name:10} {us:6.2f} us/frame{note}")
    print(f"{'sum':10} {own:6.2f} us/frame (protocol + pipeline + recorder + dispatch)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
