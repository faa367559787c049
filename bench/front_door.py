"""What the front door costs: authenticated REST requests and sign-ins against an unauthenticated probe.

    python -m bench.front_door [--seconds 5] [--concurrency 16] [--logins 20]

Starts the real server with its storage tiers (embedded PostgreSQL and Valkey in a fresh data
directory, the demo organisation made by ``serve --demo``), then drives each request kind with
``--concurrency`` clients for ``--seconds`` and prints requests per second, p50 and p99 latency, and
each kind's cost as a ratio of ``GET /healthz`` in the same run (the machine's speed varies from run
to run; the ratio much less).  Sign-ins (argon2id) are timed one at a time.  Loopback only; the
login limits are raised for the run so the benchmark measures hashing, not the limiter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import orjson


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _server(data_dir: Path, port: int) -> Iterator[dict[str, str]]:
    env = {**os.environ, "SWITCHBOARD_STT_PROVIDER": "null", "SWITCHBOARD_TRANSLATION_PROVIDER": "none",
           "SWITCHBOARD_LOG_LEVEL": "WARNING", "SWITCHBOARD_DATA_DIR": str(data_dir), "SWITCHBOARD_WORKERS": "1",
           "SWITCHBOARD_RATE_READ_PER_MIN": "10000000", "SWITCHBOARD_LOGIN_PER_ACCOUNT_PER_MIN": "100000"}
    proc = subprocess.Popen([sys.executable, "-m", "api.cli", "serve", "--demo", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL)
    try:
        demo = data_dir / "demo.json"
        for _ in range(600):
            if demo.exists() and proc.poll() is None:
                with contextlib.suppress(OSError):
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
            if proc.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.1)
        yield orjson.loads(demo.read_bytes())
    finally:
        proc.terminate()
        proc.wait(30)


async def _drive(http: aiohttp.ClientSession, url: str, headers: dict[str, str], seconds: float,
                 concurrency: int) -> np.ndarray:
    stop = time.perf_counter() + seconds
    lat: list[float] = []

    async def client() -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            async with http.get(url, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{url}: HTTP {r.status}")
            lat.append(time.perf_counter() - t0)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return np.array(lat) * 1000


async def run(args: argparse.Namespace) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="switchboard-bench-") as tmp, _server(Path(tmp) / "data", port) as demo:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency)) as http:
            login_ms = []
            for _ in range(args.logins):
                t0 = time.perf_counter()
                async with http.post(f"{base}/api/auth/login", json={"email": demo["email"],
                                                                      "password": demo["password"]}) as r:
                    body = await r.json()
                    if r.status != 200:
                        raise RuntimeError(f"login: HTTP {r.status} {body}")
                login_ms.append((time.perf_counter() - t0) * 1000)
            session = body["data"]["token"]
            kinds = [("GET /healthz (no credential)", "/healthz", {}),
                     ("GET /api/auth/me, API key", "/api/auth/me", {"Authorization": f"Bearer {demo['api_key']}"}),
                     ("GET /api/auth/me, session", "/api/auth/me", {"Authorization": f"Bearer {session}"}),
                     ("GET /api/calls, session", "/api/calls?limit=50", {"Authorization": f"Bearer {session}"})]
            await _drive(http, f"{base}/healthz", {}, 1.0, args.concurrency)  # warm-up
            rows = []
            for label, path, headers in kinds:
                lat = await _drive(http, base + path, headers, args.seconds, args.concurrency)
                rows.append((label, len(lat) / args.seconds, np.percentile(lat, 50), np.percentile(lat, 99)))
    base_rate = rows[0][1]
    print(f"{'request':34} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'cost vs /healthz':>17}")
    for label, rate, p50, p99 in rows:
        print(f"{label:34} {rate:8.0f} {p50:8.2f} {p99:8.2f} {base_rate / rate:16.2f}x")
    print(f"sign-in (argon2id), one at a time: p50 {np.percentile(login_ms, 50):.0f} ms, "
          f"max {max(login_ms):.0f} ms over {len(login_ms)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--logins", type=int, default=20)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
