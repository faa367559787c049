"""What the real-time path writes to PostgreSQL, as small frozen records that know their own SQL.

Each record is written inside a tenant transaction (``Database.tenant(record.org_id)``) and is
idempotent: a retried batch after an ambiguous failure (the connection dropped during COMMIT) writes
nothing twice.  Calls are keyed by (org_id, call_control_id), transcripts by (call_id, stream_id,
track, seq), audit entries and recordings by ids the application chose.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from engine.errors import StorageError


class MissingParent(StorageError, LookupError):
    """A record refers to a call that is not stored (its ``CallStarted`` was rejected)."""


@dataclass(frozen=True, slots=True)
class CallStarted:
    org_id: uuid.UUID
    call_id: uuid.UUID
    call_control_id: str
    call_session_id: str | None
    stream_id: str | None
    from_number: str | None
    to_number: str | None
    codec: str
    sample_rate: int
    started_at: datetime
    node_id: str | None = None  # the node whose media stream this is (closed by it after a crash)

    async def apply(self, conn: asyncpg.Connection) -> None:
        # A second stream for the same call (a reconnect) makes the call active again, keeping its id,
        # and owned by the node the stream reached.
        await conn.execute(
            """
            INSERT INTO calls (id, org_id, call_control_id, call_session_id, stream_id, from_number, to_number,
                               status, codec, sample_rate, started_at, node_id)
            VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', $8, $9, $10, $11)
            ON CONFLICT (org_id, call_control_id) DO UPDATE
               SET status = 'active', stream_id = EXCLUDED.stream_id, ended_at = NULL, end_reason = NULL,
                   node_id = EXCLUDED.node_id, updated_at = now()
            """,
            self.call_id, self.org_id, self.call_control_id, self.call_session_id, self.stream_id,
            self.from_number, self.to_number, self.codec, self.sample_rate, self.started_at, self.node_id,
        )


OPEN_SQL = "'initiating', 'ringing', 'active', 'ending'"


@dataclass(frozen=True, slots=True)
class CallEnded:
    """The media path saw the call end.  A call Telnyx already reported ended (``call.hangup``) keeps
    Telnyx's status and cause; the stream's reason is in ``stats`` and the audit trail."""

    org_id: uuid.UUID
    call_control_id: str
    status: str  # 'completed' or 'failed'
    reason: str
    ended_at: datetime
    stats: dict[str, Any] = field(default_factory=dict)

    async def apply(self, conn: asyncpg.Connection) -> None:
        await conn.execute(
            f"""
            UPDATE calls SET status = CASE WHEN status IN ({OPEN_SQL}) THEN $3 ELSE status END,
                   end_reason = CASE WHEN status IN ({OPEN_SQL}) THEN $4 ELSE end_reason END,
                   ended_at = coalesce(ended_at, $5), stats = $6, updated_at = now()
             WHERE org_id = $1 AND call_control_id = $2
            """,
            self.org_id, self.call_control_id, self.status, self.reason[:500], self.ended_at, self.stats,
        )
        await conn.execute(CALL_USAGE_SQL, self.org_id, self.call_control_id, METER_EVENT_NAME)


@dataclass(frozen=True, slots=True)
class SummaryDue:
    """The call ended on the media path: its summary is due (a post-call 'summarize' job, once)."""

    org_id: uuid.UUID
    call_control_id: str

    async def apply(self, conn: asyncpg.Connection) -> None:
        await conn.execute(
            "INSERT INTO call_jobs (org_id, call_id, kind, dedupe_key, payload) "
            "SELECT $1, c.id, 'summarize', 'summary-live:' || c.id::text, '{\"source\": \"live\"}'::jsonb "
            "FROM calls c WHERE c.org_id = $1 AND c.call_control_id = $2 ON CONFLICT (dedupe_key) DO NOTHING",
            self.org_id, self.call_control_id)


METER_EVENT_NAME = "call_minutes"
# A call's minutes (started to ended, rounded up), counted once per call: call_usage is keyed by the call,
# so a second end adds nothing, neither to usage_stats nor to the outbox.  When the organisation has a
# Stripe customer, a meter event goes into billing_outbox in the same transaction, its identifier made
# from the call id (api.billing sends it; Stripe drops a second event with the same identifier).
# Data-modifying CTEs run to completion whether or not the outer statement reads them.
CALL_USAGE_SQL = """
WITH c AS (
    SELECT id, org_id, ended_at, started_at FROM calls
     WHERE org_id = $1 AND call_control_id = $2 AND ended_at IS NOT NULL AND started_at IS NOT NULL
), u AS (
    INSERT INTO call_usage (call_id, org_id, day, minutes)
    SELECT id, org_id, (ended_at AT TIME ZONE 'UTC')::date,
           greatest(0, ceil(extract(epoch FROM ended_at - started_at) / 60.0))::int FROM c
    ON CONFLICT (call_id) DO NOTHING
    RETURNING call_id, org_id, day, minutes
), s AS (
    INSERT INTO usage_stats (org_id, day, metric, quantity)
    SELECT org_id, day, 'call_minutes', minutes FROM u
    ON CONFLICT (org_id, day, metric) DO UPDATE SET quantity = usage_stats.quantity + EXCLUDED.quantity
    RETURNING 1
)
INSERT INTO billing_outbox (org_id, kind, idempotency_key, payload)
SELECT u.org_id, 'meter_event', 'call-minutes-' || u.call_id,
       jsonb_build_object('event_name', $3::text, 'stripe_customer_id', sub.stripe_customer_id,
                          'value', u.minutes, 'timestamp', extract(epoch FROM now())::bigint)
  FROM u JOIN LATERAL (
      SELECT stripe_customer_id FROM subscriptions
       WHERE org_id = u.org_id AND stripe_customer_id IS NOT NULL ORDER BY created_at DESC LIMIT 1) sub ON true
 WHERE u.minutes > 0
