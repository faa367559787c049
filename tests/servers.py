"""Start the real server as a subprocess, the way `make run` does, on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

# The bootstrap organisation's credentials every test server gets (api.auth): its media token, which
# Telnyx streams present, and its admin API key, for SSE, WebRTC and /api/stats.
MEDIA_TOKEN = "sbm_test_media_token_0123456789abcdef"
API_KEY = "sbk_test_api_key_0123456789abcdef"
METRICS_TOKEN = "test-metrics-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes]
    extra: dict[str, Any] = field(default_factory=dict)  # what a fixture wants its tests to know

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/media/telnyx"

    def logs(self) -> list[dict[str, object]]:
        """The server's structured log lines so far."""
        out = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                out.append(orjson.loads(line))
        return out


@contextlib.contextmanager
def running_server(tmp: Path, *, new_session: bool = False, **env: str) -> Iterator[Server]:
    """The server as a subprocess; ``new_session``: in a process group of its own, as a terminal's
    foreground job is (a test may then signal the whole group, as Ctrl-C does)."""
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    # Storage tiers and translation are off, and summaries offline, unless a test turns them on (and points
    # them at its servers): a key in the developer's environment must not send test calls to a provider.
    full_env = {**os.environ, "SWITCHBOARD_LOG_LEVEL": "INFO", "SWITCHBOARD_PERSIST": "false",
                "SWITCHBOARD_TRANSLATION_PROVIDER": "none", "SWITCHBOARD_SUMMARY": "offline",
                "SWITCHBOARD_TELNYX_STREAM_TOKEN": MEDIA_TOKEN, "SWITCHBOARD_BOOTSTRAP_API_KEY": API_KEY,
                "SWITCHBOARD_METRICS_TOKEN": METRICS_TOKEN,
                "SWITCHBOARD_DATA_DIR": str(tmp / "data"),
                "SWITCHBOARD_WORKERS": "1",  # one process unless a test asks for more (tests/test_workers.py)
                **env}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=new_session,
        )
    server = Server(port, log_path, proc)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{server.http}/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start:\n{log_path.read_text()}") from None
                time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def get_json(url: str, token: str | None = API_KEY) -> Any:
    """GET ``url`` as the bootstrap admin (``token=None``: with no credential)."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return orjson.loads(resp.read())
