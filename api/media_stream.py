"""The Telnyx media-stream WebSocket endpoint: ``/api/media/telnyx``.

A thin adapter: it moves text between the socket and ``TelnyxStreamProtocol`` (sans-I/O) and turns
the protocol's events into calls on the call's ``CallSession``, which owns everything else.  Every
protocol error closes *this* socket with the error's close code and a logged reason.

Admission, in the order a connection meets it:

1. **Pending connections** (upgraded, no ``start`` yet) are capped in total
   (``media_max_pending``) and per remote address (``media_max_pending_per_address``, except the
   ``per_address_exempt`` ones: a local reverse proxy); past either the upgrade is refused with 503
   + ``Retry-After``.  While draining for shutdown, every upgrade is.
2. **The media token** names the call's organisation (``Authenticator.media_org``).  A header token
   (``x-telnyx-streaming-auth-token``) is looked up before the upgrade: unknown, the socket is
   upgraded and closed at once with 1008 (the ``connected`` field does not rescue it).  Without the
   header, ``connected`` must carry the token: the protocol hands it over (``Connected.token``) and
   holds what follows while a task looks it up (``_authenticate``), then releases it, or the socket
   closes with 1008.  A look-up that fails (the database is down) closes with 1013.
3. A pending connection must authenticate and send ``start`` within ``media_start_timeout_s``, or
   it is closed with 1008.
4. At ``start`` the stream takes a **stream slot**: the call (its organisation and call id,
   ``call_key``) must not be live on another socket (1008 ``call already streaming``; the live call
   is untouched; the same call id streamed by another organisation is another call) and at most
   ``max_streams`` calls stream at once (1013, try again later).  So idle or unauthenticated sockets
   never hold a slot.
5. A started stream with no ``media`` message for ``media_idle_timeout_s`` ends with reason
   ``idle_timeout`` (Telnyx sends media continuously while a call is up); its socket closes 1008.

Languages, from the stream URL (checked before the upgrade, 400 otherwise): ``language`` is spoken
on the outbound track (the agent's side) and, by default, on the inbound track too (the consumer on
the phone); ``consumer_language``, when given and different, makes the call **bilingual**: the
inbound track is recognised in it and translated into ``language``, the outbound track recognised
in ``language`` and translated into ``consumer_language`` (``translate_to`` may then be absent or
``consumer_language`` for both directions, or ``none`` for neither).  Without ``consumer_language``
``translate_to`` means what it always did: the one target of the whole call.

One ``StreamWatch`` task checks both deadlines for every stream once per tick (a counter per stream
on the media path, no timer per frame).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING

from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

from api.call_session import CallSession
from api.inline_ws import InlineWebSocketResponse
from api.settings import Settings
from api.speech import Policy
from api.telnyx_protocol import (
    AUTH_FIELD,
    Connected,
    Dtmf,
    Event,
    MarkPlayed,
    Media,
    Started,
    Stopped,
    StreamFailed,
    TelnyxStreamProtocol,
)
from engine.errors import InternalError, Overflow, PolicyViolation, ProtocolError, TryAgainLater
from engine.quota import PerKeyQuota
from pipelines.call_state import CallEvent

if TYPE_CHECKING:
    from api.runtime import Runtime

log = logging.getLogger("switchboard.media")

CLOSE_TIMEOUT_S = 5.0  # the closing handshake; then the transport is aborted


class MediaStream:
    """One Telnyx WebSocket: the protocol state, the sending side, and its call once started."""

    def __init__(self, ws: web.WebSocketResponse, protocol: TelnyxStreamProtocol, remote: str,
                 transport: asyncio.BaseTransport | None) -> None:
        self.ws = ws
        self.protocol = protocol
        self.remote = remote
        self.transport = transport
        self.pending = True  # counted in Admission until it starts or closes
        self.language = "en"  # spoken on the call (?language= on the stream URL): the outbound track's
        self.consumer_language: str | None = None  # ?consumer_language=, when it differs: the inbound track's
        self.target: str | None = None  # ?translate_to= as asked ("none" included); None: the policy's default
        self.bound_call: str | None = None  # a placed call's credential streams only this call_control_id
        self.policy: Policy | None = None  # the organisation's speech policy, read with its media token
        self.session: CallSession | None = None
        self.org_id: uuid.UUID | None = None  # the media token's organisation, once known
        self.auth_task: asyncio.Task[None] | None = None  # looking up the `connected` field's token
        # Set when the stream must end: the call event and its detail, or the protocol error to close with.
        self.ending: tuple[CallEvent, str] | ProtocolError | None = None
        self.opened = time.monotonic()
        self.media_count = 0  # media messages; the watch compares it between ticks
        self.watch_count = -1
        self.watch_since = self.opened
        self.done = asyncio.Event()

    @property
    def stream_id(self) -> str:
        return self.protocol.stream_id

    def unpend(self, admission: Admission) -> None:
        if self.pending:
            self.pending = False
            admission.leave(self.remote)

    @property
    def call_id(self) -> str:
        return self.session.call_id if self.session is not None else ""

    async def send_media(self, pcm: bytes) -> None:
        await self.ws.send_str(self.protocol.media(pcm))

    async def send_mark(self, name: str) -> None:
        await self.ws.send_str(self.protocol.mark(name))

    async def send_clear(self) -> None:
        await self.ws.send_str(self.protocol.clear())


class Admission:
    """Pending (upgraded, not started) connections, in total and per remote address."""

    def __init__(self, max_total: int, max_per_address: int, exempt: frozenset[str] = frozenset()) -> None:
        self.max_total = max_total
        # A reverse proxy on this host (``exempt``) speaks for all its clients: no per-address cap.
        self.by_address = PerKeyQuota(max_per_address, exempt)
        self.total = 0
        self.refused = 0

    def enter(self, address: str) -> str | None:
        """Count a pending connection; the refusal reason when a cap is reached."""
        if self.total >= self.max_total:
            self.refused += 1
            return f"too many connections awaiting start ({self.max_total})"
        if not self.by_address.take(address):
            self.refused += 1
            return f"too many connections awaiting start from one address ({self.by_address.limit})"
        self.total += 1
        return None

    def leave(self, address: str) -> None:
        self.total -= 1
        self.by_address.give(address)


async def telnyx_media(rt: Runtime, request: web.Request) -> web.StreamResponse:
    """The route handler (bound to the node's ``Runtime`` by ``api.app.make_app``)."""
    s = rt.settings
    if rt.draining:
        raise web.HTTPServiceUnavailable(text="server shutting down", headers={"Retry-After": "1"})
    language, consumer_language, target = _languages(rt, request)
    # The peer, not whom a proxy names (api.middleware.ClientAddress): a carrier opens many streams from
    # few addresses, so behind a proxy its sockets share the proxy's exempt address as before.
    remote = request.remote or "?"
    refused = rt.admission.enter(remote)
    if refused is not None:
        log.warning("stream.refused", extra={"reason": refused, "remote": remote})
        raise web.HTTPServiceUnavailable(text=refused, headers={"Retry-After": "1"})
    header_token = request.headers.get(AUTH_FIELD)
    protocol = TelnyxStreamProtocol(
        authenticated=header_token is not None,  # if unknown, the socket is closed below before any message
        reorder_window=s.reorder_window,
        max_message_bytes=s.max_message_bytes,
    )
    # decode_text=False: text frames arrive as bytes and orjson validates the UTF-8 itself (invalid
    # UTF-8 is then a 1007 from the protocol), sparing a decode per frame.  compress=False: deflate
    # buys nothing on base64 audio and costs CPU on every frame.  Messages are handled inline (see
    # api.inline_ws): the handler task below only wakes to close the socket.
    ws = InlineWebSocketResponse(on_message=lambda msg: _on_message(rt, stream, msg),
                                 max_msg_size=s.max_message_bytes, autoping=True, heartbeat=None,
                                 decode_text=False, compress=False, timeout=CLOSE_TIMEOUT_S)
    stream = MediaStream(ws, protocol, remote, request.transport)  # bound before any message arrives
    stream.language, stream.consumer_language, stream.target = language, consumer_language, target
    event, detail = CallEvent.HANGUP, ""
    try:
        if header_token is not None:
            stream.org_id, stream.policy = await _media_org(rt, stream, header_token)
            if stream.org_id is None:
                await ws.prepare(request)
                raise PolicyViolation("stream auth token unknown")
        await ws.prepare(request)
        rt.streams.add(stream)
        event, detail = await _run(rt, stream)
    except ProtocolError as exc:
        event, detail = CallEvent.PROTOCOL_ERROR, f"{exc.close_code}: {exc.reason}"
        if isinstance(exc, InternalError):
            event = CallEvent.INTERNAL_ERROR
        log.warning("stream.protocol_error", extra={
            "stream_id": stream.stream_id or None, "call_id": stream.call_id or None,
            "close_code": exc.close_code, "reason": exc.reason[:200], "remote": remote})
        await close_ws(stream, exc.close_code, exc.reason[:120].encode())
    finally:
        if stream.auth_task is not None:
            stream.auth_task.cancel()
        rt.streams.discard(stream)
        stream.unpend(rt.admission)
        if stream.session is not None:
            if isinstance(stream.ending, tuple):  # a stop, a deadline or shutdown: its reason wins
                event, detail = stream.ending
            stream.session.end(event, detail)
            await asyncio.shield(stream.session.finish())
        stream.done.set()
    return ws


async def _media_org(rt: Runtime, stream: MediaStream, token: str) -> tuple[uuid.UUID | None, Policy | None]:
    """The token's organisation and its speech policy (a placed call's credential also binds the stream
    to its call: ``stream.bound_call``); ``TryAgainLater`` (1013) when the token cannot be looked up now."""
    try:
        org, stream.bound_call = await rt.auth.media_credential(token)
    except Exception as exc:  # the hot tier is down: the carrier retries the stream later
        log.warning("stream.auth_unavailable", extra={"error": type(exc).__name__})
        raise TryAgainLater("stream auth token cannot be checked now") from None
    return org, (await rt.policies.get(org) if org is not None else None)


async def _authenticate(rt: Runtime, stream: MediaStream, token: str) -> None:
    """Look up the `connected` field's token, then release (or refuse) what the protocol held."""
    try:
        stream.org_id, stream.policy = await _media_org(rt, stream, token)
        if stream.ending is not None:
            return
        _dispatch(rt, stream, stream.protocol.authenticated(stream.org_id is not None))
        if stream.ending is not None:  # a `stop` was among the held messages: wake the handler
            rt.watch.expire(stream, stream.ending)
    except ProtocolError as exc:
        if stream.ending is None:
            rt.watch.expire(stream, exc)  # closes the socket, which wakes the handler
    except Exception as exc:  # a bug must close this stream, not vanish with the task
        log.exception("stream.internal_error", extra={"stream_id": stream.stream_id or None})
        if stream.ending is None:
            rt.watch.expire(stream, InternalError(f"internal error: {type(exc).__name__}"))


async def close_ws(stream: MediaStream, code: int, message: bytes) -> None:
    """Close the socket; a peer that does not read cannot hold us: past the deadline it is cut."""
    try:
        await asyncio.wait_for(stream.ws.close(code=code, message=message), CLOSE_TIMEOUT_S)
    except TimeoutError:
        if stream.transport is not None:
            stream.transport.abort()


def _on_message(rt: Runtime, stream: MediaStream, msg: WSMessage) -> bool:
    """Inline path: handle one data message inside data_received.  ``False`` wakes ``_run``."""
    if stream.ending is not None:
        stream.protocol.stats.after_stop += 1  # the stream is closing: what still arrives is counted, dropped
        return True
    try:
        if msg.type is WSMsgType.TEXT:
            events = stream.protocol.receive_text(msg.data)
        else:
            events = stream.protocol.receive_binary(msg.data)
        _dispatch(rt, stream, events)
    except ProtocolError as exc:
        stream.ending = exc
    except Exception as exc:  # a bug must close this stream, not escape into aiohttp's transport
        log.exception("stream.internal_error", extra={"stream_id": stream.stream_id or None})
        stream.ending = InternalError(f"internal error: {type(exc).__name__}")
    return stream.ending is None


async def _run(rt: Runtime, stream: MediaStream) -> tuple[CallEvent, str]:
    """Wait for the stream to end; data messages only reach here when inline handling is off."""
    ws, protocol = stream.ws, stream.protocol
    while stream.ending is None:
        msg = await ws.receive()
        if stream.ending is not None:
            break
        if msg.type is WSMsgType.TEXT:
            _dispatch(rt, stream, protocol.receive_text(msg.data))
        elif msg.type is WSMsgType.BINARY:
            _dispatch(rt, stream, protocol.receive_binary(msg.data))
        elif msg.type is WSMsgType.ERROR:
            exc = ws.exception()
            # aiohttp has already closed the socket with the error's own code (1009 for size).
            code = getattr(exc, "code", None) or ws.close_code or WSCloseCode.INTERNAL_ERROR
            log.warning("stream.ws_error", extra={"stream_id": stream.stream_id or None,
                                                  "close_code": int(code), "reason": str(exc)[:200]})
            return CallEvent.PROTOCOL_ERROR, f"{int(code)}: {str(exc)[:120]}"
        elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            if stream.ending is not None:
                break
            if stream.session is not None:
                for ev in protocol.eof():  # the socket ended without `stop`: deliver what was held back
                    if isinstance(ev, Media):
                        stream.session.media(ev)
            return CallEvent.HANGUP, ""
    ending = stream.ending
    if isinstance(ending, ProtocolError):
        raise ending
    assert ending is not None
    event, detail = ending
    if not ws.closed:
        code, text = _CLOSE.get(event, (WSCloseCode.OK, b"stopped"))
        await close_ws(stream, code, text)
    return event, detail


_CLOSE = {
    CallEvent.IDLE_TIMEOUT: (WSCloseCode.POLICY_VIOLATION, b"idle timeout"),
    CallEvent.SHUTDOWN: (WSCloseCode.GOING_AWAY, b"server shutting down"),
}


def _dispatch(rt: Runtime, stream: MediaStream, events: list[Event]) -> None:
    """Act on protocol events; sets ``stream.ending`` when the stream stopped."""
    session = stream.session
    for ev in events:
        if isinstance(ev, Media):
            stream.media_count += 1
            rt.stats.frames += 1
            if session is not None:
                session.media(ev)
        elif isinstance(ev, Started):
            session = stream.session = _start_call(rt, stream, ev)
        elif isinstance(ev, Connected):
            if ev.token is not None:  # held messages wait for the look-up
                stream.auth_task = asyncio.get_running_loop().create_task(
                    _authenticate(rt, stream, ev.token), name="stream-auth")
        elif isinstance(ev, Stopped):
            stream.ending = (CallEvent.STOP, ev.reason)
        elif isinstance(ev, Dtmf):
            if session is not None:
                session.dtmf(ev)
        elif isinstance(ev, StreamFailed):
            log.warning("stream.telnyx_error", extra={"stream_id": stream.stream_id or None,
                                                      "code": ev.code, "detail": ev.detail})
        elif isinstance(ev, MarkPlayed):
            log.debug("stream.mark", extra={"stream_id": stream.stream_id, "mark": ev.name})


def _start_call(rt: Runtime, stream: MediaStream, ev: Started) -> CallSession:
    """Claim a stream slot and the call id, then start the call; raises when either is refused."""
    if stream.org_id is None:  # the protocol lets no `start` through before authentication
        raise PolicyViolation("stream auth token missing")
    if stream.bound_call is not None and ev.call_control_id != stream.bound_call:
        raise PolicyViolation("this stream credential belongs to another call")
    policy = stream.policy or rt.policies.node
    consumer = stream.consumer_language
    if consumer is None:
        session = CallSession(rt, stream, ev, stream.org_id, language=stream.language,
                              target=call_target(rt, stream.language, stream.target, policy), policy=policy)
    else:  # bilingual: each side translated into the other's language, unless "none"
        both = stream.target != "none"
        session = CallSession(rt, stream, ev, stream.org_id, language=stream.language,
                              target=call_target(rt, stream.language, consumer if both else "none", policy),
                              policy=policy, consumer_language=consumer,
                              consumer_target=call_target(rt, consumer, stream.language if both else "none", policy))
    refused = rt.calls.claim(session)
    if refused == "call already streaming":
        raise PolicyViolation(refused)
    if refused is not None:
        raise TryAgainLater(refused)
    stream.unpend(rt.admission)  # no longer pending: it holds a stream slot now
    try:
        session.start()
    except Overflow as exc:
        rt.calls.release(session)
        stream.session = None
        raise TryAgainLater(str(exc)) from None
    except BaseException:
        rt.calls.release(session)
        raise
    stream.media_count += 1  # start counts as activity for the idle deadline
    return session


def _languages(rt: Runtime, request: web.Request) -> tuple[str, str | None, str | None]:
    """The call's language, the consumer's when it differs (``None``: the same), and the translation
    target the stream URL asks for (``None``: the organisation's default, known only once its media
    token is), checked before the upgrade (see the module docstring)."""
    s = rt.settings
    language = request.query.get("language", s.languages[0])
    if language not in s.languages:
        raise web.HTTPBadRequest(text=f"language must be one of {s.languages}")
    consumer = request.query.get("consumer_language") or None
    if consumer is not None and consumer not in s.languages:
        raise web.HTTPBadRequest(text=f"consumer_language must be one of {s.languages}")
    if consumer == language:
        consumer = None
    asked = request.query.get("translate_to") or None
    if consumer is not None:
        if asked not in (None, "none", consumer):
            raise web.HTTPBadRequest(text="translate_to of a bilingual call must be 'none' or its consumer_language")
    elif asked is not None and asked != "none" and (asked not in s.languages or asked == language):
        raise web.HTTPBadRequest(text=f"translate_to must be 'none' or another of {s.languages}")
    return language, consumer, asked


def call_target(rt: Runtime, language: str, asked: str | None, policy: Policy) -> str | None:
    """What a call's finals are translated into: what was asked, else the organisation's choice for
    the language; none when that is "none", not a served language, the call's own, or when no
    translator is configured."""
    target = asked or policy.translate_to.get(language)
    if target is None or target == "none" or target == language or target not in rt.settings.languages:
        return None
    return target if rt.translation is not None else None


class StreamWatch:
    """Enforces the start and idle deadlines of every stream, once per ``tick`` seconds."""

    def __init__(self, streams: set[MediaStream], s: Settings) -> None:
        self.streams = streams
        self.start_timeout = s.media_start_timeout_s
        self.idle_timeout = s.media_idle_timeout_s
        self.tick = max(0.05, min(1.0, self.start_timeout / 4, self.idle_timeout / 4))
        self.expired_start = 0
        self.expired_idle = 0
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="stream-watch")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            self.check(time.monotonic())

    def check(self, now: float) -> None:
        for stream in list(self.streams):
            if stream.ending is not None:
                continue
            if stream.session is None:
                if now - stream.opened > self.start_timeout:
                    self.expired_start += 1
                    log.warning("stream.start_timeout", extra={"remote": stream.remote,
                                                               "timeout_s": self.start_timeout})
                    self.expire(stream, PolicyViolation(f"no start within {self.start_timeout:g} s"))
            elif stream.media_count != stream.watch_count:
                stream.watch_count, stream.watch_since = stream.media_count, now
            elif now - stream.watch_since > self.idle_timeout:
                self.expired_idle += 1
                log.warning("stream.idle_timeout", extra={"stream_id": stream.stream_id, "call_id": stream.call_id,
                                                          "idle_s": round(now - stream.watch_since, 1)})
                self.expire(stream, (CallEvent.IDLE_TIMEOUT, f"no media for {self.idle_timeout:g} s"))

    def expire(self, stream: MediaStream, ending: tuple[CallEvent, str] | ProtocolError) -> None:
        """End ``stream`` from outside its handler: mark why, then wake the handler by closing."""
        stream.ending = ending
        if isinstance(ending, ProtocolError):
            code, text = ending.close_code, ending.reason[:120].encode()
        else:
            code, text = _CLOSE.get(ending[0], (WSCloseCode.OK, b"stopped"))
        task = asyncio.get_running_loop().create_task(close_ws(stream, code, text), name="stream-expire")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


async def drain_streams(rt: Runtime, grace_s: float) -> int:
    """Shutdown: end every stream with ``server_shutdown`` and wait (bounded) for their calls to finish.

    Returns how many streams had not finished within ``grace_s``.
    """
    streams = list(rt.streams)
    for stream in streams:
        if stream.ending is None:
            rt.watch.expire(stream, (CallEvent.SHUTDOWN, ""))
    if not streams:
        return 0
    waits = [asyncio.ensure_future(s.done.wait()) for s in streams]
    _, pending = await asyncio.wait(waits, timeout=grace_s)
    for w in pending:
        w.cancel()
    return len(pending)
