"""``switchboard``: the command line.

    switchboard serve [--host 127.0.0.1] [--port 8080]
    switchboard migrate          (DATABASE_URL, or the embedded server under SWITCHBOARD_DATA_DIR)
    switchboard simulate-call FILE.wav [--url ws://127.0.0.1:8080/api/media/telnyx] [--call-id ID]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import resource
import signal
import sys

import uvloop
from aiohttp import web

from api import logs
from api.settings import Settings
from storage.lifeline import DataDirInUse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="switchboard", description=__doc__.splitlines()[0] if __doc__ else "")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the media server")
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8080)")
    sub.add_parser("migrate", help="create the app role and apply pending database migrations")
    sim = sub.add_parser("simulate-call", help="stream a WAV file to the server exactly as Telnyx does")
    sim.add_argument("wav", help="WAV file (any rate, mono or first channel)")
    sim.add_argument("--url", default="ws://127.0.0.1:8080/api/media/telnyx")
    sim.add_argument("--call-id", default=None, help="call_control_id to send (default: a fresh v3: id)")
    sim.add_argument("--encoding", default="PCMU", choices=["PCMU", "PCMA", "L16"])
    sim.add_argument("--rate", type=int, default=8000, choices=[8000, 16000])
    sim.add_argument("--token", default=os.environ.get("SWITCHBOARD_TELNYX_STREAM_TOKEN"),
                     help="media token: the stream auth token, sent in the header and the connected field"
                          " (default $SWITCHBOARD_TELNYX_STREAM_TOKEN)")
    sim.add_argument("--api-key", default=os.environ.get("SWITCHBOARD_BOOTSTRAP_API_KEY"),
                     help="API key (or session token) that reads the call's events to print them"
                          " (default $SWITCHBOARD_BOOTSTRAP_API_KEY)")
    sim.add_argument("--speed", type=float, default=1.0, help="pacing factor; 1.0 = real time")
    sim.add_argument("--quiet", action="store_true", help="do not print the call's transcript events")
    args = parser.parse_args(argv)

    if args.command == "serve":
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        settings = Settings(**overrides)
        logs.setup(settings.log_level)
        try:
            uvloop.run(_serve(settings))
        except DataDirInUse as exc:
            print(f"switchboard: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "migrate":
        from api.tiers import migrate_only

        settings = Settings()
        logs.setup(settings.log_level)
        try:
            applied = uvloop.run(migrate_only(settings))
        except DataDirInUse as exc:  # the running server's embedded database: it migrates at start-up
            print(f"switchboard: {exc}", file=sys.stderr)
            return 1
        print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
        return 0
    from api.simulator import simulate_call

    logs.setup("WARNING")
    return uvloop.run(simulate_call(
        args.wav, url=args.url, call_id=args.call_id, encoding=args.encoding, sample_rate=args.rate,
        token=args.token, api_key=args.api_key, speed=args.speed, quiet=args.quiet,
    ))


def _raise_fd_limit() -> None:
    """Each call holds a socket: lift the soft open-files limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _tune_gc() -> None:
    """Fewer, cheaper collections on the media path.

    The per-frame garbage (parsed JSON, frames) dies by reference counting; what the cyclic
    collector finds is rare.  A full collection walks every live object of every call (tens of ms
    at a thousand calls) and shows up directly as frame lag, so: move start-up objects out of its
    reach (``gc.freeze``) and collect the young generation less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


async def _serve(settings: Settings) -> None:
    from api.app import build_app
    from api.connections import CONNECTION_GUARD, ConnectionGuard

    _raise_fd_limit()
    _tune_gc()

    app = await build_app(settings)  # opens the tiers, recovers a crashed run's leftovers, warms decoders
    guard = app[CONNECTION_GUARD] = ConnectionGuard(header_timeout_s=settings.http_header_timeout_s,
                                                    max_per_address=settings.http_max_pending_per_address,
                                                    exempt=settings.per_address_exempt)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           keepalive_timeout=settings.http_keepalive_timeout_s)
    await runner.setup()
    assert runner.server is not None
    guard.install(runner.server)  # before the site accepts anything
    site = web.TCPSite(runner, settings.host, settings.port, backlog=4096)
    await site.start()
    # Start-up (storage clients, warm decoders) made many long-lived objects: out of the collector's reach too.
    gc.collect()
    gc.freeze()
    logging.getLogger("switchboard").info("server.listening", extra={"host": settings.host, "port": settings.port})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP: the terminal of `make run` was closed.  Python's default would end the process without
    # any clean-up; stop as on Ctrl-C instead.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
