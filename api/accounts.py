"""``/api/org`` and ``/api/users``: an organisation's own record and its people.

Rules beyond the role table (``api.auth.PERMISSIONS``):

* Only an owner may create an owner, change anything about an owner, or make someone an owner; an
  admin trying gets 403.
* The last active owner cannot be demoted or deactivated (409 ``conflict``).  The check locks every
  active owner row of the organisation (``FOR UPDATE``), so two concurrent demotions of the last two
  owners cannot both pass.
* A role change, a deactivation or a password change revokes every session of that user (its
  sessions carry the role): in the transaction before it commits, and again after, so a session
  created in between does not survive either.  API keys are the organisation's, not the user's, and
  stay.
* ``DELETE /api/users/{id}`` is a soft delete (``api.lifecycle``, as accounts, campaigns and calls):
  the user leaves lists and reads at once and every session of theirs is revoked (before the commit
  and again after, as above), so they cannot sign in (the login look-up skips deleted users) nor go on
  with a session; ``POST /api/users/{id}/restore`` brings them back within the restore window, with
  their role and state, and without the old sessions (revoked sessions are gone from the warm tier:
  they sign in again).  Past the window the retention job deletes the row (storage/retention.py,
  ``users_deleted``; the audit trail keeps its ids).  Nobody deletes themselves (409), the last active
  owner cannot be deleted (409, the same locked check as a demotion), an owner only by an owner (403),
  and a user erased by ``POST /api/erasures`` is not restored (410: erasure is final).
  ``PATCH active=false`` stays plain deactivation: the user stays listed and comes back with
  ``PATCH active``.  API keys and media tokens are the organisation's, not a user's: they stay live
  when their creator is deleted, and revoking one is final (there is no restore for a credential: a
  revoked secret never comes back).
* E-mail addresses are unique among live users of the whole system (one login form); a taken address
  is 409 ``already_exists`` even when another organisation holds it.

Audit values (``audit_logs.old_value`` / ``new_value``) hold the role, ``active`` and whether the
display name or password changed, never the e-mail address, the display name, a password or a hash:
the trail is append-only and outlives the user row, so it must not be a second, unerasable copy of a
person's details.  The user id links an entry to the row while the row exists.
"""

from __future__ import annotations

import secrets
import uuid
from datetime import datetime
from typing import Annotated, Any

import asyncpg
from pydantic import BaseModel, Field, StringConstraints

from api.auth import Principal, Role
from api.envelope import ApiError, not_found
from api.lifecycle import Deletable, restore, soft_delete
from api.rest import PageQuery, ParamKind, Reply, Req, Route, Strict, decode_cursor, page
from api.settings import ProviderName
from storage.accounts import create_user

EMAIL = r"^[^@\s]+@[^@\s]+$"
MIN_PASSWORD = 12
MAX_PASSWORD = 256
Email = Annotated[str, StringConstraints(min_length=3, max_length=320, pattern=EMAIL, to_lower=True)]
Password = Annotated[str, StringConstraints(min_length=MIN_PASSWORD, max_length=MAX_PASSWORD)]
DisplayName = Annotated[str, StringConstraints(max_length=200)]
Lang = Annotated[str, StringConstraints(pattern=r"^[a-z]{2,3}$")]
ChainLang = Annotated[str, StringConstraints(pattern=r"^([a-z]{2,3}|\*)$")]


# -- models ---------------------------------------------------------------------------------------


class OrgSettings(Strict):
    """The organisation's choices over the node's (api.settings): only these keys exist."""

    stt_chain: dict[ChainLang, Annotated[list[ProviderName], Field(min_length=1, max_length=8)]] | None = Field(
        None, max_length=32)
    translate_to: dict[Lang, Lang] | None = Field(None, max_length=32)
    sse_redacted: bool | None = None


class OrgOut(BaseModel):
    id: uuid.UUID
    name: str
    slug: str
    settings: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class OrgPatch(Strict):
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    settings: OrgSettings | None = None


class UserOut(BaseModel):
    id: uuid.UUID
    email: str
    display_name: str
    role: Role
    active: bool
    last_login_at: datetime | None
    created_at: datetime
    updated_at: datetime


class UserCreate(Strict):
    email: Email
    role: Role
    display_name: DisplayName = ""
    password: Password | None = Field(None, description="absent: one is generated and returned once")


class UserCreated(BaseModel):
    user: UserOut
    password: str | None = Field(None, description="the generated password, shown once; null when given")
    secret_withheld: bool | None = None


