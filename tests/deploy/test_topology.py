"""The several-nodes topology on this machine (deploy/local.py: Debian nginx in front of two real nodes
sharing PostgreSQL and Valkey), with the failures it exists for.

    test                                  what it shows                                 bound
    a stream through nginx, a viewer      the viewer on the node without the call gets  30 s
      through nginx on the other node       every event once, in order, as it happens
    the owner SIGKILLed mid-call          its viewers reconnect through nginx with      LOST_BOUND_S: NODE_DEAD_S
                                            Last-Event-ID, land on the survivor, no       + SWEEP_INTERVAL_S + the
                                            gap, no duplicate; the call ends node_lost    relay's read + 4 s (10 s)
    the owner paused (SIGSTOP) past the   the survivor closes the call node_lost; the   the same
      bound, then resumed                   node's next beat says it was declared lost;
                                            its own end of the call stores nothing over
                                            it (one audit entry)
    Redis stopped 5 s under 200 streams   media flows on (every frame taken, no stream  CATCH_UP_S (12 s) after
      (bus buffer 10,000 on node-a)         closed); the outage's events reach a viewer   Redis is back: the
                                            on the other node, none lost                  forwarder's backoff (5 s)
    ... past the buffer (100 on node-b)   the loss is signalled: stream.gap to viewers, the same
                                            counted in switchboard_stage_dropped_total

Which node nginx picks: round robin over two upstreams in one worker process alternates, so a request
lands on a wanted node when the one before it (``GET /api/stats`` through nginx, which names the node
that answered) landed on the other; each viewer is then verified on its node's own /api/stats and
retried if it landed wrong.  The recogniser is the null one (an empty final per utterance: the
publish path runs, no decoding), so events come from real speech's VAD segmentation at a cost
this 2-core machine can carry for 200 streams.  The outage tests use a Valkey of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import redis
import websockets

from api.call_session import call_key
from api.simulator import telnyx_messages
from api.tiers import DEFAULT_ORG_ID
from deploy import local
from deploy.local import Node, Topology
from storage import embedded
from storage.warm import EventBus, WarmStore
from tests.servers import API_KEY, MEDIA_TOKEN, METRICS_TOKEN, get_json
from tests.speech import utterances_with_pauses
from tests.storage.conftest import APP_PASSWORD, DbUrls, migrated_database
from tests.telnyx_client import connect, send_paced
from tests.test_end_to_end import SENTENCES

pytestmark = pytest.mark.timeout(120)

DEAD_S, SWEEP_S = 4.0, 1.0
NODE_ENV = {
    "SWITCHBOARD_STT_PROVIDER": "null", "SWITCHBOARD_TRANSLATION_PROVIDER": "none",
    "SWITCHBOARD_TELNYX_STREAM_TOKEN": MEDIA_TOKEN, "SWITCHBOARD_BOOTSTRAP_API_KEY": API_KEY,
    "SWITCHBOARD_METRICS_TOKEN": METRICS_TOKEN, "SWITCHBOARD_RECORDING_ENABLED": "false",
    "SWITCHBOARD_NODE_HEARTBEAT_S": "1", "SWITCHBOARD_NODE_DEAD_S": str(DEAD_S),
    "SWITCHBOARD_SWEEP_INTERVAL_S": str(SWEEP_S), "SWITCHBOARD_SSE_HEARTBEAT_S": "2",
    "SWITCHBOARD_RETENTION_INTERVAL_S": "0", "SWITCHBOARD_MEDIA_IDLE_TIMEOUT_S": "30",
}
# A lost node's calls end within its dead time, a sweep, and the relay's next read (1 s); plus margin.
LOST_BOUND_S = DEAD_S + SWEEP_S + 1.0 + 4.0
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def start_topology(tmp: Path, urls: DbUrls, redis_url: str, **kwargs: Any) -> Topology:
    return local.start(tmp / "topo", database_url=urls.admin, redis_url=redis_url, app_password=APP_PASSWORD,
                       env=NODE_ENV, **kwargs)


@contextlib.asynccontextmanager
async def topology(tmp: Path, pg_admin_url: str, redis_url: str, **kwargs: Any) -> AsyncIterator[
        tuple[Topology, DbUrls]]:
    """A fresh database and the topology on it; its processes start and stop in a thread (they block)."""
    urls = await migrated_database(pg_admin_url)
    topo = await asyncio.to_thread(start_topology, tmp, urls, redis_url, **kwargs)
    try:
        yield topo, urls
    finally:
        await asyncio.to_thread(topo.stop)


async def stats(node: Node) -> dict[str, Any]:
    return await asyncio.to_thread(get_json, f"{node.http}/api/stats", METRICS_TOKEN)  # type: ignore[no-any-return]


@dataclass
class Viewer:
    """An SSE client of one call: its events (id, name, payload) with their arrival times."""

    events: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # the response is over, ended or not
    cut: bool = False  # the connection ended before call.ended

    @property
    def last_id(self) -> int:
        return self.events[-1][0] if self.events else 0

    async def read(self, resp: aiohttp.ClientResponse) -> None:
        buf = b""
        try:
            async for chunk in resp.content.iter_any():
                buf += chunk
                while b"\n\n" in buf:
                    block, buf = buf.split(b"\n\n", 1)
                    fields = dict(line.split(": ", 1) for line in block.decode().splitlines() if ": " in line)
                    if "event" in fields and "id" in fields:
                        self.events.append((int(fields["id"]), fields["event"], orjson.loads(fields["data"])))
                        self.arrived.append(time.monotonic())
                        if fields["event"] == "call.ended":
                            self.ended.set()
                            self.gone.set()
                            return
        except (aiohttp.ClientError, ConnectionError):
            pass
        self.cut = True
        self.gone.set()


async def landed_on(http: aiohttp.ClientSession, topo: Topology) -> str:
    async with http.get(f"{topo.url}/api/stats", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}) as r:
        return str((await r.json())["node"]["node_id"])


@contextlib.asynccontextmanager
async def viewer_through_nginx(http: aiohttp.ClientSession, topo: Topology, call_id: str, want: Node,
                               last_event_id: int | None = None) -> AsyncIterator[Viewer]:
    """An SSE client of ``call_id`` through nginx that landed on ``want`` (see the module docstring)."""
    headers = {**AUTH, "Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    for _ in range(10):
        for _ in range(2):  # once it lands elsewhere, the next one lands on want (unless want is all there is)
            if await landed_on(http, topo) != want.name:
                break
        before = (await stats(want))["sse_clients"]
        resp = await http.get(f"{topo.url}/api/calls/{call_id}/events", headers=headers)
        assert resp.status == 200, (resp.status, await resp.text())
        viewer = Viewer()
        task = asyncio.create_task(viewer.read(resp))
        await asyncio.sleep(0.2)
        if (await stats(want))["sse_clients"] > before:
            try:
                yield viewer
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                resp.close()
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        resp.close()
    raise AssertionError(f"no event stream landed on {want.name} through nginx in 10 tries")


async def reference(node: Node, call_id: str) -> list[tuple[int, str, dict[str, Any]]]:
    """The call's events as its owner's own history has them (directly, not through nginx)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{node.http}/api/calls/{call_id}/events", headers=AUTH) as resp:
            viewer = Viewer()
            await asyncio.wait_for(viewer.read(resp), 10)
    return [e for e in viewer.events if e[1] != "transcript.partial"]


