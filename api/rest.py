"""The REST conventions, once: every resource module declares ``Route`` rows and this module runs them.

A request to a REST route passes these steps, in this order, and the first that refuses answers
(codes from ``api.envelope.CODES``; the doors in ``api.middleware`` ran before: Host, 415, 413):

====  =====================  ========================================================================
step  what                   refusal
====  =====================  ========================================================================
1     storage on             ``rt.tiers is None`` (``SWITCHBOARD_PERSIST=false``): 503 ``unavailable``
2     credential             ``auth="action"``/``"credential"``/``"session"`` and none valid: 401
3     rate limit             per credential and route, 1-minute window (reads ``rate_read_per_min``,
                             writes ``rate_write_per_min``, or the route's own ``rate`` setting):
                             429 ``rate_limited`` + ``Retry-After``
4     permission             the role may not do ``action`` (``api.auth.PERMISSIONS``), or a
                             ``"session"`` route called with an API key: 403 ``forbidden``
5     path parameters        a malformed id is an unknown id: 404 ``not_found``
6     query, then body       pydantic models with ``extra="forbid"``: 400 ``validation_failed`` with
                             ``details`` = one ``{"field", "message", "type"}`` per problem; a body
                             that is not a JSON object: 400 ``bad_request``
7     idempotency            POST/PATCH/DELETE with ``Idempotency-Key`` (or ``X-Idempotency-Key``),
                             see below
8     the handler            its own ``ApiError``; storage failures: 503; anything else: 500
====  =====================  ========================================================================

Idempotency (the IETF Idempotency-Key draft, as Stripe does it): the key is optional on every mutation and honoured
when given (1-255 printable ASCII characters).  It is scoped per organisation and per credential: the
warm-tier key is ``sha256(credential subject, key)`` under the organisation, so two API keys of one
organisation can use the same key without meeting.  The fingerprint is ``HMAC-SHA256(key; method, path,
body)``: keyed by the client's key (which the warm tier does not hold), so a body's password cannot be
guessed from a dump.
The first response (any status) is kept 24 h and replayed with ``Idempotent-Replayed: true``; the same
key with another fingerprint is 422 ``idempotency_key_reused``; while the first still runs, 409
``idempotency_in_progress``.  A once-shown secret (an API key, a media token, a generated password,
the session token of ``POST /api/auth/password``)
is NOT kept: the stored copy has it replaced by ``null`` and ``"secret_withheld": true``, because the
warm tier must never hold a usable credential (storage/warm.py: a dump holds no token).  A client
that lost the first answer revokes what it created and makes another.  ``POST /api/auth/login``
ignores the key: it has no credential to scope by, and its answer is a session token.

Pagination: list routes take ``limit`` (1-200, default 50) and ``cursor`` (opaque: base64url of the
last row's ``(created_at, id)``); they answer ``{"items": [...], "next_cursor": str | null}``, newest
first, keyset-paginated so a page costs the same at any depth.

No answer is cached in the warm tier.  The only read-mostly candidate, ``GET /api/org``, is one
primary-key read (well under a millisecond), and its invalidation could not be exact: the command line
(``switchboard orgs``) writes organisations too, and a reader that fetched the old row just before a
``PATCH`` committed would put it back into the cache after the ``PATCH`` cleared it, serving stale
settings for the cache's lifetime.  Read answers carry no ``Cache-Control`` of their own except
``no-store`` on those that hold a secret or a signed URL.

No I/O here except through ``rt``; the route table is data, and ``api.openapi`` renders it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import asyncpg
import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError

from api.auth import PERMISSIONS, Principal
from api.envelope import ApiError, error_response, not_found, ok
from api.middleware import body_limit, streamed_body
from api.settings import Settings
from engine.ids import ID as CALL_ID
from storage.records import AuditEntry
from storage.warm import StoredResponse

if TYPE_CHECKING:
    from api.runtime import Runtime

log = logging.getLogger("switchboard.rest")

MUTATIONS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
IDEMPOTENCY_HEADERS = ("Idempotency-Key", "X-Idempotency-Key")
MAX_IDEMPOTENCY_KEY = 255
IDEMPOTENCY_RUNNING_S = 60  # a claim lapses after this if its request never finishes
DEFAULT_LIMIT = 50
MAX_LIMIT = 200
DEFAULT_BODY = 16 << 10
NO_BODY_POST = 1024  # bytes a REST body may have unless its route says otherwise

# public: no credential; credential: any valid one; session: a signed-in user (not an API key);
# action: a role that PERMISSIONS allows; media / signed: documented doors of other modules
# (a media token; a signed URL).
Auth = Literal["public", "credential", "session", "action", "media", "signed"]
ParamKind = Literal["uuid", "call_id", "string"]

# Errors every route of a kind can answer (added to each route's own list in the document).
_ALWAYS = ("misdirected_request", "internal_error", "unavailable")
_AUTHED = ("unauthenticated", "forbidden", "rate_limited")
_BODIED = ("bad_request", "validation_failed", "payload_too_large", "unsupported_media_type", "request_timeout")
_IDEMPOTENT = ("idempotency_in_progress", "idempotency_key_reused", "bad_request")


class Strict(BaseModel):
    """The base of every body and query model: unknown fields are refused (no mass assignment)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class PageQuery(Strict):
    limit: int = Field(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="items per page")
    cursor: str | None = Field(None, min_length=1, max_length=200, description="next_cursor of the page before")