ON CONFLICT (idempotency_key) DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class TranscriptStored:
    """A transcript of one utterance: ``kind`` 'final', or 'partial' (the last partial of an utterance that
    got no final: ``pipelines.partials``).  One row per utterance (call, stream, track, seq): a final
    replaces a partial row of its utterance (it came late: the final is the better text), a partial never
    replaces anything, and a retry of either writes nothing twice."""

    org_id: uuid.UUID
    call_control_id: str  # resolved to calls.id in SQL, so the writer needs no lookup of its own
    stream_id: str
    track: str
    seq: int
    text: str
    confidence: float | None
    words: list[dict[str, Any]]
    start_ms: int | None
    end_ms: int | None
    provider: str
    language: str = "en"
    redacted: bool = False
    kind: str = "final"  # or 'partial'

    async def apply(self, conn: asyncpg.Connection) -> None:
        status = await conn.execute(
            """
            INSERT INTO transcriptions AS t (org_id, call_id, track, seq, text, language, confidence, words,
                                             start_ms, end_ms, provider, redacted, stream_id, kind)
            SELECT $1, c.id, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14
              FROM calls c WHERE c.org_id = $1 AND c.call_control_id = $2
            ON CONFLICT (call_id, stream_id, track, seq) DO UPDATE
               SET text = EXCLUDED.text, language = EXCLUDED.language, confidence = EXCLUDED.confidence,
                   words = EXCLUDED.words, start_ms = EXCLUDED.start_ms, end_ms = EXCLUDED.end_ms,
                   provider = EXCLUDED.provider, redacted = EXCLUDED.redacted, kind = EXCLUDED.kind
             WHERE t.kind = 'partial' AND EXCLUDED.kind = 'final'
            """,
            self.org_id, self.call_control_id, self.track, self.seq, self.text, self.language, self.confidence,
            self.words, self.start_ms, self.end_ms, self.provider, self.redacted, self.stream_id, self.kind,
        )
        if status == "INSERT 0 0":
            await _require_call(conn, self.org_id, self.call_control_id)


@dataclass(frozen=True, slots=True)
class RecordingStored:
    org_id: uuid.UUID
    recording_id: uuid.UUID
    call_control_id: str
    storage_key: str
    bytes: int
    duration_ms: int
    channels: int
    sample_rate: int
    sha256: str
    content_type: str = "audio/wav"

    async def apply(self, conn: asyncpg.Connection) -> None:
        status = await conn.execute(
            """
            INSERT INTO recordings (id, org_id, call_id, storage_key, content_type, bytes, duration_ms, channels,
                                    sample_rate, sha256)
            SELECT $1, $2, c.id, $4, $5, $6, $7, $8, $9, $10
              FROM calls c WHERE c.org_id = $2 AND c.call_control_id = $3
            ON CONFLICT (id) DO NOTHING
            """,
            self.recording_id, self.org_id, self.call_control_id, self.storage_key, self.content_type, self.bytes,
            self.duration_ms, self.channels, self.sample_rate, self.sha256,
        )
        if status == "INSERT 0 0":
            await _require_call(conn, self.org_id, self.call_control_id)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    org_id: uuid.UUID
    action: str
    resource_type: str
    resource_id: str | None
    actor_type: str = "system"
    actor_id: str | None = None
    old_value: dict[str, Any] | None = None
    new_value: dict[str, Any] | None = None
    ip: str | None = None
    request_id: str | None = None
    id: uuid.UUID = field(default_factory=uuid.uuid4)

    async def apply(self, conn: asyncpg.Connection) -> None:
        await conn.execute(
            """
            INSERT INTO audit_logs (id, org_id, actor_type, actor_id, action, resource_type, resource_id,
                                    old_value, new_value, ip, request_id)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
            ON CONFLICT (id) DO NOTHING
            """,
            self.id, self.org_id, self.actor_type, self.actor_id, self.action, self.resource_type, self.resource_id,
            self.old_value, self.new_value, self.ip, self.request_id,
        )


