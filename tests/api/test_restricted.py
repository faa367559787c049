"""Encryption at rest of an account's restricted fields, on the real server with storage on: the
database alone (read as the migrator, every column as text) never shows them; the API answers them
masked, and whole only to owners and admins, audited; a ciphertext copied to another row does not
open; rotating to a new key re-seals every value, and the old key can then be retired."""

from __future__ import annotations

import asyncio
import base64
import secrets
import uuid
from collections.abc import Iterator

import aiohttp
import asyncpg
import orjson
import pytest

from api.auth import Role
from api.restricted_api import rotate
from storage.crypto import DecryptError, Keyring, aad
from storage.db import Database
from tests.api.rest_world import World, build_world, call, sign_in_all, world_server
from tests.servers import Server

SSN, DOB, CARD = "123-45-6789", "1985-03-14", "tok_visa_4242abcd"
K1 = base64.b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture(scope="module")
def world(pg_admin_url: str, redis_url: str) -> World:
    return asyncio.run(build_world(pg_admin_url, redis_url, 2))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Server]:
    with world_server(tmp_path_factory.mktemp("restricted"), world,
                      SWITCHBOARD_ENCRYPTION_KEYS=orjson.dumps({"k1": K1}).decode(),
                      SWITCHBOARD_ENCRYPTION_KEY_ID="k1") as srv:
        asyncio.run(sign_in_all(srv, world))
        yield srv


async def test_restricted_fields_are_sealed_masked_revealed_to_admins_only_and_rotate(
        server: Server, world: World, db: Database) -> None:
    a, b = world.a, world.b
    account = str(a.account_id)
    path = f"/api/accounts/{account}/restricted"
    async with aiohttp.ClientSession() as http:
        status, reply = await call(http, server, "PUT", path, a.sessions[Role.AGENT],
                                   {"ssn": SSN, "date_of_birth": DOB, "card_reference": CARD})
        assert status == 200 and reply["data"] == {"ssn": "***-**-6789", "date_of_birth": "(set)",
                                                   "card_reference": "…abcd", "masked": True, "key_id": "k1"}
        assert (await call(http, server, "PUT", path, a.sessions[Role.VIEWER], {"ssn": SSN}))[0] == 403
        status, reply = await call(http, server, "PUT", path, a.sessions[Role.ADMIN], {"ssn": "4111 1111"})
        assert (status, reply["error"]["code"]) == (400, "validation_failed")
        status, masked = await call(http, server, "GET", path, a.sessions[Role.VIEWER])
        assert status == 200 and masked["data"]["ssn"] == "***-**-6789" and masked["data"]["masked"] is True
        assert (await call(http, server, "GET", f"{path}?reveal=true", a.sessions[Role.AGENT]))[0] == 403
        status, whole = await call(http, server, "GET", f"{path}?reveal=true", a.sessions[Role.ADMIN])
        assert status == 200 and (whole["data"]["ssn"], whole["data"]["date_of_birth"],
                                  whole["data"]["card_reference"]) == (SSN, DOB, CARD)
        theirs = await call(http, server, "GET", path, b.sessions[Role.ADMIN])
        unknown = await call(http, server, "GET", f"/api/accounts/{uuid.uuid4()}/restricted", b.sessions[Role.ADMIN])
        assert theirs == unknown and theirs[0] == 404

    # The database alone: every column of every table, as text, read as the migrator.
    conn = await asyncpg.connect(world.db.admin)
    try:
        for (table,) in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"):
            for secret in (SSN, SSN.replace("-", ""), DOB, CARD):
                n = await conn.fetchval(f'SELECT count(*) FROM "{table}" t WHERE t::text LIKE $1', f"%{secret}%")
                assert n == 0, (table, secret)
        row = await conn.fetchrow("SELECT id, org_id, restricted, restricted_key_id FROM collection_accounts "
                                  "WHERE id = $1", a.account_id)
        actions = [r["action"] for r in await conn.fetch(
            "SELECT action FROM audit_logs WHERE resource_id = $1 ORDER BY created_at", account)]
    finally:
        await conn.close()
    assert actions[-2:] == ["account.restricted_updated", "account.restricted_revealed"]
    ring = Keyring({"k1": base64.b64decode(K1)}, "k1")
    with pytest.raises(DecryptError):  # bound to its row: copied to another account it does not open
        ring.decrypt("k1", bytes(row["restricted"]), aad("collection_accounts", row["org_id"], b.account_id))

    # Rotation: a new active key re-seals the value; the old one can go.
    k2 = secrets.token_bytes(32)
    both = Keyring({"k1": base64.b64decode(K1), "k2": k2}, "k2")
    assert await rotate(db, both, batch=1) == {"rotated": 1, "failed": 0}
    assert await rotate(db, both) == {"rotated": 0, "failed": 0}
    async with db.tenant(a.org_id) as c:
        rotated = await c.fetchrow("SELECT restricted, restricted_key_id FROM collection_accounts WHERE id = $1",
                                   a.account_id)
    assert rotated["restricted_key_id"] == "k2"
    only_new = Keyring({"k2": k2}, "k2")
    plain = only_new.decrypt("k2", bytes(rotated["restricted"]), aad("collection_accounts", a.org_id, a.account_id))
    assert orjson.loads(plain) == {"ssn": SSN, "date_of_birth": DOB, "card_reference": CARD}
