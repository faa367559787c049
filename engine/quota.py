"""Caps on what one client may hold or do: ``PerKeyQuota`` (at once) and ``TokenBucket`` (per second).

``PerKeyQuota``: a cap per key, how many of something one client (by address) may hold at once.

``take(key)`` counts one more for ``key`` unless it already holds ``limit`` (then ``False``, nothing
counted); ``give(key)`` counts one back.  Keys in ``exempt`` have no cap of their own (a reverse
proxy on this host speaks for all its clients): they are counted, never refused.  A key whose count
returns to zero is forgotten, so the table holds only keys that hold something: it is bounded by
what the callers bound in total.

``TokenBucket``: at most ``burst`` at once and ``per_s`` a second on average; ``take(now)`` says
whether one more may pass, and counts in ``held_back`` what did not since the last one that did
(``release_held`` hands that count over, for a report).  The caller gives the clock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable


class PerKeyQuota:
    def __init__(self, limit: int, exempt: Iterable[str] = ()) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.exempt = frozenset(exempt)
        self._held: Counter[str] = Counter()

    def __len__(self) -> int:
        """Keys holding something."""
        return len(self._held)

    def held(self, key: str) -> int:
        return self._held.get(key, 0)

    def take(self, key: str) -> bool:
        if self._held[key] >= self.limit and key not in self.exempt:  # reading a Counter adds no key
            return False
        self._held[key] += 1
        return True

    def give(self, key: str) -> None:
        n = self._held[key] - 1
        if n > 0:
            self._held[key] = n
        else:
            del self._held[key]


class TokenBucket:
    __slots__ = ("per_s", "burst", "tokens", "at", "held_back")

    def __init__(self, per_s: float, burst: float, now: float) -> None:
        self.per_s = per_s
        self.burst = float(burst)
        self.tokens = self.burst
        self.at = now
        self.held_back = 0

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.per_s)
        self.at = now
        if self.tokens < 1:
            self.held_back += 1
            return False
        self.tokens -= 1
        return True

    def release_held(self) -> int:
        """What was held back since the last call, and start counting again."""
        n, self.held_back = self.held_back, 0
        return n
