"""What the real-time path keeps: call rows, transcripts, recordings, audit entries, bus events.

Transcripts: every final, and the last partial of an utterance that got no final (``kind``
'partial'; ``pipelines.partials`` decides which, ``api.speech.CallEvents`` hands them here), both
already redacted.

Nothing here is awaited by the media path.  Rows go through the bounded ``PersistWriter``;
events for other nodes go through ``BusForwarder`` (bounded, oldest dropped and counted); the
recording is built and uploaded by a task after the call ends, a bounded number at a time.

A recording whose upload fails after ``UPLOAD_ATTEMPTS`` stays in the spool directory and is logged
with its path (``recording.upload_failed``): kept, reported, never deleted unsaved.  Each recording
has a sidecar (``<recording_id>.json``, ``RecordingMeta``) next to its spools from its first moment,
naming its organisation, call and storage key, so that whatever a crash or a failed upload leaves in
the spool is stored by the next start (``api.recovery``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from redis.exceptions import RedisError

from api.hub import HubEvent
from api.tiers import Tiers
from engine.backoff import Backoff
from engine.pipeline import BoundedChannel, Policy
from pipelines.events import TranscriptEvent
from pipelines.recording import CallRecorder, RecordingFile, Spooler
from pipelines.translate.base import Translation
from storage.records import (
    AuditEntry,
    CallAgent,
    CallEnded,
    CallStarted,
    RecordingStored,
    SummaryDue,
    TranscriptStored,
    TranslationStored,
)
from storage.warm import EventBus

log = logging.getLogger("switchboard.persist")

MAX_GAPS = 10_000  # calls with an unsignalled loss the bus forwarder remembers (BusForwarder)
# 0.5 + 1 + 2 + 4 + 8 s between attempts: rides out a restart of the cold tier, then the file stays
# in the spool (with its sidecar) for the next start to store.
UPLOAD_ATTEMPTS = 6


@dataclass(frozen=True, slots=True)
class RecordingMeta:
    """The sidecar of a recording in the spool: enough to store it without the process that made it."""

    org_id: uuid.UUID
    call_id: uuid.UUID
    call_control_id: str
    recording_id: uuid.UUID
    key: str  # where it goes in the cold tier
    sample_rate: int
    started_at: datetime
    node_id: str | None = None
    codec: str = ""
    stream_id: str | None = None
    call_session_id: str | None = None

    def to_json(self) -> bytes:
        return orjson.dumps({"v": 1, "org_id": str(self.org_id), "call_id": str(self.call_id),
                             "call_control_id": self.call_control_id, "recording_id": str(self.recording_id),
                             "key": self.key, "sample_rate": self.sample_rate,
                             "started_at": self.started_at.isoformat(), "node_id": self.node_id,
                             "codec": self.codec, "stream_id": self.stream_id,
                             "call_session_id": self.call_session_id})

    @classmethod
    def from_json(cls, raw: bytes) -> RecordingMeta:
        """Raises ``ValueError`` (or ``KeyError``/``TypeError``) for anything but a valid sidecar."""
        d = orjson.loads(raw)
        if d.get("v") != 1:
            raise ValueError(f"unknown sidecar version {d.get('v')!r}")
        return cls(uuid.UUID(d["org_id"]), uuid.UUID(d["call_id"]), str(d["call_control_id"]),
                   uuid.UUID(d["recording_id"]), str(d["key"]), int(d["sample_rate"]),
                   datetime.fromisoformat(d["started_at"]), d.get("node_id"), str(d.get("codec") or ""),
                   d.get("stream_id"), d.get("call_session_id"))


@dataclass(slots=True)
class CallRecord:
    """What persistence knows about one live call."""

    org_id: uuid.UUID
    call_id: uuid.UUID
    call_control_id: str
    recording_id: uuid.UUID
    recorder: CallRecorder | None
    recording_key: str = ""
    # Another node's sweeper closed this call as node_lost while this node was declared lost
    # (api/heartbeat.py): its end here stores nothing over that final outcome.
    closed_elsewhere: bool = False


class Persistence:
    def __init__(self, tiers: Tiers, *, spool_dir: Path, recording: bool, recording_max_s: int,
                 uploads: int, node_id: str | None = None) -> None:
        self.tiers = tiers
        self.node_id = node_id
        self._spool = spool_dir
        self._recording = recording
        self._recording_max_ms = recording_max_s * 1000
        self._uploads = asyncio.Semaphore(uploads)
        self.spooler = Spooler()
        spool_dir.mkdir(parents=True, exist_ok=True)
        self._tasks: set[asyncio.Task[None]] = set()
        self.recordings_stored = 0
        self.recordings_failed = 0
        self.recordings_recovered = 0  # left in the spool by an earlier run, stored at start-up
        self.recordings_unrecoverable = 0  # left in the spool, moved aside (see spool_recovery)
        self.calls_closed_on_start = 0  # calls this node left open, closed at start-up (api.recovery)
        self.imports_failed_on_start = 0  # imports this node left running, failed at start-up (api.recovery)

    @property
    def spool_dir(self) -> Path:
        return self._spool

    def call_started(self, *, org_id: uuid.UUID, call_control_id: str, call_session_id: str | None,
                     stream_id: str, from_number: str | None, to_number: str | None, encoding: str,
                     sample_rate: int) -> CallRecord:
        """``org_id``: the organisation of the stream's media token; every row and key is in it."""
        org = org_id
        # One id per call and organisation, whatever the number of media streams (a restarted stream
        # is the same call); the same call_control_id in two organisations is two calls.
        call_id = uuid.uuid5(org, call_control_id)
        recording_id = uuid.uuid4()  # one recording per stream
        started_at = datetime.now(UTC)
        w = self.tiers.writer
        w.submit(CallStarted(org, call_id, call_control_id, call_session_id, stream_id, from_number, to_number,
                             encoding, sample_rate, started_at, self.node_id))
        w.submit(AuditEntry(org, "call.started", "call", str(call_id), actor_type="provider", actor_id="telnyx",
                            new_value={"call_control_id": call_control_id, "stream_id": stream_id,
                                       "codec": encoding, "sample_rate": sample_rate}))
        # The key is fixed when the recording starts: a retry after a crash stores the same object.
        key = f"recordings/{org}/{started_at:%Y/%m/%d}/{call_id}/{recording_id}.wav"
        recorder = None
        if self._recording:
            meta = RecordingMeta(org, call_id, call_control_id, recording_id, key, sample_rate, started_at,
                                 self.node_id, encoding, stream_id, call_session_id)
            recorder = CallRecorder(self.spooler, self._spool, recording_id.hex, sample_rate,
                                    max_ms=self._recording_max_ms, sidecar=meta.to_json())
        return CallRecord(org, call_id, call_control_id, recording_id, recorder, key)

    def transcript_final(self, call: CallRecord, ev: TranscriptEvent, provider: str, *, language: str = "en",
                         redacted: bool = False) -> None:
        """Store a final transcript; ``ev`` must already be redacted."""
        self._transcript(call, ev, provider, language, redacted, "final")

    def transcript_partial(self, call: CallRecord, ev: TranscriptEvent, provider: str, *, language: str = "en",
                           redacted: bool = False) -> None:
        """Store the last partial of an utterance that got no final (``pipelines.partials``); ``ev`` must
        already be redacted.  A final of the same utterance stored later replaces it."""
        self._transcript(call, ev, provider, language, redacted, "partial")

    def _transcript(self, call: CallRecord, ev: TranscriptEvent, provider: str, language: str, redacted: bool,
                    kind: str) -> None:
        payload = ev.payload()  # the stored words are the published ones
        self.tiers.writer.submit(TranscriptStored(
            call.org_id, call.call_control_id, ev.stream_id, ev.track, ev.seq, ev.text, payload["confidence"],
            payload["words"], ev.start, ev.end, provider, language, redacted, kind,
        ))

    def translation(self, call: CallRecord, stream_id: str, track: str, seq: int, tr: Translation) -> None:
        self.tiers.writer.submit(TranslationStored(
            call.org_id, call.call_control_id, stream_id, track, seq, tr.source_lang, tr.target_lang, tr.original,
            tr.translated, tr.provider))

    def agent_joined(self, call: CallRecord, user_id: uuid.UUID, session_id: str) -> None:
        """A signed-in agent's session was bridged to the call: the call's agent (the first one), audited."""
        w = self.tiers.writer
        w.submit(CallAgent(call.org_id, call.call_control_id, user_id))
        w.submit(AuditEntry(call.org_id, "call.agent_joined", "call", str(call.call_id), actor_type="user",
                            actor_id=str(user_id), new_value={"session_id": session_id}))

    def call_ended(self, call: CallRecord, *, reason: str, failed: bool, stats: dict[str, Any]) -> None:
        w = self.tiers.writer
        status = "failed" if failed else "completed"
        if call.recorder is not None:
            call.recorder.stop()
            stats = {**stats, "recording_truncated_ms": call.recorder.truncated_ms}
        if call.closed_elsewhere:  # final already (failed/node_lost, audited by the sweep): nothing over it
            log.warning("call.end_not_stored", extra={"call_id": call.call_control_id, "reason": reason,
                                                      "why": "closed as node_lost while this node was declared lost"})
        else:
            w.submit(CallEnded(call.org_id, call.call_control_id, status, reason, datetime.now(UTC), stats))
            w.submit(SummaryDue(call.org_id, call.call_control_id))
            w.submit(AuditEntry(call.org_id, "call.ended", "call", str(call.call_id), actor_type="system",
                                old_value={"status": "active"},
                                new_value={"status": status, "reason": reason[:200]}))
        if call.recorder is not None:
            task = asyncio.get_running_loop().create_task(self._store_recording(call), name="recording-upload")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _store_recording(self, call: CallRecord) -> None:
        """Build, upload, record; the local files go only once the row is committed.  Until then (an
        outage, a crash) they stay in the spool, where the next start's recovery finds them."""
        assert call.recorder is not None
        async with self._uploads:
            rec = await call.recorder.finish()
            if rec is None:
                return
            key = call.recording_key
            if not await self.upload(key, rec, call.call_control_id):
                return
        stored: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        accepted = self.tiers.writer.submit(
            RecordingStored(call.org_id, call.recording_id, call.call_control_id, key, rec.bytes, rec.duration_ms,
                            rec.channels, rec.sample_rate, rec.sha256),
            on_done=lambda ok: stored.done() or stored.set_result(ok))
        self.tiers.writer.submit(AuditEntry(call.org_id, "recording.stored", "recording", key,
                                            new_value={"bytes": rec.bytes, "duration_ms": rec.duration_ms}))
        if not accepted or not await stored:
            log.error("recording.row_unsaved", extra={"call_id": call.call_control_id, "key": key,
                                                      "path": str(rec.path), "action": "kept for recovery"})
            return
        sidecar = call.recorder.sidecar_path
        await asyncio.to_thread(_unlink, rec.path, *([sidecar] if sidecar else []))
        self.recordings_stored += 1

    async def upload(self, key: str, rec: RecordingFile, call_control_id: str) -> bool:
        """Upload with retries; False (counted in ``recordings_failed``, logged) when all failed."""
        backoff = Backoff(0.5, 8.0)
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                await self.tiers.blobs.put_file(key, rec.path, "audio/wav")
                return True
            except Exception as exc:  # any failure: retry, then keep the file and report it
                if attempt == UPLOAD_ATTEMPTS:
                    self.recordings_failed += 1
                    log.error("recording.upload_failed", extra={"call_id": call_control_id, "key": key,
                                                                "path": str(rec.path), "error": type(exc).__name__})
                    return False
                await asyncio.sleep(backoff.next())
        return False

    def run_in_background(self, coro: Coroutine[Any, Any, object], name: str) -> None:
        """Run ``coro`` as a task that ``drain`` waits for (spool recovery at start-up)."""
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def upload_slot(self) -> asyncio.Semaphore:
        """Held while a recording is built and uploaded (``recording_uploads`` at a time)."""
        return self._uploads

    async def drain(self, wait_s: float) -> None:
        """Wait for recording uploads in flight (at shutdown), then stop the spool thread."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=wait_s)
        await asyncio.to_thread(self.spooler.shutdown)

    def stats(self) -> dict[str, Any]:
        s = self.tiers.writer.stats
        return {"writer_pending": self.tiers.writer.pending, "writer_written": s.written,
                "writer_dropped": s.dropped, "writer_rejected": s.rejected, "writer_retries": s.retries,
                "writer_last_error": s.last_error, "recordings_stored": self.recordings_stored,
                "recordings_failed": self.recordings_failed, "uploads_in_flight": len(self._tasks),
                "recordings_recovered": self.recordings_recovered,
                "recordings_unrecoverable": self.recordings_unrecoverable,
                "calls_closed_on_start": self.calls_closed_on_start,
                "imports_failed_on_start": self.imports_failed_on_start,
                "spool_pending_bytes": self.spooler.pending_bytes, "spool_errors": self.spooler.errors}


def _unlink(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


@dataclass(slots=True)
class BusGap:
    """What one call lost to the forwarder's overflow, and is owed to its viewers on other nodes."""

    first: int  # the lost events' ids on this node: the lowest ...
    last: int  # ... and the highest
    lost: int = 0  # how many (the ids between include droppable events, never on the bus)
    ended: tuple[bytes, int] | None = None  # its call.ended (data, id), kept: the end is never lost

    def payload(self) -> bytes:
        return orjson.dumps({"lost_from": self.first, "lost_to": self.last, "lost": self.lost, "cause": "bus_overflow"})


