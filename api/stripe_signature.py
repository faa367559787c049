"""Stripe webhook signatures, without I/O: ``verify`` takes the header, the raw body, the secret and the
clock, and returns or raises; ``sign`` makes a header (for tests and the fake Stripe).

The header is ``Stripe-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>...]`` (other schemes, such as
``v0``, are ignored).  The signed string is ``f"{t}.".encode() + raw_body``; each ``v1`` is its
HMAC-SHA256 with the endpoint secret, in hex.  Several ``v1`` values appear while a secret is being
rolled: one match is enough.  Every comparison is constant-time (``hmac.compare_digest``).  A
timestamp more than ``tolerance_s`` (300 s, Stripe's default) before or after ``now`` is refused, so
a captured delivery cannot be replayed later (the event id is deduplicated besides, api.billing_api).

Why hand-written: the official ``stripe`` package is not a dependency of this project, and the check is
these few lines of ``hmac``.
"""

from __future__ import annotations

import hashlib
import hmac

DEFAULT_TOLERANCE_S = 300
MAX_HEADER = 4096  # a longer header is not parsed at all
MAX_V1 = 8  # v1 values compared at most (a header of 1,000 would be 1,000 HMAC compares)


class SignatureError(ValueError):
    """The delivery is not from Stripe: header missing or malformed, no matching ``v1``, or stale."""


def _digest(secret: str, timestamp: str, body: bytes) -> str:
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int, *, extra_v1: tuple[str, ...] = ()) -> str:
    """A ``Stripe-Signature`` header for ``body`` at ``timestamp`` (plus any ``extra_v1`` values first)."""
    parts = [f"t={timestamp}", *(f"v1={v}" for v in extra_v1), f"v1={_digest(secret, str(timestamp), body)}"]
    return ",".join(parts)


def verify(header: str | None, body: bytes, secret: str, now: float,
           tolerance_s: float = DEFAULT_TOLERANCE_S) -> int:
    """Return the header's timestamp if ``body`` was signed with ``secret`` within ``tolerance_s`` of
    ``now``; else raise ``SignatureError`` (its message says which check failed, never a digest)."""
    if not header:
        raise SignatureError("no Stripe-Signature header")
    if len(header) > MAX_HEADER or not header.isascii():
        raise SignatureError("Stripe-Signature header is malformed")
    timestamp: str | None = None
    v1: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            timestamp = value
        elif key == "v1" and len(v1) < MAX_V1:
            v1.append(value)
    if timestamp is None or not timestamp.isdigit() or len(timestamp) > 12:
        raise SignatureError("Stripe-Signature has no valid timestamp")
    if not v1:
        raise SignatureError("Stripe-Signature has no v1 signature")
    expected = _digest(secret, timestamp, body)
    # Every value is compared (no early exit), so the time taken does not say which one matched.
    matched = False
    for candidate in v1:
        matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureError("no v1 signature matches the body")
    t = int(timestamp)
    if abs(now - t) > tolerance_s:
        raise SignatureError("Stripe-Signature timestamp is outside the tolerance")
    return t
