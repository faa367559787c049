"""Speech services of the node: STT providers per language, translation, redaction, and the per-call
publisher that ties a call's transcript events to SSE, storage and translation.

Order of operations for every transcript event a call's pipeline emits (``CallEvents.publish``):

1. redact it (text and timed words; ``pipelines.events.TranscriptEvent.redacted``);
2. publish to the call's SSE clients: redacted unless the organisation chose otherwise
   (``sse_redacted``); the cross-node bus always gets the redacted form;
3. for a final: store it (redacted) and submit its redacted text for translation.

Nothing unredacted reaches a translation provider, the database, Redis or a log line.  Translation
never delays a transcript: it is a job on ``pipelines.translation.TranslationStage``; its result is
published as ``translation.final`` (or ``translation.failed`` with the reason).  ``drain`` waits,
bounded, for a call's translations before the call's ``call.ended`` is published.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from api.hub import EventHub
from api.settings import Settings
from pipelines.events import Event, TranscriptEvent, TranslationFailed, TranslationFinal
from pipelines.redaction import Redactor
from pipelines.stt.base import SttProvider
from pipelines.stt.failover import FailoverProvider
from pipelines.translate.base import Translation, Translator
from pipelines.translation import TranslationJob, TranslationStage

if TYPE_CHECKING:
    from api.persistence import CallRecord, Persistence

log = logging.getLogger("switchboard.speech")


@dataclass(frozen=True)
class Policy:
    """What an organisation chose; the node's settings fill in the rest."""

    stt_chain: dict[str, list[str]]
    translate_to: dict[str, str]
    sse_redacted: bool

    @classmethod
    def resolve(cls, s: Settings, org: dict[str, Any] | None = None) -> Policy:
        org = org or {}
        chain = org.get("stt_chain") or s.stt_chain or {"*": [s.stt_provider]}
        return cls(stt_chain={k: list(v) for k, v in chain.items()},
                   translate_to=dict(org.get("translate_to") or s.translate_to),
                   sse_redacted=bool(org.get("sse_redacted", s.sse_redacted)))


def make_provider(name: str, s: Settings) -> SttProvider:
    if name == "null":
        from pipelines.stt.scripted import NullProvider

        return NullProvider()
    if name == "pocketsphinx":
        from pipelines.stt.pocketsphinx import PocketsphinxProvider

        return PocketsphinxProvider(max_decoders=s.stt_max_decoders, max_workers=s.stt_workers,
                                    queue_max_s=s.stt_queue_max_s, max_buffer_ms=s.stt_max_buffer_ms)
    if name == "assemblyai":
        from pipelines.stt.assemblyai import AssemblyAIProvider

        if s.assemblyai_api_key is None:
            raise ValueError("stt provider assemblyai needs ASSEMBLYAI_API_KEY")
        return AssemblyAIProvider(s.assemblyai_api_key.get_secret_value(), url=s.assemblyai_url)
    if name == "deepgram":
        from pipelines.stt.deepgram import DeepgramProvider

        if s.deepgram_api_key is None:
            raise ValueError("stt provider deepgram needs DEEPGRAM_API_KEY")
        return DeepgramProvider(s.deepgram_api_key.get_secret_value(), url=s.deepgram_url)
    raise ValueError(f"unknown stt provider {name!r}")


def make_translator(s: Settings) -> Translator | None:
    choice = s.translation_provider
    if choice == "auto":
        choice = "openai" if s.openai_api_key else ("apertium" if shutil.which("apertium") else "none")
    if choice == "none":
        return None
    if choice == "openai":
        from pipelines.translate.openai_compat import OpenAICompatTranslator

        if s.openai_api_key is None:
            raise ValueError("translation provider openai needs GROQ_API_KEY or OPENAI_API_KEY")
        return OpenAICompatTranslator(s.openai_api_key.get_secret_value(), base_url=s.openai_base_url,
                                      model=s.openai_model, max_concurrency=s.translation_concurrency)
    from pipelines.translate.apertium import ApertiumTranslator

    return ApertiumTranslator()


