"""The OpenAI-compatible chat-completions stream (Groq, OpenAI), as pure protocol logic without I/O.

Bytes in, events out: ``SSEDecoder.feed(bytes)`` returns the ``data`` of each complete server-sent
event (WHATWG rules: ``\\r\\n``, ``\\r`` or ``\\n`` line ends, ``:`` comments, multi-line ``data``
joined by ``\\n``, a blank line dispatches); ``parse_chunk(data)`` turns one event into the text
delta it carries, ``DONE`` for ``[DONE]``, or raises ``TranslationError`` for an ``error`` object
or a chunk of the wrong shape.  A chunk must be a JSON object with a ``choices`` list whose items
hold a ``delta`` object whose ``content``, when present, is a string or null; other fields are
free (Groq adds ``x_groq``, a usage chunk may have no choices).

Retry policy (as the official openai-python SDK does): 408, 409, 429 and >= 500 are retried; the
wait is ``retry-after-ms`` else ``retry-after`` (seconds or an HTTP date) when it lies in 0-60 s,
otherwise 0.5 s x 2^n capped at 8 s, times a jitter in [0.75, 1].
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from typing import Any, Final

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from engine.backoff import delay
from pipelines.translate.base import TranslationError

DONE: Final = object()

RETRYABLE_STATUS = frozenset({408, 409, 429})
INITIAL_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 8.0
MAX_RETRY_AFTER_S = 60.0
MAX_EVENT_BYTES = 1 << 20
MAX_MESSAGE_CHARS = 300

LANGUAGE_NAMES = {
    "en": "English",
    "es": "Spanish",
    "fr": "French",
    "de": "German",
    "it": "Italian",
    "pt": "Portuguese",
    "ca": "Catalan",
}


def system_prompt(source_lang: str, target_lang: str) -> str:
    src, tgt = LANGUAGE_NAMES[source_lang], LANGUAGE_NAMES[target_lang]
    return (
        f"You are a translation engine. Translate the user's message from {src} to {tgt}. "
        f"Output only the {tgt} translation: no notes, no quotes, no explanations. "
        "Keep names, numbers and line breaks as they are. "
        "Copy every marker of the form [REDACTED:...] exactly as written, untranslated, in the same order."
    )


def request_body(model: str, text: str, source_lang: str, target_lang: str) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": system_prompt(source_lang, target_lang)},
            {"role": "user", "content": text},
        ],
        "stream": True,
        "temperature": 0,
    }


def is_retryable(status: int) -> bool:
    return status in RETRYABLE_STATUS or status >= 500


def retry_after_s(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """The server's requested wait, when it gives one in 0-60 s."""
    value = requested_wait_s(headers, now=now)
    if value is not None and 0 <= value <= MAX_RETRY_AFTER_S:
        return value
    return None


def requested_wait_s(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """The wait the server names, unbounded (negative for a date past), or None when it names none
    it can be read as: ``retry-after-ms``, else ``retry-after`` in seconds or as an HTTP date."""
    value: float | None = None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            value = float(raw_ms) / 1000
        except ValueError:
            value = None
    if value is None:
        raw = headers.get("retry-after")
        if raw is not None:
            try:
                value = float(raw)
            except ValueError:
                try:
                    when = email.utils.parsedate_to_datetime(raw)
                except (TypeError, ValueError, IndexError):
                    when = None
                if when is not None:
                    value = when.timestamp() - (time.time() if now is None else now)
    return value


def backoff_s(retries_so_far: int, *, jitter: float | None = None) -> float:
    """The wait before retry number ``retries_so_far + 1`` when the server names none."""
    return delay(retries_so_far, INITIAL_RETRY_DELAY_S, MAX_RETRY_DELAY_S, jitter=0.25, draw=jitter)


def redact(message: str, secret: str) -> str:
    """``message`` shortened, with ``secret`` (an API key) cut out wherever it appears."""
    if secret:
        message = message.replace(secret, "[redacted]")
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    return message


def error_message(error: object) -> str:
    """The human part of an OpenAI error value (``{"message", "type", "code"}`` or a string)."""
    if isinstance(error, dict):
        message = error.get("message")
        kind = error.get("type") or error.get("code")
        text = str(message) if message is not None else orjson.dumps(error).decode()
        return f"{text} ({kind})" if kind else text
    return str(error)


def error_body_message(body: bytes) -> str:
    """The message of an HTTP error body, falling back to its raw start."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:MAX_MESSAGE_CHARS].decode(errors="replace").strip() or "(empty body)"
    if isinstance(parsed, dict) and "error" in parsed:
        return error_message(parsed["error"])
    return body[:MAX_MESSAGE_CHARS].decode(errors="replace")


class _Delta(BaseModel):
    model_config = ConfigDict(extra="allow")
    content: str | None = None


class _Choice(BaseModel):
    model_config = ConfigDict(extra="allow")
    delta: _Delta


class _Chunk(BaseModel):
    model_config = ConfigDict(extra="allow")
    choices: list[_Choice]


def parse_chunk(data: str) -> str | object:
    """One SSE ``data`` payload -> its text delta (maybe ``""``), or ``DONE``."""
    if data.strip() == "[DONE]":
        return DONE
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise TranslationError(f"openai: malformed stream chunk (not JSON: {exc}): {data[:80]!r}") from None
    if isinstance(obj, dict) and "error" in obj:
        raise TranslationError(f"openai: error in stream: {error_message(obj['error'])}")
    try:
        chunk = _Chunk.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "chunk"
        raise TranslationError(f"openai: malformed stream chunk ({where}: {first['msg']}): {data[:80]!r}") from None
    if not chunk.choices:
        return ""
    return chunk.choices[0].delta.content or ""


class SSEDecoder:
    """Incremental server-sent-events decoder; holds at most ``max_event_bytes`` of one event."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._buf = bytearray()
        self._data: list[str] = []
        self._data_bytes = 0
        self._last_cr = False  # a "\r" ended the previous feed: a "\n" right after it is the same line end

    def feed(self, data: bytes) -> list[str]:
        """Append bytes; return the data of every event they complete."""
        if self._last_cr and data.startswith(b"\n"):
            data = data[1:]
        self._last_cr = data.endswith(b"\r")
        self._buf += data
        events: list[str] = []
        while True:
            cut = _line_end(self._buf)
            if cut is None:
                break
            end, nxt = cut
            line = bytes(self._buf[:end]).decode(errors="replace")
            del self._buf[:nxt]
            event = self._line(line)
            if event is not None:
                events.append(event)
        if len(self._buf) + self._data_bytes > self._max:
            raise TranslationError(f"openai: stream event over {self._max} bytes")
        return events

    def _line(self, line: str) -> str | None:
        if not line:
            if not self._data:
                return None
            event = "\n".join(self._data)
            self._data, self._data_bytes = [], 0
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._data_bytes += len(value)
        return None  # event, id and retry fields mean nothing for a completion stream


def _line_end(buf: bytearray) -> tuple[int, int] | None:
    """(end of the first line, start of the next), or None when no whole line is buffered."""
    lf, cr = buf.find(b"\n"), buf.find(b"\r")
    if cr == -1 and lf == -1:
        return None
    if cr == -1 or (lf != -1 and lf < cr):
        return lf, lf + 1
    if cr + 1 < len(buf):
        return cr, cr + 2 if buf[cr + 1] == 0x0A else cr + 1
    return cr, cr + 1  # a "\r" at the end: feed() skips a "\n" that arrives next
