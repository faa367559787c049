"""The streaming speech-to-text interface every provider implements.

A provider opens one *session* per call track.  The call pipeline pushes the audio of each utterance
(as the VAD segmenter cuts it) and calls ``finalize()`` when the utterance ends; the session reports
interim and final results through the ``emit`` callback it was opened with.

Contract of a session:

* ``push(frame)`` never blocks and never awaits.  The session buffers up to its declared bound
  (``max_buffer_ms``); past it, ``push`` raises ``engine.errors.Overflow`` and the frame is the
  caller's to count as dropped.  Frames arrive at the provider's ``sample_rate``.
* ``finalize()`` marks the end of an utterance: every frame pushed before it is decoded, then exactly
  one final ``Transcript`` (possibly with empty text) is emitted for the utterance, unless the
  utterance held no audio at all, or the provider failed on it.  A failure is never silent: the
  session logs it with its reason and calls ``utterance_failed(seq, reason)``, which counts it in
  ``failed_utterances`` and passes it to ``on_utterance_failed`` (set by the pipeline after
  ``open_session``).  ``seq`` is the ``Transcript.utterance`` its final would have had.
* ``emit`` and ``on_utterance_failed`` are called on the event loop, never from a worker thread, and
  must not block.
* ``aclose(drain_timeout)`` finishes what was pushed, emits the last final if an utterance was open,
  releases every resource (decoder, socket, task) and is idempotent.  It waits ``drain_timeout``, or
  longer when the session knows it owes more work than that covers (its own bound, proportional to
  the audio it has queued, never unbounded); what is not done then is reported as failed utterances.
* A session that can no longer deliver (a cloud provider unreachable after its reconnect attempts,
  refusing the credentials, out of quota) calls ``self.fail(exc)`` once: it sets ``failure`` and
  calls ``on_failure`` (set by the pipeline after ``open_session``), which may move the call to the
  next provider.  After that (and after ``aclose``) ``push`` raises ``engine.errors.SessionClosed``
  and ``finalize`` emits nothing.
  ``open_session`` itself raises ``ProviderUnavailable`` when it cannot connect at all.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.errors import ProviderError
from engine.frames import AudioFrame, Track


@dataclass(frozen=True, slots=True)
class Word:
    text: str
    start_ms: int  # stream-relative
    end_ms: int
    confidence: float = 1.0


@dataclass(frozen=True, slots=True)
class Transcript:
    """One interim (``is_final=False``) or final hypothesis for one utterance."""

    text: str
    is_final: bool
    start_ms: int  # stream-relative start of the utterance
    end_ms: int
    words: tuple[Word, ...] = ()
    confidence: float = 0.0
    utterance: int = 0  # per-session utterance counter; partials and the final of one utterance share it


Emit = Callable[[Transcript], None]


@dataclass(frozen=True, slots=True)
class SessionOptions:
    call_id: str
    track: Track = Track.INBOUND
    language: str = "en"
    phrases: Sequence[str] = field(default_factory=tuple)  # domain phrase list (per organisation)


class SttSession(abc.ABC):
    sample_rate: int
    max_buffer_ms: int
    failed_utterances: int = 0
    failure: ProviderError | None = None
    on_failure: Callable[[ProviderError], None] | None = None
    on_utterance_failed: Callable[[int, str], None] | None = None  # (utterance seq, reason)

    def fail(self, exc: ProviderError) -> None:
        """Report that this session is dead (once); see the module docstring."""
        if self.failure is not None:
            return
        self.failure = exc
        if self.on_failure is not None:
            self.on_failure(exc)

    def utterance_failed(self, seq: int, reason: str) -> None:
        """Count utterance ``seq`` as lost and tell the owner; see the module docstring."""
        self.failed_utterances += 1
        if self.on_utterance_failed is not None:
            self.on_utterance_failed(seq, reason)

    @abc.abstractmethod
    def push(self, frame: AudioFrame) -> None: ...

    @abc.abstractmethod
    def finalize(self) -> None: ...

    @abc.abstractmethod
    async def aclose(self, drain_timeout: float = 5.0) -> None: ...


class SttProvider(abc.ABC):
    """Factory of sessions; owns what sessions share (a decoder pool, an HTTP client)."""

    name: str
    sample_rate: int  # the rate its sessions want audio at

    @abc.abstractmethod
    async def open_session(self, options: SessionOptions, emit: Emit) -> SttSession: ...

    async def warm(self, phrases: Sequence[str] = ()) -> None:  # noqa: B027 - optional hook
        """Prepare what sessions for ``phrases`` will need (models, decoders) before calls arrive."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what the provider shares between sessions."""
