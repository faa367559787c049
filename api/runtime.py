"""What every handler shares: settings, the event hub, the STT provider, live streams, counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from api.hub import EventHub
from api.settings import Settings
from engine.metrics import LagHistogram
from engine.segmenter import SegmenterConfig
from pipelines.stt.base import SttProvider

if TYPE_CHECKING:
    from api.media_stream import MediaStream


@dataclass(slots=True)
class Stats:
    frames: int = 0
    streams_total: int = 0
    sse_clients: int = 0
    frame_lag: LagHistogram = field(default_factory=LagHistogram)


@dataclass(slots=True)
class Runtime:
    settings: Settings
    hub: EventHub
    stt: SttProvider
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    phrases: tuple[str, ...] = ()
    streams: dict[int, MediaStream] = field(default_factory=dict)
    calls: dict[str, MediaStream] = field(default_factory=dict)
    stats: Stats = field(default_factory=Stats)

    def publisher(self, call_id: str) -> Any:
        hub = self.hub

        def publish(event: str, payload: dict[str, Any], droppable: bool, key: str) -> None:
            hub.publish(call_id, event, payload, droppable=droppable, key=key)

        return publish


RUNTIME = web.AppKey("runtime", Runtime)
