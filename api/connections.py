"""Connections that have not sent a request yet: a deadline, and a cap per remote address.

aiohttp 3.14 bounds nothing before a request's headers are complete: its only timer there is the
keep-alive one (``keepalive_timeout``), which it arms when the connection opens and re-arms after each
response, and which closes the connection only while the handler waits for a request.  A client that
sends half a request line, or trickles one header byte a second, is held until that timer (3630 s by
default; ``settings.http_keepalive_timeout_s`` here), and as many such sockets as it likes.

``ConnectionGuard`` adds, per connection and only before its first request:

* a deadline, ``header_timeout_s`` from accept: if the first request's headers are not complete by
  then the client gets ``408`` and the connection is closed, however busily it trickles bytes;
* a cap, ``max_per_address`` such connections per remote address: one more is answered ``503`` and
  closed at once, so a flood of idle sockets from one address cannot take the file descriptors other
  clients need (the whole flood is closed by the deadline anyway).  Addresses in ``exempt`` (by
  default loopback, where deploy/nginx.conf's proxy connects from, speaking for every client) have
  no cap, only the deadline.

Between requests on a keep-alive connection aiohttp's own keep-alive timer applies (idle, or trickling
the next request: closed after ``http_keepalive_timeout_s``).

How, and why it costs nothing on the media path: ``install`` wraps three hooks of aiohttp's
``web.Server``, the object every connection's ``RequestHandler`` reports to: ``connection_made`` (arm
the deadline, count the address), ``connection_lost`` (disarm, uncount) and ``request_factory``, which
``RequestHandler`` calls once per request after its headers are parsed (disarm on the first).  They
run once per connection and once per HTTP request; nothing touches ``data_received``, so a WebSocket
frame (the Telnyx media path) or an SSE write costs exactly what it did.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from engine.quota import PerKeyQuota


def _raw_response(status: str, message: str, *headers: str) -> bytes:
    body = b'{"error":"%s"}' % message.encode()
    head = [f"HTTP/1.1 {status}", "Content-Type: application/json", f"Content-Length: {len(body)}",
            "Connection: close", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


REQUEST_TIMEOUT = _raw_response("408 Request Timeout", "request headers not received in time")
TOO_MANY = _raw_response("503 Service Unavailable", "too many connections from this address without a request",
                         "Retry-After: 1")


class ConnectionGuard:
    """See the module docstring.  ``install`` it on the runner's server before the site starts."""

    def __init__(self, *, header_timeout_s: float, max_per_address: int, exempt: Iterable[str] = ()) -> None:
        self.header_timeout_s = header_timeout_s
        # Addresses in ``exempt`` have no cap of their own (a local reverse proxy).
        self._by_address = PerKeyQuota(max_per_address, exempt)
        self._waiting: dict[RequestHandler, tuple[str, asyncio.TimerHandle]] = {}
        self.timed_out = 0  # closed at the deadline
        self.refused = 0  # refused over the per-address cap

    def stats(self) -> dict[str, int]:
        return {"waiting": len(self._waiting), "addresses": len(self._by_address),
                "timed_out": self.timed_out, "refused": self.refused}

    def install(self, server: web.Server) -> None:
        """Wrap ``server``'s connection hooks; call before it accepts a connection (``site.start``)."""
        loop = asyncio.get_running_loop()
        made, lost, make_request = server.connection_made, server.connection_lost, server.request_factory

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            self._admit(loop, handler, transport)

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            self._release(handler)
            lost(handler, exc)

        def request_factory(message: Any, payload: Any, protocol: RequestHandler, writer: Any, task: Any) -> Any:
            self._release(protocol)  # its (first) request's headers are complete
            return make_request(message, payload, protocol, writer, task)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]
        server.request_factory = request_factory

    def _admit(self, loop: asyncio.AbstractEventLoop, handler: RequestHandler, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) else str(peer or "")
        if not self._by_address.take(address):
            self.refused += 1
            transport.write(TOO_MANY)
            # Not now: the handler's own connection_made goes on after this hook to start its task,
            # which must see the connection open once, or it fails an assertion when it first runs.
            loop.call_soon(handler.force_close)
            return
        self._waiting[handler] = (address, loop.call_later(self.header_timeout_s, self._expire, handler))

    def _release(self, handler: RequestHandler) -> bool:
        entry = self._waiting.pop(handler, None)
        if entry is None:
            return False
        address, timer = entry
        timer.cancel()
        self._by_address.give(address)
        return True

    def _expire(self, handler: RequestHandler) -> None:
        if not self._release(handler):
            return
        self.timed_out += 1
        if handler.transport is not None:
            handler.transport.write(REQUEST_TIMEOUT)
        handler.force_close()


CONNECTION_GUARD = web.AppKey("connection_guard", ConnectionGuard)
