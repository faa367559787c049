"""Identifiers and numbers from peers, checked once at the edge.

Every identifier a peer sends (call and stream ids, agent ids) may end up in a log line, an SSE
event, a Redis key and a PostgreSQL row.  So the rule is one rule everywhere, applied before any of
those see it:

* an **id** is 1 to ``MAX_ID_CHARS`` characters of ``[A-Za-z0-9:_.-]`` (Telnyx call control ids such
  as ``v3:u5OAKGEPT3Dx...``, UUIDs, our own hex ids all fit); that also makes every call that can be
  streamed watchable at ``/api/calls/{call_id}/events``, whose path uses the same rule;
* a **label** (a phone number or SIP URI, a stop reason, a mark name) is at most ``max_chars``
  printable characters (``str.isprintable``: no control, format or bidi characters, no NUL);
* a **counter** (sequence numbers, chunks, timestamps) is a non-negative integer up to
  ``MAX_COUNTER`` (2**53, what a JSON number holds exactly), given as an int or as a string of ASCII
  decimal digits; booleans, floats and other scripts' digits are not counters.

Nothing here raises: each check returns the value or ``None``, and the protocol decides the error.
"""

from __future__ import annotations

import re

MAX_ID_CHARS = 128
MAX_COUNTER = 2**53
ID = re.compile(r"[A-Za-z0-9:_.\-]{1,128}")


def valid_id(value: object) -> str | None:
    """``value`` if it is an id (see the module docstring), else ``None``."""
    if type(value) is str and ID.fullmatch(value):
        return value
    return None


def label(value: object, max_chars: int) -> str | None:
    """``value`` if it is a string of at most ``max_chars`` printable characters, else ``None``."""
    if type(value) is str and len(value) <= max_chars and value.isprintable():
        return value
    return None


def counter(value: object) -> int | None:
    """``value`` as an int in ``0..MAX_COUNTER``, else ``None``."""
    if type(value) is int:
        return value if 0 <= value <= MAX_COUNTER else None
    # str methods, not a regex: this runs on every media message (sequence number, chunk, timestamp).
    if type(value) is str and 0 < len(value) <= 16 and value.isascii() and value.isdigit():
        n = int(value)
        return n if n <= MAX_COUNTER else None
    return None
