"""Placing and ending calls over REST (``POST /api/voice/call``, ``POST /api/voice/hangup``), and Telnyx's
webhook door ``POST /api/webhooks/telnyx`` (public: its credential is the Ed25519 signature, checked by
``api.telnyx_signature`` before the body is parsed; the work is ``api.telnyx_calls.TelnyxCalls``).

Placing a call: the account (or number) must not be do-not-call (409 ``conflict``) and the
organisation must be in good standing (402 ``payment_required``); the call is stored ``initiating``
with an audit entry before Telnyx is asked, so a call Telnyx places is never unknown here.  It has no
``node_id`` until its media stream reaches a node: the placing node does not own it (webhooks reach any
node), so that node's restart recovery must not fail a call that is ringing on Telnyx.  Telnyx
gets ``command_id`` = our call id (its idempotency), ``client_state`` = our organisation and call,
and a per-call media credential (``Authenticator.call_token``) as ``stream_auth_token``: media tokens
are stored only as hashes, so one is derived rather than handed out.  A refusal from Telnyx marks the
call ``failed`` with the reason and answers 503.  Hanging up asks Telnyx; the call ends when the
``call.hangup`` webhook says so (422 with code 90018, "already ended", is success).

Languages: ``language`` is the agent's (the stream's outbound track), ``target_language`` the
consumer's (the inbound track).  With ``translate: true`` the call is bilingual and translated both
ways: the stream URL carries ``?language=<agent's>&consumer_language=<consumer's>&translate_to=<consumer's>``
(``api.media_stream``), so the consumer's speech is recognised in their language and translated into
the agent's, and the agent's into the consumer's.  Without it the stream is ``?language=<language>
&translate_to=none``: one language on both tracks, not translated.

Webhook answers: 200 ``{"received", "applied", "duplicate"}`` for every verified event (a replay, an
unknown type, a call not ours and a backwards transition change nothing); 401 for a missing, wrong or
stale signature; 400 for a signed body that is not an event (or holds a NUL anywhere); 503 when
``TELNYX_PUBLIC_KEY`` is unset.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any
from urllib.parse import urlencode

import orjson
from pydantic import BaseModel, Field, StringConstraints, model_validator

from api.billing import billing_in_good_standing
from api.collections_api import PHONE
from api.envelope import ApiError, not_found
from api.rest import Reply, Req, Route, Strict, WebhookOut, nul_fields
from api.telnyx_calls import ALREADY_ENDED, OPEN, PENDING_PREFIX, ProviderError, TelnyxCalls, client_state
from api.telnyx_signature import SIGNATURE_HEADER, TIMESTAMP_HEADER, PublicKeyError, SignatureError, public_key, verify
from engine.ids import ID as CALL_ID

WEBHOOK_MAX_BODY = 256 << 10
Phone = Annotated[str, StringConstraints(pattern=PHONE)]
Lang = Annotated[str, StringConstraints(pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$")]


class PlaceCallIn(Strict):
    account_id: uuid.UUID | None = Field(None, description="call this account's first number")
    to: Phone | None = Field(None, description="an E.164 number (instead of account_id)")
    from_: Phone | None = Field(None, alias="from", description="default: the voice config's caller_id")
    language: Lang | None = Field(None, description="the agent's language (the outbound track); default the "
                                                    "server's first language")
    translate: bool = Field(False, description="translate the call both ways between language and target_language")
    target_language: Lang | None = Field(None, description="with translate: the consumer's language (the inbound "
                                                           "track), another of the server's languages")

    @model_validator(mode="after")
    def _one_target(self) -> PlaceCallIn:
        if (self.account_id is None) == (self.to is None):
            raise ValueError("give exactly one of account_id and to")
        return self


class HangupIn(Strict):
    # Any string: one that is not a call id answers as an unknown call does (404), as a malformed id in a
    # path does (api.rest), so the answer never says which ids are well-formed but someone else's.
    call_id: Annotated[str, StringConstraints(max_length=1024)] = Field(
        description="the call's id (its call_control_id, as in /api/calls)")


class PlacedCall(BaseModel):
    id: uuid.UUID
    call_id: str = Field(description="the call_control_id: the call's id in /api/calls and its event stream")
    status: str
    to: str
    from_: str = Field(alias="from")


class HangupOut(BaseModel):
    call_id: str
    status: str


def _service(req: Req) -> TelnyxCalls:
    if req.rt.telnyx is None:
        raise ApiError("unavailable", "calls need storage", headers={"Retry-After": "60"})
    return req.rt.telnyx


def _stream_url(req: Req, language: str, target: str) -> str:
    """The media stream URL: ``target`` (the consumer's language, or "none") makes the call bilingual."""
    s = req.rt.settings
    base = s.public_base_url.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base[len("https://"):]
    elif base.startswith("http://"):
        base = "ws://" + base[len("http://"):]
    elif not base:
        base = f"ws://{s.host}:{s.port}"
    query = {"language": language, "translate_to": target}
    if target != "none":
        query = {"language": language, "consumer_language": target, "translate_to": target}
    return f"{base}/api/media/telnyx?" + urlencode(query)


def _languages(req: Req, body: PlaceCallIn) -> tuple[str, str]:
    langs = req.rt.settings.languages
    language = body.language or langs[0]
    target = body.target_language if body.translate else "none"
    bad = []
    if language not in langs:
        bad.append({"field": "language", "message": f"not one of {langs}", "type": "language"})
    if body.translate and (target is None or target not in langs or target == language):
        bad.append({"field": "target_language", "message": f"another of {langs}", "type": "language"})
    if bad:
        raise ApiError("validation_failed", "the body failed validation", bad)
    return language, target or "none"


async def place_call(req: Req) -> Reply:
    body: PlaceCallIn = req.body
    service = _service(req)
    language, target = _languages(req, body)
    s = req.rt.settings
    client = service.client()
    if client is None or not s.telnyx_connection_id:
        raise ApiError("unavailable", "calls are not configured on this server (TELNYX_API_KEY, "
                       "TELNYX_CONNECTION_ID)", headers={"Retry-After": "60"})
    org, db = req.p.org_id, service.db
    async with db.tenant(org) as conn:
        if body.account_id is not None:
            acct = await conn.fetchrow("SELECT phones, do_not_call FROM collection_accounts "
                                       "WHERE id = $1 AND deleted_at IS NULL", body.account_id)
            if acct is None:
                raise not_found("account")
            if acct["do_not_call"]:
                raise ApiError("conflict", "this account is marked do-not-call")
            if not acct["phones"]:
                raise ApiError("conflict", "this account has no phone number")
            to = acct["phones"][0]
        else:
            to = body.to
            if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM collection_accounts WHERE $1 = ANY(phones) "
                                   "AND do_not_call AND deleted_at IS NULL)", to):
                raise ApiError("conflict", "this number belongs to an account marked do-not-call")
        caller = body.from_ or await conn.fetchval("SELECT caller_id FROM voice_configs")
    if caller is None:
        raise ApiError("validation_failed", "no caller number",
                       [{"field": "from", "message": "give from, or set caller_id in /api/voice-config",
                         "type": "missing"}])
    if not await billing_in_good_standing(db, org):
        raise ApiError("payment_required", "the organisation's subscription is past due or unpaid; new calls "
                       "cannot be placed until it is paid (GET /api/billing)")
    call = uuid.uuid4()
    pending = f"{PENDING_PREFIX}{call}"
    async with db.tenant(org) as conn:
        await conn.execute(
            "INSERT INTO calls (id, org_id, call_control_id, direction, from_number, to_number, status, account_id) "
            "VALUES ($1, $2, $3, 'outbound', $4, $5, 'initiating', $6)",
            call, org, pending, caller, to, body.account_id)
        await req.audit("call.placed", "call", call, None,
                        {"to": to, "from": caller, "account_id": str(body.account_id) if body.account_id else None,
                         "language": language, "translate_to": target}).apply(conn)
    command = {
        "connection_id": s.telnyx_connection_id, "to": to, "from": caller,
        "client_state": client_state(org, call), "command_id": str(call),
        "stream_url": _stream_url(req, language, target), "stream_track": "both_tracks",
        "stream_bidirectional_mode": "rtp", "stream_auth_token": req.rt.auth.call_token(org, call),
        "record": "record-from-answer", "record_channels": "dual", "record_format": "wav"}
    try:
        data = await client.post("/v2/calls", command)
        ccid = data.get("call_control_id")
        if not isinstance(ccid, str) or not CALL_ID.fullmatch(ccid):
            raise ProviderError(0, "", "the answer has no valid call_control_id")
    except ProviderError as exc:
        async with db.tenant(org) as conn:
            await conn.execute("UPDATE calls SET status = 'failed', end_reason = $2, ended_at = now(), "
                               "updated_at = now() WHERE id = $1 AND status = 'initiating'",
                               call, f"provider_error: {exc}"[:500])
            await req.audit("call.failed", "call", call, {"status": "initiating"},
                            {"status": "failed", "reason": str(exc)[:200]}).apply(conn)
        raise ApiError("unavailable", "the telephony provider did not place the call; retry later",
                       headers={"Retry-After": "5"}) from exc
    session = data.get("call_session_id")
    async with db.tenant(org) as conn:
        row = await conn.fetchrow(
            "UPDATE calls SET call_control_id = CASE WHEN call_control_id = $2 THEN $3 ELSE call_control_id END, "
            "call_session_id = coalesce(call_session_id, $4), updated_at = now() WHERE id = $1 "
            "RETURNING call_control_id, status", call, pending, ccid,
            session if isinstance(session, str) and len(session) <= 128 else None)
    return Reply(PlacedCall.model_validate({"id": call, "call_id": row["call_control_id"], "status": row["status"],
                                            "to": to, "from": caller}).model_dump(mode="json", by_alias=True),
                 status=201)


