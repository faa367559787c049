"""The post-call worker against real PostgreSQL and a local cold tier: a stored dual-channel recording
transcribed through the fake AssemblyAI asynchronous API, redacted before it is stored, once however
often the job runs; provider errors retried or failed as documented; a job whose node died is taken
again after its lease.  The summary through the fake OpenAI-compatible server: end to end in the
running server (redacted input, the model's result in the call's detail), and by the worker's own
hand for the fallbacks (unusable answer, timeout), a 429 then success, and no key."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
import soundfile

from api.auth import Role
from api.post_call import PostCall, enqueue
from api.settings import Settings
from pipelines.redaction import Redactor
from storage.blobs import LocalBlobStore
from storage.db import Database
from tests.api.rest_world import World, build_world, call, world_server
from tests.fakes.assemblyai_batch import FakeAssemblyAIBatch
from tests.fakes.openai_compat import FakeOpenAI
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
    over = {"summary": "offline", **over}  # a key in the environment must not reach a real provider
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


# -- the summary through an OpenAI-compatible model ---------------------------------------------------

LLM_KEY = "gsk_test_summary_0123456789"
ANSWER: dict[str, Any] = {"summary": "Disclosure given. The consumer promised 120.50 on 2026-12-04.",
                          "disclosure_spoken": True, "promise_to_pay": {"amount": "120.50", "date": "2026-12-04"},
                          "dispute": False, "callback_requested": False}
# Stored lines; the second escaped redaction when it was written (the canary: it must leave redacted).
LINES = [("outbound", "Hello, this is an attempt to collect a debt."), ("inbound", f"my card number is {CARD}"),
         ("inbound", "I can pay 120.50 on December 4th.")]


def _answering(answer: Any) -> Any:
    text = answer if isinstance(answer, str) else orjson.dumps(answer).decode()
    return lambda _user: text


async def _spoken_call(db: Database, org: uuid.UUID) -> tuple[uuid.UUID, str]:
    """An ended call with live lines (one of them not redacted) and its summarize job."""
    call_id = uuid.uuid4()
    ccid = f"v3:summary-{call_id.hex[:12]}"
    async with db.tenant(org) as conn:
        await conn.execute("INSERT INTO calls (id, org_id, call_control_id, status, started_at, ended_at) "
                           "VALUES ($1, $2, $3, 'completed', '2026-11-30 15:00Z', '2026-11-30 15:05Z')",
                           call_id, org, ccid)
        for seq, (track, text) in enumerate(LINES, 1):
            await conn.execute("INSERT INTO transcriptions (org_id, call_id, track, seq, text, start_ms) "
                               "VALUES ($1, $2, $3, $4, $5, $6)", org, call_id, track, seq, text, seq * 1000)
        await enqueue(conn, org, call_id, "summarize", f"summary-live:{call_id}", {"source": "live"})
    return call_id, ccid


async def _stored_summary(db: Database, org: uuid.UUID, call_id: uuid.UUID) -> dict[str, Any] | None:
    async with db.tenant(org) as conn:
        row = await conn.fetchrow("SELECT summary, score, provider, engine, model, fallback, source "
                                  "FROM call_summaries WHERE call_id = $1", call_id)
    return dict(row) if row else None


def _llm_worker(db: Database, tmp: Path, base_url: str, **over: Any) -> PostCall:
    s = Settings(summary="llm", openai_api_key=LLM_KEY, openai_base_url=base_url,  # type: ignore[arg-type]
                 openai_model="llama-test", **over)
    worker = PostCall(s, db, LocalBlobStore(tmp / "blobs", b"k" * 32), Redactor(), tmp / "work")
    worker.work_dir.mkdir(parents=True)
    return worker


def _assert_sent_redacted(fake: FakeOpenAI) -> None:
    [body] = fake.requests[-1:]
    sent = orjson.dumps(body).decode()
    assert "Consumer: my card number is [REDACTED:card]" in body["messages"][1]["content"]
    assert "4111" not in sent and "1111 1111" not in sent


async def test_the_running_server_summarises_an_ended_call_through_the_model(
        world: World, db: Database, tmp_path: Path) -> None:
    """End to end: SWITCHBOARD_SUMMARY=llm with GROQ_API_KEY in the server's environment; the post-call
    worker takes the job, the fake model answers, the call's detail shows the model's summary."""
    org = world.a.org_id
    async with FakeOpenAI(api_key=LLM_KEY, transform=_answering(ANSWER)) as fake:
        with world_server(tmp_path, world, GROQ_API_KEY=LLM_KEY, SWITCHBOARD_OPENAI_BASE_URL=fake.base_url,
                          SWITCHBOARD_OPENAI_MODEL="llama-test", SWITCHBOARD_SUMMARY="llm",
                          SWITCHBOARD_POST_CALL_INTERVAL_S="0.2") as server:
            call_id, ccid = await _spoken_call(db, org)
            async with aiohttp.ClientSession() as http:
                deadline = time.monotonic() + 20
                while True:
                    status, body = await call(http, server, "GET", f"/api/calls/{ccid}", world.a.keys[Role.ADMIN])
                    assert status == 200, body
                    if body["data"]["summary"] is not None or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.2)
                _, stats = await call(http, server, "GET", "/api/stats", world.a.keys[Role.ADMIN])
    summary = body["data"]["summary"]
    assert summary is not None, "no summary within 20 s"
    assert (summary["engine"], summary["model"], summary["provider"], summary["fallback"]) == (
        "llm", "llama-test", "openai", None)
    assert summary["text"] == ANSWER["summary"] and summary["source"] == "live"
    assert summary["score"]["promise_to_pay"] == {"amount": "120.50", "date": "2026-12-04"}
    assert summary["score"]["disclosure_spoken"] is True and summary["score"]["consumer_lines"] == 2
    _assert_sent_redacted(fake)
    # The call's date reaches the model, so "Friday" can become a date.
    assert "2026-11-30" in fake.requests[0]["messages"][0]["content"]
    post_call = stats["post_call"]
    assert post_call["summary_engine"] == "llm" and post_call["summaries_llm"] == 1
    assert post_call["summary_fallbacks"] == 0
    stored = await _stored_summary(db, org, call_id)
    assert stored is not None and stored["engine"] == "llm" and stored["model"] == "llama-test"


async def test_an_unusable_answer_stores_the_offline_summary_and_counts_the_fallback(
        world: World, db: Database, tmp_path: Path) -> None:
    org = world.a.org_id
    async with FakeOpenAI(api_key=LLM_KEY, transform=_answering("Here is your summary: all good!")) as fake:
        call_id, _ = await _spoken_call(db, org)
        worker = _llm_worker(db, tmp_path, fake.base_url)
        try:
            assert await worker.run_once() is True
        finally:
            await worker.aclose()
    _assert_sent_redacted(fake)
    stored = await _stored_summary(db, org, call_id)
    assert stored is not None
    assert (stored["engine"], stored["model"], stored["provider"]) == ("offline", None, "rules")
    assert stored["fallback"] == "not_json: content is not a JSON value"
    assert "[REDACTED:card]" in stored["summary"] and "4111" not in stored["summary"]  # the rules quote lines
    assert stored["score"]["disclosure_spoken"] is True
    stats = worker.stats()
    assert stats["summary_fallbacks"] == 1 and stats["summary_fallback_reasons"] == {"not_json": 1}
    assert stats["jobs_done"] == 1  # a fallback is a summary, not a failed job


async def test_429_then_success_and_a_timeout_through_the_job(world: World, db: Database, tmp_path: Path) -> None:
    org = world.a.org_id
    async with FakeOpenAI(api_key=LLM_KEY, transform=_answering(ANSWER)) as fake:
        worker = _llm_worker(db, tmp_path, fake.base_url, summary_timeout_s=1.0)
        try:
            fake.fail_next(1, 429, retry_after="0.3")
            first, _ = await _spoken_call(db, org)
            assert await worker.run_once() is True
            fake.stall_next(1, 10.0)
            second, _ = await _spoken_call(db, org)
            t0 = time.monotonic()
            assert await worker.run_once() is True
            assert time.monotonic() - t0 < 3
        finally:
            await worker.aclose()
    ok, late = await _stored_summary(db, org, first), await _stored_summary(db, org, second)
    assert ok is not None and ok["engine"] == "llm" and ok["summary"] == ANSWER["summary"]
    assert fake.attempts == 3 and 0.28 <= fake.request_times[1] - fake.request_times[0] < 1.0
    assert late is not None and late["engine"] == "offline" and late["fallback"].startswith("timeout: ")
    stats = worker.stats()
    assert (stats["summaries_llm"], stats["summary_retries"], stats["summary_fallback_reasons"]) == (
        1, 1, {"timeout": 1})


async def test_without_a_key_auto_is_offline_and_nothing_is_sent(world: World, db: Database, tmp_path: Path) -> None:
    org = world.a.org_id
    async with FakeOpenAI(api_key=LLM_KEY, transform=_answering(ANSWER)) as fake:
        s = Settings(summary="auto", openai_api_key=None, openai_base_url=fake.base_url)
        worker = PostCall(s, db, LocalBlobStore(tmp_path / "blobs", b"k" * 32), Redactor(), tmp_path / "work")
        call_id, _ = await _spoken_call(db, org)
        try:
            assert await worker.run_once() is True
        finally:
            await worker.aclose()
    stored = await _stored_summary(db, org, call_id)
    assert stored is not None and (stored["engine"], stored["fallback"]) == ("offline", None)
    assert "4111" not in stored["summary"] and fake.attempts == 0
    assert worker.stats()["summary_engine"] == "offline" and worker.stats()["summary_fallbacks"] == 0
    with pytest.raises(ValueError, match="GROQ_API_KEY"):  # llm asked for explicitly, and no key: no start
        PostCall(Settings(summary="llm", openai_api_key=None), db, LocalBlobStore(tmp_path / "b2", b"k" * 32),
                 Redactor(), tmp_path / "work2")
