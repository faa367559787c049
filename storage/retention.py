"""Retention: what ages out of the tiers, and the one job that removes it.

The rules, per organisation (``retention_policies`` rows lengthen or set them; migration 0010)::

    what                                    goes after                          how
    soft-deleted calls (with their          the restore window since            their recordings' objects,
      transcripts, translations, recordings)  deleted_at                         then the calls (cascade)
    soft-deleted accounts, campaigns        the restore window                  DELETE (contacts cascade;
                                                                                calls keep, account_id NULL)
    calls, whole                            policy 'calls' (>= 730 d), none     as soft-deleted calls
                                            by default
    recordings                              policy 'recordings', default and    the object, then the row
                                            minimum 730 d, since created_at
    transcriptions, translations            policy, none by default             DELETE
    audit_logs                              never                               (immutable, kept)

Objects before rows: each batch deletes its rows' cold-tier objects first (an idempotent delete), then
the rows.  A crash or a cold-tier failure between the two leaves rows whose objects are gone, which
the next run finishes (deleting a missing object is no error); never an object without its row.

Bounded and resumable: at most ``batch`` rows a statement, each batch committed on its own, so a
stop anywhere loses nothing and the next run continues.  Idempotent: a second run finds nothing.
``dry_run`` counts what a run would delete and deletes nothing.  Every statement runs under its
organisation (RLS); the organisations come from ``retention_orgs()``.  Each organisation whose run
deleted something gets one audit entry, ``retention.purged``, with the counts.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from storage.blobs import BlobStore
from storage.db import CALL_OBJECTS_SQL, Database, live_orgs, rows_affected
from storage.records import AuditEntry

log = logging.getLogger("switchboard.retention")

RECORDINGS_MIN_DAYS = 730  # the seed's minimum, also a CHECK in 0010


@dataclass
class OrgReport:
    org_id: uuid.UUID
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, what: str, n: int) -> None:
        if n:
            self.counts[what] = self.counts.get(what, 0) + n


@dataclass
class RetentionReport:
    dry_run: bool
    orgs: list[OrgReport] = field(default_factory=list)

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for org in self.orgs:
            for k, v in org.counts.items():
                out[k] = out.get(k, 0) + v
        return out


@dataclass(frozen=True, slots=True)
class Rule:
    """Rows of ``table`` matching ``due`` (with ``$1`` = the rule's days) go, oldest first by ``order``.
    ``objects``: ``"own"`` (the row's ``storage_key`` is an object), ``"calls"`` (the calls' recordings'
    objects), or ``None``."""

    name: str
    table: str
    due: str
    order: str
    objects: str | None = None

    def select(self) -> str:
        key = ", storage_key" if self.objects == "own" else ""
        return f"SELECT id{key} FROM {self.table} WHERE {self.due} ORDER BY {self.order} LIMIT $2"

    def count(self) -> str:
        return f"SELECT count(*) FROM {self.table} WHERE {self.due}"

    def delete(self) -> str:
        return f"DELETE FROM {self.table} WHERE id = ANY($1)"


def _older(column: str) -> str:
    return f"{column} < now() - make_interval(days => $1)"


RULES = (  # in this order: calls first, so their recordings go with them
    Rule("calls_deleted", "calls", _older("deleted_at"), "deleted_at", "calls"),
    Rule("calls_expired", "calls", f"deleted_at IS NULL AND {_older('ended_at')}", "ended_at", "calls"),
    Rule("recordings_expired", "recordings", _older("created_at"), "created_at", "own"),
    Rule("accounts_deleted", "collection_accounts", _older("deleted_at"), "deleted_at"),
    Rule("campaigns_deleted", "campaigns", _older("deleted_at"), "deleted_at"),
    Rule("transcriptions_expired", "transcriptions", _older("created_at"), "created_at"),
    Rule("translations_expired", "translations", _older("created_at"), "created_at"),
)


class Retention:
    def __init__(self, db: Database, blobs: BlobStore, *, window_days: int, batch: int = 500,
                 actor: str = "retention", archive_after_days: int = 0) -> None:
        self.archive_after_days = archive_after_days
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.db = db
        self.blobs = blobs
        self.window_days = window_days
        self.batch = batch
        self.actor = actor

    async def run(self, *, dry_run: bool = False) -> RetentionReport:
        report = RetentionReport(dry_run)
        for org in await live_orgs(self.db):
            report.orgs.append(await self.run_org(org, dry_run=dry_run))
        return report

    def days(self, policy: dict[str, int]) -> dict[str, int | None]:
        """Each rule's age in days for an organisation's ``policy``; ``None``: the rule does not apply."""
        w = self.window_days
        return {"calls_deleted": w, "accounts_deleted": w, "campaigns_deleted": w,
                "calls_expired": max(policy["calls"], RECORDINGS_MIN_DAYS) if "calls" in policy else None,
                "recordings_expired": max(policy.get("recordings", RECORDINGS_MIN_DAYS), RECORDINGS_MIN_DAYS),
                "transcriptions_expired": policy.get("transcriptions"),
                "translations_expired": policy.get("translations")}

    async def run_org(self, org: uuid.UUID, *, dry_run: bool = False) -> OrgReport:
        rep = OrgReport(org)
        async with self.db.tenant(org) as conn:
            policy = {r["resource"]: r["days"] for r in await conn.fetch(
                "SELECT resource, days FROM retention_policies")}
        days = self.days(policy)
        for rule in RULES:
            n_days = days[rule.name]
            if n_days is not None:
                rep.add(rule.name, await self._apply(org, rule, n_days, dry_run))
        archive_days = policy.get("archive", self.archive_after_days)
        if archive_days:
            rep.add("calls_archived", await self._archive(org, archive_days, dry_run))
        if rep.counts and not dry_run:
            async with self.db.tenant(org) as conn:
                await AuditEntry(org, "retention.purged", "organization", str(org), actor_type="system",
                                 actor_id=self.actor, new_value=dict(rep.counts)).apply(conn)
            log.info("retention.purged", extra={"org_id": str(org), **rep.counts})
        return rep

    async def _archive(self, org: uuid.UUID, n_days: int, dry_run: bool) -> int:
        """Calls ended ``n_days`` ago whose lines are still hot: moved to the cold tier (storage/archive.py)."""
        from storage.archive import archive_call

        due = ("FROM calls c WHERE c.archived_at IS NULL AND c.deleted_at IS NULL AND "
               "c.ended_at < now() - make_interval(days => $1) AND EXISTS "
               "(SELECT 1 FROM transcriptions t WHERE t.call_id = c.id)")
        if dry_run:
            async with self.db.tenant(org) as conn:
                return int(await conn.fetchval(f"SELECT count(*) {due}", n_days))
        total = 0
        while True:
            async with self.db.tenant(org) as conn:
                ids = [r["id"] for r in await conn.fetch(f"SELECT c.id {due} ORDER BY c.ended_at LIMIT $2",
                                                         n_days, self.batch)]
                for call_id in ids:
                    await archive_call(conn, self.blobs, org, call_id)
            total += len(ids)
            if len(ids) < self.batch:
                return total

    async def _apply(self, org: uuid.UUID, rule: Rule, n_days: int, dry_run: bool) -> int:
        if dry_run:
            async with self.db.tenant(org) as conn:
                return int(await conn.fetchval(rule.count(), n_days))
        total = 0
        while True:
            async with self.db.tenant(org) as conn:
                rows = await conn.fetch(rule.select(), n_days, self.batch)
                ids = [r["id"] for r in rows]
                if rule.objects == "own":
                    keys = [r["storage_key"] for r in rows]
                elif rule.objects == "calls" and ids:
                    keys = [r["storage_key"] for r in await conn.fetch(CALL_OBJECTS_SQL, ids)]
                else:
                    keys = []
            for key in keys:  # objects first: a stop here leaves rows to finish, never a lost object's row
                await self.blobs.delete(key)
            if ids:
                async with self.db.tenant(org) as conn:
                    total += rows_affected(await conn.execute(rule.delete(), ids))
            if len(ids) < self.batch:
                return total


