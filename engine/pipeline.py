"""Bounded pipeline primitives.

Every buffer between two stages is a ``BoundedChannel``: a deque with a hard ``maxsize`` and a
declared ``Policy`` that says what happens when it is full.

* ``Policy.EVERY``: every item matters (final transcripts, audio to a recogniser).  A full channel
  refuses the new item: ``put`` returns ``False`` and counts it in ``dropped`` (or raises
  ``Overflow`` when the channel was built with ``raise_on_full=True``), so the producer decides,
  visibly, what a refusal means: never a silent loss.
* ``Policy.LATEST``: only the newest item matters (interim transcripts, meters).  A full channel
  discards its oldest item to make room and counts it in ``dropped``.

Watermarks let a producer that *can* slow down do so before anything is refused: the channel calls
``on_pause`` when it reaches ``high`` items and ``on_resume`` when it drains to ``low`` (the
pattern of python-websockets' ``asyncio/messages.py``).  A real-time producer (a phone call cannot
be slowed) ignores them and lets the policy rule.

``Fanout`` hands each item to several channels, each with its own policy; a slow consumer fills
only its own channel and never stalls the producer or the other consumers.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from engine.errors import Overflow

T = TypeVar("T")


class Policy(enum.Enum):
    EVERY = "every"
    LATEST = "latest"


class BoundedChannel(Generic[T]):
    """A single-consumer bounded buffer; ``put`` never blocks, ``get`` awaits an item."""

    def __init__(
        self,
        maxsize: int,
        policy: Policy = Policy.EVERY,
        *,
        high: int | None = None,
        low: int | None = None,
        on_pause: Callable[[], None] | None = None,
        on_resume: Callable[[], None] | None = None,
        raise_on_full: bool = False,
        name: str = "channel",
    ) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = maxsize
        self.policy = policy
        self.high = maxsize if high is None else high
        self.low = self.high // 4 if low is None else low
        if not 0 <= self.low < self.high <= maxsize:
            raise ValueError("need 0 <= low < high <= maxsize")
        self.name = name
        self.dropped = 0
        self.paused = False
        self._items: deque[T] = deque()
        self._on_pause = on_pause
        self._on_resume = on_resume
        self._raise = raise_on_full
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T) -> bool:
        """Offer ``item``; returns whether it was accepted (LATEST always accepts)."""
        if self._closed:
            raise Overflow(f"{self.name}: closed")
        items = self._items
        if len(items) >= self.maxsize:
            self.dropped += 1
            if self.policy is Policy.LATEST:
                items.popleft()
            elif self._raise:
                raise Overflow(f"{self.name}: full at {self.maxsize} items")
            else:
                return False
        items.append(item)
        if not self.paused and len(items) >= self.high:
            self.paused = True
            if self._on_pause is not None:
                self._on_pause()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True

    def get_nowait(self) -> T:
        """Take the oldest item; raises ``IndexError`` when empty."""
        item = self._items.popleft()
        if self.paused and len(self._items) <= self.low:
            self.paused = False
            if self._on_resume is not None:
                self._on_resume()
        return item

    async def get(self) -> T:
        """Wait for an item.  Raises ``EOFError`` once the channel is closed and drained."""
        while not self._items:
            if self._closed:
                raise EOFError(self.name)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.get_nowait()

    def close(self) -> None:
        """No more puts; ``get`` returns what is left, then raises ``EOFError``."""
        self._closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Fanout(Generic[T]):
    """Publish each item to every attached channel; never blocks."""

    def __init__(self) -> None:
        self._channels: list[BoundedChannel[T]] = []

    def attach(self, channel: BoundedChannel[T]) -> BoundedChannel[T]:
        self._channels.append(channel)
        return channel

    def detach(self, channel: BoundedChannel[T]) -> None:
        if channel in self._channels:
            self._channels.remove(channel)

    def publish(self, item: T) -> list[BoundedChannel[T]]:
        """Put ``item`` into every channel; returns the channels that refused it."""
        return [ch for ch in self._channels if not ch.closed and not ch.put(item)]

    def __len__(self) -> int:
        return len(self._channels)
