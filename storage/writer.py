"""The bounded, batched writer between the real-time path and PostgreSQL.

The media path never awaits the database.  It calls ``submit(record)``, which only appends to a
bounded buffer; one task writes the buffer out in batches.

Rules:

- **Batching.**  After the first record arrives the task waits ``flush_interval`` for more, then
  takes up to ``batch`` records from the head.  It groups them by organisation (order kept within
  each) and writes each group in one tenant transaction.
- **Transient failure** (the server is down, restarting or refusing connections, the pool timed
  out): the batch stays at the head and is retried with exponential backoff (``retry_initial`` up to
  ``retry_max``) for as long as it takes.  Meanwhile ``submit`` keeps accepting up to the bound.
  Records are idempotent (``storage.records``), so a batch retried after an ambiguous COMMIT writes
  nothing twice.
- **Permanent failure of a record** (a constraint or data error, a missing parent row): the group is
  written again one record at a time; each record that still fails is logged with its kind and error
  class and counted in ``rejected``.  One bad record never holds up the rest.
- **Overflow.**  When ``max_items`` records are waiting, ``submit`` returns False.  The refused record
  is counted in ``dropped`` and logged with its kind, so it is reported, never silently lost.  While
  the buffer is below the bound nothing is lost: a database outage shorter than
  ``max_items / write rate`` loses no record.
- **Close.**  ``aclose(drain_s)`` stops accepting, writes what it can within ``drain_s`` and reports
  what is left in ``unsaved`` (logged).
- **Confirmation.**  ``submit(record, on_done=cb)`` calls ``cb(True)`` once the record is committed,
  ``cb(False)`` when the database rejected it or the writer closed with it unsaved: for a caller that
  must not let go of something (a recording file) before its row is stored.  ``cb`` runs on the event
  loop and must not block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice

import asyncpg

from engine.backoff import Backoff
from storage.db import Database
from storage.records import Record

log = logging.getLogger("switchboard.writer")

TRANSIENT = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,  # includes ConnectionDoesNotExistError: the server went away mid-query
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,  # starting up or shutting down
    asyncpg.OperatorInterventionError,  # admin shutdown, crash shutdown
    asyncpg.TooManyConnectionsError,
    asyncpg.InsufficientResourcesError,
)


@dataclass(slots=True)
class WriterStats:
    submitted: int = 0
    written: int = 0
    dropped: int = 0  # refused by submit: the buffer was full
    rejected: int = 0  # the database refused the record itself
    retries: int = 0  # batches retried after a transient failure
    unsaved: int = 0  # left in the buffer when the writer closed
    last_error: str = ""


class PersistWriter:
    def __init__(self, db: Database, *, max_items: int = 20_000, batch: int = 200, flush_interval: float = 0.05,
                 retry_initial: float = 0.1, retry_max: float = 2.0) -> None:
        if max_items < 1 or batch < 1:
            raise ValueError("max_items and batch must be positive")
        self._db = db
        self.max_items = max_items
        self._batch = batch
        self._flush_interval = flush_interval
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._buf: deque[Record] = deque()
        self._on_done: dict[int, Callable[[bool], None]] = {}  # id(record) -> confirmation, while buffered
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._outage_since: float | None = None
        self.stats = WriterStats()

    @property
    def pending(self) -> int:
        return len(self._buf)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="persist-writer")

    def submit(self, record: Record, on_done: Callable[[bool], None] | None = None) -> bool:
        """Queue ``record`` for writing.  Never blocks; False (counted, logged) when full or closed, and
        then ``on_done`` is never called."""
        if self._closing or len(self._buf) >= self.max_items:
            self.stats.dropped += 1
            log.error("writer.dropped", extra={"kind": type(record).__name__, "org_id": str(record.org_id),
                                               "pending": len(self._buf), "closing": self._closing})
            return False
        self._buf.append(record)
        if on_done is not None:
            self._on_done[id(record)] = on_done
        self.stats.submitted += 1
        self._idle.clear()
        self._wake.set()
        return True

    async def flush(self, wait_s: float | None = None) -> bool:
        """Wait until everything submitted so far is written (or rejected); False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), wait_s)
        except TimeoutError:
            return False
        return True

    async def aclose(self, drain_s: float = 10.0) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=drain_s)
            if not done:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        self.stats.unsaved = len(self._buf)
        for r in self._buf:
            self._confirm(r, False)
        if self._buf:
            kinds: dict[str, int] = {}
            for r in self._buf:
                kinds[type(r).__name__] = kinds.get(type(r).__name__, 0) + 1
            log.error("writer.unsaved", extra={"count": len(self._buf), "kinds": kinds,
                                               "last_error": self.stats.last_error})

    # -- the writing task --------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = Backoff(self._retry_initial, self._retry_max)
        while True:
            if not self._buf:
                self._idle.set()
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                if not self._closing:
                    await asyncio.sleep(self._flush_interval)  # let a batch gather
                continue
            batch = list(islice(self._buf, self._batch))
            try:
                await self._write(batch)
            except TRANSIENT as exc:
                self._on_transient(exc)  # and retry until it works, or aclose's drain time runs out
                await asyncio.sleep(backoff.next())
                continue
            for r in batch:
                self._buf.popleft()
                self._confirm(r, True)  # a record rejected within the batch was confirmed False already
            self.stats.written += len(batch)
            backoff.reset()
            if self._outage_since is not None:
                log.warning("writer.recovered", extra={"outage_s": round(time.monotonic() - self._outage_since, 3),
                                                       "pending": len(self._buf)})
                self._outage_since = None

    def _confirm(self, record: Record, stored: bool) -> None:
        cb = self._on_done.pop(id(record), None)
        if cb is not None:
            try:
                cb(stored)
            except Exception:  # a caller's bug must not stop the writer
                log.exception("writer.confirmation_failed", extra={"kind": type(record).__name__})

    def _on_transient(self, exc: BaseException) -> None:
        self.stats.retries += 1
        self.stats.last_error = type(exc).__name__
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning("writer.outage", extra={"error": type(exc).__name__, "pending": len(self._buf)})

    async def _write(self, batch: list[Record]) -> None:
        groups: dict[uuid.UUID, list[Record]] = {}
        for r in batch:
            groups.setdefault(r.org_id, []).append(r)
        for org_id, records in groups.items():
            try:
                async with self._db.tenant(org_id) as conn:
                    for r in records:
                        await r.apply(conn)
            except TRANSIENT:
                raise
            except Exception:  # some record is bad: find it, keep the others
                await self._write_one_by_one(org_id, records)

    async def _write_one_by_one(self, org_id: uuid.UUID, records: list[Record]) -> None:
        for r in records:
            try:
                async with self._db.tenant(org_id) as conn:
                    await r.apply(conn)
            except TRANSIENT:
                raise
            except Exception as exc:
                self.stats.rejected += 1
                self.stats.written -= 1  # counted in `rejected`, not in `written`, when the batch completes
                self.stats.last_error = type(exc).__name__
                self._confirm(r, False)
                # The error's class, SQLSTATE and constraint name only: a message may quote row values.
                log.error("writer.rejected", extra={"kind": type(r).__name__, "org_id": str(org_id),
                                                    "error": type(exc).__name__,
                                                    "sqlstate": getattr(exc, "sqlstate", None),
                                                    "constraint": getattr(exc, "constraint_name", None)})
