"""The sweeper on the real server and real PostgreSQL (short times configured): placed calls whose
webhooks never come are closed failed, live viewers told; an import left running by a killed server is
failed, by another node's sweep or at its own restart; a live import, however slow, is not."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from api.auth import Role
from storage.db import Database
from storage.sweeps import IMPORT_INTERRUPTED
from tests.api.rest_world import World, bearer, build_world, call, sign_in_all, world_server
from tests.fakes.telnyx import FakeTelnyx
from tests.servers import Server, free_port, get_json
from tests.sse_client import read_sse

FAKE_KEY = Ed25519PrivateKey.generate()
CALLER = "+15550001000"
SWEEP = {"SWITCHBOARD_SWEEP_INTERVAL_S": "0.2", "SWITCHBOARD_SWEEP_INITIATING_S": "1.5",
         "SWITCHBOARD_SWEEP_RINGING_S": "4", "SWITCHBOARD_SWEEP_ENDING_S": "1.5",
         "SWITCHBOARD_SWEEP_IMPORT_STALE_S": "1"}
HEADER = b"external_ref,debtor_name,balance,currency\n"


@pytest.fixture(scope="module")
def world(pg_admin_url: str, redis_url: str) -> World:
    return asyncio.run(build_world(pg_admin_url, redis_url, 11))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Server]:
    from api.telnyx_signature import public_b64

    port = free_port()
    with world_server(tmp_path_factory.mktemp("sweep"), world, TELNYX_API_KEY="KEY_test_fake",
                      TELNYX_PUBLIC_KEY=public_b64(FAKE_KEY), TELNYX_CONNECTION_ID="conn-1",
                      SWITCHBOARD_TELNYX_API_URL=f"http://127.0.0.1:{port}",
                      SWITCHBOARD_CALL_TOKEN_KEY="test-call-token-key", **SWEEP) as srv:
        asyncio.run(sign_in_all(srv, world))
        srv.extra["port"] = port
        yield srv


async def _until(predicate: Callable[[], object], within_s: float = 10.0) -> None:
    async with asyncio.timeout(within_s):
        while not await predicate():  # type: ignore[misc]  # noqa: ASYNC110 - polls the table the sweeper writes
            await asyncio.sleep(0.05)


async def _call(db: Database, org: uuid.UUID, cid: str) -> tuple[str, str | None]:
    async with db.tenant(org) as conn:
        row = await conn.fetchrow("SELECT status, end_reason FROM calls WHERE id = $1", uuid.UUID(cid))
    return row["status"], row["end_reason"]


async def test_placed_calls_whose_webhooks_never_come_are_closed_failed_and_viewers_told(
        server: Server, world: World, db: Database) -> None:
    a = world.a
    agent = a.sessions[Role.AGENT]
    fake = FakeTelnyx(server.extra["port"], f"{server.http}/api/webhooks/telnyx")
    fake.key = FAKE_KEY
    async with fake, aiohttp.ClientSession() as http:
        fake.webhooks = False  # Telnyx places the calls; its webhooks never reach us

        async def place() -> tuple[str, str]:
            status, reply = await call(http, server, "POST", "/api/voice/call", agent,
                                       {"to": "+15551234567", "from": CALLER})
            assert status == 201, reply
            return reply["data"]["id"], reply["data"]["call_id"]

        silent, silent_ccid = await place()
        events: list[dict] = []  # type: ignore[type-arg]
        reader = asyncio.create_task(read_sse(http, f"{server.http}/api/calls/{silent_ccid}/events",
                                              token=a.sessions[Role.VIEWER], until="none", max_events=1,
                                              on_event=lambda e: events.append(e.json())))
        ringing, ringing_ccid = await place()
        assert await fake.send(ringing_ccid, "call.initiated", state="parked") == 200
        hung_up, hung_up_ccid = await place()
        answered, answered_ccid = await place()
        for ccid in (hung_up_ccid, answered_ccid):
            assert await fake.send(ccid, "call.initiated", state="parked") == 200
            assert await fake.send(ccid, "call.answered", state="answered") == 200
        status, reply = await call(http, server, "POST", "/api/voice/hangup", agent, {"call_id": hung_up_ccid})
        assert status == 202 and reply["data"]["status"] == "ending"  # and Telnyx's call.hangup never comes

        await _until(lambda: _is(db, a.org_id, silent, ("failed", "no_webhook")))
        assert await _call(db, a.org_id, ringing) == ("ringing", None)  # Telnyx may still be ringing it
        await _until(lambda: _is(db, a.org_id, hung_up, ("failed", "no_webhook")))
        await _until(lambda: _is(db, a.org_id, ringing, ("failed", "no_webhook")))
        assert await _call(db, a.org_id, answered) == ("active", None)  # an answered call is not stalled
        async with asyncio.timeout(10):
            await reader
        assert events == [{"call_id": silent_ccid, "state": "failed", "cause": "no_webhook"}]
        # A webhook that comes after all changes nothing.
        assert await fake.send(silent_ccid, "call.initiated", state="parked") == 200
        assert await _call(db, a.org_id, silent) == ("failed", "no_webhook")

    async with db.tenant(a.org_id) as conn:
        trail = await conn.fetch("SELECT resource_id, actor_type, old_value, new_value FROM audit_logs "
                                 "WHERE action = 'call.failed' AND actor_type = 'system'")
    assert sorted((r["resource_id"], r["old_value"]["status"]) for r in trail) == sorted(
        [(silent, "initiating"), (ringing, "ringing"), (hung_up, "ending")])
    assert all(r["new_value"] == {"status": "failed", "reason": "no_webhook"} for r in trail)
    sweeper = (await asyncio.to_thread(get_json, f"{server.http}/api/stats"))["sweeper"]
    assert sweeper["calls_closed"] == 3 and sweeper["errors"] == 0 and sweeper["sweeps"] > 5


async def _is(db: Database, org: uuid.UUID, cid: str, want: tuple[str, str | None]) -> bool:
    return await _call(db, org, cid) == want


async def _rows(first: int, n: int) -> bytes:
    return b"".join(b"SW-%d,Debtor %d,10.00,USD\n" % (i, i) for i in range(first, first + n))


async def _trickle(parts: list[tuple[bytes, float]]) -> AsyncIterator[bytes]:
    for data, pause in parts:
        yield data
        await asyncio.sleep(pause)


async def _job(http: aiohttp.ClientSession, server: Server, token: str) -> dict:  # type: ignore[type-arg]
    status, reply = await call(http, server, "GET", "/api/imports?limit=1", token)
    assert status == 200, reply
    return reply["data"]["items"][0]  # type: ignore[no-any-return]


async def test_a_slow_live_import_is_never_swept(server: Server, world: World) -> None:
    admin = world.a.keys[Role.ADMIN]
    async with aiohttp.ClientSession() as http:
        body = _trickle([(HEADER + await _rows(0, 10), 3.0), (await _rows(10, 10), 0)])  # 3 s > the 1 s stale time
        upload = asyncio.create_task(http.post(server.http + "/api/accounts/import", data=body,
                                               headers={**bearer(admin), "Content-Type": "text/csv"}))
        await asyncio.sleep(2.0)
        assert (await _job(http, server, admin))["status"] == "running"
        async with await upload as r:
            reply = await r.json()
        assert r.status == 200, reply
        assert (reply["data"]["status"], reply["data"]["rows_ok"]) == ("done", 20)


async def test_a_live_import_swept_anyway_stops_at_its_next_batch_which_is_rolled_back(
        server: Server, world: World, db: Database) -> None:
    admin = world.b.keys[Role.ADMIN]
    org = world.b.org_id
    async with aiohttp.ClientSession() as http:
        body = _trickle([(HEADER + await _rows(2000, 10), 1.5), (await _rows(2010, 600), 0)])
        upload = asyncio.create_task(http.post(server.http + "/api/accounts/import", data=body,
                                               headers={**bearer(admin), "Content-Type": "text/csv"}))
        await asyncio.sleep(0.7)
        async with db.tenant(org) as conn:  # as a sweep on a node that could not see its heartbeat would
            assert await conn.execute("UPDATE import_jobs SET status = 'failed', failure = 'swept' "
                                      "WHERE status = 'running'") == "UPDATE 1"
        async with await upload as r:
            reply = await r.json()
    assert r.status == 409 and reply["error"]["code"] == "conflict", reply
    job = reply["error"]["details"]["import"]
    assert (job["status"], job["failure"], job["rows_ok"]) == ("failed", "swept", 0)
    async with db.tenant(org) as conn:
        assert await conn.fetchval("SELECT count(*) FROM collection_accounts WHERE external_ref LIKE 'SW-2%'") == 0


async def _import_then_kill(tmp: Path, world: World, watcher: Server | None, admin: str, **env: str) -> str:
    """Start an import on a server of its own, let one batch commit, SIGKILL that server mid-upload."""
    with world_server(tmp, world, **env) as doomed:
        watcher = watcher or doomed
        async with aiohttp.ClientSession() as http:
            body = _trickle([(HEADER + await _rows(100, 600), 30.0)])  # one batch of 500 commits, then it waits
            upload = asyncio.create_task(http.post(doomed.http + "/api/accounts/import", data=body,
                                                   headers={**bearer(admin), "Content-Type": "text/csv"}))

            async def one_batch_in() -> bool:
                job = await _job(http, watcher, admin)
                return job["status"] == "running" and job["rows_ok"] >= 500

            await _until(one_batch_in)
            job_id = str((await _job(http, watcher, admin))["id"])
            os.kill(doomed.proc.pid, signal.SIGKILL)
            doomed.proc.wait()
            with pytest.raises(aiohttp.ClientError):
                async with await upload:
                    pass
    return job_id


async def test_an_import_left_running_by_a_killed_server_is_failed_by_another_nodes_sweep(
        server: Server, world: World, tmp_path: Path) -> None:
    admin = world.a.keys[Role.ADMIN]
    # The doomed server does not sweep imports itself for an hour: the watcher's sweep must do it.
    job_id = await _import_then_kill(tmp_path, world, server, admin, SWITCHBOARD_SWEEP_IMPORT_STALE_S="3600")
    async with aiohttp.ClientSession() as http:
        async def failed() -> bool:
            return (await _job(http, server, admin))["status"] == "failed"

        await _until(failed)
        status, reply = await call(http, server, "GET", f"/api/imports/{job_id}", admin)
    job = reply["data"]
    assert (job["status"], job["failure"], job["rows_ok"], job["rows_inserted"]) == (
        "failed", IMPORT_INTERRUPTED, 500, 500)  # the committed batch stays
    assert job["finished_at"] is not None
    sweeper = (await asyncio.to_thread(get_json, f"{server.http}/api/stats"))["sweeper"]
    assert sweeper["imports_failed"] >= 1


@pytest.fixture(scope="module")
def quiet_world(pg_admin_url: str, redis_url: str) -> World:
    """A database no short-timed sweeper watches."""
    return asyncio.run(build_world(pg_admin_url, redis_url, 12))


async def test_an_import_left_running_by_a_killed_server_is_failed_when_that_server_starts_again(
        quiet_world: World, tmp_path: Path) -> None:
    world = quiet_world
    admin = world.a.keys[Role.ADMIN]
    never = {"SWITCHBOARD_SWEEP_IMPORT_STALE_S": "3600"}  # no heartbeat sweep: only the restart can close it
    job_id = await _import_then_kill(tmp_path, world, None, admin, **never)
    async with aiohttp.ClientSession() as http:
        with world_server(tmp_path, world, **never) as again:  # the same data directory: the same node
            status, reply = await call(http, again, "GET", f"/api/imports/{job_id}", admin)
            stats = await asyncio.to_thread(get_json, f"{again.http}/api/stats")
    assert (reply["data"]["status"], reply["data"]["failure"]) == ("failed", IMPORT_INTERRUPTED)
    assert stats["persistence"]["imports_failed_on_start"] == 1

