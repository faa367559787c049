"""Other nodes' calls, for SSE clients connected to this node: Redis Streams into the local hub.

Each node forwards its calls' non-droppable events (lifecycle, final transcripts) to one Redis
Stream per call (``api.persistence.BusForwarder``), tagged with the event's SSE id on the node that
owns the call.  When an SSE client here asks for a call whose media stream is not here, the relay
watches that call's stream and republishes its events into this node's hub *under the owner's ids*,
so ``Last-Event-ID`` means the same on every node and a client may reconnect anywhere.

- One task and one Redis connection for all watched calls: a single ``XREAD BLOCK`` over every
  watched stream, ``block_ms`` at a time, so a newly watched call is picked up within that time.
- A call is watched while it has SSE clients here and until its ``call.ended`` arrives; at most
  ``max_calls`` at once (``watch`` refuses more: the SSE handler answers 503).
- Interim results (partials) are not on the bus: remote viewers get finals and lifecycle events.
- A call that becomes local (its stream arrives here) is skipped: the hub already has its events,
  and ids at or below the channel's last id are never published twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from redis.exceptions import RedisError

from api.hub import EventHub
from engine.backoff import Backoff
from engine.errors import Overflow
from storage.warm import EventBus

log = logging.getLogger("switchboard.relay")


class BusRelay:
    def __init__(self, bus: EventBus, hub: EventHub, is_local: Callable[[str], bool], *, max_calls: int = 1000,
                 block_ms: int = 1000) -> None:
        self._bus = bus
        self._hub = hub
        self._is_local = is_local
        self.max_calls = max_calls
        self._block_ms = block_ms
        self._watchers: dict[str, int] = {}  # call id -> SSE clients here waiting on it
        self._positions: dict[str, str] = {}  # call id -> last Redis id read
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.relayed = 0
        self.errors = 0

    @property
    def watched(self) -> int:
        """Other nodes' calls watched for SSE clients here."""
        return len(self._watchers)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="bus-relay")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def watch(self, call_id: str) -> None:
        """An SSE client here wants ``call_id``.  Raises ``Overflow`` past ``max_calls``."""
        if call_id not in self._watchers:
            if len(self._watchers) >= self.max_calls:
                raise Overflow(f"relaying {self.max_calls} calls from other nodes already")
            self._watchers[call_id] = 0
            self._positions.setdefault(call_id, "0-0")
            self._wake.set()
        self._watchers[call_id] += 1

    def unwatch(self, call_id: str) -> None:
        n = self._watchers.get(call_id, 0) - 1
        if n <= 0:
            self._watchers.pop(call_id, None)
            self._positions.pop(call_id, None)
        else:
            self._watchers[call_id] = n

    async def _run(self) -> None:
        backoff = Backoff(0.1, 5.0)
        while True:
            positions = {c: p for c, p in self._positions.items() if not self._is_local(c)}
            if not positions:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                batch = await self._bus.read_many(positions, count=200, block_ms=self._block_ms)
            except (OSError, RedisError) as exc:
                self.errors += 1
                log.warning("relay.read_failed", extra={"error": type(exc).__name__, "calls": len(positions)})
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            for call_id, ev in batch:
                if call_id not in self._positions:
                    continue  # the last client left while we read
                self._positions[call_id] = ev.id
                if ev.ref is None or self._is_local(call_id):
                    continue
                try:
                    if self._hub.relay(call_id, ev.ref, ev.event, ev.payload):
                        self.relayed += 1
                except Overflow as exc:  # the hub is full of live calls: this event cannot be shown here
                    self.errors += 1
                    log.warning("relay.hub_full", extra={"call_id": call_id, "error": str(exc)})
                if ev.event == "call.ended":
                    self._positions.pop(call_id, None)  # nothing follows; clients still attached finish
