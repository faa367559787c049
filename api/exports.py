"""Report exports: calls, payments or accounts of a period as CSV or XLSX, made in the background.

``POST /api/exports {kind, format, since?, until?}`` (owners and admins) answers 202 with the job, or
429 + ``Retry-After`` while ``EXPORTS_PER_ORG`` (2) of the organisation's exports are queued or running;
``GET /api/exports/{id}`` its status and rows so far; ``GET /api/exports/{id}/url`` a signed download
URL once it is ``done``.  The job reads through a server-side cursor (``FETCH_ROWS`` rows at a time)
and writes each batch to a local file in a thread (CSV with the standard library; XLSX with
xlsxwriter in constant-memory mode), so memory stays flat however many rows; then the file goes to
the cold tier (``exports/<org>/<job>.<ext>``) and is deleted locally.

Spreadsheet safety: a text cell that begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
return is written with a leading apostrophe (it would otherwise run as a formula in a spreadsheet);
numbers and dates are written as such.  What is exported holds only redacted or non-restricted data
(the encrypted fields are never exported).

A job the node ran when it died stays ``running``; the node fails its own at its next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import logging
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, Field, field_validator, model_validator

from api.envelope import ApiError, not_found
from api.rest import Reply, Req, Route, Strict
from storage.db import rows_affected

log = logging.getLogger("switchboard.exports")

FETCH_ROWS = 2000  # rows a cursor fetch decodes on the event loop (a few ms at most)
WRITE_SLICE = 250  # rows the writer thread turns into cells between two GIL hand-overs (~1 ms)
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
QUERIES: dict[str, tuple[list[str], str]] = {  # kind -> (columns, SQL with $1 since, $2 until)
    "calls": (["call_id", "direction", "status", "started_at", "ended_at", "duration_s", "end_reason", "agent_id",
               "account_id", "created_at"],
              "SELECT call_control_id, direction, status, started_at, ended_at, "
              "extract(epoch FROM ended_at - started_at)::bigint, end_reason, agent_id::text, account_id::text, "
              "created_at FROM calls WHERE deleted_at IS NULL AND ($1::timestamptz IS NULL OR created_at >= $1) "
              "AND ($2::timestamptz IS NULL OR created_at < $2) ORDER BY created_at, id"),
    "accounts": (["external_ref", "debtor_name", "balance", "currency", "status", "consent", "do_not_call",
                  "created_at"],
                 "SELECT external_ref, debtor_name, balance_cents / 100.0, currency, status, consent, do_not_call, "
                 "created_at FROM collection_accounts WHERE deleted_at IS NULL "
                 "AND ($1::timestamptz IS NULL OR created_at >= $1) AND ($2::timestamptz IS NULL OR created_at < $2) "
                 "ORDER BY created_at, id"),
    "payments": (["invoice", "amount", "currency", "status", "created_at"],
                 "SELECT stripe_invoice_id, amount_cents / 100.0, currency, status, created_at FROM payments "
                 "WHERE ($1::timestamptz IS NULL OR created_at >= $1) AND ($2::timestamptz IS NULL OR created_at < $2) "
                 "ORDER BY created_at, id"),
}


def safe(value: Any) -> Any:
    """A cell as written: text that a spreadsheet would run as a formula gets a leading apostrophe."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat()
    return value


class _Writer:
    """Rows to a local file, a batch at a time (called in a thread)."""

    def __init__(self, path: Path, fmt: str, columns: list[str]) -> None:
        self.fmt = fmt
        if fmt == "csv":
            self._f = path.open("w", newline="", encoding="utf-8")
            self._csv = csv.writer(self._f)
            self._csv.writerow(columns)
        else:
            import xlsxwriter

            self._wb = xlsxwriter.Workbook(str(path), {"constant_memory": True, "strings_to_formulas": False,
                                                       "strings_to_numbers": False, "strings_to_urls": False})
            self._ws = self._wb.add_worksheet("export")
            self._ws.write_row(0, 0, columns)
            self._row = 1

    def write(self, rows: Sequence[Any]) -> None:
        # In slices with a GIL hand-over between them: a thread running Python keeps the GIL for the
        # interpreter's switch interval (5 ms) whenever the event loop asks for it, and the loop asks at
        # every socket call, so one busy writer thread stretches every loop turn of the node (measured
        # beside a live call: loop stalls p99 37-46 ms, up to 210 ms on a loaded machine).
        for start in range(0, len(rows), WRITE_SLICE):
            cooked = [[safe(v) for v in r] for r in rows[start:start + WRITE_SLICE]]
            if self.fmt == "csv":
                self._csv.writerows(cooked)
            else:
                for r in cooked:
                    self._ws.write_row(self._row, 0, ["" if v is None else v for v in r])
                    self._row += 1
            time.sleep(0)  # let a waiting event loop have the GIL now

    def close(self) -> None:
        if self.fmt == "csv":
            self._f.close()
        else:
            self._wb.close()


