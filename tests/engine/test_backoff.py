"""The one retry schedule: doubling from ``initial`` up to ``maximum``, jitter only ever shortens."""

from __future__ import annotations

from engine.backoff import Backoff, delay


def test_waits_double_up_to_the_maximum_and_reset_starts_over() -> None:
    b = Backoff(0.1, 1.0)
    assert [round(b.next(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    b.reset()
    assert b.next() == 0.1


def test_jitter_shortens_by_at_most_its_fraction() -> None:
    assert delay(3, 0.5, 8.0, jitter=0.25, draw=0.0) == 4.0
    assert delay(3, 0.5, 8.0, jitter=0.25, draw=0.999) > 3.0
    assert all(3.0 <= delay(3, 0.5, 8.0, jitter=0.25) <= 4.0 for _ in range(200))


def test_a_huge_attempt_count_stays_at_the_maximum() -> None:
    assert delay(10**6, 0.1, 5.0) == 5.0
