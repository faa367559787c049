"""The aiohttp application: routes, start-up and shutdown.

The shared ``Runtime`` (``api.runtime``) is built in ``create_app`` and torn down on shutdown and
cleanup: every stream is closed with 1001 (going away), every SSE client released, the provider closed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import time

from aiohttp import web

from api import blobs, console, media_stream, readiness, sse, webrtc
from api.call_session import CallRegistry
from api.connections import CONNECTION_GUARD
from api.hub import EventHub
from api.middleware import body_limit, doors
from api.persistence import BusForwarder, Persistence
from api.recovery import recover_on_start
from api.relay import BusRelay
from api.runtime import RUNTIME, Runtime
from api.settings import Settings
from api.speech import Policy, Speech, make_translator
from api.tiers import Tiers, local_blob_store, open_tiers
from pipelines.stt.base import SttProvider
from pipelines.translation import TranslationStage

log = logging.getLogger("switchboard.app")
STALL_TASK = web.AppKey("stall_task", asyncio.Task)
STREAM_WATCH = web.AppKey("stream_watch", media_stream.StreamWatch)
TIERS = web.AppKey("tiers", Tiers)
STT_OVERRIDE = web.AppKey("stt_override", object)  # a provider given to create_app (tests)
LOCAL_BLOBS = web.AppKey("local_blobs", object)


def create_app(settings: Settings | None = None, *, stt: SttProvider | None = None) -> web.Application:
    settings = settings or Settings()
    # The Host, content-type and body checks (api.middleware); 1 MiB is only the backstop of the
    # per-route limits that it enforces.
    app = web.Application(client_max_size=1 << 20, middlewares=[doors(settings)])
    speech = Speech(settings, Policy.resolve(settings), override=stt)
    rt = Runtime(
        settings=settings,
        hub=EventHub(
            history=settings.sse_history,
            client_buffer=settings.sse_client_buffer,
            max_calls=settings.sse_max_calls,
            retention_s=settings.sse_retention_s,
            max_pending=settings.sse_max_pending,
            max_pending_per_owner=settings.sse_max_pending_per_address,
        ),
        segmenter=settings.segmenter(),
        phrases=settings.phrases(),
        speech=speech,
        calls=CallRegistry(settings.max_streams),
        admission=media_stream.Admission(settings.media_max_pending, settings.media_max_pending_per_address,
                                         frozenset(settings.per_address_exempt)),
    )
    app[RUNTIME] = rt
    app[STREAM_WATCH] = media_stream.StreamWatch(rt)
    if stt is not None:
        app[STT_OVERRIDE] = stt
    app.router.add_get("/api/media/telnyx", media_stream.telnyx_media)
    app.router.add_get("/api/calls/{call_id}/events", sse.call_events)
    app.router.add_get("/healthz", health)
    readiness.add_routes(app, timeout_s=settings.readiness_timeout_s, cache_s=settings.readiness_cache_s)
    webrtc.add_routes(app)
    console.add_routes(app)
    if settings.persist:
        local = local_blob_store(settings)
        app[LOCAL_BLOBS] = local
        if local is not None:
            blobs.add_routes(app, local)
    if settings.stats_enabled:
        app.router.add_get("/api/stats", stats)
        app.router.add_post("/api/stats/reset", stats_reset)
    app.on_startup.append(_on_startup)
    app.on_shutdown.append(_on_shutdown)
    app.on_cleanup.append(_on_cleanup)
    if settings.telnyx_stream_token is None:
        log.warning("config.no_stream_token", extra={"hint": "set SWITCHBOARD_TELNYX_STREAM_TOKEN in production"})
    return app


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def stats(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    gc_stats = gc.get_stats()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return web.json_response({
        "streams_active": len(rt.calls),
        "streams_pending": rt.admission.total,
        "streams_refused": rt.admission.refused,
        "streams_total": rt.stats.streams_total,
        "streams_start_timeouts": request.app[STREAM_WATCH].expired_start,
        "streams_idle_timeouts": request.app[STREAM_WATCH].expired_idle,
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
        "bus": {"forwarded": rt.bus.forwarded, "dropped": rt.bus.dropped, "errors": rt.bus.errors} if rt.bus else None,
        "relay": {"relayed": rt.relay.relayed, "errors": rt.relay.errors} if rt.relay else None,
        "translation": _translation_stats(rt),
        "webrtc": rt.agents.stats() if rt.agents is not None else None,
        "http": guard.stats() if (guard := request.app.get(CONNECTION_GUARD)) is not None else None,
        "rss_bytes": _rss_bytes(),
        "pid": os.getpid(),
        "time": time.time(),
    })


@body_limit(1024)  # takes none, but a client that sends {} is not refused
async def stats_reset(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    rt.stats.frame_lag.reset()
    rt.stats.gc_pause.reset()
    rt.stats.loop_stall.reset()
    return web.json_response({"reset": True})


def _translation_stats(rt: Runtime) -> dict[str, object] | None:
    stage = rt.translation
    if stage is None:
        return None
    st = stage.stats
    return {"provider": stage.translator.name, "pending": stage.pending, "submitted": st.submitted,
            "translated": st.translated, "shed": st.shed, "deadline": st.deadline, "errors": st.errors,
            "lag": stage.lag.summary()}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


async def _on_startup(app: web.Application) -> None:
    rt = app[RUNTIME]
    rt.stats.watch_gc()
    app[STALL_TASK] = asyncio.create_task(_watch_loop(rt), name="loop-stall-watch")
    app[STREAM_WATCH].start()
    s = rt.settings
    if s.persist:
        tiers = await open_tiers(s, app[LOCAL_BLOBS])  # type: ignore[arg-type]
        app[TIERS] = tiers
        rt.persistence = Persistence(tiers, spool_dir=s.data_dir.resolve() / "spool", recording=s.recording_enabled,
                                     recording_max_s=s.recording_max_s, uploads=s.recording_uploads,
                                     node_id=s.node_id)
        await recover_on_start(rt.persistence, s.node_id)  # before any stream is accepted
        tiers.supervise(s.supervise_interval_s, s.supervise_backoff_max_s)
        app[readiness.READINESS].tiers = tiers
        if s.bus_enabled:
            rt.bus = BusForwarder(tiers.bus, s.bus_buffer)
            rt.bus.start()
            rt.hub.taps.append(rt.bus.tap)
            rt.relay = BusRelay(tiers.bus, rt.hub, rt.calls.__contains__, max_calls=s.relay_max_calls)
            rt.relay.start()
        org_settings = await tiers.org_settings()
        if org_settings and app.get(STT_OVERRIDE) is None:
            rt.speech = Speech(s, Policy.resolve(s, org_settings))  # the organisation's own choices
    translator = make_translator(s)
    if translator is not None:
        await translator.start()
        rt.translation = TranslationStage(translator, concurrency=s.translation_concurrency,
                                          max_pending=s.translation_max_pending, deadline_s=s.translation_deadline_s)
        rt.translation.start()
    await rt.speech.warm(rt.phrases)


async def _watch_loop(rt: Runtime) -> None:
    """Sleep 10 ms at a time and record how late the wake-up is: the event loop's own latency."""
    hist = rt.stats.loop_stall
    while True:
        t0 = time.perf_counter()
        await asyncio.sleep(0.01)
        hist.record((time.perf_counter() - t0 - 0.01) * 1000)


