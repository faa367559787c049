"""Agent WebRTC sessions on the real server, with aiortc as the agent's browser.

The server runs as a subprocess as `make run` starts it; the "browser" is an aiortc peer connection
in this process whose microphone is a paced 48 kHz track (espeak-ng speech or a tone), and the
consumer's side is a WebSocket speaking the Telnyx protocol that also reads what the server sends
back.  Both ends keep ICE on 127.0.0.1 (``restrict_host_candidates``, no ICE servers).  The last tests
run the app in-process to count asyncio tasks and look at aiortc's transports after each session.
"""

from __future__ import annotations

import asyncio
import base64
import fractions
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import av
import numpy as np
import orjson
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from api.app import make_app, open_runtime
from api.settings import Settings
from api.webrtc import restrict_host_candidates
from engine.codecs import get_codec
from tests.servers import API_KEY, Server, free_port, get_json, running_server
from tests.speech import utterances_with_pauses, word_error_rate
from tests.sse_client import SseEvent, read_sse
from tests.telnyx_client import connect as connect_media

TOKEN = API_KEY  # the bootstrap admin: the agent of every session here
BURST = "1000"  # offers of one principal (the only one here) in a burst: this module is not about the rate
SENTENCES = ["please confirm your account number", "i would like to make a payment today"]
# Stated bound, as tests/test_end_to_end.py's: pocketsphinx on espeak speech with a domain LM.  This
# path (48 kHz -> Opus -> 16 kHz) is cleaner than G.711; the bound is the end-to-end test's.
MAX_WER = 0.45
MAX_ONE_WAY_MS = 500  # generous: measured figures are printed and go to the README
ULAW = get_codec("PCMU", 8000)

restrict_host_candidates(["127.0.0.1"])  # the test's own peer connections: loopback only, like the server's


