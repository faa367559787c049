"""Start-up after a crash: what the previous run of this node left unfinished is finished.

Runs once the tiers are open and before the server accepts a stream (``on_startup``):

1. **Open calls.**  Every call whose row names this node (``calls.node_id`` = ``settings.node_id``)
   and is still in an open state was owned by a run that is over (the data-directory lock proves no
   other run of this node is alive): each becomes ``failed`` with end_reason ``node_restart`` and
   gets an audit entry, in every organisation, in one transaction (``storage.records.
   close_calls_of_restarted_node``; the migration 0003 says how RLS stays intact).
2. **The spool.**  Its files are listed now, before this run records anything, and stored in the
   background (start-up does not wait for uploads), one recording per upload slot:

   - no readable sidecar (``RecordingMeta``): it cannot be attributed; moved to
     ``<spool>/unrecoverable/``, logged (``recording.unrecoverable``), counted;
   - rebuilt from its PCM spools or its WAV repaired (``pipelines.spool_recovery``); a WAV that
     cannot be repaired is moved aside the same way;
   - its call row is made sure of (a call whose first record died in the writer's buffer is
     written now, closed as ``failed``/``node_restart``);
   - uploaded under the key chosen when it started, then its ``recordings`` row and a
     ``recording.recovered`` audit entry are written in one transaction (directly, not through the
     writer, so that the next step happens only once they are stored);
   - then, and only then, its files are deleted.  Any failure on the way leaves them where they are
     for the next start, logged and counted in ``recordings_failed``.

3. **Imports.**  Every account import this node was running (``import_jobs.node_id``) is over for the
   same reason: each becomes ``failed`` with a message that says to re-upload the file, audited
   (``storage.sweeps.sweep_interrupted_imports``; other nodes' dead imports are the sweeper's, by their
   heartbeat: ``api.sweeper``).  Before the server serves a request, so no import of this run is there.

Each closed call, failed import and leftover is logged; the counts are in /api/stats ``persistence``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from redis.exceptions import RedisError

from api.call_session import call_key
from api.persistence import Persistence, RecordingMeta
from engine.backoff import Backoff
from pipelines import spool_recovery
from pipelines.events import CallEnded as CallEndedEvent
from pipelines.spool_recovery import Leftover, find_leftovers
from storage.records import (
    AuditEntry,
    CallEnded,
    CallStarted,
    ClosedCall,
    RecordingStored,
    call_exists,
    close_calls_of_restarted_node,
)
from storage.sweeps import sweep_interrupted_imports
from storage.warm import EventBus
from storage.writer import TRANSIENT

log = logging.getLogger("switchboard.recovery")

DB_ATTEMPTS = 5  # 0.5, 1, 2, 4 s apart
T = TypeVar("T")


async def recover_on_start(persistence: Persistence, node_id: str, batch: int = 100) -> None:
    async with persistence.tiers.db.no_tenant() as conn:
        closed = await close_calls_of_restarted_node(conn, node_id)
    while True:
        async with persistence.tiers.db.no_tenant() as conn:
            # The stale time plays no part here: this node's own running imports are all dead.
            failed = await sweep_interrupted_imports(conn, stale_s=86_400.0, limit=batch, actor=node_id,
                                                     node_id=node_id)
        for org_id, import_id in failed:
            log.warning("import.interrupted", extra={"node_id": node_id, "org_id": str(org_id),
                                                     "import_id": str(import_id)})
        persistence.imports_failed_on_start += len(failed)
        if len(failed) < batch:
            break
    for call in closed:
        log.warning("call.closed_on_restart", extra={"node_id": node_id, "org_id": str(call.org_id),
                                                     "call_id": call.call_control_id,
                                                     "previous_status": call.previous_status})
    persistence.calls_closed_on_start = len(closed)
    if closed and persistence.tiers.bus is not None:
        persistence.run_in_background(tell_viewers(persistence.tiers.bus, closed), "recovery-viewers")
    leftovers = await asyncio.to_thread(find_leftovers, persistence.spool_dir)
    if closed or leftovers:
        log.warning("recovery.start", extra={"node_id": node_id, "calls_closed": len(closed),
                                             "spool_leftovers": len(leftovers)})
    if leftovers:
        persistence.run_in_background(_recover_all(persistence, leftovers), "recording-recovery")


RESTART_DETAIL = "the process that was handling the call stopped before the call ended"


async def tell_viewers(bus: EventBus, closed: list[ClosedCall], reason: str = "node_restart",
                       detail: str = RESTART_DETAIL) -> int:
    """Each closed call's ``call.ended`` (``failed``, ``reason``) on its Redis Stream, numbered after the
    last event the dead run published there: viewers on other nodes (api.relay) see the call end with
    its reason instead of waiting for an end that never comes, and a viewer reconnecting with
    Last-Event-ID gets it once.  Used by start-up recovery (``node_restart``) and by the sweeper for a
    lost node's calls (``node_lost``).  Best effort with a deadline per call; the first failure to reach
    Redis stops the rest (it is down: each would wait its deadline), logged with how many were not told.
    The database already says how the calls ended.  Returns how many were told."""
    told = 0
    for call in closed:
        key = call_key(call.org_id, call.call_control_id)
        ended = CallEndedEvent(call.call_control_id, "", reason, detail, "failed", {})
        try:
            async with asyncio.timeout(5):
                ref = await bus.last_ref(key)
                await bus.publish(key, ended.name, ended.payload(), ref=ref + 1)
                await bus.end(key)
        except (OSError, RedisError, TimeoutError) as exc:
            log.warning("recovery.viewers_not_told", extra={"call_id": call.call_control_id, "reason": reason,
                                                            "untold": len(closed) - told,
                                                            "error": type(exc).__name__})
            break
        told += 1
    return told


async def _recover_all(p: Persistence, leftovers: list[Leftover]) -> None:
    for left in leftovers:
        async with p.upload_slot:
            try:
                await _recover_one(p, left)
            except Exception as exc:  # one bad leftover must not stop the others; it stays where it is
                p.recordings_failed += 1
                log.exception("recording.recovery_failed", extra={"recording": left.name, "error": type(exc).__name__})


async def _recover_one(p: Persistence, left: Leftover) -> None:
    if left.sidecar is None:
        await _set_aside(p, left, "no sidecar: cannot tell which call it belongs to")
        return
    try:
        meta = RecordingMeta.from_json(await asyncio.to_thread(left.sidecar.read_bytes))
    except (ValueError, KeyError, TypeError) as exc:
        await _set_aside(p, left, f"sidecar unreadable: {type(exc).__name__}")
        return
    try:
        built = await asyncio.to_thread(spool_recovery.rebuild, left, meta.sample_rate)
    except ValueError as exc:
        await _set_aside(p, left, f"cannot repair: {exc}")
        return
    if built is None:  # nothing was recorded, or it was stored and only its sidecar was left
        await asyncio.to_thread(spool_recovery.remove, left)
        log.info("recording.recovery_empty", extra={"recording": left.name, "call_id": meta.call_control_id})
        return
    rec, how = built
    if not await _ensure_call(p, meta):
        return
    if not await p.upload(meta.key, rec, meta.call_control_id):
        return  # counted and logged by upload; the files stay
    stored = RecordingStored(meta.org_id, meta.recording_id, meta.call_control_id, meta.key, rec.bytes,
                             rec.duration_ms, rec.channels, rec.sample_rate, rec.sha256)
    entry = AuditEntry(meta.org_id, "recording.recovered", "recording", meta.key,
                       new_value={"bytes": rec.bytes, "duration_ms": rec.duration_ms, "how": how,
                                  "call_id": str(meta.call_id)})
    if not await _write_now(p, meta.org_id, stored, entry):
        return
    await asyncio.to_thread(spool_recovery.remove, left)
    p.recordings_recovered += 1
    log.warning("recording.recovered", extra={"call_id": meta.call_control_id, "key": meta.key, "how": how,
                                              "duration_ms": rec.duration_ms})


async def _ensure_call(p: Persistence, meta: RecordingMeta) -> bool:
    """The call row the recording refers to.  A call whose first record died with the process (it
    waited in the writer) is written now, already closed as a node restart would have closed it."""
    async def stored() -> bool:
        async with p.tiers.db.tenant(meta.org_id) as conn:
            return await call_exists(conn, meta.org_id, meta.call_control_id)

    try:
        if await _retrying(stored):
            return True
    except Exception as exc:
        p.recordings_failed += 1
        log.error("recording.recovery_unsaved", extra={"call_id": meta.call_control_id, "error": type(exc).__name__})
        return False
    log.warning("recording.call_missing", extra={"call_id": meta.call_control_id, "action": "written as failed"})
    return await _write_now(
        p, meta.org_id,
        CallStarted(meta.org_id, meta.call_id, meta.call_control_id, meta.call_session_id, meta.stream_id, None,
                    None, meta.codec or "unknown", meta.sample_rate, meta.started_at, meta.node_id),
        CallEnded(meta.org_id, meta.call_control_id, "failed", "node_restart", datetime.now(UTC)),
        AuditEntry(meta.org_id, "call.ended", "call", str(meta.call_id), actor_id=meta.node_id,
                   new_value={"status": "failed", "reason": "node_restart", "recovered": True}))


async def _write_now(p: Persistence, org_id: uuid.UUID, *records: Any) -> bool:
    """Write ``records`` in one tenant transaction; False (counted, logged) when it could not be done."""
    async def write() -> None:
        async with p.tiers.db.tenant(org_id) as conn:
            for r in records:
                await r.apply(conn)

    try:
        await _retrying(write)
    except Exception as exc:
        p.recordings_failed += 1
        log.error("recording.recovery_unsaved", extra={"org_id": str(org_id), "error": type(exc).__name__,
                                                       "kinds": [type(r).__name__ for r in records]})
        return False
    return True


async def _set_aside(p: Persistence, left: Leftover, reason: str) -> None:
    moved = await asyncio.to_thread(spool_recovery.set_aside, left, p.spool_dir)
    p.recordings_unrecoverable += 1
    log.error("recording.unrecoverable", extra={"recording": left.name, "reason": reason,
                                                "moved_to": [str(m) for m in moved]})


async def _retrying(op: Callable[[], Awaitable[T]]) -> T:
    """``await op()``, again after a transient database failure (``DB_ATTEMPTS``, 0.5 s doubling)."""
    backoff = Backoff(0.5, 30.0)
    for attempt in range(1, DB_ATTEMPTS + 1):
        try:
            return await op()
        except TRANSIENT:
            if attempt == DB_ATTEMPTS:
                raise
            await asyncio.sleep(backoff.next())
    raise AssertionError("unreachable")
