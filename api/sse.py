"""``GET /api/calls/{call_id}/events``: a call's events as Server-Sent Events; ``POST
/api/calls/{call_id}/sse-token``: a short-lived token for an EventSource that cannot send a header.

* Who may watch: a principal with ``calls.watch`` (``Authenticator.sse_principal``): the session
  cookie ``sb_session``, ``Authorization: Bearer`` (an API key or a session token), or
  ``?access_token=sbs_...`` minted by the ``sse-token`` route for exactly this call (at most 5
  minutes).  None, an unknown or expired one, or a token of another call: 401 (the envelope).  The
  call is looked up in the principal's organisation (``api.call_session.call_key``): another
  tenant's call is, to this door, a call that has not started, and never delivers its events.  The
  access token is never logged (nothing here logs the query string).
* ``POST /api/calls/{call_id}/sse-token`` (``calls.watch``; body ``{}`` or ``{"ttl_s": n}``, 1 <= n
  <= 300, default 300) answers ``{"token", "expires_in", "url"}``; the call need not have started.
  Each token is a warm-tier key while it lives, so minting is limited per credential like a REST
  write (``rate_write_per_min``; 429 with ``Retry-After``).

* ``text/event-stream``; every event has an ``id:`` (per-call, increasing); ``retry:`` is sent first.
* ``Last-Event-ID`` (header, or ``?last_event_id=`` for clients that cannot set headers) replays the
  events after it from the call's bounded history; if some fell off the history a ``stream.gap``
  event says how many ids were lost before the replay.
* A comment line is sent every ``sse_heartbeat_s`` of silence so proxies keep the connection.
* A subscriber may connect before the call's stream starts; it receives the call's events from
  ``call.started`` on.
* After ``call.ended`` the response ends.  A client reconnecting to an ended call with nothing left
  to replay gets 204, which tells EventSource to stop reconnecting.
* A client too slow to take its finals is cut (see ``api.hub``) and resumes by reconnecting.  So is
  one that stops reading: when the response's transport buffer stays over its high-water mark
  (64 KiB) for ``sse_write_timeout_s`` the connection is aborted.  With the socket's send buffer set
  to ``sse_send_buffer_bytes``, what a stuck reader pins is bounded by those, plus its queue.
* A subscription to a call with no channel yet waits for it, within ``sse_max_pending`` such
  subscriptions in all and ``sse_max_pending_per_address`` per client address (not for the
  ``per_address_exempt`` ones: a local reverse proxy); past them: 503 with ``Retry-After``.
  Waiting subscriptions never take a slot a new call needs (``api.hub``).
* 400 for a call id that is not 1-128 characters of ``[A-Za-z0-9:_-.]`` and for a ``Last-Event-ID``
  (or ``last_event_id``) that is not 1-18 ASCII digits; an empty one counts as absent.
* One user or API key holds at most ``sse_max_per_principal`` event streams open at once on a node
  (however it presents itself: cookie, Bearer or SSE tokens it minted); past it 429 with
  ``Retry-After``, so an authenticated client cannot take every socket and buffer of the node.
* A call whose media stream is on another node is served from the Redis event bus (``api.relay``)
  under the owning node's ids, so a client may reconnect to any node; remote viewers get final and
  lifecycle events, not partials.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from api.auth import SSE_TOKEN_MAX_TTL_S, require
from api.call_session import call_key
from api.envelope import ApiError, ok
from api.middleware import body_limit
from engine.errors import Overflow
from engine.ids import ID

if TYPE_CHECKING:
    from api.runtime import Runtime

log = logging.getLogger("switchboard.sse")

CALL_ID = ID  # the platform-wide id rule (engine.ids): what a media stream may start, SSE may watch
# Plain ASCII decimal only: int() would also take "1_000", " 7" and other scripts' digits ("٣").
EVENT_ID = re.compile(r"[0-9]{1,18}")
WAITING_CHECK_S = 1.0


def _last_event_id(request: web.Request) -> int:
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or "0"
    if not EVENT_ID.fullmatch(raw):
        raise web.HTTPBadRequest(text=f"Last-Event-ID must be an event id (1-18 digits 0-9), got {raw[:20]!r}")
    return int(raw)


def _bound_send_buffer(request: web.Request, size: int) -> None:
    """Cap the kernel's send buffer of this response's socket: what a reader that stops reading pins."""
    sock = request.transport.get_extra_info("socket") if size and request.transport is not None else None
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        except OSError:
            pass  # not a TCP socket (a test transport): the write timeout still bounds the wait


async def _send(request: web.Request, resp: web.StreamResponse, data: bytes, within_s: float) -> None:
    """Write ``data`` and wait while the transport's buffer is over its high-water mark (aiohttp's own
    write waits only every 64 KiB); ``TimeoutError`` when that lasts ``within_s`` seconds."""
    async with asyncio.timeout(within_s):
        await resp.write(data)
        await request.writer.drain()


async def call_events(rt: Runtime, request: web.Request) -> web.StreamResponse:
    """The route handler (bound to the node's ``Runtime`` by ``api.app.make_app``)."""
    call_id = request.match_info["call_id"]
    if not CALL_ID.fullmatch(call_id):
        raise web.HTTPBadRequest(text="call_id must be 1-128 characters of [A-Za-z0-9:_-.]")
    principal = await rt.auth.sse_principal(request, call_id)
    if principal is None:
        raise ApiError("unauthenticated", "send Authorization: Bearer <API key or session token>, the session"
                                          " cookie, or ?access_token= minted for this call")
    if not principal.can("calls.watch"):
        raise ApiError("forbidden", f"role {principal.role.value} may not calls.watch")
    key = call_key(principal.org_id, call_id)
    last_id = _last_event_id(request)
    existing = rt.hub.get(key)
    if existing is not None and existing.ended_at is not None and last_id >= existing.last_id:
        return web.Response(status=204)
    holder = f"{principal.org_id.hex}/{principal.subject}"  # one user or API key, however it signed in
    if not rt.sse_held.take(holder):
        raise ApiError("rate_limited", f"at most {rt.sse_held.limit} event streams open at once per user or key",
                       headers={"Retry-After": "5"})
    try:
        return await _serve(rt, request, call_id, key, last_id)
    finally:
        rt.sse_held.give(holder)


async def _serve(rt: Runtime, request: web.Request, call_id: str, key: str, last_id: int) -> web.StreamResponse:
    """Subscribe to the call's channel (``key``: the call in the caller's organisation) and stream it."""
    relay = rt.relay if key not in rt.calls else None  # not on this node (yet): watch the bus too
    try:
        if relay is not None:
            relay.watch(key)
        remote = rt.client_address(request)
        owner = None if remote in rt.settings.per_address_exempt else remote
        channel, sub = rt.hub.subscribe(key, owner=owner)
    except Overflow as exc:
        if relay is not None:
            relay.unwatch(key)
        raise web.HTTPServiceUnavailable(text=str(exc), headers={"Retry-After": "5"}) from None
    resp = web.StreamResponse(headers={
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
    })
    rt.stats.sse_clients += 1
    timeout = rt.settings.sse_write_timeout_s
    sent = last_id
    try:
        _bound_send_buffer(request, rt.settings.sse_send_buffer_bytes)
        await resp.prepare(request)
        await _send(request, resp, b"retry: %d\n\n" % rt.settings.sse_retry_ms, timeout)
        replay, gap = channel.replay_after(last_id)
        if gap:
            first = replay[0].id if replay else channel.last_id + 1
            gap_event = b'event: stream.gap\ndata: {"lost_from":%d,"lost_to":%d}\n\n' % (last_id + 1, first - 1)
            await _send(request, resp, gap_event, timeout)
        ended = False
        for ev in replay:
            await _send(request, resp, ev.encode(), timeout)
            sent = ev.id
            ended = ended or ev.event == "call.ended"
        heartbeat_s, quiet_s = rt.settings.sse_heartbeat_s, 0.0
        while not ended:
            # aiohttp tells a handler nothing when its client leaves; a write finds out.  A reader of
            # a call looks at least every heartbeat; one still waiting for its call, whose slot is
            # capped, every WAITING_CHECK_S so that a departed one frees it soon.
            wait_s = min(WAITING_CHECK_S, heartbeat_s) if sub.waiting else heartbeat_s
            batch = await sub.next_batch(wait_s)
            if sub.overflowed:
                log.info("sse.client_cut", extra={"call_id": call_id, "last_sent": sent})
                break
            if sub.closed and not batch:
                break
            if not batch:
                if request.transport is None:
                    break  # the client left
                quiet_s += wait_s
                if quiet_s >= heartbeat_s:
                    quiet_s = 0.0
                    await _send(request, resp, b": heartbeat\n\n", timeout)
                continue
            quiet_s = 0.0
            chunk = bytearray()
            for ev in batch:
                if ev.id > sent:  # skip what the replay already delivered
                    chunk += ev.encode()
                    sent = ev.id
                    ended = ended or ev.event == "call.ended"
            if chunk:
                await _send(request, resp, bytes(chunk), timeout)
        # Here rather than in aiohttp after we return: its write_eof would wait on a stuck reader forever.
        async with asyncio.timeout(timeout):
            await resp.write_eof()
    except TimeoutError:  # the reader stopped reading: cut it; it may resume with Last-Event-ID
        log.info("sse.client_stuck", extra={"call_id": call_id, "last_sent": sent, "timeout_s": timeout})
        if request.transport is not None:
            request.transport.abort()  # not close(): that would wait for a buffer that never drains
    except (ConnectionResetError, ConnectionError):
        pass  # the client left; nothing to deliver to
    finally:
        rt.hub.unsubscribe(channel, sub)
        if relay is not None:
            relay.unwatch(key)
        rt.stats.sse_clients -= 1
    return resp


@body_limit(1024)
async def sse_token(rt: Runtime, request: web.Request) -> web.Response:
    """``POST /api/calls/{call_id}/sse-token`` (see the module docstring)."""
    call_id = request.match_info["call_id"]
    if not CALL_ID.fullmatch(call_id):
        raise ApiError("bad_request", "call_id must be 1-128 characters of [A-Za-z0-9:_-.]")
    principal = await require(rt.auth, request, "calls.watch")
    if rt.tiers is not None:  # each token is a warm-tier key for 5 minutes: bounded per credential
        limit = rt.settings.rate_write_per_min
        d = await rt.tiers.warm.hit_rate_limit(
            f"api:{principal.org_id}:{principal.kind}:{principal.subject}:sse_token", limit, 60)
        if not d.allowed:
            raise ApiError("rate_limited", f"at most {limit} requests a minute to sse_token",
                           headers={"Retry-After": str(d.reset_s)})
    ttl_s = SSE_TOKEN_MAX_TTL_S
    body = await request.read()
    if body.strip():
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ApiError("bad_request", "the body is not valid JSON") from None
        if not isinstance(data, dict) or set(data) - {"ttl_s"}:
            raise ApiError("validation_failed", "the body is {} or {\"ttl_s\": n}",
                           [{"field": "body", "message": "only ttl_s is accepted"}])
        raw = data.get("ttl_s", SSE_TOKEN_MAX_TTL_S)
        if type(raw) is not int or not 1 <= raw <= SSE_TOKEN_MAX_TTL_S:
            raise ApiError("validation_failed", f"ttl_s must be an integer in 1..{SSE_TOKEN_MAX_TTL_S}",
                           [{"field": "ttl_s", "message": f"an integer in 1..{SSE_TOKEN_MAX_TTL_S}"}])
        ttl_s = raw
    token = await rt.auth.mint_sse_token(principal, call_id, ttl_s)
    return ok({"token": token, "expires_in": ttl_s,
               "url": f"/api/calls/{call_id}/events?access_token={token}"})
