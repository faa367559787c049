"""Placing calls through Telnyx Call Control v2, and the webhook events that move them.

The call's life as Telnyx reports it, a table (the media path's own states are pipelines.call_state)::

    initiating --call.initiated--> ringing --call.answered--> active --call.hangup--> <final>
    (any open state) --call.hangup--> <final by hangup_cause>          (HANGUP_STATUS)
    ending (we asked Telnyx to hang up) --call.hangup--> <final>
    initiating | ringing | ending, no node streaming, no progress for long --sweep--> failed (no_webhook)
                                                                                     (api.sweeper)

Ranks order the states (``RANK``); an event whose target ranks at or below the call's state (a late
``call.initiated`` after ``call.answered``, anything after a final state) changes nothing and is
counted (``CallCounters.backwards``): Telnyx does not promise delivery order.  One exception:
``call.hangup`` on a call the media path already ended (its stream stopped first: its end reason is one
of ``MEDIA_END_REASONS``) sets Telnyx's final status and cause, which say how the call ended; the media
path's reason stays in its audit entry.  Only once: a second ``call.hangup`` (another event id for the
same hangup) finds Telnyx's cause there and changes nothing.

Who the event is for: ``payload.client_state``, which we set when placing the call (base64 of
``{"org", "call"}``, our organisation and ``calls.id``); the Ed25519 signature proves Telnyx sent it back
unchanged, so it is trusted to name the tenant.  An event without a client state of ours (a call
placed elsewhere on the same Telnyx connection) is recorded and ignored.

Exactly once: each event id goes into ``webhook_events`` (provider ``telnyx``) in the transaction of
its effect; a replay finds it there and changes nothing.

Errors: ``ProviderError`` (a non-2xx answer with Telnyx's first error code, a timeout, no connection).
"""

from __future__ import annotations

import base64
import binascii
import logging
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import asyncpg
import orjson

from api.auth import PENDING_CALL_PREFIX
from api.call_session import call_key
from api.settings import Settings
from pipelines.call_state import ENDING_EVENTS, CallEvent
from pipelines.events import CallStateChanged
from storage.db import Database
from storage.records import CALL_USAGE_SQL, METER_EVENT_NAME, AuditEntry
from storage.sweeps import NODE_LOST

if TYPE_CHECKING:
    from api.hub import EventHub
    from api.post_call import PostCall

log = logging.getLogger("switchboard.telnyx")

HTTP_TIMEOUT_S = 10.0
PENDING_PREFIX = PENDING_CALL_PREFIX  # calls.call_control_id until Telnyx names the call (the column is NOT NULL)
ALREADY_ENDED = "90018"  # Telnyx's error code for a command on a call that has ended
OPEN = frozenset({"initiating", "ringing", "active", "ending"})
RANK = {"initiating": 0, "ringing": 1, "active": 2, "ending": 3,
        "completed": 4, "failed": 4, "no_answer": 4, "busy": 4}
EVENT_STATUS = {"call.initiated": "ringing", "call.answered": "active"}
HANGUP_STATUS = {"normal_clearing": "completed", "user_busy": "busy", "no_answer": "no_answer",
                 "timeout": "no_answer", "originator_cancel": "no_answer", "call_rejected": "failed",
                 "not_found": "failed", "unspecified": "failed", "time_limit": "completed"}
HANDLED = frozenset({*EVENT_STATUS, "call.hangup"})
# What the media path writes into calls.end_reason (pipelines.call_state), and the sweeper for the calls
# of a node that stopped beating (storage.sweeps.NODE_LOST): a final state Telnyx may settle.
MEDIA_END_REASONS = frozenset(e.value for e in (*ENDING_EVENTS, CallEvent.NODE_RESTART)) | {NODE_LOST}
RECORDING_SAVED = "call.recording.saved"  # no state change: a recording_fetch job (api.post_call)


