"""WebRTC sessions of agent browsers: signalling over HTTP, aiortc termination, the media bridge.

Contract (the agent console is written against it):

* ``POST /api/webrtc/offer`` by a principal with ``calls.join`` (``api.auth``: session cookie, or
  ``Authorization: Bearer`` with a session token or API key) and ``{"call_id", "sdp", "type":
  "offer", "language"?, "replace"?}`` -> 200 ``{"session_id", "type": "answer", "sdp"}`` once ICE
  gathering is complete (no trickle).  The agent is the principal: its ``subject`` (a user id, or an
  API key's id) is the ``agent_id`` of ``agent.joined``/``agent.left``; an ``agent_id`` in the body is
  ignored (older consoles send one).  Errors are the envelope (``api.envelope``): 400 bad request or
  SDP (``api.webrtc_signal``, or aiortc's own refusal), 401 no or bad credential, 403 a role without
  ``calls.join``, 409 the principal already has a live session (the answer names no session), 429
  over ``webrtc_offers_per_s`` for this principal (``Retry-After``), 503 ``webrtc_max_sessions`` live;
  and from ``api.middleware``: 413 a body over ``OFFER_MAX_BYTES``, 415 not ``application/json``.
* ``DELETE /api/webrtc/sessions/{session_id}`` (``calls.join``) -> 204; 404 when no such live session
  *of this principal* (another principal's session answers exactly like an unknown one).

One live session per principal on the node; ``"replace": true`` ends the principal's own live
session first (a reloaded browser), never anyone else's.  Offers are rate-limited per principal (a
token bucket per principal, ``MAX_OFFER_BUCKETS`` principals remembered), so one flooding identity
cannot keep others out; one session each also means one identity cannot fill
``webrtc_max_sessions``.

The call is the principal's organisation's (``api.call_session.call_key``): another organisation's
call with the same id is, to this door, a call that has not started, so it behaves exactly like an
unknown call and nothing of the other call is reachable.  A session joins its call id whether or
not the call's Telnyx stream is live (the agent may come first).  The agent's microphone
goes to an agent ``CallPipeline`` (track ``agent``; its transcripts reach the call's SSE channel through
a ``CallEvents`` like the stream's own, with the session id as stream id).  While the call's stream is
live the session's ``pipelines.bridge.AgentBridge`` is attached to it (one bridge per stream: the first
session of the call to find it free).  Events on the call's channel: ``agent.joined`` and ``agent.left``
(with ``reason`` and the session's stats).

A session ends, exactly once (``AgentSession.close``), on: DELETE; the peer connection going
``failed`` (ICE or DTLS) or ``closed`` (the browser hung up); ICE not connecting within
``connect_timeout_s``; server shutdown.  Ending detaches the bridge, stops the tracks, closes the
peer connection and the agent's pipeline, then publishes ``agent.left``.  Nothing of the session is
left running afterwards (tests/api/test_webrtc.py counts tasks).

ICE: ``settings.webrtc_ice_servers`` only (none by default, so nothing asks the internet), and host
candidates limited to ``settings.webrtc_host_addresses`` (``restrict_host_candidates``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import aioice.ice
from aiohttp import web
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import SessionDescription

from api.auth import Principal, require
from api.call_session import call_key, speech_leg
from api.envelope import ApiError, not_found, ok
from api.middleware import body_limit
from api.speech import Policy
from api.webrtc_signal import MAX_SDP_BYTES, OfferRequest, SignalError, parse_offer_request
from engine.frames import Track
from engine.quota import TokenBucket
from pipelines.bridge import AgentBridge, BridgeStats
from pipelines.events import AgentJoined, AgentLeft

if TYPE_CHECKING:
    from api.call_session import CallSession
    from api.runtime import Runtime

log = logging.getLogger("switchboard.webrtc")
# The offer body: the SDP, its line ends escaped in JSON (2 bytes more a line: a quarter is ample), the rest.
OFFER_MAX_BYTES = MAX_SDP_BYTES + MAX_SDP_BYTES // 4 + 4096
MAX_OFFER_BUCKETS = 10_000  # principals whose offer rate is remembered; past it the least recent is forgotten


def principal_key(p: Principal) -> str:
    """One agent: a principal of one organisation (API keys and users have distinct subjects)."""
    return f"{p.org_id.hex}/{p.kind}/{p.subject}"


def restrict_host_candidates(addresses: Sequence[str]) -> None:
    """Offer host candidates on ``addresses`` only, for every aiortc peer connection in this process.

    aioice has no option for this: ``Connection.gather_candidates`` binds one socket per address that
    the module-level ``aioice.ice.get_host_addresses`` returns (every interface but loopback).  We
    replace that one function; the rest of gathering (binding, STUN/TURN when configured) is aioice's
    own.  Process-wide by nature, and idempotent; an empty list keeps aioice's discovery.
    """
    allowed = tuple(str(ipaddress.ip_address(a)) for a in addresses)  # ValueError on a bad address
    if not allowed:
        return

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in allowed if (use_ipv6 if ":" in a else use_ipv4)]

    aioice.ice.get_host_addresses = host_addresses


class AgentSession:
    """One agent's WebRTC session on one call."""

    def __init__(self, registry: AgentSessions, req: OfferRequest, principal: Principal, policy: Policy) -> None:
        rt = registry.rt
        self.registry = registry
        self.id = uuid.uuid4().hex
        self.owner = principal_key(principal)
        self.agent_id, self.call_id, self.language = principal.subject, req.call_id, req.language
        self.user_id = principal.user_id  # a signed-in user (None for an API key): the call's agent when bridged
        self.key = call_key(principal.org_id, req.call_id)  # the call in the principal's organisation
        provider = rt.speech.for_language(req.language, policy)
        self.rate = provider.sample_rate if provider.sample_rate in (8000, 16000) else 16000
        target = policy.translate_to.get(req.language)
        stream = rt.calls.get(self.key)
        self.events, self.pipeline = speech_leg(
            rt, self.key, req.call_id, self.id, req.language,
            target if target in rt.settings.languages and target != req.language else None,
            stream.record if stream else None, policy)
        self.bridge = AgentBridge(stt_rate=self.rate, on_agent_audio=self._feed, jitter_ms=rt.settings.webrtc_jitter_ms,
                                  vad_aggressiveness=rt.settings.vad_aggressiveness,
                                  hangover_ms=rt.settings.vad_hangover_ms)
        servers = [RTCIceServer(u) for u in rt.settings.webrtc_ice_servers]
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_state)
        self.stream: CallSession | None = None
        self.closing = False
        self._closed = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None

    async def negotiate(self, sdp: str) -> str:
        """Apply the offer, add the agent's listening track, gather every candidate; the answer SDP.

        Raises what aiortc raises for an offer it refuses; the caller closes the session then.
        """
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        if not any(t.kind == "audio" for t in self.pc.getTransceivers()):
            raise ValueError("offer has no audio transceiver")
        self.pc.addTrack(self.bridge.player)  # reuses the offer's audio transceiver: sendrecv
        await self.pc.setLocalDescription(await self.pc.createAnswer())  # aiortc gathers fully here
        timeout = self.registry.connect_timeout_s
        self._deadline = asyncio.get_running_loop().call_later(timeout, self._on_deadline, timeout)
        return self.pc.localDescription.sdp

    # -- media ---------------------------------------------------------------------------------

    def _feed(self, pcm: bytes, timestamp_ms: int) -> None:
        self.pipeline.feed(Track.AGENT, pcm, self.rate, timestamp_ms)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self._pump is None and not self.closing:
            self._pump = asyncio.get_running_loop().create_task(self._run_pump(track), name=f"agent-mic-{self.id}")

    async def _run_pump(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                self.bridge.agent_in(await track.recv())  # type: ignore[arg-type]
        except MediaStreamError:
            pass  # the track ended; the connection state says why, and closes the session

    def attach(self, stream: CallSession) -> None:
        self.stream = stream
        if self.events.record is None:  # the call's stream came after the agent: store from now on
            self.events.record = stream.record
        stream.bridge = self.bridge
        self.bridge.attach(stream)
        persistence = self.registry.rt.persistence
        if persistence is not None and stream.record is not None and self.user_id is not None:
            persistence.agent_joined(stream.record, self.user_id, self.id)
        log.info("webrtc.bridged", extra={"session_id": self.id, "call_id": self.call_id, "rate": stream.rate})

    async def detach(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None and stream.bridge is self.bridge:
            stream.bridge = None
        await self.bridge.detach()

    # -- ending --------------------------------------------------------------------------------

    def _on_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected" and self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        elif state in ("failed", "closed") and not self.closing:
            if state == "closed":
                reason = "peer closed the connection"
            elif self.pc.iceConnectionState == "failed":
                reason = "ICE failed: no candidate pair reached the peer"
            else:
                reason = "DTLS failed"
            self.registry.spawn(self.close(reason))

    def _on_deadline(self, timeout: float) -> None:
        self._deadline = None
        if not self.closing and self.pc.connectionState != "connected":
            self.registry.spawn(self.close(f"ICE did not connect within {timeout:g} s"))

    async def close(self, reason: str, *, announce: bool = True) -> None:
        """End the session (see the module docstring); later calls wait for the first to finish."""
        if self.closing:
            await self._closed.wait()
            return
        self.closing = True
        try:
            self.registry.forget(self)
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            await self.detach()
            await self.bridge.aclose()
            if self._pump is not None:
                self._pump.cancel()
                await asyncio.gather(self._pump, return_exceptions=True)
            await self.pc.close()
            await self.pipeline.aclose()
            self.events.close()  # the last partials of utterances that got no final are kept
            await self.events.drain(self.registry.rt.settings.translation_deadline_s + 1.0)
            stats = {**dataclasses.asdict(self.bridge.stats),
                     **{k: getattr(self.pipeline.stats, k) for k in self.pipeline.stats.__slots__}}  # type: ignore[attr-defined]
            self.registry.fold(self.bridge.stats)
            if announce:
                rt = self.registry.rt
                rt.hub.publish(self.key, AgentLeft(self.call_id, self.agent_id, self.id, reason, stats))
                if self.key not in rt.calls and not self.registry.on_call(self.key):
                    rt.hub.end(self.key)  # an agent-only channel: evictable like an ended call's
            log.info("webrtc.closed", extra={"session_id": self.id, "agent_id": self.agent_id,
                                             "call_id": self.call_id, "reason": reason, **stats})
        finally:
            self._closed.set()


class AgentSessions:
    """Live sessions by id and owner (``principal_key``), the offer rate per principal, the bridges'
    counters, and the tasks that end sessions."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.by_id: dict[str, AgentSession] = {}
        self.by_agent: dict[str, AgentSession] = {}  # by owner
        self._offer_buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.offers_limited = 0
        self.total = 0
        self.totals = BridgeStats()  # of ended sessions; live ones are added in stats()
        self.connect_timeout_s = rt.settings.webrtc_connect_timeout_s
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self.by_id)

    def add(self, session: AgentSession) -> None:
        self.by_id[session.id] = session
        self.by_agent[session.owner] = session
        self.total += 1

    def forget(self, session: AgentSession) -> None:
        if self.by_id.get(session.id) is session:
            del self.by_id[session.id]
        if self.by_agent.get(session.owner) is session:
            del self.by_agent[session.owner]

    def on_call(self, key: str) -> list[AgentSession]:
        """The sessions on the call with this call key."""
        return [s for s in self.by_id.values() if s.key == key]

    def offer_wait(self, owner: str, now: float) -> float:
        """0 when ``owner`` may make an offer now (counted), else the seconds until it may."""
        s = self.rt.settings
        buckets = self._offer_buckets
        bucket = buckets.get(owner)
        if bucket is None:
            bucket = buckets[owner] = TokenBucket(s.webrtc_offers_per_s, s.webrtc_offer_burst, now)
            if len(buckets) > MAX_OFFER_BUCKETS:
                buckets.popitem(last=False)
        buckets.move_to_end(owner)
        if bucket.take(now):
            return 0.0
        self.offers_limited += 1
        return (1.0 - bucket.tokens) / bucket.per_s

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro, name="webrtc-close")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def fold(self, stats: BridgeStats) -> None:
        for f in dataclasses.fields(BridgeStats):
            setattr(self.totals, f.name, getattr(self.totals, f.name) + getattr(stats, f.name))

    def stream_started(self, stream: CallSession) -> None:
        """A Telnyx stream for ``stream.key`` started: bridge the first waiting session of the call."""
        if stream.bridge is not None:
            return
        for session in self.on_call(stream.key):
            if session.stream is None and not session.closing:
                session.attach(stream)
                return

    async def stream_ended(self, stream: CallSession) -> None:
        for session in self.on_call(stream.key):
            if session.stream is stream:
                await session.detach()
        stream.bridge = None

    async def close_all(self, reason: str) -> None:
        await asyncio.gather(*(s.close(reason) for s in list(self.by_id.values())))
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def stats(self) -> dict[str, int]:
        live = BridgeStats(**dataclasses.asdict(self.totals))
        for s in self.by_id.values():
            for f in dataclasses.fields(BridgeStats):
                setattr(live, f.name, getattr(live, f.name) + getattr(s.bridge.stats, f.name))
        return {"sessions_live": len(self.by_id), "sessions_total": self.total, "offers_limited": self.offers_limited,
                **dataclasses.asdict(live)}


# -- HTTP ---------------------------------------------------------------------------------------


def add_routes(app: web.Application, registry: AgentSessions) -> None:
    """Register the signalling routes, bound to the node's session registry."""
    logging.getLogger("aioice").setLevel(logging.WARNING)  # it logs every candidate-pair check at INFO
    restrict_host_candidates(registry.rt.settings.webrtc_host_addresses)
    app.router.add_post("/api/webrtc/offer", functools.partial(offer, registry))
    app.router.add_delete("/api/webrtc/sessions/{session_id}", functools.partial(end_session, registry))


@body_limit(OFFER_MAX_BYTES)
async def offer(registry: AgentSessions, request: web.Request) -> web.Response:
    rt = registry.rt
    principal = await require(rt.auth, request, "calls.join")
    owner = principal_key(principal)
    wait_s = registry.offer_wait(owner, time.monotonic())
    if wait_s > 0:
        raise ApiError("rate_limited", f"too many offers: at most {rt.settings.webrtc_offers_per_s:g} a second",
                       headers={"Retry-After": str(max(1, math.ceil(wait_s)))})
    body = await request.read()  # outside the try: a 413 (api.middleware) must not become a 400
    try:
        req = parse_offer_request(body, rt.settings.languages)
        SessionDescription.parse(req.sdp)  # aiortc's own parser, before anything is allocated
    except SignalError as exc:
        raise ApiError("bad_request", exc.message) from None
    except Exception as exc:  # aiortc's parser raises whatever the bad line provokes, often a bare assert
        raise ApiError("bad_request", "sdp could not be parsed: "
                       f"{str(exc) or 'a line does not follow the SDP grammar'}") from None
    policy = await rt.policies.get(principal.org_id)  # before the checks below: none of them awaits
    live = registry.by_agent.get(owner)  # this principal's own session: nobody else's is reachable
    if live is not None and not req.replace:
        raise ApiError("conflict", "you already have a live session on this node"
                                   " (send \"replace\": true to take it over)")
    if live is not None:
        # The agent's browser crashed or reloaded: without this it would wait out ICE consent (~30 s).
        await live.close("replaced by a new session of the same agent")
    if len(registry) >= rt.settings.webrtc_max_sessions:
        raise ApiError("unavailable", f"too many WebRTC sessions: {rt.settings.webrtc_max_sessions} live",
                       headers={"Retry-After": "1"})
    session = AgentSession(registry, req, principal, policy)
    registry.add(session)  # before any await: a concurrent offer of the same principal gets its 409
    try:
        answer = await session.negotiate(req.sdp)
    except BaseException as exc:
        await asyncio.shield(session.close("negotiation failed", announce=False))
        if isinstance(exc, Exception):
            log.info("webrtc.offer_refused", extra={"agent_id": session.agent_id, "error": str(exc)})
            raise ApiError("bad_request", f"sdp refused: {type(exc).__name__}: {exc}") from None
        raise
    key = session.key
    if key not in rt.calls:
        rt.hub.start(key)  # the agent may come first; the channel is live from now
    stream = rt.calls.get(key)
    if stream is not None and stream.bridge is None:
        session.attach(stream)
    rt.hub.publish(key, AgentJoined(req.call_id, session.agent_id, session.id, req.language,
                                    session.stream is not None))
    log.info("webrtc.session", extra={"session_id": session.id, "agent_id": session.agent_id,
                                      "call_id": req.call_id, "bridged": session.stream is not None})
    return ok({"session_id": session.id, "type": "answer", "sdp": answer})


async def end_session(registry: AgentSessions, request: web.Request) -> web.Response:
    principal = await require(registry.rt.auth, request, "calls.join")
    session_id = request.match_info["session_id"]
    session = registry.by_id.get(session_id)
    if session is None or session.owner != principal_key(principal):
        raise not_found("session")
    await session.close("ended by the agent (DELETE)")
    return web.Response(status=204)
