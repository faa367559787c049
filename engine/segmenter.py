"""Voice-activity segmentation: 20 ms frames in, utterances out.

Theory.  webrtcvad classifies each 20 ms frame as voiced or not; single frames are noisy, so the
segmenter smooths them with three rules:

* **speech start**: speech starts when at least ``start_voiced`` of the last ``start_window`` frames
  are voiced.  The frames held back while deciding, from the first voiced one, are released as the
  utterance's first audio, preceded by up to ``preroll_ms`` of the audio before it, so a recogniser
  hears the onset of the first word.  The utterance's ``start_ms`` is that of its first audio.
* **hangover**: during speech, ``hangover_ms`` of consecutive unvoiced frames end the utterance.
  The hangover frames belong to the utterance (they carry word tails and are cheap).
* **maximum length**: an utterance that reaches ``max_utterance_ms`` is ended (reason
  ``max_length``) and, if speech goes on, the next frame starts a new utterance at once.

The state machine, with its whole transition table in ``_TRANSITIONS``::

    SILENCE --voiced--> ONSET --enough voiced in window--> SPEECH
    ONSET --window unvoiced--> SILENCE
    SPEECH --unvoiced--> HANGOVER --voiced--> SPEECH
    HANGOVER --hangover elapsed--> SILENCE            (UtteranceEnded "silence")
    SPEECH/HANGOVER --max length--> SILENCE | SPEECH  (UtteranceEnded "max_length")

Timestamps are stream-relative milliseconds taken from the frames themselves.  Bounds: the onset
window and the preroll ring are fixed-size deques; nothing else is buffered.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import _webrtcvad  # the C module behind webrtcvad.Vad; see Segmenter.__init__
import webrtcvad

from engine.frames import FRAME_MS, AudioFrame


class VadState(enum.Enum):
    __hash__ = object.__hash__  # members are singletons; Enum's own __hash__ is Python code

    SILENCE = "silence"
    ONSET = "onset"
    SPEECH = "speech"
    HANGOVER = "hangover"


class _Input(enum.Enum):
    __hash__ = object.__hash__  # members are singletons; Enum's own __hash__ is Python code

    VOICED = enum.auto()
    UNVOICED = enum.auto()
    ONSET_CONFIRMED = enum.auto()
    ONSET_FAILED = enum.auto()
    HANGOVER_ELAPSED = enum.auto()
    TOO_LONG = enum.auto()


_TRANSITIONS: dict[tuple[VadState, _Input], VadState] = {
    (VadState.SILENCE, _Input.UNVOICED): VadState.SILENCE,
    (VadState.SILENCE, _Input.VOICED): VadState.ONSET,
    (VadState.SILENCE, _Input.ONSET_CONFIRMED): VadState.SPEECH,  # start_voiced == 1
    (VadState.ONSET, _Input.VOICED): VadState.ONSET,
    (VadState.ONSET, _Input.UNVOICED): VadState.ONSET,
    (VadState.ONSET, _Input.ONSET_CONFIRMED): VadState.SPEECH,
    (VadState.ONSET, _Input.ONSET_FAILED): VadState.SILENCE,
    (VadState.SPEECH, _Input.VOICED): VadState.SPEECH,
    (VadState.SPEECH, _Input.UNVOICED): VadState.HANGOVER,
    (VadState.SPEECH, _Input.TOO_LONG): VadState.SILENCE,
    (VadState.HANGOVER, _Input.VOICED): VadState.SPEECH,
    (VadState.HANGOVER, _Input.UNVOICED): VadState.HANGOVER,
    (VadState.HANGOVER, _Input.HANGOVER_ELAPSED): VadState.SILENCE,
    (VadState.HANGOVER, _Input.TOO_LONG): VadState.SILENCE,
}


@dataclass(frozen=True, slots=True)
class SegmenterConfig:
    aggressiveness: int = 2  # webrtcvad mode 0 (least) .. 3 (most aggressive at calling noise unvoiced)
    # 6 voiced of 10 frames (120 of 200 ms): webrtcvad calls the first ~80 ms of any new noise floor
    # voiced while it adapts; this rule does not start an utterance on that.  Preroll covers the onset.
    start_voiced: int = 6
    start_window: int = 10  # frames
    hangover_ms: int = 500
    preroll_ms: int = 100
    max_utterance_ms: int = 15_000

    def __post_init__(self) -> None:
        if not 0 <= self.aggressiveness <= 3:
            raise ValueError("aggressiveness must be 0..3")
        if not 1 <= self.start_voiced <= self.start_window:
            raise ValueError("start_voiced must be within 1..start_window")
        if self.hangover_ms < FRAME_MS or self.max_utterance_ms < 10 * FRAME_MS:
            raise ValueError("hangover_ms >= 20 and max_utterance_ms >= 200 required")


# Segmenter events are NamedTuples (immutable, and far cheaper to build than frozen dataclasses):
# one UtteranceAudio is built per speech frame.


class SpeechStarted(NamedTuple):
    utterance: int
    timestamp_ms: int


class UtteranceAudio(NamedTuple):
    utterance: int
    frame: AudioFrame


class UtteranceEnded(NamedTuple):
    utterance: int
    start_ms: int
    end_ms: int
    reason: str  # "silence" | "max_length" | "flush"


SegmenterEvent = SpeechStarted | UtteranceAudio | UtteranceEnded
_NONE: tuple[SegmenterEvent, ...] = ()


class Segmenter:
    """Feed 20 ms frames with ``process``; act on the events it returns.

    Frames must be 20 ms of int16 PCM at 8, 16, 32 or 48 kHz, in stream order.  ``flush()`` ends an
    open utterance (call it when the stream stops).  One instance per track; not thread-safe.
    """

    def __init__(self, config: SegmenterConfig | None = None) -> None:
        self.config = config or SegmenterConfig()
        self._vad = webrtcvad.Vad(self.config.aggressiveness)
        # Vad.is_speech is a Python wrapper that only recomputes the sample count; calling its C
        # function directly saves that call on every frame of every call.
        self._vad_handle = self._vad._vad
        self._vad_process = _webrtcvad.process
        self.state = VadState.SILENCE
        self.utterances = 0  # utterances started so far
        self._window: deque[tuple[AudioFrame, bool]] = deque(maxlen=self.config.start_window)
        self._preroll: deque[AudioFrame] = deque(maxlen=max(0, self.config.preroll_ms // FRAME_MS))
        self._max_ms = self.config.max_utterance_ms
        self._start_ms = 0
        self._silent_ms = 0
        self._last_end_ms = 0

    def process(self, frame: AudioFrame) -> Sequence[SegmenterEvent]:
        pcm = frame.pcm
        voiced = self._vad_process(self._vad_handle, frame.sample_rate, pcm, len(pcm) >> 1)
        state = self.state
        if state is VadState.SILENCE and not voiced:
            # The hot path for most of a call: no allocation beyond the preroll append.
            self._preroll.append(frame)
            return _NONE
        if state is VadState.SPEECH and voiced:
            end = frame.timestamp_ms + FRAME_MS
            if end - self._start_ms < self._max_ms:
                # The other hot path: speech goes on (the table's SPEECH --voiced--> SPEECH).
                self._last_end_ms = end
                self._silent_ms = 0
                return (UtteranceAudio(self.utterances, frame),)
        return self._step(frame, voiced)

    def flush(self) -> Sequence[SegmenterEvent]:
        """End the open utterance, if any, and reset to silence."""
        events: list[SegmenterEvent] = []
        if self.state in (VadState.SPEECH, VadState.HANGOVER):
            events.append(self._end("flush"))
        self.state = VadState.SILENCE
        self._window.clear()
        return events

    # -- internals -------------------------------------------------------------------------------

    def _classify(self, frame: AudioFrame, voiced: bool) -> _Input:
        state, cfg = self.state, self.config
        if state in (VadState.SILENCE, VadState.ONSET):
            if len(self._window) == self._window.maxlen:
                self._preroll.append(self._window.popleft()[0])  # slid out of the window: now preroll
            self._window.append((frame, voiced))
            if sum(v for _, v in self._window) >= cfg.start_voiced:
                return _Input.ONSET_CONFIRMED
            if state is VadState.ONSET and not any(v for _, v in self._window):
                return _Input.ONSET_FAILED
            return _Input.VOICED if voiced else _Input.UNVOICED
        if frame.end_ms - self._start_ms >= cfg.max_utterance_ms:
            return _Input.TOO_LONG
        if voiced:
            return _Input.VOICED
        if state is VadState.HANGOVER and self._silent_ms + frame.duration_ms >= cfg.hangover_ms:
            return _Input.HANGOVER_ELAPSED
        return _Input.UNVOICED

    def _step(self, frame: AudioFrame, voiced: bool) -> Sequence[SegmenterEvent]:
        event = self._classify(frame, voiced)
        new = _TRANSITIONS[(self.state, event)]
        self.state = new
        self._last_end_ms = frame.end_ms
        events: list[SegmenterEvent] = []
        if event is _Input.ONSET_CONFIRMED:
            events.extend(self._begin())
        elif event is _Input.ONSET_FAILED:
            self._preroll.extend(f for f, _ in self._window)
            self._window.clear()
        elif new is VadState.ONSET:
            pass  # the frame is held in the onset window
        elif event is _Input.TOO_LONG:
            events.append(UtteranceAudio(self.utterances, frame))
            events.append(self._end("max_length"))
            self._window.clear()
            if voiced:  # speech goes on: the next utterance starts with the next frame
                self.state = VadState.SPEECH
                self._start_ms = frame.end_ms
                self._silent_ms = 0
                self.utterances += 1
                events.append(SpeechStarted(self.utterances, self._start_ms))
        elif event is _Input.HANGOVER_ELAPSED:
            events.append(UtteranceAudio(self.utterances, frame))
            events.append(self._end("silence"))
        else:  # SPEECH or HANGOVER with an ordinary frame
            self._silent_ms = 0 if voiced else self._silent_ms + frame.duration_ms
            events.append(UtteranceAudio(self.utterances, frame))
        return events

    def _begin(self) -> list[SegmenterEvent]:
        self.utterances += 1
        n = self.utterances
        held = list(self._window)
        self._window.clear()
        # The utterance starts at the first voiced frame of the window, preceded by preroll audio.
        first = next(i for i, (_, v) in enumerate(held) if v)
        limit = self._preroll.maxlen or 0
        before = [*self._preroll, *(f for f, _ in held[:first])]
        audio = (before[-limit:] if limit else []) + [f for f, _ in held[first:]]
        self._preroll.clear()
        self._start_ms = audio[0].timestamp_ms
        trailing_unvoiced = 0
        for _, v in reversed(held):
            if v:
                break
            trailing_unvoiced += FRAME_MS
        self._silent_ms = trailing_unvoiced
        events: list[SegmenterEvent] = [SpeechStarted(n, self._start_ms)]
        events.extend(UtteranceAudio(n, f) for f in audio)
        return events

    def _end(self, reason: str) -> UtteranceEnded:
        self.state = VadState.SILENCE
        self._silent_ms = 0
        return UtteranceEnded(self.utterances, self._start_ms, self._last_end_ms, reason)
