"""The agent console: a static page (``api/static``) where an agent signs in, starts a WebRTC session and
sees the call's live transcript from the SSE stream.

* Without a session (``GET /api/auth/me`` answers 401) the page shows a sign-in form that POSTs
  ``/api/auth/login``; the HttpOnly ``sb_session`` cookie the server sets then authenticates the page's
  same-origin requests (event stream, offer, DELETE).  The page holds no token itself.  A 401 later
  (an expired or revoked session) brings the form back with a message.

* ``GET /console`` serves the page; ``GET /console/static/{name}`` serves its script and style sheet.
  Only the files named in ``_ASSETS`` are served, so no request can reach another path on disk.
* Every response carries ``Cache-Control: no-cache`` (the browser revalidates, so a deploy is picked
  up at once) and a Content-Security-Policy that allows nothing but this origin: the page loads no
  inline script, nothing from a CDN, and may only talk to the server that served it.
* The page reads ``call_id``, ``language`` and ``autostart=1`` (start once signed in) from its query
  string: a supervisor's link, or a test.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).parent / "static"

_PAGE = "console.html"
_ASSETS = {  # the only files served under /console/static/
    "console.js": "text/javascript",
    "console.css": "text/css",
    "favicon.svg": "image/svg+xml",
}

CSP = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "connect-src 'self'",
    "media-src 'self' blob:",
    "img-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
))
HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the page's URL names the call
    "X-Frame-Options": "DENY",
}


CONSOLE_FILES = web.AppKey("console_files", dict)


def add_routes(app: web.Application) -> None:
    """Register ``GET /console`` and ``GET /console/static/{name}`` on ``app``.

    The files are read here, once (a few kilobytes), so a missing file fails at start-up and no request
    touches the disk.
    """
    app[CONSOLE_FILES] = {name: (STATIC / name).read_bytes() for name in (_PAGE, *_ASSETS)}
    app.router.add_get("/console", console_page)
    app.router.add_get("/console/static/{name}", console_asset)


def _file(request: web.Request, name: str, content_type: str) -> web.Response:
    body = request.app[CONSOLE_FILES][name]
    return web.Response(body=body, headers={**HEADERS, "Content-Type": f"{content_type}; charset=utf-8"})


async def console_page(request: web.Request) -> web.Response:
    return _file(request, _PAGE, "text/html")


async def console_asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    content_type = _ASSETS.get(name)
    if content_type is None:
        raise web.HTTPNotFound(text="no such console asset", headers=HEADERS)
    return _file(request, name, content_type)
