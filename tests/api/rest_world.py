"""Two organisations with a user of every role, API keys, media tokens and a stored call, written straight
into a freshly migrated database (storage.accounts on the admin URL), and the server that serves them.

Each module that uses it gets its own database and its own Valkey database number, so rate-limit and
idempotency keys of one module never meet another's (they all come from 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import redis.asyncio as redis
from argon2 import PasswordHasher

from api.auth import Role
from storage.accounts import create_api_key, create_media_token, create_organization, create_user, set_tenant
from tests.servers import Server, running_server
from tests.storage.conftest import APP_PASSWORD, DbUrls, migrated_database

PASSWORD = "correct horse battery staple"
ROLES = (Role.OWNER, Role.ADMIN, Role.AGENT, Role.VIEWER)
# argon2's cheapest parameters: the hashes are verified by the server's own (default) verifier, which
# reads the parameters from the hash; hashing 10 users at 64 MiB would only slow the fixture.
_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@dataclass
class Tenant:
    org_id: uuid.UUID
    name: str
    users: dict[Role, uuid.UUID] = field(default_factory=dict)
    emails: dict[Role, str] = field(default_factory=dict)
    keys: dict[Role, str] = field(default_factory=dict)  # API key secret by its role
    key_ids: dict[Role, uuid.UUID] = field(default_factory=dict)
    token_id: uuid.UUID | None = None
    call_id: str = ""
    recording_id: uuid.UUID | None = None
    account_id: uuid.UUID | None = None  # a collection account, a campaign holding it, an import job
    campaign_id: uuid.UUID | None = None
    import_id: uuid.UUID | None = None
    sessions: dict[Role, str] = field(default_factory=dict)  # filled once the server runs


@dataclass
class World:
    db: DbUrls
    a: Tenant
    b: Tenant
    redis_url: str


def redis_db(url: str, number: int) -> str:
    """``url`` pointing at Valkey database ``number``."""
    return re.sub(r"(/\d+)?$", f"/{number}", url.rstrip("/"), count=1)


async def _tenant(conn: asyncpg.Connection, label: str, *, with_call: bool) -> Tenant:
    t = Tenant(uuid.uuid4(), f"Org {label}")
    async with conn.transaction():
        await set_tenant(conn, t.org_id)
        await create_organization(conn, t.org_id, t.name)
        for role in ROLES:
            email = f"{role.value}-{label}-{uuid.uuid4().hex[:8]}@example.com"
            t.users[role] = await create_user(conn, t.org_id, email=email, password_hash=_HASHER.hash(PASSWORD),
                                              role=role, display_name=f"{role.value} {label}")
            t.emails[role] = email
        for role in (Role.ADMIN, Role.VIEWER):
            issued = await create_api_key(conn, t.org_id, name=f"{role.value} key", role=role)
            t.keys[role], t.key_ids[role] = issued.secret, issued.id
        t.token_id = (await create_media_token(conn, t.org_id, name="telnyx")).id
        t.account_id = await conn.fetchval(
            "INSERT INTO collection_accounts (org_id, external_ref, debtor_name, phones, balance_cents, currency) "
            "VALUES ($1, $2, 'Debtor ' || $2, '{+15550000001}', 12345, 'USD') RETURNING id", t.org_id, f"REF-{label}")
        t.campaign_id = await conn.fetchval("INSERT INTO campaigns (org_id, name) VALUES ($1, $2) RETURNING id",
                                            t.org_id, f"Campaign {label}")
        await conn.execute("INSERT INTO campaign_contacts (org_id, campaign_id, account_id) VALUES ($1, $2, $3)",
                           t.org_id, t.campaign_id, t.account_id)
        t.import_id = await conn.fetchval(
            "INSERT INTO import_jobs (org_id, status, finished_at) VALUES ($1, 'done', now()) RETURNING id", t.org_id)
        if with_call:
            t.call_id = f"v3:call-{label}-{uuid.uuid4().hex[:8]}"
            call_uuid = await conn.fetchval(
                "INSERT INTO calls (org_id, call_control_id, status, started_at, agent_id) "
                "VALUES ($1, $2, 'completed', now(), $3) RETURNING id", t.org_id, t.call_id, t.users[Role.AGENT])
            await conn.execute(
                "INSERT INTO transcriptions (org_id, call_id, track, seq, text) VALUES ($1, $2, 'inbound', 0, $3)",
                t.org_id, call_uuid, "my card is [REDACTED]")
            t.recording_id = await conn.fetchval(
                "INSERT INTO recordings (org_id, call_id, storage_key, bytes, duration_ms, channels, sample_rate, "
                "sha256) VALUES ($1, $2, $3, 44, 1000, 2, 8000, 'x') RETURNING id",
                t.org_id, call_uuid, f"recordings/{t.org_id}/{call_uuid}.wav")
    return t


async def build_world(pg_admin_url: str, redis_url: str, redis_number: int) -> World:
    urls = await migrated_database(pg_admin_url)
    conn = await asyncpg.connect(urls.admin)
    try:
        a = await _tenant(conn, "a", with_call=True)
        b = await _tenant(conn, "b", with_call=True)
    finally:
        await conn.close()
    url = redis_db(redis_url, redis_number)
    client = redis.Redis.from_url(url)
    try:
        await client.flushdb()  # this module's own database: counters of an earlier run are gone
    finally:
        await client.aclose()
    return World(urls, a, b, url)


@contextlib.contextmanager
def world_server(tmp: Path, world: World, **env: str) -> Iterator[Server]:
    settings = {"SWITCHBOARD_STT_PROVIDER": "null", "SWITCHBOARD_RECORDING_ENABLED": "false", **env}
    with running_server(tmp, SWITCHBOARD_PERSIST="true", DATABASE_URL=world.db.admin,
                        SWITCHBOARD_DATABASE_APP_PASSWORD=APP_PASSWORD, REDIS_URL=world.redis_url,
                        **settings) as srv:
        yield srv


async def login(http: aiohttp.ClientSession, server: Server, email: str, password: str = PASSWORD) -> str:
    async with http.post(f"{server.http}/api/auth/login", json={"email": email, "password": password}) as r:
        body = await r.json()
        assert r.status == 200, body
        return str(body["data"]["token"])


async def sign_in_all(server: Server, world: World) -> None:
    async with aiohttp.ClientSession() as http:
        for t in (world.a, world.b):
            tokens = await asyncio.gather(*(login(http, server, t.emails[r]) for r in ROLES))
            t.sessions = dict(zip(ROLES, tokens, strict=True))


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def call(http: aiohttp.ClientSession, server: Server, method: str, path: str, token: str | None = None,
               body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    kwargs: dict[str, Any] = {"headers": {**bearer(token), **(headers or {})}}
    if isinstance(body, bytes):  # the one streamed route takes CSV (api.account_import)
        kwargs["data"] = body
        kwargs["headers"].setdefault("Content-Type", "text/csv")
    elif body is not None:
        kwargs["json"] = body
    elif method in ("POST", "PATCH"):
        kwargs["headers"]["Content-Type"] = "application/json"  # no body, but the doors want the type
    async with http.request(method, server.http + path, **kwargs) as r:
        text = await r.read()
        try:
            return r.status, orjson.loads(text) if text else None
        except ValueError:
            return r.status, text