async def hangup(req: Req) -> Reply:
    body: HangupIn = req.body
    service = _service(req)
    org = req.p.org_id
    if not CALL_ID.fullmatch(body.call_id) or body.call_id.startswith(PENDING_PREFIX):
        raise not_found("call")  # a pending id names no call anyone was given
    async with service.db.tenant(org) as conn:
        row = await conn.fetchrow("SELECT id, status FROM calls WHERE call_control_id = $1 AND deleted_at IS NULL",
                                  body.call_id)
    if row is None:
        raise not_found("call")
    if row["status"] not in OPEN:
        raise ApiError("conflict", f"the call has ended ({row['status']})")
    client = service.client()
    if client is None:
        raise ApiError("unavailable", "calls are not configured on this server (TELNYX_API_KEY)",
                       headers={"Retry-After": "60"})
    try:
        await client.post(f"/v2/calls/{body.call_id}/actions/hangup", {"command_id": f"hangup-{row['id']}"})
    except ProviderError as exc:
        if not (exc.status == 422 and exc.code == ALREADY_ENDED):
            raise ApiError("unavailable", "the telephony provider did not take the hangup; retry later",
                           headers={"Retry-After": "5"}) from exc
    async with service.db.tenant(org) as conn:
        status = await conn.fetchval(
            "UPDATE calls SET status = CASE WHEN status IN ('initiating', 'ringing', 'active') THEN 'ending' "
            "ELSE status END, updated_at = now() WHERE id = $1 RETURNING status", row["id"])
        await req.audit("call.hangup_requested", "call", body.call_id, {"status": row["status"]},
                        {"status": status}).apply(conn)
    return Reply(HangupOut(call_id=body.call_id, status=status).model_dump(), status=202)