@dataclass(frozen=True, slots=True)
class TranslationStored:
    org_id: uuid.UUID
    call_control_id: str
    stream_id: str
    track: str
    seq: int
    source_lang: str
    target_lang: str
    original_text: str  # redacted, as it was sent to the provider
    translated_text: str
    provider: str
    id: uuid.UUID = field(default_factory=uuid.uuid4)

    async def apply(self, conn: asyncpg.Connection) -> None:
        status = await conn.execute(
            """
            INSERT INTO translations (id, org_id, call_id, transcription_id, source_lang, target_lang, original_text,
                                      translated_text, provider)
            SELECT $1, $2, c.id,
                   (SELECT t.id FROM transcriptions t
                     WHERE t.call_id = c.id AND t.stream_id = $4 AND t.track = $5 AND t.seq = $6),
                   $7, $8, $9, $10, $11
              FROM calls c WHERE c.org_id = $2 AND c.call_control_id = $3
            ON CONFLICT (id) DO NOTHING
            """,
            self.id, self.org_id, self.call_control_id, self.stream_id, self.track, self.seq, self.source_lang,
            self.target_lang, self.original_text, self.translated_text, self.provider,
        )
        if status == "INSERT 0 0":
            await _require_call(conn, self.org_id, self.call_control_id)


@dataclass(frozen=True, slots=True)
class CallAgent:
    """The call's agent (``calls.agent_id``): the first signed-in user whose WebRTC session was bridged to
    it.  Later ones change nothing; a call that is not stored (its ``CallStarted`` was rejected) neither."""

    org_id: uuid.UUID
    call_control_id: str
    user_id: uuid.UUID

    async def apply(self, conn: asyncpg.Connection) -> None:
        await conn.execute(
            "UPDATE calls SET agent_id = $3, updated_at = now() "
            "WHERE org_id = $1 AND call_control_id = $2 AND agent_id IS NULL",
            self.org_id, self.call_control_id, self.user_id,
        )


Record = (CallStarted | CallEnded | TranscriptStored | RecordingStored | AuditEntry | TranslationStored | CallAgent
          | SummaryDue)


async def ensure_organization(conn: asyncpg.Connection, org_id: uuid.UUID, name: str, slug: str) -> None:
    """Create the organisation if it is missing (inside ``Database.tenant(org_id)``)."""
    await conn.execute(
        "INSERT INTO organizations (id, name, slug) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
        org_id, name, slug,
    )


@dataclass(frozen=True, slots=True)
class ClosedCall:
    org_id: uuid.UUID
    call_id: uuid.UUID
    call_control_id: str
    previous_status: str


async def close_calls_of_restarted_node(conn: asyncpg.Connection, node_id: str) -> list[ClosedCall]:
    """Close the calls ``node_id`` left open when it died: 'failed', end_reason 'node_restart', audited.

    Every organisation's calls, through the migration's SECURITY DEFINER function (0003_call_node.sql
    says why); ``conn`` needs no tenant.  Call it before the node accepts streams again.
    """
    rows = await conn.fetch("SELECT * FROM close_calls_of_restarted_node($1)", node_id)
    return [ClosedCall(r["org_id"], r["call_id"], r["call_control_id"], r["previous_status"]) for r in rows]


async def call_exists(conn: asyncpg.Connection, org_id: uuid.UUID, call_control_id: str) -> bool:
    """Whether the call is stored (inside ``Database.tenant(org_id)``)."""
    return bool(await conn.fetchval("SELECT 1 FROM calls WHERE org_id = $1 AND call_control_id = $2",
                                    org_id, call_control_id))


async def _require_call(conn: asyncpg.Connection, org_id: uuid.UUID, call_control_id: str) -> None:
    """Tell "already written" (a retry: fine) from "no such call" (the row would be lost: an error)."""
    if not await call_exists(conn, org_id, call_control_id):
        raise MissingParent(f"call {call_control_id!r} is not stored")