async def _on_shutdown(app: web.Application) -> None:
    """Drain: refuse new streams, end live calls with ``server_shutdown`` (their owed finals and
    ``call.ended`` go out first), then release the SSE clients; all within ``shutdown_grace_s``."""
    rt = app[RUNTIME]
    rt.draining = True
    app[STALL_TASK].cancel()
    t0 = time.monotonic()
    tiers = app.get(TIERS)
    if tiers is not None and tiers.supervisor is not None:
        await tiers.supervisor.aclose()  # a Ctrl-C reaches embedded Valkey too: what stops now stays stopped
    if rt.agents is not None:  # before the streams: a session's bridge sends on its call's stream
        await rt.agents.close_all("server shutting down")
    live = len(rt.calls)
    left = await media_stream.drain_streams(rt, app[STREAM_WATCH], rt.settings.shutdown_grace_s)
    await app[STREAM_WATCH].aclose()
    log.info("server.drained", extra={"calls": live, "unfinished": left,
                                      "seconds": round(time.monotonic() - t0, 2)})
    rt.hub.close_all()


async def _on_cleanup(app: web.Application) -> None:
    rt = app[RUNTIME]
    rt.stats.unwatch_gc()
    await rt.speech.aclose()
    if rt.translation is not None:
        await rt.translation.aclose()
        await rt.translation.translator.aclose()
    if rt.persistence is not None:
        await rt.persistence.drain(wait_s=30.0)  # recordings of the calls that just ended
    if rt.relay is not None:
        await rt.relay.aclose()
    if rt.bus is not None:
        await rt.bus.aclose()
    tiers = app.get(TIERS)
    if tiers is not None:
        await tiers.aclose()
