"""What a call tells its viewers: typed events, serialised once, at the edge.

Pipelines, the call's owner and the agent sessions build these small frozen dataclasses; they travel
as objects through redaction, storage and translation, and become JSON exactly once, when the event
hub numbers them for SSE (``api.hub``).  Each class names its wire event (``EVENT``, the SSE
``event:`` line) and gives its JSON object (``payload``); the field names are the wire names, except
where Python forbids them (``from_`` is ``from``).

Delivery class: ``droppable`` events (partial transcripts) are coalesced per ``key`` for a slow
reader and kept out of the replay history; every other event is owed to every reader.

``Untyped`` carries an event known only by name and JSON object (another node's, from the Redis bus).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from pipelines.redaction import Finding, Redactor
from pipelines.stt.base import Word


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event on a call's channel."""

    EVENT: ClassVar[str] = ""
    _RENAMED: ClassVar[dict[str, str]] = {}

    @property
    def name(self) -> str:
        return self.EVENT

    @property
    def droppable(self) -> bool:
        return False

    @property
    def key(self) -> str:
        return ""

    def payload(self) -> dict[str, Any]:
        return {self._RENAMED.get(f.name, f.name): getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True, slots=True)
class TranscriptEvent(Event):
    """A partial (``final=False``, droppable per track) or final transcript of one utterance."""

    call_id: str
    stream_id: str
    track: str
    text: str
    words: tuple[Word, ...]
    confidence: float
    seq: int  # the utterance; its partials and final share it
    start: int  # ms from the start of the stream
    end: int
    final: bool
    language: str = ""  # what the track's recogniser listened for ("en"); in the payload when known

    @property
    def name(self) -> str:
        return "transcript.final" if self.final else "transcript.partial"

    @property
    def droppable(self) -> bool:
        return not self.final

    @property
    def key(self) -> str:
        return f"partial:{self.track}"

    def payload(self) -> dict[str, Any]:
        return {
            "call_id": self.call_id, "stream_id": self.stream_id, "track": self.track, "text": self.text,
            "words": [{"word": w.text, "start": w.start_ms, "end": w.end_ms, "confidence": round(w.confidence, 3)}
                      for w in self.words],
            "confidence": round(self.confidence, 3), "seq": self.seq, "start": self.start, "end": self.end,
            **({"language": self.language} if self.language else {}),
        }

    def redacted(self, redactor: Redactor) -> tuple[TranscriptEvent, int]:
        """This transcript with PII in its text and timed words redacted, and the number of findings.

        A partial is redacted more strictly (``Redactor.redact_partial``: it may stop mid-number).
        Words inside a finding become one word ``[REDACTED:<kind>]`` spanning them; a word that cannot
        be located in the text while the text has findings is dropped: when in doubt, nothing leaves
        unredacted.
        """
        result = redactor.redact(self.text) if self.final else redactor.redact_partial(self.text)
        if not result.findings:
            return self, 0
        words = _redact_words(self.text, self.words, result.findings)
        return dataclasses.replace(self, text=result.text, words=words), len(result.findings)


def _redact_words(text: str, words: tuple[Word, ...], findings: tuple[Finding, ...]) -> tuple[Word, ...]:
    lowered = text.lower()
    out: list[Word] = []
    cursor = 0
    current: Finding | None = None
    for w in words:
        token = w.text.lower()
        at = lowered.find(token, cursor) if token else -1
        if at < 0:
            continue  # not locatable: dropped (see TranscriptEvent.redacted)
        cursor = at + len(token)
        finding = next((f for f in findings if f.start < cursor and at < f.end), None)
        if finding is None:
            out.append(w)
            current = None
        elif finding is current and out:
            out[-1] = dataclasses.replace(out[-1], end_ms=w.end_ms)
        else:
            out.append(dataclasses.replace(w, text=f"[REDACTED:{finding.kind.value}]"))
            current = finding
    return tuple(out)


@dataclass(frozen=True, slots=True)
class SttFailover(Event):
    EVENT: ClassVar[str] = "stt.failover"
    _RENAMED: ClassVar[dict[str, str]] = {"from_": "from"}
    call_id: str
    stream_id: str
    track: str
    from_: str
    to: str
    reason: str


