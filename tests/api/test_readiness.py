"""/readyz answers from a cache: a flood of requests makes one round of checks, each tier bounded in time."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from api.readiness import Readiness
from api.supervisor import TierState


class FakeTiers:
    """What Readiness touches: db.pool.acquire, warm.ping, blobs.ping, supervisor."""

    def __init__(self) -> None:
        self.pings = {"postgres": 0, "redis": 0, "blobs": 0}
        self.redis_hangs = False
        self.supervisor: Any = None
        self.db = SimpleNamespace(pool=SimpleNamespace(acquire=self._acquire))
        self.warm = SimpleNamespace(ping=self._redis)
        self.blobs = SimpleNamespace(ping=self._blobs)

    @contextlib.asynccontextmanager
    async def _acquire(self) -> AsyncIterator[Any]:
        self.pings["postgres"] += 1

        async def fetchval(sql: str) -> int:
            await asyncio.sleep(0.05)
            return 1

        yield SimpleNamespace(fetchval=fetchval)

    async def _redis(self) -> None:
        self.pings["redis"] += 1
        if self.redis_hangs:
            await asyncio.sleep(60)

    async def _blobs(self) -> None:
        self.pings["blobs"] += 1


async def test_a_flood_of_requests_makes_one_round_of_checks() -> None:
    tiers = FakeTiers()
    ready = Readiness(tiers, timeout_s=1.0, cache_s=1.0)  # type: ignore[arg-type]
    reports = await asyncio.gather(*(ready.snapshot() for _ in range(500)))
    assert all(r["status"] == "ok" for r in reports)
    assert ready.checks == 1 and tiers.pings == {"postgres": 1, "redis": 1, "blobs": 1}
    await ready.snapshot()
    assert ready.checks == 1  # cached


async def test_a_hung_tier_is_reported_within_the_deadline_and_a_dead_embedded_one_without_asking() -> None:
    tiers = FakeTiers()
    tiers.redis_hangs = True
    ready = Readiness(tiers, timeout_s=0.2, cache_s=0)  # type: ignore[arg-type]
    t0 = time.monotonic()
    report = await ready.snapshot()
    assert time.monotonic() - t0 < 0.5
    assert report["status"] == "degraded" and report["tiers"]["redis"] == {"ok": False,
                                                                         "detail": "no answer within 0.2s"}
    assert report["tiers"]["postgres"]["ok"] and report["tiers"]["blobs"]["ok"]
    tiers.redis_hangs = False
    down = TierState(up=False, down_since=time.monotonic(), attempts=1, last_error="boom")
    tiers.supervisor = SimpleNamespace(state=lambda name: down if name == "postgres" else None)
    before = tiers.pings["postgres"]
    report = await ready.snapshot()
    assert not report["tiers"]["postgres"]["ok"] and "restarting" in report["tiers"]["postgres"]["detail"]
    assert tiers.pings["postgres"] == before and report["tiers"]["redis"]["ok"]


async def test_without_tiers_it_is_ready() -> None:
    assert await Readiness(None).snapshot() == {"status": "ok", "tiers": {}}


async def test_a_draining_node_is_not_ready_whatever_its_tiers_say_and_asks_none() -> None:
    from api.readiness import readyz

    tiers = FakeTiers()
    draining = False
    ready = Readiness(tiers, timeout_s=1.0, cache_s=0, draining=lambda: draining)  # type: ignore[arg-type]
    assert (await readyz(ready, None)).status == 200  # type: ignore[arg-type]  # the request is not read
    before = dict(tiers.pings)
    draining = True  # SIGTERM: Runtime.draining
    resp = await readyz(ready, None)  # type: ignore[arg-type]
    assert resp.status == 503 and resp.body == b'{"status": "draining", "tiers": {}}'
    assert tiers.pings == before  # no tier asked: the answer is the node's own state
