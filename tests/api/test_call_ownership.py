"""One call, one owner, on the real server: deadlines, admission, identity and edge validation of the
Telnyx media door, each tried as an attacker would with a healthy victim call streaming real speech
beside it.  Afterwards the victim's finals, frames and close code are counted.

The server runs with the ``null`` recogniser (an empty final per utterance: the finals are still
owed and counted) and short deadlines, so each case takes seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field

import aiohttp
import numpy as np
import orjson
import pytest
import websockets

from api.simulator import telnyx_messages
from tests.servers import Server, get_json, running_server
from tests.speech import utterances_with_pauses
from tests.sse_client import SseStream, read_sse
from tests.telnyx_client import send_paced

TOKEN = "ownership-token"
SENTENCES = ["please confirm your account number", "i would like to make a payment today"]
START_TIMEOUT_S = 1.0
IDLE_TIMEOUT_S = 1.5
PER_ADDRESS = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("ownership"), SWITCHBOARD_STT_PROVIDER="null",
                        SWITCHBOARD_TELNYX_STREAM_TOKEN=TOKEN,
                        SWITCHBOARD_MEDIA_START_TIMEOUT_S=str(START_TIMEOUT_S),
                        SWITCHBOARD_MEDIA_IDLE_TIMEOUT_S=str(IDLE_TIMEOUT_S),
                        SWITCHBOARD_MEDIA_MAX_PENDING_PER_ADDRESS=str(PER_ADDRESS),
                        SWITCHBOARD_MEDIA_MAX_PENDING="40", SWITCHBOARD_MAX_STREAMS="8") as srv:
        yield srv


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return utterances_with_pauses(SENTENCES)


def j(**fields: object) -> str:
    return orjson.dumps(fields).decode()


@dataclass
class CallResult:
    sent_frames: int = 0
    close_code: int | None = None
    close_reason: str = ""
    sse: SseStream | None = None
    events: list[str] = field(default_factory=list)

    @property
    def ended(self) -> dict:  # type: ignore[type-arg]
        assert self.sse is not None
        found = [e.json() for e in self.sse.events if e.event == "call.ended"]
        assert len(found) == 1, [e.event for e in self.sse.events]
        return found[0]

    @property
    def finals(self) -> int:
        assert self.sse is not None
        return sum(e.event == "transcript.final" for e in self.sse.events)


async def stream_call(server: Server, call_id: str, pcm: np.ndarray, *, stop: bool = True,
                      local: str = "127.0.0.1", messages: list[str] | None = None,
                      last_event_id: str | None = None) -> CallResult:
    """Stream ``pcm`` as Telnyx does, in real time, and read the call's SSE stream meanwhile."""
    msgs = messages or telnyx_messages(pcm, call_id=call_id, stream_id=f"s-{call_id}", encoding="PCMU",
                                       sample_rate=8000, token=TOKEN)
    if not stop:
        msgs = msgs[:-1]
    out = CallResult()
    async with aiohttp.ClientSession() as http:
        reader = asyncio.create_task(read_sse(http, f"{server.http}/api/calls/{call_id}/events",
                                              last_event_id=last_event_id))
        await asyncio.sleep(0.2)  # subscribed before the call starts
        async with websockets.connect(server.ws, local_addr=(local, 0)) as ws:
            try:
                out.sent_frames = await send_paced(ws, msgs)
                while True:
                    await asyncio.wait_for(ws.recv(), 15)
            except websockets.ConnectionClosed:
                pass
            out.close_code, out.close_reason = ws.close_code, ws.close_reason
        out.sse = await asyncio.wait_for(reader, 20)
    return out


def assert_victim_whole(victim: CallResult) -> None:
    ended = victim.ended
    assert victim.close_code == 1000, (victim.close_code, victim.close_reason)
    assert ended["reason"] == "stop" and ended["status"] == "completed", ended
    assert ended["stats"]["frames"] == victim.sent_frames
    assert ended["stats"]["lost_frames"] == 0 and ended["stats"]["late_frames"] == 0
    assert victim.finals == len(SENTENCES) == ended["stats"]["finals"]


