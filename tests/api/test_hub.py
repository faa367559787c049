"""The event hub: ids, bounded history, replay, partial coalescing, slow-client cut-off, eviction."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from api.hub import EventHub
from engine.errors import Overflow
from pipelines.events import Untyped


def test_event_ids_increase_per_call_and_encode_as_sse() -> None:
    hub = EventHub()
    a1 = hub.publish("a", Untyped("call.started", {"n": 1}))
    b1 = hub.publish("b", Untyped("call.started", {"n": 1}))
    a2 = hub.publish("a", Untyped("transcript.final", {"text": "hi"}))
    assert (a1.id, a2.id, b1.id) == (1, 2, 1)
    assert a2.encode() == b'id: 2\nevent: transcript.final\ndata: {"text":"hi"}\n\n'


def test_history_is_bounded_and_replay_reports_a_gap() -> None:
    hub = EventHub(history=10)
    for i in range(25):
        hub.publish("a", Untyped("transcript.final", {"i": i}))
    ch = hub.channel("a")
    assert len(ch.history) == 10
    events, gap = ch.replay_after(3)
    assert [e.id for e in events] == list(range(16, 26)) and gap
    events, gap = ch.replay_after(20)
    assert [e.id for e in events] == [21, 22, 23, 24, 25] and not gap


def test_partials_are_not_kept_in_history() -> None:
    hub = EventHub()
    hub.publish("a", Untyped("transcript.partial", {}, coalesce="partial:inbound"))
    hub.publish("a", Untyped("transcript.final", {}))
    events, _ = hub.channel("a").replay_after(0)
    assert [e.event for e in events] == ["transcript.final"]


async def test_slow_subscriber_keeps_only_latest_partial_per_track_but_every_final() -> None:
    hub = EventHub(client_buffer=100)
    _, sub = hub.subscribe("a")
    for i in range(50):
        hub.publish("a", Untyped("transcript.partial", {"i": i}, coalesce="partial:inbound"))
        hub.publish("a", Untyped("transcript.partial", {"i": i}, coalesce="partial:outbound"))
        if i % 10 == 9:
            hub.publish("a", Untyped("transcript.final", {"i": i}))
    batch = await sub.next_batch(1)
    finals = [e for e in batch if e.event == "transcript.final"]
    partials = [orjson.loads(e.data)["i"] for e in batch if e.event == "transcript.partial"]
    assert len(finals) == 5 and partials == [49, 49]
    assert sub.dropped == 98
    assert [e.id for e in batch] == sorted(e.id for e in batch)


async def test_subscriber_that_falls_behind_on_finals_is_marked_overflowed() -> None:
    hub = EventHub(client_buffer=8)
    _, sub = hub.subscribe("a")
    for i in range(9):
        hub.publish("a", Untyped("transcript.final", {"i": i}))
    assert sub.overflowed
    assert len(await sub.next_batch(1)) == 8  # what it holds is still delivered in order


async def test_next_batch_times_out_empty_for_heartbeats() -> None:
    _, sub = EventHub().subscribe("a")
    assert await asyncio.wait_for(sub.next_batch(0.05), 1) == []


def test_full_hub_evicts_ended_calls_first_then_refuses() -> None:
    hub = EventHub(max_calls=2, retention_s=3600)
    hub.publish("a", Untyped("call.started", {}))
    hub.publish("b", Untyped("call.started", {}))
    hub.end("a")
    hub.publish("c", Untyped("call.started", {}))  # evicts ended "a"
    assert hub.get("a") is None and hub.get("c") is not None
    with pytest.raises(Overflow):
        hub.publish("d", Untyped("call.started", {}))


def test_subscription_to_a_call_that_never_started_leaves_nothing_behind() -> None:
    hub = EventHub()
    ch, sub = hub.subscribe("never")
    hub.unsubscribe(ch, sub)
    assert hub.get("never") is None and len(hub) == 0


def test_waiting_subscriptions_never_take_a_slot_a_new_call_needs() -> None:
    hub = EventHub(max_calls=2, max_pending=10)
    for i in range(5):
        hub.subscribe(f"never-{i}", owner="x")
    hub.start("a")
    hub.start("b")  # 5 waiting and 2 calls in a table of 2: the calls got their slots
    assert (len(hub), hub.waiting) == (2, 5)
    with pytest.raises(Overflow):  # only live calls alone fill it
        hub.start("c")
    hub.end("a")
    hub.start("c")
    assert hub.get("a") is None and hub.get("c") is not None


def test_waiting_subscribers_are_capped_in_all_and_per_owner() -> None:
    hub = EventHub(max_pending=3, max_pending_per_owner=2)
    ch, sub = hub.subscribe("w1", owner="x")
    hub.subscribe("w2", owner="x")
    with pytest.raises(Overflow, match="this client"):
        hub.subscribe("w3", owner="x")
    hub.subscribe("w1", owner="y")  # a second subscriber of a waiting call is waiting too
    with pytest.raises(Overflow, match="3 subscribers"):
        hub.subscribe("w4", owner="z")
    hub.unsubscribe(ch, sub)
    hub.subscribe("w3", owner="x")
    assert hub.waiting == 3


async def test_a_call_that_starts_takes_its_waiting_subscribers_along_and_frees_their_places() -> None:
    hub = EventHub(max_pending=10, max_pending_per_owner=1)
    ch, sub = hub.subscribe("a", owner="x")
    hub.start("a")
    hub.publish("a", Untyped("call.started", {}))
    assert hub.channel("a") is ch and hub.waiting == 0
    assert [e.event for e in await sub.next_batch(1)] == ["call.started"]
    hub.subscribe("b", owner="x")  # the owner's one waiting place is free again
    hub.unsubscribe(ch, sub)
    assert hub.get("a") is ch  # a call's channel stays (replay) when its last reader leaves


async def test_an_ended_call_with_readers_is_evicted_rather_than_a_new_call_refused() -> None:
    hub = EventHub(max_calls=1)
    hub.publish("a", Untyped("call.started", {}))
    _, reader = hub.subscribe("a")
    hub.publish("a", Untyped("call.ended", {}))
    hub.end("a")
    hub.start("b")
    assert hub.get("a") is None
    assert [e.event for e in await reader.next_batch(1)] == ["call.ended"]  # what it still had to read
