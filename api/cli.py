"""``switchboard``: the command line.

    switchboard serve [--host 127.0.0.1] [--port 8080] [--demo]
    switchboard migrate          (DATABASE_URL, or the embedded server under SWITCHBOARD_DATA_DIR)
    switchboard orgs create --name NAME --owner-email EMAIL     (prints one JSON line; secrets shown once)
    switchboard simulate-call [FILE.wav] [--url ws://127.0.0.1:8080/api/media/telnyx] [--call-id ID]

``serve --demo`` (what ``make run`` starts) creates a demo organisation on the first start (its
credentials are kept in ``$SWITCHBOARD_DATA_DIR/demo.json``) and prints how to sign in;
``simulate-call`` uses that file's media token and API key unless given ``--token`` / ``--api-key``.
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
from storage.blobs import BlobConfigError
from storage.lifeline import DataDirInUse

SWITCH_INTERVAL_S = 0.001  # see _tune_gil


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="switchboard", description=__doc__.splitlines()[0] if __doc__ else "")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the media server")
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8080)")
    serve.add_argument("--demo", action="store_true",
                       help="create a demo organisation on the first start and print how to sign in")
    serve.add_argument("--workers", type=int, default=None,
                       help="server processes on the one port (default SWITCHBOARD_WORKERS, else one per core)")
    # How `serve --workers` starts each worker (api/workers.py); not for hand use.
    serve.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--lifeline-fd", type=int, default=None, help=argparse.SUPPRESS)
    sub.add_parser("migrate", help="create the app role and apply pending database migrations")
    orgs = sub.add_parser("orgs", help="organisations").add_subparsers(dest="orgs_command", required=True)
    create = orgs.add_parser("create", help="create an organisation, its owner, an admin API key and a media token")
    create.add_argument("--name", required=True, help="display name (1-200 printable characters)")
    create.add_argument("--owner-email", required=True, help="the owner's sign-in address (unique system-wide)")
    retention = sub.add_parser("retention", help="data retention").add_subparsers(dest="retention_command",
                                                                                 required=True)
    ret_run = retention.add_parser("run", help="delete what aged out (idempotent, resumable, one node at a time; "
                                               "prints a JSON report)")
    ret_run.add_argument("--dry-run", action="store_true", help="count what would be deleted; delete nothing")
    ret_run.add_argument("--batch", type=int, default=None, help="rows per statement (default RETENTION_BATCH)")
    sub.add_parser("rotate-keys", help="re-encrypt restricted fields under the active key "
                                       "(SWITCHBOARD_ENCRYPTION_KEY_ID)")
    bak = sub.add_parser("backup", help="pg_dump the database into the cold tier (keeps the newest --keep)")
    bak.add_argument("--keep", type=int, default=7, help="backups kept in the cold tier (default 7)")
    res = sub.add_parser("restore", help="pg_restore a backup from the cold tier into a database")
    res.add_argument("key", help="the backup's key, as `switchboard backup` printed it (backups/...dump)")
    res.add_argument("--database-url", required=True, help="the database to restore into (its contents are "
                                                           "replaced by the backup's)")
    bench = sub.add_parser("bench", help="benchmarks (run from the repository): latency | capacity",
                           add_help=False)
    bench.add_argument("which", choices=["latency", "capacity"])
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options (--help)")
    sim = sub.add_parser("simulate-call", help="stream a WAV file to the server exactly as Telnyx does")
    sim.add_argument("wav", nargs="?", default=None,
                     help="WAV file (any rate, mono or first channel); default: a short shipped speech sample")
    sim.add_argument("--url", default="ws://127.0.0.1:8080/api/media/telnyx")
    sim.add_argument("--call-id", default=None, help="call_control_id to send (default: a fresh v3: id)")
    sim.add_argument("--encoding", default="PCMU", choices=["PCMU", "PCMA", "L16"])
    sim.add_argument("--rate", type=int, default=8000, choices=[8000, 16000])
    sim.add_argument("--token", default=None,
                     help="media token (header and connected field); default: $SWITCHBOARD_TELNYX_STREAM_TOKEN,"
                          " else the demo organisation's, from the data directory")
    sim.add_argument("--api-key", default=None,
                     help="API key that reads the call's events to print them; default:"
                          " $SWITCHBOARD_BOOTSTRAP_API_KEY, else the demo organisation's")
    sim.add_argument("--speed", type=float, default=1.0, help="pacing factor; 1.0 = real time")
    sim.add_argument("--quiet", action="store_true", help="do not print the call's transcript events")
    args = parser.parse_args(argv)

    if args.command == "serve":
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("workers", args.workers),
                                       ("worker_index", args.worker_index)) if v is not None}
        settings = Settings(**overrides)
        logs.setup(settings.log_level)
        try:
            if settings.workers > 1 and settings.worker_index is None:
                from api.workers import serve_workers

                return uvloop.run(serve_workers(settings, demo=args.demo))
            uvloop.run(_serve(settings, demo=args.demo, ready_fd=args.ready_fd, lifeline_fd=args.lifeline_fd))
        except (DataDirInUse, BlobConfigError) as exc:  # a configuration the tiers cannot serve: say so, no trace
            print(f"switchboard: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "bench":
        if args.which == "latency":
            from bench import latency

            return latency.main(args.rest)
        from bench import capacity

        capacity.main(args.rest)
        return 0
    if args.command == "orgs":
        return _orgs_create(args.name, args.owner_email)
    if args.command == "rotate-keys":
        return _rotate_keys()
    if args.command in ("backup", "restore"):
        return _backup_or_restore(args)
    if args.command == "retention":
        return _retention_run(dry_run=args.dry_run, batch=args.batch)
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
    from api.bootstrap import read_demo
    from api.simulator import SAMPLE_WAV, simulate_call

    logs.setup("WARNING")
    token = args.token or os.environ.get("SWITCHBOARD_TELNYX_STREAM_TOKEN")
    api_key = args.api_key or os.environ.get("SWITCHBOARD_BOOTSTRAP_API_KEY")
    if token is None or api_key is None:
        demo = read_demo(Settings())
        if demo is not None:
            token = token or demo.media_token
            api_key = api_key or demo.api_key
    return uvloop.run(simulate_call(
        args.wav or str(SAMPLE_WAV), url=args.url, call_id=args.call_id, encoding=args.encoding,
        sample_rate=args.rate, token=token, api_key=api_key, speed=args.speed, quiet=args.quiet,
    ))


def _rotate_keys() -> int:
    """``switchboard rotate-keys``: one JSON line ``{"rotated", "failed"}``."""
    import orjson

    from api.restricted_api import keyring_for, rotate
    from api.tiers import local_blob_store, open_tiers

    settings = Settings()
    logs.setup("WARNING")

    async def run() -> dict[str, int]:
        tiers = await open_tiers(settings, local_blob_store(settings))
        try:
            return await rotate(tiers.db, keyring_for(settings), batch=settings.retention_batch)
        finally:
            await tiers.aclose()

    try:
        out = uvloop.run(run())
    except DataDirInUse as exc:
        print(f"switchboard: {exc}", file=sys.stderr)
        return 1
    print(orjson.dumps(out).decode())
    return 0 if not out["failed"] else 2


def _backup_or_restore(args: argparse.Namespace) -> int:
    """``switchboard backup`` (one JSON line: key, bytes, sha256, removed) and ``switchboard restore``."""
    import orjson

    from api.bootstrap import admin_url
    from api.tiers import cold_tier
    from storage.backup import BackupError, backup, restore

    settings = Settings()
    logs.setup("WARNING")

    async def run() -> dict[str, object]:
        blobs = cold_tier(settings)
        await blobs.start()
        try:
            if args.command == "restore":
                await restore(args.key, blobs, args.database_url)
                return {"restored": args.key}
            async with admin_url(settings) as url:
                done = await backup(url, blobs, keep=args.keep)
            return {"key": done.key, "bytes": done.bytes, "sha256": done.sha256, "removed": list(done.removed)}
        finally:
            await blobs.aclose()

    try:
        out = uvloop.run(run())
    except (BackupError, ValueError) as exc:
        print(f"switchboard: {exc}", file=sys.stderr)
        return 1
    print(orjson.dumps(out).decode())
    return 0


def _retention_run(*, dry_run: bool, batch: int | None) -> int:
    """``switchboard retention run``: the job once, on the storage this configuration names; one JSON line."""
    import orjson

    from api.tiers import local_blob_store, open_tiers
    from storage.retention import Retention

    settings = Settings()
    logs.setup("WARNING")

    async def run() -> dict[str, object]:
        tiers = await open_tiers(settings, local_blob_store(settings))
        try:
            job = Retention(tiers.db, tiers.blobs, window_days=settings.restore_window_days,
                            batch=batch or settings.retention_batch, actor="cli",
                            archive_after_days=settings.archive_after_days)
            report = await job.run(dry_run=dry_run)
        finally:
            await tiers.aclose()
        return {"dry_run": dry_run, "skipped": report.skipped, "totals": report.totals(),
                "organizations": {str(o.org_id): o.counts for o in report.orgs if o.counts}}

    try:
        out = uvloop.run(run())
    except DataDirInUse as exc:
        print(f"switchboard: {exc}; the running server applies retention itself every "
              f"SWITCHBOARD_RETENTION_INTERVAL_S ({settings.retention_interval_s:g} s)", file=sys.stderr)
        return 1
    print(orjson.dumps(out).decode())
    return 0


def _orgs_create(name: str, email: str) -> int:
    """``switchboard orgs create``: one JSON line on stdout, or the reason on stderr and exit code 1."""
    import orjson

    from api.bootstrap import BootstrapError, create_organisation

    settings = Settings()
    logs.setup("WARNING")  # stdout is the JSON line alone
    try:
        created = uvloop.run(create_organisation(settings, name, email))
    except BootstrapError as exc:
        print(f"switchboard: {exc}", file=sys.stderr)
        return 1
    print(orjson.dumps(created.public()).decode(), flush=True)
    return 0


def _raise_fd_limit() -> None:
    """Each call holds a socket: lift the soft open-files limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _tune_gil() -> None:
    """Hand the GIL to the event loop sooner.

    Work the loop gives to threads (exports, evidence hashing, blob walks, the S3 client, spool
    writes) runs Python that keeps the GIL until the interpreter's switch interval ends (5 ms by
    default) whenever the loop asks for it, and the loop asks at every socket call: one busy thread
    stretches each loop turn by up to 5 ms per call in it, which is frame lag for every live call.
    1 ms bounds that wait at the cost of more switches for the threads (measured: the red team's wipe
    and export beside a live call: loop stall p99 27 -> 13-14 ms, max 28 -> 14-16 ms).
    """
    sys.setswitchinterval(SWITCH_INTERVAL_S)


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