async def closed_with(ws: websockets.ClientConnection, wait_s: float = 10) -> tuple[int | None, str, float]:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        while True:
            await asyncio.wait_for(ws.recv(), wait_s)
    except websockets.ConnectionClosed:
        pass
    return ws.close_code, ws.close_reason, loop.time() - t0


async def test_a_socket_that_never_starts_is_closed_1008_after_the_start_timeout(server: Server,
                                                                                   speech: np.ndarray) -> None:
    async def idle() -> tuple[int | None, str, float]:
        ws = await websockets.connect(server.ws, local_addr=("127.0.0.9", 0))
        return await closed_with(ws)

    victim, (code, reason, waited) = await asyncio.gather(stream_call(server, "v3:victim-start", speech), idle())
    assert code == 1008 and "no start" in reason
    assert START_TIMEOUT_S <= waited < START_TIMEOUT_S + 2
    assert_victim_whole(victim)


async def test_idle_unauthenticated_sockets_cannot_shut_out_an_authenticated_call(server: Server,
                                                                                   speech: np.ndarray) -> None:
    # More idle upgrades than there are stream slots (8), from several addresses, none sending a byte.
    idle = []
    for n in range(3):
        for _ in range(PER_ADDRESS):
            idle.append(await websockets.connect(server.ws, local_addr=(f"127.0.1.{n + 1}", 0)))
    # One address past its cap is refused at the upgrade, before anything is allocated.
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(server.ws, local_addr=("127.0.1.1", 0))
    assert refused.value.response.status_code == 503
    stats = get_json(f"{server.http}/api/stats")
    assert stats["streams_pending"] >= 3 * PER_ADDRESS
    victim = await stream_call(server, "v3:victim-admission", speech)
    assert_victim_whole(victim)
    for ws in idle:  # all closed by the start deadline meanwhile
        code, _, _ = await closed_with(ws, wait_s=5)
        assert code == 1008
    assert get_json(f"{server.http}/api/stats")["streams_pending"] == 0


async def test_stream_slots_are_counted_at_start_and_the_ninth_call_waits(server: Server) -> None:
    silence = np.zeros(8000 * 2, dtype=np.int16)
    live = []
    for n in range(8):
        ws = await websockets.connect(server.ws)
        msgs = telnyx_messages(silence, call_id=f"v3:slot-{n}", stream_id=f"slot-{n}", encoding="PCMU",
                               sample_rate=8000, token=TOKEN)
        for m in msgs[:4]:
            await ws.send(m)
        live.append((ws, msgs))
    await asyncio.sleep(0.3)
    extra = await websockets.connect(server.ws)
    msgs = telnyx_messages(silence, call_id="v3:slot-9", stream_id="slot-9", encoding="PCMU", sample_rate=8000,
                           token=TOKEN)
    for m in msgs[:3]:
        await extra.send(m)
    code, reason, _ = await closed_with(extra)
    assert code == 1013 and "too many media streams" in reason
    for ws, msgs in live:
        await ws.send(msgs[-1])  # stop
        code, _, _ = await closed_with(ws)
        assert code == 1000


async def test_a_second_socket_with_a_live_call_id_is_refused_and_the_live_call_is_untouched(
        server: Server, speech: np.ndarray) -> None:
    call_id = "v3:victim-hijack"

    async def intruder() -> tuple[int | None, str]:
        await asyncio.sleep(1.5)  # the victim is streaming by now
        ws = await websockets.connect(server.ws)
        msgs = telnyx_messages(np.zeros(1600, dtype=np.int16), call_id=call_id, stream_id="intruder",
                               encoding="PCMU", sample_rate=8000, token=TOKEN)
        for m in msgs:
            try:
                await ws.send(m)
            except websockets.ConnectionClosed:
                break
        code, reason, _ = await closed_with(ws)
        return code, reason

    victim, (code, reason) = await asyncio.gather(stream_call(server, call_id, speech), intruder())
    assert code == 1008 and reason == "call already streaming"
    assert_victim_whole(victim)
    assert victim.ended["stream_id"] == f"s-{call_id}"
    started = [e.json() for e in victim.sse.events if e.event == "call.started"]  # type: ignore[union-attr]
    assert [s["stream_id"] for s in started] == [f"s-{call_id}"]


