"""SSE delivery: ids, Last-Event-ID replay, heartbeats, 204 for ended calls, bad requests."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient

from api.app import create_app
from api.runtime import RUNTIME, Runtime
from api.settings import Settings
from tests.sse_client import read_sse


@pytest.fixture
async def client(aiohttp_client) -> TestClient:  # type: ignore[no-untyped-def]
    settings = Settings(stt_provider="null", persist=False, translation_provider="none", sse_heartbeat_s=0.1,
                        sse_history=50, sse_client_buffer=16)
    return await aiohttp_client(create_app(settings))


def runtime(client: TestClient) -> Runtime:
    return client.app[RUNTIME]


def publish_call(rt: Runtime, call_id: str, finals: int) -> None:
    rt.hub.start(call_id)
    rt.hub.publish(call_id, "call.started", {"call_id": call_id})
    for i in range(finals):
        rt.hub.publish(call_id, "transcript.partial", {"i": i}, droppable=True, key="partial:inbound")
        rt.hub.publish(call_id, "transcript.final", {"i": i})
    rt.hub.publish(call_id, "call.ended", {"call_id": call_id})
    rt.hub.end(call_id)


async def test_replay_from_last_event_id_delivers_only_later_finals(client: TestClient) -> None:
    rt = runtime(client)
    publish_call(rt, "c1", finals=5)  # ids: 1 started, then partial/final pairs 2..11, 12 ended
    stream = await read_sse(client.session, str(client.make_url("/api/calls/c1/events")), last_event_id="5")
    assert stream.status == 200
    assert [(e.id, e.event) for e in stream.events] == [
        ("7", "transcript.final"), ("9", "transcript.final"), ("11", "transcript.final"), ("12", "call.ended")]


async def test_reconnect_to_an_ended_call_with_nothing_new_gets_204(client: TestClient) -> None:
    publish_call(runtime(client), "c2", finals=1)
    resp = await client.get("/api/calls/c2/events", headers={"Last-Event-ID": "4"})
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
    rt.hub.start("c5")
    rt.hub.publish("c5", "call.started", {})
    reader = asyncio.create_task(read_sse(client.session, str(client.make_url("/api/calls/c5/events"))))
    await asyncio.sleep(0.1)
    for i in range(10):
        rt.hub.publish("c5", "transcript.final", {"i": i})
        await asyncio.sleep(0)
    rt.hub.publish("c5", "call.ended", {})
    stream = await asyncio.wait_for(reader, 5)
    ids = [int(e.id or 0) for e in stream.events]
    assert ids == list(range(1, 13))


async def test_slow_client_is_cut_and_resumes_with_last_event_id_losing_no_final(client: TestClient) -> None:
    rt = runtime(client)
    rt.hub.start("c6")
    channel, sub = rt.hub.subscribe("c6")  # a client that never reads
    for i in range(40):
        rt.hub.publish("c6", "transcript.final", {"i": i})
    assert sub.overflowed  # buffer of 16 exceeded: its handler would end the response
    first = (await sub.next_batch(0.1))[-1].id
    rt.hub.unsubscribe(channel, sub)
    rt.hub.publish("c6", "call.ended", {})
    rt.hub.end("c6")
    stream = await read_sse(client.session, str(client.make_url("/api/calls/c6/events")),
                            last_event_id=str(first))
    got = [e.json()["i"] for e in stream.events if e.event == "transcript.final"]
    assert got == list(range(first, 40))


@pytest.mark.parametrize(("path", "headers"), [
    ("/api/calls/bad%20id/events", {}),
    ("/api/calls/c7/events", {"Last-Event-ID": "abc"}),
    ("/api/calls/c7/events", {"Last-Event-ID": "-3"}),
])
async def test_bad_requests_get_400_with_a_reason(client: TestClient, path: str, headers: dict[str, str]) -> None:
    resp = await client.get(path, headers=headers)
    assert resp.status == 400
    assert (await resp.text()).strip()
