"""An organisation's retention policy over REST: ``GET /api/retention`` and ``PUT /api/retention``
(owners and admins).  The rules and the job are ``storage/retention.py``'s; this only reads and
writes ``retention_policies`` (audited).  A field left out or ``null`` means the default: recordings
730 days (also the minimum, as for whole calls), transcriptions, translations and calls kept until
a policy says otherwise."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from api.rest import Reply, Req, Route, Strict
from storage.retention import RECORDINGS_MIN_DAYS

# Strict: a whole JSON number, nothing coerced into one.  Lax, ``{"transcriptions": true}`` was 1 day (every
# transcript older than a day deleted at the next run) and ``"30"`` was 30.
LongDays = Annotated[int, Field(strict=True, ge=RECORDINGS_MIN_DAYS, le=36500)]
Days = Annotated[int, Field(strict=True, ge=1, le=36500)]
RESOURCES = ("recordings", "calls", "transcriptions", "translations")


class RetentionIn(Strict):
    recordings: LongDays | None = Field(None, description=f"days; at least {RECORDINGS_MIN_DAYS} (the default)")
    calls: LongDays | None = Field(None, description=f"whole ended calls, days; at least {RECORDINGS_MIN_DAYS}; "
                                                     "null: kept")
    transcriptions: Days | None = Field(None, description="days; null: kept")
    translations: Days | None = Field(None, description="days; null: kept")


class RetentionOut(BaseModel):
    recordings: int
    calls: int | None
    transcriptions: int | None
    translations: int | None
    restore_window_days: int = Field(description="soft-deleted rows are purged this long after their delete")


async def _read(req: Req) -> dict[str, int | None]:
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        rows = {r["resource"]: r["days"] for r in await conn.fetch(
            "SELECT resource, days FROM retention_policies WHERE resource = ANY($1)", list(RESOURCES))}
    return {r: rows.get(r) for r in RESOURCES}


def _out(req: Req, policy: dict[str, int | None]) -> dict[str, object]:
    return RetentionOut(recordings=policy["recordings"] or RECORDINGS_MIN_DAYS, calls=policy["calls"],
                        transcriptions=policy["transcriptions"], translations=policy["translations"],
                        restore_window_days=req.rt.settings.restore_window_days).model_dump()


async def get_retention(req: Req) -> Reply:
    return Reply(_out(req, await _read(req)))


async def put_retention(req: Req) -> Reply:
    body: RetentionIn = req.body
    new = body.model_dump()
    assert req.rt.tiers is not None
    old = await _read(req)
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        for resource in RESOURCES:
            if new[resource] is None:
                await conn.execute("DELETE FROM retention_policies WHERE resource = $1", resource)
            else:
                await conn.execute(
                    "INSERT INTO retention_policies (org_id, resource, days) VALUES ($1, $2, $3) "
                    "ON CONFLICT (org_id, resource) DO UPDATE SET days = $3, updated_at = now()",
                    req.p.org_id, resource, new[resource])
        if old != new:
            await req.audit("retention.updated", "organization", req.p.org_id, old, new).apply(conn)
    return Reply(_out(req, new))


ROUTES = [
    Route("GET", "/api/retention", "get_retention", "The organisation's retention policy", "retention", "action",
          "retention.read", get_retention, response=RetentionOut),
    Route("PUT", "/api/retention", "put_retention", "Replace the organisation's retention policy", "retention",
          "action", "retention.write", put_retention, body=RetentionIn, response=RetentionOut, max_body=1024,
          description="Recordings and whole calls are kept at least two years; a missing or null field is the "
                      "default.  The retention job (`switchboard retention run`, or the server every "
                      "RETENTION_INTERVAL_S) applies it."),
]