async def test_a_new_stream_after_the_old_one_ended_continues_the_same_call(server: Server) -> None:
    pcm = np.zeros(8000, dtype=np.int16)
    first = await stream_call(server, "v3:reconnect", pcm)
    assert first.sse is not None and first.ended["reason"] == "stop"
    async with websockets.connect(server.ws) as ws:
        for m in telnyx_messages(pcm, call_id="v3:reconnect", stream_id="s-second", encoding="PCMU",
                                 sample_rate=8000, token=TOKEN):
            await ws.send(m)
        code, _, _ = await closed_with(ws)
    assert code == 1000
    async with aiohttp.ClientSession() as http:  # the same call's channel goes on after the first stream's end
        rest = await read_sse(http, f"{server.http}/api/calls/v3:reconnect/events",
                              last_event_id=first.sse.events[-1].id)
    assert [(e.event, e.json()["stream_id"]) for e in rest.events] == [("call.started", "s-second"),
                                                                        ("call.ended", "s-second")]


async def test_a_stream_that_goes_silent_ends_with_idle_timeout_and_its_open_utterance_is_finalised(
        server: Server, speech: np.ndarray) -> None:
    # Speech cut mid-sentence, then nothing at all while the socket stays open.
    cut = speech[: int(8000 * 2.0)]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    silent = await stream_call(server, "v3:silent", cut, stop=False)
    waited = loop.time() - t0
    ended = silent.ended
    assert silent.close_code == 1008 and silent.close_reason == "idle timeout"
    assert ended["reason"] == "idle_timeout" and ended["status"] == "failed"
    assert silent.finals == 1 == ended["stats"]["utterances"]  # the open utterance was finalised
    assert waited < 2.0 + IDLE_TIMEOUT_S + 3
    assert get_json(f"{server.http}/api/stats")["streams_idle_timeouts"] >= 1


