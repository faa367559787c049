"""A collection account's restricted fields over REST, encrypted at rest (storage/crypto.py).

``PUT /api/accounts/{id}/restricted {ssn?, date_of_birth?, card_reference?}`` (those who may edit
accounts) replaces them: their JSON is sealed with AES-256-GCM under the active key, bound to the
organisation and the row.  ``GET /api/accounts/{id}/restricted`` answers them masked (SSN and card
reference by their last four, the date of birth only as present); ``?reveal=true`` answers them whole,
to owners and admins only, audited (``account.restricted_revealed``).  The audit entries name the
fields, never their values.  ``rotate`` re-seals every value under an older key with the active one.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, Field, StringConstraints, field_validator

from api.envelope import ApiError, not_found
from api.rest import Reply, Req, Route, Strict
from api.settings import Settings
from pipelines.redaction import _luhn as luhn  # the card rule of the transcripts' redaction
from storage.crypto import DecryptError, Keyring, aad
from storage.db import Database, live_orgs

TABLE = "collection_accounts"


def keyring_for(s: Settings) -> Keyring:
    """The configured keyring, or the embedded default in the data directory (storage/crypto.py)."""
    if s.encryption_keys is not None:
        return Keyring.parse(s.encryption_keys.get_secret_value(), s.encryption_key_id)
    return Keyring.local(s.data_dir.resolve() / "encryption-keys.json")


class RestrictedIn(Strict):
    ssn: Annotated[str, StringConstraints(pattern=r"^\d{3}-?\d{2}-?\d{4}$")] | None = None
    date_of_birth: dt.date | None = None
    card_reference: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{4,64}$")] | None = Field(
        None, description="a payment vault's token for the card (never a card number)")

    @field_validator("date_of_birth", mode="before")
    @classmethod
    def _a_date(cls, v: Any) -> Any:
        # A date as written, YYYY-MM-DD: pydantic alone took 0 as 1970-01-01 and a date-time at midnight.
        if v is not None and not (isinstance(v, str) and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", v)):
            raise ValueError("a date as YYYY-MM-DD")
        return v

    @field_validator("card_reference")
    @classmethod
    def _not_a_card_number(cls, v: str | None) -> str | None:
        # The pattern alone let a whole card number in ("4111111111111111", "5500-0000-0000-0004"): the
        # rule the transcripts' redaction uses (13-19 digits, Luhn-valid, 2-6 first) keeps it out here too.
        digits = re.sub(r"[-_]", "", v or "")
        if digits.isdigit() and 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn(digits):
            raise ValueError("this is a card number: give the payment vault's token for the card, never the number")
        return v


class RestrictedQuery(Strict):
    reveal: bool = False


class RestrictedOut(BaseModel):
    ssn: str | None
    date_of_birth: str | None
    card_reference: str | None
    masked: bool
    key_id: str | None = Field(description="the key that sealed them")


def _masked(values: dict[str, Any]) -> dict[str, Any]:
    ssn, dob, card = values.get("ssn"), values.get("date_of_birth"), values.get("card_reference")
    return {"ssn": f"***-**-{ssn[-4:]}" if ssn else None, "date_of_birth": "(set)" if dob else None,
            "card_reference": f"…{card[-4:]}" if card else None}


def _open(keyring: Keyring, org: uuid.UUID, row: Any) -> dict[str, Any]:
    if row["restricted"] is None:
        return {}
    try:
        return orjson.loads(keyring.decrypt(row["restricted_key_id"], bytes(row["restricted"]),
                                            aad(TABLE, org, row["id"])))  # type: ignore[no-any-return]
    except DecryptError as exc:
        raise ApiError("internal_error", f"the restricted fields cannot be decrypted: {exc}") from None


async def put_restricted(req: Req) -> Reply:
    body: RestrictedIn = req.body
    assert req.rt.tiers is not None and req.rt.keyring is not None
    values = {k: (v.isoformat() if isinstance(v, dt.date) else v) for k, v in body.model_dump().items()
              if v is not None}
    org = req.p.org_id
    async with req.rt.tiers.db.tenant(org) as conn:
        row = await conn.fetchrow("SELECT id FROM collection_accounts WHERE id = $1 AND deleted_at IS NULL FOR UPDATE",
                                  req.params["account_id"])
        if row is None:
            raise not_found("account")
        kid, blob = req.rt.keyring.encrypt(orjson.dumps(values), aad(TABLE, org, row["id"])) if values else (None, None)
        await conn.execute("UPDATE collection_accounts SET restricted = $2, restricted_key_id = $3, updated_at = now() "
                           "WHERE id = $1", row["id"], blob, kid)
        await req.audit("account.restricted_updated", "collection_account", row["id"], None,
                        {"fields": sorted(values)}).apply(conn)
    return Reply({**_masked(values), "masked": True, "key_id": kid})


async def get_restricted(req: Req) -> Reply:
    q: RestrictedQuery = req.query
    assert req.rt.tiers is not None and req.rt.keyring is not None
    if q.reveal and not req.p.can("restricted.reveal"):
        raise ApiError("forbidden", f"role {req.p.role.value} may not restricted.reveal")
    org = req.p.org_id
    async with req.rt.tiers.db.tenant(org) as conn:
        row = await conn.fetchrow("SELECT id, restricted, restricted_key_id FROM collection_accounts WHERE id = $1 "
                                  "AND deleted_at IS NULL", req.params["account_id"])
        if row is None:
            raise not_found("account")
        values = _open(req.rt.keyring, org, row)
        if q.reveal:
            await req.audit("account.restricted_revealed", "collection_account", row["id"], None,
                            {"fields": sorted(values)}).apply(conn)
    shown = {k: values.get(k) for k in ("ssn", "date_of_birth", "card_reference")} if q.reveal else _masked(values)
    return Reply({**shown, "masked": not q.reveal, "key_id": row["restricted_key_id"]},
                 headers={"Cache-Control": "no-store"})


async def rotate(db: Database, keyring: Keyring, *, batch: int = 500) -> dict[str, int]:
    """Re-seal every restricted value under an older key with the active one; returns counts."""
    done = failed = 0
    for org in await live_orgs(db):
        skip: list[uuid.UUID] = []  # values no key in the ring opens: reported, left as they are
        while True:
            async with db.tenant(org) as conn:
                rows = await conn.fetch(
                    "SELECT id, restricted, restricted_key_id FROM collection_accounts WHERE restricted IS NOT NULL "
                    "AND restricted_key_id <> $1 AND NOT (id = ANY($3)) LIMIT $2 FOR UPDATE",
                    keyring.active, batch, skip)
                for row in rows:
                    try:
                        plain = keyring.decrypt(row["restricted_key_id"], bytes(row["restricted"]),
                                                aad(TABLE, org, row["id"]))
                    except DecryptError:
                        failed += 1
                        skip.append(row["id"])
                        continue
                    kid, blob = keyring.encrypt(plain, aad(TABLE, org, row["id"]))
                    await conn.execute("UPDATE collection_accounts SET restricted = $2, restricted_key_id = $3 "
                                       "WHERE id = $1 AND restricted_key_id = $4", row["id"], blob, kid,
                                       row["restricted_key_id"])
                    done += 1
            if len(rows) < batch:
                break
    return {"rotated": done, "failed": failed}


_A = (("account_id", "uuid"),)
ROUTES = [
    Route("PUT", "/api/accounts/{account_id}/restricted", "put_restricted",
          "Replace an account's restricted fields (encrypted at rest)", "accounts", "action", "accounts.write",
          put_restricted, params=_A, body=RestrictedIn, response=RestrictedOut, errors=("not_found",), max_body=1024),
    Route("GET", "/api/accounts/{account_id}/restricted", "get_restricted",
          "An account's restricted fields, masked (or whole: ?reveal=true, owners and admins, audited)", "accounts",
          "action", "accounts.read", get_restricted, params=_A, query=RestrictedQuery, response=RestrictedOut,
          errors=("not_found",)),
]
