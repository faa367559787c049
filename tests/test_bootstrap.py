"""``switchboard orgs create`` and ``switchboard serve --demo`` (``api/bootstrap.py``), as real subprocesses
on the embedded PostgreSQL of a fresh data directory.

* With no server running, the command starts the embedded database itself, writes the organisation,
  its owner (argon2id hash of the printed password), an admin API key and a media token (stored as
  SHA-256 only) with four audit entries that carry no secret, then stops the database and frees the
  directory.  An address already in use (in any case) exits 1 and leaves no row behind; a bad name
  or address exits 1 before any database is started.
* With ``DATABASE_URL`` it writes there and leaves the data directory alone.
* With the server running, the command writes through the server's own embedded database (found by
  its postmaster.pid) without disturbing the server.
* ``serve --demo`` on an empty data directory creates the demo organisation, keeps its credentials in
  ``demo.json`` (mode 0600) and prints the address, the console URL, the e-mail and the password; a
  second start prints the same credentials and creates nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest
from argon2 import PasswordHasher

from api.bootstrap import DEMO_ACCOUNTS, DEMO_EMAIL, DEMO_NAME, InvalidInput, running_embedded_uri, validate
from storage import embedded
from storage.db import with_database
from storage.lifeline import DataDirLock
from tests.servers import free_port, get_json, running_server

SERVER_ENV = {"SWITCHBOARD_PERSIST": "true", "SWITCHBOARD_STT_PROVIDER": "null",
              "SWITCHBOARD_TRANSLATION_PROVIDER": "none", "SWITCHBOARD_LOG_LEVEL": "INFO"}


def cli(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "SWITCHBOARD_DATA_DIR": str(data_dir), **(env or {})}
    if env is None:
        full_env.pop("DATABASE_URL", None)  # the embedded database of data_dir
    return subprocess.run([sys.executable, "-m", "api.cli", *args], env=full_env, capture_output=True, text=True,
                          timeout=120)


async def orgs_create(data_dir: Path, name: str, email: str) -> subprocess.CompletedProcess[str]:
    """The command in a thread: the test's event loop keeps running meanwhile."""
    return await asyncio.to_thread(cli, data_dir, "orgs", "create", "--name", name, "--owner-email", email)


async def connect_running(data_dir: Path) -> asyncpg.Connection:
    """The superuser's connection to a running server's embedded database, as the command finds it."""
    return await asyncpg.connect(with_database(running_embedded_uri(data_dir / "postgres"), "switchboard"))


async def check_created(conn: asyncpg.Connection, out: dict[str, str], *, name: str, email: str,
                        actor_id: str) -> None:
    """Every row of one ``orgs create`` (read as the superuser: RLS does not hide them)."""
    org_id = out["org_id"]
    assert await conn.fetchval("SELECT name FROM organizations WHERE id = $1::uuid", org_id) == name
    user = await conn.fetchrow("SELECT id::text, email, role, password_hash, active FROM users WHERE org_id = $1::uuid",
                               org_id)
    assert user["id"] == out["user_id"] and user["email"] == email and user["role"] == "owner" and user["active"]
    assert user["password_hash"].startswith("$argon2id$")
    assert PasswordHasher().verify(user["password_hash"], out["password"])
    assert len(out["password"]) >= 20
    key = await conn.fetchrow("SELECT key_hash, role, prefix FROM api_keys WHERE org_id = $1::uuid", org_id)
    assert out["api_key"].startswith("sbk_") and key["role"] == "admin"
    assert bytes(key["key_hash"]) == hashlib.sha256(out["api_key"].encode()).digest()
    token = await conn.fetchrow("SELECT token_hash FROM media_tokens WHERE org_id = $1::uuid", org_id)
    assert out["media_token"].startswith("sbm_")
    assert bytes(token["token_hash"]) == hashlib.sha256(out["media_token"].encode()).digest()
    audit = await conn.fetch("SELECT actor_type, actor_id, action, new_value::text AS v, "
                             "jsonb_typeof(new_value) AS t FROM audit_logs "
                             "WHERE org_id = $1::uuid ORDER BY created_at", org_id)
    assert {a["t"] for a in audit} == {"object"}  # a JSON object, not a string holding one
    assert [a["action"] for a in audit] == ["org.created", "user.created", "api_key.created", "media_token.created"]
    assert {(a["actor_type"], a["actor_id"]) for a in audit} == {("system", actor_id)}
    for row in audit:
        assert email not in row["v"], "the append-only audit trail keeps no e-mail address"
        for secret in (out["password"], out["api_key"], out["media_token"]):
            assert secret not in row["v"] and secret[12:] not in row["v"]


