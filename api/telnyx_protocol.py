"""The Telnyx media-streaming protocol, without I/O.

Feed it each text frame with ``receive_text``; it returns the events the frame completes, in
sequence order, or raises a ``ProtocolError`` whose ``close_code`` the transport puts on the close
frame.  Outbound messages (bidirectional streams) come back as JSON text from ``media``, ``mark``
and ``clear``; the transport only moves text.  Nothing here imports asyncio or aiohttp.

Rules (Telnyx media streaming, as its documentation describes the messages):

* ``connected`` comes first; the stream auth token (a media token: it names the call's organisation)
  arrives in the ``x-telnyx-streaming-auth-token`` header of the upgrade or in the field of the same
  name on ``connected``.  Looking a token up is I/O, so it is the transport's: it resolves a header
  token before the upgrade and says so to the constructor (``authenticated=True``; a header token that
  is unknown is refused there, and the field cannot rescue it).  Otherwise ``connected`` must carry the
  field: the protocol returns it in ``Connected.token`` and *holds* every message that follows, at most
  ``MAX_HELD_MESSAGES`` messages and ``MAX_HELD_BYTES`` bytes (past either: 1008), until the transport
  calls ``authenticated(ok)`` with the look-up's answer, which returns the events of the held messages
  (or raises 1008 when the token is unknown).  ``start`` (or anything else) before an accepted token is
  1008, so no stream slot is ever taken by an unauthenticated socket.
* ``start`` carries ``media_format``; audio is always decoded by *its* encoding (PCMU, PCMA, L16 at
  8 or 16 kHz).  ``media`` before ``start``, or a second ``start``, is refused (1008).
* Frames may arrive out of order.  Sequenced events after ``start`` pass through a reorder window
  of ``reorder_window`` events: a frame ahead of the next expected sequence number waits there;
  when the window overflows, the missing numbers are declared lost (counted in ``stats.lost``) and
  delivery resumes from the oldest waiting frame.  A frame older than the next expected number is
  late and dropped (``stats.late``).  ``stop`` flushes the window.
* Payloads must be strict base64 of a whole number of 20 ms frames of the stream's codec (1007).
* Unknown events, binary frames and unsupported encodings are refused (1003); malformed JSON or
  missing fields (1007); a message over ``max_message_bytes`` (1009).
* Every identifier and number is checked here, before anything leaves this module (``engine.ids``):
  ``stream_id``, ``call_control_id`` and ``call_session_id`` are ids (at most 128 characters of
  ``[A-Za-z0-9:_.-]``); ``from``/``to`` at most 256 printable characters, ``client_state`` 4096,
  ``custom_parameters`` 4096 bytes of JSON; sequence numbers, chunks and timestamps integers in
  0..2**53; a DTMF digit one of ``0-9 * # A-D``; a mark name and a stop reason short printable
  labels.  Anything else is 1007.  An ``error`` event's code and detail are clipped and stripped
  of unprintable characters (they are only logged).

State table (``_ALLOWED`` lists which events each state accepts; VERIFYING accepts every message
and holds it)::

    AWAITING --connected--> CONNECTED --start--> STREAMING --stop--> STOPPED
    AWAITING --connected(token)--> VERIFYING --authenticated(True)--> CONNECTED
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from engine.codecs import Codec, get_codec
from engine.errors import (
    CodecError,
    InvalidPayload,
    MessageTooBig,
    Overflow,
    PolicyViolation,
    UnsupportedData,
)
from engine.frames import FRAME_MS, Track
from engine.ids import counter, label, valid_id


class StreamState(enum.Enum):
    __hash__ = object.__hash__  # members are singletons; Enum's own __hash__ is Python code

    AWAITING = "awaiting"
    VERIFYING = "verifying"  # the `connected` field's token is being looked up: messages are held
    CONNECTED = "connected"
    STREAMING = "streaming"
    STOPPED = "stopped"


_ALLOWED: dict[StreamState, frozenset[str]] = {
    StreamState.AWAITING: frozenset({"connected", "start", "error"}),
    StreamState.VERIFYING: frozenset(),  # never consulted: receive_text holds everything
    StreamState.CONNECTED: frozenset({"start", "error"}),
    StreamState.STREAMING: frozenset({"media", "dtmf", "mark", "stop", "error"}),
    StreamState.STOPPED: frozenset({"media", "dtmf", "mark", "stop", "error"}),  # stragglers, ignored
}
KNOWN_EVENTS = frozenset({"connected", "start", "media", "dtmf", "mark", "stop", "error"})
AUTH_FIELD = "x-telnyx-streaming-auth-token"
DTMF_DIGITS = frozenset("0123456789*#ABCD")
MAX_NUMBER_CHARS = 256  # from / to: E.164 numbers or SIP URIs
MAX_CLIENT_STATE_CHARS = 4096
MAX_CUSTOM_PARAMETERS_BYTES = 4096
MAX_LABEL_CHARS = 128  # mark names, stop reasons
MAX_TOKEN_CHARS = 512  # a longer token is refused without a look-up
# Held while the `connected` field's token is looked up (a few milliseconds: Telnyx sends `start` and
# 50 media messages a second meanwhile).
MAX_HELD_MESSAGES = 64
MAX_HELD_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Connected:
    version: str
    token: str | None = None  # set when the transport must look it up and call ``authenticated``

    def __repr__(self) -> str:  # never print the secret
        return f"Connected(version={self.version!r}, token={'...' if self.token else None})"


@dataclass(frozen=True, slots=True)
class Started:
    stream_id: str
    call_control_id: str
    call_session_id: str
    encoding: str
    sample_rate: int
    channels: int
    from_: str = ""
    to: str = ""
    client_state: str = ""
    custom_parameters: dict[str, Any] = field(default_factory=dict)


class Media(NamedTuple):
    """A NamedTuple, not a frozen dataclass: one is built per 20 ms per call, and a frozen
    dataclass's ``__init__`` costs several times a tuple's."""

    track: Track
    sequence: int
    timestamp_ms: int  # stream-relative, per track, counted from decoded samples
    pcm: bytes  # int16 LE mono at the stream's sample rate, a whole number of 20 ms frames


@dataclass(frozen=True, slots=True)
class Dtmf:
    digit: str
    sequence: int


@dataclass(frozen=True, slots=True)
class MarkPlayed:
    name: str


@dataclass(frozen=True, slots=True)
class Stopped:
    reason: str


@dataclass(frozen=True, slots=True)
class StreamFailed:
    code: str
    detail: str


Event = Connected | Started | Media | Dtmf | MarkPlayed | Stopped | StreamFailed


@dataclass(slots=True)
class ProtocolStats:
    late: int = 0
    lost: int = 0
    unknown_track: int = 0
    after_stop: int = 0


class TelnyxStreamProtocol:
    """One Telnyx media stream.  Not thread-safe; one instance per WebSocket."""

    def __init__(
        self,
        *,
        authenticated: bool = True,
        reorder_window: int = 4,
        max_message_bytes: int = 65536,
        max_pending_marks: int = 64,
    ) -> None:
        self.state = StreamState.AWAITING
        self._streaming = False  # state is STREAMING; a plain bool for the hot path
        self.stats = ProtocolStats()
        self.stream_id = ""
        self.started: Started | None = None
        self.codec: Codec | None = None
        # True when the transport resolved the upgrade's header token (see the module docstring).
        self._authenticated = authenticated
        self._held_msgs: deque[str | bytes] = deque()
        self._held_bytes = 0
        self._window = reorder_window
        self._max_bytes = max_message_bytes
        self._next_seq = 0
        self._held: dict[int, dict[str, Any]] = {}
        self._samples: dict[Track, int] = {}
        self._frame_bytes = 0
        self._send_codec: Codec | None = None
        self.pending_marks: deque[str] = deque()
        self._max_marks = max_pending_marks

    # -- receiving -------------------------------------------------------------------------------

    def receive_binary(self, data: bytes) -> list[Event]:
        raise UnsupportedData("binary frames are not part of the Telnyx media protocol")

    def receive_text(self, text: str | bytes) -> list[Event]:
        if len(text) > self._max_bytes:
            raise MessageTooBig(f"message of {len(text)} bytes exceeds {self._max_bytes}")
        if self.state is StreamState.VERIFYING:
            return self._hold(text)
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise InvalidPayload(f"malformed JSON: {exc}") from None
        if not isinstance(msg, dict):
            raise InvalidPayload("message is not a JSON object")
        event = msg.get("event")
        if event == "media" and self._streaming:
            # The hot path (50 messages a second per call): in order, nothing held back.
            raw_seq = msg.get("sequence_number")
            if raw_seq is not None and not self._held:
                try:
                    seq = int(raw_seq)
                except (TypeError, ValueError):
                    seq = -1
                if seq == self._next_seq:
                    self._next_seq = seq + 1
                    return [self._media(seq, msg)]
            return self._reorder(_sequence(msg), msg)
        if not isinstance(event, str):
            raise InvalidPayload("message has no string 'event'")
        if event not in KNOWN_EVENTS:
            raise UnsupportedData(f"unknown event {event[:40]!r}")
        if event not in _ALLOWED[self.state]:
            raise PolicyViolation(f"{event!r} not allowed in state {self.state.value}")
        if self.state is StreamState.STOPPED:
            self.stats.after_stop += 1
            return []
        if event == "connected":
            return [self._on_connected(msg)]
        if event == "start":
            return [self._on_start(msg)]
        if event == "error":
            return [self._on_error(msg)]
        if event == "stop":
            events = self._flush()
            self.state = StreamState.STOPPED
            self._streaming = False
            stop = msg.get("stop")
            raw = stop.get("reason", "") if isinstance(stop, dict) else ""
            reason = label(raw, MAX_LABEL_CHARS) if raw is not None else ""
            if reason is None:
                raise InvalidPayload(f"stop.reason must be at most {MAX_LABEL_CHARS} printable characters")
            events.append(Stopped(reason or "stop"))
            return events
        if event != "media" and msg.get("sequence_number") is None:
            return [self._decode(-1, msg)]  # an unsequenced dtmf/mark cannot be ordered: deliver now
        return self._reorder(_sequence(msg), msg)

    def authenticated(self, ok: bool) -> list[Event]:
        """The answer to the look-up of ``Connected.token``: the events of the messages held meanwhile;
        ``PolicyViolation`` (1008) when ``ok`` is false.  Call it once, after a ``Connected`` with a token."""
        if self.state is not StreamState.VERIFYING:
            raise PolicyViolation("authenticated() without a token being verified")
        held, self._held_msgs, self._held_bytes = self._held_msgs, deque(), 0
        if not ok:
            raise PolicyViolation("stream auth token unknown")
        self._authenticated = True
        self.state = StreamState.CONNECTED
        events: list[Event] = []
        for text in held:
            events.extend(self.receive_text(text))
        return events

    def _hold(self, text: str | bytes) -> list[Event]:
        if len(self._held_msgs) >= MAX_HELD_MESSAGES or self._held_bytes + len(text) > MAX_HELD_BYTES:
            raise PolicyViolation(f"more than {MAX_HELD_MESSAGES} messages ({MAX_HELD_BYTES} bytes) "
                                  "while the stream auth token was checked")
        self._held_msgs.append(text)
        self._held_bytes += len(text)
        return []

    def eof(self) -> list[Event]:
        """The socket closed: deliver what the reorder window still holds."""
        if self.state is StreamState.VERIFYING:  # nothing started: what was held is dropped
            self._held_msgs.clear()
            self.state = StreamState.STOPPED
            return []
        events = self._flush()
        self.state = StreamState.STOPPED
        self._streaming = False
        return events

    def _on_connected(self, msg: dict[str, Any]) -> Event:
        version = _clip(msg.get("version", ""), 32)
        if self._authenticated:
            self.state = StreamState.CONNECTED
            return Connected(version)
        token = msg.get(AUTH_FIELD)
        if type(token) is not str or not 0 < len(token) <= MAX_TOKEN_CHARS:
            raise PolicyViolation("stream auth token missing")
        self.state = StreamState.VERIFYING
        return Connected(version, token)

    def _on_start(self, msg: dict[str, Any]) -> Event:
        if not self._authenticated:
            raise PolicyViolation("stream auth token missing")
        start = msg.get("start")
        if not isinstance(start, dict):
            raise InvalidPayload("start needs a 'start' object")
        raw_stream_id = msg.get("stream_id") or start.get("stream_id")
        stream_id = valid_id(raw_stream_id)
        if stream_id is None:
            raise InvalidPayload("start needs a 'stream_id' of 1-128 characters of [A-Za-z0-9:_.-]")
        raw_call_id = start.get("call_control_id") or stream_id
        call_id = valid_id(raw_call_id)
        if call_id is None:
            raise InvalidPayload("call_control_id must be 1-128 characters of [A-Za-z0-9:_.-]")
        session_id = start.get("call_session_id") or ""
        if session_id and valid_id(session_id) is None:
            raise InvalidPayload("call_session_id must be 1-128 characters of [A-Za-z0-9:_.-]")
        numbers = []
        for name in ("from", "to"):
            value = start.get(name) or ""
            if label(value, MAX_NUMBER_CHARS) is None:
                raise InvalidPayload(f"start.{name} must be at most {MAX_NUMBER_CHARS} printable characters")
            numbers.append(value)
        client_state = start.get("client_state") or ""
        if label(client_state, MAX_CLIENT_STATE_CHARS) is None:
            raise InvalidPayload(f"start.client_state must be at most {MAX_CLIENT_STATE_CHARS} printable characters")
        params = start.get("custom_parameters")
        if params is not None and (not isinstance(params, dict)
                                   or len(orjson.dumps(params)) > MAX_CUSTOM_PARAMETERS_BYTES):
            raise InvalidPayload(f"start.custom_parameters must be an object of at most "
                                 f"{MAX_CUSTOM_PARAMETERS_BYTES} bytes")
        fmt = start.get("media_format")
        if not isinstance(fmt, dict):
            raise InvalidPayload("start.media_format missing")
        encoding = fmt.get("encoding", "")
        if label(encoding, 16) is None:
            raise InvalidPayload("media_format.encoding must be a short string")
        rate = counter(fmt.get("sample_rate", 8000))
        channels = counter(fmt.get("channels", 1))
        if rate is None or channels is None:
            raise InvalidPayload("media_format.sample_rate/channels must be integers")
        if channels != 1:
            raise UnsupportedData(f"{channels} channels: only mono is supported")
        try:
            self.codec = get_codec(encoding, rate)
        except CodecError as exc:
            raise UnsupportedData(str(exc)) from None
        self._send_codec = self.codec
        self._frame_bytes = self.codec.frame_payload_bytes(FRAME_MS)
        self._next_seq = _sequence(msg) + 1
        self.stream_id = stream_id
        self.started = Started(
            stream_id=stream_id,
            call_control_id=call_id,
            call_session_id=session_id,
            encoding=self.codec.name,
            sample_rate=rate,
            channels=channels,
            from_=numbers[0],
            to=numbers[1],
            client_state=client_state,
            custom_parameters=params or {},
        )
        self.state = StreamState.STREAMING
        self._streaming = True
        return self.started

    def _on_error(self, msg: dict[str, Any]) -> Event:
        payload = msg.get("payload") or msg.get("error") or {}
        if not isinstance(payload, dict):
            payload = {"detail": str(payload)}
        detail = payload.get("detail") or payload.get("title", "")
        return StreamFailed(_clip(payload.get("code", ""), 64), _clip(detail, 200))

    def _reorder(self, seq: int, msg: dict[str, Any]) -> list[Event]:
        if seq == self._next_seq and not self._held:  # the common case: in order, nothing waiting
            self._next_seq += 1
            return [self._decode(seq, msg)]
        if seq < self._next_seq or seq in self._held:
            self.stats.late += 1
            return []
        self._held[seq] = msg
        events: list[Event] = []
        self._drain(events)
        if len(self._held) > self._window:
            oldest = min(self._held)
            self.stats.lost += oldest - self._next_seq
            self._next_seq = oldest
            self._drain(events)
        return events

    def _drain(self, events: list[Event]) -> None:
        while self._next_seq in self._held:
            seq = self._next_seq
            events.append(self._decode(seq, self._held.pop(seq)))
            self._next_seq += 1

    def _flush(self) -> list[Event]:
        events: list[Event] = []
        for seq in sorted(self._held):
            if seq > self._next_seq:
                self.stats.lost += seq - self._next_seq
            events.append(self._decode(seq, self._held[seq]))
            self._next_seq = seq + 1
        self._held.clear()
        return events

    def _decode(self, seq: int, msg: dict[str, Any]) -> Event:
        event = msg["event"]
        if event == "dtmf":
            dtmf = msg.get("dtmf")
            digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
            if type(digit) is not str or digit not in DTMF_DIGITS:
                raise InvalidPayload("dtmf.digit must be one of 0-9 * # A-D")
            return Dtmf(digit, seq)
        if event == "mark":
            mark = msg.get("mark")
            name = label(mark.get("name") if isinstance(mark, dict) else None, MAX_LABEL_CHARS)
            if not name:
                raise InvalidPayload(f"mark.name must be 1-{MAX_LABEL_CHARS} printable characters")
            if name in self.pending_marks:
                self.pending_marks.remove(name)
            return MarkPlayed(name)
        return self._media(seq, msg)

    def _media(self, seq: int, msg: dict[str, Any]) -> Media:
        # Validation by exception: free when the message is well formed, which is the hot path.
        try:
            media = msg["media"]
            payload = media["payload"]
            if not isinstance(payload, str):
                raise TypeError
            raw = binascii.a2b_base64(payload, strict_mode=True)
            track = _TRACKS.get(media.get("track", "inbound"))
            chunk = media.get("chunk")
            stamp = media.get("timestamp")
        except (KeyError, TypeError, AttributeError):
            raise InvalidPayload("media.payload missing or not a string") from None
        except binascii.Error as exc:
            raise InvalidPayload(f"media.payload is not valid base64: {exc}") from None
        if (chunk is not None and counter(chunk) is None) or (stamp is not None and counter(stamp) is None):
            raise InvalidPayload("media.chunk and media.timestamp must be integers in 0..2**53")
        if not raw or len(raw) % self._frame_bytes:
            raise InvalidPayload(
                f"media.payload of {len(raw)} bytes is not whole {FRAME_MS} ms frames "
                f"({self._frame_bytes} bytes each for {self.started.encoding if self.started else '?'})"
            )
        if track is None:
            self.stats.unknown_track += 1
            track = Track.INBOUND
        codec = self.codec
        assert codec is not None  # STREAMING implies a codec
        pcm = codec.decode(raw)
        samples = self._samples
        done = samples.get(track, 0)
        samples[track] = done + (len(pcm) >> 1)
        return Media(track, seq, done * 1000 // codec.sample_rate, pcm)

    # -- sending (bidirectional streams) ---------------------------------------------------------

    def set_send_codec(self, encoding: str, sample_rate: int) -> None:
        """Encode outbound audio differently from the inbound format (``stream_bidirectional_codec``)."""
        self._send_codec = get_codec(encoding, sample_rate)

    def media(self, pcm: bytes) -> str:
        """JSON text that plays ``pcm`` (int16 LE at the send codec's rate) to the call."""
        if self.state is not StreamState.STREAMING or self._send_codec is None:
            raise PolicyViolation("cannot send media before start or after stop")
        payload = base64.b64encode(self._send_codec.encode(pcm)).decode("ascii")
        return orjson.dumps({"event": "media", "media": {"payload": payload}}).decode()

    def mark(self, name: str) -> str:
        """JSON text of a mark; Telnyx echoes it once the audio queued before it has played."""
        if len(self.pending_marks) >= self._max_marks:
            raise Overflow(f"more than {self._max_marks} marks awaiting playback")
        self.pending_marks.append(name)
        return orjson.dumps({"event": "mark", "mark": {"name": name}}).decode()

    def clear(self) -> str:
        """JSON text that drops audio queued for playback (Telnyx then releases pending marks)."""
        return '{"event":"clear"}'


_TRACKS = {"inbound": Track.INBOUND, "outbound": Track.OUTBOUND}


def _sequence(msg: dict[str, Any]) -> int:
    seq = counter(msg.get("sequence_number"))
    if seq is None:
        raise InvalidPayload(f"{_clip(msg.get('event'), 16)}: sequence_number is not an integer in 0..2**53")
    return seq


def _clip(value: object, n: int) -> str:
    """``value`` as text for a log line: at most ``n`` characters, unprintable ones dropped."""
    text = value if isinstance(value, str) else str(value)
    return "".join(c for c in text[: n * 2] if c.isprintable())[:n]

