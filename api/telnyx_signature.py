"""Telnyx webhook signatures, without I/O: ``verify`` takes the two headers, the raw body, the public
key and the clock, and returns or raises; ``sign`` makes the headers (for tests and the fake Telnyx).

Telnyx signs ``f"{timestamp}|".encode() + raw_body`` with Ed25519 and sends the signature, base64 of 64
bytes, in ``telnyx-signature-ed25519`` and the Unix seconds in ``telnyx-timestamp``.  The public key
(``TELNYX_PUBLIC_KEY``, from the Telnyx portal) is base64 of the raw 32 bytes.  A timestamp more than
``tolerance_s`` (300 s) before or after ``now`` is refused; a replay inside the window still verifies,
so event ids are deduplicated besides (api.telnyx_calls).

Why ``cryptography`` and not PyNaCl (which Telnyx's SDK uses): ``cryptography`` is already a dependency
and verifies Ed25519 the same way (RFC 8032, strict about the encoding of the signature).
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

DEFAULT_TOLERANCE_S = 300
SIGNATURE_HEADER = "telnyx-signature-ed25519"
TIMESTAMP_HEADER = "telnyx-timestamp"
MAX_SIGNATURE_HEADER = 128  # base64 of 64 bytes is 88 characters


class SignatureError(ValueError):
    """The delivery is not from Telnyx: a header missing or malformed, a wrong signature, or stale."""


class PublicKeyError(ValueError):
    """The configured public key is not base64 of 32 bytes."""


def public_key(b64: str) -> Ed25519PublicKey:
    """The Ed25519 public key of ``TELNYX_PUBLIC_KEY``; raises ``PublicKeyError`` when it is not one."""
    try:
        raw = base64.b64decode(b64.strip(), validate=True)
        if len(raw) != 32:
            raise ValueError("not 32 bytes")
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise PublicKeyError(f"TELNYX_PUBLIC_KEY is not base64 of a 32-byte Ed25519 key: {exc}") from None


def sign(key: Ed25519PrivateKey, body: bytes, timestamp: int) -> dict[str, str]:
    """The headers Telnyx would send with ``body`` at ``timestamp``."""
    signature = key.sign(f"{timestamp}|".encode() + body)
    return {SIGNATURE_HEADER: base64.b64encode(signature).decode(), TIMESTAMP_HEADER: str(timestamp)}


def public_b64(key: Ed25519PrivateKey) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def verify(signature: str | None, timestamp: str | None, body: bytes, key: Ed25519PublicKey, now: float,
           tolerance_s: float = DEFAULT_TOLERANCE_S) -> int:
    """Return the timestamp if ``body`` was signed by ``key``'s holder within ``tolerance_s`` of ``now``;
    else raise ``SignatureError`` (its message says which check failed, never the signature)."""
    if not signature:
        raise SignatureError(f"no {SIGNATURE_HEADER} header")
    if not timestamp:
        raise SignatureError(f"no {TIMESTAMP_HEADER} header")
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        raise SignatureError(f"{TIMESTAMP_HEADER} is not Unix seconds")
    if len(signature) > MAX_SIGNATURE_HEADER or not signature.isascii():
        raise SignatureError(f"{SIGNATURE_HEADER} is malformed")
    try:
        raw = base64.b64decode(signature, validate=True)
    except binascii.Error:
        raise SignatureError(f"{SIGNATURE_HEADER} is not base64") from None
    if len(raw) != 64:
        raise SignatureError(f"{SIGNATURE_HEADER} is not 64 bytes")
    try:
        key.verify(raw, timestamp.encode() + b"|" + body)
    except InvalidSignature:
        raise SignatureError("the signature does not match the body") from None
    t = int(timestamp)
    if abs(now - t) > tolerance_s:
        raise SignatureError(f"{TIMESTAMP_HEADER} is outside the tolerance")
    return t
