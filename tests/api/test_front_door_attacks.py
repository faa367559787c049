"""Attacks on sign-in and on the REST layer's warm-tier records, on the real server with storage on.

Sign-ins come from 127.0.0.1, which ``per_address_exempt`` does not count here (as behind the shipped
reverse proxy), so only the per-account limit and the hashing queue stand between a flood and the
password hasher.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
import uuid
from collections.abc import Iterator

import aiohttp
import pytest
import redis.asyncio as redis

from api.auth import MAX_LOGINS_WAITING, Role
from tests.api.rest_world import PASSWORD, World, build_world, call, login, sign_in_all, world_server
from tests.servers import Server


@pytest.fixture(scope="module")
def world(pg_admin_url: str, redis_url: str) -> World:
    return asyncio.run(build_world(pg_admin_url, redis_url, 7))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Server]:
    with world_server(tmp_path_factory.mktemp("front-door-attacks"), world) as srv:
        asyncio.run(sign_in_all(srv, world))
        yield srv


async def _new_user(http: aiohttp.ClientSession, server: Server, world: World, role: str) -> tuple[str, str]:
    """A fresh user of organisation a (id, e-mail) with ``PASSWORD``, made by its owner."""
    email = f"t-{uuid.uuid4().hex[:10]}@example.com"
    status, reply = await call(http, server, "POST", "/api/users", world.a.sessions[Role.OWNER],
                               {"email": email, "role": role, "password": PASSWORD})
    assert status == 201, reply
    return reply["data"]["user"]["id"], email


async def _wrong_login(http: aiohttp.ClientSession, server: Server) -> int:
    body = {"email": f"nobody-{uuid.uuid4().hex}@example.com", "password": "not the password at all"}
    async with http.post(f"{server.http}/api/auth/login", json=body) as r:
        await r.read()
        return r.status


async def _redis_values(world: World) -> bytes:
    client = redis.Redis.from_url(world.redis_url)
    try:
        out = bytearray()
        async for key in client.scan_iter("sb:idem:*"):
            out += (await client.get(key)) or b""
        return bytes(out)
    finally:
        await client.aclose()


async def test_a_password_change_with_an_idempotency_key_keeps_neither_token_nor_password_guessable(
        server: Server, world: World) -> None:
    async with aiohttp.ClientSession() as http:
        _, email = await _new_user(http, server, world, "viewer")
        session = await login(http, server, email)
        raw = b'{"current_password":"' + PASSWORD.encode() + b'","new_password":"another long passphrase"}'
        key = uuid.uuid4().hex

        async def change(credential: str) -> tuple[int, dict[str, str], dict[str, object]]:
            async with http.post(f"{server.http}/api/auth/password", data=raw, headers={
                    "Authorization": f"Bearer {credential}", "Content-Type": "application/json",
                    "Idempotency-Key": key}) as r:
                return r.status, dict(r.headers), await r.json()

        status, _, reply = await change(session)
        assert status == 200, reply
        token = reply["data"]["token"]  # type: ignore[index]
        stored = await _redis_values(world)
        assert stored and token.encode() not in stored
        # Nor a plain hash of the body that holds both passwords (the old fingerprint).
        assert hashlib.sha256(b"POST\n/api/auth/password\n" + raw).hexdigest().encode() not in stored
        status, headers, replay = await change(token)
        assert status == 200 and headers["Idempotent-Replayed"] == "true"
        assert replay["data"] == {**reply["data"], "token": None, "secret_withheld": True}  # type: ignore[dict-item]
        assert (await call(http, server, "GET", "/api/auth/me", token))[0] == 200


@pytest.mark.parametrize("change", [{"active": False}, {"role": "viewer"}, {"password": "set by the owner now"}])
async def test_a_sign_in_still_verifying_when_the_account_changes_gets_no_session(
        server: Server, world: World, change: dict[str, object]) -> None:
    async with aiohttp.ClientSession() as http:
        user_id, email = await _new_user(http, server, world, "agent")
        # Sign-ins ahead of it in the hashing queue: the victim's password is verified a while after
        # its row was read, as under any load.
        ahead = [asyncio.create_task(_wrong_login(http, server)) for _ in range(8)]
        await asyncio.sleep(0.1)
        patch = call(http, server, "PATCH", f"/api/users/{user_id}", world.a.sessions[Role.OWNER], change)
        changing = asyncio.create_task(patch) if "password" in change else None  # it queues to hash too
        await asyncio.sleep(0.05)
        # Two more between the change and the sign-in: with two hashing slots, the sign-in's verification
        # starts only when the change's own hash is done, so it cannot finish before the change does.
        ahead += [asyncio.create_task(_wrong_login(http, server)) for _ in range(2)]
        await asyncio.sleep(0.05)
        signing_in = asyncio.create_task(call(http, server, "POST", "/api/auth/login", None,
                                              {"email": email, "password": PASSWORD}))
        await asyncio.sleep(0.15)
        assert not signing_in.done()
        status, _ = await (changing or patch)
        assert status == 200
        assert not signing_in.done(), "the queue did not hold the sign-in long enough to test anything"
        status, reply = await signing_in
        await asyncio.gather(*ahead)
        if status == 200:  # the defect: a session that outlived the change that revoked every other
            me = await call(http, server, "GET", "/api/auth/me", reply["data"]["token"])
            pytest.fail(f"sign-in got a session after {change}: /api/auth/me answers {me}")
        assert (status, reply["error"]["code"]) == (401, "unauthenticated")


async def test_a_flood_of_sign_ins_bounds_the_wait_of_every_other(server: Server, world: World) -> None:
    flood_size = 6 * MAX_LOGINS_WAITING
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        flood = [asyncio.create_task(_wrong_login(http, server)) for _ in range(flood_size)]
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        status, _ = await call(http, server, "POST", "/api/auth/login", None,
                               {"email": world.a.emails[Role.VIEWER], "password": PASSWORD})
        waited = time.monotonic() - t0
        statuses = await asyncio.gather(*flood)
        # Without a bound the sign-in waits behind all of them (~0.06 s each on two hashing threads).
        assert status in (200, 503) and waited < 8.0, (status, waited)
        assert statuses.count(503) >= flood_size - 2 * MAX_LOGINS_WAITING, statuses
        assert set(statuses) <= {401, 503}
        assert await login(http, server, world.a.emails[Role.VIEWER])


def _raw(server: Server, head: bytes, body: bytes = b"") -> int:
    """Send one request exactly as given (bytes no client library would send); its status."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head + b"Host: 127.0.0.1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        reply = b""
        while b"\r\n" not in reply:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    return int(reply.split(b" ", 2)[1])


