"""Evidence bundles on the real server with storage on: a sealed zip of an ended call (recording,
transcripts, translations, audit trail, a PDF page, a manifest of SHA-256s) verifies intact; a
tampered stored object, whether a file changed, the manifest rewritten to match it, or a file added,
is detected and named; roles and tenants as documented.  In S3 (weed mini) with
SWITCHBOARD_S3_OBJECT_LOCK: the bundle is encrypted, write-once and locked until its retain_until, and
a bucket without Object Lock stops the server at start-up."""

from __future__ import annotations

import asyncio
import io
import uuid
import zipfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import aiohttp
import orjson
import pytest

from api.auth import Role
from api.evidence import sha256
from storage.blobs import LocalBlobStore, S3BlobStore
from storage.db import Database
from tests.api.rest_world import World, build_world, call, sign_in_all, world_server
from tests.conftest import S3Endpoint
from tests.servers import Server


@pytest.fixture(scope="module")
def world(pg_admin_url: str, redis_url: str) -> World:
    return asyncio.run(build_world(pg_admin_url, redis_url, 13))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("evidence")
    with world_server(tmp, world) as srv:
        asyncio.run(sign_in_all(srv, world))
        srv.extra["blobs"] = tmp / "data" / "blobs"
        yield srv


def _rewrite(data: bytes, changes: dict[str, bytes]) -> bytes:
    """The zip with some members replaced or added (what someone with write access to the store could do)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, changes.get(name, src.read(name)))
        for name, content in changes.items():
            if name not in src.namelist():
                dst.writestr(name, content)
    return out.getvalue()


async def test_a_sealed_bundle_verifies_and_every_kind_of_tampering_is_detected(
        server: Server, world: World, db: Database) -> None:
    a, b = world.a, world.b
    root: Path = server.extra["blobs"]
    blobs = LocalBlobStore(root, b"k" * 32)
    await blobs.start()
    ccid = f"v3:evidence-{uuid.uuid4().hex[:8]}"
    async with db.tenant(a.org_id) as conn:
        cid = await conn.fetchval("INSERT INTO calls (org_id, call_control_id, status, started_at, ended_at) VALUES "
                                  "($1, $2, 'completed', now() - interval '2 min', now()) RETURNING id", a.org_id, ccid)
        key = f"recordings/{a.org_id}/ev/{cid}.wav"
        await blobs.put(key, b"RIFF" + bytes(range(256)) * 40, "audio/wav")
        await conn.execute("INSERT INTO recordings (org_id, call_id, storage_key, bytes, duration_ms, channels, "
                           "sample_rate, sha256) VALUES ($1, $2, $3, 10244, 640, 1, 8000, 'x')", a.org_id, cid, key)
        await conn.execute("INSERT INTO transcriptions (org_id, call_id, track, seq, text, start_ms, words) VALUES "
                           "($1, $2, 'inbound', 1, 'I can pay fifty dollars on Friday', 1200, $3)", a.org_id, cid,
                           [{"word": "I", "start": 1200, "end": 1300, "confidence": 0.9}])
        await conn.execute("INSERT INTO call_summaries (call_id, org_id, summary, score, provider, source) VALUES "
                           "($1, $2, 'a promise', '{\"dispute\": false}', 'rules', 'live')", cid, a.org_id)
        await conn.execute("INSERT INTO audit_logs (org_id, actor_type, actor_id, action, resource_type, resource_id) "
                           "VALUES ($1, 'provider', 'telnyx', 'call.completed', 'call', $2)", a.org_id, str(cid))
        live = f"v3:evidence-live-{uuid.uuid4().hex[:8]}"
        await conn.execute("INSERT INTO calls (org_id, call_control_id, status) VALUES ($1, $2, 'active')",
                           a.org_id, live)
    admin = a.sessions[Role.ADMIN]
    async with aiohttp.ClientSession() as http:
        assert (await call(http, server, "POST", f"/api/calls/{ccid}/evidence", a.sessions[Role.AGENT], {}))[0] == 403
        theirs = await call(http, server, "POST", f"/api/calls/{ccid}/evidence", b.sessions[Role.ADMIN], {})
        unknown = await call(http, server, "POST", "/api/calls/v3:unknown/evidence", b.sessions[Role.ADMIN], {})
        assert theirs == unknown and theirs[0] == 404
        status, reply = await call(http, server, "POST", f"/api/calls/{live}/evidence", admin, {})
        assert (status, reply["error"]["code"]) == (409, "conflict")

        status, sealed = await call(http, server, "POST", f"/api/calls/{ccid}/evidence", admin, {})
        assert status == 201, sealed
        bundle = sealed["data"]
        base = f"/api/calls/{ccid}/evidence/{bundle['id']}"
        status, listed = await call(http, server, "GET", f"/api/calls/{ccid}/evidence", admin)
        assert [x["id"] for x in listed["data"]["items"]] == [bundle["id"]]
        status, verdict = await call(http, server, "GET", f"{base}/verify", admin)
        assert status == 200 and verdict["data"] == {"intact": True, "problems": [], "sha256": bundle["sha256"]}

        status, link = await call(http, server, "GET", f"{base}/url", admin)
        async with http.get(server.http + link["data"]["url"]) as r:
            data = await r.read()
        assert sha256(data) == bundle["sha256"]
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = set(z.namelist())
            man = orjson.loads(z.read("manifest.json"))
            assert z.read("summary.pdf").startswith(b"%PDF")
            assert "I can pay fifty dollars" in z.read("transcript.txt").decode()
            assert orjson.loads(z.read("transcript.json"))[0]["words"][0]["start"] == 1200
            assert [e["action"] for e in orjson.loads(z.read("audit.json"))] == ["call.completed"]
        assert names == {"recording-1.wav", "transcript.txt", "transcript.json", "translations.json", "audit.json",
                         "summary.pdf", "manifest.json"} and len(man["files"]) == bundle["files"] - 1
        assert {f["name"]: f["sha256"] for f in man["files"]}["recording-1.wav"] == sha256(
            await blobs.get(key))

        stored = root / f"evidence/{a.org_id}/{cid}/{bundle['id']}.zip"
        original = stored.read_bytes()
        forged = b"I can pay five dollars on Friday\n"
        with zipfile.ZipFile(io.BytesIO(original)) as z:
            forged_man = orjson.loads(z.read("manifest.json"))
        for f in forged_man["files"]:
            if f["name"] == "transcript.txt":
                f["sha256"] = sha256(forged)
        cases = {
            "a file changed": (_rewrite(original, {"transcript.txt": forged}), "transcript.txt differs"),
            "the manifest rewritten to match": (
                _rewrite(original, {"transcript.txt": forged, "manifest.json": orjson.dumps(forged_man)}),
                "manifest.json differs"),
            "a file added": (_rewrite(original, {"extra.txt": b"added later"}), "extra.txt is not in the manifest"),
            "not a zip": (b"garbage", "cannot be read"),
        }
        for label, (tampered, expected) in cases.items():
            stored.write_bytes(tampered)
            status, verdict = await call(http, server, "GET", f"{base}/verify", admin)
            assert status == 200 and verdict["data"]["intact"] is False, label
            assert any(expected in p for p in verdict["data"]["problems"]), (label, verdict)
            assert any("bundle's SHA-256 differs" in p for p in verdict["data"]["problems"]), label
        stored.write_bytes(original)
        status, verdict = await call(http, server, "GET", f"{base}/verify", admin)
        assert verdict["data"]["intact"] is True
    async with db.tenant(a.org_id) as conn:  # the seal cannot be changed by the application
        with pytest.raises(Exception, match="permission denied"):
            await conn.execute("UPDATE evidence_bundles SET sha256 = $1", "0" * 64)


async def test_in_s3_a_bundle_is_encrypted_write_once_and_locked_until_its_retain_until(
        world: World, db: Database, s3_endpoint: S3Endpoint, tmp_path: Path) -> None:
    a = world.a
    s3 = {"S3_ENDPOINT_URL": s3_endpoint.endpoint, "S3_ACCESS_KEY_ID": s3_endpoint.access_key,
          "S3_SECRET_ACCESS_KEY": s3_endpoint.secret_key, "SWITCHBOARD_S3_OBJECT_LOCK": "governance"}
    locked, unlocked = f"sb-ev-{uuid.uuid4().hex[:8]}", f"sb-ev-{uuid.uuid4().hex[:8]}"
    for sub in ("refused", "locked"):
        (tmp_path / sub).mkdir()
    raw = S3BlobStore(s3_endpoint.endpoint, "unused", s3_endpoint.access_key, s3_endpoint.secret_key)
    async with raw._session.client("s3", endpoint_url=s3_endpoint.endpoint, config=raw._config) as admin:
        # A bucket without Object Lock while the lock is asked for: the server does not start, and says why.
        await admin.create_bucket(Bucket=unlocked)
        with pytest.raises(RuntimeError) as refused, world_server(tmp_path / "refused", world, **s3,
                                                                  SWITCHBOARD_S3_BUCKET=unlocked):
            pass
        said = str(refused.value)
        assert f"switchboard: SWITCHBOARD_S3_OBJECT_LOCK=governance but bucket '{unlocked}' has no Object Lock" in said
        assert "Traceback" not in said  # a configuration error, said plainly
        await admin.delete_bucket(Bucket=unlocked)

        ccid = f"v3:evidence-s3-{uuid.uuid4().hex[:8]}"
        async with db.tenant(a.org_id) as conn:
            cid = await conn.fetchval("INSERT INTO calls (org_id, call_control_id, status, started_at, ended_at) "
                                      "VALUES ($1, $2, 'completed', now() - interval '1 min', now()) RETURNING id",
                                      a.org_id, ccid)
            await conn.execute("INSERT INTO transcriptions (org_id, call_id, track, seq, text) VALUES "
                               "($1, $2, 'inbound', 1, 'I dispute this debt')", a.org_id, cid)
        # The bucket is missing: the server makes it with Object Lock.
        with world_server(tmp_path / "locked", world, **s3, SWITCHBOARD_S3_BUCKET=locked) as server:
            async with aiohttp.ClientSession() as http:
                status, sealed = await call(http, server, "POST", f"/api/calls/{ccid}/evidence",
                                            a.keys[Role.ADMIN], {})
                assert status == 201, sealed
                bundle = sealed["data"]
                status, verdict = await call(http, server, "GET",
                                             f"/api/calls/{ccid}/evidence/{bundle['id']}/verify", a.keys[Role.ADMIN])
                assert verdict["data"]["intact"] is True
        key = f"evidence/{a.org_id}/{cid}/{bundle['id']}.zip"
        head = await admin.head_object(Bucket=locked, Key=key)
        retain_until = datetime.fromisoformat(bundle["retain_until"])
        assert head["ObjectLockMode"] == "GOVERNANCE" and head["ServerSideEncryption"] == "AES256"
        assert abs((head["ObjectLockRetainUntilDate"] - retain_until).total_seconds()) < 1
        # Without the bypass permission nobody removes it early, nor overwrites it write-once.
        with pytest.raises(Exception, match="AccessDenied"):
            await admin.delete_object(Bucket=locked, Key=key, VersionId=head["VersionId"])
        with pytest.raises(Exception, match="PreconditionFailed"):
            await admin.put_object(Bucket=locked, Key=key, Body=b"forged", IfNoneMatch="*")
        # Clean up as the store's administrator may (governance yields to the bypass; weed's Admin has it).
        await admin.delete_object(Bucket=locked, Key=key, VersionId=head["VersionId"], BypassGovernanceRetention=True)
