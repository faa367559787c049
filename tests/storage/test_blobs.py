"""The cold tier against a real S3-compatible server (``weed mini``, which checks signatures) and the
local-directory store through the real aiohttp route that serves its presigned URLs."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit
from uuid import uuid4

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient
from yarl import URL

from api.blobs import add_routes
from storage.blobs import BlobBackendError, BlobNotFound, InvalidBlobKey, LocalBlobStore, S3BlobStore
from tests.conftest import S3Endpoint

BUCKET = f"sb-test-{uuid4().hex[:8]}"
SIGNING_KEY = b"test-signing-key-0123456789abcdef"


def s3_store(ep: S3Endpoint, *, secret_key: str | None = None, part_size: int = 8 << 20) -> S3BlobStore:
    return S3BlobStore(ep.endpoint, BUCKET, ep.access_key, secret_key or ep.secret_key, region=ep.region,
                       part_size=part_size)


@pytest.fixture
async def s3(s3_endpoint: S3Endpoint) -> AsyncIterator[S3BlobStore]:
    store = s3_store(s3_endpoint)
    await store.start()
    yield store
    # Leave the server as we found it: empty the bucket, then remove it.
    client = store._client
    listing = await client.list_objects_v2(Bucket=BUCKET)
    for obj in listing.get("Contents", []):
        await client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    await client.delete_bucket(Bucket=BUCKET)
    await store.aclose()


async def http_get(url: str) -> tuple[int, bytes]:
    """A plain, unauthenticated GET; ``encoded=True`` sends the signed query exactly as presigned."""
    async with aiohttp.ClientSession() as session, session.get(URL(url, encoded=True)) as resp:
        return resp.status, await resp.read()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- S3 -------------------------------------------------------------------------------------------


async def test_s3_put_get_delete_round_trip(s3: S3BlobStore) -> None:
    await s3.put("calls/c1/meta.json", b'{"ok": true}', "application/json")
    assert await s3.get("calls/c1/meta.json") == b'{"ok": true}'
    await s3.delete("calls/c1/meta.json")
    with pytest.raises(BlobNotFound):
        await s3.get("calls/c1/meta.json")
    await s3.delete("calls/c1/meta.json")  # idempotent


async def test_s3_get_missing_key_raises_blob_not_found_which_is_a_key_error(s3: S3BlobStore) -> None:
    with pytest.raises(KeyError):
        await s3.get("no/such/key")


async def test_s3_put_file_above_part_size_uses_multipart_and_round_trips(
        s3: S3BlobStore, s3_endpoint: S3Endpoint, tmp_path: Path) -> None:
    store = s3_store(s3_endpoint, part_size=5 << 20)
    await store.start()
    try:
        data = os.urandom(13 << 20)  # 5 + 5 + 3 MiB
        src = tmp_path / "call.wav"
        src.write_bytes(data)
        await store.put_file("calls/c2/audio.wav", src, "audio/wav")
        head = await s3._client.head_object(Bucket=BUCKET, Key="calls/c2/audio.wav")
        assert head["ETag"].strip('"').endswith("-3"), head["ETag"]
        assert head["ContentLength"] == len(data)
        assert sha256(await store.get("calls/c2/audio.wav")) == sha256(data)
        uploads = await s3._client.list_multipart_uploads(Bucket=BUCKET)
        assert not uploads.get("Uploads")
    finally:
        await store.aclose()


async def test_s3_put_file_below_part_size_is_a_single_put(s3: S3BlobStore, tmp_path: Path) -> None:
    src = tmp_path / "small.bin"
    src.write_bytes(b"x" * 1000)
    await s3.put_file("small.bin", src)
    head = await s3._client.head_object(Bucket=BUCKET, Key="small.bin")
    assert "-" not in head["ETag"].strip('"')
    assert await s3.get("small.bin") == b"x" * 1000


async def test_s3_failed_multipart_upload_is_aborted(s3: S3BlobStore, s3_endpoint: S3Endpoint,
                                                     tmp_path: Path) -> None:
    store = s3_store(s3_endpoint, part_size=5 << 20)
    await store.start()
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 << 20))
    real_upload_part = store._client.upload_part
    calls = 0

    async def failing_upload_part(**kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 2:
            # The server really lists the upload in progress, so the check after the failure means something.
            in_progress = await s3._client.list_multipart_uploads(Bucket=BUCKET)
            assert [u["Key"] for u in in_progress.get("Uploads", [])] == ["big.bin"]
            raise ConnectionResetError("network went away")
        return await real_upload_part(**kwargs)

    store._client.upload_part = failing_upload_part
    try:
        with pytest.raises(ConnectionResetError):
            await store.put_file("big.bin", src)
        uploads = await s3._client.list_multipart_uploads(Bucket=BUCKET)
        assert not uploads.get("Uploads")
        with pytest.raises(BlobNotFound):
            await s3.get("big.bin")
    finally:
        await store.aclose()


async def test_s3_presigned_url_serves_bytes_without_credentials(s3: S3BlobStore) -> None:
    await s3.put("calls/c3/audio.wav", b"RIFF-audio", "audio/wav")
    status, body = await http_get(await s3.presign_get("calls/c3/audio.wav"))
    assert (status, body) == (200, b"RIFF-audio")


async def test_s3_presigned_url_with_tampered_signature_is_refused(s3: S3BlobStore) -> None:
    await s3.put("calls/c4/audio.wav", b"secret")
    url = await s3.presign_get("calls/c4/audio.wav")
    sig = parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]
    forged = ("0" if sig[0] != "0" else "1") + sig[1:]
    status, body = await http_get(url.replace(sig, forged))
    assert status == 403
    assert b"secret" not in body


async def test_s3_presigned_url_expires(s3: S3BlobStore) -> None:
    await s3.put("calls/c5/audio.wav", b"short-lived")
    url = await s3.presign_get("calls/c5/audio.wav", expires_s=1)
    assert (await http_get(url))[0] == 200
    await asyncio.sleep(2.5)
    assert (await http_get(url))[0] == 403


async def test_s3_presign_caps_expiry_and_rejects_non_positive(s3: S3BlobStore) -> None:
    url = await s3.presign_get("k", expires_s=10**6)
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == [str(s3.presign_max_s)]
    for bad in (0, -5):
        with pytest.raises(ValueError):
            await s3.presign_get("k", expires_s=bad)


async def test_s3_wrong_secret_key_is_rejected_by_the_server(s3: S3BlobStore, s3_endpoint: S3Endpoint) -> None:
    bad = s3_store(s3_endpoint, secret_key="not-the-secret")
    with pytest.raises(BlobBackendError) as excinfo:
        await bad.start()  # the bucket exists (fixture): HeadBucket is refused, not "missing"
    assert excinfo.value.code in ("403", "SignatureDoesNotMatch", "AccessDenied"), excinfo.value
    assert "not-the-secret" not in str(excinfo.value) + repr(bad)
    await bad.aclose()


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/abs", "", "a//b", "a/./b", "tab\there", "x" * 1025])
async def test_s3_invalid_keys_are_rejected_before_any_request(s3: S3BlobStore, key: str) -> None:
    with pytest.raises(ValueError):
        await s3.put(key, b"x")
    with pytest.raises(InvalidBlobKey):
        await s3.presign_get(key)


# --- local directory ------------------------------------------------------------------------------


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[LocalBlobStore]:
    store = LocalBlobStore(tmp_path / "blobs", SIGNING_KEY)
    await store.start()
    yield store
    await store.aclose()


async def test_local_put_get_delete_round_trip(local: LocalBlobStore) -> None:
    await local.put("calls/c1/audio.wav", b"RIFF")
    assert await local.get("calls/c1/audio.wav") == b"RIFF"
    await local.put("calls/c1/audio.wav", b"RIFF2")  # replace
    assert await local.get("calls/c1/audio.wav") == b"RIFF2"
    await local.delete("calls/c1/audio.wav")
    with pytest.raises(BlobNotFound):
        await local.get("calls/c1/audio.wav")
    await local.delete("calls/c1/audio.wav")
    assert not [p for p in local.root.rglob("*") if p.is_file()]  # no temp files left behind


async def test_local_put_file_copies_bytes(local: LocalBlobStore, tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    src = tmp_path / "in.wav"
    src.write_bytes(data)
    await local.put_file("calls/c2/audio.wav", src)
    assert sha256(await local.get("calls/c2/audio.wav")) == sha256(data)


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "", "a//b", "nul\x00byte"])
async def test_local_keys_that_could_escape_root_are_rejected(local: LocalBlobStore, key: str) -> None:
    with pytest.raises(ValueError):
        await local.put(key, b"x")
    with pytest.raises(ValueError):
        local.path_for(key)
    assert not local.verify(key, int(time.time()) + 60, "0" * 64)


async def test_local_verify_accepts_own_signature_rejects_tampered_and_expired(local: LocalBlobStore) -> None:
    url = await local.presign_get("calls/c3/audio.wav", expires_s=60)
    q = parse_qs(urlsplit(url).query)
    expires, sig = int(q["expires"][0]), q["sig"][0]
    assert local.verify("calls/c3/audio.wav", expires, sig)
    assert not local.verify("calls/c3/other.wav", expires, sig)
    assert not local.verify("calls/c3/audio.wav", expires + 1, sig)
    assert not local.verify("calls/c3/audio.wav", expires, sig[:-1] + ("0" if sig[-1] != "0" else "1"))
    assert not local.verify("calls/c3/audio.wav", expires, "é" * 64)
    assert not local.verify("calls/c3/audio.wav", expires, sig, now=expires + 1)
    other = LocalBlobStore(local.root, b"another-signing-key-0123456789")
    assert not other.verify("calls/c3/audio.wav", expires, sig)


async def test_local_presigned_url_served_by_the_blob_route(local: LocalBlobStore,
                                                           aiohttp_client: AiohttpClient) -> None:
    app = web.Application()
    add_routes(app, local)
    client = await aiohttp_client(app)
    await local.put("calls/c 4/audio.wav", b"RIFF-local")
    url = await local.presign_get("calls/c 4/audio.wav")

    resp = await client.get(url)
    assert resp.status == 200
    assert await resp.read() == b"RIFF-local"
    assert resp.headers["Content-Type"] == "audio/wav"
    assert resp.headers["Cache-Control"] == "private, no-store"

    sig = parse_qs(urlsplit(url).query)["sig"][0]
    tampered = await client.get(url.replace(sig, "f" * 64))
    assert tampered.status == 403
    assert "error" in await tampered.json()

    short = await local.presign_get("calls/c 4/audio.wav", expires_s=1)
    await asyncio.sleep(2.1)
    assert (await client.get(short)).status == 403

    path = url.split("?")[0]
    for bad in (path, f"{path}?sig={sig}", f"{path}?expires=soon&sig={sig}"):
        resp = await client.get(bad)
        assert resp.status == 400, bad
        assert "error" in await resp.json()

    gone = await local.presign_get("calls/c5/never-written.bin")
    resp = await client.get(gone)
    assert resp.status == 404
    assert "error" in await resp.json()
