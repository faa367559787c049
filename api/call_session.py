"""``CallSession``: the one owner of one call on this node.

A media transport (``api.media_stream`` for Telnyx) turns its protocol into calls on the session:
``start`` once, ``media``/``dtmf`` while it streams, ``end(event)`` when anything ends it, and
``finish`` to drain.  The session alone wires the call (the pipeline per track, the recorder, the
published events, persistence, the agent bridge) and alone ends it, following the transition table
of ``pipelines.call_state``: the first ending event fixes the outcome and the reason; ``finish``
then owes the call's last finals and translations (bounded), publishes ``call.ended`` with
``{reason, detail, status, stats}``, stores the end and releases the call id.

A call belongs to the organisation whose media token its stream presented, and inside the node it
is known by its **call key**, ``call_key(org_id, call_id)``: the registry, the event hub's channels,
the Redis bus streams and the relay all use the key, so two organisations' calls never meet, even
with the same ``call_control_id`` at once (each is its own call; neither learns of the other).  The
external ``call_id`` in events, logs and URLs is unchanged; a door that takes a call id from a client
(SSE, WebRTC) makes the key with the *client's* organisation.

Ownership of a call is exclusive: ``CallRegistry.claim`` refuses a call key that a live session
holds (a second socket of the same organisation with the same ``call_control_id`` is refused and the
live call is untouched); a stream for the same call after the previous session finished continues
the call, as a Telnyx reconnect does.

**Speech legs.**  A call whose two Telnyx tracks speak one language runs one speech leg
(``speech_leg``: a ``CallPipeline`` and its ``CallEvents``) for both, as it always has.  A bilingual
call (``consumer_language`` differs from ``language``, see ``api.media_stream``) runs two: the
inbound track (the consumer on the phone) recognised in the consumer's language and translated into
the agent's, the outbound track (the agent's side) recognised in the agent's language and translated
into the consumer's, each with its organisation's provider for its language.  ``media`` picks the leg
by track with one comparison (``consumer_pipeline`` *is* ``pipeline`` on a one-language call), so the
hot path allocates nothing more.

The session is also the bridge's consumer sink (``rate``, ``send_media``, ``send_clear``) and what
``api.webrtc`` attaches agents to.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from api.speech import CallEvents, Policy
from api.telnyx_protocol import Dtmf, Media, Started
from engine.errors import Overflow
from engine.frames import Track
from engine.quota import TokenBucket
from pipelines.call import CallPipeline
from pipelines.call_state import STATUS, CallEvent, CallMachine, CallState
from pipelines.events import CallDtmf, CallEnded, CallStarted

if TYPE_CHECKING:
    from api.media_stream import MediaStream
    from api.persistence import CallRecord
    from api.runtime import Runtime
    from pipelines.bridge import AgentBridge
    from pipelines.recording import CallRecorder

log = logging.getLogger("switchboard.call")

_Leg = TypeVar("_Leg")
DRAIN_BASE_S = 5.0  # owed finals: the pipeline's own bound grows with the audio still queued


def call_key(org_id: uuid.UUID, call_id: str) -> str:
    """The node's name for ``call_id`` of organisation ``org_id`` (see the module docstring).  ``/`` is
    not an id character (``engine.ids``), so a key never collides with another organisation's."""
    return f"{org_id.hex}/{call_id}"


def speech_leg(rt: Runtime, key: str, call_id: str, stream_id: str, language: str, target: str | None,
               record: CallRecord | None, policy: Policy) -> tuple[CallEvents, CallPipeline]:
    """The publisher and pipeline of one party's audio on a call (the caller's stream, an agent's
    microphone), under its organisation's ``policy``: transcripts go through ``CallEvents``
    (redaction, SSE, storage, translation)."""
    provider = rt.speech.for_language(language, policy)
    events = CallEvents(
        call_id=call_id, channel=key, stream_id=stream_id, language=language, target=target, hub=rt.hub,
        redactor=rt.redactor,
        sse_redacted=policy.sse_redacted, provider=provider.name, stage=rt.translation,
        persistence=rt.persistence, record=record)
    pipeline = CallPipeline(call_id=call_id, stream_id=stream_id, provider=provider, publish=events.publish,
                            segmenter=rt.segmenter, phrases=rt.phrases, language=language,
                            on_final_latency=rt.final_latency.record)
    rt.pipeline_totals.track(pipeline)
    return events, pipeline


def _legs(first: _Leg | None, second: _Leg | None) -> list[_Leg]:
    """The call's distinct speech legs (one object twice on a one-language call)."""
    legs = [x for x in (first, second) if x is not None]
    return legs[:1] if first is second else legs


