"""A minimal SSE reader for tests: parses the stream as EventSource does (WHATWG rules)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import orjson

from tests.servers import API_KEY


@dataclass
class SseEvent:
    event: str
    data: str
    id: str | None

    def json(self) -> dict:  # type: ignore[type-arg]
        return orjson.loads(self.data)  # type: ignore[no-any-return]


@dataclass
class SseStream:
    status: int
    content_type: str
    events: list[SseEvent] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: int | None = None


async def read_sse(
    session: aiohttp.ClientSession, url: str, *, last_event_id: str | None = None, until: str = "call.ended",
    max_events: int = 10_000, on_event: Callable[[SseEvent], None] | None = None, token: str | None = API_KEY,
) -> SseStream:
    """Read ``url`` until an event named ``until`` (or the stream ends); ``on_event`` sees each as it comes.
    ``token`` goes as ``Authorization: Bearer`` (``None``: no credential)."""
    headers = {"Accept": "text/event-stream"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    async with session.get(url, headers=headers) as resp:
        out = SseStream(resp.status, resp.headers.get("Content-Type", ""))
        if resp.status != 200:
            return out
        event, data, ev_id = "message", [], None
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if not line:
                if data:
                    out.events.append(SseEvent(event, "\n".join(data), ev_id))
                    if on_event is not None:
                        on_event(out.events[-1])
                    if event == until or len(out.events) >= max_events:
                        return out
                event, data = "message", []
                continue
            if line.startswith(":"):
                out.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                ev_id = value
            elif name == "retry":
                out.retry = int(value)
    return out
