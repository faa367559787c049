"""Opening and closing the three storage tiers from ``Settings``.

Each tier uses its configured URL, or starts its embedded default (``storage.embedded``) under
``settings.data_dir``: PostgreSQL (``DATABASE_URL``), Redis (``REDIS_URL``) and, for the cold tier,
S3 (``S3_ENDPOINT_URL``, or AWS when only credentials are set) or a local directory with signed URLs.
Start-up blocks nowhere on the event loop: embedded servers start in threads.

The data directory belongs to one server at a time (``storage.lifeline.DataDirLock``, held until
``aclose``): what a start-up finds there (a postmaster, a Valkey, spool files) was left by a run that
is over.  Embedded servers are watched by ``supervise`` (``api.supervisor``) and restarted if they die.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from api.auth import BOOTSTRAP_ORG_ID
from api.settings import Settings
from api.supervisor import TierSupervisor
from storage import embedded
from storage.accounts import register_bootstrap_credentials
from storage.blobs import BlobStore, LocalBlobStore, S3BlobStore
from storage.db import APP_ROLE, Database, database_of, ensure_database, migrate, with_database, with_user
from storage.lifeline import DataDirLock
from storage.warm import EventBus, WarmStore
from storage.writer import PersistWriter

log = logging.getLogger("switchboard.tiers")

DEFAULT_ORG_ID = BOOTSTRAP_ORG_ID  # the organisation of credentials configured by environment


@dataclass
class Tiers:
    db: Database
    writer: PersistWriter
    warm: WarmStore
    bus: EventBus
    blobs: BlobStore
    local_blobs: LocalBlobStore | None = None
    _embedded: list[Any] = field(default_factory=list)
    lock: DataDirLock | None = None
    supervisor: TierSupervisor | None = None

    @property
    def embedded(self) -> dict[str, Any]:
        """The embedded servers by tier name ("postgres", "redis"); configured URLs are not here."""
        return by_tier(self._embedded)

    def supervise(self, interval_s: float = 1.0, backoff_max_s: float = 30.0) -> None:
        """Restart the embedded servers when they die, until ``aclose``."""
        self.supervisor = TierSupervisor(self.embedded, interval_s=interval_s, backoff_max_s=backoff_max_s)
        self.supervisor.start()

    async def aclose(self, drain_s: float = 10.0) -> None:
        if self.supervisor is not None:
            await self.supervisor.aclose()  # first: a server stopped below must stay stopped
        await self.writer.aclose(drain_s)
        await self.db.aclose()
        await self.warm.aclose()
        await self.blobs.aclose()
        await _shutdown(self._embedded)
        if self.lock is not None:
            self.lock.release()


def by_tier(servers: list[Any]) -> dict[str, Any]:
    """Started embedded servers by tier name ("postgres", "redis"), as ``TierSupervisor`` takes them."""
    names = {embedded.EmbeddedPostgres: "postgres", embedded.EmbeddedValkey: "redis"}
    return {names[type(x)]: x for x in servers if type(x) in names}


async def redis_url_for(s: Settings, started: list[Any]) -> str:
    """``REDIS_URL``, or the embedded Valkey (started, and listed in ``started``)."""
    if s.redis_url is not None:
        return s.redis_url.get_secret_value()
    valkey = await asyncio.to_thread(embedded.start_valkey, s.data_dir.resolve() / "valkey")
    started.append(valkey)
    return str(valkey.url)


def local_blob_store(s: Settings) -> LocalBlobStore | None:
    """The embedded cold tier, or None when S3 is configured (an endpoint, or credentials for AWS).

    Built before start-up because its download route must be added before the app starts.
    """
    if s.s3_endpoint_url or s.s3_access_key_id:
        return None
    if s.blob_signing_key is None:
        log.warning("config.random_blob_signing_key",
                    extra={"hint": "set SWITCHBOARD_BLOB_SIGNING_KEY so download URLs survive a restart"})
        key = secrets.token_bytes(32)
    else:
        key = s.blob_signing_key.get_secret_value().encode()
    return LocalBlobStore(s.data_dir.resolve() / "blobs", key, base_url=s.public_base_url)


def s3_blob_store(s: Settings) -> S3BlobStore:
    return S3BlobStore(
        s.s3_endpoint_url, s.s3_bucket,
        s.s3_access_key_id.get_secret_value() if s.s3_access_key_id else None,
        s.s3_secret_access_key.get_secret_value() if s.s3_secret_access_key else None,
        region=s.s3_region, sse=s.s3_sse, sse_kms_key_id=s.s3_sse_kms_key_id, object_lock=s.s3_object_lock,
    )


def cold_tier(s: Settings) -> BlobStore:
    """The cold tier this configuration names, for a command run beside the server (not started)."""
    local = local_blob_store(s)
    return local if local is not None else s3_blob_store(s)


async def open_tiers(settings: Settings, local: LocalBlobStore | None) -> Tiers:
    """Open every tier; ``local`` is ``local_blob_store(settings)``'s result.

    Raises ``storage.lifeline.DataDirInUse`` when another running server holds the data directory.
    """
    lock = DataDirLock(settings.lock_dir)
    await asyncio.to_thread(lock.acquire)
    started: list[Any] = []
    try:
        tiers = await _open(settings, local, started)
    except BaseException:
        await _shutdown(started)
        lock.release()
        raise
    tiers.lock = lock
    return tiers


async def _shutdown(servers: list[Any]) -> None:
    """Stop embedded servers, last started first (blocking calls: in a thread)."""
    for server in reversed(servers):
        await asyncio.to_thread(server.shutdown)


async def _admin_url(s: Settings, started: list[Any]) -> str:
    """The migrator's URL: ``DATABASE_URL``, or the embedded server (started, and listed in ``started``)."""
    if s.database_url is None:
        pg = await asyncio.to_thread(embedded.start_postgres, s.data_dir.resolve() / "postgres")
        started.append(pg)
        await ensure_database(pg.uri, s.database_name)
        return with_database(pg.uri, s.database_name)
    admin_url = s.database_url.get_secret_value()
    await ensure_database(admin_url, database_of(admin_url))
    return admin_url


