"""The agent console (``api/console.py``, ``api/static/``) in a real browser: Debian's Chromium driven by
Playwright's Python package (``/usr/bin/chromium``; never ``playwright install``).

* Served with a strict Content-Security-Policy, ``nosniff``, ``no-referrer``, ``no-cache``; only the
  whitelisted assets are reachable (in-process app, no browser).
* Sign-in (in-process, against ``FakeAuth``, a fake of the REST contract: ``GET /api/auth/me``,
  ``POST /api/auth/login`` setting the HttpOnly ``sb_session`` cookie, ``POST /api/auth/logout``):
  without a session the page shows a labelled sign-in form used from the keyboard alone; a refused
  password is announced (``role="alert"``) on the field; then who is signed in and Sign out.  A 401
  from the server later (the session expired) ends the live session and brings the form back, saying why.
* Accessible and keyboard usable: every control has a label, the transcript is a live region, the
  form is driven from the keyboard alone and a bad call id is reported in text on the field.
* Renders the SSE stream as specified: speakers labelled in text, a partial marked "(speaking…)" and
  replaced by its final, a translation under its original, lifecycle events as lines (in-process app
  with a scripted SSE stream, so each step is observed, not raced).
* A 409 (the agent's other session is live) offers to take it over; taking over sends ``replace``.
* End to end on the real server (a subprocess with storage, the organisation made by ``switchboard orgs
  create`` while it runs): the agent signs in on the page's form, Chromium's fake microphone plays an
  espeak-ng sentence, the page negotiates WebRTC with ``POST /api/webrtc/offer`` on its session cookie,
  the server transcribes the agent's track, the test's own SSE reader (with the organisation's API key)
  receives the final within the WER bound, and the page's own EventSource displays exactly that text;
  Stop ends the session (``agent.left``).  The happy path logs no console error.  This one needs the
  REST routes ``/api/auth/*`` and the doors that accept the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import pytest
import soundfile
from aiohttp import web
from playwright.async_api import BrowserContext, Page, async_playwright
from pytest_aiohttp import AiohttpClient, AiohttpServer

from api import console
from tests.servers import Server, running_server
from tests.speech import synthesize, word_error_rate
from tests.sse_client import SseEvent, read_sse

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="Debian chromium is not installed")

SENTENCE = "i would like to make a payment today"
OTHER_PHRASES = ["please confirm your account number", "can you call me back tomorrow morning"]
# Stated bound: pocketsphinx with a domain LM from the phrase list, on espeak-ng speech that went through
# Chromium's fake capture, WebRTC audio processing, Opus at 48 kHz and the server's resampling to 16 kHz.
MAX_WER = 0.5
EMAIL = "ana@example.test"
PASSWORD = "right-password-123"
RATE = 48_000  # Chromium's capture rate: the fake device's file is not resampled first

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream",  # grants the microphone without a prompt
    "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",  # without it ICE never completes on 127.0.0.1
]


# ---- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sentence at 48 kHz mono 16-bit, 1 s of silence before and 2 s after: Chromium loops the file,
    so each pass is one utterance with a clear end."""
    voice = synthesize(SENTENCE, rate=RATE, pad_ms=0)
    pcm = np.concatenate((np.zeros(RATE, np.int16), voice, np.zeros(2 * RATE, np.int16)))
    path = tmp_path_factory.mktemp("console-audio") / "agent.wav"
    soundfile.write(path, pcm, RATE, subtype="PCM_16")
    return path


@pytest.fixture
async def browser(tmp_path: Path, speech_wav: Path) -> AsyncIterator[BrowserContext]:
    """Headless Chromium with a fresh profile whose microphone plays ``speech_wav``."""
    async with async_playwright() as pw:
        ctx = await pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            args=[*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={speech_wav}"],
        )
        ctx.set_default_timeout(15_000)
        try:
            yield ctx
        finally:
            await ctx.close()


