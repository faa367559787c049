"""Tenant wipe: every row and every cold-tier object of a deleted organisation, gone.

The order, a table (calls first: their recordings' objects, then the calls, whose transcripts,
translations, recordings rows, usage and jobs cascade; users last but one, their references are
SET NULL; the organisation's row is kept, scrubbed, for the audit trail's foreign key)::

    step                 rows                                          objects first
    calls                calls of the organisation (cascade)           their recordings
    recordings           any left (none, unless a row outlived its call) own
    collection_accounts  (campaign_contacts cascade)
    campaigns, import_jobs, voice_configs, api_keys, media_tokens,
    payments, subscriptions, usage_stats, call_usage, retention_policies,
    billing_outbox, call_jobs, users
    organizations        name, slug, settings scrubbed; wiped_at set

Each step deletes at most ``batch`` rows a statement and commits; objects before rows (an
idempotent delete), so a stop anywhere leaves no object without its row and the next run goes on.
The audit trail stays (immutable; it never holds restricted PII), with one ``org.wiped`` entry, and so
do the sealed evidence bundles (``evidence_bundles``, 0013): a legal hold outlives the tenant, until
retain_until, when the retention job deletes them (storage/retention.py, ``evidence_expired``).

One node at a time: ``run`` holds the PostgreSQL advisory lock ``wipe`` (``Database.run_alone``) for
the whole run on a connection of its own (the batches commit, so a transaction-level lock would not
last).  A run that finds it taken returns at once, ``skipped``: the holder reads what is pending again
once it has wiped what it found, until nothing new is, so an organisation deleted meanwhile on any
node is wiped by it; one deleted in the moment the holder finishes waits for the next start or retention round.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from storage.blobs import BlobStore
from storage.db import CALL_OBJECTS_SQL, Database, rows_affected
from storage.records import AuditEntry

log = logging.getLogger("switchboard.wipe")

# (table, whose objects go first: "calls" = the calls' recordings, "own" = the row's storage_key)
STEPS: tuple[tuple[str, str | None], ...] = (
    ("calls", "calls"), ("recordings", "own"), ("collection_accounts", None), ("campaigns", None),
    ("import_jobs", None), ("voice_configs", None), ("api_keys", None), ("media_tokens", None),
    ("payments", None), ("subscriptions", None), ("usage_stats", None), ("call_usage", None),
    ("retention_policies", None), ("billing_outbox", None), ("call_jobs", None), ("export_jobs", "own"),
    ("users", None),
)
# Tables without an id column: deleted by ctid.
_NO_ID = {"usage_stats", "retention_policies", "voice_configs", "call_usage"}


SKIPPED = "another node is running it"


@dataclass
class WipeReport:
    org_id: uuid.UUID
    rows: dict[str, int] = field(default_factory=dict)
    objects: int = 0
    done: bool = False


@dataclass
class WipeRun:
    reports: list[WipeReport] = field(default_factory=list)
    skipped: str | None = None  # why this run did nothing (another node holds the lock)


class Wipe:
    def __init__(self, db: Database, blobs: BlobStore, *, batch: int = 500, actor: str = "wipe") -> None:
        self.db = db
        self.blobs = blobs
        self.batch = batch
        self.actor = actor

    async def pending(self) -> list[uuid.UUID]:
        async with self.db.no_tenant() as conn:
            return [r[0] for r in await conn.fetch("SELECT * FROM wipe_pending_orgs()")]

    async def run(self) -> WipeRun:
        """Wipe every pending organisation, on one node at a time (the module docstring)."""
        out = WipeRun()
        async with self.db.run_alone("wipe") as mine:
            if not mine:
                log.info("wipe.skipped", extra={"reason": SKIPPED})
                out.skipped = SKIPPED
                return out
            tried: set[uuid.UUID] = set()
            while todo := [org for org in await self.pending() if org not in tried]:
                tried.update(todo)  # at most once a run each: one that stays pending is not retried in a loop
                for org in todo:
                    out.reports.append(await self.wipe(org))
        return out

    async def wipe(self, org: uuid.UUID) -> WipeReport:
        rep = WipeReport(org)
        for table, objects in STEPS:
            while True:
                n, gone = await self._batch(org, table, objects)
                rep.objects += gone
                if n:
                    rep.rows[table] = rep.rows.get(table, 0) + n
                if n < self.batch:
                    break
        async with self.db.tenant(org) as conn:
            await conn.execute(
                "UPDATE organizations SET name = 'wiped organisation', slug = 'wiped-' || id::text, settings = '{}', "
                "wiped_at = now(), updated_at = now() WHERE id = $1 AND deleted_at IS NOT NULL", org)
            await AuditEntry(org, "org.wiped", "organization", str(org), actor_type="system", actor_id=self.actor,
                             new_value={"rows": dict(rep.rows), "objects": rep.objects}).apply(conn)
        rep.done = True
        log.info("org.wiped", extra={"org_id": str(org), "objects": rep.objects, **rep.rows})
        return rep

    async def _batch(self, org: uuid.UUID, table: str, objects: str | None) -> tuple[int, int]:
        key = "ctid" if table in _NO_ID else "id"
        async with self.db.tenant(org) as conn:
            rows = await conn.fetch(f"SELECT {key} AS k{', storage_key' if objects == 'own' else ''} FROM {table} "
                                    f"WHERE org_id = $1 LIMIT $2", org, self.batch)
            keys = [r["k"] for r in rows]
            if objects == "own":
                blobs = [r["storage_key"] for r in rows if r["storage_key"]]  # an unfinished export has none
            elif objects == "calls" and keys:
                blobs = [r["storage_key"] for r in await conn.fetch(CALL_OBJECTS_SQL, keys)]
            else:
                blobs = []
        for b in blobs:
            await self.blobs.delete(b)
        if not keys:
            return 0, len(blobs)
        async with self.db.tenant(org) as conn:
            status = await conn.execute(f"DELETE FROM {table} WHERE org_id = $1 AND {key} = ANY($2)", org, keys)
        return rows_affected(status), len(blobs)