class WebhookOut(BaseModel):
    """What a signed provider webhook door answers (Stripe's, Telnyx's): every verified event is
    ``received``; ``applied`` when it changed something, ``duplicate`` when its id was seen before."""

    received: bool
    applied: bool
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Reply:
    """What a handler returns: ``data`` goes in the envelope; ``secrets`` names top-level keys of ``data``
    that are shown once and withheld from the idempotency record."""

    data: Any
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()
    cookies: tuple[tuple[str, str, dict[str, Any]], ...] = ()  # (name, value, attributes); value "" deletes


@dataclass(slots=True)
class Req:
    """One request as a handler sees it: checked, parsed, with its caller."""

    rt: Runtime
    request: web.Request
    principal: Principal | None
    params: dict[str, Any]
    query: Any
    body: Any
    ip: str | None
    request_id: str

    @property
    def p(self) -> Principal:
        assert self.principal is not None  # the route's auth made sure
        return self.principal

    def audit(self, action: str, resource_type: str, resource_id: Any, old: dict[str, Any] | None = None,
              new: dict[str, Any] | None = None, *, org_id: uuid.UUID | None = None,
              actor_id: Any = None) -> AuditEntry:
        """An audit entry by this request's caller (or, before there is one, by the user ``actor_id``);
        ``apply`` it in the transaction of the change."""
        p = self.principal
        return AuditEntry(org_id=org_id or self.p.org_id, action=action, resource_type=resource_type,
                          resource_id=None if resource_id is None else str(resource_id),
                          actor_type=p.actor_type if p else "user",
                          actor_id=p.subject if p else (None if actor_id is None else str(actor_id)),
                          old_value=old, new_value=new, ip=self.ip, request_id=self.request_id)


Handler = Callable[[Req], Awaitable[Reply]]


@dataclass(frozen=True, slots=True)
class Route:
    """One row of the route registry: enough to serve the route and to document it."""

    method: str
    path: str
    name: str  # operationId
    summary: str
    tag: str
    auth: Auth
    action: str | None = None  # a PERMISSIONS key when auth == "action"
    handler: Handler | None = None  # None: served by another module, documented here
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    response: type[BaseModel] | None = None  # the model of ``data``
    paged: bool = False  # data is {"items": [response], "next_cursor"}
    status: int = 200
    errors: tuple[str, ...] = ()  # besides the ones its kind always has
    params: tuple[tuple[str, ParamKind], ...] = ()
    max_body: int = DEFAULT_BODY
    description: str = ""
    responses: dict[int, str] | None = None  # documented-only routes: their own statuses
    raw_body: bool = False  # the handler reads the raw body itself (up to max_body), e.g. to check a signature
    # A body the handler streams itself (api.middleware.streamed_body): (content type, max bytes).  Such
    # a route ignores Idempotency-Key (its fingerprint would need the whole body): it must be idempotent
    # by its own data, as the CSV import is by external_ref.
    stream: tuple[str, int] | None = None
    # The Settings field of this route's own per-credential limit a minute, instead of the read or write rate.
    rate: str | None = None

    def __post_init__(self) -> None:
        if self.auth == "action" and self.action not in PERMISSIONS:
            raise ValueError(f"{self.name}: action {self.action!r} is not in PERMISSIONS")
        if self.rate is not None and self.rate not in Settings.model_fields:
            raise ValueError(f"{self.name}: rate {self.rate!r} is not a setting")

    @property
    def writes(self) -> bool:
        return self.method in MUTATIONS

    def all_errors(self) -> tuple[str, ...]:
        codes = list(_ALWAYS)
        if self.auth != "public":
            codes += _AUTHED
        if self.body is not None:
            codes += _BODIED
        if self.query is not None:
            codes.append("validation_failed")
        if self.params:
            codes.append("not_found")
        if self.writes and self.auth != "public":
            codes += _IDEMPOTENT
        codes += self.errors
        return tuple(dict.fromkeys(codes))


