"""Cheap, bounded measurements for the media path.

``LagHistogram`` keeps counts in fixed 1 ms buckets up to ``limit_ms`` (one overflow bucket above),
so recording is an index increment and memory never grows.
"""

from __future__ import annotations


class LagHistogram:
    def __init__(self, limit_ms: int = 2000) -> None:
        self.limit_ms = limit_ms
        self._buckets = [0] * (limit_ms + 1)
        self.count = 0
        self.sum_ms = 0.0
        self.max_ms = 0.0

    def record(self, lag_ms: float) -> None:
        i = int(lag_ms)
        if i < 0:
            i = 0
        elif i > self.limit_ms:
            i = self.limit_ms
        self._buckets[i] += 1
        self.count += 1
        self.sum_ms += lag_ms
        if lag_ms > self.max_ms:
            self.max_ms = lag_ms

    def percentile(self, q: float) -> float:
        """Upper bound (ms) of the bucket holding the q-th percentile; 0.0 when empty."""
        if not self.count:
            return 0.0
        rank = q / 100.0 * self.count
        seen = 0
        for ms, n in enumerate(self._buckets):
            seen += n
            if seen >= rank and n:
                return float(ms + 1)
        return float(self.limit_ms + 1)

    def buckets(self) -> list[int]:
        """Counts per 1 ms bucket (index i: [i, i+1) ms; the last: ``limit_ms`` and above).  A copy."""
        return list(self._buckets)

    def reset(self) -> None:
        self._buckets = [0] * (self.limit_ms + 1)
        self.count = 0
        self.sum_ms = 0.0
        self.max_ms = 0.0

    def summary(self) -> dict[str, float]:
        return {
            "count": self.count,
            "p50_ms": self.percentile(50),
            "p90_ms": self.percentile(90),
            "p99_ms": self.percentile(99),
            "p999_ms": self.percentile(99.9),
            "max_ms": round(self.max_ms, 3),
        }
