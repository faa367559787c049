"""Offline speech-to-text on pocketsphinx (English model shipped in the wheel).

Two passes per utterance, both in the decoder's own worker process (``sphinx_worker``), never on
the event loop nor under its GIL:

1. *live*: while the utterance goes on, audio is decoded in ``chunk_ms`` chunks; each change of
   the running hypothesis is emitted as a partial;
2. *final*: at ``finalize()`` the whole utterance is decoded again in one batch (batch cepstral
   mean normalisation: on espeak speech through G.711 it cut the word error rate from 0.40 to 0.30
   against the live pass), and that result, with word timings from ``seg()``, is the final.

The second pass costs another ~0.04 s of CPU per second of audio; the utterance audio it needs is
held in the session, bounded by ``max_buffer_ms`` like everything else the session holds.

Decoder processes are started at start-up (``warm``) so a spawn and model load (~0.5 s) never
delays a live call's first utterance.  A small thread pool (``max_workers``) runs the blocking
set-up work: language-model builds and process starts.  ``python -m bench.stt_stall`` measures
what the event loop feels: with decoders in threads a 10 s utterance stalled it up to 1.3 s
(pocketsphinx holds the GIL in ``process_raw``); in processes, 2 ms.

Decoders come from a ``DecoderPool`` per language model (the bundled LM, or a domain LM built from
the organisation's phrase list) and are held for one utterance only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from engine.errors import Overflow, ProviderUnavailable, SwitchboardError
from engine.frames import AudioFrame
from pipelines.stt.base import Emit, SessionOptions, SttProvider, SttSession, Transcript, Word
from pipelines.stt.decoder_pool import (
    DEFAULT_MODEL,
    DecoderPool,
    LanguageModel,
    build_domain_model,
    model_key,
)
from pipelines.stt.sphinx_worker import DecoderProcess

log = logging.getLogger("switchboard.stt.pocketsphinx")

FRAME_RATE = 100  # pocketsphinx feature frames per second (10 ms)


class PocketsphinxProvider(SttProvider):
    name = "pocketsphinx"
    sample_rate = 16000

    def __init__(
        self,
        *,
        max_decoders: int = 2,
        max_workers: int = 2,
        acquire_timeout: float = 10.0,
        max_buffer_ms: int = 30_000,
        chunk_ms: int = 200,
        max_models: int = 8,
        cache_dir: Path | None = None,
    ) -> None:
        self.max_decoders = max_decoders
        self.acquire_timeout = acquire_timeout
        self.max_buffer_ms = max_buffer_ms
        self.chunk_ms = chunk_ms
        self.max_models = max_models
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="pocketsphinx")
        self._pools: OrderedDict[str, DecoderPool] = OrderedDict()
        self._building: dict[str, asyncio.Future[LanguageModel]] = {}
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if cache_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="switchboard-lm-")
            cache_dir = Path(self._tmp.name)
        self.cache_dir = cache_dir

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def pool(self, phrases: tuple[str, ...] | list[str] = ()) -> DecoderPool:
        """The decoder pool for ``phrases`` (built once; at most ``max_models`` pools kept, LRU)."""
        key = model_key(phrases)
        pool = self._pools.get(key)
        if pool is not None:
            self._pools.move_to_end(key)
            return pool
        building = self._building.get(key)
        if building is None:
            building = self._building[key] = asyncio.ensure_future(self._build(key, phrases))
        model = await asyncio.shield(building)
        pool = self._pools.get(key)
        if pool is None:
            self._make_room()
            pool = self._pools[key] = DecoderPool(
                model, DecoderProcess.start, max_decoders=self.max_decoders, acquire_timeout=self.acquire_timeout,
                run=self.run,
            )
        return pool

    async def _build(self, key: str, phrases: tuple[str, ...] | list[str]) -> LanguageModel:
        try:
            if key == DEFAULT_MODEL.key:
                return DEFAULT_MODEL
            return await self.run(build_domain_model, list(phrases), self.cache_dir)  # type: ignore[no-any-return]
        finally:
            self._building.pop(key, None)

    def _make_room(self) -> None:
        while len(self._pools) >= self.max_models:
            victim = next((k for k, p in self._pools.items() if p.in_use == 0), None)
            if victim is None:
                raise ProviderUnavailable(f"{self.max_models} language models all in use")
            self._pools.pop(victim).close()

    async def warm(self, phrases: Sequence[str] = ()) -> None:
        """Build the model and start every decoder process of its pool now, before calls arrive."""
        pool = await self.pool(tuple(phrases))
        decoders = [await pool.acquire() for _ in range(pool.max_decoders)]
        for decoder in decoders:
            await pool.release(decoder)

    async def open_session(self, options: SessionOptions, emit: Emit) -> SttSession:
        pool = await self.pool(tuple(options.phrases))
        return PocketsphinxSession(self, pool, options, emit)

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._tmp is not None:
            self._tmp.cleanup()


class PocketsphinxSession(SttSession):
    """One track's recogniser; see ``pipelines.stt.base`` for the contract."""

    sample_rate = 16000

    def __init__(self, provider: PocketsphinxProvider, pool: DecoderPool, options: SessionOptions, emit: Emit):
        self.max_buffer_ms = provider.max_buffer_ms
        self.options = options
        self.failed_utterances = 0
        self._provider = provider
        self._pool = pool
        self._emit = emit
        self._chunk_bytes = provider.chunk_ms * 32  # 16 kHz int16: 32 bytes per ms
        self._queue: deque[AudioFrame | None] = deque()  # None marks an utterance end
        self._queued_ms = 0
        self._held_ms = 0  # audio of the open utterance, kept for the final pass
        self._wake = asyncio.Event()
        self._closed = False
        self._open = False  # frames pushed since the last finalize()
        self._utterance = 0
        self._task = asyncio.get_running_loop().create_task(self._work(), name=f"pocketsphinx-{options.call_id}")

    def push(self, frame: AudioFrame) -> None:
        if self._closed:
            raise Overflow("session closed")
        if self._queued_ms + self._held_ms + frame.duration_ms > self.max_buffer_ms:
            raise Overflow(f"pocketsphinx session holds {self.max_buffer_ms} ms already")
        self._queue.append(frame)
        self._open = True
        self._queued_ms += frame.duration_ms
        if self._queued_ms >= self._provider.chunk_ms:
            self._wake.set()

    def finalize(self) -> None:
        if self._open and not self._closed:
            self._open = False
            self._queue.append(None)
            self._wake.set()

    async def aclose(self, drain_timeout: float = 5.0) -> None:
        if self._closed:
            return
        self.finalize()
        self._closed = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), drain_timeout)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- worker ------------------------------------------------------------------------------------

    async def _work(self) -> None:
        decoder: DecoderProcess | None = None
        cmn: str | None = None  # set while a live pass is open
        utterance = bytearray()
        start_ms = end_ms = 0
        pending = bytearray()
        last_partial = ""
        try:
            while True:
                if not self._queue:
                    if self._closed:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                item = self._queue.popleft()
                if item is not None:
                    self._queued_ms -= item.duration_ms
                    self._held_ms += item.duration_ms
                    if not utterance:
                        self._utterance += 1
                        start_ms = item.timestamp_ms
                    end_ms = item.end_ms
                    utterance += item.pcm
                    pending += item.pcm
                    if len(pending) < self._chunk_bytes and not (self._queue and self._queue[0] is None):
                        continue
                if decoder is None and (pending or utterance):
                    try:
                        decoder = await self._pool.acquire()
                    except ProviderUnavailable as exc:
                        self._fail(len(utterance), str(exc))
                        utterance.clear()
                        pending.clear()
                        self._drop_until_marker()
                        continue
                if pending:
                    text, first_cmn = await decoder.live_chunk(bytes(pending), cmn is None)
                    cmn = cmn or first_cmn
                    pending.clear()
                    if text and text != last_partial:
                        last_partial = text
                        self._emit(Transcript(text, False, start_ms, end_ms, utterance=self._utterance))
                if item is None and utterance:
                    text, words = await decoder.final_pass(bytes(utterance), cmn)
                    cmn = None
                    await self._pool.release(decoder)
                    decoder = None
                    self._held_ms = 0
                    self._emit(self._final(text, words, start_ms, end_ms))
                    utterance.clear()
                    last_partial = ""
        except asyncio.CancelledError:
            raise
        except SwitchboardError as exc:
            self._fail(len(utterance), str(exc))
        except Exception as exc:  # a decoder error must not kill the call; report and stop this session
            log.exception("stt.session_failed", extra={"call_id": self.options.call_id})
            self._fail(len(utterance), repr(exc))
        finally:
            if decoder is not None:
                # Its state is unknown (cancelled or failed mid-utterance): never hand it to another call.
                await asyncio.shield(self._pool.discard(decoder))
            self._closed = True

    def _final(self, text: str, words: list[tuple[str, int, int, float]], start_ms: int, end_ms: int) -> Transcript:
        ws = tuple(
            Word(w, start_ms + s * 1000 // FRAME_RATE, min(end_ms, start_ms + (e + 1) * 1000 // FRAME_RATE),
                 max(0.0, min(1.0, p)))
            for w, s, e, p in words
        )
        # Utterance confidence: mean word posterior (pocketsphinx gives no calibrated sentence score).
        confidence = sum(w.confidence for w in ws) / len(ws) if ws else 0.0
        return Transcript(text, True, start_ms, end_ms, ws, confidence, self._utterance)

    def _drop_until_marker(self) -> None:
        while self._queue and self._queue[0] is not None:
            self._queued_ms -= self._queue.popleft().duration_ms  # type: ignore[union-attr]
        self._held_ms = 0

    def _fail(self, held_bytes: int, reason: str) -> None:
        self.failed_utterances += 1
        self._held_ms = 0
        log.warning("stt.utterance_failed", extra={
            "call_id": self.options.call_id, "track": self.options.track.value,
            "utterance": self._utterance, "audio_ms": held_bytes // 32, "reason": reason})
