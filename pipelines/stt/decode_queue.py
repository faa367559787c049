"""Who decodes what next: the scheduling rules of the local recogniser, without any I/O.

Theory.  A pocketsphinx decode is a batch job: one utterance's audio in, its text out, in a time
proportional to the audio (see ``pipelines.stt.pocketsphinx`` for the measured factors).  Sessions
therefore never hold a decoder while audio arrives in real time; they hand over whole jobs, and
a decoder is busy exactly as long as it decodes.  Two kinds of job share the decoders:

* **finals are owed.**  At the end of each utterance its session submits a final job; final jobs
  wait in one FIFO (``waiting``) per language model until a decoder is free, however long that
  takes.  The only refusal is at submission: the audio of all final jobs waiting for a decoder,
  across every language model of the provider, is bounded by an ``AudioBudget``; a job that would
  pass it raises ``Overflow`` at once (unless nothing waits: one job is always admitted), and its
  session reports the utterance as failed.  A job leaves the budget when a decoder takes it.
* **the bound is shared fairly.**  With k sessions (owners) waiting, each is entitled to 1/k of the
  bound.  When a job does not fit, an owner within its share is served by shedding the newest
  waiting jobs of the owners furthest over theirs, never an owner's oldest (each shed job is failed
  to its owner, reported as any refusal is); an owner already over its share is refused.  So a few
  calls talking without pause cannot fill the queue and starve the others: they lose their own
  latest utterances instead.
* **partials are best effort.**  A partial job (the open utterance so far) is taken only if a
  decoder is idle right now and no final is waiting (``try_partial``); otherwise it is not run at
  all.  Partials never wait, so they never delay a final that arrives later by more than the one
  partial decode already under way on that decoder.  With ``partial_reserve`` r, partials also leave
  r decoders idle (at most ``max_decoders - 1``), so that a final arriving while partials run still
  finds a decoder free unless other finals hold it.

Decoders: at most ``max_decoders`` exist, counting those being started (``starting``).  When finals
wait and no decoder is idle, ``next_steps`` asks its caller to start more, one per waiting job, up
to the bound.  A decoder that failed or timed out comes back through ``done(..., healthy=False)``
and is forgotten (its slot may be used by a fresh one); one that could not start comes back through
``start_failed``, and when nothing is left alive or starting, the jobs waiting for it are given
back to be failed: a final never waits for a decoder that cannot exist.

Bounds: ``waiting`` is bounded by the budget (in milliseconds of audio); ``busy`` and ``idle`` by
``max_decoders``.  The asyncio side (``pipelines.stt.decoder_pool.DecoderPool``) performs what this
module decides: it starts processes, runs jobs, and reports back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from engine.errors import Overflow

BYTES_PER_MS = 32  # 16 kHz int16 mono

D = TypeVar("D")  # a decoder; opaque here


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoder's answer: the text, and for finals (word, start frame, end frame, posterior)."""

    text: str
    words: tuple[tuple[str, int, int, float], ...] = ()


JobDone = Callable[["Job", "Decoded | None", "str | None"], None]
"""(job, result, error reason): exactly one of result and reason is set.  Called on the event loop."""


@dataclass(eq=False, slots=True)
class Job:
    """One batch decode: ``pcm`` (16 kHz int16) is a whole utterance, or, for a partial, its start."""

    owner: object  # the session that submitted it
    seq: int  # the owner's utterance number
    pcm: bytes
    start_ms: int
    end_ms: int
    final: bool
    done: JobDone = field(repr=False)

    @property
    def audio_ms(self) -> int:
        return len(self.pcm) // BYTES_PER_MS


class AudioBudget:
    """The provider-wide bound on audio of final jobs waiting for a decoder, shared fairly by owner."""

    def __init__(self, max_ms: int) -> None:
        self.max_ms = max_ms
        self.used_ms = 0
        self.shed = 0  # jobs shed to make room for an owner within its share
        self._owners: dict[object, list[tuple[DecodeQueue[Any], Job]]] = {}  # waiting jobs, oldest first
        self._owner_ms: dict[object, int] = {}

    def take(self, queue: DecodeQueue[Any], job: Job) -> list[Job]:
        """Count ``job`` in (waiting in ``queue``), or raise ``Overflow``.  Returns the jobs shed to make
        room, already out of their queues: their owners must fail them.  An empty budget admits any one
        job, so an utterance longer than the bound is not refused for ever."""
        ms = job.audio_ms
        shed: list[Job] = []
        if self.used_ms and self.used_ms + ms > self.max_ms:
            shed = self._make_room(job, ms)
        self.used_ms += ms
        self._owners.setdefault(job.owner, []).append((queue, job))
        self._owner_ms[job.owner] = self._owner_ms.get(job.owner, 0) + ms
        return shed

    def _make_room(self, job: Job, ms: int) -> list[Job]:
        full = (f"speech-to-text queue full: {self.used_ms / 1000:.1f} s of audio already wait for a decoder "
                f"(bound {self.max_ms / 1000:g} s)")
        share = self.max_ms / (len(self._owners) + (job.owner not in self._owners))
        if self._owner_ms.get(job.owner, 0) + ms > share:
            raise Overflow(f"{full}; this call holds its share already")
        # Plan first, shed only if the plan frees enough: newest jobs of whoever is furthest over share.
        left = dict(self._owner_ms)
        taken = {owner: 0 for owner in self._owners}
        plan: list[tuple[DecodeQueue[Any], Job]] = []
        need = self.used_ms + ms - self.max_ms
        while need > 0:
            # An owner's oldest waiting job is never shed: a call that speaks one utterance at a time
            # keeps its place; only what a call piled up behind it is at stake.
            over = [o for o in left if o is not job.owner and left[o] > share
                    and taken[o] < len(self._owners[o]) - 1]
            if not over:
                raise Overflow(full)
            hog = max(over, key=lambda o: left[o])
            jobs = self._owners[hog]
            taken[hog] += 1
            queue, victim = jobs[len(jobs) - taken[hog]]
            plan.append((queue, victim))
            left[hog] -= victim.audio_ms
            need -= victim.audio_ms
        for queue, victim in plan:
            queue.withdraw(victim)  # gives its audio back through release()
            self.shed += 1
        return [victim for _, victim in plan]

    def release(self, job: Job) -> None:
        """``job`` left the waiting line (a decoder took it, or it was cancelled or shed)."""
        self.used_ms -= job.audio_ms
        jobs = self._owners.get(job.owner)
        if jobs is None:
            return
        for i, (_, j) in enumerate(jobs):
            if j is job:
                del jobs[i]
                break
        self._owner_ms[job.owner] -= job.audio_ms
        if not jobs:
            del self._owners[job.owner]
            del self._owner_ms[job.owner]


