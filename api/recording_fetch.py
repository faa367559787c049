"""Fetching a call's recording from the URL a Telnyx webhook names, without becoming a way into our
own network (server-side request forgery).

The URL arrives in ``call.recording.saved``, a signed delivery: only Telnyx can send it.  A signature
proves the sender, not that the URL is harmless (a compromised or misconfigured account, a future
payload change), so the fetch trusts nothing in it and checks at three points:

1. **The URL** (``check_url``, I/O free): ``https`` only; no user-info; at most ``MAX_URL_CHARS``; its
   host on the allow-list (exact names, or ``*.suffix`` for any name under a suffix; IP literals are
   never on it, whatever the list says).
2. **Every address the host resolves to** (``address_refusal``): refused when it is not a global
   unicast address: loopback, private (RFC 1918, ULA), link-local (169.254/16 holds the cloud metadata
   services, fe80::/10), shared (100.64/10), multicast, reserved, unspecified, and IPv4-mapped or
   NAT64 forms of those.  ``allow_networks`` names networks trusted in spite of this (empty by
   default; tests put their loopback server there).
3. **The connection**: the resolver (``GuardedResolver``) hands aiohttp only the addresses that passed,
   and aiohttp connects only to what its resolver returned, so a second DNS answer (rebinding) cannot
   slip a private address in between the check and the connection.  No redirects (counted as a
   refusal), no proxy from the environment, no cookies; TLS verified against the host name.

Bounds: the whole fetch ``timeout_s``; connecting ``CONNECT_TIMEOUT_S``; a read that stalls
``READ_IDLE_S``; at most ``max_bytes`` (a larger ``Content-Length`` is refused before a byte is read,
a body that grows past it is cut and refused).  The body streams to a file (SHA-256 on the way), never
into memory.

Errors: ``FetchRefused`` (the policy said no: nothing was connected to, or the answer broke a bound;
final, never retried) and ``FetchFailed`` (network, TLS, an HTTP error status: worth retrying while the
URL is valid).  ``FetchCounters`` counts both, with the reason, and the connections opened.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

log = logging.getLogger("switchboard.recording_fetch")

MAX_URL_CHARS = 4096  # presigned S3 URLs run to about 1,500
CONNECT_TIMEOUT_S = 10.0
READ_IDLE_S = 30.0
CHUNK = 1 << 16

# Special-purpose ranges Python's ``is_global`` admits or that deserve naming anyway.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SHARED = ipaddress.ip_network("100.64.0.0/10")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchRefused(Exception):
    """The policy refused the URL, its addresses or its answer; final."""


class FetchFailed(Exception):
    """The fetch did not complete (network, TLS, HTTP status); may succeed on retry."""


def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    for pattern in allowed:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


def check_url(url: str, allowed_hosts: tuple[str, ...]) -> tuple[str, int]:
    """The URL's (host, port) when it may be fetched; raises ``FetchRefused`` with the reason."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        raise FetchRefused("url_invalid")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise FetchRefused("url_invalid")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise FetchRefused("url_invalid") from None
    if parts.scheme != "https":
        raise FetchRefused("scheme_not_https")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise FetchRefused("url_userinfo")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise FetchRefused("url_invalid")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        raise FetchRefused("host_is_an_address")
    if not _host_allowed(host, allowed_hosts):
        raise FetchRefused("host_not_allowed")
    return host, port or 443


def address_refusal(addr: Address, allow: tuple[Network, ...] = ()) -> str | None:
    """Why ``addr`` must not be connected to, or ``None`` when it may be."""
    if any(addr in net for net in allow if net.version == addr.version):
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return address_refusal(addr.ipv4_mapped, allow) and "ipv4_mapped"
        if addr in _NAT64:
            return address_refusal(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF), allow) and "nat64"
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link_local"  # 169.254.169.254 and fd00:ec2::254 are the metadata services
    if isinstance(addr, ipaddress.IPv4Address) and addr in _SHARED:
        return "shared"
    if addr.is_private:
        return "private"
    if addr.is_multicast:
        return "multicast"
    if addr.is_unspecified or addr.is_reserved or not addr.is_global:
        return "reserved"
    return None