# -- cursors --------------------------------------------------------------------------------------


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    raw = orjson.dumps([created_at.isoformat(), str(row_id)])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    if cursor is None:
        return None
    try:
        created, row_id = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(created), uuid.UUID(row_id)
    except (ValueError, TypeError):
        raise ApiError("validation_failed", "cursor is not one this server gave",
                       [{"field": "cursor", "message": "not a cursor from next_cursor", "type": "cursor"}]) from None


def page(rows: list[Any], limit: int, item: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """A page from ``rows`` fetched with ``LIMIT limit + 1`` (the extra row says there is more)."""
    more = len(rows) > limit
    rows = rows[:limit]
    nxt = encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if more and rows else None
    return {"items": [item(r) for r in rows], "next_cursor": nxt}


# -- validation -----------------------------------------------------------------------------------


def validation_details(exc: ValidationError, where: str) -> list[dict[str, str]]:
    return [{"field": ".".join(str(x) for x in e["loc"]) or where, "message": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_input=False)]


def nul_fields(data: Any, path: str) -> list[str]:
    """Where ``data`` holds a string with NUL (PostgreSQL text cannot store one)."""
    if isinstance(data, str):
        return [path] if "\x00" in data else []
    if isinstance(data, dict):
        return [f for k, v in data.items() for f in nul_fields(k, path) + nul_fields(v, f"{path}.{k}")]
    if isinstance(data, list):
        return [f for i, v in enumerate(data) for f in nul_fields(v, f"{path}.{i}")]
    return []


def parse_model(model: type[BaseModel], data: Any, where: str) -> BaseModel:
    nul = nul_fields(data, where)
    if nul:
        raise ApiError("validation_failed", f"the {where} failed validation",
                       [{"field": f.partition(".")[2] or f, "message": "NUL characters are not accepted",
                         "type": "nul_character"} for f in nul])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError("validation_failed", f"the {where} failed validation",
                       validation_details(exc, where)) from None


# A path parameter -> what its 404 names: the same words as the handler's own not_found, so a malformed
# id and an unknown one answer the same body.
_WHAT = {"user_id": "user", "key_id": "api key", "token_id": "media token", "recording_id": "recording",
         "account_id": "account", "campaign_id": "campaign", "import_id": "import", "export_id": "export",
         "bundle_id": "evidence bundle"}


def _path_params(route: Route, request: web.Request) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kind in route.params:
        raw = request.match_info.get(name, "")
        if kind == "uuid":
            try:
                out[name] = uuid.UUID(raw) if len(raw) == 36 else None
            except ValueError:
                out[name] = None
            if out[name] is None:
                raise not_found(_WHAT.get(name, "resource"))
        elif kind == "call_id":
            if not CALL_ID.fullmatch(raw):
                raise not_found("call")
            out[name] = raw
        else:
            out[name] = raw
    return out


def _query(route: Route, request: web.Request) -> Any:
    if route.query is None:
        return None
    q = request.query
    if any(len(q.getall(k)) > 1 for k in q):
        raise ApiError("validation_failed", "a query parameter is repeated",
                       [{"field": k, "message": "given more than once", "type": "repeated"}
                        for k in q if len(q.getall(k)) > 1])
    return parse_model(route.query, dict(q), "query")


async def _body(route: Route, request: web.Request) -> tuple[Any, bytes]:
    if route.stream is not None:
        return None, b""  # the handler reads request.content itself
    raw = await request.read() if request.body_exists else b""
    if route.body is None:
        return None, raw
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        raise ApiError("bad_request", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError("bad_request", "the body must be a JSON object")
    return parse_model(route.body, data, "body"), raw


# -- the wrapper ----------------------------------------------------------------------------------


def _render(reply: Reply) -> web.Response:
    resp = ok(reply.data, reply.status, reply.headers or None)
    for name, value, attrs in reply.cookies:
        if value:
            resp.set_cookie(name, value, **attrs)
        else:
            resp.del_cookie(name, path=attrs.get("path", "/"))
    return resp


def _stored(reply: Reply) -> StoredResponse:
    data = reply.data
    if reply.secrets and isinstance(data, dict):
        data = {**data, **dict.fromkeys(reply.secrets), "secret_withheld": True}
    return StoredResponse(reply.status, dict(reply.headers), orjson.dumps({"success": True, "data": data}))


def _stored_error(exc: ApiError) -> StoredResponse:
    return StoredResponse(exc.status, dict(exc.headers), error_response(exc).body)  # type: ignore[arg-type]


def _request_id(request: web.Request) -> str:
    """The client's ``X-Request-Id`` (its first 64 characters) for the audit trail if they are printable ASCII (a
    header's non-UTF-8 bytes could not be stored), else a new one."""
    given = request.headers.get("X-Request-Id", "")[:64]
    return given if 0 < len(given) <= 64 and given.isascii() and given.isprintable() else uuid.uuid4().hex


def _idempotency_key(request: web.Request) -> str | None:
    for header in IDEMPOTENCY_HEADERS:
        value = request.headers.get(header)
        if value is not None:
            if not 0 < len(value) <= MAX_IDEMPOTENCY_KEY or not value.isascii() or not value.isprintable():
                raise ApiError("bad_request", f"{header} must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters")
            return value
    return None


async def _rate_limit(rt: Runtime, route: Route, p: Principal) -> None:
    s = rt.settings
    if route.rate is not None:
        limit = int(getattr(s, route.rate))
    else:
        limit = s.rate_write_per_min if route.writes else s.rate_read_per_min
    assert rt.tiers is not None
    d = await rt.tiers.warm.hit_rate_limit(f"api:{p.org_id}:{p.kind}:{p.subject}:{route.name}", limit, 60)
    if not d.allowed:
        raise ApiError("rate_limited", f"at most {limit} requests a minute to {route.name}",
                       headers={"Retry-After": str(d.reset_s)})


class OrgSlots:
    """At most ``limit`` of one organisation's requests of a kind at once on this node, for work that holds a
    thread, a temporary file or a connection for a while (sealing evidence, an erasure): one more is refused
    at once, before any work, with 429 ``rate_limited`` + ``Retry-After``.  A burst from one tenant then
    cannot take the node's threads, disk and memory from the others (the rate limit above counts requests a
    minute per credential, not how many run at once, nor across an organisation's credentials)."""

    def __init__(self, what: str, retry_after_s: int = 5) -> None:
        self.what = what
        self.retry_after_s = retry_after_s
        self._held: dict[uuid.UUID, int] = {}

    @contextlib.contextmanager
    def hold(self, org: uuid.UUID, limit: int) -> Iterator[None]:
        n = self._held.get(org, 0)
        if n >= limit:
            raise ApiError("rate_limited", f"at most {limit} {self.what} of an organisation at once; retry in a moment",
                           headers={"Retry-After": str(self.retry_after_s)})
        self._held[org] = n + 1
        try:
            yield
        finally:
            if self._held[org] <= 1:
                del self._held[org]
            else:
                self._held[org] -= 1


async def _authorize(rt: Runtime, route: Route, request: web.Request) -> Principal | None:
    if route.auth == "public":
        return None
    p = await rt.auth.principal(request)
    if p is None or p.kind not in ("session", "api_key"):
        raise ApiError("unauthenticated", "sign in, or send Authorization: Bearer <API key or session token>")
    await _rate_limit(rt, route, p)
    if route.auth == "session" and p.kind != "session":
        raise ApiError("forbidden", "this route is for a signed-in user, not an API key")
    if route.auth == "action" and not p.can(route.action or ""):
        raise ApiError("forbidden", f"role {p.role.value} may not {route.action}")
    return p


async def _serve(rt: Runtime, route: Route, request: web.Request) -> web.StreamResponse:
    assert route.handler is not None
    if rt.tiers is None:
        raise ApiError("unavailable", "storage is off on this server (SWITCHBOARD_PERSIST=false)",
                       headers={"Retry-After": "60"})
    principal = await _authorize(rt, route, request)
    params = _path_params(route, request)
    query = _query(route, request)
    body, raw = await _body(route, request)
    req = Req(rt, request, principal, params, query, body, rt.client_address(request) or None, _request_id(request))
    key = _idempotency_key(request) if route.writes and principal is not None and route.stream is None else None
    if key is None:
        return _render(await route.handler(req))
    warm = rt.tiers.warm
    org = str(principal.org_id)  # type: ignore[union-attr]
    scoped = hashlib.sha256(f"{principal.kind}\n{principal.subject}\n{key}".encode()).hexdigest()  # type: ignore[union-attr]
    # Keyed by the client's key, which the warm tier never holds: a plain hash of a body with a password
    # in it (PATCH /api/users, POST /api/auth/password) would let a dump guess that password offline.
    fp = hmac.new(key.encode(), request.method.encode() + b"\n" + request.path.encode() + b"\n" + raw,
                  hashlib.sha256).hexdigest()
    begun = await warm.idem_begin(org, scoped, fp, IDEMPOTENCY_RUNNING_S)
    if begun.kind == "in_progress":
        raise ApiError("idempotency_in_progress", "a request with this Idempotency-Key is still running",
                       headers={"Retry-After": "1"})
    if begun.kind == "mismatch":
        raise ApiError("idempotency_key_reused", "this Idempotency-Key was used with a different request")
    if begun.kind == "replay":
        stored = begun.response
        assert stored is not None
        return web.Response(body=stored.body, status=stored.status, content_type="application/json",
                            headers={**stored.headers, "Idempotent-Replayed": "true"})
    try:
        reply = await route.handler(req)
    except ApiError as exc:
        await warm.idem_complete(org, scoped, fp, _stored_error(exc))
        raise
    except BaseException:
        await warm.idem_abandon(org, scoped)  # no answer was made: the key is free for a retry
        raise
    await warm.idem_complete(org, scoped, fp, _stored(reply))
    return _render(reply)


async def serve(rt: Runtime, route: Route, request: web.Request) -> web.StreamResponse:
    """Run ``route`` for ``request`` (the steps of the module docstring); never raises but cancellation."""
    try:
        return await _serve(rt, route, request)
    except ApiError as exc:
        return error_response(exc)
    except (RedisError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        log.warning("rest.storage_unavailable", extra={"route": route.name, "error": type(exc).__name__})
        return error_response(ApiError("unavailable", "a storage tier did not answer; retry later",
                                       headers={"Retry-After": "1"}))
    except Exception:
        log.exception("rest.internal_error", extra={"route": route.name})
        return error_response(ApiError("internal_error", "internal error; the server's log has the details"))


def add_routes(app: web.Application, rt: Runtime, routes: list[Route]) -> None:
    """Serve every route of ``routes`` that has a handler (the others are documented only)."""
    for route in routes:
        if route.handler is not None:
            app.router.add_route(route.method, route.path, _bound(rt, route), name=route.name)


def _bound(rt: Runtime, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    # A function of its own per route, so ``body_limit`` marks this route only (api.middleware).
    # A POST without a body model still takes a small one ({}), as clients often send it; it is ignored.
    @body_limit(route.max_body if route.body is not None or route.raw_body
                else (NO_BODY_POST if route.method == "POST" else 0))
    async def handler(request: web.Request) -> web.StreamResponse:
        return await serve(rt, route, request)
    return streamed_body(*route.stream)(handler) if route.stream is not None else handler
