"""The per-call event hub behind the SSE endpoint.

Each call has a ``CallChannel``: a monotonically numbered event log with a bounded replay history
and a set of subscribers.  Publishing never blocks and never waits for a subscriber.

Delivery policy per subscriber (the "slow client never slows the media path" rule):

* *Droppable* events (``transcript.partial``) are coalesced: a subscriber holds at most the latest
  one per key (per track), so an older partial that was never sent is replaced (counted in
  ``dropped``).  They are not kept in the replay history either: a partial is stale by the time
  anyone could replay it.
* Every other event (``transcript.final``, ``call.*``) is queued, up to ``client_buffer`` events.  A
  subscriber that falls that far behind is marked ``overflowed``; its SSE handler ends the response,
  and the browser's EventSource reconnects with ``Last-Event-ID`` and replays from the history.
  Nothing final is dropped unless the client stays away past the history bound, which the replay
  reports with a ``stream.gap`` event.

Bounds: ``history`` events per call, ``client_buffer`` per subscriber, ``max_calls`` channels.  Ended
calls stay replayable for ``retention_s``; when the table is full the oldest ended call is evicted
(one without subscribers first: the readers of an ended call hold what they still need), and only if
every call in it is live is a new one refused (``Overflow``).

Subscribers to a call id that has no channel yet (they may come before the call, or for a call that
never comes) wait on a channel in a separate table: ``max_pending`` such subscribers in all and
``max_pending_per_owner`` per owner (the SSE layer passes the client's address, or no owner for an
address exempt from per-address caps); past either, ``subscribe`` raises ``Overflow``.  Those
waiting channels are never in the call table, so they can neither evict nor block a call: the first
event of the call (``start``, ``publish`` or ``relay``) moves the waiting channel, subscribers and
all, into the call table, and from then on its subscribers count as a call's readers, no longer as
waiting ones.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from engine.errors import Overflow
from engine.pipeline import BoundedChannel, Policy
from engine.quota import PerKeyQuota
from pipelines.events import Event, Untyped


@dataclass(frozen=True, slots=True)
class HubEvent:
    id: int
    event: str
    data: bytes  # JSON object
    droppable: bool = False
    key: str = ""

    def encode(self) -> bytes:
        return b"id: %d\nevent: %s\ndata: %s\n\n" % (self.id, self.event.encode(), self.data)


class Subscriber:
    def __init__(self, client_buffer: int, *, waiting: bool = False, owner: str | None = None) -> None:
        self._queue: BoundedChannel[HubEvent] = BoundedChannel(client_buffer, Policy.EVERY, name="sse-client")
        self._latest: dict[str, HubEvent] = {}
        self.waiting = waiting  # for a call that has not started: counted in the hub's waiting caps
        self.owner = owner
        self._wake = asyncio.Event()
        self.overflowed = False
        self.closed = False
        self.dropped = 0

    def offer(self, event: HubEvent) -> None:
        if event.droppable:
            if event.key in self._latest:
                self.dropped += 1
            self._latest[event.key] = event
        elif not self._queue.put(event):
            self.overflowed = True
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    async def next_batch(self, idle_s: float) -> list[HubEvent]:
        """Events ready to send, in id order; ``[]`` after ``idle_s`` seconds of nothing (heartbeat time)."""
        if not self._queue and not self._latest and not self.closed:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), idle_s)
            except TimeoutError:
                return []
        queue = self._queue
        batch = [queue.get_nowait() for _ in range(len(queue))]
        if self._latest:
            batch.extend(self._latest.values())
            self._latest.clear()
            batch.sort(key=lambda e: e.id)
        return batch


class CallChannel:
    def __init__(self, call_id: str, history: int) -> None:
        self.call_id = call_id
        self.history: deque[HubEvent] = deque(maxlen=history)
        self.subscribers: set[Subscriber] = set()
        self.last_id = 0
        self.ended_at: float | None = None

    def publish(self, event: Event) -> HubEvent:
        """Number ``event`` and serialise it: the one place an event becomes JSON."""
        self.last_id += 1
        droppable = event.droppable
        ev = HubEvent(self.last_id, event.name, orjson.dumps(event.payload()), droppable, event.key)
        if not droppable:
            self.history.append(ev)
        for sub in self.subscribers:
            sub.offer(ev)
        return ev

    def replay_after(self, last_id: int) -> tuple[list[HubEvent], bool]:
        """Events after ``last_id`` still in history, and whether some were lost off its end."""
        events = [ev for ev in self.history if ev.id > last_id]
        oldest = self.history[0].id if self.history else self.last_id + 1
        gap = last_id + 1 < oldest and last_id < self.last_id and len(self.history) == self.history.maxlen
        return events, gap


class EventHub:
    def __init__(
        self,
        *,
        history: int = 1000,
        client_buffer: int = 256,
        max_calls: int = 10_000,
        retention_s: float = 600.0,
        max_pending: int = 1000,
        max_pending_per_owner: int = 100,
    ) -> None:
        self._channels: OrderedDict[str, CallChannel] = OrderedDict()
        self._waiting: dict[str, CallChannel] = {}  # call ids with subscribers and no call yet
        self._waiting_by_owner = PerKeyQuota(max_pending_per_owner)
        self._waiting_subs = 0
        self._history = history
        self._client_buffer = client_buffer
        self._max_calls = max_calls
        self._max_pending = max_pending
        self._retention = retention_s
        self.published = 0
        # Called with every non-droppable event after it is published (the cross-node bus); must not block.
        self.taps: list[Callable[[str, HubEvent], None]] = []

    def __len__(self) -> int:
        """Calls in the call table (live and recently ended); waiting subscriptions are not counted."""
        return len(self._channels)

    @property
    def waiting(self) -> int:
        """Subscribers waiting for a call that has not started."""
        return self._waiting_subs

    def get(self, call_id: str) -> CallChannel | None:
        return self._channels.get(call_id) or self._waiting.get(call_id)

    def channel(self, call_id: str) -> CallChannel:
        """The call's channel in the call table, created on first use, or moved there from the waiting
        table with its subscribers.  Raises ``Overflow`` when live calls fill the table."""
        ch = self._channels.get(call_id)
        if ch is None:
            self._make_room()
            ch = self._waiting.pop(call_id, None)
            if ch is None:
                ch = CallChannel(call_id, self._history)
            else:
                for sub in ch.subscribers:
                    self._stop_waiting(sub)
            self._channels[call_id] = ch
        return ch

    def publish(self, call_id: str, event: Event, *, tap: Event | None = None) -> HubEvent:
        """Publish to the call's SSE clients; taps get ``tap`` instead when it is given (the redacted
        form of a transcript that this node's agents may see unredacted)."""
        self.published += 1
        ev = self.channel(call_id).publish(event)
        if not ev.droppable and self.taps:
            tapped = ev if tap is None else HubEvent(ev.id, ev.event, orjson.dumps(tap.payload()))
            for tap in self.taps:
                tap(call_id, tapped)
        return ev

    def relay(self, call_id: str, ref: int, event: str, payload: dict[str, Any]) -> bool:
        """Publish an event of a call owned by another node under that node's id ``ref`` (see api.relay).

        Ids at or below the channel's last id are already here: False, nothing published.  Not tapped
        (the event is on the bus already).
        """
        ch = self.channel(call_id)
        if ref <= ch.last_id:
            return False
        self.published += 1
        ch.last_id = ref - 1
        ch.publish(Untyped(event, payload))
        if event == "call.started":
            ch.ended_at = None
        elif event == "call.ended":
            ch.ended_at = time.monotonic()
        return True

    def forget_history(self, call_id: str) -> int:
        """Drop the replay history of ``call_id`` on this node (an erasure); returns how many events went."""
        ch = self._channels.get(call_id)
        if ch is None:
            return 0
        n = len(ch.history)
        ch.history.clear()
        return n

    def start(self, call_id: str) -> CallChannel:
        ch = self.channel(call_id)
        ch.ended_at = None
        return ch

    def end(self, call_id: str) -> None:
        ch = self._channels.get(call_id)
        if ch is not None:
            ch.ended_at = time.monotonic()

    def subscribe(self, call_id: str, owner: str | None = None) -> tuple[CallChannel, Subscriber]:
        """A new subscriber of ``call_id``.  When the call has no channel yet the subscriber waits in
        the waiting table; ``Overflow`` when that is full, in all or for ``owner`` (``None``: no cap of
        its own)."""
        ch = self._channels.get(call_id)
        if ch is not None:
            sub = Subscriber(self._client_buffer)
        else:
            if self._waiting_subs >= self._max_pending:
                raise Overflow(f"{self._max_pending} subscribers already wait for calls that have not started")
            if owner is not None and not self._waiting_by_owner.take(owner):
                raise Overflow(f"{self._waiting_by_owner.limit} subscriptions from this client already wait"
                               " for calls that have not started")
            ch = self._waiting.get(call_id)
            if ch is None:
                ch = self._waiting[call_id] = CallChannel(call_id, self._history)
            sub = Subscriber(self._client_buffer, waiting=True, owner=owner)
            self._waiting_subs += 1
        ch.subscribers.add(sub)
        return ch, sub

    def unsubscribe(self, ch: CallChannel, sub: Subscriber) -> None:
        ch.subscribers.discard(sub)
        sub.close()
        self._stop_waiting(sub)
        if not ch.subscribers and self._waiting.get(ch.call_id) is ch:
            del self._waiting[ch.call_id]  # waited for a call that never came: nothing to keep

    def close_all(self) -> None:
        for table in (self._channels, self._waiting):
            for ch in table.values():
                for sub in ch.subscribers:
                    sub.close()

    def _stop_waiting(self, sub: Subscriber) -> None:
        if not sub.waiting:
            return
        sub.waiting = False
        self._waiting_subs -= 1
        if sub.owner is not None:
            self._waiting_by_owner.give(sub.owner)

    def _make_room(self) -> None:
        now = time.monotonic()
        for call_id, ch in list(self._channels.items()):
            if ch.ended_at is not None and not ch.subscribers and now - ch.ended_at >= self._retention:
                del self._channels[call_id]
        if len(self._channels) < self._max_calls:
            return
        # The oldest ended call, one without subscribers if there is one; a reader of an ended call
        # keeps its channel object and its queue, so it still gets the rest of what it is reading.
        victim = None
        for call_id, ch in self._channels.items():  # oldest first
            if ch.ended_at is not None:
                if not ch.subscribers:
                    victim = call_id
                    break
                victim = victim or call_id
        if victim is None:
            raise Overflow(f"event hub full: {self._max_calls} live calls")
        del self._channels[victim]