class UserPatch(Strict):
    role: Role | None = None
    display_name: DisplayName | None = None
    active: bool | None = None
    password: Password | None = None


class UserQuery(PageQuery):
    role: Role | None = None
    active: bool | None = None


ORG_COLUMNS = "id, name, slug, settings, created_at, updated_at"
USER_COLUMNS = "id, email, display_name, role, active, last_login_at, created_at, updated_at"


def org_out(row: Any) -> dict[str, Any]:
    return OrgOut.model_validate(dict(row)).model_dump(mode="json")


def user_out(row: Any) -> dict[str, Any]:
    return UserOut.model_validate(dict(row)).model_dump(mode="json")


# -- org ------------------------------------------------------------------------------------------


async def get_org(req: Req) -> Reply:
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        row = await conn.fetchrow(f"SELECT {ORG_COLUMNS} FROM organizations WHERE id = $1", req.p.org_id)
    if row is None:
        raise not_found("organisation")
    return Reply(org_out(row))


async def patch_org(req: Req) -> Reply:
    body: OrgPatch = req.body
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        old = await conn.fetchrow(f"SELECT {ORG_COLUMNS} FROM organizations WHERE id = $1 FOR UPDATE",
                                  req.p.org_id)
        if old is None:
            raise not_found("organisation")
        name = body.name if body.name is not None else old["name"]
        settings = dict(old["settings"] or {})
        if body.settings is not None:
            for key, value in body.settings.model_dump(exclude_unset=True).items():
                if value is None:
                    settings.pop(key, None)  # null removes the organisation's choice: the node's applies
                else:
                    settings[key] = value
        row = await conn.fetchrow(
            f"UPDATE organizations SET name = $2, settings = $3, updated_at = now() WHERE id = $1 "
            f"RETURNING {ORG_COLUMNS}", req.p.org_id, name, settings)
        await req.audit("org.updated", "organization", req.p.org_id,
                        {"name": old["name"], "settings": old["settings"]},
                        {"name": name, "settings": settings}).apply(conn)
    req.rt.policies.forget(req.p.org_id)  # this node's next call reads the new settings; others within 30 s
    return Reply(org_out(row))


class OrgDelete(Strict):
    confirm: Annotated[str, StringConstraints(min_length=1, max_length=200)] = Field(
        description="the organisation's name, exactly: deleting it cannot be undone")


class OrgDeleted(BaseModel):
    id: uuid.UUID
    deleted_at: datetime
    wipe: str = Field(description="'started': every row and object of the organisation is being purged")


async def delete_org(req: Req) -> Reply:
    """The tenant wipe's first step (storage/wipe.py has the rest): the organisation is deleted at once
    (every credential of it refused from now on, its users' sessions revoked), then purged by a job."""
    body: OrgDelete = req.body
    tiers = req.rt.tiers
    assert tiers is not None
    async with tiers.db.tenant(req.p.org_id) as conn:
        org = await conn.fetchrow("SELECT name FROM organizations WHERE id = $1 AND deleted_at IS NULL FOR UPDATE",
                                  req.p.org_id)
        if org is None:
            raise not_found("organisation")
        if body.confirm != org["name"]:
            raise ApiError("validation_failed", "confirm must be the organisation's name, exactly",
                           [{"field": "confirm", "message": "does not match", "type": "confirm"}])
        deleted_at = await conn.fetchval("UPDATE organizations SET deleted_at = now(), updated_at = now() "
                                         "WHERE id = $1 RETURNING deleted_at", req.p.org_id)
        users = [r["id"] for r in await conn.fetch("SELECT id FROM users")]
        await req.audit("org.deleted", "organization", req.p.org_id, None, {"deleted": True}).apply(conn)
    for user_id in users:
        await tiers.warm.revoke_user_sessions(str(user_id))
    req.rt.policies.forget(req.p.org_id)
    req.rt.start_wipe()
    return Reply({"id": str(req.p.org_id), "deleted_at": deleted_at.isoformat(), "wipe": "started"}, status=202)


# -- users ----------------------------------------------------------------------------------------


def _owner_rule(p: Principal, *roles: Role | None) -> None:
    if Role.OWNER in roles and p.role != Role.OWNER:
        raise ApiError("forbidden", "only an owner may create, change or appoint an owner")


async def _other_active_owners(conn: asyncpg.Connection, org_id: uuid.UUID, user_id: uuid.UUID) -> int:
    rows = await conn.fetch("SELECT id FROM users WHERE org_id = $1 AND role = 'owner' AND active "
                            "AND deleted_at IS NULL ORDER BY id FOR UPDATE", org_id)
    return sum(1 for r in rows if r["id"] != user_id)