class PageProblems:
    """Console errors and uncaught exceptions of a page, collected as they happen."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))


async def new_page(ctx: BrowserContext) -> tuple[Page, PageProblems]:
    page = ctx.pages[0] if ctx.pages else await ctx.new_page()
    return page, PageProblems(page)


def unauthenticated() -> web.Response:
    return web.json_response({"success": False, "error": {"code": "unauthenticated", "message": "sign in"}},
                             status=401)


class FakeAuth:
    """The REST contract of ``/api/auth/*`` as the page relies on it, for in-process pages: one user;
    login sets an HttpOnly SameSite=Strict ``sb_session`` cookie.  ``always``: every request is signed in."""

    def __init__(self, app: web.Application, *, always: bool = False) -> None:
        self.always = always
        self.sessions: set[str] = set()
        self.logins: list[dict[str, object]] = []
        self.logouts = 0
        app.router.add_get("/api/auth/me", self.me)
        app.router.add_post("/api/auth/login", self.login)
        app.router.add_post("/api/auth/logout", self.logout)

    def signed_in(self, request: web.Request) -> bool:
        return self.always or request.cookies.get("sb_session") in self.sessions

    def expire(self) -> None:
        self.always = False
        self.sessions.clear()

    async def me(self, request: web.Request) -> web.Response:
        if not self.signed_in(request):
            return unauthenticated()
        return web.json_response({"success": True, "data": {
            "user": {"id": "7d1f5c1e-0000-4000-8000-000000000001", "email": EMAIL, "display_name": "ana"},
            "org": {"id": "7d1f5c1e-0000-4000-8000-000000000002", "name": "Acme Collections"},
            "role": "agent", "kind": "session"}})

    async def login(self, request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return web.json_response({"success": False, "error": {"code": "unsupported_media_type",
                                                                  "message": "send JSON"}}, status=415)
        body = await request.json()
        self.logins.append(body)
        if body.get("email") != EMAIL or body.get("password") != PASSWORD:
            return web.json_response({"success": False, "error": {
                "code": "unauthenticated", "message": "wrong e-mail or password"}}, status=401)
        token = f"sess-{len(self.logins)}"
        self.sessions.add(token)
        resp = web.json_response({"success": True, "data": {"token": token, "user": {"email": EMAIL},
                                                            "org": {"name": "Acme Collections"},
                                                            "expires_in": 604800}})
        resp.set_cookie("sb_session", token, httponly=True, samesite="Strict", path="/")
        return resp

    async def logout(self, request: web.Request) -> web.Response:
        self.logouts += 1
        self.sessions.discard(request.cookies.get("sb_session", ""))
        resp = web.json_response({"success": True, "data": {}})
        resp.del_cookie("sb_session", path="/")
        return resp


async def sign_in(page: Page, email: str = EMAIL, password: str = PASSWORD) -> None:
    """Through the form, from the keyboard."""
    await page.wait_for_selector("#login-section:not([hidden])")
    await page.fill("#email", "")  # the form keeps the address after a sign-out or an expiry
    await page.focus("#email")
    await page.keyboard.type(email)
    await page.keyboard.press("Tab")
    await page.keyboard.type(password)
    await page.keyboard.press("Enter")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real server with storage, WebRTC signalling and the console; ``extra["org"]`` is an
    organisation made with ``switchboard orgs create`` while it runs (its owner signs in)."""
    tmp = tmp_path_factory.mktemp("console-e2e")
    phrases = tmp / "phrases.txt"
    phrases.write_text("\n".join([SENTENCE, *OTHER_PHRASES]) + "\n")
    with running_server(tmp, SWITCHBOARD_STT_PROVIDER="pocketsphinx", SWITCHBOARD_STT_PHRASES_FILE=str(phrases),
                        SWITCHBOARD_PERSIST="true", SWITCHBOARD_SSE_HEARTBEAT_S="1") as srv:
        done = subprocess.run(
            [sys.executable, "-m", "api.cli", "orgs", "create", "--name", "Console Co",
             "--owner-email", "agent-owner@console.example"],
            env={**os.environ, "SWITCHBOARD_DATA_DIR": str(tmp / "data")}, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        srv.extra["org"] = {**orjson.loads(done.stdout), "email": "agent-owner@console.example"}
        yield srv


class SseRecorder:
    """The test's own reader of a call's SSE stream, running beside the browser's EventSource."""

    def __init__(self, http: aiohttp.ClientSession, url: str, token: str) -> None:
        self.events: list[SseEvent] = []
        self._task = asyncio.create_task(read_sse(http, url, token=token, on_event=self.events.append))

    def named(self, name: str, **match: object) -> list[dict[str, object]]:
        out = [e.json() for e in self.events if e.event == name]
        return [p for p in out if all(p.get(k) == v for k, v in match.items())]

    async def wait_for(self, name: str, within_s: float, **match: object) -> dict[str, object]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while not (found := self.named(name, **match)):
            if self._task.done():
                raise AssertionError(f"SSE stream ended before {name} {match}: {self._task.result()}")
            if loop.time() > deadline:
                raise AssertionError(f"no {name} {match} within {within_s} s; got {[e.event for e in self.events]}")
            await asyncio.sleep(0.05)
        return found[0]

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


# ---- the page, served in-process ------------------------------------------------------------------


async def test_console_is_served_with_a_strict_csp_and_only_whitelisted_assets(aiohttp_client: AiohttpClient) -> None:
    app = web.Application()
    console.add_routes(app)
    client = await aiohttp_client(app)
    for path, kind in (("/console", "text/html"), ("/console/static/console.js", "text/javascript"),
                       ("/console/static/console.css", "text/css")):
        resp = await client.get(path)
        assert resp.status == 200, path
        assert resp.content_type == kind
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        csp = dict(d.strip().split(" ", 1) for d in resp.headers["Content-Security-Policy"].split(";"))
        assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
        assert csp["connect-src"] == "'self'" and csp["media-src"] == "'self' blob:"
    for path in ("/console/static/app.py", "/console/static/..%2Fconsole.py", "/console/static/console.html"):
        assert (await client.get(path)).status == 404, path
    html = await (await client.get("/console")).text()
    assert "http://" not in html and "https://" not in html and "<script>" not in html  # no CDN, no inline


async def test_console_controls_are_labelled_and_usable_from_the_keyboard(
    aiohttp_server: AiohttpServer, browser: BrowserContext
) -> None:
    app = web.Application()
    console.add_routes(app)
    FakeAuth(app, always=True)
    srv = await aiohttp_server(app)
    page, problems = await new_page(browser)
    await page.goto(str(srv.make_url("/console")))
    await page.wait_for_selector("#app:not([hidden])")
    facts = await page.evaluate("""() => ({
        unlabelled: [...document.querySelectorAll("input, select, audio, button")].filter(el => {
            const byLabel = [...(el.labels || [])].map(l => l.textContent);
            const byId = (el.getAttribute("aria-labelledby") || "").split(" ").filter(Boolean)
                .map(id => document.getElementById(id)?.textContent || "");
            const own = el.tagName === "BUTTON" ? [el.textContent] : [];
            return ![...byLabel, ...byId, ...own].some(text => text.trim());
        }).map(el => el.id),
        h1: document.querySelector("h1")?.textContent,
        h2: [...document.querySelectorAll("h2")].filter(h => h.checkVisibility()).map(h => h.textContent),
        transcriptLive: document.getElementById("transcript").getAttribute("aria-live"),
        transcriptLabel: document.getElementById("transcript").getAttribute("aria-labelledby"),
        statusLive: document.getElementById("status").getAttribute("aria-live"),
        statusRole: document.getElementById("status").getAttribute("role"),
        token: document.getElementById("token"),
        who: document.getElementById("who-text").textContent,
        lang: document.documentElement.lang,
    })""")
    assert facts["unlabelled"] == []
    assert facts["h1"] == "Agent console" and facts["h2"] == ["Session", "Transcript"]
    assert facts["transcriptLive"] == "polite" and facts["transcriptLabel"] == "transcript-heading"
    assert facts["statusLive"] == "polite" and facts["statusRole"] == "status"
    assert facts["token"] is None and facts["lang"] == "en"  # the session cookie replaced the typed token
    assert facts["who"] == f"Signed in as {EMAIL} (agent) · Acme Collections"

    # Keyboard alone: Tab walks the form in reading order, Enter starts; a bad call id is said in words.
    await page.focus("#call-id")
    await page.keyboard.type("bad call id")
    order = []
    for _ in range(2):
        await page.keyboard.press("Tab")
        order.append(await page.evaluate("document.activeElement.id"))
    assert order == ["language", "start"]
    await page.keyboard.press("Enter")
    await page.wait_for_selector('#status[data-state="failed"]')
    assert (await page.inner_text("#status")).startswith("Error: Call ID must be")
    assert await page.get_attribute("#call-id", "aria-invalid") == "true"
    assert await page.evaluate("document.activeElement.id") == "call-id"
    assert problems.errors == []


async def test_transcript_labels_speakers_replaces_partials_and_places_translations(
    aiohttp_server: AiohttpServer, browser: BrowserContext
) -> None:
    """A scripted SSE stream, released step by step by the test; the offer never answers, so the
    session stays in 'offering' with its EventSource open while the test looks."""
    release = asyncio.Event()

    def sse(event: str, payload: dict[str, object], ev_id: int) -> bytes:
        return b"id: %d\nevent: %s\ndata: %s\n\n" % (ev_id, event.encode(), orjson.dumps(payload))

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = {"call_id": "c1", "stream_id": "s1"}
        await resp.write(sse("call.started", base, 1))
        await resp.write(sse("transcript.partial", {**base, "track": "inbound", "seq": 1, "text": "i would"}, 2))
        await release.wait()
        for ev_id, (name, payload) in enumerate([
            ("transcript.final", {**base, "track": "inbound", "seq": 1, "text": "i would like to pay",
                                  "language": "en"}),
            ("translation.final", {**base, "track": "inbound", "seq": 1, "original": "i would like to pay",
                                   "translated": "quisiera pagar", "source_lang": "en", "target_lang": "es"}),
            ("agent.joined", {"call_id": "c1", "agent_id": "ana", "session_id": "x"}),
            ("transcript.final", {"call_id": "c1", "stream_id": "x", "track": "agent", "seq": 1,
                                  "text": "of course"}),
            ("transcript.final", {**base, "track": "outbound", "seq": 1, "text": "of course"}),
            ("translation.failed", {**base, "track": "outbound", "seq": 1, "source_lang": "en",
                                    "target_lang": "es", "reason": "deadline"}),
            ("agent.left", {"call_id": "c1", "agent_id": "ana", "session_id": "x", "reason": "hung up"}),
            ("call.ended", {**base, "reason": "stop"}),
        ], start=3):
            await resp.write(sse(name, payload, ev_id))
        return resp

    async def never_answers(request: web.Request) -> web.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    app = web.Application()
    console.add_routes(app)
    FakeAuth(app, always=True)
    app.router.add_get("/api/calls/{call_id}/events", events)
    app.router.add_post("/api/webrtc/offer", never_answers)
    srv = await aiohttp_server(app)
    page, problems = await new_page(browser)
    await page.goto(str(srv.make_url("/console?call_id=c1&autostart=1")))

    partial = await page.wait_for_selector('li[data-track="inbound"][data-final="false"]')
    assert partial is not None
    assert await partial.inner_text() == "Caller: i would (speaking…)"
    assert await partial.get_attribute("aria-hidden") == "true"  # not announced word by word
    assert await partial.evaluate("li => getComputedStyle(li.querySelector('.text')).fontStyle") == "italic"
    release.set()
    await page.wait_for_selector('li[data-event="call.ended"]')

    lines = await page.eval_on_selector_all("#transcript li", """lis => lis.map(li => ({
        track: li.dataset.track || null, final: li.dataset.final || null, event: li.dataset.event || null,
        text: li.innerText.replace(/\\s+/g, " ").trim(), hidden: li.getAttribute("aria-hidden"),
    }))""")
    assert [(x["track"], x["final"], x["event"], x["text"]) for x in lines] == [
        (None, None, "call.started", "Call started."),
        ("inbound", "true", None, "Caller: i would like to pay Translation (es): quisiera pagar"),
        (None, None, "agent.joined", "Agent ana joined."),
        ("agent", "true", None, "Agent: of course"),
        ("outbound", "true", None, "To caller: of course Translation unavailable: deadline"),
        (None, None, "agent.left", "Agent ana left (hung up)."),
        (None, None, "call.ended", "Call ended (stop)."),
    ]
    assert all(x["hidden"] is None for x in lines)
    # Each line's text is marked with the language it was recognised in (a bilingual call has two).
    assert await page.eval_on_selector('li[data-track="inbound"] .text', "el => el.lang") == "en"
    hook = await page.evaluate("window.switchboard.transcripts")
    assert [(t["track"], t["seq"], t["final"], t["text"]) for t in hook] == [
        ("inbound", 1, True, "i would like to pay"), ("agent", 1, True, "of course"),
        ("outbound", 1, True, "of course")]
    assert hook[0]["translation"]["text"] == "quisiera pagar"
    await page.wait_for_function("() => window.switchboard.state === 'offering'")  # ICE gathering completed first
    assert problems.errors == []


async def test_sign_in_form_is_keyboard_usable_announces_a_refusal_then_signs_in_and_out(
    aiohttp_server: AiohttpServer, browser: BrowserContext
) -> None:
    app = web.Application()
    console.add_routes(app)
    auth = FakeAuth(app)
    srv = await aiohttp_server(app)
    page, problems = await new_page(browser)
    await page.goto(str(srv.make_url("/console")))
    await page.wait_for_selector("#login-section:not([hidden])")
    assert await page.is_hidden("#app") and await page.is_hidden("#who")
    assert await page.evaluate("document.activeElement.id") == "email"
    labels = await page.evaluate("""() => ["email", "password"].map(id => document.getElementById(id).labels[0]
        .textContent)""")
    assert labels == ["E-mail", "Password"]
    assert await page.get_attribute("#password", "type") == "password"
    assert await page.get_attribute("#login-status", "role") == "alert"

    await sign_in(page, password="wrong-password")
    await page.wait_for_selector('#login-status[data-kind="error"]')
    assert await page.inner_text("#login-status") == "Sign-in failed: wrong e-mail or password"
    assert await page.get_attribute("#password", "aria-invalid") == "true"
    assert await page.evaluate("document.activeElement.id") == "password"
    assert await page.input_value("#password") == ""

    await page.keyboard.type(PASSWORD)
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#app:not([hidden])")
    assert await page.is_hidden("#login-section")
    assert await page.inner_text("#who-text") == f"Signed in as {EMAIL} (agent) · Acme Collections"
    assert await page.evaluate("document.activeElement.id") == "call-id"
    assert auth.logins[-1] == {"email": EMAIL, "password": PASSWORD}  # sent as JSON (else the fake says 415)
    assert await page.evaluate("document.cookie") == "", "the session cookie is HttpOnly"
    assert await page.evaluate("window.switchboard.signedIn") is True

    await page.click("#sign-out")
    await page.wait_for_selector("#login-section:not([hidden])")
    assert auth.logouts == 1 and auth.sessions == set()
    assert await page.inner_text("#login-status") == "Signed out."
    assert await page.is_hidden("#app")
    assert [e for e in problems.errors if "status of 401" not in e] == []  # the refused sign-in and /me


async def test_an_expired_session_returns_to_the_sign_in_form_with_a_message(
    aiohttp_server: AiohttpServer, browser: BrowserContext
) -> None:
    app = web.Application()
    console.add_routes(app)
    auth = FakeAuth(app)
    offers: list[int] = []

    async def events(request: web.Request) -> web.StreamResponse:
        if not auth.signed_in(request):
            return unauthenticated()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.Event().wait()
        return resp

    async def offer(request: web.Request) -> web.Response:
        offers.append(1)
        return unauthenticated() if not auth.signed_in(request) else web.json_response({}, status=500)

    app.router.add_get("/api/calls/{call_id}/events", events)
    app.router.add_post("/api/webrtc/offer", offer)
    srv = await aiohttp_server(app)
    page, problems = await new_page(browser)
    await page.goto(str(srv.make_url("/console?call_id=v3:expiry")))
    await sign_in(page)
    await page.wait_for_selector("#app:not([hidden])")
    auth.expire()  # as when the server's session ran out or was revoked
    await page.click("#start")
    await page.wait_for_selector("#login-section:not([hidden])")
    assert await page.inner_text("#login-status") == "Your session has expired. Sign in again to continue."
    assert await page.get_attribute("#login-status", "data-kind") == "error"
    assert await page.evaluate("window.switchboard.sessionId") is None
    assert await page.evaluate("window.switchboard.signedIn") is False
    # Signing in again brings the call view back, ready to start.
    await sign_in(page)
    await page.wait_for_selector("#app:not([hidden])")
    assert await page.is_enabled("#start") and not await page.is_enabled("#stop")
    assert [e for e in problems.errors if "status of 401" not in e] == []


async def test_a_409_offers_to_take_the_other_session_over_and_taking_over_sends_replace(
    aiohttp_server: AiohttpServer, browser: BrowserContext
) -> None:
    app = web.Application()
    console.add_routes(app)
    FakeAuth(app, always=True)
    bodies: list[dict[str, object]] = []

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.Event().wait()
        return resp

    async def offer(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        if len(bodies) == 1:
            return web.json_response({"success": False, "error": {
                "code": "conflict", "message": "you already have a live session on call 'v3:other'"}}, status=409)
        await asyncio.Event().wait()  # the second offer stays pending: the page waits in 'offering'
        raise AssertionError("unreachable")

    app.router.add_get("/api/calls/{call_id}/events", events)
    app.router.add_post("/api/webrtc/offer", offer)
    srv = await aiohttp_server(app)
    page, problems = await new_page(browser)
    await page.goto(str(srv.make_url("/console?call_id=v3:takeover&autostart=1")))
    await page.wait_for_selector('#status[data-state="failed"]')
    assert await page.inner_text("#status") == \
        "Error: you already have a live session on call 'v3:other' (HTTP 409)"
    assert await page.is_visible("#takeover")
    await page.click("#takeover")
    await page.wait_for_function("() => window.switchboard.state === 'offering'")
    assert not await page.is_visible("#takeover")
    assert [b["replace"] for b in bodies] == [False, True]
    assert {b["call_id"] for b in bodies} == {"v3:takeover"} and "token" not in bodies[0]
    assert [e for e in problems.errors if "status of 409" not in e] == []


# ---- end to end on the real server ----------------------------------------------------------------


async def test_agent_signs_in_and_the_microphone_is_transcribed_by_the_server_and_shown_by_the_page(
    server: Server, browser: BrowserContext
) -> None:
    """Needs the REST routes /api/auth/login and /api/auth/me, and doors that accept the session cookie."""
    org = server.extra["org"]
    call_id = "v3:console-e2e"
    page, problems = await new_page(browser)
    async with aiohttp.ClientSession() as http:
        sse = SseRecorder(http, f"{server.http}/api/calls/{call_id}/events", org["api_key"])
        try:
            await page.goto(f"{server.http}/console?call_id={call_id}&autostart=1")
            await sign_in(page, org["email"], org["password"])
            await page.wait_for_selector("#app:not([hidden])")
            assert (await page.inner_text("#who-text")).startswith(f"Signed in as {org['email']} (owner)")
            await page.wait_for_selector('#status[data-state="connected"]')
            joined = await sse.wait_for("agent.joined", 10)

            # Chromium loops the file: the first pass may be clipped by connection set-up, so up to two
            # finals are taken and the best is held to the bound (both are printed).
            line = await page.wait_for_selector('#transcript li[data-track="agent"][data-final="true"]',
                                                timeout=30_000)
            assert line is not None
            first = await sse.wait_for("transcript.final", 5, track="agent")
            shown = await line.eval_on_selector(".text", "el => el.textContent")
            assert int(await line.get_attribute("data-seq") or 0) == first["seq"]
            assert shown == first["text"], "the page's EventSource shows what the server published"
            assert await line.inner_text() == f"Agent: {first['text']}"
            with contextlib.suppress(AssertionError):
                await sse.wait_for("transcript.final", 8, track="agent", seq=int(str(first["seq"])) + 1)
            finals = sse.named("transcript.final", track="agent")[:2]
            wers = [word_error_rate(SENTENCE, str(f["text"])) for f in finals]
            print(f"\nagent finals {[f['text'] for f in finals]} WER {wers}")
            assert min(wers) <= MAX_WER
            assert all(f["stream_id"] == joined["session_id"] for f in finals)
            hook = await page.evaluate("window.switchboard")
            assert hook["sessionId"] == joined["session_id"]
            assert {"track": "agent", "seq": first["seq"], "text": first["text"], "final": True}.items() <= \
                next(t for t in hook["transcripts"] if t["track"] == "agent").items()

            assert await page.evaluate("() => document.getElementById('caller-audio').srcObject !== null"), \
                "the server's track (the caller's audio) is attached to the page's <audio>"

            async with page.expect_response(lambda r: r.request.method == "DELETE") as deleted:
                await page.click("#stop")
            response = await deleted.value
            assert response.url.endswith(f"/api/webrtc/sessions/{joined['session_id']}") and response.status == 204
            await page.wait_for_selector('#status[data-state="stopped"]')
            left = await sse.wait_for("agent.left", 10)
            assert left["session_id"] == joined["session_id"]

            session = next(c["value"] for c in await browser.cookies() if c["name"] == "sb_session")
            async with http.get(f"{server.http}/api/auth/me", headers={"Cookie": f"sb_session={session}"}) as resp:
                assert resp.status == 200
            await page.click("#sign-out")
            await page.wait_for_selector("#login-section:not([hidden])")
            # Signing out revoked the session on the server, not only in the page.
            async with http.get(f"{server.http}/api/auth/me", headers={"Cookie": f"sb_session={session}"}) as resp:
                assert resp.status == 401
        finally:
            await sse.aclose()
    assert [e for e in problems.errors if "status of 401" not in e] == []  # /me before signing in
