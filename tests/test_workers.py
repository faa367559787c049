"""``serve --workers 2``: one port, two supervised processes, and what happens when one dies.

The server runs as ``make run`` runs it, with the test PostgreSQL and Valkey.  The kernel picks the
worker of each connection (SO_REUSEPORT), so a test that needs a connection on a given worker opens
connections until one lands there: it asks ``GET /api/stats`` (which names the answering process)
and, keep-alive, uses that same connection for its stream or its SSE request.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from api.simulator import telnyx_messages
from tests.servers import API_KEY, Server, running_server
from tests.speech import utterances_with_pauses
from tests.storage.conftest import APP_PASSWORD, DbUrls, migrated_database
from tests.telnyx_client import connect, send_paced
from tests.test_end_to_end import SENTENCES

PROBE_S = 60.0  # connections are tried this long to land on a wanted worker (each does with p = 1/2)


@pytest.fixture
def urls(pg_admin_url: str) -> DbUrls:
    return asyncio.run(migrated_database(pg_admin_url))


@pytest.fixture
def workers(tmp_path: Path, urls: DbUrls, redis_url: str) -> Iterator[Server]:
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("\n".join(SENTENCES) + "\n")
    with running_server(tmp_path, SWITCHBOARD_WORKERS="2", SWITCHBOARD_STT_PROVIDER="pocketsphinx",
                        SWITCHBOARD_STT_PHRASES_FILE=str(phrases), SWITCHBOARD_STT_MAX_DECODERS="1",
                        SWITCHBOARD_PERSIST="true", DATABASE_URL=urls.admin,
                        SWITCHBOARD_DATABASE_APP_PASSWORD=APP_PASSWORD, REDIS_URL=redis_url) as server:
        yield server


async def _request(sock: socket.socket, path: str, headers: dict[str, str] | None = None) -> None:
    head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    await asyncio.get_running_loop().sock_sendall(sock, (head + "\r\n").encode())


async def _response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length body: status, headers, body (nothing read past it)."""
    loop = asyncio.get_running_loop()
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await loop.sock_recv(sock, 1)  # byte by byte: what follows belongs to the next response
        assert chunk, "connection closed mid-response"
        buf += chunk
    lines = buf.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    body = b""
    while len(body) < int(headers["content-length"]):
        body += await loop.sock_recv(sock, int(headers["content-length"]) - len(body))
    return int(lines[0].split()[1]), headers, body


async def on_worker(port: int, want: Callable[[dict[str, Any]], bool]) -> tuple[socket.socket, dict[str, Any]]:
    """A keep-alive connection the kernel gave to a worker whose ``node`` (from /api/stats) satisfies ``want``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROBE_S
    while loop.time() < deadline:  # a worker being replaced answers only once it listens again
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await _request(sock, "/api/stats")
        status, _, body = await _response(sock)
        assert status == 200
        node = orjson.loads(body)["node"]
        if want(node):
            return sock, node
        sock.close()
        await asyncio.sleep(0.02)
    raise AssertionError(f"no connection landed on the wanted worker in {PROBE_S} s")


async def sse_on(sock: socket.socket, path: str, last_event_id: str | None = None) -> AsyncIterator[
        tuple[str, str, dict[str, Any]]]:
    """SSE over ``sock`` (HTTP/1.1, chunked): (id, event, data) until the server ends the stream."""
    await _request(sock, path, {"Last-Event-ID": last_event_id} if last_event_id else None)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.split()[1] == b"200", head
        text = b""
        while True:
            size = int((await reader.readline()).strip(), 16)
            if size == 0:
                return
            text += (await reader.readexactly(size + 2))[:-2]
            while b"\n\n" in text:
                block, text = text.split(b"\n\n", 1)
                fields = dict(line.split(": ", 1) for line in block.decode().splitlines() if ": " in line)
                if "event" in fields:
                    yield fields.get("id", ""), fields["event"], orjson.loads(fields["data"])
    finally:
        writer.close()


async def worker_pids(port: int) -> list[int]:
    """Both workers' process ids, each asked on a connection that landed on it."""
    pids = []
    for index in (0, 1):
        sock, node = await on_worker(port, lambda n, i=index: n["worker"] == i)
        sock.close()
        pids.append(node["pid"])
    return pids


