"""The bus forwarder's overflow is never silent: while Redis is away the oldest events are dropped (counted),
and each call that lost some gets one ``stream.gap`` naming them, under the id of its last lost event, in
order with what it published before and after; a dropped ``call.ended`` is kept and still goes out."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError

from api.hub import HubEvent
from api.persistence import BusForwarder


class FakeBus:
    """What BusForwarder uses of EventBus: publish and end; ``down`` refuses like a stopped Redis."""

    def __init__(self) -> None:
        self.down = False
        self.hold: asyncio.Event | None = None  # set: a publish waits for it (an event in flight)
        self.streams: dict[str, list[tuple[int, str, dict[str, Any]]]] = {}
        self.ended: list[str] = []

    async def publish(self, call_id: str, event: str, payload: bytes, *, ref: int) -> str:
        if self.hold is not None:
            await self.hold.wait()
        if self.down:
            raise RedisConnectionError("Connection refused")
        self.streams.setdefault(call_id, []).append((ref, event, orjson.loads(payload)))
        return "0-1"

    async def end(self, call_id: str) -> None:
        if self.down:
            raise RedisConnectionError("Connection refused")
        self.ended.append(call_id)


def ev(i: int, name: str = "transcript.final") -> HubEvent:
    return HubEvent(i, name, orjson.dumps({"n": i}))


async def until(cond: Any, within_s: float = 5.0) -> None:
    async with asyncio.timeout(within_s):
        while not cond():  # noqa: ASYNC110 - polls the forwarder's counters
            await asyncio.sleep(0.01)


async def test_an_overflow_is_signalled_per_call_in_order_and_ends_are_kept() -> None:
    bus = FakeBus()
    fwd = BusForwarder(bus, max_items=6)  # type: ignore[arg-type]
    fwd.start()
    try:
        bus.down = True
        # Call b: ids 1..3 and its end at 4; then call a: ids 1..8 (7 was a partial: never on the bus, its
        # id still taken) and its end at 9.  Twelve events for six places: the six oldest are pushed out.
        for i in range(1, 4):
            fwd.tap("b", ev(i, "call.started" if i == 1 else "transcript.final"))
        fwd.tap("b", ev(4, "call.ended"))
        for i in (1, 2, 3, 4, 5, 6, 8):
            fwd.tap("a", ev(i, "call.started" if i == 1 else "transcript.final"))
        fwd.tap("a", ev(9, "call.ended"))
        fwd.tap("a", HubEvent(10, "transcript.partial", b"{}", droppable=True))  # not for the bus at all
        await asyncio.sleep(0.3)  # a few failed attempts: the oldest went while Redis was away
        assert fwd.dropped == 5 and fwd.pending > 0  # b's end was pushed out too, but is kept
        bus.down = False
        await until(lambda: fwd.pending == 0)
    finally:
        await fwd.aclose()

    # What went out: b lost all but its end, a its two oldest; each is told once, before what follows.
    a = [(ref, name) for ref, name, _ in bus.streams["a"]]
    b = [(ref, name) for ref, name, _ in bus.streams["b"]]
    assert b == [(3, "stream.gap"), (4, "call.ended")]
    assert bus.streams["b"][0][2] == {"lost_from": 1, "lost_to": 3, "lost": 3, "cause": "bus_overflow"}
    assert a == [(2, "stream.gap"), (3, "transcript.final"), (4, "transcript.final"), (5, "transcript.final"),
                 (6, "transcript.final"), (8, "transcript.final"), (9, "call.ended")]
    assert bus.streams["a"][0][2] == {"lost_from": 1, "lost_to": 2, "lost": 2, "cause": "bus_overflow"}
    assert sorted(bus.ended) == ["a", "b"]
    assert fwd.gaps_signalled == 2 and fwd.gaps_lost == 0


async def test_no_gap_without_a_loss_and_the_event_in_flight_is_lost_only_if_its_publish_fails() -> None:
    bus = FakeBus()
    fwd = BusForwarder(bus, max_items=2)  # type: ignore[arg-type]
    fwd.start()
    try:
        bus.hold = asyncio.Event()
        fwd.tap("c", ev(1))
        await asyncio.sleep(0.05)  # 1 is in flight
        fwd.tap("c", ev(2))
        fwd.tap("c", ev(3))  # full: pushes 1, the one in flight, out of the buffer
        bus.hold.set()
        await until(lambda: fwd.pending == 0)
        assert [r for r, _, _ in bus.streams["c"]] == [1, 2, 3] and fwd.dropped == 0  # it went after all

        bus.hold = asyncio.Event()
        bus.down = True
        fwd.tap("d", ev(1))
        await asyncio.sleep(0.05)
        fwd.tap("d", ev(2))
        fwd.tap("d", ev(3))  # pushes 1 out while in flight; its publish then fails: lost
        bus.hold.set()
        await asyncio.sleep(0.2)
        bus.hold = None
        bus.down = False
        await until(lambda: fwd.pending == 0)
    finally:
        await fwd.aclose()
    assert [(r, n) for r, n, _ in bus.streams["d"]] == [(1, "stream.gap"), (2, "transcript.final"),
                                                       (3, "transcript.final")]
    assert fwd.dropped == 1
