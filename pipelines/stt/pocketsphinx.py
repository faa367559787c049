"""Offline speech-to-text on pocketsphinx (English model shipped in the wheel).

Theory.  A session never holds a decoder while audio arrives in real time: it buffers the open
utterance itself (bounded by ``max_buffer_ms``), and a decoder is busy only while it decodes a job
the session hands over whole.  Every job is one batch decode in a decoder's own worker process
(``sphinx_worker``: start_utt, process_raw with ``full_utt``, end_utt), stateless, so any decoder of
the language model can take any session's job.  Who decodes what next is
``pipelines.stt.decode_queue``'s rule; in short:

* **finals are owed.**  At ``finalize()`` the whole utterance becomes a final job.  Final jobs wait
  in FIFO order for a decoder, without a timeout.  Batch decoding of the whole utterance is also
  what makes the final good: cepstral mean normalisation over the utterance (on espeak speech
  through G.711 it cut the word error rate from 0.40 to 0.30 against a live, chunk-by-chunk pass).
* **partials are best effort.**  While the utterance is open, the audio so far is decoded as a
  partial job only if a decoder is idle right now and no final waits, at most one per session at a
  time, and only once the utterance has grown by ``max(chunk_ms, half its length)`` since the last
  one: partial decodes cost at most about three times the final's (a geometric series), so the
  cost stays linear in the utterance length.  Partials also leave ``partial_reserve`` (default 1)
  decoders idle for finals: with the bundled LM, 2 decoders and 2 talkers, finals came 0.96 s (p50)
  and 1.48 s (p95) after their utterance's end, mostly the decode itself, instead of 1.28 s and
  2.26 s when they could find both decoders busy with partials (``bench.stt_capacity --generic
  --callers 2 --seconds 40 --partial-reserve 0|1``).  A partial is emitted only if its text changed and its
  utterance is still open: never after that utterance's final.
* **nothing is dropped silently.**  An utterance whose final cannot be queued (the provider-wide
  bound ``queue_max_s`` on audio waiting for a decoder is spent), whose decode fails (the worker
  raised, its process died, it ran past its timeout), or that is still undecoded when ``aclose``
  gives up, is a *failed utterance*: logged, counted in ``failed_utterances`` and passed to
  ``on_utterance_failed(seq, reason)``.  Finals and failures come out in utterance order.

Measured here (2 cores, one decoder alone, espeak speech through G.711 upsampled to 16 kHz): a batch
decode costs 0.21-0.25 s of CPU per second of audio with the bundled LM, 0.04 s with a domain LM built
from a phrase list.  ``aclose(drain_timeout)`` waits for the session's owed finals up to
``drain_timeout + DRAIN_S_PER_AUDIO_S * (audio queued ahead of them and of its own)``: 0.5 s per
second of audio is twice the bundled LM's cost, headroom for a core shared with the media path and
other processes, and is not divided by the number of decoders, so it holds even when one decoder
is left.  The queue bound makes the wait bounded too: at most 0.5 x (120 s + ``max_buffer_ms``).

Decoder processes are started at start-up (``warm``) so a spawn and model load (~0.5 s) never
delays a live call's first utterance.  A small thread pool (``max_workers``) runs the blocking
set-up work: language-model builds and process starts.  ``python -m bench.stt_stall`` measures
what the event loop feels: with decoders in threads a 10 s utterance stalled it up to 1.3 s
(pocketsphinx holds the GIL in ``process_raw``); in processes, 2 ms.  ``python -m
bench.stt_capacity`` measures how many talking callers a core carries.

Decoders come from a ``DecoderPool`` per language model (the bundled LM, or a domain LM built from
the organisation's phrase list): ``max_decoders`` processes each (by default one per core).
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import Overflow, ProviderUnavailable, SessionClosed
from engine.frames import AudioFrame
from pipelines.stt.base import Emit, SessionOptions, SttProvider, SttSession, Transcript, Word
from pipelines.stt.decode_queue import BYTES_PER_MS, AudioBudget, Decoded, Job
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
DRAIN_S_PER_AUDIO_S = 0.5  # aclose's extra wait per second of queued audio (see the module docstring)


def default_decoders() -> int:
    """One decoder process per core this process may run on (its affinity, not the machine's count:
    a pinned or CPU-limited server gets no more decoders than cores); more would only share them."""
    return max(1, len(os.sched_getaffinity(0)))


class PocketsphinxProvider(SttProvider):
    name = "pocketsphinx"
    sample_rate = 16000

    def __init__(
        self,
        *,
        max_decoders: int | None = None,
        max_workers: int = 2,
        queue_max_s: float = 120.0,
        max_buffer_ms: int = 30_000,
        chunk_ms: int = 200,
        partial_reserve: int = 1,
        max_models: int = 8,
        cache_dir: Path | None = None,
    ) -> None:
        self.max_decoders = max_decoders or default_decoders()
        self.max_buffer_ms = max_buffer_ms
        self.chunk_ms = chunk_ms
        self.partial_reserve = partial_reserve
        self.max_models = max_models
        self.budget = AudioBudget(int(queue_max_s * 1000))  # shared by every language model's queue
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
                model, DecoderProcess.start, max_decoders=self.max_decoders, budget=self.budget, run=self.run,
                partial_reserve=self.partial_reserve,
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
            victim = next((k for k, p in self._pools.items() if p.sessions == 0 and not p.queue.active), None)
            if victim is None:
                raise ProviderUnavailable(f"{self.max_models} language models all in use")
            self._pools.pop(victim).close()

    async def warm(self, phrases: Sequence[str] = ()) -> None:
        """Build the model and start every decoder process of its pool now, before calls arrive."""
        pool = await self.pool(tuple(phrases))
        await pool.warm()

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


@dataclass(slots=True)
class _Owed:
    """A final job submitted and not yet reported (emitted or failed)."""

    job: Job
    result: Decoded | None = None
    error: str | None = None
    done: bool = False


class PocketsphinxSession(SttSession):
    """One track's recogniser; see the module docstring, and ``pipelines.stt.base`` for the contract.

    Holds, within ``max_buffer_ms`` together: the open utterance, and the audio of its finals not yet
    reported (queued or decoding).  A partial in flight holds one more copy of (part of) the open
    utterance.
    """

    sample_rate = 16000

    def __init__(self, provider: PocketsphinxProvider, pool: DecoderPool, options: SessionOptions, emit: Emit):
        self.max_buffer_ms = provider.max_buffer_ms
        self.options = options
        self.failed_utterances = 0
        self.stale_partials = 0  # partial results dropped because their utterance ended meanwhile
        self._pool = pool
        self._emit = emit
        self._chunk_bytes = provider.chunk_ms * BYTES_PER_MS
        self._max_bytes = provider.max_buffer_ms * BYTES_PER_MS
        self._utt = bytearray()  # the open utterance
        self._seq = 0  # its number (1, 2, ...); stays that of the last one between utterances
        self._start_ms = self._end_ms = 0
        self._next_partial = 0  # open-utterance length (bytes) from which the next partial may run
        self._last_partial = ""
        self._partial: Job | None = None  # the one partial in flight
        self._owed: dict[int, _Owed] = {}  # by utterance number, in order
        self._owed_bytes = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._closed = False
        pool.sessions += 1

    def push(self, frame: AudioFrame) -> None:
        if self._closed:
            raise SessionClosed("session closed")
        if len(self._utt) + self._owed_bytes + len(frame.pcm) > self._max_bytes:
            raise Overflow(f"pocketsphinx session holds {self.max_buffer_ms} ms already")
        if not self._utt:
            self._seq += 1
            self._start_ms = frame.timestamp_ms
            self._next_partial = self._chunk_bytes
            self._last_partial = ""
        self._utt += frame.pcm
        self._end_ms = frame.end_ms
        if self._partial is None and len(self._utt) >= self._next_partial and self._pool.can_take_partial():
            self._start_partial()

    def finalize(self) -> None:
        if self._closed or not self._utt:
            return
        job = Job(self, self._seq, bytes(self._utt), self._start_ms, self._end_ms, True, self._final_done)
        self._utt.clear()
        self._owed[job.seq] = _Owed(job)
        self._owed_bytes += len(job.pcm)
        self._drained.clear()
        try:
            self._pool.submit_final(job)
        except (Overflow, ProviderUnavailable) as exc:
            self._final_done(job, None, str(exc))

    async def aclose(self, drain_timeout: float = 5.0) -> None:
        """Finalise the open utterance and wait for every owed final, for ``drain_timeout`` plus
        ``DRAIN_S_PER_AUDIO_S`` per second of audio queued; what is still undecoded then is reported
        as failed utterances."""
        if self._closed:
            return
        self.finalize()
        self._closed = True
        reason = "session cancelled while closing"
        try:
            if self._owed:
                queued_s = (self._pool.queue.waiting_ms + self._owed_bytes // BYTES_PER_MS) / 1000
                bound = drain_timeout + DRAIN_S_PER_AUDIO_S * queued_s
                try:
                    await asyncio.wait_for(self._drained.wait(), bound)
                except TimeoutError:
                    reason = f"not decoded within {bound:.1f} s of the session's close ({queued_s:.1f} s queued)"
        finally:
            if self._owed:
                self._pool.cancel(self)  # in-flight jobs finish on their own; their results are ignored
                self._deliver(give_up=reason)
            self._pool.sessions -= 1

    # -- job results (on the event loop) ---------------------------------------------------------

    def _start_partial(self) -> None:
        job = Job(self, self._seq, bytes(self._utt), self._start_ms, self._end_ms, False, self._partial_done)
        if self._pool.try_partial(job):
            self._partial = job
            n = len(self._utt)
            self._next_partial = n + max(self._chunk_bytes, n // 2)

    def _partial_done(self, job: Job, result: Decoded | None, error: str | None) -> None:
        self._partial = None
        if result is None:
            log.info("stt.partial_failed", extra={"call_id": self.options.call_id, "reason": error})
            return
        if self._closed or job.seq != self._seq or not self._utt:
            self.stale_partials += 1  # its utterance was finalised: the final speaks for it now
            return
        if result.text and result.text != self._last_partial:
            self._last_partial = result.text
            self._emit(Transcript(result.text, False, job.start_ms, job.end_ms, utterance=job.seq))

    def _final_done(self, job: Job, result: Decoded | None, error: str | None) -> None:
        owed = self._owed.get(job.seq)
        if owed is None or owed.job is not job:
            return  # given up at aclose already
        owed.result, owed.error, owed.done = result, error, True
        self._deliver()

    def _deliver(self, give_up: str | None = None) -> None:
        """Report finished finals in utterance order; with ``give_up``, unfinished ones fail with it."""
        while self._owed:
            seq, owed = next(iter(self._owed.items()))
            if not owed.done:
                if give_up is None:
                    break
                owed.error = give_up
            del self._owed[seq]
            self._owed_bytes -= len(owed.job.pcm)
            if owed.result is not None:
                self._emit(self._final(owed.job, owed.result))
            else:
                self._fail(owed.job, owed.error or "unknown")
        if not self._owed:
            self._drained.set()

    def _final(self, job: Job, result: Decoded) -> Transcript:
        start_ms, end_ms = job.start_ms, job.end_ms
        ws = tuple(
            Word(w, start_ms + s * 1000 // FRAME_RATE, min(end_ms, start_ms + (e + 1) * 1000 // FRAME_RATE),
                 max(0.0, min(1.0, p)))
            for w, s, e, p in result.words
        )
        # Utterance confidence: mean word posterior (pocketsphinx gives no calibrated sentence score).
        confidence = sum(w.confidence for w in ws) / len(ws) if ws else 0.0
        return Transcript(result.text, True, start_ms, end_ms, ws, confidence, job.seq)

    def _fail(self, job: Job, reason: str) -> None:
        log.warning("stt.utterance_failed", extra={
            "call_id": self.options.call_id, "track": self.options.track.value,
            "utterance": job.seq, "audio_ms": job.audio_ms, "reason": reason})
        self.utterance_failed(job.seq, reason)
