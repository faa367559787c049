"""Soft delete and restore: one rule for the user-facing resources that have them (collection
accounts, campaigns, ended calls, users).

    live --DELETE--> deleted (deleted_at set: gone from lists, reads and links at once; soft_delete)
    deleted --POST .../restore, within the window--> live (deleted_at cleared)
    deleted --POST .../restore, after the window--> 410 gone (the retention job purges it)
    live --POST .../restore--> 409 conflict (nothing to restore)

A resource's own rules are its parameters: ``refuse`` keeps a row that must not go (an open call, the
last owner) or come back (an erased user), under the row's lock in the same transaction; ``then`` runs
in that transaction after the change (a user's sessions revoked before the commit, and by the caller
again after it).

The window is ``SWITCHBOARD_RESTORE_WINDOW_DAYS`` (30), measured by PostgreSQL's clock from
``deleted_at``, so every node agrees.  Both ways are audited (``<kind>.deleted``, ``<kind>.restored``)
by whoever did it.  A restore that would break a uniqueness rule (a live account took the
``external_ref`` meanwhile) answers 409 ``already_exists`` and changes nothing.  An unknown id and
another tenant's id look the same (404): every statement runs under the caller's tenant.

Revoked API keys and media tokens are not here: revoking a credential is final by design (a leaked
secret must stay dead, so a revoked one never comes back; mint a new one instead).  Deactivated users
(``PATCH active=false``) are still live rows and come back with ``PATCH active``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from api.envelope import ApiError, not_found
from api.rest import Req

# A resource's own rule over a row, in the transaction that holds the row's lock; raises to refuse.
Check = Callable[[asyncpg.Connection, Any], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Deletable:
    table: str
    action: str  # the audit actions' prefix: <action>.deleted, <action>.restored
    resource_type: str  # in the audit trail
    noun: str  # in error messages
    key: str = "id"  # the column the path names
    columns: str = "*"  # what a restore returns


async def soft_delete(req: Req, what: Deletable, key: Any, *, refuse: Check | None = None,
                      old_value: Callable[[Any], dict[str, Any]] | None = None, then: Check | None = None) -> Any:
    """Delete the live row ``key`` of ``what`` (set ``deleted_at``); returns it.  ``refuse(conn, row)``
    may raise to keep a row that must not go yet; ``old_value(row)`` is the audit entry's old value;
    ``then(conn, row)`` runs after the change, before the commit."""
    assert req.rt.tiers is not None
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        row = await conn.fetchrow(f"SELECT * FROM {what.table} WHERE {what.key} = $1 AND deleted_at IS NULL "
                                  "FOR UPDATE", key)
        if row is None:
            raise not_found(what.noun)
        if refuse is not None:
            await refuse(conn, row)
        deleted = await conn.fetchrow(f"UPDATE {what.table} SET deleted_at = now(), updated_at = now() "
                                      f"WHERE id = $1 RETURNING {what.columns}", row["id"])
        await req.audit(f"{what.action}.deleted", what.resource_type, row["id"],
                        old_value(row) if old_value else None, {"deleted": True}).apply(conn)
        if then is not None:
            await then(conn, row)
    return deleted


async def restore(req: Req, what: Deletable, key: Any, *, refuse: Check | None = None) -> Any:
    """Restore the deleted row ``key`` of ``what`` (see the module docstring); returns it.
    ``refuse(conn, row)`` may raise to keep a row deleted (after the window's own checks)."""
    assert req.rt.tiers is not None
    days = req.rt.settings.restore_window_days
    async with req.rt.tiers.db.tenant(req.p.org_id) as conn:
        row = await conn.fetchrow(
            f"SELECT *, now() - deleted_at > make_interval(days => $2) AS expired "
            f"FROM {what.table} WHERE {what.key} = $1 FOR UPDATE", key, days)
        if row is None:
            raise not_found(what.noun)
        if row["deleted_at"] is None:
            raise ApiError("conflict", f"this {what.noun} is not deleted")
        if row["expired"]:
            raise ApiError("gone", f"this {what.noun} was deleted more than {days} days ago and can no longer be "
                                   "restored")
        if refuse is not None:
            await refuse(conn, row)
        try:
            async with conn.transaction():
                restored = await conn.fetchrow(
                    f"UPDATE {what.table} SET deleted_at = NULL, updated_at = now() WHERE id = $1 "
                    f"RETURNING {what.columns}", row["id"])
        except asyncpg.UniqueViolationError:
            raise ApiError("already_exists", f"a live {what.noun} now holds this one's unique fields; change or "
                                             "delete that one first") from None
        await req.audit(f"{what.action}.restored", what.resource_type, row["id"],
                        {"deleted_at": row["deleted_at"].isoformat()}, {"deleted": False}).apply(conn)
    return restored
