"""The HTTP doors: what every request passes before its handler runs (``doors``, installed by ``api.app.make_app``).

In order, for every route, the WebSocket upgrade at ``/api/media/telnyx`` included:

1. **Host** (DNS rebinding): a ``Host`` header that ``settings.allowed_hosts`` does not allow gets
   421 Misdirected Request.  An entry ``name`` allows ``name`` and ``name:<port the connection came
   in on>``; ``name:port`` allows only that; ``.example.com`` allows ``example.com`` and its
   subdomains; ``*`` allows any host.  Names compare case-insensitively, one trailing dot ignored.
   Empty list: the loopback names (``127.0.0.1``, ``localhost``, ``[::1]``, and the bound address)
   when the server is bound to a loopback address; any host (with a warning at start-up) when it is
   bound elsewhere.  A
   request without ``Host`` is 400 in HTTP/1.1 (RFC 9112 says so) and passes in HTTP/1.0 (no
   browser sends one).
   ``GET``/``HEAD /healthz`` and ``/readyz`` are exempt: load balancers and container probes address
   a node by an IP or an internal name that is not the public host, and both routes change nothing;
   a rebound page learns that the port is open and whether each storage tier answers, no data.
2. **Content type** (no simple-request CSRF): POST, PUT and PATCH need ``Content-Type:
   application/json`` (charset absent or utf-8), else 415, body or not.  A cross-site page can only
   send ``application/json`` after a CORS preflight, which nothing here answers.
3. **Body size**: a route's limit is declared on its handler with ``@body_limit(n)``; a route that
   declares none takes no body.  ``Content-Length`` over the limit is 413 before anything is read;
   a chunked body is read up to the limit and no further (aiohttp's ``client_max_size`` on a clone
   of the request), then 413.  The handler finds the body already read: ``await request.read()``.
4. **Body time**: the whole body must arrive within ``settings.http_body_timeout_s``, else 408 and
   the connection is closed (not kept to drain a body that does not come).

One deliberate exception to 2-4: a handler marked ``@streamed_body(content_type, max_bytes)`` (today only
``POST /api/accounts/import``, a CSV upload of up to 50 MiB) takes that one content type (charset absent
or utf-8; anything else 415) instead of JSON, and its body is NOT read here: a ``Content-Length`` over
``max_bytes`` is still 413 at once, and the handler streams ``request.content`` itself, counting bytes
against ``max_bytes`` and timing each read (``api.account_import``).  ``text/csv`` is not a
CORS-safelisted type (only the form encodings and ``text/plain`` are), so the CSRF argument of point 2
holds for it too.

Time before the request's headers are complete is bounded by ``api.connections``, not here.  No
CORS headers are added by this or any other module (tests/api/test_http_doors.py checks).  Every
refusal is the API's envelope (``api.envelope``): ``{"success": false, "error": {"code", "message"}}``
with the code of its status (``STATUS_CODES``).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestPayloadError

from api.envelope import STATUS_CODES, error_body
from api.settings import Settings

log = logging.getLogger("switchboard.http")

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
PROBES = frozenset({"/healthz", "/readyz"})  # liveness and readiness: exempt from the Host check
_LIMIT_ATTR = "__switchboard_body_limit__"
_STREAM_ATTR = "__switchboard_streamed_body__"
# A host as it may appear in a Host header (lower-cased): a name or IPv4 address, or an IPv6 one in brackets.
_HOST = re.compile(r"(?P<name>\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(?::(?P<port>[0-9]{1,5}))?")

H = TypeVar("H", bound=Callable[..., Awaitable[web.StreamResponse]])


def body_limit(nbytes: int) -> Callable[[H], H]:
    """Declare the largest body (bytes) the decorated handler's route accepts; others take none."""
    def mark(handler: H) -> H:
        setattr(handler, _LIMIT_ATTR, nbytes)
        return handler
    return mark


def streamed_body(content_type: str, max_bytes: int) -> Callable[[H], H]:
    """Declare that the decorated handler reads its own body, of ``content_type``, at most ``max_bytes``
    (see the module docstring: the handler must enforce the cap and the time itself)."""
    def mark(handler: H) -> H:
        setattr(handler, _STREAM_ATTR, (content_type, max_bytes))
        return handler
    return mark


