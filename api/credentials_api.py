"""``/api/api-keys`` and ``/api/media-tokens``: an organisation's machine credentials.

Both are shown once, at creation (``key`` / ``token`` in the answer), and stored only as SHA-256
(``storage.accounts``); lists show the prefix (``sbk_`` / ``sbm_`` and 8 characters), never the hash.
``DELETE`` revokes (``revoked_at``); revoking a revoked one answers it unchanged.  Revocation is
final, unlike the soft delete of users, accounts, campaigns and calls (``api.lifecycle``): there is no
restore, because a secret that was revoked (perhaps because it leaked) must never work again; mint a
new one instead.

A creator cannot mint an API key with a role above its own (owner > admin > agent > viewer): 403.
Only an owner may revoke an owner's key (the owner rule of ``api.accounts``).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field, StringConstraints

from api.auth import Role
from api.envelope import ApiError, not_found
from api.rest import PageQuery, Reply, Req, Route, Strict, decode_cursor, page
from storage.accounts import create_api_key, create_media_token

RANK = {Role.VIEWER: 0, Role.AGENT: 1, Role.ADMIN: 2, Role.OWNER: 3}
Name = Annotated[str, StringConstraints(min_length=1, max_length=100)]


class ApiKeyCreate(Strict):
    name: Name
    role: Role


class ApiKeyOut(BaseModel):
    id: uuid.UUID
    name: str
    prefix: str
    role: Role
    created_by: uuid.UUID | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(BaseModel):
    api_key: ApiKeyOut
    key: str | None = Field(description="the key, shown once (null in an idempotent replay)")
    secret_withheld: bool | None = None


class MediaTokenCreate(Strict):
    name: Name


class MediaTokenOut(BaseModel):
    id: uuid.UUID
    name: str
    prefix: str
    created_by: uuid.UUID | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class MediaTokenCreated(BaseModel):
    media_token: MediaTokenOut
    token: str | None = Field(description="Telnyx's stream_auth_token, shown once (null in an idempotent replay)")
    secret_withheld: bool | None = None


KEY_COLUMNS = "id, name, prefix, role, created_by, created_at, last_used_at, revoked_at"
TOKEN_COLUMNS = "id, name, prefix, created_by, created_at, last_used_at, revoked_at"


def key_out(row: Any) -> dict[str, Any]:
    return ApiKeyOut.model_validate(dict(row)).model_dump(mode="json")


def token_out(row: Any) -> dict[str, Any]:
    return MediaTokenOut.model_validate(dict(row)).model_dump(mode="json")


async def _list(req: Req, table: str, columns: str, item: Any) -> Reply:
    q: PageQuery = req.query
    after = decode_cursor(q.cursor)
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        rows = await conn.fetch(
            f"SELECT {columns} FROM {table} "  # table and columns are this module's constants
            "WHERE ($1::timestamptz IS NULL OR (created_at, id) < ($1, $2)) "
            "ORDER BY created_at DESC, id DESC LIMIT $3",
            after[0] if after else None, after[1] if after else None, q.limit + 1)
    return Reply(page(rows, q.limit, item))


async def create_key(req: Req) -> Reply:
    body: ApiKeyCreate = req.body
    if RANK[body.role] > RANK[req.p.role]:
        raise ApiError("forbidden", f"a {req.p.role.value} may not mint a key with role {body.role.value}")
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        issued = await create_api_key(conn, req.p.org_id, name=body.name, role=body.role, created_by=req.p.user_id)
        row = await conn.fetchrow(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1", issued.id)
        await req.audit("api_key.created", "api_key", issued.id, None,
                        {"name": body.name, "role": body.role.value, "prefix": issued.prefix}).apply(conn)
    return Reply({"api_key": key_out(row), "key": issued.secret}, status=201, secrets=("key",))


async def list_keys(req: Req) -> Reply:
    return await _list(req, "api_keys", KEY_COLUMNS, key_out)


async def revoke_key(req: Req) -> Reply:
    key_id = req.params["key_id"]
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        old = await conn.fetchrow(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1 FOR UPDATE", key_id)
        if old is None:
            raise not_found("api key")
        if old["role"] == Role.OWNER and req.p.role != Role.OWNER:
            raise ApiError("forbidden", "only an owner may revoke an owner's key")
        if old["revoked_at"] is not None:
            return Reply(key_out(old))
        row = await conn.fetchrow(f"UPDATE api_keys SET revoked_at = now() WHERE id = $1 RETURNING {KEY_COLUMNS}",
                                  key_id)
        await req.audit("api_key.revoked", "api_key", key_id, {"revoked": False}, {"revoked": True}).apply(conn)
    return Reply(key_out(row))


async def create_token(req: Req) -> Reply:
    body: MediaTokenCreate = req.body
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        issued = await create_media_token(conn, req.p.org_id, name=body.name, created_by=req.p.user_id)
        row = await conn.fetchrow(f"SELECT {TOKEN_COLUMNS} FROM media_tokens WHERE id = $1", issued.id)
        await req.audit("media_token.created", "media_token", issued.id, None,
                        {"name": body.name, "prefix": issued.prefix}).apply(conn)
    return Reply({"media_token": token_out(row), "token": issued.secret}, status=201, secrets=("token",))


async def list_tokens(req: Req) -> Reply:
    return await _list(req, "media_tokens", TOKEN_COLUMNS, token_out)


async def revoke_token(req: Req) -> Reply:
    token_id = req.params["token_id"]
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        old = await conn.fetchrow(f"SELECT {TOKEN_COLUMNS} FROM media_tokens WHERE id = $1 FOR UPDATE", token_id)
        if old is None:
            raise not_found("media token")
        if old["revoked_at"] is not None:
            return Reply(token_out(old))
        row = await conn.fetchrow(
            f"UPDATE media_tokens SET revoked_at = now() WHERE id = $1 RETURNING {TOKEN_COLUMNS}", token_id)
        await req.audit("media_token.revoked", "media_token", token_id, {"revoked": False}, {"revoked": True}
                        ).apply(conn)
    return Reply(token_out(row))


_FINAL = ("Final: a revoked secret never works again and there is no restore (unlike a deleted user, account, "
          "campaign or call); mint a new one instead.")
ROUTES = [
    Route("POST", "/api/api-keys", "create_api_key", "Mint an API key (shown once)", "api-keys", "action",
          "api_keys.write", create_key, body=ApiKeyCreate, response=ApiKeyCreated, status=201),
    Route("GET", "/api/api-keys", "list_api_keys", "List API keys", "api-keys", "action", "api_keys.read",
          list_keys, query=PageQuery, response=ApiKeyOut, paged=True),
    Route("DELETE", "/api/api-keys/{key_id}", "revoke_api_key", "Revoke an API key", "api-keys", "action",
          "api_keys.write", revoke_key, response=ApiKeyOut, params=(("key_id", "uuid"),),
          description=_FINAL),
    Route("POST", "/api/media-tokens", "create_media_token", "Mint a media stream token (shown once)",
          "media-tokens", "action", "media_tokens.write", create_token, body=MediaTokenCreate,
          response=MediaTokenCreated, status=201),
    Route("GET", "/api/media-tokens", "list_media_tokens", "List media stream tokens", "media-tokens", "action",
          "media_tokens.read", list_tokens, query=PageQuery, response=MediaTokenOut, paged=True),
    Route("DELETE", "/api/media-tokens/{token_id}", "revoke_media_token", "Revoke a media stream token",
          "media-tokens", "action", "media_tokens.write", revoke_token, response=MediaTokenOut,
          params=(("token_id", "uuid"),), description=_FINAL),
]
