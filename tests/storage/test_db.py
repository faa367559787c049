"""Tenant isolation enforced by PostgreSQL itself, the app role's limits, migrations."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from storage.db import APP_ROLE, MIGRATIONS, Database, MigrationError, ensure_database, migrate, with_database
from storage.records import AuditEntry, CallStarted, ensure_organization
from tests.storage.conftest import DbUrls

TENANT_TABLES = ["users", "api_keys", "calls", "transcriptions", "translations", "recordings", "audit_logs",
                 "subscriptions", "payments", "usage_stats", "retention_policies", "collection_accounts", "campaigns",
                 "campaign_contacts", "voice_configs", "import_jobs"]


async def make_org(db: Database, slug: str) -> uuid.UUID:
    org = uuid.uuid4()
    async with db.tenant(org) as conn:
        await ensure_organization(conn, org, slug.title(), f"{slug}-{org.hex[:6]}")
    return org


async def add_call(db: Database, org: uuid.UUID, ccid: str) -> uuid.UUID:
    call_id = uuid.uuid4()
    async with db.tenant(org) as conn:
        await CallStarted(org, call_id, ccid, None, None, "+15550001", "+15550002", "PCMU", 8000,
                          datetime.now(UTC)).apply(conn)
        await conn.execute(
            "INSERT INTO transcriptions (org_id, call_id, track, seq, text) VALUES ($1, $2, 'inbound', 0, $3)",
            org, call_id, f"hello from {ccid}")
        await AuditEntry(org, "call.started", "call", str(call_id)).apply(conn)
    return call_id


async def test_app_role_is_not_superuser_owner_or_bypassrls(db: Database, admin_conn: asyncpg.Connection) -> None:
    role = await admin_conn.fetchrow(
        "SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = $1", APP_ROLE)
    assert dict(role) == {"rolsuper": False, "rolbypassrls": False, "rolcreaterole": False, "rolcreatedb": False}
    owners = await admin_conn.fetch(
        "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public' AND tableowner = $1", APP_ROLE)
    assert owners == []
    rls = await admin_conn.fetch(
        "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class WHERE relname = ANY($1::text[])",
        [*TENANT_TABLES, "organizations"])
    assert len(rls) == len(TENANT_TABLES) + 1
    assert all(r["relrowsecurity"] and r["relforcerowsecurity"] for r in rls), rls
    async with db.no_tenant() as conn:
        assert await conn.fetchval("SELECT current_user") == APP_ROLE


async def test_tenant_matrix_select_update_delete_across_tenants_touch_nothing(db: Database) -> None:
    a, b = await make_org(db, "alpha"), await make_org(db, "bravo")
    a_call = await add_call(db, a, "call-a")
    b_call = await add_call(db, b, "call-b")
    async with db.tenant(a) as conn:
        assert await conn.fetchval("SELECT count(*) FROM calls") == 1
        assert await conn.fetchval("SELECT count(*) FROM calls WHERE id = $1", b_call) == 0
        assert await conn.fetchval("SELECT count(*) FROM transcriptions WHERE call_id = $1", b_call) == 0
        assert await conn.fetchval("SELECT count(*) FROM organizations") == 1
        assert await conn.execute("UPDATE calls SET status = 'failed' WHERE id = $1", b_call) == "UPDATE 0"
        assert await conn.execute("UPDATE transcriptions SET text = 'x' WHERE call_id = $1", b_call) == "UPDATE 0"
        assert await conn.execute("DELETE FROM transcriptions WHERE call_id = $1", b_call) == "DELETE 0"
        assert await conn.execute("DELETE FROM calls WHERE id = $1", b_call) == "DELETE 0"
        assert await conn.execute("UPDATE organizations SET name = 'pwned' WHERE id = $1", b) == "UPDATE 0"
        # Moving one's own row to another tenant is an insert into that tenant: refused by WITH CHECK.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE calls SET org_id = $1 WHERE id = $2", b, a_call)
    async with db.tenant(b) as conn:
        row = await conn.fetchrow("SELECT status, (SELECT text FROM transcriptions WHERE call_id = $1) AS text "
                                  "FROM calls WHERE id = $1", b_call)
        assert row["status"] == "active" and row["text"] == "hello from call-b"
        assert await conn.fetchval("SELECT name FROM organizations") == "Bravo"


@pytest.mark.parametrize("table, insert", [
    ("calls", "INSERT INTO calls (org_id, call_control_id) VALUES ($1, 'x')"),
    ("users", "INSERT INTO users (org_id, email, role) VALUES ($1, 'a@b.c', 'agent')"),
    ("audit_logs", "INSERT INTO audit_logs (org_id, actor_type, action, resource_type) "
                   "VALUES ($1, 'system', 'x', 'y')"),
    ("usage_stats", "INSERT INTO usage_stats (org_id, day, metric) VALUES ($1, current_date, 'minutes')"),
])
async def test_insert_for_another_tenant_is_rejected(db: Database, table: str, insert: str) -> None:
    a, b = await make_org(db, "alpha"), await make_org(db, "bravo")
    async with db.tenant(a) as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            await conn.execute(insert, b)


async def test_no_tenant_set_sees_nothing_and_writes_nothing(db: Database) -> None:
    a = await make_org(db, "alpha")
    await add_call(db, a, "call-a")
    async with db.no_tenant() as conn:
        for table in [*TENANT_TABLES, "organizations"]:
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("INSERT INTO calls (org_id, call_control_id) VALUES ($1, 'y')", a)
    # An empty setting (what RESET leaves behind on a pooled connection) is the same as none.
    async with db.no_tenant() as conn:
        await conn.execute("SELECT set_config('app.org_id', '', true)")
        assert await conn.fetchval("SELECT count(*) FROM calls") == 0


async def test_tenant_setting_ends_with_the_transaction(db: Database) -> None:
    a = await make_org(db, "alpha")
    await add_call(db, a, "call-a")
    async with db.pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.org_id', $1, true)", str(a))
            assert await conn.fetchval("SELECT count(*) FROM calls") == 1
        assert await conn.fetchval("SELECT count(*) FROM calls") == 0


async def test_malformed_tenant_id_fails_before_sql(db: Database) -> None:
    with pytest.raises(ValueError):
        async with db.tenant("a' OR '1'='1"):
            pass


async def test_interleaved_two_tenant_requests_on_a_pool_of_two_never_see_foreign_rows(db_urls: DbUrls) -> None:
    db = Database(db_urls.app, min_size=2, max_size=2)
    await db.open()
    try:
        orgs = [await make_org(db, "alpha"), await make_org(db, "bravo")]
        for org in orgs:
            for i in range(3):
                await add_call(db, org, f"{org.hex[:6]}-{i}")
        foreign = 0
        seen = 0
        rng = random.Random(7)

        async def request(org: uuid.UUID) -> None:
            nonlocal foreign, seen
            async with db.tenant(org) as conn:
                await asyncio.sleep(rng.random() / 1000)  # hold the connection across other requests' turns
                rows = await conn.fetch("SELECT org_id FROM calls UNION ALL SELECT org_id FROM transcriptions")
                seen += len(rows)
                foreign += sum(r["org_id"] != org for r in rows)

        await asyncio.gather(*(request(orgs[i % 2]) for i in range(1000)))
        assert seen == 1000 * 6
        assert foreign == 0
    finally:
        await db.aclose()


async def test_audit_log_is_append_only_for_the_app_role(db: Database) -> None:
    a = await make_org(db, "alpha")
    await add_call(db, a, "call-a")
    async with db.tenant(a) as conn:
        await AuditEntry(a, "call.updated", "call", "c1", actor_type="user", actor_id="u1",
                         old_value={"status": "active"}, new_value={"status": "completed"}).apply(conn)
        row = await conn.fetchrow("SELECT old_value, new_value FROM audit_logs WHERE action = 'call.updated'")
        assert row["old_value"] == {"status": "active"} and row["new_value"] == {"status": "completed"}
    for statement in ("UPDATE audit_logs SET action = 'tampered'", "DELETE FROM audit_logs",
                      "TRUNCATE audit_logs"):
        async with db.tenant(a) as conn:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
                await conn.execute(statement)
    async with db.tenant(a) as conn:
        assert await conn.fetchval("SELECT count(*) FROM audit_logs") == 2


async def test_migrations_are_recorded_and_a_changed_file_is_refused(db_urls: DbUrls,
                                                                      admin_conn: asyncpg.Connection) -> None:
    assert await migrate(db_urls.admin) == []  # already applied: nothing to do
    names = [r["name"] for r in await admin_conn.fetch("SELECT name FROM schema_migrations ORDER BY name")]
    assert names[:5] == ["0001_schema.sql", "0002_rls.sql", "0003_call_node.sql", "0004_accounts.sql",
                         "0005_collections.sql"]
    assert names == sorted(p.name for p in MIGRATIONS.glob("*.sql"))  # every file, each once, in order
    await admin_conn.execute("UPDATE schema_migrations SET checksum = 'x' WHERE name = '0002_rls.sql'")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(db_urls.admin)


async def test_a_campaign_contact_cannot_join_another_tenants_account_and_account_checks_hold(db: Database) -> None:
    """0005: the composite foreign keys tie a contact to its own organisation's campaign and account, even
    for a query that names another tenant's id (foreign-key checks do not go through RLS)."""
    a, b = await make_org(db, "alpha"), await make_org(db, "bravo")
    async with db.tenant(b) as conn:
        b_account = await conn.fetchval(
            "INSERT INTO collection_accounts (org_id, external_ref, debtor_name, balance_cents, currency) "
            "VALUES ($1, 'B-1', 'B', 1, 'EUR') RETURNING id", b)
    async with db.tenant(a) as conn:
        campaign = await conn.fetchval("INSERT INTO campaigns (org_id, name) VALUES ($1, 'c') RETURNING id", a)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        async with db.tenant(a) as conn:
            await conn.execute("INSERT INTO campaign_contacts (org_id, campaign_id, account_id) VALUES ($1, $2, $3)",
                               a, campaign, b_account)
    for phones, cents, currency in ((["12345"], 1, "EUR"), (["+15550001234"], -1, "EUR"), ([], 1, "eur")):
        with pytest.raises(asyncpg.CheckViolationError):
            async with db.tenant(a) as conn:
                await conn.execute(
                    "INSERT INTO collection_accounts (org_id, external_ref, debtor_name, phones, balance_cents, "
                    "currency) VALUES ($1, 'A-1', 'A', $2, $3, $4)", a, phones, cents, currency)
    async with db.tenant(a) as conn:
        await conn.execute("INSERT INTO collection_accounts (org_id, external_ref, debtor_name, phones, balance_cents, "
                           "currency) VALUES ($1, 'A-1', 'A', '{+15550001234,+447700900123}', 0, 'EUR')", a)
        # The API soft-deletes (deleted_at); since 0010 the retention job purges for good, as the app role
        # under the tenant like every statement: a DELETE as tenant A never reaches B's rows (RLS).
        await conn.execute("DELETE FROM collection_accounts")
    async with db.tenant(b) as conn:
        assert await conn.fetchval("SELECT count(*) FROM collection_accounts") == 1


async def test_nodes_starting_together_may_all_ensure_the_same_new_database(pg_admin_url: str) -> None:
    """Several nodes started at once on a server without their database (deploy/local.py, a cluster's
    first start): each creates it if missing; the ones that lose the race are not failed by it."""
    name = f"sb_race_{uuid.uuid4().hex[:8]}"
    await asyncio.gather(*(ensure_database(pg_admin_url, name) for _ in range(4)))
    conn = await asyncpg.connect(with_database(pg_admin_url, name))
    await conn.close()
