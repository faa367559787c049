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
- A loss is never silent.  The owner signals what its own buffer dropped (``stream.gap``,
  ``api.persistence.BusForwarder``).  What Redis itself lost is found here: after a failed read, the
  next good one asks the server's run id; when it changed (Redis restarted) and a watched call's
  position entry is gone (it kept no data), events between the last one relayed here and the next one
  that arrives may have died with it, so that next one is preceded by ``stream.gap``
  ``{"lost_from", "lost_to", "cause": "bus_reset"}`` under the id just before it.  The range is an upper
  bound: ids in it that were partials never were on the bus.
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
        self._server: str | None = None  # Redis's run id when last known
        self._unsure = False  # a read failed: Redis may have restarted empty since
        self._reset: set[str] = set()  # calls whose next event must say what may have been lost before it
        self.relayed = 0
        self.resets = 0  # stream.gap notices for what Redis lost
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
                if self._unsure or self._server is None:
                    await self._check_server(positions)
                batch = await self._bus.read_many(positions, count=200, block_ms=self._block_ms)
            except (OSError, RedisError) as exc:
                self.errors += 1
                self._unsure = True
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
                    if call_id in self._reset:
                        self._reset.discard(call_id)
                        self._tell_reset(call_id, ev.ref)
                    if self._hub.relay(call_id, ev.ref, ev.event, ev.payload):
                        self.relayed += 1
                except Overflow as exc:  # the hub is full of live calls: this event cannot be shown here
                    self.errors += 1
                    log.warning("relay.hub_full", extra={"call_id": call_id, "error": str(exc)})
                if ev.event == "call.ended":
                    self._positions.pop(call_id, None)  # nothing follows; clients still attached finish

    async def _check_server(self, positions: dict[str, str]) -> None:
        """Redis answers again (or for the first time): if it is another run of the server, each watched
        call whose position entry is gone lost what followed it there (see the module docstring)."""
        run = await self._bus.server_run()
        if self._server is not None and run != self._server:
            for call_id, position in positions.items():
                if position != "0-0" and not await self._bus.has_entry(call_id, position):
                    self._reset.add(call_id)
            log.warning("relay.bus_reset", extra={"calls_affected": len(self._reset)})
        self._server, self._unsure = run, False

    def _tell_reset(self, call_id: str, ref: int) -> None:
        ch = self._hub.get(call_id)
        last = ch.last_id if ch is not None else 0
        if ref > last + 1:  # ids in between were never relayed here: maybe lost with Redis
            self._hub.relay(call_id, ref - 1, "stream.gap",
                            {"lost_from": last + 1, "lost_to": ref - 1, "cause": "bus_reset"})
            self.resets += 1
