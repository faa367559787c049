"""The relay after Redis comes back: a restart that kept no data (a watched call's position entry gone)
is said to the call's viewers here with one ``stream.gap`` (cause ``bus_reset``) before the next event;
a restart that kept its data, or a failure without a restart, says nothing (nothing was lost)."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from api.hub import EventHub
from api.relay import BusRelay
from storage.warm import BusEvent


class FakeBus:
    """What BusRelay uses of EventBus, over in-memory streams; ``down`` refuses like a stopped Redis."""

    def __init__(self) -> None:
        self.run = "run-1"
        self.down = False
        self.streams: dict[str, list[BusEvent]] = {}
        self._n = 0

    def add(self, call_id: str, ref: int, event: str = "transcript.final") -> None:
        self._n += 1
        self.streams.setdefault(call_id, []).append(BusEvent(f"{self._n}-0", event, {"ref": ref}, ref))

    def restart(self, *, keep: bool) -> None:
        self.run = f"run-{int(self.run[4:]) + 1}"
        if not keep:
            self.streams.clear()

    async def server_run(self) -> str:
        if self.down:
            raise RedisConnectionError("refused")
        return self.run

    async def has_entry(self, call_id: str, entry_id: str) -> bool:
        return any(e.id == entry_id for e in self.streams.get(call_id, []))

    async def read_many(self, positions: dict[str, str], *, count: int, block_ms: int) -> list[tuple[str, BusEvent]]:
        if self.down:
            raise RedisConnectionError("refused")
        out = [(c, e) for c, pos in positions.items() for e in self.streams.get(c, [])
               if int(e.id.split("-")[0]) > int(pos.split("-")[0])]
        if not out:
            await asyncio.sleep(block_ms / 1000)
        return out


async def scenario(keep: bool) -> list[tuple[int, str, Any]]:
    bus, hub = FakeBus(), EventHub()
    relay = BusRelay(bus, hub, lambda _: False, block_ms=20)  # type: ignore[arg-type]
    _, sub = hub.subscribe("c")
    relay.watch("c")
    relay.start()
    seen: list[tuple[int, str, Any]] = []

    async def drain() -> None:
        for _ in range(20):
            for ev in await sub.next_batch(0.05):
                seen.append((ev.id, ev.event, ev.data))

    try:
        bus.add("c", 1, "call.started")
        bus.add("c", 2)
        await drain()
        bus.down = True  # the relay's reads fail...
        await asyncio.sleep(0.3)
        bus.restart(keep=keep)  # ... and Redis comes back, with or without what it held
        bus.down = False
        if keep:
            bus.add("c", 3)  # would have been read had it stayed up: still there
        bus.add("c", 5)  # 4 was a partial, or was lost with Redis: the relay cannot tell which
        bus.add("c", 6, "call.ended")
        await drain()
    finally:
        await relay.aclose()
    return seen


async def test_a_restart_that_lost_the_stream_is_said_before_the_next_event() -> None:
    seen = await scenario(keep=False)
    assert [(i, name) for i, name, _ in seen] == [(1, "call.started"), (2, "transcript.final"), (4, "stream.gap"),
                                                 (5, "transcript.final"), (6, "call.ended")]
    assert seen[2][2] == b'{"lost_from":3,"lost_to":4,"cause":"bus_reset"}'


async def test_a_restart_that_kept_its_data_says_nothing() -> None:
    seen = await scenario(keep=True)
    assert [(i, name) for i, name, _ in seen] == [(1, "call.started"), (2, "transcript.final"),
                                                 (3, "transcript.final"), (5, "transcript.final"), (6, "call.ended")]
