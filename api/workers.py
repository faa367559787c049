"""``switchboard serve --workers N``: N server processes on one port, each its own event loop, supervised.

One event loop runs on one core, and the media path (JSON parsing, codecs, VAD, fan-out) is Python:
a node uses its cores by running one server process per core.  This module is the parent.

Who does what::

    parent (this module)                          worker i (``api.cli._serve`` with worker_index=i)
    holds <data_dir>/switchboard.lock             holds <data_dir>/workers/w<i>/switchboard.lock
    starts the embedded PostgreSQL and Valkey     connects to the parent's URLs; starts no server
      (unless configured) and restarts them       (migrate_on_start off: the parent migrated)
    migrates; creates the demo organisation and   node_id: <node_id> for worker 0, <node_id>-w<i>
      the local encryption key file once            after it; spool and post-call files in
    shares the secrets a worker would otherwise     Settings.own_dir (worker 0: the data directory,
      draw at random (blob URL signing key, placed   so a one-process run and worker 0 are one node)
      calls' media credential key) through the env
    reserves the port: a socket bound with        its own listening socket on that port, also
      SO_REUSEPORT but never listening (so it       SO_REUSEPORT: the kernel hashes each new
      takes no connection; with --port 0 it         connection to one worker; a worker's death
      picks the port)                               loses only its own accept queue
    restarts a worker that exits (backoff)        a restarted worker is its predecessor's node:
                                                    start-up recovery (api.recovery) closes the calls
                                                    it left as failed/node_restart and ends them on
                                                    the bus, so viewers on other workers are told

A worker's lifecycle (one task per slot, ``_keep``)::

    state       on                          next
    starting    wrote "ready" on its pipe   running (backoff reset after STABLE_S running)
    starting    exited / READY_TIMEOUT_S    first start: the whole server fails (exit 1);
                                            later: dead
    running     exited, not stopping        dead (logged worker.died with code or signal)
    dead        backoff elapsed             starting (0.5 s doubling to 30 s)
    any         stop (SIGTERM/INT/HUP)      SIGTERM to the worker, SIGKILL after DRAIN_S

Orphans: each worker watches a pipe whose write end only the parent holds; EOF means the parent is
gone (even by SIGKILL) and the worker stops as on SIGTERM, so no worker outlives its parent holding
the port.  Workers run in their own session: a terminal's Ctrl-C reaches the parent, which stops
them in order.

Between workers, everything shared lives in the tiers: sessions, rate limits and idempotency keys in
Redis, calls in PostgreSQL, events on Redis Streams (an SSE client on worker B of a call streamed
to worker A is served by B's relay, ``api.relay``, with A's event ids).  With storage off there is
no bus: an SSE client sees only the calls of the worker it landed on.  Per-process limits (the
connection guard's per-address cap, admission's stream cap) are per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api.settings import Settings
from engine.backoff import Backoff

log = logging.getLogger("switchboard.workers")

READY_TIMEOUT_S = 300.0  # a worker's start-up: open the tiers, warm its decoders
DRAIN_S = 30.0  # SIGTERM -> SIGKILL: a worker drains its calls within its own shutdown bound
STABLE_S = 60.0  # a worker that ran this long is healthy again: its next restart is immediate
BACKOFF_INITIAL_S, BACKOFF_MAX_S = 0.5, 30.0


class StartupFailed(RuntimeError):
    """A worker did not come up on the first start; the server does not run half its workers."""


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind, never listen, with SO_REUSEPORT: the port is ours (with ``port`` 0, a free one) while
    the workers' listening sockets join it; a socket that is not listening receives no connection."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def worker_node_id(base: str, index: int) -> str:
    """Worker 0 is the node itself; the others are named after it (<= 64 characters, as node_id)."""
    return base if index == 0 else f"{base[:58]}-w{index}"


@dataclass
class Slot:
    index: int
    proc: asyncio.subprocess.Process | None = None
    ready_at: float | None = None
    restarts: int = 0
    exits: list[int] = field(default_factory=list)  # return codes, newest last (bounded below)


class WorkerPool:
    """N worker processes, kept running until ``stop``."""

    MAX_EXITS_KEPT = 20

    def __init__(self, n: int, *, host: str, port: int, env: dict[str, str], extra_args: list[str],
                 metrics_dir: Path | None = None) -> None:
        self.slots = [Slot(i) for i in range(n)]
        self._metrics_dir = metrics_dir  # workers' metrics snapshots (api/metrics.py): a dead one's removed
        self._host, self._port = host, port
        self._env = env
        self._extra = extra_args
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._first_ready: list[asyncio.Future[None]] = []
        # Read end to every worker; the write end stays here: its EOF tells a worker we are gone.
        self._lifeline_r, self._lifeline_w = os.pipe()

    async def start(self) -> None:
        """Start every worker and wait until each listens; raises ``StartupFailed`` otherwise."""
        loop = asyncio.get_running_loop()
        self._first_ready = [loop.create_future() for _ in self.slots]
        self._tasks = [loop.create_task(self._keep(slot), name=f"worker-{slot.index}") for slot in self.slots]
        try:
            await asyncio.gather(*self._first_ready)
        except StartupFailed:
            await self.stop()
            raise

    def pids(self) -> list[int | None]:
        return [slot.proc.pid if slot.proc and slot.proc.returncode is None else None for slot in self.slots]

    async def _spawn(self, slot: Slot) -> bool:
        """Start ``slot``'s process; True once it listens, False if it exited or hung first."""
        ready_r, ready_w = os.pipe()
        env = {**self._env, "SWITCHBOARD_NODE_ID": worker_node_id(self._env["SWITCHBOARD_NODE_ID"], slot.index)}
        try:
            slot.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "api.cli", "serve", "--host", self._host, "--port", str(self._port),
                "--worker-index", str(slot.index), "--ready-fd", str(ready_w),
                "--lifeline-fd", str(self._lifeline_r), *self._extra,
                env=env, pass_fds=(ready_w, self._lifeline_r), start_new_session=True)
        finally:
            os.close(ready_w)  # ours closed: the pipe reads EOF when the worker's copy goes
        try:
            line = await asyncio.wait_for(_read_line(ready_r), READY_TIMEOUT_S)
        except TimeoutError:
            line = b""
            log.error("worker.start_timeout", extra={"worker": slot.index, "timeout_s": READY_TIMEOUT_S})
            with contextlib.suppress(ProcessLookupError):
                slot.proc.kill()
        return line == b"ready\n"

    async def _keep(self, slot: Slot) -> None:
        backoff = Backoff(BACKOFF_INITIAL_S, BACKOFF_MAX_S)
        first = self._first_ready[slot.index]
        while not self._stopping:
            ready = await self._spawn(slot)
            assert slot.proc is not None
            if ready:
                slot.ready_at = time.monotonic()
                log.info("worker.ready", extra={"worker": slot.index, "pid": slot.proc.pid,
                                                "restarts": slot.restarts})
                if not first.done():
                    first.set_result(None)
            elif not first.done():
                code = await slot.proc.wait()
                first.set_exception(StartupFailed(f"worker {slot.index} exited during start-up (code {code})"))
                return
            code = await slot.proc.wait()
            if self._stopping:
                return
            if self._metrics_dir is not None:  # its last figures are not the node's any more
                (self._metrics_dir / f"w{slot.index}.prom").unlink(missing_ok=True)
            slot.exits = [*slot.exits, code][-self.MAX_EXITS_KEPT:]
            ran_s = time.monotonic() - slot.ready_at if ready and slot.ready_at is not None else 0.0
            if ran_s >= STABLE_S:
                backoff.reset()
            delay = backoff.next()
            how = {"signal": _signal_name(-code)} if code < 0 else {"code": code}
            log.error("worker.died", extra={"worker": slot.index, "pid": slot.proc.pid, **how,
                                            "ran_s": round(ran_s, 1), "restart_in_s": delay})
            slot.restarts += 1
            await asyncio.sleep(delay)

    async def stop(self, drain_s: float = DRAIN_S) -> None:
        """SIGTERM every worker, SIGKILL what is left after ``drain_s``; then forget them."""
        self._stopping = True
        live = [s.proc for s in self.slots if s.proc is not None and s.proc.returncode is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        if live:
            _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in live], timeout=drain_s)
            if pending:
                log.error("worker.kill_after_drain", extra={"workers": len(pending), "drain_s": drain_s})
                for proc in live:
                    if proc.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                await asyncio.gather(*(p.wait() for p in live))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for fd in (self._lifeline_r, self._lifeline_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal, say: no name
        return str(number)


async def _read_line(fd: int) -> bytes:
    """The worker's one line ("ready\\n"), or b"" at EOF (it died first).  Takes ``fd`` and closes it."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                os.fdopen(fd, "rb", buffering=0))
    try:
        return await reader.readline()
    except ValueError:  # a line past the limit: not our worker speaking
        return b""
    finally:
        transport.close()


def worker_env(s: Settings, *, database_url: str | None, redis_url: str | None) -> dict[str, str]:
    """The environment every worker starts with: ours, plus what must be the same in all of them."""
    env = dict(os.environ)
    env["SWITCHBOARD_DATA_DIR"] = str(s.data_dir.resolve())
    env["SWITCHBOARD_NODE_ID"] = s.node_id
    env["SWITCHBOARD_MIGRATE_ON_START"] = "false"  # migrated here, once
    if database_url is not None:  # the embedded server this process started
        env["SWITCHBOARD_DATABASE_URL"] = database_url
    if redis_url is not None:
        env["SWITCHBOARD_REDIS_URL"] = redis_url
    # Drawn at random per process when unset: shared, or a URL signed by one worker fails on another
    # and a placed call's media credential works only on the worker that placed it.
    for name in ("blob_signing_key", "call_token_key"):
        if getattr(s, name) is None:
            env[f"SWITCHBOARD_{name.upper()}"] = secrets.token_urlsafe(32)
    # The local recogniser's decoders (one process per core and language model by default) are the
    # node's, not each worker's: N workers each starting one per core would start N times too many
    # (32 workers x 32 decoders x 2 models on a 32-core machine).  A value set by hand is per worker.
    if not any(k.upper() == "SWITCHBOARD_STT_MAX_DECODERS" for k in os.environ):  # names are case-blind
        env["SWITCHBOARD_STT_MAX_DECODERS"] = str(max(1, s.stt_max_decoders // s.workers))
    return env


async def serve_workers(s: Settings, *, demo: bool) -> int:
    """The parent: tiers, then the workers, until a signal; the exit code."""
    from api.bootstrap import Demo, demo_banner, ensure_demo
    from api.restricted_api import keyring_for
    from api.supervisor import TierSupervisor
    from api.tiers import _admin_url, _shutdown, by_tier, redis_url_for
    from storage.db import APP_ROLE, Database, migrate, with_user
    from storage.lifeline import DataDirLock

    lock = DataDirLock(s.data_dir.resolve())
    await asyncio.to_thread(lock.acquire)
    started: list[Any] = []
    supervisor: TierSupervisor | None = None
    pool: WorkerPool | None = None
    reserved: socket.socket | None = None
    try:
        database_url = redis_url = None
        demo_org: Demo | None = None
        if s.persist:
            admin_url = await _admin_url(s, started)
            app_password = s.database_app_password.get_secret_value() if s.database_app_password else None
            if s.migrate_on_start:
                await migrate(admin_url, app_password=app_password)
            if s.database_url is None:
                database_url = admin_url
            url = await redis_url_for(s, started)
            if s.redis_url is None:  # the embedded one: the workers are told where it is
                redis_url = url
            supervisor = TierSupervisor(by_tier(started), interval_s=s.supervise_interval_s,
                                        backoff_max_s=s.supervise_backoff_max_s)
            supervisor.start()
            if s.encryption_keys is None:
                await asyncio.to_thread(keyring_for, s)  # the local key file, created once, before any worker
            if demo:
                app_url = (s.database_app_url.get_secret_value() if s.database_app_url
                           else with_user(admin_url, APP_ROLE, app_password))
                db = Database(app_url, max_size=2)
                await db.open()
                try:
                    demo_org = await ensure_demo(s, db)
                finally:
                    await db.aclose()
        else:
            log.warning("workers.no_bus", extra={"hint": "with storage off, an SSE client sees only the calls "
                                                         "of the worker its connection landed on"})
        reserved = reserve_port(s.host, s.port)
        port = reserved.getsockname()[1]
        env = worker_env(s, database_url=database_url, redis_url=redis_url)
        metrics_dir = s.data_dir.resolve() / "metrics"
        await asyncio.to_thread(shutil.rmtree, metrics_dir, True)  # a previous run's workers' figures
        pool = WorkerPool(s.workers, host=s.host, port=port, env=env, extra_args=[], metrics_dir=metrics_dir)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        try:
            await pool.start()
        except StartupFailed as exc:
            print(f"switchboard: {exc}", file=sys.stderr)
            return 1
        log.info("server.listening", extra={"host": s.host, "port": port, "workers": s.workers,
                                            "pids": pool.pids()})
        if demo:
            print(demo_banner(s, demo_org, port=port), flush=True)
        await stop.wait()
        log.info("workers.stopping", extra={"workers": s.workers})
        return 0
    finally:
        if pool is not None:
            await pool.stop()
        if reserved is not None:
            reserved.close()
        if supervisor is not None:
            await supervisor.aclose()
        await _shutdown(started)
        lock.release()
