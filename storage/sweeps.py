"""The sweeps of migrations 0008 (``sweep_stalled_calls``, ``sweep_interrupted_imports``) and 0019
(``sweep_lost_nodes``, with the nodes' ``beat_node``), called from Python.

All run in whatever transaction ``conn`` holds, need no tenant (they see every organisation through
their SECURITY DEFINER function, and nothing else), close at most ``limit`` rows, and may run on any
number of nodes at once: each row is closed once (the migrations say how).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg

from storage.records import ClosedCall

NO_WEBHOOK = "no_webhook"  # calls.end_reason of a call the sweeper closed
NODE_LOST = "node_lost"  # calls.end_reason of a call whose node stopped beating (0019_nodes.sql)
IMPORT_INTERRUPTED = ("interrupted: the server running this import stopped before it finished; re-upload the file "
                      "(rows already imported are kept, and the upload is idempotent on external_ref)")


@dataclass(frozen=True, slots=True)
class StalledCall:
    org_id: uuid.UUID
    call_id: uuid.UUID
    call_control_id: str
    previous_status: str


async def sweep_stalled_calls(conn: asyncpg.Connection, *, initiating_s: float, ringing_s: float, ending_s: float,
                              limit: int, actor: str) -> list[StalledCall]:
    """Close calls no node streams that waited longer than their state's time for a webhook: 'failed',
    end_reason ``NO_WEBHOOK``, audited as ``actor`` (the node's id)."""
    rows = await conn.fetch("SELECT * FROM sweep_stalled_calls($1, $2, $3, $4, $5)",
                            initiating_s, ringing_s, ending_s, limit, actor)
    return [StalledCall(r["org_id"], r["call_id"], r["call_control_id"], r["previous_status"]) for r in rows]


async def sweep_interrupted_imports(conn: asyncpg.Connection, *, stale_s: float, limit: int, actor: str,
                                    node_id: str | None = None) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """Fail running imports whose heartbeat is older than ``stale_s``, and, given ``node_id`` (at that
    node's start, when none of its imports can be alive), that node's own running imports; audited as
    ``actor`` (the sweeping node's id).  Returns (organisation, import id) of each."""
    rows = await conn.fetch("SELECT * FROM sweep_interrupted_imports($1, $2, $3, $4, $5)",
                            stale_s, node_id, limit, IMPORT_INTERRUPTED, actor)
    return [(r["org_id"], r["import_id"]) for r in rows]


async def beat_node(conn: asyncpg.Connection, node_id: str) -> bool:
    """Stamp ``node_id``'s heartbeat with the database's clock; True when its row had to be inserted (a
    node never seen, or one a sweep declared lost and forgot since its last beat)."""
    return bool(await conn.fetchval("SELECT beat_node($1)", node_id))


@dataclass(frozen=True, slots=True)
class LostNodes:
    """One ``sweep_lost_nodes`` call: the calls it closed, by node, and the node rows it removed."""

    calls: list[tuple[str, ClosedCall]]
    forgotten: list[str]


async def sweep_lost_nodes(conn: asyncpg.Connection, *, dead_s: float, limit: int, actor: str) -> LostNodes:
    """Close the open calls of nodes whose heartbeat is older than ``dead_s``: 'failed', end_reason
    ``NODE_LOST``, audited as ``actor`` (the sweeping node's id); at most ``limit`` calls.  Nodes left with
    no open call are forgotten (their rows removed)."""
    rows = await conn.fetch("SELECT * FROM sweep_lost_nodes($1, $2, $3)", dead_s, limit, actor)
    calls = [(r["node_id"], ClosedCall(r["org_id"], r["call_id"], r["call_control_id"], r["previous_status"]))
             for r in rows if r["org_id"] is not None]
    return LostNodes(calls, [r["node_id"] for r in rows if r["org_id"] is None])
