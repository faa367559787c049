"""SSE delivery: ids, Last-Event-ID replay, heartbeats, 204 for ended calls, bad requests, the caps on
waiting subscriptions, and the cut of a reader that stops reading."""

from __future__ import annotations

import asyncio
import logging
import socket
import weakref
from collections.abc import Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from api.app import make_app, open_runtime
from api.auth import BOOTSTRAP_ORG_ID
from api.call_session import call_key
from api.hub import CallChannel, HubEvent, Subscriber
from api.runtime import Runtime
from api.settings import Settings
from pipelines.events import Event, Untyped
from tests.servers import API_KEY, AUTH
from tests.sse_client import read_sse


@pytest.fixture
async def client(aiohttp_client) -> TestClient:  # type: ignore[no-untyped-def]
    settings = Settings(stt_provider="null", persist=False, translation_provider="none", sse_heartbeat_s=0.1,
                        bootstrap_api_key=API_KEY,
                        sse_history=50, sse_client_buffer=16, sse_max_pending_per_address=3, per_address_exempt=[])
    return await serve(aiohttp_client, settings)


_RUNTIMES: weakref.WeakKeyDictionary[web.Application, Runtime] = weakref.WeakKeyDictionary()


async def serve(aiohttp_client, settings: Settings) -> TestClient:  # type: ignore[no-untyped-def]
    """A test client of the app serving a fresh node built from ``settings``."""
    rt = await open_runtime(settings)
    app = make_app(rt)
    _RUNTIMES[app] = rt
    return await aiohttp_client(app)  # type: ignore[no-any-return]


def runtime(client: TestClient) -> Runtime:
    return _RUNTIMES[client.app]


class OrgHub:
    """``rt.hub`` as the bootstrap organisation sees it: its channels are keyed by ``call_key``."""

    def __init__(self, rt: Runtime) -> None:
        self._hub = rt.hub

    def start(self, call_id: str) -> CallChannel:
        return self._hub.start(call_key(BOOTSTRAP_ORG_ID, call_id))

    def publish(self, call_id: str, event: Event) -> HubEvent:
        return self._hub.publish(call_key(BOOTSTRAP_ORG_ID, call_id), event)

    def end(self, call_id: str) -> None:
        self._hub.end(call_key(BOOTSTRAP_ORG_ID, call_id))

    def subscribe(self, call_id: str) -> tuple[CallChannel, Subscriber]:
        return self._hub.subscribe(call_key(BOOTSTRAP_ORG_ID, call_id))

    def unsubscribe(self, ch: CallChannel, sub: Subscriber) -> None:
        self._hub.unsubscribe(ch, sub)


def org_hub(rt: Runtime) -> OrgHub:
    return OrgHub(rt)


def publish_call(rt: Runtime, call_id: str, finals: int) -> None:
    org_hub(rt).start(call_id)
    org_hub(rt).publish(call_id, Untyped("call.started", {"call_id": call_id}))
    for i in range(finals):
        org_hub(rt).publish(call_id, Untyped("transcript.partial", {"i": i}, coalesce="partial:inbound"))
        org_hub(rt).publish(call_id, Untyped("transcript.final", {"i": i}))
    org_hub(rt).publish(call_id, Untyped("call.ended", {"call_id": call_id}))
    org_hub(rt).end(call_id)


async def test_replay_from_last_event_id_delivers_only_later_finals(client: TestClient) -> None:
    rt = runtime(client)
    publish_call(rt, "c1", finals=5)  # ids: 1 started, then partial/final pairs 2..11, 12 ended
    stream = await read_sse(client.session, str(client.make_url("/api/calls/c1/events")), last_event_id="5")
    assert stream.status == 200
    assert [(e.id, e.event) for e in stream.events] == [
        ("7", "transcript.final"), ("9", "transcript.final"), ("11", "transcript.final"), ("12", "call.ended")]