# The times a period may name.  Outside them nothing was created, and at the edges of Python's years an
# offset puts the time out of range in UTC: ``until: 9999-12-31T23:59:59-14:00`` was stored, and reading
# it back failed (500).
EARLIEST = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
LATEST = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)


class ExportIn(Strict):
    kind: Literal["calls", "accounts", "payments"]
    format: Literal["csv", "xlsx"] = "csv"
    since: AwareDatetime | None = Field(None, description="created at or after (1970 to 2100)")
    until: AwareDatetime | None = Field(None, description="created before (1970 to 2100; after since)")

    @field_validator("since", "until")
    @classmethod
    def _in_range(cls, t: dt.datetime | None) -> dt.datetime | None:
        if t is not None and not EARLIEST <= t <= LATEST:
            raise ValueError("must be between 1970-01-01 and 2100-01-01")
        return t

    @model_validator(mode="after")
    def _period(self) -> ExportIn:
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise ValueError("until must be after since")  # an empty or reversed period: a mistake, not a job
        return self


class ExportOut(BaseModel):
    id: uuid.UUID
    kind: str
    format: str
    since: dt.datetime | None
    until: dt.datetime | None
    status: str
    rows: int = Field(description="rows written so far")
    bytes: int | None
    error: str | None
    created_at: dt.datetime
    finished_at: dt.datetime | None


_COLUMNS = "id, kind, format, since, until, status, rows, bytes, error, created_at, finished_at"
_tasks: set[asyncio.Task[None]] = set()


async def run_export(req_rt: Any, org: uuid.UUID, job_id: uuid.UUID) -> None:
    tiers = req_rt.tiers
    db = tiers.db
    key = None  # the file's key once it is in the cold tier
    try:
        async with db.tenant(org) as conn:
            job = await conn.fetchrow("UPDATE export_jobs SET status = 'running', updated_at = now() WHERE id = $1 "
                                      "RETURNING kind, format, since, until", job_id)
        if job is None:
            return  # its organisation was wiped meanwhile
        columns, sql = QUERIES[job["kind"]]
        rows = 0
        with tempfile.TemporaryDirectory(prefix="switchboard-export-") as tmp:
            path = Path(tmp) / f"export.{job['format']}"
            writer = await asyncio.to_thread(_Writer, path, job["format"], columns)
            try:
                async with db.tenant(org) as conn:
                    cursor = await conn.cursor(sql, job["since"], job["until"])
                    while batch := await cursor.fetch(FETCH_ROWS):
                        await asyncio.to_thread(writer.write, batch)  # Records, made cells in the thread
                        rows += len(batch)
                        if rows % (FETCH_ROWS * 20) == 0:
                            async with db.tenant(org) as progress:
                                await progress.execute("UPDATE export_jobs SET rows = $2, updated_at = now() "
                                                       "WHERE id = $1", job_id, rows)
            finally:
                await asyncio.to_thread(writer.close)
            size = (await asyncio.to_thread(path.stat)).st_size
            key = f"exports/{org}/{job_id}.{job['format']}"
            await tiers.blobs.put_file(key, path, "text/csv" if job["format"] == "csv" else
                                       "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet")
        async with db.tenant(org) as conn:
            # The organisation's row shared-locked against DELETE /api/org (which takes it FOR UPDATE): either the
            # wipe starts after this commits and finds the file through the job, or the organisation is deleted
            # and the file goes now.  An export still running when its tenant was wiped left its file (every
            # account's name) in the cold tier for good.
            live = await conn.fetchval("SELECT deleted_at IS NULL FROM organizations WHERE id = $1 FOR SHARE", org)
            done = live and rows_affected(await conn.execute(
                "UPDATE export_jobs SET status = 'done', rows = $2, bytes = $3, storage_key = $4, finished_at = now(), "
                "updated_at = now() WHERE id = $1", job_id, rows, size, key))
        if not done:
            await tiers.blobs.delete(key)
            log.info("export.abandoned", extra={"export_id": str(job_id), "reason": "organisation deleted"})
            return
        log.info("export.done", extra={"export_id": str(job_id), "rows": rows, "bytes": size})
    except Exception as exc:  # the job says why; the server goes on
        log.exception("export.failed", extra={"export_id": str(job_id)})
        if key is not None:  # uploaded, but no job row points at it: nothing would ever delete it
            with contextlib.suppress(Exception):
                await tiers.blobs.delete(key)
        async with db.tenant(org) as conn:
            await conn.execute("UPDATE export_jobs SET status = 'failed', error = $2, finished_at = now(), "
                               "updated_at = now() WHERE id = $1", job_id, f"{type(exc).__name__}"[:200])


