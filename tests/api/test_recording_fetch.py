"""The recording fetch as an attacker would aim it: URLs and DNS answers that point into our own network.

A real TLS server on loopback stands for the recording host and counts every TCP connection it
accepts; the fetcher's own trace counts every connection it opens.  Names resolve through a table
(the fetcher takes its resolver as a parameter), so one test can have an allow-listed name resolve to
loopback, a private range, the metadata address or an IPv4-mapped loopback, as a hostile DNS server
would, with no real DNS.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from api.recording_fetch import FetchFailed, FetchRefused, RecordingFetcher, address_refusal, check_url
from tests.fakes.tls import self_signed
from tests.servers import free_port

HOSTS = ["*.telnyx.test", "rec.example.test"]
BODY = bytes(range(256)) * 4096  # 1 MiB


class Recordings:
    """An HTTPS server on 127.0.0.1 counting accepted connections and requests."""

    def __init__(self, tmp: Path) -> None:
        self.cert = self_signed(tmp / "tls", ["rec.telnyx.test", "lo.telnyx.test", "mixed.telnyx.test",
                                              "rec.example.test"])
        self.port = free_port()
        self.connections = 0
        self.requests: list[str] = []

    async def handler(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        if request.path == "/redirect":
            raise web.HTTPFound(f"https://rec.telnyx.test:{self.port}/ok.wav")
        if request.path == "/missing":
            raise web.HTTPForbidden()
        if request.path == "/chunked-huge":
            r = web.StreamResponse()
            await r.prepare(request)
            for _ in range(64):
                await r.write(b"\0" * 65536)
            await r.write_eof()
            return r
        return web.Response(body=BODY, content_type="audio/wav")

    async def __aenter__(self) -> Recordings:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handler)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        factory = self.runner.server
        assert factory is not None

        def counting() -> asyncio.BaseProtocol:
            self.connections += 1  # every accepted TCP connection, before TLS
            return factory()  # type: ignore[no-any-return]

        self.listener = await asyncio.get_running_loop().create_server(
            counting, "127.0.0.1", self.port, ssl=self.cert.server_context())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.listener.close()
        await self.runner.cleanup()


DNS = {
    "rec.telnyx.test": ["127.0.0.1"],  # trusted only where the test allows 127.0.0.1/32
    "lo.telnyx.test": ["127.0.0.1"],
    "private.telnyx.test": ["10.20.30.40"],
    "metadata.telnyx.test": ["169.254.169.254"],
    "shared.telnyx.test": ["100.64.1.1"],
    "mapped.telnyx.test": ["::ffff:127.0.0.1"],
    "ula.telnyx.test": ["fd00:ec2::254"],
    "mixed.telnyx.test": ["169.254.169.254", "10.0.0.1", "127.0.0.1"],
    "rec.example.test": ["127.0.0.1"],
}


def table_lookup(seen: list[str]):  # type: ignore[no-untyped-def]
    async def lookup(host: str, port: int) -> list[tuple[int, str]]:
        seen.append(host)
        if host not in DNS:
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, a) for a in DNS[host]]
    return lookup


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Recordings]:
    async with Recordings(tmp_path) as srv:
        yield srv


def fetcher(srv: Recordings, seen: list[str], allow: list[str], max_bytes: int = 2 << 20) -> RecordingFetcher:
    return RecordingFetcher(allowed_hosts=HOSTS, allow_networks=allow, max_bytes=max_bytes, timeout_s=10,
                            ca_file=str(srv.cert.cert_file), lookup=table_lookup(seen))


def test_url_policy_table() -> None:
    ok = check_url("https://rec.telnyx.test/a.wav?X-Amz-Signature=abc", tuple(HOSTS))
    assert ok == ("rec.telnyx.test", 443)
    assert check_url("https://REC.EXAMPLE.TEST.:8443/a", tuple(HOSTS)) == ("rec.example.test", 8443)
    refused = {
        "http://rec.telnyx.test/a.wav": "scheme_not_https",
        "ftp://rec.telnyx.test/a.wav": "scheme_not_https",
        "file:///etc/passwd": "scheme_not_https",
        "https://evil.test/a.wav": "host_not_allowed",
        "https://telnyx.test.evil.test/a": "host_not_allowed",
        "https://eviltelnyx.test/a": "host_not_allowed",
        "https://.telnyx.test/a": "host_not_allowed",
        "https://127.0.0.1/a": "host_is_an_address",
        "https://[::1]/a": "host_is_an_address",
        "https://169.254.169.254/latest/meta-data/": "host_is_an_address",
        "https://user:pw@rec.telnyx.test/a": "url_userinfo",
        "https://rec.telnyx.test@127.0.0.1/a": "url_userinfo",
        "https://rec.telnyx.test:99999/a": "url_invalid",
        "https://rec.telnyx.test/a b": "url_invalid",
        "https://rec.telnyx.test/" + "a" * 5000: "url_invalid",
        "": "url_invalid",
    }
    for url, reason in refused.items():
        with pytest.raises(FetchRefused) as exc:
            check_url(url, tuple(HOSTS))
        assert str(exc.value) == reason, url


def test_address_policy_table() -> None:
    a = ipaddress.ip_address
    assert address_refusal(a("93.184.216.34")) is None
    assert address_refusal(a("2606:4700::1111")) is None
    for addr, reason in [("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"),
                         ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fd00::1", "private"),
                         ("169.254.169.254", "link_local"), ("fe80::1", "link_local"), ("100.64.0.1", "shared"),
                         ("0.0.0.0", "private"), ("224.0.0.1", "multicast"), ("240.0.0.1", "private"),
                         ("::ffff:10.0.0.1", "ipv4_mapped"), ("64:ff9b::a9fe:a9fe", "nat64")]:
        assert address_refusal(a(addr)) == reason, addr
    assert address_refusal(a("127.0.0.1"), (ipaddress.ip_network("127.0.0.1/32"),)) is None
    assert address_refusal(a("127.0.0.2"), (ipaddress.ip_network("127.0.0.1/32"),)) == "loopback"


async def test_an_allowed_host_on_an_allowed_address_is_fetched_whole(server: Recordings, tmp_path: Path) -> None:
    seen: list[str] = []
    f = fetcher(server, seen, ["127.0.0.1/32"])
    try:
        got = await f.fetch(f"https://rec.telnyx.test:{server.port}/ok.wav", tmp_path / "a.wav")
    finally:
        await f.aclose()
    assert got.bytes == len(BODY) and got.sha256 == hashlib.sha256(BODY).hexdigest()
    assert (tmp_path / "a.wav").read_bytes() == BODY
    assert server.connections == 1 and f.counters.connections == 1 and f.counters.fetched == 1


@pytest.mark.parametrize(("name", "reason"), [
    ("lo.telnyx.test", "loopback"), ("private.telnyx.test", "private"), ("metadata.telnyx.test", "link_local"),
    ("shared.telnyx.test", "shared"), ("mapped.telnyx.test", "ipv4_mapped"), ("ula.telnyx.test", "private"),
])
async def test_an_allowed_name_resolving_into_our_network_opens_no_connection(
        server: Recordings, tmp_path: Path, name: str, reason: str) -> None:
    seen: list[str] = []
    f = fetcher(server, seen, [])  # nothing trusted: the production default
    dest = tmp_path / "a.wav"
    try:
        with pytest.raises(FetchRefused) as exc:
            await f.fetch(f"https://{name}:{server.port}/ok.wav", dest)
    finally:
        await f.aclose()
    assert str(exc.value) == reason
    assert seen == [name]  # it was resolved, then refused
    assert server.connections == 0 and f.counters.connections == 0 and server.requests == []
    assert f.counters.refused == {reason: 1} and not dest.exists()


async def test_urls_refused_before_any_lookup_or_connection(server: Recordings, tmp_path: Path) -> None:
    seen: list[str] = []
    f = fetcher(server, seen, ["127.0.0.1/32"])
    try:
        for url in [f"http://rec.telnyx.test:{server.port}/ok.wav", f"https://127.0.0.1:{server.port}/ok.wav",
                    f"https://169.254.169.254:{server.port}/latest/meta-data/",
                    f"https://localhost:{server.port}/ok.wav", f"https://x@rec.telnyx.test:{server.port}/ok.wav"]:
            with pytest.raises(FetchRefused):
                await f.fetch(url, tmp_path / "a.wav")
    finally:
        await f.aclose()
    assert seen == [] and server.connections == 0 and f.counters.connections == 0
    assert sum(f.counters.refused.values()) == 5


async def test_only_the_allowed_address_of_a_mixed_answer_is_connected_to(server: Recordings, tmp_path: Path) -> None:
    seen: list[str] = []
    f = fetcher(server, seen, ["127.0.0.1/32"])
    try:
        got = await f.fetch(f"https://mixed.telnyx.test:{server.port}/ok.wav", tmp_path / "a.wav")
    finally:
        await f.aclose()
    assert got.bytes == len(BODY) and server.connections == 1 and f.counters.connections == 1


async def test_redirects_size_and_errors(server: Recordings, tmp_path: Path) -> None:
    seen: list[str] = []
    f = fetcher(server, seen, ["127.0.0.1/32"], max_bytes=len(BODY) - 1)
    dest = tmp_path / "a.wav"
    try:
        with pytest.raises(FetchRefused, match="redirect"):
            await f.fetch(f"https://rec.telnyx.test:{server.port}/redirect", dest)
        assert server.requests == ["/redirect"]  # not followed
        with pytest.raises(FetchRefused, match="too_large"):  # Content-Length says so
            await f.fetch(f"https://rec.telnyx.test:{server.port}/ok.wav", dest)
        with pytest.raises(FetchRefused, match="too_large"):  # no length: cut while streaming
            await f.fetch(f"https://rec.telnyx.test:{server.port}/chunked-huge", dest)
        assert not dest.exists()
        with pytest.raises(FetchFailed, match="403"):
            await f.fetch(f"https://rec.telnyx.test:{server.port}/missing", dest)
    finally:
        await f.aclose()
    assert f.counters.refused == {"redirect": 1, "too_large": 2} and f.counters.failed == 1


async def test_a_certificate_for_another_name_fails_the_fetch(server: Recordings, tmp_path: Path) -> None:
    DNS["other.telnyx.test"] = ["127.0.0.1"]
    seen: list[str] = []
    f = fetcher(server, seen, ["127.0.0.1/32"])
    try:
        with pytest.raises(FetchFailed):
            await f.fetch(f"https://other.telnyx.test:{server.port}/ok.wav", tmp_path / "a.wav")
    finally:
        await f.aclose()
        del DNS["other.telnyx.test"]
    assert server.requests == []  # the TLS handshake failed: no request was sent
