"""The baseline for the capacity benchmark: an aiohttp WebSocket server that receives and discards.

Run under the same pinning as Switchboard, it shows what the framework alone costs on this machine,
so the benchmark can print Switchboard's capacity as a ratio of it.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import uvloop
from aiohttp import web

frames = 0


async def discard(request: web.Request) -> web.WebSocketResponse:
    global frames
    ws = web.WebSocketResponse(max_msg_size=65536)
    await ws.prepare(request)
    async for _ in ws:
        frames += 1
    return ws


async def stats(request: web.Request) -> web.Response:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return web.json_response({"frames": frames, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                              "frame_lag": {"p99_ms": 0.0, "count": frames}, "pid": os.getpid(),
                              "time": time.time()})


async def reset(request: web.Request) -> web.Response:
    return web.json_response({"reset": True})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/api/media/telnyx", discard)
    app.router.add_get("/api/stats", stats)
    app.router.add_post("/api/stats/reset", reset)
    app.router.add_get("/healthz", lambda r: web.json_response({"status": "ok"}))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, backlog=4096, shutdown_timeout=1,
                loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
