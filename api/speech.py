"""Speech services of the node: STT providers per language, translation, redaction, and the per-call
publisher that ties a call's transcript events to SSE, storage and translation.

Order of operations for every transcript event a call's pipeline emits (``CallEvents.publish``):

1. redact it (text and timed words; ``pipelines.events.TranscriptEvent.redacted``);
2. publish to the call's SSE clients: redacted unless the organisation chose otherwise
   (``sse_redacted``); the cross-node bus always gets the redacted form;
3. for a final: store it (redacted, with the leg's language) and submit its redacted text for
   translation, truecased first (``pipelines.truecase``: a lower-case recogniser's "i would like"
   goes to the translator as "I would like"; formatted text goes as it is).  Markers are kept by
   every translator (``pipelines.translate.markers``);
4. for a partial: hold it (redacted) as its track's last partial (``pipelines.partials``): kept, that is
   stored with kind 'partial', only if its utterance gets no final (the utterance or the track's
   recogniser failed, or the call closed first: ``close``); no row per partial.

A call runs one ``CallEvents`` per speech leg: one for the whole Telnyx stream when both tracks speak
the same language, one per track on a bilingual call (``api.call_session``), each with its own
language and target.

Nothing unredacted reaches a translation provider, the database, Redis or a log line.  Translation
never delays a transcript: it is a job on ``pipelines.translation.TranslationStage``; its result is
published as ``translation.final`` (or ``translation.failed`` with the reason).  ``drain`` waits,
bounded, for a call's translations before the call's ``call.ended`` is published.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from api.hub import EventHub
from api.settings import Settings
from pipelines.events import Event, SttFailed, TranscriptEvent, TranslationFailed, TranslationFinal
from pipelines.partials import LastPartials, Pending
from pipelines.redaction import Redactor
from pipelines.stt.base import SttProvider
from pipelines.stt.failover import FailoverProvider
from pipelines.translate.base import Translation, Translator
from pipelines.translation import TranslationJob, TranslationStage
from pipelines.truecase import truecase

if TYPE_CHECKING:
    from api.persistence import CallRecord, Persistence
    from api.tiers import Tiers

log = logging.getLogger("switchboard.speech")


@dataclass(frozen=True)
class Policy:
    """What an organisation chose (its ``settings`` JSON, written by ``PATCH /api/org``); the node's
    settings fill in the rest.  Each call runs under its organisation's policy (``OrgPolicies``)."""

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
    """STT providers (one instance per name, shared by every chain that uses it) and chains (one per
    list of names, shared by the organisations that chose it: a chain's circuit breakers are about
    its providers, not about who calls).  The node's own policy (``policy``, from the settings alone)
    is built at start-up and warmed; a chain an organisation chose is built at its first call.  A
    provider that cannot be built here (no API key for it on this node) makes that organisation's
    calls fall back to the node's chain for the language, logged once."""

    def __init__(self, s: Settings, policy: Policy, *, override: SttProvider | None = None) -> None:
        self.policy = policy
        self._settings = s
        self._override = override
        self._providers: dict[str, SttProvider] = {}
        self._chains: dict[tuple[str, ...], SttProvider] = {}
        self._unbuildable: set[tuple[str, ...]] = set()
        if override is None:
            for names in policy.stt_chain.values():
                self._chain(tuple(names))

    def _chain(self, names: tuple[str, ...]) -> SttProvider:
        chain = self._chains.get(names)
        if chain is None:
            s = self._settings
            members = [self._provider(n) for n in names]
            chain = members[0] if len(members) == 1 else FailoverProvider(
                members, threshold=s.stt_breaker_failures, cooldown_s=s.stt_breaker_cooldown_s)
            self._chains[names] = chain
        return chain

    def _provider(self, name: str) -> SttProvider:
        if name not in self._providers:
            self._providers[name] = make_provider(name, self._settings)
        return self._providers[name]

    def for_language(self, language: str, policy: Policy | None = None) -> SttProvider:
        """The chain ``policy`` (default: the node's) names for ``language`` (or for ``"*"``)."""
        if self._override is not None:
            return self._override
        for chosen in (policy or self.policy, self.policy):
            names = chosen.stt_chain.get(language) or chosen.stt_chain.get("*")
            if names is None or tuple(names) in self._unbuildable:
                continue
            try:
                return self._chain(tuple(names))
            except ValueError as exc:  # e.g. a cloud provider without its API key on this node
                self._unbuildable.add(tuple(names))
                log.warning("speech.chain_unavailable", extra={"chain": list(names), "error": str(exc)[:200]})
        raise LookupError(f"no speech-to-text provider for language {language!r}")

    async def warm(self, phrases: tuple[str, ...]) -> None:
        for p in ([self._override] if self._override else self._providers.values()):
            await p.warm(phrases)

    async def aclose(self) -> None:
        for p in ([self._override] if self._override else self._providers.values()):
            await p.aclose()


