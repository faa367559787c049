"""Per-key caps: refused past the limit, exempt keys never refused, empty keys forgotten."""

from __future__ import annotations

from engine.quota import PerKeyQuota, TokenBucket


def test_a_key_is_refused_at_its_limit_and_others_are_not() -> None:
    q = PerKeyQuota(2)
    assert [q.take("a") for _ in range(3)] == [True, True, False]
    assert q.take("b") and q.held("a") == 2 and len(q) == 2
    q.give("a")
    assert q.take("a")


def test_exempt_keys_are_counted_never_refused() -> None:
    q = PerKeyQuota(1, exempt=["127.0.0.1"])
    assert all(q.take("127.0.0.1") for _ in range(100)) and q.held("127.0.0.1") == 100


def test_keys_that_hold_nothing_are_forgotten() -> None:
    q = PerKeyQuota(1)
    for i in range(1000):
        q.take(f"k{i}")
        q.give(f"k{i}")
    assert len(q) == 0


def test_a_token_bucket_passes_its_burst_then_its_rate_and_counts_what_it_held_back() -> None:
    b = TokenBucket(per_s=10, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(5)] == [True, True, True, False, False]
    assert b.take(0.1) and not b.take(0.1)  # 0.1 s at 10/s: one more
    assert b.release_held() == 3 and b.held_back == 0
