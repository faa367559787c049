"""The HTTP doors against the real server (api/middleware.py, api/connections.py, api/sse.py).

Each attack runs beside a healthy victim: a call streaming 20 ms frames over the Telnyx WebSocket in
real time, and an SSE reader following it, whose ``call.ended`` must count every frame sent.  Attacks
whose per-address caps matter come from 127.0.0.2, so the victim (127.0.0.1) is another address.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from tests.api.test_media_stream import SILENCE, close_code_after, j, media_msg, open_stream
from tests.servers import API_KEY, AUTH, MEDIA_TOKEN, Server, running_server
from tests.sse_client import SseEvent, read_sse

ATTACKER = "127.0.0.2"
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
WRITE_TIMEOUT = 1.0
PENDING_CONNECTIONS = 100  # per address, before their first request (60 SSE readers open at once)
SSE_MAX_CALLS = 50
SSE_PENDING, SSE_PENDING_PER_ADDRESS = 80, 70
MIN_FRAMES = 25  # half a second of the victim's audio, at least


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(
        tmp_path_factory.mktemp("doors"),
        SWITCHBOARD_STT_PROVIDER="null",
        SWITCHBOARD_HTTP_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT),
        SWITCHBOARD_HTTP_BODY_TIMEOUT_S=str(BODY_TIMEOUT),
        SWITCHBOARD_HTTP_MAX_PENDING_PER_ADDRESS=str(PENDING_CONNECTIONS),
        SWITCHBOARD_SSE_MAX_CALLS=str(SSE_MAX_CALLS),
        SWITCHBOARD_SSE_MAX_PER_PRINCIPAL="1000",  # one key plays every client here: the per-address caps are tested
        SWITCHBOARD_SSE_MAX_PENDING=str(SSE_PENDING),
        SWITCHBOARD_SSE_MAX_PENDING_PER_ADDRESS=str(SSE_PENDING_PER_ADDRESS),
        SWITCHBOARD_SSE_WRITE_TIMEOUT_S=str(WRITE_TIMEOUT),
        SWITCHBOARD_SSE_SEND_BUFFER_BYTES="4096",
        SWITCHBOARD_SSE_CLIENT_BUFFER="1024",
        SWITCHBOARD_SSE_HISTORY="20000",
        SWITCHBOARD_DTMF_PER_S="1000000", SWITCHBOARD_DTMF_BURST="100000",  # DTMF is this test's event volume
        SWITCHBOARD_PER_ADDRESS_EXEMPT="[]",  # the victim (127.0.0.1) is capped like the attacker, on its own
    ) as srv:
        yield srv


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # As the bootstrap admin: these doors are about what comes before (and beside) authentication.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=AUTH) as session:
        yield session


class Victim:
    """A healthy call: real-time media on the Telnyx WebSocket and an SSE reader of its events."""

    def __init__(self, server: Server, http: aiohttp.ClientSession, name: str) -> None:
        self.server, self.http = server, http
        self.call_id, self.stream_id = f"v3:victim-{name}-{uuid.uuid4().hex[:8]}", f"victim-{name}"
        self.sent = 0
        self._running = True
        self._enough = asyncio.Event()  # MIN_FRAMES sent: it streamed for a while beside the attack

    async def __aenter__(self) -> Victim:
        url = f"{self.server.http}/api/calls/{self.call_id}/events"
        self.reader = asyncio.create_task(read_sse(self.http, url))
        self.ws = await open_stream(self.server, self.stream_id, self.call_id, token=MEDIA_TOKEN)
        self.pump = asyncio.create_task(self._pump())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._running = False
        await asyncio.gather(self.pump, return_exceptions=True)
        if not self.reader.done():
            self.reader.cancel()
        await self.ws.close()

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while self._running:
            await self.ws.send(media_msg(self.stream_id, self.sent + 2, SILENCE))
            self.sent += 1
            if self.sent >= MIN_FRAMES:
                self._enough.set()
            due += 0.02
            await asyncio.sleep(max(0.0, due - loop.time()))

    async def finish(self) -> dict[str, Any]:
        """Stop the call (after ``MIN_FRAMES`` at least); assert its reader saw it start and end with
        every frame counted."""
        await asyncio.wait_for(self._enough.wait(), 10)
        self._running = False
        await self.pump
        code, _ = await close_code_after(
            self.ws, j(event="stop", sequence_number=str(self.sent + 2), stream_id=self.stream_id, stop={}))
        stream = await asyncio.wait_for(self.reader, 10)
        names = [e.event for e in stream.events]
        assert stream.status == 200 and names[0] == "call.started" and names[-1] == "call.ended", names
        ended = stream.events[-1].json()
        assert code == 1000 and self.sent >= MIN_FRAMES
        assert ended["stats"]["frames"] == self.sent, (ended, self.sent)
        return ended


async def stats(http: aiohttp.ClientSession, server: Server) -> dict[str, Any]:
    async with http.get(f"{server.http}/api/stats") as r:
        assert r.status == 200
        return await r.json()  # type: ignore[no-any-return]


async def until(probe: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await probe():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def raw_connection(server: Server, local: str = ATTACKER) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port, local_addr=(local, 0))


async def read_to_close(reader: asyncio.StreamReader, within: float = 10.0) -> tuple[float, bytes]:
    """Seconds until the server closes the connection, and what it sent."""
    t0 = time.monotonic()
    try:
        data = await asyncio.wait_for(reader.read(), within)
    except ConnectionResetError:
        data = b""
    return time.monotonic() - t0, data


async def status_of(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> int:
    async with http.request(method, url, **kw) as r:
        await r.read()
        return r.status


# -- bodies, content types, hosts ----------------------------------------------------------------


async def test_bodies_over_the_route_limit_get_413_and_streamed_ones_stop_at_it(
        server: Server, http: aiohttp.ClientSession) -> None:
    async with Victim(server, http, "413") as victim:
        offer = f"{server.http}/api/webrtc/offer"
        big = orjson.dumps({"call_id": "v3:x", "agent_id": "a", "type": "offer", "sdp": "v=0\r\n" + "a" * 2_000_000})
        json_ct = {"Content-Type": "application/json"}
        assert await status_of(http, "POST", offer, data=big, headers=json_ct) == 413

        async def chunks() -> AsyncIterator[bytes]:  # chunked, no Content-Length: read up to the limit only
            for _ in range(200):
                yield b"x" * 10_000

        assert await status_of(http, "POST", offer, data=chunks(), headers=json_ct) == 413
        reset = f"{server.http}/api/stats/reset"
        assert await status_of(http, "POST", reset, data=b"{}" * 2000, headers=json_ct) == 413
        assert await status_of(http, "DELETE", f"{server.http}/api/webrtc/sessions/x", data=b"{}") == 413
        assert await status_of(http, "GET", f"{server.http}/api/stats", data=b"{}") == 413
        # Within the limit, the SDP rules answer (a 72 KB SDP of 60-byte lines is theirs to refuse): 400.
        sdp = "v=0\r\n" + ("a=" + "x" * 56 + "\r\n") * 1200
        sdp70 = orjson.dumps({"call_id": "v3:x", "agent_id": "a", "type": "offer", "sdp": sdp})
        async with http.post(offer, data=sdp70, headers=json_ct) as r:
            assert r.status == 400 and "too large" in (await r.json())["error"]["message"]
        await victim.finish()


async def test_posts_that_are_not_json_get_415(server: Server, http: aiohttp.ClientSession) -> None:
    async with Victim(server, http, "415") as victim:
        reset = f"{server.http}/api/stats/reset"
        for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"},
                        {"Content-Type": "multipart/form-data; boundary=x"},
                        {"Content-Type": "application/json; charset=utf-16"}, {}):
            assert await status_of(http, "POST", reset, data=b"", headers=headers) == 415, headers
        assert await status_of(http, "POST", f"{server.http}/api/webrtc/offer", data=b"{}",
                               headers={"Content-Type": "text/plain"}) == 415
        assert await status_of(http, "POST", reset, headers={"Content-Type": "application/json"}) == 200
        assert await status_of(http, "POST", reset, json={}) == 200
        await victim.finish()


async def test_foreign_hosts_get_421_on_every_route_and_no_cors_header_is_sent(
        server: Server, http: aiohttp.ClientSession) -> None:
    async with Victim(server, http, "421") as victim:
        base, port = server.http, server.port
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", f"127.0.0.1:{port + 1}",
                     "localhost@evil.example", "[::2]"):
            for method, path in (("GET", "/api/stats"), ("GET", f"/api/calls/{victim.call_id}/events"),
                                 ("GET", "/console"), ("POST", "/api/webrtc/offer")):
                assert await status_of(http, method, base + path, json={}, headers={"Host": host}) == 421, (host, path)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(server.ws, headers={"Host": "evil.example"})
        assert refused.value.status == 421
        for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"LocalHost.:{port}", "[::1]", f"[::1]:{port}"):
            assert await status_of(http, "GET", f"{base}/api/stats", headers={"Host": host}) == 200, host
        # Load balancers check health by IP or an internal name: /healthz answers any Host.
        assert await status_of(http, "GET", f"{base}/healthz", headers={"Host": "10.1.2.3:8080"}) == 200
        reader, writer = await raw_connection(server, "127.0.0.1")
        writer.write(b"GET /api/stats HTTP/1.1\r\nConnection: close\r\n\r\n")  # HTTP/1.1 without Host
        _, answer = await read_to_close(reader)
        assert answer.split(b"\r\n")[0].endswith(b" 400 Bad Request")
        reader, writer = await raw_connection(server, "127.0.0.1")
        # HTTP/1.0 without Host: no browser sends it
        writer.write(b"GET /api/stats HTTP/1.0\r\nAuthorization: Bearer %s\r\n\r\n" % API_KEY.encode())
        _, answer = await read_to_close(reader)
        assert answer.startswith(b"HTTP/1.0 200 OK")
        # No CORS: a preflight is not answered with any Access-Control-* header, nor is a request.
        origin = {"Origin": "https://evil.example"}
        async with http.options(f"{base}/api/webrtc/offer", headers={
                **origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type"}) as r:
            assert r.status in (403, 405) and not [h for h in r.headers if h.lower().startswith("access-control")]
        for method, path in (("GET", "/api/stats"), ("POST", "/api/stats/reset"), ("GET", "/healthz")):
            async with http.request(method, base + path, json={}, headers=origin) as r:
                assert not [h for h in r.headers if h.lower().startswith("access-control")], path
        await victim.finish()


# -- connections that do not finish a request ----------------------------------------------------


async def test_half_sent_requests_are_closed_at_the_header_deadline_while_a_call_streams(
        server: Server, http: aiohttp.ClientSession) -> None:
    async with Victim(server, http, "half") as victim:
        partial = {
            "silent": b"",
            "half request line": b"GET /api/sta",
            "half headers": b"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ",
            "half upgrade": b"GET /api/media/telnyx HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n",
        }
        conns = {name: await raw_connection(server) for name in partial}
        for name, data in partial.items():
            conns[name][1].write(data)
        drip_reader, drip = await raw_connection(server)

        async def trickle() -> None:  # busy, but never done: one header byte every 0.2 s
            drip.write(b"GET /api/stats HTTP/1.1\r\nX-Drip: ")
            while not drip.is_closing() and not drip_reader.at_eof():
                drip.write(b"a")
                await asyncio.sleep(0.2)

        dripping = asyncio.create_task(trickle())
        # Headers complete, body stalled after 10 of its 1,000 bytes: the body deadline.
        body_reader, body = await raw_connection(server)
        body.write(b"POST /api/webrtc/offer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 1000\r\n\r\n{\"call_id\"")
        closed = await asyncio.gather(*(read_to_close(r) for r, _ in conns.values()), read_to_close(drip_reader),
                                      read_to_close(body_reader))
        await asyncio.gather(dripping, return_exceptions=True)
        for name, (elapsed, answer) in zip([*partial, "trickle", "stalled body"], closed, strict=True):
            assert HEADER_TIMEOUT - 0.05 <= elapsed <= HEADER_TIMEOUT + 1.5, (name, elapsed)
            # (The trickler may see a reset instead: its next byte can reach the closed socket first.)
            assert answer.startswith(b"HTTP/1.1 408") or (name == "trickle" and not answer), (name, answer[:80])
        await victim.finish()
    for _, w in [*conns.values(), (None, drip), (None, body)]:
        w.close()


async def test_a_flood_of_idle_sockets_from_one_address_is_capped_and_the_victim_still_connects(
        server: Server, http: aiohttp.ClientSession) -> None:
    fds_before = len(os.listdir(f"/proc/{server.proc.pid}/fd"))
    before = (await stats(http, server))["http"]
    flood = [await raw_connection(server) for _ in range(300)]
    async with Victim(server, http, "flood") as victim:  # connects while the flood holds its sockets
        closed = await asyncio.gather(*(read_to_close(r) for r, _ in flood))
        await victim.finish()
    answers = collections.Counter(answer[:12] for _, answer in closed)
    assert answers[b"HTTP/1.1 408"] >= PENDING_CONNECTIONS and sum(answers.values()) == 300, answers
    assert answers[b"HTTP/1.1 503"] >= 300 - 2 * PENDING_CONNECTIONS, answers
    assert max(elapsed for elapsed, _ in closed) <= HEADER_TIMEOUT + 1.5
    after = (await stats(http, server))["http"]
    assert after["refused"] - before["refused"] == answers[b"HTTP/1.1 503"]
    assert after["waiting"] == 0
    for _, w in flood:
        w.close()
    # The address may connect again once its idle sockets are gone, and the descriptors are back.
    reader, writer = await raw_connection(server)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert (await read_to_close(reader))[1].startswith(b"HTTP/1.1 200")
    await asyncio.sleep(0.2)
    assert len(os.listdir(f"/proc/{server.proc.pid}/fd")) <= fds_before + 5


# -- SSE ---------------------------------------------------------------------------------------------


async def test_subscriptions_to_calls_that_never_come_do_not_take_a_new_calls_channel(
        server: Server, http: aiohttp.ClientSession) -> None:
    """60 waiting subscriptions with SSE_MAX_CALLS=50: the next real call still gets its channel."""
    waiting = [asyncio.create_task(read_sse(http, f"{server.http}/api/calls/v3:nobody-{uuid.uuid4().hex}/events"))
               for _ in range(60)]

    async def all_waiting() -> bool:
        return (await stats(http, server))["sse_waiting"] >= 60

    await until(all_waiting)
    async with Victim(server, http, "after-waiters") as victim:
        await asyncio.sleep(0.3)
        await victim.finish()
    assert not any(t.done() for t in waiting)  # still waiting, none refused
    # The caps: 70 waiting from one address, 80 in all; past them 503 with Retry-After.
    held: list[aiohttp.ClientResponse] = []

    async def subscribe(session: aiohttp.ClientSession) -> int:
        r = await session.get(f"{server.http}/api/calls/v3:nobody-{uuid.uuid4().hex}/events")
        if r.status == 200:
            held.append(r)
        else:
            assert r.headers.get("Retry-After") and (await r.text())
            r.release()
        return r.status

    assert [await subscribe(http) for _ in range(11)] == [200] * 10 + [503]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, local_addr=(ATTACKER, 0)),
                                     headers=AUTH) as other:
        assert [await subscribe(other) for _ in range(11)] == [200] * 10 + [503]
        for t in waiting:
            t.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        for r in held:
            r.close()

    async def none_waiting() -> bool:
        return (await stats(http, server))["sse_waiting"] == 0

    await until(none_waiting)


def _events(raw: bytes) -> list[SseEvent]:
    """Complete events in a raw SSE byte stream (a cut one at the end is left out)."""
    out = []
    for block in raw.split(b"\n\n")[:-1]:
        lines = [line for line in block.split(b"\n") if b": " in line and not line.startswith(b":")]
        fields = dict(line.split(b": ", 1) for line in lines)
        if b"id" in fields:
            out.append(SseEvent(fields[b"event"].decode(), fields[b"data"].decode(), fields[b"id"].decode()))
    return out


async def test_a_reader_that_stops_reading_is_cut_after_the_write_timeout_and_resumes_with_last_event_id(
        server: Server, http: aiohttp.ClientSession) -> None:
    call_id, sid = "v3:stuck-" + "x" * 100, "stuck"  # long ids: bigger events fill the buffers sooner
    url = f"{server.http}/api/calls/{call_id}/events"
    healthy = asyncio.create_task(read_sse(http, url))
    loop = asyncio.get_running_loop()
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.setblocking(False)
    await loop.sock_connect(stuck, ("127.0.0.1", server.port))
    await loop.sock_sendall(stuck, f"GET /api/calls/{call_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            f"Authorization: Bearer {API_KEY}\r\n\r\n".encode())
    ws = await open_stream(server, sid, call_id, token=MEDIA_TOKEN)
    got = b""
    while b"event: call.started" not in got:
        got += await asyncio.wait_for(loop.sock_recv(stuck, 4096), 5)
    # From here the stuck reader reads nothing while the call sends media and 4,000 DTMF events.
    seq, frames, digits = 1, 0, 4000
    for _ in range(digits // 100):
        seq += 1
        frames += 1
        await ws.send(media_msg(sid, seq, SILENCE))
        for i in range(100):
            seq += 1
            await ws.send(j(event="dtmf", sequence_number=str(seq), stream_id=sid, dtmf={"digit": str(i % 10)}))
        await asyncio.sleep(0.02)
    flood_end = time.time()

    def cut() -> list[dict[str, Any]]:
        return [r for r in server.logs() if r.get("event") == "sse.client_stuck" and r.get("call_id") == call_id]

    async def was_cut() -> bool:
        return bool(cut())

    await until(was_cut, WRITE_TIMEOUT + 5)
    assert cut()[0]["ts"] - flood_end <= WRITE_TIMEOUT + 1.5  # type: ignore[operator]

    async def one_reader_left() -> bool:
        return (await stats(http, server))["sse_clients"] == 1

    await until(one_reader_left)
    await close_code_after(ws, j(event="stop", sequence_number=str(seq + 1), stream_id=sid, stop={}))
    whole = await asyncio.wait_for(healthy, 10)  # the healthy reader beside it got everything
    assert sum(e.event == "call.dtmf" for e in whole.events) == digits
    assert whole.events[-1].event == "call.ended" and whole.events[-1].json()["stats"]["frames"] == frames
    # The stuck reader gets what the kernel still held, then the end of the connection ...
    while True:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(stuck, 65536), 5)
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += chunk
    stuck.close()
    before = _events(got.split(b"\r\n\r\n", 1)[1])
    last = int(before[-1].id or 0)
    assert before[0].event == "call.started" and last < int(whole.events[-1].id or 0)
    # ... and resumes from its last complete event: the rest, without a gap or a repeat.
    rest = await read_sse(http, url, last_event_id=str(last))
    ids = [int(e.id or 0) for e in rest.events]
    assert ids == list(range(last + 1, int(whole.events[-1].id or 0) + 1))
    assert [e.json() for e in before + rest.events] == [e.json() for e in whole.events]


async def test_last_event_ids_and_call_ids_that_are_not_ids_get_400_never_500(
        server: Server, http: aiohttp.ClientSession) -> None:
    async with Victim(server, http, "fuzz") as victim:
        await asyncio.sleep(0.1)
        ended = await victim.finish()
    assert ended
    url = f"{server.http}/api/calls/{victim.call_id}/events"
    for value in ("abc", "-1", "1e5", "5" * 5000, "\u0663", "\u0661\u0662", "1_000", "+5", "0x10", "1.0", "١"):
        assert await status_of(http, "GET", url, params={"last_event_id": value}) == 400, value
        if len(value) < 4000:
            assert await status_of(http, "GET", url, headers={"Last-Event-ID": value}) == 400, value
    # Empty counts as absent: the whole (ended) call is replayed.
    assert [e.event for e in (await read_sse(http, url, last_event_id="")).events] == ["call.started", "call.ended"]
    assert await status_of(http, "GET", url, headers={"Last-Event-ID": "999999999999999999"}) == 204
    base = f"{server.http}/api/calls/"
    for bad in ("x" * 129, "..%2F..%2Fetc", "a%00b", "a%0D%0Ab", "a%20b", "%F0%9F%98%80", "\u202e"):
        assert await status_of(http, "GET", base + bad + "/events") in (400, 404), bad
    assert await status_of(http, "GET", base + "x" * 100_000 + "/events") in (400, 414)
    assert server.proc.poll() is None
    # Nothing failed but what aiohttp's parser refused (it logs each with a traceback, as error).
    assert not [r for r in server.logs() if r.get("level") == "error" and "http_exceptions" not in str(r.get("exc"))]
