"""``GET /api/audit``: the organisation's audit trail, newest first, read-only (admins and owners).

The trail is append-only in the database itself (0002_rls.sql grants the application no UPDATE or
DELETE on ``audit_logs``); every mutation of the REST API writes its entry in the transaction of the
change (``api.rest.Req.audit``).  Filters: ``actor_id``, ``action``, ``resource_type``,
``resource_id`` (exact), ``since`` (inclusive) and ``until`` (exclusive) on ``created_at``.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, Field, StringConstraints

from api.rest import PageQuery, Reply, Req, Route, decode_cursor, page

Text = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class AuditQuery(PageQuery):
    actor_id: Text | None = None
    action: Text | None = None
    resource_type: Text | None = None
    resource_id: Text | None = None
    since: AwareDatetime | None = Field(None, description="at or after (RFC 3339)")
    until: AwareDatetime | None = Field(None, description="before (RFC 3339)")


class AuditOut(BaseModel):
    id: uuid.UUID
    actor_type: str
    actor_id: str | None
    action: str
    resource_type: str
    resource_id: str | None
    old_value: Any
    new_value: Any
    ip: str | None
    request_id: str | None
    created_at: datetime


def audit_out(row: Any) -> dict[str, Any]:
    d = dict(row)
    d["ip"] = str(d["ip"]) if d["ip"] is not None else None
    return AuditOut.model_validate(d).model_dump(mode="json")


async def list_audit(req: Req) -> Reply:
    q: AuditQuery = req.query
    after = decode_cursor(q.cursor)
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        rows = await conn.fetch(
            "SELECT id, actor_type, actor_id, action, resource_type, resource_id, old_value, new_value, ip, "
            "request_id, created_at FROM audit_logs "
            "WHERE ($1::text IS NULL OR actor_id = $1) AND ($2::text IS NULL OR action = $2) "
            "AND ($3::text IS NULL OR resource_type = $3) AND ($4::text IS NULL OR resource_id = $4) "
            "AND ($5::timestamptz IS NULL OR created_at >= $5) AND ($6::timestamptz IS NULL OR created_at < $6) "
            "AND ($7::timestamptz IS NULL OR (created_at, id) < ($7, $8)) "
            "ORDER BY created_at DESC, id DESC LIMIT $9",
            q.actor_id, q.action, q.resource_type, q.resource_id, q.since, q.until,
            after[0] if after else None, after[1] if after else None, q.limit + 1)
    return Reply(page(rows, q.limit, audit_out))


ROUTES = [
    Route("GET", "/api/audit", "list_audit", "The audit trail, newest first", "audit", "action", "audit.read",
          list_audit, query=AuditQuery, response=AuditOut, paged=True),
]