async def create_user_route(req: Req) -> Reply:
    body: UserCreate = req.body
    _owner_rule(req.p, body.role)
    generated = secrets.token_urlsafe(18) if body.password is None else None
    tiers = req.rt.tiers
    assert tiers is not None
    password_hash = await req.rt.auth.passwords.hash(body.password or generated or "")
    async with tiers.db.tenant(req.p.org_id) as conn:
        try:
            async with conn.transaction():  # a savepoint: the violation must not end the transaction
                user_id = await create_user(conn, req.p.org_id, email=body.email, password_hash=password_hash,
                                            role=body.role, display_name=body.display_name)
        except asyncpg.UniqueViolationError:
            raise ApiError("already_exists", "a user with this e-mail address exists") from None
        row = await conn.fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE id = $1", user_id)
        await req.audit("user.created", "user", user_id, None,
                        {"role": body.role.value, "active": True, "password_generated": generated is not None}
                        ).apply(conn)
    return Reply({"user": user_out(row), "password": generated}, status=201,
                 secrets=("password",) if generated else ())


async def list_users(req: Req) -> Reply:
    q: UserQuery = req.query
    after = decode_cursor(q.cursor)
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        rows = await conn.fetch(
            f"SELECT {USER_COLUMNS} FROM users WHERE deleted_at IS NULL "
            "AND ($1::text IS NULL OR role = $1) AND ($2::boolean IS NULL OR active = $2) "
            "AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4)) "
            "ORDER BY created_at DESC, id DESC LIMIT $5",
            q.role.value if q.role else None, q.active, after[0] if after else None, after[1] if after else None,
            q.limit + 1)
    return Reply(page(rows, q.limit, user_out))


async def _user_row(conn: asyncpg.Connection, user_id: uuid.UUID, *, lock: bool = False) -> Any:
    row = await conn.fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE id = $1 AND deleted_at IS NULL"
                              + (" FOR UPDATE" if lock else ""), user_id)
    if row is None:
        raise not_found("user")
    return row


async def get_user(req: Req) -> Reply:
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        return Reply(user_out(await _user_row(conn, req.params["user_id"])))


async def change_user(req: Req, user_id: uuid.UUID, patch: UserPatch, action: str) -> dict[str, Any]:
    """Apply ``patch`` to the user (rules in the module docstring); returns the user as it is now."""
    tiers = req.rt.tiers
    assert tiers is not None
    password_hash = await req.rt.auth.passwords.hash(patch.password) if patch.password is not None else None
    async with tiers.db.tenant(req.p.org_id) as conn:
        old = await _user_row(conn, user_id, lock=True)
        _owner_rule(req.p, Role(old["role"]), patch.role)
        role = patch.role.value if patch.role is not None else old["role"]
        active = patch.active if patch.active is not None else old["active"]
        if old["role"] == "owner" and old["active"] and (role != "owner" or not active):
            if await _other_active_owners(conn, req.p.org_id, user_id) == 0:
                raise ApiError("conflict", "the last active owner cannot be demoted or deactivated")
        row = await conn.fetchrow(
            f"UPDATE users SET role = $2, active = $3, display_name = coalesce($4, display_name), "
            f"password_hash = coalesce($5, password_hash), updated_at = now() WHERE id = $1 RETURNING {USER_COLUMNS}",
            user_id, role, active, patch.display_name, password_hash)
        new_values = {"role": role, "active": active}
        if patch.display_name is not None and patch.display_name != old["display_name"]:
            new_values["display_name_changed"] = True
        if patch.password is not None:
            new_values["password_changed"] = True
        await req.audit(action, "user", user_id, {"role": old["role"], "active": old["active"]}, new_values
                        ).apply(conn)
        revoke = role != old["role"] or (old["active"] and not active) or patch.password is not None
        if revoke:
            await tiers.warm.revoke_user_sessions(str(user_id))
    if revoke:
        await tiers.warm.revoke_user_sessions(str(user_id))  # and any created before the commit
    return user_out(row)


async def patch_user(req: Req) -> Reply:
    return Reply(await change_user(req, req.params["user_id"], req.body, "user.updated"))


USER = Deletable("users", "user", "user", "user", columns=USER_COLUMNS)