def _start(**start: object) -> dict[str, object]:
    base: dict[str, object] = {"call_control_id": "v3:edge", "call_session_id": "sess",
                               "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}}
    base.update(start)
    return base


HUGE = "x" * 60_000
BAD_FIELDS: dict[str, list[str]] = {
    "call id with NUL": [j(event="start", sequence_number="1", stream_id="s1",
                           start=_start(call_control_id="v3:a\0b"))],
    "call id with newline": [j(event="start", sequence_number="1", stream_id="s1",
                               start=_start(call_control_id="v3:a\nb"))],
    "call id with traversal": [j(event="start", sequence_number="1", stream_id="s1",
                                 start=_start(call_control_id="../../etc/passwd"))],
    "call id with bidi control": [j(event="start", sequence_number="1", stream_id="s1",
                                    start=_start(call_control_id="v3:\u202eabc"))],
    "call id of 60 KB": [j(event="start", sequence_number="1", stream_id="s1", start=_start(call_control_id=HUGE))],
    "call id that is an object": [j(event="start", sequence_number="1", stream_id="s1",
                                    start=_start(call_control_id={"a": 1}))],
    "stream id with emoji": [j(event="start", sequence_number="1", stream_id="s\U0001f600", start=_start())],
    "from of 30 KB": [j(event="start", sequence_number="1", stream_id="s1", start=_start(**{"from": "1" * 30_000}))],
    "sequence number 10^30": [j(event="start", sequence_number=str(10**30), stream_id="s1", start=_start())],
    "sequence number float": [j(event="start", sequence_number=1.5, stream_id="s1", start=_start())],
    "sequence number negative": [j(event="start", sequence_number="-1", stream_id="s1", start=_start())],
    "sample rate as words": [j(event="start", sequence_number="1", stream_id="s1",
                               start=_start(media_format={"encoding": "PCMU", "sample_rate": "eight", "channels": 1}))],
    "media sequence 10^30": ["START", j(event="media", sequence_number=str(10**30), stream_id="s1",
                                         media={"track": "inbound", "payload": "/" * 216})],
    "media chunk of hundreds of digits": ["START", j(event="media", sequence_number="2", stream_id="s1",
                                                     media={"track": "inbound", "chunk": "9" * 300,
                                                            "payload": "/" * 216})],
    "dtmf digit of 60 KB": ["START", j(event="dtmf", sequence_number="2", stream_id="s1", dtmf={"digit": HUGE})],
    "dtmf digit not a key": ["START", j(event="dtmf", sequence_number="2", stream_id="s1", dtmf={"digit": "Z"})],
    "stop reason with control characters": ["START", j(event="stop", sequence_number="2", stream_id="s1",
                                                       stop={"reason": "bye\x1b[31m"})],
}


async def test_every_identifier_and_number_is_validated_at_the_edge(server: Server, speech: np.ndarray) -> None:
    start = j(event="start", sequence_number="1", stream_id="s1", start=_start(call_control_id="v3:edge-ok"))

    async def attack() -> dict[str, tuple[int | None, str]]:
        results = {}
        for name, msgs in BAD_FIELDS.items():
            ws = await websockets.connect(server.ws, additional_headers={"x-telnyx-streaming-auth-token": TOKEN},
                                          max_size=None)
            for m in msgs:
                try:
                    await ws.send(start if m == "START" else m)
                except websockets.ConnectionClosed:
                    break
            code, reason, _ = await closed_with(ws)
            results[name] = (code, reason)
            if "START" in msgs:  # the call that did start ended by the error, not left streaming
                await asyncio.sleep(0.05)
        return results

    victim, results = await asyncio.gather(stream_call(server, "v3:victim-edge", speech), attack())
    assert {n: c for n, (c, _) in results.items()} == dict.fromkeys(BAD_FIELDS, 1007), results
    assert_victim_whole(victim)
    await asyncio.sleep(0.2)
    text = server.log_path.read_text()
    assert HUGE[:1000] not in text and "\\u0000" not in text and "etc/passwd" not in text
    assert "1" * 30_000 not in text and str(10**30) not in text
    assert all(len(line) < 4000 for line in text.splitlines())


async def test_a_dtmf_flood_is_rate_limited_and_counted_while_the_victim_streams(server: Server,
                                                                                  speech: np.ndarray) -> None:
    async def flood() -> tuple[int, float]:
        ws = await websockets.connect(server.ws, additional_headers={"x-telnyx-streaming-auth-token": TOKEN})
        await ws.send(j(event="start", sequence_number="1", stream_id="s-dtmf",
                        start=_start(call_control_id="v3:dtmf-flood")))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        n = 3000
        for seq in range(2, n + 2):
            await ws.send(j(event="dtmf", sequence_number=str(seq), stream_id="s-dtmf", dtmf={"digit": "5"}))
        await ws.send(j(event="stop", sequence_number=str(n + 2), stream_id="s-dtmf"))
        await closed_with(ws)
        return n, loop.time() - t0

    victim, (sent, elapsed) = await asyncio.gather(stream_call(server, "v3:victim-dtmf", speech), flood())
    assert_victim_whole(victim)
    async with aiohttp.ClientSession() as http:
        replay = await read_sse(http, f"{server.http}/api/calls/v3:dtmf-flood/events", last_event_id="0")
    published = sum(e.event == "call.dtmf" for e in replay.events)
    ended = [e.json() for e in replay.events if e.event == "call.ended"][0]
    assert published <= 20 + 10 * elapsed + 1, (published, elapsed)
    assert ended["stats"]["dtmf"] == published and ended["stats"]["dtmf_dropped"] == sent - published
