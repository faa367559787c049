"""Concurrent callers on the real server with the local recogniser: every utterance gets its final.

The server runs as `make run` starts it, with pocketsphinx, a call-centre phrase list (the domain LM
a deployment uses) and the default decoder count (one per core).  Eight callers connect as Telnyx
does and speak in real time (20 ms PCMU frames), each two utterances of several seconds in its own
espeak-ng voice, their starts a quarter of a second apart; two more streams say 0.8 s of speech and
then send nothing, keeping their sockets open, as a stalled or hostile peer would.  Every caller
must get a transcript.final for each utterance, soon after it ends, and no stt.failed; the stalled
streams must not hold a decoder (in the earlier design they held both decoders of a two-core
machine for as long as their sockets stayed open, and the other calls got no finals at all).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

import aiohttp
import numpy as np
import pytest
import websockets

from api.simulator import telnyx_messages
from tests.servers import Server, running_server
from tests.speech import synthesize
from tests.sse_client import SseEvent, read_sse
from tests.telnyx_client import connect as connect_media

SENTENCES = [
    "hello thank you for calling the billing department how can i help you today",
    "i would like to make a payment on my account before the end of the month",
    "can you confirm the amount and the due date on my last statement please",
    "my card was declined yesterday and i do not know the reason why",
    "please send me a copy of the invoice by email as soon as you can",
    "i need to change the address on my account because i moved last week",
    "could you call me back tomorrow morning after ten o'clock",
    "thank you very much for your help have a nice day",
]
VOICES = ["en-us", "en-gb", "en+f3", "en-us+m3", "en-gb-x-rp", "en+f2", "en-029", "en-gb-scotland"]
CALLERS = 8
STALLED = 2
RATE = 8000
FRAME = 160  # samples per 20 ms at 8 kHz
MAX_DELAY_S = 5.0  # from the utterance's last audio frame (espeak's tail silence, the VAD hangover included)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("stt-concurrency")
    phrases = tmp / "phrases.txt"
    phrases.write_text("\n".join(SENTENCES) + "\n")
    with running_server(tmp, SWITCHBOARD_STT_PROVIDER="pocketsphinx", SWITCHBOARD_STT_PHRASES_FILE=str(phrases),
                        SWITCHBOARD_SSE_HEARTBEAT_S="1", SWITCHBOARD_LOG_LEVEL="WARNING") as srv:
        yield srv


def caller_audio(i: int) -> tuple[np.ndarray, list[int]]:
    """Caller ``i``'s audio (lead silence, utterance, pause, utterance, tail) and the frame index at
    which each utterance's speech ends."""
    voice = VOICES[i % len(VOICES)]
    lead = np.zeros(int(RATE * (0.3 + 0.25 * i)), dtype=np.int16)
    pause, tail = np.zeros(RATE * 3 // 2, dtype=np.int16), np.zeros(RATE * 2, dtype=np.int16)
    u1 = synthesize(SENTENCES[i % len(SENTENCES)], rate=RATE, voice=voice, pad_ms=0)
    u2 = synthesize(SENTENCES[(i + 3) % len(SENTENCES)], rate=RATE, voice=voice, pad_ms=0)
    ends = [len(lead) + len(u1), len(lead) + len(u1) + len(pause) + len(u2)]
    return np.concatenate([lead, u1, pause, u2, tail]), [-(-e // FRAME) for e in ends]


async def send_paced(ws: websockets.ClientConnection, messages: list[str], sent_at: list[float]) -> None:
    """Send the connected and start messages, then one media message per 20 ms of wall time."""
    loop = asyncio.get_running_loop()
    await ws.send(messages[0])
    await ws.send(messages[1])
    t0 = loop.time()
    for n, msg in enumerate(messages[2:]):
        delay = t0 + n * 0.02 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await ws.send(msg)
        sent_at.append(time.monotonic())


class Call:
    def __init__(self, name: str) -> None:
        self.call_id = f"v3:{name}"
        self.events: list[tuple[float, SseEvent]] = []

    def on_event(self, ev: SseEvent) -> None:
        self.events.append((time.monotonic(), ev))

    def named(self, name: str) -> list[tuple[float, dict]]:  # type: ignore[type-arg]
        return [(t, ev.json()) for t, ev in self.events if ev.event == name]


async def talker(server: Server, call: Call, i: int) -> list[float]:
    """Caller ``i`` says its two utterances and hangs up; returns when each utterance's speech ended."""
    pcm, ends = caller_audio(i)
    messages = telnyx_messages(pcm, call_id=call.call_id, stream_id=f"s-{call.call_id}", encoding="PCMU",
                               sample_rate=RATE, token=None)
    sent_at: list[float] = []
    async with connect_media(server.ws) as ws:
        await send_paced(ws, messages[:-1], sent_at)
        await ws.send(messages[-1])  # stop
        await ws.wait_closed()
    return [sent_at[e - 1] for e in ends]


async def staller(server: Server, call: Call, i: int, release: asyncio.Event) -> None:
    """0.8 s of speech, then nothing at all (no media, no stop) until ``release``; then the socket closes."""
    pcm = synthesize(SENTENCES[i], rate=RATE, voice="en-us", pad_ms=0)[: RATE * 4 // 5]
    messages = telnyx_messages(pcm, call_id=call.call_id, stream_id=f"s-{call.call_id}", encoding="PCMU",
                               sample_rate=RATE, token=None)
    async with connect_media(server.ws) as ws:
        await send_paced(ws, messages[:-1], [])
        await release.wait()


async def test_eight_callers_and_two_stalled_streams_every_utterance_gets_a_prompt_final(server: Server) -> None:
    talkers = [Call(f"talker-{i}") for i in range(CALLERS)]
    stalled = [Call(f"stalled-{i}") for i in range(STALLED)]
    release = asyncio.Event()
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as http:
        readers = [asyncio.create_task(read_sse(http, f"{server.http}/api/calls/{c.call_id}/events",
                                                on_event=c.on_event)) for c in talkers + stalled]
        await asyncio.sleep(0.3)
        stallers = [asyncio.create_task(staller(server, c, i, release)) for i, c in enumerate(stalled)]
        await asyncio.sleep(1.0)  # the stalled streams are open and silent before anyone talks
        ends = await asyncio.wait_for(asyncio.gather(*(talker(server, c, i) for i, c in enumerate(talkers))), 40)
        release.set()
        await asyncio.wait_for(asyncio.gather(*stallers, *readers), 20)
    wall = time.monotonic() - t0

    delays = []
    for call, utterance_ends in zip(talkers, ends, strict=True):
        finals = call.named("transcript.final")
        assert [f["seq"] for _, f in finals] == [1, 2], (call.call_id, [f["text"] for _, f in finals])
        delays += [t - end for (t, _), end in zip(finals, utterance_ends, strict=True)]
        (_, ended), = call.named("call.ended")
        assert ended["stats"]["stt_failed_utterances"] == 0 and ended["stats"]["stt_dropped"] == 0
    for call in stalled:  # their utterance was open all along; hanging up ends it, and it is owed
        assert [f["seq"] for _, f in call.named("transcript.final")] == [1], call.call_id
    failed = [(c.call_id, p) for c in talkers + stalled for _, p in c.named("stt.failed")]
    assert failed == []

    d = np.array(delays)
    texts = [f["text"] for c in talkers for _, f in c.named("transcript.final")]
    print(f"\n{CALLERS} talkers + {STALLED} stalled streams, {os.cpu_count()} decoders, wall {wall:.1f} s: "
          f"final after utterance end p50 {np.percentile(d, 50):.2f} s, p95 {np.percentile(d, 95):.2f} s, "
          f"max {d.max():.2f} s over {len(d)} utterances; sample: {texts[:2]}")
    assert d.max() < MAX_DELAY_S
