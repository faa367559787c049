"""``POST /api/accounts/import`` (a CSV of collection accounts, streamed) and ``GET /api/imports[/{id}]``.

The upload is ``Content-Type: text/csv`` (UTF-8, an optional BOM), at most ``MAX_BYTES``; the one route
whose body the doors do not read (``api.middleware.streamed_body``).  It is imported inline, as it
arrives, in bounded memory: reads cut into lines (at most ``MAX_LINE`` bytes; the rest of a longer line
is skipped unread into memory), batches of ``BATCH`` rows, at most ``MAX_ERRORS`` error entries kept,
and the event loop gets a turn after every read, every ``YIELD_EVERY`` rows and every ``YIELD_LINES``
lines, so a call streaming
beside an import of a file of tiny or repeated rows keeps its pace.  The answer is the finished import
job (200); ``GET /api/imports/{id}`` shows a running one's progress, which is written after every batch.

The file: a header line naming columns (any order) from ``COLUMNS``; ``REQUIRED`` must be there.  One
record per line (quoted fields may hold commas and doubled quotes, not line breaks).  ``phones`` holds
up to 5 E.164 numbers separated by ``;``; ``balance`` is a decimal amount with at most two decimals
(``1234.5``); ``consent`` / ``do_not_call`` are true/false/yes/no/1/0 or empty (false); ``status``
empty is ``open``.  A wrong header (unknown, missing or repeated column, not UTF-8, too long) is 400
``validation_failed`` and no job is made.

Each row is validated on its own; a bad one is counted and reported as ``{"line", "reason"}`` (the
reason names the field and the rule, never the value: the report must not be a copy of personal
data) and the rest go on.  Good rows are upserted on ``(org_id, external_ref)`` among live accounts:
a new ref inserts, a changed row updates, an identical row is left alone, so importing the same file
again changes nothing (``rows_inserted`` and ``rows_updated`` say what happened).  A ref repeated in
the file: the later line wins.  Idempotency-Key is not used on this route: the data is its own key.

Failures: more than ``MAX_BYTES`` is 413, a body that stalls for ``settings.http_body_timeout_s``
between two reads is 408, and a client that goes away leaves the job ``failed`` with the counts of
what was committed (batches already written stay: they are correct rows, and a retry is idempotent).
In every case the job is finished (``failed`` and its ``failure``) before the answer, never left
``running``.  A server that dies mid-import does leave it ``running``, and so the request beats the
job's ``heartbeat_at`` while it runs (every ``sweep_import_stale_s / 4``, and with each batch): a job
whose heartbeat stops is failed as interrupted by the sweeper (``api.sweeper``), or at once when its
node starts again (``api.recovery``).  Should that happen to a live import (PostgreSQL unreachable for
longer than the stale time), its next batch finds the job closed, is rolled back, and the upload is
answered 409 ``conflict`` with the job: batches and the job's end are written only while it is
``running``.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import logging
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from aiohttp.web_protocol import RequestPayloadError
from pydantic import BaseModel

from api.envelope import ApiError, not_found
from api.rest import PageQuery, Reply, Req, Route, decode_cursor, page

log = logging.getLogger("switchboard.import")

CONTENT_TYPE = "text/csv"
MAX_BYTES = 50 << 20
MAX_LINE = 4096
READ_CHUNK = 16 << 10  # bytes per read at most: 16 Ki blank lines are ~2 ms of work between two turns
BATCH = 500
YIELD_EVERY = 100  # rows parsed between two turns of the event loop
YIELD_LINES = 8192  # lines of any kind (blank ones cost ~0.1 us each)
MAX_ERRORS = 1000  # entries kept in the job (the migration's CHECK says the same); the rest are counted

COLUMNS = ("external_ref", "debtor_name", "phones", "balance", "currency", "status", "consent", "do_not_call")
REQUIRED = frozenset({"external_ref", "debtor_name", "balance", "currency"})
STATUSES = frozenset({"open", "promised", "paid", "disputed", "closed"})
_REF = re.compile(r"[!-~]{1,100}")
_PHONE = re.compile(r"\+[1-9][0-9]{6,14}")
_CURRENCY = re.compile(r"[A-Z]{3}")
_AMOUNT = re.compile(r"([0-9]{1,11})(?:\.([0-9]{1,2}))?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FLAGS = {"": False, "false": False, "no": False, "0": False, "true": True, "yes": True, "1": True}


# -- rows, without I/O ----------------------------------------------------------------------------


class RowError(ValueError):
    """A row that cannot be imported; the message is the reason (it never quotes the value)."""


@dataclass(frozen=True, slots=True)
class Row:
    external_ref: str
    debtor_name: str
    phones: tuple[str, ...]
    balance_cents: int
    currency: str
    status: str
    consent: bool
    do_not_call: bool


def parse_header(line: str) -> list[str]:
    """The column names of a header line; raises ``RowError`` with what is wrong."""
    try:
        names = [c.strip().lower() for c in next(csv.reader([line], strict=True))]
    except (csv.Error, StopIteration):
        raise RowError("the header is not a CSV line") from None
    unknown = [n for n in names if n not in COLUMNS]
    if unknown:
        raise RowError(f"unknown column(s) {', '.join(repr(n[:40]) for n in unknown[:5])}; known: {', '.join(COLUMNS)}")
    if len(set(names)) != len(names):
        raise RowError("a column is named twice")
    missing = sorted(REQUIRED - set(names))
    if missing:
        raise RowError(f"missing column(s): {', '.join(missing)}")
    return names


def _flag(value: str, name: str) -> bool:
    flag = _FLAGS.get(value.strip().lower())
    if flag is None:
        raise RowError(f"{name}: not true/false/yes/no/1/0")
    return flag


def parse_row(columns: list[str], line: str) -> Row:
    """One data line as a ``Row``; raises ``RowError``."""
    try:
        fields = next(csv.reader([line], strict=True))
    except (csv.Error, StopIteration):
        raise RowError("not a CSV record (an unclosed quote?)") from None
    if len(fields) != len(columns):
        raise RowError(f"{len(fields)} fields, the header has {len(columns)}")
    v = dict(zip(columns, fields, strict=True))
    ref = v["external_ref"].strip()
    if not _REF.fullmatch(ref):
        raise RowError("external_ref: 1-100 printable ASCII characters without spaces")
    name = v["debtor_name"].strip()
    if not 1 <= len(name) <= 200 or _CONTROL.search(name):
        raise RowError("debtor_name: 1-200 characters, no control characters")
    phones = tuple(p.strip() for p in v.get("phones", "").split(";") if p.strip())
    if len(phones) > 5 or not all(_PHONE.fullmatch(p) for p in phones):
        raise RowError("phones: up to 5 E.164 numbers (+ and 7-15 digits) separated by ;")
    m = _AMOUNT.fullmatch(v["balance"].strip())
    if m is None:
        raise RowError("balance: a non-negative amount with at most 2 decimals")
    cents = int(m[1]) * 100 + int((m[2] or "0").ljust(2, "0"))
    currency = v["currency"].strip().upper()
    if not _CURRENCY.fullmatch(currency):
        raise RowError("currency: 3 letters (ISO 4217)")
    status = v.get("status", "").strip().lower() or "open"
    if status not in STATUSES:
        raise RowError(f"status: one of {', '.join(sorted(STATUSES))}")
    return Row(ref, name, phones, cents, currency, status, _flag(v.get("consent", ""), "consent"),
               _flag(v.get("do_not_call", ""), "do_not_call"))


# -- the job --------------------------------------------------------------------------------------


class ImportOut(BaseModel):
    id: uuid.UUID
    status: str
    rows_total: int
    rows_ok: int
    rows_failed: int
    rows_inserted: int
    rows_updated: int
    errors: list[dict[str, Any]]
    errors_truncated: bool
    failure: str | None
    created_by: uuid.UUID | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


JOB_COLUMNS = ("id, status, rows_total, rows_ok, rows_failed, rows_inserted, rows_updated, errors, failure, "
               "created_by, created_at, updated_at, finished_at")


def job_out(row: Any) -> dict[str, Any]:
    data = dict(row)
    errors = orjson.loads(data["errors"]) if isinstance(data["errors"], str) else data["errors"]
    data["errors"] = errors
    data["errors_truncated"] = data["rows_failed"] > len(errors)
    return ImportOut.model_validate(data).model_dump(mode="json")


class _Abort(Exception):
    """The upload cannot go on: ``error`` is the answer, the job is marked failed with its message."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(slots=True)
