"""Restarts the embedded servers (PostgreSQL, Valkey) when they die.

One task per server checks ``alive()`` every ``interval_s`` (a read of /proc or a ``poll``: cheap,
on the event loop).  When a server is found dead the tier is *down*: the first restart is attempted
at once, later ones after a backoff doubling from 0.5 s up to ``backoff_max_s``.  ``restart()``
blocks (process start-up) and runs in a thread.  PostgreSQL restarts on the same data directory and
socket directory, Valkey on the same port, so the clients already configured (the asyncpg pool, the
Redis pool) reconnect on their own; what the real-time path produced meanwhile waits in the
``PersistWriter`` and ``BusForwarder`` buffers, which retry.

Log lines: ``tier.down`` (error) when a death is noticed, ``tier.restart_failed`` (warning) per
failed attempt, ``tier.restarted`` (warning) with the downtime.  ``state(name)`` feeds ``/readyz``.

Only embedded servers are supervised: a configured ``DATABASE_URL`` or ``REDIS_URL`` is someone
else's to restart; ``/readyz`` still reports it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from engine.backoff import Backoff

log = logging.getLogger("switchboard.supervisor")

_FIRST_BACKOFF_S = 0.5


class Supervised(Protocol):
    def alive(self) -> bool: ...

    def restart(self) -> None: ...


@dataclass(slots=True)
class TierState:
    up: bool = True
    down_since: float | None = None  # time.monotonic()
    restarts: int = 0  # successful restarts since start-up
    attempts: int = 0  # failed restart attempts in the current outage
    last_error: str | None = None

    def detail(self) -> str:
        if self.up:
            return "running" + (f" (restarted {self.restarts}x)" if self.restarts else "")
        down_s = time.monotonic() - (self.down_since or time.monotonic())
        tail = f"; last attempt: {self.last_error}" if self.last_error else ""
        return f"died {down_s:.1f}s ago, restarting (failed attempts {self.attempts}{tail})"


class TierSupervisor:
    def __init__(self, servers: dict[str, Supervised], *, interval_s: float = 1.0,
                 backoff_max_s: float = 30.0) -> None:
        self._servers = dict(servers)
        self._interval = interval_s
        self._backoff_max = backoff_max_s
        self.states = {name: TierState() for name in servers}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch(name), name=f"supervise-{name}") for name in self._servers]

    def state(self, name: str) -> TierState | None:
        return self.states.get(name)

    async def aclose(self) -> None:
        """Stop watching.  A restart running in its thread finishes first (a half-started server would be lost)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _watch(self, name: str) -> None:
        server, st = self._servers[name], self.states[name]
        while True:
            await asyncio.sleep(self._interval)
            if server.alive():
                continue
            st.up, st.down_since, st.attempts, st.last_error = False, time.monotonic(), 0, None
            log.error("tier.down", extra={"tier": name})
            backoff = Backoff(_FIRST_BACKOFF_S, self._backoff_max)
            while True:
                # Shielded: cancelling at shutdown waits for the thread instead of abandoning a server half started.
                restart = asyncio.ensure_future(asyncio.to_thread(server.restart))
                try:
                    await asyncio.shield(restart)
                except asyncio.CancelledError:
                    await asyncio.gather(restart, return_exceptions=True)
                    raise
                except Exception as exc:
                    st.attempts += 1
                    st.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                    delay = backoff.next()
                    log.warning("tier.restart_failed", extra={"tier": name, "attempt": st.attempts,
                                                              "error": st.last_error, "retry_in_s": delay})
                    await asyncio.sleep(delay)
                    continue
                break
            downtime = time.monotonic() - (st.down_since or time.monotonic())
            st.up, st.down_since, st.restarts = True, None, st.restarts + 1
            log.warning("tier.restarted", extra={"tier": name, "downtime_s": round(downtime, 3),
                                                 "failed_attempts": st.attempts, "restarts": st.restarts})
