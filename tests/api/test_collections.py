"""The collections domain on the real server with storage on: accounts (filters, soft delete, audit
without personal data), campaigns and their contacts, the voice configuration, and the streamed CSV
import (100,000 rows in bounded memory, every bad line reported, idempotent; bad files refused cleanly).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest

from api.auth import Role
from tests.api.rest_world import World, bearer, build_world, call, sign_in_all, world_server
from tests.servers import Server

IMPORT = "/api/accounts/import"
ROWS = 100_000
BAD_EVERY = 100  # 1 %
MAX_GROWTH_MIB = 32


@pytest.fixture(scope="module")
def world(pg_admin_url: str, redis_url: str) -> World:
    return asyncio.run(build_world(pg_admin_url, redis_url, 9))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Server]:
    # The import test uploads several files in a minute: the write limit must not be what it measures.
    with world_server(tmp_path_factory.mktemp("collections"), world, SWITCHBOARD_RATE_WRITE_PER_MIN="1000") as srv:
        asyncio.run(sign_in_all(srv, world))
        yield srv


def _proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


async def test_accounts_filter_soft_delete_and_the_audit_holds_no_personal_data(server: Server,
                                                                               world: World) -> None:
    admin, agent = world.a.sessions[Role.ADMIN], world.a.sessions[Role.AGENT]
    async with aiohttp.ClientSession() as http:
        made = {}
        for ref, cents, dnc, status in (("CRUD-1", 500, False, "open"), ("CRUD-2", 90_000, True, "promised"),
                                        ("CRUD-3", 5_000, False, "paid")):
            st, reply = await call(http, server, "POST", "/api/accounts", agent, {
                "external_ref": ref, "debtor_name": "Jane Secretname", "phones": ["+447700900123"],
                "balance_cents": cents, "currency": "GBP", "status": status, "do_not_call": dnc})
            assert st == 201, reply
            made[ref] = reply["data"]["id"]
        st, reply = await call(http, server, "POST", "/api/accounts", agent, {
            "external_ref": "CRUD-1", "debtor_name": "x", "balance_cents": 1, "currency": "GBP"})
        assert (st, reply["error"]["code"]) == (409, "already_exists")
        st, reply = await call(http, server, "POST", "/api/accounts", agent, {
            "external_ref": "CRUD-9", "debtor_name": "x", "balance_cents": -1, "currency": "gbp",
            "phones": ["12345"]})
        assert st == 400 and {d["field"] for d in reply["error"]["details"]} == {"balance_cents", "currency",
                                                                                 "phones.0"}

        async def refs(query: str, q: str = "CRUD-") -> set[str]:
            st, reply = await call(http, server, "GET", f"/api/accounts?q={q}&{query}", agent)
            assert st == 200, reply
            return {a["external_ref"] for a in reply["data"]["items"]}

        assert await refs("") == {"CRUD-1", "CRUD-2", "CRUD-3"}
        assert await refs("do_not_call=true") == {"CRUD-2"}
        assert await refs("status=paid") == {"CRUD-3"}
        assert await refs("balance_min=1000&balance_max=10000") == {"CRUD-3"}
        assert await refs("", "CRUD-1") == {"CRUD-1"}
        st, page1 = await call(http, server, "GET", "/api/accounts?q=CRUD-&limit=2", agent)
        st, page2 = await call(http, server, "GET", f"/api/accounts?q=CRUD-&limit=2&cursor="
                                                   f"{page1['data']['next_cursor']}", agent)
        assert len(page1["data"]["items"]) == 2 and len(page2["data"]["items"]) == 1

        one = made["CRUD-1"]
        st, reply = await call(http, server, "PATCH", f"/api/accounts/{one}", agent,
                               {"debtor_name": "Jane Othername", "balance_cents": 400})
        assert st == 200 and reply["data"]["balance_cents"] == 400
        st, reply = await call(http, server, "PATCH", f"/api/accounts/{one}", agent, {"status": None})
        assert st == 400
        assert (await call(http, server, "DELETE", f"/api/accounts/{one}", agent))[0] == 403
        st, reply = await call(http, server, "DELETE", f"/api/accounts/{one}", admin)
        assert st == 200 and reply["data"]["deleted_at"] is not None
        assert (await call(http, server, "GET", f"/api/accounts/{one}", agent))[0] == 404
        assert (await call(http, server, "PATCH", f"/api/accounts/{one}", agent, {"balance_cents": 1}))[0] == 404
        assert (await call(http, server, "DELETE", f"/api/accounts/{one}", admin))[0] == 404
        assert await refs("") == {"CRUD-2", "CRUD-3"}
        # Its external_ref is free again.
        st, reply = await call(http, server, "POST", "/api/accounts", agent, {
            "external_ref": "CRUD-1", "debtor_name": "Jane Secretname", "balance_cents": 1, "currency": "GBP"})
        assert st == 201 and reply["data"]["id"] != one

        st, trail = await call(http, server, "GET", f"/api/audit?resource_id={one}&limit=200", admin)
        actions = [e["action"] for e in trail["data"]["items"]]
        assert sorted(actions) == ["account.created", "account.deleted", "account.updated"]
        text = str(trail["data"])
        assert "Secretname" not in text and "Othername" not in text and "+447700900123" not in text
        updated = next(e for e in trail["data"]["items"] if e["action"] == "account.updated")
        assert updated["new_value"] == {"balance_cents": 400, "changed": ["debtor_name", "balance_cents"]}


async def test_campaign_contacts_and_the_voice_configuration(server: Server, world: World) -> None:
    a, b = world.a, world.b
    admin, viewer = a.sessions[Role.ADMIN], a.sessions[Role.VIEWER]
    async with aiohttp.ClientSession() as http:
        st, reply = await call(http, server, "POST", "/api/campaigns", admin, {"name": "Spring"})
        assert st == 201 and reply["data"]["status"] == "draft"
        cid = reply["data"]["id"]
        ids = [str(a.account_id), str(a.account_id), str(b.account_id), str(uuid.uuid4())]
        st, reply = await call(http, server, "POST", f"/api/campaigns/{cid}/contacts", admin, {"account_ids": ids})
        assert st == 200 and reply["data"]["added"] == 1 and reply["data"]["already"] == 0
        assert set(reply["data"]["unknown"]) == {ids[2], ids[3]}  # B's account looks like any unknown id
        st, reply = await call(http, server, "POST", f"/api/campaigns/{cid}/contacts", admin,
                               {"account_ids": ids[:1]})
        assert (reply["data"]["added"], reply["data"]["already"]) == (0, 1)
        st, reply = await call(http, server, "PATCH", f"/api/campaigns/{cid}", admin, {"status": "active"})
        assert st == 200 and (reply["data"]["status"], reply["data"]["contacts"]) == ("active", 1)
        # The campaign's accounts to work: the account list filtered by campaign and name.
        st, mine = await call(http, server, "POST", "/api/accounts", admin,
                              {"external_ref": "CAMP-2", "debtor_name": "Zoë 100%_Jones", "balance_cents": 5,
                               "currency": "EUR"})
        assert st == 201, mine
        assert (await call(http, server, "POST", f"/api/campaigns/{cid}/contacts", admin,
                           {"account_ids": [mine["data"]["id"]]}))[1]["data"]["added"] == 1
        st, reply = await call(http, server, "GET", f"/api/accounts?campaign_id={cid}", viewer)
        assert st == 200 and {i["id"] for i in reply["data"]["items"]} == {ids[0], mine["data"]["id"]}
        for name, hit in (("zoË 100%_j", True), ("100%", True), ("1000", False), ("_", True), ("%x", False)):
            st, reply = await call(http, server, "GET", f"/api/accounts?campaign_id={cid}&name={quote(name)}",
                                   viewer)
            assert st == 200 and ([i["id"] for i in reply["data"]["items"]] == [mine["data"]["id"]]) == hit, name
        st, reply = await call(http, server, "GET", f"/api/accounts?campaign_id={uuid.uuid4()}", viewer)
        assert st == 200 and reply["data"]["items"] == []
        # Taking an account out: once; a viewer may not; B's campaign id is an unknown one.
        path = f"/api/campaigns/{cid}/contacts/{mine['data']['id']}"
        assert (await call(http, server, "DELETE", path, viewer))[0] == 403
        st, reply = await call(http, server, "DELETE", path, admin)
        assert st == 200 and reply["data"] == {"removed": mine["data"]["id"]}
        assert (await call(http, server, "DELETE", path, admin))[0] == 404
        st, reply = await call(http, server, "GET", f"/api/campaigns/{cid}", viewer)
        assert reply["data"]["contacts"] == 1
        st, reply = await call(http, server, "GET", "/api/campaigns?status=active", viewer)
        assert [c["id"] for c in reply["data"]["items"]] == [cid]
        assert (await call(http, server, "DELETE", f"/api/campaigns/{cid}", admin))[0] == 200
        assert (await call(http, server, "GET", f"/api/campaigns/{cid}", viewer))[0] == 404

        st, reply = await call(http, server, "GET", "/api/voice-config", viewer)
        assert st == 200 and reply["data"] == {"caller_id": None, "recording": False, "translate_default": None,
                                               "updated_at": None}
        cfg = {"caller_id": "+14155550100", "recording": True, "translate_default": "es"}
        st, reply = await call(http, server, "PUT", "/api/voice-config", admin, cfg,
                               headers={"Idempotency-Key": "vc-1"})
        assert st == 200 and {k: reply["data"][k] for k in cfg} == cfg
        st, again = await call(http, server, "PUT", "/api/voice-config", admin, cfg,
                               headers={"Idempotency-Key": "vc-1"})
        assert again == reply
        st, other = await call(http, server, "GET", "/api/voice-config", b.sessions[Role.VIEWER])
        assert other["data"]["caller_id"] is None


def _csv(rows: int) -> tuple[bytes, set[int]]:
    """A file of ``rows`` data lines, every BAD_EVERY-th bad in one of several ways; the bad lines' numbers."""
    out = ["external_ref,debtor_name,phones,balance,currency,status,consent,do_not_call"]
    bad: set[int] = set()
    breakers = ("IMP-{i},Name {i},+15550001234,-5,USD,open,yes,no", "IMP-{i},Name {i},12,1.00,USD,open,,",
                "IMP-{i},Name {i},,1.00,US,open,,", "IMP-{i},Name {i},,1.00,USD,lost,,",
                ",Name {i},,1.00,USD,,,", "IMP-{i},\"Name {i},,1.00,USD,,,", "IMP-{i},Name {i},,1.00,USD,,maybe,")
    for i in range(rows):
        if i % BAD_EVERY == BAD_EVERY - 1:
            out.append(breakers[(i // BAD_EVERY) % len(breakers)].format(i=i))
            bad.add(i + 2)  # line 1 is the header
        else:
            out.append(f'IMP-{i},"Debtor {i}, Jr",+1555{i:07d};+4477009{i % 100000:05d},{i % 9000}.{i % 100:02d},'
                       f"USD,{'open' if i % 3 else 'promised'},{'true' if i % 2 else ''},{'1' if i % 7 == 0 else '0'}")
    return ("\r\n".join(out) + "\r\n").encode(), bad


async def _chunks(data: bytes, size: int = 64 << 10) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def _import(http: aiohttp.ClientSession, server: Server, token: str, data: bytes) -> tuple[int, dict]:
    async with http.post(server.http + IMPORT, data=_chunks(data),
                         headers={**bearer(token), "Content-Type": "text/csv"}) as r:
        return r.status, await r.json()


async def test_csv_import_of_100000_rows_is_bounded_reports_every_bad_line_and_is_idempotent(
        server: Server, world: World) -> None:
    admin = world.a.keys[Role.ADMIN]
    data, bad = _csv(ROWS)
    pid = server.proc.pid
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        # A warm-up of 10,000 other rows: what the first import costs once (code paths, prepared statements,
        # the allocator's arenas) is not what a larger file costs; the growth measured after it is.
        warm, _ = _csv(10_000)
        status, reply = await _import(http, server, admin, warm.replace(b"IMP-", b"WARM-"))
        assert status == 200 and reply["data"]["rows_inserted"] == 9_900
        print(f"\nwarm-up: server RSS {_proc_kib(pid, 'VmRSS') / 1024:.0f} MiB after 10,000 rows")
        rss_before = _proc_kib(pid, "VmRSS")
        # VmHWM is the process's peak since it began (a sign-in's argon2id takes 64 MiB): reset it to the
        # current RSS (Linux clear_refs 5), and sample VmRSS meanwhile in case that is not allowed here.
        reset = False
        with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as f:  # noqa: ASYNC230
            f.write("5")
            reset = True
        samples = [rss_before]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.005):
                samples.append(_proc_kib(pid, "VmRSS"))

        sampler = threading.Thread(target=sample)
        sampler.start()
        began = time.monotonic()
        try:
            status, reply = await _import(http, server, admin, data)
        finally:
            stop.set()
            sampler.join()
        took = time.monotonic() - began
        peak = max(*samples, _proc_kib(pid, "VmHWM") if reset else 0)
        assert status == 200, reply
        job = reply["data"]
        growth_mib = (peak - rss_before) / 1024
        print(f"\nimport: {ROWS} rows ({len(data) / 2**20:.1f} MiB) in {took:.1f} s = {ROWS / took:,.0f} rows/s; "
              f"server RSS {rss_before / 1024:.0f} MiB before, peak {peak / 1024:.0f} MiB: "
              f"growth {growth_mib:.1f} MiB ({len(samples)} samples, VmHWM reset: {reset})")
        assert growth_mib < MAX_GROWTH_MIB
        assert (job["status"], job["rows_total"], job["rows_ok"], job["rows_failed"]) == ("done", ROWS, 99_000, 1000)
        assert (job["rows_inserted"], job["rows_updated"], job["errors_truncated"]) == (99_000, 0, False)
        assert {e["line"] for e in job["errors"]} == bad
        assert all(e["reason"] and "Name" not in e["reason"] for e in job["errors"])
        reasons = {e["reason"].split(":")[0] for e in job["errors"]}
        assert {"balance", "phones", "currency", "status", "external_ref", "consent"} <= reasons
        st, shown = await call(http, server, "GET", f"/api/imports/{job['id']}", admin)
        assert st == 200 and shown["data"] == job

        st, page = await call(http, server, "GET", "/api/accounts?q=IMP-1234&limit=200", admin)
        got = {a["external_ref"]: a for a in page["data"]["items"]}
        assert got["IMP-1234"]["debtor_name"] == "Debtor 1234, Jr"
        assert got["IMP-1234"]["phones"] == ["+15550001234", "+447700901234"]
        assert got["IMP-1234"]["balance_cents"] == 1234 * 100 + 34

        status, again = await _import(http, server, admin, data)
        assert status == 200
        assert (again["data"]["rows_ok"], again["data"]["rows_inserted"], again["data"]["rows_updated"]) == (
            99_000, 0, 0)
        # One changed line updates one account.
        changed = data.replace(b"IMP-5,\"Debtor 5, Jr\"", b"IMP-5,\"Debtor 5, Sr\"")
        status, third = await _import(http, server, admin, changed)
        assert (third["data"]["rows_inserted"], third["data"]["rows_updated"]) == (0, 1)
    assert [r for r in server.logs() if r.get("level") == "error"] == []


async def test_bad_uploads_are_refused_cleanly_and_never_a_server_error(server: Server, world: World) -> None:
    admin = world.a.keys[Role.ADMIN]
    header = b"external_ref,debtor_name,balance,currency\n"
    async with aiohttp.ClientSession() as http:
        for body, why in ((b"ref,name,amount\n1,2,3\n", "unknown"), (b"external_ref,debtor_name\n", "missing"),
                          (b"external_ref,external_ref,debtor_name,balance,currency\n", "twice"),
                          (b"\xff\xfeexternal_ref\n", "UTF-8"), (b"", "missing"),
                          (b"x" * (10 << 20), "longer")):
            status, reply = await call(http, server, "POST", IMPORT, admin, body)
            assert (status, reply["error"]["code"]) == (400, "validation_failed"), (why, reply)
            assert why in reply["error"]["details"][0]["message"]
        rows = header + b"OK-1,Ann,1,EUR\n" + b"OK-2,\xff\xfe,1,EUR\n" + b"OK-3," + b"y" * (10 << 20) + \
            b",1,EUR\n" + b"OK-4,Bo\x00b,1,EUR\n" + b"OK-5,Cy,2.5,EUR"
        status, reply = await call(http, server, "POST", IMPORT, admin, rows)
        assert status == 200, reply
        job = reply["data"]
        assert (job["rows_total"], job["rows_ok"], job["rows_failed"]) == (5, 2, 3)
        assert [(e["line"], e["reason"].split()[0]) for e in job["errors"]] == [(3, "not"), (4, "the"), (5, "NUL")]
        status, reply = await call(http, server, "POST", IMPORT, admin, {"external_ref": "x"})
        assert (status, reply["error"]["code"]) == (415, "unsupported_media_type")
        status, reply = await call(http, server, "POST", IMPORT, admin, header,
                                   headers={"Content-Type": "text/csv; charset=latin-1"})
        assert status == 415
        async with http.post(server.http + IMPORT, data=b"x",
                             headers={**bearer(admin), "Content-Type": "text/csv",
                                      "Content-Length": str(60 << 20)}) as r:
            assert r.status == 413
    assert [r for r in server.logs() if r.get("level") == "error"] == []


async def test_a_client_that_leaves_mid_upload_leaves_the_job_failed_not_running(server: Server,
                                                                                 world: World) -> None:
    admin = world.a.keys[Role.ADMIN]
    data, _ = _csv(20_000)
    head = f"POST {IMPORT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {admin}\r\n" \
           f"Content-Type: text/csv\r\nContent-Length: {len(data)}\r\n\r\n".encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(head + data[: len(data) // 2])
    await writer.drain()
    await asyncio.sleep(1.0)
    writer.close()
    del reader
    async with aiohttp.ClientSession() as http:
        for _ in range(50):
            st, reply = await call(http, server, "GET", "/api/imports?limit=1", admin)
            job = reply["data"]["items"][0]
            if job["status"] != "running":
                break
            await asyncio.sleep(0.1)
    assert job["status"] == "failed" and job["failure"], job
    assert 0 < job["rows_total"] < 20_000
