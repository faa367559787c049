"""The batched writer: order, rejection of bad records, overflow, and a PostgreSQL restart mid-call."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from storage import embedded
from storage.db import Database
from storage.records import AuditEntry, CallEnded, CallStarted, TranscriptStored
from storage.writer import PersistWriter
from tests.storage.conftest import migrated_database
from tests.storage.test_db import make_org


def started(org: uuid.UUID, ccid: str) -> CallStarted:
    return CallStarted(org, uuid.uuid4(), ccid, None, "s-1", None, None, "PCMU", 8000, datetime.now(UTC))


def final(org: uuid.UUID, ccid: str, seq: int, text: str = "", stream: str = "s-1") -> TranscriptStored:
    return TranscriptStored(org, ccid, stream, "inbound", seq, text or f"utterance {seq}", 0.9,
                           [{"word": "utterance", "start": 0, "end": 100}], seq * 1000, seq * 1000 + 800, "test")


async def count(db: Database, org: uuid.UUID, sql: str) -> int:
    async with db.tenant(org) as conn:
        return int(await conn.fetchval(sql))


async def test_records_of_two_tenants_are_written_in_order_each_in_its_tenant(db: Database) -> None:
    a, b = await make_org(db, "alpha"), await make_org(db, "bravo")
    w = PersistWriter(db, batch=7, flush_interval=0.01)
    w.start()
    for org in (a, b):
        assert w.submit(started(org, "call-1"))
    for seq in range(1, 21):
        for org in (a, b):
            assert w.submit(final(org, "call-1", seq))
    for org in (a, b):
        w.submit(CallEnded(org, "call-1", "completed", "stop", datetime.now(UTC), {"finals": 20}))
    assert await w.flush(10)
    await w.aclose()
    for org in (a, b):
        assert await count(db, org, "SELECT count(*) FROM transcriptions") == 20
        async with db.tenant(org) as conn:
            row = await conn.fetchrow("SELECT status, stats FROM calls")
        assert row["status"] == "completed" and row["stats"] == {"finals": 20}
    assert w.stats.written == 2 + 40 + 2 and w.stats.rejected == 0 and w.stats.dropped == 0


async def test_a_retried_batch_writes_nothing_twice(db: Database) -> None:
    a = await make_org(db, "alpha")
    w = PersistWriter(db, flush_interval=0.01)
    w.start()
    entry = AuditEntry(a, "call.started", "call", "c")
    for record in (started(a, "c"), final(a, "c", 1), entry, started(a, "c"), final(a, "c", 1), entry):
        w.submit(record)
    assert await w.flush(10)
    await w.aclose()
    assert await count(db, a, "SELECT count(*) FROM calls") == 1
    assert await count(db, a, "SELECT count(*) FROM transcriptions") == 1
    assert await count(db, a, "SELECT count(*) FROM audit_logs") == 1


async def test_a_late_final_replaces_its_utterances_partial_and_a_partial_never_replaces_a_final(
        db: Database) -> None:
    a = await make_org(db, "alpha")
    w = PersistWriter(db, flush_interval=0.01)
    w.start()
    w.submit(started(a, "c"))
    w.submit(dataclasses.replace(final(a, "c", 1, "cut off"), kind="partial"))
    w.submit(final(a, "c", 1, "the late final"))  # its final came after all
    w.submit(final(a, "c", 2, "second"))
    w.submit(dataclasses.replace(final(a, "c", 2, "a stale partial"), kind="partial"))
    assert await w.flush(10)
    await w.aclose()
    assert w.stats.rejected == 0
    async with db.tenant(a) as conn:
        rows = await conn.fetch("SELECT seq, kind, text FROM transcriptions ORDER BY seq")
    assert [tuple(r) for r in rows] == [(1, "final", "the late final"), (2, "final", "second")]


async def test_a_restarted_media_stream_of_the_same_call_keeps_both_streams_transcripts(db: Database) -> None:
    a = await make_org(db, "alpha")
    w = PersistWriter(db, flush_interval=0.01)
    w.start()
    w.submit(started(a, "c"))
    w.submit(final(a, "c", 1, "first stream", stream="s-1"))
    w.submit(started(a, "c"))  # Telnyx restarted the stream: new stream id, utterance numbers start again
    w.submit(final(a, "c", 1, "second stream", stream="s-2"))
    assert await w.flush(10)
    await w.aclose()
    async with db.tenant(a) as conn:
        rows = await conn.fetch("SELECT stream_id, seq, text FROM transcriptions ORDER BY stream_id")
    assert [tuple(r) for r in rows] == [("s-1", 1, "first stream"), ("s-2", 1, "second stream")]


async def test_a_bad_record_is_rejected_and_reported_without_losing_its_batch(
        db: Database, caplog: pytest.LogCaptureFixture) -> None:
    a = await make_org(db, "alpha")
    w = PersistWriter(db, flush_interval=0.05)
    w.start()
    w.submit(started(a, "c"))
    w.submit(final(a, "c", 1))
    w.submit(final(a, "no-such-call", 1, text="secret 4111 1111 1111 1111"))  # its call was never stored
    w.submit(final(a, "c", -5))  # violates seq >= 0
    w.submit(final(a, "c", 2))
    assert await w.flush(10)
    await w.aclose()
    assert await count(db, a, "SELECT count(*) FROM transcriptions") == 2
    assert w.stats.rejected == 2 and w.stats.written == 3
    rejected = [r for r in caplog.records if r.getMessage() == "writer.rejected"]
    assert [r.kind for r in rejected] == ["TranscriptStored", "TranscriptStored"]  # type: ignore[attr-defined]
    assert {r.error for r in rejected} == {"MissingParent", "CheckViolationError"}  # type: ignore[attr-defined]
    assert "4111" not in caplog.text  # the record's content never reaches the log


async def test_each_record_is_confirmed_once_stored_rejected_or_left_unsaved(db: Database) -> None:
    a = await make_org(db, "alpha")
    w = PersistWriter(db, flush_interval=0.01)
    w.start()
    outcome: dict[str, list[bool]] = {}

    def note(name: str):  # type: ignore[no-untyped-def]
        return lambda ok: outcome.setdefault(name, []).append(ok)

    assert w.submit(started(a, "c"), on_done=note("call"))
    assert w.submit(final(a, "c", 1), on_done=note("final"))
    assert w.submit(final(a, "no-such-call", 1), on_done=note("orphan"))  # its call was never stored
    assert await w.flush(10)
    assert outcome == {"call": [True], "final": [True], "orphan": [False]}
    await w.aclose()
    stalled = PersistWriter(db)  # never started: what it holds at close is unsaved
    assert stalled.submit(final(a, "c", 2), on_done=note("unsaved"))
    await stalled.aclose(drain_s=0.1)
    assert outcome["unsaved"] == [False] and stalled.stats.unsaved == 1


async def test_overflow_refuses_and_counts_and_never_blocks(db: Database) -> None:
    a = await make_org(db, "alpha")
    w = PersistWriter(db, max_items=100, flush_interval=0.01)  # not started: nothing drains
    accepted = sum(w.submit(final(a, "c", i)) for i in range(150))
    assert accepted == 100 and w.stats.dropped == 50 and w.pending == 100
    await w.aclose(drain_s=0.1)
    assert w.stats.unsaved == 100


async def test_writer_survives_a_postgresql_restart_mid_call_with_nothing_lost(tmp_path: Path) -> None:
    # A server of its own: this test stops and starts it.
    pg = await asyncio.to_thread(embedded.start_postgres, tmp_path / "pg")
    try:
        urls = await migrated_database(pg.uri)
        db = Database(urls.app, min_size=1, max_size=2, connect_timeout=1.0, command_timeout=2.0)
        await db.open()
        org = await make_org(db, "alpha")
        w = PersistWriter(db, max_items=5000, flush_interval=0.02, retry_initial=0.05, retry_max=0.5)
        w.start()
        w.submit(started(org, "call-r"))
        assert await w.flush(5)

        submitted = 0

        async def live_call(seconds: float) -> None:
            # One final transcript every 20 ms, as a busy node might produce, across the outage.
            nonlocal submitted
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                submitted += 1
                assert w.submit(final(org, "call-r", submitted))
                await asyncio.sleep(0.02)

        call = asyncio.create_task(live_call(4.0))
        await asyncio.sleep(0.8)
        await asyncio.to_thread(pg.stop)
        down_at = time.monotonic()
        await asyncio.sleep(1.5)
        pending_during_outage = w.pending
        await asyncio.to_thread(pg.start)
        outage = time.monotonic() - down_at
        await call
        assert await w.flush(20), f"still pending: {w.pending}"
        await w.aclose()
        assert pending_during_outage > 30  # records really waited in the buffer
        assert w.stats.retries > 0 and w.stats.dropped == 0 and w.stats.rejected == 0
        async with db.tenant(org) as conn:
            seqs = [r["seq"] for r in await conn.fetch("SELECT seq FROM transcriptions ORDER BY seq")]
        assert seqs == list(range(1, submitted + 1)), f"outage {outage:.1f}s, {submitted} submitted"
        await db.aclose()
    finally:
        await asyncio.to_thread(pg.shutdown)
