"""The Telnyx Ed25519 webhook check, fed headers and bodies: every way a delivery can fail to be Telnyx's."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from api.telnyx_signature import PublicKeyError, SignatureError, public_b64, public_key, sign, verify

KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
PUB = public_key(public_b64(KEY))
BODY = b'{"data":{"id":"ev_1","event_type":"call.answered"}}'
NOW = 1_800_000_000


def _headers(key: Ed25519PrivateKey = KEY, body: bytes = BODY, at: int = NOW) -> tuple[str, str]:
    h = sign(key, body, at)
    return h["telnyx-signature-ed25519"], h["telnyx-timestamp"]


def _flip(sig: str) -> str:
    raw = bytearray(base64.b64decode(sig))
    raw[10] ^= 1
    return base64.b64encode(bytes(raw)).decode()


def test_a_fresh_signature_over_the_exact_body_verifies() -> None:
    sig, ts = _headers()
    assert verify(sig, ts, BODY, PUB, NOW) == NOW


SIG, TS = _headers()


@pytest.mark.parametrize(("sig", "ts", "body", "now", "why"), [
    (None, TS, BODY, NOW, "no telnyx-signature"),
    ("", TS, BODY, NOW, "no telnyx-signature"),
    (SIG, None, BODY, NOW, "no telnyx-timestamp"),
    (SIG, "", BODY, NOW, "no telnyx-timestamp"),
    (SIG, "abc", BODY, NOW, "not Unix seconds"),
    (SIG, "-5", BODY, NOW, "not Unix seconds"),
    (SIG, "9" * 40, BODY, NOW, "not Unix seconds"),
    (SIG, "١٢٣", BODY, NOW, "not Unix seconds"),  # other scripts' digits
    ("garbage!!", TS, BODY, NOW, "not base64"),
    ("a" * 500, TS, BODY, NOW, "malformed"),
    ("é", TS, BODY, NOW, "malformed"),
    (base64.b64encode(b"x" * 63).decode(), TS, BODY, NOW, "not 64 bytes"),
    (base64.b64encode(b"\0" * 64).decode(), TS, BODY, NOW, "does not match"),
    (_headers(OTHER)[0], TS, BODY, NOW, "does not match"),  # wrong key
    (SIG, TS, BODY + b" ", NOW, "does not match"),  # one byte more
    (SIG, TS, BODY[:-1], NOW, "does not match"),  # one byte less
    (SIG, TS, BODY.replace(b"ev_1", b"ev_2"), NOW, "does not match"),  # one byte changed
    (_flip(SIG), TS, BODY, NOW, "does not match"),  # one bit of the signature
    (SIG, str(NOW + 1), BODY, NOW, "does not match"),  # the timestamp is signed too
    (*_headers(at=NOW - 301), BODY, NOW, "tolerance"),  # 301 s old
    (*_headers(at=NOW + 301), BODY, NOW, "tolerance"),  # 301 s ahead
])
def test_a_delivery_that_is_not_telnyxs_is_refused_with_the_reason(sig: str | None, ts: str | None, body: bytes,
                                                                   now: int, why: str) -> None:
    with pytest.raises(SignatureError, match=why):
        verify(sig, ts, body, PUB, now)


def test_the_tolerance_edge_is_inclusive_at_300_seconds_either_way() -> None:
    assert verify(*_headers(at=NOW - 300), BODY, PUB, NOW) == NOW - 300
    assert verify(*_headers(at=NOW + 300), BODY, PUB, NOW) == NOW + 300


@pytest.mark.parametrize("configured", ["", "not base64!", base64.b64encode(b"x" * 31).decode(),
                                        base64.b64encode(b"x" * 33).decode()])
def test_a_public_key_that_is_not_32_bytes_of_base64_is_refused(configured: str) -> None:
    with pytest.raises(PublicKeyError):
        public_key(configured)
