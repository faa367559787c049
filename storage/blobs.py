"""The cold tier: immutable blobs (call recordings, exports) in S3 or in a local directory.

Contract (``BlobStore``): call ``start`` once before anything else and ``aclose`` once at shutdown.
``put``/``put_file`` replace the whole object (readers see the old or the new bytes, never a mix),
except a write-once put (``retain_until`` given: evidence), which never replaces anything and raises
``BlobExists`` instead; ``get`` returns the whole object in memory, so use it for small blobs and hand
large ones out with ``presign_get``, a URL anyone can GET without credentials until it expires;
``delete`` is idempotent and removes every version of the key (see "Versioned buckets").

Two implementations:

- ``S3BlobStore``: any S3-compatible server through aioboto3 (path-style SigV4 when an endpoint is
  given, e.g. SeaweedFS or MinIO; botocore defaults for AWS). ``put_file`` switches to a multipart
  upload above ``part_size`` and aborts that upload on any failure, so no orphaned parts are billed.
- ``LocalBlobStore``: the embedded default, files under a root directory, atomic writes, URLs signed
  with HMAC-SHA256 and served by ``api.blobs``.  It ignores the encryption and object-lock settings
  below (a directory has neither; use an encrypted filesystem); a write-once put is refused when the
  file exists (a hard link, atomic), and nothing else guards it.

Server-side encryption (S3 only; ``sse``, ``SWITCHBOARD_S3_SSE``).  Every PutObject and
CreateMultipartUpload carries the header; there is no CopyObject here.  ``start`` writes a probe
object with the header (and deletes it) to learn what the store does::

    sse        the store takes the probe   and says so (x-amz-server-side-encryption)   then
    off        (no probe)                                                                no header
    auto       yes                         yes                                           AES256
    auto       yes                         no: it ignores the header                     no header, warned
    auto       no (and takes it without)                                                 no header, warned
    AES256,    yes                         yes                                           the header
    aws:kms    yes                         no                                            the header, warned
               no (and takes it without)                                                 start fails
                                                                                         (BlobConfigError)

``aws:kms`` sends ``SSEKMSKeyId`` when ``sse_kms_key_id`` is set (else the store's default KMS key).
A probe that fails without the header too is the store failing, raised as such.

Object Lock (S3 only; ``object_lock``, ``SWITCHBOARD_S3_OBJECT_LOCK`` = off | governance | compliance).
A write-once put (``retain_until``) sends ``If-None-Match: *`` always (the store refuses to replace
an existing key: ``BlobExists``) and, with a lock mode, ``x-amz-object-lock-mode`` and
``-retain-until-date``: the store then refuses to delete or shorten that version before the date
(COMPLIANCE: nobody; GOVERNANCE: only a principal allowed ``s3:BypassGovernanceRetention``).  With a
lock mode ``start`` creates a missing bucket with Object Lock enabled, and refuses to start
(``BlobConfigError``) when the bucket's ``GetObjectLockConfiguration`` does not say ``Enabled``:
Object Lock can only be enabled when a bucket is made (or by AWS support), never silently later.

Versioned buckets (Object Lock implies versioning).  An overwrite adds a version and a plain delete
only adds a delete marker, leaving every earlier version stored: retention and erasure would keep the
bytes they mean to remove.  So when ``start`` finds versioning on (or suspended), ``delete`` removes
every version and delete marker of the key (ListObjectVersions, then DeleteObject per VersionId);
a locked version is refused by the store (``BlobBackendError`` AccessDenied), which is the point.

Bounds: keys are 1-1024 UTF-8 bytes of '/'-separated segments, none empty, '.' or '..', no leading
'/', no control characters (so a key can never name a path outside the local root). Presigned URLs
live 1..``presign_max_s`` seconds (longer requests are capped). Multipart parts are ``part_size``
bytes (>= 5 MiB, S3's minimum for all but the last part), grown if a file would need > 10,000 parts.

Errors::

    BlobError
     +-- InvalidBlobKey (also ValueError)    bad key: a caller bug, HTTP 400
     +-- BlobNotFound (also KeyError)        get of a missing key: HTTP 404
     +-- BlobBackendError                    S3 refused or failed (auth, network, ...): HTTP 502/503

Invalid constructor arguments and ``expires_s <= 0`` raise a plain ``ValueError``. Local I/O failures
surface as ``OSError`` (but a key that names an existing directory, e.g. ``a`` after ``a/b``, reads as
``BlobNotFound``; writing ``a/b`` after ``a`` fails: unlike S3, a local key cannot also be a prefix).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import quote

from engine.errors import StorageError

log = logging.getLogger("switchboard.blobs")

MAX_KEY_BYTES = 1024
MIN_PART_SIZE = 5 << 20
MAX_PARTS = 10_000
MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4 refuses longer
DEFAULT_CONTENT_TYPE = "application/octet-stream"


class BlobError(StorageError):
    """Base of every error this module raises on purpose."""


class InvalidBlobKey(BlobError, ValueError):
    """The key (or expiry) breaks the bounds in the module docstring."""


class BlobNotFound(BlobError, KeyError):
    """No blob under this key."""


class BlobBackendError(BlobError):
    """The S3 server refused or failed the request; ``code`` is its error code (e.g. ``403``)."""

    def __init__(self, op: str, code: str, message: str) -> None:
        super().__init__(f"S3 {op} failed: {code}: {message}")
        self.op = op
        self.code = code


class BlobExists(BlobError):
    """A write-once put found the key taken (S3: 412 PreconditionFailed on ``If-None-Match: *``)."""


class BlobConfigError(BlobError):
    """The store cannot do what the settings ask (encryption it refuses, Object Lock the bucket lacks)."""


# -- the S3 request arguments, no I/O ---------------------------------------------------------------

SSE_SETTINGS = ("auto", "off", "AES256", "aws:kms")
LOCK_MODES = {"off": None, "governance": "GOVERNANCE", "compliance": "COMPLIANCE"}
EXISTS_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})
PROBE_PREFIX = "_switchboard/probe/"


def encryption_args(sse: str | None, kms_key_id: str | None = None) -> dict[str, str]:
    """The PutObject/CreateMultipartUpload arguments for ``sse`` (None: none)."""
    if sse is None:
        return {}
    if sse not in ("AES256", "aws:kms"):
        raise ValueError(f"no such server-side encryption: {sse!r}")
    args = {"ServerSideEncryption": sse}
    if sse == "aws:kms" and kms_key_id:
        args["SSEKMSKeyId"] = kms_key_id
    return args


def lock_args(mode: str, retain_until: datetime | None) -> dict[str, Any]:
    """The Object Lock arguments of a put: none unless it is write-once and a lock mode is set."""
    if mode not in LOCK_MODES:
        raise ValueError(f"no such object lock mode: {mode!r}")
    if retain_until is None or LOCK_MODES[mode] is None:
        return {}
    if retain_until.tzinfo is None:
        raise ValueError("retain_until must be timezone-aware")
    return {"ObjectLockMode": LOCK_MODES[mode], "ObjectLockRetainUntilDate": retain_until}


def sse_after_probe(setting: str, *, accepted: bool, echoed: str | None) -> tuple[str | None, str | None]:
    """The module docstring's encryption table: (the header to send from now on, a warning or None).

    ``accepted``: the store took the probe with the header; ``echoed``: the encryption its answer named.
    Raises ``BlobConfigError`` for an explicit setting the store refuses."""
    if setting == "off":
        return None, None
    wanted = "AES256" if setting == "auto" else setting
    if not accepted:
        if setting == "auto":
            return None, "the store refuses server-side encryption (AES256): objects are stored as sent"
        raise BlobConfigError(f"SWITCHBOARD_S3_SSE={setting}: the store refuses it (set it to auto or off, or "
                              "configure the store's KMS)")
    if echoed == wanted:
        return wanted, None
    if setting == "auto":
        return None, "the store ignores the server-side encryption header: objects are stored as sent"
    return wanted, f"the store takes SSE {wanted} without confirming it: check its encryption at rest"


def validate_key(key: str) -> str:
    """Return ``key`` unchanged, or raise ``InvalidBlobKey`` saying which rule it breaks."""
    if not isinstance(key, str) or not key:
        raise InvalidBlobKey("blob key must be a non-empty string")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidBlobKey(f"blob key is longer than {MAX_KEY_BYTES} bytes")
    if key.startswith("/"):
        raise InvalidBlobKey(f"blob key must not start with '/': {key!r}")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise InvalidBlobKey(f"blob key contains a control character: {key!r}")
    if any(seg in ("", ".", "..") for seg in key.split("/")):
        raise InvalidBlobKey(f"blob key has an empty, '.' or '..' segment: {key!r}")
    return key


def _check_expiry(expires_s: int, cap: int) -> int:
    if expires_s <= 0:
        raise ValueError(f"expires_s must be positive, got {expires_s}")
    return min(int(expires_s), cap)


def _check_presign_max(presign_max_s: int) -> int:
    if not 0 < presign_max_s <= MAX_PRESIGN_S:
        raise ValueError(f"presign_max_s must be in 1..{MAX_PRESIGN_S}, got {presign_max_s}")
    return presign_max_s


class BlobStore(Protocol):
    async def start(self) -> None: ...

    async def put(self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE, *,
                  retain_until: datetime | None = None) -> None: ...

    async def put_file(self, key: str, path: Path, content_type: str = DEFAULT_CONTENT_TYPE, *,
                       retain_until: datetime | None = None) -> None: ...

    async def get(self, key: str) -> bytes: ...

    async def get_file(self, key: str, path: Path) -> int: ...

    async def list_keys(self, prefix: str, limit: int = 10_000) -> list[str]: ...

    async def delete(self, key: str) -> None: ...

    async def presign_get(self, key: str, expires_s: int = 300) -> str: ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...


class S3BlobStore:
    """Blobs in one S3 bucket, created by ``start`` if missing."""

    def __init__(self, endpoint_url: str | None, bucket: str, access_key: str | None, secret_key: str | None,
                 region: str = "us-east-1", part_size: int = 8 << 20, presign_max_s: int = 3600, *,
                 sse: str = "auto", sse_kms_key_id: str | None = None, object_lock: str = "off") -> None:
        import aioboto3
        from botocore.config import Config

        if not bucket:
            raise ValueError("bucket must be non-empty")
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3 minimum), got {part_size}")
        if sse not in SSE_SETTINGS:
            raise ValueError(f"sse must be one of {', '.join(SSE_SETTINGS)}, got {sse!r}")
        if sse_kms_key_id and sse != "aws:kms":
            raise ValueError("sse_kms_key_id is for sse='aws:kms' only")
        if object_lock not in LOCK_MODES:
            raise ValueError(f"object_lock must be one of {', '.join(LOCK_MODES)}, got {object_lock!r}")
        self.sse_setting = sse
        self.sse_kms_key_id = sse_kms_key_id
        self.object_lock = object_lock
        self.sse: str | None = None  # what puts send, decided by start's probe
        self.versioned = False  # learnt by start: deletes then remove every version
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.region = region
        self.part_size = part_size
        self.presign_max_s = _check_presign_max(presign_max_s)
        # The credentials live only inside the session: never in attributes, repr or logs.
        self._session = aioboto3.Session(aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                                         region_name=region)
        self._config = (Config(s3={"addressing_style": "path"}, signature_version="s3v4")
                        if endpoint_url is not None else None)
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    def __repr__(self) -> str:
        return f"S3BlobStore(endpoint_url={self.endpoint_url!r}, bucket={self.bucket!r}, region={self.region!r})"

    async def start(self) -> None:
        if self._client is not None:
            raise RuntimeError("S3BlobStore.start called twice")
        self._client = await self._stack.enter_async_context(
            self._session.client("s3", endpoint_url=self.endpoint_url, config=self._config))
        try:
            async with self._errors("HeadBucket"):
                await self._client.head_bucket(Bucket=self.bucket)
        except BlobBackendError as exc:
            if exc.code not in ("404", "NoSuchBucket", "NotFound"):
                await self.aclose()
                raise
            await self._create_bucket()
        try:
            await self._check_object_lock()
            self.versioned = await self._is_versioned()
            await self._probe_encryption()
        except BaseException:
            await self.aclose()
            raise
        log.info("blobs.s3_started", extra={"endpoint": self.endpoint_url, "bucket": self.bucket,
                                            "sse": self.sse, "object_lock": self.object_lock,
                                            "versioned": self.versioned})

    async def _check_object_lock(self) -> None:
        if LOCK_MODES[self.object_lock] is None:
            return
        try:
            async with self._errors("GetObjectLockConfiguration"):
                resp = await self._client.get_object_lock_configuration(Bucket=self.bucket)
        except BlobBackendError as exc:
            if exc.code not in ("ObjectLockConfigurationNotFoundError", "NotImplemented"):
                raise
            resp = {}
        if resp.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") != "Enabled":
            raise BlobConfigError(
                f"SWITCHBOARD_S3_OBJECT_LOCK={self.object_lock} but bucket {self.bucket!r} has no Object Lock: "
                "create a bucket with Object Lock enabled (or let this server create a missing one), or set it to off")

    async def _is_versioned(self) -> bool:
        try:
            async with self._errors("GetBucketVersioning"):
                resp = await self._client.get_bucket_versioning(Bucket=self.bucket)
        except BlobBackendError as exc:
            if exc.code in ("NotImplemented", "501"):  # a store without versions
                return False
            raise
        return resp.get("Status") in ("Enabled", "Suspended")  # suspended: earlier versions may remain

    async def _probe_encryption(self) -> None:
        """The module docstring's encryption table, learnt by writing (and removing) one small object."""
        if self.sse_setting == "off":
            return
        wanted = "AES256" if self.sse_setting == "auto" else self.sse_setting
        key = f"{PROBE_PREFIX}{os.urandom(8).hex()}"  # per start: nodes starting together do not meet
        accepted, echoed = True, None
        try:
            async with self._errors("PutObject"):
                resp = await self._client.put_object(Bucket=self.bucket, Key=key, Body=b"probe",
                                                      **encryption_args(wanted, self.sse_kms_key_id))
            echoed = resp.get("ServerSideEncryption")
        except BlobBackendError as refused:
            accepted = False
            try:  # without the header: if this fails too, the store is failing, not refusing encryption
                async with self._errors("PutObject"):
                    await self._client.put_object(Bucket=self.bucket, Key=key, Body=b"probe")
            except BlobBackendError:
                raise refused from None
        try:
            self.sse, warning = sse_after_probe(self.sse_setting, accepted=accepted, echoed=echoed)
        finally:
            try:
                await self.delete(key)
            except BlobError as exc:  # a bucket default retention locks even the probe: harmless, say so
                log.warning("blobs.probe_not_deleted", extra={"bucket": self.bucket, "error": exc.code
                                                              if isinstance(exc, BlobBackendError) else str(exc)})
        if warning:
            log.warning("blobs.sse_unavailable", extra={"bucket": self.bucket, "sse": self.sse_setting,
                                                        "detail": warning})

    async def _create_bucket(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        if LOCK_MODES[self.object_lock] is not None:  # only possible now: never added to a bucket later
            kwargs["ObjectLockEnabledForBucket"] = True
        try:
            async with self._errors("CreateBucket"):
                await self._client.create_bucket(**kwargs)
        except BlobBackendError as exc:
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):  # lost a race: fine
                await self.aclose()
                raise

    async def put(self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE, *,
                  retain_until: datetime | None = None) -> None:
        client = self._require(key)
        once = {"IfNoneMatch": "*"} if retain_until is not None else {}
        async with self._exists_as(key), self._errors("PutObject"):
            await client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type,
                                    **encryption_args(self.sse, self.sse_kms_key_id),
                                    **lock_args(self.object_lock, retain_until), **once)

    async def put_file(self, key: str, path: Path, content_type: str = DEFAULT_CONTENT_TYPE, *,
                       retain_until: datetime | None = None) -> None:
        """Upload ``path``; above ``part_size`` in parts, holding one part in memory at a time."""
        client = self._require(key)
        size = (await asyncio.to_thread(os.stat, path)).st_size
        if size <= self.part_size:
            await self.put(key, await asyncio.to_thread(Path(path).read_bytes), content_type,
                           retain_until=retain_until)
            return
        part_size = max(self.part_size, -(-size // MAX_PARTS))
        async with self._errors("CreateMultipartUpload"):
            # Encryption and the lock belong to the upload's creation; the object inherits them.
            upload = await client.create_multipart_upload(Bucket=self.bucket, Key=key, ContentType=content_type,
                                                          **encryption_args(self.sse, self.sse_kms_key_id),
                                                          **lock_args(self.object_lock, retain_until))
        upload_id = upload["UploadId"]
        once = {"IfNoneMatch": "*"} if retain_until is not None else {}
        try:
            parts = [part async for part in self._upload_parts(key, upload_id, path, part_size)]
            async with self._exists_as(key), self._errors("CompleteMultipartUpload"):
                await client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                       MultipartUpload={"Parts": parts}, **once)
        except BaseException:
            # Also on cancellation: parts of an unfinished upload are stored (and billed) until aborted.
            with contextlib.suppress(Exception):
                await client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            log.warning("blobs.multipart_aborted", extra={"bucket": self.bucket, "key": key})
            raise

    async def _upload_parts(self, key: str, upload_id: str, path: Path,
                            part_size: int) -> AsyncIterator[dict[str, Any]]:
        f: BinaryIO = await asyncio.to_thread(open, path, "rb")
        try:
            number = 1
            while chunk := await asyncio.to_thread(f.read, part_size):
                async with self._errors("UploadPart"):
                    resp = await self._client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                          PartNumber=number, Body=chunk)
                yield {"PartNumber": number, "ETag": resp["ETag"]}
                number += 1
        finally:
            await asyncio.to_thread(f.close)

    async def get(self, key: str) -> bytes:
        client = self._require(key)
        try:
            async with self._errors("GetObject"):
                resp = await client.get_object(Bucket=self.bucket, Key=key)
                async with resp["Body"] as body:
                    return bytes(await body.read())
        except BlobBackendError as exc:
            if exc.code in ("NoSuchKey", "404", "NotFound"):
                raise BlobNotFound(key) from exc
            raise

    async def get_file(self, key: str, path: Path) -> int:
        """Write the object to ``path`` (replaced), a chunk in memory at a time; returns its size."""
        client = self._require(key)
        size = 0
        try:
            async with self._errors("GetObject"):
                resp = await client.get_object(Bucket=self.bucket, Key=key)
                f: BinaryIO = await asyncio.to_thread(open, path, "wb")
                try:
                    body = resp["Body"]  # aiobotocore's StreamingBody: read(amt) a chunk at a time
                    while chunk := await body.read(1 << 20):
                        size += len(chunk)
                        await asyncio.to_thread(f.write, chunk)
                finally:
                    resp["Body"].close()
                    await asyncio.to_thread(f.close)
        except BlobBackendError as exc:
            if exc.code in ("NoSuchKey", "404", "NotFound"):
                raise BlobNotFound(key) from exc
            raise
        return size

    async def list_keys(self, prefix: str, limit: int = 10_000) -> list[str]:
        """Keys under ``prefix`` (a whole-segment prefix ending in '/'), sorted, at most ``limit``."""
        client = self._require(prefix.rstrip("/") or "x")
        keys: list[str] = []
        async with self._errors("ListObjectsV2"):
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
                if len(keys) >= limit:
                    break
        return sorted(keys)[:limit]

    async def delete(self, key: str) -> None:
        client = self._require(key)
        if not self.versioned:
            async with self._errors("DeleteObject"):
                await client.delete_object(Bucket=self.bucket, Key=key)
            return
        # Every version and delete marker of exactly this key (the listing is by prefix).
        async with self._errors("ListObjectVersions"):
            versions = []
            async for page in client.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=key):
                versions += [v["VersionId"] for v in page.get("Versions", []) + page.get("DeleteMarkers", [])
                             if v["Key"] == key]
        for version in versions:
            async with self._errors("DeleteObject"):
                await client.delete_object(Bucket=self.bucket, Key=key, VersionId=version)

    async def presign_get(self, key: str, expires_s: int = 300) -> str:
        client = self._require(key)
        expires = _check_expiry(expires_s, self.presign_max_s)
        url: str = await client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires)
        return url

    async def ping(self) -> None:
        """Raise ``BlobBackendError`` unless the bucket answers (HeadBucket; for readiness checks)."""
        if self._client is None:
            raise RuntimeError("S3BlobStore used before start() or after aclose()")
        async with self._errors("HeadBucket"):
            await self._client.head_bucket(Bucket=self.bucket)

    async def aclose(self) -> None:
        """Close the client; safe to call more than once."""
        self._client = None
        await self._stack.aclose()

    def _require(self, key: str) -> Any:
        """The open client, once ``key`` is known to be valid."""
        validate_key(key)
        if self._client is None:
            raise RuntimeError("S3BlobStore used before start() or after aclose()")
        return self._client

    @contextlib.asynccontextmanager
    async def _exists_as(self, key: str) -> AsyncIterator[None]:
        """A write-once put's refusal (412 on ``If-None-Match: *``) as ``BlobExists``."""
        try:
            yield
        except BlobBackendError as exc:
            if exc.code in EXISTS_CODES:
                raise BlobExists(f"write-once key already holds an object: {key}") from exc
            raise

    @contextlib.asynccontextmanager
    async def _errors(self, op: str) -> AsyncIterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            err = exc.response.get("Error", {})
            raise BlobBackendError(op, str(err.get("Code", "?")), str(err.get("Message", ""))) from exc
        except BotoCoreError as exc:
            raise BlobBackendError(op, type(exc).__name__, str(exc)) from exc