async def test_credentials_and_request_ids_that_are_not_utf8_are_refused_never_a_500(server: Server,
                                                                                     world: World) -> None:
    admin = world.a.sessions[Role.ADMIN].encode()
    json_type = b"Content-Type: application/json\r\n"
    key_body = b'{"name":"odd request id","role":"viewer"}'
    login_body = b'{"email":"' + world.a.emails[Role.AGENT].encode() + b'","password":"not the password at all"}'
    cases = [  # (request head, body, status)
        (b"GET /api/auth/me HTTP/1.1\r\nCookie: sb_session=\xff\xfe\r\n", b"", 401),
        (b"GET /api/auth/me HTTP/1.1\r\nAuthorization: Bearer \xff\xfe\r\n", b"", 401),
        (b"GET /api/auth/me HTTP/1.1\r\nAuthorization: Bearer sbk_\xff\xfe\r\n", b"", 401),
        (b"GET /api/stats HTTP/1.1\r\nAuthorization: Bearer \xff\r\n", b"", 401),
        (b"GET /api/calls/" + world.a.call_id.encode() + b"/events HTTP/1.1\r\nAuthorization: Bearer \xff\r\n", b"",
         401),
        (b"POST /api/webrtc/offer HTTP/1.1\r\n" + json_type + b"Authorization: Bearer sbk_\xff\r\n", b"{}", 401),
        (b"POST /api/api-keys HTTP/1.1\r\n" + json_type + b"Authorization: Bearer " + admin
         + b"\r\nX-Request-Id: \xff\xfe\r\n", key_body, 201),
        (b"POST /api/auth/login HTTP/1.1\r\n" + json_type + b"X-Request-Id: \xff\r\n", login_body, 401),
    ]
    for head, body, status in cases:
        assert await asyncio.to_thread(_raw, server, head, body) == status, head
    assert not [line for line in server.logs() if line.get("level") == "error"]


async def test_sse_tokens_minted_per_credential_are_rate_limited(server: Server, world: World) -> None:
    # Each token is a warm-tier key for five minutes: unlimited minting would fill Valkey.
    viewer, other = world.b.keys[Role.VIEWER], world.b.keys[Role.ADMIN]
    url = f"/api/calls/{world.b.call_id}/sse-token"
    async with aiohttp.ClientSession() as http:
        statuses = [(await call(http, server, "POST", url, viewer, {"ttl_s": 1}))[0] for _ in range(121)]
        assert statuses.count(200) == 120 and statuses[-1] == 429  # rate_write_per_min, the default
        status, reply = await call(http, server, "POST", url, viewer, {})
        assert (status, reply["error"]["code"]) == (429, "rate_limited")
        assert (await call(http, server, "POST", url, other, {}))[0] == 200  # another credential's own budget