class _Progress:
    total: int = 0
    ok: int = 0
    failed: int = 0
    inserted: int = 0
    updated: int = 0


_UPSERT = """
INSERT INTO collection_accounts AS a (org_id, external_ref, debtor_name, phones, balance_cents, currency, status,
                                      consent, do_not_call)
SELECT $1, r, n, CASE WHEN p = '' THEN '{}'::text[] ELSE string_to_array(p, ';') END, b, c, s, co, d
  FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[], $8::boolean[],
              $9::boolean[]) AS t (r, n, p, b, c, s, co, d)
ON CONFLICT (org_id, external_ref) WHERE deleted_at IS NULL DO UPDATE
   SET debtor_name = excluded.debtor_name, phones = excluded.phones, balance_cents = excluded.balance_cents,
       currency = excluded.currency, status = excluded.status, consent = excluded.consent,
       do_not_call = excluded.do_not_call, updated_at = now()
 WHERE (a.debtor_name, a.phones, a.balance_cents, a.currency, a.status, a.consent, a.do_not_call)
       IS DISTINCT FROM (excluded.debtor_name, excluded.phones, excluded.balance_cents, excluded.currency,
                         excluded.status, excluded.consent, excluded.do_not_call)
RETURNING (xmax = 0) AS inserted
"""


