"""Report exports on the real server with storage on: 1,000,000 accounts as CSV in bounded memory
(the server's RSS growth measured), a period's calls as XLSX with formula-like text neutralised, the
download through its signed URL, progress and roles."""

from __future__ import annotations

import asyncio
import csv
import io
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from api.auth import Role
from api.exports import safe
from storage.db import Database
from tests.api.rest_world import World, build_world, call, sign_in_all, world_server
from tests.servers import Server

ROWS = 1_000_000
MAX_GROWTH_MIB = 64  # stated bound: the cursor's batches and the writer's buffers, not the rows


@pytest.fixture(scope="module")
def world(pg_admin_url: str, redis_url: str) -> World:
    return asyncio.run(build_world(pg_admin_url, redis_url, 1))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Server]:
    with world_server(tmp_path_factory.mktemp("exports"), world) as srv:
        asyncio.run(sign_in_all(srv, world))
        yield srv


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("VmRSS")


async def _finished(http: aiohttp.ClientSession, server: Server, token: str, job: str) -> dict:  # type: ignore[type-arg]
    async with asyncio.timeout(300):
        while True:
            status, reply = await call(http, server, "GET", f"/api/exports/{job}", token)
            assert status == 200
            if reply["data"]["status"] in ("done", "failed"):
                return reply["data"]  # type: ignore[no-any-return]
            await asyncio.sleep(0.5)


def test_cells_a_spreadsheet_would_run_are_neutralised() -> None:
    assert [safe(v) for v in ("=cmd|' /C calc'!A0", "+1", "-2", "@SUM(A1)", "\tx", "plain", 5, None)] == [
        "'=cmd|' /C calc'!A0", "'+1", "'-2", "'@SUM(A1)", "'\tx", "plain", 5, None]


async def test_a_million_accounts_export_as_csv_in_bounded_memory(server: Server, world: World, db: Database) -> None:
    a = world.a
    conn = await asyncpg.connect(world.db.admin)  # the migrator: a bulk insert past the app's statement timeout
    try:
        await conn.execute(
            "INSERT INTO collection_accounts (org_id, external_ref, debtor_name, balance_cents, currency) "
            "SELECT $1, 'EXP-' || g, CASE WHEN g % 1000 = 0 THEN '=HYPERLINK(\"x\")' ELSE 'Debtor ' || g END, g, "
            "'USD' FROM generate_series(1, $2) g", a.org_id, ROWS, timeout=300)
    finally:
        await conn.close()
    admin = a.sessions[Role.ADMIN]
    pid = server.proc.pid
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        assert (await call(http, server, "POST", "/api/exports", a.sessions[Role.AGENT],
                           {"kind": "accounts"}))[0] == 403
        before = _rss_kib(pid)
        samples = [before]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.01):
                samples.append(_rss_kib(pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        began = time.monotonic()
        try:
            status, reply = await call(http, server, "POST", "/api/exports", admin, {"kind": "accounts",
                                                                                      "format": "csv"})
            assert status == 202 and reply["data"]["status"] == "queued"
            job = await _finished(http, server, admin, reply["data"]["id"])
        finally:
            stop.set()
            sampler.join()
        took = time.monotonic() - began
        assert job["status"] == "done", job
        growth = (max(samples) - before) / 1024
        print(f"\nexport: {job['rows']:,} rows, {job['bytes'] / 2**20:.1f} MiB CSV in {took:.1f} s; server RSS "
              f"{before / 1024:.0f} MiB before, growth {growth:.1f} MiB ({len(samples)} samples)")
        assert job["status"] == "done" and job["rows"] == ROWS + 1  # and the world's own account
        assert growth < MAX_GROWTH_MIB
        status, link = await call(http, server, "GET", f"/api/exports/{job['id']}/url", admin)
        async with http.get(server.http + link["data"]["url"]) as r:
            assert r.status == 200
            body = await r.read()
    rows = list(csv.reader(io.StringIO(body.decode())))
    assert rows[0][:3] == ["external_ref", "debtor_name", "balance"] and len(rows) == ROWS + 2
    assert sum(1 for r in rows if r[1].startswith("'=HYPERLINK")) == ROWS // 1000
    assert not any(r[1].startswith("=") for r in rows)


async def test_a_periods_calls_export_as_xlsx(server: Server, world: World, db: Database) -> None:
    b = world.b
    async with db.tenant(b.org_id) as conn:
        for i in range(30):
            await conn.execute("INSERT INTO calls (org_id, call_control_id, status, end_reason, created_at) VALUES "
                               "($1, $2, 'completed', $3, now() - make_interval(days => $4))",
                               b.org_id, f"v3:xlsx-{i}", "=1+1" if i == 0 else "normal_clearing", i)
    admin = b.sessions[Role.ADMIN]
    async with aiohttp.ClientSession() as http:
        since = "2000-01-01T00:00:00Z"
        status, reply = await call(http, server, "POST", "/api/exports", admin,
                                   {"kind": "calls", "format": "xlsx", "since": since})
        assert status == 202
        job = await _finished(http, server, admin, reply["data"]["id"])
        assert job["status"] == "done" and job["rows"] == 31  # the world's call too
        status, link = await call(http, server, "GET", f"/api/exports/{job['id']}/url", admin)
        async with http.get(server.http + link["data"]["url"]) as r:
            body = await r.read()
        theirs = await call(http, server, "GET", f"/api/exports/{job['id']}", world.a.sessions[Role.ADMIN])
        assert theirs[0] == 404
    with zipfile.ZipFile(io.BytesIO(body)) as z:  # an .xlsx is a zip of XML parts
        sheet = z.read("xl/worksheets/sheet1.xml").decode()
        strings = z.read("xl/sharedStrings.xml").decode() if "xl/sharedStrings.xml" in z.namelist() else sheet
    assert "v3:xlsx-0" in strings + sheet and "'=1+1" in strings + sheet and "<f>" not in sheet
