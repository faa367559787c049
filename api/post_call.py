"""Work after a call: Telnyx's recording into the cold tier, then a transcript of every stored recording.

The jobs (table ``call_jobs``, migration 0007), one row each::

    kind              written by               does                                writes when done
    recording_fetch   the webhook's            fetch the URL (api.recording_fetch)  a recordings row (source telnyx),
                      call.recording.saved     into the cold tier                   audit recording.stored, and a
                                                                                    batch_transcribe job
    batch_transcribe  a recording_fetch        cold tier -> recogniser -> redact     transcriptions (kind batch),
                                                                                    audit call.transcribed, and a
                                                                                    summarize job
    summarize         the call's end (storage  redacted lines -> the summary engine  call_summaries (engine offline
                      /records.py), a          (SWITCHBOARD_SUMMARY: offline rules   or llm, the model, the
                      batch_transcribe         or an OpenAI-compatible model)        fallback reason)

Each is written in the transaction that decided it, and writes its results in one transaction.

A job's states::

    pending --claimed--> running --done--> done
                         running --retryable error, attempts left--> pending (next_attempt_at backs off)
                         running --final error, or attempts spent--> failed   (audited, counted, logged)
                         running --lease_until passed (its node died)--> claimed again by any node

Exactly once: every effect is keyed by the job (the cold-tier key and the recordings row id come from
the job id; batch rows are ``ON CONFLICT DO NOTHING`` on (call, 'batch:<recording id>', track, seq)), so a
job run twice (a node died after the effect, before ``done``) changes nothing the second time.  Jobs are
claimed with ``FOR UPDATE SKIP LOCKED``: nodes share the table without running a job twice at once.

The dual-channel recording (Telnyx ``record_channels: dual``): channel 1 is the called party (our
``inbound`` track, the consumer), channel 2 our side (``outbound``, the agent).  Each channel is
transcribed in the language its live finals were in (the node's first language when it had none);
AssemblyAI when ``batch_stt`` says so (``auto``: when ``ASSEMBLYAI_API_KEY`` is set), else the local
recogniser, with its own single decoder process so a batch never takes a live call's decoder.  Text is
redacted (``pipelines.redaction``) before it is stored, whatever the provider did.

Bounds: ``post_call_workers`` jobs at once per node; a recording longer than ``batch_max_s`` is not
transcribed (the job fails with that reason, audited); files live in ``<data_dir>/post-call`` only
while their job runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import soundfile

from api.recording_fetch import FetchFailed, FetchRefused, RecordingFetcher
from api.settings import Settings
from engine.frames import Track
from pipelines.batch_stt import transcribe_channel
from pipelines.events import TranscriptEvent
from pipelines.redaction import Redactor
from pipelines.stt.assemblyai_batch import AssemblyAIBatch, BatchError, BatchUtterance
from pipelines.stt.base import SttProvider, Transcript, Word
from pipelines.summary_engine import SummaryEngine, make_engine
from storage.blobs import BlobStore
from storage.db import Database
from storage.records import AuditEntry

log = logging.getLogger("switchboard.post_call")

BACKOFF_S = 5.0
BACKOFF_MAX_S = 300.0
CHANNEL_TRACKS = {1: "inbound", 2: "outbound"}
BATCH_ROWS = 500  # transcript rows per INSERT


class JobFailed(Exception):
    """The job cannot succeed (``retry`` False) or may on a later attempt (``retry`` True)."""

    def __init__(self, reason: str, *, retry: bool) -> None:
        super().__init__(reason)
        self.retry = retry


@dataclass(slots=True)
class PostCallCounters:
    done: int = 0
    retried: int = 0
    failed: int = 0
    transcribed_rows: int = 0


@dataclass(frozen=True, slots=True)
class Job:
    id: uuid.UUID
    org_id: uuid.UUID
    call_id: uuid.UUID
    kind: str
    payload: dict[str, Any]
    attempts: int


async def enqueue(conn: asyncpg.Connection, org_id: uuid.UUID, call_id: uuid.UUID, kind: str, dedupe_key: str,
                  payload: dict[str, Any]) -> bool:
    """Add a job in the caller's transaction; ``False`` when one with ``dedupe_key`` exists."""
    return bool(await conn.fetchval(
        "INSERT INTO call_jobs (org_id, call_id, kind, dedupe_key, payload) VALUES ($1, $2, $3, $4, $5) "
        "ON CONFLICT (dedupe_key) DO NOTHING RETURNING 1", org_id, call_id, kind, dedupe_key[:300], payload))


