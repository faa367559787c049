"""ConnectionGuard on an aiohttp server in the test's loop: the deadline and the cap apply before the
first request only; a request, a keep-alive connection and a WebSocket are never touched by it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from api.connections import ConnectionGuard

TIMEOUT = 0.3


async def ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        await ws.send_str(msg.data)
    return ws


@pytest.fixture
async def served() -> AsyncIterator[tuple[int, ConnectionGuard]]:
    app = web.Application()
    app.router.add_get("/", ok)
    app.router.add_get("/ws", echo)
    runner = web.AppRunner(app, keepalive_timeout=30)
    await runner.setup()
    guard = ConnectionGuard(header_timeout_s=TIMEOUT, max_per_address=2, exempt={"127.0.0.1"})
    assert runner.server is not None
    guard.install(runner.server)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield port, guard
    await runner.cleanup()


async def connect(port: int, local: str | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, float]:
    """A raw connection and when it was made: the deadline runs from the accept, not from the read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(local, 0) if local else None)
    return reader, writer, time.monotonic()


async def closed_after(reader: asyncio.StreamReader, opened: float) -> tuple[float, bytes]:
    data = await asyncio.wait_for(reader.read(), 5)
    return time.monotonic() - opened, data


async def test_idle_connections_are_capped_per_address_and_closed_at_the_deadline(
        served: tuple[int, ConnectionGuard]) -> None:
    port, guard = served
    capped = [await connect(port, "127.0.0.2") for _ in range(5)]
    exempt = [await connect(port) for _ in range(5)]
    results = await asyncio.gather(*(closed_after(r, opened) for r, _, opened in capped + exempt))
    statuses = [data[:12] for _, data in results]
    assert statuses[:5].count(b"HTTP/1.1 503") == 3 and statuses[:5].count(b"HTTP/1.1 408") == 2
    assert statuses[5:] == [b"HTTP/1.1 408"] * 5  # the exempt address has no cap, only the deadline
    assert all(elapsed < 0.1 for (elapsed, _), s in zip(results, statuses, strict=True) if s.endswith(b"503"))
    assert all(TIMEOUT - 0.02 <= elapsed < TIMEOUT + 0.5
               for (elapsed, _), s in zip(results, statuses, strict=True) if s.endswith(b"408"))
    assert guard.stats() == {"waiting": 0, "addresses": 0, "timed_out": 7, "refused": 3}
    for _, w, _ in capped + exempt:
        w.close()


async def test_after_the_first_request_the_guard_lets_keep_alive_and_websockets_be(
        served: tuple[int, ConnectionGuard]) -> None:
    port, guard = served
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/") as r:
            assert r.status == 200
        ws = await http.ws_connect(f"http://127.0.0.1:{port}/ws")
        await asyncio.sleep(TIMEOUT * 3)  # idle past the deadline: keep-alive and WebSocket both stay
        await ws.send_str("still here")
        assert (await ws.receive_str()) == "still here"
        await ws.close()
        async with http.get(f"http://127.0.0.1:{port}/") as r:  # on the kept-alive connection
            assert r.status == 200
    assert guard.stats() == {"waiting": 0, "addresses": 0, "timed_out": 0, "refused": 0}
