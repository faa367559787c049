"""The node's services (``Runtime``) and its counters (``Stats``)."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from api.billing import Billing
from api.hub import EventHub
from api.middleware import ClientAddress
from api.post_call import PostCall
from api.settings import Settings
from api.sweeper import Sweeper
from api.telnyx_calls import TelnyxCalls
from engine.metrics import LagHistogram
from engine.quota import PerKeyQuota
from engine.segmenter import SegmenterConfig
from pipelines.redaction import Redactor
from pipelines.translation import TranslationStage
from storage.crypto import Keyring
from storage.sweeps import NODE_LOST

if TYPE_CHECKING:
    from api.heartbeat import NodeHeartbeat
    from api.media_stream import MediaStream
    from api.persistence import Persistence
    from api.speech import Speech
    from api.tiers import Tiers

log = logging.getLogger("switchboard.app")

# After the calls drained (SHUTDOWN_GRACE_S): recordings of the calls that just ended get this long to
# reach the cold tier (the rest stay in the spool for the next start).  Part of a node's stop bound
# (deploy/k8s/deployment.yaml terminationGracePeriodSeconds; tests/deploy/test_manifests.py).
UPLOAD_DRAIN_S = 30.0


@dataclass(slots=True)
class Stats:
    frames: int = 0
    streams_total: int = 0
    sse_clients: int = 0
    frame_lag: LagHistogram = field(default_factory=LagHistogram)
    gc_pause: LagHistogram = field(default_factory=LagHistogram)  # how long each cyclic GC run held the loop
    loop_stall: LagHistogram = field(default_factory=LagHistogram)  # how late a 10 ms timer fires
    _gc_started: float = 0.0

    def watch_gc(self) -> None:
        gc.callbacks.append(self._on_gc)

    def unwatch_gc(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_pause.record((time.perf_counter() - self._gc_started) * 1000)


class Runtime:
    """Every service of one node, built once (``api.app.open_runtime``) and handed to each door.

    Nothing is attached later: what needs the async start-up (the storage tiers, the translator,
    the node's speech recognisers) is opened before this object exists and given to it here;
    what only needs the settings is built here.  ``start`` starts the background tasks, ``drain``
    ends live calls at shutdown, ``aclose`` releases everything in reverse order.
    """

    def __init__(self, settings: Settings, *, speech: Speech, tiers: Tiers | None = None,
                 persistence: Persistence | None = None, translation: TranslationStage | None = None,
                 heartbeat: NodeHeartbeat | None = None) -> None:
        # Imported here: these modules type their handlers against Runtime, so importing them at the
        # top would be circular; this constructor is the only place that builds them.
        from api.auth import Authenticator
        from api.call_session import CallRegistry
        from api.media_stream import Admission, StreamWatch
        from api.persistence import BusForwarder
        from api.readiness import Readiness
        from api.relay import BusRelay
        from api.speech import OrgPolicies
        from api.webrtc import AgentSessions

        s = settings
        self.settings = s
        self.speech = speech  # providers per language and the organisation's policy
        self.tiers = tiers
        self.persistence = persistence  # None when settings.persist is off
        self.translation = translation  # None when no translator is configured
        self.segmenter: SegmenterConfig = s.segmenter()
        self.phrases: tuple[str, ...] = s.phrases()
        self.stats = Stats()
        # GET /metrics (api/metrics.py): speech pipelines' counters, recognisers' time to final, lost frames.
        from api.metrics import Exposition, FinalLatency, PipelineTotals, StreamLosses

        self.pipeline_totals = PipelineTotals()
        self.final_latency = FinalLatency()
        self.stream_losses = StreamLosses()
        self.auth = Authenticator(s, tiers)  # every door's identity check
        self.sse_held = PerKeyQuota(s.sse_max_per_principal)  # open event streams per user or API key
        self.client_address = ClientAddress.build(s.trusted_proxies).of  # the peer, or whom a trusted proxy names
        self.policies = OrgPolicies(s, speech.policy, tiers, fresh_s=s.org_settings_cache_s)  # per organisation
        self.redactor = Redactor()
        self.hub = EventHub(history=s.sse_history, client_buffer=s.sse_client_buffer, max_calls=s.sse_max_calls,
                            retention_s=s.sse_retention_s, max_pending=s.sse_max_pending,
                            max_pending_per_owner=s.sse_max_pending_per_address)
        self.calls = CallRegistry(s.max_streams)  # live calls by call key (organisation + call id): the stream slots
        self.admission = Admission(s.media_max_pending, s.media_max_pending_per_address,
                                   frozenset(s.per_address_exempt))  # media sockets awaiting `start`
        self.streams: set[MediaStream] = set()  # open media sockets, started or not
        self.watch = StreamWatch(self.streams, s)
        self.readiness = Readiness(tiers, timeout_s=s.readiness_timeout_s, cache_s=s.readiness_cache_s,
                                   draining=lambda: self.draining)
        self.bus: BusForwarder | None = None
        self.relay: BusRelay | None = None  # other nodes' calls for SSE clients here
        if tiers is not None and s.bus_enabled:
            self.bus = BusForwarder(tiers.bus, s.bus_buffer)
            self.hub.taps.append(self.bus.tap)
            self.relay = BusRelay(tiers.bus, self.hub, self.calls.__contains__, max_calls=s.relay_max_calls)
        self.agents = AgentSessions(self)  # WebRTC sessions of agent browsers
        self.billing: Billing | None = Billing(s, tiers.db) if tiers is not None else None
        self.keyring: Keyring | None = None  # encryption at rest (storage/crypto.py)
        if tiers is not None:
            from api.restricted_api import keyring_for

            self.keyring = keyring_for(s)
        self.post_call: PostCall | None = None  # Telnyx's recordings fetched and transcribed (api/post_call.py)
        if tiers is not None:
            self.post_call = PostCall(s, tiers.db, tiers.blobs, self.redactor, s.own_dir / "post-call",
                                      self.phrases)
        self.telnyx: TelnyxCalls | None = (TelnyxCalls(s, tiers.db, self.hub, self.post_call)
                                           if tiers is not None else None)
        self.sweeper: Sweeper | None = (Sweeper(s, tiers.db, self.hub, tiers.bus if s.bus_enabled else None)
                                        if tiers is not None else None)
        # Beating since open_runtime (before recovery); its one callback is this node's own reaction.
        self.heartbeat = heartbeat
        if heartbeat is not None:
            heartbeat.on_lost = self._declared_lost
        self.draining = False  # shutting down: new media streams are refused
        self._stall_task: asyncio.Task[None] | None = None
        self._retention_task: asyncio.Task[None] | None = None
        self._wipe_task: asyncio.Task[None] | None = None
        self._cleanup_task: asyncio.Task[None] | None = None
        self.metrics = Exposition(self)

    def start(self) -> None:
        """Start the background tasks (on the running loop)."""
        self.stats.watch_gc()
        self._stall_task = asyncio.get_running_loop().create_task(self._watch_loop(), name="loop-stall-watch")
        self.watch.start()
        self.metrics.start()
        if self.tiers is not None:
            s = self.settings
            self.tiers.supervise(s.supervise_interval_s, s.supervise_backoff_max_s)
        if self.bus is not None:
            self.bus.start()
        if self.relay is not None:
            self.relay.start()
        if self.translation is not None:
            self.translation.start()
        if self.billing is not None:
            self.billing.start()
        if self.post_call is not None:
            self.post_call.start()
        self.start_wipe()  # organisations deleted before a restart finish wiping now
        if self.tiers is not None:
            self._cleanup_task = asyncio.get_running_loop().create_task(self._startup_cleanup(), name="cleanup")
        if self.tiers is not None and self.settings.retention_interval_s > 0:
            self._retention_task = asyncio.get_running_loop().create_task(self._retention_loop(), name="retention")
        if self.sweeper is not None:
            self.sweeper.start()

    async def _startup_cleanup(self) -> None:
        """What this node's last run left half-done that no other mechanism finishes: its exports."""
        from api.exports import fail_interrupted
        from storage.db import live_orgs

        assert self.tiers is not None
        try:
            n = await fail_interrupted(self.tiers.db, self.settings.node_id, await live_orgs(self.tiers.db))
            if n:
                log.warning("exports.interrupted", extra={"failed": n})
        except Exception:  # storage down at start: the jobs stay as they are, reported next start
            log.exception("startup_cleanup.failed")

    async def _declared_lost(self) -> None:
        """Another node's sweeper declared this one lost (it stopped beating for ``node_dead_s``: a pause,
        a partition) and closed its open calls as ``node_lost``.  Those are final: each live call here
        whose row that sweep closed is marked, so that its end, when it comes, stores nothing over the
        sweep's outcome (no second end, audit entry or summary; ``Persistence.call_ended``).  One
        tenant read per live call, once per declaration."""
        if self.tiers is None:
            return
        closed = 0
        for session in self.calls:
            record = session.record
            if record is None:
                continue
            async with self.tiers.db.tenant(record.org_id) as conn:
                reason = await conn.fetchval("SELECT end_reason FROM calls WHERE org_id = $1 AND call_control_id = $2"
                                             " AND status = 'failed'", record.org_id, record.call_control_id)
            if reason == NODE_LOST:
                record.closed_elsewhere = True
                closed += 1
        log.error("node.calls_closed_elsewhere", extra={"node_id": self.settings.node_id, "calls": closed,
                                                        "live": len(self.calls)})

    def start_wipe(self) -> None:
        """Purge the deleted organisations (storage/wipe.py) in the background; at most one run at a
        time on this node (a second request finds the first's run going), and on all nodes (an advisory
        lock: the run that holds it picks up organisations deleted meanwhile).  A run cut short by a
        shutdown resumes at the next start or retention round."""
        if self.tiers is None or (self._wipe_task is not None and not self._wipe_task.done()):
            return
        self._wipe_task = asyncio.get_running_loop().create_task(self._wipe(), name="tenant-wipe")

    async def _wipe(self) -> None:
        from storage.wipe import Wipe

        assert self.tiers is not None
        try:
            await Wipe(self.tiers.db, self.tiers.blobs, batch=self.settings.retention_batch,
                       actor=f"wipe:{self.settings.node_id}"[:64]).run()  # skipped while another node wipes
        except Exception:  # storage down, or a bug: logged; the next start or retention round resumes
            log.exception("wipe.failed")

    async def _retention_loop(self) -> None:
        """The retention job every ``retention_interval_s`` (storage/retention.py).  Every node has the
        loop; one at a time runs the job (an advisory lock): a node that finds it taken skips that round."""
        from storage.retention import Retention

        assert self.tiers is not None
        s = self.settings
        job = Retention(self.tiers.db, self.tiers.blobs, window_days=s.restore_window_days,
                        batch=s.retention_batch, actor=f"retention:{s.node_id}"[:64],
                        archive_after_days=s.archive_after_days)
        while True:
            await asyncio.sleep(s.retention_interval_s)
            try:
                self.start_wipe()  # organisations deleted before a restart, or whose wipe failed
                report = await job.run()
                if report.skipped is None:
                    log.info("retention.done", extra=report.totals())
            except Exception:  # a storage outage or a bug: logged, tried again next interval
                log.exception("retention.failed")

    async def _watch_loop(self) -> None:
        """Sleep 10 ms at a time and record how late the wake-up is: the event loop's own latency."""
        hist = self.stats.loop_stall
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(0.01)
            hist.record((time.perf_counter() - t0 - 0.01) * 1000)

    async def drain(self) -> None:
        """Shutdown: refuse new streams, end live calls with ``server_shutdown`` (their owed finals and
        ``call.ended`` go out first), then release the SSE clients; all within ``shutdown_grace_s``."""
        from api.media_stream import drain_streams

        self.draining = True
        for task in (self._retention_task, self._wipe_task, self._cleanup_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._stall_task is not None:
            self._stall_task.cancel()
        t0 = time.monotonic()
        if self.tiers is not None and self.tiers.supervisor is not None:
            await self.tiers.supervisor.aclose()  # a Ctrl-C reaches embedded Valkey too: what stops stays stopped
        await self.agents.close_all("server shutting down")  # before the streams: a bridge sends on its call's stream
        live = len(self.calls)
        left = await drain_streams(self, self.settings.shutdown_grace_s)
        await self.watch.aclose()
        log.info("server.drained", extra={"calls": live, "unfinished": left,
                                          "seconds": round(time.monotonic() - t0, 2)})
        self.hub.close_all()

    async def aclose(self) -> None:
        """Release everything, in the reverse order of ``open_runtime``.  Idempotent enough for cleanup."""
        self.stats.unwatch_gc()
        await self.metrics.aclose()
        if self._retention_task is not None:
            self._retention_task.cancel()
            await asyncio.gather(self._retention_task, return_exceptions=True)
        if self._stall_task is not None:
            self._stall_task.cancel()
            await asyncio.gather(self._stall_task, return_exceptions=True)
        await self.watch.aclose()
        await self.speech.aclose()
        if self.translation is not None:
            await self.translation.aclose()
            await self.translation.translator.aclose()
        if self.persistence is not None:
            await self.persistence.drain(wait_s=UPLOAD_DRAIN_S)  # recordings of the calls that just ended
        if self.sweeper is not None:
            await self.sweeper.aclose()
        if self.billing is not None:
            await self.billing.aclose()
        if self.post_call is not None:
            await self.post_call.aclose()
        if self.telnyx is not None:
            await self.telnyx.aclose()
        if self.relay is not None:
            await self.relay.aclose()
        if self.bus is not None:
            await self.bus.aclose()
        if self.heartbeat is not None:  # last before the tiers: alive until the calls' ends are written
            await self.heartbeat.aclose()
        if self.tiers is not None:
            await self.tiers.aclose()