async def owner(topo: Topology, within_s: float = 10.0) -> tuple[Node, Node]:
    """(the node the one live stream reached, the other)."""
    async with asyncio.timeout(within_s):
        while True:
            live = [n for n in topo.nodes if (await stats(n))["streams_active"]]
            if live:
                (node,) = live
                return node, next(n for n in topo.nodes if n is not node)
            await asyncio.sleep(0.1)


def in_order_once(events: list[tuple[int, str, dict[str, Any]]]) -> None:
    ids = [i for i, _, _ in events]
    assert ids == sorted(set(ids)), f"an event twice or out of order: {ids}"


# --- (a) --------------------------------------------------------------------------------------------

async def test_a_viewer_through_nginx_on_the_other_node_gets_every_event_once_in_order_as_it_happens(
        tmp_path: Path, pg_admin_url: str, redis_url: str) -> None:
    call_id = "v3:topo-relay"
    pcm = utterances_with_pauses(SENTENCES, pause_ms=900, rate=8000)
    messages = telnyx_messages(pcm, call_id=call_id, stream_id="s-relay", encoding="PCMU", sample_rate=8000,
                               token=None)
    async with topology(tmp_path, pg_admin_url, redis_url) as (topo, _):
        async with aiohttp.ClientSession() as http:
            finished = 0.0

            async def stream() -> None:
                nonlocal finished
                async with connect(topo.ws) as ws:  # through nginx: a WebSocket upgrade
                    await send_paced(ws, messages)
                    await ws.wait_closed()
                    assert ws.close_code == 1000
                finished = time.monotonic()

            streamer = asyncio.create_task(stream())
            own, other = await owner(topo)
            async with viewer_through_nginx(http, topo, call_id, other) as viewer:
                await asyncio.wait_for(viewer.ended.wait(), 30)
            await streamer
        kept = await reference(own, call_id)
        relayed = (await stats(other))["relay"]["relayed"]

    names = [name for _, name, _ in kept]
    assert names[0] == "call.started" and names[-1] == "call.ended" and names.count("transcript.final") >= 3
    assert viewer.events == kept  # every event, once, in order, under the owner's ids, same payloads
    in_order_once(viewer.events)
    assert relayed == len(kept)  # it came over the bus, not from a history of its own
    first_final = next(t for t, (_, name, _) in zip(viewer.arrived, viewer.events, strict=True)
                       if name == "transcript.final")
    assert first_final < finished - 2.0  # as it happened: nothing held back by nginx until the call ended


