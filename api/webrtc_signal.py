"""WebRTC signalling checks, without I/O: the body of ``POST /api/webrtc/offer`` and its SDP offer.

``parse_offer_request(body, languages)`` returns an ``OfferRequest`` or raises ``SignalError`` whose
``message`` is what the client gets back as ``{"error": message}`` with HTTP 400.  It checks, in order:

* the body is a JSON object;
* ``call_id`` (str, 1-128 characters of ``[A-Za-z0-9:_.-]``: ``engine.ids``, the rule of every door),
  ``sdp`` (str), ``type`` (must be ``"offer"``), ``language`` (optional str, one of the node's
  languages, default the first), ``replace`` (optional bool: take over the agent's live session,
  e.g. after the agent's browser crashed or reloaded).  The agent is the authenticated principal
  (``api.webrtc``): an ``agent_id`` field, which older consoles send, is ignored, unread;
* the SDP (``check_sdp``): at most ``MAX_SDP_BYTES`` of UTF-8, starts with ``v=0``, has an audio
  m-line, and that audio section offers Opus at 48 kHz (``a=rtpmap:<pt> opus/48000/2``) with a
  payload type listed on the m-line.

What the WebRTC stack itself refuses (a syntax error deeper in the SDP, missing ICE credentials) is
reported by ``api.webrtc`` from aiortc's own error; this module only rejects what is plainly not a
usable audio offer, before anything is allocated.  Nothing here imports asyncio, aiohttp or aiortc.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from engine.errors import SwitchboardError
from engine.ids import ID

MAX_SDP_BYTES = 64 * 1024
CALL_ID = ID  # the platform-wide id rule (engine.ids): 1-128 characters of [A-Za-z0-9:_.-]
_OPUS = re.compile(r"^a=rtpmap:(\d+) opus/48000(?:/2)?$", re.IGNORECASE)


class SignalError(SwitchboardError, ValueError):
    """A request the signalling rules refuse; ``message`` is the client-facing reason (HTTP 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class OfferRequest:
    call_id: str
    sdp: str
    language: str
    replace: bool = False


def parse_offer_request(body: bytes, languages: Sequence[str]) -> OfferRequest:
    """Validate an offer request body (see the module docstring); ``SignalError`` on the first fault."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise SignalError(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SignalError("body must be a JSON object")
    call_id = _string(data, "call_id")
    if not CALL_ID.fullmatch(call_id):
        raise SignalError("call_id must be 1-128 characters of [A-Za-z0-9:_-.]")
    kind = _string(data, "type")
    if kind != "offer":
        raise SignalError(f"type must be 'offer', got {kind[:20]!r}")
    language = data.get("language", languages[0])
    if not isinstance(language, str) or language not in languages:
        raise SignalError(f"language must be one of {list(languages)}, got {str(language)[:20]!r}")
    replace = data.get("replace", False)
    if not isinstance(replace, bool):
        raise SignalError("replace must be true or false")
    sdp = _string(data, "sdp")
    check_sdp(sdp)
    return OfferRequest(call_id=call_id, sdp=sdp, language=language, replace=replace)


def check_sdp(sdp: str) -> None:
    """Raise ``SignalError`` unless ``sdp`` looks like an offer carrying Opus audio."""
    size = len(sdp.encode("utf-8", "surrogatepass"))
    if size > MAX_SDP_BYTES:
        raise SignalError(f"sdp is too large: {size} bytes, the limit is {MAX_SDP_BYTES}")
    lines = [line.strip() for line in sdp.splitlines() if line.strip()]
    if not lines or lines[0] != "v=0":
        raise SignalError("sdp must start with 'v=0'")
    sections = _media_sections(lines)
    audio = [s for s in sections if s[0].startswith("m=audio ")]
    if not audio:
        raise SignalError("sdp has no audio m-line")
    for section in audio:
        formats = section[0].split()[3:]
        opus = {m.group(1) for line in section[1:] if (m := _OPUS.match(line))}
        if opus & set(formats):
            return
    raise SignalError("sdp audio does not offer Opus (a=rtpmap:<pt> opus/48000/2)")


def _string(data: dict[str, object], name: str) -> str:
    if name not in data:
        raise SignalError(f"missing field {name!r}")
    value = data[name]
    if not isinstance(value, str):
        raise SignalError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _media_sections(lines: list[str]) -> list[list[str]]:
    """Each m-line with the attribute lines that follow it, up to the next m-line."""
    sections: list[list[str]] = []
    for line in lines:
        if line.startswith("m="):
            sections.append([line])
        elif sections:
            sections[-1].append(line)
    return sections