class BusForwarder:
    """Copies non-droppable hub events (call lifecycle, final transcripts) to Redis Streams for other nodes.

    Bounded: at most ``max_items`` events wait; past that the oldest is dropped and counted in
    ``dropped`` (SSE clients on this node are unaffected: they read the hub, not the bus).  Failures
    to reach Redis are retried with backoff while the buffer holds.

    A loss is never silent for viewers on other nodes either.  Each call that lost events gets one
    ``stream.gap`` event on its stream, ``{"lost_from", "lost_to", "lost", "cause": "bus_overflow"}``
    (the form of the SSE replay's own gap notice, which the consoles already show), under the id of its
    last lost event: after everything it published before the loss and before anything after it, so
    ``Last-Event-ID`` keeps its meaning.  It goes out before the call's next event, or as soon as Redis
    takes it when nothing follows.  A dropped ``call.ended`` is not lost but kept with the gap and
    published after it, so a remote viewer is never left waiting for an end.  Bound: gap records for at
    most ``MAX_GAPS`` calls (a few numbers each, and at most one kept end), independent of the event
    buffer's size: every live call may lose events in one outage; past it the oldest record goes
    (counted in ``gaps_lost``, logged ``bus.gap_unsignalled``).
    The event in flight when the overflow pushes it out is lost only if its publish then fails.
    """

    def __init__(self, bus: EventBus, max_items: int) -> None:
        self._bus = bus
        self._buf: BoundedChannel[tuple[str, str, bytes, int]] = BoundedChannel(
            max_items, Policy.LATEST, on_drop=self._dropped, name="bus-forward")
        self._gaps: dict[str, BusGap] = {}  # by call, oldest first
        self._inflight: tuple[str, str, bytes, int] | None = None
        self._evicted = False  # the overflow pushed the event in flight out of the buffer
        self._task: asyncio.Task[None] | None = None
        self.forwarded = 0
        self.dropped = 0
        self.gaps_signalled = 0
        self.gaps_lost = 0
        self.errors = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="bus-forwarder")

    @property
    def pending(self) -> int:
        """Events waiting for Redis (gap notices and kept ends included)."""
        return len(self._buf) + sum((g.lost > 0) + (g.ended is not None) for g in self._gaps.values())

    def tap(self, call_id: str, ev: HubEvent) -> None:
        if ev.droppable:
            return
        self._buf.put((call_id, ev.event, ev.data, ev.id))

    def _dropped(self, item: tuple[str, str, bytes, int]) -> None:
        if item is self._inflight:
            self._evicted = True  # lost only if its publish fails (decided in _forward_head)
            return
        self._lose(item)

    def _lose(self, item: tuple[str, str, bytes, int]) -> None:
        call_id, event, data, ref = item
        gap = self._gaps.get(call_id)
        if gap is None:
            if len(self._gaps) >= MAX_GAPS:
                old_id, old = next(iter(self._gaps.items()))
                del self._gaps[old_id]
                self.gaps_lost += 1
                log.error("bus.gap_unsignalled", extra={"call_id": old_id, "lost": old.lost})
            gap = self._gaps[call_id] = BusGap(ref, ref)
        if event == "call.ended":
            gap.ended = (data, ref)
            return
        # min/max: the event in flight, lost after later ones were already dropped, is the oldest.
        gap.first, gap.last = (min(gap.first, ref), max(gap.last, ref)) if gap.lost else (ref, ref)
        gap.lost += 1
        self.dropped += 1

    async def _run(self) -> None:
        backoff = Backoff(0.1, 5.0)
        while True:
            if not self._buf and not self._gaps:
                await self._buf.wait()
            try:
                # Gaps first: a call's owed notice and end are older than anything of it still buffered,
                # and a call with nothing more to send must not wait behind a buffer that never empties.
                if self._gaps:
                    await self._signal(next(iter(self._gaps)))
                else:
                    await self._forward_head()
            except (OSError, RedisError) as exc:
                self.errors += 1
                log.warning("bus.publish_failed", extra={"error": type(exc).__name__, "pending": self.pending})
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()

    async def _forward_head(self) -> None:
        item = self._buf.peek()  # left in place until Redis has it: a failed publish is retried
        call_id, event, data, ref = item
        self._inflight, self._evicted = item, False
        try:
            await self._bus.publish(call_id, event, data, ref=ref)
            if event == "call.ended":
                await self._bus.end(call_id)
            self.forwarded += 1
        except ValueError as exc:  # an event the bus refuses (too large): report it, go on
            self.errors += 1
            log.error("bus.event_refused", extra={"call_id": call_id, "event": event, "error": str(exc)})
        except BaseException:
            if self._evicted:
                self._lose(item)  # pushed out of the buffer meanwhile and not published: lost after all
            raise
        finally:
            self._inflight = None
        if not self._evicted and self._buf and self._buf.peek() is item:
            self._buf.get_nowait()

    async def _signal(self, call_id: str) -> None:
        """The call's ``stream.gap`` (when events were lost) and its kept ``call.ended``, in id order.  The
        record leaves the table while it is told (losses meanwhile start a new, later one); each part is
        marked done as it goes, and what a failure left untold goes back, merged with any newer loss."""
        gap = self._gaps.pop(call_id)
        try:
            if gap.ended is not None and (not gap.lost or gap.ended[1] < gap.last):  # a restarted stream's loss
                await self._publish_end(call_id, gap)
            if gap.lost:
                await self._bus.publish(call_id, "stream.gap", gap.payload(), ref=gap.last)
                log.warning("bus.gap_signalled", extra={"call_id": call_id, "lost_from": gap.first,
                                                        "lost_to": gap.last, "lost": gap.lost})
                gap.lost = 0
                self.gaps_signalled += 1
            if gap.ended is not None:
                await self._publish_end(call_id, gap)
        except BaseException:
            newer = self._gaps.pop(call_id, None)
            if newer is not None:
                if newer.lost:
                    gap.first, gap.last = (min(gap.first, newer.first), newer.last) if gap.lost else (
                        newer.first, newer.last)
                    gap.lost += newer.lost
                gap.ended = gap.ended or newer.ended
            if gap.lost or gap.ended is not None:
                self._gaps[call_id] = gap
            raise

    async def _publish_end(self, call_id: str, gap: BusGap) -> None:
        assert gap.ended is not None
        data, ref = gap.ended
        await self._bus.publish(call_id, "call.ended", data, ref=ref)
        await self._bus.end(call_id)
        gap.ended = None
        self.forwarded += 1

    async def aclose(self, drain_s: float = 2.0) -> None:
        """Give waiting events ``drain_s`` to reach Redis, then stop; what is left is logged."""
        deadline = asyncio.get_running_loop().time() + drain_s
        while self.pending and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110 - polls a deque
            await asyncio.sleep(0.02)
        if self.pending:
            log.warning("bus.unforwarded", extra={"count": self.pending})
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