# --- (b) --------------------------------------------------------------------------------------------

async def test_the_owner_killed_mid_call_its_viewers_resume_on_the_survivor_and_the_call_ends_node_lost(
        tmp_path: Path, pg_admin_url: str, redis_url: str) -> None:
    call_id = "v3:topo-killed"
    pcm = utterances_with_pauses(SENTENCES * 4, pause_ms=900, rate=8000)  # far longer than the test
    messages = telnyx_messages(pcm, call_id=call_id, stream_id="s-killed", encoding="PCMU", sample_rate=8000,
                               token=None)
    key = call_key(DEFAULT_ORG_ID, call_id)
    async with topology(tmp_path, pg_admin_url, redis_url) as (topo, urls):
        warm = WarmStore.from_url(redis_url)
        bus = EventBus(warm.redis)
        try:
            async with aiohttp.ClientSession() as http:
                async def stream() -> None:
                    with contextlib.suppress(websockets.ConnectionClosed):
                        async with connect(topo.ws) as ws:
                            await send_paced(ws, messages)

                streamer = asyncio.create_task(stream())
                own, survivor = await owner(topo)
                async with viewer_through_nginx(http, topo, call_id, own) as on_owner, \
                        viewer_through_nginx(http, topo, call_id, survivor) as on_survivor:
                    async with asyncio.timeout(20):  # two finals seen, and all of it on the bus
                        while sum(n == "transcript.final" for _, n, _ in on_owner.events) < 2 or \
                                await bus.last_ref(key) < on_owner.last_id:  # noqa: ASYNC110 - polls Redis
                            await asyncio.sleep(0.05)
                    topo.kill(own.name)  # SIGKILL: no drain, no clean-up
                    killed = time.monotonic()
                    await asyncio.wait_for(on_owner.gone.wait(), 5)  # nginx closes the viewer's connection
                    assert on_owner.cut
                    async with viewer_through_nginx(http, topo, call_id, survivor,
                                                    last_event_id=on_owner.last_id) as resumed:
                        await asyncio.wait_for(resumed.ended.wait(), LOST_BOUND_S)
                        ended_after = time.monotonic() - killed
                    await asyncio.wait_for(on_survivor.ended.wait(), 5)
                streamer.cancel()
                await asyncio.gather(streamer, return_exceptions=True)
        finally:
            await warm.aclose()
        conn = await asyncpg.connect(urls.admin)
        try:
            row = await conn.fetchrow("SELECT id, status, end_reason, node_id FROM calls WHERE call_control_id = $1",
                                      call_id)
            audit = await conn.fetch("SELECT actor_id, new_value FROM audit_logs WHERE resource_id = $1 AND "
                                     "action = 'call.ended'", str(row["id"]))
        finally:
            await conn.close()
        survivor_sweeps = (await stats(survivor))["sweeper"]

    whole = on_owner.events + resumed.events
    in_order_once(whole)
    assert whole == on_survivor.events  # no gap, no duplicate: what a viewer on the survivor saw all along
    ended = whole[-1]
    assert ended[1] == "call.ended" and (ended[2]["reason"], ended[2]["status"]) == ("node_lost", "failed")
    assert [n for _, n, _ in resumed.events] == ["call.ended"]  # resumed after the last event it had
    assert ended_after < LOST_BOUND_S
    assert (row["status"], row["end_reason"], row["node_id"]) == ("failed", "node_lost", own.name)
    assert [(a["actor_id"], orjson.loads(a["new_value"])["reason"]) for a in audit] == [(survivor.name, "node_lost")]
    assert survivor_sweeps["calls_lost"] == 1