class OrgPolicies:
    """Each organisation's ``Policy``, read from PostgreSQL and remembered for ``fresh_s`` (a change by
    ``PATCH /api/org`` reaches this node at once, other nodes within that); while PostgreSQL does not
    answer, a remembered one serves up to ``STALE_S``, and an organisation never seen gets the node's
    (logged): a database outage changes no call's recogniser.  At most ``MAX_ORGS`` remembered, the
    least recently used goes first.  With storage off every call has the node's policy."""

    STALE_S = 3600.0
    MAX_ORGS = 10_000

    def __init__(self, s: Settings, node: Policy, tiers: Tiers | None, fresh_s: float = 30.0) -> None:
        self._settings = s
        self.node = node
        self._tiers = tiers
        self._fresh_s = fresh_s
        self._known: OrderedDict[uuid.UUID, tuple[float, Policy]] = OrderedDict()
        self.fallbacks = 0  # calls that got the node's policy because their organisation's could not be read

    async def get(self, org_id: uuid.UUID) -> Policy:
        if self._tiers is None:
            return self.node
        now, known = time.monotonic(), self._known.get(org_id)
        if known is not None and now - known[0] < self._fresh_s:
            self._known.move_to_end(org_id)
            return known[1]
        try:
            async with self._tiers.db.tenant(org_id) as conn:
                raw = await conn.fetchval("SELECT settings FROM organizations WHERE id = $1", org_id)
        except Exception as exc:
            if known is not None and now - known[0] < self.STALE_S:
                return known[1]
            self.fallbacks += 1
            log.warning("speech.policy_unavailable", extra={"org_id": str(org_id), "error": type(exc).__name__})
            return self.node
        policy = Policy.resolve(self._settings, dict(raw or {}))
        self._known[org_id] = (now, policy)
        self._known.move_to_end(org_id)
        while len(self._known) > self.MAX_ORGS:
            self._known.popitem(last=False)
        return policy

    def forget(self, org_id: uuid.UUID) -> None:
        """The organisation's settings changed (on this node): read them again at its next call."""
        self._known.pop(org_id, None)


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
    _partials: LastPartials[TranscriptEvent] = field(default_factory=LastPartials)

    def __post_init__(self) -> None:
        self.channel = self.channel or self.call_id
        self._idle.set()

    @property
    def _storing(self) -> bool:
        return self.persistence is not None and self.record is not None

    def publish(self, event: Event) -> None:
        if not isinstance(event, TranscriptEvent):
            self.hub.publish(self.channel, event)
            if isinstance(event, SttFailed) and self._storing:
                self._keep(self._partials.track_failed(event.track) if event.seq is None
                           else self._partials.utterance_failed(event.track, event.seq))
            return
        redacted, found = event.redacted(self.redactor)
        if self.sse_redacted or redacted is event:
            self.hub.publish(self.channel, redacted)
        else:
            self.hub.publish(self.channel, event, tap=redacted)
        if not event.final:
            if self._storing:
                self._keep(self._partials.partial(redacted, found))  # the redacted one: never the raw text
            return
        self.redactions += found
        if self.persistence is not None and self.record is not None:
            self._partials.final(event.track, event.seq)
            self.persistence.transcript_final(self.record, redacted, self.provider, language=self.language,
                                              redacted=found > 0)
        if self.stage is not None and self.target and redacted.text.strip():
            self._pending += 1
            self._idle.clear()
            self.stage.submit(TranslationJob(
                truecase(redacted.text, self.language), self.language, self.target,
                {"call_id": self.call_id, "stream_id": event.stream_id, "track": event.track, "seq": event.seq},
                self._translated, self._not_translated))

    def close(self) -> None:
        """The call's pipeline has closed (its owed finals are in or their deadline passed): the partials
        still held belong to utterances that got no final; keep them."""
        self._keep(self._partials.close())

    @property
    def partials_kept(self) -> int:
        return self._partials.kept

    def _keep(self, kept: list[Pending[TranscriptEvent]]) -> None:
        if self.persistence is None or self.record is None:
            return
        for p in kept:
            self.persistence.transcript_partial(self.record, p.event, self.provider, language=self.language,
                                                redacted=p.findings > 0)

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
