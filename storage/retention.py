"""Retention: what ages out of the tiers, and the one job that removes it.

The rules, per organisation (``retention_policies`` rows lengthen or set them; migrations 0010, 0017),
applied in this order (``RULES``)::

    rule                          rows                        go after                    how
    calls_deleted                 soft-deleted calls, with    the restore window since    their objects (recordings,
                                    all that hangs off them     deleted_at                  archive), then the calls
                                                                                            (cascade)
    calls_expired                 ended calls, whole          policy 'calls' (>= 730 d);  as calls_deleted
                                                                none by default
    recordings_expired            recordings                  policy 'recordings' since   the object, then the row
                                                                created_at; default and
                                                                minimum 730 d
    accounts_deleted,             soft-deleted accounts,      the restore window          DELETE (contacts cascade;
      campaigns_deleted             campaigns                                               calls keep, account NULL)
    users_deleted                 soft-deleted users          the restore window          DELETE ("Users" below)
    transcriptions_expired        transcripts (hot)           policy; none by default     DELETE (their translations
                                                                                            cascade)
    archives_expired              a call's archived lines     policy 'transcriptions',    the object, then the call
                                    (cold; storage/archive.py)  once the newest line in     row forgets it
                                                                it is past it
    translations_expired          translations (hot)          policy; none by default     DELETE
    archived_translations_expired the translations in a       policy 'translations', as   the object rewritten
                                    call's archive              archives_expired            without them, then the
                                                                                            row says 0
    evidence_expired              sealed evidence bundles     retain_until, and only      the object, then the row
                                    (0013)                      once their call is deleted,
                                                                past the calls policy or
                                                                gone
    exports_expired               report exports (0015)       BOUNDS['exports'] after     the object, then the row
                                                                they finished (or were
                                                                asked for)
    call_jobs_finished            post-call jobs done or      BOUNDS['call_jobs']         DELETE
                                    failed
    billing_outbox_sent           billing outbox rows sent    BOUNDS['billing_outbox']    DELETE (unsent: owed, kept)
    imports_finished              account imports done or     BOUNDS['import_jobs']       DELETE
                                    failed
    (audit_logs)                  never                                                   (immutable, kept)

and once per run, for no organisation: ``webhook_events_expired``, the webhook deliveries seen,
after ``BOUNDS['webhook_events']``.  A wiped organisation (storage/wipe.py) keeps only its sealed
evidence bundles, which ``evidence_expired`` deletes after their retain_until as for any other.

The fixed bounds (``BOUNDS``), what no policy sets, and why each is what it is::

    bound            days  since        why
    exports             7  finished_at  an export is fetched minutes after it is made (its download URL
                                        lives 15 minutes, a new one may be asked for); a week covers a
                                        weekend.  An export unfinished a week after its request was
                                        orphaned by a node that never came back (a node fails its own at
                                        start, and exports take minutes): it goes the same way.
    webhook_events     90  received_at  the rows only recognise a redelivered event (the dedup of
                                        api/telnyx_calls.py and api/billing.py).  Stripe retries a
                                        delivery for three days and a resend is possible while Stripe
                                        keeps the event (30 days); Telnyx retries within minutes; and
                                        the signatures refuse a delivery signed 5 minutes before it is
                                        received.  90 days is far past all of them.
    call_jobs          90  updated_at   a finished job's effects are rows of their own (recordings,
                                        transcripts, summaries); its row answers "what happened to this
                                        call's recording" for support, and its dedupe key guards against
                                        a redelivered webhook (covered by webhook_events' 90 days).
    billing_outbox     90  sent_at      once sent, Stripe and Resend hold the record (their idempotency
                                        keys last a day); a meter event is never decided twice (call_usage
                                        is keyed by the call and kept), a dunning e-mail once per event
                                        (webhook_events).  Unsent rows are owed and never deleted.
    import_jobs        90  finished_at  an import's report (counts and per-row errors, which quote the
                                        file's fields) for whoever ran it; after a quarter it only keeps
                                        personal data the accounts themselves hold or no longer hold.

Users: ``users_deleted`` removes the user row for good.  What referenced it follows its foreign key
(migrations 0001, 0004, 0005): calls.agent_id, api_keys.created_by, media_tokens.created_by and
import_jobs.created_by become NULL (API keys and media tokens are the organisation's and stay live),
api_keys.user_id cascades (no route sets it).  The audit trail holds user ids as text, with no
foreign key: its entries are immutable and kept, naming an id that no longer resolves, exactly as
the tenant wipe leaves them (storage/wipe.py deletes users and keeps the trail); no entry ever held a
user's address or name (api/accounts.py), so nothing personal outlives the row.

Objects before rows: each batch deletes (or rewrites) its rows' cold-tier objects first (an
idempotent step), then ends the rows.  A crash or a cold-tier failure between the two leaves rows
whose objects are gone, which the next run finishes (deleting a missing object is no error); never
an object without its row.  Evidence bundles, in the database too: migration 0017 lets a DELETE reach
only rows past retain_until, whatever the application asks.

Bounded and resumable: at most ``batch`` rows a statement, each batch committed on its own, so a
stop anywhere loses nothing and the next run continues.  Idempotent: a second run finds nothing.
``dry_run`` counts what each rule finds now and deletes nothing (rows that an earlier rule's cascade
takes are counted by both).  Every statement runs under its organisation (RLS; the tables without RLS,
billing_outbox and call_jobs, filter on the tenant explicitly); the organisations come from
``retention_orgs()`` and ``retention_wiped_orgs()``.  Each organisation whose run deleted something
gets one audit entry, ``retention.purged``, with the counts.

One node at a time: ``run`` holds the PostgreSQL advisory lock ``retention`` (``Database.run_alone``)
for the whole run, on a connection of its own (a transaction-level lock would end at the first batch
commit).  A run that finds it taken returns at once, its report ``skipped``; a dry run deletes
nothing and takes no lock.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from storage.archive import drop_translations
from storage.blobs import BlobNotFound, BlobStore
from storage.db import CALL_OBJECTS_SQL, Database, live_orgs, rows_affected
from storage.records import AuditEntry

log = logging.getLogger("switchboard.retention")

RECORDINGS_MIN_DAYS = 730  # the seed's minimum, also a CHECK in 0010
# The fixed bounds, in days (the reasons: the module docstring's table).
BOUNDS: dict[str, int] = {"exports": 7, "webhook_events": 90, "call_jobs": 90, "billing_outbox": 90,
                          "import_jobs": 90}
SKIPPED = "another node is running it"


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
    system: dict[str, int] = field(default_factory=dict)  # rows of no organisation (webhook_events)
    skipped: str | None = None  # why this run did nothing (another node holds the lock)

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = dict(self.system)
        for org in self.orgs:
            for k, v in org.counts.items():
                out[k] = out.get(k, 0) + v
        return out


@dataclass(frozen=True, slots=True)
class Rule:
    """Rows of ``table`` matching ``due`` (``$1``: the rule's days) go, oldest first by ``order``.

    ``key``: an SQL expression naming the row's own cold-tier object, deleted first (``rewrite``: the
    archive rewritten without its translations instead).  ``call_objects``: the rows are calls, and
    their recordings' and archives' objects go first.  ``finish``: the statement that ends the rows
    (``$1``: their ids), when it is not a DELETE.  ``always``: the rule applies with no days (``$1``
    NULL), its condition saying what that means."""

    name: str
    table: str
    due: str
    order: str
    key: str | None = None
    call_objects: bool = False
    rewrite: bool = False
    finish: str | None = None
    always: bool = False
    lock: bool = True  # FOR UPDATE needs UPDATE rights: off for evidence, which nothing can change anyway


    def select(self) -> str:
        """The batch, locked until it is ended: a restore racing the purge waits, then finds it gone."""
        key = f", {self.key} AS storage_key" if self.key else ""
        lock = " FOR UPDATE" if self.lock else ""
        return f"SELECT id{key} FROM {self.table} WHERE {self.due} ORDER BY {self.order} LIMIT $2{lock}"

    def count(self) -> str:
        return f"SELECT count(*) FROM {self.table} WHERE {self.due}"

    def end(self) -> str:
        return self.finish or f"DELETE FROM {self.table} WHERE id = ANY($1)"


def _older(column: str) -> str:
    return f"{column} < now() - make_interval(days => $1)"


# billing_outbox and call_jobs are drained across organisations by their workers, so they have no RLS
# (0006, 0007): under the tenant's transaction, the tenant filter is written out.
_THIS_TENANT = "org_id = current_setting('app.org_id')::uuid"
# Where api/exports.py puts an export: named here too, for a job that failed after its upload.
_EXPORT_KEY = "coalesce(storage_key, 'exports/' || org_id::text || '/' || id::text || '.' || format)"
# An archive's age is its newest line's (0017); an archive made before 0017: when it was made (later
# than any line in it, so nothing goes early).
_ARCHIVE_AGE = "coalesce(archive_lines_until, archived_at)"
# A bundle goes after retain_until unless its call is still there, live and within the calls policy
# ($1, NULL: no policy): the bundle is a copy of the call, so while the call is kept its seal is too.
_EVIDENCE_DUE = ("retain_until < now() AND NOT EXISTS (SELECT 1 FROM calls c WHERE c.id = evidence_bundles.call_id "
                 "AND c.deleted_at IS NULL AND ($1::int IS NULL OR c.ended_at IS NULL "
                 "OR c.ended_at >= now() - make_interval(days => $1)))")

RULES = (  # in this order: calls first, so their recordings go with them; archives before their rewrite
    Rule("calls_deleted", "calls", _older("deleted_at"), "deleted_at", call_objects=True),
    Rule("calls_expired", "calls", f"deleted_at IS NULL AND {_older('ended_at')}", "ended_at", call_objects=True),
    Rule("recordings_expired", "recordings", _older("created_at"), "created_at", key="storage_key"),
    Rule("accounts_deleted", "collection_accounts", _older("deleted_at"), "deleted_at"),
    Rule("campaigns_deleted", "campaigns", _older("deleted_at"), "deleted_at"),
    Rule("users_deleted", "users", _older("deleted_at"), "deleted_at"),
    Rule("transcriptions_expired", "transcriptions", _older("created_at"), "created_at"),
    Rule("archives_expired", "calls", f"archive_key IS NOT NULL AND {_older(_ARCHIVE_AGE)}", _ARCHIVE_AGE,
         key="archive_key", finish="UPDATE calls SET archive_key = NULL, archive_translations = NULL, "
                                   "updated_at = now() WHERE id = ANY($1)"),
    Rule("translations_expired", "translations", _older("created_at"), "created_at"),
    Rule("archived_translations_expired", "calls",
         f"archive_key IS NOT NULL AND archive_translations IS DISTINCT FROM 0 AND {_older(_ARCHIVE_AGE)}",
         _ARCHIVE_AGE, key="archive_key", rewrite=True,
         finish="UPDATE calls SET archive_translations = 0, updated_at = now() WHERE id = ANY($1)"),
    Rule("evidence_expired", "evidence_bundles", _EVIDENCE_DUE, "retain_until", key="storage_key", always=True,
         lock=False),
    Rule("exports_expired", "export_jobs", _older("coalesce(finished_at, created_at)"), "created_at",
         key=_EXPORT_KEY),
    Rule("call_jobs_finished", "call_jobs", f"{_THIS_TENANT} AND status IN ('done', 'failed') AND "
                                            f"{_older('updated_at')}", "updated_at"),
    Rule("billing_outbox_sent", "billing_outbox", f"{_THIS_TENANT} AND sent_at IS NOT NULL AND {_older('sent_at')}",
         "sent_at"),
    Rule("imports_finished", "import_jobs", f"status IN ('done', 'failed') AND "
                                            f"{_older('coalesce(finished_at, updated_at)')}", "created_at"),
)
WIPED_RULES = frozenset({"evidence_expired"})  # all a wiped organisation has left
# webhook_events has no organisation and no id: one statement a batch, by its key.
_WEBHOOKS_DUE = "received_at < now() - make_interval(days => $1)"
_WEBHOOKS_DELETE = ("DELETE FROM webhook_events w USING (SELECT provider, event_id FROM webhook_events "
                    f"WHERE {_WEBHOOKS_DUE} ORDER BY received_at LIMIT $2) o "
                    "WHERE w.provider = o.provider AND w.event_id = o.event_id")


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
        """Every organisation, then what belongs to none; on one node at a time (the module docstring)."""
        if dry_run:
            return await self._run(dry_run=True)
        async with self.db.run_alone("retention") as mine:
            if not mine:
                log.info("retention.skipped", extra={"reason": SKIPPED})
                return RetentionReport(False, skipped=SKIPPED)
            return await self._run(dry_run=False)

    async def _run(self, *, dry_run: bool) -> RetentionReport:
        report = RetentionReport(dry_run)
        for org in await live_orgs(self.db):
            report.orgs.append(await self.run_org(org, dry_run=dry_run))
        async with self.db.no_tenant() as conn:
            wiped = [r[0] for r in await conn.fetch("SELECT * FROM retention_wiped_orgs()")]
        for org in wiped:
            rep = await self.run_org(org, dry_run=dry_run, only=WIPED_RULES)
            if rep.counts:
                report.orgs.append(rep)
        n = await self._webhook_events(BOUNDS["webhook_events"], dry_run)
        if n:
            report.system["webhook_events_expired"] = n
        return report

    def days(self, policy: dict[str, int]) -> dict[str, int | None]:
        """Each rule's age in days for an organisation's ``policy``; ``None``: the rule does not apply
        (unless it is ``always``)."""
        w = self.window_days
        calls = max(policy["calls"], RECORDINGS_MIN_DAYS) if "calls" in policy else None
        transcripts, translations = policy.get("transcriptions"), policy.get("translations")
        return {"calls_deleted": w, "accounts_deleted": w, "campaigns_deleted": w, "users_deleted": w,
                "calls_expired": calls, "evidence_expired": calls,
                "recordings_expired": max(policy.get("recordings", RECORDINGS_MIN_DAYS), RECORDINGS_MIN_DAYS),
                "transcriptions_expired": transcripts, "archives_expired": transcripts,
                "translations_expired": translations, "archived_translations_expired": translations,
                "exports_expired": BOUNDS["exports"], "call_jobs_finished": BOUNDS["call_jobs"],
                "billing_outbox_sent": BOUNDS["billing_outbox"], "imports_finished": BOUNDS["import_jobs"]}

    async def run_org(self, org: uuid.UUID, *, dry_run: bool = False,
                      only: frozenset[str] | None = None) -> OrgReport:
        """One organisation's rules (``only``: these of them); not guarded by the lock (``run`` is)."""
        rep = OrgReport(org)
        async with self.db.tenant(org) as conn:
            policy = {r["resource"]: r["days"] for r in await conn.fetch(
                "SELECT resource, days FROM retention_policies")}
        days = self.days(policy)
        for rule in RULES:
            if only is not None and rule.name not in only:
                continue
            n_days = days[rule.name]
            if n_days is not None or rule.always:
                rep.add(rule.name, await self._apply(org, rule, n_days, dry_run))
        archive_days = policy.get("archive", self.archive_after_days)
        if archive_days and only is None:
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

    async def _apply(self, org: uuid.UUID, rule: Rule, n_days: int | None, dry_run: bool) -> int:
        if dry_run:
            async with self.db.tenant(org) as conn:
                return int(await conn.fetchval(rule.count(), n_days))
        total = 0
        while True:
            # One transaction a batch, its rows locked from the select to their end: a restore (or any
            # change) of one of them between the two would otherwise be purged anyway, its objects with it.
            async with self.db.tenant(org) as conn:
                rows = await conn.fetch(rule.select(), n_days, self.batch)
                ids = [r["id"] for r in rows]
                if rule.key:
                    keys = [r["storage_key"] for r in rows if r["storage_key"]]
                elif rule.call_objects and ids:
                    keys = [r["storage_key"] for r in await conn.fetch(CALL_OBJECTS_SQL, ids)]
                else:
                    keys = []
                for key in keys:  # objects first: a stop here leaves rows to finish, never a lost object's row
                    if rule.rewrite:
                        await self._drop_translations(key)
                    else:
                        await self.blobs.delete(key)
                done = rows_affected(await conn.execute(rule.end(), ids)) if ids else 0
            if ids:
                total += done
                if done == 0:  # rows it found but cannot end (a grant or a policy said no): never spin on them
                    log.warning("retention.stuck", extra={"org_id": str(org), "rule": rule.name, "rows": len(ids)})
                    return total
            if len(ids) < self.batch:
                return total

    async def _drop_translations(self, key: str) -> None:
        try:
            await drop_translations(self.blobs, key)
        except BlobNotFound:  # the object is gone already (nothing of it to keep): the row is corrected below
            log.warning("retention.archive_missing", extra={"key": key})

    async def _webhook_events(self, n_days: int, dry_run: bool) -> int:
        async with self.db.no_tenant() as conn:
            if dry_run:
                return int(await conn.fetchval(f"SELECT count(*) FROM webhook_events WHERE {_WEBHOOKS_DUE}",
                                               n_days))
        total = 0
        while True:
            async with self.db.no_tenant() as conn:
                n = rows_affected(await conn.execute(_WEBHOOKS_DELETE, n_days, self.batch))
            total += n
            if n < self.batch:
                if total:
                    log.info("retention.webhook_events", extra={"deleted": total})
                return total
