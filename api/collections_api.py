"""``/api/accounts``, ``/api/campaigns`` and ``/api/voice-config``: the collections domain, thin.

* An account is a debt to collect: its ``external_ref`` (the client's own id, unique among the
  organisation's live accounts: 409 ``already_exists``), the debtor's name and phone numbers (E.164,
  at most 5), the balance in cents and its currency, a status, and the consent and do-not-call flags.
  ``DELETE`` soft-deletes (``deleted_at``): the account is then absent from lists and reads (404) and
  its ``external_ref`` is free again.  Bulk creation is the CSV import (``api.account_import``).
* A campaign is a named list of accounts; ``POST /api/campaigns/{id}/contacts`` adds live accounts of
  the organisation to it (twice is once; an id that is not a live account of the caller's organisation
  is reported in ``unknown``, whoever owns it).
* The voice configuration is one per organisation (``PUT`` replaces it; absent: the defaults).

Who may do what: ``api.auth.PERMISSIONS`` (``accounts.*``, ``campaigns.*``, ``voice_config.*``).

Audit values never hold the debtor's name or phone numbers (restricted personal data; the trail is
append-only and would be a second, unerasable copy): they hold the account's id, ``external_ref``,
the non-personal fields, and the names of the fields a change touched.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
from pydantic import BaseModel, Field, StringConstraints

from api.envelope import ApiError, not_found
from api.lifecycle import Deletable, restore, soft_delete
from api.rest import PageQuery, Reply, Req, Route, Strict, decode_cursor, page

PHONE = r"^\+[1-9][0-9]{6,14}$"
MAX_BALANCE_CENTS = 10**13
MAX_PHONES = 5
MAX_CONTACTS_PER_CALL = 1000

ExternalRef = Annotated[str, StringConstraints(pattern=r"^[!-~]{1,100}$")]
DebtorName = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
Phone = Annotated[str, StringConstraints(pattern=PHONE)]
Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
Cents = Annotated[int, Field(ge=0, le=MAX_BALANCE_CENTS)]
AccountStatus = Literal["open", "promised", "paid", "disputed", "closed"]
CampaignStatus = Literal["draft", "active", "paused", "done"]
CampaignName = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
Lang = Annotated[str, StringConstraints(pattern=r"^[a-z]{2,3}$")]

# Fields of an account that may appear in the audit trail (the rest are personal data).
AUDITED = ("external_ref", "balance_cents", "currency", "status", "consent", "do_not_call")


# -- models ---------------------------------------------------------------------------------------


class AccountCreate(Strict):
    external_ref: ExternalRef
    debtor_name: DebtorName
    phones: Annotated[list[Phone], Field(max_length=MAX_PHONES)] = []
    balance_cents: Cents
    currency: Currency
    status: AccountStatus = "open"
    consent: bool = False
    do_not_call: bool = False


class AccountPatch(Strict):
    external_ref: ExternalRef | None = None
    debtor_name: DebtorName | None = None
    phones: Annotated[list[Phone], Field(max_length=MAX_PHONES)] | None = None
    balance_cents: Cents | None = None
    currency: Currency | None = None
    status: AccountStatus | None = None
    consent: bool | None = None
    do_not_call: bool | None = None


class AccountQuery(PageQuery):
    status: AccountStatus | None = None
    do_not_call: bool | None = None
    q: Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[!-~]+$")] | None = Field(
        None, description="external_ref starts with this")
    balance_min: Cents | None = Field(None, description="balance_cents at least this")
    balance_max: Cents | None = Field(None, description="balance_cents at most this")
    name: Annotated[str, StringConstraints(min_length=1, max_length=100)] | None = Field(
        None, description="debtor_name contains this (any case)")
    campaign_id: uuid.UUID | None = Field(None, description="only the contacts of this campaign")


class AccountOut(BaseModel):
    id: uuid.UUID
    external_ref: str
    debtor_name: str
    phones: list[str]
    balance_cents: int
    currency: str
    status: str
    consent: bool
    do_not_call: bool
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


class CampaignCreate(Strict):
    name: CampaignName
    status: CampaignStatus = "draft"


class CampaignPatch(Strict):
    name: CampaignName | None = None
    status: CampaignStatus | None = None


class CampaignQuery(PageQuery):
    status: CampaignStatus | None = None


class CampaignOut(BaseModel):
    id: uuid.UUID
    name: str
    status: str
    contacts: int
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


class ContactsAdd(Strict):
    account_ids: Annotated[list[uuid.UUID], Field(min_length=1, max_length=MAX_CONTACTS_PER_CALL)]


class ContactsAdded(BaseModel):
    added: int
    already: int
    unknown: list[uuid.UUID] = Field(description="ids that are not live accounts of your organisation")


class ContactRemoved(BaseModel):
    removed: uuid.UUID = Field(description="the account taken out of the campaign")


class VoiceConfigIn(Strict):
    caller_id: Annotated[str, StringConstraints(pattern=PHONE)] | None = None
    recording: bool = False
    translate_default: Lang | None = None


class VoiceConfigOut(BaseModel):
    caller_id: str | None
    recording: bool
    translate_default: str | None
    updated_at: datetime | None


ACCOUNT_COLUMNS = ("id, external_ref, debtor_name, phones, balance_cents, currency, status, consent, do_not_call, "
                   "created_at, updated_at, deleted_at")
CAMPAIGN_COLUMNS = ("id, name, status, created_at, updated_at, deleted_at, "
                    "(SELECT count(*) FROM campaign_contacts cc WHERE cc.campaign_id = campaigns.id) AS contacts")


def account_out(row: Any) -> dict[str, Any]:
    return AccountOut.model_validate(dict(row)).model_dump(mode="json")


def campaign_out(row: Any) -> dict[str, Any]:
    return CampaignOut.model_validate(dict(row)).model_dump(mode="json")


def _audited(values: dict[str, Any]) -> dict[str, Any]:
    return {k: values[k] for k in AUDITED if k in values}


def _refuse_nulls(changes: dict[str, Any]) -> None:
    """A PATCH field given as null: 400 (none of these columns may be empty; omit a field to keep it)."""
    nulls = [k for k, v in changes.items() if v is None]
    if nulls:
        raise ApiError("validation_failed", "the body failed validation",
                       [{"field": k, "message": "may not be null", "type": "null"} for k in nulls])


def _ref_taken() -> ApiError:
    return ApiError("already_exists", "a live account of your organisation has this external_ref",
                    [{"field": "external_ref", "message": "taken", "type": "unique"}])


# -- accounts -------------------------------------------------------------------------------------


async def create_account(req: Req) -> Reply:
    body: AccountCreate = req.body
    assert req.rt.tiers is not None
    try:
        async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
            row = await conn.fetchrow(
                "INSERT INTO collection_accounts (org_id, external_ref, debtor_name, phones, balance_cents, currency, "
                "status, consent, do_not_call) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
                f"RETURNING {ACCOUNT_COLUMNS}",
                req.p.org_id, body.external_ref, body.debtor_name, body.phones, body.balance_cents, body.currency,
                body.status, body.consent, body.do_not_call)
            await req.audit("account.created", "collection_account", row["id"], None,
                            _audited(body.model_dump())).apply(conn)
    except asyncpg.UniqueViolationError:
        raise _ref_taken() from None
    return Reply(account_out(row), status=201)


async def list_accounts(req: Req) -> Reply:
    q: AccountQuery = req.query
    after = decode_cursor(q.cursor)
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        rows = await conn.fetch(
            f"SELECT {ACCOUNT_COLUMNS} FROM collection_accounts WHERE deleted_at IS NULL "
            "AND ($1::timestamptz IS NULL OR (created_at, id) < ($1, $2)) "
            "AND ($3::text IS NULL OR status = $3) AND ($4::boolean IS NULL OR do_not_call = $4) "
            "AND ($5::text IS NULL OR starts_with(external_ref, $5)) "
            "AND ($6::bigint IS NULL OR balance_cents >= $6) AND ($7::bigint IS NULL OR balance_cents <= $7) "
            "AND ($9::text IS NULL OR debtor_name ILIKE '%' || $9 || '%' ESCAPE '\\') "
            "AND ($10::uuid IS NULL OR EXISTS (SELECT 1 FROM campaign_contacts cc "
            "     WHERE cc.campaign_id = $10 AND cc.account_id = collection_accounts.id)) "
            "ORDER BY created_at DESC, id DESC LIMIT $8",
            after[0] if after else None, after[1] if after else None, q.status, q.do_not_call, q.q,
            q.balance_min, q.balance_max, q.limit + 1, _like(q.name), q.campaign_id)
    return Reply(page(rows, q.limit, account_out))


def _like(text: str | None) -> str | None:
    """``text`` as a literal inside an ILIKE pattern (its %, _ and backslashes escaped)."""
    if text is None:
        return None
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def _live_account(conn: asyncpg.Connection, account_id: uuid.UUID, *, lock: bool = False) -> Any:
    row = await conn.fetchrow(f"SELECT {ACCOUNT_COLUMNS} FROM collection_accounts WHERE id = $1 "
                              f"AND deleted_at IS NULL{' FOR UPDATE' if lock else ''}", account_id)
    if row is None:
        raise not_found("account")
    return row


async def get_account(req: Req) -> Reply:
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        row = await _live_account(conn, req.params["account_id"])
    return Reply(account_out(row))


async def patch_account(req: Req) -> Reply:
    body: AccountPatch = req.body
    changes = body.model_dump(exclude_unset=True)
    _refuse_nulls(changes)
    assert req.rt.tiers is not None
    try:
        async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
            old = await _live_account(conn, req.params["account_id"], lock=True)
            changed = {k: v for k, v in changes.items() if old[k] != v}
            if not changed:
                return Reply(account_out(old))
            # The column names come from the model's own fields, never from the request's keys as text.
            cols = [k for k in AccountPatch.model_fields if k in changed]
            sets = ", ".join(f"{c} = ${i + 2}" for i, c in enumerate(cols))
            row = await conn.fetchrow(
                f"UPDATE collection_accounts SET {sets}, updated_at = now() WHERE id = $1 "
                f"RETURNING {ACCOUNT_COLUMNS}", old["id"], *(changed[c] for c in cols))
            await req.audit("account.updated", "collection_account", old["id"], _audited({k: old[k] for k in cols}),
                            {**_audited(changed), "changed": cols}).apply(conn)
    except asyncpg.UniqueViolationError:
        raise _ref_taken() from None
    return Reply(account_out(row))


async def delete_account(req: Req) -> Reply:
    row = await soft_delete(req, ACCOUNT, req.params["account_id"],
                            old_value=lambda old: {"external_ref": old["external_ref"]})
    return Reply(account_out(row))


ACCOUNT = Deletable("collection_accounts", "account", "collection_account", "account", columns=ACCOUNT_COLUMNS)
CAMPAIGN = Deletable("campaigns", "campaign", "campaign", "campaign", columns=CAMPAIGN_COLUMNS)


async def restore_account(req: Req) -> Reply:
    return Reply(account_out(await restore(req, ACCOUNT, req.params["account_id"])))


async def restore_campaign(req: Req) -> Reply:
    return Reply(campaign_out(await restore(req, CAMPAIGN, req.params["campaign_id"])))


# -- campaigns ------------------------------------------------------------------------------------


async def _live_campaign(conn: asyncpg.Connection, campaign_id: uuid.UUID, *, lock: bool = False) -> Any:
    row = await conn.fetchrow(f"SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE id = $1 AND deleted_at IS NULL"
                              f"{' FOR UPDATE' if lock else ''}", campaign_id)
    if row is None:
        raise not_found("campaign")
    return row


async def create_campaign(req: Req) -> Reply:
    body: CampaignCreate = req.body
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        new_id = await conn.fetchval("INSERT INTO campaigns (org_id, name, status) VALUES ($1, $2, $3) RETURNING id",
                                     req.p.org_id, body.name, body.status)
        row = await _live_campaign(conn, new_id)
        await req.audit("campaign.created", "campaign", new_id, None,
                        {"name": body.name, "status": body.status}).apply(conn)
    return Reply(campaign_out(row), status=201)


async def list_campaigns(req: Req) -> Reply:
    q: CampaignQuery = req.query
    after = decode_cursor(q.cursor)
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        rows = await conn.fetch(
            f"SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE deleted_at IS NULL "
            "AND ($1::timestamptz IS NULL OR (created_at, id) < ($1, $2)) AND ($3::text IS NULL OR status = $3) "
            "ORDER BY created_at DESC, id DESC LIMIT $4",
            after[0] if after else None, after[1] if after else None, q.status, q.limit + 1)
    return Reply(page(rows, q.limit, campaign_out))


async def get_campaign(req: Req) -> Reply:
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        row = await _live_campaign(conn, req.params["campaign_id"])
    return Reply(campaign_out(row))


async def patch_campaign(req: Req) -> Reply:
    body: CampaignPatch = req.body
    changes = body.model_dump(exclude_unset=True)
    _refuse_nulls(changes)
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        old = await _live_campaign(conn, req.params["campaign_id"], lock=True)
        changed = {k: v for k, v in changes.items() if old[k] != v}
        if not changed:
            return Reply(campaign_out(old))
        await conn.execute("UPDATE campaigns SET name = coalesce($2, name), status = coalesce($3, status), "
                           "updated_at = now() WHERE id = $1", old["id"], changed.get("name"), changed.get("status"))
        row = await _live_campaign(conn, old["id"])
        await req.audit("campaign.updated", "campaign", old["id"], {k: old[k] for k in changed}, changed).apply(conn)
    return Reply(campaign_out(row))


async def delete_campaign(req: Req) -> Reply:
    return Reply(campaign_out(await soft_delete(req, CAMPAIGN, req.params["campaign_id"])))


async def add_contacts(req: Req) -> Reply:
    body: ContactsAdd = req.body
    wanted = list(dict.fromkeys(body.account_ids))
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        campaign = await _live_campaign(conn, req.params["campaign_id"], lock=True)
        live = {r["id"] for r in await conn.fetch(
            "SELECT id FROM collection_accounts WHERE id = ANY($1::uuid[]) AND deleted_at IS NULL", wanted)}
        added = await conn.fetch(
            "INSERT INTO campaign_contacts (org_id, campaign_id, account_id) "
            "SELECT $1, $2, a FROM unnest($3::uuid[]) AS a ON CONFLICT DO NOTHING RETURNING account_id",
            req.p.org_id, campaign["id"], [i for i in wanted if i in live])
        if added:
            await req.audit("campaign.contacts_added", "campaign", campaign["id"], None,
                            {"account_ids": [str(r["account_id"]) for r in added]}).apply(conn)
    return Reply({"added": len(added), "already": len(live) - len(added),
                  "unknown": [str(i) for i in wanted if i not in live]})


async def remove_contact(req: Req) -> Reply:
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        campaign = await _live_campaign(conn, req.params["campaign_id"], lock=True)
        removed = await conn.fetchval("DELETE FROM campaign_contacts WHERE campaign_id = $1 AND account_id = $2 "
                                      "RETURNING account_id", campaign["id"], req.params["account_id"])
        if removed is None:
            raise not_found("contact")
        await req.audit("campaign.contact_removed", "campaign", campaign["id"], {"account_id": str(removed)},
                        None).apply(conn)
    return Reply({"removed": str(removed)})


# -- voice configuration --------------------------------------------------------------------------

VOICE_DEFAULTS = {"caller_id": None, "recording": False, "translate_default": None, "updated_at": None}


async def get_voice_config(req: Req) -> Reply:
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        row = await conn.fetchrow("SELECT caller_id, recording, translate_default, updated_at FROM voice_configs")
    return Reply(VoiceConfigOut.model_validate(dict(row) if row else VOICE_DEFAULTS).model_dump(mode="json"))


async def put_voice_config(req: Req) -> Reply:
    body: VoiceConfigIn = req.body
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        old = await conn.fetchrow("SELECT caller_id, recording, translate_default FROM voice_configs FOR UPDATE")
        row = await conn.fetchrow(
            "INSERT INTO voice_configs (org_id, caller_id, recording, translate_default) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (org_id) DO UPDATE SET caller_id = $2, recording = $3, translate_default = $4, "
            "updated_at = now() RETURNING caller_id, recording, translate_default, updated_at",
            req.p.org_id, body.caller_id, body.recording, body.translate_default)
        await req.audit("voice_config.updated", "voice_config", req.p.org_id, dict(old) if old else None,
                        body.model_dump()).apply(conn)
    return Reply(VoiceConfigOut.model_validate(dict(row)).model_dump(mode="json"))


_ACCOUNT = (("account_id", "uuid"),)
_CAMPAIGN = (("campaign_id", "uuid"),)
ROUTES = [
    Route("POST", "/api/accounts", "create_account", "Create a collection account", "accounts", "action",
          "accounts.write", create_account, body=AccountCreate, response=AccountOut, status=201,
          errors=("already_exists",)),
    Route("GET", "/api/accounts", "list_accounts", "List live collection accounts (filters)", "accounts", "action",
          "accounts.read", list_accounts, query=AccountQuery, response=AccountOut, paged=True),
    Route("GET", "/api/accounts/{account_id}", "get_account", "A collection account", "accounts", "action",
          "accounts.read", get_account, response=AccountOut, params=_ACCOUNT),
    Route("PATCH", "/api/accounts/{account_id}", "update_account", "Change a collection account", "accounts",
          "action", "accounts.write", patch_account, body=AccountPatch, response=AccountOut, params=_ACCOUNT,
          errors=("already_exists",)),
    Route("DELETE", "/api/accounts/{account_id}", "delete_account", "Soft-delete a collection account",
          "accounts", "action", "accounts.delete", delete_account, response=AccountOut, params=_ACCOUNT),
    Route("POST", "/api/accounts/{account_id}/restore", "restore_account",
          "Restore a deleted collection account (within the restore window)", "accounts", "action",
          "accounts.delete", restore_account, params=_ACCOUNT, response=AccountOut,
          errors=("not_found", "conflict", "gone", "already_exists")),
    Route("POST", "/api/campaigns", "create_campaign", "Create a campaign", "campaigns", "action",
          "campaigns.write", create_campaign, body=CampaignCreate, response=CampaignOut, status=201),
    Route("GET", "/api/campaigns", "list_campaigns", "List live campaigns", "campaigns", "action", "campaigns.read",
          list_campaigns, query=CampaignQuery, response=CampaignOut, paged=True),
    Route("GET", "/api/campaigns/{campaign_id}", "get_campaign", "A campaign", "campaigns", "action",
          "campaigns.read", get_campaign, response=CampaignOut, params=_CAMPAIGN),
    Route("PATCH", "/api/campaigns/{campaign_id}", "update_campaign", "Rename a campaign or change its status",
          "campaigns", "action", "campaigns.write", patch_campaign, body=CampaignPatch, response=CampaignOut,
          params=_CAMPAIGN),
    Route("DELETE", "/api/campaigns/{campaign_id}", "delete_campaign", "Soft-delete a campaign", "campaigns",
          "action", "campaigns.write", delete_campaign, response=CampaignOut, params=_CAMPAIGN),
    Route("POST", "/api/campaigns/{campaign_id}/restore", "restore_campaign",
          "Restore a deleted campaign (within the restore window)", "campaigns", "action", "campaigns.write",
          restore_campaign, params=_CAMPAIGN, response=CampaignOut, errors=("not_found", "conflict", "gone")),
    Route("POST", "/api/campaigns/{campaign_id}/contacts", "add_campaign_contacts", "Add accounts to a campaign",
          "campaigns", "action", "campaigns.write", add_contacts, body=ContactsAdd, response=ContactsAdded,
          params=_CAMPAIGN, max_body=64 << 10),
    Route("DELETE", "/api/campaigns/{campaign_id}/contacts/{account_id}", "remove_campaign_contact",
          "Take an account out of a campaign", "campaigns", "action", "campaigns.write", remove_contact,
          params=_CAMPAIGN + _ACCOUNT, response=ContactRemoved, errors=("not_found",)),
    Route("GET", "/api/voice-config", "get_voice_config", "The organisation's voice configuration", "voice-config",
          "action", "voice_config.read", get_voice_config, response=VoiceConfigOut),
    Route("PUT", "/api/voice-config", "put_voice_config", "Replace the organisation's voice configuration",
          "voice-config", "action", "voice_config.write", put_voice_config, body=VoiceConfigIn,
          response=VoiceConfigOut),
]