class DecodeQueue(Generic[D]):
    """The decoders of one language model and the final jobs waiting for them; see the module docstring."""

    def __init__(self, max_decoders: int, budget: AudioBudget, partial_reserve: int = 0) -> None:
        self.max_decoders = max_decoders
        self.budget = budget
        # Idle decoders partials must leave free for finals (never all of them: one decoder still
        # serves partials).
        self.partial_reserve = max(0, min(partial_reserve, max_decoders - 1))
        self.idle: list[D] = []
        self.busy: dict[D, Job] = {}
        self.starting = 0
        self.waiting: deque[Job] = deque()
        self.waiting_ms = 0
        self.discarded = 0  # decoders forgotten after a failure

    @property
    def decoders(self) -> int:
        """Decoders alive or being started."""
        return len(self.idle) + len(self.busy) + self.starting

    @property
    def active(self) -> bool:
        return bool(self.busy or self.waiting or self.starting)

    def submit(self, job: Job) -> list[Job]:
        """Queue a final job; raises ``Overflow`` when it may not wait (then nothing is queued).  Returns
        the jobs shed for it (other owners', possibly of another queue): their owners must fail them."""
        shed = self.budget.take(self, job)
        self.waiting.append(job)
        self.waiting_ms += job.audio_ms
        return shed

    def withdraw(self, job: Job) -> None:
        """Take ``job`` out of the waiting line (the budget shed it)."""
        self.waiting.remove(job)
        self.waiting_ms -= job.audio_ms
        self.budget.release(job)

    def can_take_partial(self) -> bool:
        return len(self.idle) > self.partial_reserve and not self.waiting

    def try_partial(self, job: Job) -> D | None:
        """A decoder for ``job`` if one is idle and no final waits, else None (the partial is skipped)."""
        if not self.can_take_partial():
            return None
        decoder = self.idle.pop()
        self.busy[decoder] = job
        return decoder

    def next_steps(self) -> tuple[list[tuple[D, Job]], int]:
        """Give waiting finals to idle decoders, in order.  Returns those pairs, to run now, and how
        many decoders to start (already counted in ``starting``)."""
        run = []
        while self.waiting and self.idle:
            job = self._pop_waiting()
            decoder = self.idle.pop()
            self.busy[decoder] = job
            run.append((decoder, job))
        start = max(0, min(len(self.waiting) - self.starting, self.max_decoders - self.decoders))
        self.starting += start
        return run, start

    def reserve_starts(self) -> int:
        """Count every missing decoder as starting (warm-up); returns how many to start."""
        n = self.max_decoders - self.decoders
        self.starting += n
        return n

    def started(self, decoder: D) -> None:
        self.starting -= 1
        self.idle.append(decoder)

    def start_failed(self) -> list[Job]:
        """A start failed.  If no decoder is alive or starting, the waiting jobs are returned, removed
        from the queue, for their owners to fail."""
        self.starting -= 1
        if self.decoders:
            return []
        return self._take_waiting(lambda job: True)

    def done(self, decoder: D, *, healthy: bool) -> Job:
        """``decoder`` finished its job (returned).  Unhealthy decoders are forgotten, not reused."""
        job = self.busy.pop(decoder)
        if healthy:
            self.idle.append(decoder)
        else:
            self.discarded += 1
        return job

    def cancel(self, owner: object) -> list[Job]:
        """Remove ``owner``'s waiting jobs (it gave up on them) and return them."""
        return self._take_waiting(lambda job: job.owner is owner)

    def clear(self) -> tuple[list[D], list[Job]]:
        """Forget everything (the pool closes): every decoder to close, every job to fail."""
        decoders = self.idle + list(self.busy)
        jobs = list(self.busy.values()) + self._take_waiting(lambda job: True)
        self.idle.clear()
        self.busy.clear()
        return decoders, jobs

    def _pop_waiting(self) -> Job:
        job = self.waiting.popleft()
        self.waiting_ms -= job.audio_ms
        self.budget.release(job)
        return job

    def _take_waiting(self, which: Callable[[Job], bool]) -> list[Job]:
        taken = [job for job in self.waiting if which(job)]
        if taken:
            self.waiting = deque(job for job in self.waiting if not which(job))
            for job in taken:
                self.waiting_ms -= job.audio_ms
                self.budget.release(job)
        return taken