def parse_networks(values: list[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


Lookup = Any  # async (host, port) -> list[(family, address)]


async def system_lookup(host: str, port: int) -> list[tuple[int, str]]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(int(fam), str(sa[0])) for fam, _, _, _, sa in infos]


@dataclass(slots=True)
class FetchCounters:
    fetched: int = 0
    bytes: int = 0
    connections: int = 0  # TCP connections opened (aiohttp's trace)
    refused: dict[str, int] = field(default_factory=dict)  # by reason
    failed: int = 0

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


class GuardedResolver(AbstractResolver):
    """Resolves, then returns only the addresses ``address_refusal`` admits; refuses when none is."""

    def __init__(self, allow: tuple[Network, ...], lookup: Lookup = system_lookup) -> None:
        self.allow = allow
        self.lookup = lookup
        self.last_refusal: str | None = None

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        try:
            found = await self.lookup(host, port)
        except OSError as exc:
            raise OSError(f"cannot resolve {host}: {exc}") from None
        out: list[ResolveResult] = []
        refusal = None
        for fam, text in found:
            addr = ipaddress.ip_address(text.split("%", 1)[0])
            why = address_refusal(addr, self.allow)
            if why is not None:
                refusal = why
                continue
            out.append(ResolveResult(hostname=host, host=str(addr), port=port, family=fam, proto=0,
                                     flags=socket.AI_NUMERICHOST))
        if not out:
            self.last_refusal = refusal or "no_address"
            raise _AddressRefused(self.last_refusal)
        return out

    async def close(self) -> None:
        return None


class _AddressRefused(OSError):
    pass


@dataclass(frozen=True, slots=True)
class Fetched:
    path: Path
    bytes: int
    sha256: str
    content_type: str


class RecordingFetcher:
    """One per node.  ``fetch`` streams a URL to a file under the policy above.  ``aclose`` at shutdown."""

    def __init__(self, *, allowed_hosts: list[str], allow_networks: list[str], max_bytes: int, timeout_s: float,
                 ca_file: str | None = None, lookup: Lookup = system_lookup) -> None:
        self.allowed_hosts = tuple(h.strip().rstrip(".").lower() for h in allowed_hosts if h.strip())
        self.allow = parse_networks(allow_networks)
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.counters = FetchCounters()
        self._ssl = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
        self._lookup = lookup
        self._session: aiohttp.ClientSession | None = None
        self._resolver: GuardedResolver | None = None

    def _client(self) -> tuple[aiohttp.ClientSession, GuardedResolver]:
        if self._session is None or self._resolver is None:
            self._resolver = GuardedResolver(self.allow, self._lookup)
            trace = aiohttp.TraceConfig()

            async def opened(*_: Any) -> None:
                self.counters.connections += 1

            trace.on_connection_create_end.append(opened)
            connector = aiohttp.TCPConnector(resolver=self._resolver, ssl=self._ssl, use_dns_cache=False,
                                             limit=8, force_close=True)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False, trace_configs=[trace],
                                                  cookie_jar=aiohttp.DummyCookieJar())
        return self._session, self._resolver

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def refuse(self, reason: str) -> FetchRefused:
        self.counters.refuse(reason)
        log.warning("recording.fetch_refused", extra={"reason": reason})
        return FetchRefused(reason)

    async def fetch(self, url: str, dest: Path) -> Fetched:
        """Stream ``url`` into ``dest`` (created, replaced); raises ``FetchRefused`` or ``FetchFailed``.
        ``dest`` is removed unless the fetch succeeds."""
        try:
            check_url(url, self.allowed_hosts)
        except FetchRefused as exc:
            raise self.refuse(str(exc)) from None
        session, resolver = self._client()
        timeout = aiohttp.ClientTimeout(total=self.timeout_s, connect=CONNECT_TIMEOUT_S, sock_read=READ_IDLE_S)
        started = time.monotonic()
        try:
            try:
                async with session.get(url, allow_redirects=False, timeout=timeout,
                                       headers={"Accept": "audio/wav, audio/*"}) as r:
                    if 300 <= r.status < 400:
                        raise self.refuse("redirect")
                    if r.status != 200:
                        self.counters.failed += 1
                        raise FetchFailed(f"HTTP {r.status}")
                    length = r.content_length
                    if length is not None and length > self.max_bytes:
                        raise self.refuse("too_large")
                    fetched = await self._stream(r, dest)
            except _AddressRefused as exc:
                raise self.refuse(str(exc)) from None
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, _AddressRefused):
                    raise self.refuse(str(exc.os_error)) from None
                self.counters.failed += 1
                raise FetchFailed(type(exc).__name__) from None
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self.counters.failed += 1
                raise FetchFailed(type(exc).__name__) from None
        except BaseException:
            await asyncio.to_thread(dest.unlink, missing_ok=True)
            raise
        self.counters.fetched += 1
        self.counters.bytes += fetched.bytes
        log.info("recording.fetched", extra={"bytes": fetched.bytes, "ms": round((time.monotonic() - started) * 1000)})
        return fetched

    async def _stream(self, r: aiohttp.ClientResponse, dest: Path) -> Fetched:
        digest = hashlib.sha256()
        size = 0
        f = await asyncio.to_thread(dest.open, "wb")
        try:
            async for chunk in r.content.iter_chunked(CHUNK):
                size += len(chunk)
                if size > self.max_bytes:
                    raise self.refuse("too_large")
                digest.update(chunk)
                await asyncio.to_thread(f.write, chunk)
        finally:
            await asyncio.to_thread(f.close)
        return Fetched(dest, size, digest.hexdigest(), r.headers.get("Content-Type", "audio/wav")[:100])