def test_name_and_address_are_checked_before_anything_starts() -> None:
    assert validate("  Acme Collections ", "Ops@Acme.Example") == ("Acme Collections", "ops@acme.example")
    for name, email in (("", "a@b.example"), ("x" * 201, "a@b.example"), ("tab\there", "a@b.example"),
                        ("Acme", "no-at.example"), ("Acme", "a@b"), ("Acme", "a b@c.example"),
                        ("Acme", "a@@b.example")):
        with pytest.raises(InvalidInput):
            validate(name, email)


async def test_orgs_create_with_the_server_stopped_writes_one_transaction_and_refuses_a_used_address(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    bad = await orgs_create(data, "Acme", "not-an-address")
    assert bad.returncode == 1 and "is not an e-mail address" in bad.stderr and bad.stdout == ""
    assert not (data / "postgres").exists(), "an invalid request starts no database"

    done = await orgs_create(data, "Acme Collections", "Ops@Acme.Example")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1
    out = orjson.loads(lines[0])
    assert set(out) == {"org_id", "user_id", "api_key", "media_token", "password"}

    again = await orgs_create(data, "Another", "OPS@acme.example")
    assert again.returncode == 1 and again.stdout == ""
    assert "ops@acme.example is already a user's address; nothing was created" in again.stderr

    # The command stopped its database and let go of the directory.
    lock = DataDirLock(data)
    lock.acquire()
    try:
        pg = embedded.start_postgres(data / "postgres")
        try:
            conn = await asyncpg.connect(with_database(pg.uri, "switchboard"))
            try:
                await check_created(conn, out, name="Acme Collections", email="ops@acme.example", actor_id="cli")
                assert await conn.fetchval("SELECT count(*) FROM organizations") == 1, "nothing of the refused one"
                assert await conn.fetchval("SELECT count(*) FROM users") == 1
                assert await conn.fetchval("SELECT count(*) FROM audit_logs") == 4
            finally:
                await conn.close()
        finally:
            pg.shutdown()
    finally:
        lock.release()


async def test_orgs_create_while_the_server_runs_writes_through_its_database(tmp_path: Path) -> None:
    with running_server(tmp_path, **SERVER_ENV) as server:
        data = tmp_path / "data"
        done = await orgs_create(data, "Running Co", "boss@running.example")
        assert done.returncode == 0, done.stderr
        out = orjson.loads(done.stdout)
        conn = await connect_running(data)
        try:
            await check_created(conn, out, name="Running Co", email="boss@running.example", actor_id="cli")
            orgs = await conn.fetchval("SELECT count(*) FROM organizations")
            again = await orgs_create(data, "Running Co 2", "boss@running.example")
            assert again.returncode == 1 and "already a user's address" in again.stderr
            assert await conn.fetchval("SELECT count(*) FROM organizations") == orgs
            assert await conn.fetchval("SELECT count(*) FROM organizations WHERE name = 'Running Co 2'") == 0
        finally:
            await conn.close()
        # The server kept its directory and its database, and still serves.
        assert (data / "switchboard.lock").read_text().strip() == str(server.proc.pid)
        assert (await asyncio.to_thread(get_json, f"{server.http}/readyz"))["status"] == "ok"


# ---- serve --demo ---------------------------------------------------------------------------------


@contextlib.contextmanager
def demo_server(tmp: Path, data: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``switchboard serve --demo`` as ``make run`` starts it; yields the process and its stdout file."""
    port = free_port()
    stdout = tmp / f"demo-{port}.out"
    env = {**os.environ, **SERVER_ENV, "SWITCHBOARD_DATA_DIR": str(data)}
    with open(stdout, "wb") as out, open(tmp / f"demo-{port}.err", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "api.cli", "serve", "--port", str(port), "--demo"],
                                env=env, stdout=out, stderr=err)
    try:
        yield proc, stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def banner(proc: subprocess.Popen[bytes], stdout: Path, timeout: float = 60) -> dict[str, str]:
    """The printed banner as {label: value}, once complete."""
    deadline = time.monotonic() + timeout
    while "Demo credentials" not in (text := stdout.read_text()):
        assert proc.poll() is None, f"serve --demo exited {proc.returncode}: {text}"
        assert time.monotonic() < deadline, f"no banner within {timeout} s: {text!r}"
        time.sleep(0.1)
    fields = {}
    for line in text.splitlines():
        label, sep, value = line.strip().partition(":  ")
        if sep:
            fields[label] = value.strip()
    fields["first"] = text.splitlines()[0]
    return fields


async def test_serve_demo_creates_the_demo_organisation_once_and_prints_how_to_sign_in(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with demo_server(tmp_path, data) as (proc, stdout):
        first = await asyncio.to_thread(banner, proc, stdout)
        assert first["first"].startswith("Switchboard is listening on http://127.0.0.1:")
        base = first["first"].rsplit(" ", 1)[1]
        assert first["Console"] == f"{base}/console" and first["Workspace"] == f"{base}/app"
        assert first["E-mail"] == DEMO_EMAIL
        assert first["Simulate a call"].startswith(".venv/bin/switchboard simulate-call")
        assert "created now" in stdout.read_text()
        saved_path = data / "demo.json"
        assert stat.S_IMODE(saved_path.stat().st_mode) == 0o600
        saved = orjson.loads(saved_path.read_bytes())
        assert saved["password"] == first["Password"] and saved["email"] == DEMO_EMAIL
        conn = await connect_running(data)
        try:
            await check_created(conn, saved, name=DEMO_NAME, email=DEMO_EMAIL, actor_id="demo")
        finally:
            await conn.close()
        # Something for the workspace's first look: a campaign of the demo's made-up accounts.
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {saved['api_key']}"}) as http:
            async with http.get(f"{base}/api/accounts?limit=10") as r:
                accounts = (await r.json())["data"]["items"]
            async with http.get(f"{base}/api/campaigns") as r:
                (campaign,) = (await r.json())["data"]["items"]
        assert sorted(a["external_ref"] for a in accounts) == [ref for ref, *_ in DEMO_ACCOUNTS]
        assert campaign["contacts"] == len(DEMO_ACCOUNTS) and sum(a["do_not_call"] for a in accounts) == 1
    assert proc.returncode == 0

    with demo_server(tmp_path, data) as (proc, stdout):
        second = await asyncio.to_thread(banner, proc, stdout)
        assert second["Password"] == first["Password"] and "from an earlier start" in stdout.read_text()
        conn = await connect_running(data)
        try:
            assert await conn.fetchval("SELECT count(*) FROM organizations WHERE name = $1", DEMO_NAME) == 1
            assert await conn.fetchval("SELECT count(*) FROM users WHERE email = $1", DEMO_EMAIL) == 1
        finally:
            await conn.close()
        assert orjson.loads((data / "demo.json").read_bytes()) == saved


async def test_orgs_create_with_database_url_uses_that_database_and_not_the_data_directory(
    tmp_path: Path, pg_admin_url: str,
) -> None:
    url = with_database(pg_admin_url, f"sb_orgs_{os.getpid()}")
    data = tmp_path / "data"
    env = {"DATABASE_URL": url}
    done = await asyncio.to_thread(cli, data, "orgs", "create", "--name", "Via URL", "--owner-email",
                                   "owner@url.example", env=env)
    assert done.returncode == 0, done.stderr
    out = orjson.loads(done.stdout)
    again = await asyncio.to_thread(cli, data, "orgs", "create", "--name", "Via URL", "--owner-email",
                                    "owner@url.example", env=env)
    assert again.returncode == 1 and "already a user's address" in again.stderr
    assert not (data / "postgres").exists()
    conn = await asyncpg.connect(url)
    try:
        await check_created(conn, out, name="Via URL", email="owner@url.example", actor_id="cli")
        assert await conn.fetchval("SELECT count(*) FROM organizations") == 1
    finally:
        await conn.close()
