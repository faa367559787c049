"""A chain of speech-to-text providers with circuit breakers: the call goes on when one fails.

``FailoverProvider([primary, secondary, ...])`` is itself an ``SttProvider``.  ``open_session``
tries the providers in order, skipping any whose circuit is open, and returns a ``FailoverSession``
that forwards to the session of the provider in use.  When that session reports a failure
(``SttSession.fail``), or opening it raises ``ProviderError``, the next provider takes over:

- the audio of the utterance in progress (kept while it lasts, bounded by ``replay_ms``) is pushed
  again to the new session, so the utterance is not lost, and a ``finalize`` that arrived during
  the switch is delivered after it;
- ``on_switch(from, to, reason)`` is called (the pipeline publishes it as an ``stt.failover`` event);
- when no provider is left, the session fails for good (``fail`` with ``ProviderUnavailable``).

Circuit breaker, per provider, shared by all calls (theory: stop sending new calls to a provider
that keeps failing, and probe it again after a cool-down):

    CLOSED --(failures reach `threshold` in a row)--> OPEN --(cooldown_s passed)--> HALF_OPEN
    HALF_OPEN --(one session opens and works)--> CLOSED;  HALF_OPEN --(it fails)--> OPEN

In HALF_OPEN one trial session at a time is let through; others skip the provider.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence

from engine.errors import Overflow, ProviderError, ProviderUnavailable, SessionClosed
from engine.frames import FRAME_MS, AudioFrame
from engine.resample import Resampler
from pipelines.stt.base import Emit, SessionOptions, SttProvider, SttSession, Transcript

log = logging.getLogger("switchboard.stt.failover")

OnSwitch = Callable[[str, str, str], None]


class Circuit(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    def __init__(self, threshold: int = 3, cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self.state = Circuit.CLOSED
        self.failures = 0
        self._opened_at = 0.0
        self._trial = False

    def allow(self) -> bool:
        """May a new session try this provider now?  (Takes the half-open trial slot if it does.)"""
        if self.state is Circuit.OPEN and self._clock() - self._opened_at >= self.cooldown_s:
            self.state = Circuit.HALF_OPEN
            self._trial = False
        if self.state is Circuit.CLOSED:
            return True
        if self.state is Circuit.HALF_OPEN and not self._trial:
            self._trial = True
            return True
        return False

    def success(self) -> None:
        self.state = Circuit.CLOSED
        self.failures = 0
        self._trial = False

    def failure(self) -> None:
        self.failures += 1
        if self.state is Circuit.HALF_OPEN or self.failures >= self.threshold:
            self.state = Circuit.OPEN
            self._opened_at = self._clock()
            self._trial = False


class FailoverProvider(SttProvider):
    def __init__(self, providers: Sequence[SttProvider], *, threshold: int = 3, cooldown_s: float = 30.0,
                 replay_ms: int = 15_000) -> None:
        if not providers:
            raise ValueError("at least one provider")
        self.providers = list(providers)
        self.name = "+".join(p.name for p in providers)
        # Audio comes in at the primary's rate; a fallback with another rate gets it resampled.
        self.sample_rate = providers[0].sample_rate
        self.breakers = {p.name: Breaker(threshold, cooldown_s) for p in providers}
        self.replay_ms = replay_ms

    async def warm(self, phrases: Sequence[str] = ()) -> None:
        for p in self.providers:
            await p.warm(phrases)

    async def aclose(self) -> None:
        for p in self.providers:
            await p.aclose()

    async def open_session(self, options: SessionOptions, emit: Emit, on_switch: OnSwitch | None = None
                           ) -> FailoverSession:
        session = FailoverSession(self, options, emit, on_switch)
        await session.open_next(reason="")
        return session

    async def _open(self, index: int, options: SessionOptions, emit: Emit) -> tuple[int, SttSession] | None:
        """Open a session on the first provider at or after ``index`` that is allowed and works."""
        for i in range(index, len(self.providers)):
            p = self.providers[i]
            breaker = self.breakers[p.name]
            if not breaker.allow():
                continue
            try:
                session = await p.open_session(options, emit)
            except ProviderError as exc:
                breaker.failure()
                log.warning("stt.open_failed", extra={"call_id": options.call_id, "provider": p.name,
                                                       "error": str(exc), "circuit": breaker.state.value})
                continue
            breaker.success()
            return i, session
        return None


class FailoverSession(SttSession):
    def __init__(self, chain: FailoverProvider, options: SessionOptions, emit: Emit,
                 on_switch: OnSwitch | None) -> None:
        self._chain = chain
        self._options = options
        self._emit = emit
        self._on_switch = on_switch
        self.sample_rate = chain.sample_rate
        self.max_buffer_ms = chain.replay_ms
        self._index = -1
        self._inner: SttSession | None = None
        self._resampler: Resampler | None = None  # when the provider in use wants another rate
        # The utterance in progress, to replay on a new provider; bounded by replay_ms.
        self._utterance: deque[AudioFrame] = deque(maxlen=max(1, chain.replay_ms // FRAME_MS))
        self._pending_finalize = False
        self._switching: asyncio.Task[None] | None = None
        self._closed = False
        self.provider = ""
        self.switches = 0

    async def open_next(self, reason: str) -> None:
        opened = await self._chain._open(self._index + 1, self._options, self._forward)
        if opened is None:
            self._inner = None
            if self._index < 0:
                raise ProviderUnavailable(f"no speech-to-text provider available ({self._chain.name})")
            self.fail(ProviderUnavailable(f"every provider failed; last: {reason}"))
            return
        previous = self.provider
        self._index, self._inner = opened
        self.provider = self._chain.providers[self._index].name
        self._inner.on_failure = self._inner_failed
        self._inner.on_utterance_failed = self.utterance_failed
        rate = self._inner.sample_rate
        self._resampler = None if rate == self.sample_rate else Resampler(self.sample_rate, rate)
        if previous:
            self.switches += 1
            log.warning("stt.failover", extra={"call_id": self._options.call_id, "from": previous,
                                               "to": self.provider, "reason": reason})
            if self._on_switch is not None:
                self._on_switch(previous, self.provider, reason)
        for frame in self._utterance:  # the utterance in progress, again, on the new provider
            self._push_inner(frame)
        if self._pending_finalize:
            self._pending_finalize = False
            self._utterance.clear()
            self._finalize_inner()

    def _push_inner(self, frame: AudioFrame) -> None:
        assert self._inner is not None
        if self._resampler is not None:
            frame = AudioFrame(self._resampler.process(frame.pcm), self._resampler.dst_rate, frame.timestamp_ms,
                               frame.track)
        self._inner.push(frame)

    def _finalize_inner(self) -> None:
        assert self._inner is not None
        if self._resampler is not None:
            self._resampler.reset()  # the next utterance is not contiguous with this one
        self._inner.finalize()

    def _forward(self, tr: Transcript) -> None:
        if not self._closed or tr.is_final:
            self._emit(tr)

    def _inner_failed(self, exc: ProviderError) -> None:
        self._chain.breakers[self.provider].failure()
        if self._closed or self._switching is not None:
            return
        failed = self._inner
        self._inner = None
        self._switching = asyncio.get_running_loop().create_task(self._switch(failed, str(exc)),
                                                                 name="stt-failover")

    async def _switch(self, failed: SttSession | None, reason: str) -> None:
        try:
            if failed is not None:
                await failed.aclose(0.5)
            await self.open_next(reason)
        finally:
            self._switching = None

    def push(self, frame: AudioFrame) -> None:
        if self.failure is not None or self._closed:
            raise SessionClosed("speech-to-text session failed")
        if len(self._utterance) == self._utterance.maxlen:
            raise Overflow("utterance longer than the replay bound")
        self._utterance.append(frame)
        if self._inner is not None:
            self._push_inner(frame)  # Overflow from the provider propagates: the caller counts it

    def finalize(self) -> None:
        if self.failure is not None:
            return
        if self._inner is None:
            self._pending_finalize = True  # delivered once the next provider is open
            return
        self._utterance.clear()
        self._finalize_inner()

    async def aclose(self, drain_timeout: float = 5.0) -> None:
        if self._switching is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._switching), drain_timeout)
            except TimeoutError:
                self._switching.cancel()
        self._closed = True
        if self._inner is not None:
            await self._inner.aclose(drain_timeout)
            self._inner = None