def _alive(pid: int) -> bool:
    """Running (a zombie left for whoever reaps it is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


async def test_both_workers_answer_on_the_one_port_under_their_own_node_ids(workers: Server) -> None:
    seen: dict[int, dict[str, Any]] = {}
    for index in (0, 1):
        sock, node = await on_worker(workers.port, lambda n, i=index: n["worker"] == i)
        sock.close()
        seen[index] = node
    assert seen[0]["pid"] != seen[1]["pid"]
    assert seen[1]["node_id"] == seen[0]["node_id"] + "-w1"
    assert all(_alive(n["pid"]) for n in seen.values())


async def test_a_dead_workers_call_is_ended_for_viewers_on_the_other_worker_and_the_worker_replaced(
        workers: Server, urls: DbUrls) -> None:
    call_id = "v3:worker-dies"
    path = f"/api/calls/{call_id}/events"
    stream_sock, owner = await on_worker(workers.port, lambda n: True)
    view_sock, viewer = await on_worker(workers.port, lambda n: n["pid"] != owner["pid"])

    seen: list[tuple[str, str, dict[str, Any]]] = []
    first_final = asyncio.Event()

    async def watch() -> None:
        async for ev in sse_on(view_sock, path):
            seen.append(ev)
            if ev[1] == "transcript.final":
                first_final.set()
            if ev[1] == "call.ended":
                return

    viewer_task = asyncio.create_task(watch())
    await asyncio.sleep(0.3)
    pcm = utterances_with_pauses(SENTENCES, pause_ms=900, rate=8000)
    messages = telnyx_messages(pcm, call_id=call_id, stream_id="s-dies", encoding="PCMU", sample_rate=8000,
                               token=None)

    async def stream() -> None:
        async with connect(workers.ws, sock=stream_sock) as ws:
            await send_paced(ws, messages)

    streamer = asyncio.create_task(stream())
    await asyncio.wait_for(first_final.wait(), 30)
    os.kill(owner["pid"], signal.SIGKILL)
    await asyncio.wait_for(viewer_task, 60)  # the replacement's recovery ends the call on the bus
    streamer.cancel()
    await asyncio.gather(streamer, return_exceptions=True)

    names = [name for _, name, _ in seen]
    assert names[0] == "call.started" and names[-1] == "call.ended"
    assert "transcript.final" in names
    ended = seen[-1][2]
    assert (ended["reason"], ended["status"]) == ("node_restart", "failed")
    ids = [int(i) for i, _, _ in seen]
    assert ids == sorted(set(ids)), "an event twice or out of order"

    conn = await asyncpg.connect(urls.admin)
    try:
        row = await conn.fetchrow("SELECT status, end_reason, node_id FROM calls WHERE call_control_id = $1",
                                  call_id)
    finally:
        await conn.close()
    assert row is not None and (row["status"], row["end_reason"], row["node_id"]) == (
        "failed", "node_restart", owner["node_id"])

    # The slot was refilled: a new process under the dead one's node id, the survivor untouched.
    sock, fresh = await on_worker(workers.port, lambda n: n["node_id"] == owner["node_id"])
    sock.close()
    assert fresh["pid"] != owner["pid"] and _alive(viewer["pid"])
    # A viewer that saw only the first event resumes on any worker and gets the rest, once.
    sock, _ = await on_worker(workers.port, lambda n: True)
    resumed = [ev async for ev in sse_on(sock, path, last_event_id=seen[0][0])]
    assert resumed == seen[1:]


async def test_workers_stop_with_their_parent_even_when_it_is_killed(workers: Server) -> None:
    pids = await worker_pids(workers.port)
    workers.proc.kill()  # no clean-up in the parent at all: only the lifeline pipe's EOF tells them
    workers.proc.wait()
    for _ in range(200):
        if not any(_alive(p) for p in pids):
            break
        await asyncio.sleep(0.1)
    assert not any(_alive(p) for p in pids), "a worker outlived its parent"
    with socket.socket() as s:  # nobody listens on the port any more (REUSEADDR: closed connections linger)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", workers.port))
        s.listen()


async def test_sigterm_stops_every_worker_and_exits_cleanly(workers: Server) -> None:
    pids = await worker_pids(workers.port)
    workers.proc.terminate()
    assert await asyncio.to_thread(workers.proc.wait, 40) == 0
    assert not any(_alive(p) for p in pids)
    assert any(line.get("event") == "workers.stopping" for line in workers.logs())
    assert not any(line.get("event") == "worker.died" for line in workers.logs())


async def test_one_scrape_of_the_port_shows_every_worker(workers: Server) -> None:
    """/metrics on either worker: both workers' families, labelled, and a call counted once."""
    from prometheus_client.parser import text_string_to_metric_families

    sock, owner = await on_worker(workers.port, lambda n: True)
    pcm = utterances_with_pauses(SENTENCES[:1], pause_ms=900, rate=8000)
    messages = telnyx_messages(pcm, call_id="v3:metered", stream_id="s-metered", encoding="PCMU",
                               sample_rate=8000, token=None)
    async with connect(workers.ws, sock=sock) as ws:
        await send_paced(ws, messages)
        await ws.wait_closed()

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15  # a sibling's figures are at most 2 s old
    for index in (0, 1):  # ask each worker: each must answer for both
        while True:
            conn, _ = await on_worker(workers.port, lambda n, i=index: n["worker"] == i)
            await _request(conn, "/metrics")  # as the admin API key (the metrics token works as well)
            status, _, body = await _response(conn)
            conn.close()
            assert status == 200
            streams = {s.labels["worker"]: s.value for fam in text_string_to_metric_families(body.decode())
                       for s in fam.samples if s.name == "switchboard_streams_total"}
            if streams == {str(owner["worker"]): 1.0, str(1 - owner["worker"]): 0.0}:
                break
            assert loop.time() < deadline, streams
            await asyncio.sleep(0.5)


def test_the_nodes_decoders_are_shared_out_among_its_workers(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    """One decoder per core for the node, not per worker; a count set by hand is each worker's."""
    from api.settings import Settings
    from api.workers import worker_env

    monkeypatch.delenv("SWITCHBOARD_STT_MAX_DECODERS", raising=False)
    s = Settings(workers=4, stt_max_decoders=8, data_dir=tmp_path)
    assert worker_env(s, database_url=None, redis_url=None)["SWITCHBOARD_STT_MAX_DECODERS"] == "2"
    assert worker_env(Settings(workers=4, stt_max_decoders=2, data_dir=tmp_path), database_url=None,
                      redis_url=None)["SWITCHBOARD_STT_MAX_DECODERS"] == "1"
    monkeypatch.setenv("SWITCHBOARD_STT_MAX_DECODERS", "3")
    assert worker_env(Settings(workers=4, data_dir=tmp_path), database_url=None,
                      redis_url=None)["SWITCHBOARD_STT_MAX_DECODERS"] == "3"
