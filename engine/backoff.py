"""Exponential backoff: the one retry schedule every retry loop uses.

The n-th wait (n from 0) is ``min(maximum, initial * factor**n)``, shortened by up to ``jitter``
(a fraction) at random so that many clients retrying one outage do not retry in step.  ``Backoff``
keeps the count for a loop: ``next()`` after each failure, ``reset()`` after a success.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


def delay(attempt: int, initial: float, maximum: float, *, factor: float = 2.0, jitter: float = 0.0,
          draw: float | None = None) -> float:
    """The wait before retry ``attempt + 1``; ``draw`` in [0, 1) replaces the random draw (tests)."""
    base = min(maximum, initial * factor ** min(attempt, 64))  # the cap keeps factor**n finite
    if not jitter:
        return base
    return base * (1 - jitter * (random.random() if draw is None else draw))


@dataclass(slots=True)
class Backoff:
    initial: float
    maximum: float
    factor: float = 2.0
    jitter: float = 0.0
    attempts: int = 0

    def next(self) -> float:
        """The wait after one more failure."""
        wait = delay(self.attempts, self.initial, self.maximum, factor=self.factor, jitter=self.jitter)
        self.attempts += 1
        return wait

    def reset(self) -> None:
        self.attempts = 0
