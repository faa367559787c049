"""Helpers for the cloud STT client tests (AssemblyAI, Deepgram): audio, framing, waiting, and a
harness that opens one session of a real provider and records what it emits."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

from engine.codecs import get_codec
from engine.errors import ProviderError
from engine.frames import AudioFrame
from pipelines.stt.base import SessionOptions, SttProvider, SttSession, Transcript

MULAW = get_codec("PCMU", 8000)


def speech(ms: int, seed: int, rate: int = 8000) -> bytes:
    """PCM that is decoded mu-law (at 8 kHz), so encoding it back is bit-exact."""
    rnd = random.Random(seed)
    if rate == 8000:
        return MULAW.decode(bytes(rnd.randrange(256) for _ in range(ms * 8)))
    return bytes(rnd.randrange(256) for _ in range(ms * rate // 1000 * 2))


def frames(pcm: bytes, start_ms: int, rate: int = 8000) -> list[AudioFrame]:
    n = rate // 50 * 2
    return [AudioFrame(pcm[i : i + n], rate, start_ms + i // n * 20) for i in range(0, len(pcm), n)]


async def until(cond: Callable[[], Any], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def client_tasks() -> set[asyncio.Task[Any]]:
    """Every task but the fake server's connection handlers."""
    return {t for t in asyncio.all_tasks() if "RequestHandler" not in t.get_coro().__qualname__}  # type: ignore[union-attr]


class Harness:
    """One session of ``provider``: ``out`` holds every transcript, ``failures`` what ``fail`` reported."""

    def __init__(self, provider: SttProvider, options: SessionOptions) -> None:
        self.provider = provider
        self.options = options
        self.out: list[Transcript] = []
        self.failures: list[ProviderError] = []
        self.session: SttSession | None = None

    async def open(self, phrases: tuple[str, ...] = ()) -> SttSession:
        options = SessionOptions(self.options.call_id, self.options.track, self.options.language, phrases)
        self.session = await self.provider.open_session(options, self.out.append)
        self.session.on_failure = self.failures.append
        return self.session

    def say(self, pcm: bytes, start_ms: int, rate: int = 8000) -> None:
        assert self.session is not None
        for f in frames(pcm, start_ms, rate):
            self.session.push(f)
        self.session.finalize()

    def finals(self) -> list[Transcript]:
        return [t for t in self.out if t.is_final]

    async def close(self) -> None:
        if self.session is not None:
            await self.session.aclose(1.0)
        await self.provider.aclose()