async def test_a_node_paused_past_the_bound_comes_back_told_and_leaves_its_closed_call_as_closed(
        tmp_path: Path, pg_admin_url: str, redis_url: str) -> None:
    """SIGSTOP (a long GC pause, a frozen VM, a partition) for longer than NODE_DEAD_S: the survivor
    closes the call as node_lost.  SIGCONT: the node's next beat finds its row gone, it says so, and the
    call's end on its media path later stores nothing over the sweep's outcome (one audit entry)."""
    import os
    import signal

    call_id = "v3:topo-paused"
    pcm = utterances_with_pauses(SENTENCES * 3, pause_ms=900, rate=8000)
    messages = telnyx_messages(pcm, call_id=call_id, stream_id="s-paused", encoding="PCMU", sample_rate=8000,
                               token=None)
    async with topology(tmp_path, pg_admin_url, redis_url) as (topo, urls):
        own, survivor = topo.nodes
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{survivor.http}/api/calls/{call_id}/events", headers=AUTH) as resp:
                viewer = Viewer()
                reader = asyncio.create_task(viewer.read(resp))
                async with connect(own.ws) as ws:  # straight to node-a
                    sender = asyncio.create_task(send_paced(ws, messages[:-1]))
                    await asyncio.sleep(3.0)
                    os.kill(own.proc.pid, signal.SIGSTOP)
                    try:
                        await asyncio.wait_for(viewer.ended.wait(), LOST_BOUND_S)
                    finally:
                        os.kill(own.proc.pid, signal.SIGCONT)
                    async with asyncio.timeout(10):  # its next beat: declared lost, told
                        while not (await stats(own))["heartbeat"]["declared_lost"]:  # noqa: ASYNC110 - polls it
                            await asyncio.sleep(0.2)
                    await asyncio.sleep(1.0)
                    sender.cancel()
                    await asyncio.gather(sender, return_exceptions=True)
                    await ws.send(messages[-1])  # the media path now ends the call its own way: stop
                    await ws.wait_closed()
                await asyncio.gather(reader, return_exceptions=True)
        after = await stats(own)
        await asyncio.sleep(1.5)  # the writer's batch: what it would have stored over the sweep, if anything
        conn = await asyncpg.connect(urls.admin)
        try:
            row = await conn.fetchrow("SELECT id, status, end_reason FROM calls WHERE call_control_id = $1", call_id)
            audit = await conn.fetch("SELECT actor_id, new_value FROM audit_logs WHERE resource_id = $1 AND "
                                     "action = 'call.ended'", str(row["id"]))
            beat = await conn.fetchval("SELECT heartbeat_at > now() - interval '5 seconds' FROM nodes "
                                       "WHERE node_id = $1", own.name)
        finally:
            await conn.close()
        logged = [line.get("event") for line in _log_lines(own)]

    ended = viewer.events[-1]
    assert (ended[1], ended[2]["reason"]) == ("call.ended", "node_lost")
    assert after["heartbeat"]["declared_lost"] == 1 and beat is True  # alive again, its row back
    assert "node.declared_lost" in logged and "call.end_not_stored" in logged
    assert (row["status"], row["end_reason"]) == ("failed", "node_lost")  # not completed/stop
    assert [(a["actor_id"], orjson.loads(a["new_value"])["reason"]) for a in audit] == [(survivor.name, "node_lost")]


def _log_lines(node: Node) -> list[dict[str, Any]]:
    out = []
    for line in node.log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            out.append(orjson.loads(line))
    return out


# --- (c) --------------------------------------------------------------------------------------------

STREAMS = 200
WATCHED = 4  # calls whose events are compared between the owner and a viewer on the other node
OUTAGE_S = 5.0
CATCH_UP_S = 12.0  # after Redis returns: the forwarder's backoff (at most 5 s) and the relay's reads


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str) -> Iterator[tuple[Topology, Any]]:
    """A topology on a Valkey of its own (stopped by the tests): node-a's bus buffer is the default
    (10,000), node-b's the smallest (100)."""
    valkey = embedded.start_valkey(tmp_path_factory.mktemp("outage-valkey"))
    try:
        urls = asyncio.run(migrated_database(pg_admin_url))
        topo = start_topology(tmp_path_factory.mktemp("outage"), urls, valkey.url,
                              node_env={1: {"SWITCHBOARD_BUS_BUFFER": "100"}})
        try:
            yield topo, valkey
        finally:
            topo.stop()
    finally:
        valkey.shutdown()