class LocalBlobStore:
    """Blobs as files under ``root``; ``presign_get`` URLs are checked by ``verify`` (see ``api.blobs``)."""

    def __init__(self, root: Path, signing_key: bytes, base_url: str = "", presign_max_s: int = 3600) -> None:
        if len(signing_key) < 16:
            raise ValueError("signing_key must be at least 16 bytes")
        self.root = Path(root).absolute()
        self.base_url = base_url.rstrip("/")
        self.presign_max_s = _check_presign_max(presign_max_s)
        self._signing_key = bytes(signing_key)

    def __repr__(self) -> str:
        return f"LocalBlobStore(root={str(self.root)!r}, base_url={self.base_url!r})"

    async def start(self) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)

    def path_for(self, key: str) -> Path:
        """The file for ``key``; always inside ``root`` (checked lexically, no I/O). Raises ``InvalidBlobKey``."""
        path = self.root.joinpath(*validate_key(key).split("/"))
        if os.path.commonpath([self.root, path]) != str(self.root):  # unreachable after validate_key
            raise InvalidBlobKey(f"blob key escapes the store: {key!r}")
        return path

    async def put(self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE, *,
                  retain_until: datetime | None = None) -> None:
        """``retain_until``: write-once (``BlobExists`` if the key is taken); no lock, no encryption here."""
        await asyncio.to_thread(self._write_atomic, self.path_for(key), lambda f: f.write(data),
                                retain_until is not None)

    async def put_file(self, key: str, path: Path, content_type: str = DEFAULT_CONTENT_TYPE, *,
                       retain_until: datetime | None = None) -> None:
        def copy(dst: BinaryIO) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)

        await asyncio.to_thread(self._write_atomic, self.path_for(key), copy, retain_until is not None)

    @staticmethod
    def _write_atomic(target: Path, write: Any, once: bool = False) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            if once:
                try:  # link(2) creates the name only if it is free: no window between a check and the write
                    os.link(tmp, target)
                except FileExistsError:
                    raise BlobExists(f"write-once key already holds an object: {target.name}") from None
                os.unlink(tmp)
            else:
                os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    async def get(self, key: str) -> bytes:
        path = self.path_for(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise BlobNotFound(key) from exc

    async def get_file(self, key: str, path: Path) -> int:
        src = self.path_for(key)
        try:
            await asyncio.to_thread(shutil.copyfile, src, path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise BlobNotFound(key) from exc
        return (await asyncio.to_thread(os.stat, path)).st_size

    async def list_keys(self, prefix: str, limit: int = 10_000) -> list[str]:
        base = self.path_for(prefix.rstrip("/"))

        def walk() -> list[str]:
            if not base.is_dir():
                return []
            found = sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*")
                           if p.is_file() and not p.name.startswith("."))  # not an atomic write's temp file
            return found[:limit]

        return await asyncio.to_thread(walk)

    async def delete(self, key: str) -> None:
        path = self.path_for(key)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            await asyncio.to_thread(path.unlink)

    async def presign_get(self, key: str, expires_s: int = 300) -> str:
        validate_key(key)
        expires = int(time.time()) + _check_expiry(expires_s, self.presign_max_s)
        return f"{self.base_url}/api/blobs/{quote(key, safe='/')}?expires={expires}&sig={self._sign(key, expires)}"

    def verify(self, key: str, expires: int, sig: str, now: float | None = None) -> bool:
        """True when ``sig`` is this store's signature of ``key`` and ``expires`` has not passed."""
        now = time.time() if now is None else now
        try:
            validate_key(key)
        except InvalidBlobKey:
            return False
        if expires < now or expires > now + self.presign_max_s + 60:  # 60 s: presign rounds, clocks step
            return False
        # Compare as bytes: compare_digest refuses non-ASCII str, and sig is attacker-controlled.
        return hmac.compare_digest(self._sign(key, expires).encode(), sig.encode("utf-8", "surrogatepass"))

    def _sign(self, key: str, expires: int) -> str:
        return hmac.new(self._signing_key, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    async def ping(self) -> None:
        """Raise ``OSError`` unless the root is a directory this process may write (for readiness checks)."""
        def check() -> None:
            if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
                raise OSError(f"{self.root} is not a writable directory")

        await asyncio.to_thread(check)

    async def aclose(self) -> None:
        pass
