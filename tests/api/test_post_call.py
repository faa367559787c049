"""The post-call worker against real PostgreSQL and a local cold tier: a stored dual-channel recording
transcribed through the fake AssemblyAI asynchronous API, redacted before it is stored, once however
often the job runs; provider errors retried or failed as documented; a job whose node died is taken
again after its lease."""

from __future__ import annotations

import asyncio
import io
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile

from api.post_call import PostCall, enqueue
from api.settings import Settings
from pipelines.redaction import Redactor
from storage.blobs import LocalBlobStore
from storage.db import Database
from tests.api.rest_world import World, build_world
from tests.fakes.assemblyai_batch import FakeAssemblyAIBatch
from tests.servers import free_port

CARD = "4111 1111 1111 1111"
SCRIPT = {1: ["hello i can pay today", f"my card number is {CARD}"], 2: ["thank you for calling"]}


@pytest.fixture(scope="module")
def world(pg_admin_url: str, redis_url: str) -> World:
    return asyncio.run(build_world(pg_admin_url, redis_url, 12))


def _wav(seconds: float = 4.0) -> bytes:
    n = int(8000 * seconds)
    both = (np.random.default_rng(1).normal(0, 1000, (n, 2))).astype(np.int16)
    out = io.BytesIO()
    soundfile.write(out, both, 8000, subtype="PCM_16", format="WAV")
    return out.getvalue()


async def _recording(db: Database, blobs: LocalBlobStore, org: uuid.UUID) -> tuple[uuid.UUID, uuid.UUID]:
    """A call with a stored Telnyx recording and its batch_transcribe job."""
    data = _wav()
    call_id, rid = uuid.uuid4(), uuid.uuid4()
    key = f"recordings/{org}/test/{call_id}/telnyx-{rid}.wav"
    await blobs.put(key, data, "audio/wav")
    async with db.tenant(org) as conn:
        await conn.execute("INSERT INTO calls (id, org_id, call_control_id, status) VALUES ($1, $2, $3, 'completed')",
                           call_id, org, f"v3:{call_id.hex}")
        await conn.execute(
            "INSERT INTO recordings (id, org_id, call_id, storage_key, bytes, duration_ms, channels, sample_rate, "
            "sha256, source) VALUES ($1, $2, $3, $4, $5, 4000, 2, 8000, 'x', 'telnyx')", rid, org, call_id, key,
            len(data))
        await enqueue(conn, org, call_id, "batch_transcribe", f"batch:{rid}", {"recording_id": str(rid)})
    return call_id, rid


def _worker(db: Database, blobs: LocalBlobStore, tmp: Path, port: int, **over: object) -> PostCall:
    s = Settings(batch_stt="assemblyai", assemblyai_api_key="aai-test",  # type: ignore[arg-type]
                 assemblyai_batch_url=f"http://127.0.0.1:{port}", **over)
    return PostCall(s, db, blobs, Redactor(), tmp / "work")


async def _job(db: Database, call_id: uuid.UUID) -> dict:  # type: ignore[type-arg]
    async with db.no_tenant() as conn:
        return dict(await conn.fetchrow("SELECT status, attempts, last_error, next_attempt_at > now() AS later "
                                        "FROM call_jobs WHERE call_id = $1 AND kind = 'batch_transcribe'", call_id))


async def test_a_recording_is_transcribed_by_channel_redacted_and_stored_once(
        world: World, db: Database, tmp_path: Path) -> None:
    org = world.a.org_id
    blobs = LocalBlobStore(tmp_path / "blobs", b"k" * 32)
    await blobs.start()
    call_id, rid = await _recording(db, blobs, org)
    port = free_port()
    async with FakeAssemblyAIBatch(port, SCRIPT) as fake:
        worker = _worker(db, blobs, tmp_path, port)
        worker.work_dir.mkdir(parents=True)
        try:
            assert await worker.run_once() is True
            assert (await _job(db, call_id))["status"] == "done"
            # Run it again (a node that died after storing, before marking it done): nothing doubles.
            async with db.no_tenant() as conn:
                await conn.execute("UPDATE call_jobs SET status = 'running', lease_until = now() - interval '1 s' "
                                   "WHERE call_id = $1", call_id)
            assert await worker.run_once() is True
            assert await worker.run_once() is True  # the summary the transcription made due
            assert await worker.run_once() is False  # nothing else due
        finally:
            await worker.aclose()
    created = [body for method, path, body in fake.requests if path == "/v2/transcript" and method == "POST"]
    assert len(created) == 2
    assert created[0]["multichannel"] is True and created[0]["redact_pii"] is True
    assert created[0]["language_code"] == "en"
    assert list(fake.uploads.values())[0] == await blobs.get(f"recordings/{org}/test/{call_id}/telnyx-{rid}.wav")
    async with db.tenant(org) as conn:
        rows = await conn.fetch("SELECT track, seq, text, provider, redacted, kind, stream_id, words "
                                "FROM transcriptions WHERE call_id = $1 ORDER BY track, seq", call_id)
        audits = await conn.fetchval("SELECT count(*) FROM audit_logs WHERE action = 'call.transcribed' "
                                     "AND resource_id = $1", str(call_id))
    assert [(r["track"], r["seq"]) for r in rows] == [("inbound", 1), ("inbound", 2), ("outbound", 1)]
    assert rows[0]["text"] == "hello i can pay today" and rows[2]["text"] == "thank you for calling"
    assert rows[1]["text"] == "my card number is [REDACTED:card]"
    assert all(CARD.split()[0] not in w["word"] for w in rows[1]["words"])
    assert all(r["kind"] == "batch" and r["provider"] == "assemblyai-batch" and r["redacted"] for r in rows)
    assert {r["stream_id"] for r in rows} == {f"batch:{rid}"}
    assert audits == 2  # each run audits; the rows are stored once
    async with db.tenant(org) as conn:
        summary = await conn.fetchrow("SELECT summary, score, source FROM call_summaries WHERE call_id = $1", call_id)
    assert summary["source"] == "batch" and "i can pay today" in summary["summary"] and "4111" not in summary["summary"]
    assert summary["score"]["promise_to_pay"] == {"amount": None, "date": "today"}


