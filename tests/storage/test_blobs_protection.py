"""Cold-tier protection (``storage/blobs.py``): server-side encryption and write-once evidence with S3
Object Lock, against the real ``weed mini`` (SeaweedFS 4.x, which implements both as AWS does: SSE-S3
AES256 encrypts the volume files, SSE-KMS needs a KMS it lacks; Object Lock buckets are versioned and
refuse to delete a locked version).  And the pure rules the store follows."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from botocore.exceptions import ClientError

from storage.blobs import (
    PROBE_PREFIX,
    BlobBackendError,
    BlobConfigError,
    BlobExists,
    LocalBlobStore,
    S3BlobStore,
    encryption_args,
    lock_args,
    sse_after_probe,
)
from tests.conftest import S3Endpoint

# -- the rules, no I/O -----------------------------------------------------------------------------


@pytest.mark.parametrize(("setting", "accepted", "echoed", "sent", "warned"), [
    ("off", True, None, None, False),
    ("auto", True, "AES256", "AES256", False),
    ("auto", True, None, None, True),  # the store ignores the header
    ("auto", False, None, None, True),  # the store refuses it
    ("AES256", True, "AES256", "AES256", False),
    ("AES256", True, None, "AES256", True),  # sent, but unconfirmed
    ("aws:kms", True, "aws:kms", "aws:kms", False),
])
def test_what_the_probe_decides(setting: str, accepted: bool, echoed: str | None, sent: str | None,
                                warned: bool) -> None:
    header, warning = sse_after_probe(setting, accepted=accepted, echoed=echoed)
    assert header == sent and (warning is not None) == warned


@pytest.mark.parametrize("setting", ["AES256", "aws:kms"])
def test_an_explicit_encryption_the_store_refuses_stops_the_start(setting: str) -> None:
    with pytest.raises(BlobConfigError, match=f"SWITCHBOARD_S3_SSE={setting}"):
        sse_after_probe(setting, accepted=False, echoed=None)


def test_the_request_arguments() -> None:
    until = datetime(2033, 1, 1, tzinfo=UTC)
    assert encryption_args(None) == {}
    assert encryption_args("AES256", "ignored") == {"ServerSideEncryption": "AES256"}
    assert encryption_args("aws:kms", "arn:key") == {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "arn:key"}
    assert encryption_args("aws:kms") == {"ServerSideEncryption": "aws:kms"}
    assert lock_args("compliance", until) == {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": until}
    assert lock_args("governance", until)["ObjectLockMode"] == "GOVERNANCE"
    assert lock_args("off", until) == {} and lock_args("compliance", None) == {}
    with pytest.raises(ValueError, match="timezone-aware"):
        lock_args("compliance", datetime(2033, 1, 1))
    with pytest.raises(ValueError):
        encryption_args("rot13")
    with pytest.raises(ValueError, match="sse_kms_key_id"):
        S3BlobStore("http://127.0.0.1:1", "b-x", "a", "s", sse="AES256", sse_kms_key_id="k")


# -- against weed mini -----------------------------------------------------------------------------


def _on_disk(root: Path, needles: tuple[bytes, ...]) -> set[bytes]:
    """Which of ``needles`` appear in any file under ``root`` (weed's volumes, filer store and logs)."""
    found = set()
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found |= {n for n in needles if n in data}
    return found


def store(ep: S3Endpoint, bucket: str, **kw: Any) -> S3BlobStore:
    return S3BlobStore(ep.endpoint, bucket, ep.access_key, ep.secret_key, region=ep.region, **kw)


@pytest.fixture
def bucket() -> str:
    return f"sb-prot-{uuid4().hex[:10]}"


@pytest.fixture
async def admin(s3_endpoint: S3Endpoint) -> AsyncIterator[Any]:
    """A raw client: what someone holding the app's credentials could send, and the test's own eyes."""
    raw = store(s3_endpoint, "unused", sse="off")
    async with raw._session.client("s3", endpoint_url=s3_endpoint.endpoint, config=raw._config) as client:
        yield client


async def test_auto_encrypts_single_and_multipart_puts_and_weed_stores_no_plaintext(
        s3_endpoint: S3Endpoint, bucket: str, admin: Any, tmp_path: Path) -> None:
    encrypted = store(s3_endpoint, bucket, part_size=5 << 20)  # sse="auto" by default
    plain = store(s3_endpoint, bucket, sse="off")
    await encrypted.start()
    await plain.start()
    try:
        assert encrypted.sse == "AES256" and plain.sse is None
        canary, control = f"CANARY-SSE-{uuid4().hex}".encode(), f"CANARY-PLAIN-{uuid4().hex}".encode()
        # Incompressible around the canaries: weed gzips compressible content, which would hide plaintext too.
        await encrypted.put("calls/c1/meta.bin", os.urandom(64) + canary + os.urandom(64))
        await plain.put("calls/c1/plain.bin", os.urandom(64) + control + os.urandom(64))
        big = tmp_path / "big.wav"
        big.write_bytes(os.urandom(5 << 20) + canary)  # two parts: CreateMultipartUpload carries the header
        await encrypted.put_file("calls/c1/audio.wav", big, "audio/wav")
        for key, want in (("calls/c1/meta.bin", "AES256"), ("calls/c1/audio.wav", "AES256"),
                          ("calls/c1/plain.bin", None)):
            head = await admin.head_object(Bucket=bucket, Key=key)
            assert head.get("ServerSideEncryption") == want, key
        multipart = await admin.head_object(Bucket=bucket, Key="calls/c1/audio.wav")
        assert multipart["ETag"].strip('"').endswith("-2")  # really two parts
        assert canary in await encrypted.get("calls/c1/meta.bin")  # decrypted on the way out
        assert (await encrypted.get("calls/c1/audio.wav")).endswith(canary)
        assert await encrypted.list_keys(PROBE_PREFIX) == []  # start's probe cleaned up after itself
        if s3_endpoint.data_dir is not None:  # the volumes on disk: only the unencrypted object is readable
            await asyncio.sleep(0.5)
            found = await asyncio.to_thread(_on_disk, s3_endpoint.data_dir, (canary, control))
            assert found == {control}, found
    finally:
        for key in await plain.list_keys("calls/"):
            await plain.delete(key)
        await admin.delete_bucket(Bucket=bucket)
        await encrypted.aclose()
        await plain.aclose()


async def test_sse_kms_without_a_kms_refuses_to_start(s3_endpoint: S3Endpoint, bucket: str, admin: Any) -> None:
    kms = store(s3_endpoint, bucket, sse="aws:kms", sse_kms_key_id="alias/evidence")
    with pytest.raises(BlobConfigError, match="SWITCHBOARD_S3_SSE=aws:kms"):
        await kms.start()
    listing = await admin.list_objects_v2(Bucket=bucket)
    assert not listing.get("Contents")  # the probe it wrote without the header is gone too
    await admin.delete_bucket(Bucket=bucket)


async def test_object_lock_requested_on_a_bucket_without_it_refuses_to_start(
        s3_endpoint: S3Endpoint, bucket: str, admin: Any) -> None:
    await admin.create_bucket(Bucket=bucket)
    locked = store(s3_endpoint, bucket, object_lock="compliance")
    with pytest.raises(BlobConfigError, match="has no Object Lock"):
        await locked.start()
    assert locked._client is None  # closed: nothing half-started is left
    # Had it started, the evidence put would have failed: weed refuses a lock mode on this bucket too.
    with pytest.raises(ClientError) as caught:
        await admin.put_object(Bucket=bucket, Key="evidence/x.zip", Body=b"x", **lock_args(
            "compliance", datetime.now(UTC) + timedelta(days=1)))
    assert caught.value.response["Error"]["Code"] == "InvalidRequest"
    await admin.delete_object(Bucket=bucket, Key="evidence/x.zip")
    await admin.delete_bucket(Bucket=bucket)


async def test_evidence_is_write_once_and_locked_until_its_date_then_deletable(
        s3_endpoint: S3Endpoint, bucket: str, admin: Any, tmp_path: Path) -> None:
    s = store(s3_endpoint, bucket, object_lock="compliance", part_size=5 << 20)
    await s.start()  # the bucket is missing: made with Object Lock
    try:
        config = await admin.get_object_lock_configuration(Bucket=bucket)
        assert config["ObjectLockConfiguration"]["ObjectLockEnabled"] == "Enabled" and s.versioned
        until = (datetime.now(UTC) + timedelta(seconds=6)).replace(microsecond=0)
        await s.put("evidence/o/c/b1.zip", b"sealed bundle", "application/zip", retain_until=until)
        big = tmp_path / "b2.zip"
        big.write_bytes(os.urandom(6 << 20))  # multipart: the lock rides on CreateMultipartUpload
        await s.put_file("evidence/o/c/b2.zip", big, "application/zip", retain_until=until)
        versions = {}
        for key in ("evidence/o/c/b1.zip", "evidence/o/c/b2.zip"):
            head = await admin.head_object(Bucket=bucket, Key=key)
            assert (head["ObjectLockMode"], head["ObjectLockRetainUntilDate"]) == ("COMPLIANCE", until)
            assert head["ServerSideEncryption"] == "AES256"
            versions[key] = head["VersionId"]

        # Through the store: a second write-once put is refused, whether one request or multipart.
        with pytest.raises(BlobExists):
            await s.put("evidence/o/c/b1.zip", b"forged", retain_until=until)
        with pytest.raises(BlobExists):
            await s.put_file("evidence/o/c/b2.zip", big, retain_until=until)
        assert await s.get("evidence/o/c/b1.zip") == b"sealed bundle"
        # The store's delete (every version) meets the lock.
        with pytest.raises(BlobBackendError) as refused:
            await s.delete("evidence/o/c/b1.zip")
        assert refused.value.code == "AccessDenied"

        # Anyone with the same credentials, bypassing the store's code: an overwrite only stacks a new
        # version and a delete only a marker; the sealed version stays, and cannot be removed or shortened.
        await admin.put_object(Bucket=bucket, Key="evidence/o/c/b1.zip", Body=b"forged")
        await admin.delete_object(Bucket=bucket, Key="evidence/o/c/b1.zip")
        for attempt in (
            admin.delete_object(Bucket=bucket, Key="evidence/o/c/b1.zip", VersionId=versions["evidence/o/c/b1.zip"]),
            admin.delete_object(Bucket=bucket, Key="evidence/o/c/b1.zip", VersionId=versions["evidence/o/c/b1.zip"],
                                BypassGovernanceRetention=True),
            admin.put_object_retention(Bucket=bucket, Key="evidence/o/c/b1.zip",
                                       VersionId=versions["evidence/o/c/b1.zip"],
                                       Retention={"Mode": "GOVERNANCE", "RetainUntilDate": until}),
        ):
            with pytest.raises(ClientError) as caught:
                await attempt
            assert caught.value.response["Error"]["Code"] == "AccessDenied"
        sealed = await admin.get_object(Bucket=bucket, Key="evidence/o/c/b1.zip",
                                        VersionId=versions["evidence/o/c/b1.zip"])
        assert await sealed["Body"].read() == b"sealed bundle"

        # Past retain_until the lock is over: the store's delete removes every version and marker.
        await asyncio.sleep(max(0.0, (until - datetime.now(UTC)).total_seconds()) + 1.5)
        for key in versions:
            await s.delete(key)
        left = await admin.list_object_versions(Bucket=bucket)
        assert not left.get("Versions") and not left.get("DeleteMarkers")
    finally:
        await s.aclose()


async def test_a_versioned_buckets_delete_removes_every_version(
        s3_endpoint: S3Endpoint, bucket: str, admin: Any) -> None:
    """Erasure and retention must not leave a recording's earlier versions behind (governance lock mode,
    so a bucket default would be bypassable; plain puts carry no lock at all)."""
    s = store(s3_endpoint, bucket, object_lock="governance")
    await s.start()
    try:
        await s.put("recordings/o/c/a.wav", b"first")
        await s.put("recordings/o/c/a.wav", b"second")  # an ordinary put still replaces
        await s.put("recordings/o/c/a.wav.bak", b"neighbour")  # same prefix, another key: kept
        listed = await admin.list_object_versions(Bucket=bucket, Prefix="recordings/o/c/a.wav")
        assert len([v for v in listed["Versions"] if v["Key"] == "recordings/o/c/a.wav"]) == 2
        await s.delete("recordings/o/c/a.wav")
        await s.delete("recordings/o/c/a.wav")  # idempotent
        listed = await admin.list_object_versions(Bucket=bucket, Prefix="recordings/")
        assert [v["Key"] for v in listed.get("Versions", [])] == ["recordings/o/c/a.wav.bak"]
        assert not listed.get("DeleteMarkers")
        # A governance-locked version yields to its remover only with the bypass permission (weed's Admin
        # identity has it; the application role should not).
        until = datetime.now(UTC) + timedelta(days=1)
        await s.put("evidence/o/c/g.zip", b"g", retain_until=until)
        with pytest.raises(BlobBackendError):
            await s.delete("evidence/o/c/g.zip")
        head = await admin.head_object(Bucket=bucket, Key="evidence/o/c/g.zip")
        assert head["ObjectLockMode"] == "GOVERNANCE"
        await admin.delete_object(Bucket=bucket, Key="evidence/o/c/g.zip", VersionId=head["VersionId"],
                                  BypassGovernanceRetention=True)
        await s.delete("recordings/o/c/a.wav.bak")
    finally:
        await s.aclose()


# -- the local store ---------------------------------------------------------------------------------


async def test_the_local_store_keeps_write_once_and_has_no_lock_or_encryption(tmp_path: Path) -> None:
    local = LocalBlobStore(tmp_path / "blobs", b"k" * 32)
    await local.start()
    until = datetime.now(UTC) + timedelta(days=1)
    await local.put("evidence/o/c/b.zip", b"sealed", retain_until=until)
    with pytest.raises(BlobExists):
        await local.put("evidence/o/c/b.zip", b"forged", retain_until=until)
    src = tmp_path / "x.zip"
    src.write_bytes(b"forged too")
    with pytest.raises(BlobExists):
        await local.put_file("evidence/o/c/b.zip", src, retain_until=until)
    assert await local.get("evidence/o/c/b.zip") == b"sealed"
    assert [p.name for p in (local.root / "evidence/o/c").iterdir()] == ["b.zip"]  # no temp file left
    # A plain put still replaces, and nothing stops a delete: the filesystem's permissions are the guard.
    await local.put("evidence/o/c/b.zip", b"replaced")
    await local.delete("evidence/o/c/b.zip")