async def _write_batch(req: Req, job_id: uuid.UUID, rows: dict[str, Row], errors: list[dict[str, Any]],
                       prog: _Progress) -> None:
    """Upsert ``rows`` and record the progress (and the new ``errors``) in one transaction."""
    assert req.rt.tiers is not None
    batch = list(rows.values())
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        done = await conn.fetch(
            _UPSERT, req.p.org_id, [r.external_ref for r in batch], [r.debtor_name for r in batch],
            [";".join(r.phones) for r in batch], [r.balance_cents for r in batch], [r.currency for r in batch],
            [r.status for r in batch], [r.consent for r in batch], [r.do_not_call for r in batch])
        inserted = sum(1 for r in done if r["inserted"])
        prog.inserted += inserted
        prog.updated += len(done) - inserted
        running = await conn.fetchval(
            "UPDATE import_jobs SET rows_total = $2, rows_ok = $3, rows_failed = $4, rows_inserted = $5, "
            "rows_updated = $6, errors = errors || $7::jsonb, updated_at = now(), heartbeat_at = now() "
            "WHERE id = $1 AND status = 'running' RETURNING true",
            job_id, prog.total, prog.ok, prog.failed, prog.inserted, prog.updated, errors)
        if not running:  # the sweeper took it for dead: this batch is rolled back with the transaction
            raise _Abort(ApiError("conflict", "the import was closed as interrupted while it ran; re-upload the "
                                  "file (the upload is idempotent on external_ref)"))


async def _lines(req: Req, limit_s: float) -> AsyncIterator[list[bytes | None]]:
    """The body's lines (bytes, without the line end), each at most ``MAX_LINE`` bytes, or ``None`` in place
    of a longer one (skipped), a list per read; raises ``_Abort`` past ``MAX_BYTES`` or when a read stalls.

    Each read is cut into lines at once (``bytes.split``, linear in the read), never by slicing the rest of
    the buffer line after line: that is quadratic in the lines of one read, and a read of a megabyte of
    newlines held the event loop for 18 s.  The loop gets a turn after every read."""
    content = req.request.content
    buf = b""
    skipping = False
    received = 0
    while True:
        try:
            async with asyncio.timeout(limit_s):
                chunk = await content.read(READ_CHUNK)  # at most: the work between two turns is bounded
        except TimeoutError:
            raise _Abort(ApiError("request_timeout", f"the upload stalled for {limit_s:g} s")) from None
        if not chunk:
            break
        received += len(chunk)
        if received > MAX_BYTES:
            raise _Abort(ApiError("payload_too_large", f"the upload is larger than {MAX_BYTES} bytes"))
        parts = (buf + chunk).split(b"\n")
        buf = parts.pop()  # the line still open (b"" when the read ended with one)
        if skipping and parts:
            del parts[0]  # the end of the over-long line, reported (and numbered) already
            skipping = False
        out: list[bytes | None] = [None if len(x := p.removesuffix(b"\r")) > MAX_LINE else x for p in parts]
        if skipping:
            buf = b""
        elif len(buf) > MAX_LINE:
            out.append(None)  # reported now, its line number taken; the rest of it is skipped unread
            skipping, buf = True, b""
        if out:
            yield out
        await asyncio.sleep(0)  # one read's worth of work at most between two turns of the event loop
    if buf and not skipping:
        yield [None if len(x := buf.removesuffix(b"\r")) > MAX_LINE else x]


