"""Bounded channels and fan-out: bounds hold, policies act as declared, drops are counted."""

from __future__ import annotations

import asyncio

import pytest

from engine.errors import Overflow
from engine.pipeline import BoundedChannel, Policy


def test_every_policy_refuses_when_full_and_counts_the_refusal() -> None:
    ch: BoundedChannel[int] = BoundedChannel(3, Policy.EVERY)
    assert [ch.put(i) for i in range(5)] == [True, True, True, False, False]
    assert ch.dropped == 2
    assert [ch.get_nowait() for _ in range(3)] == [0, 1, 2]


def test_every_policy_can_raise_instead() -> None:
    ch: BoundedChannel[int] = BoundedChannel(1, Policy.EVERY, raise_on_full=True)
    ch.put(1)
    with pytest.raises(Overflow):
        ch.put(2)


def test_latest_policy_keeps_the_newest_items() -> None:
    ch: BoundedChannel[int] = BoundedChannel(2, Policy.LATEST)
    for i in range(10):
        assert ch.put(i)
    assert ch.dropped == 8
    assert [ch.get_nowait(), ch.get_nowait()] == [8, 9]


def test_watermarks_pause_at_high_and_resume_at_low() -> None:
    calls: list[str] = []
    ch: BoundedChannel[int] = BoundedChannel(
        10, high=6, low=2, on_pause=lambda: calls.append("pause"), on_resume=lambda: calls.append("resume"))
    for i in range(6):
        ch.put(i)
    assert calls == ["pause"] and ch.paused
    for _ in range(3):
        ch.get_nowait()
    assert calls == ["pause"]  # 3 left, above low
    ch.get_nowait()
    assert calls == ["pause", "resume"] and not ch.paused


async def test_get_waits_for_an_item_and_close_ends_the_stream() -> None:
    ch: BoundedChannel[int] = BoundedChannel(4)
    getter = asyncio.create_task(ch.get())
    await asyncio.sleep(0)
    ch.put(7)
    assert await getter == 7
    ch.put(8)
    ch.close()
    assert await ch.get() == 8
    with pytest.raises(EOFError):
        await ch.get()


def test_invalid_bounds_are_rejected() -> None:
    with pytest.raises(ValueError):
        BoundedChannel(0)
    with pytest.raises(ValueError):
        BoundedChannel(4, high=5)


def test_latest_policy_hands_what_it_sheds_to_on_drop() -> None:
    shed: list[int] = []
    ch: BoundedChannel[int] = BoundedChannel(2, Policy.LATEST, on_drop=shed.append)
    for i in range(5):
        ch.put(i)
    assert shed == [0, 1, 2] and ch.dropped == 3 and ch.peek() == 3 and len(ch) == 2


async def test_several_consumers_each_take_an_item_once_in_order() -> None:
    ch: BoundedChannel[int] = BoundedChannel(100)
    got: list[tuple[int, int]] = []

    async def worker(n: int) -> None:
        while True:
            try:
                item = await ch.get()
            except EOFError:
                return
            got.append((n, item))
            await asyncio.sleep(0)

    workers = [asyncio.create_task(worker(n)) for n in range(3)]
    await asyncio.sleep(0)
    for i in range(30):
        ch.put(i)
    await asyncio.sleep(0.01)
    ch.close()
    await asyncio.gather(*workers)
    assert sorted(item for _, item in got) == list(range(30))
    assert len({n for n, _ in got}) == 3  # the work was shared


async def test_a_cancelled_consumer_does_not_strand_an_item() -> None:
    ch: BoundedChannel[int] = BoundedChannel(4)
    first = asyncio.create_task(ch.get())
    second = asyncio.create_task(ch.get())
    await asyncio.sleep(0)
    ch.put(1)
    first.cancel()  # woken for the item, cancelled before it ran
    assert await asyncio.wait_for(second, 1) == 1