async def migrate_only(s: Settings) -> list[str]:
    """``switchboard migrate``: apply pending migrations, and nothing else."""
    started: list[Any] = []
    lock = DataDirLock(s.data_dir.resolve())
    if s.database_url is None:  # the embedded server lives in the data directory
        await asyncio.to_thread(lock.acquire)
    try:
        admin_url = await _admin_url(s, started)
        password = s.database_app_password.get_secret_value() if s.database_app_password else None
        return await migrate(admin_url, app_password=password)
    finally:
        await _shutdown(started)
        lock.release()


async def _open(s: Settings, local: LocalBlobStore | None, started: list[Any]) -> Tiers:
    # Hot tier
    app_password = s.database_app_password.get_secret_value() if s.database_app_password else None
    admin_url = await _admin_url(s, started)
    if s.migrate_on_start:
        await migrate(admin_url, app_password=app_password)
    app_url = s.database_app_url.get_secret_value() if s.database_app_url else with_user(admin_url, APP_ROLE,
                                                                                          app_password)
    db = Database(app_url, max_size=s.db_pool_max)
    await db.open()
    async with db.tenant(DEFAULT_ORG_ID) as conn:
        registered = await register_bootstrap_credentials(
            conn, media_token=s.telnyx_stream_token.get_secret_value() if s.telnyx_stream_token else None,
            api_key=s.bootstrap_api_key.get_secret_value() if s.bootstrap_api_key else None)
    if registered:
        log.info("tiers.bootstrap_credentials_registered", extra={"registered": registered})
    writer = PersistWriter(db, max_items=s.writer_max_items, batch=s.writer_batch)
    writer.start()

    # Warm tier
    warm = WarmStore.from_url(await redis_url_for(s, started))
    await warm.ping()
    bus = EventBus(warm.redis)

    # Cold tier
    blobs: BlobStore = local if local is not None else s3_blob_store(s)
    await blobs.start()
    log.info("tiers.open", extra={"embedded": [type(x).__name__ for x in started],
                                  "cold_tier": type(blobs).__name__})
    return Tiers(db, writer, warm, bus, blobs, local, started)