class ProviderError(Exception):
    """Telnyx did not accept a command: ``status`` (0 for no answer) and its first error ``code``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code


def client_state(org_id: uuid.UUID, call_id: uuid.UUID) -> str:
    return base64.b64encode(orjson.dumps({"org": str(org_id), "call": str(call_id)})).decode()


def parse_client_state(value: Any) -> tuple[uuid.UUID, uuid.UUID] | None:
    """Our (organisation, call) from a ``client_state``; ``None`` when it is not one we set."""
    if not isinstance(value, str) or len(value) > 512:
        return None
    try:
        data = orjson.loads(base64.b64decode(value, validate=True))
        return uuid.UUID(data["org"]), uuid.UUID(data["call"])
    except (binascii.Error, orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


def target_status(event_type: str, payload: dict[str, Any]) -> str | None:
    """The state an event moves a call to; ``None`` for an event that moves none."""
    if event_type == "call.hangup":
        cause = payload.get("hangup_cause")
        return HANGUP_STATUS.get(cause, "failed") if isinstance(cause, str) else "failed"
    return EVENT_STATUS.get(event_type)


class TelnyxClient:
    """JSON ``POST`` to Telnyx's v2 API with a Bearer key."""

    def __init__(self, base_url: str, api_key: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = api_key
        self._session = session

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self._key}"}
        try:
            async with self._session.post(self.base_url + path, json=body, headers=headers,
                                          timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)) as r:
                raw = await r.read()
                status = r.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderError(0, "", type(exc).__name__) from None
        try:
            out = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            out = None
        if status >= 300:
            code, message = "", raw[:200].decode(errors="replace")
            errors = out.get("errors") if isinstance(out, dict) else None
            if isinstance(errors, list) and errors and isinstance(errors[0], dict):
                code = str(errors[0].get("code", ""))[:20]
                message = str(errors[0].get("detail") or errors[0].get("title") or "")[:200]
            raise ProviderError(status, code, message)
        if not isinstance(out, dict) or not isinstance(out.get("data"), dict):
            raise ProviderError(0, "", "the answer has no data object")
        return out["data"]  # type: ignore[no-any-return]


@dataclass(slots=True)
class CallCounters:
    events_applied: int = 0
    events_duplicate: int = 0
    events_ignored: int = 0  # unknown types, or no call of ours
    backwards: int = 0  # a transition to a state the call is already past
    ignored_types: dict[str, int] = field(default_factory=dict)


