"""``GET /readyz``: whether each storage tier answers now.  ``/healthz`` stays plain liveness.

    200 {"status": "ok",       "tiers": {"postgres": {"ok": true,  "detail": "...", "ms": 1.2}, ...}}
    503 {"status": "degraded", "tiers": {"postgres": {"ok": false, "detail": "..."}, ...}}
    503 {"status": "draining", "tiers": {}}

*Draining* comes first and asks no tier: from the moment the node starts shutting down
(``Runtime.draining``, set at SIGTERM before the listener closes) it must get no new traffic while
its live calls finish, so a load balancer still probing it takes it out of rotation.  A preStop hook
(deploy/k8s/deployment.yaml) sleeps first so that the endpoint is removed before the SIGTERM; this
answer covers balancers that only go by the probe.

Tiers: ``postgres`` (``SELECT 1`` on the app pool), ``redis`` (``PING``), ``blobs`` (the bucket or
the local directory).  An embedded server the supervisor knows to be dead is reported down at once,
with its restart state, without asking it.  With persistence off there are no tiers: always ready.

A check costs little and never takes long: each tier has ``timeout_s`` (1 s), the three run
together, and a result serves every request for ``cache_s`` (1 s); requests arriving while a check
runs wait for that same check.  So a flood of /readyz makes at most one round of checks per second.
No authentication: it says which tier is down, never a URL, a host or a credential.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from api.tiers import Tiers


class Readiness:
    def __init__(self, tiers: Tiers | None, *, timeout_s: float = 1.0, cache_s: float = 1.0,
                 draining: Callable[[], bool] = lambda: False) -> None:
        self.tiers = tiers  # None: persistence off, always ready
        self._draining = draining
        self._timeout = timeout_s
        self._cache_s = cache_s
        self._last: dict[str, Any] | None = None
        self._last_at = 0.0
        self._inflight: asyncio.Future[dict[str, Any]] | None = None
        self.checks = 0  # rounds of checks run (each round asks every tier once)

    async def snapshot(self) -> dict[str, Any]:
        if self._draining():
            return {"status": "draining", "tiers": {}}
        if self._last is not None and time.monotonic() - self._last_at < self._cache_s:
            return self._last
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._check_all())
            self._inflight.add_done_callback(self._checked)
        # Shielded: a client that goes away must not cancel the check others are waiting for.
        return await asyncio.shield(self._inflight)

    def _checked(self, fut: asyncio.Future[dict[str, Any]]) -> None:
        self._inflight = None
        if not fut.cancelled() and fut.exception() is None:
            self._last, self._last_at = fut.result(), time.monotonic()

    async def _check_all(self) -> dict[str, Any]:
        self.checks += 1
        tiers = self.tiers
        if tiers is None:
            return {"status": "ok", "tiers": {}}
        names = ("postgres", "redis", "blobs")
        probes: tuple[Callable[[], Awaitable[Any]], ...] = (
            lambda: _select_one(tiers), tiers.warm.ping, tiers.blobs.ping)
        results = await asyncio.gather(*(self._check(tiers, n, p) for n, p in zip(names, probes, strict=True)))
        report = dict(zip(names, results, strict=True))
        return {"status": "ok" if all(r["ok"] for r in results) else "degraded", "tiers": report}

    async def _check(self, tiers: Tiers, name: str, probe: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
        supervised = tiers.supervisor.state(name) if tiers.supervisor is not None else None
        if supervised is not None and not supervised.up:
            return {"ok": False, "detail": f"embedded server {supervised.detail()}"}
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                await probe()
        except TimeoutError:
            return {"ok": False, "detail": f"no answer within {self._timeout:g}s"}
        except Exception as exc:  # any failure is the answer: this tier is not ready
            return {"ok": False, "detail": type(exc).__name__}
        out: dict[str, Any] = {"ok": True, "detail": "ok", "ms": round((time.perf_counter() - t0) * 1000, 1)}
        if supervised is not None:
            out["detail"] = f"embedded server {supervised.detail()}"
        return out


async def _select_one(tiers: Tiers) -> None:
    async with tiers.db.pool.acquire() as conn:
        await conn.fetchval("SELECT 1")


async def readyz(readiness: Readiness, request: web.Request) -> web.Response:
    report = await readiness.snapshot()
    return web.json_response(report, status=200 if report["status"] == "ok" else 503)