def stream_messages(n: int, prefix: str) -> list[list[str]]:
    """``n`` calls of speech with short pauses (an utterance, so an event, every ~2 s each), offset in time
    so their finals spread out; the messages of one call built once, the ids replaced per call."""
    pcm = utterances_with_pauses(SENTENCES * 4, pause_ms=500, rate=8000)
    base = telnyx_messages(pcm, call_id="v3:CALL", stream_id="STREAM", encoding="PCMU", sample_rate=8000,
                           token=None)
    out = []
    for i in range(n):
        shift = (i * 7) % 50  # frames: up to a second apart
        msgs = base[:2] + base[2 + shift:] if shift else base
        out.append([m.replace("v3:CALL", f"v3:{prefix}-{i}").replace('"STREAM"', f'"{prefix}-s{i}"') for m in msgs])
    return out


class Counting:
    """The socket ``send_paced`` writes to, counting the media messages that went."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws, self.media = ws, 0

    async def send(self, msg: str) -> None:
        await self.ws.send(msg)
        self.media += '"event":"media"' in msg


def stop_redis(valkey: Any, *, keep_data: bool) -> None:
    """Stop Valkey: with its data saved first (``SHUTDOWN SAVE``: a Redis with persistence), or not (the
    warm tier as configured here: what it held is gone when it comes back)."""
    if not keep_data:
        valkey.server.stop()
        return
    client = redis.Redis.from_url(valkey.url)
    try:
        client.shutdown(save=True)
    except redis.ConnectionError:
        pass  # the server went before it could answer
    finally:
        client.close()


async def run_outage(topo: Topology, valkey: Any, own: Node, other: Node, prefix: str, *,
                     keep_data: bool) -> dict[str, Any]:
    """STREAMS streams into ``own``, viewers of the first WATCHED calls on ``other``, Redis stopped for
    OUTAGE_S in the middle; returns what each side saw and counted."""
    calls = stream_messages(STREAMS, prefix)
    sockets: list[Counting] = []
    started: dict[str, float] = {}  # call id -> when its media began (its events' times are from there)
    closes: list[int | None] = []
    stop_media = asyncio.Event()

    async def one(i: int, msgs: list[str]) -> None:
        async with connect(own.ws, open_timeout=30) as ws:
            out = Counting(ws)
            sockets.append(out)
            started[f"v3:{prefix}-{i}"] = time.monotonic()
            sender = asyncio.create_task(send_paced(out, msgs[:-1]))  # type: ignore[arg-type]
            await stop_media.wait()
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            await ws.send(msgs[-1])  # stop: the server ends the call and closes
            await ws.wait_closed()
            closes.append(ws.close_code)

    baseline = await stats(own)
    async with aiohttp.ClientSession() as http:
        viewers = [Viewer() for _ in range(WATCHED)]
        responses = [await http.get(f"{other.http}/api/calls/v3:{prefix}-{i}/events", headers=AUTH)
                     for i in range(WATCHED)]
        readers = [asyncio.create_task(v.read(r)) for v, r in zip(viewers, responses, strict=True)]
        streams = []
        for i, msgs in enumerate(calls):  # started over a second or two, as calls arrive
            streams.append(asyncio.create_task(one(i, msgs)))
            if i % 20 == 19:
                await asyncio.sleep(0.1)
        async with asyncio.timeout(30):
            while (await stats(own))["streams_active"] < STREAMS:  # noqa: ASYNC110 - polls the node
                await asyncio.sleep(0.2)
        await asyncio.sleep(2.0)
        before = await stats(own)
        await asyncio.to_thread(stop_redis, valkey, keep_data=keep_data)  # connections refused from here
        down_at = time.monotonic()
        during: list[dict[str, Any]] = []
        while time.monotonic() - down_at < OUTAGE_S:
            await asyncio.sleep(1.0)
            during.append(await stats(own))
        await asyncio.to_thread(valkey.restart)
        up_at = time.monotonic()
        await asyncio.sleep(3.0)  # events after the outage too
        stop_media.set()
        await asyncio.wait_for(asyncio.gather(*streams), 30)
        async with asyncio.timeout(CATCH_UP_S):
            for v in viewers:
                await v.ended.wait()
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for r in responses:
            r.close()
        async with http.get(f"{own.http}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}) as r:
            metrics = await r.text()
    kept = [await reference(own, f"v3:{prefix}-{i}") for i in range(WATCHED)]
    # When each watched final was published: its utterance's end on the call's clock, plus the start.
    published = [[started[f"v3:{prefix}-{n}"] + p["end"] / 1000 if name == "transcript.final" else None
                  for _, name, p in k] for n, k in enumerate(kept)]
    return {"viewers": viewers, "kept": kept, "published": published, "closes": closes, "baseline": baseline,
            "before": before, "during": during, "after": await stats(own), "down_at": down_at, "up_at": up_at,
            "sent": sum(s.media for s in sockets), "metrics": metrics}


def bus_dropped(metrics: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for fam in text_string_to_metric_families(metrics) for s in fam.samples
               if s.name == "switchboard_stage_dropped_total" and s.labels.get("stage") == "bus")


async def test_redis_down_for_5_s_under_200_streams_media_flows_and_no_event_is_lost_within_the_buffer(
        outage: tuple[Topology, Any]) -> None:
    topo, valkey = outage
    a, b = topo.nodes
    run = await run_outage(topo, valkey, a, b, "within", keep_data=True)
    # Media flowed: no stream closed before its stop, every frame sent was taken.
    assert run["closes"] == [1000] * STREAMS
    assert all(s["streams_active"] == STREAMS for s in run["during"]), [s["streams_active"] for s in run["during"]]
    assert run["after"]["frames"] - run["baseline"]["frames"] == run["sent"]
    assert run["after"]["streams_total"] - run["baseline"]["streams_total"] == STREAMS
    assert run["during"][-1]["bus"]["errors"] > run["before"]["bus"]["errors"]  # Redis really was away
    # Every watched call's events reached the other node, in order, once, none lost; those published
    # while Redis was down arrived after it came back, within the catch-up bound.
    in_outage = 0
    for kept, viewer, published in zip(run["kept"], run["viewers"], run["published"], strict=True):
        assert viewer.events == kept
        in_order_once(viewer.events)
        for at, arrived in zip(published, viewer.arrived, strict=True):
            if at is not None and run["down_at"] + 0.5 < at < run["up_at"] - 0.5:
                in_outage += 1
                assert run["up_at"] <= arrived < run["up_at"] + CATCH_UP_S
    assert in_outage >= WATCHED  # an utterance every ~2 s per call: the outage had events to keep
    assert bus_dropped(run["metrics"]) == 0 and run["after"]["bus"]["dropped"] == 0


async def test_past_the_buffer_the_loss_is_signalled_to_viewers_and_counted(outage: tuple[Topology, Any]) -> None:
    topo, valkey = outage
    a, b = topo.nodes
    # node-b: a bus buffer of 100 events; and a Redis that comes back empty, so what it held and the relay
    # had not read yet is lost too: said by the relay (cause bus_reset), never silent either.
    run = await run_outage(topo, valkey, b, a, "past", keep_data=False)
    assert run["closes"] == [1000] * STREAMS  # media is never what gives
    dropped = bus_dropped(run["metrics"])
    assert dropped > 0 and run["after"]["bus"]["dropped"] == dropped
    gaps = 0
    causes: set[str] = set()
    for kept, viewer in zip(run["kept"], run["viewers"], strict=True):
        in_order_once(viewer.events)
        seen = {i for i, n, _ in viewer.events if n != "stream.gap"}
        told = set()
        for i, name, payload in viewer.events:
            if name == "stream.gap":
                gaps += 1
                assert i == payload["lost_to"] and payload["cause"] in ("bus_overflow", "bus_reset")
                causes.add(payload["cause"])
                told |= set(range(payload["lost_from"], payload["lost_to"] + 1))
        missing = {i for i, _, _ in kept} - seen
        assert missing <= told, f"lost without a word: {sorted(missing - told)}"  # never silent
        assert {i for i, _, _ in kept} >= seen  # nothing invented
        assert viewer.events[-1][1] == "call.ended"  # the end is kept, whatever was lost
    assert gaps > 0 and "bus_overflow" in causes  # the buffer's loss is among them
    assert run["after"]["bus"]["dropped"] > 0 and run["after"]["bus"]["gaps_lost"] == 0
