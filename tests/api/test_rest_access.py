"""Who may call what, on the real server with storage on: every REST route against every role (sessions
of an owner, admin, agent and viewer, admin- and viewer-role API keys, no credential); tenant B's
credentials on tenant A's ids; and, enumerating the application's own router, that nothing but the
public doors answers without a credential.

The expected table below is written out by hand (not derived from api.auth.PERMISSIONS), so a route
bound to the wrong action fails here.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import aiohttp
import pytest

from api.auth import Role
from api.settings import Settings
from tests.api.rest_world import World, build_world, call, sign_in_all, world_server
from tests.servers import Server

ALL = {"owner", "admin", "agent", "viewer"}
ADMINS = {"owner", "admin"}
STAFF = {"owner", "admin", "agent"}
UNKNOWN = "00000000-0000-4000-8000-000000000000"
BODIED = ("POST", "PATCH", "PUT")

# (method, path, body, roles allowed, sessions only).  Bodies are invalid ({}) where the route takes one,
# ids unknown: an allowed caller gets 400 or 404 and nothing changes; a refused one 401 or 403.
MATRIX: list[tuple[str, str, object, set[str], bool]] = [
    ("GET", "/api/auth/me", None, ALL, False),
    ("POST", "/api/auth/password", {}, ALL, True),
    ("GET", "/api/org", None, ALL, False),
    ("PATCH", "/api/org", {"name": ""}, ADMINS, False),
    ("POST", "/api/users", {}, ADMINS, False),
    ("GET", "/api/users", None, ADMINS, False),
    ("GET", f"/api/users/{UNKNOWN}", None, ADMINS, False),
    ("PATCH", f"/api/users/{UNKNOWN}", {}, ADMINS, False),
    ("DELETE", f"/api/users/{UNKNOWN}", None, ADMINS, False),
    ("POST", f"/api/users/{UNKNOWN}/restore", {}, ADMINS, False),
    ("POST", "/api/api-keys", {}, ADMINS, False),
    ("GET", "/api/api-keys", None, ADMINS, False),
    ("DELETE", f"/api/api-keys/{UNKNOWN}", None, ADMINS, False),
    ("POST", "/api/media-tokens", {}, ADMINS, False),
    ("GET", "/api/media-tokens", None, ADMINS, False),
    ("DELETE", f"/api/media-tokens/{UNKNOWN}", None, ADMINS, False),
    ("GET", "/api/calls", None, ALL, False),
    ("GET", "/api/calls/v3:unknown", None, ALL, False),
    ("GET", f"/api/calls/v3:unknown/recordings/{UNKNOWN}/url", None, ALL, False),
    ("GET", "/api/audit", None, ADMINS, False),
    ("GET", "/api/billing", None, ADMINS, False),
    ("POST", "/api/billing/subscribe", {}, ADMINS, False),
    ("POST", "/api/accounts", {}, STAFF, False),
    ("GET", "/api/accounts", None, ALL, False),
    ("GET", f"/api/accounts/{UNKNOWN}", None, ALL, False),
    ("PATCH", f"/api/accounts/{UNKNOWN}", {}, STAFF, False),
    ("DELETE", f"/api/accounts/{UNKNOWN}", None, ADMINS, False),
    ("POST", "/api/accounts/import", b"not,a,header\n", ADMINS, False),
    ("GET", "/api/imports", None, ADMINS, False),
    ("GET", f"/api/imports/{UNKNOWN}", None, ADMINS, False),
    ("POST", "/api/campaigns", {}, ADMINS, False),
    ("GET", "/api/campaigns", None, ALL, False),
    ("GET", f"/api/campaigns/{UNKNOWN}", None, ALL, False),
    ("PATCH", f"/api/campaigns/{UNKNOWN}", {}, ADMINS, False),
    ("DELETE", f"/api/campaigns/{UNKNOWN}", None, ADMINS, False),
    ("POST", f"/api/campaigns/{UNKNOWN}/contacts", {}, ADMINS, False),
    ("DELETE", f"/api/campaigns/{UNKNOWN}/contacts/{UNKNOWN}", None, ADMINS, False),
    ("GET", "/api/voice-config", None, ALL, False),
    ("PUT", "/api/voice-config", {"caller_id": "not a number"}, ADMINS, False),
    ("POST", "/api/voice/call", {}, STAFF, False),
    ("POST", "/api/voice/hangup", {}, STAFF, False),
    # The doors beside REST (their attacks: tests/api/test_front_doors.py).  A call's event stream itself
    # is left out here: an allowed caller would wait for the call to start.
    ("POST", "/api/calls/v3:unknown/sse-token", {}, ALL, False),
    ("DELETE", "/api/calls/v3:unknown", None, ADMINS, False),
    ("POST", "/api/calls/v3:unknown/restore", {}, ADMINS, False),
    ("POST", f"/api/accounts/{UNKNOWN}/restore", {}, ADMINS, False),
    ("POST", f"/api/campaigns/{UNKNOWN}/restore", {}, ADMINS, False),
    ("GET", "/api/retention", None, ADMINS, False),
    ("POST", "/api/erasures", {}, ADMINS, False),
    ("POST", "/api/exports", {}, ADMINS, False),
    ("GET", f"/api/exports/{UNKNOWN}", None, ADMINS, False),
    ("GET", f"/api/exports/{UNKNOWN}/url", None, ADMINS, False),
    ("PUT", f"/api/accounts/{UNKNOWN}/restricted", {}, STAFF, False),
    ("GET", f"/api/accounts/{UNKNOWN}/restricted", None, ALL, False),
    ("POST", "/api/calls/v3:unknown/evidence", {}, ADMINS, False),
    ("GET", "/api/calls/v3:unknown/evidence", None, ADMINS, False),
    ("GET", f"/api/calls/v3:unknown/evidence/{UNKNOWN}/verify", None, ADMINS, False),
    ("GET", f"/api/calls/v3:unknown/evidence/{UNKNOWN}/url", None, ADMINS, False),
    ("DELETE", "/api/org", {"confirm": "not the organisation's name"}, {"owner"}, False),
    ("PUT", "/api/retention", {"recordings": 1}, ADMINS, False),
    ("POST", "/api/webrtc/offer", {}, STAFF, False),
    ("DELETE", f"/api/webrtc/sessions/{UNKNOWN}", None, STAFF, False),
    ("GET", "/api/stats", None, ADMINS, False),
    ("POST", "/api/stats/reset", {}, ADMINS, False),
    ("GET", "/metrics", None, ADMINS, False),
]
# Reachable without a credential (README): the probes, login, the document and its page, the console, and
# the Stripe and Telnyx webhooks, whose credential is their own signature check (without one: 401, or 503 when
# no webhook secret or public key is configured, as on this server; tests/api/test_billing.py,
# tests/api/test_voice_calls.py).
PUBLIC = {("GET", "/healthz"), ("GET", "/readyz"), ("POST", "/api/auth/login"), ("GET", "/api/openapi.json"),
          ("GET", "/api/docs"), ("GET", "/api/docs/static/{name}"), ("GET", "/console"),
          ("GET", "/console/static/{name}"), ("GET", "/app"), ("GET", "/app/static/{name}"),
          ("POST", "/api/webhooks/stripe"),
          ("POST", "/api/webhooks/telnyx")}
# The media WebSocket answers with close codes, not statuses: tests/api/test_front_doors.py checks that
# every missing or unknown media token is closed with 1008 before a stream slot is taken.
WIRED_ELSEWHERE = {("GET", "/api/media/telnyx")}


@pytest.fixture(scope="module")
def world(pg_admin_url: str, redis_url: str) -> World:
    return asyncio.run(build_world(pg_admin_url, redis_url, 3))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("rest-access")
    with world_server(tmp, world) as srv:
        asyncio.run(sign_in_all(srv, world))
        srv.extra["blobs"] = tmp / "data" / "blobs"  # the embedded cold tier (LocalBlobStore)
        yield srv


def _credentials(world: World) -> dict[str, tuple[str | None, str | None, bool]]:
    """name -> (token, role, is a session)."""
    a = world.a
    creds: dict[str, tuple[str | None, str | None, bool]] = {
        f"session:{r.value}": (a.sessions[r], r.value, True) for r in a.sessions}
    creds["api_key:admin"] = (a.keys[Role.ADMIN], "admin", False)
    creds["api_key:viewer"] = (a.keys[Role.VIEWER], "viewer", False)
    creds["none"] = (None, None, False)
    return creds


async def test_every_route_admits_exactly_the_roles_of_the_table(server: Server, world: World) -> None:
    wrong = []
    async with aiohttp.ClientSession() as http:
        for name, (token, role, is_session) in _credentials(world).items():
            for method, path, body, roles, sessions_only in MATRIX:
                status, reply = await call(http, server, method, path, token, body)
                if role is None:
                    expected = "401"
                elif role in roles and (is_session or not sessions_only):
                    expected = "allowed"
                else:
                    expected = "403"
                got = "allowed" if status < 500 and status not in (401, 403) else str(status)
                if got != expected:
                    wrong.append((name, method, path, status, reply))
    assert wrong == []


async def test_logout_is_for_sessions_and_revokes_only_the_presented_one(server: Server, world: World) -> None:
    from tests.api.rest_world import login

    async with aiohttp.ClientSession() as http:
        assert (await call(http, server, "POST", "/api/auth/logout", None))[0] == 401
        assert (await call(http, server, "POST", "/api/auth/logout", world.a.keys[Role.ADMIN]))[0] == 403
        for role in (Role.OWNER, Role.ADMIN, Role.AGENT, Role.VIEWER):
            throwaway = await login(http, server, world.a.emails[role])
            status, reply = await call(http, server, "POST", "/api/auth/logout", throwaway)
            assert (status, reply["data"]) == (200, {"revoked": True})
            assert (await call(http, server, "GET", "/api/auth/me", throwaway))[0] == 401
            assert (await call(http, server, "GET", "/api/auth/me", world.a.sessions[role]))[0] == 200


async def test_tenant_b_reaches_nothing_of_tenant_a_and_gets_the_unknown_ids_404(server: Server,
                                                                              world: World) -> None:
    a, b = world.a, world.b
    victim = a.users[Role.AGENT]
    by_id = [
        ("GET", "/api/users/{}", None, victim, UNKNOWN),
        ("PATCH", "/api/users/{}", {"display_name": "taken over", "role": "viewer"}, victim, UNKNOWN),
        ("DELETE", "/api/users/{}", None, victim, UNKNOWN),
        ("POST", "/api/users/{}/restore", {}, victim, UNKNOWN),
        ("DELETE", "/api/api-keys/{}", None, a.key_ids[Role.ADMIN], UNKNOWN),
        ("DELETE", "/api/media-tokens/{}", None, a.token_id, UNKNOWN),
        ("GET", "/api/calls/{}", None, a.call_id, "v3:unknown-call"),
        ("DELETE", "/api/calls/{}", None, a.call_id, "v3:unknown-call"),
        ("POST", "/api/calls/{}/restore", {}, a.call_id, "v3:unknown-call"),
        ("POST", "/api/accounts/{}/restore", {}, a.account_id, UNKNOWN),
        ("POST", "/api/campaigns/{}/restore", {}, a.campaign_id, UNKNOWN),
        ("GET", "/api/calls/{}/recordings/" + str(a.recording_id) + "/url", None, a.call_id, "v3:unknown-call"),
        ("GET", "/api/calls/" + b.call_id + "/recordings/{}/url", None, a.recording_id, UNKNOWN),
        ("GET", "/api/accounts/{}", None, a.account_id, UNKNOWN),
        ("PATCH", "/api/accounts/{}", {"balance_cents": 0, "do_not_call": True}, a.account_id, UNKNOWN),
        ("DELETE", "/api/accounts/{}", None, a.account_id, UNKNOWN),
        ("GET", "/api/campaigns/{}", None, a.campaign_id, UNKNOWN),
        ("PATCH", "/api/campaigns/{}", {"name": "taken over"}, a.campaign_id, UNKNOWN),
        ("DELETE", "/api/campaigns/{}", None, a.campaign_id, UNKNOWN),
        ("POST", "/api/campaigns/{}/contacts", {"account_ids": [str(b.account_id)]}, a.campaign_id, UNKNOWN),
        ("DELETE", "/api/campaigns/{}/contacts/" + str(a.account_id), None, a.campaign_id, UNKNOWN),
        ("GET", "/api/imports/{}", None, a.import_id, UNKNOWN),
    ]
    leaks = []
    async with aiohttp.ClientSession() as http:
        for token in (b.sessions[Role.OWNER], b.sessions[Role.ADMIN], b.keys[Role.ADMIN]):
            for method, template, body, theirs, unknown in by_id:
                got = await call(http, server, method, template.format(theirs), token, body)
                baseline = await call(http, server, method, template.format(unknown), token, body)
                if got[0] != 404 or got != baseline:
                    leaks.append((method, template, got, baseline))
            for filters in (f"resource_id={victim}", f"actor_id={a.users[Role.OWNER]}", "action=auth.login",
                            f"resource_type=user&resource_id={a.users[Role.OWNER]}"):
                status, reply = await call(http, server, "GET", f"/api/audit?{filters}", token)
                if status != 200 or any(e["resource_id"] in {str(u) for u in a.users.values()}
                                        for e in reply["data"]["items"]):
                    leaks.append(("audit", filters, status, reply))
            status, reply = await call(http, server, "GET", "/api/calls", token)
            assert status == 200 and {c["call_id"] for c in reply["data"]["items"]} == {b.call_id}
            status, reply = await call(http, server, "GET", f"/api/accounts?campaign_id={a.campaign_id}", token)
            assert status == 200 and reply["data"]["items"] == []  # A's campaign: no contacts B can see
            status, reply = await call(http, server, "GET", "/api/users?limit=200", token)
            assert status == 200 and {u["id"] for u in reply["data"]["items"]} == {str(u) for u in b.users.values()}
        # A is untouched: its agent still signed in with its role, its key and call still there.
        status, me = await call(http, server, "GET", "/api/auth/me", a.sessions[Role.AGENT])
        assert status == 200 and me["data"]["role"] == "agent" and me["data"]["user"]["active"] is True
        assert (await call(http, server, "GET", "/api/org", a.keys[Role.ADMIN]))[0] == 200
        status, detail = await call(http, server, "GET", f"/api/calls/{a.call_id}", a.sessions[Role.VIEWER])
        assert status == 200 and detail["data"]["transcripts"][0]["text"] == "my card is [REDACTED]"
        assert detail["data"]["recordings"][0]["id"] == str(a.recording_id)
        status, acct = await call(http, server, "GET", f"/api/accounts/{a.account_id}", a.sessions[Role.VIEWER])
        assert status == 200 and (acct["data"]["balance_cents"], acct["data"]["do_not_call"]) == (12345, False)
        status, camp = await call(http, server, "GET", f"/api/campaigns/{a.campaign_id}", a.sessions[Role.VIEWER])
        assert status == 200 and (camp["data"]["name"], camp["data"]["contacts"]) == ("Campaign a", 1)
        for token in (b.sessions[Role.OWNER], b.keys[Role.ADMIN]):
            for path in ("/api/accounts?limit=200", "/api/campaigns?limit=200", "/api/imports?limit=200"):
                status, reply = await call(http, server, "GET", path, token)
                assert status == 200 and {x["id"] for x in reply["data"]["items"]} <= {
                    str(b.account_id), str(b.campaign_id), str(b.import_id)}, (path, reply)
    assert leaks == []


async def test_without_a_credential_only_the_public_doors_answer(server: Server) -> None:
    """Enumerate the router of the application the server builds (make_app), and call every route."""
    from api.app import make_app, open_runtime

    rt = await open_runtime(Settings(persist=False, stt_provider="null", translation_provider="none"))
    try:
        app = make_app(rt)
        routes = {(r.method, r.resource.canonical) for r in app.router.routes()  # type: ignore[union-attr]
                  if r.method != "HEAD"}
    finally:
        await rt.aclose()
    from api.openapi import ROUTES

    documented = {(r.method, r.path) for r in ROUTES}
    undocumented = routes - documented - {("GET", "/console"), ("GET", "/console/static/{name}"),
                                          ("GET", "/app"), ("GET", "/app/static/{name}"),
                                          ("GET", "/api/docs/static/{name}")}
    assert undocumented == set()
    reachable = []
    async with aiohttp.ClientSession() as http:
        for method, path in sorted(routes | {("GET", "/api/blobs/{key}")}):
            if (method, path) in WIRED_ELSEWHERE:
                continue
            url = (path.replace("{call_id}", "v3:x").replace("{name}", "docs.js").replace("{key}", "a.wav")
                   .replace("{user_id}", UNKNOWN).replace("{key_id}", UNKNOWN).replace("{token_id}", UNKNOWN)
                   .replace("{recording_id}", UNKNOWN).replace("{session_id}", UNKNOWN)
                   .replace("{account_id}", UNKNOWN).replace("{campaign_id}", UNKNOWN).replace("{import_id}", UNKNOWN)
                   .replace("{bundle_id}", UNKNOWN).replace("{export_id}", UNKNOWN))
            body = b"external_ref\n" if path == "/api/accounts/import" else {} if method in BODIED else None
            status, reply = await call(http, server, method, url, None, body)
            if (method, path) in {("POST", "/api/webhooks/stripe"), ("POST", "/api/webhooks/telnyx")}:
                if status not in (401, 503):
                    reachable.append((method, path, status))
                continue
            if (method, path) in PUBLIC:
                continue
            if path == "/api/blobs/{key}":
                ok = status == 400  # the signed URL is the credential: without one, refused
            else:
                ok = status == 401 and reply["error"]["code"] == "unauthenticated"
            if not ok:
                reachable.append((method, path, status))
    assert reachable == []
    assert uuid.UUID(UNKNOWN)


async def test_with_storage_off_the_rest_routes_answer_503_and_the_docs_still_serve(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.servers import running_server

    with running_server(tmp_path_factory.mktemp("rest-off"), SWITCHBOARD_STT_PROVIDER="null") as srv:
        async with aiohttp.ClientSession() as http:
            status, reply = await call(http, srv, "GET", "/api/org", "sbk_whatever")
            assert (status, reply["error"]["code"]) == (503, "unavailable")
            status, reply = await call(http, srv, "POST", "/api/auth/login", None, {"email": "a@b", "password": "p"})
            assert (status, reply["error"]["code"]) == (503, "unavailable")
            assert (await call(http, srv, "GET", "/api/openapi.json"))[0] == 200
            assert (await call(http, srv, "GET", "/api/docs"))[0] == 200
            status, reply = await call(http, srv, "GET", "/api/no-such-route")
            assert (status, reply["error"]["code"]) == (404, "not_found")  # aiohttp's own, as the envelope


async def test_a_recording_url_is_signed_bounded_audited_and_downloads_the_file(server: Server, world: World) -> None:
    a = world.a
    import asyncpg

    conn = await asyncpg.connect(world.db.admin)
    try:
        key = await conn.fetchval("SELECT storage_key FROM recordings WHERE id = $1", a.recording_id)
    finally:
        await conn.close()
    path = server.extra["blobs"] / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF-not-really-a-wav")
    base = f"/api/calls/{a.call_id}/recordings/{a.recording_id}/url"
    async with aiohttp.ClientSession() as http:
        status, reply = await call(http, server, "GET", base + "?expires_in=3601", a.sessions[Role.VIEWER])
        assert (status, reply["error"]["code"]) == (400, "validation_failed")
        assert reply["error"]["details"][0]["field"] == "expires_in"
        status, reply = await call(http, server, "GET", base, a.sessions[Role.VIEWER])
        assert status == 200 and reply["data"]["expires_in"] == 900
        async with http.get(server.http + reply["data"]["url"]) as r:
            assert r.status == 200 and await r.read() == b"RIFF-not-really-a-wav"
        async with http.get(server.http + reply["data"]["url"].replace("sig=", "sig=0")) as r:
            assert r.status == 403
        status, trail = await call(http, server, "GET", f"/api/audit?action=recording.url_issued"
                                                        f"&resource_id={a.recording_id}", a.sessions[Role.ADMIN])
        entry = trail["data"]["items"][0]
        assert (entry["actor_id"], entry["new_value"]) == (str(a.users[Role.VIEWER]), {"expires_in": 900})