class CallRegistry:
    """Live call sessions of this node by call key (bounded by ``max_calls``)."""

    def __init__(self, max_calls: int) -> None:
        self.max_calls = max_calls
        self._calls: dict[str, CallSession] = {}

    def __len__(self) -> int:
        return len(self._calls)

    def __contains__(self, key: object) -> bool:
        return key in self._calls

    def __iter__(self) -> Iterator[CallSession]:
        return iter(list(self._calls.values()))

    def get(self, key: str) -> CallSession | None:
        return self._calls.get(key)

    def claim(self, session: CallSession) -> str | None:
        """Register ``session`` as its call's owner; the refusal reason when it cannot be."""
        if session.key in self._calls:
            return "call already streaming"
        if len(self._calls) >= self.max_calls:
            return f"too many media streams ({self.max_calls} live)"
        self._calls[session.key] = session
        return None

    def release(self, session: CallSession) -> None:
        if self._calls.get(session.key) is session:
            del self._calls[session.key]


class CallSession:
    def __init__(self, rt: Runtime, leg: MediaStream, started: Started, org_id: uuid.UUID, *, language: str,
                 target: str | None, policy: Policy, consumer_language: str | None = None,
                 consumer_target: str | None = None) -> None:
        self.rt = rt
        self.leg = leg
        self.started = started
        self.org_id = org_id
        self.call_id = started.call_control_id
        self.key = call_key(org_id, self.call_id)
        self.stream_id = started.stream_id
        self.rate = started.sample_rate
        self.language = language  # the outbound track's (the agent's side); the inbound's too unless bilingual
        self.target = target
        self.consumer_language = consumer_language  # the inbound track's on a bilingual call, else None
        self.consumer_target = consumer_target
        self.policy = policy  # the organisation's speech policy (api.speech.OrgPolicies)
        self.machine = CallMachine(CallState.STREAMING)
        self.record: CallRecord | None = None  # the stored call, when persistence is on
        self.recorder: CallRecorder | None = None
        self.bridge: AgentBridge | None = None  # an agent's WebRTC session hears this call (api.webrtc)
        self.pipeline: CallPipeline | None = None  # the outbound track's leg (both tracks' unless bilingual)
        self.events: CallEvents | None = None
        self.consumer_pipeline: CallPipeline | None = None  # the inbound track's leg: ``pipeline`` unless bilingual
        self.consumer_events: CallEvents | None = None
        self.dtmf_count = 0
        # DTMF events published per call: a person presses at most a few keys a second.  A flood past
        # the bucket is counted (``dtmf_dropped`` in call.ended's stats) instead of pushing the call's
        # finals out of its bounded replay history.
        self._dtmf = TokenBucket(rt.settings.dtmf_per_s, rt.settings.dtmf_burst, time.monotonic())
        self._t0: float | None = None  # frame-lag baseline: the earliest (arrival - audio time) seen
        self._finishing = False
        self._finished = asyncio.Event()

    # -- starting ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Wire the call and publish ``call.started``.  The caller has claimed the call id.

        Raises ``Overflow`` when the event hub has no room for the call (nothing was wired then).
        """
        rt, ev = self.rt, self.started
        rt.hub.start(self.key)  # may raise Overflow: before anything else exists
        rt.stats.streams_total += 1
        if rt.persistence is not None:
            self.record = rt.persistence.call_started(
                org_id=self.org_id, call_control_id=ev.call_control_id, call_session_id=ev.call_session_id or None,
                stream_id=ev.stream_id, from_number=ev.from_ or None, to_number=ev.to or None,
                encoding=ev.encoding, sample_rate=ev.sample_rate)
            self.recorder = self.record.recorder
        self.events, self.pipeline = speech_leg(rt, self.key, self.call_id, ev.stream_id, self.language, self.target,
                                                self.record, self.policy)
        if self.consumer_language is None:
            self.consumer_events, self.consumer_pipeline = self.events, self.pipeline
        else:
            self.consumer_events, self.consumer_pipeline = speech_leg(
                rt, self.key, self.call_id, ev.stream_id, self.consumer_language, self.consumer_target, self.record,
                self.policy)
        provider = self.events.provider
        tracks = {
            Track.INBOUND.value: {"language": self.consumer_language or self.language,
                                  "translate_to": self.consumer_target if self.consumer_language else self.target,
                                  "stt_provider": self.consumer_events.provider},
            Track.OUTBOUND.value: {"language": self.language, "translate_to": self.target, "stt_provider": provider}}
        rt.hub.publish(self.key, CallStarted(
            self.call_id, ev.stream_id, ev.call_session_id, ev.encoding, ev.sample_rate, ev.from_, ev.to,
            self.language, self.target, provider, tracks))
        log.info("call.started", extra={"stream_id": ev.stream_id, "call_id": self.call_id,
                                        "encoding": ev.encoding, "sample_rate": ev.sample_rate})
        rt.agents.stream_started(self)  # an agent who joined the call first is bridged now

    # -- streaming (the hot path: 50 frames a second per track) -----------------------------------

    def media(self, ev: Media) -> None:
        pipeline = self.consumer_pipeline if ev.track is Track.INBOUND else self.pipeline
        if pipeline is None:  # the adapter stops calling once the stream is ending
            return
        pipeline.feed(ev.track, ev.pcm, self.rate, ev.timestamp_ms)
        if self.recorder is not None:
            self.recorder.write(ev.track, ev.pcm)
        if ev.track is Track.INBOUND:
            if self.bridge is not None:
                self.bridge.consumer_in(ev.pcm)
            if not ev.sequence & 3:  # a 1-in-4 sample is plenty
                self.rt.stats.frame_lag.record(self._lag_ms(ev.timestamp_ms, time.monotonic()))

    def dtmf(self, ev: Dtmf) -> None:
        if not self._dtmf.take(time.monotonic()):
            if self._dtmf.held_back == 1:
                log.warning("call.dtmf_flood", extra={"call_id": self.call_id, "limit_per_s": self._dtmf.per_s})
            return
        self.dtmf_count += 1
        self.rt.hub.publish(self.key, CallDtmf(self.call_id, ev.digit))

    def _lag_ms(self, timestamp_ms: int, now: float) -> float:
        base = now - timestamp_ms / 1000.0
        if self._t0 is None or base < self._t0:
            self._t0 = base
        return (base - self._t0) * 1000.0

    # -- the bridge's consumer sink -----------------------------------------------------------------

    async def send_media(self, pcm: bytes) -> None:
        await self.leg.send_media(pcm)

    async def send_mark(self, name: str) -> None:
        await self.leg.send_mark(name)

    async def send_clear(self) -> None:
        await self.leg.send_clear()

    # -- ending -----------------------------------------------------------------------------------

    def end(self, event: CallEvent, detail: str = "") -> bool:
        """Record why the call ends; ``True`` for the first ending event (later ones change nothing)."""
        first = self.machine.ended_by is None
        self.machine.handle(event, detail[:200])
        return first

    async def finish(self) -> None:
        """Drain and close the call (once; later calls wait for the first).  Never raises."""
        if self._finishing:
            await self._finished.wait()
            return
        self._finishing = True
        if not self.machine.ending:
            self.end(CallEvent.HANGUP)
        rt = self.rt
        stats: dict[str, Any] = {}
        try:
            await rt.agents.stream_ended(self)  # first: the bridge must stop sending on a closing socket
            pipelines = _legs(self.pipeline, self.consumer_pipeline)
            # Legs drain together: their owed finals share the decoders, and their waits must not add up.
            await asyncio.gather(*(pipeline.aclose(DRAIN_BASE_S) for pipeline in pipelines))
            for pipeline in pipelines:
                for k in pipeline.stats.__slots__:  # type: ignore[attr-defined]
                    stats[k] = stats.get(k, 0) + getattr(pipeline.stats, k)
            legs = _legs(self.events, self.consumer_events)
            if legs:
                # Translations of the last finals, so live clients see them before call.ended.
                wait_s = rt.settings.translation_deadline_s + 1.0
                if not all(await asyncio.gather(*(e.drain(wait_s) for e in legs))):
                    log.warning("call.translations_pending", extra={"call_id": self.call_id})
                stats["redactions"] = sum(e.redactions for e in legs)
        except Exception:  # a bug while draining must still end the call below
            log.exception("call.drain_failed", extra={"call_id": self.call_id})
        finally:
            legs = _legs(self.events, self.consumer_events)
            for e in legs:
                e.close()  # the last partials of utterances that got no final are kept
            if legs:
                stats["partials_kept"] = sum(e.partials_kept for e in legs)
            p = self.leg.protocol.stats
            stats.update(late_frames=p.late, lost_frames=p.lost, unknown_track=p.unknown_track, dtmf=self.dtmf_count,
                         dtmf_dropped=self._dtmf.held_back)
            state = self.machine.handle(CallEvent.DRAINED)
            reason, detail = self.machine.reason, self.machine.detail
            try:
                rt.hub.publish(self.key, CallEnded(self.call_id, self.stream_id, reason, detail, STATUS[state],
                                                       stats))
            except Overflow:
                log.error("call.ended_unpublished", extra={"call_id": self.call_id})
            rt.hub.end(self.key)
            if rt.persistence is not None and self.record is not None:
                rt.persistence.call_ended(self.record, reason=reason, failed=state is CallState.FAILED,
                                          stats={**stats, "end_detail": detail} if detail else stats)
            rt.stream_losses.add(p.late, p.lost)
            rt.calls.release(self)  # the same step as the line above: /metrics never counts a call twice
            self._finished.set()
            log.info("call.ended", extra={"stream_id": self.stream_id, "call_id": self.call_id,
                                          "reason": reason, "detail": detail, **stats})
