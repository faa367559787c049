"""``GET /api/calls/{call_id}/events``: a call's events as Server-Sent Events.

* ``text/event-stream``; every event has an ``id:`` (per-call, increasing); ``retry:`` is sent first.
* ``Last-Event-ID`` (header, or ``?last_event_id=`` for clients that cannot set headers) replays the
  events after it from the call's bounded history; if some fell off the history a ``stream.gap``
  event says how many ids were lost before the replay.
* A comment line is sent every ``sse_heartbeat_s`` of silence so proxies keep the connection.
* A subscriber may connect before the call's stream starts; it receives the call's events from
  ``call.started`` on.
* After ``call.ended`` the response ends.  A client reconnecting to an ended call with nothing left
  to replay gets 204, which tells EventSource to stop reconnecting.
* A client too slow to take its finals is cut (see ``api.hub``) and resumes by reconnecting.
* A call whose media stream is on another node is served from the Redis event bus (``api.relay``)
  under the owning node's ids, so a client may reconnect to any node; remote viewers get final and
  lifecycle events, not partials.
"""

from __future__ import annotations

import logging
import re

from aiohttp import web

from api.runtime import RUNTIME
from engine.errors import Overflow

log = logging.getLogger("switchboard.sse")

CALL_ID = re.compile(r"^[A-Za-z0-9:_\-.]{1,256}$")


def _last_event_id(request: web.Request) -> int:
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or "0"
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"Last-Event-ID must be an integer event id, got {raw[:40]!r}") from None
    if value < 0:
        raise web.HTTPBadRequest(text="Last-Event-ID must be >= 0")
    return value


async def call_events(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    call_id = request.match_info["call_id"]
    if not CALL_ID.match(call_id):
        raise web.HTTPBadRequest(text="call_id must be 1-256 characters of [A-Za-z0-9:_-.]")
    last_id = _last_event_id(request)
    existing = rt.hub.get(call_id)
    if existing is not None and existing.ended_at is not None and last_id >= existing.last_id:
        return web.Response(status=204)
    relay = rt.relay if call_id not in rt.calls else None  # not on this node (yet): watch the bus too
    try:
        if relay is not None:
            relay.watch(call_id)
        channel, sub = rt.hub.subscribe(call_id)
    except Overflow as exc:
        if relay is not None:
            relay.unwatch(call_id)
        raise web.HTTPServiceUnavailable(text=str(exc), headers={"Retry-After": "5"}) from None
    resp = web.StreamResponse(headers={
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
    })
    rt.stats.sse_clients += 1
    try:
        await resp.prepare(request)
        await resp.write(b"retry: %d\n\n" % rt.settings.sse_retry_ms)
        replay, gap = channel.replay_after(last_id)
        if gap:
            first = replay[0].id if replay else channel.last_id + 1
            gap_event = b'event: stream.gap\ndata: {"lost_from":%d,"lost_to":%d}\n\n' % (last_id + 1, first - 1)
            await resp.write(gap_event)
        sent = last_id
        ended = False
        for ev in replay:
            await resp.write(ev.encode())
            sent = ev.id
            ended = ended or ev.event == "call.ended"
        while not ended:
            batch = await sub.next_batch(rt.settings.sse_heartbeat_s)
            if sub.overflowed:
                log.info("sse.client_cut", extra={"call_id": call_id, "last_sent": sent})
                break
            if sub.closed and not batch:
                break
            if not batch:
                await resp.write(b": heartbeat\n\n")
                continue
            chunk = bytearray()
            for ev in batch:
                if ev.id > sent:  # skip what the replay already delivered
                    chunk += ev.encode()
                    sent = ev.id
                    ended = ended or ev.event == "call.ended"
            if chunk:
                await resp.write(bytes(chunk))
    except (ConnectionResetError, ConnectionError):
        pass  # the client left; nothing to deliver to
    finally:
        rt.hub.unsubscribe(channel, sub)
        if relay is not None:
            relay.unwatch(call_id)
        rt.stats.sse_clients -= 1
    return resp