async def test_reconnect_to_an_ended_call_with_nothing_new_gets_204(client: TestClient) -> None:
    publish_call(runtime(client), "c2", finals=1)
    resp = await client.get("/api/calls/c2/events", headers={"Last-Event-ID": "4", **AUTH})
    assert resp.status == 204


async def test_replay_past_the_history_bound_reports_a_gap(client: TestClient) -> None:
    publish_call(runtime(client), "c3", finals=60)  # history holds the last 50 non-droppable events
    stream = await read_sse(client.session, str(client.make_url("/api/calls/c3/events")), last_event_id="1")
    assert stream.events[0].event == "stream.gap"
    gap = stream.events[0].json()
    assert gap["lost_from"] == 2 and gap["lost_to"] == int(stream.events[1].id or 0) - 1
    assert stream.events[-1].event == "call.ended"


async def test_heartbeat_comments_flow_while_the_call_is_quiet(client: TestClient) -> None:
    rt = runtime(client)
    reader = asyncio.create_task(read_sse(client.session, str(client.make_url("/api/calls/c4/events"))))
    await asyncio.sleep(0.35)
    publish_call(rt, "c4", finals=0)
    stream = await asyncio.wait_for(reader, 5)
    assert stream.comments.count("heartbeat") >= 2
    assert [e.event for e in stream.events] == ["call.started", "call.ended"]


async def test_live_subscriber_gets_events_in_id_order_without_duplicates(client: TestClient) -> None:
    rt = runtime(client)
    org_hub(rt).start("c5")
    org_hub(rt).publish("c5", Untyped("call.started", {}))
    reader = asyncio.create_task(read_sse(client.session, str(client.make_url("/api/calls/c5/events"))))
    await asyncio.sleep(0.1)
    for i in range(10):
        org_hub(rt).publish("c5", Untyped("transcript.final", {"i": i}))
        await asyncio.sleep(0)
    org_hub(rt).publish("c5", Untyped("call.ended", {}))
    stream = await asyncio.wait_for(reader, 5)
    ids = [int(e.id or 0) for e in stream.events]
    assert ids == list(range(1, 13))


async def test_slow_client_is_cut_and_resumes_with_last_event_id_losing_no_final(client: TestClient) -> None:
    rt = runtime(client)
    org_hub(rt).start("c6")
    channel, sub = org_hub(rt).subscribe("c6")  # a client that never reads
    for i in range(40):
        org_hub(rt).publish("c6", Untyped("transcript.final", {"i": i}))
    assert sub.overflowed  # buffer of 16 exceeded: its handler would end the response
    first = (await sub.next_batch(0.1))[-1].id
    org_hub(rt).unsubscribe(channel, sub)
    org_hub(rt).publish("c6", Untyped("call.ended", {}))
    org_hub(rt).end("c6")
    stream = await read_sse(client.session, str(client.make_url("/api/calls/c6/events")),
                            last_event_id=str(first))
    got = [e.json()["i"] for e in stream.events if e.event == "transcript.final"]
    assert got == list(range(first, 40))


@pytest.mark.parametrize(("path", "headers"), [
    ("/api/calls/bad%20id/events", {}),
    ("/api/calls/" + "x" * 129 + "/events", {}),
    ("/api/calls/a%0Ab/events", {}),
    ("/api/calls/c7/events", {"Last-Event-ID": "abc"}),
    ("/api/calls/c7/events", {"Last-Event-ID": "-3"}),
    ("/api/calls/c7/events", {"Last-Event-ID": "1e5"}),
    ("/api/calls/c7/events", {"Last-Event-ID": "1_000"}),
    ("/api/calls/c7/events", {"Last-Event-ID": "+5"}),
    ("/api/calls/c7/events", {"Last-Event-ID": "5" * 5000}),
    ("/api/calls/c7/events?last_event_id=%D9%A3", {}),  # ARABIC-INDIC DIGIT THREE: int() would take it
    ("/api/calls/c7/events?last_event_id=%EF%BC%97", {}),  # FULLWIDTH DIGIT SEVEN
    ("/api/calls/c7/events?last_event_id=7%0A", {}),
])
async def test_bad_requests_get_400_with_a_reason(client: TestClient, path: str, headers: dict[str, str]) -> None:
    resp = await client.get(path, headers={**headers, **AUTH})
    assert resp.status == 400
    assert (await resp.text()).strip()