async def test_provider_errors_retry_or_fail_as_documented(world: World, db: Database, tmp_path: Path) -> None:
    org = world.a.org_id
    blobs = LocalBlobStore(tmp_path / "blobs", b"k" * 32)
    await blobs.start()
    port = free_port()
    # Nobody listens: a network error, retried later.
    down, _ = await _recording(db, blobs, org)
    worker = _worker(db, blobs, tmp_path, port, post_call_attempts=2)
    worker.work_dir.mkdir(parents=True)
    try:
        assert await worker.run_once() is True
        job = await _job(db, down)
        assert (job["status"], job["attempts"], job["later"]) == ("pending", 1, True)
        assert "assemblyai" in job["last_error"]
        # The transcript ends in "error": final at once, audited.
        async with FakeAssemblyAIBatch(port, SCRIPT, polls_before_done=0) as fake:
            fake.fail_with = "File does not appear to contain audio"
            bad, _ = await _recording(db, blobs, org)
            async with db.no_tenant() as conn:  # the first job waits for its retry: take the new one
                await conn.execute("UPDATE call_jobs SET next_attempt_at = now() + interval '1 h' WHERE call_id = $1",
                                   down)
            assert await worker.run_once() is True
            job = await _job(db, bad)
            assert (job["status"], job["attempts"]) == ("failed", 1) and "contain audio" in job["last_error"]
            # The retried job's second attempt is its last: it fails too, and says so.
            fake.fail_with = None
            fake.api_key = "another"  # 401: not worth retrying
            async with db.no_tenant() as conn:
                await conn.execute("UPDATE call_jobs SET next_attempt_at = now() WHERE call_id = $1", down)
            assert await worker.run_once() is True
            job = await _job(db, down)
            assert (job["status"], job["attempts"]) == ("failed", 2)
    finally:
        await worker.aclose()
    async with db.tenant(org) as conn:
        failed = await conn.fetch("SELECT resource_id FROM audit_logs WHERE action = 'batch_transcribe.failed' "
                                  "AND resource_id IN ($1, $2)", str(down), str(bad))
        rows = await conn.fetchval("SELECT count(*) FROM transcriptions WHERE call_id IN ($1, $2)", down, bad)
    assert sorted(r["resource_id"] for r in failed) == sorted([str(down), str(bad)]) and rows == 0
    assert worker.counters.failed == 2 and worker.counters.retried == 1


async def test_a_job_that_breaks_unexpectedly_is_reported_and_the_worker_goes_on(
        world: World, db: Database, tmp_path: Path) -> None:
    org = world.a.org_id
    blobs = LocalBlobStore(tmp_path / "blobs", b"k" * 32)
    await blobs.start()
    good, _ = await _recording(db, blobs, org)
    async with db.tenant(org) as conn:
        await conn.execute("UPDATE call_jobs SET next_attempt_at = now() + interval '1 s' WHERE call_id = $1", good)
        await enqueue(conn, org, good, "batch_transcribe", f"broken:{uuid.uuid4()}", {"recording_id": "not-a-uuid"})
    port = free_port()
    async with FakeAssemblyAIBatch(port, SCRIPT, polls_before_done=0):
        worker = _worker(db, blobs, tmp_path, port, post_call_attempts=1)
        worker.work_dir.mkdir(parents=True)
        worker.start()
        try:
            async def settled() -> bool:
                async with db.no_tenant() as conn:
                    rows = await conn.fetch("SELECT status, last_error FROM call_jobs WHERE call_id = $1 "
                                            "AND kind = 'batch_transcribe'", good)
                return sorted(r["status"] for r in rows) == ["done", "failed"]
            async with asyncio.timeout(20):
                while not await settled():  # noqa: ASYNC110 - polls the table the worker writes
                    await asyncio.sleep(0.1)
        finally:
            await worker.aclose()
    async with db.no_tenant() as conn:
        failed = await conn.fetchval("SELECT last_error FROM call_jobs WHERE call_id = $1 AND status = 'failed' "
                                     "AND kind = 'batch_transcribe'", good)
    assert failed == "internal: ValueError"
    assert worker.counters.failed >= 1 and worker.counters.done >= 1
