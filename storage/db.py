"""The hot tier: PostgreSQL through asyncpg, with tenant isolation enforced by the database.

Two roles, two connections:

- The **migrator** connects with the administrative URL (``DATABASE_URL``: the superuser on the
  embedded server, or a role with CREATEROLE that will own the tables), creates the database if
  needed, creates the application role ``switchboard_app`` (LOGIN, NOSUPERUSER, NOBYPASSRLS, owner of
  nothing) and applies ``storage/migrations/*.sql`` in order, each once, in one transaction each,
  recorded with its checksum in ``schema_migrations``.  An applied file whose text changed is an error.
- The **application** (``Database``) connects as ``switchboard_app`` only.  Every tenant query runs
  inside ``async with db.tenant(org_id) as conn:``, a transaction whose first statement is
  ``set_config('app.org_id', org_id, true)``; the setting ends with the transaction, so a pooled
  connection never carries one tenant's identity into the next use.  The pool is asyncpg's own with
  its default ``reset`` (never a custom one).

Every statement is parameterized.  ``Database.tenant`` is the only way to reach tenant rows.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import asyncpg
import orjson

from engine.errors import StorageError

log = logging.getLogger("switchboard.db")

APP_ROLE = "switchboard_app"
MIGRATIONS = Path(__file__).parent / "migrations"
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def rows_affected(status: str) -> int:
    """The row count of a command tag such as ``DELETE 3`` or ``UPDATE 1``."""
    return int(status.rsplit(" ", 1)[-1])


async def live_orgs(db: Database) -> list[uuid.UUID]:
    """Every live organisation's id, for the jobs that run across tenants (``retention_orgs()``, 0010)."""
    async with db.no_tenant() as conn:
        return [r[0] for r in await conn.fetch("SELECT * FROM retention_orgs()")]


# Advisory lock keys (one bigint space per database), one per job that must run on one node at a time.
# Session-level locks, held on a connection of their own for the whole run (``Database.run_alone``): a
# transaction-level lock would end at the first of the job's many batch commits.
ADVISORY_LOCKS = {"migrate": 727274, "retention": 727275, "wipe": 727276, "bootstrap": 727277}


# The cold-tier objects a call owns (its recordings, its archived lines): what a purge, a wipe or an
# erasure deletes before the call's rows.  $1: the calls' ids.
CALL_OBJECTS_SQL = ("SELECT storage_key FROM recordings WHERE call_id = ANY($1) UNION ALL "
                    "SELECT archive_key FROM calls WHERE id = ANY($1) AND archive_key IS NOT NULL")


class MigrationError(StorageError, RuntimeError):
    """A migration failed, or an applied migration's text no longer matches its checksum."""


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database (path or ``?dbname``); the rest is kept."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("dbname", "database")]
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, urlencode(query), parts.fragment))


