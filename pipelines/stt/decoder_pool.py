"""Pools of pocketsphinx decoders that run batch jobs, and the domain language models they load.

A decoder with the bundled English LM holds about 90 MB; one with a domain LM about 40 MB.  A
burst of calls must not create one per call, so decoders are pooled per language model:

* at most ``max_decoders`` exist per model, created lazily in the executor (or all at once by
  ``warm``), each a process of its own (``pipelines.stt.sphinx_worker``);
* a decoder is busy for one job only, a batch decode of audio a session already holds: what runs
  next is decided by ``pipelines.stt.decode_queue`` (owed finals in FIFO order, partials only on
  an idle decoder), and this module carries it out;
* a job whose decode raises, whose process dies, or that runs past ``job_timeout`` fails: its
  owner is told (``Job.done`` with a reason) and the decoder is discarded (killed, never reused);
  the pool starts a fresh one when finals wait.  The default timeout, 10 s plus 2 s per second of
  audio, is eight times the bundled LM's measured cost: only a hung or starved process reaches it.

Domain models are built from a phrase list with ``pocketsphinx.lm`` (an ARPA trigram LM) plus a
dictionary cut down to the phrases' words, cached on disk by a hash of the normalised phrases.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import re
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import ProviderUnavailable
from pipelines.stt.decode_queue import AudioBudget, Decoded, DecodeQueue, Job

log = logging.getLogger("switchboard.stt.pocketsphinx")


@dataclass(frozen=True, slots=True)
class LanguageModel:
    key: str  # "default" or a hash of the phrases
    lm_path: str | None = None  # None: the bundled English LM and dictionary
    dict_path: str | None = None


DEFAULT_MODEL = LanguageModel("default")


def normalise_phrases(phrases: Sequence[str]) -> list[str]:
    out = []
    for phrase in phrases:
        words = re.sub(r"[^a-z' ]+", " ", phrase.lower()).split()
        if words:
            out.append(" ".join(words))
    return out


def model_key(phrases: Sequence[str]) -> str:
    norm = normalise_phrases(phrases)
    if not norm:
        return DEFAULT_MODEL.key
    return hashlib.sha256("\n".join(sorted(set(norm))).encode()).hexdigest()[:20]


def build_domain_model(phrases: Sequence[str], cache_dir: Path) -> LanguageModel:
    """Build (or reuse from ``cache_dir``) the LM and dictionary for ``phrases``.  Blocking: run in
    an executor.  Words missing from the pronouncing dictionary are dropped with a warning."""
    import pocketsphinx
    from pocketsphinx.lm import ArpaBoLM

    key = model_key(phrases)
    if key == DEFAULT_MODEL.key:
        return DEFAULT_MODEL
    lm_path, dict_path = cache_dir / f"{key}.lm", cache_dir / f"{key}.dict"
    if lm_path.exists() and dict_path.exists():
        return LanguageModel(key, str(lm_path), str(dict_path))
    cache_dir.mkdir(parents=True, exist_ok=True)
    full_dict = Path(pocketsphinx.get_model_path()) / "en-us" / "cmudict-en-us.dict"
    norm = normalise_phrases(phrases)
    vocabulary = {w for p in norm for w in p.split()}
    entries, known = [], set()
    with open(full_dict, encoding="utf-8") as f:
        for line in f:
            word = line.split(" ", 1)[0]
            base = word.split("(", 1)[0]
            if base in vocabulary:
                entries.append(line)
                known.add(base)
    missing = sorted(vocabulary - known)
    if missing:
        log.warning("stt.phrases_unknown_words", extra={"count": len(missing), "words": missing[:20]})
    kept = [" ".join(w for w in p.split() if w in known) for p in norm]
    kept = [p for p in kept if p]
    if not kept:
        return DEFAULT_MODEL
    builder = ArpaBoLM(text="\n".join(kept) + "\n", add_start=True, case="lower")
    builder.compute()
    out = io.StringIO()
    builder.write(out)
    # Write to temporary names, then rename: concurrent builders never see half a file.
    for path, text in ((dict_path, "".join(entries)), (lm_path, out.getvalue())):
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return LanguageModel(key, str(lm_path), str(dict_path))


class DecoderPool:
    """Decoders for one language model, running the jobs its ``DecodeQueue`` hands them.

    ``factory`` is blocking (spawn and model load) and runs through ``run``, in the executor.  The
    decoders it makes must have ``async decode(pcm, words) -> Decoded`` and ``close(kill=...)``.
    Every job submitted gets exactly one ``Job.done`` call, on the event loop, unless its owner
    takes it back first with ``cancel``.
    """

    def __init__(
        self,
        model: LanguageModel,
        factory: Callable[[LanguageModel], Any],
        *,
        max_decoders: int,
        budget: AudioBudget,
        run: Callable[..., asyncio.Future[Any]],
        partial_reserve: int = 0,
        job_timeout: Callable[[Job], float] = lambda job: 10.0 + job.audio_ms / 500,  # see the docstring
    ) -> None:
        self.model = model
        self.queue: DecodeQueue[Any] = DecodeQueue(max_decoders, budget, partial_reserve)
        self.sessions = 0  # open sessions using this model (the provider evicts only unused pools)
        self.closed = False
        self._factory = factory
        self._run = run
        self._job_timeout = job_timeout
        self._tasks: set[asyncio.Task[None]] = set()  # decodes: cancelled by close()
        self._starts: set[asyncio.Task[None]] = set()  # never cancelled: see _create

    @property
    def max_decoders(self) -> int:
        return self.queue.max_decoders

    def submit_final(self, job: Job) -> None:
        """Queue an owed final.  Raises ``Overflow`` when the provider's queue bound is spent."""
        if self.closed:
            raise ProviderUnavailable("pocketsphinx provider closed")
        shed = self.queue.submit(job)
        self._step()
        for victim in shed:  # other calls' latest utterances, over their share of the queue bound
            victim.done(victim, None, "speech-to-text queue full: shed to keep this call within its fair share")

    def can_take_partial(self) -> bool:
        return not self.closed and self.queue.can_take_partial()

    def try_partial(self, job: Job) -> bool:
        """Run a partial now if a decoder is idle and no final waits; False: skipped."""
        if self.closed:
            return False
        decoder = self.queue.try_partial(job)
        if decoder is None:
            return False
        self._spawn(self._decode(decoder, job))
        return True

    def cancel(self, owner: object) -> list[Job]:
        """Take back ``owner``'s jobs still waiting for a decoder (they will not be run nor reported)."""
        return self.queue.cancel(owner)

    async def warm(self) -> None:
        """Start every missing decoder now and wait for them (start failures are logged)."""
        starts = [self._spawn_start() for _ in range(self.queue.reserve_starts())]
        await asyncio.gather(*(asyncio.shield(t) for t in starts), return_exceptions=True)

    def close(self) -> None:
        """Stop every decoder now and fail every job not finished (their owners are told)."""
        if self.closed:
            return
        self.closed = True
        for task in self._tasks:
            task.cancel()
        decoders, jobs = self.queue.clear()
        for decoder in decoders:
            decoder.close(kill=True)
        for job in jobs:
            job.done(job, None, "pocketsphinx provider closed")

    # -- internals -------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], tasks: set[asyncio.Task[None]] | None = None
               ) -> asyncio.Task[None]:
        tasks = self._tasks if tasks is None else tasks
        task = asyncio.get_running_loop().create_task(coro, name=f"pocketsphinx-{self.model.key}")
        tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(t, tasks))
        return task

    def _spawn_start(self) -> asyncio.Task[None]:
        return self._spawn(self._start(), self._starts)

    def _task_done(self, task: asyncio.Task[None], tasks: set[asyncio.Task[None]]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("stt.pool_task_failed", exc_info=task.exception())

    def _step(self) -> None:
        if self.closed:
            return
        run, start = self.queue.next_steps()
        for decoder, job in run:
            self._spawn(self._decode(decoder, job))
        for _ in range(start):
            self._spawn_start()

    def _create(self) -> Any:
        """Runs in the executor thread.  Start tasks are never cancelled, so each decoder made here is
        either handed to the queue or closed, by ``_start`` or, if the pool closed meanwhile, here."""
        decoder = self._factory(self.model)
        if self.closed:  # the pool closed meanwhile: nobody else will ever close this one
            decoder.close()
            raise ProviderUnavailable("pocketsphinx provider closed")
        return decoder

    async def _start(self) -> None:
        try:
            decoder = await self._run(self._create)
        except Exception as exc:
            if self.closed:
                return
            log.error("stt.decoder_start_failed", extra={"model": self.model.key, "error": repr(exc)})
            # No retry from here (a start that keeps failing must not spin): the next submit or
            # finished job starts one again if finals still wait.
            for job in self.queue.start_failed():
                job.done(job, None, f"no pocketsphinx decoder could start: {exc!r}")
            return
        if self.closed:
            decoder.close()
            return
        self.queue.started(decoder)
        self._step()

    async def _decode(self, decoder: Any, job: Job) -> None:
        result: Decoded | None = None
        error: str | None = None
        timeout = self._job_timeout(job)
        try:
            result = await asyncio.wait_for(decoder.decode(job.pcm, job.final), timeout)
        except TimeoutError:
            error = f"pocketsphinx decode of {job.audio_ms} ms of audio took over {timeout:g} s"
        except asyncio.CancelledError:
            raise  # the pool is closing: close() fails the job
        except Exception as exc:  # the worker raised, or its process died (BrokenProcessPool)
            error = f"pocketsphinx decoder failed: {exc!r}"
        if self.closed:
            return
        self.queue.done(decoder, healthy=error is None)
        if error is not None:
            # Its state is unknown (it failed or hung mid-job): never hand it another job.
            decoder.close(kill=True)
            log.warning("stt.decoder_discarded", extra={"model": self.model.key, "reason": error})
        try:
            job.done(job, result, error)
        finally:
            self._step()

