"""Erasure of one person (GDPR art. 17): a debtor, by collection account or phone number, or a user.

``POST /api/erasures {account_id | phone | user_id}`` (owners and admins) answers the erasure report.
What goes where, a table (one organisation: the caller's; every statement under its RLS)::

    place                        a debtor's                                        how
    calls (placed for the account, or to or from one of its numbers)
      recordings                 objects in the cold tier, then the rows           deleted
      transcriptions, translations                                                 deleted
      the call rows              numbers, account link                             set NULL (kept for billing)
      post-call jobs             (their payloads hold recording URLs)              deleted
      Redis Streams              each call's event stream                          deleted
      SSE history                each call's replay history on this node           cleared
    the account                  name, numbers, reference, restricted fields       replaced; soft-deleted
    sealed evidence bundles      (a legal hold outranks erasure)                   kept, counted
    campaign contacts            the account's                                     deleted

    a user's: name and address replaced, deactivated and deleted, password removed, sessions revoked.

A call of the person that is still live refuses the erasure (409: hang up first).  At most
``MAX_CALLS`` calls per request (a person with more: 409, erase by phone number in parts).  One
erasure of an organisation at a time on a node (``ERASURES_PER_ORG``, 1; one more: 429 +
``Retry-After``): two of one person at once both erased and both counted the same calls.  The audit
entry ``person.erased`` holds the report's counts, never the number or the name.  Limits: another
node's in-memory SSE history of a call that ended minutes ago expires by itself (``SSE_RETENTION_S``);
log lines never held the person's data (redaction, ids only).
"""

from __future__ import annotations

import uuid
from typing import Annotated

from pydantic import BaseModel, Field, StringConstraints, model_validator

from api.call_session import call_key
from api.collections_api import PHONE
from api.envelope import ApiError, not_found
from api.rest import OrgSlots, Reply, Req, Route, Strict
from storage.db import CALL_OBJECTS_SQL, rows_affected

MAX_CALLS = 10_000
OPEN = ("initiating", "ringing", "active", "ending")
# Ten erasures of one person at once each read the same calls, deleted the same objects and reported (and
# audited) all of them: 10 x the calls erased.  One at a time, a repeat finds nothing left and says so.
_slots = OrgSlots("erasures")


class ErasureIn(Strict):
    account_id: uuid.UUID | None = None
    phone: Annotated[str, StringConstraints(pattern=PHONE)] | None = None
    user_id: uuid.UUID | None = None

    @model_validator(mode="after")
    def _one(self) -> ErasureIn:
        if sum(x is not None for x in (self.account_id, self.phone, self.user_id)) != 1:
            raise ValueError("give exactly one of account_id, phone and user_id")
        return self


class ErasureOut(BaseModel):
    calls: int = Field(description="calls of the person whose content was erased")
    recordings: int
    objects: int = Field(description="cold-tier objects deleted")
    transcriptions: int
    translations: int
    event_streams: int = Field(description="Redis Streams deleted")
    sse_events: int = Field(description="events dropped from this node's replay history")
    accounts: int
    users: int
    evidence_kept: int = Field(description="sealed evidence bundles of the person's calls, kept: a legal hold "
                                           "outranks erasure (GDPR art. 17(3)(e)); they expire at retain_until")


async def erase(req: Req) -> Reply:
    with _slots.hold(req.p.org_id, req.rt.settings.erasures_per_org):
        return await _erase(req)


