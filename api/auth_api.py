"""``/api/auth``: sign in, sign out, who am I, change my password.

Login limits, all in the warm tier (settings in brackets; README states the defaults):

==========================  =========================================================================
limit                       rule
==========================  =========================================================================
per client address          ``login_per_address_per_min`` (10) attempts a minute; addresses in
                            ``per_address_exempt`` (a local reverse proxy) are not counted here
per account (e-mail)        ``login_per_account_per_min`` (10) attempts a minute
lock-out                    ``login_lockout_failures`` (5) wrong passwords for one e-mail address
                            within ``login_lockout_s`` (900 s) lock that address for
                            ``login_lockout_s``: even the right password gets 429 until it ends
==========================  =========================================================================

Every refusal is 429 ``rate_limited`` with ``Retry-After``; while ``api.auth.MAX_LOGINS_WAITING``
sign-ins already wait for a password-hashing slot, a login is 503 ``unavailable`` with ``Retry-After``
(nothing counted against the address).  The account limits are keyed by a hash of
the e-mail address whether or not a user has it, and an unknown address is verified against a dummy
hash, so neither the answer nor its timing tells whether an address exists.  A success clears the
address's failure count.  The lock-out lets anyone who knows an address keep that user out for 15
minutes at a time: accepted, since the alternative (no lock-out) lets them guess its password.

Audit: ``auth.login`` on success; ``auth.login_failed`` when the address belongs to a user (the
entry needs a tenant, which an unknown address does not have: those are logged, with a running
count, as ``auth.login_unknown``).  ``auth.logout`` and ``auth.password_changed`` likewise.

The session is a warm-tier session (``WarmStore.create_session``, 7 days, slid on use), handed back
as ``token`` and as the cookie ``sb_session`` (HttpOnly, SameSite=Strict, Path=/, Max-Age 7 days,
and Secure unless the server is bound to a loopback address and addressed by a loopback name: a
plain-HTTP local set-up must work, and behind a TLS proxy on this host the browser names the public
host).  ``POST /api/auth/password`` has the login's lock-out per user: a stolen session cannot guess
the current password at the write rate.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from typing import Annotated, Any

from pydantic import BaseModel, Field, StringConstraints

from api.accounts import MAX_PASSWORD, ORG_COLUMNS, USER_COLUMNS, OrgOut, Password, UserOut, org_out, user_out
from api.auth import PERMISSIONS, SESSION_COOKIE, HashersBusy, Role, bearer
from api.envelope import ApiError
from api.middleware import is_loopback
from api.rest import Reply, Req, Route, Strict

log = logging.getLogger("switchboard.auth")

SESSION_MAX_AGE_S = 7 * 86400
_unknown_logins = itertools.count(1)


class LoginIn(Strict):
    email: Annotated[str, StringConstraints(min_length=1, max_length=320)]
    password: Annotated[str, StringConstraints(min_length=1, max_length=MAX_PASSWORD)]


class SessionOut(BaseModel):
    token: str | None = Field(description="the session token (null in an idempotent replay of a password change)")
    user: UserOut
    org: OrgOut
    expires_in: int = Field(description="seconds; the session slides on use")
    secret_withheld: bool | None = None


class MeOut(BaseModel):
    kind: str = Field(description="session or api_key")
    role: Role
    user: UserOut | None
    org: OrgOut
    api_key_id: str | None = None
    permissions: list[str] = Field(description="the actions this credential's role may take (the role table): "
                                               "what a user interface may offer")


class PasswordIn(Strict):
    current_password: Annotated[str, StringConstraints(min_length=1, max_length=MAX_PASSWORD)]
    new_password: Password


class LoggedOut(BaseModel):
    revoked: bool


def _cookie(req: Req, token: str) -> tuple[str, str, dict[str, Any]]:
    attrs: dict[str, Any] = {"httponly": True, "samesite": "Strict", "path": "/", "max_age": SESSION_MAX_AGE_S}
    if not _plain_local(req):
        attrs["secure"] = True
    return (SESSION_COOKIE, token, attrs)


def _plain_local(req: Req) -> bool:
    """Bound to loopback and addressed by a loopback name: ``make run`` on plain HTTP.  Behind a TLS
    proxy the node is bound to loopback too, but the browser addressed the public name."""
    if not is_loopback(req.rt.settings.host):
        return False
    name = req.request.host.rsplit(":", 1)[0] if not req.request.host.startswith("[") else \
        req.request.host.split("]", 1)[0] + "]"
    return name.lower() in ("localhost", "[::1]") or (not name.startswith("[") and is_loopback(name))


async def _limit(req: Req, key: str, limit: int) -> None:
    assert req.rt.tiers is not None
    d = await req.rt.tiers.warm.hit_rate_limit(key, limit, 60)
    if not d.allowed:
        raise ApiError("rate_limited", "too many sign-in attempts; wait and retry",
                       headers={"Retry-After": str(d.reset_s)})


async def _session_reply(req: Req, user_id: Any, org_id: Any, role: str, password_hash: str,
                         status: int = 200) -> Reply:
    """A new session for the user as ``role``, who proved ``password_hash``'s password.

    The user is read again *after* the session exists: a role change, a deactivation or a new password
    that committed while the password was verified (seconds, when sign-ins queue for a hashing slot)
    revoked the user's sessions before this one existed, so it is revoked here; one that commits after
    this read revokes it itself (``api.accounts.change_user``)."""
    tiers = req.rt.tiers
    assert tiers is not None
    token = await tiers.warm.create_session(user_id=str(user_id), org_id=str(org_id), role=role)
    async with tiers.db.tenant(org_id) as conn:
        user = await conn.fetchrow(f"SELECT {USER_COLUMNS}, password_hash FROM users WHERE id = $1 "
                                   "AND deleted_at IS NULL", user_id)
        org = await conn.fetchrow(f"SELECT {ORG_COLUMNS} FROM organizations WHERE id = $1", org_id)
    if user is None or not user["active"] or user["role"] != role or user["password_hash"] != password_hash:
        await tiers.warm.revoke_session(token)
        raise ApiError("unauthenticated", "the account changed while signing in; sign in again")
    return Reply({"token": token, "user": user_out(user), "org": org_out(org), "expires_in": SESSION_MAX_AGE_S},
                 status=status, cookies=(_cookie(req, token),), headers={"Cache-Control": "no-store"},
                 secrets=("token",))  # an Idempotency-Key on POST /api/auth/password must not keep it


async def login(req: Req) -> Reply:
    body: LoginIn = req.body
    s = req.rt.settings
    tiers = req.rt.tiers
    assert tiers is not None
    warm = tiers.warm
    if req.ip and req.ip not in s.per_address_exempt:
        await _limit(req, f"login:ip:{req.ip}", s.login_per_address_per_min)
    email = body.email.strip().lower()
    account = hashlib.sha256(email.encode()).hexdigest()[:32]
    await _limit(req, f"login:acct:{account}", s.login_per_account_per_min)
    locked = await warm.locked_for(f"login:{account}")
    if locked:
        raise ApiError("rate_limited", "too many wrong passwords for this address; wait and retry",
                       headers={"Retry-After": str(locked)})
    async with tiers.db.no_tenant() as conn:
        row = await conn.fetchrow("SELECT user_id, org_id, password_hash, role FROM auth_login_lookup($1)", email)
    try:
        verified = await req.rt.auth.passwords.verify(row["password_hash"] if row else None, body.password,
                                                      login=True)
    except HashersBusy:
        raise ApiError("unavailable", "too many sign-ins at once; retry shortly",
                       headers={"Retry-After": "1"}) from None
    if not verified:
        failures = await warm.hit_rate_limit(f"loginfail:{account}", s.login_lockout_failures, s.login_lockout_s)
        now_locked = failures.remaining == 0
        if now_locked:
            await warm.lock(f"login:{account}", s.login_lockout_s)
        if row is None:
            log.info("auth.login_unknown", extra={"count": next(_unknown_logins)})
        else:
            async with tiers.db.tenant(row["org_id"]) as conn:
                entry = req.audit("auth.login_failed", "user", row["user_id"], None,
                                  {"locked": now_locked}, org_id=row["org_id"], actor_id=row["user_id"])
                await entry.apply(conn)
        raise ApiError("unauthenticated", "wrong e-mail address or password")
    await warm.reset_rate_limit(f"loginfail:{account}", s.login_lockout_s)
    async with tiers.db.tenant(row["org_id"]) as conn:
        await conn.execute("UPDATE users SET last_login_at = now() WHERE id = $1", row["user_id"])
        entry = req.audit("auth.login", "user", row["user_id"], org_id=row["org_id"], actor_id=row["user_id"])
        await entry.apply(conn)
    return await _session_reply(req, row["user_id"], row["org_id"], row["role"], row["password_hash"])


async def logout(req: Req) -> Reply:
    tiers = req.rt.tiers
    assert tiers is not None
    token = _presented_session(req)
    revoked = bool(token) and await tiers.warm.revoke_session(token)
    async with tiers.db.tenant(req.p.org_id) as conn:
        await req.audit("auth.logout", "user", req.p.user_id).apply(conn)
    return Reply({"revoked": revoked}, cookies=((SESSION_COOKIE, "", {"path": "/"}),))


def _presented_session(req: Req) -> str:
    token = bearer(req.request)
    return token if token is not None else req.request.cookies.get(SESSION_COOKIE, "")


async def me(req: Req) -> Reply:
    p = req.p
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(p.org_id) as conn:
        org = await conn.fetchrow(f"SELECT {ORG_COLUMNS} FROM organizations WHERE id = $1", p.org_id)
        user = (await conn.fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE id = $1", p.user_id)
                if p.user_id is not None else None)
    if org is None:
        raise ApiError("unauthenticated", "this credential's organisation is gone")
    return Reply({"kind": p.kind, "role": p.role.value, "user": user_out(user) if user else None,
                  "org": org_out(org), "api_key_id": p.subject if p.kind == "api_key" else None,
                  "permissions": sorted(a for a in PERMISSIONS if p.can(a))})


async def change_password(req: Req) -> Reply:
    body: PasswordIn = req.body
    p = req.p
    tiers = req.rt.tiers
    assert tiers is not None
    async with tiers.db.tenant(p.org_id) as conn:
        stored = await conn.fetchval("SELECT password_hash FROM users WHERE id = $1 AND active "
                                     "AND deleted_at IS NULL", p.user_id)
    # A stolen session must not guess the password at the write rate: the login's lock-out, per user.
    s, lock = req.rt.settings, f"password:{p.user_id}"
    locked = await tiers.warm.locked_for(lock)
    if locked:
        raise ApiError("rate_limited", "too many wrong current passwords; wait and retry",
                       headers={"Retry-After": str(locked)})
    if not await req.rt.auth.passwords.verify(stored, body.current_password):
        failures = await tiers.warm.hit_rate_limit(f"passwordfail:{p.user_id}", s.login_lockout_failures,
                                                   s.login_lockout_s)
        if failures.remaining == 0:
            await tiers.warm.lock(lock, s.login_lockout_s)
        raise ApiError("forbidden", "the current password is wrong")
    new_hash = await req.rt.auth.passwords.hash(body.new_password)
    async with tiers.db.tenant(p.org_id) as conn:
        await conn.execute("UPDATE users SET password_hash = $2, updated_at = now() WHERE id = $1", p.user_id,
                           new_hash)
        await req.audit("auth.password_changed", "user", p.user_id, None, {"password_changed": True}).apply(conn)
        await tiers.warm.revoke_user_sessions(str(p.user_id))  # every session, this one too ...
    return await _session_reply(req, p.user_id, p.org_id, p.role.value, new_hash)  # ... which gets a new one


ROUTES = [
    Route("POST", "/api/auth/login", "login", "Sign in with e-mail and password", "auth", "public", None, login,
          body=LoginIn, response=SessionOut, errors=("unauthenticated", "rate_limited"), max_body=4096,
          description="Sets the sb_session cookie and returns the same token for Authorization: Bearer. "
                      "Idempotency-Key is ignored here."),
    Route("POST", "/api/auth/logout", "logout", "Sign out: revoke the presented session", "auth", "session", None,
          logout, response=LoggedOut),
    Route("GET", "/api/auth/me", "me", "The caller: user, organisation, role, credential kind", "auth",
          "credential", None, me, response=MeOut),
    Route("POST", "/api/auth/password", "change_password", "Change your own password (signs out everywhere else)",
          "auth", "session", None, change_password, body=PasswordIn, response=SessionOut, max_body=4096),
]
