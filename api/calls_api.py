"""``/api/calls``: the stored calls of the caller's organisation, read-only.

A call's id in every URL is its ``call_control_id`` (Telnyx's, the one the media stream started and the
SSE route watches), not the row's uuid.  The detail holds what was stored: final transcripts (the text
as stored: already redacted by the pipeline), translations, recordings (id, duration, bytes: the audio
itself is fetched through a signed URL) and the agent, when one is recorded.  Each of those lists is
bounded by ``MAX_DETAIL_ITEMS`` (oldest first; ``truncated`` says when more exist).

``GET .../recordings/{recording_id}/url`` answers a download URL that anyone holding it may GET until it
expires: at most ``recording_url_max_s`` (1 hour); issuing one is audited (``recording.url_issued``),
since that URL is the recording.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, Field

from api.envelope import ApiError, not_found
from api.lifecycle import Deletable, restore, soft_delete
from api.rest import PageQuery, Reply, Req, Route, Strict, decode_cursor, page
from storage.archive import read_archive
from storage.blobs import BlobNotFound

log = logging.getLogger("switchboard.calls")

MAX_DETAIL_ITEMS = 2000
Status = Literal["initiating", "ringing", "active", "ending", "completed", "failed", "no_answer", "busy"]


class CallQuery(PageQuery):
    since: AwareDatetime | None = Field(None, description="created at or after (RFC 3339)")
    until: AwareDatetime | None = Field(None, description="created before (RFC 3339)")
    status: Status | None = None
    agent_id: uuid.UUID | None = None
    account_id: uuid.UUID | None = Field(None, description="calls placed for this collection account")


class CallOut(BaseModel):
    call_id: str = Field(description="the call_control_id")
    id: uuid.UUID
    call_session_id: str | None
    direction: str | None
    from_number: str | None
    to_number: str | None
    agent_id: uuid.UUID | None
    account_id: uuid.UUID | None = Field(description="the collection account the call was placed for")
    status: str
    codec: str | None
    sample_rate: int | None
    started_at: datetime | None
    ended_at: datetime | None
    end_reason: str | None
    created_at: datetime


class TranscriptOut(BaseModel):
    id: uuid.UUID
    track: str
    seq: int
    text: str
    language: str
    confidence: float | None
    start_ms: int | None
    end_ms: int | None
    provider: str | None
    redacted: bool
    kind: Literal["final", "partial", "batch"] = Field(
        description="final: live; partial: the last partial of an utterance that got no final; batch: "
                    "transcribed from the stored recording after the call")
    created_at: datetime


class TranslationOut(BaseModel):
    id: uuid.UUID
    transcription_id: uuid.UUID | None
    source_lang: str
    target_lang: str
    original_text: str
    translated_text: str
    provider: str | None
    created_at: datetime


class RecordingOut(BaseModel):
    id: uuid.UUID
    content_type: str
    bytes: int
    duration_ms: int
    channels: int
    sample_rate: int
    source: Literal["stream", "telnyx"] = Field(
        description="stream: built here from the media stream; telnyx: Telnyx's dual-channel recording")
    created_at: datetime


class AgentOut(BaseModel):
    id: uuid.UUID
    display_name: str


class SummaryOut(BaseModel):
    text: str = Field(description="offline: quotes of the call's redacted lines; llm: the model's summary of "
                                  "them, redacted again")
    score: dict[str, Any] = Field(description="disclosure_spoken, promise_to_pay {amount, date} | null, dispute, "
                                              "callback_requested, consumer_lines, agent_lines")
    provider: str
    engine: Literal["offline", "llm"] = Field(description="who wrote it: the offline rules or a model")
    model: str | None = Field(description="the model that wrote it (engine llm)")
    fallback: str | None = Field(description="why a model's answer was not used and the offline rules wrote it")
    source: Literal["live", "batch"]
    updated_at: datetime


class CallDetail(CallOut):
    archived: bool = Field(description="its transcripts and translations are read from the cold tier")
    summary: SummaryOut | None = Field(description="after the call (a few seconds), from its redacted transcript")
    stats: dict[str, Any]
    agent: AgentOut | None
    transcripts: list[TranscriptOut]
    translations: list[TranslationOut]
    recordings: list[RecordingOut]
    truncated: bool


class UrlQuery(Strict):
    expires_in: int = Field(900, ge=1, le=3600, description="seconds the URL lives (capped by the server)")


class RecordingUrl(BaseModel):
    url: str
    expires_in: int
    expires_at: int = Field(description="unix seconds")


CALL_COLUMNS = ("call_control_id AS call_id, id, call_session_id, direction, from_number, to_number, agent_id, "
                "account_id, "
                "status, codec, sample_rate, started_at, ended_at, end_reason, created_at")


def call_out(row: Any) -> dict[str, Any]:
    return CallOut.model_validate(dict(row)).model_dump(mode="json")


def _dump(model: type[BaseModel], rows: list[Any]) -> list[dict[str, Any]]:
    return [model.model_validate(dict(r)).model_dump(mode="json") for r in rows[:MAX_DETAIL_ITEMS]]


async def list_calls(req: Req) -> Reply:
    q: CallQuery = req.query
    after = decode_cursor(q.cursor)
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        rows = await conn.fetch(
            f"SELECT {CALL_COLUMNS} FROM calls WHERE deleted_at IS NULL "
            "AND ($1::timestamptz IS NULL OR created_at >= $1) AND ($2::timestamptz IS NULL OR created_at < $2) "
            "AND ($3::text IS NULL OR status = $3) AND ($4::uuid IS NULL OR agent_id = $4) "
            "AND ($5::timestamptz IS NULL OR (created_at, id) < ($5, $6)) "
            "AND ($8::uuid IS NULL OR account_id = $8) "
            "ORDER BY created_at DESC, id DESC LIMIT $7",
            q.since, q.until, q.status, q.agent_id, after[0] if after else None, after[1] if after else None,
            q.limit + 1, q.account_id)
    return Reply(page(rows, q.limit, call_out))


async def get_call(req: Req) -> Reply:
    assert req.rt.tiers is not None
    n = MAX_DETAIL_ITEMS + 1
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        call = await conn.fetchrow(f"SELECT {CALL_COLUMNS}, stats, archive_key FROM calls WHERE call_control_id = $1 "
                                   "AND deleted_at IS NULL", req.params["call_id"])
        if call is None:
            raise not_found("call")
        transcripts = await conn.fetch(
            "SELECT id, track, seq, text, language, confidence, start_ms, end_ms, provider, redacted, kind, "
            "created_at FROM transcriptions WHERE call_id = $1 AND deleted_at IS NULL "
            "ORDER BY kind = 'batch', created_at, seq LIMIT $2",
            call["id"], n)
        translations = await conn.fetch(
            "SELECT id, transcription_id, source_lang, target_lang, original_text, translated_text, provider, "
            "created_at FROM translations WHERE call_id = $1 AND deleted_at IS NULL ORDER BY created_at LIMIT $2",
            call["id"], n)
        recordings = await conn.fetch(
            "SELECT id, content_type, bytes, duration_ms, channels, sample_rate, source, created_at FROM recordings "
            "WHERE call_id = $1 AND deleted_at IS NULL ORDER BY created_at LIMIT $2", call["id"], n)
        summary = await conn.fetchrow("SELECT summary AS text, score, provider, engine, model, fallback, source, "
                                      "updated_at FROM call_summaries WHERE call_id = $1", call["id"])
        agent = (await conn.fetchrow("SELECT id, display_name FROM users WHERE id = $1 AND deleted_at IS NULL",
                                     call["agent_id"])  # a deleted user leaves every read, this one too
                 if call["agent_id"] is not None else None)
    if call["archive_key"]:  # its lines moved to the cold tier (storage/archive.py)
        try:
            kept, translated = await read_archive(req.rt.tiers.blobs, call["archive_key"])
        except BlobNotFound:  # retention deleted the archive and has not yet cleared the row (objects first)
            log.warning("calls.archive_missing", extra={"call_id": call["call_id"]})
            kept, translated = [], []
        transcripts = sorted(kept, key=lambda t: (t.get("kind") == "batch", t["created_at"], t["seq"]))[:n]
        translations = translated[:n]
    detail = {**call_out(call), "stats": dict(call["stats"] or {}), "archived": bool(call["archive_key"]),
              "summary": SummaryOut.model_validate(dict(summary)).model_dump(mode="json") if summary else None,
              "agent": AgentOut.model_validate(dict(agent)).model_dump(mode="json") if agent else None,
              "transcripts": _dump(TranscriptOut, transcripts), "translations": _dump(TranslationOut, translations),
              "recordings": _dump(RecordingOut, recordings),
              "truncated": max(len(transcripts), len(translations), len(recordings)) > MAX_DETAIL_ITEMS}
    return Reply(detail)


async def recording_url(req: Req) -> Reply:
    q: UrlQuery = req.query
    tiers = req.rt.tiers
    assert tiers is not None
    expires_in = min(q.expires_in, req.rt.settings.recording_url_max_s)
    async with tiers.db.tenant(req.p.org_id) as conn:
        rec = await conn.fetchrow(
            "SELECT r.id, r.storage_key FROM recordings r JOIN calls c ON c.id = r.call_id "
            "WHERE c.call_control_id = $1 AND r.id = $2 AND r.deleted_at IS NULL AND c.deleted_at IS NULL",
            req.params["call_id"], req.params["recording_id"])
        if rec is None:
            raise not_found("recording")
        url = await tiers.blobs.presign_get(rec["storage_key"], expires_s=expires_in)
        await req.audit("recording.url_issued", "recording", rec["id"], None, {"expires_in": expires_in}
                        ).apply(conn)
    return Reply({"url": url, "expires_in": expires_in, "expires_at": int(time.time()) + expires_in},
                 headers={"Cache-Control": "no-store"})


CALL = Deletable("calls", "call", "call", "call", key="call_control_id", columns=CALL_COLUMNS)
OPEN_STATUSES = ("initiating", "ringing", "active", "ending")


async def delete_call(req: Req) -> Reply:
    """Soft delete: the call, its transcripts, translations and recordings leave every list and read."""
    async def still_open(_conn: Any, old: Any) -> None:
        if old["status"] in OPEN_STATUSES:
            raise ApiError("conflict", f"the call is still {old['status']}: hang up first")

    return Reply(call_out(await soft_delete(req, CALL, req.params["call_id"], refuse=still_open)))


async def restore_call(req: Req) -> Reply:
    return Reply(call_out(await restore(req, CALL, req.params["call_id"])))


ROUTES = [
    Route("DELETE", "/api/calls/{call_id}", "delete_call", "Delete an ended call (soft: restorable for 30 days)",
          "calls", "action", "calls.delete", delete_call, response=CallOut, params=(("call_id", "call_id"),),
          errors=("not_found", "conflict")),
    Route("POST", "/api/calls/{call_id}/restore", "restore_call", "Restore a deleted call (within the window)",
          "calls", "action", "calls.delete", restore_call, response=CallOut, params=(("call_id", "call_id"),),
          errors=("not_found", "conflict", "gone")),
    Route("GET", "/api/calls", "list_calls", "List calls, newest first", "calls", "action", "calls.read", list_calls,
          query=CallQuery, response=CallOut, paged=True),
    Route("GET", "/api/calls/{call_id}", "get_call", "A call with its transcripts, translations and recordings",
          "calls", "action", "calls.read", get_call, response=CallDetail, params=(("call_id", "call_id"),)),
    Route("GET", "/api/calls/{call_id}/recordings/{recording_id}/url", "recording_url",
          "A signed download URL for a recording (<= 1 hour)", "calls", "action", "recordings.read", recording_url,
          query=UrlQuery, response=RecordingUrl, params=(("call_id", "call_id"), ("recording_id", "uuid"))),
]
