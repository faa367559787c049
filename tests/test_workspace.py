"""The browser workspace (``/app``) in Debian's headless Chromium, driven by Playwright, against the real
server (storage on, the local recogniser) and the protocol-faithful fakes of Telnyx and Stripe.

Journeys, each saving screenshots of its key steps under the run's output (``<basetemp>/workspace-shots``;
``SWITCHBOARD_SCREENSHOTS=<dir>`` copies them there too, which is how ``docs/`` got its two):

* an agent signs in, finds an account, calls it (the fake Telnyx answers and plays speech), joins the
  audio over WebRTC, watches finals arrive with their speaker, hangs up, and opens the summary, the
  recording (through its signed URL) and the transcript from the recording;
* an admin imports a CSV with bad rows (each refused line shown), adds a user (the password shown
  once), subscribes to a plan, and reads the audit entries of that journey;
* a viewer sees no Call and no Hang up, and the server refuses both for them anyway;
* a session that ends shows the sign-in form with the reason and none of the old data; another
  tenant's user signing in on the same page sees only their own accounts; signing out leaves nothing.

Every page passes axe-core (``axe-playwright-python``) with no serious or critical violation, and the
journeys log no console error beyond the 401 of the first "who am I".
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import pytest
from axe_playwright_python.async_playwright import Axe
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from playwright.async_api import BrowserContext, Page, async_playwright, expect

from api.auth import Role
from api.telnyx_signature import public_b64
from tests.api.rest_world import PASSWORD, World, build_world, call, world_server
from tests.fakes.stripe import FakeStripe
from tests.fakes.telnyx import FakeTelnyx
from tests.fakes.tls import self_signed
from tests.servers import Server, free_port
from tests.speech import utterances_with_pauses

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream", "--allow-loopback-in-peer-connection"]
FAKE_KEY = Ed25519PrivateKey.generate()
SENTENCES = ["please confirm your account number", "i would like to make a payment today"]
PLANS = {"pro": {"price_id": "price_pro", "metered_price_id": "price_minutes", "included_minutes": 1000},
         "basic": {"price_id": "price_basic", "included_minutes": 100}}
ALLOWED_CONSOLE = re.compile(r"status of (401|404)")  # the first /api/auth/me; a checked unknown id


@pytest.fixture(scope="module")
def world(pg_admin_url: str, redis_url: str) -> World:
    return asyncio.run(build_world(pg_admin_url, redis_url, 14))


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("workspace-shots")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("workspace")
    cert = self_signed(tmp / "tls", ["localhost"])
    phrases = tmp / "phrases.txt"
    phrases.write_text("\n".join(SENTENCES) + "\n")
    port, rport, sport = free_port(), free_port(), free_port()
    with world_server(tmp, world, TELNYX_API_KEY="KEY_test_fake", TELNYX_PUBLIC_KEY=public_b64(FAKE_KEY),
                      TELNYX_CONNECTION_ID="conn-1", SWITCHBOARD_TELNYX_API_URL=f"http://127.0.0.1:{port}",
                      SWITCHBOARD_CALL_TOKEN_KEY="workspace-call-token-key",
                      SWITCHBOARD_STT_PROVIDER="pocketsphinx", SWITCHBOARD_STT_PHRASES_FILE=str(phrases),
                      SWITCHBOARD_RECORDING_FETCH_HOSTS='["localhost"]',
                      SWITCHBOARD_RECORDING_FETCH_ALLOW_NETWORKS='["127.0.0.1/32"]',
                      SWITCHBOARD_RECORDING_FETCH_CA_FILE=str(cert.cert_file), SWITCHBOARD_BATCH_STT="local",
                      SWITCHBOARD_POST_CALL_INTERVAL_S="0.5", SWITCHBOARD_TRANSLATION_PROVIDER="none",
                      STRIPE_API_KEY="sk_test_fake", SWITCHBOARD_STRIPE_API_URL=f"http://127.0.0.1:{sport}",
                      SWITCHBOARD_BILLING_PLANS=orjson.dumps(PLANS).decode(),
                      SWITCHBOARD_RATE_WRITE_PER_MIN="600") as srv:
        srv.extra.update(port=port, rport=rport, sport=sport, cert=cert)
        yield srv


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[BrowserContext]:
    async with async_playwright() as pw:
        ctx = await pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                          headless=True, args=ARGS, viewport={"width": 1280,
                                                                                              "height": 900})
        ctx.set_default_timeout(15_000)
        try:
            yield ctx
        finally:
            await ctx.close()


def _copy(path: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, out / path.name)


class Journey:
    """A page with its console problems, screenshots and accessibility checks."""

    def __init__(self, page: Page, shots: Path, name: str) -> None:
        self.page = page
        self.shots = shots
        self.name = name
        self.step = 0
        self.errors: list[str] = []
        self.axe_pages: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error"
                and not ALLOWED_CONSOLE.search(m.text) else None)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    async def shot(self, label: str) -> Path:
        self.step += 1
        path = self.shots / f"{self.name}-{self.step:02d}-{label}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        out = os.environ.get("SWITCHBOARD_SCREENSHOTS")
        if out:
            await asyncio.to_thread(_copy, path, Path(out))
        return path

    async def accessible(self, label: str) -> None:
        """axe-core on the page as it is now: no serious or critical violation."""
        results = await Axe().run(self.page)
        bad = [(v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3])
               for v in results.response["violations"] if v["impact"] in ("serious", "critical")]
        assert bad == [], (label, bad)
        self.axe_pages.append(label)

    async def sign_in(self, base: str, email: str) -> None:
        await self.page.goto(f"{base}/app")
        await self.page.get_by_label("E-mail address").fill(email)
        await self.page.get_by_label("Password").fill(PASSWORD)
        await self.page.get_by_label("Password").press("Enter")  # the keyboard alone
        await expect(self.page.locator("#who-text")).to_contain_text(email.split("@")[0].split("-")[0])


async def _add_accounts(http: aiohttp.ClientSession, server: Server, token: str, tag: str) -> dict[str, str]:
    ids = {}
    for i, (name, dnc) in enumerate([(f"Dana {tag}", False), (f"Eli {tag}", True), (f"Zoe {tag}", False)]):
        status, reply = await call(http, server, "POST", "/api/accounts", token,
                                   {"external_ref": f"WS-{tag}-{i}", "debtor_name": name,
                                    "phones": [f"+1555777{i:04d}"], "balance_cents": 10_000 * (i + 1),
                                    "currency": "USD", "do_not_call": dnc})
        assert status == 201, reply
        ids[name] = reply["data"]["id"]
    return ids


async def test_an_agent_finds_an_account_calls_it_follows_it_live_and_reads_what_was_kept(
        server: Server, world: World, browser: BrowserContext, shots: Path) -> None:
    a = world.a
    async with aiohttp.ClientSession() as http:
        admin_token = (await call(http, server, "POST", "/api/auth/login", None,
                                  {"email": a.emails[Role.ADMIN], "password": PASSWORD}))[1]["data"]["token"]
        ids = await _add_accounts(http, server, admin_token, "agent")
        status, _ = await call(http, server, "PUT", "/api/voice-config", admin_token,
                               {"caller_id": "+15550001000", "recording": True, "translate_default": None})
        assert status == 200
    fake = FakeTelnyx(server.extra["port"], f"{server.http}/api/webhooks/telnyx", tls=server.extra["cert"],
                      recordings_port=server.extra["rport"])
    fake.key = FAKE_KEY
    page = await browser.new_page()
    j = Journey(page, shots, "agent")
    async with fake:
        await page.goto(f"{server.http}/app")
        await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        await j.accessible("sign-in")
        await j.sign_in(server.http, a.emails[Role.AGENT])
        await expect(page.locator("#account-results tbody tr").first).to_be_visible()
        # Find the account by part of its name; the do-not-call one is shown as such, with no Call.
        await page.get_by_label("Debtor name").fill("agent")
        await page.get_by_role("button", name="Show accounts").click()
        await expect(page.locator("#account-results tbody tr")).to_have_count(3)
        dnc = page.locator(f"tr[data-account='{ids['Eli agent']}']")
        await expect(dnc).to_contain_text("Do not call")
        await expect(dnc.get_by_role("link", name=re.compile("^Call"))).to_have_count(0)
        await j.accessible("accounts")
        await j.shot("accounts")
        await page.get_by_role("link", name="Call Dana agent…").click()
        await expect(page.get_by_role("heading", name="Dana agent")).to_be_visible()
        await j.accessible("account")
        await page.get_by_role("button", name="Call Dana agent").click()

        # The call view: its state moves as Telnyx's webhooks arrive; the fake then plays speech.
        await expect(page.locator("#call-state")).to_have_attribute("data-state", "active", timeout=15_000)
        (ccid,) = fake.calls
        speech = np.concatenate([utterances_with_pauses(SENTENCES), np.zeros(8000 * 40, dtype=np.int16)])
        streaming = asyncio.create_task(fake.stream(ccid, speech))
        await expect(page.locator("#transcript li.notice").first).to_contain_text("Audio is streaming.")
        await page.get_by_role("button", name="Join audio").click()
        await expect(page.locator("#audio-status")).to_contain_text("connected", timeout=15_000)
        finals = page.locator("#transcript li[data-final='true'][data-track='inbound']")
        await expect(finals).to_have_count(len(SENTENCES), timeout=60_000)
        await expect(finals.first.locator(".speaker")).to_have_text("Debtor:")
        await j.accessible("call-live")
        await j.shot("call-live")
        await page.get_by_role("button", name="Hang up").click()
        await expect(page.locator("#call-state")).to_have_attribute("data-state", "ended", timeout=20_000)
        await fake.settle()
        await streaming
        await expect(page.locator("#summary-status")).to_have_text("completed", timeout=10_000)
        # After the call: the recording Telnyx saved and its transcript arrive within moments.
        play = page.get_by_role("button", name=re.compile("Play the carrier's recording"))
        for _ in range(60):
            if (await play.count() and await page.locator("#batch-transcript li").count()
                    and await page.locator("#call-score").count()):
                break
            await asyncio.sleep(1)
            await page.reload()
            await expect(page.locator("#summary-status")).to_have_text("completed")
        await expect(page.locator("#call-score")).to_contain_text("Promise to pay")
        await play.click()
        player = page.locator("#summary audio")
        await expect(player).to_have_attribute("src", re.compile(r"/recordings/.*sig="))
        src = await player.evaluate("a => a.src")  # absolute, as the browser fetches it
        got = await page.request.get(src)
        assert got.status == 200 and (await got.body())[:4] == b"RIFF"
        kept = page.locator("#live-transcript li[data-track='inbound'][data-kind='final']")
        assert await kept.count() >= len(SENTENCES)
        await j.accessible("call-summary")
        await j.shot("call-summary")
    assert j.errors == []


async def test_an_admin_imports_accounts_adds_a_user_subscribes_and_reads_the_audit_log(
        server: Server, world: World, browser: BrowserContext, shots: Path) -> None:
    a = world.a
    page = await browser.new_page()
    j = Journey(page, shots, "admin")
    csv = (b"external_ref,debtor_name,phones,balance,currency,status,consent,do_not_call\n"
           b"IMP-1,Ada Import,+15550001111,10.50,USD,open,yes,no\n"
           b"IMP-2,Bo Import,12,1.00,USD,open,,\n"
           b"IMP-3,Cy Import,,-5,USD,open,,\n"
           b"IMP-4,Di Import,+15550002222,7.00,USD,promised,,\n")
    new_email = f"new-agent-{uuid.uuid4().hex[:6]}@example.com"
    async with FakeStripe(server.extra["sport"]) as stripe:
        await j.sign_in(server.http, a.emails[Role.ADMIN])
        await page.get_by_role("link", name="Import accounts").click()
        await expect(page.get_by_role("heading", name="Import accounts")).to_be_visible()
        await j.accessible("import")
        await page.get_by_label("CSV file", exact=True).set_input_files(
            files=[{"name": "accounts.csv", "mimeType": "text/csv", "buffer": csv}])
        await page.get_by_role("button", name="Import").click()
        result = page.locator("#import-result")
        await expect(result).to_contain_text("2 of 4 rows imported")
        rows = result.locator("tbody tr")
        await expect(rows).to_have_count(2)
        await expect(rows.nth(0).locator("td").first).to_have_text("3")
        await expect(rows.nth(1).locator("td").first).to_have_text("4")
        await j.shot("import")

        await page.get_by_role("link", name="Users").click()
        await page.get_by_label("E-mail address").fill(new_email)
        await page.get_by_label("Name").fill("New Agent")
        await page.get_by_role("button", name="Add user").click()
        await expect(page.locator("output.secret")).to_have_text(re.compile(r"\S{12,}"))
        await expect(page.locator("#users")).to_contain_text(new_email)
        await j.accessible("users")
        await j.shot("users")

        await page.get_by_role("link", name="Keys and tokens").click()
        await page.get_by_label("Key name").fill("reporting")
        await page.get_by_role("button", name="Create key").click()
        await expect(page.locator("output.secret")).to_have_text(re.compile(r"^sbk_"))
        await j.accessible("keys")

        await page.get_by_role("link", name="Billing").click()
        await expect(page.locator("#plan")).to_have_text("free")
        await page.get_by_label("Plan").select_option("basic")
        await page.get_by_role("button", name="Subscribe").click()
        await expect(page.locator("#plan")).to_have_text("basic")
        await expect(page.locator("#subscription-status")).to_have_text("active")
        assert len(stripe.subscriptions) == 1
        await j.accessible("billing")
        await j.shot("billing")

        await page.get_by_role("link", name="Audit log").click()
        await page.get_by_label("Action").fill("user.created")
        await page.get_by_role("button", name="Show entries").click()
        entries = page.locator("#audit-entries tbody tr")
        await expect(entries.first).to_contain_text("user.created")
        await page.get_by_label("Action").fill("")
        await page.get_by_role("button", name="Show entries").click()
        for action in ("accounts.imported", "billing.subscribed", "api_key.created"):
            await expect(page.locator("#audit-entries")).to_contain_text(action)
        await j.accessible("audit")
        await j.shot("audit")
    assert j.errors == []


async def test_a_viewer_gets_no_call_or_hang_up_and_the_server_refuses_them_anyway(
        server: Server, world: World, browser: BrowserContext, shots: Path) -> None:
    a = world.a
    page = await browser.new_page()
    j = Journey(page, shots, "viewer")
    await j.sign_in(server.http, a.emails[Role.VIEWER])
    await expect(page.locator("#account-results tbody tr").first).to_be_visible()
    await expect(page.get_by_role("link", name=re.compile("^Call "))).to_have_count(0)
    await expect(page.get_by_role("link", name="Users")).to_have_count(0)  # no admin pages offered
    await page.locator("#account-results tbody tr a").first.click()
    await expect(page.locator("dl.facts")).to_be_visible()
    await expect(page.get_by_role("button", name=re.compile("^Call"))).to_have_count(0)
    await page.goto(f"{server.http}/app#/calls/{a.call_id}")
    await expect(page.locator("#summary-status")).to_be_visible()
    await expect(page.get_by_role("button", name="Hang up")).to_have_count(0)
    await j.accessible("call-summary-viewer")
    await page.get_by_role("link", name="Calls", exact=True).click()
    await expect(page.get_by_role("heading", name="Calls")).to_be_visible()
    await j.accessible("calls")
    await page.goto(f"{server.http}/app#/admin/users")
    await expect(page.get_by_role("heading", name="Not allowed")).to_be_visible()
    await j.accessible("not-allowed")
    await page.goto(f"{server.http}/console")  # the older agent console, signed in by the same cookie
    await expect(page.locator("#who-text")).to_contain_text("viewer")
    await j.accessible("console")
    await page.goto(f"{server.http}/api/docs")
    await expect(page.get_by_role("heading").first).to_be_visible()
    await j.accessible("api-docs")
    # The page's own session, used directly: the server refuses what the page does not offer.
    placed = await page.request.post(f"{server.http}/api/voice/call", data={"to": "+15551230000"})
    hung = await page.request.post(f"{server.http}/api/voice/hangup", data={"call_id": a.call_id})
    assert (placed.status, hung.status) == (403, 403)
    assert j.errors == []


async def test_an_ended_session_and_signing_out_leave_no_data_and_another_tenant_sees_only_its_own(
        server: Server, world: World, browser: BrowserContext, shots: Path) -> None:
    a, b = world.a, world.b
    async with aiohttp.ClientSession() as http:
        token_b = (await call(http, server, "POST", "/api/auth/login", None,
                              {"email": b.emails[Role.ADMIN], "password": PASSWORD}))[1]["data"]["token"]
        await _add_accounts(http, server, token_b, "tenantb")
    page = await browser.new_page()
    j = Journey(page, shots, "session")
    await j.sign_in(server.http, a.emails[Role.AGENT])
    await expect(page.locator("#account-results tbody tr").first).to_be_visible()
    seen_a = await page.locator("#account-results").inner_text()
    # The session ends on the server (revoked: as when the password changes or it expires).
    cookie = next(c for c in await browser.cookies() if c["name"] == "sb_session")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.http}/api/auth/logout", headers={"Authorization": f"Bearer {cookie['value']}"},
                             json={}) as r:
            assert r.status in (200, 204)
    await page.get_by_role("link", name="Calls", exact=True).click()
    await expect(page.get_by_role("alert")).to_contain_text("session has expired")
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    text = await page.locator("body").inner_text()
    assert "Debtor" not in text and "Dana agent" not in text and "REF-a" not in text
    await j.shot("session-expired")
    # Tenant B's admin on the same page sees B's accounts only.
    await j.sign_in(server.http, b.emails[Role.ADMIN])
    await expect(page.locator("#account-results tbody tr").first).to_be_visible()
    seen_b = await page.locator("#account-results").inner_text()
    assert "tenantb" in seen_b and "REF-a" not in seen_b and "Dana agent" not in seen_b
    assert "REF-a" in seen_a or "agent" in seen_a
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await expect(page.locator("main")).to_contain_text("You have signed out.")
    assert "tenantb" not in await page.locator("body").inner_text()
    assert await page.evaluate("window.workspace.me") is None
    assert j.errors == []


async def test_the_keyboard_alone_signs_in_finds_an_account_and_reaches_its_call_button(
        server: Server, world: World, browser: BrowserContext, shots: Path) -> None:
    a = world.a
    page = await browser.new_page()
    j = Journey(page, shots, "keyboard")
    kb = page.keyboard

    async def focused() -> str:
        return str(await page.evaluate("document.activeElement && (document.activeElement.id || "
                                       "document.activeElement.textContent || document.activeElement.tagName)"))

    await page.goto(f"{server.http}/app")
    await expect(page.get_by_label("E-mail address")).to_be_focused()  # the form takes the focus
    await kb.type(a.emails[Role.AGENT])
    await kb.press("Tab")
    await kb.type(PASSWORD)
    await kb.press("Enter")
    await expect(page.get_by_role("heading", name="Accounts")).to_be_focused()  # where am I: said at once
    for _ in range(30):  # Tab forward to the name filter
        await kb.press("Tab")
        if await page.evaluate("document.activeElement.name") == "name":
            break
    await kb.type("Debtor")
    await kb.press("Enter")
    await expect(page.locator("#account-results tbody tr")).to_have_count(1)
    for _ in range(30):  # Tab on to the row's Call… link, then follow it
        await kb.press("Tab")
        if (await focused()).startswith("Call…"):
            break
    await kb.press("Enter")
    await expect(page.get_by_role("button", name=re.compile("^Call Debtor"))).to_be_focused()
    for _ in range(40):  # and back up to Sign out
        await kb.press("Shift+Tab")
        if await focused() == "sign-out":
            break
    await kb.press("Enter")
    await expect(page.locator("main")).to_contain_text("You have signed out.")
    assert j.errors == []
