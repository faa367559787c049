"""What every handler shares: settings, the event hub, the STT provider, live streams, counters."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from api.hub import EventHub
from api.settings import Settings
from engine.metrics import LagHistogram
from engine.segmenter import SegmenterConfig
from pipelines.redaction import Redactor
from pipelines.translation import TranslationStage

if TYPE_CHECKING:
    from api.call_session import CallRegistry
    from api.media_stream import Admission, MediaStream
    from api.persistence import BusForwarder, Persistence
    from api.relay import BusRelay
    from api.speech import Speech
    from api.webrtc import AgentSessions


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


@dataclass(slots=True)
class Runtime:
    settings: Settings
    hub: EventHub
    speech: Speech  # providers per language and the organisation's policy
    calls: CallRegistry  # live calls by call id: the stream slots
    admission: Admission  # media sockets awaiting `start`
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    phrases: tuple[str, ...] = ()
    streams: set[MediaStream] = field(default_factory=set)  # open media sockets, started or not
    stats: Stats = field(default_factory=Stats)
    redactor: Redactor = field(default_factory=Redactor)
    translation: TranslationStage | None = None  # None when no translator is configured
    persistence: Persistence | None = None  # None when settings.persist is off
    bus: BusForwarder | None = None
    relay: BusRelay | None = None  # other nodes' calls for SSE clients here
    agents: AgentSessions | None = None  # WebRTC sessions of agent browsers (api.webrtc.add_routes)
    draining: bool = False  # shutting down: new media streams are refused




RUNTIME = web.AppKey("runtime", Runtime)