def _decode(line: bytes | None) -> str:
    if line is None:
        raise RowError(f"the line is longer than {MAX_LINE} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise RowError("not UTF-8") from None
    if "\x00" in text:
        raise RowError("NUL character")
    return text


async def import_accounts(req: Req) -> Reply:
    assert req.rt.tiers is not None
    async with contextlib.aclosing(_lines(req, req.rt.settings.http_body_timeout_s)) as lines:
        return await _import(req, lines)


async def _import(req: Req, lines: AsyncIterator[list[bytes | None]]) -> Reply:
    assert req.rt.tiers is not None
    batch: list[bytes | None] = []
    try:
        while not batch:
            got = await anext(lines, None)
            if got is None:
                break
            batch = got
        first = batch[0] if batch else b""
        first = first[3:] if first and first.startswith(b"\xef\xbb\xbf") else first
        columns = parse_header(_decode(first))
    except RowError as exc:
        raise ApiError("validation_failed", "the CSV header is not one this import takes",
                       [{"field": "header", "message": str(exc), "type": "csv_header"}]) from None
    except _Abort as exc:
        raise exc.error from None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        job_id = await conn.fetchval("INSERT INTO import_jobs (org_id, created_by, node_id) VALUES ($1, $2, $3) "
                                     "RETURNING id", req.p.org_id, req.p.user_id, req.rt.settings.node_id)
    beat = asyncio.get_running_loop().create_task(_heartbeat(req, job_id), name="import-heartbeat")
    try:
        return await _run(req, batch, lines, columns, job_id)
    finally:
        beat.cancel()
        await asyncio.gather(beat, return_exceptions=True)


async def _heartbeat(req: Req, job_id: uuid.UUID) -> None:
    """Beat the job's ``heartbeat_at`` while the request runs it (see the module docstring)."""
    assert req.rt.tiers is not None
    every_s = req.rt.settings.sweep_import_stale_s / 4
    while True:
        await asyncio.sleep(every_s)
        try:
            async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
                await conn.execute("UPDATE import_jobs SET heartbeat_at = now() WHERE id = $1 AND status = 'running'",
                                   job_id)
        except (asyncpg.PostgresError, OSError, TimeoutError) as exc:  # the next beat tries again
            log.warning("import.heartbeat_failed", extra={"import_id": str(job_id), "error": type(exc).__name__})


async def _run(req: Req, batch: list[bytes | None], lines: AsyncIterator[list[bytes | None]], columns: list[str],
               job_id: uuid.UUID) -> Reply:
    """Parse and write the rows: ``batch`` is the first read's lines (the header's), then ``lines``'."""
    prog = _Progress()
    failure: ApiError | None = None
    rows: dict[str, Row] = {}
    errors: list[dict[str, Any]] = []
    kept = 0
    line_no = 0
    try:
        while batch:
            for raw in batch:
                line_no += 1
                if line_no % YIELD_LINES == 0:
                    await asyncio.sleep(0)  # a read of blank lines is 64 Ki of them
                if line_no == 1 or (raw is not None and not raw.strip()):
                    continue  # the header; blank lines are not records
                prog.total += 1
                if prog.total % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # rows parse at ~20 us: the event loop gets a turn every few ms
                try:
                    row = parse_row(columns, _decode(raw))
                except RowError as exc:
                    prog.failed += 1
                    if kept < MAX_ERRORS:
                        errors.append({"line": line_no, "reason": str(exc)})
                        kept += 1
                    continue
                prog.ok += 1
                rows[row.external_ref] = row  # a ref twice in one batch: the later line wins
                if len(rows) >= BATCH:
                    await _write_batch(req, job_id, rows, errors, prog)
                    rows, errors = {}, []
            batch = await anext(lines, None) or []
        await _write_batch(req, job_id, rows, errors, prog)
        rows, errors = {}, []
    except _Abort as exc:
        failure = exc.error
    except (ConnectionError, RequestPayloadError, asyncio.CancelledError) as exc:
        await asyncio.shield(_finish(req, job_id, "the client went away mid-upload"))
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise ApiError("bad_request", "the request body could not be read") from None
    except (asyncpg.PostgresError, OSError) as exc:
        await asyncio.shield(_finish(req, job_id, f"storage failed: {type(exc).__name__}"))
        raise
    row = await _finish(req, job_id, failure.message if failure else None)
    if failure is not None:
        raise ApiError(failure.code, failure.message, {"import": job_out(row)}, headers=failure.headers)
    return Reply(job_out(row))


async def _finish(req: Req, job_id: uuid.UUID, failure: str | None) -> Any:
    """Close the job (``done``, or ``failed`` with ``failure``) and audit it, in one transaction.  Counts are
    those committed: rows parsed but not yet written when the upload failed are not claimed."""
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        if failure is not None:
            row = await conn.fetchrow(
                f"UPDATE import_jobs SET status = 'failed', failure = $2, updated_at = now(), finished_at = now() "
                f"WHERE id = $1 AND status = 'running' RETURNING {JOB_COLUMNS}", job_id, failure[:500])
        else:
            row = await conn.fetchrow(f"UPDATE import_jobs SET status = 'done', updated_at = now(), finished_at = now()"
                                      f" WHERE id = $1 AND status = 'running' RETURNING {JOB_COLUMNS}", job_id)
        if row is None:  # already closed (the sweeper's, audited there): as it is
            return await conn.fetchrow(f"SELECT {JOB_COLUMNS} FROM import_jobs WHERE id = $1", job_id)
        await req.audit("accounts.imported", "import_job", job_id, None,
                        {"status": row["status"], "rows_total": row["rows_total"], "rows_ok": row["rows_ok"],
                         "rows_failed": row["rows_failed"], "rows_inserted": row["rows_inserted"],
                         "rows_updated": row["rows_updated"]}).apply(conn)
    return row


async def get_import(req: Req) -> Reply:
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        row = await conn.fetchrow(f"SELECT {JOB_COLUMNS} FROM import_jobs WHERE id = $1", req.params["import_id"])
    if row is None:
        raise not_found("import")
    return Reply(job_out(row))


async def list_imports(req: Req) -> Reply:
    q: PageQuery = req.query
    after = decode_cursor(q.cursor)
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        rows = await conn.fetch(
            f"SELECT {JOB_COLUMNS} FROM import_jobs WHERE ($1::timestamptz IS NULL OR (created_at, id) < ($1, $2)) "
            "ORDER BY created_at DESC, id DESC LIMIT $3",
            after[0] if after else None, after[1] if after else None, q.limit + 1)
    return Reply(page(rows, q.limit, job_out))


ROUTES = [
    Route("POST", "/api/accounts/import", "import_accounts", "Import collection accounts from a CSV (streamed)",
          "accounts", "action", "accounts.import", import_accounts, response=ImportOut,
          stream=(CONTENT_TYPE, MAX_BYTES), errors=("payload_too_large", "unsupported_media_type",
                                                    "request_timeout", "validation_failed", "bad_request"),
          description="Body: text/csv, header line first; columns " + ", ".join(COLUMNS) + ".  Imported inline; "
                      "the answer is the finished job.  Idempotent on external_ref (Idempotency-Key is not used)."),
    Route("GET", "/api/imports", "list_imports", "List import jobs", "accounts", "action", "accounts.import",
          list_imports, query=PageQuery, response=ImportOut, paged=True),
    Route("GET", "/api/imports/{import_id}", "get_import", "An import job: progress and per-line errors", "accounts",
          "action", "accounts.import", get_import, response=ImportOut, params=(("import_id", "uuid"),)),
]