async def delete_user(req: Req) -> Reply:
    """Soft delete (the module docstring): refused for oneself, the last active owner, and an owner
    unless by an owner; every session of the user revoked before the commit and after it."""
    tiers = req.rt.tiers
    assert tiers is not None

    async def refuse(conn: asyncpg.Connection, old: Any) -> None:
        if old["id"] == req.p.user_id:
            raise ApiError("conflict", "you cannot delete yourself")
        _owner_rule(req.p, Role(old["role"]))
        if old["role"] == "owner" and old["active"] and await _other_active_owners(conn, req.p.org_id, old["id"]) == 0:
            raise ApiError("conflict", "the last active owner cannot be deleted")

    async def revoke(_conn: asyncpg.Connection, old: Any) -> None:
        await tiers.warm.revoke_user_sessions(str(old["id"]))

    row = await soft_delete(req, USER, req.params["user_id"], refuse=refuse, then=revoke,
                            old_value=lambda old: {"role": old["role"], "active": old["active"]})
    await tiers.warm.revoke_user_sessions(str(row["id"]))  # and any a sign-in created before the commit
    return Reply(user_out(row))


def _erased(row: Any) -> bool:
    """What ``POST /api/erasures`` leaves of a user (api/erasure_api.py): no password, a placeholder address."""
    return row["password_hash"] is None and row["email"] == f"erased-{row['id'].hex}@erased.invalid"


async def restore_user(req: Req) -> Reply:
    async def refuse(_conn: asyncpg.Connection, old: Any) -> None:
        if _erased(old):
            raise ApiError("gone", "this user was erased; erasure cannot be undone")
        _owner_rule(req.p, Role(old["role"]))

    return Reply(user_out(await restore(req, USER, req.params["user_id"], refuse=refuse)))


_U: tuple[tuple[str, ParamKind], ...] = (("user_id", "uuid"),)
ROUTES = [
    Route("GET", "/api/org", "get_org", "Your organisation", "org", "action", "org.read", get_org,
          response=OrgOut),
    Route("PATCH", "/api/org", "patch_org", "Rename the organisation or change its settings", "org", "action",
          "org.update", patch_org, body=OrgPatch, response=OrgOut,
          description="settings: only stt_chain, translate_to and sse_redacted; a null value removes the "
                      "organisation's choice (the node's setting applies)"),
    Route("DELETE", "/api/org", "delete_org", "Delete the organisation and wipe all its data", "org", "action",
          "org.delete", delete_org, body=OrgDelete, response=OrgDeleted, status=202, max_body=1024,
          description="Owners only, with the organisation's name as confirmation.  Every credential stops at "
                      "once; every row and cold-tier object of the organisation is then purged in the "
                      "background (resumable).  The audit trail and a scrubbed organisation row remain."),
    Route("POST", "/api/users", "create_user", "Add a user", "users", "action", "users.write", create_user_route,
          body=UserCreate, response=UserCreated, status=201, errors=("already_exists",)),
    Route("GET", "/api/users", "list_users", "List users", "users", "action", "users.read", list_users,
          query=UserQuery, response=UserOut, paged=True),
    Route("GET", "/api/users/{user_id}", "get_user", "One user", "users", "action", "users.read", get_user,
          response=UserOut, params=_U),
    Route("PATCH", "/api/users/{user_id}", "patch_user", "Change a user's role, name, state or password", "users",
          "action", "users.write", patch_user, body=UserPatch, response=UserOut, params=_U, errors=("conflict",)),
    Route("DELETE", "/api/users/{user_id}", "delete_user", "Delete a user (soft: restorable within the window)",
          "users", "action", "users.write", delete_user, response=UserOut, params=_U, errors=("conflict",),
          description="The user leaves lists and reads at once and every session of theirs is revoked; they "
                      "cannot sign in.  POST /api/users/{user_id}/restore brings them back within "
                      "SWITCHBOARD_RESTORE_WINDOW_DAYS (30) without their old sessions; after it the retention "
                      "job deletes the user for good (the audit trail keeps the id).  409: yourself, or the last "
                      "active owner; 403: an owner, unless you are one.  To only stop someone signing in, PATCH "
                      "active=false.  The organisation's API keys and media tokens stay live; revoking one of "
                      "those is final, there is no restore for a credential."),
    Route("POST", "/api/users/{user_id}/restore", "restore_user", "Restore a deleted user (within the window)",
          "users", "action", "users.write", restore_user, response=UserOut, params=_U,
          errors=("not_found", "conflict", "gone", "already_exists"),
          description="409 when the user is not deleted, or (already_exists) when a live user took the address "
                      "meanwhile; 410 after the restore window, or for a user erased by POST /api/erasures.  "
                      "Old sessions stay revoked: the user signs in again."),
]
