"""``GET /api/blobs/{key}``: serves a ``LocalBlobStore`` blob to whoever holds a URL from ``presign_get``.

The URL is the credential: ``expires`` (unix seconds) and ``sig`` (hex HMAC-SHA256 of key and expiry).
Responses: 200 with the file (Range requests work, via ``web.FileResponse``); 400 when a parameter is
missing or malformed or the key is invalid; 403 when the signature is wrong or expired; 404 when the
signature is good but the blob is gone. Errors are JSON ``{"error": "..."}``; nothing is cached.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from storage.blobs import InvalidBlobKey, LocalBlobStore

BLOB_STORE = web.AppKey("blob_store", LocalBlobStore)
NO_STORE = {"Cache-Control": "private, no-store"}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=NO_STORE)


async def serve_blob(request: web.Request) -> web.StreamResponse:
    store = request.app[BLOB_STORE]
    key = request.match_info["key"]
    expires_raw = request.query.get("expires")
    sig = request.query.get("sig")
    if not expires_raw or not sig:
        return _error(400, "missing 'expires' or 'sig' query parameter")
    try:
        expires = int(expires_raw)
    except ValueError:
        return _error(400, "'expires' must be an integer (unix seconds)")
    try:
        path = store.path_for(key)
    except InvalidBlobKey as exc:
        return _error(400, str(exc))
    if not store.verify(key, expires, sig):
        return _error(403, "bad or expired signature")
    if not await asyncio.to_thread(path.is_file):
        return _error(404, "blob not found")
    content_type = "audio/wav" if key.endswith(".wav") else "application/octet-stream"
    # A blob deleted between the check and the send still gets FileResponse's own 404.
    return web.FileResponse(path, headers={"Content-Type": content_type, **NO_STORE})


def add_routes(app: web.Application, store: LocalBlobStore) -> None:
    """Serve ``store`` on ``app``; ``store.start()`` must run before the first request."""
    app[BLOB_STORE] = store
    app.router.add_get("/api/blobs/{key:.+}", serve_blob)
