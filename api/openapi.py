"""``GET /api/openapi.json`` (OpenAPI 3.1) and ``GET /api/docs`` (a page that renders it), from one registry.

``ROUTES`` is every HTTP route of the server: the REST routes (served by ``api.rest`` from their rows)
and, documented only (``handler=None``), the doors other modules serve: SSE, SSE tokens, WebRTC
signalling, stats, the probes, the media WebSocket and signed blob downloads.  ``document`` turns the
rows into the OpenAPI document: request and response schemas come from the pydantic models
(``models_json_schema``), error responses from each route's codes in ``api.envelope.CODES``, required
permissions from ``api.auth.PERMISSIONS`` (``x-permission`` and ``x-roles`` on each operation).  The
document is built once per process; no I/O here but reading the docs page's files at start-up.

The docs page is static: ``docs.html`` loads ``docs.js`` and ``docs.css`` from this server, which fetch
the document and render it; no CDN, no inline script, the console's CSP.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api import (
    account_import,
    accounts,
    audit_api,
    auth_api,
    billing_api,
    calls_api,
    collections_api,
    credentials_api,
    erasure_api,
    evidence,
    exports,
    restricted_api,
    retention_api,
    voice_api,
)
from api.auth import PERMISSIONS
from api.console import CSP, HEADERS, STATIC
from api.envelope import CODES
from api.rest import Route

REF = "#/components/schemas/{model}"
_AUTHED: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"cookieAuth": []}]


def _doc(method: str, path: str, name: str, summary: str, tag: str, auth: str, action: str | None,
         responses: dict[int, str], params: tuple[tuple[str, Any], ...] = (), description: str = "") -> Route:
    return Route(method, path, name, summary, tag, auth, action, None, params=params,  # type: ignore[arg-type]
                 responses=responses, description=description)


_CALL = (("call_id", "call_id"),)
EXTERNAL = [
    _doc("GET", "/healthz", "healthz", "Liveness: the process answers", "probes", "public", None,
         {200: "alive"}),
    _doc("GET", "/readyz", "readyz", "Readiness: each storage tier answers", "probes", "public", None,
         {200: "ready", 503: "a tier is down"}),
    _doc("GET", "/api/media/telnyx", "telnyx_media", "Telnyx media stream (WebSocket upgrade)", "media", "media",
         None, {101: "switching protocols (a missing or unknown media token is then closed with 1008)",
                400: "not a WebSocket upgrade"},
         description="Credential: the organisation's media token, sent by Telnyx as stream_auth_token "
                     "(header x-telnyx-streaming-auth-token, or the connected message's field of that name).  The "
                     "messages are Telnyx's media streaming protocol (README, Interfaces)."),
    _doc("GET", "/api/calls/{call_id}/events", "call_events", "A call's live events (Server-Sent Events)", "calls",
         "action", "calls.watch", {200: "text/event-stream", 204: "the call ended, nothing to replay",
                                   400: "bad call id or Last-Event-ID", 401: "no credential",
                                   429: "too many open event streams for this user or key",
                                   503: "too many waiting subscribers"}, _CALL,
         "Also takes ?access_token=<SSE token> from POST /api/calls/{call_id}/sse-token."),
    _doc("POST", "/api/calls/{call_id}/sse-token", "sse_token", "Mint a 5-minute SSE token for one call", "calls",
         "action", "calls.watch", {200: "the token", 401: "no credential", 403: "role may not", 404: "unknown call",
                                    429: "too many tokens minted"},
         _CALL),
    _doc("POST", "/api/webrtc/offer", "webrtc_offer", "Start an agent's WebRTC session (SDP offer)", "webrtc",
         "action", "calls.join", {200: "SDP answer", 400: "bad offer", 401: "no credential", 409: "live session",
                                  413: "too large", 503: "too many sessions"}),
    _doc("DELETE", "/api/webrtc/sessions/{session_id}", "webrtc_end", "End a WebRTC session", "webrtc", "action",
         "calls.join", {204: "ended", 401: "no credential", 404: "no such live session"},
         (("session_id", "string"),)),
    _doc("GET", "/api/stats", "stats", "Node counters (admins, or the metrics token)", "stats", "action",
         "stats.read", {200: "counters", 401: "no credential"}),
    _doc("POST", "/api/stats/reset", "stats_reset", "Reset the latency histograms", "stats", "action", "stats.reset",
         {200: "reset", 401: "no credential"}),
    _doc("GET", "/metrics", "metrics", "Prometheus exposition (admins, or the metrics token)", "stats", "action",
         "stats.read", {200: "text/plain; version=0.0.4", 401: "no credential"}),
    _doc("GET", "/api/blobs/{key}", "blob", "Download a blob by its signed URL", "calls", "signed", None,
         {200: "the file", 400: "missing or bad parameter", 403: "bad or expired signature", 404: "gone"},
         (("key", "string"),), "The URL from GET /api/calls/{call_id}/recordings/{recording_id}/url is the "
                               "credential (expires, sig)."),
]

REST_ROUTES: list[Route] = [*auth_api.ROUTES, *accounts.ROUTES, *credentials_api.ROUTES, *calls_api.ROUTES,
                            *audit_api.ROUTES, *billing_api.ROUTES, *account_import.ROUTES, *collections_api.ROUTES,
                            *voice_api.ROUTES, *retention_api.ROUTES,
                            *erasure_api.ROUTES, *evidence.ROUTES,
                            *restricted_api.ROUTES, *exports.ROUTES]
DOC_ROUTES = [
    _doc("GET", "/api/openapi.json", "openapi", "This document", "docs", "public", None, {200: "OpenAPI 3.1"}),
    _doc("GET", "/api/docs", "docs", "The API reference page (renders this document)", "docs", "public", None,
         {200: "HTML"}),
]
ROUTES: list[Route] = [*REST_ROUTES, *EXTERNAL, *DOC_ROUTES]


def _schemas() -> tuple[dict[Any, dict[str, Any]], dict[str, Any]]:
    wanted: list[tuple[type[BaseModel], Any]] = []
    for r in REST_ROUTES:
        for model, mode in ((r.body, "validation"), (r.query, "validation"), (r.response, "serialization")):
            if model is not None and (model, mode) not in wanted:
                wanted.append((model, mode))
    refs, defs = models_json_schema(wanted, ref_template=REF)
    return dict(refs), dict(defs.get("$defs", {}))


def _error_schema(codes: list[str]) -> dict[str, Any]:
    return {"type": "object", "required": ["success", "error"], "properties": {
        "success": {"const": False},
        "error": {"type": "object", "required": ["code", "message"], "properties": {
            "code": {"enum": codes}, "message": {"type": "string"}, "details": {}}}}}


def _param_schema(kind: str) -> dict[str, Any]:
    if kind == "uuid":
        return {"type": "string", "format": "uuid"}
    if kind == "call_id":
        return {"type": "string", "pattern": "^[A-Za-z0-9:_.\\-]{1,128}$"}
    return {"type": "string"}


def _operation(r: Route, refs: dict[Any, Any], defs: dict[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": r.name, "summary": r.summary, "tags": [r.tag]}
    if r.description:
        op["description"] = r.description
    if r.auth == "action":
        op["x-permission"] = r.action
        op["x-roles"] = sorted(role.value for role in PERMISSIONS[r.action or ""])
    else:
        op["x-permission"] = r.auth  # public, credential (any), session (a signed-in user), media, signed
    op["security"] = _AUTHED if r.auth in ("action", "credential", "session") else []
    params: list[dict[str, Any]] = [{"name": n, "in": "path", "required": True, "schema": _param_schema(k)}
                                    for n, k in r.params]
    if r.query is not None:
        q = defs[refs[(r.query, "validation")]["$ref"].rsplit("/", 1)[1]]
        required = set(q.get("required", []))
        for name, schema in q.get("properties", {}).items():
            params.append({"name": name, "in": "query", "required": name in required, "schema": schema})
    if r.handler is not None and r.writes and r.auth != "public" and r.stream is None:
        params.append({"name": "Idempotency-Key", "in": "header", "required": False,
                       "description": "replays the first response for 24 h (X-Idempotency-Key also works)",
                       "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"}})
    if params:
        op["parameters"] = params
    if r.stream is not None:
        op["requestBody"] = {"required": True, "content": {r.stream[0]: {"schema": {"type": "string"}}}}
    if r.body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": refs[(r.body, "validation")]}}}
    if r.handler is None:
        op["responses"] = {str(code): {"description": text} for code, text in (r.responses or {}).items()}
        return op
    data = refs[(r.response, "serialization")] if r.response is not None else {}
    if r.paged:
        data = {"type": "object", "required": ["items", "next_cursor"], "properties": {
            "items": {"type": "array", "items": data},
            "next_cursor": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}
    responses: dict[str, Any] = {str(r.status): {"description": "success", "content": {"application/json": {
        "schema": {"type": "object", "required": ["success", "data"],
                   "properties": {"success": {"const": True}, "data": data}}}}}}
    by_status: dict[int, list[str]] = defaultdict(list)
    for code in r.all_errors():
        by_status[CODES[code][0]].append(code)
    for status, codes in sorted(by_status.items()):
        responses[str(status)] = {"description": "; ".join(f"{c}: {CODES[c][1]}" for c in codes),
                                  "content": {"application/json": {"schema": _error_schema(codes)}}}
    op["responses"] = responses
    return op


def document() -> dict[str, Any]:
    refs, defs = _schemas()
    paths: dict[str, dict[str, Any]] = defaultdict(dict)
    for r in ROUTES:
        paths[r.path][r.method.lower()] = _operation(r, refs, defs)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Switchboard API", "version": "1",
                 "description": "Every JSON answer is an envelope: {success, data} or {success: false, error: "
                                "{code, message, details}}.  Error codes: " +
                                "; ".join(f"{c} ({s})" for c, (s, _) in CODES.items())},
        "servers": [{"url": "/"}],
        "paths": dict(paths),
        "components": {"schemas": defs, "securitySchemes": {
            "bearerAuth": {"type": "http", "scheme": "bearer",
                           "description": "an API key (sbk_...) or a session token from POST /api/auth/login"},
            "cookieAuth": {"type": "apiKey", "in": "cookie", "name": "sb_session"}}},
    }


# -- serving --------------------------------------------------------------------------------------

DOCS_FILES = web.AppKey("docs_files", dict)
_DOCS_ASSETS = {"docs.js": "text/javascript", "docs.css": "text/css"}
_OPENAPI = web.AppKey("openapi_body", bytes)


def add_routes(app: web.Application) -> None:
    """``GET /api/openapi.json``, ``GET /api/docs`` and its two static files."""
    app[_OPENAPI] = orjson.dumps(document())
    app[DOCS_FILES] = {name: (STATIC / name).read_bytes() for name in ("docs.html", *_DOCS_ASSETS)}
    app.router.add_get("/api/openapi.json", openapi_json)
    app.router.add_get("/api/docs", docs_page)
    app.router.add_get("/api/docs/static/{name}", docs_asset)


async def openapi_json(request: web.Request) -> web.Response:
    # The bare document (not the envelope): what OpenAPI tools expect at this address.
    return web.Response(body=request.app[_OPENAPI], content_type="application/json",
                        headers={"Cache-Control": "no-cache"})


async def docs_page(request: web.Request) -> web.Response:
    return web.Response(body=request.app[DOCS_FILES]["docs.html"],
                        headers={**HEADERS, "Content-Security-Policy": CSP, "Content-Type": "text/html; charset=utf-8"})


async def docs_asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    content_type = _DOCS_ASSETS.get(name)
    if content_type is None:
        raise web.HTTPNotFound(text="no such docs asset")
    return web.Response(body=request.app[DOCS_FILES][name],
                        headers={**HEADERS, "Content-Type": f"{content_type}; charset=utf-8"})