async def create_export(req: Req) -> Reply:
    body: ExportIn = req.body
    assert req.rt.tiers is not None
    org = req.p.org_id
    cap = req.rt.settings.exports_per_org
    async with req.rt.tiers.db.tenant(org) as conn:
        # One count-then-insert of an organisation at a time (on every node): without the lock, a burst of
        # requests all counted the same running jobs and all inserted (16 at once: 4 accepted under a cap of 2).
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('export_jobs:' || $1::uuid, 0))", org)
        running = await conn.fetchval("SELECT count(*) FROM export_jobs WHERE status IN ('queued', 'running')")
        if running >= cap:
            raise ApiError("rate_limited", f"{running} exports of this organisation are running (at most {cap}); "
                                           "retry when one has finished", headers={"Retry-After": "30"})
        row = await conn.fetchrow(
            f"INSERT INTO export_jobs (org_id, kind, format, since, until, node_id, created_by) "
            f"VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {_COLUMNS}",
            org, body.kind, body.format, body.since, body.until, req.rt.settings.node_id, req.p.subject)
        await req.audit("export.requested", "export_job", row["id"], None,
                        {"kind": body.kind, "format": body.format}).apply(conn)
    task = asyncio.get_running_loop().create_task(run_export(req.rt, org, row["id"]), name="export")
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return Reply(ExportOut.model_validate(dict(row)).model_dump(mode="json"), status=202)


async def _job(req: Req) -> Any:
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        row = await conn.fetchrow(f"SELECT {_COLUMNS}, storage_key FROM export_jobs WHERE id = $1",
                                  req.params["export_id"])
    if row is None:
        raise not_found("export")
    return row


async def get_export(req: Req) -> Reply:
    row = await _job(req)
    return Reply(ExportOut.model_validate(dict(row)).model_dump(mode="json"))


async def export_url(req: Req) -> Reply:
    row = await _job(req)
    if row["status"] != "done":
        raise ApiError("conflict", f"the export is {row['status']}")
    assert req.rt.tiers is not None
    url = await req.rt.tiers.blobs.presign_get(row["storage_key"], expires_s=900)
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        await req.audit("export.url_issued", "export_job", row["id"], None, {"expires_in": 900}).apply(conn)
    return Reply({"url": url, "expires_in": 900}, headers={"Cache-Control": "no-store"})


async def fail_interrupted(db: Any, node_id: str, orgs: list[uuid.UUID]) -> int:
    """At start-up: this node's exports left queued or running by its last run are failed."""
    n = 0
    for org in orgs:
        async with db.tenant(org) as conn:
            done = await conn.execute("UPDATE export_jobs SET status = 'failed', error = 'interrupted: request it "
                                      "again', finished_at = now(), updated_at = now() WHERE status IN ('queued', "
                                      "'running') AND node_id = $1", node_id)
            n += rows_affected(done)
    return n


_E = (("export_id", "uuid"),)
ROUTES = [
    Route("POST", "/api/exports", "create_export", "Export calls, payments or accounts as CSV or XLSX",
          "exports", "action", "exports.write", create_export, body=ExportIn, response=ExportOut, status=202,
          max_body=1024, description="At most `EXPORTS_PER_ORG` (2) of an organisation's exports are queued or "
                                     "running at once; one more is 429 with Retry-After."),
    Route("GET", "/api/exports/{export_id}", "get_export", "An export's status and progress", "exports", "action",
          "exports.read", get_export, params=_E, response=ExportOut, errors=("not_found",)),
    Route("GET", "/api/exports/{export_id}/url", "export_url", "A signed download URL of a finished export",
          "exports", "action", "exports.read", export_url, params=_E, errors=("not_found", "conflict")),
]