async def _erase(req: Req) -> Reply:
    body: ErasureIn = req.body
    tiers = req.rt.tiers
    assert tiers is not None
    org = req.p.org_id
    report = dict.fromkeys(ErasureOut.model_fields, 0)
    if body.user_id is not None:
        return Reply(await _erase_user(req, body.user_id, report))
    async with tiers.db.tenant(org) as conn:
        phones: list[str] = [body.phone] if body.phone else []
        account = None
        if body.account_id is not None:
            account = await conn.fetchrow("SELECT id, phones FROM collection_accounts WHERE id = $1", body.account_id)
            if account is None:
                raise not_found("account")
            phones += list(account["phones"])
        calls = await conn.fetch(
            "SELECT id, call_control_id, status FROM calls WHERE ($1::uuid IS NOT NULL AND account_id = $1) "
            "OR to_number = ANY($2) OR from_number = ANY($2) LIMIT $3",
            body.account_id, phones, MAX_CALLS + 1)
        if body.phone and account is None:
            account_rows = await conn.fetch("SELECT id FROM collection_accounts WHERE $1 = ANY(phones)", body.phone)
        else:
            account_rows = [account] if account else []
    if len(calls) > MAX_CALLS:
        raise ApiError("conflict", f"more than {MAX_CALLS} calls: erase by phone number, one at a time")
    if any(c["status"] in OPEN for c in calls):
        raise ApiError("conflict", "a call of this person is live: hang up first")
    ids = [c["id"] for c in calls]
    if ids:
        async with tiers.db.tenant(org) as conn:
            keys = [r["storage_key"] for r in await conn.fetch(CALL_OBJECTS_SQL, ids)]
        for key in keys:  # objects before their rows: a failure here leaves rows to erase on a retry
            await tiers.blobs.delete(key)
        report["objects"] = len(keys)
        async with tiers.db.tenant(org) as conn:
            for table in ("recordings", "translations", "transcriptions"):
                report[table] = rows_affected(await conn.execute(f"DELETE FROM {table} WHERE call_id = ANY($1)", ids))
            await conn.execute("DELETE FROM call_jobs WHERE org_id = $1 AND call_id = ANY($2)", org, ids)
            await conn.execute("DELETE FROM call_summaries WHERE call_id = ANY($1)", ids)
            await conn.execute("UPDATE calls SET to_number = NULL, from_number = NULL, account_id = NULL, "
                               "archive_key = NULL, updated_at = now() WHERE id = ANY($1)", ids)
        for c in calls:
            key = call_key(org, c["call_control_id"])
            report["event_streams"] += int(await tiers.bus.purge(key))
            report["sse_events"] += req.rt.hub.forget_history(key)
    report["calls"] = len(ids)
    if ids:
        async with tiers.db.tenant(org) as conn:
            report["evidence_kept"] = await conn.fetchval(
                "SELECT count(*) FROM evidence_bundles WHERE call_id = ANY($1)", ids)
    async with tiers.db.tenant(org) as conn:
        for row in account_rows:
            await conn.execute(
                "UPDATE collection_accounts SET debtor_name = '[erased]', phones = '{}', restricted = NULL, "
                "restricted_key_id = NULL, "
                "external_ref = 'erased-' || replace(id::text, '-', ''), deleted_at = coalesce(deleted_at, now()), "
                "updated_at = now() WHERE id = $1", row["id"])
            await conn.execute("DELETE FROM campaign_contacts WHERE account_id = $1", row["id"])
        report["accounts"] = len(account_rows)
        target = str(body.account_id) if body.account_id else None
        await req.audit("person.erased", "collection_account" if target else "phone", target, None,
                        dict(report)).apply(conn)
    return Reply(ErasureOut(**report).model_dump())


async def _erase_user(req: Req, user_id: uuid.UUID, report: dict[str, int]) -> dict[str, int]:
    tiers = req.rt.tiers
    assert tiers is not None
    async with tiers.db.tenant(req.p.org_id) as conn:
        role = await conn.fetchval("SELECT role FROM users WHERE id = $1", user_id)
        if role is None:
            raise not_found("user")
        if role == "owner" and req.p.role != "owner":
            raise ApiError("forbidden", "only an owner may erase an owner")
        if user_id == req.p.user_id:
            raise ApiError("conflict", "you cannot erase yourself")
        await conn.execute(
            "UPDATE users SET email = 'erased-' || replace(id::text, '-', '') || '@erased.invalid', "
            "display_name = '', password_hash = NULL, active = false, deleted_at = coalesce(deleted_at, now()), "
            "updated_at = now() WHERE id = $1", user_id)
        report["users"] = 1
        await req.audit("person.erased", "user", user_id, None, dict(report)).apply(conn)
    await tiers.warm.revoke_user_sessions(str(user_id))
    return ErasureOut(**report).model_dump()


ROUTES = [
    Route("POST", "/api/erasures", "erase_person", "Erase one person's data (a debtor or a user)", "erasure",
          "action", "erasure.run", erase, body=ErasureIn, response=ErasureOut, max_body=1024,
          errors=("not_found", "conflict"),
          description="A debtor by account_id or phone: their calls' recordings (objects and rows), transcripts "
                      "and translations are deleted, the calls' numbers cleared, their event streams and replay "
                      "history dropped, the account's name, numbers and reference replaced.  A user: name and "
                      "address replaced, deactivated, sessions revoked.  Answers what was erased where.  One "
                      "erasure of an organisation at a time (`ERASURES_PER_ORG`); one more is 429."),
]