async def _serve(settings: Settings, *, demo: bool = False, ready_fd: int | None = None,
                 lifeline_fd: int | None = None) -> None:
    """One server process: alone, or worker ``settings.worker_index`` of ``serve --workers``, which then
    gives the pipe to say "ready" on and the pipe whose EOF means the parent is gone (api/workers.py)."""
    from api.app import make_app, open_runtime
    from api.bootstrap import Demo, demo_banner, ensure_demo
    from api.connections import CONNECTION_GUARD, ConnectionGuard

    _raise_fd_limit()
    _tune_gc()
    _tune_gil()

    rt = await open_runtime(settings)  # opens the tiers, recovers a crashed run's leftovers, warms decoders
    demo_org: Demo | None = None
    if demo and rt.tiers is not None:
        try:
            demo_org = await ensure_demo(settings, rt.tiers.db)
        except BaseException:
            await rt.aclose()
            raise
    app = make_app(rt)
    guard = app[CONNECTION_GUARD] = ConnectionGuard(header_timeout_s=settings.http_header_timeout_s,
                                                    max_per_address=settings.http_max_pending_per_address,
                                                    exempt=settings.per_address_exempt)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           keepalive_timeout=settings.http_keepalive_timeout_s)
    await runner.setup()
    assert runner.server is not None
    guard.install(runner.server)  # before the site accepts anything
    worker = settings.worker_index is not None
    site = web.TCPSite(runner, settings.host, settings.port, backlog=4096, reuse_port=worker or None)
    await site.start()
    # Start-up (storage clients, warm decoders) made many long-lived objects: out of the collector's reach too.
    gc.collect()
    gc.freeze()
    logging.getLogger("switchboard").info("server.listening", extra={"host": settings.host, "port": settings.port})
    if demo:
        port = runner.addresses[0][1] if runner.addresses else settings.port  # the real one when --port 0
        print(demo_banner(settings, demo_org, port=port), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP: the terminal of `make run` was closed.  Python's default would end the process without
    # any clean-up; stop as on Ctrl-C instead.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    if lifeline_fd is not None:
        def parent_gone() -> None:
            loop.remove_reader(lifeline_fd)
            logging.getLogger("switchboard").error("worker.parent_gone", extra={"worker": settings.worker_index})
            stop.set()
        loop.add_reader(lifeline_fd, parent_gone)  # readable only at EOF: nothing is ever written to it
    if ready_fd is not None:
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
    try:
        await stop.wait()
    finally:
        rt.draining = True  # /readyz answers 503 from here on, before the listener closes (api/readiness.py)
        await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