@dataclass(frozen=True, slots=True)
class SttFailed(Event):
    """A track's recogniser is gone (``seq`` None), or one utterance got no final (its ``seq``)."""

    EVENT: ClassVar[str] = "stt.failed"
    call_id: str
    stream_id: str
    track: str
    reason: str
    seq: int | None = None

    def payload(self) -> dict[str, Any]:
        out = {"call_id": self.call_id, "stream_id": self.stream_id, "track": self.track, "reason": self.reason}
        if self.seq is not None:
            out["seq"] = self.seq
        return out


@dataclass(frozen=True, slots=True)
class SttLagging(Event):
    EVENT: ClassVar[str] = "stt.lagging"
    call_id: str
    stream_id: str
    track: str
    provider: str
    reason: str


@dataclass(frozen=True, slots=True)
class SttRecovered(Event):
    EVENT: ClassVar[str] = "stt.recovered"
    call_id: str
    stream_id: str
    track: str
    dropped_frames: int


@dataclass(frozen=True, slots=True)
class TranslationFinal(Event):
    EVENT: ClassVar[str] = "translation.final"
    call_id: str
    stream_id: str
    track: str
    seq: int
    original: str
    translated: str
    source_lang: str
    target_lang: str
    provider: str
    latency_ms: float


@dataclass(frozen=True, slots=True)
class TranslationFailed(Event):
    EVENT: ClassVar[str] = "translation.failed"
    call_id: str
    stream_id: str
    track: str
    seq: int
    source_lang: str
    target_lang: str
    reason: str


@dataclass(frozen=True, slots=True)
class CallStarted(Event):
    """``language``, ``translate_to`` and ``stt_provider`` are the call's (its outbound track's, and the
    inbound's too unless the call is bilingual); ``tracks`` gives each Telnyx track's own
    ``{language, translate_to, stt_provider}``."""

    EVENT: ClassVar[str] = "call.started"
    _RENAMED: ClassVar[dict[str, str]] = {"from_": "from"}
    call_id: str
    stream_id: str
    call_session_id: str
    encoding: str
    sample_rate: int
    from_: str
    to: str
    language: str
    translate_to: str | None
    stt_provider: str
    tracks: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CallEnded(Event):
    EVENT: ClassVar[str] = "call.ended"
    call_id: str
    stream_id: str
    reason: str
    detail: str
    status: str
    stats: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CallStateChanged(Event):
    """A placed call moved (Telnyx Call Control's webhooks, api.telnyx_calls): ``state`` is the stored
    ``calls.status``; ``cause`` is Telnyx's ``hangup_cause`` when it ended, or ``no_webhook`` when the
    sweeper closed it because Telnyx's webhooks never came (api.sweeper)."""

    EVENT: ClassVar[str] = "call.state"
    call_id: str
    state: str
    cause: str | None = None


@dataclass(frozen=True, slots=True)
class CallDtmf(Event):
    EVENT: ClassVar[str] = "call.dtmf"
    call_id: str
    digit: str


@dataclass(frozen=True, slots=True)
class AgentJoined(Event):
    EVENT: ClassVar[str] = "agent.joined"
    call_id: str
    agent_id: str
    session_id: str
    language: str
    bridged: bool


@dataclass(frozen=True, slots=True)
class AgentLeft(Event):
    EVENT: ClassVar[str] = "agent.left"
    call_id: str
    agent_id: str
    session_id: str
    reason: str
    stats: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Untyped(Event):
    """An event given by wire name and JSON object: another node's, as it came off the bus (``api.relay``)."""

    event: str
    data: dict[str, Any]
    coalesce: str = ""  # a key makes it droppable (coalesced per key), as partials are

    @property
    def name(self) -> str:
        return self.event

    @property
    def droppable(self) -> bool:
        return bool(self.coalesce)

    @property
    def key(self) -> str:
        return self.coalesce

    def payload(self) -> dict[str, Any]:
        return self.data
