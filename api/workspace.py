"""The browser workspace: agents work a campaign's accounts and their calls; admins run users, keys,
billing, the audit trail and imports.  Static files (``api/static/app.html`` and ``api/static/app/``),
no build step; the pages speak the REST API only, with the session cookie the sign-in form obtains.

* ``GET /app`` serves the shell; ``GET /app/static/{name}`` its modules and style sheet, only the files
  named in ``ASSETS`` (read once at start-up: a missing file fails the start, no request touches the
  disk, no path can reach another file).
* Headers as the console's (``api.console``): ``no-cache``, ``nosniff``, ``no-referrer``, no framing,
  and a Content-Security-Policy allowing this origin only, plus, for recordings played through a
  signed URL, the cold tier's origin when it is another one (an S3 endpoint).
* What the pages show a user is decided by the server: ``GET /api/auth/me`` lists the credential's
  permissions, and every action is checked by its route anyway.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from api.console import HEADERS
from api.settings import Settings

STATIC = Path(__file__).parent / "static"
PAGE = STATIC / "app.html"
ASSETS = {  # the only files served under /app/static/
    "main.js": "text/javascript",
    "api.js": "text/javascript",
    "dom.js": "text/javascript",
    "agent.js": "text/javascript",
    "call.js": "text/javascript",
    "admin.js": "text/javascript",
    "app.css": "text/css",
}
FAVICON = STATIC / "favicon.svg"

WORKSPACE = web.AppKey("workspace", dict)


def csp(settings: Settings) -> str:
    """The policy: this origin only; recordings may also come from the S3 endpoint's origin."""
    media = ["'self'", "blob:"]
    endpoint = settings.s3_endpoint_url
    if endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme in ("http", "https") and parts.netloc:
            media.append(f"{parts.scheme}://{parts.netloc}")
    elif settings.s3_access_key_id:  # AWS: virtual-hosted or path-style bucket URLs
        media.append("https://*.amazonaws.com")
    return "; ".join((
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        f"media-src {' '.join(media)}",
        "img-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ))


def add_routes(app: web.Application, settings: Settings) -> None:
    files = {name: (STATIC / "app" / name).read_bytes() for name in ASSETS}
    files["favicon.svg"] = FAVICON.read_bytes()
    app[WORKSPACE] = {"page": PAGE.read_bytes(), "files": files,
                      "headers": {**HEADERS, "Content-Security-Policy": csp(settings)}}
    app.router.add_get("/app", page)
    app.router.add_get("/app/static/{name}", asset)


async def page(request: web.Request) -> web.Response:
    w = request.app[WORKSPACE]
    return web.Response(body=w["page"], headers={**w["headers"], "Content-Type": "text/html; charset=utf-8"})


async def asset(request: web.Request) -> web.Response:
    w = request.app[WORKSPACE]
    name = request.match_info["name"]
    content_type = ASSETS.get(name) or ("image/svg+xml" if name == "favicon.svg" else None)
    if content_type is None:
        raise web.HTTPNotFound(text="no such asset", headers=w["headers"])
    return web.Response(body=w["files"][name],
                        headers={**w["headers"], "Content-Type": f"{content_type}; charset=utf-8"})
