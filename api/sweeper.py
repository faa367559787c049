"""The sweeper: nothing stays open forever after a crash or a silent provider.

What it closes, every ``SWEEP_INTERVAL_S`` on every node (the SQL, and why any number of nodes may run it
at once, is ``storage/migrations/0008_sweeps.sql``):

    what                            open state   no progress for                 becomes
    a placed call no node streams   initiating   SWEEP_INITIATING_S (120 s)      failed, end_reason no_webhook
                                    ringing      SWEEP_RINGING_S (660 s)         failed, end_reason no_webhook
                                    ending       SWEEP_ENDING_S (120 s)          failed, end_reason no_webhook
    an account import               running      heartbeat: SWEEP_IMPORT_STALE_S failed, "interrupted: ..."
                                                 (120 s)

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
from pipelines.events import CallStateChanged
from storage.sweeps import NO_WEBHOOK, StalledCall, sweep_interrupted_imports, sweep_stalled_calls

if TYPE_CHECKING:
    from api.hub import EventHub
    from api.settings import Settings
    from storage.db import Database

log = logging.getLogger("switchboard.sweeper")

MAX_BATCHES = 10


@dataclass(slots=True)
class SweepCounters:
    sweeps: int = 0
    calls_closed: int = 0
    imports_failed: int = 0
    errors: int = 0


class Sweeper:
    """``start`` runs a sweep at once and then every ``sweep_interval_s``; ``aclose`` stops it."""

    def __init__(self, settings: Settings, db: Database, hub: EventHub) -> None:
        self.settings = settings
        self.db = db
        self.hub = hub
        self.counters = SweepCounters()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="sweeper")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

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
        self.counters.sweeps += 1
        self.counters.calls_closed += calls
        self.counters.imports_failed += imports
        return calls, imports

    def _closed(self, call: StalledCall) -> None:
        log.warning("call.no_webhook", extra={"org_id": str(call.org_id), "call_id": call.call_control_id,
                                              "previous_status": call.previous_status})
        key = call_key(call.org_id, call.call_control_id)
        if self.hub.get(key) is not None:
            self.hub.publish(key, CallStateChanged(call.call_control_id, "failed", NO_WEBHOOK))

    def stats(self) -> dict[str, int]:
        c = self.counters
        return {"sweeps": c.sweeps, "calls_closed": c.calls_closed, "imports_failed": c.imports_failed,
                "errors": c.errors}
