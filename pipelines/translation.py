"""The translation stage: final transcripts in, translations out, never in the transcript's way.

A final transcript is published first; its translation is a separate job (``submit``), done by a
pool of ``concurrency`` worker tasks.  The transcript path only appends to a bounded queue.

Rules:

- **Bound.**  At most ``max_pending`` jobs wait.  Past it the *oldest* waiting job is shed (it is
  the one least likely to still be useful to an agent reading live) and reported through
  ``on_failed(job, "shed")``: counted, published, never silent.
- **Deadline.**  Each job has ``deadline_s`` from the moment it was submitted; time spent waiting in
  the queue counts.  A job still waiting at its deadline is not sent at all; a provider that misses
  it raises ``TranslationTimeout``.  Both are reported as ``on_failed(job, "deadline")``.
- **Errors.**  A provider error is reported as ``on_failed(job, "error: ...")``.
- **Lag.**  ``lag`` records, per translation, milliseconds from submission to result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.metrics import LagHistogram
from engine.pipeline import BoundedChannel, Policy
from pipelines.translate.base import Translation, TranslationError, TranslationTimeout, Translator

log = logging.getLogger("switchboard.translation")


@dataclass(slots=True)
class TranslationJob:
    text: str  # already redacted (and truecased, api.speech.CallEvents): this text leaves the building
    source_lang: str
    target_lang: str
    context: dict[str, Any]  # what the result is published with (call, track, seq, ...)
    on_done: Callable[[TranslationJob, Translation], None]
    on_failed: Callable[[TranslationJob, str], None]
    submitted: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class StageStats:
    submitted: int = 0
    translated: int = 0
    shed: int = 0
    deadline: int = 0
    errors: int = 0


class TranslationStage:
    def __init__(self, translator: Translator, *, concurrency: int = 4, max_pending: int = 200,
                 deadline_s: float = 5.0) -> None:
        self.translator = translator
        self.deadline_s = deadline_s
        # Past max_pending the oldest waiting job is shed: reported as failed ("shed"), never silent.
        self._queue: BoundedChannel[TranslationJob] = BoundedChannel(
            max_pending, Policy.LATEST, on_drop=self._shed, name="translation-jobs")
        self._concurrency = concurrency
        self._tasks: list[asyncio.Task[None]] = []
        self.stats = StageStats()
        self.lag = LagHistogram()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._worker(), name=f"translate-{i}") for i in range(self._concurrency)]

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._queue.close()
        while self._queue:  # reported, not silently dropped
            self._failed(self._queue.get_nowait(), "shutdown")

    def submit(self, job: TranslationJob) -> None:
        """Queue a job.  Never blocks; sheds the oldest waiting job when full (reported)."""
        self.stats.submitted += 1
        self._queue.put(job)

    def _shed(self, job: TranslationJob) -> None:
        self.stats.shed += 1
        self._failed(job, "shed")

    async def _worker(self) -> None:
        while True:
            try:
                job = await self._queue.get()
            except EOFError:
                return
            left = job.submitted + self.deadline_s - time.monotonic()
            if left <= 0:
                self.stats.deadline += 1
                self._failed(job, "deadline")
                continue
            try:
                result = await self.translator.translate(job.text, job.source_lang, job.target_lang, deadline_s=left)
            except TranslationTimeout:
                self.stats.deadline += 1
                self._failed(job, "deadline")
                continue
            except TranslationError as exc:
                self.stats.errors += 1
                self._failed(job, f"error: {exc}")
                continue
            except Exception as exc:  # a bug in a provider must not kill the worker
                log.exception("translation.bug", extra={"provider": self.translator.name})
                self.stats.errors += 1
                self._failed(job, f"error: {type(exc).__name__}")
                continue
            self.stats.translated += 1
            self.lag.record((time.monotonic() - job.submitted) * 1000)
            try:
                job.on_done(job, result)
            except Exception:
                log.exception("translation.callback_failed")

    def _failed(self, job: TranslationJob, reason: str) -> None:
        log.warning("translation.failed", extra={"reason": reason[:200], "provider": self.translator.name,
                                                 "source": job.source_lang, "target": job.target_lang,
                                                 **{k: v for k, v in job.context.items() if k in ("call_id", "seq")}})
        try:
            job.on_failed(job, reason)
        except Exception:
            log.exception("translation.callback_failed")