def _handler(request: web.Request) -> Any:
    handler = request.match_info.handler
    while isinstance(handler, functools.partial):  # a handler bound to its services (api.app.make_app)
        handler = handler.func
    return handler


def route_body_limit(request: web.Request) -> int:
    return int(getattr(_handler(request), _LIMIT_ATTR, 0))


def route_stream(request: web.Request) -> tuple[str, int] | None:
    """``(content type, max bytes)`` when the route streams its own body."""
    return getattr(_handler(request), _STREAM_ATTR, None)


def _split(host: str) -> tuple[str, int | None] | None:
    """``(name, port)`` of a Host value or allowed-hosts entry; ``None`` when it is not one."""
    m = _HOST.fullmatch(host.strip().lower())
    if m is None:
        return None
    name = m["name"][:-1] if m["name"].endswith(".") else m["name"]
    return name, (int(m["port"]) if m["port"] else None)


def is_loopback(bind_host: str) -> bool:
    if bind_host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind_host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """Which ``Host`` headers are served (see the module docstring, point 1).  No I/O."""

    any_host: bool
    names: frozenset[str] = frozenset()  # bare, or with the connection's own port
    exact: frozenset[tuple[str, int]] = frozenset()  # entries that name a port
    suffixes: tuple[str, ...] = ()  # ".example.com" entries, stored without the dot

    @classmethod
    def build(cls, allowed: Sequence[str], bind_host: str) -> HostPolicy:
        """Raises ``ValueError`` on an entry that is not a host, ``host:port``, ``.domain`` or ``*``."""
        if not allowed:
            if not is_loopback(bind_host):
                return cls(True)
            bound = _split(f"[{bind_host}]" if ":" in bind_host.strip("[]") else bind_host)  # e.g. 127.0.0.5
            return cls(False, names=frozenset(LOOPBACK_NAMES) | ({bound[0]} if bound else set()))
        names: set[str] = set()
        exact: set[tuple[str, int]] = set()
        suffixes: list[str] = []
        for entry in allowed:
            if entry.strip() == "*":
                return cls(True)
            wildcard = entry.strip().startswith(".")
            parsed = _split(entry.strip()[1:] if wildcard else entry)
            if parsed is None or (wildcard and parsed[1] is not None):
                raise ValueError(f"allowed_hosts: {entry[:80]!r} is not a host, host:port, .domain or *")
            name, port = parsed
            if wildcard:
                suffixes.append(name)
            elif port is None:
                names.add(name)
            else:
                exact.add((name, port))
        return cls(False, frozenset(names), frozenset(exact), tuple(suffixes))

    def allows(self, host: str, local_port: int | None) -> bool:
        if self.any_host:
            return True
        parsed = _split(host)
        if parsed is None:
            return False
        name, port = parsed
        if (port is None or port == local_port) and name in self.names:
            return True
        if port is not None and (name, port) in self.exact:
            return True
        return any(name == s or name.endswith("." + s) for s in self.suffixes)


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """Whose request this is: the peer's address, or, when the peer is a trusted proxy
    (``settings.trusted_proxies``, addresses or networks), the address that proxy reports.

    ``X-Forwarded-For`` is read from the right: each proxy appends the address it received the
    request from, so the rightmost entry that is not itself a trusted proxy is the client (entries
    further left were written by the client and prove nothing).  A malformed entry there, or none,
    leaves the peer's address.  No trusted proxy (the default): the header is ignored, since any
    client could write it.  Used by the per-address limits that run after the headers (login,
    waiting SSE readers) and by the audit trail; the connection caps before the headers
    (``api.connections``) and the media sockets awaiting ``start`` (a carrier opens many from few
    addresses) see the peer only.
    """

    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def build(cls, trusted: Sequence[str]) -> ClientAddress:
        """Raises ``ValueError`` on an entry that is not an address or a network."""
        return cls(tuple(ipaddress.ip_network(t.strip(), strict=False) for t in trusted))

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def of(self, request: web.Request) -> str:
        peer = request.remote or ""
        if not self.trusted or not self._is_trusted(peer):
            return peer
        hops = [h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For", ())).split(",")][-MAX_HOPS:]
        for hop in reversed(hops):
            try:
                ip = ipaddress.ip_address(hop)
            except ValueError:
                return peer  # a proxy we trust wrote garbage: do not guess past it
            if not any(ip in net for net in self.trusted):
                return str(ip)
        return peer


MAX_HOPS = 16  # X-Forwarded-For entries looked at, from the right


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.Response(body=error_body(STATUS_CODES[status], message), status=status,
                        content_type="application/json", headers=headers or None)


def _local_port(request: web.Request) -> int | None:
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    return sockname[1] if isinstance(sockname, tuple) else None


def _host_refusal(request: web.Request, policy: HostPolicy) -> web.Response | None:
    if policy.any_host or (request.path in PROBES and request.method in ("GET", "HEAD")):
        return None
    host = request.headers.get("Host")
    if host is None:
        if request.version >= (1, 1):
            return _error(400, "an HTTP/1.1 request needs a Host header")
        return None
    if policy.allows(host, _local_port(request)):
        return None
    log.debug("http.host_refused", extra={"host": host[:64], "path": request.path[:64]})
    return _error(421, "misdirected request: this server does not serve that host")


def _content_type_refusal(request: web.Request) -> web.Response | None:
    if request.method not in BODY_METHODS:
        return None
    charset = (request.charset or "utf-8").lower()
    if "Content-Type" not in request.headers or request.content_type != "application/json" or charset != "utf-8":
        return _error(415, "the body must be Content-Type: application/json (utf-8)")
    return None


def _stream_refusal(request: web.Request, content_type: str, max_bytes: int) -> web.Response | None:
    charset = (request.charset or "utf-8").lower()
    if "Content-Type" not in request.headers or request.content_type != content_type or charset != "utf-8":
        return _error(415, f"the body must be Content-Type: {content_type} (utf-8)")
    length = request.content_length
    if length is not None and length > max_bytes:
        return _error(413, f"body too large: {length} bytes, this route takes at most {max_bytes}")
    return None


async def _read_body(request: web.Request, limit: int, within_s: float) -> web.Request | web.StreamResponse:
    """The request with its body read (``limit`` bytes at most, within ``within_s``), or the refusal to send."""
    length = request.content_length
    if length is not None and length > limit:
        return _error(413, f"body too large: {length} bytes, this route takes at most {limit}")
    if not request.body_exists:
        return request
    if limit == 0:
        return _error(413, "this route takes no body")
    bounded = request.clone(client_max_size=limit)
    try:
        async with asyncio.timeout(within_s):
            await bounded.read()
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"body too large: this route takes at most {limit} bytes")
    except (ConnectionError, RequestPayloadError):  # the client left, or broke the body's framing
        return _error(400, "the request body could not be read")
    except TimeoutError:
        resp = _error(408, f"request body not received within {within_s:g} s")
        resp.force_close()
        await resp.prepare(bounded)
        await resp.write_eof()
        request.protocol.force_close()  # no lingering for the rest of a body that is not coming
        return resp
    return bounded


def doors(settings: Settings) -> Middleware:
    """The middleware for an app with ``settings``; raises ``ValueError`` on a bad ``allowed_hosts``."""
    policy = HostPolicy.build(settings.allowed_hosts, settings.host)
    if policy.any_host and not settings.allowed_hosts:
        log.warning("config.any_host", extra={
            "host": settings.host,
            "hint": "bound to a non-loopback address with SWITCHBOARD_ALLOWED_HOSTS empty: any Host header is"
                    " served (DNS rebinding); list the names clients use"})
    body_timeout = settings.http_body_timeout_s

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
        refusal = _host_refusal(request, policy)
        if refusal is not None:
            return refusal
        if request.match_info.http_exception is not None:  # 404 / 405: nothing will read the body
            return await handler(request)
        stream = route_stream(request)
        if stream is not None:
            return _stream_refusal(request, *stream) or await handler(request)
        refusal = _content_type_refusal(request)
        if refusal is not None:
            return refusal
        checked = await _read_body(request, route_body_limit(request), body_timeout)
        if not isinstance(checked, web.Request):
            return checked
        return await handler(checked)

    return middleware
