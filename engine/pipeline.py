"""Bounded pipeline primitives.

Every buffer between two stages is a ``BoundedChannel``: a deque with a hard ``maxsize`` and a
declared ``Policy`` that says what happens when it is full.

* ``Policy.EVERY``: every item matters (final transcripts, audio to a recogniser).  A full channel
  refuses the new item: ``put`` returns ``False`` and counts it in ``dropped`` (or raises
  ``Overflow`` when the channel was built with ``raise_on_full=True``), so the producer decides,
  visibly, what a refusal means: never a silent loss.
* ``Policy.LATEST``: the newest items matter most (interim transcripts, jobs with a deadline).  A
  full channel discards its oldest item to make room, counts it in ``dropped`` and hands it to
  ``on_drop`` (when given) so the owner can report what was shed.

Watermarks let a producer that *can* slow down do so before anything is refused: the channel calls
``on_pause`` when it reaches ``high`` items and ``on_resume`` when it drains to ``low`` (the
pattern of python-websockets' ``asyncio/messages.py``).  A real-time producer (a phone call cannot
be slowed) ignores them and lets the policy rule.

Consumers: any number of tasks may ``await get()``; each item goes to exactly one of them, in
order of arrival (a worker pool drains one channel).  Fan-out to several consumers is one channel
per consumer, each with its own policy (``api.hub``: a slow SSE client fills only its own).
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
        on_drop: Callable[[T], None] | None = None,
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
        self._on_drop = on_drop
        self._waiters: deque[asyncio.Future[None]] = deque()
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
                shed = items.popleft()
                if self._on_drop is not None:
                    self._on_drop(shed)
            elif self._raise:
                raise Overflow(f"{self.name}: full at {self.maxsize} items")
            else:
                return False
        items.append(item)
        if not self.paused and len(items) >= self.high:
            self.paused = True
            if self._on_pause is not None:
                self._on_pause()
        self._wake_one()
        return True

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def peek(self) -> T:
        """The oldest item, left in place (a consumer that retries it); ``IndexError`` when empty."""
        return self._items[0]

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
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and self._items:
                    self._wake_one()  # it was woken for an item it will not take: pass the turn on
                raise
        item = self.get_nowait()
        if self._items:
            self._wake_one()  # more is waiting: the next consumer need not wait for another put
        return item

    async def wait(self) -> None:
        """Wait until there is an item (left in place, see ``peek``) or the channel is closed."""
        while not self._items and not self._closed:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    def close(self) -> None:
        """No more puts; ``get`` returns what is left, then raises ``EOFError``."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
