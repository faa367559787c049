"""Node liveness across nodes: each server process beats its row in the ``nodes`` table.

Theory.  A call streamed to a node is that node's (``calls.node_id``); only the owner ends it, and a
node that crashes closes its leftovers at its next start (``api.recovery``).  A node that never comes
back (a deleted pod, a lost host) would leave them open forever, with their viewers waiting.  So every
process proves it is alive: ``beat_node`` stamps its row with the *database's* clock every
``node_heartbeat_s`` (no two nodes' clocks are ever compared), and the sweeper of any live node
(``api.sweeper``) closes the open calls of a node whose stamp is older than ``node_dead_s`` as
``failed``/``node_lost`` and ends them on the bus for their viewers elsewhere.

    event                                   effect
    start-up (``api.app.open_runtime``)     first beat, before recovery and before any stream (and
                                            before the recognisers warm, however long that takes)
    every node_heartbeat_s                  a beat; a failed one is counted and logged, the next retries
    a beat that had to insert the row       this node was declared lost meanwhile (paused or cut off
                                            for node_dead_s): logged ``node.declared_lost``, counted,
                                            ``on_lost`` called; the row is back, new calls are owned
    shutdown (``Runtime.aclose``)           beats stop last, after the calls drained and their ends
                                            were written; the row ages out and a sweep removes it

Bounds: a dead node's calls are closed within ``node_dead_s + sweep_interval_s`` of its last beat;
``node_dead_s >= 3 * node_heartbeat_s`` (enforced by ``api.settings``), so one slow or failed beat
never declares a live node lost.  A beat is one indexed upsert; at 5 s it costs nothing.

``serve --workers N``: each worker is its own process with its own node id (``<node>-w<i>``, see
``api.workers``) and its own heartbeat; the parent owns no call and beats none.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from storage.sweeps import beat_node

if TYPE_CHECKING:
    from storage.db import Database

log = logging.getLogger("switchboard.heartbeat")


@dataclass(slots=True)
class HeartbeatCounters:
    beats: int = 0
    errors: int = 0
    declared_lost: int = 0  # times this node found that others had declared it lost


class NodeHeartbeat:
    """Beats ``node_id`` every ``interval_s`` from ``start`` to ``aclose``; ``on_lost`` is awaited when a
    beat finds the row gone (see the module docstring)."""

    def __init__(self, db: Database, node_id: str, interval_s: float,
                 on_lost: Callable[[], Awaitable[None]] | None = None) -> None:
        self.db = db
        self.node_id = node_id
        self.interval_s = interval_s
        self.on_lost = on_lost
        self.counters = HeartbeatCounters()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def start(self) -> None:
        """The first beat, then one every ``interval_s`` in the background.  The first one raises when it
        fails: a node that cannot say it is alive must not own calls.  An insert then is no news (a new
        node, or one whose row was forgotten while it was down)."""
        async with self.db.no_tenant() as conn:
            await beat_node(conn, self.node_id)
        self.counters.beats += 1
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="node-heartbeat")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.beat()

    async def beat(self) -> bool:
        """One beat; whether it went through.  Never raises (a storage outage is counted and logged once
        per run of failures)."""
        try:
            async with asyncio.timeout(self.interval_s):
                async with self.db.no_tenant() as conn:
                    inserted = await beat_node(conn, self.node_id)
        except Exception as exc:  # PostgreSQL down or slow: the next beat retries; node_dead_s is >= 3 beats
            self.counters.errors += 1
            if not self._failing:
                log.warning("heartbeat.failed", extra={"node_id": self.node_id, "error": type(exc).__name__})
            self._failing = True
            return False
        if self._failing:
            log.info("heartbeat.resumed", extra={"node_id": self.node_id})
        self._failing = False
        self.counters.beats += 1
        if inserted:
            self.counters.declared_lost += 1
            log.error("node.declared_lost", extra={
                "node_id": self.node_id,
                "action": "its calls open at the time were closed as node_lost by another node and stay closed"})
            if self.on_lost is not None:
                try:
                    await self.on_lost()
                except Exception:  # reporting only: the beat itself went through
                    log.exception("node.declared_lost_handler_failed")
        return True

    def stats(self) -> dict[str, int]:
        c = self.counters
        return {"beats": c.beats, "errors": c.errors, "declared_lost": c.declared_lost}