class Speech:
    """STT providers (one instance per name, shared by the chains that use it) and chains per language."""

    def __init__(self, s: Settings, policy: Policy, *, override: SttProvider | None = None) -> None:
        self.policy = policy
        self._override = override
        self._providers: dict[str, SttProvider] = {}
        self._chains: dict[str, SttProvider] = {}
        if override is None:
            for lang, names in policy.stt_chain.items():
                members = [self._provider(n, s) for n in names]
                self._chains[lang] = members[0] if len(members) == 1 else FailoverProvider(
                    members, threshold=s.stt_breaker_failures, cooldown_s=s.stt_breaker_cooldown_s)

    def _provider(self, name: str, s: Settings) -> SttProvider:
        if name not in self._providers:
            self._providers[name] = make_provider(name, s)
        return self._providers[name]

    def for_language(self, language: str) -> SttProvider:
        if self._override is not None:
            return self._override
        chain = self._chains.get(language) or self._chains.get("*")
        if chain is None:
            raise LookupError(f"no speech-to-text provider for language {language!r}")
        return chain

    async def warm(self, phrases: tuple[str, ...]) -> None:
        for p in ([self._override] if self._override else self._providers.values()):
            await p.warm(phrases)

    async def aclose(self) -> None:
        for p in ([self._override] if self._override else self._providers.values()):
            await p.aclose()


@dataclass
class CallEvents:
    """One call's publisher (see the module docstring)."""

    call_id: str  # in the events
    stream_id: str
    language: str
    target: str | None
    hub: EventHub
    redactor: Redactor
    sse_redacted: bool
    provider: str
    stage: TranslationStage | None = None
    persistence: Persistence | None = None
    record: CallRecord | None = None
    channel: str = ""  # the hub channel: the call's key (api.call_session.call_key); default the call id
    redactions: int = 0
    _pending: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.channel = self.channel or self.call_id
        self._idle.set()

    def publish(self, event: Event) -> None:
        if not isinstance(event, TranscriptEvent):
            self.hub.publish(self.channel, event)
            return
        redacted, found = event.redacted(self.redactor)
        if self.sse_redacted or redacted is event:
            self.hub.publish(self.channel, redacted)
        else:
            self.hub.publish(self.channel, event, tap=redacted)
        if not event.final:
            return
        self.redactions += found
        if self.persistence is not None and self.record is not None:
            self.persistence.transcript_final(self.record, redacted, self.provider, language=self.language,
                                              redacted=found > 0)
        if self.stage is not None and self.target and redacted.text.strip():
            self._pending += 1
            self._idle.clear()
            self.stage.submit(TranslationJob(
                redacted.text, self.language, self.target,
                {"call_id": self.call_id, "stream_id": event.stream_id, "track": event.track, "seq": event.seq},
                self._translated, self._not_translated))

    def _translated(self, job: TranslationJob, tr: Translation) -> None:
        self._done()
        ctx = job.context
        self.hub.publish(self.channel, TranslationFinal(
            ctx["call_id"], ctx["stream_id"], ctx["track"], ctx["seq"], tr.original, tr.translated, tr.source_lang,
            tr.target_lang, tr.provider, round(tr.latency_ms, 1)))
        if self.persistence is not None and self.record is not None:
            self.persistence.translation(self.record, ctx["stream_id"], ctx["track"], ctx["seq"], tr)

    def _not_translated(self, job: TranslationJob, reason: str) -> None:
        self._done()
        ctx = job.context
        self.hub.publish(self.channel, TranslationFailed(ctx["call_id"], ctx["stream_id"], ctx["track"], ctx["seq"],
                                                         job.source_lang, job.target_lang, reason))

    def _done(self) -> None:
        self._pending -= 1
        if self._pending <= 0:
            self._idle.set()

    async def drain(self, wait_s: float) -> bool:
        """Wait for this call's translations (results or reported failures); False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), wait_s)
        except TimeoutError:
            return False
        return True
