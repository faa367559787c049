"""The cold tier: immutable blobs (call recordings, exports) in S3 or in a local directory.

Contract (``BlobStore``): call ``start`` once before anything else and ``aclose`` once at shutdown.
``put``/``put_file`` replace the whole object (readers see the old or the new bytes, never a mix);
``get`` returns the whole object in memory, so use it for small blobs and hand large ones out with
``presign_get``, a URL anyone can GET without credentials until it expires; ``delete`` is idempotent.

Two implementations:

- ``S3BlobStore``: any S3-compatible server through aioboto3 (path-style SigV4 when an endpoint is
  given, e.g. SeaweedFS or MinIO; botocore defaults for AWS). ``put_file`` switches to a multipart
  upload above ``part_size`` and aborts that upload on any failure, so no orphaned parts are billed.
- ``LocalBlobStore``: the embedded default, files under a root directory, atomic writes, URLs signed
  with HMAC-SHA256 and served by ``api.blobs``.

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

    async def put(self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> None: ...

    async def put_file(self, key: str, path: Path, content_type: str = DEFAULT_CONTENT_TYPE) -> None: ...

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
                 region: str = "us-east-1", part_size: int = 8 << 20, presign_max_s: int = 3600) -> None:
        import aioboto3
        from botocore.config import Config

        if not bucket:
            raise ValueError("bucket must be non-empty")
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3 minimum), got {part_size}")
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
        log.info("blobs.s3_started", extra={"endpoint": self.endpoint_url, "bucket": self.bucket})

    async def _create_bucket(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            async with self._errors("CreateBucket"):
                await self._client.create_bucket(**kwargs)
        except BlobBackendError as exc:
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):  # lost a race: fine
                await self.aclose()
                raise

    async def put(self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> None:
        client = self._require(key)
        async with self._errors("PutObject"):
            await client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)

    async def put_file(self, key: str, path: Path, content_type: str = DEFAULT_CONTENT_TYPE) -> None:
        """Upload ``path``; above ``part_size`` in parts, holding one part in memory at a time."""
        client = self._require(key)
        size = (await asyncio.to_thread(os.stat, path)).st_size
        if size <= self.part_size:
            await self.put(key, await asyncio.to_thread(Path(path).read_bytes), content_type)
            return
        part_size = max(self.part_size, -(-size // MAX_PARTS))
        async with self._errors("CreateMultipartUpload"):
            upload = await client.create_multipart_upload(Bucket=self.bucket, Key=key, ContentType=content_type)
        upload_id = upload["UploadId"]
        try:
            parts = [part async for part in self._upload_parts(key, upload_id, path, part_size)]
            async with self._errors("CompleteMultipartUpload"):
                await client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                       MultipartUpload={"Parts": parts})
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
        async with self._errors("DeleteObject"):
            await client.delete_object(Bucket=self.bucket, Key=key)

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

    async def put(self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> None:
        await asyncio.to_thread(self._write_atomic, self.path_for(key), lambda f: f.write(data))

    async def put_file(self, key: str, path: Path, content_type: str = DEFAULT_CONTENT_TYPE) -> None:
        def copy(dst: BinaryIO) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)

        await asyncio.to_thread(self._write_atomic, self.path_for(key), copy)

    @staticmethod
    def _write_atomic(target: Path, write: Any) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
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
