"""Sending a Telnyx stream as Telnyx does: ``connected`` and ``start`` at once, then one message every
20 ms of audio, paced against the clock (not slept one by one, so lateness does not add up)."""

from __future__ import annotations

import asyncio
from typing import Any

import websockets

from tests.servers import MEDIA_TOKEN

FRAME_S = 0.02
AUTH_HEADER = "x-telnyx-streaming-auth-token"


def connect(url: str, *, token: str | None = MEDIA_TOKEN, **kwargs: Any) -> websockets.connect:
    """``websockets.connect`` as Telnyx connects: the media token in the upgrade's header (``token=None``:
    none; it may then go in ``connected``).  Await it, or use it as an async context manager."""
    headers = dict(kwargs.pop("additional_headers", None) or {})
    if token is not None:
        headers.setdefault(AUTH_HEADER, token)
    return websockets.connect(url, additional_headers=headers, **kwargs)


async def send_paced(ws: websockets.ClientConnection, messages: list[str], *, for_s: float | None = None,
                     per_frame: int = 1) -> int:
    """Send ``messages`` (``api.simulator.telnyx_messages``: connected, start, media..., maybe stop) in
    real time, ``per_frame`` media messages every 20 ms (2 for a stream of both tracks); stop after
    ``for_s`` seconds of media when given.  Returns the media messages sent."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    sent = 0
    for i, msg in enumerate(messages):
        if i >= 2:
            delay = t0 + (i - 2) // per_frame * FRAME_S - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if for_s is not None and loop.time() - t0 > for_s:
                break
        await ws.send(msg)
        sent += '"event":"media"' in msg
    return sent