async def telnyx_webhook(req: Req) -> Reply:
    service = _service(req)
    configured = req.rt.settings.telnyx_public_key
    if not configured:
        raise ApiError("unavailable", "Telnyx webhooks are not configured on this server (TELNYX_PUBLIC_KEY)",
                       headers={"Retry-After": "60"})
    try:
        key = public_key(configured)
    except PublicKeyError:
        raise ApiError("unavailable", "TELNYX_PUBLIC_KEY is not a valid key", headers={"Retry-After": "60"}) from None
    raw = await req.request.read()
    h = req.request.headers
    try:
        verify(h.get(SIGNATURE_HEADER), h.get(TIMESTAMP_HEADER), raw, key, time.time(),
               req.rt.settings.telnyx_webhook_tolerance_s)
    except SignatureError as exc:
        raise ApiError("unauthenticated", f"not a valid Telnyx delivery: {exc}") from None
    try:
        envelope = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError("bad_request", "the body is not JSON") from None
    if nul_fields(envelope, "body"):  # PostgreSQL text cannot hold one: refused before any value is stored
        raise ApiError("bad_request", "the event holds a NUL character")
    data: Any = envelope.get("data") if isinstance(envelope, dict) else None
    if not (isinstance(data, dict) and isinstance(data.get("id"), str) and 0 < len(data["id"]) <= 255
            and "\x00" not in data["id"] and isinstance(data.get("event_type"), str)
            and 0 < len(data["event_type"]) <= 100 and isinstance(data.get("payload"), dict)):
        raise ApiError("bad_request", "the body is not a Telnyx event (data.id, data.event_type, data.payload)")
    return Reply(await service.apply_event(data["id"], data["event_type"], data["payload"]))


ROUTES = [
    Route("POST", "/api/voice/call", "place_call", "Place a call through Telnyx", "voice", "action", "calls.place",
          place_call, body=PlaceCallIn, response=PlacedCall, status=201,
          errors=("conflict", "payment_required", "not_found"), max_body=2048, rate="calls_place_per_min",
          description="Refused for a do-not-call account or number (409) and for an organisation whose "
                      "subscription is past due or unpaid (402); at most `CALLS_PLACE_PER_MIN` (30) a minute per "
                      "credential (429).  The call is `initiating` until Telnyx's webhooks move it (ringing, "
                      "active, completed / no_answer / busy / failed)."),
    Route("POST", "/api/voice/hangup", "hangup_call", "Hang up a placed call", "voice", "action", "calls.place",
          hangup, body=HangupIn, response=HangupOut, status=202, errors=("conflict", "not_found"), max_body=1024,
          description="Asks Telnyx to hang up; the call ends when the `call.hangup` webhook arrives."),
    Route("POST", "/api/webhooks/telnyx", "telnyx_webhook", "Telnyx Call Control's webhook (signed deliveries)",
          "voice", "public", None, telnyx_webhook, response=WebhookOut, raw_body=True, max_body=WEBHOOK_MAX_BODY,
          errors=("unauthenticated", "bad_request", "payload_too_large", "unsupported_media_type"),
          description="Credential: the Ed25519 signature (headers telnyx-signature-ed25519 and telnyx-timestamp, "
                      "over `timestamp|body`, TELNYX_PUBLIC_KEY, 300 s tolerance).  Each event is applied once; a "
                      "replay, an unknown type or a call not ours answers 200 and changes nothing."),
]