class TelnyxCalls:
    """The node's Call Control service: the client and the webhook's effects.  ``aclose`` at shutdown."""

    def __init__(self, settings: Settings, db: Database, hub: EventHub, post_call: PostCall | None = None) -> None:
        self.post_call = post_call
        self.settings = settings
        self.db = db
        self.hub = hub
        self.counters = CallCounters()
        self._session: aiohttp.ClientSession | None = None

    def client(self) -> TelnyxClient | None:
        key = self.settings.telnyx_api_key
        if key is None:
            return None
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return TelnyxClient(self.settings.telnyx_api_url, key.get_secret_value(), self._session)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _ignored(self, event_type: str) -> None:
        self.counters.events_ignored += 1
        self.counters.ignored_types[event_type[:60]] = self.counters.ignored_types.get(event_type[:60], 0) + 1

    async def apply_event(self, event_id: str, event_type: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Apply one verified webhook event once; returns the webhook's answer."""
        if event_type == RECORDING_SAVED:
            return await self._recording_saved(event_id, payload)
        ours = parse_client_state(payload.get("client_state")) if event_type in HANDLED else None
        if ours is None:
            async with self.db.no_tenant() as conn:
                fresh = await _record_event(conn, event_id)
            if fresh:
                self._ignored(event_type)
                log.info("telnyx.event_ignored", extra={"event_type": event_type[:60], "event_id": event_id[:80]})
            return {"received": True, "applied": False, "duplicate": not fresh}
        org, call = ours
        target = target_status(event_type, payload)
        assert target is not None
        cause = payload.get("hangup_cause") if event_type == "call.hangup" else None
        cause = cause[:60] if isinstance(cause, str) else None
        ccid = payload.get("call_control_id")
        async with self.db.tenant(org) as conn:
            if not await _record_event(conn, event_id):
                self.counters.events_duplicate += 1
                return {"received": True, "applied": False, "duplicate": True}
            row = await conn.fetchrow("SELECT status, call_control_id, end_reason FROM calls WHERE id = $1 FOR UPDATE",
                                      call)
            if row is None:
                self._ignored(event_type)
                return {"received": True, "applied": False, "duplicate": False}
            # Telnyx's hangup settles how the call ended, even after the media path ended it (the stream
            # stopped first); any other event at or below the call's state is late and changes nothing.
            settles = (event_type == "call.hangup" and RANK[row["status"]] == RANK["completed"]
                       and row["end_reason"] in MEDIA_END_REASONS)
            if RANK[target] <= RANK[row["status"]] and not settles:
                self.counters.backwards += 1
                log.info("telnyx.transition_ignored", extra={"event_type": event_type, "from": row["status"],
                                                             "to": target})
                return {"received": True, "applied": False, "duplicate": False}
            current = row["call_control_id"]
            if current.startswith(PENDING_PREFIX) and isinstance(ccid, str) and 0 < len(ccid) <= 128:
                current = ccid  # the webhook outran the create-call answer
            final = RANK[target] == RANK["completed"]
            await conn.execute(
                "UPDATE calls SET status = $2, call_control_id = $3, updated_at = now(), "
                "started_at = CASE WHEN $2 = 'active' THEN coalesce(started_at, now()) ELSE started_at END, "
                "ended_at = CASE WHEN $4 THEN coalesce(ended_at, now()) ELSE ended_at END, "
                "end_reason = CASE WHEN $4 THEN $5 ELSE end_reason END WHERE id = $1",
                call, target, current, final, cause or event_type)
            if final:  # minutes of an answered call, once per call, even when no media stream reached us
                await conn.execute(CALL_USAGE_SQL, org, current, METER_EVENT_NAME)
            await AuditEntry(org, f"call.{target}", "call", current, actor_type="provider", actor_id="telnyx",
                             old_value={"status": row["status"]},
                             new_value={"status": target, "event_id": event_id[:80],
                                        **({"cause": cause} if cause else {})}).apply(conn)
        self.counters.events_applied += 1
        key = call_key(org, current)
        if self.hub.get(key) is not None:
            self.hub.publish(key, CallStateChanged(current, target, cause))
        return {"received": True, "applied": True, "duplicate": False}

    async def _recording_saved(self, event_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Telnyx stored the call's recording: a ``recording_fetch`` job, written with the event's id, so
        an answered delivery is never forgotten (the fetch itself runs after the answer)."""
        from api.post_call import enqueue

        ours = parse_client_state(payload.get("client_state"))
        urls = payload.get("recording_urls")
        url = urls.get("wav") if isinstance(urls, dict) else None
        if ours is None or not isinstance(url, str):
            async with self.db.no_tenant() as conn:
                fresh = await _record_event(conn, event_id)
            if fresh:
                self._ignored(RECORDING_SAVED if ours is None else f"{RECORDING_SAVED} (no wav url)")
            return {"received": True, "applied": False, "duplicate": not fresh}
        org, call = ours
        async with self.db.tenant(org) as conn:
            if not await _record_event(conn, event_id):
                self.counters.events_duplicate += 1
                return {"received": True, "applied": False, "duplicate": True}
            ccid = await conn.fetchval("SELECT call_control_id FROM calls WHERE id = $1", call)
            if ccid is None:
                self._ignored(RECORDING_SAVED)
                return {"received": True, "applied": False, "duplicate": False}
            await enqueue(conn, org, call, "recording_fetch", f"telnyx:{event_id}",
                          {"url": url[:4096], "event_id": event_id[:255]})
            await AuditEntry(org, "call.recording_saved", "call", ccid, actor_type="provider", actor_id="telnyx",
                             new_value={"event_id": event_id[:80], "channels": str(payload.get("channels"))[:10]}
                             ).apply(conn)
        self.counters.events_applied += 1
        if self.post_call is not None:
            self.post_call.wake()
        return {"received": True, "applied": True, "duplicate": False}


async def _record_event(conn: asyncpg.Connection, event_id: str) -> bool:
    return bool(await conn.fetchval(
        "INSERT INTO webhook_events (provider, event_id) VALUES ('telnyx', $1) ON CONFLICT DO NOTHING RETURNING 1",
        event_id))
