"""Idempotency, login limits and session revocation on the real server with storage on.

The per-address login limit applies to 127.0.0.1 here (``per_address_exempt`` emptied), so the test
that exhausts it runs last in the module.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import aiohttp
import asyncpg
import orjson
import pytest

from api.auth import Role
from tests.api.rest_world import PASSWORD, World, build_world, call, login, sign_in_all, world_server
from tests.servers import Server

ADDRESS_LIMIT = 60  # above what the tests before the per-address one spend (about 45)
ACCOUNT_LIMIT = 10
LOCKOUT_FAILURES = 5
READS_PER_MIN = 25


@pytest.fixture(scope="module")
def world(pg_admin_url: str, redis_url: str) -> World:
    return asyncio.run(build_world(pg_admin_url, redis_url, 4))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Server]:
    with world_server(tmp_path_factory.mktemp("rest-sessions"), world, SWITCHBOARD_PER_ADDRESS_EXEMPT="[]",
                      SWITCHBOARD_LOGIN_PER_ADDRESS_PER_MIN=str(ADDRESS_LIMIT),
                      SWITCHBOARD_LOGIN_PER_ACCOUNT_PER_MIN=str(ACCOUNT_LIMIT),
                      SWITCHBOARD_LOGIN_LOCKOUT_FAILURES=str(LOCKOUT_FAILURES),
                      SWITCHBOARD_RATE_READ_PER_MIN=str(READS_PER_MIN),
                      SWITCHBOARD_ALLOWED_HOSTS='["127.0.0.1", "switchboard.example.com"]',
                      SWITCHBOARD_TRUSTED_PROXIES='["127.0.0.1"]') as srv:
        asyncio.run(sign_in_all(srv, world))
        yield srv


async def _fetch(world: World, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(world.db.admin)
    await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=orjson.dumps, decoder=orjson.loads,
                              format="text")
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def test_fifty_concurrent_identical_posts_have_one_effect_and_one_audit_entry(server: Server,
                                                                                    world: World) -> None:
    token = world.a.sessions[Role.ADMIN]
    name = f"ci-{uuid.uuid4().hex[:8]}"
    key = uuid.uuid4().hex
    body = {"name": name, "role": "viewer"}
    url = f"{server.http}/api/api-keys"

    async def post(http: aiohttp.ClientSession, payload: dict[str, str], idem: str = key,
                   cred: str = token) -> tuple[int, dict[str, str], dict]:  # type: ignore[type-arg]
        async with http.post(url, json=payload, headers={"Authorization": f"Bearer {cred}",
                                                         "Idempotency-Key": idem}) as r:
            return r.status, dict(r.headers), await r.json()

    async with aiohttp.ClientSession() as http:
        results = await asyncio.gather(*(post(http, body) for _ in range(50)))
        statuses = sorted(s for s, _, _ in results)
        assert set(statuses) <= {201, 409}, statuses
        created = [b["data"] for s, _, b in results if s == 201]
        assert len({d["api_key"]["id"] for d in created}) == 1
        fresh = [d for s, h, d in ((s, h, b["data"]) for s, h, b in results if s == 201)
                 if "Idempotent-Replayed" not in h]
        assert len(fresh) == 1 and fresh[0]["key"].startswith("sbk_")
        conflicts = [b["error"]["code"] for s, _, b in results if s == 409]
        assert set(conflicts) <= {"idempotency_in_progress"}
        # Once done, a retry replays the first answer, without the once-shown secret.
        status, headers, again = await post(http, body)
        assert status == 201 and headers["Idempotent-Replayed"] == "true"
        assert again["data"]["api_key"] == fresh[0]["api_key"]
        assert again["data"]["key"] is None and again["data"]["secret_withheld"] is True
        # The same key with another body is refused; another credential's same key is its own.
        status, _, other = await post(http, {**body, "name": name + "-x"})
        assert (status, other["error"]["code"]) == (422, "idempotency_key_reused")
        status, headers, theirs = await post(http, body, cred=world.a.keys[Role.ADMIN])
        assert status == 201 and "Idempotent-Replayed" not in headers
        assert theirs["data"]["api_key"]["id"] != fresh[0]["api_key"]["id"]
        # X-Idempotency-Key is the same header.
        async with http.post(url, json=body, headers={"Authorization": f"Bearer {token}",
                                                      "X-Idempotency-Key": key}) as r:
            assert r.status == 201 and r.headers["Idempotent-Replayed"] == "true"
    rows = await _fetch(world, "SELECT id FROM api_keys WHERE name = $1 ORDER BY created_at", name)
    assert len(rows) == 2  # the session's one, and the other credential's
    first = str(rows[0]["id"]) if str(rows[0]["id"]) == fresh[0]["api_key"]["id"] else str(rows[1]["id"])
    audits = await _fetch(world, "SELECT actor_type, actor_id, new_value, ip FROM audit_logs "
                                 "WHERE action = 'api_key.created' AND resource_id = $1", first)
    assert len(audits) == 1
    entry = audits[0]
    assert (entry["actor_type"], entry["actor_id"]) == ("user", str(world.a.users[Role.ADMIN]))
    assert str(entry["ip"]) == "127.0.0.1" and fresh[0]["key"] not in orjson.dumps(dict(entry), default=str).decode()
    assert entry["new_value"] == {"name": name, "role": "viewer", "prefix": fresh[0]["key"][:12]}


async def test_a_role_change_deactivation_or_password_change_revokes_that_users_sessions(server: Server,
                                                                                          world: World) -> None:
    a = world.a
    owner = a.sessions[Role.OWNER]
    async with aiohttp.ClientSession() as http:
        agent_id, agent_email = a.users[Role.AGENT], a.emails[Role.AGENT]
        first = await login(http, server, agent_email)
        status, _ = await call(http, server, "PATCH", f"/api/users/{agent_id}", owner, {"role": "viewer"})
        assert status == 200
        assert (await call(http, server, "GET", "/api/auth/me", first))[0] == 401
        assert (await call(http, server, "GET", "/api/auth/me", a.sessions[Role.AGENT]))[0] == 401
        second = await login(http, server, agent_email)
        assert (await call(http, server, "GET", "/api/auth/me", second))[1]["data"]["role"] == "viewer"
        # A display-name change alone keeps the sessions.
        assert (await call(http, server, "PATCH", f"/api/users/{agent_id}", owner, {"display_name": "Ag"}))[0] == 200
        assert (await call(http, server, "GET", "/api/auth/me", second))[0] == 200
        # A new password set by an admin revokes; the old password no longer works.
        new_password = "a whole new passphrase"
        assert (await call(http, server, "PATCH", f"/api/users/{agent_id}", owner,
                           {"password": new_password}))[0] == 200
        assert (await call(http, server, "GET", "/api/auth/me", second))[0] == 401
        third = await login(http, server, agent_email, new_password)
        # Deactivation revokes, and the user cannot sign in (a delete too: tests/api/test_lifecycle.py).
        status, user = await call(http, server, "PATCH", f"/api/users/{agent_id}", owner, {"active": False})
        assert status == 200 and user["data"]["active"] is False
        assert (await call(http, server, "GET", "/api/auth/me", third))[0] == 401
        status, reply = await call(http, server, "POST", "/api/auth/login", None,
                                   {"email": agent_email, "password": new_password})
        assert (status, reply["error"]["code"]) == (401, "unauthenticated")
    audits = await _fetch(world, "SELECT action, old_value, new_value FROM audit_logs WHERE resource_id = $1 "
                                 "AND action LIKE 'user.%' ORDER BY created_at", str(agent_id))
    assert [r["action"] for r in audits] == ["user.updated"] * 4
    assert audits[3]["new_value"] == {"role": "viewer", "active": False}
    assert audits[0]["old_value"] == {"role": "agent", "active": True}
    text = orjson.dumps([dict(r) for r in audits]).decode()
    assert new_password not in text and "argon2" not in text and agent_email not in text


async def test_the_owner_rules_and_the_last_owner(server: Server, world: World) -> None:
    a = world.a
    owner, admin = a.sessions[Role.OWNER], a.sessions[Role.ADMIN]
    owner_id = a.users[Role.OWNER]
    async with aiohttp.ClientSession() as http:
        status, reply = await call(http, server, "PATCH", f"/api/users/{owner_id}", owner, {"role": "admin"})
        assert (status, reply["error"]["code"]) == (409, "conflict")
        assert (await call(http, server, "DELETE", f"/api/users/{owner_id}", owner))[0] == 409
        assert (await call(http, server, "PATCH", f"/api/users/{owner_id}", admin, {"display_name": "x"}))[0] == 403
        new = {"email": f"o-{uuid.uuid4().hex[:6]}@example.com", "role": "owner"}
        assert (await call(http, server, "POST", "/api/users", admin, new))[0] == 403
        assert (await call(http, server, "POST", "/api/api-keys", admin, {"name": "k", "role": "owner"}))[0] == 403
        status, made = await call(http, server, "POST", "/api/users", owner, new)
        assert status == 201 and len(made["data"]["password"]) >= 12  # generated, shown once
        await login(http, server, new["email"], made["data"]["password"])
        # With a second owner, the first may step down.
        status, reply = await call(http, server, "PATCH", f"/api/users/{made['data']['user']['id']}", owner,
                                   {"active": False})
        assert status == 200
        status, reply = await call(http, server, "POST", "/api/users", owner, {**new, "role": "viewer"})
        assert (status, reply["error"]["code"]) == (409, "already_exists")  # deactivated is still live


async def test_changing_ones_own_password_signs_out_everywhere_else(server: Server, world: World) -> None:
    email = world.a.emails[Role.VIEWER]
    async with aiohttp.ClientSession() as http:
        elsewhere = await login(http, server, email)
        here = await login(http, server, email)
        status, reply = await call(http, server, "POST", "/api/auth/password", here,
                                   {"current_password": "wrong one", "new_password": "x" * 12})
        assert (status, reply["error"]["code"]) == (403, "forbidden")
        status, reply = await call(http, server, "POST", "/api/auth/password", here,
                                   {"current_password": PASSWORD, "new_password": "another long password"})
        assert status == 200
        fresh = reply["data"]["token"]
        for old in (elsewhere, here):
            assert (await call(http, server, "GET", "/api/auth/me", old))[0] == 401
        assert (await call(http, server, "GET", "/api/auth/me", fresh))[0] == 200
        await login(http, server, email, "another long password")


async def test_a_stolen_session_cannot_guess_the_current_password_at_the_write_rate(server: Server,
                                                                                    world: World) -> None:
    async with aiohttp.ClientSession() as http:
        stolen = await login(http, server, world.b.emails[Role.AGENT])
        for _ in range(LOCKOUT_FAILURES):
            status, _ = await call(http, server, "POST", "/api/auth/password", stolen,
                                   {"current_password": "a guess", "new_password": "y" * 12})
            assert status == 403
        status, reply = await call(http, server, "POST", "/api/auth/password", stolen,
                                   {"current_password": PASSWORD, "new_password": "y" * 12})
        assert (status, reply["error"]["code"]) == (429, "rate_limited")  # even the right one, while locked
        assert (await call(http, server, "GET", "/api/auth/me", stolen))[0] == 200  # nothing changed


async def test_five_wrong_passwords_lock_the_account_even_against_the_right_one(server: Server,
                                                                              world: World) -> None:
    email = world.b.emails[Role.AGENT]
    async with aiohttp.ClientSession() as http:
        for _ in range(LOCKOUT_FAILURES):
            status, reply = await call(http, server, "POST", "/api/auth/login", None,
                                       {"email": email, "password": "not it at all"})
            assert (status, reply["error"]["code"]) == (401, "unauthenticated")
        async with http.post(f"{server.http}/api/auth/login", json={"email": email, "password": PASSWORD}) as r:
            assert r.status == 429 and (await r.json())["error"]["code"] == "rate_limited"
            assert 800 < int(r.headers["Retry-After"]) <= 900
        # Other accounts are not locked.
        await login(http, server, world.b.emails[Role.ADMIN])
        # An unknown address locks the same way (nothing tells it apart from a known one).
        ghost = f"ghost-{uuid.uuid4().hex[:6]}@example.com"
        answers = [await call(http, server, "POST", "/api/auth/login", None, {"email": ghost, "password": "p"})
                   for _ in range(LOCKOUT_FAILURES + 1)]
        assert [s for s, _ in answers] == [401] * LOCKOUT_FAILURES + [429]
    audits = await _fetch(world, "SELECT new_value FROM audit_logs WHERE action = 'auth.login_failed' "
                                 "AND resource_id = $1 ORDER BY created_at", str(world.b.users[Role.AGENT]))
    assert [r["new_value"]["locked"] for r in audits] == [False] * (LOCKOUT_FAILURES - 1) + [True]


async def test_logins_per_account_are_limited_per_minute(server: Server, world: World) -> None:
    email = world.b.emails[Role.VIEWER]
    async with aiohttp.ClientSession() as http:
        statuses = [(await call(http, server, "POST", "/api/auth/login", None,
                                {"email": email, "password": PASSWORD}))[0] for _ in range(ACCOUNT_LIMIT + 1)]
    # The module's fixture signed this account in once already, within the minute.
    assert statuses == [200] * (ACCOUNT_LIMIT - 1) + [429, 429]


async def test_reads_are_limited_per_credential_and_route(server: Server, world: World) -> None:
    token = world.b.sessions[Role.OWNER]
    async with aiohttp.ClientSession() as http:
        statuses = [(await call(http, server, "GET", "/api/org", token))[0] for _ in range(READS_PER_MIN + 1)]
        assert statuses == [200] * READS_PER_MIN + [429]
        async with http.get(f"{server.http}/api/org", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 429 and 0 < int(r.headers["Retry-After"]) <= 60
            assert (await r.json())["error"]["code"] == "rate_limited"
        assert (await call(http, server, "GET", "/api/auth/me", token))[0] == 200  # another route
        assert (await call(http, server, "GET", "/api/org", world.b.keys[Role.ADMIN]))[0] == 200  # another credential


async def test_lists_page_by_opaque_cursor_and_bounded_limit(server: Server, world: World) -> None:
    key = world.b.keys[Role.ADMIN]
    async with aiohttp.ClientSession() as http:
        made = []
        for n in range(5):
            status, reply = await call(http, server, "POST", "/api/media-tokens", key, {"name": f"page {n}"})
            assert status == 201
            made.append(reply["data"]["media_token"]["id"])
        seen: list[str] = []
        cursor = ""
        for _ in range(10):
            status, reply = await call(http, server, "GET", f"/api/media-tokens?limit=2{cursor}", key)
            assert status == 200 and len(reply["data"]["items"]) <= 2
            seen += [t["id"] for t in reply["data"]["items"]]
            if reply["data"]["next_cursor"] is None:
                break
            cursor = f"&cursor={reply['data']['next_cursor']}"
        assert seen[:5] == made[::-1] and len(seen) == len(set(seen)) == 6  # and the fixture's one, last
        for query, field in (("limit=0", "limit"), ("limit=201", "limit"), ("cursor=bm90LWEtY3Vyc29y", "cursor"),
                             ("limit=2&limit=3", "limit"), ("sort=name", "sort")):
            status, reply = await call(http, server, "GET", f"/api/media-tokens?{query}", key)
            assert (status, reply["error"]["code"]) == (400, "validation_failed"), query
            assert reply["error"]["details"][0]["field"] == field, query


async def test_bodies_cannot_assign_fields_they_do_not_declare(server: Server, world: World) -> None:
    b = world.b
    key = b.keys[Role.ADMIN]
    target = b.users[Role.VIEWER]
    attempts = [
        ("POST", "/api/media-tokens", {"name": "x", "org_id": str(world.a.org_id)}, "org_id"),
        ("POST", "/api/api-keys", {"name": "x", "role": "viewer", "id": str(uuid.uuid4())}, "id"),
        ("PATCH", f"/api/users/{target}", {"email": "new@example.com"}, "email"),
        ("PATCH", f"/api/users/{target}", {"role": "viewer", "org_id": str(world.a.org_id)}, "org_id"),
        ("PATCH", "/api/org", {"slug": "mine"}, "slug"),
        ("PATCH", "/api/org", {"settings": {"stt_provider": "deepgram"}}, "settings.stt_provider"),
        ("POST", "/api/users", {"email": "n@example.com", "role": "viewer", "active": False}, "active"),
    ]
    async with aiohttp.ClientSession() as http:
        for method, path, body, field in attempts:
            status, reply = await call(http, server, method, path, key, body)
            assert (status, reply["error"]["code"]) == (400, "validation_failed"), (path, body)
            assert {"field": field, "type": "extra_forbidden"}.items() <= reply["error"]["details"][0].items()
        status, reply = await call(http, server, "PATCH", "/api/org", key,
                                   {"settings": {"translate_to": {"en": "english"}}})
        assert status == 400 and reply["error"]["details"][0]["field"] == "settings.translate_to.en"
        status, reply = await call(http, server, "PATCH", "/api/org", key,
                                   {"settings": {"stt_chain": {"en": ["deepgram", "pocketsphinx"]},
                                                 "sse_redacted": False}})
        assert status == 200 and reply["data"]["settings"]["sse_redacted"] is False
        status, reply = await call(http, server, "PATCH", "/api/org", key, {"settings": {"sse_redacted": None}})
        assert status == 200 and "sse_redacted" not in reply["data"]["settings"]
        assert reply["data"]["settings"]["stt_chain"] == {"en": ["deepgram", "pocketsphinx"]}
    rows = await _fetch(world, "SELECT email FROM users WHERE id = $1", target)
    assert rows[0]["email"] == b.emails[Role.VIEWER]


async def test_login_sets_a_strict_http_only_cookie_that_authenticates(server: Server, world: World) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.http}/api/auth/login",
                             json={"email": world.b.emails[Role.ADMIN], "password": PASSWORD}) as r:
            assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
            cookie = r.headers["Set-Cookie"]
            token = (await r.json())["data"]["token"]
        attrs = {a.strip().split("=")[0].lower(): a.strip() for a in cookie.split(";")}
        assert attrs["sb_session"] == f"sb_session={token}"
        assert attrs["max-age"] == "Max-Age=604800" and attrs["path"] == "Path=/"
        assert attrs["samesite"] == "SameSite=Strict" and "httponly" in attrs
        assert "secure" not in attrs  # bound to loopback and addressed so: plain HTTP must work
        # Bound to loopback behind a TLS proxy, which passes the public name on: Secure.
        async with http.post(f"{server.http}/api/auth/login", headers={"Host": "switchboard.example.com"},
                             json={"email": world.b.emails[Role.ADMIN], "password": PASSWORD}) as r:
            assert r.status == 200
            proxied = {a.strip().split("=")[0].lower() for a in r.headers["Set-Cookie"].split(";")}
        assert "secure" in proxied
        status, me = await call(http, server, "GET", "/api/auth/me", None, headers={"Cookie": f"sb_session={token}"})
        assert status == 200 and me["data"]["kind"] == "session" and me["data"]["role"] == "admin"
        async with http.post(f"{server.http}/api/auth/logout", headers={"Cookie": f"sb_session={token}",
                                                                        "Content-Type": "application/json"}) as r:
            assert r.status == 200 and "sb_session=\"\"" in r.headers["Set-Cookie"]
        status, _ = await call(http, server, "GET", "/api/auth/me", None, headers={"Cookie": f"sb_session={token}"})
        assert status == 401


async def test_logins_per_address_are_limited_per_minute(server: Server, world: World) -> None:
    """Last in the module: it spends this address's login budget for the next minute."""
    async with aiohttp.ClientSession() as http:
        for n in range(ADDRESS_LIMIT + 1):
            status, reply = await call(http, server, "POST", "/api/auth/login", None,
                                       {"email": f"nobody-{n}@example.com", "password": "p"})
            if status == 429:
                break
        assert status == 429 and reply["error"]["code"] == "rate_limited"
        # Now even a right password from this address waits.
        status, _ = await call(http, server, "POST", "/api/auth/login", None,
                               {"email": world.b.emails[Role.OWNER], "password": PASSWORD})
        assert status == 429
        # Requests with a credential are not login attempts: they still pass.
        assert (await call(http, server, "GET", "/api/org", world.b.keys[Role.ADMIN]))[0] == 200
        # Behind a trusted proxy (this server trusts 127.0.0.1) each client has its own budget, and the
        # audit trail names the client, not the proxy.
        client = "203.0.113.8"
        status, reply = await call(http, server, "POST", "/api/auth/login", None,
                                   {"email": world.b.emails[Role.OWNER], "password": PASSWORD},
                                   headers={"X-Forwarded-For": f"10.9.9.9, {client}"})
        assert status == 200, reply
        status, trail = await call(http, server, "GET", "/api/audit?action=auth.login&limit=1",
                                   world.b.keys[Role.ADMIN])
        assert trail["data"]["items"][0]["ip"] == client

