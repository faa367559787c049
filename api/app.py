"""The aiohttp application: services built once, routes bound to them, start-up and shutdown.

``open_runtime`` is the one place the node's services are built: it opens the storage tiers (or
their embedded defaults), recovers what a crashed run left, starts the translator, resolves the
node's speech policy and warms its recognisers, then hands everything to ``Runtime``.
``make_app`` binds each route's handler to the services it needs (no handler looks anything up on
the app).  ``build_app`` is both.  Shutdown drains live calls (``Runtime.drain``), cleanup closes
everything in reverse (``Runtime.aclose``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import os
import resource
import threading
import time

from aiohttp import web

from api import blobs, console, media_stream, openapi, readiness, rest, sse, webrtc, workspace
from api.auth import require
from api.connections import CONNECTION_GUARD
from api.envelope import envelope_errors
from api.heartbeat import NodeHeartbeat
from api.middleware import body_limit, doors
from api.persistence import Persistence
from api.recovery import recover_on_start
from api.runtime import Runtime
from api.settings import Settings
from api.speech import Policy, Speech, make_translator
from api.tiers import local_blob_store, open_tiers
from pipelines.stt.base import SttProvider
from pipelines.translation import TranslationStage

log = logging.getLogger("switchboard.app")


async def open_runtime(settings: Settings | None = None, *, stt: SttProvider | None = None) -> Runtime:
    """Build every service of the node (see the module docstring).  On failure what was opened is closed.

    ``stt`` replaces the configured recognisers (tests and benchmarks).
    """
    s = settings or Settings()
    async with contextlib.AsyncExitStack() as opened:
        tiers = persistence = translation = heartbeat = None
        if s.persist:
            tiers = await open_tiers(s, local_blob_store(s))
            opened.push_async_callback(tiers.aclose)
            persistence = Persistence(tiers, spool_dir=s.own_dir / "spool",
                                      recording=s.recording_enabled, recording_max_s=s.recording_max_s,
                                      uploads=s.recording_uploads, node_id=s.node_id)
            opened.push_async_callback(persistence.drain, 30.0)
            # Alive for the other nodes' sweepers from now on (api/heartbeat.py): before recovery, before
            # any stream, and beating while the recognisers warm, however long that takes.
            heartbeat = NodeHeartbeat(tiers.db, s.node_id, s.node_heartbeat_s)
            await heartbeat.start()
            opened.push_async_callback(heartbeat.aclose)
            await recover_on_start(persistence, s.node_id, s.sweep_batch)  # before any stream or request
        # The node's own policy, from the settings; each call runs under its organisation's
        # (api.speech.OrgPolicies: its STT chain, translation target and SSE redaction over these).
        speech = Speech(s, Policy.resolve(s), override=stt)
        opened.push_async_callback(speech.aclose)
        translator = make_translator(s)
        if translator is not None:
            await translator.start()
            opened.push_async_callback(translator.aclose)
            translation = TranslationStage(translator, concurrency=s.translation_concurrency,
                                           max_pending=s.translation_max_pending,
                                           deadline_s=s.translation_deadline_s)
        rt = Runtime(s, speech=speech, tiers=tiers, persistence=persistence, translation=translation,
                     heartbeat=heartbeat)
        await speech.warm(rt.phrases)  # the phrase list read once, by Runtime
        opened.pop_all()  # from here on Runtime.aclose owns them
    return rt


def make_app(rt: Runtime) -> web.Application:
    """The application serving ``rt``; its cleanup closes ``rt``."""
    s = rt.settings
    # The Host, content-type and body checks (api.middleware); 1 MiB is only the backstop of the
    # per-route limits that it enforces.
    app = web.Application(client_max_size=1 << 20, middlewares=[doors(s), envelope_errors])
    app.router.add_get("/api/media/telnyx", functools.partial(media_stream.telnyx_media, rt))
    app.router.add_get("/api/calls/{call_id}/events", functools.partial(sse.call_events, rt))
    app.router.add_post("/api/calls/{call_id}/sse-token", functools.partial(sse.sse_token, rt))
    app.router.add_get("/healthz", health)
    app.router.add_get("/readyz", functools.partial(readiness.readyz, rt.readiness))
    webrtc.add_routes(app, rt.agents)
    console.add_routes(app)
    workspace.add_routes(app, rt.settings)
    # The REST API (api.rest; with storage off its routes answer 503) and its document.
    rest.add_routes(app, rt, openapi.REST_ROUTES)
    openapi.add_routes(app)
    if rt.tiers is not None and rt.tiers.local_blobs is not None:
        blobs.add_routes(app, rt.tiers.local_blobs)
    if s.stats_enabled:
        app.router.add_get("/api/stats", functools.partial(stats, rt))
        app.router.add_post("/api/stats/reset", functools.partial(stats_reset, rt))
        app.router.add_get("/metrics", functools.partial(metrics, rt))

    async def start(app: web.Application) -> None:
        rt.start()

    async def drain(app: web.Application) -> None:
        await rt.drain()

    async def close(app: web.Application) -> None:
        await rt.aclose()

    app.on_startup.append(start)
    app.on_shutdown.append(drain)
    app.on_cleanup.append(close)
    return app


async def build_app(settings: Settings | None = None, *, stt: SttProvider | None = None) -> web.Application:
    """``make_app(await open_runtime(...))``."""
    return make_app(await open_runtime(settings, stt=stt))


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _stats_allowed(rt: Runtime, request: web.Request, action: str) -> None:
    """An admin (``stats.read``/``stats.reset``) or the metrics token (a scraper, which may also reset
    the latency histograms between its runs: it changes no data, only what the next read shows);
    else 401/403 (``api.auth.require``)."""
    if not rt.auth.metrics_ok(request):
        await require(rt.auth, request, action)


async def stats(rt: Runtime, request: web.Request) -> web.Response:
    await _stats_allowed(rt, request, "stats.read")
    gc_stats = gc.get_stats()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return web.json_response({
        # Which process answered: with `serve --workers N` each answers for itself (api/workers.py).
        "node": _node(rt),
        "streams_active": len(rt.calls),
        "streams_pending": rt.admission.total,
        "streams_refused": rt.admission.refused,
        "streams_total": rt.stats.streams_total,
        "streams_start_timeouts": rt.watch.expired_start,
        "streams_idle_timeouts": rt.watch.expired_idle,
        "frames": rt.stats.frames,
        "frame_lag": rt.stats.frame_lag.summary(),
        "sse_clients": rt.stats.sse_clients,
        "sse_waiting": rt.hub.waiting,
        "events_published": rt.hub.published,
        "calls_tracked": len(rt.hub),
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "gc_collections": [g["collections"] for g in gc_stats],
        "gc_pause": rt.stats.gc_pause.summary(),
        "loop_stall": rt.stats.loop_stall.summary(),
        "persistence": rt.persistence.stats() if rt.persistence else None,
        "bus": {"forwarded": rt.bus.forwarded, "dropped": rt.bus.dropped, "errors": rt.bus.errors,
                "gaps_signalled": rt.bus.gaps_signalled, "gaps_lost": rt.bus.gaps_lost} if rt.bus else None,
        "relay": {"relayed": rt.relay.relayed, "errors": rt.relay.errors, "resets": rt.relay.resets}
        if rt.relay else None,
        "heartbeat": rt.heartbeat.stats() if rt.heartbeat else None,
        "translation": _translation_stats(rt),
        "webrtc": rt.agents.stats(),
        "sweeper": rt.sweeper.stats() if rt.sweeper else None,
        "auth": {"media_token_stale_hits": rt.auth.media_stale_hits},
        "post_call": rt.post_call.stats() if rt.post_call else None,
        "billing": dataclasses.asdict(rt.billing.counters) if rt.billing else None,
        "telnyx": dataclasses.asdict(rt.telnyx.counters) if rt.telnyx else None,
        "http": guard.stats() if (guard := request.app.get(CONNECTION_GUARD)) is not None else None,
        "rss_bytes": _rss_bytes(),
        # What a leak would show: these return to their baseline once calls end and retention expires.
        "tasks": len(asyncio.all_tasks()),
        "threads": threading.active_count(),
        "open_fds": _open_fds(),
        "pid": os.getpid(),
        "time": time.time(),
    })


async def metrics(rt: Runtime, request: web.Request) -> web.Response:
    """Prometheus exposition (api/metrics.py), for the metrics token or an admin; with several workers,
    every worker's, labelled ``worker``."""
    await _stats_allowed(rt, request, "stats.read")
    from api.metrics import CONTENT_TYPE

    return web.Response(body=await rt.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


@body_limit(1024)  # takes none, but a client that sends {} is not refused
async def stats_reset(rt: Runtime, request: web.Request) -> web.Response:
    await _stats_allowed(rt, request, "stats.reset")
    rt.stats.frame_lag.reset()
    rt.stats.gc_pause.reset()
    rt.stats.loop_stall.reset()
    return web.json_response({"reset": True, "node": _node(rt)})


def _node(rt: Runtime) -> dict[str, object]:
    return {"node_id": rt.settings.node_id, "worker": rt.settings.worker_index, "pid": os.getpid()}


def _translation_stats(rt: Runtime) -> dict[str, object] | None:
    stage = rt.translation
    if stage is None:
        return None
    st = stage.stats
    return {"provider": stage.translator.name, "pending": stage.pending, "submitted": st.submitted,
            "translated": st.translated, "shed": st.shed, "deadline": st.deadline, "errors": st.errors,
            "marker_fallbacks": stage.translator.marker_fallbacks, "markers_lost": stage.translator.markers_lost,
            "lag": stage.lag.summary()}


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