class PostCall:
    """The node's post-call worker.  ``start`` on the running loop, ``wake`` after a job is written,
    ``aclose`` at shutdown (a job cut short is taken again after its lease)."""

    def __init__(self, settings: Settings, db: Database, blobs: BlobStore, redactor: Redactor,
                 work_dir: Path, phrases: tuple[str, ...] = ()) -> None:
        self.settings = settings
        self.phrases = phrases  # the node's phrase list: the local recogniser's domain language model
        self.db = db
        self.blobs = blobs
        self.redactor = redactor
        self.work_dir = work_dir
        self.counters = PostCallCounters()
        s = settings
        self.fetcher = RecordingFetcher(allowed_hosts=s.recording_fetch_hosts,
                                        allow_networks=s.recording_fetch_allow_networks,
                                        max_bytes=s.recording_fetch_max_bytes, timeout_s=s.recording_fetch_timeout_s,
                                        ca_file=s.recording_fetch_ca_file)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._batch_stt: SttProvider | None = None
        self._http: Any = None
        self.summarizer: SummaryEngine = make_engine(settings, redactor)  # ValueError: llm without a key

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.work_dir.glob("*.wav"):  # a job cut short: its rerun fetches again
            leftover.unlink(missing_ok=True)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._loop(), name=f"post-call-{i}")
                       for i in range(self.settings.post_call_workers)]

    def wake(self) -> None:
        self._wake.set()

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.fetcher.aclose()
        if self._batch_stt is not None:
            await self._batch_stt.aclose()
        if self._http is not None:
            await self._http.close()
        await self.summarizer.aclose()

    def stats(self) -> dict[str, Any]:
        c, f = self.counters, self.fetcher.counters
        return {"jobs_done": c.done, "jobs_retried": c.retried, "jobs_failed": c.failed,
                "batch_rows": c.transcribed_rows, "recordings_fetched": f.fetched, "fetch_refused": dict(f.refused),
                "fetch_failed": f.failed, "fetch_connections": f.connections, **self.summarizer.stats()}

    # -- the loop ---------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            try:
                while await self.run_once():
                    pass
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                log.warning("post_call.unavailable", extra={"error": type(exc).__name__})
            except Exception:  # never let the worker die: the next round tries again
                log.exception("post_call.loop_error")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.post_call_interval_s)
            self._wake.clear()

    async def claim(self) -> Job | None:
        async with self.db.no_tenant() as conn:
            row = await conn.fetchrow(
                "UPDATE call_jobs SET status = 'running', attempts = attempts + 1, updated_at = now(), "
                "lease_until = now() + make_interval(secs => $1) WHERE id = ("
                "  SELECT id FROM call_jobs WHERE (status = 'pending' AND next_attempt_at <= now()) "
                "  OR (status = 'running' AND lease_until < now()) ORDER BY next_attempt_at LIMIT 1 "
                "  FOR UPDATE SKIP LOCKED) "
                "RETURNING id, org_id, call_id, kind, payload, attempts", self.settings.post_call_lease_s)
        if row is None:
            return None
        return Job(row["id"], row["org_id"], row["call_id"], row["kind"], row["payload"], row["attempts"])

    async def run_once(self) -> bool:
        """Claim and run one due job; ``False`` when none was due."""
        job = await self.claim()
        if job is None:
            return False
        try:
            if job.kind == "recording_fetch":
                await self._fetch(job)
            elif job.kind == "batch_transcribe":
                await self._transcribe(job)
            elif job.kind == "summarize":
                await self._summarize(job)
            else:
                raise JobFailed(f"unknown job kind {job.kind}", retry=False)
        except JobFailed as exc:
            await self._failed(job, str(exc), retry=exc.retry)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            await self._failed(job, f"storage: {type(exc).__name__}", retry=True)
        except Exception as exc:  # a bug, or a provider error nobody foresaw: the job says so, the worker goes on
            log.exception("post_call.job_error", extra={"kind": job.kind, "job_id": str(job.id)})
            await self._failed(job, f"internal: {type(exc).__name__}", retry=True)
        else:
            async with self.db.no_tenant() as conn:
                await conn.execute("UPDATE call_jobs SET status = 'done', lease_until = NULL, last_error = NULL, "
                                   "updated_at = now() WHERE id = $1", job.id)
            self.counters.done += 1
        return True

    async def _failed(self, job: Job, reason: str, *, retry: bool) -> None:
        final = not retry or job.attempts >= self.settings.post_call_attempts
        delay = min(BACKOFF_S * 2 ** (job.attempts - 1), BACKOFF_MAX_S)
        async with self.db.tenant(job.org_id) as conn:
            await conn.execute(
                "UPDATE call_jobs SET status = $2, last_error = $3, lease_until = NULL, updated_at = now(), "
                "next_attempt_at = now() + make_interval(secs => $4) WHERE id = $1",
                job.id, "failed" if final else "pending", reason[:500], delay)
            if final:
                await AuditEntry(job.org_id, f"{job.kind}.failed", "call", str(job.call_id), actor_type="system",
                                 new_value={"job_id": str(job.id), "reason": reason[:200],
                                            "attempts": job.attempts}).apply(conn)
        if final:
            self.counters.failed += 1
            log.error("post_call.job_failed", extra={"kind": job.kind, "job_id": str(job.id), "reason": reason[:200],
                                                      "attempts": job.attempts})
        else:
            self.counters.retried += 1
            log.warning("post_call.job_retry", extra={"kind": job.kind, "job_id": str(job.id),
                                                       "reason": reason[:200], "retry_in_s": delay})

    # -- recording_fetch --------------------------------------------------------------------------

    async def _fetch(self, job: Job) -> None:
        url = job.payload.get("url")
        dest = self.work_dir / f"{job.id.hex}.wav"
        try:
            try:
                fetched = await self.fetcher.fetch(url if isinstance(url, str) else "", dest)
            except FetchRefused as exc:
                raise JobFailed(f"refused: {exc}", retry=False) from None
            except FetchFailed as exc:
                raise JobFailed(f"fetch: {exc}", retry=True) from None
            try:
                info = await asyncio.to_thread(soundfile.info, str(dest))
            except (RuntimeError, soundfile.LibsndfileError):
                raise JobFailed("refused: the recording is not a readable audio file", retry=False) from None
            key = f"recordings/{job.org_id}/{datetime.now(UTC):%Y/%m/%d}/{job.call_id}/telnyx-{job.id}.wav"
            try:
                await self.blobs.put_file(key, dest, "audio/wav")
            except Exception as exc:  # any cold-tier failure: try again later (the URL lives 10 minutes)
                raise JobFailed(f"cold tier: {type(exc).__name__}", retry=True) from None
        finally:
            await asyncio.to_thread(dest.unlink, missing_ok=True)
        duration_ms = int(info.frames * 1000 // max(1, info.samplerate))
        recording_id = job.id
        async with self.db.tenant(job.org_id) as conn:
            fresh = await conn.fetchval(
                "INSERT INTO recordings (id, org_id, call_id, storage_key, content_type, bytes, duration_ms, "
                "channels, sample_rate, sha256, source) VALUES ($1, $2, $3, $4, 'audio/wav', $5, $6, $7, $8, $9, "
                "'telnyx') ON CONFLICT (id) DO NOTHING RETURNING 1",
                recording_id, job.org_id, job.call_id, key, fetched.bytes, duration_ms, info.channels,
                info.samplerate, fetched.sha256)
            if fresh:
                await AuditEntry(job.org_id, "recording.stored", "recording", str(recording_id), actor_type="system",
                                 new_value={"call_id": str(job.call_id), "source": "telnyx", "bytes": fetched.bytes,
                                            "duration_ms": duration_ms, "sha256": fetched.sha256}).apply(conn)
                if self.settings.batch_stt != "off":
                    await enqueue(conn, job.org_id, job.call_id, "batch_transcribe", f"batch:{recording_id}",
                                  {"recording_id": str(recording_id)})
        self.wake()

    # -- batch_transcribe -------------------------------------------------------------------------

    def _provider_name(self) -> str:
        choice = self.settings.batch_stt
        if choice == "auto":
            return "assemblyai" if self.settings.assemblyai_api_key else "local"
        return choice

    async def _transcribe(self, job: Job) -> None:
        rid = uuid.UUID(str(job.payload.get("recording_id")))
        async with self.db.tenant(job.org_id) as conn:
            rec = await conn.fetchrow("SELECT storage_key, duration_ms, channels FROM recordings "
                                      "WHERE id = $1 AND deleted_at IS NULL", rid)
            langs = dict(await conn.fetch(
                "SELECT DISTINCT ON (track) track, language FROM transcriptions WHERE call_id = $1 AND kind = 'final' "
                "GROUP BY track, language ORDER BY track, count(*) DESC", job.call_id))
        if rec is None:
            raise JobFailed("the recording is gone", retry=False)
        if rec["duration_ms"] > self.settings.batch_max_s * 1000:
            raise JobFailed(f"longer than batch_max_s ({self.settings.batch_max_s} s)", retry=False)
        default = self.settings.languages[0]
        path = self.work_dir / f"{job.id.hex}.wav"
        provider = self._provider_name()
        started = time.monotonic()
        try:
            try:
                await self.blobs.get_file(rec["storage_key"], path)
            except Exception as exc:
                raise JobFailed(f"cold tier: {type(exc).__name__}", retry=True) from None
            async with asyncio.timeout(self.settings.batch_timeout_s):
                if provider == "assemblyai":
                    lines = await self._assemblyai(path, langs.get("inbound", default))
                else:
                    lines = await self._local(path, job, langs, default)
        except TimeoutError:
            raise JobFailed("batch transcription timed out", retry=True) from None
        finally:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        rows = []
        redactions = 0
        for track, seq, tr, language in lines:
            ev = TranscriptEvent(str(job.call_id), f"batch:{rid}", track, tr.text, tr.words, tr.confidence, seq,
                                 tr.start_ms, tr.end_ms, True)
            red, n = ev.redacted(self.redactor)
            redactions += n
            payload = red.payload()
            rows.append((job.org_id, job.call_id, red.stream_id, track, seq, red.text, language, red.confidence,
                         payload["words"], red.start, red.end, f"{provider}-batch", True))
        async with self.db.tenant(job.org_id) as conn:
            for i in range(0, len(rows), BATCH_ROWS):
                await conn.executemany(
                    "INSERT INTO transcriptions (org_id, call_id, stream_id, track, seq, text, language, confidence, "
                    "words, start_ms, end_ms, provider, redacted, kind) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, 'batch') "
                    "ON CONFLICT (call_id, stream_id, track, seq) DO NOTHING", rows[i:i + BATCH_ROWS])
            await AuditEntry(job.org_id, "call.transcribed", "call", str(job.call_id), actor_type="system",
                             new_value={"recording_id": str(rid), "provider": provider, "utterances": len(rows),
                                        "redactions": redactions,
                                        "seconds": round(time.monotonic() - started, 1)}).apply(conn)
            await enqueue(conn, job.org_id, job.call_id, "summarize", f"summary:{rid}", {"source": "batch"})
        self.counters.transcribed_rows += len(rows)
        log.info("post_call.transcribed", extra={"call_id": str(job.call_id), "provider": provider,
                                                  "utterances": len(rows)})

    # -- summarize --------------------------------------------------------------------------------

    async def _summarize(self, job: Job) -> None:
        """The call's summary and score from its redacted lines: the lines transcribed from the recording
        when there are, else the live ones; by the engine ``summary`` names (pipelines/summary_engine.py,
        which redacts them again and falls back to the offline rules on any model failure).  The model
        is asked outside any transaction: no connection is held while it thinks."""
        async with self.db.tenant(job.org_id) as conn:
            rows: list[Any] = await conn.fetch(
                "SELECT track, text, kind FROM transcriptions WHERE call_id = $1 AND deleted_at IS NULL "
                "ORDER BY coalesce(start_ms, 0), created_at, seq LIMIT 5000", job.call_id)
            call = await conn.fetchrow("SELECT archive_key, coalesce(started_at, created_at) AS at FROM calls "
                                       "WHERE id = $1", job.call_id)
        if call is None:
            raise JobFailed("the call is gone", retry=False)
        if call["archive_key"]:  # its lines are in the cold tier (storage/archive.py)
            from storage.archive import read_archive

            rows = (await read_archive(self.blobs, call["archive_key"]))[0][:5000]
        batch = [(r["track"], r["text"]) for r in rows if r["kind"] == "batch"]
        live = [(r["track"], r["text"]) for r in rows if r["kind"] != "batch"]
        lines, source = (batch, "batch") if batch else (live, "live")
        summary = await self.summarizer.summarize(lines, call_date=call["at"].astimezone(UTC).date())
        async with self.db.tenant(job.org_id) as conn:
            await conn.execute(
                "INSERT INTO call_summaries (call_id, org_id, summary, score, provider, source, engine, model, "
                "fallback) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (call_id) DO UPDATE SET "
                "summary = $3, score = $4, provider = $5, source = $6, engine = $7, model = $8, fallback = $9, "
                "updated_at = now() WHERE call_summaries.source = 'live' OR $6 = 'batch'",
                job.call_id, job.org_id, summary.text[:4000], summary.score, summary.provider, source,
                summary.engine, summary.model, summary.fallback)

    async def _assemblyai(self, path: Path, language: str) -> list[tuple[str, int, Transcript, str]]:
        import aiohttp

        key = self.settings.assemblyai_api_key
        if key is None:
            raise JobFailed("batch_stt is assemblyai but ASSEMBLYAI_API_KEY is not set", retry=False)
        if self._http is None:
            self._http = aiohttp.ClientSession()
        client = AssemblyAIBatch(key.get_secret_value(), self.settings.assemblyai_batch_url, self._http)
        try:
            utterances = await client.transcribe(path, language=language, deadline_s=self.settings.batch_timeout_s)
        except BatchError as exc:
            raise JobFailed(f"assemblyai: {exc}", retry=exc.retry) from None
        return _from_utterances(utterances, language)

    async def _local(self, path: Path, job: Job, langs: dict[str, str],
                     default: str) -> list[tuple[str, int, Transcript, str]]:
        data, rate = await asyncio.to_thread(soundfile.read, str(path), dtype="int16", always_2d=True)
        if self._batch_stt is None:
            from pipelines.stt.pocketsphinx import PocketsphinxProvider

            s = self.settings
            self._batch_stt = PocketsphinxProvider(max_decoders=1, max_workers=1, queue_max_s=s.stt_queue_max_s,
                                               max_buffer_ms=s.stt_max_buffer_ms)
        out: list[tuple[str, int, Transcript, str]] = []
        for channel in range(min(2, data.shape[1])):
            track = CHANNEL_TRACKS[channel + 1]
            language = langs.get(track, default)
            if language != "en":  # the bundled model is English
                log.warning("post_call.language_unsupported", extra={"language": language, "track": track})
                continue
            result = await transcribe_channel(self._batch_stt, np.ascontiguousarray(data[:, channel]), rate,
                                              call_id=str(job.call_id), track=Track(track), language=language,
                                              segmenter=self.settings.segmenter(), phrases=self.phrases)
            out += [(track, i, tr, language) for i, tr in enumerate(result.finals, 1) if tr.text.strip()]
        return out


def _from_utterances(utterances: list[BatchUtterance], language: str) -> list[tuple[str, int, Transcript, str]]:
    out = []
    seqs: dict[str, int] = {}
    for u in sorted(utterances, key=lambda u: (u.channel, u.start_ms)):
        track = CHANNEL_TRACKS.get(u.channel)
        if track is None or not u.text.strip():
            continue
        seqs[track] = seqs.get(track, 0) + 1
        words = tuple(Word(t, s, e, c) for t, s, e, c in u.words)
        out.append((track, seqs[track], Transcript(u.text, True, u.start_ms, u.end_ms, words, u.confidence), language))
    return out

