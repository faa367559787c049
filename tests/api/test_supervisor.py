"""The supervisor restarts a dead server at once, then with a doubling backoff while restarts fail."""

from __future__ import annotations

import asyncio
import time

from api.supervisor import TierSupervisor


class Flaky:
    """Dies when told; its first ``failures`` restarts fail."""

    def __init__(self, failures: int) -> None:
        self.up = True
        self.failures = failures
        self.attempts: list[float] = []

    def alive(self) -> bool:
        return self.up

    def restart(self) -> None:
        self.attempts.append(time.monotonic())
        if len(self.attempts) <= self.failures:
            raise RuntimeError(f"attempt {len(self.attempts)} fails")
        self.up = True


async def test_a_dead_server_is_restarted_with_backoff_and_its_state_reported() -> None:
    server = Flaky(failures=2)
    sup = TierSupervisor({"redis": server}, interval_s=0.05, backoff_max_s=0.6)
    sup.start()
    try:
        await asyncio.sleep(0.1)
        st = sup.state("redis")
        assert st is not None and st.up and st.restarts == 0
        server.up = False
        died = time.monotonic()
        while not server.attempts:  # noqa: ASYNC110 - polls a fake, as the supervisor polls servers
            await asyncio.sleep(0.01)
        assert not st.up and "restarting" in st.detail()
        while not (st.up and st.restarts == 1):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        first, second, third = server.attempts
        assert first - died < 0.1  # noticed within one interval, tried at once
        assert 0.45 < second - first < 0.7 and 0.55 < third - second < 0.8  # 0.5 s, then 1 s capped at 0.6 s
        assert st.attempts == 2 and "attempt 2 fails" in (st.last_error or "")
        assert st.detail() == "running (restarted 1x)"
    finally:
        await sup.aclose()
