"""The sweeper: nothing stays open forever after a crash or a silent provider.

What it closes, every ``SWEEP_INTERVAL_S`` on every node (the SQL, and why any number of nodes may run it
at once, is ``storage/migrations/0008_sweeps.sql``):

    what                            open state   no progress for                 becomes
    a placed call no node streams   initiating   SWEEP_INITIATING_S (120 s)      failed, end_reason no_webhook
                                    ringing      SWEEP_RINGING_S (660 s)         failed, end_reason no_webhook
                                    ending       SWEEP_ENDING_S (120 s)          failed, end_reason no_webhook
    an account import               running      heartbeat: SWEEP_IMPORT_STALE_S failed, "interrupted: ..."
                                                 (120 s)
    a call of a lost node           any open     its node's beat: NODE_DEAD_S    failed, end_reason node_lost
                                                 (30 s; api/heartbeat.py)

*Progress* of a call is its row's ``updated_at``: the insert, the create-call answer, every webhook
applied and a hang-up request move it.  The times: Telnyx answers the create-call request within its
10 s timeout and ``call.initiated`` follows in seconds; a call rings at most Telnyx's ``timeout_secs``
(at most 600 s; we send none, so 30 s), after which Telnyx sends ``call.hangup`` with cause ``timeout``,
so ringing gets 600 s and a minute's margin; after our hang-up command ``call.hangup`` comes in seconds.
A call a node streams (``node_id`` set: its media stream reached that node, so it is ``active`` or was
hung up while streaming) is never swept: its stream's end, or that node's restart recovery
(``api.recovery``), closes it.  A webhook that comes after the sweep changes nothing (a final state
ranks above every event, ``api.telnyx_calls``); one that commits first moves ``updated_at`` and the
sweep passes the call by.  Each closed call is audited (actor ``system``, the node's id), logged,
counted, and published as ``call.state`` ``failed`` (cause ``no_webhook``) to viewers on this node.

*Progress* of an import is its heartbeat: the request that runs it beats ``heartbeat_at`` every
``SWEEP_IMPORT_STALE_S / 4`` and with every batch (``api.account_import``), so a live import, however
slow its upload, is never swept, and one whose process died is failed within the stale time; a node's
own running imports are failed at its start at once (``api.recovery``), since none can be alive.  Rows
already imported stay (they are correct, and a re-upload is idempotent on ``external_ref``).

*A lost node* is one whose row in ``nodes`` (beaten every ``NODE_HEARTBEAT_S`` by each server process,
``api.heartbeat``) is older than ``NODE_DEAD_S``: it died and did not come back (its own restart would
have closed its calls as ``node_restart`` first).  Each of its open calls is closed once, audited
(``call.ended``, actor the sweeping node), logged, and its ``call.ended`` (``node_lost``) is published on
the call's Redis Stream numbered after the last event the dead node published there
(``api.recovery.tell_viewers``), so viewers on any node are told and a reconnect with Last-Event-ID
gets it once.  A node row with no open call left is removed.  So a dead node's calls end within
``NODE_DEAD_S + SWEEP_INTERVAL_S`` of its last beat.

Bounds: each statement closes at most ``SWEEP_BATCH`` rows and a sweep runs at most ``MAX_BATCHES`` of
them per kind (the rest wait for the next sweep), so a sweep holds one pooled connection briefly.  A
failed sweep (PostgreSQL down) is logged and counted; the next one tries again.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from api.call_session import call_key
from api.recovery import tell_viewers
from pipelines.events import CallStateChanged
from storage.records import ClosedCall
from storage.sweeps import (
    NO_WEBHOOK,
    NODE_LOST,
    StalledCall,
    sweep_interrupted_imports,
    sweep_lost_nodes,
    sweep_stalled_calls,
)

if TYPE_CHECKING:
    from api.hub import EventHub
    from api.settings import Settings
    from storage.db import Database
    from storage.warm import EventBus

log = logging.getLogger("switchboard.sweeper")

MAX_BATCHES = 10


@dataclass(slots=True)
class SweepCounters:
    sweeps: int = 0
    calls_closed: int = 0
    imports_failed: int = 0
    calls_lost: int = 0  # calls of lost nodes closed as node_lost
    nodes_forgotten: int = 0  # lost nodes' rows removed (none of their calls open)
    errors: int = 0


class Sweeper:
    """``start`` runs a sweep at once and then every ``sweep_interval_s``; ``aclose`` stops it."""

    def __init__(self, settings: Settings, db: Database, hub: EventHub, bus: EventBus | None = None) -> None:
        self.settings = settings
        self.db = db
        self.hub = hub
        self.bus = bus  # lost nodes' calls are ended on it for their viewers (None: bus off)
        self.counters = SweepCounters()
        self._task: asyncio.Task[None] | None = None
        self._telling: set[asyncio.Task[int]] = set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="sweeper")

    async def aclose(self, tell_s: float = 5.0) -> None:
        """Stop sweeping; viewers still being told get ``tell_s`` (then the database alone says it)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._telling:
            _, late = await asyncio.wait(self._telling, timeout=tell_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception as exc:  # PostgreSQL down, a pool timeout: the next sweep tries again
                self.counters.errors += 1
                log.warning("sweep.failed", extra={"error": type(exc).__name__})
            await asyncio.sleep(self.settings.sweep_interval_s)

    async def sweep(self) -> tuple[int, int]:
        """One sweep (see the module docstring); the numbers of calls closed and imports failed."""
        s = self.settings
        calls = imports = 0
        for _ in range(MAX_BATCHES):
            async with self.db.no_tenant() as conn:
                closed = await sweep_stalled_calls(conn, initiating_s=s.sweep_initiating_s,
                                                   ringing_s=s.sweep_ringing_s, ending_s=s.sweep_ending_s,
                                                   limit=s.sweep_batch, actor=s.node_id)
            for call in closed:
                self._closed(call)
            calls += len(closed)
            if len(closed) < s.sweep_batch:
                break
        for _ in range(MAX_BATCHES):
            async with self.db.no_tenant() as conn:
                failed = await sweep_interrupted_imports(conn, stale_s=s.sweep_import_stale_s, limit=s.sweep_batch,
                                                         actor=s.node_id)
            for org_id, import_id in failed:
                log.warning("import.interrupted", extra={"org_id": str(org_id), "import_id": str(import_id)})
            imports += len(failed)
            if len(failed) < s.sweep_batch:
                break
        await self._sweep_lost_nodes()
        self.counters.sweeps += 1
        self.counters.calls_closed += calls
        self.counters.imports_failed += imports
        return calls, imports

    async def _sweep_lost_nodes(self) -> None:
        s = self.settings
        for _ in range(MAX_BATCHES):
            async with self.db.no_tenant() as conn:
                lost = await sweep_lost_nodes(conn, dead_s=s.node_dead_s, limit=s.sweep_batch, actor=s.node_id)
            for node_id, call in lost.calls:
                log.warning("call.node_lost", extra={"node_id": node_id, "org_id": str(call.org_id),
                                                     "call_id": call.call_control_id,
                                                     "previous_status": call.previous_status})
            for node_id in lost.forgotten:
                log.warning("node.lost", extra={"node_id": node_id, "dead_s": s.node_dead_s})
            self.counters.calls_lost += len(lost.calls)
            self.counters.nodes_forgotten += len(lost.forgotten)
            if lost.calls and self.bus is not None:
                self._tell([call for _, call in lost.calls])
            if len(lost.calls) < s.sweep_batch:
                break

    def _tell(self, closed: list[ClosedCall]) -> None:
        """Their viewers, on the bus, in the background (bounded per call; see tell_viewers)."""
        assert self.bus is not None
        detail = f"the node handling the call stopped beating for {self.settings.node_dead_s:g} s"
        task = asyncio.get_running_loop().create_task(tell_viewers(self.bus, closed, NODE_LOST, detail),
                                                      name="lost-node-viewers")
        self._telling.add(task)
        task.add_done_callback(self._telling.discard)

    def _closed(self, call: StalledCall) -> None:
        log.warning("call.no_webhook", extra={"org_id": str(call.org_id), "call_id": call.call_control_id,
                                              "previous_status": call.previous_status})
        key = call_key(call.org_id, call.call_control_id)
        if self.hub.get(key) is not None:
            self.hub.publish(key, CallStateChanged(call.call_control_id, "failed", NO_WEBHOOK))

    def stats(self) -> dict[str, int]:
        c = self.counters
        return {"sweeps": c.sweeps, "calls_closed": c.calls_closed, "imports_failed": c.imports_failed,
                "calls_lost": c.calls_lost, "nodes_forgotten": c.nodes_forgotten, "errors": c.errors}