def tone(rate: int, ms: int, hz: float = 1000.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(rate * ms // 1000) / rate
    return np.rint(amp * 32767 * np.sin(2 * np.pi * hz * t)).astype("<i2")


def onset(x: np.ndarray, threshold: int = 3000) -> int | None:
    """Index of the first sample louder than ``threshold`` (the tone is ~9800 peak, silence ~0)."""
    idx = np.flatnonzero(np.abs(x.astype(np.int32)) > threshold)
    return int(idx[0]) if len(idx) else None


class Mic(MediaStreamTrack):
    """The agent's microphone: 48 kHz mono, 20 ms frames paced in real time; silence between sayings."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pending = np.zeros(0, dtype="<i2")
        self._n = -1
        self._start = 0.0
        self.said_at: float | None = None  # when the first frame of the last say() left
        self._mark = False

    def say(self, pcm: np.ndarray) -> None:
        self._pending = pcm.astype("<i2")
        self._mark, self.said_at = True, None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        self._n += 1
        if self._n == 0:
            self._start = time.monotonic()
        else:
            await asyncio.sleep(self._start + self._n * 0.02 - time.monotonic())
        chunk, self._pending = self._pending[:960], self._pending[960:]
        if self._mark and len(chunk):
            self._mark, self.said_at = False, time.monotonic()
        chunk = np.concatenate([chunk, np.zeros(960 - len(chunk), dtype="<i2")])
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 48000, self._n * 960, fractions.Fraction(1, 48000)
        return frame


class Agent:
    """The agent's browser: an aiortc peer connection with ``Mic``, recording when the tone is heard."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = Mic()
        self.pc.addTrack(self.mic)
        self.heard_at: float | None = None  # when a received frame first carried the tone (onset-corrected)
        self.frames = 0
        self._reader: asyncio.Task[None] | None = None
        self.pc.on("track", self._on_track)
        self.session_id = ""

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read(track))

    async def _read(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                now = time.monotonic()
                self.frames += 1
                x = frame.to_ndarray().reshape(-1)[:: len(frame.layout.channels)]  # type: ignore[union-attr]
                i = onset(x)
                if i is not None and self.heard_at is None:
                    self.heard_at = now - (len(x) - i) / frame.sample_rate  # type: ignore[union-attr]
        except MediaStreamError:
            pass

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def join(self, http: aiohttp.ClientSession, server: Server, call_id: str, agent_id: str,
                   **extra: Any) -> tuple[int, dict[str, Any]]:
        body = {"call_id": call_id, "agent_id": agent_id, "sdp": await self.offer(), "type": "offer", **extra}
        status, reply = await post_offer(http, server, body)
        if status == 200:
            self.session_id = reply["session_id"]
            await self.pc.setRemoteDescription(RTCSessionDescription(reply["sdp"], "answer"))
        return status, reply

    async def connected(self, within_s: float = 10.0) -> None:
        await wait_for(lambda: self.pc.connectionState == "connected", within_s, "the agent to connect")

    async def close(self) -> None:
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


async def post_offer(http: aiohttp.ClientSession, server: Server | str, body: dict[str, Any] | bytes,
                     token: str = TOKEN) -> tuple[int, dict[str, Any]]:
    base = server.http if isinstance(server, Server) else server
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with http.post(f"{base}/api/webrtc/offer", data=data,
                         headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}) as r:
        return r.status, unwrap(await r.json())


def unwrap(reply: dict[str, Any]) -> dict[str, Any]:
    """The envelope's data, or ``{"error": message}`` (413 and 415 from api.middleware have that shape already)."""
    if reply.get("success") is True:
        return reply["data"]  # type: ignore[no-any-return]
    if isinstance(reply.get("error"), dict):
        return {"error": reply["error"]["message"]}
    return reply


async def delete_session(http: aiohttp.ClientSession, base: str, session_id: str, token: str = TOKEN) -> int:
    async with http.delete(f"{base}/api/webrtc/sessions/{session_id}",
                           headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status


class TelnyxCall:
    """The consumer's side: Telnyx's WebSocket, 20 ms mu-law frames paced in real time (silence unless
    ``play`` queued audio), and everything the server sends back: media (decoded) and clear."""

    def __init__(self, server: Server, call_id: str) -> None:
        self.server, self.call_id = server, call_id
        self._pending = np.zeros(0, dtype="<i2")
        self.played_at: float | None = None
        self.heard_at: float | None = None  # onset of the tone in the server's media messages
        self.clears: list[int] = []  # message numbers of the clears the server sent
        self.heard_in: int | None = None  # message number of the first media that carried the tone
        self.messages = 0
        self.media_back = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> TelnyxCall:
        self.ws = await connect_media(self.server.ws)
        await self.ws.send(orjson.dumps({"event": "connected", "version": "1.0.0"}).decode())
        await self.ws.send(orjson.dumps({"event": "start", "sequence_number": "1", "stream_id": "s-" + self.call_id,
                                         "start": {"call_control_id": self.call_id, "call_session_id": "sess",
                                                   "media_format": {"encoding": "PCMU", "sample_rate": 8000,
                                                                    "channels": 1}}}).decode())
        self._tasks = [asyncio.create_task(self._send()), asyncio.create_task(self._receive())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._tasks[0].cancel()
        await asyncio.gather(self._tasks[0], return_exceptions=True)
        await self.ws.send(orjson.dumps({"event": "stop", "sequence_number": "100000", "stream_id": "s-" + self.call_id,
                                         "stop": {"call_control_id": self.call_id}}).decode())
        await asyncio.wait_for(self._tasks[1], 10)
        assert self.ws.close_code == 1000

    def play(self, pcm: np.ndarray) -> None:
        self._pending, self.played_at = pcm.astype("<i2"), None

    async def _send(self) -> None:
        seq, t0 = 2, time.monotonic()
        while True:
            chunk, self._pending = self._pending[:160], self._pending[160:]
            if len(chunk) and self.played_at is None:
                self.played_at = time.monotonic()
            chunk = np.concatenate([chunk, np.zeros(160 - len(chunk), dtype="<i2")])
            await self.ws.send(orjson.dumps({
                "event": "media", "sequence_number": str(seq), "stream_id": "s-" + self.call_id,
                "media": {"track": "inbound", "chunk": str(seq), "timestamp": str((seq - 2) * 20),
                          "payload": base64.b64encode(ULAW.encode(chunk.tobytes())).decode()}}).decode())
            seq += 1
            await asyncio.sleep(max(0.0, t0 + (seq - 2) * 0.02 - time.monotonic()))

    async def _receive(self) -> None:
        async for raw in self.ws:
            now = time.monotonic()
            msg = orjson.loads(raw)
            self.messages += 1
            if msg["event"] == "clear":
                self.clears.append(self.messages)
            elif msg["event"] == "media":
                self.media_back += 1
                x = np.frombuffer(ULAW.decode(base64.b64decode(msg["media"]["payload"])), dtype="<i2")
                i = onset(x)
                if i is not None and self.heard_at is None:
                    # Audio sent back arrives as fast as the agent speaks: time the onset sample, not the message.
                    self.heard_at = now - (len(x) - i) / 8000
                    self.heard_in = self.messages


async def wait_for(cond: Any, within_s: float, what: str) -> None:
    """Poll ``cond`` every 20 ms (its state lives in other tasks and processes); fail after ``within_s``."""
    for _ in range(int(within_s / 0.02) + 1):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Events:
    """A call's SSE events, read in the background."""

    def __init__(self, http: aiohttp.ClientSession, base: str, call_id: str, until: str = "agent.left") -> None:
        self.events: list[SseEvent] = []
        self.http, self.url = http, f"{base}/api/calls/{call_id}/events"
        self.task = asyncio.create_task(read_sse(http, self.url, until=until, on_event=self.events.append))

    async def resume_until(self, name: str, within_s: float = 10.0) -> dict[str, Any]:
        """After ``call.ended`` closed the stream: reconnect with Last-Event-ID, as EventSource does."""
        for _ in range(int(within_s / 0.1)):
            if self.named(name):
                return self.named(name)[-1]
            await read_sse(self.http, self.url, last_event_id=self.events[-1].id, until=name,
                           on_event=self.events.append)
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {name}")

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e.json() for e in self.events if e.event == name]

    async def wait(self, name: str, within_s: float = 10.0) -> dict[str, Any]:
        await wait_for(lambda: self.named(name), within_s, name)
        return self.named(name)[-1]

    async def aclose(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("webrtc"), SWITCHBOARD_STT_PROVIDER="null",
                        SWITCHBOARD_WEBRTC_OFFER_BURST=BURST, SWITCHBOARD_SSE_HEARTBEAT_S="1") as srv:
        yield srv


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def sessions_live(server: Server) -> int:
    return int(get_json(f"{server.http}/api/stats")["webrtc"]["sessions_live"])


# -- (1) the agent's speech is transcribed -------------------------------------------------------


async def test_agent_speech_over_webrtc_is_transcribed_on_the_agent_track(
    tmp_path_factory: pytest.TempPathFactory, http: aiohttp.ClientSession
) -> None:
    tmp = tmp_path_factory.mktemp("webrtc-stt")
    phrases = tmp / "phrases.txt"
    phrases.write_text("\n".join(SENTENCES) + "\n")
    with running_server(tmp, SWITCHBOARD_STT_PROVIDER="pocketsphinx", SWITCHBOARD_STT_PHRASES_FILE=str(phrases),
                        SWITCHBOARD_WEBRTC_OFFER_BURST=BURST) as srv:
        call_id = "v3:agent-speech"
        events = Events(http, srv.http, call_id)
        agent = Agent()
        status, reply = await agent.join(http, srv, call_id, "agent-speaker")
        assert status == 200 and reply["type"] == "answer", reply
        await agent.connected()
        speech = utterances_with_pauses(SENTENCES, pause_ms=900, rate=48000)
        agent.mic.say(speech)
        await wait_for(lambda: len(events.named("transcript.final")) >= len(SENTENCES), len(speech) / 48000 + 20,
                       "the agent's final transcripts")
        assert await delete_session(http, srv.http, agent.session_id) == 204
        left = await events.wait("agent.left")
        await agent.close()
        await events.aclose()
    finals = events.named("transcript.final")
    joined = events.named("agent.joined")[0]
    assert joined["agent_id"] == "bootstrap" and joined["bridged"] is False  # no Telnyx stream on this call
    assert all(f["track"] == "agent" and f["stream_id"] == agent.session_id for f in finals)
    assert events.named("transcript.partial"), "no interim results"
    hypothesis = " ".join(f["text"] for f in finals)
    wer = word_error_rate(" ".join(SENTENCES), hypothesis)
    print(f"\nagent WER {wer:.2f}: {hypothesis!r}", left["stats"])
    assert wer <= MAX_WER
    assert left["reason"] == "ended by the agent (DELETE)" and left["stats"]["finals"] == len(finals)


# -- (2) the bridge, both ways -------------------------------------------------------------------


async def test_bridge_carries_audio_both_ways_with_bounded_latency_and_clears_on_barge_in(
    server: Server, http: aiohttp.ClientSession
) -> None:
    call_id = "v3:bridge"
    events = Events(http, server.http, call_id)
    agent = Agent()
    status, reply = await agent.join(http, server, call_id, "agent-bridge")  # before the call's stream
    assert status == 200, reply
    await agent.connected()
    async with TelnyxCall(server, call_id) as call:
        await wait_for(lambda: call.media_back > 10, 5, "the agent's (silent) audio on the Telnyx socket")
        await asyncio.sleep(0.5)  # past the bridge's start-up: the figures are steady-state latency
        call.play(tone(8000, 300))
        await wait_for(lambda: agent.heard_at is not None and call.played_at is not None, 5,
                       "the consumer's tone at the agent")
        to_agent_ms = (agent.heard_at - call.played_at) * 1000  # type: ignore[operator]
        await asyncio.sleep(0.6)
        assert not call.clears  # the agent has been silent so far
        agent.mic.say(tone(48000, 300))
        await wait_for(lambda: call.heard_at is not None and agent.mic.said_at is not None, 5,
                       "the agent's tone on the Telnyx socket")
        to_consumer_ms = (call.heard_at - agent.mic.said_at) * 1000  # type: ignore[operator]
        assert len(call.clears) == 1 and call.clears[0] < call.heard_in  # type: ignore[operator]  # clear first
        stats = get_json(f"{server.http}/api/stats")["webrtc"]
    await events.task  # the call ended (stop): the agent stays, unbridged, and can still speak
    assert events.events[-1].event == "call.ended" and sessions_live(server) == 1
    print(f"\none-way added latency: consumer -> agent {to_agent_ms:.0f} ms, agent -> consumer {to_consumer_ms:.0f} ms")
    assert 0 < to_agent_ms < MAX_ONE_WAY_MS and 0 < to_consumer_ms < MAX_ONE_WAY_MS
    assert stats["to_consumer_sent"] > 50 and stats["to_agent_frames"] >= 15 and stats["clears"] >= 1
    await agent.close()
    left = await events.resume_until("agent.left")
    assert events.named("agent.joined")[0]["bridged"] is False
    assert left["reason"] == "peer closed the connection"
    assert sessions_live(server) == 0


# -- (3) bad input, duplicates, ending -----------------------------------------------------------


async def test_bad_sdp_is_400_with_its_reason_and_leaves_nothing_running(
    server: Server, http: aiohttp.ClientSession
) -> None:
    agent = Agent()
    sdp = await agent.offer()
    base = {"call_id": "v3:bad", "agent_id": "agent-bad", "type": "offer"}
    status, reply = await post_offer(http, server, {**base, "sdp": sdp.replace("opus/48000/2", "speex/48000")})
    assert status == 400 and reply == {"error": "sdp audio does not offer Opus (a=rtpmap:<pt> opus/48000/2)"}
    status, reply = await post_offer(http, server, {**base, "sdp": "v=0\r\nm=audio 9 RTP/AVP 111\r\n"
                                                   "a=rtpmap:111 opus/48000/2\r\n"})
    assert status == 400 and reply["error"].startswith("sdp"), reply  # passes our checks, refused by aiortc
    status, reply = await post_offer(http, server, {**base, "sdp": sdp.replace("m=audio ", "m=audio x", 1)})
    assert status == 400 and reply["error"] == "sdp could not be parsed: a line does not follow the SDP grammar", reply
    no_ice = re.sub(r"a=ice-(ufrag|pwd):.*\r\n", "", sdp)
    status, reply = await post_offer(http, server, {**base, "sdp": no_ice})
    assert status == 400 and reply["error"].startswith("sdp refused:"), reply
    status, reply = await post_offer(http, server, b'{"call_id": "v3:bad"')
    assert status == 400 and reply["error"].startswith("body is not valid JSON")
    status, reply = await post_offer(http, server, {**base, "sdp": "v=0\r\n" + ("a=" + "x" * 70 + "\r\n") * 920})
    assert status == 400 and reply["error"].startswith("sdp is too large")  # 66 KB: over the SDP limit only
    status, reply = await post_offer(http, server, {**base, "sdp": "v=0\r\n" + "a=x\r\n" * 20000})
    assert status == 413 and reply["error"].startswith("body too large")  # over the body limit: never read
    await agent.close()
    assert sessions_live(server) == 0


async def test_bad_token_is_401(server: Server, http: aiohttp.ClientSession) -> None:
    agent = Agent()
    body = {"call_id": "v3:tok", "agent_id": "agent-tok", "sdp": await agent.offer(), "type": "offer"}
    assert (await post_offer(http, server, body, token="wrong"))[0] == 401
    async with http.post(f"{server.http}/api/webrtc/offer", json=body) as r:
        assert r.status == 401
    assert await delete_session(http, server.http, "whatever", token="wrong") == 401
    await agent.close()


async def test_second_session_of_an_agent_is_409_the_first_goes_on_and_delete_ends_it(
    server: Server, http: aiohttp.ClientSession
) -> None:
    call_id = "v3:dup"
    events = Events(http, server.http, call_id)
    first, second = Agent(), Agent()
    async with TelnyxCall(server, call_id) as call:
        await asyncio.sleep(0.1)
        assert (await first.join(http, server, call_id, "agent-dup"))[0] == 200
        await first.connected()
        status, reply = await second.join(http, server, call_id, "agent-dup")
        assert status == 409 and "already have a live session" in reply["error"], reply
        frames = first.frames
        back = call.media_back
        await asyncio.sleep(0.5)
        assert first.pc.connectionState == "connected" and first.frames > frames + 10 and call.media_back > back + 10
        assert await delete_session(http, server.http, first.session_id) == 204
        assert await delete_session(http, server.http, first.session_id) == 404
    left = await events.wait("agent.left")
    await events.aclose()
    assert events.named("agent.joined")[0]["bridged"] is True  # the call's stream was live: bridged at once
    assert left["reason"] == "ended by the agent (DELETE)" and left["session_id"] == first.session_id
    await first.close()
    await second.close()
    assert sessions_live(server) == 0


async def test_a_peer_that_closes_is_noticed_and_the_session_cleaned_up(
    server: Server, http: aiohttp.ClientSession
) -> None:
    events = Events(http, server.http, "v3:hangup")
    agent = Agent()
    assert (await agent.join(http, server, "v3:hangup", "agent-hangup"))[0] == 200
    await agent.connected()
    assert sessions_live(server) == 1
    await agent.close()
    left = await events.wait("agent.left")
    await events.aclose()
    assert left["reason"] == "peer closed the connection"
    await wait_for(lambda: sessions_live(server) == 0, 5, "sessions_live to return to 0")


async def test_an_ice_failure_ends_the_session_with_the_reason(server: Server, http: aiohttp.ClientSession) -> None:
    """The offer's only candidate is on IPv6 loopback; the server gathers on 127.0.0.1 only, so no
    candidate pair can form and aioice fails ICE as soon as it starts checking."""
    events = Events(http, server.http, "v3:ice")
    agent = Agent()
    sdp = re.sub(r"127\.0\.0\.1 \d+ typ host", "::1 9 typ host", await agent.offer())
    status, reply = await post_offer(http, server, {"call_id": "v3:ice", "agent_id": "agent-ice", "sdp": sdp,
                                                    "type": "offer"})
    assert status == 200, reply
    left = await events.wait("agent.left")
    await events.aclose()
    await agent.close()
    assert left["reason"] == "ICE failed: no candidate pair reached the peer"
    assert sessions_live(server) == 0


# -- (4) in-process: tasks and transports after every session ------------------------------------


async def _settled(baseline: int, within_s: float = 5.0) -> int:
    """The task count once it is back to ``baseline`` (closing is asynchronous), or after ``within_s``."""
    for _ in range(int(within_s / 0.05)):
        if len(asyncio.all_tasks()) <= baseline:
            break
        await asyncio.sleep(0.05)
    return len(asyncio.all_tasks())


async def test_five_sessions_opened_and_closed_leave_no_task_or_transport_running(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    rt = await open_runtime(Settings(persist=False, translation_provider="none", stt_provider="null",
                                     bootstrap_api_key=API_KEY))
    client = await aiohttp_client(make_app(rt))
    base = str(client.make_url(""))
    registry = rt.agents
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as r:  # the keep-alive connection's handler is part of the baseline
            assert r.status == 200
        baseline = len(asyncio.all_tasks())
        for i in range(5):
            agent = Agent()
            status, reply = await post_offer(http, base, {"call_id": "v3:five", "agent_id": f"a{i}",
                                                          "sdp": await agent.offer(), "type": "offer"})
            assert status == 200, reply
            await agent.pc.setRemoteDescription(RTCSessionDescription(reply["sdp"], "answer"))
            await agent.connected()
            session = registry.by_id[reply["session_id"]]
            agent.mic.say(tone(48000, 200))
            await asyncio.sleep(0.3)
            assert session.bridge.stats.agent_frames > 5
            if i % 2:
                assert await delete_session(http, base, session.id) == 204
                await agent.close()
            else:
                await agent.close()  # the server notices the peer went away
                await wait_for(lambda s=session: s._closed.is_set(), 5, "the session to close")
            assert session.pc.connectionState == "closed" and session.bridge.player.readyState == "ended"
            for t in session.pc.getTransceivers():
                assert t.receiver.transport.state == "closed" and t.receiver.transport.transport.state == "closed"
            assert await _settled(baseline) == baseline, [t.get_name() for t in asyncio.all_tasks()]
        assert len(registry) == 0 and registry.total == 5


async def test_ice_to_a_closed_port_times_out_with_the_reason_and_cleans_up(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    """Candidates on a loopback port nobody listens on: checks go unanswered (Linux does not report
    ICMP errors to unconnected UDP sockets, so aioice would retry for a minute); the session's
    connect deadline ends it."""
    rt = await open_runtime(Settings(persist=False, translation_provider="none", stt_provider="null",
                                     bootstrap_api_key=API_KEY, webrtc_connect_timeout_s=1.0))
    client = await aiohttp_client(make_app(rt))
    base = str(client.make_url(""))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 200
        baseline = len(asyncio.all_tasks())
        events = Events(http, base, "v3:closed-port")
        agent = Agent()
        sdp = re.sub(r"127\.0\.0\.1 \d+ typ host", f"127.0.0.1 {free_port()} typ host", await agent.offer())
        await agent.close()  # nobody answers checks: the "browser" is gone
        status, reply = await post_offer(http, base, {"call_id": "v3:closed-port", "agent_id": "a-closed",
                                                      "sdp": sdp, "type": "offer"})
        assert status == 200, reply
        left = await events.wait("agent.left", 5)
        await events.aclose()
        assert left["reason"] == "ICE did not connect within 1 s"
        assert await _settled(baseline) == baseline, [t.get_name() for t in asyncio.all_tasks()]


async def test_an_agent_whose_browser_died_takes_its_session_over_with_replace(
    server: Server, http: aiohttp.ClientSession
) -> None:
    """A crashed or reloaded browser leaves a session ICE would keep for ~30 s; "replace" ends it now."""
    call_id = "v3:takeover"
    events = Events(http, server.http, call_id)
    crashed, fresh = Agent(), Agent()
    assert (await crashed.join(http, server, call_id, "agent-take"))[0] == 200
    await crashed.connected()
    status, reply = await fresh.join(http, server, call_id, "agent-take")
    assert status == 409 and '"replace": true' in reply["error"]
    fresh2 = Agent()
    assert (await fresh2.join(http, server, call_id, "agent-take", replace=True))[0] == 200
    await fresh2.connected()
    left = await events.wait("agent.left")
    assert left["reason"] == "replaced by a new session of the same agent" and left["session_id"] == crashed.session_id
    assert sessions_live(server) == 1
    status, reply = await post_offer(http, server, {"call_id": call_id, "agent_id": "x", "type": "offer",
                                                    "sdp": await fresh.offer(), "replace": "yes"})
    assert (status, reply["error"]) == (400, "replace must be true or false")
    assert await delete_session(http, server.http, fresh2.session_id) == 204
    await events.aclose()
    for a in (crashed, fresh, fresh2):
        await a.close()
    await wait_for(lambda: sessions_live(server) == 0, 5, "sessions_live to return to 0")
