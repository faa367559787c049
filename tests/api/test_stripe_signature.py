"""The Stripe-Signature check, fed headers and bodies: every way a delivery can fail to be Stripe's."""

from __future__ import annotations

import pytest

from api.stripe_signature import SignatureError, sign, verify

SECRET = "whsec_test_secret"
BODY = b'{"id":"evt_1","type":"invoice.paid"}'
NOW = 1_800_000_000


def _flip_last(hexdigest: str) -> str:
    return hexdigest[:-1] + ("0" if hexdigest[-1] != "0" else "1")


def test_a_fresh_signature_over_the_exact_body_verifies() -> None:
    assert verify(sign(SECRET, BODY, NOW), BODY, SECRET, NOW) == NOW


@pytest.mark.parametrize(("header", "body", "now", "why"), [
    (None, BODY, NOW, "no Stripe-Signature"),
    ("", BODY, NOW, "no Stripe-Signature"),
    ("garbage", BODY, NOW, "no valid timestamp"),
    (f"v1={'0' * 64}", BODY, NOW, "no valid timestamp"),
    (f"t={NOW}", BODY, NOW, "no v1"),
    (f"t=abc,v1={'0' * 64}", BODY, NOW, "no valid timestamp"),
    (f"t=-5,v1={'0' * 64}", BODY, NOW, "no valid timestamp"),
    ("t=" + "9" * 40 + ",v1=00", BODY, NOW, "no valid timestamp"),
    ("t=1,v1=" + "a" * 5000, BODY, NOW, "malformed"),
    (sign(SECRET, BODY, NOW).replace("v1=", "v0="), BODY, NOW, "no v1"),
    (sign("whsec_other", BODY, NOW), BODY, NOW, "matches"),
    (sign(SECRET, BODY, NOW), BODY + b" ", NOW, "matches"),  # one byte more
    (sign(SECRET, BODY, NOW), BODY[:-1], NOW, "matches"),  # one byte less
    (sign(SECRET, BODY, NOW), BODY.replace(b"paid", b"paie"), NOW, "matches"),  # one byte changed
    (f"t={NOW},v1=" + _flip_last(sign(SECRET, BODY, NOW).split("v1=")[1]), BODY, NOW, "matches"),
    (sign(SECRET, BODY, NOW - 301), BODY, NOW, "tolerance"),  # 301 s old
    (sign(SECRET, BODY, NOW + 301), BODY, NOW, "tolerance"),  # 301 s ahead
    (sign(SECRET, BODY, NOW).replace(f"t={NOW}", f"t={NOW + 1}"), BODY, NOW, "matches"),  # t is signed too
    ("t=1,v1=é", BODY, NOW, "malformed"),
])
def test_a_delivery_that_is_not_stripes_is_refused_with_the_reason(header: str | None, body: bytes, now: int,
                                                                   why: str) -> None:
    with pytest.raises(SignatureError, match=why):
        verify(header, body, SECRET, now)


def test_the_tolerance_edge_is_inclusive_at_300_seconds_either_way() -> None:
    assert verify(sign(SECRET, BODY, NOW - 300), BODY, SECRET, NOW) == NOW - 300
    assert verify(sign(SECRET, BODY, NOW + 300), BODY, SECRET, NOW) == NOW + 300


def test_any_one_of_several_v1_values_is_enough_as_during_a_secret_roll() -> None:
    header = sign(SECRET, BODY, NOW, extra_v1=("0" * 64, "deadbeef"))
    assert header.count("v1=") == 3
    assert verify(header, BODY, SECRET, NOW) == NOW
    old = sign("whsec_old", BODY, NOW).split("v1=")[1]
    assert verify(sign(SECRET, BODY, NOW) + f",v1={old}", BODY, "whsec_old", NOW) == NOW


def test_spaces_and_unknown_schemes_around_the_values_are_ignored() -> None:
    header = sign(SECRET, BODY, NOW)
    t, v1 = header.split(",")
    assert verify(f" {t} , v0=abc, {v1} ,x", BODY, SECRET, NOW) == NOW
