"""The API's one answer shape, and its one table of error codes.

Every JSON answer of the API is an envelope::

    {"success": true, "data": ...}
    {"success": false, "error": {"code": "not_found", "message": "...", "details": ...}}

A handler returns ``ok(data)`` or raises ``ApiError(code, message, details)``; the ``code`` decides the
HTTP status through ``CODES``, so one code never answers with two statuses.  ``api.rest`` turns an
``ApiError`` (and aiohttp's own HTTP errors) into the envelope for every route.  No I/O here.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

# code -> (HTTP status, what it means).  README's error table is this table.
CODES: dict[str, tuple[int, str]] = {
    "bad_request": (400, "the request is malformed (JSON, a header, a path parameter)"),
    "validation_failed": (400, "the body or query failed validation; details lists each field"),
    "unauthenticated": (401, "no credential, or an unknown, expired or revoked one"),
    "payment_required": (402, "the organisation's subscription is past due or unpaid; pay to continue"),
    "forbidden": (403, "the credential's role may not do this"),
    "not_found": (404, "no such resource in your organisation (another tenant's id looks the same)"),
    "method_not_allowed": (405, "the route does not take this method"),
    "request_timeout": (408, "the request's headers or body did not arrive in time"),
    "conflict": (409, "the resource's state does not allow this (e.g. the last owner)"),
    "already_exists": (409, "a unique field is taken (e.g. an e-mail address)"),
    "idempotency_in_progress": (409, "a request with this Idempotency-Key is still running; retry later"),
    "gone": (410, "deleted longer ago than the restore window (30 days): it can no longer be restored"),
    "payload_too_large": (413, "the body is larger than this route takes"),
    "unsupported_media_type": (415, "the body must be application/json"),
    "misdirected_request": (421, "the Host header names a host this server does not serve"),
    "idempotency_key_reused": (422, "this Idempotency-Key was used with a different request"),
    "rate_limited": (429, "too many requests; Retry-After says when to retry"),
    "internal_error": (500, "a bug or an unexpected failure; the server's log has the details"),
    "unavailable": (503, "a storage tier is down or the server is at a limit; Retry-After says when to retry"),
}

# aiohttp's own errors (no route, wrong method, the doors middleware) mapped to codes.
STATUS_CODES: dict[int, str] = {400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
                                405: "method_not_allowed", 408: "request_timeout", 409: "conflict", 410: "gone",
                                413: "payload_too_large", 415: "unsupported_media_type",
                                421: "misdirected_request", 422: "idempotency_key_reused", 429: "rate_limited",
                                500: "internal_error", 503: "unavailable"}


class ApiError(Exception):
    """An answer other than success; ``code`` is a key of ``CODES``."""

    def __init__(self, code: str, message: str, details: Any = None, *, headers: dict[str, str] | None = None) -> None:
        if code not in CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.status = CODES[code][0]
        self.message = message
        self.details = details
        self.headers = headers or {}


def _json(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)


def ok(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_json({"success": True, "data": data}), status=status,
                        content_type="application/json", headers=headers)


def error_body(code: str, message: str, details: Any = None) -> bytes:
    err: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        err["details"] = details
    return _json({"success": False, "error": err})


def error_response(exc: ApiError) -> web.Response:
    return web.Response(body=error_body(exc.code, exc.message, exc.details), status=exc.status,
                        content_type="application/json", headers=exc.headers)


def not_found(what: str = "resource") -> ApiError:
    """The one answer for an unknown id and another tenant's id."""
    return ApiError("not_found", f"{what} not found")


@web.middleware
async def envelope_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Render an ``ApiError`` raised by any handler as the envelope, and aiohttp's own HTTP errors (no
    such route, wrong method, an ``HTTPException`` raised by a handler) with the code of their status."""
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except ApiError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.status not in STATUS_CODES:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
        return web.Response(body=error_body(STATUS_CODES[exc.status], exc.text or exc.reason), status=exc.status,
                            content_type="application/json", headers=headers)
