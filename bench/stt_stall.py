"""How long pocketsphinx work keeps the event loop waiting.

    python -m bench.stt_stall [--seconds 10]

A ticker task sleeps 5 ms at a time and records how late it wakes, while the provider (1) creates
its decoders and (2) decodes one utterance of ``--seconds`` of speech-like noise (partials while it
is pushed, then the final).  Prints the worst and p99 extra delay for each phase.  With decoders in
worker processes both should stay within a few milliseconds, whatever the utterance length.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np
import uvloop

from engine.frames import AudioFrame
from pipelines.stt.base import SessionOptions, Transcript
from pipelines.stt.pocketsphinx import PocketsphinxProvider


async def ticker(stalls: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(0.005)
        stalls.append((time.perf_counter() - t0 - 0.005) * 1000)


def summary(name: str, stalls: list[float]) -> None:
    s = np.array(stalls or [0.0])
    print(f"{name:28} ticks={len(s):5}  p99 stall={np.percentile(s, 99):6.1f} ms  worst={s.max():6.1f} ms")


async def phase(name: str, work) -> None:  # type: ignore[no-untyped-def]
    stalls: list[float] = []
    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(stalls, stop))
    t0 = time.perf_counter()
    await work
    elapsed = time.perf_counter() - t0
    stop.set()
    await tick
    summary(f"{name} ({elapsed:.2f}s)", stalls)


async def run(seconds: float) -> None:
    provider = PocketsphinxProvider(max_decoders=1)
    try:
        await phase("create decoder", provider.warm())
        finals: list[Transcript] = []
        done = asyncio.Event()

        def emit(t: Transcript) -> None:
            if t.is_final:
                finals.append(t)
                done.set()

        session = await provider.open_session(SessionOptions("bench"), emit)
        rng = np.random.default_rng(0)
        # Noise shaped in bursts, so the recogniser has "words" to chew on.
        n = int(16000 * seconds)
        env = (np.sin(np.arange(n) / 16000 * 2 * np.pi * 3) > 0).astype(np.float64)
        audio = (rng.normal(0, 3000, n) * (0.2 + env)).astype("<i2").tobytes()

        async def speak() -> None:
            for i in range(0, len(audio) - 640 + 1, 640):
                session.push(AudioFrame(audio[i : i + 640], 16000, i // 32))
                if i % (640 * 10) == 0:
                    await asyncio.sleep(0)
            session.finalize()
            await done.wait()

        await phase(f"decode {seconds:g}s utterance", speak())
        await session.aclose()
    finally:
        await provider.aclose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    uvloop.run(run(args.seconds))


if __name__ == "__main__":
    main()
