"""Who is asking, and what they may do: one identity check for every door.

Credentials (all random, 256 bits from ``secrets``; only their SHA-256 is stored anywhere):

===============  ==========================================  ============================================
credential       how it is presented                          what it is
===============  ==========================================  ============================================
session          cookie ``sb_session``, or ``Authorization:  a signed-in user; 7 days in the warm tier,
                 Bearer <token>``                             slid on use; revoked by logout, by a password
                                                              or role change, by deactivation
API key          ``Authorization: Bearer sbk_...``            an organisation's key with a role; durable in
                                                              PostgreSQL; revocable; last use recorded
SSE token        ``?access_token=sbs_...`` on one call's      minted by ``POST /api/calls/{id}/sse-token``
                 event stream only                            for an EventSource on another origin (which
                                                              cannot send a header); <= 5 minutes; one call
media token      Telnyx's ``stream_auth_token`` (header       decides the organisation of a media stream
                 ``x-telnyx-streaming-auth-token``)
metrics token    ``Authorization: Bearer`` on ``/api/stats``  a scraper's credential, nothing else
===============  ==========================================  ============================================

Roles and what each may do are the one table ``PERMISSIONS`` (README shows it).  A user belongs to one
organisation; every ``Principal`` carries it, and every query runs in that tenant (RLS), so a wrong id
is simply absent: another tenant's call and an unknown call answer the same 404.

With storage off (``SWITCHBOARD_PERSIST=false``: the real-time path alone, for benchmarks) there are no
users: the only credentials are the bootstrap organisation's media token and admin API key from the
settings (``telnyx_stream_token``, ``bootstrap_api_key``), the metrics token, and SSE tokens kept in
memory.  With storage on, those two settings are registered in the bootstrap organisation at start-up
(``storage.accounts.register_bootstrap_credentials``) and then behave like any other token or key.

Comparisons of presented secrets against configured ones use ``hmac.compare_digest``; stored ones
are found by their hash, which reveals nothing about the secret.  Passwords are argon2id
(``argon2-cffi``, its default parameters: 64 MiB, 3 passes), hashed and verified in threads, at most
``HASH_CONCURRENCY`` at a time, so logins cannot starve the event loop or the memory; an unknown
address is verified against a dummy hash, so the answer takes as long as for a known one.  At most
``MAX_LOGINS_WAITING`` sign-ins wait for (or hold) a slot; another is refused at once with 503, so a
flood of logins from many addresses (or through a reverse proxy, which ``per_address_exempt`` does
not count) bounds how long any login waits instead of queueing every later one behind it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Literal

import orjson
from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from api.envelope import ApiError
from api.settings import Settings

if TYPE_CHECKING:
    from api.tiers import Tiers

# The organisation of a deployment configured by environment, and of every call when storage is off:
# fixed, so restarts and nodes agree.
BOOTSTRAP_ORG_ID = uuid.uuid5(uuid.NAMESPACE_URL, "switchboard:default-organization")

SESSION_COOKIE = "sb_session"
log = logging.getLogger("switchboard.auth")

API_KEY_PREFIX = "sbk_"
MEDIA_TOKEN_PREFIX = "sbm_"
SSE_TOKEN_PREFIX = "sbs_"
CALL_TOKEN_PREFIX = "sbc_"  # a placed call's media credential (Authenticator.call_token)
PENDING_CALL_PREFIX = "pending-"  # calls.call_control_id until Telnyx names the call (api.telnyx_calls)
CALL_OPEN = frozenset({"initiating", "ringing", "active", "ending"})  # calls.status a call token admits
PREFIX_CHARS = 12  # shown to tell keys apart: "sbk_" and 8 random characters
SSE_TOKEN_MAX_TTL_S = 300
MAX_PRESENTED_CHARS = 512  # a longer credential is not looked up at all
HASH_CONCURRENCY = 2  # argon2id runs at once (64 MiB each)
# Sign-in verifications waiting for or holding a slot (about two seconds of work); past it a login is refused at
# once (503), so that a flood of logins from many addresses cannot make every login wait without end.
MAX_LOGINS_WAITING = 32
MAX_MEMORY_SSE_TOKENS = 10_000  # storage off: SSE tokens held; past it the oldest goes
# Media tokens found in PostgreSQL are remembered per node: a new stream of a known organisation needs
# no query for ``settings.media_token_cache_s`` (30 s: so a revocation reaches every node within that),
# and while PostgreSQL does not answer, a token seen within MEDIA_TOKEN_STALE_S still admits its
# calls (a database outage must not stop the phones).  Unknown tokens are never remembered; at most
# MEDIA_TOKEN_CACHE entries, the least recently used goes first.
MEDIA_TOKEN_STALE_S = 3600.0
MEDIA_TOKEN_CACHE = 10_000

Kind = Literal["session", "api_key", "sse_token", "metrics"]


class Role(StrEnum):
    OWNER = "owner"
    ADMIN = "admin"
    AGENT = "agent"
    VIEWER = "viewer"


_ALL = frozenset(Role)
_ADMINS = frozenset({Role.OWNER, Role.ADMIN})
_STAFF = frozenset({Role.OWNER, Role.ADMIN, Role.AGENT})

# action -> roles allowed.  The one table of what each role may do (README, "Roles").
PERMISSIONS: dict[str, frozenset[Role]] = {
    "org.read": _ALL,
    "org.update": _ADMINS,
    "org.delete": frozenset({Role.OWNER}),  # and wipe everything of it (api.accounts.delete_org)
    "users.read": _ADMINS,
    "users.write": _ADMINS,  # only an owner may grant or take away the owner role (api.accounts)
    "api_keys.read": _ADMINS,
    "api_keys.write": _ADMINS,
    "media_tokens.read": _ADMINS,
    "media_tokens.write": _ADMINS,
    "calls.read": _ALL,  # list, detail, transcripts
    "calls.watch": _ALL,  # a call's live events (SSE), and minting an SSE token for it
    "calls.join": _STAFF,  # speak on a call: a WebRTC session
    "recordings.read": _ALL,
    "audit.read": _ADMINS,
    "stats.read": _ADMINS,
    "stats.reset": _ADMINS,
    "billing.read": _ADMINS,  # plan, subscription status, usage
    "billing.write": _ADMINS,  # subscribe to a plan
    "calls.place": _STAFF,  # place a call through Telnyx, and hang it up
    "calls.delete": _ADMINS,  # soft-delete an ended call, and restore it (api.lifecycle)
    "retention.read": _ADMINS,  # the organisation's retention policy (api.retention_api)
    "retention.write": _ADMINS,
    "erasure.run": _ADMINS,  # erase one person's data (api.erasure_api)
    "restricted.reveal": _ADMINS,  # an account's restricted fields in clear (api.restricted_api)
    "exports.read": _ADMINS,  # report exports (api.exports)
    "exports.write": _ADMINS,
    "evidence.read": _ADMINS,  # sealed evidence bundles of calls (api.evidence)
    "evidence.write": _ADMINS,
    # The collections domain (api.collections_api, api.account_import): agents work accounts (create,
    # edit), admins delete them, import them and run campaigns and the voice settings.
    "accounts.read": _ALL,
    "accounts.write": _STAFF,
    "accounts.delete": _ADMINS,
    "accounts.import": _ADMINS,  # POST /api/accounts/import and the import jobs
    "campaigns.read": _ALL,
    "campaigns.write": _ADMINS,
    "voice_config.read": _ALL,
    "voice_config.write": _ADMINS,
}


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    org_id: uuid.UUID
    role: Role
    kind: Kind
    subject: str  # the user id (session, SSE token) or the API key id; the audit trail's actor_id
    user_id: uuid.UUID | None = None
    call_id: str | None = None  # an SSE token's one call
    session_hash: str | None = None  # a session's sha256, for logout

    @property
    def actor_type(self) -> str:
        return "api_key" if self.kind == "api_key" else "user"

    def can(self, action: str) -> bool:
        return self.role in PERMISSIONS[action]


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _matches(presented: str, configured: str | None) -> bool:
    return configured is not None and hmac.compare_digest(presented.encode(), configured.encode())


class HashersBusy(Exception):
    """``MAX_LOGINS_WAITING`` sign-ins already wait for a hashing slot (``Passwords.verify(login=True)``)."""


class Passwords:
    """argon2id hashing off the event loop, ``HASH_CONCURRENCY`` at a time."""

    def __init__(self) -> None:
        self._hasher = PasswordHasher()
        self._slots = asyncio.Semaphore(HASH_CONCURRENCY)
        self._dummy = self._hasher.hash(secrets.token_urlsafe(16))
        self._logins_waiting = 0

    async def hash(self, password: str) -> str:
        async with self._slots:
            return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, stored: str | None, password: str, *, login: bool = False) -> bool:
        """Constant work whether or not ``stored`` exists (``None``: verify against a dummy, fail).

        ``login``: an unauthenticated sign-in, which waits for a slot only while fewer than
        ``MAX_LOGINS_WAITING`` others do, else raises ``HashersBusy`` at once (the same for every address).
        """
        def check() -> bool:
            try:
                return self._hasher.verify(stored or self._dummy, password) and stored is not None
            except (VerificationError, InvalidHashError):
                return False
        if not login:
            async with self._slots:
                return await asyncio.to_thread(check)
        if self._logins_waiting >= MAX_LOGINS_WAITING:
            raise HashersBusy
        self._logins_waiting += 1
        try:
            async with self._slots:
                return await asyncio.to_thread(check)
        finally:
            self._logins_waiting -= 1


def presented(value: str) -> str | None:
    """``value`` if it could be a credential: 1-``MAX_PRESENTED_CHARS`` printable ASCII, as every secret
    here is.  Anything else is none, never looked up: a header's non-UTF-8 bytes arrive as surrogates,
    which neither hashing nor PostgreSQL can encode."""
    return value if 0 < len(value) <= MAX_PRESENTED_CHARS and value.isascii() and value.isprintable() else None


def bearer(request: web.Request) -> str | None:
    raw = request.headers.get("Authorization", "")
    scheme, _, value = raw.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return presented(value.strip())


class Authenticator:
    """Resolves presented credentials to a ``Principal``; ``tiers`` is ``None`` when storage is off."""

    def __init__(self, settings: Settings, tiers: Tiers | None) -> None:
        self.settings = settings
        self.tiers = tiers
        self.passwords = Passwords()
        s = settings
        self._media_token = s.telnyx_stream_token.get_secret_value() if s.telnyx_stream_token else None
        self._api_key = s.bootstrap_api_key.get_secret_value() if s.bootstrap_api_key else None
        self._metrics = s.metrics_token.get_secret_value() if s.metrics_token else None
        self._sse_tokens: OrderedDict[bytes, tuple[float, Principal]] = OrderedDict()  # storage off only
        self._media_cache: OrderedDict[bytes, tuple[float, uuid.UUID]] = OrderedDict()  # hash -> (found at, org)
        self.media_stale_hits = 0  # streams admitted from a remembered token while PostgreSQL failed
        if s.call_token_key is None:
            log.warning("config.random_call_token_key",
                        extra={"hint": "set SWITCHBOARD_CALL_TOKEN_KEY (the same on every node) so a placed call's "
                                       "media stream is accepted by any node and after a restart"})
            self._call_key = secrets.token_bytes(32)
        else:
            self._call_key = s.call_token_key.get_secret_value().encode()

    # -- media streams ----------------------------------------------------------------------------

    def call_token(self, org_id: uuid.UUID, call_id: uuid.UUID) -> str:
        """The media credential of one placed call (``stream_auth_token`` of ``POST /v2/calls``):
        ``sbc_`` + base64url(org, call, HMAC-SHA256(call_token_key, org|call)[:16]).  Media tokens are
        stored only as hashes, so a call's credential is derived, not stored: it names its organisation
        and nothing else may be forged from it."""
        raw = org_id.bytes + call_id.bytes
        mac = hmac.new(self._call_key, raw, hashlib.sha256).digest()[:16]
        return CALL_TOKEN_PREFIX + base64.urlsafe_b64encode(raw + mac).decode().rstrip("=")

    def _call_token_parts(self, token: str) -> tuple[uuid.UUID, uuid.UUID] | None:
        body = token[len(CALL_TOKEN_PREFIX):]
        if len(body) != 64:
            return None
        try:
            raw = base64.urlsafe_b64decode(body)
        except ValueError:
            return None
        if len(raw) != 48:
            return None
        mac = hmac.new(self._call_key, raw[:32], hashlib.sha256).digest()[:16]
        if not hmac.compare_digest(mac, raw[32:]):
            return None
        return uuid.UUID(bytes=raw[:16]), uuid.UUID(bytes=raw[16:32])

    async def _call_token_org(self, token: str) -> tuple[uuid.UUID | None, str | None]:
        """The organisation of a valid ``sbc_`` token whose call is still open, and that call's
        ``call_control_id`` (the only call the credential may stream; ``None`` while Telnyx has not
        named it yet): a finished call's credential admits nothing.  When PostgreSQL does not answer,
        the signature alone admits (media must not stop for a storage outage), counted in
        ``media_stale_hits``."""
        parts = self._call_token_parts(token)
        if parts is None:
            return None, None
        org, call = parts
        if self.tiers is None:
            return org, None
        try:
            async with self.tiers.db.tenant(org) as conn:
                row = await conn.fetchrow("SELECT status, call_control_id FROM calls WHERE id = $1", call)
        except Exception:
            self.media_stale_hits += 1
            return org, None
        if row is None or row["status"] not in CALL_OPEN:
            return None, None
        ccid = row["call_control_id"]
        return org, None if ccid.startswith(PENDING_CALL_PREFIX) else ccid

    async def media_credential(self, token: str | None) -> tuple[uuid.UUID | None, str | None]:
        """``media_org``, and for a placed call's ``sbc_`` credential the one call id it may stream."""
        if token and token.startswith(CALL_TOKEN_PREFIX) and presented(token) is not None:
            return await self._call_token_org(token)
        return await self.media_org(token), None

    async def media_org(self, token: str | None) -> uuid.UUID | None:
        """The organisation whose media token this is; ``None`` for a missing or unknown one."""
        if not token or presented(token) is None:
            return None
        if token.startswith(CALL_TOKEN_PREFIX):
            return (await self._call_token_org(token))[0]
        if self.tiers is None:
            return BOOTSTRAP_ORG_ID if _matches(token, self._media_token) else None
        digest, now, cache = secret_hash(token), time.monotonic(), self._media_cache
        known = cache.get(digest)
        if known is not None and now - known[0] < self.settings.media_token_cache_s:
            cache.move_to_end(digest)
            return known[1]
        try:
            async with self.tiers.db.no_tenant() as conn:
                row = await conn.fetchrow("SELECT org_id FROM auth_media_token($1)", digest)
        except Exception:
            if known is not None and now - known[0] < MEDIA_TOKEN_STALE_S:
                self.media_stale_hits += 1
                return known[1]
            raise
        if row is None:
            cache.pop(digest, None)  # revoked, or its organisation deleted
            return None
        cache[digest] = (now, row["org_id"])
        cache.move_to_end(digest)
        while len(cache) > MEDIA_TOKEN_CACHE:
            cache.popitem(last=False)
        return row["org_id"]  # type: ignore[no-any-return]

    # -- HTTP requests ----------------------------------------------------------------------------

    async def principal(self, request: web.Request) -> Principal | None:
        """The caller of ``request`` by its ``Authorization: Bearer`` (API key or session token) or its
        session cookie; ``None`` when there is none or it is unknown, expired or revoked."""
        token = bearer(request)
        if token is None:
            token = presented(request.cookies.get(SESSION_COOKIE, ""))
            if token is None:
                return None
        if token.startswith(API_KEY_PREFIX):
            return await self.api_key(token)
        if token.startswith((MEDIA_TOKEN_PREFIX, SSE_TOKEN_PREFIX)):
            return None  # never a credential for the API
        return await self.session(token)

    async def api_key(self, token: str) -> Principal | None:
        if self.tiers is None:  # with storage on the bootstrap key is a row like any other: revocable
            return Principal(BOOTSTRAP_ORG_ID, Role.ADMIN, "api_key", "bootstrap") if _matches(
                token, self._api_key) else None
        async with self.tiers.db.no_tenant() as conn:
            row = await conn.fetchrow("SELECT key_id, org_id, role, user_id FROM auth_api_key($1)", secret_hash(token))
        if row is None:
            return None
        return Principal(row["org_id"], Role(row["role"]), "api_key", str(row["key_id"]), user_id=row["user_id"])

    async def session(self, token: str) -> Principal | None:
        if self.tiers is None:
            return None
        warm = self.tiers.warm
        sess = await warm.use_session(token)  # read and slid (sliding expiry) in one step
        if sess is None:
            return None
        return Principal(uuid.UUID(sess.org_id), Role(sess.role), "session", sess.user_id,
                         user_id=uuid.UUID(sess.user_id), session_hash=hashlib.sha256(token.encode()).hexdigest())

    async def sse_principal(self, request: web.Request, call_id: str) -> Principal | None:
        """For one call's event stream: the request's principal, or an SSE token for this call."""
        token = request.query.get("access_token")
        if token is None:
            return await self.principal(request)
        if not token.startswith(SSE_TOKEN_PREFIX) or presented(token) is None:
            return None
        found = await self._sse_token(token)
        if found is None or found.call_id != call_id:
            return None
        return found

    async def mint_sse_token(self, p: Principal, call_id: str, ttl_s: int = SSE_TOKEN_MAX_TTL_S) -> str:
        """A token that lets an EventSource watch ``call_id`` as ``p`` for ``ttl_s`` (<= 5 minutes)."""
        ttl_s = max(1, min(int(ttl_s), SSE_TOKEN_MAX_TTL_S))
        token = new_secret(SSE_TOKEN_PREFIX)
        scoped = Principal(p.org_id, p.role, "sse_token", p.subject, user_id=p.user_id, call_id=call_id)
        if self.tiers is None:
            tokens = self._sse_tokens
            tokens[secret_hash(token)] = (time.monotonic() + ttl_s, scoped)
            while len(tokens) > MAX_MEMORY_SSE_TOKENS:
                tokens.popitem(last=False)
            return token
        record = orjson.dumps({"org_id": str(p.org_id), "role": p.role.value, "subject": p.subject,
                               "user_id": str(p.user_id) if p.user_id else None, "call_id": call_id})
        await self.tiers.warm.redis.set(self._sse_key(token), record, ex=ttl_s)
        return token

    async def _sse_token(self, token: str) -> Principal | None:
        if self.tiers is None:
            entry = self._sse_tokens.get(secret_hash(token))
            if entry is None or entry[0] < time.monotonic():
                return None
            return entry[1]
        raw = await self.tiers.warm.redis.get(self._sse_key(token))
        if raw is None:
            return None
        rec = orjson.loads(raw)
        return Principal(uuid.UUID(rec["org_id"]), Role(rec["role"]), "sse_token", rec["subject"],
                         user_id=uuid.UUID(rec["user_id"]) if rec["user_id"] else None, call_id=rec["call_id"])

    def _sse_key(self, token: str) -> str:
        return "sb:sse:" + secret_hash(token).hex()

    def metrics_ok(self, request: web.Request) -> bool:
        token = bearer(request)
        return token is not None and _matches(token, self._metrics)


async def require(auth: Authenticator, request: web.Request, action: str) -> Principal:
    """The request's principal if its role may do ``action``; else 401 (no valid credential) or 403."""
    p = await auth.principal(request)
    if p is None:
        raise ApiError("unauthenticated", "sign in, or send Authorization: Bearer <API key or session token>")
    if not p.can(action):
        raise ApiError("forbidden", f"role {p.role.value} may not {action}")
    return p