def with_user(url: str, user: str, password: str | None) -> str:
    """``url`` with other credentials (host, port, database and options kept)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    cred = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
    return urlunsplit((parts.scheme, f"{cred}@{host}", parts.path, parts.query, parts.fragment))


def database_of(url: str) -> str:
    parts = urlsplit(url)
    for k, v in parse_qsl(parts.query):
        if k in ("dbname", "database"):
            return v
    return parts.path.lstrip("/") or "postgres"


async def ensure_database(admin_url: str, database: str) -> None:
    """Create ``database`` if it does not exist.

    Connects to it first; only when it is missing does this connect to the server's ``postgres``
    database to create it (a managed database's role may not be allowed there otherwise).
    """
    try:
        conn = await asyncpg.connect(with_database(admin_url, database))
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return
    if not _DB_NAME.match(database):
        raise MigrationError(f"will not create a database named {database!r}: use [a-z_][a-z0-9_]*")
    conn = await asyncpg.connect(with_database(admin_url, "postgres"))
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
            try:
                await conn.execute(f'CREATE DATABASE "{database}"')  # identifier checked above; DDL takes no parameters
            except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                pass  # another node starting at the same moment created it first: that is all we wanted
    finally:
        await conn.close()


async def migrate(admin_url: str, *, app_password: str | None = None) -> list[str]:
    """Create the app role and apply pending migrations; returns the names applied this time."""
    conn = await asyncpg.connect(admin_url)
    applied: list[str] = []
    try:
        # One migrator at a time, across nodes starting together.
        await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCKS["migrate"])
        await _ensure_app_role(conn, app_password)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name text PRIMARY KEY, checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["name"]: r["checksum"] for r in await conn.fetch("SELECT name, checksum FROM schema_migrations")}
        for path in sorted(MIGRATIONS.glob("*.sql")):
            sql = path.read_text(encoding="utf-8")
            checksum = hashlib.sha256(sql.encode()).hexdigest()
            if path.name in done:
                if done[path.name] != checksum:
                    raise MigrationError(f"{path.name} changed after it was applied; add a new migration instead")
                continue
            try:
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations (name, checksum) VALUES ($1, $2)",
                                       path.name, checksum)
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"{path.name}: {exc}") from exc
            applied.append(path.name)
            log.info("db.migrated", extra={"migration": path.name})
    finally:
        await conn.close()
    return applied


async def _ensure_app_role(conn: asyncpg.Connection, password: str | None) -> None:
    exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", APP_ROLE)
    if not exists:
        await conn.execute(f"CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOINHERIT")
    else:
        await conn.execute(f"ALTER ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOINHERIT")
    if password:
        # ALTER ROLE takes no bind parameters: quote the literal with the server's own function.
        literal = await conn.fetchval("SELECT quote_literal($1)", password)
        await conn.execute(f"ALTER ROLE {APP_ROLE} PASSWORD {literal}")


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, schema="pg_catalog", encoder=lambda v: orjson.dumps(v).decode(),
                                  decoder=orjson.loads, format="text")


@dataclass(frozen=True, slots=True)
class PoolStats:
    size: int
    idle: int
    max_size: int


class Database:
    """The application's pool, connected as ``switchboard_app``.  Call ``open`` before use."""

    def __init__(self, app_url: str, *, min_size: int = 1, max_size: int = 10, command_timeout: float = 10.0,
                 connect_timeout: float = 5.0) -> None:
        self._url = app_url
        self._min = min_size
        self._max = max_size
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self._url, min_size=self._min, max_size=self._max, init=_init_connection,
            command_timeout=self._command_timeout, timeout=self._connect_timeout,
            max_inactive_connection_lifetime=300.0,
        )

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("Database.open() was not called")
        return self._pool

    def stats(self) -> PoolStats:
        p = self.pool
        return PoolStats(p.get_size(), p.get_idle_size(), p.get_max_size())

    @asynccontextmanager
    async def tenant(self, org_id: uuid.UUID | str, *,
                     acquire_timeout: float | None = 5.0) -> AsyncIterator[asyncpg.Connection]:
        """A transaction scoped to one tenant: RLS shows and accepts only ``org_id``'s rows.

        The tenant setting is transaction-local; it is gone when the block exits, commit or rollback.
        """
        org = str(uuid.UUID(str(org_id)))  # a malformed id fails here, before it reaches SQL
        async with self.pool.acquire(timeout=acquire_timeout) as conn, conn.transaction():
            await conn.execute("SELECT set_config('app.org_id', $1, true)", org)
            yield conn

    @asynccontextmanager
    async def run_alone(self, job: str) -> AsyncIterator[bool]:
        """``True`` inside when this process holds ``job``'s advisory lock (``ADVISORY_LOCKS``) for the
        block; ``False`` at once when another session holds it (another node runs the job).

        The lock lives on a connection opened for it alone, not one of the pool's, and ends when that
        connection closes: whatever ends the block (a return, an error, a cancellation), nothing can
        carry the lock back into the pool, and a node that dies releases it with its connection.  If
        that connection drops mid-run the run goes on unguarded; the jobs guarded so are idempotent
        statement by statement, so two at once is wasteful, never wrong.
        """
        conn = await asyncpg.connect(self._url, timeout=self._connect_timeout, command_timeout=self._command_timeout)
        try:
            yield bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", ADVISORY_LOCKS[job]))
        finally:
            try:
                await conn.close(timeout=5.0)
            except BaseException:  # closing failed or was cancelled: drop the socket, the server unlocks
                conn.terminate()
                raise

    @asynccontextmanager
    async def no_tenant(self) -> AsyncIterator[asyncpg.Connection]:
        """A transaction with no tenant set: tenant tables show no rows (for tests and system tables)."""
        async with self.pool.acquire() as conn, conn.transaction():
            yield conn
