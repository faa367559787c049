"""What the fake streaming-STT servers share: a loopback aiohttp server, per-connection records, and
the faults a test can inject.

- ``start()`` serves ``path`` on 127.0.0.1 (free port) with a small socket receive buffer, so a
  stalled fake soon blocks the client's writes; ``stop()`` ends it (and any stall).
- ``refuse_next = K``: the next K handshakes get HTTP 503 (``_refused``).
- One-shot faults, applied by ``_faulted`` once a connection has received N audio bytes:
  ``drop_after(N, code)`` closes with ``code`` (None: abort TCP), ``stall_after(N)`` stops reading;
  subclasses may add kinds (AssemblyAI's ``error_after``) by overriding ``_inject``.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Connection:
    query: dict[str, str]
    headers: dict[str, str]
    query_list: list[tuple[str, str]] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)
    messages: list[Any] = field(default_factory=list)  # dict for text (parsed JSON), int (length) for binary
    close_code: int | None = None  # the code the fake closed with, else the client's

    def sent(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if isinstance(m, dict) and m.get("type") == kind]

    @property
    def chunks(self) -> list[int]:
        return [m for m in self.messages if isinstance(m, int)]


class ScriptedWsFake:
    path = "/"

    def __init__(self, script: list[str], *, api_key: str, word_ms: int) -> None:
        self.script = script
        self.api_key = api_key
        self.word_ms = word_ms
        self.connections: list[Connection] = []
        self.attempts = 0
        self.refuse_next = 0
        self._fault: tuple[str, int, int | None] | None = None
        self._unstall = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    def drop_after(self, nbytes: int, code: int | None = None) -> None:
        """After ``nbytes`` audio bytes on a connection, close it with ``code`` (None: abort TCP)."""
        self._fault = ("drop", nbytes, code)

    def stall_after(self, nbytes: int) -> None:
        self._fault = ("stall", nbytes, None)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get(self.path, self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # so a stall blocks the client soon
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock).start()
        self.url = f"ws://127.0.0.1:{sock.getsockname()[1]}{self.path}"
        return self.url

    async def stop(self) -> None:
        self._unstall.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    def _refused(self) -> web.Response | None:
        """Count the attempt; a 503 while ``refuse_next`` lasts."""
        self.attempts += 1
        if self.refuse_next > 0:
            self.refuse_next -= 1
            return web.Response(status=503, text="refused by test")
        return None

    def _script_words(self, index: int) -> list[str]:
        return self.script[index].split() if index < len(self.script) else []

    async def _faulted(self, ws: web.WebSocketResponse, request: web.Request, conn: Connection) -> bool:
        """Apply the pending fault once ``conn`` has enough audio; True when the connection is done."""
        if self._fault is None or len(conn.audio) < self._fault[1]:
            return False
        kind, _, code = self._fault
        self._fault = None
        if kind == "stall":
            await self._unstall.wait()
        else:
            await self._inject(kind, ws, request, code)
        return True

    async def _inject(self, kind: str, ws: web.WebSocketResponse, request: web.Request, code: int | None) -> None:
        if code is None:
            assert request.transport is not None
            request.transport.abort()
        else:
            await ws.close(code=code, message=b"injected by test")
