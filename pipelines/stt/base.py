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
  utterance held no audio at all, or the provider failed on it: a failure is logged with its reason
  and counted in the session's ``failed_utterances``, never silent.
* ``emit`` is called on the event loop, never from a worker thread, and must not block.
* ``aclose()`` finishes what was pushed (bounded by ``drain_timeout``), emits the last final if an
  utterance was open, releases every resource (decoder, socket, task) and is idempotent.
* A session that can no longer deliver (a cloud provider unreachable after its reconnect attempts,
  refusing the credentials, out of quota) calls ``self.fail(exc)`` once: it sets ``failure`` and
  calls ``on_failure`` (set by the pipeline after ``open_session``), which may move the call to the
  next provider.  After that ``push`` raises ``Overflow`` and ``finalize`` emits nothing.
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

    def fail(self, exc: ProviderError) -> None:
        """Report that this session is dead (once); see the module docstring."""
        if self.failure is not None:
            return
        self.failure = exc
        if self.on_failure is not None:
            self.on_failure(exc)

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