async def test_an_empty_last_event_id_counts_as_absent_and_a_128_character_id_is_served(client: TestClient) -> None:
    call_id = "v3:" + "a" * 125
    publish_call(runtime(client), call_id, finals=1)
    stream = await read_sse(client.session, str(client.make_url(f"/api/calls/{call_id}/events")), last_event_id="")
    assert [e.event for e in stream.events] == ["call.started", "transcript.final", "call.ended"]


async def test_waiting_subscriptions_past_the_per_address_cap_get_503_and_departed_ones_free_their_place(
        client: TestClient) -> None:
    rt = runtime(client)
    readers = [asyncio.create_task(read_sse(client.session, str(client.make_url(f"/api/calls/w{i}/events"))))
               for i in range(3)]
    await _until(lambda: rt.hub.waiting == 3)
    resp = await client.get("/api/calls/w4/events", headers=AUTH)
    assert resp.status == 503 and resp.headers["Retry-After"] and "this client" in await resp.text()
    for r in readers:
        r.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    await _until(lambda: rt.hub.waiting == 0, within=2)  # noticed at the next check, not at a heartbeat
    assert len(rt.hub) == 0


async def _until(cond: Callable[[], bool], within: float = 5.0) -> None:
    for _ in range(int(within / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def test_a_reader_that_stops_reading_is_cut_after_the_write_timeout_and_resumes(
        aiohttp_client, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="switchboard.sse")
    client = await serve(aiohttp_client, Settings(
        stt_provider="null", persist=False, translation_provider="none", bootstrap_api_key=API_KEY, sse_history=5000,
        sse_client_buffer=4096,
        sse_write_timeout_s=0.3, sse_send_buffer_bytes=4096))
    rt = runtime(client)
    publish = org_hub(rt).publish
    org_hub(rt).start("c8")
    publish("c8", Untyped("call.started", {}))
    loop = asyncio.get_running_loop()
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.setblocking(False)
    await loop.sock_connect(stuck, (str(client.host), int(client.port or 0)))
    await loop.sock_sendall(stuck, b"GET /api/calls/c8/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                   b"Authorization: Bearer %s\r\n\r\n" % API_KEY.encode())
    got = b""
    while b"call.started" not in got:
        got += await loop.sock_recv(stuck, 4096)
    for i in range(2000):  # 2 MB of finals that it does not read
        publish("c8", Untyped("transcript.final", {"i": i, "text": "x" * 1000}))
        if i % 50 == 0:
            await asyncio.sleep(0.005)
    published = loop.time()
    await _until(lambda: rt.stats.sse_clients == 0, within=0.3 + 1.0)
    assert loop.time() - published <= 0.3 + 1.0 and "sse.client_stuck" in caplog.messages
    publish("c8", Untyped("call.ended", {}))
    org_hub(rt).end("c8")
    while chunk := await asyncio.wait_for(loop.sock_recv(stuck, 65536), 2):  # what the kernel held, then EOF
        got += chunk
    stuck.close()
    complete = got.split(b"\r\n\r\n", 1)[1].split(b"\n\n")[:-1]  # the last one may be cut short
    last = max(int(line[4:]) for block in complete for line in block.split(b"\n") if line.startswith(b"id: "))
    assert 1 <= last < 2002
    rest = await read_sse(client.session, str(client.make_url("/api/calls/c8/events")), last_event_id=str(last))
    assert [int(e.id or 0) for e in rest.events] == list(range(last + 1, 2003))
